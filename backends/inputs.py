"""Fresh random inputs for a cascade: for checks, never zeros.

Float inputs are standard normal; float params uniform in [0.5, 1.5) (a scale, a
soft-cap, an epsilon are all positive); int params (window sizes) uniform in [0, 4).
Integer *tensors* (block tables, token ids, lengths) carry meaning that the shapes
alone do not give, so callers that need them build them and pass them in ``fixed``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import Kind
from kascade.ir.errors import ShapeError
from kascade.ir.extents import bind_extents


def random_inputs(c: Cascade, extents: Mapping[str, int], *, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float64, fixed: Mapping[str, torch.Tensor] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float | int]]:
    """``(inputs, params)`` for ``c`` at ``extents``; ``fixed`` entries are used as given."""
    fixed = dict(fixed or {})
    ext = bind_extents(c, None, extents, complete=False)
    inputs: dict[str, torch.Tensor] = {}
    for t in c.inputs:
        if t.name in fixed:
            inputs[t.name] = fixed[t.name]
            continue
        if t.dtype.kind is not Kind.FLOAT:
            raise ShapeError(f"input {t.name!r} is {t.dtype.value}: integer and bool inputs need values "
                             "with meaning; pass them in fixed=")
        missing = [c.rank_extent(r) for r in t.ranks if c.rank_extent(r) not in ext]
        if missing:
            raise ShapeError(f"input {t.name!r} needs extents {missing}; pass them in extents=")
        shape = tuple(ext[c.rank_extent(r)] for r in t.ranks)
        inputs[t.name] = torch.randn(shape, generator=generator, dtype=dtype)
    params: dict[str, float | int] = {}
    for p in c.params:
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        params[p.name] = int(u * 4) if p.dtype.kind is Kind.INT else 0.5 + u
    return inputs, params
