"""MoE benchmark: kascade's expert-grouped kernels against a torch loop over experts and ``torch._grouped_mm``.

    python bench/moe.py                                  # GPU: Mixtral-8x7B and a fine-grained MoE, T = 1 .. 16k
    python bench/moe.py --tokens 1,16,4096 --shapes mixtral-8x7b --out results/
    python bench/moe.py --dry-run                        # CPU: tiny shapes, interpreter, correctness only

Every implementation computes vLLM's fused_moe (SwiGLU experts, ``w1`` (E, 2F, D) gate rows then up
rows, ``w2`` (E, D, F)) in bf16 on the same inputs, random router logits with a fixed seed:

- ``kascade`` with the routing included (``kascade.moe(x, w1, w2, router_logits, top_k=K)``: the logit
  check, softmax, top-k, the bookkeeping, the kernels) and excluded (``run_moe_triton`` on precomputed
  ``topk_weights`` / ``topk_ids`` with the config ``kascade.moe`` would pick);
- ``torch-loop``: for each expert with tokens, ``index_select`` its tokens, two matmuls, ``silu(gate) * up``,
  ``index_add`` weighted (one host sync for the per-expert counts);
- ``grouped-mm`` (where ``torch._grouped_mm`` exists): pairs sorted by expert, cumulative int32 row
  ends as ``offs``, one grouped GEMM for gate-up, ``silu * up``, one for down, a weighted
  ``index_add``; if unaligned groups are refused, each expert's rows are padded to 16 and that is
  recorded; if it cannot run at all the rows say ``unavailable: <reason>``.

Both torch baselines are timed with the routing excluded and included (plain torch softmax/top-k), so
every ratio compares like with like. Before anything is timed, every output is checked against the
torch loop run in float32 (flash-attn's bar: at most twice the bf16 loop's error plus a floor); a
wrong result is reported and never timed. Timing: ``triton.testing.do_bench`` (warm-up, L2 flushed
between repetitions, median). Reported per row: milliseconds, TFLOP/s (``2 * T * K * 3 * D * F``),
the weights actually read (distinct experts touched x ``3 * D * F`` x 2 bytes) per second, as GB/s
and as a fraction of a large device-to-device copy measured in the same run (bytes read plus
written, as in bench/attention.py), the speed-up over grouped-mm and over the loop, and the
issue's targets (H200, bf16): at T >= 4096 at least 1.2x grouped-mm and above 550 TFLOP/s; at
T <= 16 weights streamed at 75 % or more of the copy bandwidth.

Writes ``moe.json`` (schema ``kascade_moe_bench``, provenance, rows; rewritten after every T, so
a visit cut short keeps what it measured) and ``moe.md`` to ``--out`` (default ``$OUT``, else
bench/results/); a dry run writes ``moe-dry-run.*`` and claims no timings (``mode: cpu-dry-run``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as Fn

SCHEMA = 1
SHAPES = {"mixtral-8x7b": dict(E=8, K=2, D=4096, F=14336), "fine-grained": dict(E=128, K=8, D=2048, F=768)}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
DRY_SHAPES = {"mixtral-tiny": dict(E=8, K=2, D=64, F=96), "fine-grained-tiny": dict(E=16, K=4, D=32, F=48)}
DRY_TOKENS = (1, 5, 37)
GROUP_ALIGNS = (1, 16)          # grouped-mm: unpadded groups first, then every expert padded to 16 rows
FLOOR = {torch.bfloat16: 1e-2, torch.float16: 1e-3}
LARGE_T, SMALL_T = 4096, 16
TARGET_SPEEDUP, TARGET_TFLOPS, TARGET_COPY_FRACTION = 1.2, 550.0, 0.75
IMPLS = (("kascade", "included"), ("kascade", "excluded"), ("torch-loop", "excluded"), ("torch-loop", "included"),
         ("grouped-mm", "excluded"), ("grouped-mm", "included"))
ROOT = Path(__file__).resolve().parents[1]


# ---- the baselines ------------------------------------------------------------------------
def torch_routing(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's routing in plain torch: softmax in fp32, top-k, weights renormalised to sum to one."""
    w, ids = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids


