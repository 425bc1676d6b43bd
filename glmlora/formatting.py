"""Records -> ``input_ids`` / ``labels`` with the official ChatGLM3 masking (lesson 04).

A token is a target when the token just before it belongs to an assistant message (docs/design.md §2.5):
the ``"\\n"`` after ``<|assistant|>``, the reply, and the token that follows it (the next ``<|user|>``
or the final eos), so the model learns to answer *and to stop*.  Everything else is -100.

A dialogue longer than ``max_length`` is not cut off, which would silently drop its later replies: it
becomes several *windows* (:func:`record_windows`). Each window starts with the system message, ends on
an assistant turn, and trains the exchanges no earlier window trained, after as much of the conversation
before them as fits (as untrained context). So every reply token is trained in exactly one window; only
an exchange that alone exceeds ``max_length`` is shortened, and :class:`TokenizeReport` counts it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Sequence

from .data import Record, to_messages
from .tokenizer import ChatGLM3Tokenizer

IGNORE = -100
#: Up to this share of a later window is reserved for the conversation before its trained exchanges, so a
#: reply deep in a long dialogue is learnt with its history in view, at the price of computing that history
#: once more. 0 gives the fewest windows, with later replies trained after little or no history.
CONTEXT_SHARE = 0.5
#: The smallest ``max_length`` that leaves room for a prompt and a reply.
MIN_LENGTH = 16


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
    labels = _labels(ids, owner)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def _labels(ids: Sequence[int], owner: Sequence[bool]) -> list[int]:
    """A token is a target when the token before it belongs to a trained assistant message."""
    return [IGNORE] + [tok if owner[i - 1] else IGNORE for i, tok in enumerate(ids) if i > 0]


def process_func(example: Record, tokenizer: ChatGLM3Tokenizer, max_length: int = 1024) -> dict[str, Any]:
    """The course's ``process_func``: one record (single- or multi-turn) -> training features.

    Besides ``input_ids`` and ``labels`` it returns ``length`` (for length-grouped batches) and
    ``truncated`` (the record was cut at ``max_length``, as the original tutorial cuts).
    :func:`tokenize_records` gives the same features for every record that fits, and windows for the others.
    """
    full = build_example(to_messages(example), tokenizer)
    out = build_example(to_messages(example), tokenizer, max_length)
    return {**out, "length": len(out["input_ids"]), "truncated": len(full["input_ids"]) > max_length}


# ---------------------------------------------------------------------------------------------- windows
@dataclass
class _Block:
    """The messages up to and including one assistant turn (normally user + assistant), tokenized once."""

    prompt: list[int]  # what comes before the reply: normally <|user|> "\n" content
    reply: list[int]  # <|assistant|> "\n" content
    header: int  # tokens at the start of ``prompt`` that a cut keeps: the role token and the metadata line

    def __len__(self) -> int:
        return len(self.prompt) + len(self.reply)


@dataclass
class Window:
    """One training example cut from a record, and which of its exchanges (assistant turns) it trains."""

    input_ids: list[int]
    labels: list[int]
    trained: range  # the exchanges whose reply (and the token after it) are targets here
    context: range = range(0)  # the earlier exchanges before them, untrained
    truncated: bool = False  # an exchange (or the system message) was shortened to fit

    @property
    def targets(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def _blocks(messages: Sequence[dict[str, str]], tokenizer: ChatGLM3Tokenizer) -> tuple[list[int], list[_Block]]:
    """``[gMASK] sop`` + the system message, and one block per assistant turn."""
    head, rest = tokenizer.prefix_ids(), list(messages)
    if rest and rest[0]["role"] == "system":
        head += tokenizer.build_message("system", rest[0]["content"], rest[0].get("metadata", ""))
        rest = rest[1:]
    blocks: list[_Block] = []
    prompt: list[int] = []
    header = 0
    for m in rest:
        part = tokenizer.build_message(m["role"], m["content"], m.get("metadata", ""))
        if m["role"] == "assistant":
            blocks.append(_Block(prompt, part, header))
            prompt, header = [], 0
        else:
            header = header or len(tokenizer.build_message(m["role"], "", m.get("metadata", "")))
            prompt = prompt + part
    if prompt or not blocks:
        raise ValueError("a training conversation must end with an assistant message (the reply to learn)")
    return head, blocks


def _assemble(head: list[int], context: Sequence[_Block], trained: Sequence[_Block], end: int) -> tuple[list, list]:
    """Ids and labels of one window: the context untrained; each trained reply and the token after it targets."""
    ids, owner = list(head), [False] * len(head)
    for b in context:
        ids += b.prompt + b.reply
        owner += [False] * len(b)
    for b in trained:
        ids += b.prompt + b.reply
        owner += [False] * len(b.prompt) + [True] * len(b.reply)
    ids.append(end)
    owner.append(False)
    return ids, _labels(ids, owner)


def _shortened(head: list[int], block: _Block, end: int, max_length: int) -> tuple[list, list]:
    """An exchange longer than the window: the prompt loses its oldest text (its role token stays), keeping at
    least half of the room when the reply is long; the reply is cut at the end of the window."""
    room = max_length - len(head)
    keep = max(block.header + 1, min(len(block.prompt), max(room - len(block.reply) - 1, room // 2)))
    prompt = block.prompt if keep >= len(block.prompt) else \
        block.prompt[:block.header] + block.prompt[len(block.prompt) - (keep - block.header):]
    ids, labels = _assemble(head, [], [_Block(prompt, block.reply, block.header)], end)
    return ids[:max_length], labels[:max_length]


def _fitted_head(head: list[int], max_length: int) -> list[int]:
    """The prefix and system message, cut at a quarter of the window if they would take more than half."""
    return head if len(head) <= max_length // 2 else head[:max_length // 4]


def record_windows(record: Record, tokenizer: ChatGLM3Tokenizer, max_length: int) -> list[Window]:
    """The windows of one record (one window, equal to :func:`process_func`'s features, when it fits).

    Greedy: a window trains the next untrained exchanges that fit in what is left after reserving
    ``CONTEXT_SHARE`` of it (or less, if less came before) for the history, then fills the rest with whole
    earlier exchanges, newest first. The first window has no history to keep and trains all it can.
    """
    if max_length < MIN_LENGTH:
        raise ValueError(f"max_length {max_length} is too small to hold a prompt and a reply (at least {MIN_LENGTH})")
    full_head, blocks = _blocks(to_messages(record), tokenizer)
    head = _fitted_head(full_head, max_length)
    head_cut = len(head) < len(full_head)
    n = len(blocks)
    ends = [tokenizer.eos_token_id if k + 1 == n else (blocks[k + 1].prompt or blocks[k + 1].reply)[0]
            for k in range(n)]  # the token after each reply in the whole conversation
    budget = max_length - len(head) - 1  # the window's last token is the stop after its last reply
    windows, start = [], 0
    while start < n:
        if len(blocks[start]) > budget:
            ids, labels = _shortened(head, blocks[start], ends[start], max_length)
            windows.append(Window(ids, labels, range(start, start + 1), truncated=True))
            start += 1
            continue
        history = sum(len(b) for b in blocks[:start])
        cap = budget - min(history, int(budget * CONTEXT_SHARE))
        stop, used = start + 1, len(blocks[start])
        while stop < n and used + len(blocks[stop]) <= cap:
            used += len(blocks[stop])
            stop += 1
        first = start
        while first > 0 and used + len(blocks[first - 1]) <= budget:
            first -= 1
            used += len(blocks[first])
        ids, labels = _assemble(head, blocks[first:start], blocks[start:stop], ends[stop - 1])
        windows.append(Window(ids, labels, range(start, stop), range(first, start), truncated=head_cut))
        start = stop
    return windows


def reply_tokens(record: Record, tokenizer: ChatGLM3Tokenizer) -> int:
    """How many target tokens the whole record has: per reply its "\\n", its content and the stop after it."""
    return sum(len(b.reply) for b in _blocks(to_messages(record), tokenizer)[1])


@dataclass
class TokenizeReport:
    """What :func:`tokenize_records` made of the records; ``print(report)`` gives one line."""

    records: int
    windows: int
    split_records: int  # records that needed more than one window
    reply_tokens: int  # target tokens of all records, uncut
    trained_tokens: int  # target tokens in the windows
    truncated_turns: int  # exchanges shortened because one alone exceeds max_length
    tokens: int  # all tokens of all windows: what training computes on
    max_length: int

    @property
    def coverage(self) -> float:
        return self.trained_tokens / self.reply_tokens if self.reply_tokens else 1.0

    # Lesson 04's earlier names for the same counts.
    @property
    def kept(self) -> int:
        return self.windows

    @property
    def target_tokens(self) -> int:
        return self.trained_tokens

    @property
    def truncated(self) -> int:
        return self.truncated_turns

    @property
    def dropped_no_target(self) -> int:
        """Windows never lack a target (each trains at least one reply token), so none is dropped."""
        return 0

    def __str__(self) -> str:
        split = f" ({self.split_records} long dialogues split)" if self.split_records else ""
        return (f"{self.records} examples in -> {self.windows} windows{split}; reply tokens trained "
                f"{self.trained_tokens:,} / {self.reply_tokens:,} ({100 * self.coverage:.1f} %); "
                f"{self.truncated_turns} turns truncated (longer than max_length {self.max_length} alone); "
                f"{self.tokens:,} tokens in all")


def tokenize_records(records: Sequence[Record], tokenizer: ChatGLM3Tokenizer, max_length: int = 1024):
    """A ``datasets.Dataset`` of training windows plus a :class:`TokenizeReport` of what was trained.

    Columns: ``input_ids``, ``labels``, ``length`` and ``record`` (the index of the record a window comes from).
    """
    from datasets import Dataset

    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "record": []}
    total = trained = truncated = split = 0
    for i, record in enumerate(records):
        windows = record_windows(record, tokenizer, max_length)
        total += reply_tokens(record, tokenizer)
        split += len(windows) > 1
        for w in windows:
            columns["input_ids"].append(w.input_ids)
            columns["labels"].append(w.labels)
            columns["length"].append(len(w.input_ids))
            columns["record"].append(i)
            trained += w.targets
            truncated += w.truncated
    report = TokenizeReport(len(records), len(columns["length"]), split, total, trained, truncated,
                            sum(columns["length"]), max_length)
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
