"""Where generated kernel sources live, and writing them only when their content changed.

``$KASCADE_CACHE_DIR/kernels`` when the variable is set, else ``~/.cache/kascade/kernels``.
This is the one place that reads ``KASCADE_CACHE_DIR``. Triton's JIT reads a kernel's
source from its file, so rendered kernels are real files; rewriting a file whose content
did not change would only invalidate caches keyed on modification times.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kascade.ir.settings import settings


def kernel_cache_dir() -> Path:
    """The directory for generated kernel modules (read from the environment on every call)."""
    root = settings().cache_dir
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "kascade"
    return base / "kernels"


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` unless it already holds exactly that; True if written.

    The write goes through a temporary file and an atomic rename, so a concurrent reader
    (another test worker, another process) sees the old or the new file, never half of one.
    """
    try:
        if path.read_text() == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True
