"""The autotuner: an Optuna study per (schedule, shape bucket, dtype, target, versions).

:func:`tune` searches a schedule's space (:mod:`kascade.autotune.space`) at each shape:

* a config the schedule's constraints reject is never compiled or measured: its trial scores a
  penalty and violates a constraint (so constraint-aware samplers learn the feasible region);
  a config the study already knows is answered from the study (duplicates cost no measurement);
* the study starts from the cost model's top predictions (``warm_start`` enqueued trials);
* each config is measured by a :class:`~kascade.autotune.measure.Measurer`: the roofline
  model (``backend="model"``, the dry run, records ``measured=False``) or the GPU in an
  isolated worker process (``backend="gpu"``); a short probe lets the pruner (:mod:`~kascade.autotune.study`)
  drop a clearly slower config; a config that fails (compile error, wrong output, crash,
  hang) is a FAIL trial scoring infinity and the study goes on;
* the winner is chosen deterministically: the top few measured configs are re-timed paired,
  and among those within ``tie_band`` (1 %) of the fastest the smallest config key wins.

The study lives in the same storage as the tuning records: ``sqlite:///file.db`` (default:
the cache dir), ``postgresql+psycopg://user:pass@host/db`` (many ``kascade tune`` processes on
many machines share one study and one records table) or ``journal:///path/study.log`` (Optuna's
JournalStorage; records then go to ``study.records.db`` beside it). Every improvement is written
as it is found, so a run killed half-way leaves usable records, and rerunning the same command
resumes the study (``load_if_exists``): trials accumulate.
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import optuna
import sqlalchemy as sa
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from kascade.autotune.calibrate import calibrated_efficiency
from kascade.autotune.db import TuningDatabase, TuningKey, TuningRecord, default_url, is_sqlite
from kascade.autotune.db import records_table as _records
from kascade.autotune.lookup import shape_bucket, software_versions, target_key
from kascade.autotune.measure import MeasureError, Measurer, ModelMeasurer, Timing, gpu_measurer
from kascade.autotune.samples import measurement_of, store_measurement
from kascade.autotune.space import ENUMERATION_LIMIT, SearchSpace, parse_config, sizes_for
from kascade.autotune.study import (
    CONSTRAINED,
    SAMPLERS,
    ClearlyWorsePruner,
    TuneError,
    default_study_name,
    make_sampler,
    masked,
    open_storage,
    open_study,
    study_key,
    supports_set_constraint,
)
from kascade.backends.model import Efficiency, Prediction, input_dtype
from kascade.backends.targets import Target, get_target
from kascade.passes.schedule import Config, Schedule

BACKENDS = ("model", "gpu")
TIE_BAND = 0.01
MAX_DUPLICATES_IN_A_ROW = 3     # then an unseen config is enqueued, so a run always makes progress
WORKER = f"{socket.gethostname()}:{os.getpid()}"

MeasurerFactory = Callable[[Schedule, Mapping[str, int], int], Measurer]   # (schedule, extents, worker index)


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    config: str
    seconds: float     # math.inf for a failed config
    state: str         # complete | failed | pruned
    error: str = ""


@dataclass
class ShapeResult:
    """What tuning one shape found (``config`` None when no config completed)."""
    extents: dict
    key: TuningKey
    study: str
    config: Config | None
    seconds: float
    quantiles: dict
    prediction: Prediction | None       # the model's prediction for the winner
    roofline_seconds: float | None      # the shape's roofline bound (the least ideal time of any config)
    trials: int                         # configs this run measured (or tried and failed)
    study_trials: int                   # completed trials in the study, every run and worker included
    failures: int
    pruned: int
    infeasible: int
    duplicates: int
    retimed: bool
    stored: bool
    history: list[TrialOutcome] = field(default_factory=list)

    @property
    def bucket(self) -> str:
        return self.key.bucket

    @property
    def roofline_ratio(self) -> float | None:
        if self.roofline_seconds is None or not math.isfinite(self.seconds):
            return None
        return self.seconds / self.roofline_seconds


@dataclass
class TuneResult:
    shapes: list[ShapeResult]
    backend: str
    storage: str
    elapsed: float
    skipped: list[dict] = field(default_factory=list)   # shapes not started (timeout)

    @property
    def best(self) -> ShapeResult:
        return self.shapes[0]


@dataclass(frozen=True)
class TuneProgress:
    """Passed to ``progress`` after every trial (and once when a shape starts)."""
    shape: int
    shapes: int
    bucket: str
    trials: int
    budget: int
    best_seconds: float
    roofline_seconds: float | None
    failures: int
    pruned: int
    last: TrialOutcome | None


# ---- bookkeeping of one study in this process ----------------------------------------------------
class _Book:
    """What this process knows about the configs of one study (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen: dict[str, tuple[str, float | str]] = {}   # key -> (complete, s) | (failed, msg) | (pruned, s)
        self.busy: set[str] = set()
        self.history: list[TrialOutcome] = []
        self.counted = self.failures = self.pruned = self.infeasible = self.duplicates = self.attempts = 0
        self.in_a_row = 0
        self.best: tuple[float, str, dict] | None = None

    def load(self, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
        for t in trials:
            k = t.user_attrs.get("config")
            if k is None or t.user_attrs.get("duplicate") or "infeasible" in t.user_attrs:
                continue
            if t.state is TrialState.COMPLETE and t.value is not None:
                old = self.seen.get(k)
                if old is None or old[0] != "complete" or t.value < old[1]:
                    self.seen[k] = ("complete", t.value)
            elif t.state is TrialState.FAIL and "error" in t.user_attrs:
                self.seen.setdefault(k, ("failed", t.user_attrs["error"]))
            elif t.state is TrialState.PRUNED and t.intermediate_values and "infeasible" not in t.user_attrs:
                self.seen.setdefault(k, ("pruned", min(t.intermediate_values.values())))

    def claim(self, key: str) -> tuple[str, float | str] | None:
        with self.lock:
            if key in self.seen:
                return self.seen[key]
            if key in self.busy:
                return ("busy", 0.0)
            self.busy.add(key)
            return None

    def done(self, key: str, kind: str, value: float | str) -> None:
        with self.lock:
            self.busy.discard(key)
            self.seen[key] = (kind, value)


class _Pool:
    """One measurer per worker thread."""

    def __init__(self, make: Callable[[int], Measurer], n: int):
        self.all = [make(i) for i in range(n)]
        self.free: queue.Queue[Measurer] = queue.Queue()
        for m in self.all:
            self.free.put(m)

    def close(self) -> None:
        for m in {id(m): m for m in self.all}.values():
            m.close()


# ---- the search -----------------------------------------------------------------------------------
def tune(schedule: Schedule, shapes: Sequence[Mapping[str, int]], target: str | Target, *,
         backend: str | MeasurerFactory = "model", trials: int = 100, timeout: float | None = None,
         storage_url: str | None = None, sampler: str = "tpe", study_name: str | None = None, seed: int = 0,
         workers: int = 1, params: Mapping[str, int | float] | None = None, versions: str | None = None,
         warm_start: int = 8, tie_band: float = TIE_BAND, retime_top: int = 4,
         progress: Callable[[TuneProgress], None] | None = None) -> TuneResult:
    """Tune ``schedule`` at each of ``shapes`` (extents by symbol) for ``target``; see the module docstring.

    ``trials``: configs to measure per shape in this run (infeasible and duplicate proposals do not
    count; a run stops early when every feasible config has been tried). ``timeout``: seconds for
    the whole call. ``workers``: measuring threads in this process (each with its own worker
    process on the GPU), which needs PostgreSQL or a journal storage. ``backend``: ``"model"``,
    ``"gpu"``, or a factory ``(schedule, extents, worker) -> Measurer``.
    """
    start = time.monotonic()
    if isinstance(target, str):
        target = get_target(target)
    if not shapes:
        raise TuneError("no shapes to tune: give at least one extents mapping")
    if trials < 1 or workers < 1:
        raise TuneError(f"trials and workers must be at least 1, got trials={trials}, workers={workers}")
    if timeout is not None and not timeout > 0:
        raise TuneError(f"timeout must be a positive number of seconds, got {timeout}")
    if sampler not in SAMPLERS:
        raise TuneError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    if not 0 <= tie_band < 1:
        raise TuneError(f"tie_band is a fraction in [0, 1), got {tie_band}")
    url = storage_url or default_url()
    if workers > 1 and is_sqlite(url):
        raise TuneError(f"--workers {workers} needs a storage that takes concurrent writers; SQLite ({masked(url)}) "
                        "serialises them and fails under parallel workers. Use PostgreSQL "
                        "(--storage postgresql+psycopg://user:password@host:5432/database) or Optuna's "
                        "JournalStorage (--storage journal:///path/to/study.log)")
    family = schedule.kernels[0].family
    if family not in TUNABLE:
        raise TuneError(f"kernel family {family!r} is not tunable yet: the cost model and the GPU measurement "
                        f"cover {', '.join(TUNABLE)}")
    factory, backend_name = _factory(backend, target, params, workers)
    measured = _is_measured(factory, schedule, shapes[0], backend_name)
    storage, db = open_storage(url, heartbeat=measured, workers=workers)
    eff = calibrated_efficiency(target, db)   # the model's factors for this target: calibrated, else defaults
    if backend_name == "model":
        factory, _ = _factory("model", target, params, workers, eff)
    versions = versions or software_versions()
    deadline = None if timeout is None else start + timeout
    results, skipped, buckets = [], [], set()
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # failed trials are reported in the result
    try:
        todo = [dict(s) for s in shapes]
        for i, ext in enumerate(todo):
            bucket = shape_bucket(schedule, ext)
            if bucket in buckets:
                continue   # one study per bucket: the first shape of a bucket stands for it
            buckets.add(bucket)
            if deadline is not None and time.monotonic() >= deadline:
                skipped.append(ext)
                continue
            name = study_name if study_name is None or len(todo) == 1 else f"{study_name}:{bucket}"
            results.append(_tune_shape(
                schedule, ext, target, factory=factory, measured=measured, storage=storage, db=db, url=url,
                trials=trials, deadline=deadline, sampler=sampler, study_name=name, seed=seed, workers=workers,
                params=params, versions=versions, warm_start=warm_start, tie_band=tie_band, retime_top=retime_top,
                progress=progress, index=i, count=len(todo), eff=eff))
    finally:
        optuna.logging.set_verbosity(level)
    return TuneResult(results, backend_name, masked(url), time.monotonic() - start, skipped)


TUNABLE = ("attention_prefill", "paged_decode_partial", "moe_gate_up")   # families with a cost rule and a GPU measurer


def _factory(backend, target: Target, params, workers: int,
             eff: Efficiency | None = None) -> tuple[MeasurerFactory, str]:
    if callable(backend):
        return backend, getattr(backend, "__name__", "custom")
    if backend == "model":
        def model(schedule: Schedule, ext: Mapping[str, int], worker: int) -> Measurer:
            return ModelMeasurer(schedule, ext, target, input_dtype(schedule).value, params, eff)
        return model, "model"
    if backend == "gpu":
        import torch
        if not torch.cuda.is_available():
            raise TuneError("backend 'gpu' needs a CUDA GPU and none is present; the dry run is backend 'model'")
        n = torch.cuda.device_count()
        if workers > n:
            raise TuneError(f"--workers {workers} with {n} GPU(s) here: kernels timed side by side on one GPU skew "
                            "each other's times; use at most one worker per GPU (and more machines on one storage)")

        def gpu(schedule: Schedule, ext: Mapping[str, int], worker: int) -> Measurer:
            if schedule.kernels[0].family == "paged_decode_partial":
                from kascade.autotune.measure_decode import decode_measurer
                return decode_measurer(schedule, ext, params, device=worker % n)
            if schedule.kernels[0].family == "moe_gate_up":
                from kascade.autotune.measure_moe import moe_measurer
                return moe_measurer(schedule, ext, params, device=worker % n)
            return gpu_measurer(schedule, ext, params, device=worker % n)
        return gpu, "gpu"
    raise TuneError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)} (or a measurer factory)")


