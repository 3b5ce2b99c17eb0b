"""``kascade report``: what the tuning database and the Optuna studies hold, for people and machines.

Writes into one folder ``report.md`` (tables, with the charts beside it under ``figures/``),
``report.html`` (one self-contained page: every chart an embedded base64 PNG, no external
file, script or network reference) and ``report.json`` (``schema_version``, for machines).
The numbers come from :mod:`kascade.autotune.report`; this module only draws and writes.
Charts use matplotlib's Agg canvas through ``matplotlib.figure.Figure``, never pyplot, so
no global backend state is touched.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import markupsafe

from kascade.autotune.report import (
    ReportData,
    ReportError,
    Row,
    StudyHistory,
    as_json,
    collect,
    compute_roof,
    kernel_label,
    memory_roof,
    model_error,
)
from kascade.backends.targets import Target

TEMPLATE = Path(__file__).with_name("report.html.j2")
DPI = 110


@dataclass(frozen=True)
class ReportPaths:
    out_dir: Path
    markdown: Path
    html: Path
    json: Path
    figures: tuple[Path, ...]
    warnings: tuple[str, ...]   # also in the report; the CLI may print them


# ---- formatting ------------------------------------------------------------------------
def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def fmt_rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e11 else f"{flops / 1e9:.3g} GFLOP/s"


def fmt_value(x: float | None, unit: str) -> str:
    """A study's objective value in its unit (``s`` reads as a time)."""
    return fmt_time(x) if unit == "s" else fmt_num(x) + (f" {unit}" if unit and x is not None else "")


def fmt_num(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:80] or "x"


# ---- the report's content, shared by Markdown and HTML ---------------------------------------
@dataclass
class Table:
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    numeric: tuple[int, ...] = ()    # columns aligned right
    flagged: list[bool] = field(default_factory=list)


@dataclass
class Figure:
    name: str        # file stem under figures/
    alt: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class Section:
    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


# ---- charts -----------------------------------------------------------------------------
def _figure(width: float, height: float):
    """A figure on matplotlib's Agg canvas (each chart imports the rest of matplotlib after this)."""
    try:
        from matplotlib.figure import Figure as MplFigure
    except ImportError:
        raise ReportError("kascade report draws its charts with matplotlib: pip install matplotlib") from None
    fig = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def roofline_png(t: Target, placed: list[tuple[int, Row]]) -> bytes:
    """Log-log roofline of ``t`` with each placed record at (intensity, achieved FLOP/s),
    numbered as in the table; a point above its roof is drawn as a red cross."""
    fig, ax = _figure(8.6, 5.2)
    import numpy as np
    from matplotlib.ticker import EngFormatter, FuncFormatter
    mem = memory_roof(t)
    dtypes = sorted({row.record.key.dtype for _, row in placed} | {"bf16"})
    roofs = {r.name: r for r in (compute_roof(t, d) for d in [*dtypes, "f32"])}
    top = max(roofs.values(), key=lambda r: r.rate)
    xs = [row.work.intensity for _, row in placed]
    ys = [row.placement.achieved for _, row in placed]
    ridge = top.rate / mem.rate
    lo = min([0.5, *(x / 3 for x in xs)])
    hi = max([ridge * 40, *(x * 3 for x in xs)])
    x = np.logspace(math.log10(lo), math.log10(hi), 400)
    src = {True: "measured", False: "datasheet"}
    ax.plot(x[x <= ridge], mem.rate * x[x <= ridge], color="#1f4e79", lw=2.2,
            label=f"HBM {mem.rate / 1e12:.2f} TB/s ({src[mem.measured]})")
    styles = ["-", "--", "-.", ":"]
    for i, roof in enumerate(sorted(roofs.values(), key=lambda r: -r.rate)):
        start = roof.rate / mem.rate
        ax.plot(x[x >= start], np.full((x >= start).sum(), roof.rate), color="#1f4e79" if i == 0 else "#6b7b8c",
                lw=2.2 if i == 0 else 1.6, ls=styles[i % len(styles)],
                label=f"{roof.name} {roof.rate / 1e12:.3g} TFLOP/s ({src[roof.measured]})")
    if mem.measured or top.measured:
        dx = x[x <= top.datasheet / mem.datasheet]
        ax.plot(dx, mem.datasheet * dx, color="#9aa5b1", lw=1, ls=":")
        ax.plot(x[x >= top.datasheet / mem.datasheet], np.full((x >= top.datasheet / mem.datasheet).sum(),
                top.datasheet), color="#9aa5b1", lw=1, ls=":",
                label=f"datasheet: {top.datasheet / 1e12:.0f} TFLOP/s, {mem.datasheet / 1e12:.2f} TB/s")
    ax.plot([ridge], [top.rate], marker="D", color="#c77c02", ms=8, ls="none",
            label=f"ridge point: {ridge:.0f} FLOP/byte")
    ax.annotate(f"ridge {ridge:.0f} FLOP/B", (ridge, top.rate), xytext=(8, -16), textcoords="offset points",
                color="#c77c02", fontsize=9)
    kinds = {"measured": dict(marker="o", color="#2a9d8f", mec="#1d6f65"),
             "predicted": dict(marker="s", color="white", mec="#e76f51")}
    used = set()
    for (n, row), xi, yi in zip(placed, xs, ys):
        kind = "measured" if row.record.key.measured else "predicted"
        if row.placement.above_roof:
            ax.plot([xi], [yi], marker="X", color="#d62828", ms=13, ls="none",
                    label=None if "above" in used else "ABOVE ROOF: counting bug")
            used.add("above")
        else:
            ax.plot([xi], [yi], ms=8, mew=1.6, ls="none", **kinds[kind],
                    label=None if kind in used else f"{kind} kernel")
            used.add(kind)
        # alternate above / below so that two records at one intensity keep legible numbers
        ax.annotate(str(n), (xi, yi), xytext=(6, 4 if n % 2 else -12), textcoords="offset points", fontsize=9,
                    color="#d62828" if row.placement.above_roof else "#333333",
                    fontweight="bold" if row.placement.above_roof else "normal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(min([top.rate / 3e3, *(y / 3 for y in ys)]), max([top.rate * 3, *(y * 3 for y in ys)]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_major_formatter(EngFormatter(unit="FLOP/s"))
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved (FLOP/s)")
    ax.set_title(f"Roofline: {t.name} ({t.arch})", loc="left", fontsize=12, fontweight="bold")
    ax.grid(True, which="major", color="#e3e6ea", lw=0.8)
    ax.grid(True, which="minor", color="#f2f3f5", lw=0.5)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.95)
    return _png(fig)


