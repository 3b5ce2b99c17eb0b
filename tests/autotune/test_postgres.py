"""Many tuners, one study: ``kascade tune`` processes sharing a PostgreSQL server.

Runs when ``KASCADE_TEST_POSTGRES_URL`` names a database kascade may write to, e.g.
``postgresql+psycopg://kascade:kascade@127.0.0.1:5432/kascade_test`` (needs ``psycopg[binary]``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import optuna
import pytest
import sqlalchemy as sa

URL = os.environ.get("KASCADE_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set KASCADE_TEST_POSTGRES_URL to a PostgreSQL database URL "
                                "(e.g. postgresql+psycopg://kascade:kascade@127.0.0.1:5432/kascade_test)")


def test_two_tune_processes_share_one_study_and_one_records_table(tmp_path):
    study = f"kascade-test-{uuid.uuid4().hex[:12]}"
    cmd = [sys.executable, "-m", "kascade", "tune", "attention", "--causal", "--backend", "model", "--trials", "12",
           "--storage", URL, "--study", study, "--batch", "1", "--heads", "8", "--kv-heads", "2", "--seq", "2048"]
    env = dict(os.environ, KASCADE_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen(cmd + ["--seed", str(i), "--workers", "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    try:
        for p, (stdout, stderr) in zip(procs, outs):
            assert p.returncode == 0, stderr
            assert int(re.search(r"trials (\d+) this run", stdout).group(1)) >= 12   # 2 threads: one may overrun
        trials = optuna.load_study(study_name=study, storage=URL).get_trials(deepcopy=False)
        measured = [t for t in trials if t.state.name == "COMPLETE" and "infeasible" not in t.user_attrs
                    and not t.user_attrs.get("duplicate")]
        workers = {t.user_attrs["worker"] for t in measured}
        assert len(workers) == 2 and {w.rsplit(":", 1)[1] for w in workers} == {str(p.pid) for p in procs}
        assert len(measured) >= 24
        with sa.create_engine(URL).connect() as conn:
            dupes = conn.exec_driver_sql(
                "SELECT schedule, bucket, dtype, target, versions, measured, count(*) FROM kascade_tuning_records "
                "GROUP BY schedule, bucket, dtype, target, versions, measured HAVING count(*) > 1").all()
            ours = conn.exec_driver_sql(
                "SELECT config FROM kascade_tuning_records WHERE bucket = %(b)s AND NOT measured",
                {"b": "E=128,F=128,M=2048,P=2048,heads=8"}).all()
        assert dupes == [] and len(ours) == 1
    finally:
        try:
            optuna.delete_study(study_name=study, storage=URL)
        except KeyError:
            pass   # the study was never created
        with sa.create_engine(URL).begin() as conn:
            conn.exec_driver_sql("DELETE FROM kascade_tuning_records WHERE source = %(s)s", {"s": study})


def test_two_plan_searches_share_one_plan_study(tmp_path):
    """Serving-plan search workers on two processes contribute trials to one study."""
    study = f"kascade-plan-test-{uuid.uuid4().hex[:12]}"
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(f'{{"arrival": {i * 0.4:.2f}, "prompt_tokens": {200 + 37 * (i % 9)}, '
                             f'"output_tokens": {40 + 11 * (i % 5)}}}\n' for i in range(120)))
    cmd = [sys.executable, "-m", "kascade", "plan", "--model", "llama-3-8b", "--target", "h200", "--gpus", "4",
           "--workload", str(trace), "--slo-ttft", "2s", "--slo-tpot", "200ms", "--trials", "6", "--storage", URL,
           "--study", study]
    env = dict(os.environ, KASCADE_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen(cmd + ["--seed", str(i), "--out", str(tmp_path / f"out{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    try:
        for p, (_, stderr) in zip(procs, outs):
            assert p.returncode == 0, stderr
        trials = optuna.load_study(study_name=study, storage=URL).get_trials(deepcopy=False)
        assert len([t for t in trials if t.state.name == "COMPLETE"]) >= 12, [t.state.name for t in trials]
        assert all((tmp_path / f"out{i}" / "plan.json").is_file() for i in range(2))
    finally:
        try:
            optuna.delete_study(study_name=study, storage=URL)
        except KeyError:
            pass
