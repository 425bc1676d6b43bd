"""Lesson 05's training from a YAML file, unchanged from one GPU to many (issue 7).

    python -m glmlora.train --config configs/train_default.yaml
    accelerate launch --config_file configs/accelerate_ddp.yaml -m glmlora.train --config configs/train_default.yaml
    torchrun --nproc_per_node 4 -m glmlora.train --config configs/train_default.yaml

This module starts no processes: ``accelerate launch`` or ``torchrun`` start one per GPU and set RANK,
WORLD_SIZE and friends; ``TrainingArguments`` reads them and ``Trainer`` wraps the model in DDP or FSDP
(the accelerate config says which). Every rank runs the same code; only rank 0 writes the adapter, the
tokenizer and the loss curve. The pieces are lesson 05's (``glmlora.pipeline``, ``training``, ``lora``,
``packing``, ``fast``), so the defaults are the notebook's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from .validation import ConfigError, read_yaml, validate, where


@dataclass
class TrainConfig:
    """What a training YAML may set. ``None`` means: the profile's value, or lesson 05's default."""

    profile: str | None = None  # tiny | full | full-random | auto; None: GLMLORA_PROFILE, else auto
    lora: dict[str, Any] = field(default_factory=dict)  # arguments of glmlora.lora.lora_config
    data: str | None = None  # a JSONL file of records (lesson 03's format), split 90/10; None: the bundled data
    pack_tokens: int | None = None
    max_length: int | None = None
    speed_ups: bool | None = None  # None: on CUDA (flex attention, Liger loss, compiled layers)
    load_in_4bit: bool = False  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only), for 10-16 GB cards
    checkpoint_every: int | None = None  # checkpoint every n-th decoder layer; None: 2 where memory allows, else 1
    training: dict[str, Any] = field(default_factory=dict)  # any TrainingArguments field
    output_dir: str | None = None  # None: profile.run_dir
    adapter_dir: str | None = None  # None: profile.adapter_dir
    resume: str = "auto"  # auto | never | a checkpoint directory
    source: str = field(default="<defaults>", metadata={"internal": True})
    lines: dict[str, int] = field(default_factory=dict, metadata={"internal": True})  # YAML key -> line

    def where(self, key: str) -> str:
        """``file:line`` of a key, for messages."""
        return where(self.source, self.lines, key)


# ---------------------------------------------------------------------------------------------- config
def _top_limits() -> dict[str, Any]:
    """Limits of the top-level keys beyond ``TrainConfig``'s types."""
    from pydantic import Field

    from .formatting import MIN_LENGTH
    from .profiles import PROFILES

    text = Annotated[str, Field(min_length=1)]
    tokens = Annotated[int, Field(ge=MIN_LENGTH)]
    return {"profile": Literal[("auto", *PROFILES)] | None, "lora": dict | None, "training": dict | None,
            "data": text | None, "output_dir": text | None, "adapter_dir": text | None, "resume": text,
            "pack_tokens": tokens | None, "max_length": tokens | None,
            "checkpoint_every": Annotated[int, Field(ge=1, le=64)] | None}


@functools.cache
def top_schema():
    """The top-level keys: ``TrainConfig``'s fields (one schema), with the limits above."""
    from .validation import schema

    hints = typing.get_type_hints(TrainConfig, include_extras=True)
    keys = {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}
    return schema("config", keys, _top_limits())


