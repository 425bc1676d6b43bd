"""Lesson 01: what machine is this, are the packages recent enough, and what training settings fit it.

Most failures reported against the original tutorial were environment failures (a transformers upgrade
breaking remote code, an fp16-only GPU, a 24 GB card running out of memory at long lengths), so the course
checks the environment first and says *exactly* what to install instead of failing halfway through lesson 05.
Versions are read with ``importlib.metadata`` (no package is imported just to learn its version) and
compared with ``packaging.version``, the same rules pip uses.
"""

from __future__ import annotations

import html
import importlib.metadata as metadata
import math
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from packaging.version import InvalidVersion, Version

#: Profiles (see ``glmlora.profiles``) that download the real model and so need modelscope.
DOWNLOAD_PROFILES = ("full",)


@dataclass(frozen=True)
class Requirement:
    """One package the course uses: its pip name, the oldest version that works, and who needs it.

    ``needed_by`` = ``"all"`` (every profile), a tuple of profile names, or ``()`` (nice to have).
    ``below`` is an exclusive upper bound, for a major version the course has not been tested on.
    """

    name: str
    minimum: str
    needed_by: str | tuple[str, ...] = "all"
    why: str = ""
    below: str | None = None

    def needed_for(self, profile: str) -> bool:
        return self.needed_by == "all" or profile in self.needed_by

    @property
    def spec(self) -> str:
        """The pip requirement string, e.g. ``transformers>=5.17,<6``."""
        return f"{self.name}>={self.minimum}" + (f",<{self.below}" if self.below else "")


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("torch", "2.4", why="tensors, autograd, SDPA attention"),
    Requirement("transformers", "5.17", why="native GlmForCausalLM, Trainer", below="6"),
    Requirement("peft", "0.18", why="LoRA adapters"),
    Requirement("accelerate", "1.10", why="needed by Trainer and device_map"),
    Requirement("datasets", "4", why="tokenised training sets"),
    Requirement("sentencepiece", "0.2", why="the ChatGLM3 tokenizer"),
    Requirement("safetensors", "0.6", why="converted weights"),
    Requirement("modelscope", "1.20", needed_by=DOWNLOAD_PROFILES, why="downloads ChatGLM3-6B (full profile)"),
    Requirement("ipywidgets", "8.1", why="the chat box of lesson 06"),
    Requirement("matplotlib", "3.9", why="loss curves, histograms"),
    Requirement("jieba", "0.42", why="Chinese word segmentation for evaluation"),
    Requirement("bitsandbytes", "0.45", needed_by=(), why="QLoRA: the base model in 4 bits (CUDA GPUs only)"),
)


@dataclass(frozen=True)
class PackageStatus:
    """The verdict for one :class:`Requirement` on this machine."""

    requirement: Requirement
    installed: str | None
    status: str  # "ok" | "missing" | "too old" | "too new" | "optional" (missing, not needed) | "unknown"
    required: bool

    @property
    def name(self) -> str:
        return self.requirement.name

    @property
    def blocking(self) -> bool:
        """True when this package stops the course from running on the chosen profile."""
        return self.required and self.status in ("missing", "too old", "too new")

    @property
    def fix(self) -> str:
        """The pip command that fixes this package (quoted, so ``>`` is not a shell redirect)."""
        return f'pip install -U "{self.requirement.spec}"'


