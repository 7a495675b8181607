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
    import argparse

    parser = argparse.ArgumentParser(prog="python tools/export_notebooks.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(NOTEBOOKS / "html"), help="folder for the HTML pages "
                        "(default: notebooks/html/)")
    parser.add_argument("notebooks", nargs="*", help="two-digit numbers of the notebooks to export (default: all)")
    args = parser.parse_args(argv)
    if args.out[:2].isdigit() and len(args.out) == 2:  # only numbers given
        args.notebooks, args.out = [args.out, *args.notebooks], str(NOTEBOOKS / "html")
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.notebooks:
        bad = [n for n in args.notebooks if not (len(n) == 2 and n.isdigit())]
        if bad:
            parser.error(f"{bad} are not notebook numbers: give two digits, e.g. 01 03")
        paths = [p for p in paths if p.stem[:2] in args.notebooks]
        if not paths:
            parser.error(f"no notebook numbered {args.notebooks} in {NOTEBOOKS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        target = out / f"{path.stem}.html"
        target.write_text(export(path))
        print(target, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
