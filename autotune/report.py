"""What a tuning report says, as data: tuned records placed on their target's roofline, the
cost model's error against measurements, and the search history of every Optuna study.

Everything here reads the tuning database and the Optuna storage at one URL and computes;
drawing and writing Markdown / HTML / JSON is the root module ``kascade.report``. Nothing
here writes to the storage, and whatever it holds (including nothing, or schedules this
module cannot count) gives a report rather than a crash. Only a storage that cannot be
read at all is an error (:class:`ReportError`).

Placing a record on the roofline needs its FLOPs and bytes. The database keeps decisions,
not kernels, so they are recomputed from the record's schedule family and shape bucket by
:func:`record_work`; schedules it cannot count are listed without a roofline point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from kascade.autotune.db import TuningDatabase, TuningRecord, default_url, is_sqlite, records_table
from kascade.backends.targets import Target, get_target
from kascade.ir.errors import KascadeError

SCHEMA_VERSION = 1

# Bytes per element of the dtypes a record may name.
ITEMSIZE = {"fp8": 1, "f8": 1, "bf16": 2, "f16": 2, "fp16": 2, "tf32": 4, "f32": 4, "fp32": 4, "f64": 8}


class ReportError(KascadeError):
    """A storage or output folder a report cannot use, with what is accepted."""


# ---- work of a record --------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """FLOPs and minimum bytes of one kernel launch, and how they were counted."""
    flops: float
    bytes: float
    basis: str

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte."""
        return self.flops / self.bytes


@cache
def library_schedules() -> dict[str, tuple[str, str]]:
    """``Schedule.key()`` of every library cascade that has a schedule -> (cascade name, mask),
    mask being ``dense``, ``causal`` (one ``m <= p + c`` bound) or ``masked`` (anything else,
    e.g. a sliding window whose width is a parameter the bucket does not carry)."""
    try:
        from kascade.ir.library import LIBRARY
        from kascade.passes.schedule import attention_prefill_schedule
    except Exception:   # a library in flux leaves every schedule unknown; the report still runs
        return {}
    from itertools import product

    from kascade.ir.dtypes import bf16, f16, f32
    from kascade.ir.library import attention
    builds = list(LIBRARY.items())
    # the variants kascade.attention and `kascade tune attention` compile (2-pass form, every dtype and mask)
    for form, causal, window, softcap, dtype in product(("2pass", "3pass"), (False, True),
                                                        (None, (1, 1), (1, -1), (-1, 1)), (False, True),
                                                        (bf16, f16, f32)):
        flags = "_".join(n for n, on in (("causal", causal), ("window", window), ("softcap", softcap)) if on)
        builds.append((f"attention_{form}{'_' + flags if flags else ''}",
                       lambda f=form, c=causal, w=window, s=softcap, d=dtype: attention(f, causal=c, window=w,
                                                                                        softcap=s, dtype=d)))
    known: dict[str, tuple[str, str]] = {}
    for name, build in builds:
        try:
            schedule = attention_prefill_schedule(build())
        except Exception:   # not a prefill cascade (or one in flux): simply unknown
            continue
        bounds = [(b.side, b.coeff) for b in schedule.kernels[0].body.key_bounds]
        mask = "dense" if not bounds else "causal" if bounds == [("upper", 1)] else "masked"
        known.setdefault(schedule.key(), (name, mask))
    return known


def kernel_label(schedule: str) -> str:
    """``attention_causal (attention_prefill:02b0123e)``: the library cascade a schedule
    compiles, if any, and a short form of its key."""
    family, _, digest = schedule.partition(":")
    short = f"{family}:{digest[:8]}" if digest else family
    known = library_schedules().get(schedule)
    return f"{known[0]} ({short})" if known else short


def parse_bucket(bucket: str) -> dict[str, int] | None:
    """``"E=128,F=128,M=4096,P=4096,heads=64"`` -> dict, or None if it is not of that form."""
    out = {}
    for item in bucket.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            return None
        out[name.strip()] = int(value)
    return out


def causal_pairs(P: int, M: int) -> int:
    """(query, key) pairs a bottom-right-aligned causal mask (``m <= p + M - P``) keeps."""
    if M >= P:
        return P * M - P * (P - 1) // 2
    return M * (M + 1) // 2


