"""Exports the executed notebooks to self-contained HTML: every figure as its stored PNG (plotly's interactive
JSON needs JavaScript an export cannot carry), no script or style fetched from a CDN, so the pages read offline.

    python tools/export_notebooks.py [OUT_DIR] [01 03 ...]      # default OUT_DIR: notebooks/html/

The notebooks must have been built with tools/make_notebooks.py (which stores the PNGs).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
REMOTE = re.compile(r"<script[^>]*src=[\"']https?://[^>]*>\s*</script>|<link[^>]*href=[\"']https?://[^>]*>", re.I)


def export(notebook: Path) -> str:
    """The notebook as one offline HTML page."""
    exporter = HTMLExporter(template_name="lab")
    exporter.mathjax_url = ""
    exporter.require_js_url = ""
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
    body = REMOTE.sub("", body)
    body = re.sub(r"<script[^>]*>((?!</script>).)*?https?://cdn.*?</script>", "", body, flags=re.S)
    return re.sub(r"<script[^>]*src=[\"'][\"'][^>]*>\s*</script>", "", body)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv and not argv[0][:2].isdigit() else NOTEBOOKS / "html"
    prefixes = [a for a in argv if a[:2].isdigit()]
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        if prefixes and not any(path.stem.startswith(p) for p in prefixes):
            continue
        target = out / f"{path.stem}.html"
        target.write_text(export(path))
        print(target, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
