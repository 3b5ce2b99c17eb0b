"""Partitioned programs run for real: ``torch.distributed`` on ``gloo`` with 2 and 4 CPU processes,
each device's output compared with the unpartitioned cascade under the float64 evaluator.

Starting processes is what costs, so each world size spawns once and runs all its programs.
"""

from __future__ import annotations

import pytest
import torch
from layer_inputs import layer_inputs, moe_block_inputs

from kascade.backends.distributed import Job, PipelineJob, run_distributed
from kascade.backends.reference import evaluate
from kascade.ir.errors import DeviceError
from kascade.ir.library.layer import decoder_layer
from kascade.ir.library.moe import moe
from kascade.passes.moe_grouping import group_experts
from kascade.passes.partition import partition, pipeline_stages

PARAMS = dict(scale=0.4, eps=1e-5)


def idle_expert_inputs(gen, world: int, T, D, F) -> dict[str, torch.Tensor]:
    """Router logits that never pick expert ``X_EP - 1`` (on device 0, whose other experts
    work) nor any expert of the last device: empty blocks in both all-to-alls."""
    X = 3 * world if world == 2 else 2 * world
    per = X // world
    ins = moe_block_inputs(gen, T, D, X, F)
    del ins["WR"]
    lg = torch.randn(T, X, generator=gen, dtype=torch.float64)
    lg[:, per - 1] = lg[:, X - per:] = -30.0
    return dict(LG=lg, **ins)


def jobs_for(world: int) -> list[tuple[str, Job | PipelineJob]]:
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
    grouped_layer = group_experts(moe_layer)
    jobs += [   # expert parallelism with all-to-all dispatch (the grouped form's default)
        (f"ep{world} a2a moe block, idle experts", Job(partition(group_experts(moe()), f"x=ep:{world}"),
                                                       idle_expert_inputs(gen, world, T=3 * world, D=12, F=5),
                                                       {}, {"K": 2})),
        (f"ep{world} a2a moe layer, DP attention", Job(partition(grouped_layer, f"t=ep:{world},x=ep:{world}"),
                                                       layer_inputs(gen, True, T=2 * world + world, D=16, G=2,
                                                                    R=2, E=4, F=7, X=2 * world),
                                                       PARAMS, {"K": 2})),
    ]
    dense = decoder_layer()
    if world == 2:   # pipeline: attention block on stage 0, FFN on stage 1
        jobs.append(("pp2 dense layer", PipelineJob(pipeline_stages(dense, [14]),
                                                    layer_inputs(gen, False, T=7, D=24, G=2, R=3, E=6, F=10),
                                                    PARAMS)))
    if world == 4:   # two mesh axes: heads over tp=2, experts over ep=2 (groups per axis)
        jobs.append(("tp2 x ep2 moe layer", Job(partition(moe_layer, "g=tp:2,x=ep:2"),
                                                layer_inputs(gen, True, T=5, D=16, G=2, R=3, E=4, F=7, X=4),
                                                PARAMS, {"K": 2})))
        jobs.append(("tp2 x ep2 a2a moe layer", Job(partition(grouped_layer, "g=tp:2,x=ep:2"),
                                                    layer_inputs(gen, True, T=6, D=16, G=2, R=3, E=4, F=7, X=4),
                                                    PARAMS, {"K": 2})))
        jobs.append(("pp2 x tp2 dense layer", PipelineJob(pipeline_stages(dense, [14]),
                                                          layer_inputs(gen, False, T=7, D=24, G=4, R=3, E=6, F=10),
                                                          PARAMS, mapping="g=tp:2,f=tp:2")))
        jobs.append(("pp4 dense layer", PipelineJob(pipeline_stages(dense, 4),
                                                    layer_inputs(gen, False, T=5, D=16, G=2, R=2, E=4, F=6),
                                                    PARAMS)))
    return jobs


@pytest.mark.parametrize("world", [2, 4])
def test_partitioned_programs_match_the_evaluator(world):
    named = jobs_for(world)
    results = run_distributed([j for _, j in named], world)
    assert len(results) == world
    for k, (name, job) in enumerate(named):
        ref = evaluate(job.program.source, job.inputs, job.params, job.extents)["Y"]
        assert ref.isfinite().all()
        holders = range(world)
        if isinstance(job, PipelineJob):   # the last stage holds the outputs
            holders = range(world - job.stage_world, world)
            assert all(results[d][k] == {} for d in range(world) if d not in holders), name
        for device in holders:
            out = results[device][k]["Y"]
            err = (out - ref).abs().max().item()
            assert err <= 1e-10 * max(1.0, ref.abs().max().item()), f"{name}, device {device}: max error {err}"


def test_backends_are_checked_before_any_process_starts():
    with pytest.raises(DeviceError, match="accepted: gloo, nccl"):
        run_distributed([], 2, backend="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="nccl' needs CUDA GPUs"):
            run_distributed([], 2, backend="nccl")