def parse_config(data: Any, source: str = "<config>", lines: dict[str, int] | None = None) -> TrainConfig:
    """A validated ``TrainConfig`` from parsed YAML (``None``, from an empty file, means all defaults).

    Checks types and ranges of every key, the LoRA arguments and the data file's existence; what needs the
    profile or the disk is checked by :func:`preflight`."""
    from .lora import lora_config
    from .validation import lora_schema, run_length_problem, training_schema

    lines = lines or {}
    top = validate(top_schema(), {} if data is None else data, "", source, lines)
    top["lora"] = validate(lora_schema(), top.get("lora"), "lora", source, lines)
    top["training"] = validate(training_schema(), top.get("training"), "training", source, lines)
    cfg = TrainConfig(**top, source=source, lines=lines)
    try:
        lora_config(**cfg.lora)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{cfg.where('lora.target_modules')}: section 'lora': {e}") from None
    problem = run_length_problem(cfg.training)
    if problem:
        raise ConfigError(f"{cfg.where('training.' + problem[0])}: key 'training.{problem[0]}' {problem[1]}")
    data_file(cfg)
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a training YAML; every error names the file, the line and the key."""
    path = Path(path)
    data, lines = read_yaml(path)
    return parse_config(data, str(path), lines)


# ---------------------------------------------------------------------------------------------- training
@dataclass
class RunResult:
    """What one run did; rank 0 prints ``summary()`` at the end."""

    profile: str
    global_step: int
    start_step: int
    world_size: int
    losses: list[tuple[float, float]]
    seconds: float
    tokens_per_step: int
    adapter_dir: Path
    resumed_from: str | None
    peak_memory: tuple[str, float] = ("host", 0.0)  # ("GPU", peak allocated GiB) on CUDA, else ("host", peak RSS GiB)
    is_main: bool = True  # rank 0, the one that prints
    step_times: list[float] = field(default_factory=list)  # wall clock at the end of each optimizer step
    pause_seconds: float = 0.0  # evaluation and checkpoint saving between steps of the steady window

    @property
    def tokens_per_second(self) -> float:
        """Over the whole ``train()`` call: start-up, compilation, evaluation and checkpoints included."""
        return (self.global_step - self.start_step) * self.tokens_per_step / max(self.seconds, 1e-9)

    @property
    def steady_tokens_per_second(self) -> float | None:
        """Between the end of step ``WARMUP_STEPS`` and the last step, not counting evaluation and checkpoint
        saving in between: the speed to compare across GPU counts. None when too few steps ran."""
        times = self.step_times[WARMUP_STEPS:]
        seconds = (times[-1] - times[0] - self.pause_seconds) if len(times) > 1 else 0.0
        return (len(times) - 1) * self.tokens_per_step / seconds if seconds > 0 else None

    def summary(self) -> str:
        loss = (f"loss {self.losses[0][1]:.3f} -> {self.losses[-1][1]:.3f}" if self.losses else "no loss logged")
        resumed = f", resumed at step {self.start_step}" if self.resumed_from else ""
        ranks = "rank 0" if self.world_size == 1 else f"largest of {self.world_size} ranks"
        steady = self.steady_tokens_per_second
        speed = (f"{steady:,.0f} tokens/s after warm-up ({self.tokens_per_second:,.0f} overall; " if steady else
                 f"{self.tokens_per_second:,.0f} tokens/s overall (too few steps to leave out the warm-up; ")
        return (f"SUMMARY train: profile {self.profile}, {self.global_step} steps{resumed}, {loss}, "
                f"world size {self.world_size}, {speed}{self.tokens_per_step:,} tokens per step), peak memory "
                f"{self.peak_memory[1]:.2f} GiB ({self.peak_memory[0]}, {ranks}), {self.seconds:.1f} s, "
                f"adapter in {self.adapter_dir}")


#: Optimizer steps left out of the steady speed: compilation, CUDA-graph and allocator warm-up happen there.
WARMUP_STEPS = 3
_SUMMARY = re.compile(r"SUMMARY train: profile (?P<profile>\S+), (?P<steps>\d+) steps.*?, "
                      r"(?:loss (?P<first_loss>[\d.]+) -> (?P<last_loss>[\d.]+)|no loss logged), "
                      r"world size (?P<world_size>\d+), (?:(?P<steady>[\d,.]+) tokens/s after warm-up \("
                      r"(?P<overall>[\d,.]+) overall|(?P<only_overall>[\d,.]+) tokens/s overall)"
                      r".*?peak memory (?P<peak_gib>[\d.]+) GiB \((?P<memory>\w+)")


def parse_summary(text: str) -> dict[str, Any]:
    """The numbers of the last ``SUMMARY train:`` line in ``text`` (a launcher's output), for scaling tables.

    ``tokens_per_second`` is the after-warm-up speed, or the overall one (``steady`` False) for short runs."""
    found = list(_SUMMARY.finditer(text))
    if not found:
        raise ValueError("no 'SUMMARY train:' line in the output")
    m = found[-1]
    number = lambda key: float(m[key].replace(",", "")) if m[key] else None  # noqa: E731
    overall = number("overall") or number("only_overall")
    return {"profile": m["profile"], "steps": int(m["steps"]), "world_size": int(m["world_size"]),
            "tokens_per_second": number("steady") or overall, "steady": m["steady"] is not None,
            "overall_tokens_per_second": overall,
            "first_loss": number("first_loss"), "last_loss": number("last_loss"),
            "peak_gib": float(m["peak_gib"]), "memory": m["memory"]}


def resolve_profile(cfg: TrainConfig):
    """The profile the config names, with its ``max_length`` / ``pack_tokens`` replaced where set."""
    from .profiles import select_profile

    try:
        profile = select_profile(cfg.profile)
    except ValueError as e:  # GLMLORA_PROFILE set to an unknown name
        raise ConfigError(f"{cfg.source}: {e}") from None
    changes = {k: getattr(cfg, k) for k in ("max_length", "pack_tokens") if getattr(cfg, k) is not None}
    if cfg.profile not in (None, "auto"):
        changes["reason"] = f"chosen in {cfg.source}"
    profile = dataclasses.replace(profile, **changes)
    if profile.max_length > profile.pack_tokens:
        key = "max_length" if cfg.max_length is not None else "pack_tokens"
        raise ConfigError(f"{cfg.where(key)}: key 'max_length' ({profile.max_length}) must not exceed 'pack_tokens' "
                          f"({profile.pack_tokens}): a packed row must hold the longest example")
    return profile


def make_arguments(cfg: TrainConfig, profile: Any, output_dir: Path):
    """Lesson 05's ``TrainingArguments`` (profile overrides, then the config's). Built first on purpose:
    it joins the process group, which the model loading and the main-process-first data step rely on.

    ``ddp_find_unused_parameters=False``: every LoRA weight gets a gradient each step, and for a PEFT model
    Trainer would otherwise ask DDP to search the autograd graph for unused ones on every step."""
    from .environment import checkpoint_every_for, checkpointing_kwargs
    from .training import training_arguments

    every = checkpoint_every_for(profile.name, cfg.checkpoint_every, profile.pack_tokens, cfg.load_in_4bit)
    overrides = {"eval_strategy": "epoch", "ddp_find_unused_parameters": False,
                 "gradient_checkpointing_kwargs": checkpointing_kwargs(every), **profile.train_overrides,
                 **cfg.training}
    try:
        return training_arguments(output_dir, **overrides)
    except (ValueError, TypeError) as e:  # TrainingArguments' own checks across keys
        raise ConfigError(f"{cfg.where('training')}: section 'training': {e}") from None


def build_model(native: Path, cfg: TrainConfig, gradient_checkpointing: bool):
    """Base model + LoRA as in lesson 05. No ``device_map``: under DDP/FSDP the Trainer places each rank's copy
    (a 4-bit base is placed on this rank's GPU while loading, as bitsandbytes quantises it there).

    The weights load in the dtype that ``precision_flags`` trains with (bf16, or fp16 on GPUs without it)."""
    import torch

    from .chatglm3 import load_model
    from .fast import speed_up, training_attention
    from .lora import lora_config
    from .training import add_lora, training_dtype

    fast = torch.cuda.is_available() if cfg.speed_ups is None else cfg.speed_ups
    dtype = training_dtype()
    model = load_model(native, dtype=dtype, load_in_4bit=cfg.load_in_4bit,
                       attn_implementation=training_attention(dtype) if fast else "sdpa")
    model = add_lora(model, lora_config(**cfg.lora), gradient_checkpointing=gradient_checkpointing)
    if fast:
        speed_up(model)
    return model


def packed_datasets(profile: Any, tokenizer: Any, train_path: Path, val_path: Path):
    """Lesson 05's features, packed into rows of ``profile.pack_tokens`` (the same on every rank), and the
    reports of what the windows train: ``(train rows, val rows or None when empty, train report, val report)``."""
    from .data import load_records
    from .formatting import tokenize_records
    from .packing import PackedDataset

    train, train_report = tokenize_records(load_records(train_path), tokenizer, profile.max_length)
    val_records = load_records(val_path) if val_path.stat().st_size else []  # empty: too few records to split
    val, val_report = tokenize_records(val_records, tokenizer, profile.max_length)
    val_rows = PackedDataset(val, profile.pack_tokens) if len(val) else None
    return PackedDataset(train, profile.pack_tokens, seed=42), val_rows, train_report, val_report


def data_file(cfg: TrainConfig) -> Path | None:
    """The config's ``data`` file, checked before any process starts on it."""
    if cfg.data is None:
        return None
    path = Path(cfg.data).expanduser()
    if not path.is_file():
        what = f"{path} is a directory, not a file" if path.is_dir() else f"no file {path}"
        raise ConfigError(f"{cfg.where('data')}: key 'data': {what} (a JSONL file of records, lesson 03's format)")
    return path.resolve()


def resume_checkpoint(cfg: TrainConfig, output_dir: Path) -> str | None:
    """``resume``: auto = the newest complete checkpoint in ``output_dir`` if any (incomplete ones are named
    and passed over); never = none; else that directory, which must be a complete checkpoint."""
    from .training import checkpoint_problem, last_checkpoint

    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return last_checkpoint(output_dir)
    problem = checkpoint_problem(cfg.resume)
    if problem is not None:
        raise ConfigError(f"{cfg.where('resume')}: key 'resume': {cfg.resume} cannot be resumed from: {problem}; "
                          f"use auto, never or a complete checkpoint-N folder")
    return cfg.resume


#: Lesson 03's split of the data file (the same in glmlora.pipeline.ensure_splits).
VAL_FRACTION, SPLIT_SEED = 0.1, 42


@dataclass
class DataPlan:
    """What :func:`preflight` found in the data file, before anything was written."""

    source: Path
    records: int
    train: int
    val: int


def adapter_path(cfg: TrainConfig, profile: Any) -> Path:
    return Path(cfg.adapter_dir).expanduser() if cfg.adapter_dir else profile.adapter_dir


def preflight(cfg: TrainConfig, profile: Any, output_dir: Path) -> DataPlan:
    """Everything that can be checked before a model is downloaded, built, converted or loaded, and before
    anything is written: the directories the run writes into, the ``report_to`` integrations, the checkpoint
    named by ``resume``, and every record of the data (``DataError`` names file, line and field)."""
    from .data import load_records, sample_data_path, split_records
    from .validation import directory_problem, report_to_problem

    for key, path in (("output_dir", output_dir), ("adapter_dir", adapter_path(cfg, profile))):
        problem = directory_problem(path)
        if problem:
            default = "" if getattr(cfg, key) else " (the default, under GLMLORA_WORKDIR)"
            raise ConfigError(f"{cfg.where(key)}: key '{key}'{default}: {problem}")
    for name, path in (("GLMLORA_WORKDIR", profile.data_dir), ("GLMLORA_MODEL_CACHE", profile.model_dir)):
        problem = directory_problem(path)
        if problem:
            raise ConfigError(f"{cfg.source}: {name}: {problem}")
    problem = report_to_problem(cfg.training.get("report_to", "none"))
    if problem:
        raise ConfigError(f"{cfg.where('training.report_to')}: key 'training.report_to' {problem}")
    if cfg.resume not in ("auto", "never"):
        resume_checkpoint(cfg, output_dir)
    source = data_file(cfg) or sample_data_path()
    records = load_records(source)
    train, val = split_records(records, VAL_FRACTION, SPLIT_SEED)
    return DataPlan(source, len(records), len(train), len(val))


def peak_memory() -> tuple[str, float]:
    """This process's peak: GPU memory allocated by torch on CUDA (what a card must hold), else host RSS."""
    from .training import memory_report

    report = memory_report()
    if "gpu_peak_allocated_gib" in report:
        return "GPU", report["gpu_peak_allocated_gib"]
    return "host", report["host_peak_rss_gib"]


def checkpoint_step(checkpoint: str | None) -> int:
    if checkpoint is None:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


def leave_process_group(args: Any) -> None:
    """Wait until rank 0 has written everything, then close the process group: a rank that exits with the
    group still open can abort in the communication library's destructor ("terminate called ...")."""
    state = getattr(args, "distributed_state", None)
    if state is not None and args.world_size > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


def make_trainer(cfg: TrainConfig, profile: Any, args: Any):
    """Lesson 05's Trainer: converted model + LoRA, packed rows, the tokenizer saved along with the adapter."""
    from transformers import Trainer, default_data_collator, set_seed

    from .data import sample_data_path
    from .pipeline import ensure_native_model, ensure_splits
    from .tokenizer import load_tokenizer

    # Rank 0 converts the model and writes the split while the others wait, then they all read them
    # (one shared file system, unless save_on_each_node says each machine has its own).
    with args.main_process_first(local=args.save_on_each_node, desc="model conversion and data split"):
        native = ensure_native_model(profile)
        train_path, val_path = ensure_splits(profile, data_file(cfg) or sample_data_path(), VAL_FRACTION,
                                               SPLIT_SEED)
    tokenizer = load_tokenizer(native)
    # Trainer seeds only after the model exists; LoRA's A matrices are random, so seed before building them:
    # the same config then gives the same run, on one process or many.
    set_seed(args.seed)
    model = build_model(native, cfg, args.gradient_checkpointing)
    train_ds, val_ds, train_report, val_report = packed_datasets(profile, tokenizer, train_path, val_path)
    if args.process_index == 0:
        print(f"train data: {train_report}\nval data:   {val_report}", flush=True)
    return Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                   data_collator=default_data_collator, processing_class=tokenizer)