def attention_prefill_work(bucket: Mapping[str, int], itemsize: int, mask: str) -> Work:
    """Matrix-product FLOPs and one read of Q, K, V plus one write of O, at the bucket's extents.

    FLOPs: ``2 * heads * pairs * (E + F)`` (QK^T and PV; FlashAttention's ``4 * heads * P * M * E``
    when E = F), with ``pairs = P * M``, or the pairs a causal mask keeps (about half when P = M).
    Softmax work on CUDA cores is not counted, as in published attention TFLOP/s. Bytes assume
    one K/V head per query head: GQA moves fewer, so its true intensity is higher. The bucket's
    sequence lengths are powers of two, the shape the tuner times for that bucket."""
    heads, P, M, E, F = (bucket[k] for k in ("heads", "P", "M", "E", "F"))
    pairs = causal_pairs(P, M) if mask == "causal" else P * M
    flops = 2.0 * heads * pairs * (E + F)
    nbytes = float(heads * (P * E + M * E + M * F + P * F) * itemsize)
    return Work(flops, nbytes, f"attention prefill, {mask}")


def paged_decode_work(bucket: Mapping[str, int], itemsize: int) -> Work:
    """Decode attention at the bucket: ``seqs`` (sequence, KV head) pairs of ``L`` keys, ``R`` query
    heads per KV head. FLOPs ``2 * seqs * R * L * (E + F)``; bytes: the K and V cache read once
    (the queries and outputs are noise beside it), so achieved bytes/s is the KV bandwidth."""
    seqs, R, L, E, F = (bucket[k] for k in ("seqs", "R", "L", "E", "F"))
    return Work(2.0 * seqs * R * L * (E + F), float(seqs * L * (E + F) * itemsize), "paged decode, KV read once")


def moe_work(bucket: Mapping[str, int], itemsize: int) -> Work:
    """Grouped SwiGLU experts at the bucket: FLOPs ``2 * T * K * 3 * D * F``; bytes: the weights of
    the experts uniform routing touches (``E (1 - (1 - K/E)^T)`` of them) plus x in and y out."""
    T, K, E, D, F = (bucket[k] for k in ("T", "K", "E", "D", "F"))
    touched = E * (1.0 - (1.0 - min(K, E) / E) ** T)
    return Work(2.0 * T * K * 3 * D * F, (touched * 3 * D * F + 2 * T * D) * itemsize,
                "MoE experts, uniform routing")


_FAMILY_WORK = {"paged_decode_partial+paged_decode_merge": (("seqs", "R", "L", "E", "F"), paged_decode_work),
                "moe_gate_up+moe_down+moe_combine": (("T", "K", "E", "D", "F"), moe_work)}


def record_work(schedule: str, bucket: str, dtype: str) -> tuple[Work | None, str]:
    """``(work, why)``: the work of a record's kernel, or None and why it cannot be counted."""
    family = schedule.split(":", 1)[0]
    if family in _FAMILY_WORK:
        keys, work_of = _FAMILY_WORK[family]
        sizes = parse_bucket(bucket)
        if sizes is None or not set(keys) <= sizes.keys() or dtype not in ITEMSIZE:
            return None, f"bucket {bucket!r} ({dtype}) lacks {', '.join(keys)}"
        work = work_of(sizes, ITEMSIZE[dtype])
        return work, work.basis
    if family != "attention_prefill":
        return None, f"no FLOP/byte count for kernel family {family!r}"
    sizes = parse_bucket(bucket)
    if sizes is None or not {"heads", "P", "M", "E", "F"} <= sizes.keys():
        return None, f"bucket {bucket!r} lacks E, F, M, P or heads"
    if dtype not in ITEMSIZE:
        return None, f"unknown dtype {dtype!r}"
    name, mask = library_schedules().get(schedule, (None, "dense"))
    if mask == "masked":
        return None, f"{name}'s mask keeps a share of the keys the bucket does not say"
    work = attention_prefill_work(sizes, ITEMSIZE[dtype], mask)
    if name is None:
        work = Work(work.flops, work.bytes, "attention prefill, dense assumed (cascade not in the library)")
    return work, work.basis


# ---- rooflines -----------------------------------------------------------------------
@dataclass(frozen=True)
class Roof:
    name: str        # "tensor bf16", "fp32", "HBM"
    rate: float      # FLOP/s, or bytes/s for HBM
    measured: bool   # True when the target records a measured ceiling for it
    datasheet: float


def target_name(record_target: str) -> str:
    """``"h200 (sm_90a)"`` -> ``"h200"``."""
    return record_target.split(" (", 1)[0].strip()


def resolve_target(record_target: str) -> Target | None:
    try:
        return get_target(target_name(record_target))
    except KascadeError:
        return None


