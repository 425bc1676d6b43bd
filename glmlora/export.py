"""Export a fine-tuned model (lesson 06): merged native directory, or back to the original layout.

A merged export needs neither peft nor glmlora to run: ``AutoModelForCausalLM.from_pretrained`` loads it,
``AutoTokenizer`` loads its standard ``tokenizer.json`` and chat template, and its ``generation_config.json``
carries ChatGLM3's stop ids — so vLLM or a plain transformers script can serve it.

The original layout (``query_key_value``, model_type ``chatglm``) is for tools that still run ChatGLM3's own
code.  That code is the model authors', so it is never shipped here: :func:`export_original` copies it,
with the tokenizer files and the complete ``config.json`` (``use_cache``, ``auto_map`` ...), from the
original download the model was converted from, and prints what is missing when that download has none
(the tiny model).  :func:`missing_files` lists what the original ``from_pretrained(...,
trust_remote_code)`` would still need.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import GlmConfig
from transformers.dynamic_module_utils import get_relative_imports

from .chatglm3 import MARKER, ConversionError, generation_config, read_shard, to_original, weight_files
from .tokenizer import VOCAB_FILE, ChatGLM3Tokenizer

EXPORT_MARKER = "glmlora_export.json"
#: Files of an original download that an original-layout export takes along (besides its *.py code).
SOURCE_FILES = (VOCAB_FILE, "tokenizer_config.json", "special_tokens_map.json", "MODEL_LICENSE", "LICENSE")
#: ChatGLM3-6B's config flags that the native config does not carry, with the real model's values.
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "apply_query_key_layer_scaling": True,
    "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
    "fp32_residual_connection": False, "hidden_dropout": 0.0, "use_cache": True,
}


def merge(model: Any) -> Any:
    """Fold LoRA into the base weights (``W + alpha/r * B @ A``); a plain model passes through.

    A 4-bit (QLoRA) base is refused: its weights would be rounded back to 4 bits after the update is added, which
    loses most of what LoRA learned. ``glmlora.qlora.merged_16bit`` merges into a 16-bit copy of the base instead."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        raise ValueError("this model's base is quantised (QLoRA): merging into 4-bit weights loses the update; "
                         "use glmlora.qlora.merged_16bit(native_dir, adapter_dir) to merge into a 16-bit copy")
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def export_merged(model: Any, tokenizer: ChatGLM3Tokenizer, out_dir: str | Path, max_shard_size: str = "2GB") -> Path:
    """A standard transformers directory: safetensors shards, config, standard tokenizer files, stop ids.

    It also notes the original download the model came from (``glmlora_export.json``), so that
    :func:`export_original` can later take that download's code and config along.
    """
    out_dir = Path(out_dir)
    merged = merge(model)
    merged.generation_config = generation_config(tokenizer.stop_ids)
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    source = source_dir(getattr(merged.config, "_name_or_path", "") or "")
    (out_dir / EXPORT_MARKER).write_text(json.dumps({"source": str(source) if source else None}, indent=2))
    return out_dir


def export_merged_original(model: Any, tokenizer: ChatGLM3Tokenizer, out_dir: str | Path,
                           source: str | Path | None = None) -> Path:
    """The merged model in the ORIGINAL ChatGLM3 layout, for tools that run ChatGLM3's own code."""
    out_dir = Path(out_dir)
    native = export_merged(model, tokenizer, out_dir.with_name(out_dir.name + "-native"))
    return export_original(native, out_dir, source=source)


# ---- where a directory came from ----------------------------------------------------------------
def source_dir(native: str | Path) -> Path | None:
    """The original download a converted (or merged) directory was made from, if it is still there."""
    native = Path(native)
    for marker in (MARKER, EXPORT_MARKER):
        path = native / marker
        if native.name and path.is_file():
            source = json.loads(path.read_text(encoding="utf-8")).get("source")
            return Path(source) if source and Path(source).is_dir() else None
    return None


# ---- the original layout ------------------------------------------------------------------------
def export_original(native: str | Path, out: str | Path, source: str | Path | None = None) -> Path:
    """Write a native directory back in the original ChatGLM3 layout, ready for ChatGLM3's own code.

    ``source`` is the original download (default: the one recorded at conversion or merged export).  Its
    ``*.py`` code, tokenizer files and licence are copied, and ``config.json`` keeps every field of its
    config (``auto_map``, ``use_cache`` ...).  Whatever the original ``from_pretrained`` would still need is
    printed, not raised: the weights are complete either way.
    """
    native, out = Path(native), Path(out)
    source = Path(source) if source is not None else source_dir(native)
    config = GlmConfig.from_pretrained(str(native))
    source_config = _read_json(source / "config.json") if source and (source / "config.json").is_file() else None
    exported_config = original_config(config, source_config)  # a mismatched download is refused before any work
    out.mkdir(parents=True, exist_ok=True)
    _write_original_weights(native, out, config)
    (out / "config.json").write_text(json.dumps(exported_config, indent=2) + "\n")
    copied = _copy_source_files(source, out) if source else []
    if not (out / VOCAB_FILE).is_file():
        shutil.copyfile(native / VOCAB_FILE, out / VOCAB_FILE)
    missing = missing_files(out)
    if missing:
        print(_missing_note(out, source, copied, missing))
    return out


def _missing_note(out: Path, source: Path | None, copied: list[str], missing: list[str]) -> str:
    have = ", ".join(["the weights", "config.json", VOCAB_FILE, *[c for c in copied if c != VOCAB_FILE]])
    where = f"the original download {source}" if source else "the original ChatGLM3 download (pass source=<its directory>)"
    return (f"note: {out} has {have}, but ChatGLM3's own code also needs {', '.join(missing)}. Copy them from "
            f"{where}; glmlora does not ship the model authors' files.")


