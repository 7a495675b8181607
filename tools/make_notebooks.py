"""Builds the notebooks from their sources: each ``notebooks/NN_name.py`` (a jupytext percent script, the file to
edit and diff) becomes ``notebooks/NN_name.ipynb``, executed in place so its stored outputs are what
``pytest --nbval`` compares.

    python tools/make_notebooks.py              # every notebook
    python tools/make_notebooks.py 01 03        # the ones whose names start with these

In JupyterLab, the jupytext extension can also open the .py files as notebooks directly.

Every plotly figure is stored twice: the interactive figure (JupyterLab shows it) and a static PNG beside it (what
GitHub, nbviewer and an HTML export show; PLOTLY_RENDERER=plotly_mimetype+png, through kaleido and Chromium).
``python tools/export_notebooks.py`` writes the self-contained HTML.
"""
from __future__ import annotations

import os
import shutil
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


def static_images() -> bool:
    """Store a PNG beside each figure when kaleido can draw one (it needs Chromium)."""
    import importlib.util

    if importlib.util.find_spec("kaleido") is None or not (shutil.which("chromium") or shutil.which("chromium-browser")):
        print("kaleido or chromium missing: figures are stored without their static image, so exported notebooks "
              "will not show them (apt-get install chromium)", file=sys.stderr)
        return False
    os.environ["PLOTLY_RENDERER"] = "plotly_mimetype+png"  # the kernel inherits it
    return True


def build(source: Path, timeout: int = 1800) -> Path:
    nb = jupytext.read(source)
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    # a display hook that raises (a figure or table that cannot render) prints a traceback but fails no cell
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) + "".join(str(v) for v in out.get("data", {}).values())
            if out.get("output_type") == "error" or "Traceback (most recent call last)" in text:
                tail = "\n".join(out.get("traceback", []) or text.splitlines()[-8:])
                raise RuntimeError(f"{source.name}: cell {i} printed a traceback in its output; fix it before "
                                   f"recording:\n{tail}")
    target = source.with_suffix(".ipynb")
    nbformat.write(nb, target)
    return target


if __name__ == "__main__":
    static_images()
    for path in sources(sys.argv[1:]):
        try:
            print(build(path), flush=True)
        except RuntimeError as err:  # a figure's static image can time out on a loaded machine: one more try
            print(f"{err}\nbuilding {path.name} once more", file=sys.stderr, flush=True)
            try:
                print(build(path), flush=True)
            except RuntimeError as again:
                sys.exit(str(again))