def memory_roof(t: Target) -> Roof:
    return Roof("HBM", t.hbm_bandwidth, t.measured.copy_bandwidth is not None, t.hbm_bandwidth_peak)


def compute_roof(t: Target, dtype: str) -> Roof:
    """The compute ceiling a kernel of ``dtype`` runs under: the tensor cores for the dtypes
    they take; fp32 inputs run Triton's exact dot on the FMA units (as in the cost model)."""
    if dtype in t.tensor_tflops and dtype not in ("tf32", "f32"):
        return Roof(f"tensor {dtype}", t.tensor_peak(dtype), bool(t.measured.tensor_tflops_bf16),
                    t.tensor_tflops[dtype] * 1e12)
    return Roof("fp32", t.fp32_rate, False, t.fp32_rate)


@dataclass(frozen=True)
class Placement:
    """A record on its target's roofline."""
    achieved: float      # FLOP/s
    attainable: float    # min(compute roof, intensity * bandwidth)
    bound: str           # the roof that bounds it at its intensity
    above_roof: bool

    @property
    def fraction(self) -> float:
        return self.achieved / self.attainable


def place(work: Work, seconds: float, t: Target, dtype: str) -> Placement:
    compute, memory = compute_roof(t, dtype), memory_roof(t)
    by_memory = work.intensity * memory.rate
    bound, attainable = (memory.name, by_memory) if by_memory < compute.rate else (compute.name, compute.rate)
    achieved = work.flops / seconds
    return Placement(achieved, attainable, bound, achieved > attainable)


# ---- the cost model's error ------------------------------------------------------------
def ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None when undefined
    (fewer than two pairs, or one side constant)."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else None


def mape(measured: Sequence[float], predicted: Sequence[float]) -> float | None:
    """Mean absolute percentage error of ``predicted`` against ``measured``, in percent."""
    pairs = [(m, p) for m, p in zip(measured, predicted) if m > 0 and math.isfinite(m) and math.isfinite(p)]
    return 100.0 * sum(abs(p - m) / m for m, p in pairs) / len(pairs) if pairs else None


@dataclass(frozen=True)
class ModelPair:
    schedule: str
    bucket: str
    dtype: str
    target: str
    versions: str
    measured_seconds: float
    predicted_seconds: float
    measured_config: str
    predicted_config: str

    @property
    def error_percent(self) -> float:
        return 100.0 * (self.predicted_seconds - self.measured_seconds) / self.measured_seconds


def model_pairs(records: Iterable[TuningRecord]) -> list[ModelPair]:
    """Each key with both a measured and a predicted (cost-model) record."""
    by_key: dict[tuple, dict[bool, TuningRecord]] = {}
    for r in records:
        k = r.key
        if not (math.isfinite(r.seconds) and r.seconds > 0):
            continue
        by_key.setdefault((k.schedule, k.bucket, k.dtype, k.target, k.versions), {})[k.measured] = r
    return [ModelPair(*key, m.seconds, p.seconds, m.config, p.config)
            for key, recs in by_key.items() if (m := recs.get(True)) and (p := recs.get(False))]


def model_error(pairs: Sequence[ModelPair]) -> dict:
    meas, pred = [p.measured_seconds for p in pairs], [p.predicted_seconds for p in pairs]
    return {"pairs": len(pairs), "spearman": spearman(meas, pred), "mape_percent": mape(meas, pred)}


# ---- Optuna studies ----------------------------------------------------------------------
@dataclass(frozen=True)
class StudyHistory:
    name: str
    direction: str                   # "minimize" | "maximize"
    trials: int
    complete: int
    failed: int                      # failed, pruned, or finished with a non-finite value
    history: tuple[tuple[int, float, float], ...]   # (trial number, value, best so far), complete trials
    best_params: dict = field(default_factory=dict)
    user_attrs: dict = field(default_factory=dict)

    @property
    def best(self) -> float | None:
        return self.history[-1][2] if self.history else None


