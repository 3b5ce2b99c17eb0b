"""The tuning database: the best config found for each (schedule, shape bucket, dtype, target,
software versions), stored through SQLAlchemy so that one code path serves SQLite (the default,
a file under the user's cache directory) and PostgreSQL (many workers on many machines).

A record stores decisions (the config), never generated code: the code is replayed from
them. Any change in the key (a different schedule hash, bucket, dtype, GPU, or kascade /
triton / torch / CUDA version) is a miss, never a wrong config. Records that came from the
cost model (a dry run) are marked ``measured=False`` and never mixed up with measured ones.

Robustness: each record is committed on its own, so a run killed half-way leaves every
finished record usable; an unreadable or corrupt database is reported once and treated as
empty (a miss), so the caller falls back to the cost model.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from kascade.ir.errors import KascadeError
from kascade.ir.settings import settings

SCHEMA_VERSION = 1

_metadata = sa.MetaData()
records_table = sa.Table(
    "kascade_tuning_records", _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("schedule", sa.String(128), nullable=False),     # Schedule.key(): families + cascade hash
    sa.Column("bucket", sa.String(256), nullable=False),       # shape bucket, e.g. "E=128,F=128,M=4096,P=4096"
    sa.Column("dtype", sa.String(16), nullable=False),
    sa.Column("target", sa.String(64), nullable=False),        # "h200 (sm_90a)"
    sa.Column("versions", sa.String(256), nullable=False),     # "kascade=0.1.0 triton=3.6.0 torch=... cuda=..."
    sa.Column("measured", sa.Boolean, nullable=False),
    sa.Column("config", sa.String(512), nullable=False),       # Config.key()
    sa.Column("seconds", sa.Float, nullable=False),            # median time (measured) or prediction
    sa.Column("quantiles", sa.Text, nullable=False, default="{}"),   # JSON: {"0.2": s, "0.5": s, "0.8": s}
    sa.Column("source", sa.String(256), nullable=False, default=""),  # study name, "import:<file>", ...
    sa.Column("created", sa.Float, nullable=False),
    sa.UniqueConstraint("schedule", "bucket", "dtype", "target", "versions", "measured", name="uq_tuning_key"),
)


def retry_table_race(fn, attempts: int = 6):
    """``fn()``, retried when it lost a race with another process creating the same tables:
    PostgreSQL checks for a table and creates it in two steps, so two workers starting
    together can both decide to create it."""
    for i in range(attempts):
        try:
            return fn()
        except (sa.exc.ProgrammingError, sa.exc.IntegrityError) as e:
            if i == attempts - 1 or not any(w in str(e) for w in ("already exists", "duplicate key")):
                raise
            time.sleep(0.2 * (i + 1))


class TuningDatabaseError(KascadeError):
    """A storage URL or file that kascade cannot use, with what is accepted."""


@dataclass(frozen=True)
class TuningKey:
    schedule: str
    bucket: str
    dtype: str
    target: str
    versions: str
    measured: bool = True


@dataclass(frozen=True)
class TuningRecord:
    key: TuningKey
    config: str
    seconds: float
    quantiles: dict = field(default_factory=dict, compare=False, hash=False)
    source: str = ""
    created: float = 0.0

    def as_json(self) -> dict:
        return {**asdict(self.key), "config": self.config, "seconds": self.seconds,
                "quantiles": self.quantiles, "source": self.source, "created": self.created}

    @classmethod
    def from_json(cls, d: Mapping) -> TuningRecord:
        key = TuningKey(*(d[k] for k in ("schedule", "bucket", "dtype", "target", "versions")),
                        measured=bool(d["measured"]))
        seconds = float(d["seconds"])
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"seconds must be a positive number, got {d['seconds']!r}")
        return cls(key, str(d["config"]), seconds, dict(d.get("quantiles") or {}), str(d.get("source", "")),
                   float(d.get("created", 0.0)))


def default_url() -> str:
    """``sqlite:///<cache dir>/tuning.db`` (``KASCADE_CACHE_DIR`` or ``~/.cache/kascade``)."""
    root = Path(settings().cache_dir or Path.home() / ".cache" / "kascade").expanduser()
    return f"sqlite:///{root / 'tuning.db'}"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


