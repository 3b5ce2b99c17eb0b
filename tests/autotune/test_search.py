"""The autotuner on the CPU: dry runs against the cost model, records, versions, refusals, the winner."""

from __future__ import annotations

import math

import optuna
import pytest

from kascade.autotune.db import TuningDatabase, TuningKey
from kascade.autotune.lookup import lookup, shape_bucket, target_key
from kascade.autotune.measure import CallableMeasurer, MeasureError, Measurer, Timing
from kascade.autotune.search import TuneError, default_study_name, pick, tune
from kascade.backends.model import rank_configs
from kascade.backends.targets import get_target
from kascade.ir.dtypes import f32
from kascade.ir.library import attention
from kascade.passes.schedule import Config, attention_prefill_schedule

SCHED = attention_prefill_schedule(attention("2pass", causal=True))
EXT = dict(B=2, G=8, R=4, P=2048, M=2048, E=128, F=128)
H200 = get_target("h200")
VERSIONS = "kascade=0.1.0 triton=3.6.0 torch=2.11.0 cuda=13.0"


def url(tmp_path, name="tune.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def model_best(ext=EXT) -> tuple[str, float]:
    """The exhaustive answer: every feasible config ranked by the model, the tie band applied."""
    ranked = rank_configs(SCHED, ext, H200)
    return pick({c.key(): p.seconds for p, c in ranked}), ranked[0][0].seconds


def test_a_dry_run_of_60_trials_finds_the_models_best_and_stores_a_predicted_record(tmp_path):
    res = tune(SCHED, [EXT], "h200", trials=60, storage_url=url(tmp_path))
    r = res.best
    best, seconds = model_best()
    assert r.config.key() == best and r.seconds <= seconds * 1.01
    assert r.trials == 60 and r.study_trials == 60 and r.failures == 0
    assert r.roofline_seconds is not None and 1 < r.roofline_ratio < 5
    assert len({h.config for h in r.history}) == 60          # duplicates are not counted as trials
    db = TuningDatabase(url(tmp_path))
    key = TuningKey(SCHED.key(), shape_bucket(SCHED, EXT), "bf16", target_key(H200), r.key.versions, measured=False)
    rec = db.best(key)
    assert rec is not None and rec.config == best and rec.source == r.study
    assert db.best(TuningKey(**{**key.__dict__, "measured": True})) is None   # never mixed with measured ones
    assert lookup(SCHED, EXT, "bf16", H200, db, shipped=None) is None        # runtime lookup wants measured


def test_the_search_alone_finds_the_best_without_warm_start(tmp_path):
    """TPE (multivariate, grouped, seeded) from scratch: 50 of 144 feasible configs."""
    r = tune(SCHED, [EXT], "h200", trials=50, storage_url=url(tmp_path), warm_start=0).best
    assert r.config.key() == model_best()[0]


def test_seeded_runs_are_deterministic(tmp_path):
    a = tune(SCHED, [EXT], "h200", trials=15, storage_url=url(tmp_path, "a.db"), warm_start=0, sampler="random").best
    b = tune(SCHED, [EXT], "h200", trials=15, storage_url=url(tmp_path, "b.db"), warm_start=0, sampler="random").best
    assert [h.config for h in a.history] == [h.config for h in b.history] and a.config == b.config


def test_rerunning_resumes_the_study_and_trials_accumulate(tmp_path):
    first = tune(SCHED, [EXT], "h200", trials=10, storage_url=url(tmp_path), sampler="random").best
    second = tune(SCHED, [EXT], "h200", trials=10, storage_url=url(tmp_path), sampler="random").best
    assert first.study == second.study and second.study_trials == 20
    assert not {h.config for h in first.history} & {h.config for h in second.history}


def test_a_small_space_stops_when_every_config_was_tried(tmp_path):
    """fp32 at head dim 256: 30 feasible configs of 192 (fp32 doubles the register estimate)."""
    sched, ext = attention_prefill_schedule(attention("2pass", dtype=f32)), dict(EXT, E=256, F=256)
    r = tune(sched, [ext], "h200", trials=500, storage_url=url(tmp_path)).best
    ranked = rank_configs(sched, ext, H200, itemsize=4)
    assert r.trials == len(ranked) < 500 and r.infeasible > 0
    assert r.config.key() == pick({c.key(): p.seconds for p, c in ranked})


def test_tie_band_and_key_break_ties():
    assert pick({"b": 1.0, "a": 1.009, "c": 0.9999}) == "a"
    assert pick({"b": 1.0, "a": 1.02}) == "b"
    assert pick({"b": 1.0, "a": 1.02}, tie_band=0.05) == "a"


def fake_times(key: str) -> float:
    """A measurement double: depends on the config, fails for BLOCK_N=128."""
    cfg = dict(kv.split("=") for kv in key.split(","))
    if cfg["BLOCK_N"] == "128":
        raise MeasureError("compile", "out of resources (simulated)")
    return 1e-4 * (1 + abs(int(cfg["BLOCK_M"]) - 64) / 64 + abs(int(cfg["BLOCK_N"]) - 32) / 64
                   + 0.01 * int(cfg["num_stages"]) + 0.001 * int(cfg["num_warps"]))


def measured_factory(schedule, ext, worker):
    return CallableMeasurer(fake_times, measured=True)


def test_measured_records_are_keyed_by_versions_and_a_version_change_is_a_miss(tmp_path, monkeypatch):
    res = tune(SCHED, [EXT], "h200", backend=measured_factory, trials=20, storage_url=url(tmp_path),
               versions=VERSIONS, warm_start=20)
    r = res.best
    assert r.key.measured and r.key.versions == VERSIONS and r.stored and r.failures > 0
    assert all(h.state == "failed" and "out of resources" in h.error for h in r.history if "BLOCK_N=128," in h.config)
    db = TuningDatabase(url(tmp_path))
    monkeypatch.setattr("kascade.autotune.lookup.software_versions", lambda: VERSIONS)
    cfg, why = lookup(SCHED, EXT, "bf16", H200, db, shipped=None)
    assert cfg == r.config and why.startswith("tuned:")
    monkeypatch.setattr("kascade.autotune.lookup.software_versions", lambda: VERSIONS.replace("3.6.0", "3.7.0"))
    assert lookup(SCHED, EXT, "bf16", H200, db, shipped=None) is None
    assert default_study_name(r.key, H200) != default_study_name(
        TuningKey(**{**r.key.__dict__, "versions": "other"}), H200)   # a new study, not a resumed one


def test_sqlite_refuses_parallel_workers_with_the_alternatives(tmp_path):
    with pytest.raises(TuneError, match="PostgreSQL.*JournalStorage"):
        tune(SCHED, [EXT], "h200", trials=5, storage_url=url(tmp_path), workers=2)


def test_parallel_workers_on_a_journal_storage(tmp_path):
    r = tune(SCHED, [EXT], "h200", trials=12, storage_url=f"journal:///{tmp_path / 'study.log'}", workers=3).best
    assert r.trials >= 12 and r.config.key() == model_best()[0]
    assert (tmp_path / "study.records.db").is_file()


def test_a_corrupt_storage_file_is_a_clear_error_and_a_lookup_miss(tmp_path):
    (tmp_path / "bad.db").write_bytes(b"definitely not sqlite " * 200)
    with pytest.raises(TuneError, match="corrupt SQLite file: move it aside"):
        tune(SCHED, [EXT], "h200", trials=5, storage_url=url(tmp_path, "bad.db"))
    assert lookup(SCHED, EXT, "bf16", H200, TuningDatabase(url(tmp_path, "bad.db")), shipped=None) is None
    assert tune(SCHED, [EXT], "h200", trials=3, storage_url=url(tmp_path, "good.db")).best.config is not None


def test_a_study_name_reused_for_another_key_is_refused(tmp_path):
    tune(SCHED, [EXT], "h200", trials=2, storage_url=url(tmp_path), study_name="mine")
    with pytest.raises(TuneError, match="choose another --study name"):
        tune(SCHED, [dict(EXT, E=64, F=64)], "h200", trials=2, storage_url=url(tmp_path), study_name="mine")


def test_shapes_of_one_bucket_share_a_study_and_a_timeout_skips_the_rest(tmp_path):
    res = tune(SCHED, [EXT, dict(EXT, P=2000, M=2000)], "h200", trials=3, storage_url=url(tmp_path))
    assert len(res.shapes) == 1
    res = tune(SCHED, [dict(EXT, P=p, M=p) for p in (256, 512, 1024, 4096, 8192)], "h200", trials=100,
               storage_url=url(tmp_path), timeout=1.0)
    assert res.skipped and res.elapsed < 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="annealing"), "unknown sampler 'annealing'"),
    (dict(backend="tpu"), "unknown backend 'tpu'"),
    (dict(trials=0), "at least 1"),
    (dict(timeout=-1), "positive number of seconds"),
    (dict(storage_url="mysql://x/y"), "unsupported storage"),
])
def test_bad_requests_are_clear_errors(tmp_path, kwargs, message):
    kwargs.setdefault("storage_url", url(tmp_path))
    with pytest.raises(TuneError, match=message):
        tune(SCHED, [EXT], "h200", **kwargs)


