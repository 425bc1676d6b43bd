"""Merged export: plain transformers loads it (no glmlora, no peft) and computes the fine-tuned function."""

from __future__ import annotations

import copy
import json

import torch

from glmlora.chatglm3 import read_shard, weight_files
from glmlora.export import export_merged, export_merged_original

from conftest import plain_transformers_logits


def test_merged_export_loads_with_plain_transformers(memorised, tmp_path):
    model, tok, *_ = memorised
    model = copy.deepcopy(model)  # merging changes the model in place; keep the shared fixture intact
    ids = torch.arange(3, 30).view(1, -1)
    with torch.no_grad():
        want = model(ids).logits
    out = export_merged(model, tok, tmp_path / "merged")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.stop_ids
    assert (out / "tokenizer.model").is_file() and list(out.glob("*.safetensors"))
    assert (plain_transformers_logits(out, ids, tmp_path) - want).abs().max().item() < 1e-4


def test_merged_export_in_the_original_layout(memorised, tmp_path):
    model, tok, *_ = memorised
    out = export_merged_original(copy.deepcopy(model), tok, tmp_path / "orig")
    keys = set()
    for f in weight_files(out):
        keys |= read_shard(f).keys()
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in keys
    assert json.loads((out / "config.json").read_text())["model_type"] == "chatglm"