def step_clock(result: RunResult) -> Any:
    """A Trainer callback that fills ``result.step_times`` and ``result.pause_seconds``.

    It waits for the GPU at each step end (a few milliseconds against steps of a few hundred), so that
    the times are the GPU's and not how far ahead the host has queued work.
    """
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepClock(TrainerCallback):
        mark: float | None = None
        pending = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if len(result.step_times) > WARMUP_STEPS:  # the pause before this step lies in the steady window
                result.pause_seconds += self.pending
            self.pending, self.mark = 0.0, now()
            result.step_times.append(self.mark)

        def on_evaluate(self, args, state, control, **kwargs):
            self._pause()

        def on_save(self, args, state, control, **kwargs):
            self._pause()

        def _pause(self) -> None:
            if self.mark is not None:
                t = now()
                self.pending += t - self.mark
                self.mark = t

    return StepClock()


def largest_over_ranks(value: float) -> float:
    """The largest ``value`` of all ranks (the card that must hold the most); ``value`` on one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return max(values)


def train_and_save(trainer: Any, result: RunResult, loss_image: Path) -> None:
    """Train (resuming if asked), save the adapter and the loss curve; fills in ``result``."""
    from .training import loss_history, plot_loss

    if result.resumed_from and result.is_main:
        print(f"resuming from {result.resumed_from}", flush=True)
    trainer.add_callback(step_clock(result))
    start = time.perf_counter()
    result.global_step = trainer.train(resume_from_checkpoint=result.resumed_from).global_step
    result.seconds = time.perf_counter() - start
    trainer.save_model(str(result.adapter_dir))  # on every rank: FSDP gathers the weights; only rank 0 writes
    result.losses = loss_history(trainer.state.log_history)["train"]
    kind, peak = peak_memory()
    result.peak_memory = (kind, largest_over_ranks(peak))
    if trainer.is_world_process_zero():
        plot_loss(trainer.state.log_history, loss_image, title=f"LoRA on {result.profile}")


def run(cfg: TrainConfig) -> RunResult:
    """Train as lesson 05 does, on however many processes were launched; returns what this rank saw.

    Every check that needs no model runs first (:func:`preflight`): a bad config or record stops the run before
    a model is downloaded, built, converted or loaded, and before anything is written."""
    from .data import empty_validation_note
    from .profiles import show_banner
    from .training import loss_history, read_log_history

    profile = resolve_profile(cfg)
    output_dir = Path(cfg.output_dir).expanduser() if cfg.output_dir else profile.run_dir
    plan = preflight(cfg, profile, output_dir)  # before anything is loaded or written
    main_rank = os.environ.get("RANK", "0") == "0"
    if plan.val == 0:
        cfg = dataclasses.replace(cfg, training={**cfg.training, "eval_strategy": "no"})
        if main_rank:
            print(empty_validation_note(plan.records, VAL_FRACTION), flush=True)
    checkpoint = resume_checkpoint(cfg, output_dir)
    args = make_arguments(cfg, profile, output_dir)
    rows = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    step = checkpoint_step(checkpoint)
    result = RunResult(profile.name, step, step, args.world_size, [], 0.0, rows * profile.pack_tokens,
                       adapter_path(cfg, profile), checkpoint,
                       is_main=args.process_index == 0)
    if result.is_main:
        show_banner(profile)
    if 0 < args.max_steps <= step:
        # Trainer would still take one more step (and write checkpoint-{step + 1}); a finished run stays finished.
        if result.is_main:
            print(f"{checkpoint} is already at step {step} (max_steps {args.max_steps}): nothing to train; "
                  f"raise max_steps, or set resume: never to start again", flush=True)
        result.losses = loss_history(read_log_history(checkpoint))["train"]
    else:
        train_and_save(make_trainer(cfg, profile, args), result, output_dir / "loss.png")
    leave_process_group(args)
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line; exit status 2 for a config, data or model-directory error (one message on stderr, no
    traceback), 0 after training."""
    from .chatglm3 import ConversionError
    from .data import DataError

    parser = argparse.ArgumentParser(prog="python -m glmlora.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="training YAML (see configs/train_default.yaml)")
    ns = parser.parse_args(argv)
    try:
        cfg = load_config(ns.config)
        result = run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # the data file named by the config (or the bundled one) has bad records
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except ConversionError as e:  # the model directory (a download, a converted copy) is broken
        print(f"model error: {e}", file=sys.stderr)
        return 2
    if result.is_main:
        print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
