"""LoRA training throughput: the original tutorial's recipe vs glmlora's defaults, in ONE run on one card.

    python benchmarks/train_bench.py --model /tmp/chatglm3-6b-random --data extra.jsonl --steps 12

``--model`` is an ORIGINAL-layout ChatGLM3 directory; a full-size random one is built there if it is missing
(``--size tiny`` builds the tiny model instead, for a CPU smoke run). Every variant trains the same LoRA
(r 8, alpha 32, dropout 0.1 on the attention q/k/v) for the same number of optimizer steps on the same
records, and the script prints one table: real (non-pad) tokens/s, samples/s, step time, peak memory,
MFU = 4 x parameters x real tokens/s over the bf16 matmul rate measured in this run ("useful MFU") and over the
card's specification peak, and the loss at the first and last step. The first ``glmlora.train.WARMUP_STEPS`` (3)
optimizer steps are left out of every speed, as in ``glmlora.train`` and ``multi_gpu_bench.py``.

When variant a is among the variants, every variant trains on the single-turn records only: the original
``process_func`` reads ``system`` / ``input`` / ``output`` and has no way to take a multi-turn dialogue.

Variants:
  a  the original recipe as ``../shared/seed/`` writes it: its ``process_func`` (its system sentence, role markers as
     text, the record's system glued to the input, instruction and reply truncated separately, eos appended, every
     sample padded to 512, labels masked by comparing with the pad id), NO attention mask passed, fp16 weights, no
     AMP flags, bs 4 x GA 2, gradient checkpointing, lr 1e-4 — run on the converted native model (the original's
     remote code does not load on transformers 5), with ``enable_input_require_grads`` (which its prose asks for)
  b  first step: bf16, packed rows of 4,096 tokens (bs 1 x GA 1), all Liger kernels, SDPA, eager, lr 2e-4
  c  diagnostic: bf16 with AMP, dynamic padding, bs 4 x GA 2 (the "naive" run that was slower than (a))
  d  (b) with every decoder layer torch.compile'd (Liger only for the loss head)
  e  glmlora's defaults = (d) with flex attention: glmlora.fast.training_attention() + speed_up()
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, default_data_collator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glmlora import load_model, load_tokenizer  # noqa: E402
from glmlora.chatglm3 import count_parameters, ensure_native  # noqa: E402
from glmlora.data import load_records, sample_data_path  # noqa: E402
from glmlora.fast import apply_liger, compile_layers, speed_up, training_attention  # noqa: E402
from glmlora.formatting import tokenize_records  # noqa: E402
from glmlora.lora import lora_config  # noqa: E402
from glmlora.packing import PackedDataset  # noqa: E402
from glmlora.tiny import build_full_random, build_tiny  # noqa: E402
from glmlora.train import WARMUP_STEPS  # noqa: E402
from glmlora.training import add_lora, collator, training_arguments  # noqa: E402

#: The system sentence of the original tutorial's process_func (../shared/seed/000_*.txt).
ORIGINAL_SYSTEM = ("Now you are a psychological expert, I have some psychological problems, please help me solve "
                   "them with your professional knowledge.")
#: Dense bf16 (= fp16) tensor-core peak by the vendors' specifications, TFLOP/s, for "MFU vs spec".
SPEC_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "A100": 312.0, "RTX 4090": 165.2, "RTX 3090": 71.0, "A10G": 70.0, "L4": 121.0}


def spec_tflops(card: str) -> float:
    """The card's specification peak (dense bf16), or NaN for a card not in :data:`SPEC_TFLOPS`."""
    return next((v for k, v in SPEC_TFLOPS.items() if k in card), float("nan"))


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """bf16 matrix-product rate of this card (random data), the MFU denominator."""
    if not torch.cuda.is_available():
        return float("nan")
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def original_process_func(example: dict, tokenizer, MAX_LENGTH: int = 512) -> dict:  # noqa: N803 - as in the original
    """The original tutorial's ``process_func``, line for line (only ``tokenizer`` became an argument)."""
    input_ids, labels = [], []
    instruction = tokenizer.encode(text="\n".join(["<|system|>", ORIGINAL_SYSTEM, "<|user|>",
                                                   example["system"] + example["input"] + "<|assistant|>"]).strip()
                                   + "\n", add_special_tokens=True, truncation=True, max_length=MAX_LENGTH)
    response = tokenizer.encode(text=example["output"], add_special_tokens=False, truncation=True,
                                max_length=MAX_LENGTH)
    input_ids = instruction + response + [tokenizer.eos_token_id]
    labels = [tokenizer.pad_token_id] * len(instruction) + response + [tokenizer.eos_token_id]
    pad_len = MAX_LENGTH - len(input_ids)
    input_ids += [tokenizer.pad_token_id] * pad_len
    labels += [tokenizer.pad_token_id] * pad_len
    labels = [(l if l != tokenizer.pad_token_id else -100) for l in labels]  # noqa: E741
    return {"input_ids": input_ids, "labels": labels}


