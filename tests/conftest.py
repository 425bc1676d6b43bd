"""Shared fixtures: one tiny ChatGLM3 checkpoint in the original layout, built once per session."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def plain_transformers_logits(model_dir: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Logits from a fresh interpreter that loads ``model_dir`` with plain transformers (no glmlora, no peft)."""
    import subprocess
    import sys

    ids_file, out_file = tmp_path / "ids.pt", tmp_path / "plain_logits.pt"
    torch.save(ids, ids_file)
    script = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32)\n"
        f"torch.save(m(torch.load({str(ids_file)!r})).logits, {str(out_file)!r})\n"
        "assert 'glmlora' not in sys.modules and 'peft' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    return torch.load(out_file)


@contextmanager
def private_workdir(path: Path) -> Iterator[None]:
    """GLMLORA_WORKDIR pointed at ``path`` for the duration (session fixtures cannot use monkeypatch)."""
    old = os.environ.get("GLMLORA_WORKDIR")
    os.environ["GLMLORA_WORKDIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GLMLORA_WORKDIR")
        else:
            os.environ["GLMLORA_WORKDIR"] = old


@pytest.fixture(scope="session")
def memorised_once(tmp_path_factory):
    """glmlora.pipeline.memorise on the tiny profile, trained once: (merged model, tokenizer, records, log,
    conversations). Never handed to a test: see ``memorised``."""
    from glmlora.data import to_messages
    from glmlora.pipeline import memorise
    from glmlora.profiles import select_profile

    with private_workdir(tmp_path_factory.mktemp("memorise")):
        model, tok, records, log = memorise(select_profile("tiny"))
    return model, tok, records, log, [to_messages(r) for r in records]


@pytest.fixture
def memorised(memorised_once):
    """A fresh copy of the memorised model for each test (0.9 M parameters: a copy takes milliseconds).

    The decode loop changes the model it runs for good (fused q/k/v copies, cached decode steps and
    static caches), and merging or exporting changes weights: with one shared model every
    later test would depend on what earlier tests did, and a "plain generate" reference would not be plain."""
    import copy

    model, *rest = memorised_once
    return (copy.deepcopy(model), *rest)
