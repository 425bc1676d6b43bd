"""A decode loop that keeps the GPU busy (lesson 06): one CUDA graph for model *and* sampling, few syncs.

transformers' ``generate`` with a static cache replays a CUDA graph for the model, but around it every token
pays host work that waits for the GPU: the stopping check reads a GPU value, the logits processors and the
sampler are separate launches, the streamer copies each token to the host. On the 6B model that made a token
cost 6.8 ms for 2.9 ms of weight reading (BENCHMARKS.md). This loop keeps transformers' model, its prefill and
``StaticCache``; each new token is one :class:`glmlora.decode_step.DecodeStep` (model step and sampling, on CUDA
one CUDA graph of per-layer compiled code), tokens stay on the GPU, and the host looks at them every
``check_every`` tokens to stop and to stream. The same loop runs uncompiled on a CPU, which is how the tests
check it against ``generate``.
"""

from __future__ import annotations

import weakref
from typing import Any, Generator

import torch

from glmlora.attention import fuse_qkv, refresh_fused
from glmlora.decode_step import DecodeStep, compile_options, filtered_logits, sample_next

__all__ = ["decode", "decode_steps", "filtered_logits", "sample_next", "step_for", "will_compile"]
#: Printed before the first compiled reply of a model.
COMPILE_MESSAGE = ("compiling the decode step for this GPU: this first reply takes longer (10-25 s at 6B size on an "
                   "H100, more with a slower CPU; a later process loads what is cached in {cache}: 3-9 s)")


def step_for(model: Any, cache: Any, sampling: bool, top_k: int, compile: bool | str | dict) -> DecodeStep:
    """The model's decode step on ``cache`` for these sampling settings, kept with the model while the cache lives
    (its CUDA graph is captured once); ``compile`` False: plain PyTorch. Says once per model that it compiles."""
    steps = model.__dict__.setdefault("_glmlora_decode_steps", weakref.WeakKeyDictionary())
    options = compile_options(compile) if compile else None
    key = (sampling, top_k, repr(sorted(options.items())) if options is not None else None)
    per_cache = steps.setdefault(cache, {})
    step = per_cache.get(key)
    if step is None or not step.serves(cache):
        if options is not None and not any(k[2] is not None for c in steps.values() for k in c):
            from glmlora.fast import use_compile_cache

            print(COMPILE_MESSAGE.format(cache=use_compile_cache()), flush=True)
        step = per_cache[key] = DecodeStep(model, cache, sampling, top_k, options)
    return step


def will_compile(model: Any) -> bool:
    """Whether the next fast-path reply compiles the decode step first (on CUDA, once per model): a chat UI
    says so, because at 6B size it takes 10-25 s on an H100 (3-9 s from the cache of an earlier process)."""
    return model.device.type == "cuda" and not model.__dict__.get("_glmlora_decode_steps")


@torch.inference_mode()
def decode_steps(model: Any, cache: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 max_new_tokens: int, stop_ids: list[int], pad_id: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, check_every: int = 32,
                 compile: bool | str | dict | None = None,
                 fused_qkv: bool = True) -> Generator[list[int], None, torch.Tensor]:
    """The decode loop as a generator: every ``check_every`` tokens it yields row 0's newest ids (up to and
    including its stop id, then nothing more), and it returns all new ids ``(batch, n)``.

    Rows stop at their first stop id (later places hold ``pad_id``); the loop ends when all rows have stopped,
    noticed at most ``check_every`` tokens late; each look waits for the GPU (5 % of the speed at 8 rather than 32
    on an H200, BENCHMARKS.md), so streaming looks every 8 and everything else every 32. A generator rather than a
    background thread: streaming happens in the caller's thread, which also suits torch.compile's own CUDA graphs
    (they fail when replayed from another thread, pytorch#123177). ``compile`` defaults to "on CUDA"; a string or
    dict picks another inductor mode or options (benchmarks try autotuning). ``fused_qkv`` computes q, k and v in
    one matrix product (:func:`glmlora.attention.fuse_qkv`); False only for benchmarks that measure the difference.
    """
    batch, length = input_ids.shape
    context = cache.get_max_length()
    if length + max_new_tokens > context:
        raise ValueError(f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceed the static cache "
                         f"of {context} tokens")
    device = input_ids.device
    # fusing refreshes too: copies of changed weights (a merge since the last reply) are brought up to date in place
    if fused_qkv:
        fuse_qkv(model)
    else:
        refresh_fused(model)
    compile = device.type == "cuda" if compile is None else compile
    mask = torch.zeros(batch, context, dtype=torch.long, device=device)
    mask[:, :length] = attention_mask
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, position_ids=positions, attention_mask=mask, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    step = step_for(model, cache, do_sample, top_k, compile)  # after the prefill: it made the cache's tensors
    step.prepare()
    step.mask.copy_(mask)
    step.positions.copy_(positions[:, -1:])
    step.temperature.fill_(float(temperature))
    step.top_p.fill_(float(top_p))
    draw = lambda: step.noise.exponential_() if step.noise is not None else None  # noqa: E731
    nxt = sample_next(logits, draw(), step.temperature, step.top_p, top_k)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    shown, n = 0, 0
    for i in range(max_new_tokens):
        nxt = torch.where(finished, pad_id, nxt)
        out[:, i] = nxt
        finished |= torch.isin(nxt, stops)
        n = i + 1
        if n % check_every == 0 or n == max_new_tokens:
            chunk, shown = _first_row(out, shown, n, stop_ids)
            yield chunk
            if bool(finished.all()):
                break
        if n == max_new_tokens:
            break
        step.mask[:, length + i] = 1
        step.positions += 1
        step.tokens.copy_(nxt.view(batch, 1))
        draw()
        nxt = step()
    return out[:, :n]


def _first_row(out: torch.Tensor, shown: int, n: int, stop_ids: list[int]) -> tuple[list[int], int]:
    """Row 0's ids ``shown:n``, cut after a stop id; and how far is shown now (``n``, or -1 after the stop)."""
    if shown < 0:
        return [], shown
    chunk = out[0, shown:n].tolist()
    stop = next((j for j, t in enumerate(chunk) if t in stop_ids), None)
    return (chunk, n) if stop is None else (chunk[:stop + 1], -1)


def decode(model: Any, cache: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           **settings: Any) -> torch.Tensor:
    """New ids ``(batch, n)`` for left-padded prompts, written into an emptied static ``cache``:
    :func:`decode_steps` (``settings``: its keyword arguments) run to its end."""
    steps = decode_steps(model, cache, input_ids, attention_mask, **settings)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
