"""Exported notebooks show every figure, offline: each plotly output is stored with a PNG beside it, and
tools/export_notebooks.py turns every notebook into HTML with one embedded image per figure and nothing fetched from
a CDN."""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
sys.path.insert(0, str(ROOT / "tools"))


def _figures(nb: dict) -> tuple[int, int]:
    """(plotly outputs, those with a PNG beside them)."""
    total = with_png = 0
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "application/vnd.plotly.v1+json" in data:
                total += 1
                with_png += "image/png" in data
    return total, with_png


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_has_a_static_image_and_the_html_export_shows_it_offline(path):
    from export_notebooks import export

    figures, with_png = _figures(json.loads(path.read_text()))
    assert with_png == figures, f"{path.name}: {figures - with_png} of {figures} figures have no PNG: rebuild it " \
                                f"with python tools/make_notebooks.py {path.stem[:2]}"
    html = export(path)
    assert len(re.findall(r"<img[^>]+src=\"data:image/png;base64,", html)) >= figures
    assert not re.search(r"<script[^>]*src=[\"']https?://", html)
    assert not re.search(r"<script[^>]*>((?!</script>).)*?https?://", html, flags=re.S)
    assert not re.search(r"<link[^>]*href=[\"']https?://", html)