def installed_version(name: str) -> str | None:
    """The installed distribution's version, or None — without importing the package."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_status(req: Requirement, profile: str = "tiny") -> PackageStatus:
    """Compare what is installed with ``req`` (pip's version rules: ``2.13.0+cpu`` >= ``2.4``)."""
    required = req.needed_for(profile)
    got = installed_version(req.name)
    if got is None:
        return PackageStatus(req, None, "missing" if required else "optional", required)
    try:
        version = Version(got)
    except InvalidVersion:  # a home-made build; do not block on what we cannot read
        return PackageStatus(req, got, "unknown", required)
    if version < Version(req.minimum):
        status = "too old"
    elif req.below and version >= Version(req.below):
        status = "too new"
    else:
        status = "ok"
    return PackageStatus(req, got, status, required)


def package_report(profile: str = "tiny") -> list[PackageStatus]:
    """Every course package with its verdict for ``profile``."""
    return [package_status(r, profile) for r in REQUIREMENTS]


@dataclass(frozen=True)
class MachineInfo:
    """The facts that decide the profile and the training settings."""

    gpu_name: str | None
    gpu_memory_gib: float
    compute_capability: str | None
    bf16: bool
    cpu_count: int
    python: str
    torch_cuda: str | None = None

    def rows(self) -> list[tuple[str, str]]:
        gpu = self.gpu_name or "none (CPU only)"
        return [("GPU", gpu),
                ("GPU memory", f"{self.gpu_memory_gib:.1f} GiB" if self.gpu_name else "-"),
                ("compute capability", self.compute_capability or "-"),
                ("bf16 supported", "yes" if self.bf16 else "no"),
                ("CUDA (torch build)", self.torch_cuda or "-"),
                ("CPU cores", str(self.cpu_count)),
                ("Python", self.python)]


def machine_info() -> MachineInfo:
    """GPU 0 (name, memory, compute capability, bf16), CPU cores and Python; works without torch."""
    cpus, py = os.cpu_count() or 1, platform.python_version()
    try:
        import torch
    except ImportError:
        return MachineInfo(None, 0.0, None, False, cpus, py)
    if not torch.cuda.is_available():
        return MachineInfo(None, 0.0, None, False, cpus, py, torch.version.cuda)
    props = torch.cuda.get_device_properties(0)
    return MachineInfo(props.name, props.total_memory / 1024 ** 3, f"{props.major}.{props.minor}",
                       bf16_supported(), cpus, py, torch.version.cuda)


#: Set to 1 to treat this GPU as one without bf16 (V100, T4, RTX 2080 Ti): fp16 weights, fp32 LoRA parameters and
#: fp16 AMP with loss scaling. How that path is tested on a GPU that has bf16 (benchmarks/issue13.py fp16).
NO_BF16_ENV = "GLMLORA_NO_BF16"


def bf16_supported() -> bool:
    """Whether training and chat use bf16 on this machine: a CUDA GPU with bf16, unless ``GLMLORA_NO_BF16=1``."""
    import torch

    if os.environ.get(NO_BF16_ENV, "").strip() not in ("", "0"):
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@dataclass
class EnvironmentReport:
    """Machine + packages for one profile; shows itself as a table in a notebook."""

    profile: str
    machine: MachineInfo
    packages: list[PackageStatus] = field(default_factory=list)

    @property
    def problems(self) -> list[PackageStatus]:
        return [p for p in self.packages if p.blocking]

    @property
    def ok(self) -> bool:
        return not self.problems

    def package_rows(self) -> list[tuple[str, str, str, str, str]]:
        """``(package, installed, needed, status, used for)`` per package."""
        return [(p.name, p.installed or "-", p.requirement.spec.removeprefix(p.name), _mark(p), p.requirement.why)
                for p in self.packages]

    def to_markdown(self) -> str:
        lines = ["| machine | |", "|---|---|", *(f"| {k} | {v} |" for k, v in self.machine.rows()), "",
                 f"| package | installed | needed | status (profile {self.profile}) | used for |",
                 "|---|---|---|---|---|", *("| " + " | ".join(r) + " |" for r in self.package_rows())]
        return "\n".join(lines)

    def to_html(self) -> str:
        def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
            th = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in head)
            body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in r)
                           + "</tr>" for r in rows)
            return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

        return (table(("machine", ""), self.machine.rows()) + "<br>"
                + table(("package", "installed", "needed", f"status (profile {self.profile})", "used for"),
                        self.package_rows()))

    def _repr_html_(self) -> str:
        return self.to_html()


