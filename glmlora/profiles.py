"""Which model a run uses, where its files live, and the banner that says so (every lesson).

``GLMLORA_PROFILE`` = ``auto`` (default) | ``tiny`` | ``full`` | ``full-random``:

* ``full`` — the real ChatGLM3-6B from ModelScope (``auto`` picks it on a CUDA GPU with >= 16 GB);
* ``tiny`` — a 0.9 M-parameter ChatGLM3 built on the fly, so every lesson runs on any CPU in seconds;
* ``full-random`` — the real 6B shapes with random weights, for GPU memory/speed work without a download.

``GLMLORA_WORKDIR`` (default ``<repo>/work``) holds everything the lessons share; ``GLMLORA_MODEL_CACHE``
(default ``<workdir>/models``) is where the 12.5 GB download goes — on AutoDL point it at ``/root/autodl-tmp``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PROFILE_ENV, WORKDIR_ENV, CACHE_ENV = "GLMLORA_PROFILE", "GLMLORA_WORKDIR", "GLMLORA_MODEL_CACHE"
MODEL_ID = "ZhipuAI/chatglm3-6b"
MIN_GPU_GIB = 16
PROFILES = ("tiny", "full", "full-random")


def repo_root() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    return here if (here / "notebooks").is_dir() else None


def workdir() -> Path:
    env = os.environ.get(WORKDIR_ENV)
    path = Path(env) if env else (repo_root() or Path.cwd()) / "work"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_cache() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else workdir() / "models"


def gpu_memory_gib() -> float:
    if not torch.cuda.is_available():
        return 0.0
    return torch.cuda.get_device_properties(0).total_memory / 1024 ** 3


@dataclass
class Profile:
    name: str
    reason: str
    max_length: int
    pack_tokens: int
    train_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def workdir(self) -> Path:
        return workdir()

    @property
    def model_dir(self) -> Path:
        """The ORIGINAL-layout model directory (what ModelScope downloads, or what tiny.py builds)."""
        if self.name == "full":
            return model_cache() / MODEL_ID
        return model_cache() / ("tiny-chatglm3" if self.name == "tiny" else "chatglm3-6b-random")

    @property
    def data_dir(self) -> Path:
        return workdir() / "data"

    @property
    def run_dir(self) -> Path:
        """Trainer output: checkpoints, logs, the loss curve."""
        return workdir() / "runs" / self.name

    @property
    def adapter_dir(self) -> Path:
        """The final LoRA adapter of lesson 05."""
        return workdir() / "adapters" / self.name

    @property
    def is_tiny(self) -> bool:
        return self.name == "tiny"

    def banner(self) -> str:
        if self.is_tiny:
            return (f"TINY MODEL PROFILE — {self.reason}. Every step is real, but the model is a 0.9 M-parameter "
                    f"ChatGLM3 with random weights: its answers are gibberish until it memorises training data. "
                    f"On a GPU with >= {MIN_GPU_GIB} GiB the real ChatGLM3-6B is used; on a 9-16 GiB card set "
                    f"{PROFILE_ENV}=full (lesson 01 suggests the settings, QLoRA below 14 GiB).")
        if self.name == "full-random":
            return (f"FULL-SIZE RANDOM PROFILE — {self.reason}. Real ChatGLM3-6B shapes, random weights: "
                    f"for measuring memory and speed only.")
        return f"FULL PROFILE — ChatGLM3-6B ({MODEL_ID}); {self.reason}."


# Small, fast settings so the tiny model visibly learns on a CPU within a minute.
TINY_TRAINING = dict(learning_rate=3e-3, num_train_epochs=4, logging_steps=10, warmup_steps=0.05)


def select_profile(name: str | None = None) -> Profile:
    """The profile named (or in ``GLMLORA_PROFILE``); ``auto`` looks at the GPU."""
    choice = (name or os.environ.get(PROFILE_ENV) or "auto").strip().lower()
    if choice not in ("auto", *PROFILES):
        raise ValueError(f"{PROFILE_ENV}={choice!r} is not one of auto, {', '.join(PROFILES)}")
    gib = gpu_memory_gib()
    if choice == "auto":
        if gib >= MIN_GPU_GIB:
            choice, reason = "full", f"auto: CUDA GPU with {gib:.0f} GB found"
        elif gib:
            choice, reason = "tiny", f"auto: the GPU has only {gib:.0f} GB (< {MIN_GPU_GIB})"
        else:
            choice, reason = "tiny", "auto: no CUDA GPU found"
    else:
        reason = f"chosen by {PROFILE_ENV}={choice}" if not name else f"chosen in the notebook: {choice}"
    if choice == "tiny":
        one_cpu_thread()
        return Profile("tiny", reason, max_length=512, pack_tokens=1024, train_overrides=dict(TINY_TRAINING))
    return Profile(choice, reason, max_length=1024, pack_tokens=4096)


def one_cpu_thread() -> None:
    """Run the tiny model's CPU math on one thread (unless ``OMP_NUM_THREADS`` says otherwise).

    Its matrices are so small that threads only add synchronisation: on a busy 2-core machine lesson 06's
    memorising step took over 300 s with torch's default threads and under 10 s with one."""
    if not os.environ.get("OMP_NUM_THREADS") and not torch.cuda.is_available():
        torch.set_num_threads(1)


def show_banner(profile: Profile) -> None:
    """A coloured box in a notebook, a framed line in a terminal."""
    text = profile.banner()
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display

        if get_ipython() is not None:
            color = "#fff3cd" if profile.name != "full" else "#d1e7dd"
            display(HTML(f'<div style="background:{color};border:2px solid #999;padding:8px;'
                         f'font-weight:bold">{text}</div>'))
            return
    except ImportError:
        pass
    line = "=" * min(len(text), 100)
    print(f"{line}\n{text}\n{line}")
