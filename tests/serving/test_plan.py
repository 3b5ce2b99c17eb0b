"""Plan search: Optuna over the plan space, infeasible plans with reasons, capacity, `kascade plan`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import optuna
import pytest

from kascade.autotune.plan import PLAN_VERSION, Evaluator, Plan, PlanError, read_plan, search_plans
from kascade.backends.cluster import make_cluster
from kascade.backends.workload import SLO, poisson_workload
from kascade.ir.library.models import load_model

SPEC = load_model("llama-3-8b")
SLO_ = SLO(0.5, 0.05)


def test_a_plan_search_finds_feasible_plans_and_records_infeasible_ones_with_reasons(tmp_path):
    cluster = make_cluster("h200", 8)
    reqs = poisson_workload(6, 200, "lognormal:1024,600", "lognormal:128,80", seed=0)
    url = f"sqlite:///{tmp_path / 'plans.db'}"
    r = search_plans(SPEC, cluster, reqs, SLO_, trials=20, storage_url=url, seed=0, capacity_top=1)
    assert r.trials == 20 and r.best is not None
    assert all(o.plan.gpus <= 8 for o in r.outcomes)
    assert r.best.attainment >= 0.99 and r.best.capacity and r.best.capacity > 0
    assert r.infeasible and all(o.infeasible for o in r.infeasible), [o.infeasible for o in r.infeasible]
    assert any("GPUs" in o.infeasible for o in r.infeasible)
    front = [(o.plan.gpus, o.goodput_per_gpu) for o in r.pareto]
    assert front == sorted(front) and len({g for g, _ in front}) == len(front)
    study = optuna.load_study(study_name=r.study, storage=url)
    marked = [t for t in study.trials if "infeasible" in t.user_attrs]
    assert len(marked) >= len(r.infeasible) and all(isinstance(t.user_attrs["infeasible"], str) for t in marked)
    again = search_plans(SPEC, cluster, reqs, SLO_, trials=2, storage_url=url, seed=1, capacity_top=0)
    assert len(optuna.load_study(study_name=r.study, storage=url).trials) == 22   # the study resumes
    assert again.best.plan == r.best.plan or again.best.goodput_per_gpu >= r.best.goodput_per_gpu


def test_infeasible_plans_say_why():
    ev = Evaluator(load_model("llama-3-70b"), make_cluster("h200", 8), poisson_workload(1, 5, 100, 10), SLO_)
    cases = {Plan(tp=1): "weights do not fit", Plan(tp=3): "does not divide", Plan(tp=8, dp=2): "the cluster has 8",
             Plan(ep=2, tp=4): "mixture-of-experts", Plan(tp=4, dp=1, policy="disaggregated"): "one decode replica"}
    for plan, why in cases.items():
        got = ev.infeasible(plan)
        assert got and why in got, (plan.label(), got)
    assert ev.infeasible(Plan(tp=4, dp=2)) is None


def test_capacity_is_the_highest_rate_within_the_slo():
    ev = Evaluator(SPEC, make_cluster("h200", 8), poisson_workload(4, 300, "lognormal:1024,600",
                                                                   "lognormal:128,80", seed=1), SLO_)
    one, two = ev.capacity(Plan(tp=1)), ev.capacity(Plan(tp=1, dp=2))
    assert 1.6 * one < two < 2.4 * one, (one, two)
    scaled = [r.__class__(r.id, r.arrival * 4 / (one * 1.3), r.prompt_tokens, r.output_tokens)
              for r in ev.requests]
    assert not ev.simulate(Plan(tp=1), scaled).meets(), f"30 % above the capacity {one:.2f} req/s still meets"


# ---- the command line ----------------------------------------------------------------------------
def _report_helpers():
    path = Path(__file__).parents[1] / "autotune" / "test_report.py"
    spec = importlib.util.spec_from_file_location("kascade_test_report_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kascade_plan_end_to_end_with_a_trace_file(run_kascade, tmp_path):
    trace = tmp_path / "trace.jsonl"
    reqs = poisson_workload(4, 120, "lognormal:800,400", "lognormal:100,60", seed=3)
    trace.write_text("".join(json.dumps({"arrival": r.arrival, "prompt_tokens": r.prompt_tokens,
                                         "output_tokens": r.output_tokens}) + "\n" for r in reqs))
    out = tmp_path / "out"
    r = run_kascade("plan", "--model", "llama-3-8b", "--target", "h200", "--gpus", "2", "--workload", str(trace),
                    "--slo-ttft", "500ms", "--slo-tpot", "50ms", "--trials", "8", "--storage",
                    f"sqlite:///{tmp_path / 'p.db'}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "1. TP" in r.stdout and "wrote" in r.stdout
    doc = read_plan(out / "plan.json")
    assert doc["kascade_plan"] == PLAN_VERSION and doc["best"]["plan"]["tp"] in (1, 2)
    assert doc["workload"]["requests"] == 120 and doc["slo"]["tpot"] == 0.05
    md = (out / "plan.md").read_text()
    for title in ("Best plans", "Pareto front", "Latency distributions", "Where iteration time goes", "Utilisation"):
        assert f"## {title}" in md
    page = (out / "plan.html").read_text()
    helpers = _report_helpers()
    helpers.assert_well_formed(page)
    assert page.count('src="data:image/png;base64,') == len(list((out / "figures").glob("*.png"))) >= 4
    for outside in ("<script", "<link", "@import", "url("):
        assert outside not in page
    browser = helpers.chromium()
    if browser is None:
        pytest.skip("no chromium binary: `apt-get install chromium` (CI installs it)")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'pr'}",
                          "--dump-dom", (out / "plan.html").resolve().as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert "Pareto front" in dom and dom.count("<table") >= 5


@pytest.mark.parametrize("args, message", [
    (["--slo-ttft", "0ms"], "impossible to meet"),
    (["--slo-tpot", "fast"], "takes a duration"),
    (["--model", "llama-9"], "unknown model"),
    (["--workload", "poisson:n=3"], "rate required"),
    (["--target", "rtx4090", "--gpus", "1", "--model", "llama-3-70b"], "no plan of llama-3-70b fits"),
])
def test_kascade_plan_bad_input_is_exit_code_2_with_a_message(run_kascade, tmp_path, args, message):
    base = {"--model": "llama-3-8b", "--workload": "poisson:rate=2,n=10", "--trials": "2",
            "--storage": f"sqlite:///{tmp_path / 'p.db'}", "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = run_kascade("plan", *[x for kv in base.items() for x in kv])
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr


def test_a_plan_file_of_another_kind_is_refused(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"kascade_sweep": 1}')
    with pytest.raises(PlanError, match="not a kascade plan"):
        read_plan(p)
