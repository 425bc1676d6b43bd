"""Notebooks are committed without outputs: strip them, or ``--check`` that they are stripped."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat


def dirty_cells(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--check", action="store_true", help="fail instead of rewriting")
    args = parser.parse_args()
    paths = sorted(args.folder.glob("*.ipynb"))
    if not paths:
        print(f"no notebooks in {args.folder}", file=sys.stderr)
        return 1
    bad = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        n = dirty_cells(nb)
        if n and args.check:
            bad.append(f"{path}: {n} code cell(s) carry outputs or execution counts (run `make strip`)")
        elif n or not args.check:
            for c in nb.cells:
                if c.cell_type == "code":
                    c.outputs, c.execution_count = [], None
                c.metadata.pop("execution", None)
            nbformat.write(nb, path)
    print("\n".join(bad) if bad else f"{len(paths)} notebooks are stripped of outputs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
