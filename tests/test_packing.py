"""Packing: rows fit, nothing is lost, and a packed row computes exactly what separate examples compute."""

from __future__ import annotations

import pytest
import torch

from glmlora import load_model, load_tokenizer
from glmlora.chatglm3 import ensure_native
from glmlora.data import load_records, sample_data_path
from glmlora.fast import apply_liger, liger_available
from glmlora.formatting import IGNORE, tokenize_records
from glmlora.packing import PackedDataset, pack_rows


def test_pack_rows_fits_every_example_once():
    lengths = [5, 9, 3, 7, 2, 8, 1]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4  # 35 tokens need at least 4 rows of 10
    with pytest.raises(ValueError, match="longer than row_tokens=4"):
        pack_rows([3, 5], 4)


@pytest.fixture(scope="module")
def tiny(tiny_original):
    native = ensure_native(tiny_original)
    return load_model(native, dtype=torch.float32).eval(), load_tokenizer(native)


def test_packed_row_logits_equal_separate_examples(tiny):
    model, tok = tiny
    ds, _ = tokenize_records(load_records(sample_data_path())[:6], tok, max_length=200)
    packed = PackedDataset(ds, row_tokens=512)
    row = packed[0]
    assert row["input_ids"].shape == (512,) == row["position_ids"].shape
    with torch.no_grad():
        together = model(input_ids=row["input_ids"][None], position_ids=row["position_ids"][None],
                         use_cache=False).logits[0]  # with a cache, transformers ignores packing
        start = 0
        for j in packed.rows[0]:
            ids = torch.tensor(ds[j]["input_ids"])
            alone = model(ids[None]).logits[0]
            assert (together[start:start + len(ids)] - alone).abs().max().item() < 1e-4
            start += len(ids)


def test_packed_rows_keep_every_label_and_mask_the_tail(tiny):
    _, tok = tiny
    ds, _ = tokenize_records(load_records(sample_data_path())[:40], tok, max_length=300)
    packed = PackedDataset(ds, row_tokens=1024, seed=3)
    targets = sum(int((packed[i]["labels"] != IGNORE).sum()) for i in range(len(packed)))
    assert targets == sum(sum(x != IGNORE for x in lab) for lab in ds["labels"])
    assert packed.real_tokens == sum(ds["length"]) and 0.8 < packed.fill <= 1.0
    assert "rows of 1024 tokens" in repr(packed)


def test_liger_is_skipped_without_cuda(tiny):
    model, _ = tiny
    if not torch.cuda.is_available():
        assert not liger_available() and apply_liger(model) is False


def test_training_attention_on_this_machine():
    from glmlora.fast import speed_up, training_attention

    if not torch.cuda.is_available():
        assert training_attention() == "sdpa" and speed_up(torch.nn.Linear(2, 2)) == []
