"""Measured samples: every config a tuning run timed on a GPU, kept for the cost model's calibration.

The tuning records (:mod:`kascade.autotune.db`) keep one winner per key and a shape *bucket*;
recomputing a config's :class:`~kascade.backends.model.Cost` needs more: the exact extents and
params that were timed, and the schedule itself. A :class:`Measurement` carries them, one row
per measured trial, in the table ``kascade_measurements`` of the same database. The schedule
travels as the cascade's text (the printer's form) and is rebuilt from it: the schedule key is
a structural hash, so a rebuilt schedule whose key matches is the schedule that was timed.

Only measurements are stored here (``measured=True`` rows); the column exists so that a row
written by anything else is never mistaken for one. Writing a sample never fails a tuning run:
a storage that refuses it is reported once and the run goes on (the winner's record is what
the run must keep).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from kascade.autotune.db import TuningDatabase, retry_table_race
from kascade.autotune.study import masked
from kascade.ir.errors import KascadeError
from kascade.passes.schedule import Config, Schedule

_metadata = sa.MetaData()
measurements_table = sa.Table(
    "kascade_measurements", _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("schedule", sa.String(128), nullable=False),     # Schedule.key()
    sa.Column("cascade", sa.Text, nullable=False),             # the cascade's text: the schedule is rebuilt from it
    sa.Column("extents", sa.Text, nullable=False),             # JSON {symbol: int}: the exact shape timed
    sa.Column("params", sa.Text, nullable=False, default="{}"),  # JSON {name: number}: window widths ...
    sa.Column("dtype", sa.String(16), nullable=False),
    sa.Column("target", sa.String(64), nullable=False),        # "h200 (sm_90a)", as in the tuning records
    sa.Column("versions", sa.String(256), nullable=False),
    sa.Column("measured", sa.Boolean, nullable=False),
    sa.Column("config", sa.String(512), nullable=False),       # Config.key()
    sa.Column("seconds", sa.Float, nullable=False),            # median of the repetitions
    sa.Column("quantiles", sa.Text, nullable=False, default="{}"),
    sa.Column("source", sa.String(256), nullable=False, default=""),   # study name, "sweep:<file>", ...
    sa.Column("created", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class Measurement:
    """One config timed at one exact shape on one target."""
    schedule: str
    cascade: str
    extents: dict
    params: dict
    dtype: str
    target: str
    versions: str
    config: str
    seconds: float
    quantiles: dict = field(default_factory=dict, compare=False, hash=False)
    source: str = ""
    measured: bool = True
    created: float = 0.0

    @property
    def shape(self) -> str:
        """What tells one timed shape from another (configs of one shape are ranked against each other)."""
        return json.dumps([self.schedule, self.extents, self.params, self.dtype], sort_keys=True)


def measurement_of(schedule: Schedule, extents: Mapping[str, int], params: Mapping[str, int | float] | None,
                   dtype: str, target: str, versions: str, config: Config | str, seconds: float,
                   quantiles: Mapping | None = None, source: str = "", measured: bool = True) -> Measurement:
    """A :class:`Measurement` of ``config`` of ``schedule`` (``target``: the records' target key)."""
    return Measurement(schedule.key(), _cascade_text(schedule), {k: int(v) for k, v in extents.items()},
                       dict(params or {}), dtype, target, versions,
                       config if isinstance(config, str) else config.key(), float(seconds), dict(quantiles or {}),
                       source, measured)


@lru_cache(maxsize=64)
def _cascade_text(schedule: Schedule) -> str:
    from kascade.ir.printer import format_cascade
    return format_cascade(schedule.cascade)


_warned: set[str] = set()


def _init(db: TuningDatabase) -> None:
    # checked on every call (one cheap query): a sample costs a GPU measurement, and a database
    # file replaced under a running process gets its table back
    retry_table_race(lambda: _metadata.create_all(db.engine))


def _warn_once(db: TuningDatabase, what: str, e: Exception) -> None:
    if db.url not in _warned:
        _warned.add(db.url)
        print(f"kascade: {what} {masked(db.url)}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}",
              file=sys.stderr)


def store_measurement(db: TuningDatabase, m: Measurement) -> bool:
    """Append ``m``; False (reported once per database) when the storage refuses it."""
    return store_measurements(db, [m]) == 1


def store_measurements(db: TuningDatabase, ms: Sequence[Measurement]) -> int:
    """Append ``ms`` in one transaction; how many were stored (rows without a positive finite time
    are left out; none when the storage refuses them, reported once per database)."""
    now = time.time()
    rows = [dict(schedule=m.schedule, cascade=m.cascade, extents=json.dumps(m.extents, sort_keys=True),
                 params=json.dumps(m.params, sort_keys=True), dtype=m.dtype, target=m.target, versions=m.versions,
                 measured=m.measured, config=m.config, seconds=m.seconds,
                 quantiles=json.dumps(m.quantiles, sort_keys=True), source=m.source, created=m.created or now)
            for m in ms if math.isfinite(m.seconds) and m.seconds > 0]
    if not rows:
        return 0
    try:
        _init(db)
        with db.engine.begin() as conn:
            conn.execute(sa.insert(measurements_table), rows)
        return len(rows)
    except SQLAlchemyError as e:
        _warn_once(db, "cannot store measured samples (calibration data) in", e)
        return 0


def load_measurements(db: TuningDatabase, *, target: str | None = None,
                      measured: bool = True) -> tuple[list[Measurement], int]:
    """``(measurements, unreadable rows)`` of ``target`` (a records target key, or all), measured
    ones by default. Rows that do not parse are counted, not raised; an unreadable database
    yields none (reported once)."""
    try:
        _init(db)
        q = sa.select(measurements_table).where(measurements_table.c.measured == measured) \
            .order_by(measurements_table.c.id)
        if target is not None:
            q = q.where(measurements_table.c.target == target)
        with db.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
    except SQLAlchemyError as e:
        _warn_once(db, "cannot read measured samples from", e)
        return [], 0
    out, bad = [], 0
    for r in rows:
        try:
            extents, params = json.loads(r["extents"]), json.loads(r["params"] or "{}")
            if not isinstance(extents, dict) or not isinstance(params, dict):
                raise ValueError("extents and params must be JSON objects")
            seconds = float(r["seconds"])
            if not (math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"seconds {seconds!r} is not a positive number")
            out.append(Measurement(r["schedule"], r["cascade"], {k: int(v) for k, v in extents.items()}, params,
                                   r["dtype"], r["target"], r["versions"], r["config"], seconds,
                                   json.loads(r["quantiles"] or "{}"), r["source"], bool(r["measured"]),
                                   float(r["created"])))
        except (TypeError, ValueError):   # json.JSONDecodeError is a ValueError
            bad += 1
    return out, bad


@lru_cache(maxsize=256)
def rebuild_schedule(key: str, cascade_text: str) -> Schedule:
    """The schedule of ``key`` rebuilt from its cascade's text; :class:`KascadeError` says why not
    (text that does not parse, no schedule of this family, or a key that no longer matches: the
    passes changed since the sample was timed)."""
    from kascade.ir.parser import parse
    from kascade.passes.schedule import attention_prefill_schedule, attention_varlen_schedule
    from kascade.passes.schedule_decode import paged_decode_schedule
    family = key.split(":", 1)[0]
    builders = {"attention_prefill": attention_prefill_schedule, "attention_prefill_varlen": attention_varlen_schedule,
                "paged_decode_partial": paged_decode_schedule}
    cascade = parse(cascade_text)
    build = builders.get(family.split("+", 1)[0])
    if build is None:
        raise KascadeError(f"no schedule builder for kernel family {family!r}; known: {', '.join(builders)}")
    schedule = build(cascade)
    if schedule.key() != key:
        raise KascadeError(f"the cascade now schedules as {schedule.key()}, not {key}: the passes changed since "
                           "it was timed")
    return schedule
