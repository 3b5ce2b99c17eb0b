"""Every environment switch kascade reads, in one typed place.

Lives in ``ir`` (the lowest layer) so that every layer can read it.

* ``KASCADE_CHECK_IR=1``: validate the cascade after every pass (the test suite sets it).
* ``KASCADE_DEBUG=1``: say which config ran and why, and other diagnostics.
* ``KASCADE_CACHE_DIR``: generated kernels go to ``<dir>/kernels`` (default ``~/.cache/kascade``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    check_ir: bool = False
    debug: bool = False
    cache_dir: str | None = None   # KASCADE_CACHE_DIR: generated kernels go under <it>/kernels


def settings() -> Settings:
    """Read the environment now (cheap; so tests can change it with monkeypatch)."""
    env = os.environ
    return Settings(check_ir=env.get("KASCADE_CHECK_IR", "").lower() in _TRUE,
                    debug=env.get("KASCADE_DEBUG", "").lower() in _TRUE,
                    cache_dir=env.get("KASCADE_CACHE_DIR") or None)
