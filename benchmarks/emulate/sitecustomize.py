"""Emulate a smaller card's memory in notebook kernels on the GPU machine (benchmarks only, never imported by glmlora).

With ``GLMLORA_CAP_GIB`` set (e.g. 23.2 for an RTX 3090: 23.7 GiB reported minus ~0.5 GiB of CUDA context), every
Jupyter kernel started with this folder on ``PYTHONPATH`` caps torch's allocator at that many GiB through
``torch.cuda.set_per_process_memory_fraction``, so a notebook that would not fit the card fails with
``CUDA out of memory`` as it would there. Only kernel processes are capped: the pytest/nbval process that drives them
must not create a CUDA context of its own (it would distort nvidia-smi's figure).
"""

import os
import sys

_cap = os.environ.get("GLMLORA_CAP_GIB")
if _cap and any("ipykernel_launcher" in a for a in sys.argv):
    import torch

    if torch.cuda.is_available():
        _total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(float(_cap) * 1024 ** 3 / _total)
        print(f"[emulated card] torch allocator capped at {float(_cap):.1f} GiB of "
              f"{_total / 1024 ** 3:.1f}", file=sys.stderr)
