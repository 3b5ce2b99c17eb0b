"""The tuning database on SQLite: keys, best-record upserts, export/import, corruption, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kascade.autotune.db import TuningDatabase, TuningDatabaseError, TuningKey, TuningRecord, read_json
from kascade.autotune.lookup import lookup, shape_bucket, software_versions, target_key
from kascade.backends.targets import get_target
from kascade.ir.library import attention
from kascade.passes.schedule import Config, attention_prefill_schedule

KEY = TuningKey("attention_prefill:abc", "E=128,F=128,M=4096,P=4096,heads=64", "bf16", "h200 (sm_90a)",
                "kascade=0.1.0 triton=3.6.0 torch=2.11 cuda=13.0")
CFG = "BLOCK_M=128,BLOCK_N=64,num_stages=3,num_warps=8"


def db_at(tmp_path, name="t.db") -> TuningDatabase:
    return TuningDatabase(f"sqlite:///{tmp_path / name}")


def test_best_record_wins_and_the_table_has_one_row_per_key(tmp_path):
    db = db_at(tmp_path)
    assert db.put(TuningRecord(KEY, CFG, 2e-4))
    assert not db.put(TuningRecord(KEY, "BLOCK_M=64,BLOCK_N=64,num_stages=2,num_warps=4", 3e-4))  # slower: kept out
    assert db.put(TuningRecord(KEY, "BLOCK_M=64,BLOCK_N=128,num_stages=2,num_warps=8", 1e-4))      # faster: replaces
    rows = list(db.records())
    assert len(rows) == 1 and rows[0].seconds == 1e-4 and rows[0].config.startswith("BLOCK_M=64,BLOCK_N=128")


@pytest.mark.parametrize("field, value", [("schedule", "attention_prefill:other"),
                                          ("bucket", "E=64,F=64,M=16,P=16,heads=1"), ("dtype", "f16"),
                                          ("target", "a100-80gb (sm_80)"),
                                          ("versions", "kascade=0.1.0 triton=3.9.0 torch=2.11 cuda=13.0")])
def test_any_change_of_key_is_a_miss(tmp_path, field, value):
    db = db_at(tmp_path)
    db.put(TuningRecord(KEY, CFG, 2e-4))
    assert db.best(KEY) is not None
    assert db.best(TuningKey(**{**KEY.__dict__, field: value})) is None


def test_predicted_records_never_answer_for_measured(tmp_path):
    db = db_at(tmp_path)
    db.put(TuningRecord(TuningKey(**{**KEY.__dict__, "measured": False}), CFG, 1e-4))
    assert db.best(KEY) is None
    assert db.best(TuningKey(**{**KEY.__dict__, "measured": False})).seconds == 1e-4


def test_export_then_import_round_trips(tmp_path):
    a, b = db_at(tmp_path, "a.db"), db_at(tmp_path, "b.db")
    a.put(TuningRecord(KEY, CFG, 2e-4, {"0.5": 2e-4, "0.2": 1.9e-4}, "study-1"))
    assert a.export_json(tmp_path / "h200.json") == 1
    doc = json.loads((tmp_path / "h200.json").read_text())
    assert doc["kascade_tuning_records"] == 1 and doc["records"][0]["config"] == CFG
    assert b.import_json(tmp_path / "h200.json") == 1
    assert b.best(KEY).quantiles == {"0.5": 2e-4, "0.2": 1.9e-4}


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read tuning records"),
    ('{"records": []}', "not a kascade tuning-records file"),
    ('{"kascade_tuning_records": 1, "records": [{"schedule": "x"}]}', "record 0 is malformed"),
    ('{"kascade_tuning_records": 1, "records": [' + json.dumps({**KEY.__dict__, "config": CFG, "seconds": -1}) + ']}',
     "record 0 is malformed"),
])
def test_bad_json_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(TuningDatabaseError, match=message):
        read_json(tmp_path / "bad.json")


def test_a_corrupt_database_is_reported_and_is_a_miss(tmp_path, capsys):
    (tmp_path / "t.db").write_bytes(b"this is not an sqlite file" * 100)
    db = db_at(tmp_path)
    assert db.best(KEY) is None and list(db.records()) == []
    assert "unreadable" in capsys.readouterr().err


def test_unsupported_storage_url():
    with pytest.raises(TuningDatabaseError, match="accepted: sqlite:///"):
        TuningDatabase("mysql://x")


def test_a_killed_writer_leaves_finished_records_usable(tmp_path):
    """SIGKILL a process in the middle of writing records: every record it finished is there."""
    script = textwrap.dedent(f"""
        import sys, time
        from kascade.autotune.db import TuningDatabase, TuningKey, TuningRecord
        db = TuningDatabase("sqlite:///{tmp_path / 'k.db'}")
        for i in range(100000):
            db.put(TuningRecord(TuningKey("s", f"b{{i}}", "bf16", "t", "v"), "BLOCK_M=16", 1e-3))
            if i == 20:
                print("ready", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows = list(db_at(tmp_path, "k.db").records())
    assert len(rows) >= 21 and all(r.config == "BLOCK_M=16" for r in rows)


# ---- runtime lookup ------------------------------------------------------------------------
SCHED = attention_prefill_schedule(attention("2pass"))
EXT = dict(B=2, G=8, R=4, P=3000, M=3000, E=128, F=128)
H200 = get_target("h200")


def record_for(ext, cfg, seconds=1e-4):
    return TuningRecord(TuningKey(SCHED.key(), shape_bucket(SCHED, ext), "bf16", target_key(H200),
                                  software_versions()), cfg.key(), seconds, source="test")


def test_lookup_exact_then_nearest_then_miss(tmp_path):
    db = db_at(tmp_path)
    assert lookup(SCHED, EXT, "bf16", H200, db, shipped=None) is None
    near = Config.of(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    db.put(record_for(dict(EXT, P=8000, M=8000), near))
    cfg, why = lookup(SCHED, EXT, "bf16", H200, db, shipped=None)
    assert cfg == near and why.startswith("nearest tuned bucket")
    exact = Config.of(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    db.put(record_for(EXT, exact))
    cfg, why = lookup(SCHED, EXT, "bf16", H200, db, shipped=None)
    assert cfg == exact and why.startswith("tuned:")
    assert lookup(SCHED, dict(EXT, E=64, F=64), "bf16", H200, db, shipped=None) is None  # other head dims


def test_lookup_uses_shipped_files_and_skips_broken_ones(tmp_path):
    shipped = tmp_path / "configs"
    shipped.mkdir()
    (shipped / "broken.json").write_text("{")
    donor = db_at(tmp_path, "donor.db")
    cfg = Config.of(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    donor.put(record_for(EXT, cfg))
    donor.export_json(shipped / "h200.json")
    got, why = lookup(SCHED, EXT, "bf16", H200, db_at(tmp_path, "empty.db"), shipped=shipped)
    assert got == cfg and why.startswith("shipped:")


def test_an_infeasible_stored_config_is_not_used(tmp_path):
    db = db_at(tmp_path)
    db.put(record_for(EXT, Config.of(BLOCK_M=128, BLOCK_N=128, num_warps=2, num_stages=4)))
    assert lookup(SCHED, EXT, "bf16", H200, db, shipped=None, sizes={"E": 128, "F": 128, "itemsize": 2}) is None
