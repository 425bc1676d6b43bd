"""A decode loop that keeps the GPU busy (lesson 06): one compiled step for model *and* sampling, few syncs.

transformers' ``generate`` with a static cache replays a CUDA graph for the model, but around it every token
pays host work that waits for the GPU: the stopping check reads a GPU value, the logits processors and the
sampler are separate launches, the streamer copies each token to the host. On the 6B model that made a token
cost 6.8 ms for 2.9 ms of weight reading (BENCHMARKS.md). This loop keeps transformers' model and
``StaticCache`` and replaces only the loop around them: the model step and the sampling are one compiled
function (one CUDA graph), tokens stay on the GPU, and the host looks at them every ``check_every`` tokens to
stop and to stream. The same loop runs uncompiled on a CPU, which is how the tests check it against
``generate``.
"""

from __future__ import annotations

from typing import Any, Callable, Generator

import torch

from glmlora.attention import fuse_qkv, refresh_fused, use_grouped_decode
from glmlora.fast import use_compile_cache


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


def _step(model: Any, cache: Any, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
          noise: torch.Tensor | None, temperature: torch.Tensor, top_p: torch.Tensor, top_k: int) -> torch.Tensor:
    logits = model(input_ids=tokens, position_ids=positions, attention_mask=mask, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    return sample_next(logits, noise, temperature, top_p, top_k)


def compiled_step(model: Any, how: str | dict = "reduce-overhead") -> Callable[..., torch.Tensor]:
    """The model's decode step compiled once with ``torch.compile`` and kept on the model, one per ``how``: a
    mode ("reduce-overhead": CUDA graphs) or a dict of inductor options (benchmarks try autotuning). Says once
    that the first reply compiles; the compiled code is cached on disk under the work directory."""
    steps = model.__dict__.setdefault("_glmlora_decode_steps", {})
    key = how if isinstance(how, str) else repr(sorted(how.items()))
    if key not in steps:
        cache = use_compile_cache()  # kept under the work directory: a new process loads instead of compiling
        print(f"compiling the decode step for this GPU: this first reply takes longer (about 40 s at 6B size on "
              f"an H100; a later process loads what is cached in {cache}: about 10 s)", flush=True)
        fn = lambda *args: _step(model, *args)  # noqa: E731
        steps[key] = (torch.compile(fn, mode=how) if isinstance(how, str) else torch.compile(fn, options=how))
    return steps[key]


def will_compile(model: Any) -> bool:
    """Whether the next fast-path reply compiles the decode step first (on CUDA, once per model): a chat UI
    says so, because at 6B size it takes about 40 s (about 10 s from the cache of an earlier process)."""
    return model.device.type == "cuda" and not model.__dict__.get("_glmlora_decode_steps")


@torch.inference_mode()
def decode_steps(model: Any, cache: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 max_new_tokens: int, stop_ids: list[int], pad_id: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, check_every: int = 32,
                 compile: bool | str | dict | None = None,
                 grouped_attention: bool = True, fused_qkv: bool = True) -> Generator[list[int], None, torch.Tensor]:
    """The decode loop as a generator: every ``check_every`` tokens it yields row 0's newest ids (up to and
    including its stop id, then nothing more), and it returns all new ids ``(batch, n)``.

    Rows stop at their first stop id (later places hold ``pad_id``); the loop ends when all rows have stopped,
    noticed at most ``check_every`` tokens late; each look waits for the GPU (5 % of the speed at 8 rather than 32
    on an H200, BENCHMARKS.md), so streaming looks every 8 and everything else every 32. A generator rather than a
    background thread: with torch up to
    2.12, a CUDA graph that ``torch.compile`` captured fails when replayed from another Python thread
    (pytorch#123177), so streaming has to happen in the caller's thread. ``compile`` defaults to "on CUDA";
    a string or dict picks another ``torch.compile`` mode or inductor options (benchmarks try autotuning).
    ``grouped_attention`` switches an SDPA model to :mod:`glmlora.attention`'s one-token attention (same
    results, no k/v head copies over the whole cache) and ``fused_qkv`` computes q, k and v in one matrix product
    (:func:`glmlora.attention.fuse_qkv`); False only for benchmarks that measure the difference.
    """
    batch, length = input_ids.shape
    context = cache.get_max_length()
    if length + max_new_tokens > context:
        raise ValueError(f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceed the static cache "
                         f"of {context} tokens")
    device = input_ids.device
    if grouped_attention:
        use_grouped_decode(model)
    # fusing refreshes too; either way the compiled step cannot notice changed weights (a merge since the last reply)
    if fused_qkv:
        fuse_qkv(model)
    else:
        refresh_fused(model)
    compile = device.type == "cuda" if compile is None else compile
    if compile:
        step = compiled_step(model, "reduce-overhead" if compile is True else compile)
    else:
        step = lambda *args: _step(model, *args)  # noqa: E731
    mask = torch.zeros(batch, context, dtype=torch.long, device=device)
    mask[:, :length] = attention_mask
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    temperature_t = torch.tensor(float(temperature), device=device)
    top_p_t = torch.tensor(float(top_p), device=device)
    noise = torch.empty(batch, model.config.vocab_size, device=device) if do_sample else None
    draw = lambda: noise.exponential_() if noise is not None else None  # noqa: E731

    logits = model(input_ids=input_ids, position_ids=positions, attention_mask=mask, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    nxt = sample_next(logits, draw(), temperature_t, top_p_t, top_k)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    tokens = torch.empty(batch, 1, dtype=torch.long, device=device)
    # a fresh (batch, 1) buffer: a slice's clone keeps the prompt's stride, and the compiled step guards on
    # strides, so every new prompt length compiled the whole step again (30 s at 6B size)
    positions = torch.empty(batch, 1, dtype=positions.dtype, device=device).copy_(positions[:, -1:])
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
        mask[:, length + i] = 1
        positions += 1
        tokens.copy_(nxt.view(batch, 1))
        if compile:
            torch.compiler.cudagraph_mark_step_begin()
        nxt = step(cache, tokens, positions, mask, draw(), temperature_t, top_p_t, top_k)
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
