"""Records -> ``input_ids`` / ``labels`` with the official ChatGLM3 masking (lesson 04).

A token is a target when the token just before it belongs to an assistant message (DESIGN.md §2.5):
the ``"\\n"`` after ``<|assistant|>``, the reply, and the token that follows it (the next ``<|user|>``
or the final eos), so the model learns to answer *and to stop*.  Everything else is -100.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Sequence

from .data import Record, to_messages
from .tokenizer import ChatGLM3Tokenizer

IGNORE = -100


def build_example(messages: Sequence[dict[str, str]], tokenizer: ChatGLM3Tokenizer,
                  max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids and unshifted labels for one conversation (transformers shifts inside the model)."""
    ids = tokenizer.prefix_ids()
    owner = [False] * len(ids)  # does this token belong to an assistant message?
    for m in messages:
        part = tokenizer.build_message(m["role"], m["content"], m.get("metadata", ""))
        ids += part
        owner += [m["role"] == "assistant"] * len(part)
    ids.append(tokenizer.eos_token_id)
    owner.append(False)
    labels = [IGNORE] + [tok if owner[i - 1] else IGNORE for i, tok in enumerate(ids) if i > 0]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def process_func(example: Record, tokenizer: ChatGLM3Tokenizer, max_length: int = 1024) -> dict[str, Any]:
    """The course's ``process_func``: one record (single- or multi-turn) -> training features.

    Besides ``input_ids`` and ``labels`` it returns ``length`` (for length-grouped batches) and
    ``truncated`` (so the caller can report how many records were cut, instead of hiding it).
    """
    full = build_example(to_messages(example), tokenizer)
    out = build_example(to_messages(example), tokenizer, max_length)
    return {**out, "length": len(out["input_ids"]), "truncated": len(full["input_ids"]) > max_length}


@dataclass
class TokenizeReport:
    records: int
    kept: int
    truncated: int
    dropped_no_target: int
    tokens: int
    target_tokens: int

    def __str__(self) -> str:
        return (f"{self.records} records -> {self.kept} examples, {self.tokens} tokens "
                f"({self.target_tokens} trained); {self.truncated} truncated to max_length, "
                f"{self.dropped_no_target} dropped because truncation left no reply token to learn")


def tokenize_records(records: Sequence[Record], tokenizer: ChatGLM3Tokenizer, max_length: int = 1024):
    """A ``datasets.Dataset`` of training features plus a :class:`TokenizeReport` of what was cut.

    An example whose reply was cut off entirely has no target at all; training on it gives loss 0 or NaN,
    so it is dropped — and counted.
    """
    from datasets import Dataset

    feats = [process_func(r, tokenizer, max_length) for r in records]
    kept = [f for f in feats if any(x != IGNORE for x in f["labels"])]
    report = TokenizeReport(len(records), len(kept), sum(f["truncated"] for f in feats), len(feats) - len(kept),
                            sum(f["length"] for f in kept),
                            sum(sum(x != IGNORE for x in f["labels"]) for f in kept))
    columns = {k: [f[k] for f in kept] for k in ("input_ids", "labels", "length")}
    return Dataset.from_dict(columns), report


def label_spans(input_ids: Sequence[int], labels: Sequence[int],
                tokenizer: ChatGLM3Tokenizer) -> list[tuple[str, bool]]:
    """Consecutive runs of ``(decoded text, is_trained)``: the label mask made readable."""
    spans: list[tuple[list[int], bool]] = []
    for tok, lab in zip(input_ids, labels):
        trained = lab != IGNORE
        if spans and spans[-1][1] == trained and not _is_special(tok, tokenizer) and \
                not _is_special(spans[-1][0][-1], tokenizer):
            spans[-1][0].append(tok)
        else:
            spans.append(([tok], trained))
    return [(tokenizer.decode(ids), trained) for ids, trained in spans]


def _is_special(tok: int, tokenizer: ChatGLM3Tokenizer) -> bool:
    return tok >= tokenizer.sp.get_piece_size() or tok in (1, 2)


def render_mask_text(input_ids: Sequence[int], labels: Sequence[int], tokenizer: ChatGLM3Tokenizer) -> str:
    """Plain text with trained spans wrapped in ``⟦ ⟧`` (for terminals and tests)."""
    return "".join(f"⟦{t}⟧" if trained else t for t, trained in label_spans(input_ids, labels, tokenizer))


def render_mask_html(input_ids: Sequence[int], labels: Sequence[int], tokenizer: ChatGLM3Tokenizer) -> str:
    """HTML for a notebook: trained tokens on green, special tokens in grey boxes, the rest plain."""
    parts = []
    for text, trained in label_spans(input_ids, labels, tokenizer):
        style = "background:#c8f7c5;" if trained else ""
        if text in {*tokenizer.all_special_tokens, "[gMASK]", "sop"}:
            style += "border:1px solid #999;border-radius:3px;color:#555;padding:0 2px;"
        parts.append(f'<span style="{style}">{html.escape(text).replace(chr(10), "↵<br>")}</span>')
    legend = '<div style="font-size:90%">green = trained (label = token), plain = masked (label = -100)</div>'
    return legend + '<div style="font-family:monospace;line-height:1.6">' + "".join(parts) + "</div>"
