"""The target table: complete, self-consistent, measured ceilings preferred."""

from __future__ import annotations

import pytest

from kascade.backends.targets import TARGETS, Measured, UnknownTargetError, get_target, target_for_device

REQUIRED = ["a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "l40s", "rtx4090"]


def test_every_required_target_is_there():
    assert set(REQUIRED) <= set(TARGETS)


@pytest.mark.parametrize("name", REQUIRED)
def test_targets_are_self_consistent(name):
    t = get_target(name)
    assert t.smem_per_block <= t.smem_per_sm
    assert t.tensor_peak("bf16") > t.fp32_rate > 0
    # ridge point (FLOP per byte of HBM) lies where published rooflines put it: tens to hundreds
    assert 50 < t.tensor_peak("bf16") / t.hbm_bandwidth < 600
    assert t.arch.startswith("sm_")


def test_measured_ceilings_are_preferred():
    h200 = get_target("h200")
    assert h200.hbm_bandwidth == pytest.approx(4.3e12)
    assert h200.tensor_peak("bf16") == pytest.approx(790e12)
    assert h200.hbm_bandwidth_peak == pytest.approx(4.8e12)
    plain = get_target("h100").with_measured(Measured())
    assert plain.tensor_peak("bf16") == pytest.approx(989.4e12)


def test_lookup_by_alias_and_device():
    assert get_target("H100").name == "h100-sxm" and get_target("h200").arch == "sm_90a"
    assert target_for_device(9, 0, 132, 150_000_000_000).name == "h200"
    assert target_for_device(9, 0, 132, 85_000_000_000).name == "h100-sxm"
    assert target_for_device(8, 0, 108, 42_000_000_000).name == "a100-40gb"


def test_unknown_target_is_a_clear_error():
    with pytest.raises(UnknownTargetError, match="known: a100-40gb"):
        get_target("b300")
    with pytest.raises(UnknownTargetError, match="compute capability 7.5"):
        target_for_device(7, 5, 40)