def torch_loop(x, w1, w2, weights, ids, compute: torch.dtype | None = None) -> torch.Tensor:
    """The MoE expert by expert in ``compute`` (default x's dtype), summed in fp32, returned in x's dtype.

    Pairs are sorted by expert once and the counts read back once (one host sync), so the loop
    launches work only for the experts that have tokens."""
    T, K = ids.shape
    E, F = w1.shape[0], w2.shape[2]
    dt = compute or x.dtype
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    tw = weights.reshape(-1).float()
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(torch.bincount(flat, minlength=E).tolist()):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tok = pairs // K
        h = x.index_select(0, tok).to(dt)
        gu = h @ w1[e].to(dt).T
        y = (Fn.silu(gu[:, :F]) * gu[:, F:]) @ w2[e].to(dt).T
        out.index_add_(0, tok, y.float() * tw[pairs, None])
    return out.to(x.dtype)


def grouped_mm_pipeline(x, w1, w2, weights, ids, align: int = 1) -> torch.Tensor:
    """The MoE through ``torch._grouped_mm`` (no host sync): rows sorted by expert, ``offs`` the
    cumulative int32 row ends, weights as (E, K, N) views (``w1.transpose(1, 2)``: (E, D, 2F)).
    ``align > 1`` pads each expert's rows to a multiple of ``align`` (zero rows, dropped after)."""
    T, K = ids.shape
    E, F = w1.shape[0], w2.shape[2]
    P = T * K
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    tok = order // K
    if align == 1:
        h, offs, pos = x.index_select(0, tok), torch.cumsum(counts, 0).to(torch.int32), None
    else:
        padded = (counts + align - 1) // align * align
        ends = torch.cumsum(padded, 0)
        expert = flat[order]
        pos = (ends - padded)[expert] + torch.arange(P, device=x.device) - (torch.cumsum(counts, 0) - counts)[expert]
        rows = -(-(P + E * (align - 1)) // align) * align     # a static bound: no sync for the padded size
        h = x.new_zeros(rows, x.shape[1])
        h[pos] = x.index_select(0, tok)
        offs = ends.to(torch.int32)
    gu = torch._grouped_mm(h, w1.transpose(1, 2), offs=offs)
    y = torch._grouped_mm(Fn.silu(gu[:, :F]) * gu[:, F:], w2.transpose(1, 2), offs=offs)
    if pos is not None:
        y = y[pos]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y.float() * weights.reshape(-1).float()[order, None])
    return out.to(x.dtype)


# ---- measuring ----------------------------------------------------------------------------
def bench(fn, rep_ms: int) -> float:
    """Median milliseconds, L2 flushed between repetitions (do_bench clears a 256 MB buffer)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus written (as bench/attention.py)."""
    src = torch.randn(1 << 28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), 200)
    return 2 * (1 << 28) * 4 / (ms * 1e-3)


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0


def targets(impl: str, T: int, row: dict, gpu: bool) -> dict | None:
    """The issue's targets that apply to this kascade row (None where a row has no timing)."""
    if impl != "kascade" or not gpu or row.get("ms") is None:
        return None
    met: dict[str, bool | None] = {}
    if T >= LARGE_T:
        s = row.get("speedup_vs_grouped_mm")
        met[f">={TARGET_SPEEDUP}x grouped-mm"] = None if s is None else s >= TARGET_SPEEDUP
        met[f">{TARGET_TFLOPS:.0f} TFLOP/s"] = row["tflops"] > TARGET_TFLOPS
    if T <= SMALL_T:
        met[f">={TARGET_COPY_FRACTION:.0%} copy bw"] = row["copy_fraction"] >= TARGET_COPY_FRACTION
    return met or None


# ---- one shape ------------------------------------------------------------------------------
def shape_rows(name: str, shape: dict, tokens, ctx: dict):
    """Yields the rows of every T of one shape in turn; the weights are allocated once per shape."""
    E, D, F = shape["E"], shape["D"], shape["F"]
    gen = torch.Generator(device=ctx["device"]).manual_seed(0)
    new = {"device": ctx["device"], "dtype": ctx["dtype"], "generator": gen}
    w1 = torch.randn(E, 2 * F, D, **new).mul_(D ** -0.5)     # scaled so that the outputs are O(1)
    w2 = torch.randn(E, D, F, **new).mul_(F ** -0.5)
    for T in tokens:
        yield token_rows(name, shape, T, w1, w2, gen, ctx)


