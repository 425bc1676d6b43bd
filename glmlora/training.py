"""Training pieces of lesson 05: model preparation, TrainingArguments defaults, collator, plots, memory.

Defaults fit a 20–24 GB card: bf16 where supported (fp16 weights with fp32 LoRA parameters otherwise,
so AMP never tries to unscale fp16 gradients), gradient checkpointing *with* input grads, and one packed
row of examples per step (``glmlora.packing``), so the GPU never computes on padding.
"""

from __future__ import annotations

import gc
import json
import resource
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from .formatting import IGNORE
from .tokenizer import ChatGLM3Tokenizer


def add_lora(model: Any, config: Any, gradient_checkpointing: bool = True) -> Any:
    """Wrap ``model`` with LoRA; LoRA weights in fp32 even on a half-precision or 4-bit base.

    With checkpointing, the frozen embedding output does not require grad, so the recomputed block has
    nothing to differentiate ("element 0 of tensors does not require grad"):
    ``enable_input_require_grads`` fixes that.

    A 4-bit base (QLoRA, ``load_model(..., load_in_4bit=True)``) gets the same treatment, which is what peft's
    ``prepare_model_for_kbit_training`` does apart from one step left out on purpose: that function also casts
    every 16-bit weight it finds to fp32 — here the 65,024 x 4,096 input embedding and output layer, +1 GiB, and
    fp32 activations from there on, where QLoRA is meant for 10-16 GB cards. The frozen 16-bit weights are
    never updated, and bf16 has fp32's range; with fp16 compute, AMP's loss scaling guards the gradients as on
    a 16-bit base. Calling ``prepare_model_for_kbit_training`` before ``add_lora`` still works (at that cost).
    """
    from peft import get_peft_model

    from .fast import is_quantized

    if is_quantized(model):
        for p in model.parameters():  # freeze the base before wrapping, as prepare_model_for_kbit_training does
            p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False  # a KV cache is useless in training and clashes with checkpointing
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


def training_dtype() -> torch.dtype:
    """The dtype the frozen weights load in for training: bf16 where the GPU has it, fp16 on older GPUs (and
    under ``GLMLORA_NO_BF16=1``), fp32 on CPU. Matches :func:`precision_flags`."""
    from .environment import bf16_supported

    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if bf16_supported() else torch.float16


def precision_flags() -> dict[str, bool]:
    """``bf16`` on GPUs that have it, ``fp16`` AMP (with loss scaling) on older GPUs, neither on CPU.

    fp16 AMP unscales the gradients of the *trainable* parameters, so they must be fp32 — :func:`add_lora`
    keeps LoRA's in fp32 on any base. ``GLMLORA_NO_BF16=1`` forces the fp16 path on a bf16 GPU (how it is tested).
    """
    from .environment import bf16_supported

    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False}
    bf16 = bf16_supported()
    return {"bf16": bf16, "fp16": not bf16}


def training_arguments(output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """``TrainingArguments`` with the course's defaults for a 20–24 GB card; any field can be overridden."""
    defaults: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=1,  # one packed row (profile.pack_tokens tokens, ~15 exchanges)
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
        num_train_epochs=3,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        logging_steps=10,
        save_strategy="steps",
        save_steps=0.25,  # below 1: a fraction of the run, so every run (tiny or 6B, any data) gets 4 checkpoints
        save_total_limit=2,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="random",  # "group_by_length" when training on unpacked, padded batches
        report_to="none",
        prediction_loss_only=True,  # evaluation needs the loss only: no 65,024-wide logits kept
        remove_unused_columns=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # frozen base + LoRA: no unused trainable parameters to search for
        seed=42,
        **precision_flags(),
    )
    defaults.update(overrides)
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True
    return TrainingArguments(**defaults)


