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
    pipeline: str = typer.Option("auto", help="auto | prefill | decode | none"),
    rank: str = typer.Option(None, help="the rank to tile (prefill) or split (decode); default: the softmax's"),
    tile: int = typer.Option(None, help="tile extent for split_rank (default: a free symbol)"),
    parts: int = typer.Option(None, help="number of splits for split_kv (default: a free symbol)"),
    check: bool = typer.Option(True, help="evaluate every step on random inputs against the input cascade"),
    extent: list[str] = typer.Option([], "--extent", "-x", help="NAME=INT for the numeric check"),
) -> None:
    """Lower a cascade through the pass pipeline; print the IR and check each step."""
    from kascade.passes import pipeline as pl
    try:
        c = load(target)
        if pipeline == "auto":
            steps = pl.default_steps(c, tile, parts) if rank is None else pl.prefill_steps(rank, tile)
        elif pipeline == "prefill":
            steps = pl.prefill_steps(rank or (pl.softmax_ranks(c) or ("m",))[0], tile)
        elif pipeline == "decode":
            steps = pl.decode_steps(rank or (pl.softmax_ranks(c) or ("m1",))[0], parts)
        elif pipeline == "none":
            steps = ()
        else:
            raise KascadeError(f"unknown pipeline {pipeline!r}; accepted: auto, prefill, decode, none")
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


def main() -> None:
    try:
        app()
    except KascadeError as e:  # pragma: no cover - typer commands catch their own
        err.print(f"error: {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
