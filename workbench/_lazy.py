"""Lazy package exports: a package's public names, imported from their submodule on first use, so importing a
package (or one of its light submodules, such as a ``cli``) never pays for torch or pandas it does not use.

Imports: the standard library only.
"""
from __future__ import annotations

import importlib
import importlib.util


def exports(package: str, names: dict[str, str]):
    """``(__getattr__, __dir__, __all__)`` for ``package`` whose public ``names`` map to submodule names."""

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
            setattr(importlib.import_module(package), name, value)
            return value
        if not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(names) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__, sorted(names)