def collator(tokenizer: ChatGLM3Tokenizer, pad_to_multiple_of: int | None = 8) -> DataCollatorForSeq2Seq:
    """For unpacked batches: pads each batch to its longest example (labels with -100), on the right."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE,
                                  pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")


def trainable_summary(model: Any) -> str:
    trainable, total = model.get_nb_trainable_parameters()
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f} %)"


def free_memory() -> None:
    """Hand back what a finished training run held: collect the garbage (Trainer, model and hooks reference
    each other, so they outlive the function that made them) and return PyTorch's cached GPU blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_report() -> dict[str, float]:
    """GiB: GPU allocated / reserved / peak when on CUDA, else this process's peak host memory."""
    gib = 1024 ** 3
    if torch.cuda.is_available():
        return {"gpu_allocated_gib": torch.cuda.memory_allocated() / gib,
                "gpu_reserved_gib": torch.cuda.memory_reserved() / gib,
                "gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / gib,
                "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / gib}
    return {"host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}


def loss_history(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``{"train": [(step, loss)], "eval": [(step, eval_loss)]}`` from ``trainer.state.log_history``."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return {"train": train, "eval": evals}


def read_log_history(checkpoint_or_output_dir: str | Path) -> list[dict[str, Any]]:
    """The log history saved by Trainer (``trainer_state.json``) of a run or its newest checkpoint."""
    root = Path(checkpoint_or_output_dir)
    candidates = [root / "trainer_state.json"] + sorted(root.glob("checkpoint-*/trainer_state.json"),
                                                          key=lambda p: int(p.parent.name.split("-")[1]))
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise FileNotFoundError(f"no trainer_state.json in {root} or its checkpoints: train first (lesson 05)")
    return json.loads(found[-1].read_text(encoding="utf-8"))["log_history"]


def plot_loss(log_history: list[dict[str, Any]], path: str | Path | None = None, title: str = "LoRA training"):
    """The loss curve (train, and eval if logged); saved as an image when ``path`` is given."""
    import matplotlib.pyplot as plt

    curves = loss_history(log_history)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=f"{name} loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on reply tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def last_checkpoint(output_dir: str | Path, say: Any = print) -> str | None:
    """The newest *complete* ``checkpoint-N`` folder, to resume an interrupted run
    (``trainer.train(resume_from_checkpoint=...)``); None when there is none.

    A run killed while saving leaves a checkpoint folder that is empty or half written; resuming from it would
    crash or, worse, load half a state. Such folders are passed over, and ``say`` (print) tells which and why.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    numbered = [(int(p.name.split("-")[1]), p) for p in root.glob("checkpoint-*")
                if p.is_dir() and p.name.split("-")[1].isdigit()]
    for _, path in sorted(numbered, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        say(f"skipping {path}: {problem}")
    return None


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from, or None when it is complete: trainer state readable,
    weights (adapter or model) present with readable headers, saved optimizer/scheduler/RNG files whole."""
    import zipfile

    from .chatglm3 import ConversionError, check_safetensors

    path = Path(checkpoint)
    if not path.is_dir():
        return "not a directory"
    files = {p.name: p for p in path.iterdir() if p.is_file()}
    if not files:
        return "empty (the run stopped while creating it)"
    if "trainer_state.json" not in files:
        return "no trainer_state.json (the run stopped while saving: Trainer writes that file last)"
    try:
        int(json.loads(files["trainer_state.json"].read_text(encoding="utf-8"))["global_step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "trainer_state.json is unreadable (half written)"
    weights = [n for n in files if n.endswith(".safetensors") or n in ("adapter_model.bin", "pytorch_model.bin")]
    if not weights:
        return "no weights (adapter_model.safetensors)"
    if any(n.startswith("adapter_model") for n in weights) and "adapter_config.json" not in files:
        return "adapter_config.json is missing"
    for name in sorted(weights):
        if name.endswith(".safetensors"):
            try:
                check_safetensors(files[name])
            except ConversionError as e:
                return str(e).replace(f"{files[name]}: ", f"{name}: ", 1)
    for name in sorted(n for n in files if n.endswith((".pt", ".pth", ".bin"))):
        if not zipfile.is_zipfile(files[name]):
            return f"{name} is truncated or corrupt (not a complete torch.save file)"
    return None
