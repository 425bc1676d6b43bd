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
import collections.abc
import dataclasses
import difflib
import enum
import json
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A config file problem; the message names the file and the key."""


@dataclass
class TrainConfig:
    """What a training YAML may set. ``None`` means: the profile's value, or lesson 05's default."""

    profile: str | None = None  # tiny | full | full-random | auto; None: GLMLORA_PROFILE, else auto
    lora: dict[str, Any] = field(default_factory=dict)  # arguments of glmlora.lora.lora_config
    data: str | None = None  # a JSONL file of records (lesson 03's format), split 90/10; None: the bundled data
    pack_tokens: int | None = None
    max_length: int | None = None
    speed_ups: bool | None = None  # None: on CUDA (flex attention, Liger loss, compiled layers)
    training: dict[str, Any] = field(default_factory=dict)  # any TrainingArguments field
    output_dir: str | None = None  # None: profile.run_dir
    adapter_dir: str | None = None  # None: profile.adapter_dir
    resume: str = "auto"  # auto | never | a checkpoint directory
    source: str = field(default="<defaults>", metadata={"internal": True})


# ---------------------------------------------------------------------------------------------- config
def config_keys() -> dict[str, Any]:
    """The top-level YAML keys with their types (read from ``TrainConfig``, so there is one schema)."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}


def lora_keys() -> dict[str, Any]:
    """The ``lora:`` keys: the named parameters of ``lora_config`` (its defaults stay there)."""
    from .lora import lora_config

    hints = typing.get_type_hints(lora_config)
    return {k: hints[k] for k in ("r", "alpha", "dropout", "target_modules")}


def training_keys() -> dict[str, Any]:
    """The ``training:`` keys: every ``TrainingArguments`` field, except the ones set elsewhere."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments)
            if f.init and f.name not in _MOVED}


_MOVED = {"output_dir": "the top-level key 'output_dir'",
          "resume_from_checkpoint": "the top-level key 'resume'"}


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a YAML value fits a type annotation; kinds of annotation not listed here pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_accepts(h, value) for h in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, (str, hint))
    base = origin or hint
    if base in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(_accepts(args[0], v) for v in value)
    if base in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "null",
          dict: "a mapping", list: "a list"}


def _type_name(hint: Any) -> str:
    """``int | None`` -> "an integer or null": what a YAML author needs to read."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(h) for h in typing.get_args(hint)))
    origin = typing.get_origin(hint) or hint
    if origin is collections.abc.Sequence:
        origin = list
    return _WORDS.get(origin, getattr(origin, "__name__", str(origin)))


def _unknown(name: str, key: str, keys: dict[str, Any], where: str) -> str:
    """The known keys when there are few, the nearest ones when there are many (TrainingArguments)."""
    if len(keys) <= 15:
        return f"unknown key '{name}' in {where}; known keys: {', '.join(sorted(keys))}"
    near = difflib.get_close_matches(key, keys, n=3)
    hint = f"did you mean {' or '.join(repr(k) for k in near)}?" if near else "see the TrainingArguments fields"
    return f"unknown key '{name}' in {where} ({hint})"


def _coerce(hint: Any, value: Any) -> Any:
    """YAML 1.1 reads ``2e-4`` (no dot) as a string: turn such text into a float where a float is meant."""
    if isinstance(value, str) and _FLOAT_TEXT.match(value) and not _accepts(hint, value) \
            and _accepts(hint, float(value)):
        return float(value)
    return value