def token_rows(name: str, shape: dict, T: int, w1, w2, gen, ctx: dict) -> list[dict]:
    """The six rows (implementation x routing mode) of one shape at ``T`` tokens."""
    from kascade import moe as kascade_moe
    from kascade.api_moe import _DTYPES, _config, _pow2
    from kascade.backends.moe_triton import run_moe_triton
    from kascade.passes.schedule_moe import swiglu_moe_schedule
    E, K, D, F = (shape[k] for k in "EKDF")
    dev, dtype, gpu = ctx["device"], ctx["dtype"], ctx["gpu"]
    x = torch.randn(T, D, device=dev, dtype=dtype, generator=gen)
    logits = torch.randn(T, E, device=dev, dtype=torch.float32, generator=gen)
    tw, ti = torch_routing(logits, K)
    ti32 = ti.to(torch.int32)
    # the config kascade.moe picks for this shape (tuned record, else the cost model's best, else the heuristic)
    schedule = swiglu_moe_schedule(_DTYPES[dtype])
    config, why = _config(schedule, (("T", _pow2(T)), ("K", K), ("E", E), ("D", D), ("F", F)), dtype,
                          torch.device(dev), "triton" if torch.device(dev).type == "cuda" else "interpret")
    ref = torch_loop(x, w1, w2, tw, ti, compute=torch.float32)
    bar = 2 * max_error(torch_loop(x, w1, w2, tw, ti), ref) + FLOOR[dtype]
    base = {"shape": name, **shape, "T": T, "dtype": str(dtype).removeprefix("torch."),
            "mode": "gpu" if gpu else "cpu-dry-run", "flops": 2 * T * K * 3 * D * F,
            "weight_bytes": ti.unique().numel() * 3 * D * F * dtype.itemsize, "err_bar": bar}
    kascade = {"config": config.key(), "config_why": why}
    backend = "triton" if gpu else "interpret"

    def routed():
        return torch_routing(logits, K)

    def gmm(align: int, route: bool):
        return lambda out=None: grouped_mm_pipeline(x, w1, w2, *(routed() if route else (tw, ti)), align=align)

    # every candidate takes ``out`` (poisoned for the check); the torch baselines return a fresh tensor
    runs: dict[tuple[str, str], list[tuple[Callable, dict]]] = {
        ("kascade", "included"): [(lambda out=None: kascade_moe(x, w1, w2, logits, top_k=K, backend=backend,
                                                                out=out), kascade)],
        ("kascade", "excluded"): [(lambda out=None: run_moe_triton(x, w1, w2, tw, ti32, config, interpret=not gpu,
                                                                   out=out, schedule=schedule), kascade)],
        ("torch-loop", "excluded"): [(lambda out=None: torch_loop(x, w1, w2, tw, ti), {})],
        ("torch-loop", "included"): [(lambda out=None: torch_loop(x, w1, w2, *routed()), {})],
    }
    for mode in ("excluded", "included"):
        runs[("grouped-mm", mode)] = [(gmm(a, mode == "included"), {"group_align": a}) for a in GROUP_ALIGNS] \
            if hasattr(torch, "_grouped_mm") else []
    by_impl = {}
    for impl, mode in IMPLS:
        row = {**base, "impl": impl, "routing": mode}
        row.update(measure(runs[(impl, mode)], ref, bar, (T, D), ctx) if runs[(impl, mode)] else
                   {"error": f"unavailable: torch {torch.__version__} has no torch._grouped_mm", "check": "n/a"})
        by_impl[(impl, mode)] = row
    for (impl, mode), row in by_impl.items():
        derive(row, by_impl[("grouped-mm", mode)], by_impl[("torch-loop", mode)], ctx["copy_bw"])
        row["targets"] = targets(impl, T, row, gpu)
    print(progress_line(by_impl, T, name), flush=True)
    return list(by_impl.values())


