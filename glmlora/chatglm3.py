"""ChatGLM3-6B as transformers' native ``GlmForCausalLM``: config mapping, weight conversion, loading.

ChatGLM3's remote code no longer loads on transformers 5.x, but its architecture *is* ``GlmForCausalLM``
once the fused QKV projection is split and the keys are renamed (docs/design.md §2).  The conversion runs once,
shard by shard, into a normal transformers directory, so nothing here ever needs ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig, GlmConfig

from .tokenizer import VOCAB_FILE, ChatGLM3Tokenizer, load_tokenizer

MARKER = "glmlora_conversion.json"
FORMAT_VERSION = 2  # 2: source hashes and the list of files written
NATIVE_SUFFIX = "-glmlora-native"


class ConversionError(ValueError):
    """A ChatGLM3 checkpoint that cannot be converted; the message names the file and field."""


# ---- config ------------------------------------------------------------------------------------
# Options of the original config with no native equivalent: (field, bad value test, why).
_UNSUPPORTED: list[tuple[str, Callable[[Any], bool], str]] = [
    ("pre_seq_len", lambda v: v not in (None, 0), "P-tuning v2 prefix encoder"),
    ("quantization_bit", lambda v: v not in (None, 0), "weights quantised by the remote code"),
    ("rmsnorm", lambda v: v is False, "LayerNorm instead of RMSNorm"),
    ("add_bias_linear", lambda v: v is True, "biases on every linear layer"),
    ("apply_residual_connection_post_layernorm", lambda v: v is True, "residual taken after the norm"),
    ("post_layer_norm", lambda v: v is False, "no final norm"),
    ("original_rope", lambda v: v is False, "a rotary variant the 6B code never used"),
]
_REQUIRED = ("hidden_size", "num_layers", "num_attention_heads", "padded_vocab_size", "ffn_hidden_size")


def glm_config_from_chatglm(cfg: dict[str, Any], source: str = "config.json") -> GlmConfig:
    """Map a ChatGLM3 ``config.json`` (model_type ``chatglm``) to ``GlmConfig`` (docs/design.md §2.3).

    ``eos_token_id`` stays 2 (Trainer aligns it with the tokenizer's eos anyway); generation stops on the
    full list ``[eos, <|user|>, <|observation|>]`` through ``generation_config.json``.
    """
    if cfg.get("model_type") != "chatglm":
        raise ConversionError(f"{source}: field 'model_type' is {cfg.get('model_type')!r}, expected 'chatglm'")
    for field, bad, why in _UNSUPPORTED:
        if field in cfg and bad(cfg[field]):
            raise ConversionError(f"{source}: field '{field}' = {cfg[field]!r} ({why}) has no equivalent in "
                                  f"transformers' GlmForCausalLM; use a checkpoint without it")
    missing = [f for f in _REQUIRED if f not in cfg]
    if missing:
        raise ConversionError(f"{source}: missing field(s) {', '.join(missing)}")
    for field in (*_REQUIRED, "kv_channels", "multi_query_group_num", "seq_length"):
        value = cfg.get(field, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConversionError(f"{source}: field '{field}' must be a positive integer, got {value!r}")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("multi_query_group_num", heads) if cfg.get("multi_query_attention") else heads
    return GlmConfig(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=cfg.get("kv_channels", cfg["hidden_size"] // heads),
        hidden_act="silu",
        rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(cfg.get("add_qkv_bias", True)),
        max_position_embeddings=cfg.get("seq_length", 8192),
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * cfg.get("rope_ratio", 1),
                         "partial_rotary_factor": 0.5},
        pad_token_id=cfg.get("pad_token_id", 0),
        bos_token_id=1,
        eos_token_id=2,  # as in the original config; the stop list lives in generation_config.json
        dtype=cfg.get("torch_dtype", "float16"),
    )


def generation_config(stop_ids: list[int]) -> GenerationConfig:
    """The original chat's defaults: sample with top_p 0.8, temperature 0.8; stop on eos/user/observation."""
    return GenerationConfig(eos_token_id=stop_ids, pad_token_id=0, bos_token_id=1,
                            do_sample=True, top_p=0.8, temperature=0.8, max_new_tokens=512)


# ---- key mapping -------------------------------------------------------------------------------
_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_DROPPED = {"transformer.rotary_pos_emb.inv_freq"}


def qkv_sizes(config: GlmConfig) -> list[int]:
    """Rows of the fused QKV matrix that belong to q, k and v (6B: 4096, 256, 256)."""
    return [config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim]


def expected_shapes(config: GlmConfig) -> dict[str, tuple[int, ...]]:
    """Every native parameter name with its shape, from the config alone."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv, _ = qkv_sizes(config)
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_up_proj.weight": (2 * i, h), p + "mlp.down_proj.weight": (h, i),
        })
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def convert_tensors(tensors: dict[str, torch.Tensor], config: GlmConfig, source: str) -> dict[str, torch.Tensor]:
    """Rename original keys to native ones and split the fused QKV rows; checks every shape."""
    shapes, out = expected_shapes(config), {}
    for key, t in tensors.items():
        if key in _DROPPED:
            continue
        if key in _GLOBAL_MAP:
            out[_GLOBAL_MAP[key]] = t
            continue
        m = _LAYER.match(key)
        if not m or int(m.group(1)) >= config.num_hidden_layers:
            raise ConversionError(f"{source}: unknown weight '{key}' (not part of a ChatGLM3 checkpoint with "
                                  f"{config.num_hidden_layers} layers)")
        n, rest = m.groups()
        prefix = f"model.layers.{n}."
        if rest in _LAYER_MAP:
            out[prefix + _LAYER_MAP[rest]] = t
        elif rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            if t.shape[0] != sum(qkv_sizes(config)):
                raise ConversionError(f"{source}: '{key}' has {t.shape[0]} rows, but the config "
                                      f"(num_attention_heads, multi_query_group_num, kv_channels) implies "
                                      f"{sum(qkv_sizes(config))}")
            for name, part in zip(("q", "k", "v"), torch.split(t, qkv_sizes(config), dim=0)):
                out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.clone()
        else:
            raise ConversionError(f"{source}: unknown weight '{key}'")
    for name, t in out.items():
        want = shapes.get(name)
        if want is None:
            raise ConversionError(f"{source}: weight '{name}' is not expected by the config (attention bias?)")
        if tuple(t.shape) != want:
            raise ConversionError(f"{source}: weight '{name}' has shape {tuple(t.shape)} but config.json "
                                  f"implies {want} (hidden_size, ffn_hidden_size, padded_vocab_size, ...)")
    return out


def to_original(tensors: dict[str, torch.Tensor], config: GlmConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_tensors`: native names back to the original ChatGLM3 layout."""
    inverse = {v: k for k, v in _GLOBAL_MAP.items()}
    layer_inv = {v: k for k, v in _LAYER_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in inverse:
            out[inverse[name]] = t
            continue
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
        if not m:
            raise ConversionError(f"unknown native weight '{name}'")
        n, rest = m.groups()
        if rest in layer_inv:
            out[f"transformer.encoder.layers.{n}.{layer_inv[rest]}"] = t
        elif not re.match(r"self_attn\.[qkv]_proj\.(weight|bias)$", rest):
            raise ConversionError(f"unknown native weight '{name}'")
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}.self_attn."
        for kind in ("weight", "bias"):
            parts = [tensors.get(f"{p}{x}_proj.{kind}") for x in "qkv"]
            if all(x is not None for x in parts):
                out[f"transformer.encoder.layers.{n}.self_attention.query_key_value.{kind}"] = torch.cat(parts)
    return out


# ---- reading checkpoints shard by shard ----------------------------------------------------------
def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files in order: from an index json, else a single file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            parsed = _read_json(index)
            weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
            if not weight_map or not isinstance(weight_map, dict) or \
                    not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index}: field 'weight_map' is missing, empty or not a mapping of weight "
                                      f"names to shard files")
            files = [model_dir / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConversionError(f"{index}: lists shard(s) that are not in {model_dir}: {', '.join(missing)} "
                                      f"(an interrupted download? run the download again)")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise ConversionError(f"{model_dir}: no weights found (expected *.safetensors or pytorch_model*.bin, "
                          f"with their index json when sharded)")


def check_safetensors(path: Path) -> None:
    """Raise :class:`ConversionError` naming ``path`` unless its header is readable and its data complete
    (safetensors checks that the header's offsets cover the file exactly); reads the header only."""
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: empty file (0 bytes): an interrupted download? download it again")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # SafetensorError, OSError: the library's message, with the file named
        raise ConversionError(f"{path}: not a readable safetensors file ({e}): truncated or corrupt; "
                              f"download it again") from None


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """One shard into host memory (memory-mapped for .bin), never more; a broken file is named."""
    if path.suffix == ".safetensors":
        check_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: empty file (0 bytes): an interrupted download? download it again")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}): truncated or "
                              f"corrupt; download it again") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: no such model directory")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{model_dir}: no config.json (is this a model directory?)")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: must be a JSON object of config fields, got {type(config).__name__}")
    return config


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(model_dir: Path, files: list[Path], hashes: dict[str, str] | None = None) -> list[list[Any]]:
    """``[name, size, mtime, sha256]`` of every source file; the hash is computed only when asked for."""
    names = [model_dir / "config.json", model_dir / VOCAB_FILE, *files]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns, (hashes or {}).get(p.name)] for p in names]


