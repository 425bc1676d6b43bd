"""Instruction records: reading, validating, splitting and summarising (lesson 03).

Two record shapes are accepted, one JSON object per line:

* single-turn ``{"system": ..., "input": ..., "output": ...}`` (``system`` may be empty or absent);
* multi-turn ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.

Every problem is reported with file, line and field; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    """One problem: ``line`` 0 means the file as a whole, ``field`` None a line that is not a record."""

    path: str
    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: field '{self.field}': {self.message}" if self.field else f"{where}: {self.message}"


def sample_data_path() -> Path:
    """The bundled counselling sample set written for this course (Chinese and English)."""
    return Path(__file__).parent / "data" / "counsel_sample.jsonl"


#: Control characters that may stand in text: tab, newline, carriage return. Any other is invisible noise
#: (a copy from a PDF or a terminal) that the tokenizer would learn as if it were text.
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value.strip():
        return "is empty"
    return _character_problem(value)


def _character_problem(text: str) -> str | None:
    """Lone surrogates (half of a ``\\ud83d\\ude00`` escape) cannot be written as UTF-8; control characters
    are invisible. Both are reported with their position rather than dropped or crashing later."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            return (f"contains an unpaired surrogate \\u{ord(ch):04x} at character {i} (half of an escaped "
                    f"emoji or character pair); fix or remove that escape")
        if (ch < " " or "\x7f" <= ch <= "\x9f") and ch not in _ALLOWED_CONTROLS:
            return f"contains the control character U+{ord(ch):04X} at character {i} (invisible); remove it"
    return None


#: Fields of other data formats, with what to write instead (a hint beats "unknown field").
_FOREIGN_FIELDS = {
    "history": "multi-turn history is written as {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}",
    "instruction": "an Alpaca-style record: put the instruction into 'input' (or a fixed one into 'system')",
    "conversations": "a ShareGPT-style record: write {\"messages\": [{\"role\": \"user\", \"content\": ...}, ...]}",
    "prompt": "the question goes into 'input'", "query": "the question goes into 'input'",
    "question": "the question goes into 'input'", "response": "the reply goes into 'output'",
    "answer": "the reply goes into 'output'", "completion": "the reply goes into 'output'",
}
_ROLES = ("system", "user", "assistant")


def _unknown_field(name: str) -> str:
    hint = _FOREIGN_FIELDS.get(name)
    return f"unknown field ({hint})" if hint else "unknown field (expected system, input, output — or messages)"


def check_record(obj: Any) -> list[tuple[str, str]]:
    """``(field, message)`` for every problem of one parsed record; empty when it is valid."""
    if not isinstance(obj, dict):
        hint = " (one record per line, not a list of records)" if isinstance(obj, list) else ""
        return [("<record>", f"must be a JSON object, got {type(obj).__name__}{hint}")]
    problems = [(k, "appears more than once in this record (JSON would keep only the last); keep one")
                for k in getattr(obj, "duplicates", ())]
    if "messages" in obj:
        extra = set(obj) - {"messages"}
        problems += [(k, "unknown field next to 'messages'") for k in sorted(extra)]
        return problems + _check_messages(obj["messages"])
    problems += [(k, _unknown_field(k)) for k in sorted(set(obj) - SINGLE_FIELDS)]
    for field in ("input", "output"):
        if field not in obj:
            problems.append((field, "is missing"))
        elif (msg := _text_problem(obj[field])) is not None:
            problems.append((field, msg))
    if "system" in obj:
        system = obj["system"]
        msg = _character_problem(system) if isinstance(system, str) else \
            f"must be a string, got {type(system).__name__}"
        if msg is not None:
            problems.append(("system", msg))
    return problems