def measure(candidates, ref: torch.Tensor, bar: float, shape: tuple, ctx: dict) -> dict:
    """Check the candidates in turn; time the first whose output is right; else say why none was."""
    reasons = []
    for fn, info in candidates:
        poisoned = torch.full(shape, math.nan, dtype=ctx["dtype"], device=ctx["device"])
        label = f"{json.dumps(info)}: " if "group_align" in info else ""
        try:
            err = max_error(fn(poisoned), ref)
        except Exception as e:   # a backend that cannot run this shape here is a row, not a crash
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            reasons.append(f"{label}unavailable: {type(e).__name__}: {first}"[:300])
            continue
        if not err <= bar:       # NaN (rows left unwritten) fails too
            reasons.append(f"{label}wrong result: max error {err:.3g} > bar {bar:.3g}")
            continue
        row = {**info, "max_err": err, "check": "ok", **({"rejected": reasons} if reasons else {})}
        if ctx["gpu"]:
            row["ms"] = bench(fn, ctx["rep_ms"])
        return row
    return {"error": "; ".join(reasons), "check": "wrong" if any("wrong" in r for r in reasons) else "error"}


def derive(row: dict, gmm: dict, loop: dict, copy_bw: float | None) -> None:
    """Throughput, bandwidth and ratios of a timed row (ratios against the same routing mode)."""
    ms = row.get("ms")
    if ms is None:
        return
    s = ms * 1e-3
    row["tflops"] = row["flops"] / s / 1e12
    row["weight_gbps"] = row["weight_bytes"] / s / 1e9
    row["copy_fraction"] = row["weight_bytes"] / s / copy_bw if copy_bw else None
    row["speedup_vs_grouped_mm"] = gmm["ms"] / ms if gmm.get("ms") else None
    row["speedup_vs_torch_loop"] = loop["ms"] / ms if loop.get("ms") else None


def progress_line(by_impl: dict, T: int, name: str) -> str:
    parts = []
    for (impl, routed), r in by_impl.items():
        what = f"{r['ms']:.3f} ms" if r.get("ms") is not None else r.get("check", "?")
        parts.append(f"{impl}/{routed[:4]} {what}")
    return f"{name:18} T={T:<6} " + ", ".join(parts)


