"""Export a fine-tuned model (lesson 06): merged native directory, or back to the original layout.

A merged export needs neither peft nor glmlora to run: ``AutoModelForCausalLM.from_pretrained`` loads it,
and its ``generation_config.json`` carries ChatGLM3's stop ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .chatglm3 import export_original, generation_config
from .tokenizer import ChatGLM3Tokenizer


def merge(model: Any) -> Any:
    """Fold LoRA into the base weights (``W + alpha/r * B @ A``); a plain model passes through."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def export_merged(model: Any, tokenizer: ChatGLM3Tokenizer, out_dir: str | Path, max_shard_size: str = "2GB") -> Path:
    """A standard transformers directory: safetensors shards, config, tokenizer files, stop ids."""
    out_dir = Path(out_dir)
    merged = merge(model)
    merged.generation_config = generation_config(tokenizer.stop_ids)
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def export_merged_original(model: Any, tokenizer: ChatGLM3Tokenizer, out_dir: str | Path) -> Path:
    """The merged model in the ORIGINAL ChatGLM3 layout, for tools that expect ``query_key_value``."""
    out_dir = Path(out_dir)
    native = export_merged(model, tokenizer, out_dir.with_name(out_dir.name + "-native"))
    return export_original(native, out_dir)