def _mark(p: PackageStatus) -> str:
    """A status cell a learner can scan: red only for what blocks this profile."""
    if p.blocking:
        return f"❌ {p.status}"
    if p.status == "optional":
        return "➖ not installed (optional here)"
    if p.status == "unknown":
        return "⚠️ unreadable version"
    return "✅ ok" if p.status == "ok" else f"⚠️ {p.status} (optional here)"


def _resolve_profile(profile_name: str | None) -> str:
    """``tiny``/``full``/``full-random`` as given; ``auto`` or None asks :func:`glmlora.profiles.select_profile`."""
    from .profiles import select_profile

    return select_profile(profile_name).name


def environment_report(profile_name: str | None = None) -> EnvironmentReport:
    """The machine and every package's verdict for a profile (None: ``GLMLORA_PROFILE``, else auto)."""
    profile = _resolve_profile(profile_name)
    return EnvironmentReport(profile, machine_info(), package_report(profile))


class EnvironmentProblem(RuntimeError):
    """Packages are missing or too old; the message lists each one with the pip command that fixes it."""


def problem_message(report: EnvironmentReport) -> str:
    """Every blocking package, what is wrong, and one pip line that fixes all of them."""
    lines = [f"{len(report.problems)} package(s) must be installed or changed for the '{report.profile}' profile:"]
    for p in report.problems:
        have = f"{p.installed} is installed" if p.installed else "not installed"
        lines.append(f"  - {p.name}: {p.status} ({have}; need {p.requirement.spec})  ->  {p.fix}")
    specs = " ".join(f'"{p.requirement.spec}"' for p in report.problems)
    lines.append(f"Fix them all at once:  pip install -U {specs}")
    if any(p.name == "torch" for p in report.problems):
        lines.append("On a GPU machine install torch with CUDA (conda env create -f environment.yml, or the "
                     "command from pytorch.org), not the CPU wheel.")
    lines.append("Then restart the Jupyter kernel so the new versions are imported.")
    return "\n".join(lines)


def check_environment(profile_name: str | None = None) -> EnvironmentReport:
    """Raise :class:`EnvironmentProblem` if a package the profile needs is missing or too old.

    Failing here, with the fix spelled out, beats a confusing ImportError or AttributeError in lesson 05.
    """
    report = environment_report(profile_name)
    if not report.ok:
        raise EnvironmentProblem(problem_message(report))
    return report