def study_histories(url: str, tables: set[str], target: Target | None, warnings: list[str]) -> list[StudyHistory]:
    """Every single-objective study in the Optuna storage at ``url`` (none if Optuna's tables
    are absent; nothing is created). A study whose ``target`` user attribute names another GPU
    than ``target`` is left out."""
    if "studies" not in tables or "trials" not in tables:
        return []
    try:
        import optuna
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
        studies = [optuna.load_study(study_name=name, storage=storage)
                   for name in sorted(optuna.get_all_study_names(storage))]
    except Exception as e:   # an Optuna schema of another version, a broken row ...
        warnings.append(f"Optuna studies in this storage could not be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); the search history is left out")
        return []
    out = []
    for study in studies:
        attrs = dict(study.user_attrs)
        if target is not None and "target" in attrs:
            t = resolve_target(str(attrs["target"]))
            if t is None or t.name != target.name:
                continue
        if len(study.directions) != 1:
            warnings.append(f"study {study.study_name!r} has {len(study.directions)} objectives; "
                            "only single-objective studies get a search history")
            continue
        maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        trials = sorted(study.get_trials(deepcopy=False), key=lambda tr: tr.number)
        history, best, best_params = [], None, {}
        for tr in trials:
            v = tr.value if tr.state == optuna.trial.TrialState.COMPLETE else None
            # a rejected config scores a penalty and a repeated one replays a value: neither is a measurement
            if v is None or not math.isfinite(v) or "infeasible" in tr.user_attrs or tr.user_attrs.get("duplicate"):
                continue
            if best is None or (v > best if maximize else v < best):
                best, best_params = v, dict(tr.params)
            history.append((tr.number, float(v), float(best)))
        complete = sum(tr.state == optuna.trial.TrialState.COMPLETE for tr in trials)
        out.append(StudyHistory(study.study_name, "maximize" if maximize else "minimize", len(trials), complete,
                                sum(tr.state.is_finished() for tr in trials) - len(history),
                                tuple(history), best_params, attrs))
    return out


# ---- the whole report -----------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """A tuning record with its work and, where its target and work are known, its placement."""
    record: TuningRecord
    work: Work | None
    why: str                          # how the work was counted, or why it was not
    target: Target | None
    placement: Placement | None


@dataclass(frozen=True)
class ReportData:
    storage: str                     # the URL, password hidden
    target_filter: str | None
    generated: float
    rows: tuple[Row, ...]
    targets: tuple[Target, ...]      # those drawn: the filter's, or every known target of a record
    pairs: tuple[ModelPair, ...]
    studies: tuple[StudyHistory, ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...]


