"""Build the Chinese and English notebooks from one bilingual source per lesson (``make notebooks``).

A lesson lives in ``notebooks/src/NN_name.cells``; this writes ``notebooks/zh/NN_name.ipynb`` and
``notebooks/en/NN_name.ipynb``. The two editions get byte-identical code cells because there is only one copy
of each; markdown cells are written twice, once per language, and pair 1:1. The format, line by line::

    <!-- markdown -->            starts a markdown cell; it holds a <!-- zh --> part and an <!-- en --> part
    <!-- zh -->
    中文正文 ……
    <!-- en -->
    English text ...
    <!-- code -->                starts a code cell (the same in both editions)
    <!-- code tags=parameters --> a code cell with cell tags (comma-separated)

Everything else is cell content; blank lines around a cell's content are dropped. ``--check`` compares what
the sources build with the committed notebooks (git's index, so that notebooks a learner has run and saved
do not count) and fails on any difference.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SRC, LANGS = ROOT / "notebooks" / "src", ("zh", "en")
KERNELSPEC = {"name": "glmlora", "display_name": "Python (glmlora)", "language": "python"}
_MARK = re.compile(r"^<!-- (markdown|code|zh|en)(?: tags=([\w,-]+))? -->\s*$")


class SourceError(ValueError):
    """A malformed ``.cells`` file; the message names the file and line."""


@dataclass
class Cell:
    kind: str  # "markdown" or "code"
    line: int
    tags: list[str] = field(default_factory=list)
    text: dict[str, list[str]] = field(default_factory=dict)  # "code" or a language -> lines


def parse(path: Path) -> list[Cell]:
    """The cells of one source file, each checked (markdown: both languages, non-empty)."""
    cells: list[Cell] = []
    part: str | None = None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = _MARK.match(line)
        if m and m.group(1) in ("markdown", "code"):
            cells.append(Cell(m.group(1), n, m.group(2).split(",") if m.group(2) else []))
            part = "code" if m.group(1) == "code" else None
            if part:
                cells[-1].text["code"] = []
        elif m:
            if not cells or cells[-1].kind != "markdown" or m.group(1) in cells[-1].text:
                raise SourceError(f"{path}:{n}: <!-- {m.group(1)} --> must follow <!-- markdown --> once per cell")
            part = m.group(1)
            cells[-1].text[part] = []
        elif part is not None:
            cells[-1].text[part].append(line)
        elif line.strip():
            raise SourceError(f"{path}:{n}: text outside a cell (start one with <!-- markdown --> or <!-- code -->)")
    for c in cells:
        want = ("code",) if c.kind == "code" else LANGS
        for key in want:
            if not "\n".join(c.text.get(key, [])).strip():
                raise SourceError(f"{path}:{c.line}: {c.kind} cell without {key!r} text")
    if not cells:
        raise SourceError(f"{path}: no cells")
    return cells


def _content(lines: list[str]) -> str:
    return "\n".join(lines).strip("\n")


def build(path: Path, lang: str) -> nbformat.NotebookNode:
    """The notebook of ``lang`` for one source file (outputs empty, ids stable)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for i, c in enumerate(parse(path)):
        if c.kind == "code":
            cell = nbformat.v4.new_code_cell(_content(c.text["code"]))
            if c.tags:
                cell.metadata["tags"] = c.tags
        else:
            cell = nbformat.v4.new_markdown_cell(_content(c.text[lang]))
        cell.id = f"cell-{i:02d}"
        nb.cells.append(cell)
    return nb


def sources() -> list[Path]:
    return sorted(SRC.glob("*.cells"))


def target(path: Path, lang: str) -> Path:
    return ROOT / "notebooks" / lang / (path.stem + ".ipynb")


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def committed_text(path: Path) -> str | None:
    """The file as committed (git's index), or the file on disk outside a git checkout; None if neither."""
    rel = path.resolve().relative_to(ROOT)
    try:
        done = subprocess.run(["git", "show", f":{rel.as_posix()}"], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:  # no git at all
        done = None
    if done is not None and done.returncode == 0:
        return done.stdout
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True,
                            text=True) if done is not None else None
    if inside is not None and inside.returncode == 0:
        return None  # a git checkout where this file is not committed
    return path.read_text(encoding="utf-8") if path.is_file() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed notebooks differ from the sources")
    args = parser.parse_args()
    stale = []
    try:
        for path in sources():
            for lang in LANGS:
                text, out = render(build(path, lang)), target(path, lang)
                if args.check:
                    if committed_text(out) != text:
                        stale.append(str(out.relative_to(ROOT)))
                else:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(text, encoding="utf-8")
    except SourceError as e:
        print(f"notebook source error: {e}", file=sys.stderr)
        return 2
    if stale:
        print("committed notebooks differ from notebooks/src (run `make notebooks` and commit):\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    print(f"{len(sources())} lessons -> notebooks/zh and notebooks/en " + ("match" if args.check else "written"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