def _is_measured(factory: MeasurerFactory, schedule: Schedule, ext: Mapping[str, int], name: str) -> bool:
    if name == "model":
        return False
    if name == "gpu":
        return True
    m = factory(schedule, dict(ext), 0)
    try:
        return bool(m.measured)
    finally:
        m.close()


def _tune_shape(schedule: Schedule, ext: dict, target: Target, *, factory: MeasurerFactory, measured: bool,
                storage, db: TuningDatabase, url: str, trials: int, deadline: float | None, sampler: str,
                study_name: str | None, seed: int, workers: int, params, versions: str, warm_start: int,
                tie_band: float, retime_top: int, progress, index: int, count: int,
                eff: Efficiency | None = None) -> ShapeResult:
    dtype = input_dtype(schedule).value
    key = TuningKey(schedule.key(), shape_bucket(schedule, ext), dtype, target_key(target), versions, measured)
    space = SearchSpace(schedule, sizes_for(schedule, ext, input_dtype(schedule).itemsize))
    model = ModelMeasurer(schedule, ext, target, dtype, params, eff)
    ranking: list[tuple[Prediction, Config]] = []
    if space.size <= ENUMERATION_LIMIT:
        ranking = sorted(((model.predict(c), c) for c in space.configs()), key=lambda pc: (pc[0].seconds, pc[1].key()))
        if not ranking:
            first = next(iter(space.schedule.configs()), None)
            why = space.feasible(first) if first is not None else "the space is empty"
            raise TuneError(f"no config of {schedule.key()} is feasible at {ext}: {why}")
    feasible = len(ranking) if ranking else None
    roofline = min(p.roofline_seconds for p, _ in ranking) if ranking else None
    # the value an infeasible config scores: worse than any config the model can imagine
    penalty = 10 * (ranking[-1][0].seconds if ranking else 1.0)
    constrained = supports_set_constraint() and sampler in CONSTRAINED

    name = study_name or default_study_name(key, target)
    study = open_study(storage, name, study_key(key, space), url,
                       {"target": target.name, "schedule": key.schedule, "bucket": key.bucket, "dtype": dtype,
                        "measured": measured})
    existing = study.get_trials(deepcopy=False)
    pool = _Pool(lambda w: factory(schedule, ext, w), workers)
    # a resumed study continues with a fresh (still seeded) stream of proposals
    study.sampler = make_sampler(sampler, space, seed + len(existing), deterministic=not measured,
                                 population=max(8, min(50, (feasible or 64) // 4)))
    two_phase = any(m.two_phase for m in pool.all)
    study.pruner = ClearlyWorsePruner() if measured and two_phase else optuna.pruners.NopPruner()
    book = _Book()
    book.load(existing)
    if warm_start > 0 and sampler != "grid" and not existing:
        for _, cfg in ranking[:warm_start]:
            study.enqueue_trial(space.params_of(cfg), skip_if_exists=True)
    rng = random.Random(seed + len(existing))
    record_lock = threading.Lock()
    max_attempts = 50 * trials + 200

    def emit(last: TrialOutcome | None) -> None:
        if progress is not None:
            progress(TuneProgress(index, count, key.bucket, book.counted, trials,
                                  book.best[0] if book.best else math.inf, roofline, book.failures, book.pruned, last))

    def objective(trial: optuna.Trial) -> float:
        cfg = space.suggest(trial)
        k = cfg.key()
        trial.set_user_attr("config", k)
        why = space.feasible(cfg)
        if constrained:   # on every trial: GP needs as many constraint values on each
            trial.set_constraint("infeasible", 0.0 if why is None else 1.0)
        if why is not None:
            trial.set_user_attr("infeasible", why)
            return penalty
        prior = book.claim(k)
        if prior is not None:
            trial.set_user_attr("duplicate", True)
            kind, value = prior
            if kind == "complete":
                return value
            if kind == "pruned":
                trial.report(value, 0)
            if kind in ("pruned", "busy"):
                raise optuna.TrialPruned(f"{k}: {kind} already")
            raise MeasureError("failed", f"{k} failed before: {value}")
        trial.set_user_attr("worker", WORKER)
        m = pool.free.get()
        try:
            if m.two_phase:
                probe = m.probe(cfg)
                trial.report(probe, 0)
                if trial.should_prune():
                    book.done(k, "pruned", probe)
                    raise optuna.TrialPruned(f"{k}: probe {probe:.3g} s is clearly worse than the best")
            timing = m.measure(cfg)
        except MeasureError as e:
            book.done(k, "failed", str(e))
            trial.set_user_attr("error", str(e)[:2000])
            trial.set_user_attr("error_kind", e.kind)
            raise
        except BaseException:
            book.done(k, "failed", "interrupted")
            raise
        finally:
            pool.free.put(m)
        trial.set_user_attr("quantiles", timing.quantiles)
        if measured:   # every measured trial is kept, at its exact shape: the cost model is calibrated on them
            store_measurement(db, measurement_of(schedule, ext, params, dtype, key.target, versions, cfg, timing.median,
                                                 timing.quantiles, name))
        book.done(k, "complete", timing.median)
        return timing.median

    def after(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        k = t.user_attrs.get("config", "")
        with book.lock:
            book.attempts += 1
            last = None
            if "infeasible" in t.user_attrs:
                book.infeasible += 1
            elif t.user_attrs.get("duplicate"):
                book.duplicates += 1
                book.in_a_row += 1
            else:
                book.in_a_row = 0
                book.counted += 1
                if t.state is TrialState.COMPLETE:
                    last = TrialOutcome(t.number, k, t.value, "complete")
                elif t.state is TrialState.PRUNED:
                    book.pruned += 1
                    last = TrialOutcome(t.number, k, min(t.intermediate_values.values(), default=math.inf), "pruned")
                else:
                    book.failures += 1
                    last = TrialOutcome(t.number, k, math.inf, "failed", t.user_attrs.get("error", "interrupted"))
                book.history.append(last)
            improved = last is not None and last.state == "complete" and (book.best is None or last.seconds <
                                                                          book.best[0])
            if improved:
                book.best = (last.seconds, k, t.user_attrs.get("quantiles", {}))
            evaluated = sum(1 for v in book.seen.values() if v[0] != "busy")
            stop = (book.counted >= trials or book.attempts >= max_attempts
                    or (deadline is not None and time.monotonic() >= deadline)
                    or (feasible is not None and evaluated >= feasible))
            stuck = book.in_a_row >= MAX_DUPLICATES_IN_A_ROW
            if stuck:
                book.in_a_row = 0
            seen = set(book.seen) | book.busy
        if improved:
            with record_lock:
                _put(db, TuningRecord(key, k, last.seconds, dict(book.best[2]), name, time.time()), url)
        emit(last)
        if not stop and stuck:
            fresh = space.random_unseen(seen, rng)
            if fresh is None:
                stop = True
            else:
                study.enqueue_trial(space.params_of(fresh), skip_if_exists=True)
        if stop:
            study.stop()

    emit(None)
    try:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if left is None or left > 0:
            try:
                study.optimize(objective, n_trials=None, timeout=left, n_jobs=workers, catch=(MeasureError,),
                               callbacks=[after], gc_after_trial=False)
            except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
                raise TuneError(f"storage {masked(url)} failed during the study: "
                                f"{(str(e).splitlines() or [''])[0]}") from None
        winner, retimed = _winner(study, space, pool.all[0], measured, tie_band, retime_top)
    finally:
        pool.close()
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not t.user_attrs.get("duplicate") and "infeasible" not in t.user_attrs]
    stored = False
    cfg, seconds, quantiles = None, math.inf, {}
    if winner is not None:
        cfg, timing = winner
        seconds, quantiles = timing.median, dict(timing.quantiles)
        stored = _store_winner(db, TuningRecord(key, cfg.key(), seconds, quantiles, name, time.time()),
                               {t.user_attrs.get("config") for t in done}, url)
    return ShapeResult(ext, key, name, cfg, seconds, quantiles, model.predict(cfg) if cfg is not None else None,
                       roofline, book.counted, len(done), book.failures, book.pruned, book.infeasible,
                       book.duplicates, retimed, stored, list(book.history))


def pick(values: Mapping[str, float], tie_band: float = TIE_BAND) -> str:
    """The deterministic winner: among the configs within ``tie_band`` of the fastest, the smallest key."""
    best = min(values.values())
    return min(k for k, v in values.items() if v <= best * (1 + tie_band))


def _winner(study: optuna.Study, space: SearchSpace, measurer: Measurer, measured: bool, tie_band: float,
            retime_top: int) -> tuple[tuple[Config, Timing] | None, bool]:
    """The winner over every completed trial of the study (all runs, all workers)."""
    best: dict[str, tuple[float, dict]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        k = t.user_attrs.get("config")
        if k is None or t.value is None or not math.isfinite(t.value) or "infeasible" in t.user_attrs:
            continue
        if k not in best or t.value < best[k][0]:
            best[k] = (t.value, t.user_attrs.get("quantiles", {}))
    if not best:
        return None, False
    timings = {k: Timing(v, q) for k, (v, q) in best.items()}
    retimed = False
    if measured and retime_top > 1 and len(best) > 1:
        top = sorted(best, key=lambda k: (best[k][0], k))[:retime_top]
        try:
            again = measurer.retime([parse_config(k) for k in top])
            timings = {k: again[k] for k in top}
            retimed = True
        except MeasureError:
            pass   # keep the unpaired measurements
    k = pick({k: t.median for k, t in timings.items()}, tie_band)
    return (parse_config(k), timings[k]), retimed


def _put(db: TuningDatabase, record: TuningRecord, url: str) -> bool:
    try:
        return db.put(record)
    except SQLAlchemyError as e:
        raise TuneError(f"cannot write tuning records to {masked(url)}: {(str(e).splitlines() or [''])[0]}") \
            from None


def _store_winner(db: TuningDatabase, record: TuningRecord, evaluated: set, url: str) -> bool:
    """Store the study's winner. A faster record from elsewhere is kept (best-record upsert); one
    for a config this study measured too is replaced, since the winner was chosen over it (paired
    re-timing, tie band)."""
    _put(db, record, url)
    current = db.best(record.key)
    if current is None or current.config == record.config:
        return True
    if current.config not in evaluated:
        return False
    k = record.key
    cols = _records.c
    stmt = (sa.update(_records)
            .where(cols.schedule == k.schedule, cols.bucket == k.bucket, cols.dtype == k.dtype, cols.target == k.target,
                   cols.versions == k.versions, cols.measured == k.measured)
            .values(config=record.config, seconds=record.seconds,
                    quantiles=json.dumps(record.quantiles, sort_keys=True), source=record.source,
                    created=record.created))
    try:
        with db.engine.begin() as conn:
            conn.execute(stmt)
    except SQLAlchemyError as e:
        raise TuneError(f"cannot write tuning records to {masked(url)}: {(str(e).splitlines() or [''])[0]}") \
            from None
    return True
