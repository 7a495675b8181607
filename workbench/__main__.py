"""``python -m workbench``: :func:`workbench.cli.main`, with one line instead of a traceback where this Python lacks
the project's packages (a system ``python`` instead of the set-up ``.venv``)."""
import sys

REQUIRED = {"torch", "timm", "numpy", "pandas", "scipy", "safetensors", "yaml"}

try:
    from .cli import main

    sys.exit(main())
except ModuleNotFoundError as err:
    if err.name and err.name.split(".")[0] in REQUIRED:
        sys.stderr.write(f"python -m workbench: error: {err.name} is not installed in this Python ({sys.executable}): "
                         "set up with `make setup`, then run .venv/bin/python -m workbench ... (or `source "
                         ".venv/bin/activate` first)\n")
        sys.exit(1)
    raise
