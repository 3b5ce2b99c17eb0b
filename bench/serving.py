"""Serving benchmark: how fast the plan search and the simulator run on a CPU.

    python bench/serving.py --out serving.json

* plan search: Llama-3-70B on 8 x H200 over the whole plan space (TP, PP, DP, policy incl.
  disaggregation and its ratio, nano-batches, token budget, max batch, KV block size) with
  NSGA-II, a Poisson workload, the capacity search of the best plans included; target < 60 s;
* simulator: 100k requests of Llama-3-8B on one H200 under each policy; target < 60 s each;
* iteration model: a warm ``IterationModel.iteration()`` call (what the simulator pays per
  iteration), dense TP and MoE TP x EP.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from kascade.autotune.plan import search_plans
from kascade.backends.cluster import make_cluster
from kascade.backends.iteration import IterationModel, Parallelism
from kascade.backends.simulator import Policy, simulate
from kascade.backends.workload import SLO, poisson_workload
from kascade.ir.library.models import load_model


def plan_search(trials: int, requests: int) -> dict:
    spec, cluster = load_model("llama-3-70b"), make_cluster("h200", 8)
    reqs = poisson_workload(4, requests, "lognormal:1024,800", "lognormal:256,200", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = search_plans(spec, cluster, reqs, SLO(0.5, 0.05), trials=trials, storage_url=f"sqlite:///{tmp}/p.db")
        dt = time.perf_counter() - t0
    best = r.best
    return {"model": spec.name, "cluster": "8 x h200", "trials": r.trials, "requests": requests, "seconds": dt,
            "feasible": len(r.outcomes), "infeasible": len(r.infeasible),
            "best": best.plan.label() if best else None, "best_goodput_per_gpu": best.goodput_per_gpu if best else None,
            "best_capacity": best.capacity if best else None, "target_s": 60}


def simulator(n: int, policy: str) -> dict:
    m = IterationModel(load_model("llama-3-8b"), make_cluster("h200", 8), Parallelism())
    reqs = poisson_workload(12, n, "lognormal:1024,800", "lognormal:200,150", seed=0)
    t0 = time.perf_counter()
    r = simulate(reqs, m, Policy(policy, prefill_replicas=1), replicas=2 if policy == "disaggregated" else 1)
    dt = time.perf_counter() - t0
    return {"policy": policy, "requests": n, "seconds": dt, "requests_per_s": n / dt, "iterations": r.iterations,
            "completed": r.completed, "cost_model_calls": r.cost_calls, "target_s": 60}


def iteration_calls(name: str, par: Parallelism, calls: int = 2000) -> dict:
    """Microseconds per warm ``iteration()`` over mixed batches (each batch seen once before timing)."""
    m = IterationModel(load_model(name), make_cluster("h200", 8), par)
    batches = [([(64 + 16 * (i % 200), i % 300)], [1000 + (i + j) % 700 for j in range(i % 50 + 1)])
               for i in range(calls)]
    for pre, dec in batches:
        m.iteration(pre, dec)
    t0 = time.perf_counter()
    for pre, dec in batches:
        m.iteration(pre, dec)
    dt = time.perf_counter() - t0
    return {"model": name, "parallelism": str(par), "calls": calls, "us_per_call": dt / calls * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("serving.json"))
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--search-requests", type=int, default=500)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--policies", default="prefill_first,chunked,disaggregated,nanoflow")
    args = ap.parse_args()
    print("plan search (Llama-3-70B, 8 x H200):", flush=True)
    search = plan_search(args.trials, args.search_requests)
    print(f"  {search['seconds']:.1f} s for {search['trials']} trials", flush=True)
    print("simulator:", flush=True)
    sims = []
    for p in args.policies.split(","):
        sims.append(simulator(args.requests, p))
        print(f"  {p}: {sims[-1]['seconds']:.1f} s", flush=True)
    iters = [iteration_calls("llama-3-70b", Parallelism(tp=8)),
             iteration_calls("qwen3-30b-a3b", Parallelism(tp=2, ep=4))]
    result = {"plan_search": search, "simulator": sims, "iteration": iters,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "processor": platform.processor(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}}
    args.out.write_text(json.dumps(result, indent=1))
    print()
    print(f"{'benchmark':34} {'seconds':>8} {'target':>7}  detail")
    print(f"{'plan search 70B 8xH200':34} {search['seconds']:8.1f} {60:7d}  {search['trials']} trials, "
          f"{search['feasible']} feasible / {search['infeasible']} infeasible; best {search['best']}")
    for s in sims:
        print(f"{'simulate ' + str(s['requests']) + ' req, ' + s['policy']:34} {s['seconds']:8.1f} {60:7d}  "
              f"{s['iterations']:,} iterations, {s['completed']:,} completed")
    for it in iters:
        print(f"{'iteration() ' + it['model'] + ' ' + it['parallelism']:34} {it['us_per_call']:8.1f} us per warm call")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
