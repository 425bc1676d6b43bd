"""Idempotent prerequisites, so that every lesson runs on its own.

Lesson 06 needs an adapter, which needs lesson 05's training, which needs lesson 03's split and lesson
02's model.  Each ``ensure_*`` returns what exists, or makes it with the course's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .chatglm3 import ConversionError, ensure_native, load_model
from .data import (empty_validation_note, file_fingerprint, load_records, sample_data_path, split_records,
                   write_jsonl)
from .download import download_chatglm3  # noqa: F401  (lesson 02 and older code import it from here)
from .profiles import Profile
from .tokenizer import load_tokenizer


def ensure_base_model(profile: Profile) -> Path:
    """The original-layout model directory of ``profile``: built (tiny, full-random) or downloaded (full)."""
    from .tiny import build_full_random, build_tiny

    if profile.name == "tiny":
        return build_tiny(profile.model_dir)
    if profile.name == "full-random":
        import torch

        return build_full_random(profile.model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    if (profile.model_dir / "config.json").is_file():
        return profile.model_dir
    return download_chatglm3()


def ensure_native_model(profile: Profile) -> Path:
    """The converted (native ``GlmForCausalLM``) directory of ``profile``; converts once."""
    return ensure_native(ensure_base_model(profile))


def ensure_splits(profile: Profile, source: str | Path | None = None, val_fraction: float | None = None,
                  seed: int | None = None) -> tuple[Path, Path]:
    """``train.jsonl`` and ``val.jsonl`` under the work directory (lesson 03's split, made once).

    ``None`` means "as lesson 03 made it": the data file, fraction and seed recorded with the existing split
    (so lessons 04-07 keep training and evaluating on a learner's own file), else the bundled data, 0.1, 42.
    The split is remade — after validating every record — when the source's contents (a SHA-256 of the
    file), its path, the fraction or the seed differ from the ones recorded with it; a changed file is said.
    """
    stamp_path = profile.data_dir / "split.json"
    current = _read_stamp(stamp_path)
    recorded = current or {}
    if source is None:
        source = split_source(profile) or sample_data_path()
    source = Path(source).expanduser().resolve()  # recorded absolute: later lessons run from other folders
    val_fraction = recorded.get("val_fraction", 0.1) if val_fraction is None else val_fraction
    seed = recorded.get("seed", 42) if seed is None else seed
    train_path, val_path = profile.data_dir / "train.jsonl", profile.data_dir / "val.jsonl"
    if not source.is_file():
        load_records(source)  # raises DataError naming the path
    stamp = {"source": str(source), "sha256": file_fingerprint(source), "val_fraction": val_fraction, "seed": seed}
    if train_path.is_file() and val_path.is_file() and current == stamp:
        return train_path, val_path
    if current and current.get("source") == stamp["source"] and current.get("sha256") != stamp["sha256"]:
        print(f"{source} has changed since the split in {profile.data_dir} was made: validating it and "
              f"splitting it again", flush=True)
    train, val = split_records(load_records(source), val_fraction, seed)
    if not val:
        print(empty_validation_note(len(train), val_fraction), flush=True)
    stamp_path.unlink(missing_ok=True)  # a split interrupted below is made again next time
    write_jsonl(train, train_path)
    write_jsonl(val, val_path)
    stamp_path.write_text(json.dumps(stamp, indent=2))
    return train_path, val_path


def split_source(profile: Profile) -> Path | None:
    """The data file of the split that exists under the work directory, if that file still exists."""
    current = _read_stamp(profile.data_dir / "split.json")
    source = Path(current["source"]) if current and current.get("source") else None
    return source if source is not None and source.is_file() else None


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def train_adapter(profile: Profile, **overrides: Any) -> Path:
    """Lesson 05 in one call (what its cells do step by step): ``glmlora.train`` with the profile's defaults.

    ``overrides`` are ``TrainingArguments`` fields. Returns the saved adapter directory.
    """
    from .train import TrainConfig, run
    from .training import free_memory

    source = split_source(profile)  # the learner's own data if lesson 03 split it, else the bundled set
    config = TrainConfig(profile=profile.name, pack_tokens=profile.pack_tokens, max_length=profile.max_length,
                         data=str(source) if source else None, training=dict(overrides), resume="never",
                         source="glmlora.pipeline.train_adapter")
    adapter = run(config).adapter_dir
    free_memory()  # a lesson that trains on the fly then loads the model again: not two 6B models on one card
    return adapter


def ensure_adapter(profile: Profile) -> Path:
    """Lesson 05's adapter, trained with the defaults if it does not exist yet."""
    if (profile.adapter_dir / "adapter_config.json").is_file():
        return profile.adapter_dir
    return train_adapter(profile)


def memorise(profile: Profile, n_records: int = 6, epochs: int = 150, seed: int = 0):
    """Train a LoRA hard on the ``n_records`` shortest single-turn training records (seconds on the tiny model).

    The tiny model learns little from a normal run; memorising a handful of answers word for word shows that
    the whole machinery — format, labels, LoRA, stop tokens, chat — works. Returns (merged model, tokenizer, records, the trainer's log history).
    """
    import torch
    from transformers import Trainer

    from .formatting import tokenize_records
    from .lora import ALL_LINEAR_TARGETS, lora_config
    from .training import add_lora, collator, training_arguments

    train_path, _ = ensure_splits(profile)
    singles = [r for r in load_records(train_path) if "messages" not in r]
    records = sorted(singles, key=lambda r: len(r["output"]) + len(r["input"]) + len(r.get("system", "")))[:n_records]
    native = ensure_native_model(profile)
    tokenizer = load_tokenizer(native)
    torch.manual_seed(seed)
    model = add_lora(load_model(native, dtype=torch.float32),
                     lora_config(r=16, alpha=32, dropout=0.0, target_modules=ALL_LINEAR_TARGETS))
    features, _ = tokenize_records(records, tokenizer, max_length=profile.max_length)
    args = training_arguments(profile.workdir / "runs" / f"{profile.name}-memorise", save_strategy="no",
                              per_device_train_batch_size=n_records, num_train_epochs=epochs, learning_rate=1e-2,
                              warmup_steps=0, logging_steps=max(1, epochs // 10), disable_tqdm=True, seed=seed)
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator(tokenizer),
                      processing_class=tokenizer)
    trainer.train()
    return model.merge_and_unload().eval(), tokenizer, records, trainer.state.log_history


def load_finetuned(profile: Profile, merge: bool = True, **model_kwargs: Any):
    """Base model + the lesson-05 adapter (merged into the weights by default, for fast chat)."""
    from peft import PeftModel

    native = ensure_native_model(profile)
    adapter = ensure_adapter(profile)
    model = PeftModel.from_pretrained(load_model(native, **model_kwargs), str(adapter))
    if merge:
        model = model.merge_and_unload()
    return model.eval(), load_tokenizer(native)


__all__ = ["ConversionError", "download_chatglm3", "ensure_adapter", "ensure_base_model", "ensure_native_model",
           "ensure_splits", "load_finetuned", "memorise", "split_source", "train_adapter"]