# ---- output ---------------------------------------------------------------------------------
def provenance(argv: list[str], gpu: bool) -> dict:
    import triton
    p = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
         "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
         "command": " ".join(["python", "bench/moe.py", *argv]), "kascade_commit": _run(["git", "rev-parse", "HEAD"]),
         "grouped_mm": hasattr(torch, "_grouped_mm")}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        p.update(gpu=props.name, sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                 cuda=torch.version.cuda,
                 driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    return p


def _run(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _f(v, fmt: str) -> str:
    """``v`` formatted, or a dash as wide as the format asks."""
    return format("-", f">{fmt.split('.')[0] or 0}") if v is None else format(v, fmt)


def markdown(doc: dict) -> str:
    p = doc["provenance"]
    head = [f"# MoE benchmark ({doc['mode']})", "",
            f"{p.get('gpu', 'CPU (no timings)')}, torch {p['torch']}, triton {p['triton']}, "
            f"CUDA {p.get('cuda', '-')}, driver {p.get('driver', '-')}, {p['date']}; `{p['command']}`", ""]
    if doc["mode"] == "cpu-dry-run":
        head += ["A CPU dry run: tiny shapes, fp16, kascade under the Triton interpreter; outputs checked against "
                 "the float32 torch loop, nothing timed.", ""]
    if doc.get("copy_bandwidth"):
        head += [f"Copy bandwidth (read + written): {doc['copy_bandwidth'] / 1e12:.2f} TB/s. Speed-ups compare "
                 "the same routing mode; targets (H200, bf16): T >= 4096: >= 1.2x grouped-mm and > 550 TFLOP/s; "
                 "T <= 16: weights at >= 75 % of the copy bandwidth.", ""]
    head += ["| shape | T | impl | routing | ms | TFLOP/s | weights GB/s | % copy | vs grouped-mm | vs loop "
             "| max err | targets |", "|" + "---|" * 12]
    for r in doc["rows"]:
        tg = r.get("targets") or {}
        tgt = ", ".join(f"{k}: {'yes' if v else 'no' if v is not None else '-'}" for k, v in tg.items()) or "-"
        err = _f(r.get("max_err"), ".2g") if "error" not in r else r["error"][:80].replace("|", "/")
        frac = None if r.get("copy_fraction") is None else 100 * r["copy_fraction"]
        head.append(f"| {r['shape']} | {r['T']} | {r['impl']} | {r['routing']} | {_f(r.get('ms'), '.4f')} "
                    f"| {_f(r.get('tflops'), '.1f')} | {_f(r.get('weight_gbps'), '.0f')} | {_f(frac, '.0f')} "
                    f"| {_f(r.get('speedup_vs_grouped_mm'), '.2f')} | {_f(r.get('speedup_vs_torch_loop'), '.2f')} "
                    f"| {err} | {tgt} |")
    return "\n".join(head) + "\n"


def summary(doc: dict) -> str:
    """A short table for the log: kascade with the routing excluded, per shape and T."""
    lines = [f"{'shape':18} {'T':>6} {'check':>6} {'ms':>9} {'TFLOP/s':>8} {'%copy':>6} {'x gmm':>6} {'x loop':>6}  "
             "targets"]
    for r in doc["rows"]:
        if r["impl"] != "kascade" or r["routing"] != "excluded":
            continue
        frac = None if r.get("copy_fraction") is None else 100 * r["copy_fraction"]
        tg = r.get("targets") or {}
        met = " ".join(f"{k}={'Y' if v else 'N' if v is not None else '-'}" for k, v in tg.items())
        lines.append(f"{r['shape']:18} {r['T']:6d} {r.get('check', '-'):>6} {_f(r.get('ms'), '9.4f')} "
                     f"{_f(r.get('tflops'), '8.1f')} "
                     f"{_f(frac, '6.0f')} {_f(r.get('speedup_vs_grouped_mm'), '6.2f')} "
                     f"{_f(r.get('speedup_vs_torch_loop'), '6.2f')}  {met or r.get('error', '')[:60]}")
    return "\n".join(lines)


def write(doc: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{stem}.md").write_text(markdown(doc))


# ---- entry point ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "results"),
                    help="output directory (default $OUT, else bench/results/)")
    ap.add_argument("--tokens", help=f"comma-separated token counts (default {','.join(map(str, TOKENS))})")
    ap.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)} (default all)")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: tiny shapes, the interpreter for kascade (fp16), correctness only, no timings")
    args = ap.parse_args(argv)
    gpu = not args.dry_run
    if gpu and not torch.cuda.is_available():
        print("bench/moe.py needs a CUDA GPU (use --dry-run on the CPU)", file=sys.stderr)
        return 2
    table = SHAPES if gpu else DRY_SHAPES
    names = args.shapes.split(",") if args.shapes else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown shapes {unknown}; accepted: {', '.join(table)}")
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else TOKENS if gpu else DRY_TOKENS
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False       # the fp32 reference loop stays fp32
    ctx = {"device": "cuda" if gpu else "cpu", "dtype": torch.bfloat16 if gpu else torch.float16, "gpu": gpu,
           "rep_ms": args.rep_ms, "copy_bw": copy_bandwidth() if gpu else None}
    doc = {"kascade_moe_bench": SCHEMA, "mode": "gpu" if gpu else "cpu-dry-run",
           "provenance": provenance(argv, gpu), "copy_bandwidth": ctx["copy_bw"],
           "targets": {"large_T": LARGE_T, "small_T": SMALL_T, "speedup_vs_grouped_mm": TARGET_SPEEDUP,
                       "tflops": TARGET_TFLOPS, "copy_fraction": TARGET_COPY_FRACTION, "gpu": "H200", "dtype": "bf16"},
           "shapes": {n: table[n] for n in names}, "tokens": list(tokens), "rows": []}
    stem = "moe" if gpu else "moe-dry-run"
    t0 = time.perf_counter()
    for name in names:
        for rows in shape_rows(name, table[name], tokens, ctx):
            doc["rows"] += rows
            write(doc, args.out, stem)         # after every T: a visit cut short keeps what it measured
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()       # the next shape's weights start from a clean pool
    doc["seconds"] = time.perf_counter() - t0
    write(doc, args.out, stem)
    if ctx["copy_bw"]:
        print(f"copy bandwidth {ctx['copy_bw'] / 1e12:.2f} TB/s (read + written)")
    print(summary(doc))
    bad = [r for r in doc["rows"] if r.get("check") == "wrong"]
    print(f"{len(doc['rows'])} rows, {len(bad)} wrong results, {doc['seconds']:.1f} s; written: "
          f"{args.out / (stem + '.json')}, {args.out / (stem + '.md')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
