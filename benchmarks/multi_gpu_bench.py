"""Scaling of lesson 05's training over GPUs: 1 GPU vs DDP vs FSDP, through the shipped launch path.

    python benchmarks/multi_gpu_bench.py --gpus 2 --steps 40 --data records.jsonl --json out.json
    python benchmarks/multi_gpu_bench.py --cpu          # the plumbing only: tiny model, 1 vs 2 CPU processes

Every run is `glmlora.train` with the same YAML except the launcher: `python -m` on one GPU, then
`accelerate launch --config_file configs/accelerate_ddp.yaml` and `configs/accelerate_fsdp.yaml` with N processes.
Each optimizer step sees the same rows in every run (``--rows``, by default the largest N: the one-GPU run
accumulates that many micro-batches, N cards take rows/N each), so the losses after the same steps are
comparable. Speed is the `SUMMARY train:` line's "after warm-up" figure (the first `glmlora.train.WARMUP_STEPS` = 3
optimizer steps, evaluation and saving left out, the rule every benchmark here uses); it counts packed-row
CAPACITY — rows x pack_tokens per step, the padding at the end of each row included (packing fills rows to ~99 %,
so real tokens/s is about 1 % lower) — not real tokens as `train_bench.py` does. Peak memory is the largest rank's
`torch.cuda.max_memory_allocated`. Profile: full-random (GLMLORA_MODEL_CACHE decides where it is built).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glmlora.train import parse_summary  # noqa: E402


def write_config(path: Path, profile: str, data: Path | None, steps: int, accumulate: int,
                 speed_ups: bool | None) -> Path:
    config = {"profile": profile, "output_dir": str(path / "run"), "adapter_dir": str(path / "adapter"),
              "resume": "never", "speed_ups": speed_ups,
              "training": {"max_steps": steps, "gradient_accumulation_steps": accumulate, "logging_steps": 5,
                           "eval_strategy": "no", "save_strategy": "no", "disable_tqdm": True}}
    if data:
        config["data"] = str(data)
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path / "train.yaml"


def command(kind: str, n: int, config: Path, cpu: bool, port: int, launcher_args: list[str],
            fsdp_config: Path | None = None) -> list[str]:
    train = ["-m", "glmlora.train", "--config", str(config)]
    if n == 1:
        return [sys.executable, *train]
    if cpu:  # DDP over gloo; accelerate's CPU multi-process mode wants MPI or oneCCL
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *train]
    accelerate_file = (fsdp_config if kind == "fsdp" and fsdp_config else ROOT / "configs" / f"accelerate_{kind}.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_file),
            "--num_processes", str(n), "--main_process_port", str(port), *launcher_args, *train]


def run_one(name: str, kind: str, n: int, args: argparse.Namespace, speed_ups: bool | None,
            port: int, launcher_args: str = "") -> dict:
    folder = args.workdir / name.replace(" ", "_").replace("=", "-")
    shutil.rmtree(folder, ignore_errors=True)
    config = write_config(folder, args.profile, args.data, args.steps, args.rows // n, speed_ups)
    cmd = command(kind, n, config, args.cpu, port, launcher_args.replace(",", " ").split(), args.fsdp_config)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.cpu:
        env["OMP_NUM_THREADS"] = "1"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(args.devices[:n])
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    (folder / "log.txt").write_text(log)
    row = {"name": name, "kind": kind, "gpus": n, "speed_ups": speed_ups, "rc": done.returncode,
           "wall_s": time.perf_counter() - start}
    try:
        row.update(parse_summary(log))
        print([line for line in log.splitlines() if line.startswith("SUMMARY train:")][-1], flush=True)
    except ValueError:
        row["error"] = log[-2500:]
        print(f"FAILED (exit {done.returncode}); end of its output:\n{row['error']}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["gpus"] == 1 and "tokens_per_second" in r), None)
    lines = ["| run | GPUs | row tokens/s after warm-up (capacity, padding included) | speed-up | efficiency | "
             "peak GiB (largest card) | "
             "peak vs 1 GPU | loss first -> last | last loss vs 1 GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_second" not in r:
            lines.append(f"| {r['name']} | {r['gpus']} | failed (exit {r['rc']}) | | | | | | |")
            continue
        s = r["tokens_per_second"] / base["tokens_per_second"] if base else float("nan")
        mem = r["peak_gib"] / base["peak_gib"] if base else float("nan")
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if r["last_loss"] is not None else "-"
        dloss = (f"{(r['last_loss'] - base['last_loss']) / base['last_loss']:+.2%}"
                 if base and r["last_loss"] is not None else "-")
        lines.append(f"| {r['name']} | {r['gpus']} | {r['tokens_per_second']:,.0f} | {s:.2f}x | {s / r['gpus']:.0%} "
                     f"| {r['peak_gib']:.2f} | {mem:.0%} | {loss} | {dloss} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="2", help="comma-separated process counts besides 1, e.g. 2 or 2,4")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of every run")
    p.add_argument("--rows", type=int, help="rows per optimizer step in every run (default: the largest --gpus); "
                   "e.g. --gpus 2 --rows 4 makes its runs comparable with a --gpus 4 run's")
    p.add_argument("--data", type=Path, help="JSONL records to train on (default: the bundled data)")
    p.add_argument("--kinds", default="ddp,fsdp", help="which of ddp, fsdp to run with several processes")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("GLMLORA_WORKDIR", "work")) / "scaling")
    p.add_argument("--fsdp-args", action="append", help="extra accelerate launch options of one FSDP run; "
                   "repeat for several runs, e.g. --fsdp-args= --fsdp-args=--fsdp_backward_prefetch=BACKWARD_POST "
                   "(default: one run with the config file as shipped); commas separate options within one run")
    p.add_argument("--fsdp-config", type=Path, help="accelerate config for the FSDP runs (default: "
                   "configs/accelerate_fsdp.yaml), e.g. benchmarks/configs/accelerate_fsdp2_candidate.yaml")
    p.add_argument("--skip-single", action="store_true", help="no 1-GPU run (ratios then stay empty)")
    p.add_argument("--cpu", action="store_true", help="tiny model, CPU processes (tests the plumbing only)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    counts = [int(x) for x in args.gpus.split(",")]
    args.max_gpus = max(counts)
    args.rows = args.rows or args.max_gpus
    if any(args.rows % n for n in counts):
        p.error(f"--rows {args.rows} is not a multiple of every process count in --gpus {args.gpus}")
    # the first N of the GPUs this process may use (CUDA_VISIBLE_DEVICES=2,3 leaves 0 and 1 to other work)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    args.devices = visible.split(",") if visible else [str(i) for i in range(args.max_gpus)]
    if not args.cpu and len(args.devices) < args.max_gpus:
        p.error(f"--gpus asks for {args.max_gpus} GPUs but CUDA_VISIBLE_DEVICES={visible} names {len(args.devices)}")
    args.profile = "tiny" if args.cpu else "full-random"
    kinds = ["ddp"] if args.cpu else args.kinds.split(",")
    rows: list[dict] = []

    def record(row: dict) -> None:  # after every run, so that a run cut short still leaves the others
        rows.append(row)
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "table": table(rows), "steps": args.steps,
                                             "rows_per_step": args.rows}, indent=2))

    if not args.skip_single:
        record(run_one("1 GPU" if not args.cpu else "1 process", "ddp", 1, args, None, 29500))
    port = 29510
    for n in counts:
        for kind in kinds:
            for extra in (args.fsdp_args or [""]) if kind == "fsdp" else [""]:
                port += 1
                name = f"{kind.upper()} x{n}" + (f" {extra}" if extra else "")
                record(run_one(name, kind, n, args, None, port, extra))
                if "tokens_per_second" not in rows[-1] and not args.cpu:  # were glmlora's speed-ups the cause?
                    port += 1
                    record(run_one(f"{name}, speed_ups false", kind, n, args, False, port, extra))
    print("\n" + table(rows))
    return 0 if all("tokens_per_second" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
