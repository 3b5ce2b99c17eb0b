"""Cost-model calibration: measured samples fitted back to the factors that made them, the fitted
factors used by the tuner and the runtime choice, and sweeps replayed for the samplers."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from typer.testing import CliRunner

from kascade.autotune.calibrate import (
    FACTORS,
    CalibrationError,
    CalibrationWarning,
    _design,
    _seconds,
    calibrate,
    calibrated_efficiency,
    calibrations_table,
    gather,
    spearman,
    store_factors,
)
from kascade.autotune.choose import choose_config
from kascade.autotune.db import TuningDatabase, TuningKey, TuningRecord
from kascade.autotune.lookup import shape_bucket, target_key
from kascade.autotune.measure import CallableMeasurer
from kascade.autotune.replay import (
    SweepError,
    import_sweep,
    load_sweeps,
    replay,
    sweep_doc,
    synthetic_sweep,
    trials_to_within,
)
from kascade.autotune.samples import load_measurements, measurement_of, store_measurements
from kascade.autotune.search import tune
from kascade.backends.model import Efficiency, predict, rank_configs
from kascade.backends.targets import get_target
from kascade.ir.dtypes import bf16, f16, f32
from kascade.ir.library import attention
from kascade.passes.schedule import attention_prefill_schedule

ROOT = Path(__file__).resolve().parents[2]
H200 = get_target("h200")
KEY = target_key(H200)
VERSIONS = "kascade=0.1.0 triton=3.6.0 torch=2.11.0 cuda=13.0"
# what the "GPU" achieved: every factor away from its default
TRUE = Efficiency(tensor=0.5, special=0.6, flops=0.45, hbm=0.7, l2=0.6)
# real attention schedules at shapes each bounded by different roofs on the H200
SHAPES = [
    (dict(causal=True), bf16, dict(B=2, G=8, R=4, P=2048, M=2048, E=128, F=128)),   # tensor, l2
    (dict(), f16, dict(B=1, G=8, R=1, P=4096, M=4096, E=16, F=16)),                 # special
    (dict(), f32, dict(B=1, G=4, R=2, P=1024, M=1024, E=64, F=64)),                 # flops (fp32 dot)
    (dict(), bf16, dict(B=8, G=8, R=1, P=16, M=8192, E=128, F=128)),                # hbm
    (dict(), bf16, dict(B=4, G=2, R=8, P=64, M=16384, E=64, F=64)),                 # l2
]


def noise(i: int) -> float:
    """Deterministic multiplicative noise within +-3 %."""
    return math.exp(0.03 * math.sin(1.7 * i + 0.3))


def measured_samples(eff: Efficiency = TRUE, every: int = 3, measured: bool = True, scale: float = 1.0):
    out, i = [], 0
    for kw, dt, ext in SHAPES:
        sched = attention_prefill_schedule(attention("2pass", dtype=dt, **kw))
        for p, cfg in rank_configs(sched, ext, H200, dt.itemsize)[::every]:
            seconds = predict(p.cost, H200, dt.value, eff).seconds * noise(i) * scale
            out.append(measurement_of(sched, ext, {}, dt.value, KEY, VERSIONS, cfg, seconds, source="test",
                                      measured=measured))
            i += 1
    return out


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    """Measured samples from TRUE, plus predicted junk (rows and records) that must be ignored."""
    db = TuningDatabase(f"sqlite:///{tmp_path_factory.mktemp('cal') / 'tuning.db'}")
    n = store_measurements(db, measured_samples())
    store_measurements(db, measured_samples(Efficiency(), every=7, measured=False, scale=50.0))
    sched = attention_prefill_schedule(attention("2pass"))
    ext = SHAPES[3][2]
    db.put(TuningRecord(TuningKey(sched.key(), shape_bucket(sched, ext), "bf16", KEY, VERSIONS, measured=False),
                        "BLOCK_M=16,BLOCK_N=16,num_stages=1,num_warps=2", 123.0, source="dry run"))
    return db, n


def test_measured_times_are_fitted_back_and_the_error_drops(tuned_db):
    db, n = tuned_db
    cal = calibrate("h200", db, store=False)
    assert cal.samples == n and cal.shapes == len(SHAPES)   # the predicted rows and record are not samples
    for f in FACTORS:
        assert cal.bound_samples[f] >= 5, f"the test shapes should bound {f}"
        assert getattr(cal.fitted, f) == pytest.approx(getattr(TRUE, f), rel=0.05), f
    assert cal.before.mape > 15 and cal.after.mape < 4
    assert cal.after.spearman >= cal.before.spearman - 1e-9 and cal.after.spearman > 0.95
    assert all(b.mape_after < b.mape_before for b in cal.by_bound)
    assert not cal.stored and calibrated_efficiency("h200", db) == Efficiency()


def test_the_fit_is_deterministic_and_predicts_as_the_model_does(tuned_db):
    db, _ = tuned_db
    a, b = calibrate("h200", db, store=False), calibrate("h200", db, store=False)
    assert a.fitted == b.fitted
    samples, _ = gather(H200, db)
    vec = _seconds(_design(samples, H200, Efficiency()), np.array([getattr(a.fitted, f) for f in FACTORS]))
    exact = [predict(s.cost, H200, s.dtype, a.fitted).seconds for s in samples]
    assert np.allclose(vec, exact, rtol=1e-12)


def test_only_predicted_data_is_no_data(tmp_path):
    db = TuningDatabase(f"sqlite:///{tmp_path / 'dry.db'}")
    store_measurements(db, measured_samples(every=20, measured=False))
    sched = attention_prefill_schedule(attention("2pass"))
    db.put(TuningRecord(TuningKey(sched.key(), "E=128,F=128,M=4096,P=4096,heads=64", "bf16", KEY, VERSIONS,
                                  measured=False), "BLOCK_M=64,BLOCK_N=64,num_stages=2,num_warps=4", 1e-3))
    assert load_measurements(db, target=KEY)[0] == []
    with pytest.raises(CalibrationError, match=r"no measured samples for h200 .*predicted \(dry-run\) records are "
                                               r"never used.*kascade tune attention --target h200 --backend gpu"):
        calibrate("h200", db)


def test_an_empty_database_says_what_to_run(tmp_path):
    with pytest.raises(CalibrationError, match="kascade tune attention --target h200"):
        calibrate("h200", TuningDatabase(f"sqlite:///{tmp_path / 'empty.db'}"))


def test_corrupt_stored_factors_are_ignored_with_a_warning(tmp_path):
    db = TuningDatabase(f"sqlite:///{tmp_path / 'c.db'}")
    store_factors(db, "h200", Efficiency(tensor=0.3), versions="older")
    with db.engine.begin() as conn:   # newer rows, each broken another way: the valid older one is used
        for i, bad in enumerate(['{"tensor": ', '{"tensor": 7.0}', '["tensor"]', '{"hbm": "fast"}']):
            conn.execute(sa.insert(calibrations_table).values(target=KEY, versions=f"broken{i}", factors=bad,
                                                              summary="{}", created=1e12 + i))
    with pytest.warns(CalibrationWarning, match="ignoring the calibrated factors"):
        assert calibrated_efficiency("h200", db) == Efficiency(tensor=0.3)
    with db.engine.begin() as conn:
        conn.execute(sa.delete(calibrations_table).where(calibrations_table.c.versions == "older"))
    with pytest.warns(CalibrationWarning):
        assert calibrated_efficiency("h200", db) == Efficiency()
    garbage = tmp_path / "not-a-db.db"
    garbage.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.warns(CalibrationWarning, match="unreadable"):
        assert calibrated_efficiency("h200", TuningDatabase(f"sqlite:///{garbage}")) == Efficiency()


def test_calibrated_factors_change_the_runtime_choice(tmp_path):
    """A target whose special-function units reach 5 % of their peak: exp-heavy small tiles lose."""
    sched = attention_prefill_schedule(attention("2pass", causal=True))
    ext = dict(B=2, G=8, R=4, P=2048, M=2048, E=128, F=128)
    db = TuningDatabase(f"sqlite:///{tmp_path / 'choose.db'}")
    before, why_before = choose_config(sched, ext, torch.float16, torch.device("cpu"), db=db)
    slow_sfu = Efficiency(special=0.05)
    store_factors(db, "h200", slow_sfu)
    after, why_after = choose_config(sched, ext, torch.float16, torch.device("cpu"), db=db)
    assert before == rank_configs(sched, ext, H200, 2)[0][1]
    assert after == rank_configs(sched, ext, H200, 2, eff=slow_sfu)[0][1] != before
    assert "special-bound" in why_after and why_after != why_before


def test_tuning_keeps_every_measured_trial_and_predicts_with_calibrated_factors(tmp_path):
    sched = attention_prefill_schedule(attention("2pass", causal=True))
    ext = dict(B=1, G=2, R=2, P=300, M=300, E=64, F=64)
    url = f"sqlite:///{tmp_path / 'gpu.db'}"
    table = {c.key(): p.seconds * 1.3 for p, c in rank_configs(sched, ext, H200, 2)}
    res = tune(sched, [ext], "h200", backend=lambda s, e, w: CallableMeasurer(lambda k: table[k]), trials=8,
               storage_url=url, versions=VERSIONS).best
    db = TuningDatabase(url)
    kept, bad = load_measurements(db, target=KEY)
    assert bad == 0 and len(kept) == res.trials == 8
    assert all(m.extents == ext and m.versions == VERSIONS and m.seconds == table[m.config] for m in kept)
    cal = calibrate("h200", db)   # every sample 1.3x the default model: the bounding factors shrink
    assert cal.stored and cal.after.mape < 1.0 < cal.before.mape
    # the next dry run predicts with the stored factors
    dry = tune(sched, [ext], "h200", trials=2, storage_url=url, warm_start=1).best
    assert dry.prediction.seconds == pytest.approx(predict(dry.prediction.cost, H200, "bf16", cal.fitted).seconds)
    assert dry.prediction.seconds != pytest.approx(predict(dry.prediction.cost, H200, "bf16").seconds)
    assert len(load_measurements(db, target=KEY)[0]) == 8   # a dry run stores no samples


def test_spearman_uses_average_ranks_for_ties():
    from kascade.autotune.report import spearman as pure_python
    xs, ys = [1.0, 2.0, 2.0, 3.0, 5.0, 4.0], [2.0, 1.0, 3.0, 3.0, 6.0, 6.0]
    assert spearman(xs, ys) == pytest.approx(pure_python(xs, ys))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1], [2]) is None


def test_the_cli_calibrates_and_says_when_there_is_nothing(tuned_db, tmp_path):
    from kascade.cli import app
    runner = CliRunner()
    empty = runner.invoke(app, ["calibrate", "--target", "h200", "--storage", f"sqlite:///{tmp_path / 'e.db'}"])
    assert empty.exit_code == 1
    assert "no measured samples" in empty.output and "kascade tune attention" in empty.output
    db, n = tuned_db
    shown = runner.invoke(app, ["calibrate", "--target", "h200", "--storage", db.url, "--no-store"])
    assert shown.exit_code == 0, shown.output
    assert "tensor" in shown.output and "MAPE" in shown.output and "not stored" in shown.output
    doc = json.loads(runner.invoke(app, ["calibrate", "--storage", db.url, "--json"]).output)
    assert doc["calibrated"] and doc["samples"] == n and doc["stored"]
    assert doc["after"]["mape"] < doc["before"]["mape"]
    assert calibrated_efficiency("h200", db).tensor == pytest.approx(doc["factors"]["tensor"]["fitted"])
    with db.engine.begin() as conn:   # leave the module's database as it was
        conn.execute(sa.delete(calibrations_table))


def test_a_synthetic_sweep_replays_and_is_labelled(tmp_path, capsys):
    sched = attention_prefill_schedule(attention("2pass", causal=True))
    sweep = synthetic_sweep(sched, dict(B=2, G=4, R=2, P=1024, M=1024, E=64, F=64), "h200", name="small")
    assert sweep.synthetic and "synthetic" in sweep.kind
    (path := tmp_path / "sweep.json").write_text(json.dumps(sweep_doc([sweep])))
    loaded, = load_sweeps(path)
    assert loaded.times == sweep.times and loaded.schedule.key() == sched.key() and loaded.synthetic
    score, = replay(loaded, ["random"], seeds=2, budget=12)
    assert len(score.trials_to_within) == 2 and score.synthetic
    assert all(c is None or 1 <= c <= 12 for c in score.trials_to_within)
    with pytest.raises(SweepError, match="synthetic"):
        import_sweep(TuningDatabase(f"sqlite:///{tmp_path / 's.db'}"), [loaded])
    spec = importlib.util.spec_from_file_location("sweep_replay", ROOT / "bench" / "sweep_replay.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--synthetic", "--samplers", "random", "--seeds", "1", "--budget", "5", "--shapes", "1"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out


def test_a_recorded_sweep_is_calibration_data(tmp_path):
    """bench/tuner.py's format (shapes as [B, H, Hkv, S, D, causal]), with a failed config."""
    sched = attention_prefill_schedule(attention("2pass", causal=True))
    ext = dict(B=1, G=4, R=2, P=512, M=512, E=64, F=64)
    ranked = rank_configs(sched, ext, H200, 2)
    times = {c.key(): predict(p.cost, H200, "bf16", TRUE).seconds for p, c in ranked}
    times[ranked[-1][1].key()] = None
    doc = {"kascade_sweep": 1, "device": "NVIDIA H200", "versions": VERSIONS, "target": "h200",
           "date": "2025-01-01", "sweeps": {json.dumps([1, 8, 4, 512, 64, True]): times}}
    sweep, = load_sweeps(doc)
    assert not sweep.synthetic and sweep.extents == ext and "NVIDIA H200" in sweep.kind
    db = TuningDatabase(f"sqlite:///{tmp_path / 'sweep.db'}")
    assert import_sweep(db, [sweep]) == len(times) - 1
    assert calibrate("h200", db, store=False).samples == len(times) - 1
    best = min(v for v in times.values() if v is not None)

    class H:
        def __init__(self, s):
            self.seconds = s
    assert trials_to_within([H(best * 2), H(best * 1.02)], best) == 2
    assert trials_to_within([H(best * 2)], best) is None
    with pytest.raises(SweepError, match="kascade sweep"):
        load_sweeps({"sweeps": {}})


def test_no_warning_when_nothing_is_stored(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calibrated_efficiency("h200", TuningDatabase(f"sqlite:///{tmp_path / 'n.db'}")) == Efficiency()


def test_samples_that_cannot_be_costed_are_left_out_and_said(tmp_path):
    from dataclasses import replace
    db = TuningDatabase(f"sqlite:///{tmp_path / 'mixed.db'}")
    good = measured_samples(every=20)
    broken = replace(good[0], cascade="this is not cascade text")
    store_measurements(db, [*good, broken])
    cal = calibrate("h200", db, store=False)
    assert cal.samples == len(good)
    assert any(n.startswith("1 cannot recompute their cost") for n in cal.notes)
    with pytest.raises(CalibrationError, match="other software versions"):
        calibrate("h200", db, versions="kascade=9.9")
