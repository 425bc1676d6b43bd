"""An independent plain-torch ChatGLM3 forward pass, written from docs/design.md §2.3 (no transformers).

It reads the ORIGINAL key names and config.json, so the tests compare the converted native model
against the architecture as described, not against the conversion's own assumptions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotary(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate interleaved pairs (0&1, 2&3, ...) of the FIRST HALF of each head; x: (b, heads, L, d)."""
    d = x.shape[-1]
    rot = d // 2
    inv = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)          # theta_i, i < rot/2
    ang = pos.to(torch.float64)[:, None, :, None] * inv                          # (b, 1, L, rot/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., 0:rot:2], x[..., 1:rot:2]
    turned = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([turned, x[..., rot:]], dim=-1)


def forward(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor, mask: torch.Tensor | None = None,
            lora: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits (b, L, vocab); ``mask`` marks real tokens (left padding); positions restart at each sample's start.

    ``lora`` maps an original weight name to a delta added to it (a fused LoRA's ``scale * B @ A``).
    """
    W = {k: v.double() + (lora[k].double() if lora and k in lora else 0) for k, v in sd.items()}
    b, L = ids.shape
    mask = torch.ones_like(ids) if mask is None else mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    heads, d, groups = cfg["num_attention_heads"], cfg["kv_channels"], cfg["multi_query_group_num"]
    eps = cfg["layernorm_epsilon"]
    x = W["transformer.embedding.word_embeddings.weight"][ids]
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    for n in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{n}."
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        qkv = h @ W[p + "self_attention.query_key_value.weight"].T + W[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * d, groups * d, groups * d], dim=-1)
        q = q.view(b, L, heads, d).transpose(1, 2)
        k = k.view(b, L, groups, d).transpose(1, 2)
        v = v.view(b, L, groups, d).transpose(1, 2)
        q, k = rotary(q, pos), rotary(k, pos)
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~allowed, float("-inf"))
        att = torch.nan_to_num(scores.softmax(-1)) @ v
        att = att.transpose(1, 2).reshape(b, L, heads * d)
        x = x + att @ W[p + "self_attention.dense.weight"].T
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        gate, up = (h @ W[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ W[p + "mlp.dense_4h_to_h.weight"].T
    x = rms_norm(x, W["transformer.encoder.final_layernorm.weight"], eps)
    return x @ W["transformer.output_layer.weight"].T


def greedy(sd: dict[str, torch.Tensor], cfg: dict, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no cache at all)."""
    seq = list(ids)
    for _ in range(steps):
        logits = forward(sd, cfg, torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]