def redact(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:   # not a URL SQLAlchemy parses; still show something
        return url.split("@", 1)[-1] if "@" in url else url


def _open(storage: str | None) -> tuple[str, set[str]]:
    """The URL and its table names; an empty set when there is nothing there yet."""
    url = storage or default_url()
    if not (is_sqlite(url) or url.startswith("postgresql")):
        raise ReportError(f"unsupported storage {redact(url)!r}; accepted: sqlite:///path/to/file.db or "
                          "postgresql://user:password@host:port/database")
    if is_sqlite(url):
        path = url.split(":///", 1)[-1] if ":///" in url else ""
        if not path or path == ":memory:":
            return url, set()
        p = Path(path).expanduser()
        if not p.exists():
            if storage is None:
                return url, set()    # the default database before any tuning: an empty report
            raise ReportError(f"no tuning database at {p}; pass the storage `kascade tune` wrote to "
                              f"(sqlite:///path/to/file.db or postgresql://...), or omit it for {default_url()}")
        if not p.is_file():
            raise ReportError(f"storage {p} is not a file; accepted: sqlite:///path/to/file.db")
    try:
        engine = sa.create_engine(url, future=True)
        try:
            with engine.connect() as conn:
                tables = set(sa.inspect(conn).get_table_names())
        finally:
            engine.dispose()
    except (SQLAlchemyError, ImportError, ValueError) as e:
        raise ReportError(f"cannot read storage {redact(url)}: {str(e).splitlines()[0]}; accepted: a "
                          "kascade tuning database (sqlite:///path/to/file.db or postgresql://...)") from None
    return url, tables


def collect(storage: str | None = None, target: str | None = None) -> ReportData:
    """Read everything a report shows from ``storage`` (default: the tuning database in the
    cache dir), optionally only what concerns ``target`` (a target-table name)."""
    want = get_target(target) if target is not None else None
    url, tables = _open(storage)
    warnings: list[str] = []
    records: list[TuningRecord] = []
    if records_table.name in tables:
        records = list(TuningDatabase(url).records())
    if want is not None:
        records = [r for r in records if (t := resolve_target(r.key.target)) is not None and t.name == want.name]
    rows = []
    for r in sorted(records, key=lambda r: (r.key.target, r.key.schedule, r.key.bucket, r.key.dtype,
                                            not r.key.measured, r.key.versions)):
        work, why = record_work(r.key.schedule, r.key.bucket, r.key.dtype)
        t = resolve_target(r.key.target)
        placement = None
        if work is not None and t is None:
            why += f"; target {r.key.target!r} is not in the target table"
        elif work is not None and not (math.isfinite(r.seconds) and r.seconds > 0):
            why += f"; its time {r.seconds!r} is not a positive number"
        elif work is not None:
            placement = place(work, r.seconds, t, r.key.dtype)
        rows.append(Row(r, work, why, t, placement))
        if placement is not None and placement.above_roof:
            kind = "measured" if r.key.measured else "predicted"
            warnings.append(
                f"{kind} {kernel_label(r.key.schedule)} {r.key.bucket} {r.key.dtype} on {r.key.target}: "
                f"{placement.achieved / 1e12:.1f} TFLOP/s is {placement.fraction:.0%} of the "
                f"{placement.bound} roof ({placement.attainable / 1e12:.1f} TFLOP/s at "
                f"{work.intensity:.0f} FLOP/byte): a counting bug (FLOPs or bytes over-counted, "
                f"or the time under-measured){' - ' + work.basis if 'assumed' in work.basis else ''}")
    targets = (want,) if want is not None else \
        tuple(sorted({row.target for row in rows if row.target is not None}, key=lambda t: t.name))
    studies = study_histories(url, tables, want, warnings)
    notes = ("FLOPs are the attention matrix products (2 x heads x kept (query, key) pairs x (E + F)); bytes "
             "read Q, K, V and write O once at the bucket's extents, one K/V head per query head.",
             "Roofs prefer the target's measured ceilings to the datasheet; a point above its roof is a bug.",
             "Model error pairs the best measured and best predicted record of the same key.")
    return ReportData(redact(url), want.name if want else None, time.time(), tuple(rows), targets,
                      tuple(model_pairs(records)), tuple(studies), tuple(warnings), notes)


def as_json(data: ReportData) -> dict:
    """The machine-readable report (``schema_version`` changes when a field changes meaning)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        kascade_version = version("kascade")
    except PackageNotFoundError:
        kascade_version = "unknown"

    def roof(r: Roof) -> dict:
        return {"name": r.name, "rate": r.rate, "measured": r.measured, "datasheet": r.datasheet}

    targets = []
    for t in data.targets:
        dtypes = sorted({row.record.key.dtype for row in data.rows if row.target == t} | {"bf16"})
        computes = {compute_roof(t, d).name: compute_roof(t, d) for d in dtypes} | {"fp32": compute_roof(t, "f32")}
        tensor = compute_roof(t, "bf16")
        targets.append({"name": t.name, "arch": t.arch, "memory_roof": roof(memory_roof(t)),
                        "compute_roofs": [roof(c) for c in computes.values()],
                        "ridge_intensity": tensor.rate / memory_roof(t).rate,
                        "measured_source": t.measured.source})
    rows = []
    for row in data.rows:
        w, p = row.work, row.placement
        rows.append({**row.record.as_json(),
                     "work": None if w is None else {"flops": w.flops, "bytes": w.bytes,
                                                     "intensity": w.intensity, "basis": w.basis},
                     "work_note": row.why,
                     "roofline": None if p is None else {"achieved_flops_per_s": p.achieved,
                                                         "attainable_flops_per_s": p.attainable,
                                                         "bound": p.bound, "fraction_of_bound": p.fraction,
                                                         "above_roof": p.above_roof}})
    by_target = {}
    for name in sorted({p.target for p in data.pairs}):
        by_target[name] = model_error([p for p in data.pairs if p.target == name])
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "kascade_report",
        "kascade_version": kascade_version,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(data.generated)),
        "storage": data.storage,
        "target_filter": data.target_filter,
        "summary": {"records": len(data.rows), "measured": sum(r.record.key.measured for r in data.rows),
                    "predicted": sum(not r.record.key.measured for r in data.rows),
                    "on_roofline": sum(r.placement is not None for r in data.rows),
                    "above_roof": sum(r.placement is not None and r.placement.above_roof for r in data.rows),
                    "studies": len(data.studies), "warnings": len(data.warnings)},
        "targets": targets,
        "records": rows,
        "model_error": {**model_error(data.pairs), "by_target": by_target,
                        "pair_list": [{**asdict(p), "error_percent": p.error_percent} for p in data.pairs]},
        "studies": [{"name": s.name, "direction": s.direction, "trials": s.trials, "complete": s.complete,
                     "failed": s.failed, "best_value": s.best, "best_params": s.best_params,
                     "user_attrs": s.user_attrs,
                     "history": [{"number": n, "value": v, "best": b} for n, v, b in s.history]}
                    for s in data.studies],
        "warnings": list(data.warnings),
        "notes": list(data.notes),
    }
