"""Training speed on CUDA (lesson 05, GPU only): attention that fits the card, Liger's fused kernels, compiled layers.

ChatGLM3's vocabulary is 65,024 wide: the logits of a 4,096-token row take 1 GiB in fp32 before the loss
is even computed. Liger's fused linear + cross-entropy computes the loss chunk by chunk and never holds them;
its RMSNorm and SwiGLU kernels save a few more passes over memory. Liger ships these for GLM-4, whose
causal-LM head, norms and MLP have the same structure as ChatGLM3's, so they are bound to this model here.

Flex attention (packed rows: it skips the blocks between examples) is compiled by Triton for the card it runs
on, and a kernel's tiles must fit the card's shared memory per block: an A100 or H100 offers 163-227 KB, an RTX
3090 / 4090 / A10G only 99 KB (101,376 B). :func:`training_attention` picks kernel options per card, checks them
once with a small forward + backward pass, and falls back to SDPA with one printed line if anything fails.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import MethodType
from typing import Any

#: ``auto`` (default): choose per card. ``sdpa``, ``flex`` (torch's own kernel options) or ``flex-small-smem``
#: (:data:`SMALL_SMEM_OPTIONS` on any card) force a choice, for measurements and troubleshooting.
ATTENTION_ENV = "GLMLORA_ATTENTION"
ATTENTION_CHOICES = ("auto", "sdpa", "flex", "flex-small-smem")
#: The transformers attention implementation that is flex attention with :data:`SMALL_SMEM_OPTIONS`.
FLEX_SMALL_SMEM = "glmlora_flex_attention"
#: Per-block shared memory (opt-in) from which torch's own flex-attention kernels are used: an A100 offers
#: 166,912 B, an H100/H200 232,448 B; consumer Ampere/Ada/Blackwell (sm86, sm89, sm120) 101,376 B.
ROOMY_SHARED_MEMORY = 160 * 1024
#: Flex-attention kernel options for cards with 101,376 B per block, at ChatGLM3's head_dim 128: two pipeline
#: stages in the forward and the backward kernel. Compiled for sm86 / sm89 they need 66,048 B (forward) and
#: 68,608 B (backward), at 4.5x SDPA's speed on an H100; torch 2.11's own sm86 choice (three backward stages) needs
#: 86,016 B there, also within the limit, but leaves less margin (BENCHMARKS.md, "Training attention kernels per
#: card"; ``benchmarks/issue13.py flex`` compiles every candidate for sm86 / sm89 and times it).
SMALL_SMEM_OPTIONS: dict[str, int] = {
    "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 8,
    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
    "bwd_num_stages": 2, "bwd_num_warps": 4,
}
#: Set to 0 to leave the decoder layers uncompiled (Liger's loss head and the attention choice stay): compiling pays
#: for itself only over enough steps, which ``benchmarks/issue13.py`` measures (first-step time vs steady speed).
COMPILE_LAYERS_ENV = "GLMLORA_COMPILE_LAYERS"
#: ChatGLM3-6B's attention: 32 query heads sharing 2 key/value heads of 128 dimensions (the probe's shape).
PROBE_HEADS, PROBE_KV_HEADS, PROBE_HEAD_DIM = 32, 2, 128

_chosen: dict[tuple[Any, ...], str] = {}


# ---------------------------------------------------------------------------------------------- compile cache
def use_compile_cache(directory: str | Path | None = None) -> Path:
    """Keep torch.compile's on-disk caches (inductor's compiled graphs, Triton's kernels) under the work directory.

    By default they live in ``/tmp``, which a reboot empties (and some cloud machines wipe), so every new process
    on a fresh machine pays the whole compile again (the 6B decode step: 9-24 s on an H100, 3-9 s from the cache;
    the decoder layers for training: about 20 s, 3 s from the cache). Called before the first compile; a
    ``TORCHINDUCTOR_CACHE_DIR`` the user set stays as it is. Returns the cache directory.
    """
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if directory is None and current and current != _torch_default_cache_dir():
        return Path(current)
    if directory is None:
        from .profiles import workdir

        directory = workdir() / "compile-cache"
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    triton = os.environ.get("TRITON_CACHE_DIR")
    if triton is None or triton.startswith(_torch_default_cache_dir()):  # set by inductor itself, not the user
        os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    return path


def _torch_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # a torch without inductor's helper: its documented default
        import getpass
        import tempfile

        return os.path.join(tempfile.gettempdir(), "torchinductor_" + getpass.getuser())
    return default_cache_dir()


# ---------------------------------------------------------------------------------------------- attention
def flex_kernel_options(capability: tuple[int, int], shared_memory_per_block: int) -> dict[str, int] | None:
    """Flex-attention kernel options for a card: None = use SDPA, ``{}`` = torch's defaults, else options.

    * before Ampere (sm70 V100, sm75 T4 / 2080 Ti): SDPA — no bf16, 64-96 KB of shared memory, and flex attention
      was never measured there;
    * 160 KB or more per block (A100, H100, H200, B200): torch's defaults, measured 1.36x over SDPA (BENCHMARKS.md);
    * less (RTX 3090 / 4090, A10G, L4, RTX 5090): :data:`SMALL_SMEM_OPTIONS`.
    """
    if tuple(capability) < (8, 0):
        return None
    if shared_memory_per_block >= ROOMY_SHARED_MEMORY:
        return {}
    return dict(SMALL_SMEM_OPTIONS)


def register_flex(options: dict[str, int]) -> str:
    """Make :data:`FLEX_SMALL_SMEM` a transformers attention implementation: flex attention with ``options``.

    The model's attention layers look their function up by name at every call; the mask is flex attention's
    block mask. Kernel options a caller passes explicitly (``kernel_options=``) still win. Returns the name.
    """
    from transformers import AttentionInterface
    from transformers.integrations import flex_attention as hf_flex
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    chosen = dict(options)

    def flex_with_options(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
        if kwargs.get("kernel_options") is None:
            kwargs["kernel_options"] = chosen
        return hf_flex.flex_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(FLEX_SMALL_SMEM, flex_with_options)
    AttentionMaskInterface.register(FLEX_SMALL_SMEM, flex_attention_mask)
    return FLEX_SMALL_SMEM


def probe_flex(options: dict[str, int], dtype: Any, device: Any, tokens: int = 256) -> None:
    """A small flex-attention forward + backward with ``options`` at ChatGLM3's head layout, two packed examples.

    Compiles the same kernel shapes that training uses (the tiles and stages set by ``options``), so a kernel that
    does not fit the card fails here, in a second, instead of in the middle of the first training step. Raises on
    any failure, also on results that differ from SDPA's.
    """
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    gen = torch.Generator(device=device).manual_seed(0)
    shape = lambda heads: (1, heads, tokens, PROBE_HEAD_DIM)  # noqa: E731
    q, k, v = (torch.randn(shape(h), generator=gen, device=device, dtype=dtype).requires_grad_()
               for h in (PROBE_HEADS, PROBE_KV_HEADS, PROBE_KV_HEADS))
    doc = torch.arange(tokens, device=device) // (tokens // 2)

    def document_causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

    mask = create_block_mask(document_causal, None, None, tokens, tokens, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    out = compiled(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=dict(options) or None)
    out.float().square().mean().backward()
    dense = (doc[:, None] == doc[None, :]) & torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    with torch.no_grad():
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
    if not (error < 2e-2 and all(bool(t.grad.isfinite().all()) for t in (q, k, v))):
        raise RuntimeError(f"flex attention's result differs from SDPA's (relative error {error:.2g}) or its "
                           f"gradients are not finite")


def _failure_reason(error: BaseException) -> str:
    """The innermost cause's first line (inductor wraps Triton's error in several layers), kept short."""
    chain, seen = [error], set()
    while chain[-1] is not None and id(chain[-1]) not in seen:
        seen.add(id(chain[-1]))
        last = chain[-1]
        chain.append(getattr(last, "inner_exception", None) or last.__cause__ or last.__context__)
    causes = [e for e in chain if e is not None]
    for e in causes:  # the line a learner can act on, wherever it sits in the chain
        for line in str(e).splitlines():
            if "out of resource" in line.lower():
                return f"{type(e).__name__}: {line.strip()}"[:200]
    root = causes[-1]
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0] if lines else 'no message'}"[:200]


class _quiet_compiler:
    """Silence inductor's and dynamo's own error logging while probing: the fallback line says what happened."""

    names = ("torch._inductor", "torch._dynamo", "torch._functorch")

    def __enter__(self) -> None:
        import logging

        self.levels = {n: logging.getLogger(n).level for n in self.names}
        for n in self.names:
            logging.getLogger(n).setLevel(logging.CRITICAL)

    def __exit__(self, *exc: Any) -> None:
        import logging

        for n, level in self.levels.items():
            logging.getLogger(n).setLevel(level)


def training_attention(dtype: Any = None) -> str:
    """The ``attn_implementation`` for training on packed rows on this machine, checked once per process.

    * CPU: ``"sdpa"`` (flex attention has no CPU backward);
    * CUDA: flex attention with kernel options that fit the card (:func:`flex_kernel_options`) — it skips the
      masked blocks between packed examples, measured 1.36x over SDPA's dense masked kernel on an H200 — after a
      small forward + backward with those options passed (:func:`probe_flex`); ``"flex_attention"`` for torch's
      defaults, :data:`FLEX_SMALL_SMEM` for the small-shared-memory options; ``"sdpa"`` on older cards, and
      ``"sdpa"`` with ONE printed line saying why if the check fails.

    ``dtype``: the dtype training computes in (default: bf16 where supported, else fp16). ``GLMLORA_ATTENTION``
    overrides the choice (:data:`ATTENTION_CHOICES`).
    """
    import torch

    forced = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if forced not in ATTENTION_CHOICES:
        raise ValueError(f"{ATTENTION_ENV}={forced!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if forced == "sdpa" or not torch.cuda.is_available():
        return "sdpa"
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    if dtype is None:
        from .environment import bf16_supported

        dtype = torch.bfloat16 if bf16_supported() else torch.float16
    key = (device.index, props.name, dtype, forced)
    if key not in _chosen:
        if forced == "flex":
            options: dict[str, int] | None = {}
        elif forced == "flex-small-smem":
            options = dict(SMALL_SMEM_OPTIONS)
        else:
            options = flex_kernel_options((props.major, props.minor), _shared_memory_per_block(props))
        _chosen[key] = _checked_flex(options, dtype, device, props.name)
    return _chosen[key]


def _shared_memory_per_block(props: Any) -> int:
    """The opt-in per-block limit (what Triton checks its kernels against); the plain limit on old torch builds."""
    return int(getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 0))


def _checked_flex(options: dict[str, int] | None, dtype: Any, device: Any, card: str) -> str:
    """Probe ``options`` (None: SDPA outright); the attention name to use, or ``"sdpa"`` after one printed line."""
    if options is None:
        return "sdpa"
    use_compile_cache()
    try:
        with _quiet_compiler():
            probe_flex(options, dtype, device)
    except Exception as error:  # a Triton resource error, a compiler bug, wrong results: all mean "not here"
        print(f"flex attention failed its first-use check on {card} ({_failure_reason(error)}); "
              f"training uses SDPA attention instead: same results, slower on packed rows", flush=True)
        return "sdpa"
    return register_flex(options) if options else "flex_attention"


# ---------------------------------------------------------------------------------------------- Liger, compile
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

    causal_lm = _causal_lm(model)

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


def _causal_lm(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_quantized(model: Any) -> bool:
    """Whether ``model`` (or the model inside a PEFT wrapper) was loaded in 4 or 8 bits by bitsandbytes."""
    base = _causal_lm(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def compile_layers(model: Any) -> int:
    """``torch.compile`` every decoder layer in place (regional compilation); returns how many.

    One compiled graph per layer call replaces dozens of small Python-side module calls and fuses the
    element-wise work, which matters when the CPU, not the GPU, sets the pace of a step. The compiled code is
    cached under the work directory (:func:`use_compile_cache`), so a later run loads it instead of compiling.
    """
    use_compile_cache()
    causal_lm = _causal_lm(model)
    for layer in causal_lm.model.layers:
        layer.compile()
    return len(causal_lm.model.layers)


def announce_first_step(model: Any, message: str) -> None:
    """Print ``message`` once, when the model's first forward pass starts (the first training step), on rank 0."""
    if os.environ.get("RANK", "0") != "0":
        return
    decoder = _causal_lm(model).model
    handle = None

    def say(module: Any, args: Any) -> None:
        print(message, flush=True)
        handle.remove()

    handle = decoder.register_forward_pre_hook(say)


def speed_up(model: Any) -> list[str]:
    """glmlora's measured training configuration on CUDA: Liger's fused loss head + compiled decoder layers.

    Returns what was applied (nothing on CPU). A 4-bit (QLoRA) base gets the fused loss head only: compiling
    bitsandbytes' layers was not measured; so does ``GLMLORA_COMPILE_LAYERS=0``. The first training step prints that
    it is compiling; the compiled code is kept under the work directory for later runs. BENCHMARKS.md has the
    measurements behind each choice.
    """
    import torch

    if not torch.cuda.is_available():
        return []
    applied = ["liger fused linear cross-entropy"] if apply_liger(model, layers=False) else []
    if is_quantized(model) or os.environ.get(COMPILE_LAYERS_ENV, "1").strip() == "0":
        return applied
    n = compile_layers(model)
    announce_first_step(model, f"compiling the {n} decoder layers for this GPU: the first training step takes "
                               f"longer (about 20 s at 6B size on an H100; cached in {use_compile_cache()}, so later runs "
                               f"take a few seconds)")
    return applied + ["torch.compile per decoder layer"]