def original_dataset(records: list, tokenizer):
    """The original's features for the single-turn records. A sample longer than 512 (instruction and reply are
    truncated separately, so up to 1,025 tokens) cannot be batched by the original's collator (``padding=False``):
    such samples are counted and left out, with a printed line."""
    from datasets import Dataset

    feats = [original_process_func({"system": r.get("system", ""), **r}, tokenizer) for r in records]
    fitting = [f for f in feats if len(f["input_ids"]) == 512]
    if len(fitting) < len(feats):
        print(f"(a) {len(feats) - len(fitting)} of {len(feats)} samples are longer than 512 tokens: the original's "
              f"collator (padding=False) cannot batch them, so they are left out", flush=True)
    return Dataset.from_list(fitting)


class Meter(TrainerCallback):
    """Wall time at the end of every optimizer step (synchronised), and the real tokens fed in order."""

    def __init__(self) -> None:
        self.step_end: list[float] = []
        self.batch_tokens: list[int] = []
        self.batch_samples: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_end.append(time.perf_counter())

    def wrap(self, collate, samples_of):
        def counted(features):
            batch = collate(features)
            self.batch_tokens.append(int((batch["input_ids"] != 0).sum()))
            self.batch_samples.append(samples_of(batch))
            return batch
        return counted


def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def run_variant(name: str, native: Path, records: list, args: argparse.Namespace, peak_tflops: float,
                n_params: int) -> dict:
    tok = load_tokenizer(native)
    out = Path(args.work) / f"run-{name}"
    common = dict(max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no", disable_tqdm=True,
                  warmup_steps=0, seed=0, dataloader_num_workers=0)
    meter = Meter()
    if name == "a":  # the original's loading, LoRA, collator and TrainingArguments
        model = load_model(native, dtype=torch.float16, device_map=args.device)
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
        ds = original_dataset(records, tok)
        targs = training_arguments(out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                   learning_rate=1e-4, bf16=False, fp16=False, lr_scheduler_type="linear",
                                   train_sampling_strategy="random", **common)
        collate = meter.wrap(DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100,
                                                    pad_to_multiple_of=None, padding=False),
                             lambda b: b["input_ids"].shape[0])
        per_step = 2
    elif name in ("b", "d", "e"):
        attn = training_attention() if name == "e" else "sdpa"
        model = add_lora(load_model(native, dtype=torch.bfloat16, device_map=args.device,
                                    attn_implementation=attn), lora_config())
        if name == "e":
            liger = bool(speed_up(model))
        else:
            liger = apply_liger(model, layers=name == "b")
            if name == "d":
                compile_layers(model)
        feats, _ = tokenize_records(records, tok, max_length=1024)
        ds = PackedDataset(feats, args.pack_tokens, seed=0)
        targs = training_arguments(out, **common)
        collate = meter.wrap(default_data_collator,
                             lambda b: int((b["position_ids"][:, 1:] == 0).sum() + b["position_ids"].shape[0]))
        per_step = targs.gradient_accumulation_steps
        print(f"({name}) Liger kernels: {'on' if liger else 'off'}; {ds}", flush=True)
    else:
        model = add_lora(load_model(native, dtype=torch.bfloat16, device_map=args.device), lora_config())
        ds, _ = tokenize_records(records, tok, max_length=1024)
        targs = training_arguments(out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                   train_sampling_strategy="random", **common)
        collate = meter.wrap(collator(tok, pad_to_multiple_of=None), lambda b: b["input_ids"].shape[0])
        per_step = 2
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=collate, processing_class=tok,
                      callbacks=[meter])
    trainer.train()
    first = args.warmup * per_step
    tokens = sum(meter.batch_tokens[first:first + args.steps * per_step])
    samples = sum(meter.batch_samples[first:first + args.steps * per_step])
    seconds = meter.step_end[-1] - meter.step_end[args.warmup - 1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    gib = 1024 ** 3
    result = {
        "variant": name, "steps": args.steps, "real_tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds, "step_s": seconds / args.steps,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / gib if torch.cuda.is_available() else float("nan"),
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib if torch.cuda.is_available() else float("nan"),
        "useful_mfu": 4 * n_params * tokens / seconds / (peak_tflops * 1e12),
        "spec_mfu": 4 * n_params * tokens / seconds / (spec_tflops(card_name()) * 1e12),
        "loss_first": losses[0], "loss_last": losses[-1], "tokens_per_step": tokens / args.steps,
    }
    del trainer, model, ds
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="original-layout model dir (built if missing)")
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--data", type=Path, nargs="*", default=[], help="extra JSONL record files (real lengths)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="optimizer steps left out of the speed "
                   "(default: glmlora.train's WARMUP_STEPS, the same rule everywhere)")
    p.add_argument("--pack-tokens", type=int, default=4096)
    p.add_argument("--variants", default="a,e")
    p.add_argument("--work", default="/tmp/glmlora-bench")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    (build_full_random(args.model, device=device) if args.size == "full" else build_tiny(args.model))
    native = ensure_native(args.model)
    print(f"model ready in {time.perf_counter() - start:.0f} s: {native}", flush=True)
    records = load_records(sample_data_path())
    for extra in args.data:
        records += load_records(extra)
    if "a" in args.variants.split(","):
        singles = [r for r in records if "messages" not in r]
        print(f"variant a reads system/input/output: all variants train on the {len(singles)} single-turn records "
              f"(of {len(records)})", flush=True)
        records = singles
    random.Random(0).shuffle(records)
    peak = matmul_tflops()
    n_params = count_parameters(native)
    card = card_name()
    print(f"{card}; torch {torch.__version__}; {len(records)} records; {n_params:,} parameters; "
          f"bf16 matmul {peak:.0f} TFLOP/s measured, {spec_tflops(card):.0f} by specification", flush=True)
    results = []
    for name in args.variants.split(","):
        results.append(run_variant(name, native, records, args, peak, n_params))
        print(json.dumps(results[-1]), flush=True)
    head = ("variant", "real tok/s", "samples/s", "step s", "tok/step", "peak alloc GiB", "peak reserved GiB",
            "MFU (measured matmul)", "MFU (spec peak)", "loss first", "loss last")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in results:
        print(f"| {r['variant']} | {r['real_tokens_per_s']:,.0f} | {r['samples_per_s']:.1f} | {r['step_s']:.3f} | "
              f"{r['tokens_per_step']:,.0f} | {r['peak_alloc_gib']:.2f} | {r['peak_reserved_gib']:.2f} | "
              f"{r['useful_mfu']:.1%} | {r['spec_mfu']:.1%} | {r['loss_first']:.3f} | {r['loss_last']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "torch": torch.__version__, "peak_tflops": peak,
                                         "spec_tflops": spec_tflops(card), "warmup_steps": args.warmup,
                                         "params": n_params, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
