"""The MoE grouped-GEMM kernels compile ahead of time for sm_80 and sm_90a, without a GPU.

Every template variant (gate-up, down with each fusion choice, the combine with and without
the routing weight) in fp16 and bf16, at the configs :func:`choose_moe_config` picks for a
decode and a prefill batch of Mixtral's shapes, compiles, fits the target and does not spill.
The compile models Triton's JIT specialisation for dims that are multiples of 16 (strides and
``D`` / ``F`` divisible by 16), which is what vectorises and pipelines the tile loads.
A config past the shared memory of a block is reported by the compile, not raised.
"""

from __future__ import annotations

import pytest

from kascade.backends.aot import compile_kernel
from kascade.codegen.moe_grouped_gemm import render
from kascade.ir import bf16, f16
from kascade.passes.schedule import Config
from kascade.passes.schedule_moe import choose_moe_config, swiglu_moe_schedule

MIXTRAL = {"E": 8, "K": 2, "D": 4096, "F": 14336}
DIMS = {"D": 4096, "F": 14336}


def divisible(src) -> list[str]:
    """The integer arguments the JIT would see as multiples of 16 at Mixtral's shapes."""
    return [a.name for a in src.args if a.kind == "stride" or a.name in ("hidden", "inner")]


def variants(dtype):
    """Every kernel variant: the prefill config with the routing weight in the combine and in
    the down GEMM (unfused), the decode config with the combine fused into the down GEMM."""
    s = swiglu_moe_schedule(dtype)
    decode, _ = choose_moe_config(s, {**MIXTRAL, "T": 4})
    prefill, _ = choose_moe_config(s, {**MIXTRAL, "T": 8192})
    assert (decode["WEIGHT_IN_DOWN"], decode["FUSED_COMBINE"]) == (1, 1) and prefill["FUSED_COMBINE"] == 0
    unweighted = render(s, prefill.replace(WEIGHT_IN_DOWN=0), DIMS)
    weighted = render(s, prefill.replace(WEIGHT_IN_DOWN=1), DIMS)
    fused = render(s, decode, DIMS)
    return [*unweighted.kernels, weighted.down, weighted.combine, fused.gate_up, fused.down]


@pytest.mark.parametrize("target", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("dtype", [f16, bf16], ids=["fp16", "bf16"])
def test_every_variant_compiles_fits_and_does_not_spill(target, dtype):
    names = set()
    for src in variants(dtype):
        c = compile_kernel(src, target, divisible=divisible(src))
        assert c.ok and c.fits and not c.spills, (src.name, c.reason, c.error, c.stack_bytes)
        assert f".target {target}" in c.ptx and 0 < c.registers <= 255
        names.add(src.name)
    assert len(names) == 7, "gate-up x 2 configs, down x 3 fusion choices, combine x 2 weightings"


def test_a_config_past_shared_memory_is_reported_not_raised():
    s = swiglu_moe_schedule(bf16)
    big = Config.of(BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=5, WEIGHT_IN_DOWN=1,
                    FUSED_COMBINE=1)
    assert s.feasible(big, {**DIMS, "itemsize": 2}).startswith("shared_memory: needs ~")
    src = render(s, big, DIMS, check=False).gate_up
    c = compile_kernel(src, "sm_90a", divisible=divisible(src))
    assert c.ok and not c.fits, (c.error, c.shared_bytes)
    assert "bytes of shared memory per block; sm_90a" in c.reason and c.shared_bytes > 227 * 1024
