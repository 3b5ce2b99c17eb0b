"""``kascade tune | targets | show | export | import`` as a user runs them (subprocesses, no GPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from typer.testing import CliRunner

from kascade.autotune.db import TuningDatabase
from kascade.cli import app

NO_GPU = not torch.cuda.is_available()
SMALL = ["--batch", "1", "--heads", "8", "--kv-heads", "2", "--seq", "1024"]


def kascade(*args: str):
    """The command line in this process (fast: no interpreter start); exit code, stdout, stderr."""
    r = CliRunner().invoke(app, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KASCADE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def distinct_trials(url: str, study: str) -> int:
    s = optuna.load_study(study_name=study, storage=url)
    return sum(1 for t in s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
               if "infeasible" not in t.user_attrs and not t.user_attrs.get("duplicate"))


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU note")
def test_tune_without_a_gpu_says_so_in_one_line_and_runs_the_dry_run(run_kascade, cache):
    r = run_kascade("tune", "attention", "--causal", "--target", "h200", "--trials", "8", *SMALL)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "GPU" in line]
    assert notes == ["no GPU here: dry run against the h200 roofline model (records stored as predicted, "
                     "measured=False)"]
    assert "BLOCK_M=" in r.stdout and "x roofline" in r.stdout and "trials 8 this run" in r.stdout
    recs = list(TuningDatabase(f"sqlite:///{cache / 'tuning.db'}").records())
    assert len(recs) == 1 and not recs[0].key.measured and recs[0].key.target == "h200 (sm_90a)"


def test_a_killed_tune_resumes_and_its_records_stay_usable(tmp_path, cache):
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    cmd = [sys.executable, "-m", "kascade", "tune", "attention", "--trials", "100000", "--storage", url, "--study",
           "resume", "--backend", "model", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    before, deadline = 0, time.monotonic() + 120
    try:
        while before < 6 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                before = distinct_trials(url, "resume")
            except Exception:  # noqa: BLE001 - the study does not exist yet
                pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()   # killed mid-study, not finished
    before = distinct_trials(url, "resume")
    recs = list(TuningDatabase(url).records())
    assert len(recs) == 1 and recs[0].config.startswith("BLOCK_M=")   # the best so far, already stored
    r = subprocess.run(cmd[:6] + ["10"] + cmd[7:], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert distinct_trials(url, "resume") >= before + 10
    assert f"trials 10 this run, {distinct_trials(url, 'resume')} in the study" in r.stdout


def test_a_corrupt_database_is_reported_and_tuning_elsewhere_works(tmp_path, cache):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not an sqlite database at all " * 100)
    code, _, stderr = kascade("tune", "attention", "--trials", "3", "--storage", f"sqlite:///{bad}", *SMALL)
    assert code == 2 and "corrupt SQLite file" in " ".join(stderr.split())
    code, stdout, stderr = kascade("show", "--storage", f"sqlite:///{bad}")
    assert code == 0 and "unreadable" in stderr and "0 tuning records" in stdout
    code, _, _ = kascade("tune", "attention", "--trials", "3", "--backend", "model", *SMALL)
    assert code == 0 and (cache / "tuning.db").is_file()


@pytest.mark.parametrize("args, message", [
    (["tune", "decode", "--causal"], "do not apply to decode"),
    (["tune", "moe", "--causal"], "attention options"),
    (["tune", "moe", "--top-k", "9"], "--top-k 9 exceeds --experts 8"),
    (["tune", "gemm"], "attention_prefill_schedule"),
    (["tune", "attention", "--workers", "2"], "PostgreSQL"),
    (["tune", "attention", "--target", "tpu9"], "unknown target 'tpu9'"),
    (["tune", "attention", "--sampler", "annealing"], "unknown sampler"),
    (["tune", "attention", "--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
    (["tune", "attention", "--dtype", "fp8"], "unknown --dtype"),
    (["tune", "attention", "--backend", "tpu"], "unknown --backend"),
    (["tune", "attention", "--window", "3"], "--window takes LEFT,RIGHT"),
    (["tune", "attention_causal", "--causal"], "choose the variant of 'attention'"),
    (["tune", "nonexistent.kc"], "neither a library cascade nor a file"),
    (["tune", "attention", "--storage", "mysql://u@h/db"], "unsupported storage"),
    (["import", "missing.json"], "cannot read tuning records"),
    (["export", "x.json", "--target", "tpu9"], "unknown target"),
])
def test_user_errors_exit_2_with_a_message(cache, args, message):
    extra = ["--backend", "model"] if args[0] == "tune" and "--backend" not in args else []
    code, stdout, stderr = kascade(*args, *extra)
    assert code == 2, stdout + stderr
    assert message in " ".join(stderr.split()) and "Traceback" not in stderr


def test_a_cascade_file_needs_its_batch_extents(cache, tmp_path, attention_text):
    path = tmp_path / "mine.kc"
    path.write_text(attention_text)
    code, _, stderr = kascade("tune", str(path), "--backend", "model", "--trials", "3", "--seq", "512")
    assert code == 2 and "-x B=8 -x H=8" in " ".join(stderr.split())
    code, stdout, stderr = kascade("tune", str(path), "--backend", "model", "--trials", "3", "--seq", "512",
                                   "-x", "B=1", "-x", "H=4")
    assert code == 0, stderr
    assert "E=128,F=128,M=512,P=512,heads=4" in stdout


def test_targets_lists_measured_ceilings():
    code, stdout, _ = kascade("targets")
    assert code == 0 and "h200" in stdout and "790" in stdout and "4.30" in stdout


def test_export_then_import_and_show(cache, tmp_path):
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    assert kascade("tune", "attention", "--trials", "3", "--storage", a, "--backend", "model", *SMALL)[0] == 0
    code, stdout, _ = kascade("export", str(tmp_path / "h200.json"), "--target", "h200", "--storage", a)
    assert code == 0 and "exported 1 records" in stdout
    doc = json.loads((tmp_path / "h200.json").read_text())
    assert doc["kascade_tuning_records"] == 1 and doc["records"][0]["measured"] is False
    assert "exported 0 records" in kascade("export", str(tmp_path / "none.json"), "--measured-only", "--storage", a)[1]
    code, stdout, _ = kascade("import", str(tmp_path / "h200.json"), "--storage", b)
    assert code == 0 and "imported 1 of 1 records" in stdout
    code, stdout, _ = kascade("show", "--storage", b)
    assert code == 0 and "1 tuning records" in stdout and "predicted" in stdout
    assert "study kascade:attention_prefill:" in kascade("show", "--storage", a)[1]


def test_decode_dry_run_finds_the_models_best_and_stores_a_predicted_record(cache):
    from kascade.backends.model import rank_configs
    from kascade.backends.targets import get_target
    from kascade.ir.library import paged_decode
    from kascade.passes.schedule_decode import paged_decode_schedule
    code, stdout, stderr = kascade("tune", "decode", "--backend", "model", "--trials", "60", "--batch", "2",
                                   "--heads", "16", "--kv-heads", "2", "--seq", "20000", "--page-size", "32")
    assert code == 0, stderr
    ext = dict(B=2, G=2, R=8, E=128, F=128, M0=32, L=20000)
    best = rank_configs(paged_decode_schedule(paged_decode()), ext, get_target("h200"))[0][0]
    assert "M0=32,R=8" in stdout and "predicted (model)" in stdout
    (rec,) = TuningDatabase(f"sqlite:///{cache / 'tuning.db'}").records(measured=False)
    assert rec.seconds <= best.seconds * 1.01      # the decode space is flat near its best: within the tie band


def test_moe_dry_run_of_60_trials_finds_the_models_best(cache):
    from kascade.backends.model import rank_configs
    from kascade.backends.targets import get_target
    from kascade.ir.dtypes import bf16
    from kascade.passes.schedule_moe import swiglu_moe_schedule
    code, stdout, stderr = kascade("tune", "moe", "--backend", "model", "--trials", "60", "--tokens", "2048",
                                   "--experts", "128", "--top-k", "8", "--hidden", "2048", "--ffn", "768")
    assert code == 0, stderr
    best = rank_configs(swiglu_moe_schedule(bf16), dict(T=2048, K=8, E=128, D=2048, F=768), get_target("h200"))[0][0]
    (rec,) = TuningDatabase(f"sqlite:///{cache / 'tuning.db'}").records(measured=False)
    assert rec.key.bucket == "D=2048,E=128,F=768,K=8,T=2048" and rec.seconds <= best.seconds * 1.01
