"""Notebooks are committed without outputs: strip them on disk, or ``--check`` what is committed.

``--check`` reads git's index (the committed version), so a notebook a learner has run and saved with its
outputs does not fail ``make test``; outside a git checkout it reads the files on disk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

from build_notebooks import committed_text


def dirty_cells(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count")))


def notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--check", action="store_true", help="fail instead of rewriting; looks at what is committed")
    args = parser.parse_args()
    paths = notebooks(args.folder)
    if not paths:
        print(f"no notebooks in {args.folder}", file=sys.stderr)
        return 1
    bad = []
    for path in paths:
        if args.check:
            text = committed_text(path)
            if text is not None and (n := dirty_cells(nbformat.reads(text, as_version=4))):
                bad.append(f"{path}: {n} committed code cell(s) carry outputs or execution counts")
            continue
        nb = nbformat.read(path, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                c.outputs, c.execution_count = [], None
            c.metadata.pop("execution", None)
        nbformat.write(nb, path)
    print("\n".join(bad) if bad else f"{len(paths)} notebooks are {'committed' if args.check else ''} without outputs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
