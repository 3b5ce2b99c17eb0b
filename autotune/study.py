"""The Optuna side of tuning: storages, samplers, the pruner, study names.

One storage URL holds both the Optuna study and the tuning records (:mod:`kascade.autotune.db`):
``sqlite:///file.db`` (one process; WAL, so a commit costs no fsync), ``postgresql+psycopg://...``
(many processes on many machines), or ``journal:///path/study.log`` (Optuna's JournalStorage,
records in ``study.records.db`` beside it). Samplers are built with their arguments spelled out,
within Optuna 4.x / 5.x's public API.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import warnings
from dataclasses import asdict
from pathlib import Path

import optuna
import sqlalchemy as sa
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from kascade.autotune.db import TuningDatabase, TuningDatabaseError, TuningKey, is_sqlite, retry_table_race
from kascade.autotune.db import records_table as _records
from kascade.autotune.space import SearchSpace
from kascade.backends.targets import Target
from kascade.ir.errors import KascadeError

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "nsga2")


class TuneError(KascadeError):
    """A tuning request kascade cannot carry out; the message says what to change."""


class ClearlyWorsePruner(optuna.pruners.BasePruner):
    """Prunes a config whose short probe is more than ``ratio`` times the best completed trial,
    once ``warmup`` trials have completed. Configs near the best always get the full measurement."""

    def __init__(self, ratio: float = 1.5, warmup: int = 4):
        self.ratio, self.warmup = ratio, warmup

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        done = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value) and "infeasible" not in t.user_attrs]
        if len(done) < self.warmup:
            return False
        return trial.intermediate_values[step] > self.ratio * min(done)


# ---- storage ------------------------------------------------------------------------------
def masked(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL (journal:///...)
        return url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    """WAL with normal sync: a commit costs no fsync (the study writes a dozen per trial), a killed
    process loses nothing it committed."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
    finally:
        cur.close()


def journal_path(url: str) -> Path | None:
    """The file of a ``journal:///abs/path.log`` (or ``journal://rel/path.log``) URL; None for others."""
    if not url.startswith("journal:"):
        return None
    path = url.split("://", 1)[-1].lstrip("/")
    if not path:
        raise TuneError(f"a journal storage names a file: journal:///path/to/study.log, got {url!r}")
    return Path("/" + path if url.startswith("journal:///") else path).expanduser()


def records_url(url: str) -> str:
    """Where the tuning records of a storage URL live: the URL itself, or for a journal the SQLite
    file beside it (``study.log`` -> ``study.records.db``)."""
    path = journal_path(url)
    return url if path is None else f"sqlite:///{path.with_suffix('.records.db')}"