#: Measured with the full-size 6B model under each card's memory (BENCHMARKS.md, "Settings per card", emulated on an
#: H100 / H200 by capping the process's memory): the bf16 weights take ~11.6 GiB; a LoRA step on packed rows of
#: 4,096 tokens with every decoder layer checkpointed peaks at 13.46 GiB allocated; the whole lesson-05 process
#: showed 15.2 GB in nvidia-smi (CUDA context, allocator cache and all) with those settings.
WEIGHTS_GIB = 11.6
MEASURED_PEAK_GIB, MEASURED_PACK_TOKENS, MEASURED_NVIDIA_SMI_GB = 13.46, 4096, 15.2
#: Activations (with gradient checkpointing) grow by this much per 1,024 tokens of packed row (measured: 12.62 GiB
#: at rows of 2,048 tokens).
GIB_PER_1024_TOKENS = 0.42
#: A decoder layer that keeps its activations instead of recomputing them (not checkpointed) holds this much more
#: per 1,024 tokens of row (measured: +5.83 GiB for 14 layers at 4,096 tokens, +2.94 GiB for 14 at 2,048).
KEPT_LAYER_GIB_PER_1024 = 0.104
DECODER_LAYERS = 28
#: What a card spends outside torch's allocator (CUDA context), and the margin a suggestion leaves below the rest.
CONTEXT_GIB, HEADROOM_GIB = 0.5, 1.0
#: Cards reporting at least this much (an RTX 3090 / 4090 "24 GB" shows 23.7 GiB) train on 4,096-token rows and
#: checkpoint every 2nd layer only: 19.3 GiB measured under a 23.2 GiB cap, 17 % more tokens/s than checkpointing all.
KEEP_HALF_GIB = 22
#: Cards reporting at least this much (a "20 GB" quarter A100 shows ~19.5 GiB) keep every 2nd layer's activations
#: on rows of 2,048 tokens x accumulation 2: 15.6 GiB measured under a 19.0 GiB cap, 9 % faster than 4,096 x 1
#: with every layer checkpointed (4,096-token rows with every 2nd layer kept ran out of memory there).
FULL_ROW_GIB = 18
#: Cards reporting at least this much hold the 16-bit weights with rows of 2,048 tokens (a "16 GB" T4 shows
#: 14.6 GiB, an RTX 4060 Ti 16 GB 15.6): 12.6 GiB measured; below, the base model is loaded in 4 bits (QLoRA).
HALF_ROW_GIB = 14
#: QLoRA's base: NF4 decoder layers (0.098 GiB each, measured on the device for a full-width layer) + the 16-bit
#: input embedding and output layer (0.5 GiB each) + norms. Cards reporting at least ``QLORA_MIN_GIB`` train with it
#: (an RTX 3080 "10 GB" shows 9.8 GiB); below, the suggestion is the tiny model.
QLORA_WEIGHTS_GIB = DECODER_LAYERS * 0.098 + 2 * 0.496
QLORA_MIN_GIB = 9


@dataclass(frozen=True)
class TrainingSuggestion:
    """Packed-row settings that fit a GPU's memory (lesson 05's ``PACK_TOKENS``, ``TRAINING`` and ``LOAD_IN_4BIT``).

    Training feeds one packed row of ``pack_tokens`` tokens per step (several examples, each cut to at most
    ``max_length`` tokens); shorter rows with more gradient accumulation keep the tokens per optimizer step
    (``tokens_per_step``) the same, so results stay comparable across cards. ``load_in_4bit``: QLoRA, the frozen
    base in 4-bit NF4 (``glmlora.load_model(..., load_in_4bit=True)``), for cards that cannot hold its 16-bit
    weights. Gradient checkpointing stays on for every card; ``checkpoint_every`` = n checkpoints every n-th decoder
    layer only (transformers' ``every_n_layers``): the others keep their activations, which spends memory the card
    has left on speed (no recomputation there).
    """

    profile: str
    pack_tokens: int
    gradient_accumulation_steps: int
    max_length: int
    reason: str
    precision: str = "bf16"
    load_in_4bit: bool = False
    gradient_checkpointing: bool = True
    checkpoint_every: int = 1

    @property
    def per_device_train_batch_size(self) -> int:
        """Always one packed row per device and step; memory is tuned with ``pack_tokens`` instead."""
        return 1

    @property
    def tokens_per_step(self) -> int:
        """Row tokens per optimizer step: ``pack_tokens`` x ``gradient_accumulation_steps``."""
        return self.pack_tokens * self.gradient_accumulation_steps

    @property
    def estimated_peak_gib(self) -> float | None:
        """Peak allocated GPU memory of a 6B training step from the measurements: 13.46 GiB at 4,096-token rows,
        0.42 GiB less per 1,024 tokens shorter, 0.104 GiB more per 1,024 tokens for each layer that keeps its
        activations; in 4 bits the weights take ``QLORA_WEIGHTS_GIB`` instead of 11.6. None for the tiny model."""
        if self.profile == "tiny":
            return None
        activations = MEASURED_PEAK_GIB - WEIGHTS_GIB - GIB_PER_1024_TOKENS * (MEASURED_PACK_TOKENS
                                                                                - self.pack_tokens) / 1024
        kept = DECODER_LAYERS - math.ceil(DECODER_LAYERS / self.checkpoint_every)
        activations += kept * KEPT_LAYER_GIB_PER_1024 * self.pack_tokens / 1024
        return round((QLORA_WEIGHTS_GIB if self.load_in_4bit else WEIGHTS_GIB) + activations, 2)

    def overrides(self) -> dict[str, Any]:
        """``TrainingArguments`` keywords for ``glmlora.training.training_arguments`` (lesson 05's ``TRAINING``).

        The row length is not a ``TrainingArguments`` field: pass :attr:`pack_tokens` as ``PACK_TOKENS`` and
        :attr:`load_in_4bit` as ``LOAD_IN_4BIT``.
        """
        return {"gradient_accumulation_steps": self.gradient_accumulation_steps,
                "gradient_checkpointing_kwargs": checkpointing_kwargs(self.checkpoint_every)}


