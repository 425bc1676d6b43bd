"""glmlora: LoRA fine-tuning of ChatGLM3-6B on transformers' native GlmForCausalLM (no remote code)."""

from .chatglm3 import ConversionError, convert_checkpoint, ensure_native, export_original, load, load_model
from .tokenizer import ChatGLM3Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = ["ChatGLM3Tokenizer", "ConversionError", "convert_checkpoint", "ensure_native", "export_original",
           "load", "load_model", "load_tokenizer"]
