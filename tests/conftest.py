"""Shared fixtures: one tiny ChatGLM3 checkpoint in the original layout, built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmlora.chatglm3 import read_shard, weight_files
from glmlora.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-chatglm3")


@pytest.fixture(scope="session")
def tiny_config(tiny_original) -> dict:
    return json.loads((tiny_original / "config.json").read_text())


@pytest.fixture(scope="session")
def tiny_state(tiny_original) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(tiny_original):
        sd.update(read_shard(f))
    return sd


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a checkpoint a test may break."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="session")
def memorised(tiny_original, tmp_path_factory):
    """A LoRA trained hard on a few short records of the bundled set: (model, tokenizer, records, trainer)."""
    from transformers import Trainer

    from glmlora import load_model, load_tokenizer
    from glmlora.chatglm3 import ensure_native
    from glmlora.data import load_records, sample_data_path, to_messages
    from glmlora.formatting import tokenize_records
    from glmlora.lora import ALL_LINEAR_TARGETS, lora_config
    from glmlora.training import add_lora, collator, training_arguments

    singles = [r for r in load_records(sample_data_path()) if "messages" not in r]
    records = sorted(singles, key=lambda r: len(r["output"]) + len(r["input"]) + len(r.get("system", "")))[:6]
    native = ensure_native(tiny_original)
    tok = load_tokenizer(native)
    torch.manual_seed(0)
    model = add_lora(load_model(native, dtype=torch.float32), lora_config(r=16, alpha=32, dropout=0.0,
                                                                          target_modules=ALL_LINEAR_TARGETS))
    ds, _ = tokenize_records(records, tok, max_length=128)
    args = training_arguments(tmp_path_factory.mktemp("run"), per_device_train_batch_size=6, num_train_epochs=150,
                              learning_rate=1e-2, logging_steps=5, save_strategy="no", warmup_steps=0,
                              disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator(tok), processing_class=tok)
    trainer.train()
    model.eval()
    return model, tok, records, trainer, [to_messages(r) for r in records]