def open_storage(url: str, *, heartbeat: bool = False, workers: int = 1):
    """``(optuna storage, TuningDatabase)`` for one storage URL; :class:`TuneError` says why not."""
    path = journal_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        try:
            storage = JournalStorage(JournalFileBackend(str(path)))
        except Exception as e:  # noqa: BLE001 - optuna raises several kinds for an unusable file
            raise TuneError(f"cannot open journal storage {path}: {type(e).__name__}: {e}") from None
        return storage, TuningDatabase(records_url(url))
    try:
        db = TuningDatabase(url)
    except TuningDatabaseError as e:
        raise TuneError(f"{e}; or journal:///path/to/study.log (Optuna's JournalStorage)") from None
    kwargs = {"connect_args": {"timeout": 60}} if is_sqlite(url) else {"pool_pre_ping": True,
                                                                      "pool_size": max(5, workers + 2)}

    def rdb() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=60 if heartbeat else None,
                                              grace_period=300 if heartbeat else None)
    try:
        storage = retry_table_race(rdb)
        retry_table_race(lambda: _records.metadata.create_all(db.engine, tables=[_records]))
        if is_sqlite(url):
            sa.event.listen(storage.engine, "connect", _sqlite_pragmas)
            storage.engine.dispose()   # later connections get the pragmas
    except ImportError as e:
        raise TuneError(f"storage {masked(url)} needs a database driver that is not installed ({e}); for "
                        "PostgreSQL: pip install 'psycopg[binary]' and a postgresql+psycopg:// URL") from None
    except (SQLAlchemyError, RuntimeError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = " (a corrupt SQLite file: move it aside or pass another --storage)" \
            if is_sqlite(url) and "not a database" in str(e) else ""
        raise TuneError(f"cannot use storage {masked(url)}: {first}{hint}") from None
    return storage, db


def study_key(key: TuningKey, space: SearchSpace) -> str:
    return json.dumps({**asdict(key), "space": [[a.param, list(a.values)] for a in space.axes]}, sort_keys=True)


def default_study_name(key: TuningKey, target: Target) -> str:
    """Readable and unique enough; the study's ``kascade_key`` attribute holds the full key."""
    vhash = hashlib.sha256(key.versions.encode()).hexdigest()[:8]
    family, _, digest = key.schedule.partition(":")
    return (f"kascade:{family}:{digest[:12]}:{key.bucket}:{key.dtype}:{target.name}:"
            f"{'measured' if key.measured else 'predicted'}:v{vhash}")


_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")   # optuna >= 5; 4.x samplers take a function


def supports_set_constraint() -> bool:
    """Optuna 5 records constraints per trial (``Trial.set_constraint``); 4.x takes a ``constraints_func``."""
    return _SET_CONSTRAINT


def infeasibility(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's ``constraints_func``: positive for a config the schedule's constraints reject."""
    return [1.0 if "infeasible" in trial.user_attrs else 0.0]


CONSTRAINED = ("tpe", "gp", "nsga2")   # samplers that use constraint values


def make_sampler(name: str, space: SearchSpace, seed: int, *, deterministic: bool, population: int = 16):
    """The Optuna sampler for ``name`` with its arguments spelled out. Infeasible configs are
    completed trials with a penalty value that the constraint-aware samplers (TPE, GP, NSGA-II)
    also see as violating :func:`infeasibility`."""
    s = optuna.samplers

    def kw(cls) -> dict:   # optuna 4.x: a constraints function, where the sampler takes one
        takes = "constraints_func" in inspect.signature(cls).parameters
        return {"constraints_func": infeasibility} if takes and not _SET_CONSTRAINT else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return s.TPESampler(multivariate=True, group=True, seed=seed, n_startup_trials=10, constant_liar=True,
                                **kw(s.TPESampler))
        if name == "random":
            return s.RandomSampler(seed=seed)
        if name == "grid":
            return s.GridSampler(space.grid(), seed=seed)
        if name == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise TuneError("sampler 'cmaes' needs the cmaes package (pip install cmaes); or use --sampler tpe") \
                    from None
            return s.CmaEsSampler(seed=seed, n_startup_trials=5)
        if name == "gp":
            try:
                import scipy  # noqa: F401
            except ImportError:
                raise TuneError("sampler 'gp' needs scipy (pip install scipy); or use --sampler tpe") from None
            return s.GPSampler(seed=seed, n_startup_trials=10, deterministic_objective=deterministic,
                               **kw(s.GPSampler))
        if name == "nsga2":
            return s.NSGAIISampler(seed=seed, population_size=population, **kw(s.NSGAIISampler))
    raise TuneError(f"unknown sampler {name!r}; accepted: {', '.join(SAMPLERS)}")


def open_study(storage, name: str, study_key: str, url: str, attrs: dict | None = None) -> optuna.Study:
    """Create or load study ``name``; a study made for another tuning key is refused. A new study gets
    ``attrs`` as user attributes (``target``, ``schedule``, ``bucket``, ``dtype``, ``measured``: what
    reports filter on) and ``kascade_key``. Its trials carry ``config``; ``infeasible`` (penalty value,
    not a measurement), ``duplicate`` (answered from an earlier trial), ``error`` / ``error_kind``,
    ``quantiles`` and ``worker`` (host:pid) as user attributes."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
        have = study.user_attrs.get("kascade_key")
        if have is None:
            for k, v in (attrs or {}).items():
                study.set_user_attr(k, v)
            study.set_user_attr("kascade_key", study_key)
        elif have != study_key:
            raise TuneError(f"study {name!r} in {masked(url)} was made for {have}; this run tunes {study_key}: "
                            "choose another --study name")
        return study
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        raise TuneError(f"cannot use storage {masked(url)}: {(str(e).splitlines() or [''])[0]}") from None
