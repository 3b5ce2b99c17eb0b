"""Random float64 inputs of the library's decoder layers and MoE block, shared by the
partitioning tests (``from layer_inputs import ...``: tests/conftest.py puts this folder on
``sys.path``)."""

from __future__ import annotations

import torch


def layer_inputs(gen, moe_layer: bool, T=7, D=24, G=4, R=3, E=6, F=20, X=4) -> dict[str, torch.Tensor]:
    """Random float64 inputs of the decoder layer (awkward T, D, F; E even for rotate-half)."""
    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    ang = pos * 10000 ** (-torch.arange(0, E, 2, dtype=torch.float64) / E)
    ang = torch.cat([ang, ang], dim=1)
    ins = dict(X=r(T, D), WN1=1 + r(D, s=0.1), WQ=r(G, R, E, D, s=D ** -.5), WK=r(G, E, D, s=D ** -.5),
               WV=r(G, E, D, s=D ** -.5), WO=r(D, G, R, E, s=(G * R * E) ** -.5), COS=ang.cos(), SIN=ang.sin(),
               WN2=1 + r(D, s=0.1))
    if moe_layer:
        ins.update(WR=r(X, D), W13=r(X, 2, F, D, s=D ** -.5), W2=r(X, D, F, s=F ** -.5))
    else:
        ins.update(WG=r(F, D, s=D ** -.5), WU=r(F, D, s=D ** -.5), WD=r(D, F, s=F ** -.5))
    return ins


def moe_block_inputs(gen, T, D, X, F) -> dict[str, torch.Tensor]:
    return dict(X=torch.randn(T, D, generator=gen, dtype=torch.float64),
                WR=torch.randn(X, D, generator=gen, dtype=torch.float64),
                W13=torch.randn(X, 2, F, D, generator=gen, dtype=torch.float64) * D ** -.5,
                W2=torch.randn(X, D, F, generator=gen, dtype=torch.float64) * F ** -.5)