def _same_source(old: dict[str, Any], stamp: dict[str, Any], src: Path) -> list[list[Any]] | None:
    """The up-to-date fingerprint when the recorded conversion was made from these very files, else None.

    Same names and sizes; a file whose time stamp changed (copied, touched) counts as the same when its
    SHA-256 equals the recorded one, so only a real change of contents converts again."""
    if {k: old.get(k) for k in ("format", "source")} != {k: stamp[k] for k in ("format", "source")}:
        return None
    before, now = old.get("files") or [], stamp["files"]
    if [f[:2] for f in before] != [f[:2] for f in now]:
        return None
    fresh = []
    for (name, size, mtime, digest), (_, _, now_mtime, _) in zip(before, now):
        if mtime != now_mtime and (digest is None or _sha256(src / name) != digest):
            return None
        fresh.append([name, size, now_mtime, digest])
    return fresh


@dataclass
class ConversionReport:
    out_dir: Path
    reused: bool
    shards: int
    parameters: int


def _source_tokenizer(src: Path, config: GlmConfig) -> ChatGLM3Tokenizer:
    vocab = src / VOCAB_FILE
    if not vocab.is_file():
        raise ConversionError(f"{src}: missing tokenizer file '{VOCAB_FILE}' (the ChatGLM3 sentencepiece model)")
    try:
        tokenizer = ChatGLM3Tokenizer(vocab_file=str(vocab))
    except Exception as e:  # sentencepiece's own RuntimeError for a damaged model file
        raise ConversionError(f"{vocab}: not a readable sentencepiece model ({e}); download it again") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ConversionError(f"{vocab}: {tokenizer.vocab_size} token ids (with the 9 special tokens) do not fit "
                              f"the {config.vocab_size} embedding rows of config.json's 'padded_vocab_size'")
    return tokenizer


