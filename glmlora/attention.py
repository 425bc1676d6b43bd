"""Two decode-time changes to ChatGLM3's attention, each measured on an H200 (lesson 06, BENCHMARKS.md).

1. One-token attention without copying the grouped k/v heads (:func:`grouped_one_token`).
2. q, k and v computed as one matrix product again, as in the original checkpoint (:func:`fuse_qkv`).

ChatGLM3 has 32 query heads but only 2 key/value heads. When a mask is passed (a static cache always needs
one: its unfilled slots must be hidden), transformers' SDPA path first copies the 2 cached k/v heads out to
32 over the *whole* cache in every layer (``repeat_kv``) - on the 6B model at a 4,096-token cache that is
about 3.8 GB of memory traffic per token, a third of the weights themselves. For a single query token the
attention is two small matrix products per k/v head: the 16 query heads of a group look at that group's
cached keys directly. :mod:`glmlora.decode_step` uses it in every decoder layer; the prefill (many tokens)
stays with transformers' SDPA.
"""

from __future__ import annotations

from typing import Any

import torch


def grouped_one_token(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """Attention of one new token: ``query (b, heads, 1, d)`` against the cache ``key/value (b, kv_heads, L, d)``
    where ``allowed (b, L)`` is True; returns ``(b, 1, heads * d)``, the input of ``o_proj``. Scores and softmax
    in fp32, as transformers' SDPA path computes them."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # query head h belongs to k/v head h // group (the order repeat_kv produces)
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (b, kv_heads, group, d)
    return out.reshape(batch, 1, heads * dim)


# --------------------------------------------------------------------------------- one q/k/v matrix product
class _Projections:
    """One attention block's q, k and v weights side by side in one matrix (a copy: the three ``nn.Linear``
    weights stay what is saved, merged into and trained). Re-copied whenever one of them has changed."""

    def __init__(self, parts: tuple[torch.nn.Linear, ...]) -> None:
        self.parts = parts
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.stamp: tuple | None = None
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def _now(self) -> tuple:
        tensors = [t for p in self.parts for t in (p.weight, p.bias) if t is not None]
        return tuple((t.device, t.dtype, t.data_ptr(), t._version) for t in tensors)

    def refresh(self) -> None:
        """Copy the three weights in again if any changed (a merge, ``.to()``, loading); in place when the shapes,
        device and dtype allow, so that a captured CUDA graph keeps reading the right memory."""
        stamp = self._now()
        if stamp == self.stamp:
            return
        with torch.no_grad(), torch.inference_mode(False):
            for name in ("weight", "bias"):
                tensors = [getattr(p, name) for p in self.parts]
                if tensors[0] is None:
                    continue
                fresh, old = torch.cat([t.detach() for t in tensors]), getattr(self, name)
                if old is not None and (old.shape, old.device, old.dtype) == (fresh.shape, fresh.device, fresh.dtype):
                    old.copy_(fresh)
                else:
                    setattr(self, name, fresh)
        self.stamp = stamp  # copying out of the weights leaves their stamps as they were


class _FusedLinear(torch.nn.Linear):
    """``q_proj``/``k_proj``/``v_proj`` of a fused block: q computes all three in one product, k and v take their
    slices of it. Any other call order (or input) falls back to the layer's own weight."""

    _glmlora_fused: _Projections
    _glmlora_slot: int
    _glmlora_span: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._glmlora_fused
        if self._glmlora_slot == 0:
            if not torch.compiler.is_compiling():  # compiled callers refresh before the call (decode_steps)
                fused.refresh()
            fused.input, fused.output = x, torch.nn.functional.linear(x, fused.weight, fused.bias)
        elif fused.input is not x or fused.output is None:
            return super().forward(x)
        start, stop = self._glmlora_span
        out = fused.output[..., start:stop]
        if self._glmlora_slot == 2:
            fused.input = fused.output = None
        return out


def _qkv(module: torch.nn.Module) -> tuple[torch.nn.Linear, ...] | None:
    parts = tuple(getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj"))
    if not all(type(p) in (torch.nn.Linear, _FusedLinear) for p in parts):
        return None  # absent, or wrapped (LoRA): left alone
    if len({p.in_features for p in parts}) != 1 or len({p.bias is None for p in parts}) != 1:
        return None
    return parts


def fuse_qkv(model: Any) -> int:
    """Compute each attention block's q, k and v projections as one matrix product (the original ChatGLM3's
    ``query_key_value``): at batch 1 the 2.1 MB k and v products are too small to reach the memory bandwidth and
    each costs a kernel launch and a reduction (BENCHMARKS.md). Parameters, ``state_dict`` and saving are
    unchanged; the fused copy costs 38 MB per ChatGLM3-6B layer. Blocks whose projections carry LoRA layers are
    left alone. Idempotent; returns how many blocks are fused."""
    count = 0
    for module in model.modules():
        parts = _qkv(module)
        if parts is None:
            continue
        fused = parts[0]._glmlora_fused if type(parts[0]) is _FusedLinear else _Projections(parts)
        fused.refresh()
        start = 0
        for slot, part in enumerate(parts):
            part.__class__ = _FusedLinear
            part._glmlora_fused, part._glmlora_slot = fused, slot
            part._glmlora_span = (start, start + part.out_features)
            start += part.out_features
        count += 1
    return count


def refresh_fused(model: Any) -> None:
    """Bring every fused q/k/v copy up to date with its weights (before a compiled call, which cannot check)."""
    seen = set()
    for module in model.modules():
        if type(module) is _FusedLinear and id(module._glmlora_fused) not in seen:
            seen.add(id(module._glmlora_fused))
            module._glmlora_fused.refresh()
