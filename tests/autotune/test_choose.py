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


# ---- paged decode: the same order (tuned record, else the model), at decode sizes ----------------
def test_decode_uses_a_tuned_record_for_its_bucket_and_the_nearest_for_other_lengths(tmp_path):
    from kascade.ir.library import paged_decode
    from kascade.passes.schedule_decode import paged_decode_schedule
    sched = paged_decode_schedule(paged_decode())
    ext = dict(B=8, G=8, R=4, E=128, F=128, M0=16, L=4096)
    db = TuningDatabase(f"sqlite:///{tmp_path / 'decode.db'}")
    cfg, why = choose_config(sched, ext, torch.bfloat16, CPU, db=db)
    assert why.startswith("cost model's #1") and cfg == rank_configs(sched, ext, device_target(CPU), 2)[0][1]
    tuned = Config.of(BLOCK_N=32, num_warps=4, num_stages=2, num_splits=6)
    db.put(TuningRecord(TuningKey(sched.key(), shape_bucket(sched, ext), "bf16", target_key(device_target(CPU)),
                                  software_versions()), tuned.key(), 3e-5, source="decode sweep"))
    assert choose_config(sched, ext, torch.bfloat16, CPU, db=db) == (tuned, choose_config(
        sched, ext, torch.bfloat16, CPU, db=db)[1])
    assert choose_config(sched, ext, torch.bfloat16, CPU, db=db)[1].startswith("tuned:")
    near = choose_config(sched, {**ext, "L": 8000}, torch.bfloat16, CPU, db=db)
    assert near[0] == tuned and near[1].startswith("nearest tuned bucket")
    # another page size is another kernel: the record does not transfer
    assert choose_config(sched, {**ext, "M0": 32}, torch.bfloat16, CPU, db=db)[1].startswith("cost model")


def test_decode_falls_back_to_the_measured_defaults_when_nothing_compiles_cleanly(tmp_path):
    from kascade.ir.library import paged_decode
    from kascade.passes.schedule_decode import choose_decode_config, paged_decode_schedule
    sched = paged_decode_schedule(paged_decode())
    ext = dict(B=8, G=8, R=4, E=128, F=128, M0=16, L=4096)
    db = TuningDatabase(f"sqlite:///{tmp_path / 'decode.db'}")
    default = choose_decode_config(sched, {**ext, "itemsize": 2})
    cfg, why = choose_config(sched, ext, torch.bfloat16, CPU, db=db, compiles_cleanly=lambda c, t: "spills",
                             tries=3, fallback=lambda: default)
    assert cfg == default[0] and why.startswith("default (") and why.count("spills") == 3


def test_paged_decode_attention_runs_the_tuned_record(monkeypatch, capsys):
    """The API looks up its decode bucket (batch and longest sequence rounded to powers of two)."""
    from kascade import paged_decode_attention
    from kascade.api import _decode_cascade, _decode_schedule
    from kascade.autotune.choose import _database
    from kascade.ir.dtypes import f16
    sched = _decode_schedule(_decode_cascade(False, f16))
    tuned = Config.of(BLOCK_N=16, num_warps=2, num_stages=2, num_splits=3)
    ext = dict(B=4, G=1, R=3, E=24, F=24, M0=7, L=64)    # the bucket of 3 sequences of up to 50 keys
    _database().put(TuningRecord(TuningKey(sched.key(), shape_bucket(sched, ext), "f16", target_key(device_target(CPU)),
                                           software_versions()), tuned.key(), 1e-5, source="test sweep"))
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(3, 3, 24, generator=gen).half()
    kc, vc = (torch.randn(24, 7, 1, 24, generator=gen).half() for _ in range(2))
    table = torch.randperm(24, generator=gen)[:24].reshape(3, 8).int()
    lens = torch.tensor([50, 9, 33], dtype=torch.int32)
    monkeypatch.setenv("KASCADE_DEBUG", "1")
    out = paged_decode_attention(q, kc, vc, table, lens, backend="interpret")
    err = capsys.readouterr().err
    assert f"config={tuned.key()} (tuned:" in err and "test sweep" in err
    ref = paged_decode_attention(q.float(), kc.float(), vc.float(), table, lens, backend="reference").double()
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=0)


def test_the_moe_candidate_is_compiled_ahead_of_time_before_it_runs():
    """On the GPU path both grouped GEMMs of a candidate are compiled for the device (with the
    divisibility the JIT would see at Mixtral's sizes); a clean candidate passes. (What an
    unfit or spilling compile reports: tests/kernels/test_moe_aot.py.)"""
    from kascade.autotune.choose import _compile, aot_check
    from kascade.backends.targets import get_target
    from kascade.ir.dtypes import bf16
    from kascade.passes.schedule_moe import choose_moe_config, swiglu_moe_schedule
    sched = swiglu_moe_schedule(bf16)
    check = aot_check(sched, {"D": 4096, "F": 14336})
    cfg, _ = choose_moe_config(sched, dict(T=4, K=2, E=8, D=4096, F=14336))
    before = _compile.cache_info().misses
    assert check(cfg, get_target("h200")) is None
    assert _compile.cache_info().misses - before == 2        # moe_gate_up and moe_down


def test_an_empty_ranking_takes_the_fallback(tmp_path):
    db = TuningDatabase(f"sqlite:///{tmp_path / 'empty.db'}")
    cfg, why = choose_config(SCHED, dict(EXT, E=300, F=300), torch.float16, CPU, db=db,
                             fallback=lambda: (Config.of(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1), "rule"))
    assert why.startswith("default (rule): the cost model has no feasible candidate") and cfg["BLOCK_M"] == 16
