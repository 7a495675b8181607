"""Each notebook's stored .ipynb is built from its jupytext source (notebooks/NN_name.py): the same cells, in the
same order, so what nbval re-executes and what a researcher edits and diffs are one notebook."""
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_is_built_from_its_source(source):
    built = source.with_suffix(".ipynb")
    assert built.is_file(), f"{built.name} missing: python tools/make_notebooks.py {source.stem[:2]}"
    assert _cells(nbformat.read(built, as_version=4)) == _cells(jupytext.read(source)), (
        f"{built.name} is stale against {source.name}: python tools/make_notebooks.py {source.stem[:2]}")


def test_every_notebook_has_a_source():
    assert SOURCES and {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")} == {p.stem for p in SOURCES}
