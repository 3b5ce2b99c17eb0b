"""The config a call runs: a tuned record when the database has one, else the cost model's first."""

from __future__ import annotations

import torch

from kascade.autotune.choose import choose_config, device_target
from kascade.autotune.db import TuningDatabase, TuningKey, TuningRecord
from kascade.autotune.lookup import shape_bucket, software_versions, target_key
from kascade.backends.model import rank_configs
from kascade.ir.library import attention
from kascade.passes.schedule import Config, attention_prefill_schedule

SCHED = attention_prefill_schedule(attention("2pass", causal=True))
EXT = dict(B=1, G=4, R=2, P=777, M=777, E=64, F=64)
CPU = torch.device("cpu")


def test_without_records_the_cost_model_decides(tmp_path):
    db = TuningDatabase(f"sqlite:///{tmp_path / 'empty.db'}")
    cfg, why = choose_config(SCHED, EXT, torch.float16, CPU, db=db)
    assert cfg == rank_configs(SCHED, EXT, device_target(CPU), 2)[0][1]
    assert why.startswith("cost model's #1") and "h200" in why


def test_a_tuned_record_wins(tmp_path):
    db = TuningDatabase(f"sqlite:///{tmp_path / 'tuned.db'}")
    tuned = Config.of(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    db.put(TuningRecord(TuningKey(SCHED.key(), shape_bucket(SCHED, EXT), "f16", target_key(device_target(CPU)),
                                  software_versions()), tuned.key(), 5e-5, source="unit test"))
    cfg, why = choose_config(SCHED, EXT, torch.float16, CPU, db=db)
    assert cfg == tuned and why.startswith("tuned:") and "unit test" in why
    # another dtype is another key: back to the model
    assert choose_config(SCHED, EXT, torch.float32, CPU, db=db)[1].startswith("cost model")


def test_candidates_that_do_not_compile_cleanly_are_skipped(tmp_path):
    db = TuningDatabase(f"sqlite:///{tmp_path / 'empty.db'}")
    ranked = [c for _, c in rank_configs(SCHED, EXT, device_target(CPU), 2)]
    refuse_first_two = {ranked[0]: "spills 8 bytes", ranked[1]: "needs 240 KiB of shared memory"}
    cfg, why = choose_config(SCHED, EXT, torch.float16, CPU, db=db,
                             compiles_cleanly=lambda c, t: refuse_first_two.get(c))
    assert cfg == ranked[2] and why.startswith("cost model's #3") and "spills 8 bytes" in why


def test_the_real_compiler_vetoes_a_spilling_first_choice(tmp_path):
    """bf16, head dim 64, 1k keys: the model's first pick (128 x 128 tiles, 4 warps) spills on
    sm_90a; the ahead-of-time compile says so and the next clean candidate is used."""
    from kascade.autotune.choose import aot_check
    sched = attention_prefill_schedule(attention("2pass"))
    ext = dict(B=2, G=8, R=2, P=1024, M=1024, E=64, F=64)
    db = TuningDatabase(f"sqlite:///{tmp_path / 'empty.db'}")
    first = rank_configs(sched, ext, device_target(CPU), 2)[0][1]
    check = aot_check(sched, {"E": 64, "F": 64})
    cfg, why = choose_config(sched, ext, torch.bfloat16, CPU, db=db, compiles_cleanly=check)
    assert first == Config.of(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3)
    assert cfg != first and "spills" in why and why.startswith("cost model's #")