def checkpointing_kwargs(every: int = 1) -> dict[str, Any]:
    """``TrainingArguments.gradient_checkpointing_kwargs``: non-reentrant checkpointing of every ``every``-th layer."""
    return {"use_reentrant": False, "every_n_layers": every}


def checkpoint_every_for(profile: str, chosen: int | None = None, pack_tokens: int | None = None,
                         load_in_4bit: bool = False) -> int:
    """Lesson 05's ``CHECKPOINT_EVERY``: ``chosen`` if set; else 2 when keeping every 2nd layer's activations
    leaves ``HEADROOM_GIB`` free on this GPU at ``pack_tokens`` (estimated from the measurements); else 1. Always
    1 for the tiny model and for a 4-bit base (not measured with QLoRA)."""
    if chosen is not None:
        return chosen
    gpu_gib = 0.0 if profile == "tiny" or load_in_4bit else machine_info().gpu_memory_gib
    return _checkpoint_every(gpu_gib, pack_tokens or MEASURED_PACK_TOKENS) if gpu_gib else 1


def _checkpoint_every(gpu_gib: float, pack_tokens: int) -> int:
    """2 if a 16-bit run with every 2nd layer kept is estimated to peak ``HEADROOM_GIB`` below what torch may use
    on a card reporting ``gpu_gib`` (less ``CONTEXT_GIB`` of CUDA context), else 1."""
    kept = TrainingSuggestion("full", pack_tokens, 1, 1024, "", checkpoint_every=2)
    return 2 if kept.estimated_peak_gib <= gpu_gib - CONTEXT_GIB - HEADROOM_GIB else 1


def _precision(bf16: bool, gpu_gib: float, load_in_4bit: bool) -> str:
    if not gpu_gib:
        return "fp32 (CPU)"
    if load_in_4bit:
        return f"4-bit NF4 base, {'bf16' if bf16 else 'fp16'} compute, fp32 LoRA" + ("" if bf16 else " (fp16 AMP)")
    return "bf16" if bf16 else "fp16 weights + fp32 LoRA (fp16 AMP)"


