"""Build ChatGLM3-shaped checkpoints on the fly, in the ORIGINAL layout (model_type ``chatglm``).

The tiny default lets every notebook run on a CPU in seconds; the full-size variant has the real 6B
shapes with random weights, for GPU memory and speed work where nothing can be downloaded.  Both are
written exactly like the real download (original key names, ``config.json``, ``tokenizer.model``), so the
rest of the project, conversion included, treats them like the real thing.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import load_records, record_texts, sample_data_path
from .tokenizer import SPECIAL_TOKENS, VOCAB_FILE

BUILD_MARKER = "glmlora_tiny.json"
BUILD_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """The size fields of a ChatGLM3 ``config.json``; everything else is the real model's."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    kv_channels: int
    multi_query_group_num: int
    ffn_hidden_size: int
    padded_vocab_size: int | None = None  # None: the tokenizer's size rounded up to a multiple of 64
    seq_length: int = 8192
    shards: int = 2


TINY = ModelSpec(hidden_size=128, num_layers=2, num_attention_heads=4, kv_channels=32,
                 multi_query_group_num=2, ffn_hidden_size=352, seq_length=2048, shards=2)
FULL_6B = ModelSpec(hidden_size=4096, num_layers=28, num_attention_heads=32, kv_channels=128,
                    multi_query_group_num=2, ffn_hidden_size=13696, padded_vocab_size=65024, shards=7)


def chatglm_config(spec: ModelSpec, vocab: int) -> dict:
    """A ChatGLM3 ``config.json`` with every flag of the real one and the sizes of ``spec``."""
    return {
        "_name_or_path": "glmlora-built", "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
        "ffn_hidden_size": spec.ffn_hidden_size, "fp32_residual_connection": False, "hidden_dropout": 0.0,
        "hidden_size": spec.hidden_size, "kv_channels": spec.kv_channels, "layernorm_epsilon": 1e-05,
        "multi_query_attention": True, "multi_query_group_num": spec.multi_query_group_num,
        "num_attention_heads": spec.num_attention_heads, "num_layers": spec.num_layers,
        "original_rope": True, "padded_vocab_size": vocab, "post_layer_norm": True, "rmsnorm": True,
        "seq_length": spec.seq_length, "use_cache": True, "torch_dtype": "float16",
        "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
    }


def original_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of an original ChatGLM3 checkpoint with its shape."""
    h, f, v = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    q = cfg["num_attention_heads"] * cfg["kv_channels"]
    qkv = q + 2 * cfg["multi_query_group_num"] * cfg["kv_channels"]
    shapes: dict[str, tuple[int, ...]] = {"transformer.embedding.word_embeddings.weight": (v, h),
                                          "transformer.rotary_pos_emb.inv_freq": (cfg["kv_channels"] // 4,)}
    for n in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attention.query_key_value.weight": (qkv, h),
            p + "self_attention.query_key_value.bias": (qkv,),
            p + "self_attention.dense.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.dense_h_to_4h.weight": (2 * f, h),
            p + "mlp.dense_4h_to_h.weight": (h, f),
        })
    shapes.update({"transformer.encoder.final_layernorm.weight": (h,), "transformer.output_layer.weight": (v, h)})
    return shapes


def init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    """Random weights of a plausible scale: norms near 1, matrices ~N(0, 0.02), a visible QKV bias.

    The output layer gets std 2/sqrt(hidden): with 0.02 a tiny model's logits could never exceed ~2.5,
    so even a perfectly tuned LoRA could not make one token likely and nothing would be memorised.
    """
    if name.endswith("inv_freq"):
        dim = shape[0] * 4
        return 1.0 / (10000 ** (torch.arange(0, dim // 2, 2, dtype=torch.float32) / (dim // 2)))
    if name.endswith("layernorm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=gen, device=device)
    std = 2 / math.sqrt(shape[1]) if name.endswith("output_layer.weight") else 0.02
    return std * torch.randn(shape, generator=gen, device=device)


def write_checkpoint(out: Path, cfg: dict, shards: int, seed: int, dtype: torch.dtype = torch.float16,
                     device: str = "cpu", progress: bool = False) -> None:
    """Random weights in the original key layout, split into ``shards`` safetensors files plus an index."""
    shapes = original_shapes(cfg)
    names = list(shapes)
    per = math.ceil(len(names) / shards)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for i in tqdm(range(shards), desc="writing random shards", disable=not progress):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {}
        for n in names[i * per:(i + 1) * per]:
            t = init_tensor(n, shapes[n], gen, device)
            part[n] = (t if n.endswith("inv_freq") else t.to(dtype)).cpu().contiguous()
            weight_map[n] = fname
            total += part[n].numel() * part[n].element_size()
        save_file(part, str(out / fname), metadata={"format": "pt"})
        del part
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """A small BPE sentencepiece model with byte fallback, deterministic for the same texts.

    A corpus too small for ``vocab_size`` gets the largest vocabulary it supports (sentencepiece says which).
    """
    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=0.9995, num_threads=1, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
            remove_extra_whitespaces=False, shuffle_input_sentence=False, minloglevel=2,
        )
    except RuntimeError as e:
        limit = re.search(r"value <= (\d+)", str(e))
        if not limit or int(limit.group(1)) >= vocab_size:
            raise
        return train_sentencepiece(lines, int(limit.group(1)))
    return buf.getvalue()


def _is_built(out: Path, stamp: dict) -> bool:
    marker = out / BUILD_MARKER
    return marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stamp


def build_chatglm3(out: str | Path, spec: ModelSpec = TINY, seed: int = 0, vocab_size: int = 2000,
                   texts: Iterable[str] | None = None, device: str = "cpu", progress: bool = False) -> Path:
    """Write a ChatGLM3 checkpoint in the original layout with random weights; idempotent.

    The tokenizer is trained on ``texts`` (default: the bundled sample data) with the ChatGLM3 special
    token layout following it.  A finished build is detected by its marker and reused.
    """
    out = Path(out)
    stamp = {"version": BUILD_VERSION, "spec": asdict(spec), "seed": seed, "vocab_size": vocab_size,
             "texts": "bundled" if texts is None else "custom"}
    if _is_built(out, stamp):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_MARKER).unlink(missing_ok=True)
    if texts is None:
        texts = [t for r in load_records(sample_data_path()) for t in record_texts(r)]
    sp_bytes = train_sentencepiece(texts, vocab_size)
    (out / VOCAB_FILE).write_bytes(sp_bytes)
    n = spm.SentencePieceProcessor(model_proto=sp_bytes).get_piece_size()
    vocab = spec.padded_vocab_size or 64 * math.ceil((n + len(SPECIAL_TOKENS)) / 64)
    cfg = chatglm_config(spec, vocab)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_checkpoint(out, cfg, spec.shards, seed, device=device, progress=progress)
    (out / BUILD_MARKER).write_text(json.dumps(stamp, indent=2))
    return out


def build_tiny(out: str | Path, seed: int = 0) -> Path:
    """The tiny default model (about 0.9 M parameters), built in a few seconds on CPU."""
    return build_chatglm3(out, TINY, seed=seed)


def build_full_random(out: str | Path, seed: int = 0, device: str = "cpu") -> Path:
    """A full-size ChatGLM3-6B (6.24 B parameters, 12.5 GB fp16) with random weights."""
    return build_chatglm3(out, FULL_6B, seed=seed, device=device, progress=True)

