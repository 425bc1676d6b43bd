"""Peak host memory of the one-time conversion, relative to the largest input shard.

    python benchmarks/convert_memory.py [--format bin|safetensors] [--layers 8]

Builds a ChatGLM3-layout checkpoint of a few hundred MB in several shards, converts it in a fresh process and
reports that process's peak resident memory above a baseline process that imports the same libraries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glmlora.chatglm3 import read_shard, weight_files  # noqa: E402
from glmlora.tiny import ModelSpec, build_chatglm3  # noqa: E402

# Samples the resident set every 2 ms (ru_maxrss would also count the forked parent's memory).
PROBE = """
import os, sys, threading, time
from glmlora.chatglm3 import convert_checkpoint
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
before, peak, done = rss(), [0], False
def watch():
    while not done:
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
t = threading.Thread(target=watch); t.start()
convert_checkpoint(sys.argv[1], sys.argv[2], progress=False)
done = True; t.join()
print(before, peak[0])
"""


def peak_rss(*args: str) -> tuple[int, int]:
    """(resident bytes before converting, peak resident bytes while converting) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PROBE, *args], check=True, capture_output=True, text=True,
                         cwd=ROOT)
    before, peak = out.stdout.strip().splitlines()[-1].split()
    return int(before), int(peak)


def to_bin(src: Path, dst: Path) -> Path:
    import torch

    dst.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (dst / name).write_bytes((src / name).read_bytes())
    weight_map = {}
    files = weight_files(src)
    for i, f in enumerate(files):
        shard = f"pytorch_model-{i + 1:05d}-of-{len(files):05d}.bin"
        tensors = read_shard(f)
        torch.save(tensors, dst / shard)
        weight_map.update({k: shard for k in tensors})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--shards", type=int, default=4)
    args = p.parse_args()
    spec = ModelSpec(hidden_size=2048, num_layers=args.layers, num_attention_heads=16, kv_channels=128,
                     multi_query_group_num=2, ffn_hidden_size=5504, shards=args.shards)
    with tempfile.TemporaryDirectory() as tmp:
        src = build_chatglm3(Path(tmp) / "orig", spec)
        if args.format == "bin":
            src = to_bin(src, Path(tmp) / "orig-bin")
        shards = [f.stat().st_size for f in weight_files(src)]
        base, peak = peak_rss(str(src), str(Path(tmp) / "native"))
    mib = 1024 ** 2
    print(f"{args.format}: {len(shards)} shards, total {sum(shards) / mib:.0f} MiB, largest {max(shards) / mib:.0f} MiB")
    print(f"peak resident memory above the process before converting: {(peak - base) / mib:.0f} MiB "
          f"= {(peak - base) / max(shards):.2f} x the largest shard ({sum(shards) / max(shards):.1f} x would be "
          f"the whole model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
