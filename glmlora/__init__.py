"""glmlora: LoRA fine-tuning of ChatGLM3-6B on transformers' native GlmForCausalLM (no remote code).

Names are imported lazily, so ``glmlora.environment`` can explain a missing torch or transformers
instead of failing on import.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "ChatGLM3Tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "ConversionError": "chatglm3", "convert_checkpoint": "chatglm3", "ensure_native": "chatglm3",
    "export_original": "export", "load": "chatglm3", "load_model": "chatglm3",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'glmlora' has no attribute {name!r}")
