"""The reference definition of which keys a query sees, shared by the numerics tests.

Independent of kascade: flash-attn's rule written out in torch. (Test modules import it as
``from masks import visible``: tests/conftest.py puts this folder on ``sys.path``.)
"""

from __future__ import annotations

import torch


def visible(Sq: int, Sk: int, causal: bool = False, window=None) -> torch.Tensor:
    """(Sq, Sk) bool: query i, at key position i + Sk - Sq (bottom-right aligned), sees key j.
    ``window=(left, right)`` bounds each side; -1 leaves that side unbounded."""
    i = torch.arange(Sq)[:, None] + Sk - Sq
    j = torch.arange(Sk)[None, :]
    ok = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            ok &= j >= i - left
        if right >= 0:
            ok &= j <= i + right
    return ok