def _check_sources(files: list[Path]) -> None:
    """Every shard's header before anything is written: a broken download stops the conversion at once."""
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path)
        elif path.stat().st_size == 0:
            raise ConversionError(f"{path}: empty file (0 bytes): an interrupted download? download it again")


def convert_checkpoint(src: str | Path, out: str | Path | None = None, progress: bool = True) -> ConversionReport:
    """Convert an original ChatGLM3 directory into a native one; reuses a finished conversion.

    Writes into ``<out>.partial`` (removed again if anything fails) and moves the files into ``out`` at the end,
    so an interrupted run is never mistaken for a finished one. Host memory stays near one input shard: each
    shard is converted and written on its own. A conversion made from other source files is replaced file by
    file: what glmlora wrote goes, files a user put into ``out`` stay.
    """
    src = Path(src)
    out = Path(out) if out is not None else native_dir_for(src)
    config = glm_config_from_chatglm(read_config(src), str(src / "config.json"))
    tokenizer = _source_tokenizer(src, config)
    files = weight_files(src)
    stamp = {"format": FORMAT_VERSION, "source": str(src.resolve()), "files": _fingerprint(src, files)}
    old = _conversion_marker(out)
    if old is not None and (fresh := _same_source(old, stamp, src)) is not None:
        if fresh != old["files"]:  # only time stamps changed: remember the new ones, convert nothing
            (out / MARKER).write_text(json.dumps({**old, "files": fresh}, indent=2))
        return ConversionReport(out, True, len(files), count_parameters(out))
    if old is None and out.exists():
        raise ConversionError(f"{out} exists and is not a glmlora conversion; move it away or choose another "
                              f"output directory")
    _check_sources(files)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if old is not None:
        print(f"{src} has changed since {out} was converted: converting it again (files you added there stay)",
              flush=True)
    try:
        hashes = _write_conversion(src, files, config, tokenizer, partial, progress)
        written = sorted(p.name for p in partial.iterdir())
        stamp["files"] = _fingerprint(src, files, hashes)
        (partial / MARKER).write_text(json.dumps({**stamp, "written": written + [MARKER]}, indent=2))
        _install(partial, out, old)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return ConversionReport(out, False, len(files), count_parameters(out))


