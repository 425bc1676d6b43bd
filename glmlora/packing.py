"""Packing: several short examples in one fixed-length row, with no attention across them (lesson 05).

Counselling exchanges are 100–500 tokens; a GPU is only busy with thousands of tokens per step. Packing
fills rows of ``row_tokens`` (first-fit decreasing), restarts ``position_ids`` at every example, and
passes no attention mask — transformers then builds a block-diagonal causal mask from the position ids,
so no token ever sees another example. Every row has the same shape: no padding compute beyond the row's
tail, no allocator churn from shapes that change every step.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .formatting import IGNORE


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Group example indices into rows whose total length fits ``row_tokens`` (first-fit decreasing)."""
    too_long = [i for i, n in enumerate(lengths) if n > row_tokens]
    if too_long:
        raise ValueError(f"{len(too_long)} example(s) are longer than row_tokens={row_tokens} (e.g. #{too_long[0]}: "
                         f"{lengths[too_long[0]]} tokens); truncate them (max_length) or raise row_tokens")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        slot = next((r for r, space in enumerate(free) if space >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            free.append(row_tokens - lengths[i])
        else:
            rows[slot].append(i)
            free[slot] -= lengths[i]
    return rows


class PackedDataset(Dataset):
    """Rows of exactly ``row_tokens`` tokens built from tokenized examples (``input_ids``, ``labels``)."""

    def __init__(self, examples: Any, row_tokens: int, seed: int = 0, pad_id: int = 0) -> None:
        self.ids = [list(x) for x in examples["input_ids"]]
        self.labels = [list(x) for x in examples["labels"]]
        self.row_tokens, self.pad_id = row_tokens, pad_id
        self.rows = pack_rows([len(x) for x in self.ids], row_tokens)
        random.Random(seed).shuffle(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels, pos = [], [], []
        for j in self.rows[i]:
            ids += self.ids[j]
            labels += self.labels[j]  # each example starts with [gMASK] (label -100): nothing leaks across
            pos += range(len(self.ids[j]))
        pad = self.row_tokens - len(ids)
        ids += [self.pad_id] * pad
        labels += [IGNORE] * pad
        pos += range(pad)  # the tail is its own "example", masked out of the loss
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}

    @property
    def real_tokens(self) -> int:
        return sum(len(x) for x in self.ids)

    @property
    def fill(self) -> float:
        """Share of the computed positions that are real tokens."""
        return self.real_tokens / (len(self.rows) * self.row_tokens) if self.rows else 0.0

    def __repr__(self) -> str:
        return (f"PackedDataset({len(self.ids)} examples -> {len(self)} rows of {self.row_tokens} tokens, "
                f"{self.fill:.1%} real tokens)")
