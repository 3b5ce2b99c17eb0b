"""Calibrating the roofline cost model against measured times, per target.

The model (:mod:`kascade.backends.model`) has a few free numbers, the :class:`Efficiency`
factors: the achievable fraction of each roof (tensor cores, special functions, CUDA-core FLOPs,
HBM, L2). :func:`calibrate` fits them to the measured samples of one target
(:mod:`kascade.autotune.samples`: every config a GPU tuning run timed, at its exact shape):

* each sample's :class:`Cost` is recomputed from its schedule, config, extents and params (the
  cost does not depend on the factors, so it is computed once); predicted records (dry runs)
  are never used;
* the factors minimise the squared log-error of predicted against measured time, each shape
  weighted alike (a shape the tuner measured 100 times does not outvote one measured 10 times),
  within 0.05..1.0, by coordinate descent: a grid over each factor's whole range (the model is a
  max of roofs, so its error is not convex in one factor), then a golden-section refinement.
  A tiny pull towards the defaults keeps a factor that no sample constrains where it was. The
  fit is deterministic;
* the report says how well the model ranks and predicts, before and after: Spearman's rank
  correlation over every sample and within each shape (what choosing a config needs), the mean
  absolute percentage error, the measured time of the config the model would pick against the
  best measured, and the same per bound.

The fitted factors are stored per target and software versions in ``kascade_calibrations``;
:func:`calibrated_efficiency` is what the tuner and the runtime choice predict with. A stored
row that does not parse is ignored with a warning, never a crash.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from kascade.autotune.db import TuningDatabase, records_table, retry_table_race
from kascade.autotune.lookup import software_versions, target_key
from kascade.autotune.samples import Measurement, load_measurements, rebuild_schedule
from kascade.autotune.study import masked
from kascade.backends.model import Cost, Efficiency, predict, schedule_cost
from kascade.backends.targets import Target, get_target
from kascade.ir.dtypes import DType
from kascade.ir.errors import KascadeError
from kascade.passes.schedule import Config

FACTORS = ("tensor", "special", "flops", "hbm", "l2")   # the Efficiency fields that are fitted
BOUNDS = (0.05, 1.0)
PRIOR_WEIGHT = 1e-4     # pull (in squared log units) towards the starting factors
GRID = 41
SWEEPS = 30

_metadata = sa.MetaData()
calibrations_table = sa.Table(
    "kascade_calibrations", _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("target", sa.String(64), nullable=False),      # "h200 (sm_90a)", as in the tuning records
    sa.Column("versions", sa.String(256), nullable=False),
    sa.Column("factors", sa.Text, nullable=False),           # JSON {Efficiency field: value}
    sa.Column("summary", sa.Text, nullable=False, default="{}"),   # JSON: samples, errors before / after
    sa.Column("created", sa.Float, nullable=False),
    sa.UniqueConstraint("target", "versions", name="uq_calibration_key"),
)


class CalibrationError(KascadeError):
    """Nothing to calibrate from (no measured samples for the target), with what to run."""


class CalibrationWarning(UserWarning):
    """Stored factors that cannot be used (ignored: the model keeps its defaults)."""


# ---- metrics -------------------------------------------------------------------------------
def average_ranks(xs: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values share their average rank."""
    x = np.asarray(xs, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None when undefined (fewer than
    two pairs, or one side constant)."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    rx, ry = average_ranks(xs), average_ranks(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / den if den > 0 else None


def mape(measured: Sequence[float], predicted: Sequence[float]) -> float | None:
    """Mean absolute percentage error of ``predicted`` against ``measured``, in percent."""
    m, p = np.asarray(measured, dtype=float), np.asarray(predicted, dtype=float)
    return float(100.0 * np.mean(np.abs(p - m) / m)) if len(m) else None


@dataclass(frozen=True)
class ModelError:
    """How well predictions match measurements over a set of samples."""
    spearman: float | None          # over every sample
    spearman_within: float | None   # mean over shapes with 3+ configs: ranking configs of one shape
    mape: float | None              # percent
    pick_vs_best: float | None      # mean over shapes: measured time of the model's pick / best measured


def model_error(measured: Sequence[float], predicted: Sequence[float], shapes: Sequence[str]) -> ModelError:
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(s, []).append(i)
    within, picks = [], []
    for idx in groups.values():
        m, p = [measured[i] for i in idx], [predicted[i] for i in idx]
        if len(idx) >= 3 and (r := spearman(m, p)) is not None:
            within.append(r)
        if len(idx) >= 2:
            picks.append(m[min(range(len(idx)), key=lambda k: (p[k], m[k]))] / min(m))
    return ModelError(spearman(measured, predicted), float(np.mean(within)) if within else None,
                      mape(measured, predicted), float(np.mean(picks)) if picks else None)


# ---- samples ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """A measurement with its recomputed cost."""
    measurement: Measurement
    cost: Cost

    @property
    def seconds(self) -> float:
        return self.measurement.seconds

    @property
    def dtype(self) -> str:
        return self.measurement.dtype


def gather(target: Target, db: TuningDatabase, versions: str | None = None) -> tuple[list[Sample], list[str]]:
    """``(samples, notes)``: the target's measured samples with their costs, and what was left
    out and why (one note per reason, with a count)."""
    found, unreadable = load_measurements(db, target=target_key(target), measured=True)
    left_out: dict[str, int] = {}
    if unreadable:
        left_out["measured samples whose row does not parse"] = unreadable
    samples = []
    for m in found:
        if versions is not None and m.versions != versions:
            why = f"measured with other software versions than {versions}"
            left_out[why] = left_out.get(why, 0) + 1
            continue
        try:
            schedule = rebuild_schedule(m.schedule, m.cascade)
            config = Config.of({k: int(v) for k, v in (kv.split("=") for kv in m.config.split(","))})
            cost = schedule_cost(schedule, config, m.extents, target, DType(m.dtype).itemsize, m.params)
        except (KascadeError, KeyError, ValueError, TypeError) as e:
            why = f"cannot recompute their cost ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
            left_out[why] = left_out.get(why, 0) + 1
            continue
        samples.append(Sample(m, cost))
    notes = [f"{n} {why}" for why, n in left_out.items()]
    return samples, notes


def _record_counts(target: Target, db: TuningDatabase) -> dict[bool, int]:
    """Tuning records of the target by ``measured`` (for the message when there are no samples)."""
    try:
        q = sa.select(records_table.c.measured, sa.func.count()).where(records_table.c.target == target_key(target)) \
            .group_by(records_table.c.measured)
        with db.engine.connect() as conn:
            return {bool(m): int(n) for m, n in conn.execute(q).all()}
    except SQLAlchemyError:
        return {}


# ---- the fit --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Design:
    """Each sample's time per roof at 100 % efficiency, and what ``predict`` adds around the max."""
    base: np.ndarray      # (n, len(FACTORS)) seconds per roof before the efficiency factors
    wave: np.ndarray      # busy fraction of the SMs
    latency: np.ndarray   # the dependent-load chain (a floor on the body)
    launch: np.ndarray    # launch overhead
    log_measured: np.ndarray
    weight: np.ndarray    # per sample; each shape sums to the same


def _design(samples: Sequence[Sample], target: Target, start: Efficiency) -> _Design:
    unit = replace(start, **{f: 1.0 for f in FACTORS})
    base = np.empty((len(samples), len(FACTORS)))
    for i, s in enumerate(samples):
        terms = dict(predict(s.cost, target, s.dtype, unit).terms)
        base[i] = [terms[f] for f in FACTORS]
    per_shape: dict[str, int] = {}
    for s in samples:
        per_shape[s.measurement.shape] = per_shape.get(s.measurement.shape, 0) + 1
    w = np.array([1.0 / per_shape[s.measurement.shape] for s in samples])
    return _Design(base, np.array([max(s.cost.wave_efficiency, 1e-9) for s in samples]),
                   np.array([getattr(s.cost, "latency_s", 0.0) for s in samples]),
                   np.array([s.cost.launches * target.launch_overhead_s for s in samples]),
                   np.log([s.seconds for s in samples]), w / w.sum())


def _seconds(d: _Design, factors: np.ndarray) -> np.ndarray:
    """``predict``'s time for every sample at ``factors`` (same order as FACTORS), vectorised."""
    body = (d.base / factors).max(axis=1) / d.wave
    return np.maximum(body, d.latency) + d.launch


def fit(samples: Sequence[Sample], target: Target, start: Efficiency | None = None) -> Efficiency:
    """The factors that minimise the weighted squared log-error (see the module docstring), starting
    from (and pulled slightly towards) ``start``, the model's defaults unless given."""
    start = start or Efficiency()
    d = _design(samples, target, start)
    lo, hi = math.log(BOUNDS[0]), math.log(BOUNDS[1])
    u0 = np.array([math.log(min(max(getattr(start, f), BOUNDS[0]), BOUNDS[1])) for f in FACTORS])

    def loss(u: np.ndarray) -> float:
        r = np.log(_seconds(d, np.exp(u))) - d.log_measured
        return float(d.weight @ (r * r) + PRIOR_WEIGHT * np.sum((u - u0) ** 2))

    u, best = u0.copy(), loss(u0)
    grid = np.linspace(lo, hi, GRID)
    step = grid[1] - grid[0]
    for _ in range(SWEEPS):
        before = best
        for j in range(len(FACTORS)):
            def at(v: float, j: int = j) -> float:
                trial = u.copy()
                trial[j] = v
                return loss(trial)
            values = [at(v) for v in grid]
            k = int(np.argmin(values))
            a, b = max(lo, grid[k] - step), min(hi, grid[k] + step)
            v, fv = _golden(at, a, b)
            for cand, fc in ((grid[k], values[k]), (v, fv)):
                if fc < best - 1e-15:
                    u[j], best = cand, fc
        if before - best <= 1e-12 * max(1.0, before):
            break
    return replace(start, **{f: float(round(math.exp(x), 6)) for f, x in zip(FACTORS, u)})


def _golden(f, a: float, b: float, iters: int = 40) -> tuple[float, float]:
    """Minimum of ``f`` on ``[a, b]`` by golden-section search (``f`` unimodal there, nearly)."""
    g = (math.sqrt(5) - 1) / 2
    c, e = b - g * (b - a), a + g * (b - a)
    fc, fe = f(c), f(e)
    for _ in range(iters):
        if fc <= fe:
            b, e, fe = e, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, e, fe
            e = a + g * (b - a)
            fe = f(e)
    return (c, fc) if fc <= fe else (e, fe)


# ---- calibrating ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BoundError:
    """The error over the samples one roof bounds (under the fitted factors)."""
    bound: str
    samples: int
    mape_before: float | None
    mape_after: float | None


@dataclass(frozen=True)
class Calibration:
    target: str                     # the records' target key, "h200 (sm_90a)"
    versions: str                   # what the factors are stored under
    samples: int
    shapes: int
    default: Efficiency
    fitted: Efficiency
    bound_samples: dict             # factor -> samples that roof bounds under the fitted factors
    before: ModelError
    after: ModelError
    by_bound: tuple[BoundError, ...]
    notes: tuple[str, ...] = field(default=())
    stored: bool = False

    def as_json(self) -> dict:
        return {"target": self.target, "versions": self.versions, "samples": self.samples, "shapes": self.shapes,
                "factors": {f: {"default": getattr(self.default, f), "fitted": getattr(self.fitted, f),
                                "bound_samples": self.bound_samples.get(f, 0)} for f in FACTORS},
                "before": asdict(self.before), "after": asdict(self.after),
                "by_bound": [asdict(b) for b in self.by_bound], "notes": list(self.notes), "stored": self.stored}


def calibrate(target: str | Target, db: TuningDatabase, *, versions: str | None = None, store: bool = True,
              start: Efficiency | None = None) -> Calibration:
    """Fit ``target``'s factors to its measured samples in ``db`` (``versions``: only samples
    timed with these software versions; default all) and, with ``store``, save them.
    :class:`CalibrationError` when there is no measured sample to fit."""
    if isinstance(target, str):
        target = get_target(target)
    start = start or Efficiency()
    samples, notes = gather(target, db, versions)
    if not samples:
        counts = _record_counts(target, db)
        have = []
        if counts.get(True):
            have.append(f"{counts[True]} measured tuning records hold only the winner and its shape bucket, "
                        "not the exact shape a cost needs")
        if counts.get(False):
            have.append(f"{counts[False]} predicted (dry-run) records are never used")
        raise CalibrationError(
            f"no measured samples for {target_key(target)} in {masked(db.url)}"
            + (f" ({'; '.join(have + notes)})" if have or notes else "")
            + f": calibration needs configs timed on that GPU. Run `kascade tune attention --target {target.name} "
              f"--backend gpu` on that GPU with this storage (every measured trial is kept), or import a "
              f"recorded sweep: `kascade calibrate --target {target.name} --sweep sweep.json`")
    fitted = fit(samples, target, start)
    measured = [s.seconds for s in samples]
    shapes = [s.measurement.shape for s in samples]
    old = [predict(s.cost, target, s.dtype, start) for s in samples]
    new = [predict(s.cost, target, s.dtype, fitted) for s in samples]
    by_bound = []
    for bound in sorted({p.bound for p in new}):
        idx = [i for i, p in enumerate(new) if p.bound == bound]
        by_bound.append(BoundError(bound, len(idx), mape([measured[i] for i in idx], [old[i].seconds for i in idx]),
                                   mape([measured[i] for i in idx], [new[i].seconds for i in idx])))
    used = {s.measurement.versions for s in samples}
    cal = Calibration(target_key(target), versions or (used.pop() if len(used) == 1 else software_versions()),
                      len(samples), len(set(shapes)), start, fitted,
                      {f: sum(p.bound == f for p in new) for f in FACTORS},
                      model_error(measured, [p.seconds for p in old], shapes),
                      model_error(measured, [p.seconds for p in new], shapes), tuple(by_bound), tuple(notes))
    if store:
        store_calibration(db, cal)
        cal = replace(cal, stored=True)
    return cal


# ---- stored factors ----------------------------------------------------------------------------
def _init(db: TuningDatabase) -> None:
    retry_table_race(lambda: _metadata.create_all(db.engine))


def store_calibration(db: TuningDatabase, cal: Calibration) -> None:
    """Replace the factors stored for ``cal``'s target and versions (one transaction)."""
    summary = {k: v for k, v in cal.as_json().items() if k not in ("factors", "target", "versions", "stored")}
    store_factors(db, resolve_target_key(cal.target), cal.fitted, cal.versions, summary)


def resolve_target_key(key: str) -> Target:
    """``"h200 (sm_90a)"`` -> the target-table entry."""
    return get_target(key.split(" (", 1)[0].strip())


def store_factors(db: TuningDatabase, target: str | Target, eff: Efficiency, versions: str | None = None,
                  summary: dict | None = None) -> None:
    """Replace the factors stored for ``target`` and ``versions`` (default: this process's)."""
    if isinstance(target, str):
        target = get_target(target)
    key, versions = target_key(target), versions or software_versions()
    factors = {f.name: getattr(eff, f.name) for f in fields(Efficiency)}
    t = calibrations_table
    _init(db)
    with db.engine.begin() as conn:
        conn.execute(sa.delete(t).where(t.c.target == key, t.c.versions == versions))
        conn.execute(sa.insert(t).values(target=key, versions=versions, factors=json.dumps(factors),
                                         summary=json.dumps(summary or {}), created=time.time()))


@dataclass(frozen=True)
class StoredCalibration:
    target: str
    versions: str
    efficiency: Efficiency
    summary: dict
    created: float


def _parse_factors(text: str) -> Efficiency:
    """An :class:`Efficiency` from stored JSON; ValueError says what is wrong. Unknown names are
    ignored (a newer kascade may fit more factors)."""
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("factors are not a JSON object")
    known = {f.name for f in fields(Efficiency)}
    values = {}
    for name, v in doc.items():
        if name not in known:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"factor {name}={v!r} is not a positive number")
        if name in FACTORS and not BOUNDS[0] - 1e-9 <= v <= BOUNDS[1] + 1e-9:
            raise ValueError(f"factor {name}={v!r} is outside {BOUNDS[0]}..{BOUNDS[1]}")
        values[name] = float(v)
    if not values:
        raise ValueError("no factor is named")
    return Efficiency(**values)


