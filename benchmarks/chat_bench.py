"""Decode speed at batch 1: the original tutorial's chat loop vs glmlora's helper, in ONE run on one card.

    python benchmarks/chat_bench.py --model /tmp/chatglm3-6b-random

A 512-token prompt, 256 new tokens, sampling (top_p 0.8, temperature 0.8; min_new_tokens pins the length,
since random weights stop anywhere). Prints decode tokens/s, time to first token, the bandwidth bound
(weight bytes / device-to-device copy bandwidth measured here) and batched generation for evaluation use.

  a  the original loop: PeftModel *unmerged* on fp16 weights, generate(max_length=prompt + 256)
  b  glmlora: LoRA merged into bf16 weights, the 4,096-token static KV cache that chat() keeps, glmlora.decoding's
     loop (glmlora.decode_step: model step and sampling in one CUDA graph of per-layer compiled code, the host
     looks at the tokens every 32) with one-token attention (no copies of the 2 k/v heads) and one q/k/v matrix
     product - what chat() runs on CUDA
  diagnostics in the same run (--variants picks; default all): b_context_1024 (a 1,024-token cache);
  b_check_every_8 (as when streaming); b_unfused (b with q, k and v as three products); b_dynamic_cache
  (transformers' generate, dynamic cache); b_hf_static (transformers' generate on a static cache with its own
  compiled step). The runs of 2026-11-28 also measured b_sdpa / b_flex (the decode step through transformers'
  attention functions, which copy the k/v heads); the step no longer calls them.
  --extra autotune: b compiled with mode "max-autotune" plus coordinate-descent tuning (inductor benchmarks
  its own kernels against cuBLAS for each shape; long compile)
  --quick leaves out a, b_dynamic_cache (slow, unchanged by glmlora's loop) and the stream check in follow-up runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glmlora import load_model, load_tokenizer  # noqa: E402
from glmlora.chatglm3 import ensure_native  # noqa: E402
from glmlora.decoding import decode  # noqa: E402
from glmlora.generate import GenerationSettings, _generate_kwargs, generate_batch, static_cache  # noqa: E402
from glmlora.lora import lora_config  # noqa: E402
from glmlora.tiny import build_full_random, build_tiny  # noqa: E402

NEW = 256
CONTEXT = 4096  # = glmlora.generate.FAST_CONTEXT, the cache chat() keeps
#: Decode variants of the loop: name -> (keyword arguments of decode, attention, cache tokens).
#: The ones that leave the model's q/k/v unfused come first: fusing (b and after) is not undone.
VARIANTS = {"b_unfused": ({"fused_qkv": False}, "sdpa", CONTEXT),
            "b": ({}, "sdpa", CONTEXT),
            "b_check_every_8": ({"check_every": 8}, "sdpa", CONTEXT),
            "b_context_1024": ({}, "sdpa", 1024)}
#: Opt-in variants (--extra): name -> (keyword arguments of decode, attention, cache tokens).
AUTOTUNE = {"compile": {"max_autotune": True, "triton.cudagraphs": True, "coordinate_descent_tuning": True}}
EXTRA = {"autotune": ("b_max_autotune", AUTOTUNE, "sdpa", CONTEXT)}


def copy_bandwidth(gib: int = 4) -> float:
    """Device-to-device copy, bytes read + written per second."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(gib * 1024 ** 3, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 5 / (time.perf_counter() - start)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(model, ids, full_warmup: bool = False, fresh=None, **kw) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s, new tokens) for one generate call, after a warm-up call.

    ``full_warmup`` repeats the exact timed call first (compilation and CUDA-graph capture happen there);
    ``fresh()`` returns per-call kwargs (an emptied static cache) merged into ``kw``.
    """
    mask = torch.ones_like(ids)
    call = lambda **over: model.generate(ids, attention_mask=mask, **{**kw, **(fresh() if fresh else {}), **over})  # noqa: E731
    for _ in range(2 if full_warmup else 1):
        call() if full_warmup else call(max_new_tokens=8, min_new_tokens=8)
    sync()
    t0 = time.perf_counter()
    call(max_new_tokens=1, min_new_tokens=1)
    sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = call()
    sync()
    total = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    return ttft, (new - 1) / (total - ttft), new


def decode_exactly(model, ids, new: int, context: int, **kw) -> torch.Tensor:
    """glmlora's decode loop with no stop ids, so that it always makes ``new`` tokens."""
    return decode(model, static_cache(model, context), ids, torch.ones_like(ids), max_new_tokens=new,
                  stop_ids=[], pad_id=0, **kw)


def timed_decode(model, ids, context: int = CONTEXT, **kw) -> tuple[float, float, int]:
    """Like :func:`timed_generate` for glmlora's decode loop (no stop ids: always 256 new tokens) on a static
    cache of ``context`` tokens."""
    run = lambda n: decode_exactly(model, ids, n, context, **kw)  # noqa: E731
    for _ in range(2):  # compilation and CUDA-graph capture
        run(NEW)
    sync()
    t0 = time.perf_counter()
    run(1)
    sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = run(NEW).shape[1]
    sync()
    return ttft, (new - 1) / (time.perf_counter() - t0 - ttft), new