def _conversion_marker(out: Path) -> dict[str, Any] | None:
    """The stamp of a glmlora conversion in ``out`` (an unreadable one counts as ours, to be redone)."""
    if not (out / MARKER).is_file():
        return None
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _write_conversion(src: Path, files: list[Path], config: GlmConfig, tokenizer: ChatGLM3Tokenizer,
                      partial: Path, progress: bool) -> dict[str, str]:
    """The native shards, index, configs and tokenizer in ``partial``; returns the sources' SHA-256s."""
    weight_map, total, seen, hashes = {}, 0, set(), {}
    for i, path in enumerate(tqdm(files, desc="converting shards", disable=not progress)):
        tensors = convert_tensors(read_shard(path), config, str(path))
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, str(partial / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        seen |= tensors.keys()
        del tensors
        hashes[path.name] = _sha256(path)  # just read: served from the page cache
    missing = sorted(set(expected_shapes(config)) - seen)
    if missing:
        raise ConversionError(f"{src}: the checkpoint lacks {len(missing)} weight(s), e.g. "
                              f"{', '.join(missing[:3])} (native names)")
    (partial / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config.architectures = ["GlmForCausalLM"]
    config.save_pretrained(partial)
    generation_config(tokenizer.stop_ids).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    hashes.update({p.name: _sha256(p) for p in (src / "config.json", src / VOCAB_FILE)})
    return hashes


def _install(partial: Path, out: Path, old: dict[str, Any] | None) -> None:
    """Move the new conversion into ``out``. Over an older one: its marker goes first (an interruption then
    leaves a directory that converts again), then the files it wrote, then the new files and marker."""
    if old is None:
        partial.rename(out)
        return
    (out / MARKER).unlink(missing_ok=True)
    ours = old.get("written") or _written_by_format_1(out)
    for name in ours:
        if (out / name).is_file():
            (out / name).unlink()
    for path in sorted(partial.iterdir(), key=lambda p: p.name == MARKER):  # the marker last
        os.replace(path, out / path.name)


def _written_by_format_1(out: Path) -> list[str]:
    """What a conversion made before markers listed their files wrote (format 1)."""
    fixed = {"model.safetensors.index.json", "config.json", "generation_config.json", VOCAB_FILE,
             "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", MARKER}
    return sorted(p.name for p in out.iterdir()
                  if p.name in fixed or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", p.name))


def count_parameters(native: Path) -> int:
    """Parameters of a converted directory, read from the safetensors headers (no weights loaded)."""
    index = json.loads((native / "model.safetensors.index.json").read_text(encoding="utf-8"))
    count = 0
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(native / name), framework="pt") as f:
            count += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return count


def native_dir_for(src: Path) -> Path:
    """Where an original checkpoint's conversion is cached: a sibling directory."""
    return src.with_name(src.name + NATIVE_SUFFIX)


def model_type(path: str | Path) -> str:
    return read_config(Path(path)).get("model_type", "")


def ensure_native(path: str | Path, progress: bool = True) -> Path:
    """A native directory for ``path``: itself if already native, else its (cached) conversion."""
    path = Path(path)
    kind = model_type(path)
    if kind == "glm":
        return path
    if kind == "chatglm":
        return convert_checkpoint(path, progress=progress).out_dir
    raise ConversionError(f"{path / 'config.json'}: field 'model_type' is {kind!r}; expected 'chatglm' "
                          f"(an original ChatGLM3 download) or 'glm' (a converted one)")


def default_dtype() -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU (CPU half math is slow or missing).

    ``GLMLORA_NO_BF16=1`` takes the fp16 path on any GPU (``environment.bf16_supported``), so an fp16-only card
    can be rehearsed on a newer one."""
    from .environment import bf16_supported

    if torch.cuda.is_available():
        return torch.bfloat16 if bf16_supported() else torch.float16
    return torch.float32


def quantization_config(compute_dtype: torch.dtype | None = None) -> Any:
    """QLoRA's 4-bit base: NF4 weights with double quantization, matrix products in bf16 (fp16 on older GPUs).

    Needs a CUDA GPU and bitsandbytes (requirements-gpu.txt); the error says so before any weight is read.
    """
    import importlib.util

    if not torch.cuda.is_available():
        raise RuntimeError("load_in_4bit (QLoRA) needs a CUDA GPU; on this machine set LOAD_IN_4BIT = False")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("load_in_4bit (QLoRA) needs bitsandbytes: pip install -r requirements-gpu.txt")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype or default_dtype())


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device_map: Any = None,
               attn_implementation: str = "sdpa", load_in_4bit: bool = False, **kwargs: Any):
    """Load ChatGLM3 as ``GlmForCausalLM`` from an original download (converted once) or a native dir.

    ``load_in_4bit=True`` loads the base in 4-bit NF4 for QLoRA on 10-16 GB cards (see
    ``quantization_config``); the layers that stay unquantised (embedding, norms, output) keep ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(dtype if isinstance(dtype, torch.dtype) else None)
        device_map = device_map or {"": torch.cuda.current_device()}
    native = ensure_native(path)
    return AutoModelForCausalLM.from_pretrained(
        str(native), dtype=dtype or default_dtype(), device_map=device_map,
        attn_implementation=attn_implementation, **kwargs)


def load(path: str | Path, **kwargs: Any):
    """``(model, tokenizer)`` for a ChatGLM3 directory, original or converted."""
    native = ensure_native(path)
    return load_model(native, **kwargs), load_tokenizer(native)
