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
    assert why.startswith("cost model's first") and "h200" in why


def test_a_tuned_record_wins(tmp_path):
    db = TuningDatabase(f"sqlite:///{tmp_path / 'tuned.db'}")
    tuned = Config.of(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    db.put(TuningRecord(TuningKey(SCHED.key(), shape_bucket(SCHED, EXT), "f16", target_key(device_target(CPU)),
                                  software_versions()), tuned.key(), 5e-5, source="unit test"))
    cfg, why = choose_config(SCHED, EXT, torch.float16, CPU, db=db)
    assert cfg == tuned and why.startswith("tuned:") and "unit test" in why
    # another dtype is another key: back to the model
    assert choose_config(SCHED, EXT, torch.float32, CPU, db=db)[1].startswith("cost model")