def _check_messages(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        return [("messages", "must be a non-empty list")]
    problems = []
    expected = "user"
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            hint = " (ShareGPT's 'from'/'value' are written 'role'/'content')" if isinstance(m, dict) and \
                {"from", "value"} & set(m) else ""
            problems.append((where, f"must be an object with exactly 'role' and 'content'{hint}"))
            continue
        problems += [(f"{where}.{k}", "appears more than once in this message (JSON would keep only the last)")
                     for k in getattr(m, "duplicates", ())]
        role = m["role"]
        if role == "system" and i == 0:
            pass
        elif role != expected:
            known = "" if role in _ROLES else f"; roles are {', '.join(_ROLES)}"
            problems.append((f"{where}.role", f"is {role!r}, expected {expected!r} (system first, then user and "
                                              f"assistant alternating{known})"))
        else:
            expected = "assistant" if role == "user" else "user"
        if (msg := _text_problem(m["content"])) is not None:
            problems.append((f"{where}.content", msg))
    if not problems and messages[-1]["role"] != "assistant":
        problems.append(("messages", "must end with an assistant message (the reply to learn)"))
    return problems


class _Object(dict):
    """A parsed JSON object that remembers the keys it saw twice (``json`` alone keeps the last silently)."""

    duplicates: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _plain(value: Any) -> Any:
    """Parsed JSON with every ``_Object`` turned back into a plain dict."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_GB18030_FIX = ("convert it once: iconv -f GB18030 -t UTF-8 {name} > {stem}.utf8.jsonl (or in Python: "
                "Path('{stem}.utf8.jsonl').write_text(Path('{name}').read_text(encoding='gb18030'), "
                "encoding='utf-8'))")


def read_text(path: str | Path) -> str:
    """The file as text, or a :class:`DataError` saying where and how to fix it.

    UTF-8 only, with or without a byte-order mark (Windows Notepad writes one; it is skipped). Bytes that are
    not UTF-8 are NOT guessed at: a GBK/GB18030 file (Chinese Windows) would decode, but so would a file in
    any other encoding, into plausible-looking wrong characters. The error names the line and byte offset of
    the first bad byte and, when the whole file reads as GB18030, gives the one-line conversion.
    """
    path = Path(path)
    if not path.exists():
        raise DataError([Problem(str(path), 0, None, "no such file")])
    if not path.is_file():
        raise DataError([Problem(str(path), 0, None, "is not a file (a JSONL file of records is expected)")])
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError([Problem(str(path), 0, None, "is UTF-16 (Notepad's 'Unicode'); save it as UTF-8")])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError([_encoding_problem(path, data, e)]) from None


def _encoding_problem(path: Path, data: bytes, error: UnicodeDecodeError) -> Problem:
    line = data.count(b"\n", 0, error.start) + 1
    offset = error.start - (data.rfind(b"\n", 0, error.start) + 1)
    bad = sum(1 for raw in data.split(b"\n") if not _is_utf8(raw))
    try:
        data.decode("gb18030")
        fix = "it reads as GBK/GB18030 (Chinese Windows); " + _GB18030_FIX.format(name=path.name, stem=path.stem)
    except UnicodeDecodeError:
        fix = "save it as UTF-8"
    return Problem(str(path), line, None, f"not UTF-8: byte {data[error.start:error.start + 1]!r} at byte offset "
                                         f"{offset} of the line (offset {error.start} in the file); {bad} line(s) "
                                         f"have such bytes; {fix}")


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def read_jsonl(path: str | Path) -> tuple[list[Record], list[Problem], int]:
    """All valid records, the problems of the others, and the number of blank lines passed over.

    A file with no record at all (empty, or blank lines only) is a problem, and so is a file that is one
    JSON document (an array, or a pretty-printed object) instead of one record per line.
    """
    path = Path(path)
    text = read_text(path)
    lines = text.split("\n")
    records, problems, blank = [], [], 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            blank += lineno < len(lines) or bool(line)  # the newline that ends the file opens no blank line
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_object, strict=False)
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), lineno, "<json>", f"not valid JSON ({e.msg}, column {e.colno})"))
            continue
        found = check_record(obj)
        problems += [Problem(str(path), lineno, f, m) for f, m in found]
        if not found:
            records.append(_plain(obj))
    if not records and not problems:
        what = "is empty (0 bytes)" if not text else "contains only blank lines"
        problems.append(Problem(str(path), 0, None, f"{what}: expected one JSON record per line (lesson 03)"))
    elif not records and sum(bool(x.strip()) for x in lines) > 1 and _one_document(text):
        problems = [Problem(str(path), 1, None, "is one JSON document, not JSON Lines: write one record per line "
                                                "(e.g. json.dumps(record, ensure_ascii=False) for each)")]
    return records, problems, blank


def _one_document(text: str) -> bool:
    try:
        return isinstance(json.loads(text), (list, dict))
    except json.JSONDecodeError:
        return False


def load_records(path: str | Path) -> list[Record]:
    """Every record of a JSONL file; raises :class:`DataError` listing all problems if any."""
    records, problems, _ = read_jsonl(path)
    if problems:
        raise DataError(problems)
    return records


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of the file's bytes: a split made from other contents is made again."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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


def empty_validation_note(n_records: int, val_fraction: float) -> str:
    """The decision printed when a split leaves no validation record (each group of similar records gives
    ``round(size * val_fraction)``): training goes on, evaluation is skipped."""
    return (f"validation set empty: {n_records} record(s) are too few for a {val_fraction:.0%} validation split; "
            f"evaluation is skipped (add records to get a held-out loss)")


def write_jsonl(records: Iterable[Record], path: str | Path) -> Path:
    """Write records one per line; through a temporary file, so an interrupted write leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
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
