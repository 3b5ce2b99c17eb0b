"""Autotuner benchmark: how fast the tuner runs, and which sampler finds a good config soonest.

    python bench/tuner.py --out tuner.json                    # CPU: throughput, time to first result, samplers
    python bench/tuner.py --sweep sweep.json                  # GPU: every feasible config timed once (recorded)
    python bench/tuner.py --replay sweep.json --out t.json    # CPU: the recorded sweep replayed for the samplers

CPU part (no GPU needed):

* dry-run throughput: configs measured per second by ``kascade.autotune.tune`` against the roofline
  model on SQLite (every proposal goes through the Optuna study in the database, as in a real run),
  and proposals per second (infeasible and duplicate proposals included);
* time to first result: wall time from starting ``kascade tune`` (a fresh interpreter) to the first
  record in the database, and to the end of a one-trial run;
* samplers: each sampler tunes against a replayed sweep (a table config -> seconds, failures
  included) for a fixed budget, several seeds; the score is the number of trials until the best
  so far is within 3 % of the sweep's best (the exhaustive answer). Without ``--replay`` the table
  is the cost model's predictions, a stand-in until a GPU sweep is recorded.

GPU part (``--sweep``): every feasible config of each shape timed in an isolated worker (compiled,
checked against the reference, then timed; failures recorded as null with the reason), written
once to JSON, incrementally, so that a visit cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kascade.autotune.measure import CallableMeasurer, MeasureError
from kascade.autotune.replay import trials_to_within
from kascade.autotune.search import SAMPLERS, tune
from kascade.backends.model import rank_configs
from kascade.backends.targets import get_target
from kascade.ir.library import attention
from kascade.passes.schedule import attention_prefill_schedule

TARGET = "h200"
SHAPES = [  # (batch, heads, kv heads, seq, head dim, causal)
    (4, 32, 8, 4096, 128, True),
    (8, 16, 16, 1024, 128, False),
    (1, 32, 8, 16384, 128, True),
    (16, 32, 8, 512, 64, False),
]


def schedule_and_extents(shape) -> tuple:
    B, H, Hkv, S, D, causal = shape
    sched = attention_prefill_schedule(attention("2pass", causal=causal))   # the form kascade.attention runs
    return sched, dict(B=B, G=Hkv, R=H // Hkv, P=S, M=S, E=D, F=D)


def shape_name(shape) -> str:
    B, H, Hkv, S, D, causal = shape
    return f"B{B} H{H}/{Hkv} S{S} D{D}{' causal' if causal else ''}"


# ---- CPU: throughput and time to first result ------------------------------------------------------
def dry_run_throughput(trials: int, sampler: str) -> dict:
    sched, ext = schedule_and_extents(SHAPES[0])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = tune(sched, [ext], TARGET, trials=trials, storage_url=f"sqlite:///{tmp}/t.db", sampler=sampler).best
        dt = time.perf_counter() - t0
    proposals = r.trials + r.infeasible + r.duplicates
    return {"sampler": sampler, "trials": r.trials, "proposals": proposals, "seconds": dt,
            "trials_per_s": r.trials / dt, "proposals_per_s": proposals / dt}


def time_to_first_result() -> dict:
    """Wall time from ``kascade tune`` starting to its first stored record, and of a one-trial run."""
    import sqlalchemy as sa
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/first.db"
        cmd = [sys.executable, "-m", "kascade", "tune", "attention", "--causal", "--backend", "model",
               "--storage", url, "--trials", "30"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = None
        engine = sa.create_engine(url)
        while proc.poll() is None and first is None:
            time.sleep(0.01)
            try:
                with engine.connect() as conn:
                    if conn.exec_driver_sql("SELECT count(*) FROM kascade_tuning_records").scalar():
                        first = time.perf_counter() - t0
            except sa.exc.SQLAlchemyError:
                pass
        proc.wait()
        whole = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run(cmd[:-1] + ["1"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import kascade.cli"], check=True)
        startup = time.perf_counter() - t0
    return {"first_record_s": first, "run_30_trials_s": whole, "run_1_trial_s": one, "import_cli_s": startup}


# ---- samplers on a replayed sweep ---------------------------------------------------------------
def model_sweep(shape) -> dict[str, float | None]:
    sched, ext = schedule_and_extents(shape)
    return {c.key(): p.seconds for p, c in rank_configs(sched, ext, get_target(TARGET))}


def replay(table: dict[str, float | None]):
    def fn(key: str) -> float:
        s = table.get(key)
        if s is None:
            raise MeasureError("error", f"{key} failed in the recorded sweep" if key in table else f"{key} not swept")
        return s

    def factory(schedule, ext, worker):
        return CallableMeasurer(fn, measured=True)
    return factory


def compare_samplers(sweeps: dict, budget: int, seeds: int, samplers: list[str]) -> list[dict]:
    rows = []
    for shape_key, table in sweeps.items():
        shape = tuple(json.loads(shape_key))
        sched, ext = schedule_and_extents(shape)
        ok = {k: v for k, v in table.items() if v is not None}
        best = min(ok.values())
        for sampler in samplers:
            for warm in ([0, 8] if sampler == "tpe" else [0]):
                counts, winners = [], []
                t0 = time.perf_counter()
                for seed in range(seeds):
                    with tempfile.TemporaryDirectory() as tmp:
                        r = tune(sched, [ext], TARGET, backend=replay(table), trials=budget, sampler=sampler,
                                 seed=seed, warm_start=warm, storage_url=f"sqlite:///{tmp}/s.db", retime_top=1).best
                    counts.append(trials_to_within(r.history, best))
                    winners.append(ok.get(r.config.key(), math.inf) / best if r.config else math.inf)
                found = [c for c in counts if c is not None]
                rows.append({"shape": shape_name(shape), "sampler": sampler + ("+warm" if warm else ""),
                             "configs": len(table), "budget": budget, "seeds": seeds,
                             "trials_to_3pct": counts, "median_trials_to_3pct":
                                 statistics.median(found) if len(found) == len(counts) else None,
                             "found": f"{len(found)}/{len(counts)}", "winner_vs_best": max(winners),
                             "seconds": time.perf_counter() - t0})
                print(f"  {rows[-1]['shape']:28} {rows[-1]['sampler']:9} trials to 3%: {counts}", flush=True)
    return rows


# ---- GPU: the exhaustive sweep ----------------------------------------------------------------
def sweep(out: Path, shapes: list[tuple]) -> None:
    """Every feasible config of each shape timed once on this GPU; written after every shape."""
    import torch

    from kascade.autotune.lookup import software_versions
    from kascade.autotune.measure import gpu_measurer
    if not torch.cuda.is_available():
        sys.exit("--sweep needs a CUDA GPU")
    doc = {"kascade_sweep": 1, "device": torch.cuda.get_device_name(0), "versions": software_versions(),
           "target": TARGET, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sweeps": {}, "errors": {}}
    for shape in shapes:
        sched, ext = schedule_and_extents(shape)
        ranked = rank_configs(sched, ext, get_target(TARGET))
        m = gpu_measurer(sched, ext)
        table, errors = {}, {}
        t0 = time.perf_counter()
        try:
            for _, cfg in ranked:
                try:
                    table[cfg.key()] = m.measure(cfg).median
                except MeasureError as e:
                    table[cfg.key()], errors[cfg.key()] = None, str(e)
        finally:
            m.close()
        doc["sweeps"][json.dumps(list(shape))] = table
        doc["errors"][json.dumps(list(shape))] = errors
        out.write_text(json.dumps(doc, indent=1))
        ok = [v for v in table.values() if v is not None]
        print(f"{shape_name(shape)}: {len(ok)}/{len(table)} configs in {time.perf_counter() - t0:.0f} s, "
              f"best {min(ok) * 1e6:.1f} us" if ok else f"{shape_name(shape)}: every config failed", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tuner.json"))
    ap.add_argument("--sweep", type=Path, help="GPU: record the exhaustive sweep to this file and stop")
    ap.add_argument("--sweep-shapes", type=int, default=2, help="how many of SHAPES to sweep (GPU time)")
    ap.add_argument("--replay", type=Path, help="a sweep file to replay for the sampler comparison")
    ap.add_argument("--trials", type=int, default=100, help="dry-run trials for the throughput")
    ap.add_argument("--budget", type=int, default=60, help="trials per sampler run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samplers", default="tpe,random,nsga2,gp,grid", help=f"comma-separated, of {SAMPLERS}")
    args = ap.parse_args()
    if args.sweep:
        sweep(args.sweep, SHAPES[:args.sweep_shapes])
        return
    print("dry-run throughput (roofline model, SQLite study):", flush=True)
    throughput = [dry_run_throughput(args.trials, s) for s in ("tpe", "random")]
    print("time to first result (a fresh `kascade tune` process):", flush=True)
    first = time_to_first_result()
    if args.replay:
        doc = json.loads(args.replay.read_text())
        sweeps, source = doc["sweeps"], f"replay of {args.replay} ({doc.get('device')}, {doc.get('date')})"
    else:
        sweeps = {json.dumps(list(s)): model_sweep(s) for s in SHAPES[:2]}
        source = "cost-model predictions (stand-in for a GPU sweep)"
    print(f"samplers on {source}:", flush=True)
    samplers = compare_samplers(sweeps, args.budget, args.seeds, args.samplers.split(","))
    result = {"throughput": throughput, "time_to_first_result": first, "samplers": samplers, "sampler_source": source,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "processor": platform.processor(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}}
    args.out.write_text(json.dumps(result, indent=1))
    print()
    print(f"{'sampler':10} {'trials':>7} {'s':>7} {'trials/s':>9} {'proposals/s':>12}")
    for r in throughput:
        print(f"{r['sampler']:10} {r['trials']:7d} {r['seconds']:7.2f} {r['trials_per_s']:9.1f} "
              f"{r['proposals_per_s']:12.1f}")
    print(f"\nfirst record after {first['first_record_s']:.2f} s; a 1-trial run takes {first['run_1_trial_s']:.2f} s "
          f"(importing the CLI: {first['import_cli_s']:.2f} s)")
    print(f"\n{'shape':28} {'sampler':10} {'median trials to 3%':>20} {'found':>6} {'winner/best':>12}")
    for r in samplers:
        med = "-" if r["median_trials_to_3pct"] is None else f"{r['median_trials_to_3pct']:.0f}"
        print(f"{r['shape']:28} {r['sampler']:10} {med:>20} {r['found']:>6} {r['winner_vs_best']:12.3f}")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
