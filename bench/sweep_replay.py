"""Replay an exhaustive sweep for the samplers, on the CPU: trials each needs to get within 3 % of the best.

    python bench/sweep_replay.py sweep.json --out replay.json        # a sweep recorded on a GPU
    python bench/sweep_replay.py --synthetic --out replay.json       # no GPU sweep yet: the cost model's table

A recorded sweep comes from ``python bench/tuner.py --sweep sweep.json`` on the GPU (every
feasible config of each shape timed once). ``--synthetic`` builds the table from the roofline
model instead; it exercises the replay but says nothing about real kernels, and the output
says so on every line. The library side is :mod:`kascade.autotune.replay`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from kascade.autotune.replay import available_samplers, load_sweeps, replay, sweep_doc, synthetic_sweep
from kascade.ir.errors import KascadeError
from kascade.ir.library import attention
from kascade.passes.schedule import attention_prefill_schedule

# (batch, heads, kv heads, seq, head dim, causal): bench/tuner.py's first shapes
SYNTHETIC_SHAPES = [(4, 32, 8, 4096, 128, True), (8, 16, 16, 1024, 128, False)]


def synthetic(target: str) -> list:
    out = []
    for B, H, Hkv, S, D, causal in SYNTHETIC_SHAPES:
        sched = attention_prefill_schedule(attention("2pass", causal=causal))
        out.append(synthetic_sweep(sched, dict(B=B, G=Hkv, R=H // Hkv, P=S, M=S, E=D, F=D), target,
                                   name=json.dumps([B, H, Hkv, S, D, causal])))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep", nargs="?", type=Path, help="a sweep JSON recorded on a GPU")
    ap.add_argument("--synthetic", action="store_true", help="replay the cost model's predictions instead")
    ap.add_argument("--target", default="h200", help="target of the synthetic sweep")
    ap.add_argument("--samplers", default=None, help="comma-separated (default: every installed one but grid)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=60, help="trials per run")
    ap.add_argument("--within", type=float, default=0.03, help="fraction of the best that counts as found")
    ap.add_argument("--warm-start", type=int, default=0, help="cost-model configs enqueued first (0: samplers alone)")
    ap.add_argument("--shapes", type=int, default=None, help="replay only the first N shapes")
    ap.add_argument("--save-sweep", type=Path, help="also write the (synthetic) sweep replayed")
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    args = ap.parse_args(argv)
    if (args.sweep is None) == (not args.synthetic):
        ap.error("give a recorded sweep file, or --synthetic (not both)")
    try:
        sweeps = synthetic(args.target) if args.synthetic else load_sweeps(args.sweep)
        sweeps = sweeps[:args.shapes] if args.shapes else sweeps
        samplers, notes = available_samplers(args.samplers.split(",") if args.samplers else None)
    except KascadeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.save_sweep:
        args.save_sweep.write_text(json.dumps(sweep_doc(sweeps), indent=1))
    synthetic_any = any(s.synthetic for s in sweeps)
    where = "generated here" if args.synthetic else f"from {args.sweep}"
    source = f"SYNTHETIC sweep {where} (cost-model predictions, not measurements)" if synthetic_any else \
        f"recorded sweep {args.sweep} ({sweeps[0].kind if sweeps else 'empty'})"
    print(f"replaying {source}; {len(sweeps)} shape(s); samplers {', '.join(samplers)}; {args.seeds} seeds; "
          f"budget {args.budget}; found = within {args.within:.0%} of the exhaustive best", flush=True)
    for n in notes:
        print(f"  note: {n}")
    rows = []
    t0 = time.perf_counter()
    for sw in sweeps:
        for score in replay(sw, samplers, seeds=args.seeds, budget=args.budget, within=args.within,
                            warm_start=args.warm_start):
            rows.append(score)
            med = "-" if score.median is None else f"{score.median:.0f}"
            print(f"  {'[synthetic] ' if score.synthetic else ''}{sw.name:32} {score.sampler:7} "
                  f"median trials to {args.within:.0%}: {med:>4}  found {score.found}/{len(score.trials_to_within)}  "
                  f"per seed {list(score.trials_to_within)}  ({score.configs} configs)", flush=True)
    result = {"kind": "kascade_sweep_replay", "synthetic": synthetic_any, "source": source,
              "provenance": sweeps[0].provenance if sweeps else {}, "notes": notes,
              "scores": [r.as_json() for r in rows], "seconds": time.perf_counter() - t0,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
