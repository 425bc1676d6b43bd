"""Issue 13's GPU measurements: kernels that fit consumer cards, fp16-only cards, QLoRA, settings under each card's
memory, the compile cost of the first reply. Every stage prints a table and writes one JSON (``--json``).

    python benchmarks/issue13.py flex  --json flex.json                 # (a) flex-attention kernels vs the cards
    python benchmarks/issue13.py train --label "24 GB bf16" --gpu-gib 23.7 --json r.json   # (b, c, d) one run
    python benchmarks/issue13.py qlora-check --adapter DIR --json q.json  # (c) chat from 4 bits, merge into 16
    python benchmarks/issue13.py chat  --workdir DIR --json e.json      # (e) first reply in a fresh process
    python benchmarks/issue13.py table a.json b.json ...               # one table from several runs' JSON

All on the full-size random-weight ChatGLM3-6B (``GLMLORA_PROFILE=full-random``; ``benchmarks/gpu_session.sh build``
makes it), except ``--tiny`` runs, which check the plumbing on a CPU. ``benchmarks/gpu_issue13.sh`` runs the stages in
three device calls. Everything here is an EMULATION on an H100/H200: a card's memory is a cap on this process
(``torch.cuda.set_per_process_memory_fraction``), its kernels are compiled for its architecture but not run on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
# GLMLORA_PATH: measure another glmlora (an older version unpacked elsewhere) with the same stages
sys.path.insert(0, os.environ.get("GLMLORA_PATH") or str(ROOT))
GIB = 1024 ** 3
#: A card's memory is emulated by capping this process at what the card reports to torch (``--gpu-gib``: RTX 3090
#: 23.7 GiB, quarter A100 19.5, RTX 4060 Ti 15.6, T4 14.6, RTX 3060 11.7, RTX 3080 9.8) minus ~0.5 GiB of CUDA
#: context, which a real card spends outside torch's allocator.
CONTEXT_GIB = 0.5
LIMIT_101K = 101_376


# ---------------------------------------------------------------------------------------------- (a) flex kernels
#: Kernel options compared at ChatGLM3's shape; "torch sm86" is what torch 2.11 picks on an RTX 3090 by itself.
FLEX_CANDIDATES: dict[str, dict[str, int] | None] = {
    "torch sm90 defaults (H100/H200)": {},
    "torch sm86 (3090 default)": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 8,
                                  "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                                  "bwd_num_stages": 3, "bwd_num_warps": 4},
    "torch sm80/sm89": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 8,
                        "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                        "bwd_num_stages": 2, "bwd_num_warps": 4},
    "glmlora small-smem": None,  # glmlora.fast.SMALL_SMEM_OPTIONS, filled in at run time
    "small tiles, 3 stages": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
                              "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                              "bwd_num_stages": 3, "bwd_num_warps": 4},
}
TARGETS = (86, 89)  # RTX 3090 / A10G, RTX 4090 / L4 (101,376 B per block); --targets 86,89,120 adds the RTX 5090


def packed_documents(tokens: int, seed: int = 0) -> list[int]:
    """Example lengths of one packed row, drawn like the course's data (about 60-700 tokens)."""
    import random

    rng, lengths = random.Random(seed), []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(60, 700), tokens - sum(lengths)))
    return lengths


def flex_inputs(tokens: int, dtype: Any, device: str) -> tuple:
    """q, k, v (32 / 2 / 2 heads of 128), a document-causal block mask and its dense boolean twin (for SDPA)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, h, tokens, 128, generator=gen, device=device, dtype=dtype).requires_grad_()
               for h in (32, 2, 2))
    doc = torch.repeat_interleave(torch.arange(len(packed_documents(tokens)), device=device),
                                  torch.tensor(packed_documents(tokens), device=device))

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

    block_mask = create_block_mask(document_causal, None, None, tokens, tokens, device=device)
    dense = (doc[:, None] == doc[None, :]) & torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    return q, k, v, block_mask, dense[None, None]


@contextmanager
def gpu_lock(path: str = "/tmp/issue13-gpu.lock") -> Iterator[None]:
    """One timing at a time on the GPU while other candidates compile on the CPU."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def kernel_modules(cache_dir: str) -> list[Path]:
    """Inductor's generated flex-attention template kernels (one .py file each) in a cache directory."""
    found = []
    for path in glob.glob(f"{cache_dir}/**/*.py", recursive=True):
        text = Path(path).read_text(errors="ignore")
        if "@triton_heuristics.template" in text and "async_compile" not in text:  # flex's are the only templates
            found.append(Path(path))
    return found


