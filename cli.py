"""The ``kascade`` command line.

    kascade library                               # the built-in cascades
    kascade lower attention --print-after-all     # 3-pass -> 2-pass -> tiled -> 1-pass, checked
    kascade analyze attention -x P=4096 -x M=4096 # FLOPs by unit, bytes, passes per rank
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kascade.ir.cascade import Cascade
from kascade.ir.errors import KascadeError
from kascade.ir.parser import parse

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kascade: a compiler-style kernel and execution-plan autotuner for LLM workloads.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

# Awkward default extents for random checks: not powers of two, all different.
_AWKWARD = (5, 7, 11, 13, 6, 9, 3, 17, 19, 23)
_TILE_DEFAULT = 4


def load(target: str) -> Cascade:
    """A library name (``kascade library``) or a path to cascade text."""
    from kascade.ir.library import LIBRARY
    if target in LIBRARY:
        return LIBRARY[target]()
    path = Path(target)
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise KascadeError(f"cannot read {target}: {e}") from None
        return parse(text, name=path.stem)
    raise KascadeError(f"{target!r} is neither a library cascade nor a file; library cascades: "
                       f"{', '.join(LIBRARY)}")


def parse_extents(items: list[str]) -> dict[str, int]:
    extents = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit():
            raise KascadeError(f"--extent takes NAME=INT (e.g. -x M=4096), got {item!r}")
        extents[name.strip()] = int(value)
    return extents


def default_extents(c: Cascade, given: dict[str, int]) -> dict[str, int]:
    """Give every extent that nothing else determines a small awkward value (free tile
    symbols a small tile, a top-k's ``K`` 2); derived extents and aliases follow."""
    from kascade.ir.extents import bind_extents, extent_symbols
    derived = {x.name for x in c.extents if x.value is not None}
    free_decl = {x.name for x in c.extents if x.value is None}
    ext = dict(given)
    for i, name in enumerate(sorted(extent_symbols(c) - derived)):
        if name not in bind_extents(c, None, ext, complete=False):
            ext[name] = _TILE_DEFAULT if name in free_decl else 2 if name == "K" else _AWKWARD[i % len(_AWKWARD)]
    return ext


def _fail(e: Exception) -> None:
    err.print(f"[red]error:[/] {e}")
    raise typer.Exit(2)


@app.command("library")
def library_cmd() -> None:
    """List the built-in cascades."""
    from kascade.ir.library import LIBRARY
    table = Table("name", "builder", "what it computes")
    for name, build in LIBRARY.items():
        fn = getattr(build, "func", build)
        args = [repr(a) for a in getattr(build, "args", ())]
        args += [f"{k}={v!r}" for k, v in getattr(build, "keywords", {}).items()]
        table.add_row(name, f"{fn.__name__}({', '.join(args)})", (fn.__doc__ or "").strip().split("\n")[0])
    out.print(table)


@app.command("lower")
def lower_cmd(
    target: str = typer.Argument(..., help="library cascade name or a file of cascade text"),
    print_after_all: bool = typer.Option(False, "--print-after-all", help="print the cascade after every step"),
    pipeline: str = typer.Option("auto", help="auto | prefill | decode | moe | none"),
    rank: str = typer.Option(None, help="the rank to tile (prefill) or split (decode); default: the softmax's"),
    tile: int = typer.Option(None, help="tile extent for split_rank (default: a free symbol)"),
    parts: int = typer.Option(None, help="number of splits for split_kv (default: a free symbol)"),
    check: bool = typer.Option(True, help="evaluate every step on random inputs against the input cascade"),
    extent: list[str] = typer.Option([], "--extent", "-x", help="NAME=INT for the numeric check"),
    partition_spec: str = typer.Option(None, "--partition",
                                       help="shard over devices and print the per-device program: "
                                            "tp=2, ep=4, or RANK=AXIS:DEGREE,... (e.g. g=tp:2,f=tp:2)"),
) -> None:
    """Lower a cascade through the pass pipeline; print the IR and check each step."""
    from kascade.passes import pipeline as pl
    try:
        c = load(target)
        if partition_spec:
            from kascade.passes.partition import format_partitioned, partition
            out.print(format_partitioned(partition(c, partition_spec)), markup=False)
            return
        if pipeline == "auto":
            steps = pl.default_steps(c, tile, parts) if rank is None else pl.prefill_steps(rank, tile)
        elif pipeline == "prefill":
            steps = pl.prefill_steps(rank or (pl.softmax_ranks(c) or ("m",))[0], tile)
        elif pipeline == "decode":
            steps = pl.decode_steps(rank or (pl.softmax_ranks(c) or ("m1",))[0], parts)
        elif pipeline == "moe":
            steps = pl.moe_steps()
        elif pipeline == "none":
            steps = ()
        else:
            raise KascadeError(f"unknown pipeline {pipeline!r}; accepted: auto, prefill, decode, moe, none")
        trace = pl.lower(c, steps, check=True)
        out.print(pl.format_trace(trace, all_steps=print_after_all), markup=False)
        if check:
            _check_trace(trace, parse_extents(extent))
    except KascadeError as e:
        _fail(e)


def _check_trace(trace, given: dict[str, int]) -> None:
    import torch

    from kascade.backends.inputs import random_inputs
    from kascade.backends.reference import evaluate
    first = trace[0][1]
    ext = default_extents(first, given)
    if any(t.dtype.kind.name != "FLOAT" for t in first.inputs):
        out.print("# numeric check skipped: integer inputs (block tables, ids, lengths) need meaningful values; "
                  "the test suite checks these cascades")
        return
    gen = torch.Generator().manual_seed(0)
    inputs, params = random_inputs(first, ext, generator=gen)
    ref = evaluate(first, inputs, params, ext)
    table = Table("step", "max |out - input cascade's out| (float64)", title=f"reference evaluator, extents {ext}")
    for name, c in trace[1:]:
        x = dict(ext)
        x.update({d.name: _TILE_DEFAULT for d in c.extents if d.value is None and d.name not in x})
        got = evaluate(c, inputs, params, x)
        diff = max(float((got[k] - ref[k]).abs().max()) if got[k].numel() else 0.0 for k in ref)
        table.add_row(name, f"{diff:.3g}")
        if not diff <= 1e-9:
            out.print(table)
            raise KascadeError(f"step {name} changed the function: max difference {diff:.3g}")
    out.print(table)


@app.command("compile")
def compile_cmd(
    target: str = typer.Argument(..., help="library cascade name or a file of cascade text"),
    emit: str = typer.Option("triton", help="triton (source) | ptx (ahead-of-time, with resources) | cuda"),
    gpu: str = typer.Option("h200", "--target", help="GPU target (see kascade.backends.targets)"),
    extent: list[str] = typer.Option([], "--extent", "-x", help="NAME=INT: head dims (E, F), page size (M0), R"),
) -> None:
    """Emit the generated kernel source, PTX, or CUDA C++ for a cascade, with resource usage."""
    try:
        c = load(target)
        ext = parse_extents(extent)
        if emit == "cuda":
            _emit_cuda(c, ext, gpu)
            return
        if emit not in ("triton", "ptx"):
            raise KascadeError(f"unknown --emit {emit!r}; accepted: triton, ptx, cuda")
        from kascade.compiled import compile as compile_cascade
        kern = compile_cascade(c, gpu)
        if emit == "triton":
            out.print(kern.source(ext).text, markup=False)
            return
        k = kern.ptx(ext)
        if not k.ok:
            raise KascadeError(f"compiling {k.name} for {k.target} failed: {k.error}")
        out.print(k.ptx, markup=False)
        err.print(f"{k.name} on {k.target}: {k.registers} registers/thread, {k.shared_bytes} B shared, "
                  f"spills: {'yes' if k.spills else 'none'}, fits: {k.fits}{'' if k.fits else ' (' + k.reason + ')'}")
    except KascadeError as e:
        _fail(e)


def _emit_cuda(c: Cascade, ext: dict[str, int], gpu: str) -> None:
    """The CUDA family is paged decode (split-KV partials + merge); its variant follows the
    cascade's dtype and the head dims, page size and query heads per KV head given."""
    from kascade.backends.nvcc import compile_cuda
    from kascade.backends.targets import get_target
    from kascade.codegen.paged_decode_cuda import default_params, render
    names = {t.name for t in c.inputs}
    if not {"Q", "KC", "VC", "BT", "SL"} <= names:
        raise KascadeError("--emit cuda has one kernel family, paged decode: a cascade with inputs Q, KC, VC, "
                           "BT, SL such as 'paged_decode' (use --emit triton or ptx for attention prefill)")
    need = [x for x in ("E", "F", "M0", "R") if x not in ext]
    if need:
        raise KascadeError(f"--emit cuda needs {', '.join(need)}: -x E=128 -x F=128 -x M0=16 -x R=4")
    softcap = any(p.name == "cap" for p in c.params)
    src = render(default_params(c.input("Q").dtype, ext["E"], ext["F"], ext["M0"], ext["R"], softcap))
    out.print(src.code, markup=False)
    result = compile_cuda(src.code, get_target(gpu).arch)
    if not result.ok:
        raise KascadeError(f"nvcc failed for {get_target(gpu).arch}: {result.error}")
    for k in result.kernels:
        err.print(f"{k.name} on {result.arch}: {k.registers} registers/thread, {k.shared_bytes} B shared, "
                  f"spill stores {k.spill_stores}, spill loads {k.spill_loads}")


@app.command("report")
def report_cmd(
    out_dir: Path = typer.Option(Path("kascade-report"), "--out", help="folder for report.md / .html / .json"),
    storage: str = typer.Option(None, help="tuning database URL (default: the SQLite file in the cache dir)"),
    gpu: str = typer.Option(None, "--target", help="only this GPU target"),
) -> None:
    """Write the tuning report: rooflines, achieved fractions, search history, model error, configs."""
    from kascade.report import report_command
    try:
        paths = report_command(storage, out_dir, gpu)
    except KascadeError as e:
        _fail(e)
    for w in paths.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    out.print(f"wrote {paths.markdown}, {paths.html}, {paths.json}")


@app.command("analyze")
def analyze_cmd(
    target: str = typer.Argument(..., help="library cascade name or a file of cascade text"),
    extent: list[str] = typer.Option([], "--extent", "-x", help="NAME=INT, e.g. -x P=4096 -x M=4096"),
) -> None:
    """FLOPs by unit, minimum bytes and passes per reduced rank."""
    from kascade.passes.analysis import count, pass_counts
    try:
        c = load(target)
        ext = default_extents(c, parse_extents(extent))
        n = count(c, ext)
    except KascadeError as e:
        _fail(e)
    table = Table("quantity", "value", title=f"{target} at {ext}")
    table.add_row("tensor-core FLOPs (2 x MACs)", f"{n.tensor_flops:,}")
    table.add_row("special-function ops", f"{n.special:,}")
    table.add_row("other FLOPs", f"{n.flops:,}")
    for name, b in n.bytes_in + n.bytes_out:
        table.add_row(f"bytes {name}", f"{b:,}")
    table.add_row("arithmetic intensity (FLOP/byte)", f"{n.total_flops / max(1, n.bytes):.1f}")
    for r, p in pass_counts(c).items():
        table.add_row(f"passes over {r}", str(p))
    out.print(table)



# ---- autotuning ------------------------------------------------------------------------------
_DTYPE_NAMES = {"bf16": "bf16", "f16": "f16", "fp16": "f16", "f32": "f32", "fp32": "f32"}


def _tune_schedule(what: str, dtype: str | None, causal: bool, window: str | None, softcap: bool):
    """The schedule to tune, and whether its extents follow the library's attention ranks (b, g, r)."""

    from kascade.ir.dtypes import DType
    from kascade.ir.library import LIBRARY
    from kascade.ir.library import attention as attention_cascade
    from kascade.ir.library import paged_decode as paged_decode_cascade
    from kascade.passes.schedule import attention_prefill_schedule
    from kascade.passes.schedule_decode import paged_decode_schedule
    from kascade.passes.score import soft_cap
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise KascadeError(f"unknown --dtype {dtype!r}; accepted: bf16, f16, f32")
    dt = DType(_DTYPE_NAMES.get(dtype or "bf16"))
    if what == "decode":
        if causal or window is not None:
            raise KascadeError("--causal and --window do not apply to decode (one query per sequence sees its "
                               "whole cache); --softcap does")
        c = paged_decode_cascade(dtype=dt)
        return paged_decode_schedule(soft_cap(c) if softcap else c), True, None
    if what == "moe":
        if causal or window is not None or softcap:
            raise KascadeError("--causal, --window and --softcap are attention options; moe takes --tokens, "
                               "--experts, --top-k, --hidden, --ffn")
        from kascade.passes.schedule_moe import swiglu_moe_schedule
        return swiglu_moe_schedule(dt), True, None
    sides = None
    if window is not None:
        try:
            left, right = (int(x) for x in window.split(","))
        except ValueError:
            raise KascadeError(f"--window takes LEFT,RIGHT (keys before and after the diagonal, -1: unbounded), "
                               f"got {window!r}") from None
        sides = None if (left, right) == (-1, -1) else (left, right)
    if what == "attention":
        c = attention_cascade("2pass", causal=causal, window=sides, softcap=softcap, dtype=dt)   # as kascade.attention
        return attention_prefill_schedule(c), True, sides
    if causal or window is not None or softcap:
        raise KascadeError("--causal, --window and --softcap choose the variant of 'attention'; a library cascade "
                           "or file states its own mask")
    if what in LIBRARY:
        try:
            c = LIBRARY[what](dtype=dt)
        except TypeError:
            raise KascadeError(f"library cascade {what!r} takes no dtype; tune 'attention' or a file") from None
        if what.startswith("paged_decode"):
            return paged_decode_schedule(c), True, None
        return attention_prefill_schedule(c), what.startswith("attention"), None
    c = load(what)
    sched = _any_schedule(c)
    have = sched.kernels[0].body.q.dtype
    if dtype is not None and have != dt:
        raise KascadeError(f"{what} declares its inputs {have}; --dtype {dtype} does not change a file (edit it)")
    return sched, False, None


def _moe_shapes(given: dict[str, int], moe: dict) -> list[dict[str, int]]:
    """MoE shapes (T tokens, K experts per token, E experts, D hidden, F FFN; default Mixtral-8x7B)."""
    base = {"K": moe.get("top_k") or 2, "E": moe.get("experts") or 8, "D": moe.get("hidden") or 4096,
            "F": moe.get("ffn") or 14336}
    for name, v in (("--top-k", base["K"]), ("--experts", base["E"]), ("--hidden", base["D"]), ("--ffn", base["F"]),
                    *(("--tokens", t) for t in moe.get("tokens") or ())):
        if v < 1:
            raise KascadeError(f"{name} must be at least 1, got {v}")
    if base["K"] > base["E"]:
        raise KascadeError(f"--top-k {base['K']} exceeds --experts {base['E']}")
    return [{**base, "T": t, **given} for t in moe.get("tokens") or (16, 4096)]


def _any_schedule(c):
    """A cascade file's schedule: prefill attention, else paged decode (both errors if neither)."""
    from kascade.passes.schedule import ScheduleError, attention_prefill_schedule
    from kascade.passes.schedule_decode import paged_decode_schedule
    try:
        return attention_prefill_schedule(c)
    except ScheduleError as prefill:
        try:
            return paged_decode_schedule(c)
        except ScheduleError as decode:
            raise KascadeError(f"{c.name} is neither prefill attention ({prefill}) nor paged decode "
                               f"({decode})") from None


def _tune_shapes(schedule, library_ranks: bool, batch: int, heads: int, kv_heads: int | None, seq: list[int],
                 seq_k: int | None, head_dim: int, given: dict[str, int], page_size: int = 16,
                 moe: dict | None = None) -> list[dict[str, int]]:
    c, body = schedule.cascade, schedule.kernels[0].body
    kv = kv_heads or heads
    if heads < 1 or kv < 1 or heads % kv:
        raise KascadeError(f"--heads {heads} must be a positive multiple of --kv-heads {kv} (GQA)")
    checks = [("--batch", batch), ("--head-dim", head_dim), ("--seq-k", seq_k or 1), ("--page-size", page_size),
              *(("--seq", s) for s in seq)]
    for name, v in checks:
        if v < 1:
            raise KascadeError(f"{name} must be at least 1, got {v}")
    if schedule.kernels[0].family == "moe_gate_up":
        return _moe_shapes(given, moe or {})
    if schedule.kernels[0].family == "paged_decode_partial":
        # decode sizes (backends.model.decode_extents): --seq is each sequence's cache length
        return [{"B": batch, "G": kv, "R": heads // kv, "E": head_dim, "F": head_dim, "M0": page_size, "L": p,
                 **given} for p in seq or [4096]]
    shapes = []
    for p in seq or [4096]:
        ext = {c.rank_extent(body.query): p, c.rank_extent(body.key): seq_k or p,
               c.rank_extent(body.head): head_dim, c.rank_extent(body.vhead): head_dim}
        if library_ranks:
            ext.update(B=batch, G=kv, R=heads // kv)
        ext.update(given)
        needed = {c.rank_extent(r) for t in c.inputs for r in t.ranks}
        missing = sorted(needed - set(ext))
        if missing:
            raise KascadeError(f"the shape needs extents {', '.join(missing)}: pass them as -x NAME=INT "
                               f"(e.g. {' '.join(f'-x {m}=8' for m in missing)})")
        shapes.append(ext)
    return shapes


def _parse_params(items: list[str], sides) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    if sides is not None:
        out.update(wl=max(sides[0], 0), wr=max(sides[1], 0))
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise KascadeError(f"--param takes NAME=NUMBER (e.g. -p wl=128), got {item!r}")
    return out


def _backend_for(backend: str, target) -> tuple[str, str | None]:
    """(backend, the one line to say when there is no GPU to time on)."""
    import torch

    from kascade.backends.targets import UnknownTargetError, target_for_device
    if backend not in ("auto", "gpu", "model"):
        raise KascadeError(f"unknown --backend {backend!r}; accepted: auto, gpu, model")
    if backend == "model":
        return "model", None
    if not torch.cuda.is_available():
        if backend == "gpu":
            raise KascadeError("--backend gpu needs a CUDA GPU and none is present (--backend model is the dry run)")
        return "model", (f"no GPU here: dry run against the {target.name} roofline model "
                         "(records stored as predicted, measured=False)")
    p = torch.cuda.get_device_properties(0)
    try:
        here = target_for_device(p.major, p.minor, p.multi_processor_count, p.total_memory).name
    except UnknownTargetError:
        here = p.name
    if here != target.name:
        if backend == "gpu":
            raise KascadeError(f"--target {target.name} but the GPU here is {here}; time on a {target.name} or "
                               "use --backend model")
        return "model", f"the GPU here is {here}, not {target.name}: dry run against the {target.name} roofline model"
    return "gpu", None


def _us(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds or seconds == float("inf") else f"{seconds * 1e6:,.1f} us"


def _tune_from_plan(what: str | None, plan_path: Path | None, gpu: str | None, dtype: str | None, trials: int,
                    timeout: float | None, storage: str | None, sampler: str, study: str | None, workers: int,
                    seed: int, backend: str, shape_options: list[str]) -> None:
    """``kascade tune --from-plan``: every kernel shape of a plan file, one line per shape."""
    import time

    from kascade.autotune.plan import read_plan
    from kascade.autotune.plan_kernels import plan_kernel_shapes
    from kascade.autotune.search import tune
    from kascade.backends.targets import get_target
    lines = []
    try:
        if plan_path is None:
            raise KascadeError("kascade tune needs WHAT (attention | decode | moe | a library cascade | a file) or "
                               "--from-plan plan.json")
        if what is not None:
            raise KascadeError(f"--from-plan tunes the plan's own kernels; drop {what!r} (or drop --from-plan)")
        if shape_options:
            raise KascadeError(f"--from-plan takes its shapes from the plan; {', '.join(shape_options)} do not apply")
        if dtype not in (None, "bf16"):
            raise KascadeError(f"--from-plan tunes at bf16, the dtype the serving simulator times; got --dtype {dtype}")
        doc = read_plan(plan_path)
        target = get_target(gpu or doc["cluster"]["target"])
        shapes = plan_kernel_shapes(doc)
        be, note = _backend_for(backend, target)
        if note:
            err.print(note, soft_wrap=True, markup=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        kind = "measured" if be == "gpu" else "predicted (model)"
        storage_shown = "-"
        for family in dict.fromkeys(s.family for s in shapes):
            group = [s for s in shapes if s.family == family]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                lines += [f"{s.label}: not started (timeout)" for s in group]
                continue
            result = tune(group[0].schedule, [dict(s.extents) for s in group], target, backend=be, trials=trials,
                          timeout=left, storage_url=storage, sampler=sampler, seed=seed, workers=workers,
                          study_name=None if study is None else f"{study}:{family}")
            done = {r.bucket: r for r in result.shapes}
            for s in group:
                r = done.get(s.bucket)
                if r is None:
                    lines.append(f"{s.label}: not started (timeout)")
                    continue
                lines.append(f"{s.label}: {r.bucket}: {r.config.key() if r.config else 'no config completed'} "
                             f"{_us(r.seconds)}; {kind}; trials {r.trials} this run; "
                             f"{'stored' if r.stored else 'not stored (a faster record is kept)'}")
            storage_shown = result.storage
    except KascadeError as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("interrupted: finished records are stored; rerun the same command to resume")
        raise typer.Exit(130) from None
    for line in lines:
        out.print(line, markup=False)
    out.print(f"plan {plan_path}: {len(shapes)} kernel shapes on {target.name}; records: {storage_shown}; "
              "re-evaluate with `kascade plan --evaluate " f"{plan_path}`", markup=False)


@app.command("tune")
def tune_cmd(
    what: str = typer.Argument(None, help="attention | decode | moe | a library cascade | a file of cascade text "
                               "(omitted with --from-plan)"),
    from_plan: Path = typer.Option(None, "--from-plan", help="plan.json of `kascade plan`: tune the sharded prefill, "
                                   "decode and MoE kernels its best plan runs (shape options do not apply)"),
    gpu: str = typer.Option(None, "--target", help="GPU target (kascade targets; default h200, or the plan's)"),
    batch: int = typer.Option(4, "--batch", help="sequences (library attention)"),
    heads: int = typer.Option(32, "--heads", help="query heads (library attention)"),
    kv_heads: int = typer.Option(None, "--kv-heads", help="KV heads (default: --heads)"),
    seq: list[int] = typer.Option([], "--seq", help="query length (decode: cache length); repeat for several "
                                  "shapes (default 4096)"),
    seq_k: int = typer.Option(None, "--seq-k", help="key length (default: the query length)"),
    head_dim: int = typer.Option(128, "--head-dim", help="head dim of Q/K and of V"),
    page_size: int = typer.Option(16, "--page-size", help="KV cache page size (decode)"),
    tokens: list[int] = typer.Option([], "--tokens", help="tokens per MoE call; repeat (default 16 and 4096)"),
    experts: int = typer.Option(None, "--experts", help="experts E (moe; default 8)"),
    top_k: int = typer.Option(None, "--top-k", help="experts per token K (moe; default 2)"),
    hidden: int = typer.Option(None, "--hidden", help="hidden size D (moe; default 4096)"),
    ffn: int = typer.Option(None, "--ffn", help="expert FFN size F (moe; default 14336)"),
    causal: bool = typer.Option(False, "--causal", help="causal mask (attention)"),
    window: str = typer.Option(None, "--window", help="LEFT,RIGHT sliding window (attention; -1: unbounded)"),
    softcap: bool = typer.Option(False, "--softcap", help="soft-capped scores (attention)"),
    extent: list[str] = typer.Option([], "--extent", "-x", help="NAME=INT, any extent (overrides the options)"),
    param: list[str] = typer.Option([], "--param", "-p", help="NAME=NUMBER, int params such as window widths"),
    dtype: str = typer.Option(None, "--dtype", help="bf16 | f16 | f32 (default bf16)"),
    trials: int = typer.Option(100, "--trials", help="configs to measure per shape in this run"),
    timeout: float = typer.Option(None, "--timeout", help="seconds for the whole run"),
    storage: str = typer.Option(None, "--storage", help="sqlite:///file.db (default: the cache dir), "
                                "postgresql+psycopg://user:pass@host/db, journal:///file.log"),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe | random | grid | cmaes | gp | nsga2"),
    study: str = typer.Option(None, "--study", help="study name (default: derived from the tuning key)"),
    workers: int = typer.Option(1, "--workers", help="parallel measuring workers in this process"),
    seed: int = typer.Option(0, "--seed", help="sampler seed"),
    backend: str = typer.Option("auto", "--backend", help="auto (the GPU when it is the target) | gpu | model"),
) -> None:
    """Autotune a kernel for a GPU target; records go to the tuning database (resumable).

    `kascade tune --from-plan plan.json` tunes every kernel shape of a plan instead (one line per
    shape); `kascade plan --evaluate plan.json` then re-evaluates the plan with the tuned kernels."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kascade.autotune.search import tune
    from kascade.backends.targets import get_target
    if from_plan is not None or what is None:
        shape_options = {"--seq": seq, "--seq-k": seq_k, "--kv-heads": kv_heads, "--tokens": tokens,
                         "--experts": experts, "--top-k": top_k, "--hidden": hidden, "--ffn": ffn, "--causal": causal,
                         "--window": window, "--softcap": softcap, "--extent": extent, "--param": param}
        _tune_from_plan(what, from_plan, gpu, dtype, trials, timeout, storage, sampler, study, workers, seed, backend,
                        [k for k, v in shape_options.items() if v not in (None, False, [])])
        return
    try:
        target = get_target(gpu or "h200")
        schedule, library_ranks, sides = _tune_schedule(what, dtype, causal, window, softcap)
        shapes = _tune_shapes(schedule, library_ranks, batch, heads, kv_heads, seq, seq_k, head_dim,
                              parse_extents(extent), page_size,
                              dict(tokens=tokens, experts=experts, top_k=top_k, hidden=hidden, ffn=ffn))
        params = _parse_params(param, sides)
        be, note = _backend_for(backend, target)
        if note:
            err.print(note, soft_wrap=True, markup=False)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[best]}"), TimeElapsedColumn(), console=out,
                       disable=not out.is_terminal)
        tasks: dict[int, int] = {}

        def progress(ev) -> None:
            if ev.shape not in tasks:
                tasks[ev.shape] = bar.add_task(ev.bucket, total=ev.budget, best="")
            best = "" if ev.best_seconds == float("inf") else f"best {_us(ev.best_seconds)}" + (
                f" ({ev.best_seconds / ev.roofline_seconds:.2f}x roofline)" if ev.roofline_seconds else "")
            bar.update(tasks[ev.shape], completed=ev.trials, best=best)

        with bar:
            result = tune(schedule, shapes, target, backend=be, trials=trials, timeout=timeout, storage_url=storage,
                          sampler=sampler, study_name=study, seed=seed, workers=workers, params=params,
                          progress=progress)
    except KascadeError as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("interrupted: finished records are stored; rerun the same command to resume the study")
        raise typer.Exit(130) from None
    kind = "measured" if be == "gpu" else "predicted (model)"
    if not out.is_terminal:   # logs and pipes: one line per shape, nothing cut
        for r in result.shapes:
            ratio = r.roofline_ratio
            out.print(f"{r.bucket}: {r.config.key() if r.config else 'no config completed'} {_us(r.seconds)}"
                      f"{'' if ratio is None else f' ({ratio:.2f}x roofline)'}; {kind}; trials {r.trials} this run, "
                      f"{r.study_trials} in the study; {r.failures} failed, {r.pruned} pruned; "
                      f"{'stored' if r.stored else 'not stored (a faster record is kept)'}", markup=False)
        out.print(f"records: {result.storage}; study: {', '.join(r.study for r in result.shapes)}", markup=False)
        for ext in result.skipped:
            err.print(f"not started (timeout): {ext}", soft_wrap=True, markup=False)
        return
    table = Table("shape", "best config", "time", "vs roofline", "trials (run / study)", "failed", "pruned",
                  "stored", title=f"kascade tune {what} on {target.name}: {kind}, {result.elapsed:.1f} s")
    for col in table.columns[:2]:
        col.overflow = "fold"   # keys are the point: never cut them
    for r in result.shapes:
        ratio = r.roofline_ratio
        table.add_row(r.bucket, r.config.key() if r.config else "none", _us(r.seconds),
                      "-" if ratio is None else f"{ratio:.2f}x", f"{r.trials} / {r.study_trials}", str(r.failures),
                      str(r.pruned), "yes" if r.stored else "no (a faster record is kept)")
    out.print(table)
    for ext in result.skipped:
        err.print(f"not started (timeout): {ext}")
    out.print(f"records: {result.storage}; study: {', '.join(r.study for r in result.shapes)}", markup=False)


@app.command("calibrate")
def calibrate_cmd(
    gpu: str = typer.Option("h200", "--target", help="GPU target whose factors to fit"),
    storage: str = typer.Option(None, "--storage", help="database URL (default: the cache dir's SQLite file)"),
    sweep: Path = typer.Option(None, "--sweep", help="first import a sweep recorded on the GPU (bench/tuner.py "
                               "--sweep) as measured samples"),
    versions: str = typer.Option(None, "--versions", help="only samples timed with these software versions"),
    store: bool = typer.Option(True, "--store/--no-store", help="write the fitted factors to the database"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Fit the cost model's efficiency factors for a target to measured times; report its error before and after.

    Exit code 0: calibrated; 1: no measured samples for the target (nothing was fitted, the message
    says what to run); 2: an error (bad target, storage, or sweep file)."""
    import json

    from kascade.autotune.calibrate import FACTORS, CalibrationError, calibrate
    from kascade.autotune.db import TuningDatabase, default_url
    from kascade.autotune.replay import import_sweep, load_sweeps
    from kascade.autotune.study import masked, records_url
    from kascade.backends.targets import get_target
    try:
        target = get_target(gpu)
        url = storage or default_url()
        db = TuningDatabase(records_url(url))
        imported = import_sweep(db, load_sweeps(sweep), source=f"sweep:{sweep.name}") if sweep else 0
        try:
            cal = calibrate(target, db, versions=versions, store=store)
        except CalibrationError as e:
            if as_json:
                out.print(json.dumps({"calibrated": False, "target": target.name, "reason": str(e)}), markup=False)
            else:
                err.print(f"nothing to calibrate: {e}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
    except KascadeError as e:
        _fail(e)
    if as_json:
        out.print(json.dumps({"calibrated": True, "imported": imported, **cal.as_json()}, indent=1), markup=False)
        return

    def num(x, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)
    if imported:
        out.print(f"imported {imported} measured samples from {sweep}", markup=False)
    table = Table("factor", "default", "fitted", "samples it bounds",
                  title=f"cost model calibration for {cal.target}: {cal.samples} measured samples, {cal.shapes} shapes")
    for f in FACTORS:
        table.add_row(f, f"{getattr(cal.default, f):.3f}", f"{getattr(cal.fitted, f):.3f}",
                      str(cal.bound_samples.get(f, 0)))
    out.print(table)
    err_table = Table("model error", "before", "after")
    for label, attr, fmt in (("Spearman, every sample", "spearman", ".3f"),
                             ("Spearman within a shape (mean)", "spearman_within", ".3f"),
                             ("MAPE %", "mape", ".1f"), ("model's pick / best measured", "pick_vs_best", ".3f")):
        err_table.add_row(label, num(getattr(cal.before, attr), fmt), num(getattr(cal.after, attr), fmt))
    out.print(err_table)
    by = Table("bound (fitted)", "samples", "MAPE % before", "MAPE % after")
    for b in cal.by_bound:
        by.add_row(b.bound, str(b.samples), num(b.mape_before, ".1f"), num(b.mape_after, ".1f"))
    out.print(by)
    for note in cal.notes:
        err.print(f"left out: {note}", markup=False)
    if cal.stored:
        out.print(f"stored the factors for {cal.target} ({cal.versions}) in {masked(url)}; the tuner and the "
                  "runtime choice predict with them", markup=False)
    else:
        out.print("not stored (--no-store)", markup=False)


@app.command("targets")
def targets_cmd() -> None:
    """The GPU targets the cost model and the tuner know, with measured ceilings where recorded."""
    from kascade.backends.targets import ALIASES, TARGETS
    table = Table("target", "arch", "SMs", "bf16 TFLOP/s", "measured", "HBM TB/s", "measured", "L2 MiB",
                  "smem/block KiB", "HBM GB")
    for t in TARGETS.values():
        m = t.measured
        table.add_row(t.name, t.arch, str(t.sm_count), f"{t.tensor_tflops.get('bf16', 0):.0f}",
                      f"{m.tensor_tflops_bf16:.0f}" if m.tensor_tflops_bf16 else "-",
                      f"{t.hbm_bandwidth_peak / 1e12:.2f}",
                      f"{m.copy_bandwidth / 1e12:.2f}" if m.copy_bandwidth else "-", f"{t.l2_bytes / 2**20:.0f}",
                      f"{t.smem_per_block // 1024}", f"{t.hbm_bytes / 1e9:.0f}")
    out.print(table)
    out.print(f"aliases: {', '.join(f'{a} = {n}' for a, n in ALIASES.items())}", markup=False)
    for t in TARGETS.values():
        if t.measured.source:
            out.print(f"{t.name} measured: {t.measured.source}", markup=False)


@app.command("show")
def show_cmd(
    storage: str = typer.Option(None, "--storage", help="database URL (default: the cache dir's SQLite file)"),
) -> None:
    """What the tuning database holds: records, and the studies stored beside them."""
    from kascade.autotune.db import TuningDatabase, default_url
    from kascade.autotune.study import masked, records_url
    try:
        url = storage or default_url()
        db = TuningDatabase(records_url(url))
        records = list(db.records())
    except KascadeError as e:
        _fail(e)
    studies = _studies(url)
    rows = []
    for r in records:
        family, _, digest = r.key.schedule.partition(":")
        rows.append((f"{family}:{digest[:8]}", r.key.bucket, r.key.dtype, r.key.target,
                     "measured" if r.key.measured else "predicted", r.config, _us(r.seconds), r.source,
                     r.key.versions))
    if not out.is_terminal:   # logs and pipes: nothing cut
        out.print(f"{len(records)} tuning records in {masked(url)}", markup=False)
        for row in rows:
            out.print("  " + " | ".join(row), markup=False)
        for name, counts, best in studies:
            out.print(f"study {name}: {counts.get('measured', 0)} configs measured, {counts.get('FAIL', 0)} failed, "
                      f"{counts.get('PRUNED', 0)} pruned, best {_us(best)}", markup=False)
        return
    table = Table("kernel", "bucket", "dtype", "target", "kind", "config", "time", "source", "versions",
                  title=f"{len(records)} tuning records in {masked(url)}")
    for row in rows:
        table.add_row(*row[:7], row[7][:40], row[8])
    out.print(table)
    if studies:
        st = Table("study", "configs measured", "failed", "pruned", "running", "best", title="Optuna studies")
        for name, counts, best in studies:
            st.add_row(name, *(str(counts.get(s, 0)) for s in ("measured", "FAIL", "PRUNED", "RUNNING")), _us(best))
        out.print(st)


def _studies(url: str) -> list[tuple[str, dict, float | None]]:
    """(name, trials by state, best value) of each Optuna study in ``url``; none when it has no study tables."""
    if not url.startswith(("sqlite", "postgresql")):
        return []
    import warnings

    import optuna
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
            found = []
            for s in storage.get_all_studies():
                trials = storage.get_all_trials(s._study_id, deepcopy=False)
                counts: dict[str, int] = {}
                values = []
                for t in trials:
                    if "infeasible" in t.user_attrs or t.user_attrs.get("duplicate"):
                        continue
                    counts[t.state.name] = counts.get(t.state.name, 0) + 1
                    if t.state.name == "COMPLETE" and t.value is not None:
                        values.append(t.value)
                counts["measured"] = len(values)
                found.append((s.study_name, counts, min(values) if values else None))
            return found
    except Exception:  # noqa: BLE001 - no study tables, another schema, an unreadable file: nothing to show
        return []
    finally:
        optuna.logging.set_verbosity(level)


@app.command("export")
def export_cmd(
    file: Path = typer.Argument(..., help="JSON file to write"),
    gpu: str = typer.Option(None, "--target", help="only records for this target"),
    storage: str = typer.Option(None, "--storage", help="database URL (default: the cache dir's SQLite file)"),
    measured_only: bool = typer.Option(False, "--measured-only", help="leave out predicted (dry-run) records"),
) -> None:
    """Write tuning records as versioned JSON (ship it under autotune/configs/ or import it elsewhere)."""
    from kascade.autotune.db import TuningDatabase
    from kascade.autotune.lookup import target_key
    from kascade.autotune.study import records_url
    from kascade.backends.targets import get_target
    try:
        where: dict[str, str | bool] = {}
        if gpu:
            where["target"] = target_key(get_target(gpu))
        if measured_only:
            where["measured"] = True
        db = TuningDatabase(records_url(storage) if storage else None)
        try:
            n = db.export_json(file, **where)
        except OSError as e:
            raise KascadeError(f"cannot write {file}: {e}") from None
    except KascadeError as e:
        _fail(e)
    out.print(f"exported {n} records to {file}", markup=False)


@app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="JSON file written by kascade export"),
    storage: str = typer.Option(None, "--storage", help="database URL (default: the cache dir's SQLite file)"),
) -> None:
    """Read tuning records from JSON; a record replaces one of the same key only when it is faster."""
    from sqlalchemy.exc import SQLAlchemyError

    from kascade.autotune.db import TuningDatabase, read_json
    from kascade.autotune.study import records_url
    try:
        total = len(read_json(file))
        db = TuningDatabase(records_url(storage) if storage else None)
        try:
            n = db.import_json(file)
        except SQLAlchemyError as e:
            raise KascadeError(f"cannot write to {db.url}: {(str(e).splitlines() or [''])[0]}") from None
    except KascadeError as e:
        _fail(e)
    out.print(f"imported {n} of {total} records from {file} (the others were no faster than what is stored)",
              markup=False)


# ---- serving plans --------------------------------------------------------------------------
def parse_seconds(text: str, what: str) -> float:
    """``500ms``, ``0.5s``, ``200us`` or a bare number of milliseconds -> seconds (> 0)."""
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|s|us|µs)?\s*", text or "")
    if not m:
        raise KascadeError(f"{what} takes a duration such as 500ms, 0.5s or 200us, got {text!r}")
    value = float(m.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, None: 1e-3}[m.group(2)]
    if not value > 0:
        raise KascadeError(f"{what} {text!r} is impossible to meet: give a positive duration such as 500ms")
    return value


def parse_workload(spec: str, seed: int):
    """``trace.jsonl`` / ``trace.csv`` (a file), or ``poisson:rate=R,n=N[,prompt=DIST,output=DIST]`` or
    ``gamma:rate=R,cv=C,n=N[,...]`` with length distributions as in kascade.backends.workload."""
    from kascade.backends.workload import gamma_workload, load_trace, poisson_workload
    kind, sep, rest = spec.partition(":")
    if kind in ("poisson", "gamma") and sep:
        args: dict[str, str] = {}
        for item in rest.split(","):
            k, eq, v = item.partition("=")
            if not eq:   # a distribution's own comma: lognormal:MEAN,STD
                if not args:
                    raise KascadeError(f"--workload {spec!r}: expected NAME=VALUE items, got {item!r}")
                last = list(args)[-1]
                args[last] += "," + item
                continue
            args[k.strip()] = v.strip()
        known = {"rate", "n", "prompt", "output"} | ({"cv"} if kind == "gamma" else set())
        if set(args) - known or "rate" not in args:
            raise KascadeError(f"--workload {kind}: takes {', '.join(sorted(known))} (rate required), got "
                               f"{', '.join(sorted(args)) or 'nothing'}")
        try:
            rate, n = float(args["rate"]), int(args.get("n", "1000"))
        except ValueError:
            raise KascadeError(f"--workload {spec!r}: rate is a number and n an integer") from None
        prompt, output = args.get("prompt", "lognormal:1024,800"), args.get("output", "lognormal:256,200")
        if kind == "gamma":
            cv = args.get("cv", "2")
            return gamma_workload(rate, float(cv), n, prompt, output, seed), \
                f"gamma arrivals, {rate:g} req/s, cv {cv}, {n} requests, prompt {prompt}, output {output}"
        return poisson_workload(rate, n, prompt, output, seed), \
            f"Poisson arrivals, {rate:g} req/s, {n} requests, prompt {prompt}, output {output}"
    path = Path(spec)
    if not path.is_file():
        raise KascadeError(f"--workload {spec!r} is neither a trace file (JSONL or CSV) nor "
                           "poisson:rate=R,n=N / gamma:rate=R,cv=C,n=N")
    reqs = load_trace(path)
    return reqs, f"trace {path.name}: {len(reqs)} requests"


@app.command("plan")
def plan_cmd(
    model: str = typer.Option(None, "--model", help="preset (llama-3-8b, llama-3-70b, mixtral-8x7b, qwen3-30b-a3b) "
                              "or a config.json (required unless --evaluate)"),
    gpu: str = typer.Option("h200", "--target", help="GPU target"),
    gpus: int = typer.Option(8, "--gpus", help="GPUs in the cluster"),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs per node"),
    workload: str = typer.Option(None, "--workload", help="trace.jsonl | trace.csv | poisson:rate=4,n=2000 | "
                                 "gamma:rate=4,cv=2,n=2000 (optional prompt=DIST,output=DIST); required unless "
                                 "--evaluate (default there: the plan file's)"),
    slo_ttft: str = typer.Option("500ms", "--slo-ttft", help="time-to-first-token target"),
    slo_tpot: str = typer.Option("50ms", "--slo-tpot", help="time-per-output-token target"),
    percentile: float = typer.Option(0.99, "--percentile", help="fraction of requests that must meet both"),
    trials: int = typer.Option(60, "--trials", help="plans to evaluate in this run"),
    sampler: str = typer.Option("nsga2", "--sampler", help="nsga2 (goodput/GPU vs GPUs) | tpe | random"),
    storage: str = typer.Option(None, "--storage", help="study storage URL (default: the cache dir's SQLite file)"),
    study: str = typer.Option(None, "--study", help="study name (default: derived from the inputs)"),
    out_dir: Path = typer.Option(Path("kascade-plan"), "--out", help="folder for plan.json and the report"),
    seed: int = typer.Option(0, "--seed", help="workload and sampler seed"),
    reuse_tuned: bool = typer.Option(True, "--reuse-tuned/--no-reuse-tuned", help="time kernels from the MEASURED "
                                     "tuning records in --storage where one exists for the sharded shape (`kascade "
                                     "tune --from-plan`), else the cost model; without measured records this changes "
                                     "nothing"),
    evaluate: Path = typer.Option(None, "--evaluate", help="re-evaluate a written plan.json's top plans with the "
                                  "tuned kernels: goodput before (cost model) and after; no search"),
) -> None:
    """Search serving plans (parallelism, batching, disaggregation) for a model, cluster, workload and SLOs.

    Kernel tuning and plan search inform each other: `kascade tune --from-plan plan.json` tunes the
    plan's sharded kernels; `kascade plan --evaluate plan.json` re-simulates it with them, and a
    new search uses them (--reuse-tuned, the default)."""
    if evaluate is not None:
        _evaluate_plan(evaluate, workload, storage, seed, reuse_tuned, model)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kascade.autotune.plan import plan_document, search_plans, write_plan
    from kascade.autotune.plan_kernels import tuned_kernel_seconds, workload_lengths
    from kascade.backends.cluster import make_cluster
    from kascade.backends.workload import SLO
    from kascade.ir.library.models import load_model
    from kascade.plan_report import write_plan_report
    try:
        if model is None or workload is None:
            raise KascadeError("kascade plan needs --model and --workload (or --evaluate plan.json)")
        spec = load_model(model)
        if gpus < 1 or gpus_per_node < 1:
            raise KascadeError(f"--gpus and --gpus-per-node must be at least 1, got {gpus}, {gpus_per_node}")
        per_node = min(gpus, gpus_per_node)
        if gpus % per_node:
            raise KascadeError(f"--gpus {gpus} is not a whole number of nodes of {per_node} GPUs")
        cluster = make_cluster(gpu, per_node, gpus // per_node)
        slo = SLO(parse_seconds(slo_ttft, "--slo-ttft"), parse_seconds(slo_tpot, "--slo-tpot"), percentile)
        requests, description = parse_workload(workload, seed)
        tuned = tuned_kernel_seconds(storage, cluster.target) if reuse_tuned else None
        if tuned is not None and len(tuned):
            err.print(f"timing kernels from {len(tuned)} measured tuning record(s) where they transfer "
                      "(--no-reuse-tuned: the cost model alone)", soft_wrap=True, markup=False)
        bar = Progress(TextColumn("plans"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[best]}"),
                       TimeElapsedColumn(), console=out, disable=not out.is_terminal)
        task = bar.add_task("plans", total=trials, best="")
        best = [0.0]

        def progress(done, total, o) -> None:
            if o is not None and o.infeasible is None:
                best[0] = max(best[0], o.goodput_per_gpu)
            bar.update(task, completed=done, best=f"best {best[0]:.3g} req/s/GPU")
        with bar:
            result = search_plans(spec, cluster, requests, slo, trials=trials, storage_url=storage, study_name=study,
                                  sampler=sampler, seed=seed, progress=progress, kernel_seconds=tuned)
        if result.best is None:
            reasons = sorted({o.infeasible for o in result.infeasible})[:5]
            raise KascadeError(f"no plan of {spec.name} fits {gpus} x {cluster.target.name}: "
                               + "; ".join(reasons) + " (more GPUs, a larger GPU or a smaller model)")
        doc = plan_document(result, spec, cluster, slo, {"spec": workload, "description": description,
                                                         "requests": len(requests), "seed": seed,
                                                         **workload_lengths(requests)})
        if tuned is not None:
            doc["kernels"] = {"measured_records": len(tuned), "fingerprint": tuned.fingerprint,
                              "tuned_shapes": dict(tuned.hits)}
        plan_path = write_plan(doc, out_dir / "plan.json")
        paths = write_plan_report(result, doc, out_dir)
    except KascadeError as e:
        _fail(e)
    def ms(x: float) -> str:
        return "-" if x != x else f"{x * 1e3:.1f} ms"
    if not out.is_terminal:   # logs and pipes: one line per plan, nothing cut
        for i, o in enumerate(result.outcomes[:8], 1):
            out.print(f"{i}. {o.plan.label()}: {o.plan.gpus} GPUs, goodput {o.goodput_per_gpu:.3g} req/s/GPU, SLO met "
                      f"{o.attainment:.1%}, TTFT p99 {ms(o.ttft_p99)}, TPOT p99 {ms(o.tpot_p99)}"
                      + ("" if o.capacity is None else f", capacity {o.capacity:.3g} req/s"), markup=False)
        out.print(f"wrote {plan_path}, {paths.markdown}, {paths.html}; study {result.study} in {result.storage}",
                  markup=False)
        return
    table = Table("#", "plan", "GPUs", "goodput/GPU", "SLO met", "TTFT p99", "TPOT p99", "capacity req/s",
                  title=f"kascade plan {spec.name} on {gpus} x {cluster.target.name}: {len(result.outcomes)} "
                        f"feasible, {len(result.infeasible)} infeasible, {result.elapsed:.1f} s")
    table.columns[1].overflow = "fold"
    for i, o in enumerate(result.outcomes[:8], 1):
        table.add_row(str(i), o.plan.label(), str(o.plan.gpus), f"{o.goodput_per_gpu:.3g}", f"{o.attainment:.1%}",
                      ms(o.ttft_p99), ms(o.tpot_p99), "-" if o.capacity is None else f"{o.capacity:.3g}")
    out.print(table)
    out.print(f"wrote {plan_path}, {paths.markdown}, {paths.html}; study {result.study} in {result.storage}",
              markup=False)


def _evaluate_plan(path: Path, workload: str | None, storage: str | None, seed: int, reuse_tuned: bool,
                   model: str | None) -> None:
    """``kascade plan --evaluate plan.json``: the plan file's top plans simulated with the cost model
    alone and with the tuned kernels, side by side."""
    from kascade.autotune.plan import Plan, read_plan
    from kascade.autotune.plan_kernels import plan_context, reevaluate, tuned_kernel_seconds
    try:
        if model is not None:
            raise KascadeError("--evaluate takes the model from the plan file; drop --model")
        if not reuse_tuned:
            raise KascadeError("--evaluate compares the cost model with the tuned kernels; drop --no-reuse-tuned")
        doc = read_plan(path)
        _, _, cluster, _ = plan_context(doc)
        w = doc.get("workload") or {}
        spec = workload or w.get("spec")
        if not spec:
            raise KascadeError(f"{path} does not say its workload; pass --workload")
        requests, description = parse_workload(spec, int(w.get("seed", seed)) if workload is None else seed)
        tuned = tuned_kernel_seconds(storage, cluster.target)
        rows = reevaluate(doc, requests, tuned)
    except KascadeError as e:
        _fail(e)
    hits = ", ".join(f"{k} {v}" for k, v in sorted(tuned.hits.items())) or "none"
    out.print(f"re-evaluated {len(rows)} plan(s) of {path} on {description}: {len(tuned)} measured kernel "
              f"record(s) for {cluster.target.name}; kernel shapes timed from them: {hits}", markup=False)
    if not len(tuned):
        out.print("no measured records: before and after are both the cost model (run `kascade tune --from-plan "
                  f"{path}` on a {cluster.target.name})", markup=False)

    def line(o) -> str:
        if o.infeasible:
            return f"infeasible ({o.infeasible})"
        return (f"goodput {o.goodput_per_gpu:.3g} req/s/GPU, SLO met {o.attainment:.1%}, TTFT p99 "
                f"{o.ttft_p99 * 1e3:.1f} ms, TPOT p99 {o.tpot_p99 * 1e3:.1f} ms")
    best = doc["best"]["plan"]
    for i, r in enumerate(rows, 1):
        mark = " (the file's best)" if r.plan == Plan(**best) else ""
        out.print(f"{i}. {r.plan.label()}{mark}: before {line(r.before)}; after {line(r.after)}", markup=False)


def main() -> None:
    try:
        app()
    except KascadeError as e:  # pragma: no cover - typer commands catch their own
        err.print(f"error: {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
