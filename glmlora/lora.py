"""LoRA on the native model: the config factory (lesson 05) and import of adapters made for the original.

The original tutorial targets ChatGLM3's fused ``query_key_value``; on ``GlmForCausalLM`` the same layer is
``q_proj``/``k_proj``/``v_proj``.  A fused LoRA converts exactly: the same A for q, k and v, and B split by
rows (docs/design.md §2.6).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import LoraConfig, TaskType
from safetensors.torch import save_file

from .chatglm3 import ConversionError, read_shard

#: Attention only, like the original tutorial (its ``query_key_value``), in native names.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj")
#: Every linear layer of a decoder block: more capacity for the same rank, a little more memory.
ALL_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")

_DIRECT = {"dense": "o_proj", "dense_h_to_4h": "gate_up_proj", "dense_4h_to_h": "down_proj"}
_PARENT = {"dense": "self_attn", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}
_KEY = re.compile(r"^base_model\.model\.transformer\.encoder\.layers\.(\d+)\.(self_attention|mlp)\."
                  r"(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)\.(lora_A|lora_B)\.weight$")


def lora_config(r: int = 8, alpha: int = 32, dropout: float = 0.1,
                target_modules: Sequence[str] = ATTENTION_TARGETS, **kwargs: Any) -> LoraConfig:
    """A ``LoraConfig`` for ChatGLM3 on ``GlmForCausalLM``; the update is scaled by ``alpha / r``."""
    unknown = set(target_modules) - set(ALL_LINEAR_TARGETS)
    if unknown:
        hint = " (original ChatGLM3 names? use q_proj, k_proj, v_proj)" if "query_key_value" in unknown else ""
        raise ValueError(f"unknown target module(s) {sorted(unknown)}{hint}; choose from {ALL_LINEAR_TARGETS}")
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(target_modules), **kwargs)


def _adapter_weights(adapter_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            return adapter_dir / name, read_shard(adapter_dir / name)
    raise ConversionError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def _check_config(cfg: dict[str, Any], path: Path) -> list[str]:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{path}: field 'peft_type' is {cfg.get('peft_type')!r}; only LORA adapters convert")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ConversionError(f"{path}: field 'target_modules' must be a list of module names, got {targets!r}")
    unknown = sorted(set(targets) - {"query_key_value", *_DIRECT})
    if unknown:
        raise ConversionError(f"{path}: field 'target_modules' has {unknown}, which have no native equivalent")
    for field, ok in (("bias", lambda v: v in (None, "none")), ("use_dora", lambda v: not v),
                      ("modules_to_save", lambda v: not v), ("rank_pattern", lambda v: not v),
                      ("alpha_pattern", lambda v: not v)):
        if not ok(cfg.get(field)):
            raise ConversionError(f"{path}: field '{field}' = {cfg[field]!r} is not supported by the import")
    return list(targets)


def import_original_adapter(adapter_dir: str | Path, out_dir: str | Path,
                            base_model: str | Path | None = None) -> Path:
    """Convert a PEFT LoRA trained on the ORIGINAL remote-code ChatGLM3 into a native adapter directory.

    ``base_model`` (an original or converted model directory) gives the q/k/v row split; without it the
    split is inferred (q rows = hidden size, as in every ChatGLM3 model).  The result loads with
    ``PeftModel.from_pretrained(native_model, out_dir)``.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{adapter_dir}: no adapter_config.json (is this a PEFT adapter directory?)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    targets = _check_config(cfg, cfg_path)
    weights_path, weights = _adapter_weights(adapter_dir)
    q_rows = _q_rows(base_model)
    out: dict[str, torch.Tensor] = {}
    for key, t in weights.items():
        m = _KEY.match(key)
        if not m:
            raise ConversionError(f"{weights_path}: unknown adapter weight '{key}'")
        layer, _, module, ab = m.groups()
        prefix = f"base_model.model.model.layers.{layer}."
        if module == "query_key_value":
            if ab == "lora_A":
                for x in "qkv":
                    out[f"{prefix}self_attn.{x}_proj.lora_A.weight"] = t.clone()
            else:
                q = q_rows if q_rows is not None else weights[key.replace("lora_B", "lora_A")].shape[1]
                kv = (t.shape[0] - q) // 2
                if q + 2 * kv != t.shape[0] or kv <= 0:
                    raise ConversionError(f"{weights_path}: '{key}' has {t.shape[0]} rows, which do not split "
                                          f"into q={q} and two equal k/v parts")
                for x, part in zip("qkv", torch.split(t, [q, kv, kv])):
                    out[f"{prefix}self_attn.{x}_proj.lora_B.weight"] = part.clone()
        else:
            out[f"{prefix}{_PARENT[module]}.{_DIRECT[module]}.{ab}.weight"] = t.contiguous()
    native_targets = sorted({n for t in targets for n in (ATTENTION_TARGETS if t == "query_key_value"
                                                         else (_DIRECT[t],))})
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                        lora_dropout=cfg.get("lora_dropout", 0.0), target_modules=native_targets,
                        use_rslora=bool(cfg.get("use_rslora", False)),
                        layers_to_transform=cfg.get("layers_to_transform"),
                        base_model_name_or_path=str(base_model) if base_model else cfg.get("base_model_name_or_path"))
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(out, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _q_rows(base_model: str | Path | None) -> int | None:
    if base_model is None:
        return None
    cfg = json.loads((Path(base_model) / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") == "chatglm":
        return cfg["num_attention_heads"] * cfg.get("kv_channels", cfg["hidden_size"] // cfg["num_attention_heads"])
    return cfg["num_attention_heads"] * cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