def profile_decode(model, ids, tokens: int = 64, context: int = CONTEXT, **kw) -> dict:
    """Where a token's time goes on the (already compiled) fast path: wall time vs GPU busy time per token and the
    kernels that take it (torch.profiler; CUDA-graph replays included)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    run = lambda: decode_exactly(model, ids, tokens, context, **kw)  # noqa: E731
    run()
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        sync()
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    busy_us = sum(e.self_device_time_total for e in events)
    top = [{"kernel": e.key[:90], "us_per_token": e.self_device_time_total / tokens, "calls_per_token": e.count / tokens}
           for e in events[:15]]
    return {"tokens": tokens, "wall_ms_per_token": wall * 1e3 / tokens, "gpu_busy_ms_per_token": busy_us / 1e3 / tokens,
            "kernel_calls_per_token": sum(e.count for e in events) / tokens, "top": top}


def stream_check(model, tok) -> dict:
    """On the fast path: streamed text == non-streamed text (greedy), and the time of each."""
    from glmlora.generate import chat, stream_chat

    greedy = GenerationSettings(do_sample=False, max_new_tokens=64)
    query = "最近工作压力很大，晚上总是睡不着，怎么办？" * 8
    t0 = time.perf_counter()
    reply, _ = chat(model, tok, query, settings=greedy)
    t1 = time.perf_counter()
    streamed = "".join(stream_chat(model, tok, query, settings=greedy))
    t2 = time.perf_counter()
    return {"equal": streamed == reply, "chat_s": t1 - t0, "stream_s": t2 - t1, "chars": len(reply)}


def random_adapter(model):
    """An untrained-looking LoRA with non-zero B, so merging really changes the weights."""
    from peft import get_peft_model

    peft = get_peft_model(model, lora_config())
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return peft


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--variants", default="", help="decode variants to run, comma-separated (default: all of "
                   + ", ".join(VARIANTS) + ")")
    p.add_argument("--no-hf-static", action="store_true", help="skip b_hf_static (transformers' compiled generate)")
    p.add_argument("--quick", action="store_true",
                   help="skip a, b_dynamic_cache and the stream check (for follow-up runs)")
    p.add_argument("--profile", action="store_true", help="profile 64 tokens of b (kernels per token)")
    p.add_argument("--extra", default="", help="extra decode variants (comma-separated): autotune")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    (build_full_random(args.model, device=device) if args.size == "full" else build_tiny(args.model))
    native = ensure_native(args.model)
    tok = load_tokenizer(native)
    weight_bytes = sum(f.stat().st_size for f in native.glob("*.safetensors"))
    bw = copy_bandwidth()
    bound = bw / weight_bytes
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tok.sp.get_piece_size(), (1, args.prompt_tokens), generator=gen).to(device)
    ids[0, :2] = torch.tensor(tok.prefix_ids())
    sampling = dict(do_sample=True, top_p=0.8, temperature=0.8)
    results = {}

    # (a) the original tutorial's loop
    base = load_model(native, dtype=torch.float16, device_map=device)
    base.generation_config.max_new_tokens = None  # the original download's config has none: max_length rules
    model = random_adapter(base).eval()
    if not args.quick:
        with torch.inference_mode():
            ttft, tps, new = timed_generate(model, ids, max_length=ids.shape[1] + NEW, min_new_tokens=NEW,
                                            eos_token_id=tok.eos_token_id, pad_token_id=0, **sampling)
        results["a"] = {"ttft_ms": ttft * 1e3, "decode_tok_s": tps, "new_tokens": new}
        print("a", results["a"], flush=True)
    merged = model.merge_and_unload().to(torch.bfloat16).eval()
    del model

    # (b) glmlora's helper: merged weights, one static cache, compiled decode step (CUDA graphs)
    settings = GenerationSettings(max_new_tokens=NEW)
    dynamic = {**_generate_kwargs(tok, settings), "min_new_tokens": NEW}
    if not args.quick:
        with torch.inference_mode():
            ttft, tps, new = timed_generate(merged, ids, **dynamic)
        results["b_dynamic_cache"] = {"ttft_ms": ttft * 1e3, "decode_tok_s": tps, "new_tokens": new}
        print("b with a dynamic cache (diagnostic)", results["b_dynamic_cache"], flush=True)
    if device == "cuda" and not args.no_hf_static:  # before glmlora's loop changes the model's attention
        fresh = lambda: {"past_key_values": static_cache(merged, 1024)}  # noqa: E731
        try:
            with torch.inference_mode():
                ttft, tps, new = timed_generate(merged, ids, full_warmup=True, fresh=fresh, **dynamic)
            results["b_hf_static"] = {"ttft_ms": ttft * 1e3, "decode_tok_s": tps, "new_tokens": new}
        except Exception as e:
            results["b_hf_static_error"] = f"{type(e).__name__}: {e}"[:800]
        print("transformers generate on a static cache", results.get("b_hf_static"), flush=True)
    loop = dict(do_sample=True, temperature=0.8, top_p=0.8, top_k=50)  # glmlora's loop: compiled on CUDA
    wanted = [v for v in VARIANTS if v in args.variants.split(",")] if args.variants else list(VARIANTS)
    extras = [EXTRA[x] for x in args.extra.split(",") if x]
    setup_now = None
    for name, extra, attention, context in [(v, *VARIANTS[v]) for v in wanted] + extras:
        setup = (attention, extra.get("fused_qkv", True))
        if setup != setup_now or name in {e[0] for e in extras}:  # a fresh compile
            torch._dynamo.reset()
            merged.__dict__.pop("_glmlora_decode_steps", None)
            merged.set_attn_implementation(attention)
            setup_now = setup
        try:
            t0 = time.perf_counter()
            ttft, tps, new = timed_decode(merged, ids, context=context, **loop, **extra)
            results[name] = {"ttft_ms": ttft * 1e3, "decode_tok_s": tps, "new_tokens": new, "context": context,
                             "attention": merged.config._attn_implementation,
                             "warmup_and_compile_s": time.perf_counter() - t0,
                             "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
                             "graph_breaks": sum(counters["graph_break"].values())}
        except Exception as e:  # record why the fast path failed
            results[f"{name}_error"] = f"{type(e).__name__}: {e}"[:800]
        print(name, results.get(name, results.get(f"{name}_error")), flush=True)
        if args.profile and name == "b" and name in results:
            results[f"profile_{name}"] = prof = profile_decode(merged, ids, context=context, **loop, **extra)
            print(f"profile of {name}: {prof['wall_ms_per_token']:.2f} ms per token, GPU busy "
                  f"{prof['gpu_busy_ms_per_token']:.2f} ms in {prof['kernel_calls_per_token']:.0f} kernel calls",
                  flush=True)
            for row in prof["top"]:
                print(f"  {row['us_per_token']:8.1f} us/token  {row['calls_per_token']:6.1f} calls/token  "
                      f"{row['kernel']}")
    torch._dynamo.reset()
    merged.__dict__.pop("_glmlora_decode_steps", None)
    merged.set_attn_implementation("sdpa")
    if "b" in results:
        print("b", results["b"], flush=True)
    if device == "cuda" and not args.quick:
        results["stream_check"] = stream_check(merged, tok)
        print("stream check", results["stream_check"], flush=True)

    # batched generation for evaluation (greedy, left-padded, 128 new tokens)
    convs = [[{"role": "user", "content": tok.decode(ids[0, 2 + i: 200 + 7 * i].tolist())}] for i in range(32)]
    for b in [int(x) for x in args.batches.split(",") if x]:
        for fast in ([False, True] if device == "cuda" else [False]):
            name = f"batch{b}" + ("_static" if fast else "")
            greedy = GenerationSettings(do_sample=False, max_new_tokens=128)
            if fast:  # compile and capture first, as a chat session would once
                generate_batch(merged, tok, convs[:b], greedy, batch_size=b, progress=False, fast=True)
            sync()
            t0 = time.perf_counter()
            replies = generate_batch(merged, tok, convs[:b], greedy, batch_size=b, progress=False, fast=fast)
            sync()
            seconds = time.perf_counter() - t0
            reply_tokens = sum(len(tok.encode_text(r)) for r in replies)  # the replies, re-encoded: ~tokens made
            results[name] = {"seconds": seconds, "samples_per_s": b / seconds, "reply_tokens": reply_tokens,
                             "reply_tokens_per_s": reply_tokens / seconds}
            print(name, results[name], flush=True)

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{card}; torch {torch.__version__}; weights {weight_bytes / 1e9:.2f} GB; copy bandwidth "
          f"{bw / 1e12:.2f} TB/s; bound {bound:.0f} tokens/s")
    print("| variant | cache | decode tok/s | % of bound | TTFT ms (512-token prompt) |\n|---|---|---|---|---|")
    for name in ("a", *VARIANTS, *(e[0] for e in EXTRA.values()), "b_hf_static", "b_dynamic_cache"):
        if name not in results:
            continue
        r = results[name]
        print(f"| {name} | {r.get('context', '-')} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / bound:.0%} "
              f"| {r['ttft_ms']:.1f} |")
    if "a" in results and "b" in results:
        print(f"speed-up b/a: {results['b']['decode_tok_s'] / results['a']['decode_tok_s']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "torch": torch.__version__, "bandwidth": bw,
                                         "weight_bytes": weight_bytes, "bound": bound, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