def _check_section(data: Any, keys: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """``data`` with every key known and every value of the right type, or a ConfigError naming it."""
    where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping (key: value lines), got {type(data).__name__}")
    checked = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if prefix == "training." and key in _MOVED:
            raise ConfigError(f"{source}: key '{name}' is set by {_MOVED[key]} instead")
        if key not in keys:
            raise ConfigError(f"{source}: {_unknown(name, key, keys, where)}")
        value = _coerce(keys[key], value)
        if not _accepts(keys[key], value):
            raise ConfigError(f"{source}: key '{name}' must be {_type_name(keys[key])}, "
                              f"got {type(value).__name__} {value!r}")
        checked[key] = value
    return checked


def _check_values(cfg: TrainConfig) -> None:
    """Checks beyond types: allowed words, positive sizes, LoRA arguments that ``lora_config`` accepts."""
    from .lora import lora_config
    from .profiles import PROFILES

    src = cfg.source
    if cfg.profile is not None and cfg.profile not in ("auto", *PROFILES):
        raise ConfigError(f"{src}: key 'profile' must be one of auto, {', '.join(PROFILES)}, got {cfg.profile!r}")
    for key in ("pack_tokens", "max_length"):
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            raise ConfigError(f"{src}: key '{key}' must be a positive number of tokens, got {getattr(cfg, key)}")
    data_file(cfg)
    if not cfg.resume:
        raise ConfigError(f"{src}: key 'resume' must be auto, never or a checkpoint directory, got an empty value")
    try:
        lora_config(**cfg.lora)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{src}: section 'lora': {e}") from None


def parse_config(data: Any, source: str = "<config>") -> TrainConfig:
    """A validated ``TrainConfig`` from parsed YAML (``None``, from an empty file, means all defaults)."""
    top = _check_section({} if data is None else data, config_keys(), source)
    top["lora"] = _check_section(top.get("lora") or {}, lora_keys(), source, "lora.")
    top["training"] = _check_section(top.get("training") or {}, training_keys(), source, "training.")
    cfg = TrainConfig(**top, source=source)
    _check_values(cfg)
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a training YAML; every error names the file (and the key, where there is one)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(data, str(path))


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

    profile = select_profile(cfg.profile)
    changes = {k: getattr(cfg, k) for k in ("max_length", "pack_tokens") if getattr(cfg, k) is not None}
    if cfg.profile not in (None, "auto"):
        changes["reason"] = f"chosen in {cfg.source}"
    profile = dataclasses.replace(profile, **changes)
    if profile.max_length > profile.pack_tokens:
        raise ConfigError(f"{cfg.source}: key 'max_length' ({profile.max_length}) must not exceed 'pack_tokens' "
                          f"({profile.pack_tokens}): a packed row must hold the longest example")
    return profile


def make_arguments(cfg: TrainConfig, profile: Any, output_dir: Path):
    """Lesson 05's ``TrainingArguments`` (profile overrides, then the config's). Built first on purpose:
    it joins the process group, which the model loading and the main-process-first data step rely on.

    ``ddp_find_unused_parameters=False``: every LoRA weight gets a gradient each step, and for a PEFT model
    Trainer would otherwise ask DDP to search the autograd graph for unused ones on every step."""
    from .training import training_arguments

    overrides = {"eval_strategy": "epoch", "ddp_find_unused_parameters": False, **profile.train_overrides,
                 **cfg.training}
    try:
        return training_arguments(output_dir, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{cfg.source}: section 'training': {e}") from None


def build_model(native: Path, cfg: TrainConfig, gradient_checkpointing: bool):
    """Base model + LoRA as in lesson 05. No ``device_map``: under DDP/FSDP the Trainer places each rank's copy."""
    import torch

    from .chatglm3 import load_model
    from .fast import speed_up, training_attention
    from .lora import lora_config
    from .training import add_lora

    fast = torch.cuda.is_available() if cfg.speed_ups is None else cfg.speed_ups
    model = load_model(native, attn_implementation=training_attention() if fast else "sdpa")
    model = add_lora(model, lora_config(**cfg.lora), gradient_checkpointing=gradient_checkpointing)
    if fast:
        speed_up(model)
    return model


def packed_datasets(profile: Any, tokenizer: Any, train_path: Path, val_path: Path):
    """Lesson 05's features, packed into rows of ``profile.pack_tokens`` (the same on every rank)."""
    from .data import load_records
    from .formatting import tokenize_records
    from .packing import PackedDataset

    train, _ = tokenize_records(load_records(train_path), tokenizer, profile.max_length)
    val, _ = tokenize_records(load_records(val_path), tokenizer, profile.max_length)
    return PackedDataset(train, profile.pack_tokens, seed=42), PackedDataset(val, profile.pack_tokens)


def data_file(cfg: TrainConfig) -> Path | None:
    """The config's ``data`` file, checked before any process starts on it."""
    if cfg.data is None:
        return None
    path = Path(cfg.data).expanduser()
    if not path.is_file():
        raise ConfigError(f"{cfg.source}: key 'data': no file {path} (a JSONL file of records, lesson 03's format)")
    return path.resolve()


def resume_checkpoint(cfg: TrainConfig, output_dir: Path) -> str | None:
    """``resume``: auto = the newest checkpoint in ``output_dir`` if any; never = none; else that directory."""
    from .training import last_checkpoint

    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return last_checkpoint(output_dir)
    if not (Path(cfg.resume) / "trainer_state.json").is_file():
        raise ConfigError(f"{cfg.source}: key 'resume': {cfg.resume} is not a Trainer checkpoint directory "
                          f"(no trainer_state.json); use auto, never or a checkpoint-N folder")
    return cfg.resume


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

    from .pipeline import ensure_native_model, ensure_splits
    from .tokenizer import load_tokenizer

    # Rank 0 converts the model and writes the split while the others wait, then they all read them
    # (one shared file system, unless save_on_each_node says each machine has its own).
    with args.main_process_first(local=args.save_on_each_node, desc="model conversion and data split"):
        native = ensure_native_model(profile)
        train_path, val_path = ensure_splits(profile, source=data_file(cfg))
    tokenizer = load_tokenizer(native)
    # Trainer seeds only after the model exists; LoRA's A matrices are random, so seed before building them:
    # the same config then gives the same run, on one process or many.
    set_seed(args.seed)
    model = build_model(native, cfg, args.gradient_checkpointing)
    train_ds, val_ds = packed_datasets(profile, tokenizer, train_path, val_path)
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
    """Train as lesson 05 does, on however many processes were launched; returns what this rank saw."""
    from .profiles import show_banner
    from .training import loss_history, read_log_history

    profile = resolve_profile(cfg)
    output_dir = Path(cfg.output_dir) if cfg.output_dir else profile.run_dir
    checkpoint = resume_checkpoint(cfg, output_dir)
    args = make_arguments(cfg, profile, output_dir)
    rows = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    step = checkpoint_step(checkpoint)
    result = RunResult(profile.name, step, step, args.world_size, [], 0.0, rows * profile.pack_tokens,
                       Path(cfg.adapter_dir) if cfg.adapter_dir else profile.adapter_dir, checkpoint,
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
    """The command line; exit status 2 for a config or data error (message on stderr), 0 after training."""
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
    if result.is_main:
        print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