def _write_original_weights(native: Path, out: Path, config: GlmConfig) -> None:
    """Shard by shard, native names back to the original ones (q, k, v fused again)."""
    files = weight_files(native)
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    total = 0
    for i, path in enumerate(files):
        pending.update(read_shard(path))
        # q, k and v of one layer may sit in different shards: keep incomplete layers for the next shard.
        done = {k: v for k, v in pending.items() if _layer_complete(k, pending)}
        for k in done:
            pending.pop(k)
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        converted = to_original(done, config)
        save_file(converted, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in converted})
        total += sum(t.numel() * t.element_size() for t in converted.values())
    if pending:
        raise ConversionError(f"{native}: incomplete attention weights {sorted(pending)[:3]}")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def _layer_complete(name: str, tensors: dict[str, torch.Tensor]) -> bool:
    m = re.match(r"^(model\.layers\.\d+\.self_attn\.)[qkv]_proj\.(weight|bias)$", name)
    if not m:
        return True
    return all(f"{m.group(1)}{x}_proj.{m.group(2)}" in tensors for x in "qkv")


def _copy_source_files(source: Path, out: Path) -> list[str]:
    """The original download's code and tokenizer/licence files; returns the names copied."""
    names = sorted({p.name for p in source.glob("*.py")} | {n for n in SOURCE_FILES if (source / n).is_file()})
    for name in names:
        shutil.copyfile(source / name, out / name)
    return names


def chatglm_config_from_glm(config: GlmConfig) -> dict[str, Any]:
    """The original ``config.json`` fields that follow from a native config (inverse of
    ``glm_config_from_chatglm``), plus ChatGLM3-6B's remaining flags (:data:`ORIGINAL_DEFAULTS`)."""
    return {**ORIGINAL_DEFAULTS, **_structural_fields(config)}


def _structural_fields(config: GlmConfig) -> dict[str, Any]:
    """Sizes and flags the weights depend on: these must agree with the source's config."""
    theta = config.rope_parameters["rope_theta"]
    out = {
        "add_bias_linear": False, "add_qkv_bias": bool(config.attention_bias),
        "apply_residual_connection_post_layernorm": False, "ffn_hidden_size": config.intermediate_size,
        "hidden_size": config.hidden_size, "kv_channels": config.head_dim,
        "layernorm_epsilon": config.rms_norm_eps,
        "multi_query_attention": config.num_key_value_heads != config.num_attention_heads,
        "multi_query_group_num": config.num_key_value_heads, "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_hidden_layers, "original_rope": True, "padded_vocab_size": config.vocab_size,
        "post_layer_norm": True, "rmsnorm": True, "seq_length": config.max_position_embeddings,
        "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": config.pad_token_id,
    }
    if theta != 10000.0:
        out["rope_ratio"] = theta / 10000.0
    return out


def original_config(config: GlmConfig, source: dict[str, Any] | None) -> dict[str, Any]:
    """The exported ``config.json``: every field of the source's, the weights' sizes, the weights' dtype.

    A size that disagrees with the source's means the weights are not that model's: refused, naming the field.
    """
    structural = _structural_fields(config)
    source = source or {}
    for key, value in structural.items():
        if key in source and source[key] != value:
            raise ConversionError(f"config.json of the source: field '{key}' is {source[key]!r} but the exported "
                                  f"weights have {value!r}; is this the download the model was converted from?")
    dtype = str(config.dtype).replace("torch.", "") if config.dtype else "float16"
    return {**ORIGINAL_DEFAULTS, **source, **structural, "torch_dtype": dtype}


# ---- what ChatGLM3's own code needs ---------------------------------------------------------------
def required_files(directory: str | Path) -> list[str]:
    """Files the original ``from_pretrained(directory, trust_remote_code)`` reads (model and tokenizer).

    The code files come from ``auto_map`` in config.json and tokenizer_config.json, plus every module they
    import relatively (as transformers resolves them); nothing is executed.
    """
    directory = Path(directory)
    need = ["config.json", VOCAB_FILE, "tokenizer_config.json"]
    modules: list[str] = []
    for name in ("config.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            modules += _auto_map_modules(_read_json(directory / name))
    need += _with_relative_imports(directory, modules)
    return list(dict.fromkeys(need))


def missing_files(directory: str | Path) -> list[str]:
    """What :func:`required_files` lists that is not there (an ``auto_map`` counts as a file's field)."""
    directory = Path(directory)
    missing = [name for name in required_files(directory) if not (directory / name).is_file()]
    for name in ("config.json", "tokenizer_config.json"):
        if (directory / name).is_file() and "auto_map" not in _read_json(directory / name):
            missing.append(f"'auto_map' in {name}")
    try:
        weight_files(directory)
    except ConversionError:
        missing.append("the weights")
    return missing


def _auto_map_modules(config: dict[str, Any]) -> list[str]:
    """``{"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration", ...}`` -> ``["modeling_chatglm"]``."""
    refs: list[str] = []
    for value in config.get("auto_map", {}).values():
        refs += [v for v in (value if isinstance(value, list) else [value]) if v]
    return [ref.split("--")[-1].rsplit(".", 1)[0] for ref in refs]


def _with_relative_imports(directory: Path, modules: list[str]) -> list[str]:
    """Module files and, recursively, those they import with ``from .x import``; missing ones included."""
    seen: list[str] = []
    todo = list(modules)
    while todo:
        module = todo.pop(0)
        if module in seen:
            continue
        seen.append(module)
        path = directory / f"{module}.py"
        if path.is_file():
            todo += get_relative_imports(path)
    return [f"{m}.py" for m in seen]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
