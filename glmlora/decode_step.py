"""The fast decode step (lesson 06): one compiled decoder layer serves all 28, and the whole step is one CUDA graph.

Compiling ``model(...)`` as a whole traces and generates code for 28 copies of the same layer: on an H100 the first
reply of a fresh process waited 64 s for it, and still 15 s with inductor's on-disk cache, because dynamo traces
all 28 layers again in every new process (BENCHMARKS.md; this way: 24 s and 9 s on the same machine). Here :func:`layer_step` runs *one* decoder layer with
that layer's cache tensors passed in. Parameters, LoRA weights and cache are inputs of the compiled code, not
constants, so torch.compile traces and compiles it once and every layer reuses it; the embedding
(:func:`prologue`) and the norm, head and sampling (:func:`epilogue`) are two more small graphs. Calling 30
compiled functions per token from Python would cost more host time than the GPU needs for the token, so
:class:`DecodeStep` captures the whole step once in a ``torch.cuda.CUDAGraph`` and replays it. A graph reads
every tensor at the address it had when it was captured, so it is captured again whenever a parameter's storage,
an adapter's state or a module's train/eval mode has changed (:func:`model_stamp`): a merge, the adapter switched
off, another adapter loaded.

The functions call the model's own modules (norms, projections with any LoRA layers, the MLP); only the cache
write and the attention are written here. On a CPU the same step runs uncompiled, which is how the tests check it
against ``generate``.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Callable

import torch
from torch.nn import functional as F
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

from .attention import _FusedLinear, grouped_one_token

#: A compiled step runs this many real steps (on a side stream) before its graph is captured: the first call
#: compiles, and nothing may compile or run for the first time while a graph is being captured.
WARMUP_CALLS = 2
Parts = tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]


# ---------------------------------------------------------------------------------------------- sampling
def filtered_logits(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                    top_k: int) -> torch.Tensor:
    """Transformers' sampling filters in their order: temperature, top-k, top-p (keeping at least one token);
    filtered-out tokens get ``-inf``. Written with fixed-shape tensor ops so that it fits in a CUDA graph."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    ordered, order = logits.sort(dim=-1)  # ascending, as transformers' top-p
    drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def sample_next(logits: torch.Tensor, noise: torch.Tensor | None, temperature: torch.Tensor,
                top_p: torch.Tensor, top_k: int) -> torch.Tensor:
    """Next ids from last-position logits ``(batch, vocab)``: greedy when ``noise`` is None, else a draw from
    the filtered distribution by the exponential race ``argmax(p / E)`` with ``E ~ Exp(1)`` in ``noise`` —
    exact, and unlike ``multinomial`` free of host synchronisation."""
    if noise is None:
        return logits.float().argmax(-1)
    return (filtered_logits(logits, temperature, top_p, top_k).softmax(-1) / noise).argmax(-1)


