"""Instruction records: reading, validating, splitting and summarising (lesson 03).

Two record shapes are accepted, one JSON object per line:

* single-turn ``{"system": ..., "input": ..., "output": ...}`` (``system`` may be empty or absent);
* multi-turn ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.

Every problem is reported with file, line and field; nothing is dropped silently.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

Record = dict[str, Any]
SINGLE_FIELDS = {"system", "input", "output"}
_CJK = re.compile(r"[\u4e00-\u9fff]")
#: Words that mark a crisis reply: a hotline is named.
HOTLINE_WORDS = ("热线", "12356", "400-161-9995", "hotline", "988", "Samaritans", "116 123")
#: Words that mark a reply as a referral to professional help (the transparent rule of the safety check).
REFERRAL_WORDS = HOTLINE_WORDS + ("专业", "心理咨询师", "医生", "急救", "professional", "counselor", "counsellor",
                                  "therapist", "doctor", "emergency")


class DataError(ValueError):
    """Malformed records; the message lists every problem as ``file:line: field 'x': what``."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} problem(s) in the data:\n{shown}{more}")


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: field '{self.field}': {self.message}"


def sample_data_path() -> Path:
    """The bundled counselling sample set written for this course (Chinese and English)."""
    return Path(__file__).parent / "data" / "counsel_sample.jsonl"


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value.strip():
        return "is empty"
    return None


def check_record(obj: Any) -> list[tuple[str, str]]:
    """``(field, message)`` for every problem of one parsed record; empty when it is valid."""
    if not isinstance(obj, dict):
        return [("<record>", f"must be a JSON object, got {type(obj).__name__}")]
    if "messages" in obj:
        extra = set(obj) - {"messages"}
        problems = [(k, "unknown field next to 'messages'") for k in sorted(extra)]
        return problems + _check_messages(obj["messages"])
    problems = [(k, "unknown field (expected system, input, output — or messages)")
                for k in sorted(set(obj) - SINGLE_FIELDS)]
    for field in ("input", "output"):
        if field not in obj:
            problems.append((field, "is missing"))
        elif (msg := _text_problem(obj[field])) is not None:
            problems.append((field, msg))
    if "system" in obj and not isinstance(obj["system"], str):
        problems.append(("system", f"must be a string, got {type(obj['system']).__name__}"))
    return problems


def _check_messages(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        return [("messages", "must be a non-empty list")]
    problems = []
    expected = "user"
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            problems.append((where, "must be an object with exactly 'role' and 'content'"))
            continue
        role = m["role"]
        if role == "system" and i == 0:
            pass
        elif role != expected:
            problems.append((f"{where}.role", f"is {role!r}, expected {expected!r} (system first, then user and "
                                              f"assistant alternating)"))
        else:
            expected = "assistant" if role == "user" else "user"
        if (msg := _text_problem(m["content"])) is not None:
            problems.append((f"{where}.content", msg))
    if not problems and messages[-1]["role"] != "assistant":
        problems.append(("messages", "must end with an assistant message (the reply to learn)"))
    return problems


def read_jsonl(path: str | Path) -> tuple[list[Record], list[Problem], int]:
    """All valid records, the problems of the others, and the number of blank lines passed over."""
    path = Path(path)
    records, problems, blank = [], [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                blank += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Problem(str(path), lineno, "<json>", f"not valid JSON ({e.msg}, column {e.colno})"))
                continue
            found = check_record(obj)
            problems += [Problem(str(path), lineno, f, m) for f, m in found]
            if not found:
                records.append(obj)
    return records, problems, blank


def load_records(path: str | Path) -> list[Record]:
    """Every record of a JSONL file; raises :class:`DataError` listing all problems if any."""
    records, problems, _ = read_jsonl(path)
    if problems:
        raise DataError(problems)
    return records


def to_messages(record: Record) -> list[dict[str, str]]:
    """Chat messages for either record shape; an empty ``system`` field means no system message."""
    if "messages" in record:
        return [dict(m) for m in record["messages"]]
    msgs = [{"role": "system", "content": record["system"]}] if record.get("system", "").strip() else []
    return msgs + [{"role": "user", "content": record["input"]}, {"role": "assistant", "content": record["output"]}]


def record_texts(record: Record) -> list[str]:
    return [m["content"] for m in to_messages(record)]


def language(record: Record) -> str:
    """``"zh"`` if the user's text contains Chinese characters, else ``"en"``."""
    users = " ".join(m["content"] for m in to_messages(record) if m["role"] == "user")
    return "zh" if _CJK.search(users) else "en"


def is_referral(text: str) -> bool:
    """The transparent keyword rule of the safety check: does ``text`` point to professional help?"""
    low = text.lower()
    return any(w.lower() in low for w in REFERRAL_WORDS)


def is_crisis_reply(text: str) -> bool:
    """Does the reply name a hotline? (How the bundled data answers crisis messages.)"""
    low = text.lower()
    return any(w.lower() in low for w in HOTLINE_WORDS)


def kind(record: Record) -> str:
    return "multi" if "messages" in record else "single"


def stratum(record: Record) -> str:
    crisis = is_crisis_reply(to_messages(record)[-1]["content"])
    return f"{language(record)}-{kind(record)}-{'crisis' if crisis else 'other'}"


def split_records(records: list[Record], val_fraction: float = 0.1, seed: int = 42) -> tuple[list[Record], list[Record]]:
    """A reproducible train/validation split, stratified by language, shape and crisis replies."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(stratum(r), []).append(r)
    rng = random.Random(seed)
    train, val = [], []
    for key in sorted(groups):
        items = groups[key][:]
        rng.shuffle(items)
        n_val = round(len(items) * val_fraction) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def write_jsonl(records: Iterable[Record], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def summary(records: list[Record]) -> dict[str, Any]:
    """Counts by shape and language, exchanges and crisis replies — the table lesson 03 shows."""
    exchanges = sum(sum(m["role"] == "assistant" for m in to_messages(r)) for r in records)
    return {
        "records": len(records),
        "by_kind": dict(Counter(kind(r) for r in records)),
        "by_language": dict(Counter(language(r) for r in records)),
        "exchanges": exchanges,
        "crisis_replies": sum(stratum(r).endswith("crisis") for r in records),
        "with_system": sum(to_messages(r)[0]["role"] == "system" for r in records),
    }