@pytest.mark.parametrize("sampler", ["random", "grid", "nsga2", "gp"])
def test_every_sampler_completes_a_short_dry_run(tmp_path, sampler):
    if sampler == "gp":
        pytest.importorskip("scipy", reason="Optuna's GPSampler needs scipy")
    r = tune(SCHED, [EXT], "h200", trials=12, storage_url=url(tmp_path), sampler=sampler).best
    assert r.trials == 12 and r.config is not None and math.isfinite(r.seconds)
    study = optuna.load_study(study_name=r.study, storage=url(tmp_path))
    infeasible = [t for t in study.trials if "infeasible" in t.user_attrs]
    assert all(SCHED.feasible(Config.of(**_cfg(t)), {"E": 128, "F": 128}) is not None for t in infeasible)


def _cfg(t) -> dict:
    return {k.removeprefix("log2_"): (1 << v if k.startswith("log2_") else v) for k, v in t.params.items()}


class TwoPhase(Measurer):
    """A measurer with a probe (as the GPU one): probes and full measurements are counted."""
    measured = True

    def __init__(self):
        self.probes, self.full = [], []

    def probe(self, config):
        self.probes.append(config.key())
        return fake_times(config.key())

    def measure(self, config):
        self.full.append(config.key())
        return Timing.of([fake_times(config.key())])


def test_the_pruner_drops_clearly_worse_configs_after_the_probe(tmp_path):
    m = TwoPhase()
    r = tune(SCHED, [EXT], "h200", backend=lambda s, e, w: m, trials=40, storage_url=url(tmp_path), sampler="random",
             versions=VERSIONS, retime_top=1).best
    pruned = [h for h in r.history if h.state == "pruned"]
    done = [h.seconds for h in r.history if h.state == "complete"]
    assert r.pruned == len(pruned) > 0 and all(h.config not in m.full for h in pruned)
    assert all(h.seconds > 1.5 * min(done) for h in pruned)   # only clearly worse ones
    assert r.config.key() in m.full and r.seconds <= min(done) * 1.01   # the tie band
