"""Fused Triton kernels from Liger for training on CUDA (lesson 05, GPU only).

ChatGLM3's vocabulary is 65,024 wide: the logits of a 4,096-token row take 1 GiB in fp32 before the loss
is even computed. Liger's fused linear + cross-entropy computes the loss chunk by chunk and never holds them;
its RMSNorm and SwiGLU kernels save a few more passes over memory. Liger ships these for GLM-4, whose
causal-LM head, norms and MLP have the same structure as ChatGLM3's, so they are bound to this model here.
"""

from __future__ import annotations

import functools
from types import MethodType
from typing import Any


def liger_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def apply_liger(model: Any, layers: bool = True) -> bool:
    """Patch ``model`` (a ``GlmForCausalLM``, possibly inside a PEFT wrapper) in place; False if not possible.

    ``layers=False`` keeps only the fused loss head (for decoder layers that torch.compile fuses itself).
    """
    if not liger_available():
        return False
    from liger_kernel.transformers.model.glm4 import lce_forward
    from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module, _patch_swiglu_module
    from liger_kernel.transformers.swiglu import LigerPhi3SwiGLUMLP

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model

    @functools.wraps(lce_forward)  # keeps the signature: Trainer keeps only the columns forward() names
    def forward(self: Any, *args: Any, labels: Any = None, skip_logits: Any = None, **kwargs: Any) -> Any:
        # With labels, only the loss is needed (training and evaluation alike): never build the logits.
        skip = skip_logits if skip_logits is not None else labels is not None
        return lce_forward(self, *args, labels=labels, skip_logits=skip, **kwargs)

    causal_lm.forward = MethodType(forward, causal_lm)
    if not layers:
        return True
    decoder = causal_lm.model
    _patch_rms_norm_module(decoder.norm, in_place=False)
    for layer in decoder.layers:
        _patch_rms_norm_module(layer.input_layernorm, in_place=False)
        _patch_rms_norm_module(layer.post_attention_layernorm, in_place=False)
        _patch_swiglu_module(layer.mlp, LigerPhi3SwiGLUMLP)
    return True


def compile_layers(model: Any) -> int:
    """``torch.compile`` every decoder layer in place (regional compilation); returns how many.

    One compiled graph per layer call replaces dozens of small Python-side module calls and fuses the
    element-wise work, which matters when the CPU, not the GPU, sets the pace of a step.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in causal_lm.model.layers:
        layer.compile()
    return len(causal_lm.model.layers)


def training_attention() -> str:
    """Attention for training on packed rows: flex attention on Ampere-or-newer GPUs (RTX 3090, A100, H100)
    skips the masked blocks between examples (measured 1.36x over SDPA's dense masked kernel); SDPA
    elsewhere (flex attention has no CPU backward, and older GPUs are not what it was measured on)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        return "flex_attention"
    return "sdpa"


def speed_up(model: Any) -> list[str]:
    """glmlora's measured training configuration on CUDA: Liger's fused loss head + compiled decoder layers.

    Returns what was applied (nothing on CPU). BENCHMARKS.md has the measurements behind each choice.
    """
    import torch

    if not torch.cuda.is_available():
        return []
    applied = ["liger fused linear cross-entropy"] if apply_liger(model, layers=False) else []
    compile_layers(model)
    return applied + ["torch.compile per decoder layer"]
