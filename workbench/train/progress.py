"""Progress bars: tqdm's notebook widget where ipywidgets is installed, its text bar everywhere else.

``tqdm.auto`` picks the widget inside Jupyter and, without ipywidgets, warns (``TqdmWarning: IProgress not found``)
and draws nothing useful; the text bar works in a notebook too.

Imports: tqdm only.
"""
from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
