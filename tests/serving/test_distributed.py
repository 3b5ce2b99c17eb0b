"""Partitioned programs run for real: ``torch.distributed`` on ``gloo`` with 2 and 4 CPU processes,
each device's output compared with the unpartitioned cascade under the float64 evaluator.

Starting processes is what costs, so each world size spawns once and runs all its programs.
"""

from __future__ import annotations

import pytest
import torch

from kascade.backends.distributed import Job, run_distributed
from kascade.backends.reference import evaluate
from kascade.ir.errors import DeviceError
from kascade.ir.library.layer import decoder_layer
from kascade.ir.library.moe import moe
from kascade.passes.partition import partition

PARAMS = dict(scale=0.4, eps=1e-5)


def layer_inputs(gen, moe_layer: bool, T, D, G, R, E, F, X=0) -> dict[str, torch.Tensor]:
    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s
    ang = torch.arange(T, dtype=torch.float64)[:, None] * 10000 ** (-torch.arange(0, E, 2, dtype=torch.float64) / E)
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


def jobs_for(world: int) -> list[tuple[str, Job]]:
    """Awkward sizes where divisibility allows: odd token counts, D and F not powers of two."""
    gen = torch.Generator().manual_seed(100 + world)
    dense, moe_layer = decoder_layer(), decoder_layer(moe=True)
    jobs = [
        (f"tp{world} dense layer", Job(partition(dense, f"g=tp:{world},f=tp:{world}"),
                                       layer_inputs(gen, False, T=7, D=40, G=4, R=3, E=6, F=9 * world),
                                       PARAMS)),
        (f"ep{world} moe layer", Job(partition(moe_layer, f"x=ep:{world}"),
                                     layer_inputs(gen, True, T=9, D=24, G=2, R=2, E=8, F=11, X=2 * world),
                                     PARAMS, {"K": 2})),
        (f"ep{world} moe block", Job(partition(moe(router=True), f"x=ep:{world}"),
                                     moe_block_inputs(gen, T=13, D=20, X=world + world // 2 * 2, F=9), {}, {"K": 3})),
    ]
    if world == 4:   # two mesh axes: heads over tp=2, experts over ep=2 (groups per axis)
        jobs.append(("tp2 x ep2 moe layer", Job(partition(moe_layer, "g=tp:2,x=ep:2"),
                                                layer_inputs(gen, True, T=5, D=16, G=2, R=3, E=4, F=7, X=4),
                                                PARAMS, {"K": 2})))
    return jobs


@pytest.mark.parametrize("world", [2, 4])
def test_partitioned_programs_match_the_evaluator(world):
    named = jobs_for(world)
    results = run_distributed([j for _, j in named], world)
    assert len(results) == world
    for k, (name, job) in enumerate(named):
        ref = evaluate(job.program.source, job.inputs, job.params, job.extents)["Y"]
        assert ref.isfinite().all()
        for device in range(world):
            out = results[device][k]["Y"]
            err = (out - ref).abs().max().item()
            assert err <= 1e-10 * max(1.0, ref.abs().max().item()), f"{name}, device {device}: max error {err}"


def test_nccl_needs_gpus():
    if torch.cuda.is_available():
        pytest.skip("GPUs present")
    with pytest.raises(DeviceError, match="nccl' needs CUDA GPUs"):
        run_distributed([], 2, backend="nccl")
    with pytest.raises(DeviceError, match="accepted: gloo, nccl"):
        run_distributed([], 2, backend="mpi")
