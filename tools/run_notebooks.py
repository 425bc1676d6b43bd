"""Execute the course notebooks headless (``make demo``) and say where the executed copies are."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat.sign import NotebookNotary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the executed copies")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.notebooks:
        start = time.time()
        nb = nbformat.read(path, as_version=4)
        # store_widget_state: the copy keeps the widgets' state (the chat box of lesson 06, progress bars), so
        # JupyterLab draws them when it opens the copy instead of printing "VBox(children=...".
        client = NotebookClient(nb, timeout=args.timeout, kernel_name="glmlora", store_widget_state=True,
                                resources={"metadata": {"path": str(path.parent.resolve())}})
        target = args.out / path.parent.name / path.name  # executed/zh/..., executed/en/...
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            client.execute()
        except CellExecutionError as e:
            save(nb, target)
            print(f"FAILED {path} after {time.time() - start:.0f} s; partial output in {target}\n{e}",
                  file=sys.stderr)
            return 1
        save(nb, target)
        for cell in nb.cells:  # echo the lines a notebook marks as its summary
            for out in cell.get("outputs", []):
                for line in out.get("text", "").splitlines():
                    if line.startswith("SUMMARY"):
                        print(f"  {line}")
        print(f"ok  {path.parent.name}/{path.name:40s} {time.time() - start:6.1f} s -> {target}")
    print(f"\nExecuted notebooks are in {args.out.resolve()} (open them in JupyterLab).")
    return 0


def save(nb: nbformat.NotebookNode, target: Path) -> None:
    """Write an executed copy and mark it trusted (``jupyter trust``): JupyterLab draws widgets, HTML and plots only
    in trusted notebooks, and shows the rest as plain text. These outputs come from the learner's own run."""
    NotebookNotary().sign(nb)
    nbformat.write(nb, target)


if __name__ == "__main__":
    sys.exit(main())
