"""A plan's sharded kernel shapes for `kascade tune --from-plan`, and plans re-timed from measured tuning records."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from kascade.autotune.db import TuningDatabase, TuningKey, TuningRecord
from kascade.autotune.lookup import shape_bucket, software_versions, target_key
from kascade.autotune.plan import Evaluator, Plan, PlanError, read_plan, write_plan
from kascade.autotune.plan_kernels import (
    at_bucket,
    kernel_schedules,
    plan_kernel_shapes,
    reevaluate,
    tuned_kernel_seconds,
)
from kascade.backends.cluster import make_cluster
from kascade.backends.iteration import IterationModel, Parallelism
from kascade.backends.targets import get_target
from kascade.backends.workload import SLO, poisson_workload
from kascade.ir.library.models import load_model

H200 = get_target("h200")
LLAMA, MIXTRAL = load_model("llama-3-8b"), load_model("mixtral-8x7b")


def _doc(model, plan: Plan, gpus: int = 8) -> dict:
    """A plan file as `kascade plan` writes it (the fields the plan tools read)."""
    c = make_cluster("h200", gpus)
    return {"kascade_plan": 1, "model": asdict(model), "slo": asdict(SLO(0.5, 0.05)),
            "cluster": {"target": "h200", "gpus_per_node": c.gpus_per_node, "nodes": c.nodes,
                        "intra": asdict(c.intra), "inter": asdict(c.inter)},
            "workload": {"spec": "poisson:rate=3,n=40", "seed": 0, "requests": 40, "prompt_p50": 700,
                         "prompt_p90": 1500, "output_p50": 120},
            "best": {"plan": asdict(plan)}, "top": []}


def _measured(db: TuningDatabase, schedule, extents, seconds: float, *, measured: bool = True) -> TuningRecord:
    cfg = kernel_config(schedule, extents)
    rec = TuningRecord(TuningKey(schedule.key(), shape_bucket(schedule, extents), "bf16", target_key(H200),
                                 software_versions(), measured=measured), cfg, seconds, source="test")
    assert db.put(rec)
    return rec


def kernel_config(schedule, extents) -> str:
    """The key of the config the cost model ranks first at ``extents`` (what a tuning run would store)."""
    from kascade.backends.model import rank_configs
    return rank_configs(schedule, extents, H200)[0][1].key()


def test_a_tp2_llama_plan_shards_attention_to_4_kv_heads_of_4_query_heads_each():
    shapes = plan_kernel_shapes(_doc(LLAMA, Plan(tp=2, dp=4, max_batch=128)))
    families = {s.family for s in shapes}
    assert families == {"attention_prefill", "paged_decode"}, [s.label for s in shapes]
    for s in shapes:
        assert (s.extents["G"], s.extents["R"], s.extents["E"]) == (4, 4, 128), s.label
    decode = sorted(s.extents["B"] for s in shapes if s.family == "paged_decode")
    assert decode == [16, 128], [s.label for s in shapes]   # an eighth of max_batch, and max_batch
    prefill = sorted(s.extents["P"] for s in shapes if s.family == "attention_prefill")
    assert prefill == [1024, 2048] and all(s.extents["M"] == s.extents["P"] for s in shapes
                                           if s.family == "attention_prefill")
    assert len({s.bucket for s in shapes}) == len(shapes)   # one shape per tuning bucket


def test_an_ep2_mixtral_plan_runs_4_experts_per_gpu():
    shapes = plan_kernel_shapes(Plan(ep=2, dp=4, max_batch=64), MIXTRAL)
    moe = [s for s in shapes if s.family == "moe"]
    assert moe and all((s.extents["E"], s.extents["K"], s.extents["D"], s.extents["F"]) == (4, 1, 4096, 14336)
                       for s in moe), [s.label for s in moe]
    # the 64 decodes are split over the 2 attention groups
    assert {s.extents["B"] for s in shapes if s.family == "paged_decode"} == {32, 4}
    with pytest.raises(PlanError, match="does not divide the 8 experts"):
        plan_kernel_shapes(Plan(ep=3), MIXTRAL)
    with pytest.raises(PlanError, match="needs its ModelSpec"):
        plan_kernel_shapes(Plan())


def test_measured_records_time_the_kernels_and_predicted_ones_do_not(tmp_path):
    db = TuningDatabase(f"sqlite:///{tmp_path}/x.db")
    sched = kernel_schedules()["paged_decode"]
    shape = {"B": 64, "G": 4, "R": 4, "E": 128, "F": 128, "M0": 16, "L": 1024, "KV": 64 * 1024}
    model = IterationModel(LLAMA, make_cluster("h200", 8), Parallelism(tp=2))
    cost_model = model.iteration([], [1024] * 64).seconds

    _measured(db, sched, shape, 5e-3, measured=False)   # a dry run's record: never a measurement
    hook = tuned_kernel_seconds(db, H200)
    assert hook("paged_decode", shape) is None and len(hook) == 0 and hook.fingerprint == ""

    _measured(db, sched, shape, 5e-3)
    hook = tuned_kernel_seconds(db, "h200")
    assert hook("paged_decode", shape) == pytest.approx(5e-3)   # the bucket's canonical shape: as measured
    assert hook("gemm", {"M": 64, "N": 4096, "K": 4096}) is None
    assert hook("paged_decode", {**shape, "E": 64, "F": 64}) is None   # another head dim never borrows it
    # the nearest bucket (half the length), scaled by the cost model: less, but the same order
    half = hook("paged_decode", {**shape, "L": 512, "KV": 64 * 512})
    assert 5e-3 / 4 < half < 5e-3, half
    tuned = IterationModel(LLAMA, make_cluster("h200", 8), Parallelism(tp=2), db=hook).iteration([], [1024] * 64)
    layers = LLAMA.layers
    assert tuned.seconds > cost_model + 0.9 * layers * 5e-3, (tuned.seconds, cost_model)
    assert dict(tuned.breakdown)["attention_decode"] == pytest.approx(layers * 5e-3)


def test_a_measured_record_moves_to_another_bucket_by_the_cost_models_ratio():
    sched = kernel_schedules()["attention_prefill"]
    ext = {"B": 1, "G": 4, "R": 4, "P": 700, "M": 700, "E": 128, "F": 128}
    canon = at_bucket("attention_prefill", sched, ext, shape_bucket(sched, ext))
    assert (canon["P"], canon["M"], canon["B"] * canon["G"] * canon["R"]) == (1024, 1024, 16)
    wider = at_bucket("attention_prefill", sched, ext, "E=128,F=128,M=2048,P=2048,heads=64")
    assert (wider["P"], wider["M"], wider["B"], wider["G"], wider["R"]) == (2048, 2048, 4, 4, 4)


def test_kascade_tune_from_plan_stores_every_family_and_plan_evaluate_compares(run_kascade, tmp_path):
    url = f"sqlite:///{tmp_path}/t.db"
    path = write_plan(_doc(MIXTRAL, Plan(ep=2, dp=2, max_batch=64), gpus=4), tmp_path / "plan.json")
    r = run_kascade("tune", "--from-plan", str(path), "--trials", "2", "--storage", url, "--backend", "model")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith(("prefill", "decode", "moe"))]
    shapes = plan_kernel_shapes(read_plan(path))
    assert len(lines) == len(shapes) and all("stored" in x and "predicted" in x for x in lines), r.stdout
    db = TuningDatabase(url)
    stored = {rec.key.schedule.split(":")[0] for rec in db.records(measured=False)}
    assert stored == {"attention_prefill", "paged_decode_partial+paged_decode_merge",
                      "moe_gate_up+moe_down+moe_combine"}, stored
    assert not list(db.records(measured=True))

    # promote the dry run's decode records to "measured" at 3x their prediction: the plan slows down
    for rec in db.records(measured=False):
        if rec.key.schedule.startswith("paged_decode"):
            db.put(TuningRecord(TuningKey(*list(asdict(rec.key).values())[:5], measured=True), rec.config,
                                rec.seconds * 3, source="test"))
    doc = read_plan(path)
    reqs = poisson_workload(3, 40, "lognormal:700,300", "lognormal:120,60", seed=0)
    hook = tuned_kernel_seconds(url, "h200")
    [row] = reevaluate(doc, reqs, hook)
    assert row.plan == Plan(ep=2, dp=2, max_batch=64) and row.before.infeasible is None
    assert row.after.tpot_p99 > 1.1 * row.before.tpot_p99, (row.before.tpot_p99, row.after.tpot_p99)
    assert hook.hits["paged_decode"] > 0 and hook.hits["moe"] == 0
    plain = Evaluator(MIXTRAL, make_cluster("h200", 4), reqs, SLO(0.5, 0.05)).evaluate(row.plan)
    assert plain.tpot_p99 == row.before.tpot_p99

    r = run_kascade("plan", "--evaluate", str(path), "--storage", url)
    assert r.returncode == 0, r.stderr
    assert "before goodput" in r.stdout and "after goodput" in r.stdout and "paged_decode" in r.stdout, r.stdout


@pytest.mark.parametrize("args, message", [
    ([], "needs WHAT"),
    (["attention", "--from-plan", "PLAN"], "drop 'attention'"),
    (["--from-plan", "PLAN", "--seq", "128"], "--seq do not apply"),
    (["--from-plan", "missing.json"], "cannot read plan"),
])
def test_tune_from_plan_bad_input_is_exit_code_2(tmp_path, args, message):
    from typer.testing import CliRunner

    from kascade.cli import app
    path = write_plan(_doc(LLAMA, Plan(tp=2)), tmp_path / "plan.json")
    r = CliRunner().invoke(app, ["tune", *[str(path) if a == "PLAN" else a for a in args]])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
