"""Attention for one-token decoding without copying the grouped k/v heads (lesson 06).

ChatGLM3 has 32 query heads but only 2 key/value heads. When a mask is passed (a static cache always needs
one: its unfilled slots must be hidden), transformers' SDPA path first copies the 2 cached k/v heads out to
32 over the *whole* cache in every layer (``repeat_kv``) - on the 6B model at a 4,096-token cache that is
about 3.8 GB of memory traffic per token, a third of the weights themselves. For a single query token the
attention is two small matrix products per k/v head: the 16 query heads of a group look at that group's
cached keys directly. This module registers that computation with transformers under the name
``"glmlora_decode"``; any other shape (prefill, training) goes to transformers' SDPA function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "glmlora_decode"


def grouped_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query (b, heads, q, d)``, ``key/value (b, kv_heads, L, d)``,
    returns ``(b, q, heads, d)``. One query token with grouped heads: grouped products, no copies."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length != 1 or kv_heads == heads or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # query head h belongs to k/v head h // group (the order repeat_kv produces)
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * (dim ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:  # (b, 1, 1, L): bool "may attend", or an additive float mask
        mask = attention_mask[:, :, -1:, :]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (b, kv_heads, group, d)
    return out.reshape(batch, 1, heads, dim), None


def register() -> str:
    """Make ``"glmlora_decode"`` a transformers attention implementation (with SDPA's mask format); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, grouped_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def use_grouped_decode(model: Any) -> bool:
    """Switch a model that runs SDPA to the grouped decode attention (same results; prefill and training
    shapes still run SDPA). Returns whether the model uses it now; models on other attention are left alone."""
    current = model.config._attn_implementation
    if current == NAME:
        return True
    if current != "sdpa":
        return False
    model.set_attn_implementation(register())
    return True