# ---------------------------------------------------------------------------------------------- the step's parts
def prologue(core: Any, tokens: torch.Tensor, positions: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Embeddings of the new tokens ``(b, 1)``, their rotary cos/sin, and the cache mask as booleans.

    ``forward`` skips the embedding's hooks: the one that gradient checkpointing leaves there after training
    (``enable_input_require_grads``) would make the embeddings require grad on one call and not the next, and
    each flip compiles every part again."""
    hidden = core.embed_tokens.forward(tokens)
    cos, sin = core.rotary_emb(hidden, positions)
    return hidden, cos, sin, mask.bool()


def _qkv(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v: one matrix product where :func:`glmlora.attention.fuse_qkv` fused them, else the modules
    themselves (with their LoRA layers, if any)."""
    if type(attn.q_proj) is _FusedLinear:
        fused = attn.q_proj._glmlora_fused
        sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        return F.linear(x, fused.weight, fused.bias).split(sizes, dim=-1)
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


def layer_step(layer: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, slot: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """One ``GlmDecoderLayer`` for one new token per row: its key and value go into the cache at ``slot``, and it
    attends to the ``allowed`` slots. The layer's own forward on a ``StaticCache`` computes the same, but finds
    its cache by ``self.layer_idx`` — a constant that differs per layer, so a compiled layer could not be reused."""
    attn = layer.self_attn
    batch = hidden.shape[0]
    x = layer.input_layernorm(hidden)
    q, k, v = (t.view(batch, 1, -1, attn.head_dim).transpose(1, 2) for t in _qkv(attn, x))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys.index_copy_(2, slot, k)
    values.index_copy_(2, slot, v)
    hidden = hidden + attn.o_proj(grouped_one_token(q, keys, values, allowed, attn.scaling))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def epilogue(norm: Any, lm_head: Any, hidden: torch.Tensor, noise: torch.Tensor | None, temperature: torch.Tensor,
             top_p: torch.Tensor, top_k: int) -> torch.Tensor:
    """The final norm, the logits and the next ids (:func:`sample_next`)."""
    return sample_next(lm_head(norm(hidden))[:, -1], noise, temperature, top_p, top_k)


_COMPILED: dict[str, Parts] = {}


def compile_options(how: bool | str | dict) -> dict:
    """Inductor options for ``compile``: True = inductor's defaults, a mode name or an options dict (benchmarks try
    autotuning). Inductor's own CUDA graphs are always off: :class:`DecodeStep` captures one graph of its own."""
    if how is True:
        return {}
    options = dict(torch._inductor.list_mode_options(how) if isinstance(how, str) else how)
    options.pop("triton.cudagraphs", None)
    return options


def compiled_parts(options: dict) -> Parts:
    """The three parts, each compiled with ``options`` — once per process: the compiled code is shared by all
    models, and guards on shapes, dtypes and module state decide when a variant has to be compiled."""
    key = repr(sorted(options.items()))
    if key not in _COMPILED:
        from .fast import use_compile_cache

        use_compile_cache()  # under the work directory: a new process loads what an earlier one compiled

        def build(fn: Callable[..., Any]) -> Callable[..., Any]:
            return torch.compile(fn, dynamic=False, options=dict(options) or None)

        _COMPILED[key] = (build(prologue), build(layer_step), build(epilogue))
    return _COMPILED[key]


# ---------------------------------------------------------------------------------------------- state a graph reads
def model_stamp(model: Any) -> tuple:
    """What a captured graph silently depends on: every parameter's and buffer's storage, dtype and shape, every
    module's train/eval mode, each fused q/k/v copy's storage and each LoRA layer's state (merged, switched off,
    active adapters, scaling). Equal stamps: the graph still computes what the model would."""
    peft_layers = sys.modules.get("peft.tuners.tuners_utils")  # not imported: no LoRA layers (and no import cost)
    tuner = peft_layers.BaseTunerLayer if peft_layers is not None else ()
    tensors = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in itertools.chain(model.parameters(),
                                                                                    model.buffers()))
    modules = []
    for m in model.modules():
        state: tuple = (m.training,)
        if type(m) is _FusedLinear and m._glmlora_fused.weight is not None:
            state += (m._glmlora_fused.weight.data_ptr(), m._glmlora_fused.weight.dtype)
        if isinstance(m, tuner):
            state += (m.merged, m.disable_adapters, tuple(m.active_adapters), repr(getattr(m, "scaling", None)))
        modules.append(state)
    return tensors, tuple(modules)


def on_one_device(model: Any, device: torch.device) -> bool:
    """Whether every parameter sits on ``device``: a CUDA graph records one device's work, so a model spread over
    several GPUs (``device_map="auto"`` on small cards) runs the compiled parts without a graph."""
    return all(p.device == device for p in model.parameters())


# ---------------------------------------------------------------------------------------------- the step
class DecodeStep:
    """One decode step on one static cache, called once per token: fixed input buffers, one CUDA graph.

    Buffers the caller fills: ``tokens`` (b, 1) ids to feed, ``positions`` (b, 1) their rotary positions, ``mask``
    (b, context) 1 where the cache may be attended, ``noise`` (b, vocab) Exp(1) draws (None: greedy),
    ``temperature`` and ``top_p``. A call writes the tokens' keys and values at the cache's current length, advances
    that length by one and returns the next ids (b,). ``options`` None: plain PyTorch; else the parts are compiled
    with these inductor options, and on CUDA the call becomes one CUDA graph after :data:`WARMUP_CALLS` calls —
    its result is then overwritten by the next call. :meth:`prepare` before each reply checks the stamp.
    """

    def __init__(self, model: Any, cache: Any, sampling: bool, top_k: int, options: dict | None) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model, self.core, self.lm_head = model, base.model, base.lm_head
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.lengths = [layer.cumulative_length for layer in cache.layers]
        keys = self.kv[0][0]
        batch, context, device = keys.shape[0], keys.shape[2], keys.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, context, dtype=torch.long, device=device)
        self.noise = torch.empty(batch, model.config.vocab_size, device=device) if sampling else None
        self.temperature = torch.ones((), device=device)
        self.top_p = torch.ones((), device=device)
        self.top_k = top_k
        self.parts: Parts = compiled_parts(options) if options is not None else (prologue, layer_step, epilogue)
        self.graphed = options is not None and device.type == "cuda" and on_one_device(model, device)
        self.graph: Any = None
        self.stamp: tuple | None = None
        self.out: torch.Tensor | None = None
        self.warm, self.captures, self.use_graph = 0, 0, self.graphed

    def serves(self, cache: Any) -> bool:
        """Whether this step still works on ``cache``'s tensors (a re-initialised cache has new ones)."""
        return len(cache.layers) == len(self.kv) and all(
            layer.keys is k and layer.values is v for layer, (k, v) in zip(cache.layers, self.kv))

    def prepare(self) -> None:
        """Before a reply: drop the graph if the model changed since it was captured (:func:`model_stamp`); no graph
        while any module is in training mode (dropout)."""
        if not self.graphed:
            return
        stamp = model_stamp(self.model)
        if stamp != self.stamp:
            self.graph, self.out, self.stamp, self.warm = None, None, stamp, 0
        self.use_graph = not any(state[0] for state in stamp[1])

    def forward(self) -> torch.Tensor:
        """The step itself, as Python calls of the three parts (what the graph records)."""
        embed, layer_fn, head = self.parts
        hidden, cos, sin, allowed = embed(self.core, self.tokens, self.positions, self.mask)
        slot = self.lengths[0].view(1)
        for layer, (keys, values) in zip(self.core.layers, self.kv):
            hidden = layer_fn(layer, hidden, cos, sin, keys, values, slot, allowed)
        torch._foreach_add_(self.lengths, 1)
        return head(self.core.norm, self.lm_head, hidden, self.noise, self.temperature, self.top_p, self.top_k)

    def __call__(self) -> torch.Tensor:
        if not self.use_graph:
            return self.forward()
        if self.graph is None:
            if self.warm < WARMUP_CALLS:
                self.warm += 1
                return self._warm_up()
            self.graph = self._capture()
        self.graph.replay()
        return self.out

    def _warm_up(self) -> torch.Tensor:
        """A real step on a side stream, as CUDA-graph capture wants (lazy per-stream set-up happens here)."""
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = self.forward()
        current.wait_stream(side)
        out.record_stream(current)
        return out

    def _capture(self) -> Any:
        """Record the step (nothing runs while recording; the replay that follows does the work)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.out = self.forward()
        self.captures += 1
        return graph