def compile_for(autotuner: Any, cc: int) -> dict:
    """Compile one inductor template kernel for compute capability ``cc`` (sm_86, ...) without running it; the
    shared memory Triton's allocator gives it there (what the card's launch would check against 101,376 B)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    autotuner.device_props = autotuner.device_props._replace(cc=cc, major=cc // 10)
    cfg = autotuner.configs[0]
    meta = autotuner._create_compile_meta(cfg)
    options = autotuner._create_compile_options(cfg, meta)
    source = ASTSource(autotuner.fn, meta["signature"], meta["constants"], meta["configs"][0])
    binary = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
    return {"shared": int(binary.metadata.shared), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def kernels_per_target(cache_dir: str, targets: tuple[int, ...] = TARGETS) -> list[dict]:
    """Every flex template kernel of this process: its shared memory compiled for this GPU (Triton's cache) and
    recompiled for each of :data:`TARGETS`."""
    import torch
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    major, minor = torch.cuda.get_device_capability()
    native = {}  # read before recompiling: the recompiled kernels land in the same cache under the same names
    for path in glob.glob(f"{cache_dir}/**/*.json", recursive=True):
        try:
            meta = json.loads(Path(path).read_text())
        except (ValueError, OSError):
            continue
        arch = (meta.get("target") or {}).get("arch") if isinstance(meta, dict) else None
        if isinstance(meta, dict) and "shared" in meta and arch in (None, major * 10 + minor):
            native[meta.get("name")] = meta
    rows = []
    for path in kernel_modules(cache_dir):
        spec = importlib.util.spec_from_file_location(f"k{abs(hash(str(path)))}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, obj in vars(module).items():
            if not isinstance(obj, CachingAutotuner):
                continue
            row = {"kernel": name, "kind": "backward" if "backward" in name else "forward"}
            for cc in targets:
                try:
                    row[f"sm{cc}"] = compile_for(obj, cc)["shared"]
                except Exception as e:  # a target this Triton cannot build: say so, keep the others
                    row[f"sm{cc}"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            rows.append(row)
    for row in rows:
        meta = native.get(row["kernel"], {})
        row.update(this_gpu=meta.get("shared"), warps=meta.get("num_warps"), stages=meta.get("num_stages"))
    return rows


def flex_one(args: argparse.Namespace) -> dict:
    """One candidate in this (fresh) process: compile, time forward and forward + backward, read its kernels."""
    import torch
    import triton
    from torch.nn.attention.flex_attention import flex_attention

    options = json.loads(args.options)
    q, k, v, block_mask, _ = flex_inputs(args.tokens, torch.bfloat16, "cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    run = lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=options or None)  # noqa: E731
    grad = torch.randn_like(q)
    result: dict[str, Any] = {"name": args.name, "options": options}
    try:
        start = time.perf_counter()
        run().backward(grad)
        torch.cuda.synchronize()
        result["compile_s"] = time.perf_counter() - start
        with gpu_lock():
            result["fwd_ms"] = triton.testing.do_bench(run, warmup=100, rep=500, return_mode="median")
            result["fwd_bwd_ms"] = triton.testing.do_bench(lambda: run().backward(grad), warmup=100, rep=500,
                                                           grad_to_none=[q, k, v], return_mode="median")
    except Exception as e:  # noqa: BLE001 - the table says which candidate failed and why
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    try:
        result["kernels"] = kernels_per_target(os.environ["TORCHINDUCTOR_CACHE_DIR"],
                                               tuple(int(t) for t in args.targets.split(",")))
    except Exception as e:  # noqa: BLE001
        result["kernels_error"] = f"{type(e).__name__}: {e}"[:300]
    return result


def sdpa_timing(tokens: int) -> dict:
    """transformers' SDPA path on the same packed row: a dense boolean mask (what the model builds for packed rows)."""
    import torch
    import triton
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, _, dense = flex_inputs(tokens, torch.bfloat16, "cuda")
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 16, True
    run = lambda: sdpa_attention_forward(module, q, k, v, dense, dropout=0.0)[0]  # noqa: E731
    grad = torch.randn_like(run())
    with gpu_lock():
        return {"name": "SDPA (dense mask)",
                "fwd_ms": triton.testing.do_bench(run, warmup=100, rep=500, return_mode="median"),
                "fwd_bwd_ms": triton.testing.do_bench(lambda: run().backward(grad), warmup=100, rep=500,
                                                      grad_to_none=[q, k, v], return_mode="median")}


def fits(candidate: dict) -> bool | None:
    """Every kernel within 101,376 B on sm86 and sm89 (None when not measured)."""
    sizes = [row.get(f"sm{cc}") for row in candidate.get("kernels", []) for cc in (86, 89)]
    if not sizes or any(not isinstance(s, int) for s in sizes):
        return None
    return max(sizes) <= LIMIT_101K


def flex_stage(args: argparse.Namespace) -> dict:
    """All candidates side by side (compiling in parallel processes, timing one at a time) + SDPA."""
    import torch

    from glmlora.fast import SMALL_SMEM_OPTIONS

    candidates = {name: (dict(SMALL_SMEM_OPTIONS) if opts is None else opts) for name, opts in FLEX_CANDIDATES.items()}
    procs = []
    for i, (name, options) in enumerate(candidates.items()):
        cache = f"/tmp/issue13-flex-{i}"
        subprocess.run(["rm", "-rf", cache], check=False)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": f"{cache}/triton",
               "TORCHINDUCTOR_COMPILE_THREADS": "4", "PYTHONUNBUFFERED": "1"}
        out = Path(f"{cache}.json")
        cmd = [sys.executable, __file__, "flex-one", "--name", name, "--options", json.dumps(options),
               "--tokens", str(args.tokens), "--targets", args.targets, "--json", str(out)]
        procs.append((name, out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  text=True)))
    results = []
    for name, out, proc in procs:
        log = proc.communicate()[0]
        results.append(json.loads(out.read_text()) if out.is_file() else {"name": name, "error": log[-1500:]})
    sdpa = sdpa_timing(args.tokens)
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
              "documents": len(packed_documents(args.tokens)), "candidates": results, "sdpa": sdpa}
    print(flex_table(report))
    return report