def stored_calibration(target: str | Target, db: TuningDatabase | None = None) -> StoredCalibration | None:
    """The factors stored for ``target``: those of this process's software versions, else the
    newest (the factors describe the GPU more than the compiler). Rows that do not parse are
    skipped with a :class:`CalibrationWarning`; an unreadable database gives None, likewise."""
    if isinstance(target, str):
        target = get_target(target)
    db = db if db is not None else TuningDatabase()
    key = target_key(target)
    t = calibrations_table
    try:
        _init(db)
        with db.engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.target == key)).mappings().all()
    except SQLAlchemyError as e:
        warnings.warn(CalibrationWarning(f"calibrated factors in {masked(db.url)} are unreadable ({type(e).__name__}); "
                                         "the cost model uses its defaults"), stacklevel=2)
        return None
    mine = software_versions()
    for r in sorted(rows, key=lambda r: (r["versions"] != mine, -(r["created"] or 0.0))):
        try:
            eff = _parse_factors(r["factors"])
            summary = json.loads(r["summary"] or "{}")
        except (TypeError, ValueError) as e:
            warnings.warn(CalibrationWarning(
                f"ignoring the calibrated factors stored for {key} ({r['versions']}) in {masked(db.url)}: {e}; "
                f"rerun `kascade calibrate --target {target.name}`"), stacklevel=2)
            continue
        return StoredCalibration(key, r["versions"], eff, summary if isinstance(summary, dict) else {},
                                 float(r["created"] or 0.0))
    return None


def calibrated_efficiency(target: str | Target, db: TuningDatabase | None = None) -> Efficiency:
    """The factors the cost model should use for ``target``: calibrated ones when stored, else the defaults."""
    found = stored_calibration(target, db)
    return found.efficiency if found is not None else Efficiency()
