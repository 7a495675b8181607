"""Builds the notebooks from their sources: each ``notebooks/NN_name.py`` (a jupytext percent script, the file to
edit and diff) becomes ``notebooks/NN_name.ipynb``, executed in place so its stored outputs are what
``pytest --nbval`` compares.

    python tools/make_notebooks.py              # every notebook
    python tools/make_notebooks.py 01 03        # the ones whose names start with these

In JupyterLab, the jupytext extension can also open the .py files as notebooks directly.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def sources(prefixes=()) -> list[Path]:
    paths = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    if prefixes:
        paths = [p for p in paths if any(p.stem.startswith(x) for x in prefixes)]
        if not paths:
            raise SystemExit(f"no notebook source in {NOTEBOOKS} starts with {list(prefixes)}")
    return paths


def build(source: Path, timeout: int = 1800) -> Path:
    nb = jupytext.read(source)
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    target = source.with_suffix(".ipynb")
    nbformat.write(nb, target)
    return target


if __name__ == "__main__":
    for path in sources(sys.argv[1:]):
        print(build(path), flush=True)