def suggest_training_config(gpu_gib: float | None = None, bf16: bool | None = None) -> TrainingSuggestion:
    """Precision, LoRA or QLoRA, packed-row length and accumulation for a card of ``gpu_gib`` (None: this GPU 0).

    Cards report a little less than their label (an RTX 3090 "24 GB" shows 23.7 GiB, a quarter A100 "20 GB"
    about 19.5, a T4 "16 GB" 14.6), so the thresholds sit below the labels:

    * >= 22 GiB (RTX 3090 / 4090): 16-bit weights, rows of 4,096 tokens, no accumulation, every 2nd decoder layer
      checkpointed — 19.3 GiB peak allocated, measured under a 23.2 GiB cap; 17 % more tokens/s than checkpointing
      every layer (13.5 GiB);
    * 18-22 GiB (a quarter A100): rows of 2,048 tokens x accumulation 2, every 2nd layer checkpointed — 15.6 GiB
      measured under a 19.0 GiB cap (4,096-token rows that way ran out of memory);
    * 14-18 GiB: rows of 2,048 tokens x accumulation 2 — the same tokens per optimizer step, 12.6 GiB measured;
    * 9-14 GiB: QLoRA — the base in 4-bit NF4 (about 3.7 GiB), rows of 2,048 x accumulation 2;
    * below ``QLORA_MIN_GIB`` (9), or no GPU: the tiny model (rows of 1,024 tokens, examples of at most 512).

    Cards without bf16 (V100, T4, RTX 20xx) train the same way with fp16 weights, fp32 LoRA parameters and fp16
    AMP with loss scaling.
    """
    if gpu_gib is None or bf16 is None:
        info = machine_info()
        gpu_gib = info.gpu_memory_gib if gpu_gib is None else gpu_gib
        bf16 = info.bf16 if bf16 is None else bf16
    if gpu_gib >= KEEP_HALF_GIB:
        return TrainingSuggestion(
            "full", 4096, 1, 1024,
            f"{gpu_gib:.1f} GiB: rows of 4,096 tokens with every 2nd layer checkpointed — measured peak 19.3 GiB "
            f"allocated under a 23.2 GiB cap, 17 % faster than checkpointing every layer (BENCHMARKS.md, emulated)",
            _precision(bf16, gpu_gib, False), checkpoint_every=_checkpoint_every(gpu_gib, 4096))
    if gpu_gib >= FULL_ROW_GIB:
        return TrainingSuggestion(
            "full", 2048, 2, 1024,
            f"{gpu_gib:.1f} GiB: rows of 2,048 x accumulation 2 with every 2nd layer checkpointed — measured peak "
            f"15.6 GiB allocated under a 19.0 GiB cap, 9 % faster than 4,096 x 1 with every layer checkpointed "
            f"(BENCHMARKS.md, emulated)", _precision(bf16, gpu_gib, False),
            checkpoint_every=_checkpoint_every(gpu_gib, 2048))
    if gpu_gib >= HALF_ROW_GIB:
        return TrainingSuggestion(
            "full", 2048, 2, 1024,
            f"{gpu_gib:.1f} GiB: rows of 2,048 x accumulation 2 train on the same tokens per step as 4,096 x 1 — "
            + ("measured peak 12.6 GiB allocated under a 15.1 GiB cap" if bf16 else
               "measured peak 12.7 GiB allocated under a 14.1 GiB cap on the fp16 path")
            + " (BENCHMARKS.md, emulated)", _precision(bf16, gpu_gib, False))
    if gpu_gib >= QLORA_MIN_GIB:
        return TrainingSuggestion(
            "full", 2048, 2, 1024,
            f"{gpu_gib:.1f} GiB cannot hold the 11.6 GiB of 16-bit weights: QLoRA loads the base in 4 bits "
            f"(~{QLORA_WEIGHTS_GIB:.1f} GiB) and trains LoRA on top; rows of 2,048 x accumulation 2 — measured peak "
            f"4.9 GiB allocated under a 9.3 GiB cap (BENCHMARKS.md, emulated"
            + (")" if bf16 else ", with bf16 compute; fp16 compute not measured)"),
            _precision(bf16, gpu_gib, True), load_in_4bit=True)
    why = f"{gpu_gib:.1f} GiB is too little for the 6B model, even in 4 bits" if gpu_gib else "no CUDA GPU"
    return TrainingSuggestion("tiny", 1024, 1, 512, f"{why}: learn with the tiny model",
                              _precision(bf16, gpu_gib, False))


__all__ = ["EnvironmentProblem", "EnvironmentReport", "MachineInfo", "PackageStatus", "REQUIREMENTS",
           "Requirement", "TrainingSuggestion", "bf16_supported", "check_environment", "environment_report",
           "checkpoint_every_for", "checkpointing_kwargs", "installed_version", "machine_info", "package_report", "package_status", "problem_message",
           "suggest_training_config"]
