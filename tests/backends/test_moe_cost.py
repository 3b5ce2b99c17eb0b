"""The MoE cost model ranks decode batches as weight streaming and prefill batches as GEMMs."""

from __future__ import annotations

import pytest

from kascade.backends.model import predict
from kascade.backends.moe_cost import moe_cost, rank_moe_configs
from kascade.backends.targets import get_target
from kascade.ir import bf16
from kascade.ir.errors import KascadeError
from kascade.passes.schedule_moe import choose_moe_config, expected_experts, swiglu_moe_schedule

H200 = get_target("h200")
MIXTRAL = {"E": 8, "K": 2, "D": 4096, "F": 14336}


def test_expected_experts_is_the_mean_of_distinct_uniform_picks():
    assert expected_experts(8, 1, 2) == pytest.approx(2.0)
    assert expected_experts(64, 8) == pytest.approx(64 * (1 - (63 / 64) ** 8))
    assert expected_experts(64, 3, 8) == pytest.approx(64 * (1 - (56 / 64) ** 3))
    assert expected_experts(8, 100000, 2) == pytest.approx(8.0)


def test_decode_streams_only_the_touched_experts_weights():
    s = swiglu_moe_schedule(bf16)
    cfg, _ = choose_moe_config(s, {**MIXTRAL, "T": 1})
    cost = moe_cost(s, cfg, {**MIXTRAL, "T": 1}, H200)
    weights = 2 * 3 * 4096 * 14336 * 2            # two experts of three 4096 x 14336 bf16 matrices
    assert weights <= cost.hbm_bytes <= 1.05 * weights
    deepseek = {"E": 64, "K": 8, "D": 2048, "F": 1408, "T": 1}
    touched = moe_cost(s, choose_moe_config(s, deepseek)[0], deepseek, H200).hbm_bytes
    assert touched == pytest.approx(expected_experts(64, 1, 8) * 3 * 2048 * 1408 * 2, rel=0.05)


@pytest.mark.parametrize("shapes", [{**MIXTRAL, "T": 4}, {"E": 64, "K": 8, "D": 2048, "F": 1408, "T": 16}])
def test_decode_batches_are_hbm_bound_with_thin_row_blocks(shapes):
    s = swiglu_moe_schedule(bf16)
    ranked = rank_moe_configs(s, shapes, H200)
    best, cfg = ranked[0]
    assert best.bound == "hbm" and cfg["BLOCK_M"] <= 32 and ranked[-1][0].seconds > 1.5 * best.seconds
    chosen = predict(moe_cost(s, choose_moe_config(s, shapes)[0], shapes, H200), H200)
    assert chosen.seconds <= 1.2 * best.seconds


def test_prefill_batches_are_compute_bound_with_tensor_core_tiles():
    s = swiglu_moe_schedule(bf16)
    shapes = {**MIXTRAL, "T": 8192}
    ranked = rank_moe_configs(s, shapes, H200)
    best, cfg = ranked[0]
    # the feasible tiles are bounded by the tensor cores or by the L2 traffic of their operand re-reads
    assert best.bound in ("tensor", "l2") and cfg["BLOCK_M"] >= 64
    assert best.cost.tensor_flops == pytest.approx(2 * 8192 * 2 * 3 * 4096 * 14336, rel=0.02)
    assert ranked[-1][0].seconds > 3 * best.seconds
    chosen = predict(moe_cost(s, choose_moe_config(s, shapes)[0], shapes, H200), H200)
    assert chosen.seconds <= 1.2 * best.seconds
    decode = rank_moe_configs(s, {**MIXTRAL, "T": 4}, H200)[0][0]
    assert best.seconds > 20 * decode.seconds


def test_missing_shapes_are_named():
    s = swiglu_moe_schedule(bf16)
    with pytest.raises(KascadeError, match=r"needs \['F'\]"):
        rank_moe_configs(s, {"T": 1, "K": 2, "E": 8, "D": 64}, H200)
