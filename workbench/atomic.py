"""Files written atomically: a crash leaves the old file (or none), never half a file.  Checkpoints, records,
metrics and benchmark results all go through here.

Imports: the standard library only (the bottom of the import graph).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, write, prefix: str | None = None) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash leaves the old file (or none), never half a file.
    ``prefix``: the temporary file's (default ``.<name>.``), for readers that pick files by name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)
