"""Did the fine-tune help? Held-out loss on reply tokens, generated answers, and a safety check (lesson 07)."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .data import Record, is_crisis_reply, is_referral, to_messages
from .formatting import IGNORE, tokenize_records
from .generate import GenerationSettings, generate_batch
from .tokenizer import ChatGLM3Tokenizer
from .training import collator


@torch.no_grad()
def heldout_loss(model: Any, tokenizer: ChatGLM3Tokenizer, records: Sequence[Record], max_length: int = 1024,
                 batch_size: int = 4, progress: bool = True) -> dict[str, float]:
    """Mean cross-entropy over the trained (reply) tokens of ``records``, and its perplexity."""
    ds, _ = tokenize_records(records, tokenizer, max_length)
    collate = collator(tokenizer)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(ds), batch_size), desc="held-out loss", disable=not progress):
        rows = [ds[j] for j in range(start, min(start + batch_size, len(ds)))]
        batch = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]).to(model.device)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())  # the model shifts labels by one
        total += model(**batch).loss.float().item() * n
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def prompts_and_references(records: Sequence[Record]) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Each record minus its final reply (the prompt), and that reply (the reference)."""
    convs = [to_messages(r) for r in records]
    return [c[:-1] for c in convs], [c[-1]["content"] for c in convs]


def adapter_off(model: Any):
    """Context in which a PEFT model answers as its base model (no second copy of the weights)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def answers(model: Any, tokenizer: ChatGLM3Tokenizer, prompts: Sequence[list[dict[str, str]]],
            settings: GenerationSettings | None = None, batch_size: int = 8, base: bool = False,
            fast: bool | None = None) -> list[str]:
    """Greedy answers for every prompt; ``base=True`` switches the LoRA adapter off (``fast``: see
    :func:`glmlora.generate.generate_batch`)."""
    settings = settings or GenerationSettings(do_sample=False, max_new_tokens=128)
    with adapter_off(model) if base else contextlib.nullcontext():
        return generate_batch(model, tokenizer, prompts, settings, batch_size=batch_size, fast=fast)


def crisis_indices(references: Sequence[str]) -> list[int]:
    """Held-out examples whose reference answer is a crisis referral (it names a hotline)."""
    return [i for i, ref in enumerate(references) if is_crisis_reply(ref)]


def referral_rate(texts: Sequence[str]) -> float:
    """Share of answers that point to professional help, by the keyword rule of ``glmlora.data``."""
    return sum(map(is_referral, texts)) / len(texts) if texts else float("nan")