def flex_table(report: dict) -> str:
    sdpa = report["sdpa"]["fwd_bwd_ms"]
    lines = [f"flex attention, ChatGLM3 shape (32 q / 2 kv heads, head_dim 128), one packed row of {report['tokens']:,} "
             f"tokens ({report['documents']} examples), bf16, {report['card']}; shared memory per kernel in bytes "
             f"(this GPU / compiled for sm86 / sm89 / sm120; limit on those {LIMIT_101K:,})", "",
             "| options | fwd ms | fwd+bwd ms | vs SDPA | kernel | this GPU | sm86 | sm89 | sm120 | fits sm86+89 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["candidates"]:
        speed = (f"{c['fwd_ms']:.3f} | {c['fwd_bwd_ms']:.3f} | {sdpa / c['fwd_bwd_ms']:.2f}x" if "fwd_bwd_ms" in c
                 else f"failed: {c.get('error', '?')[:80]} | | ")
        rows = c.get("kernels") or [{"kernel": c.get("kernels_error", "-")}]
        for i, k in enumerate(rows):
            head = f"| {c['name']} | {speed} " if i == 0 else "| | | | "
            lines.append(f"{head}| {k.get('kind', k['kernel'])} | {k.get('this_gpu', '-')} | {k.get('sm86', '-')} | "
                         f"{k.get('sm89', '-')} | {k.get('sm120', '-')} | {fits(c) if i == 0 else ''} |")
    lines.append(f"| SDPA (dense mask) | {report['sdpa']['fwd_ms']:.3f} | {sdpa:.3f} | 1.00x | | | | | | |")
    fitting = [c for c in report["candidates"] if fits(c) and "fwd_bwd_ms" in c]
    if fitting:
        best = min(fitting, key=lambda c: c["fwd_bwd_ms"])
        lines.append(f"\nfastest candidate that fits sm86 and sm89: {best['name']} ({best['fwd_bwd_ms']:.3f} ms fwd+bwd, "
                     f"{sdpa / best['fwd_bwd_ms']:.2f}x SDPA): {json.dumps(best['options'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- (b, c, d) training
def write_config(args: argparse.Namespace, suggestion: Any, folder: Path) -> Path:
    import yaml

    config = {"profile": "tiny" if args.tiny else "full-random", "resume": "never", "speed_ups": None,
              "pack_tokens": args.pack or suggestion.pack_tokens, "max_length": suggestion.max_length,
              "load_in_4bit": suggestion.load_in_4bit if args.load_in_4bit is None else args.load_in_4bit,
              "output_dir": str(folder / "run"), "adapter_dir": str(folder / "adapter"),
              "training": {"max_steps": args.steps, "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no",
                           "disable_tqdm": True, "warmup_steps": 0,
                           "gradient_accumulation_steps": args.ga or suggestion.gradient_accumulation_steps,
                           # every_n_layers: transformers checkpoints every n-th decoder layer; the others keep
                           # their activations (memory spent on speed: no recomputation there)
                           "gradient_checkpointing_kwargs": {"use_reentrant": False,
                                                             "every_n_layers": args.every_n or 1}}}
    if args.tiny:  # the plumbing on a CPU: no 4-bit there (bitsandbytes needs CUDA)
        config["pack_tokens"], config["max_length"], config["load_in_4bit"] = 1024, 512, False
    if args.data:
        config["data"] = str(args.data)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "train.yaml"


def train_stage(args: argparse.Namespace) -> dict:
    """One training run through ``glmlora.train`` (what ``python -m glmlora.train`` does), under a memory cap, with
    the settings ``suggest_training_config`` gives the emulated card (``--pack`` / ``--ga`` / ``--load-in-4bit``
    override them for what-if rows)."""
    import torch

    from glmlora.environment import suggest_training_config
    from glmlora.train import WARMUP_STEPS, load_config, run

    if args.fp16:
        os.environ["GLMLORA_NO_BF16"] = "1"  # the fp16-only card path: read by precision_flags and training_dtype
    suggestion = suggest_training_config(args.gpu_gib, bf16=not args.fp16)
    cap = None
    if torch.cuda.is_available() and args.gpu_gib:
        cap = args.gpu_gib - CONTEXT_GIB
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap * GIB / total)
    folder = Path(args.workdir) / args.label.replace(" ", "_").replace("/", "-")
    cfg = load_config(write_config(args, suggestion, folder))
    if args.kbit_prepare == "peft":  # what-if: peft's own preparation (casts the 16-bit weights to fp32)
        patch_peft_prepare()
    start = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - start
    print(result.summary(), flush=True)
    steps = result.step_times
    first_step = result.seconds - (steps[-1] - steps[0]) if steps else None
    peak = result.peak_memory[1]
    out = {"label": args.label, "gpu_gib": args.gpu_gib, "cap_gib": cap, "fp16": args.fp16, "card": card_name(),
           "settings": dataclasses.asdict(suggestion), "pack_tokens": cfg.pack_tokens,
           "gradient_accumulation_steps": cfg.training["gradient_accumulation_steps"],
           "load_in_4bit": cfg.load_in_4bit, "kbit_prepare": args.kbit_prepare, "every_n_layers": args.every_n or 1,
           "attention": os.environ.get("GLMLORA_ATTENTION", "auto"),
           "compile_layers": os.environ.get("GLMLORA_COMPILE_LAYERS", "1") != "0", "steps": result.global_step,
           "warmup_steps": WARMUP_STEPS, "row_tokens_per_s": result.steady_tokens_per_second,
           "tokens_per_step": result.tokens_per_step, "first_step_s": first_step, "wall_s": wall,
           "peak_allocated_gib": peak, "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB
           if torch.cuda.is_available() else None, "losses": result.losses, "adapter_dir": str(result.adapter_dir)}
    out["headroom_ok"] = None if cap is None else peak < cap - 1
    print(train_table([out]))
    return out


def patch_peft_prepare() -> None:
    """Make ``add_lora`` run peft's ``prepare_model_for_kbit_training`` first (for the comparison row)."""
    from peft import prepare_model_for_kbit_training

    import glmlora.training as training

    original = training.add_lora

    def add_lora(model, config, gradient_checkpointing=True):
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
        return original(model, config, gradient_checkpointing)

    training.add_lora = add_lora


def card_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def train_table(rows: list[dict]) -> str:
    lines = ["| run | precision | 4-bit | pack x GA | cap GiB | peak alloc GiB | peak reserved GiB | < cap - 1 | "
             "row tok/s (after 3 steps) | first step s | loss first -> last |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        losses = r.get("losses") or []
        loss = f"{losses[0][1]:.3f} -> {losses[-1][1]:.3f}" if losses else "-"
        cap = f"{r['cap_gib']:.1f}" if r.get("cap_gib") else "-"
        reserved = f"{r['peak_reserved_gib']:.2f}" if r.get("peak_reserved_gib") is not None else "-"
        speed = f"{r['row_tokens_per_s']:,.0f}" if r.get("row_tokens_per_s") else "-"
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else "-"
        precision = "fp16" if r.get("fp16") else "bf16"
        every = f", ckpt 1/{r['every_n_layers']}" if r.get("every_n_layers", 1) > 1 else ""
        lines.append(f"| {r['label']} | {precision} | {r.get('load_in_4bit')} | {r.get('pack_tokens')} x "
                     f"{r.get('gradient_accumulation_steps')}{every} | {cap} | {r['peak_allocated_gib']:.2f} | {reserved} | "
                     f"{r.get('headroom_ok')} | {speed} | {first} | {loss} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- (c) QLoRA after training
def logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def qlora_check(args: argparse.Namespace) -> dict:
    """After a QLoRA run: chat from the 4-bit base with its adapter; the adapter's effect on the logits as trained
    (4-bit + adapter), merged into a 16-bit copy, and merged into the 4-bit weights (rounded to NF4 again)."""
    import torch
    from peft import PeftModel

    from glmlora import load_model
    from glmlora.generate import GenerationSettings, chat
    from glmlora.pipeline import ensure_native_model
    from glmlora.profiles import select_profile
    from glmlora.qlora import load_for_chat, merged_16bit
    from glmlora.training import free_memory

    native = ensure_native_model(select_profile("tiny" if args.tiny else "full-random"))
    load_in_4bit = not args.tiny
    start = time.perf_counter()
    model, tok = load_for_chat(native, args.adapter, load_in_4bit=load_in_4bit)
    out: dict[str, Any] = {"card": card_name(), "load_s": time.perf_counter() - start}
    start = time.perf_counter()
    reply, _ = chat(model, tok, "我最近总是睡不好，怎么办？", settings=GenerationSettings(max_new_tokens=32, do_sample=False),
                    fast=False)
    out.update(chat_s=time.perf_counter() - start, reply_chars=len(reply))
    ids = torch.tensor([tok.encode("我最近总是睡不好，心里很乱。")], device=model.device)
    trained = logits(model, ids)
    with model.disable_adapter():
        base4 = logits(model, ids)
    merged4 = logits(model.merge_and_unload(), ids)
    del model
    free_memory()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    merged16 = logits(merged_16bit(native, args.adapter, dtype=dtype, device_map=device), ids.to(device))
    free_memory()
    peft16 = PeftModel.from_pretrained(load_model(native, dtype=dtype, device_map=device), args.adapter).eval()
    trained16 = logits(peft16, ids.to(device))
    with peft16.disable_adapter():
        base16 = logits(peft16, ids.to(device))
    effect4, effect16 = (trained - base4).flatten(), (trained16 - base16).flatten().to(trained.device)
    out.update(adapter_effect_4bit=effect4.norm().item(), adapter_effect_16bit=effect16.norm().item(),
               effect_cosine_4bit_vs_16bit=torch.nn.functional.cosine_similarity(effect4, effect16, dim=0).item(),
               merge_error_4bit=((merged4 - trained).norm() / effect4.norm().clamp_min(1e-12)).item(),
               merge_error_16bit=((merged16 - trained16).norm() / effect16.norm().clamp_min(1e-12)).item())
    print(f"QLoRA check on {out['card']}: chat from the 4-bit base + adapter {out['chat_s']:.1f} s "
          f"({out['reply_chars']} characters). The adapter changes the logits by {out['adapter_effect_4bit']:.4g} on "
          f"the 4-bit base, {out['adapter_effect_16bit']:.4g} on the 16-bit one (cosine "
          f"{out['effect_cosine_4bit_vs_16bit']:.3f}). Merged into the 4-bit weights, the model is off from the "
          f"trained one by {out['merge_error_4bit']:.0%} of that change; merged into a 16-bit copy, by "
          f"{out['merge_error_16bit']:.0%}")
    return out


# ---------------------------------------------------------------------------------------------- (e) first reply
def chat_stage(args: argparse.Namespace) -> dict:
    """Load the model (not timed into the reply), then time the first and second reply of ``chat`` in this fresh
    process. ``GLMLORA_WORKDIR`` decides where the compile cache lives (glmlora.fast.use_compile_cache). ``--lora``:
    chat through an unmerged random LoRA adapter on q/k/v (lesson 06's case) instead of the bare model. Run with an
    older glmlora first on PYTHONPATH, the same stage measures that version (the whole-model compile before
    glmlora.decode_step) on the same machine."""
    import torch

    import glmlora
    from glmlora import load_model, load_tokenizer
    from glmlora.generate import GenerationSettings, chat
    from glmlora.pipeline import ensure_native_model
    from glmlora.profiles import select_profile

    native = ensure_native_model(select_profile("tiny" if args.tiny else "full-random"))
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else None
    model, tok = load_model(native, device_map=device).eval(), load_tokenizer(native)
    if args.lora:
        from peft import get_peft_model

        from glmlora.lora import lora_config

        model = get_peft_model(model, lora_config()).eval()
        with torch.no_grad():  # a trained adapter's B is not zero: make the LoRA products count
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
    if torch.cuda.is_available():  # loading may still be copying weights: that belongs to the load, not the reply
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    settings = GenerationSettings(max_new_tokens=64, do_sample=False)
    times, profile = [], None
    for question in ("你好，我最近总是睡不好。", "工作压力很大，我该怎么办？"):
        if args.profile and not times:  # where the first reply's time goes, by Python function (GPU waits included)
            import cProfile

            profile = cProfile.Profile()
            profile.enable()
        start = time.perf_counter()
        chat(model, tok, question, settings=settings)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if profile is not None and len(times) == 1:
            profile.disable()
            import io
            import pstats

            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(45)
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
            print(text.getvalue())
    ms_per_token = decode_speed(model, tok, settings)
    try:
        from torch._dynamo.utils import compile_times

        phases = compile_times(repr="str", aggregate=True)
    except Exception as e:  # noqa: BLE001 - diagnostics only
        phases = f"{type(e).__name__}: {e}"
    out = {"label": args.label, "card": card_name(), "cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
           "glmlora": str(Path(glmlora.__file__).parent), "lora": args.lora, "ms_per_token": ms_per_token,
           "load_s": load_s, "first_reply_s": times[0], "second_reply_s": times[1], "compile_phases": phases}
    print(f"{args.label}: first reply {times[0]:.1f} s, second {times[1]:.2f} s, then {ms_per_token:.2f} ms per token "
          f"(model load {load_s:.1f} s, not counted) on {out['card']}; cache {out['cache']}; glmlora {out['glmlora']}")
    return out


def decode_speed(model: Any, tok: Any, settings: Any, new: int = 256) -> float:
    """Milliseconds per token of the fast loop once compiled: ``new`` greedy tokens with no stop id, timed."""
    import torch

    from glmlora.decoding import decode
    from glmlora.generate import FAST_CONTEXT, static_cache

    ids = torch.tensor([tok.build_conversation([{"role": "user", "content": "你好"}], add_generation_prompt=True)],
                       device=model.device)
    run = lambda: decode(model, static_cache(model, FAST_CONTEXT), ids, torch.ones_like(ids), max_new_tokens=new,  # noqa: E731
                         stop_ids=[], pad_id=tok.pad_token_id, compile=model.device.type == "cuda")
    run()  # the prompt length is new to this process: nothing may compile inside the timing
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / new


# ---------------------------------------------------------------------------------------------- table, main
def table(paths: list[Path]) -> str:
    rows = [json.loads(p.read_text()) for p in paths if p.is_file()]
    runs = [r for r in rows if "peak_allocated_gib" in r]
    parts = [train_table(runs)] if runs else []
    parts += [flex_table(r) for r in rows if "candidates" in r]
    parts += [f"{r['label']}: first reply {r['first_reply_s']:.1f} s, second {r['second_reply_s']:.2f} s"
              + (f", {r['ms_per_token']:.2f} ms per token" if r.get("ms_per_token") else "")
              for r in rows if "first_reply_s" in r]
    parts += ["\n".join(f"train_bench {v['variant']}: {v['real_tokens_per_s']:,.0f} real tokens/s, MFU "
                        f"{v['useful_mfu']:.1%} of the measured matmul rate / {v['spec_mfu']:.1%} of the spec peak, "
                        f"peak {v['peak_alloc_gib']:.2f} GiB, loss {v['loss_first']:.3f} -> {v['loss_last']:.3f}"
                        for v in r["results"]) for r in rows if "results" in r]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    flex = sub.add_parser("flex", help="(a) flex-attention kernel options: shared memory per card, speed")
    one = sub.add_parser("flex-one", help="internal: one candidate in a fresh process")
    one.add_argument("--name", required=True)
    one.add_argument("--options", required=True)
    for s in (flex, one):
        s.add_argument("--tokens", type=int, default=4096)
        s.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities to compile for")
    train = sub.add_parser("train", help="(b, c, d) one capped training run with the card's suggested settings")
    train.add_argument("--label", required=True)
    train.add_argument("--gpu-gib", type=float, default=0.0, help="the emulated card's reported GiB (0: no cap)")
    train.add_argument("--fp16", action="store_true", help="the fp16-only card path (GLMLORA_NO_BF16=1)")
    train.add_argument("--pack", type=int, help="override the suggested pack_tokens")
    train.add_argument("--ga", type=int, help="override the suggested gradient accumulation")
    train.add_argument("--every-n", type=int, help="checkpoint every n-th decoder layer only (default 1: all)")
    train.add_argument("--load-in-4bit", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
    train.add_argument("--kbit-prepare", choices=["glmlora", "peft"], default="glmlora")
    train.add_argument("--steps", type=int, default=12)
    train.add_argument("--data", type=Path)
    train.add_argument("--workdir", default="/tmp/issue13-runs")
    check = sub.add_parser("qlora-check", help="(c) chat from the 4-bit base + adapter; merging compared")
    check.add_argument("--adapter", required=True)
    chat_p = sub.add_parser("chat", help="(e) first reply in this fresh process")
    chat_p.add_argument("--label", default="first reply")
    chat_p.add_argument("--lora", action="store_true", help="chat through an unmerged random LoRA adapter")
    chat_p.add_argument("--profile", action="store_true", help="print a cProfile of the first reply")
    tab = sub.add_parser("table", help="one table from several JSON files")
    tab.add_argument("files", nargs="+", type=Path)
    for s in (flex, one, train, check, chat_p):
        s.add_argument("--json", type=Path)
        s.add_argument("--tiny", action="store_true", help="the tiny model on CPU: checks the plumbing only")
    args = p.parse_args(argv)
    if args.stage == "table":
        print(table(args.files))
        return 0
    stages = {"flex": flex_stage, "flex-one": flex_one, "train": train_stage, "qlora-check": qlora_check,
              "chat": chat_stage}
    result = stages[args.stage](args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
