"""The search space as Optuna sees it: encodings, round trips, constraints applied before measuring."""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution

from kascade.autotune.space import Axis, SearchSpace, parse_config, sizes_for
from kascade.ir.errors import KascadeError
from kascade.ir.library import attention, paged_decode
from kascade.passes.schedule import Config, attention_prefill_schedule
from kascade.passes.schedule_decode import paged_decode_schedule

SCHED = attention_prefill_schedule(attention("2pass", causal=True))
EXT = dict(B=2, G=8, R=4, P=2048, M=2048, E=128, F=128)


@pytest.mark.parametrize("values, kind, dist", [
    ((16, 32, 64, 128), "pow2", IntDistribution(4, 7)),
    ((1, 2, 3, 4), "range", IntDistribution(1, 4)),
    (tuple(range(1, 1025)), "range", IntDistribution(1, 1024, log=True)),
    ((2, 4, 8), "pow2", IntDistribution(1, 3)),
    ((16, 64), "categorical", CategoricalDistribution((16, 64))),
    ((3, 5, 7), "ordinal", IntDistribution(0, 2)),
])
def test_ordered_choices_become_numeric_axes(values, kind, dist):
    axis = Axis.of("X", values)
    assert axis.kind == kind and axis.distribution() == dist
    assert [axis.decode(axis.encode(v)) for v in values] == list(values)


def test_trial_params_round_trip_and_grid():
    space = SearchSpace(SCHED, sizes_for(SCHED, EXT, 2))
    cfg = Config.of(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)
    params = space.params_of(cfg)
    assert params == {"log2_BLOCK_M": 6, "log2_BLOCK_N": 7, "log2_num_warps": 2, "num_stages": 3}
    assert space.config_of(params) == cfg
    assert space.suggest(optuna.trial.FixedTrial(params)) == cfg
    assert set(space.grid()) == set(params) and space.size == 4 * 4 * 3 * 4


def test_constraints_reject_before_measuring():
    """The schedule's own rules at this shape: fp32 doubles the register estimate."""
    big = Config.of(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)
    assert SearchSpace(SCHED, sizes_for(SCHED, EXT, 2)).feasible(big) is None
    assert "registers" in SearchSpace(SCHED, sizes_for(SCHED, EXT, 4)).feasible(big)
    space = SearchSpace(SCHED, sizes_for(SCHED, EXT, 2))
    feasible = list(space.configs())
    assert 0 < len(feasible) < space.size and all(space.feasible(c) is None for c in feasible)


def test_random_unseen_covers_the_space_then_says_none():
    space = SearchSpace(SCHED, sizes_for(SCHED, EXT, 2))
    seen: set[str] = set()
    rng = random.Random(0)
    while (cfg := space.random_unseen(seen, rng)) is not None:
        assert cfg.key() not in seen and space.feasible(cfg) is None
        seen.add(cfg.key())
    assert len(seen) == len(list(space.configs()))


def test_decode_space_and_sizes():
    sched = paged_decode_schedule(paged_decode())
    sizes = sizes_for(sched, dict(E=128, F=128, R=4), 2)
    assert sizes == {"E": 128, "F": 128, "R": 4, "itemsize": 2}
    space = SearchSpace(sched, sizes)
    splits = next(a for a in space.axes if a.name == "num_splits")
    # split counts step by ~1.5x: the study sees their index, so neighbouring counts stay neighbours
    assert splits.kind == "ordinal" and splits.distribution() == IntDistribution(0, 19)
    assert splits.decode(splits.encode(48)) == 48 and splits.encode(48) == splits.encode(32) + 1
    cfg = space.random_unseen(set(), random.Random(0))
    assert cfg is not None and space.feasible(cfg) is None


def test_parse_config_inverts_key():
    cfg = Config.of(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    assert parse_config(cfg.key()) == cfg
    with pytest.raises(KascadeError, match="not a config key"):
        parse_config("BLOCK_M=big")