class TuningDatabase:
    """Records in one SQL database. ``url``: ``sqlite:///path`` (default: the cache dir) or
    ``postgresql://user:pass@host/db`` (``postgresql+psycopg://...`` likewise)."""

    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        if not (is_sqlite(self.url) or self.url.startswith("postgresql")):
            raise TuningDatabaseError(f"unsupported storage {self.url!r}; accepted: sqlite:///path/to/file.db or "
                                      "postgresql://user:password@host:port/database")
        if is_sqlite(self.url):
            path = self.url.split(":///", 1)[-1]
            if path and path != ":memory:":
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = sa.create_engine(self.url, future=True, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise TuningDatabaseError(f"cannot open tuning database {self.url!r}: {e}") from None
        self._ready = False
        self._warned = False

    def _init(self) -> None:
        if not self._ready:
            retry_table_race(lambda: _metadata.create_all(self.engine))
            self._ready = True

    def _report(self, e: Exception) -> None:
        if not self._warned:
            print(f"kascade: tuning database {self.url} is unreadable ({type(e).__name__}: "
                  f"{str(e).splitlines()[0]}); treating it as empty", file=sys.stderr)
            self._warned = True

    # ---- writing -----------------------------------------------------------------------
    def put(self, record: TuningRecord) -> bool:
        """Store ``record`` unless an equal-key record is at least as fast; True if stored.
        One transaction per record, so a killed run loses at most the record in flight."""
        self._init()
        k = record.key
        row = dict(asdict(k), config=record.config, seconds=record.seconds,
                   quantiles=json.dumps(record.quantiles, sort_keys=True), source=record.source,
                   created=record.created or time.time())
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(records_table).values(**row)
        stmt = stmt.on_conflict_do_update(
            index_elements=["schedule", "bucket", "dtype", "target", "versions", "measured"],
            set_={c: stmt.excluded[c] for c in ("config", "seconds", "quantiles", "source", "created")},
            where=records_table.c.seconds > stmt.excluded.seconds)
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount > 0

    # ---- reading -----------------------------------------------------------------------
    def records(self, **where: str | bool) -> Iterator[TuningRecord]:
        """Every record (optionally filtered by key fields); a corrupt database yields none."""
        try:
            self._init()
            q = sa.select(records_table).order_by(records_table.c.id)
            for name, value in where.items():
                q = q.where(records_table.c[name] == value)
            with self.engine.connect() as conn:
                rows = conn.execute(q).mappings().all()
        except SQLAlchemyError as e:
            self._report(e)
            return
        for r in rows:
            yield TuningRecord(TuningKey(r["schedule"], r["bucket"], r["dtype"], r["target"], r["versions"],
                                         bool(r["measured"])), r["config"], r["seconds"],
                               json.loads(r["quantiles"] or "{}"), r["source"], r["created"])

    def best(self, key: TuningKey) -> TuningRecord | None:
        """The record for exactly ``key`` (measured, or predicted if ``key.measured`` is False)."""
        found = list(self.records(**asdict(key)))
        return min(found, key=lambda r: r.seconds) if found else None

    # ---- moving records --------------------------------------------------------------------
    def export_json(self, path: Path, **where: str | bool) -> int:
        """Write records as versioned JSON (to ship tuned configs for a GPU); returns the count."""
        recs = [r.as_json() for r in self.records(**where)]
        Path(path).write_text(json.dumps({"kascade_tuning_records": SCHEMA_VERSION, "records": recs}, indent=1))
        return len(recs)

    def import_json(self, path: Path) -> int:
        """Read records written by :meth:`export_json`; returns how many were stored (better than
        what was there). A file that is not such JSON raises :class:`TuningDatabaseError`."""
        added = 0
        for rec in read_json(path):
            added += self.put(TuningRecord(rec.key, rec.config, rec.seconds, rec.quantiles,
                                           rec.source or f"import:{Path(path).name}", rec.created))
        return added


def read_json(path: Path) -> list[TuningRecord]:
    """Records from an exported JSON file; :class:`TuningDatabaseError` says what is wrong."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TuningDatabaseError(f"cannot read tuning records from {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("kascade_tuning_records") != SCHEMA_VERSION:
        raise TuningDatabaseError(f"{path} is not a kascade tuning-records file of schema version "
                                  f"{SCHEMA_VERSION} (expected {{\"kascade_tuning_records\": {SCHEMA_VERSION}, "
                                  "\"records\": [...]}})")
    out = []
    for i, d in enumerate(doc.get("records", [])):
        try:
            out.append(TuningRecord.from_json(d))
        except (KeyError, TypeError, ValueError) as e:
            raise TuningDatabaseError(f"{path}: record {i} is malformed ({type(e).__name__}: {e})") from None
    return out
