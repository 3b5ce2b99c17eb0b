"""The plan report: what ``kascade plan`` found, for people.

Writes ``plan.md`` (tables, charts beside it under ``figures/``) and ``plan.html`` (one
self-contained page, every chart an embedded base64 PNG) into one folder: the best plans, the
Pareto front (goodput per GPU against GPUs), TTFT and TPOT distributions of the best plans,
where an iteration's time goes (per kernel class and per collective) and utilisation. The
building blocks (sections, tables, figures on matplotlib's Agg canvas, Markdown cells, time
formatting) are the tuning report's (:mod:`kascade.report`), so both reports read alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np

from kascade.autotune.plan import Outcome, PlanError, SearchResult
from kascade.report import Figure, Section, Table, _figure, _png, fmt_num, fmt_time, markdown_sections

TEMPLATE = Path(__file__).with_name("plan_report.html.j2")
COLOURS = ("#1f4e79", "#2a9d8f", "#e76f51", "#c77c02", "#6b7b8c")


@dataclass(frozen=True)
class PlanReportPaths:
    out_dir: Path
    markdown: Path
    html: Path
    figures: tuple[Path, ...]


def _ms(x: float | None) -> str:
    return fmt_time(x) if x is not None and math.isfinite(x) else "-"


# ---- charts ---------------------------------------------------------------------------------------
def pareto_png(result: SearchResult) -> bytes:
    fig, ax = _figure(7.6, 4.4)
    xs = [o.plan.gpus for o in result.outcomes]
    ys = [o.goodput_per_gpu for o in result.outcomes]
    ax.plot(xs, ys, "o", color="#9aa5b1", ms=5, label="evaluated plan")
    front = result.pareto
    ax.step([o.plan.gpus for o in front], [o.goodput_per_gpu for o in front], where="post", color=COLOURS[1],
            lw=2, marker="D", ms=7, label="Pareto front")
    for i, o in enumerate(front, 1):
        ax.annotate(str(i), (o.plan.gpus, o.goodput_per_gpu), xytext=(6, 4), textcoords="offset points", fontsize=9)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("goodput per GPU (requests/s)")
    ax.set_title("Plans: goodput per GPU against GPUs", loc="left", fontsize=11, fontweight="bold")
    ax.grid(True, color="#e3e6ea", lw=0.8)
    ax.legend(fontsize=8.5)
    return _png(fig)


def cdf_png(outcomes: list[Outcome], metric: str, slo_value: float) -> bytes:
    fig, ax = _figure(7.6, 3.8)
    for o, colour in zip(outcomes, COLOURS):
        x = getattr(o.result, metric)
        x = np.sort(x[np.isfinite(x)]) * 1e3
        if len(x):
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", color=colour, lw=1.8,
                    label=o.plan.label()[:60])
    ax.axvline(slo_value * 1e3, color="#d62828", ls="--", lw=1.2, label=f"SLO {slo_value * 1e3:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel(f"{metric.upper()} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{metric.upper()} distribution of the best plans", loc="left", fontsize=11, fontweight="bold")
    ax.grid(True, color="#e3e6ea", lw=0.8)
    ax.legend(fontsize=7.5, loc="lower right")
    return _png(fig)


def breakdown_png(o: Outcome) -> bytes:
    fig, ax = _figure(7.6, 3.6)
    items = sorted(o.result.breakdown.items(), key=lambda kv: kv[1])
    total = sum(v for _, v in items) or 1.0
    ax.barh([k for k, _ in items], [100 * v / total for _, v in items], color=COLOURS[0])
    ax.set_xlabel("share of iteration time (%)")
    ax.set_title(f"Where iteration time goes: {o.plan.label()[:70]}", loc="left", fontsize=10, fontweight="bold")
    ax.grid(True, axis="x", color="#e3e6ea", lw=0.8)
    return _png(fig)


# ---- sections --------------------------------------------------------------------------------------
def sections(result: SearchResult, doc: dict) -> list[Section]:
    slo = doc["slo"]
    out = []
    summary = Section("summary", "Summary")
    best = result.best
    summary.tables.append(Table(("quantity", "value"), [
        ("model", doc["model"]["name"]),
        ("cluster", f"{doc['cluster']['nodes']} x {doc['cluster']['gpus_per_node']} {doc['cluster']['target']}"),
        ("workload", doc["workload"].get("description", "")),
        ("SLO", f"TTFT {slo['ttft'] * 1e3:g} ms, TPOT {slo['tpot'] * 1e3:g} ms, at p{slo['percentile'] * 100:g}"),
        ("plans evaluated", f"{len(result.outcomes)} feasible, {len(result.infeasible)} infeasible"),
        ("best plan", best.plan.label() if best else "none"),
        ("study", f"{result.study} ({result.sampler}, {result.trials} trials this run, {result.elapsed:.1f} s)"),
        ("storage", result.storage)]))
    out.append(summary)

    sec = Section("best", "Best plans")
    t = Table(("#", "plan", "GPUs", "goodput/GPU", "SLO attainment", "TTFT p99", "TPOT p99", "throughput",
               "capacity (req/s)", "MFU", "MBU"), numeric=(0, 2, 3, 4, 5, 6, 7, 8, 9, 10))
    for i, o in enumerate(result.outcomes[:10], 1):
        t.rows.append((str(i), o.plan.label(), str(o.plan.gpus), fmt_num(o.goodput_per_gpu), f"{o.attainment:.1%}",
                       _ms(o.ttft_p99), _ms(o.tpot_p99), fmt_num(o.throughput),
                       "-" if o.capacity is None else fmt_num(o.capacity), f"{o.mfu:.1%}", f"{o.mbu:.1%}"))
        t.flagged.append(o.attainment < slo["percentile"])
    sec.tables.append(t)
    sec.paragraphs.append("Goodput counts requests that met both the TTFT and the TPOT target. Capacity is the "
                          "highest request rate at which the plan still meets the SLO (bisection on the workload's "
                          "rate); flagged rows miss the SLO at the workload's own rate.")
    out.append(sec)

    sec = Section("pareto", "Pareto front")
    sec.figures.append(Figure("pareto", "goodput per GPU against GPUs", pareto_png(result)))
    t = Table(("#", "plan", "GPUs", "goodput/GPU"), numeric=(0, 2, 3))
    for i, o in enumerate(result.pareto, 1):
        t.rows.append((str(i), o.plan.label(), str(o.plan.gpus), fmt_num(o.goodput_per_gpu)))
    sec.tables.append(t)
    out.append(sec)

    shown = [o for o in result.outcomes[:3] if o.result is not None]
    sec = Section("latency", "Latency distributions")
    if shown:
        sec.figures.append(Figure("ttft-cdf", "TTFT CDF of the best plans", cdf_png(shown, "ttft", slo["ttft"])))
        sec.figures.append(Figure("tpot-cdf", "TPOT CDF of the best plans", cdf_png(shown, "tpot", slo["tpot"])))
        t = Table(("plan", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p99", "preemptions", "dropped"),
                  numeric=(1, 2, 3, 4, 5, 6, 7))
        for o in shown:
            r = o.result
            t.rows.append((o.plan.label(), _ms(r.percentile("ttft", 50)), _ms(r.percentile("ttft", 99)),
                           _ms(r.percentile("tpot", 50)), _ms(r.percentile("tpot", 99)), _ms(r.percentile("itl", 99)),
                           str(r.preemptions), str(len(r.dropped))))
        sec.tables.append(t)
    out.append(sec)

    sec = Section("breakdown", "Where iteration time goes")
    if best is not None and best.result is not None:
        sec.figures.append(Figure("breakdown", "iteration time per kernel class and collective", breakdown_png(best)))
        total = sum(best.result.breakdown.values()) or 1.0
        t = Table(("kernel class / collective", "seconds (all iterations)", "share"), numeric=(1, 2))
        for k, v in sorted(best.result.breakdown.items(), key=lambda kv: -kv[1]):
            t.rows.append((k, f"{v:.3f}", f"{v / total:.1%}"))
        sec.tables.append(t)
        sec.paragraphs.append("Serial seconds summed over every iteration the best plan ran (for NanoFlow, before "
                              "overlap); collectives are the rows named after them.")
    out.append(sec)

    sec = Section("utilisation", "Utilisation")
    t = Table(("plan", "MFU", "HBM bandwidth", "peak KV cache", "busy share", "iterations"), numeric=(1, 2, 3, 4, 5))
    for o in shown:
        r = o.result
        busy = r.busy_seconds / (r.makespan * r.replicas) if r.makespan > 0 else 0.0
        t.rows.append((o.plan.label(), f"{r.mfu:.1%}", f"{r.mbu:.1%}", f"{r.peak_kv_fraction:.1%} of "
                       f"{r.kv_capacity_tokens:,} tokens", f"{busy:.1%}", f"{r.iterations:,}"))
    sec.tables.append(t)
    sec.paragraphs.append("MFU and bandwidth utilisation: the model FLOPs and HBM bytes of every iteration over "
                          "the GPUs' peaks times the makespan. Busy share: engine time spent in iterations.")
    out.append(sec)

    sec = Section("infeasible", "Infeasible plans")
    if result.infeasible:
        t = Table(("plan", "reason"))
        for o in result.infeasible[:40]:
            t.rows.append((o.plan.label(), o.infeasible))
        sec.tables.append(t)
    else:
        sec.paragraphs.append("Every plan the search proposed could run.")
    out.append(sec)
    return out


# ---- writing ---------------------------------------------------------------------------------------
def markdown(title: str, secs: list[Section]) -> str:
    return markdown_sections([f"# {title}", ""], secs)


def html(title: str, secs: list[Section], generated: str) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE.read_text()).render(title=title, sections=secs, generated=generated)


def write_plan_report(result: SearchResult, doc: dict, out_dir: Path) -> PlanReportPaths:
    """``plan.md``, ``plan.html`` and ``figures/*.png`` in ``out_dir`` (created if missing)."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise PlanError(f"report folder {out_dir} is a file; give a folder (it is created if missing)")
    secs = sections(result, doc)
    figures = [f for s in secs for f in s.figures]
    title = f"kascade plan: {doc['model']['name']} on {doc['cluster']['target']}"
    paths = PlanReportPaths(out_dir, out_dir / "plan.md", out_dir / "plan.html",
                            tuple(out_dir / "figures" / f"{f.name}.png" for f in figures))
    try:
        (out_dir / "figures").mkdir(parents=True, exist_ok=True)
        for f, p in zip(figures, paths.figures):
            p.write_bytes(f.png)
        paths.markdown.write_text(markdown(title, secs), encoding="utf-8")
        paths.html.write_text(html(title, secs, doc.get("generated", "")), encoding="utf-8")
    except OSError as e:
        raise PlanError(f"cannot write the plan report into {out_dir}: {e.strerror or e}") from None
    return paths