def history_png(s: StudyHistory) -> bytes:
    """Every complete trial's value (dots) and the best so far (steps) against trial number."""
    fig, ax = _figure(8.6, 3.2)
    from matplotlib.ticker import EngFormatter, MaxNLocator
    if s.history:
        n, v, b = zip(*s.history)
        ax.plot(n, v, "o", color="#9aa5b1", ms=4, label="trial")
        ax.step(n, b, where="post", color="#2a9d8f", lw=2.2, label="best so far")
        if max(v) > 0 and min(v) > 0 and max(v) / min(v) > 20:
            ax.set_yscale("log")
        ax.legend(loc="upper right" if s.direction == "minimize" else "lower right", fontsize=8.5)
    else:
        ax.text(0.5, 0.5, "no complete trials", ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(EngFormatter(unit=str(s.user_attrs.get("unit", ""))))
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"objective ({s.direction})")
    ax.set_title(f"Search history: {s.name}", loc="left", fontsize=11, fontweight="bold")
    ax.grid(True, color="#e3e6ea", lw=0.8)
    return _png(fig)


def model_png(data: ReportData) -> bytes:
    """Predicted against measured time, log-log, with the y = x line and a factor-2 band."""
    fig, ax = _figure(6.4, 5.0)
    import numpy as np
    from matplotlib.ticker import EngFormatter
    m = np.array([p.measured_seconds for p in data.pairs])
    p = np.array([p.predicted_seconds for p in data.pairs])
    lo, hi = min(m.min(), p.min()) / 2, max(m.max(), p.max()) * 2
    d = np.array([lo, hi])
    ax.fill_between(d, d / 2, d * 2, color="#e9f5f3", label="within 2x")
    ax.plot(d, d, color="#1f4e79", lw=1.2, label="predicted = measured")
    ax.plot(m, p, "o", color="#2a9d8f", mec="#1d6f65", ms=7)
    for i, (mi, pi) in enumerate(zip(m, p), 1):
        ax.annotate(str(i), (mi, pi), xytext=(5, 3), textcoords="offset points", fontsize=8.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.xaxis.set_major_formatter(EngFormatter(unit="s"))
    ax.yaxis.set_major_formatter(EngFormatter(unit="s"))
    ax.set_xlabel("measured time")
    ax.set_ylabel("predicted time (cost model)")
    err = model_error(data.pairs)
    ax.set_title(f"Cost model: Spearman {fmt_num(err['spearman'], '.2f')}, "
                 f"MAPE {fmt_num(err['mape_percent'], '.1f')} %", loc="left", fontsize=11, fontweight="bold")
    ax.grid(True, color="#e3e6ea", lw=0.8)
    ax.legend(loc="upper left", fontsize=8.5)
    return _png(fig)


# ---- sections ------------------------------------------------------------------------------
def sections(data: ReportData) -> list[Section]:
    out = []
    measured = sum(r.record.key.measured for r in data.rows)
    summary = Section("summary", "Summary")
    summary.tables.append(Table(("quantity", "value"), [
        ("storage", data.storage), ("target", data.target_filter or "all"),
        ("tuning records", f"{len(data.rows)} ({measured} measured, {len(data.rows) - measured} predicted)"),
        ("on a roofline", str(sum(r.placement is not None for r in data.rows))),
        ("Optuna studies", str(len(data.studies))), ("warnings", str(len(data.warnings)))]))
    if not data.rows and not data.studies:
        summary.paragraphs.append("There are no tuned records yet: run `kascade tune` (or point the report at "
                                  "the storage it wrote to) and report again.")
    out.append(summary)
    if data.warnings:
        out.append(Section("warnings", "Warnings", paragraphs=list(data.warnings)))

    for t in data.targets:
        placed = [r for r in data.rows if r.target == t and r.placement is not None]
        numbered = list(enumerate(placed, 1))
        sec = Section(f"roofline-{slug(t.name)}", f"Roofline: {t.name}")
        ridge = compute_roof(t, "bf16").rate / memory_roof(t).rate
        sec.paragraphs.append(f"Memory roof {memory_roof(t).rate / 1e12:.2f} TB/s, tensor bf16 roof "
                              f"{compute_roof(t, 'bf16').rate / 1e12:.0f} TFLOP/s, fp32 roof "
                              f"{t.fp32_rate / 1e12:.1f} TFLOP/s; ridge point at {ridge:.0f} FLOP/byte."
                              + (f" Measured ceilings: {t.measured.source}." if t.measured.source else ""))
        sec.figures.append(Figure(f"roofline-{slug(t.name)}", f"roofline of {t.name}", roofline_png(t, numbered)))
        table = Table(("#", "kernel", "bucket", "dtype", "kind", "time", "achieved", "FLOP/byte", "bound",
                       "of bound", "flag"), numeric=(0, 5, 6, 7, 9))
        for n, r in numbered:
            p = r.placement
            table.rows.append((str(n), kernel_label(r.record.key.schedule), r.record.key.bucket, r.record.key.dtype,
                               "measured" if r.record.key.measured else "predicted", fmt_time(r.record.seconds),
                               fmt_rate(p.achieved), f"{r.work.intensity:.0f}", p.bound, f"{p.fraction:.0%}",
                               "ABOVE ROOF" if p.above_roof else ""))
            table.flagged.append(p.above_roof)
        if not numbered:
            sec.paragraphs.append("No record of this target could be placed on the roofline.")
        else:
            sec.tables.append(table)
        out.append(sec)

    sec = Section("model", "Cost model against measurements")
    if data.pairs:
        err = model_error(data.pairs)
        sec.paragraphs.append(f"{err['pairs']} keys have both a measured and a predicted record. Spearman rank "
                              f"correlation {fmt_num(err['spearman'], '.3f')} (1 = the model orders them as measured); "
                              f"mean absolute percentage error {fmt_num(err['mape_percent'], '.1f')} %.")
        sec.figures.append(Figure("model-error", "predicted against measured time", model_png(data)))
        table = Table(("#", "kernel", "bucket", "target", "measured", "predicted", "error", "same config"),
                      numeric=(0, 4, 5, 6))
        for i, p in enumerate(data.pairs, 1):
            table.rows.append((str(i), kernel_label(p.schedule), p.bucket, p.target, fmt_time(p.measured_seconds),
                               fmt_time(p.predicted_seconds), f"{p.error_percent:+.1f} %",
                               "yes" if p.measured_config == p.predicted_config else "no"))
        sec.tables.append(table)
    else:
        sec.paragraphs.append("No key has both a measured and a predicted record, so the model's error is not known.")
    out.append(sec)

    sec = Section("history", "Search history")
    if data.studies:
        table = Table(("study", "direction", "trials", "complete", "failed / pruned", "best", "best params"),
                      numeric=(2, 3, 4, 5))
        for s in data.studies:
            table.rows.append((s.name, s.direction, str(s.trials), str(s.complete), str(s.failed),
                               fmt_value(s.best, str(s.user_attrs.get("unit", ""))),
                               ", ".join(f"{k}={v}" for k, v in sorted(s.best_params.items()))))
            sec.figures.append(Figure(f"history-{slug(s.name)}", f"search history of {s.name}", history_png(s)))
        sec.tables.append(table)
    else:
        sec.paragraphs.append("No Optuna study in this storage.")
    out.append(sec)

    sec = Section("configs", "Tuned configs")
    if data.rows:
        versions = sorted({r.record.key.versions for r in data.rows})
        if len(versions) == 1:   # the usual case: say it once instead of on every row
            sec.paragraphs.append(f"Every record was tuned with {versions[0]}.")
        table = Table(("target", "kernel", "bucket", "dtype", "kind", "config", "time (p50)", "p20 - p80",
                       "source", *(("versions",) if len(versions) > 1 else ()), "counted as"), numeric=(6, 7))
        for r in data.rows:
            k, q = r.record.key, r.record.quantiles
            spread = f"{fmt_time(q.get('0.2'))} - {fmt_time(q.get('0.8'))}" if "0.2" in q and "0.8" in q else "-"
            table.rows.append((k.target, kernel_label(k.schedule), k.bucket, k.dtype,
                               "measured" if k.measured else "predicted", r.record.config, fmt_time(r.record.seconds),
                               spread, r.record.source or "-", *((k.versions,) if len(versions) > 1 else ()), r.why))
            table.flagged.append(r.placement is not None and r.placement.above_roof)
        sec.tables.append(table)
    else:
        sec.paragraphs.append("No tuned records yet.")
    out.append(sec)
    notes = Section("notes", "How the numbers are counted", paragraphs=list(data.notes))
    out.append(notes)
    return out


# ---- writing -------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def markdown(data: ReportData, secs: list[Section]) -> str:
    head = ["# kascade tuning report", "", f"Generated {as_json(data)['generated']} from `{data.storage}`.", ""]
    return markdown_sections(head, secs)


def markdown_sections(head: list[str], secs: list[Section]) -> str:
    """Markdown of ``secs`` after the ``head`` lines (sections ``warnings`` and ``notes`` as bullets)."""
    lines = list(head)
    for s in secs:
        lines += [f"## {s.title}", ""]
        bullet = "- " if s.id in ("warnings", "notes") else ""
        for p in s.paragraphs:
            lines += [f"{bullet}**WARNING:** {p}" if s.id == "warnings" else f"{bullet}{p}", ""]
        for f in s.figures:
            lines += [f"![{f.alt}](figures/{f.name}.png)", ""]
        for t in s.tables:
            lines.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
            lines.append("|" + "|".join("---:" if i in t.numeric else "---" for i in range(len(t.headers))) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
            lines.append("")
    return "\n".join(lines)


def html(data: ReportData, secs: list[Section]) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    # long keys (configs, buckets) may wrap after a comma; <wbr> leaves copied text unchanged
    env.filters["wrap_commas"] = lambda text: markupsafe.escape(text).replace(",", markupsafe.Markup(",<wbr>"))
    summary = as_json(data)["summary"]
    return env.from_string(TEMPLATE.read_text()).render(data=data, sections=secs, summary=summary,
                                                        generated=as_json(data)["generated"])


def _finite(x):
    """JSON has no inf or NaN: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def write_report(data: ReportData, out_dir: Path) -> ReportPaths:
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"report folder {out_dir} is a file; give a folder (it is created if missing)")
    secs = sections(data)
    figures = [f for s in secs for f in s.figures]
    seen: set[str] = set()
    for f in figures:   # two study names may share a slug
        base, i = f.name, 1
        while f.name in seen:
            i += 1
            f.name = f"{base}-{i}"
        seen.add(f.name)
    paths = ReportPaths(out_dir, out_dir / "report.md", out_dir / "report.html", out_dir / "report.json",
                        tuple(out_dir / "figures" / f"{f.name}.png" for f in figures), data.warnings)
    try:
        (out_dir / "figures").mkdir(parents=True, exist_ok=True)
        for f, path in zip(figures, paths.figures):
            path.write_bytes(f.png)
        paths.markdown.write_text(markdown(data, secs), encoding="utf-8")
        paths.html.write_text(html(data, secs), encoding="utf-8")
        paths.json.write_text(json.dumps(_finite(as_json(data)), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise ReportError(f"cannot write the report into {out_dir}: {e.strerror or e}; "
                          "give a folder you can write to") from None
    return paths


def report_command(storage: str | None, out_dir: Path, target: str | None) -> ReportPaths:
    """``kascade report``: read ``storage`` (default: the tuning database in the cache dir),
    optionally only ``target``'s records, and write the report into ``out_dir``."""
    return write_report(collect(storage, target), out_dir)
