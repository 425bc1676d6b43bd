"""The install files agree with each other, and nothing in the product runs remote code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*([=<>!~].*)?$", line.split("#")[0].strip())
        if m:
            out[m.group(1).lower()] = (m.group(2) or "").strip()
    return out


def test_environment_yml_installs_the_tested_requirements():
    env = (ROOT / "environment.yml").read_text()
    assert "-r requirements.txt" in env and "-r requirements-gpu.txt" in env and "python=3.11" in env


def test_requirements_pin_torch_and_cover_pyproject_dependencies():
    req = pins(ROOT / "requirements.txt")
    assert req["torch"] == "==2.13.0"  # the local CPU wheel; an unpinned torch pulls a CUDA build
    project = (ROOT / "pyproject.toml").read_text()
    deps = re.findall(r'^\s+"([A-Za-z0-9_.-]+)', project.split("dependencies = [", 1)[1].split("]", 1)[0], re.M)
    assert deps and all(d.lower() in req for d in deps), [d for d in deps if d.lower() not in req]


def test_no_remote_code_in_the_product():
    import nbformat

    sources = {str(f): f.read_text() for f in (ROOT / "glmlora").rglob("*.py")}
    for nb_path in (ROOT / "notebooks").glob("*/*.ipynb"):
        cells = nbformat.read(nb_path, as_version=4).cells
        sources[str(nb_path)] = "\n".join(c.source for c in cells if c.cell_type == "code")
    offenders = [name for name, text in sources.items() if re.search(r"trust_remote_code\s*=\s*True", text)]
    assert not offenders
