"""Exhaustive sweeps, recorded once on a GPU and replayed on the CPU.

A sweep is every feasible config of one shape timed on one GPU (``bench/tuner.py --sweep``
records it). Replaying it answers, without a GPU, how many trials each sampler needs before the
best config it has measured is within 3 % of the exhaustive best: the tuner runs as usual, but
its measurer looks the time up in the sweep (a config that failed in the sweep fails again).
The same file is calibration data: :func:`import_sweep` stores its times as measured samples.

The file (``{"kascade_sweep": 1, ...}``)::

    {"kascade_sweep": 1, "device": "NVIDIA H200", "versions": "kascade=... triton=...", "target": "h200",
     "date": "...", "synthetic": false,
     "sweeps": {"<shape>": {"BLOCK_M=64,BLOCK_N=64,num_stages=2,num_warps=4": 1.2e-4, "...": null}},
     "errors": {"<shape>": {"<config>": "why it failed"}},
     "shapes": {"<shape>": {"cascade": "<cascade text>", "extents": {...}, "params": {...}, "dtype": "bf16"}}}

A shape without a ``shapes`` entry is ``bench/tuner.py``'s key, ``[batch, heads, kv_heads, seq,
head_dim, causal]`` of the library's 2-pass bf16 attention. Without a GPU a *synthetic* sweep is
the cost model's predictions (``synthetic: true``): good for testing the replay, never for
judging samplers or calibrating the model against itself, and every output says which it is.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kascade.autotune.db import TuningDatabase
from kascade.autotune.lookup import software_versions, target_key
from kascade.autotune.measure import CallableMeasurer, MeasureError
from kascade.autotune.samples import measurement_of, store_measurements
from kascade.autotune.search import tune
from kascade.autotune.study import SAMPLERS
from kascade.backends.model import Efficiency, input_dtype, rank_configs
from kascade.backends.targets import get_target
from kascade.ir.errors import KascadeError
from kascade.passes.schedule import Schedule

SWEEP_SCHEMA = 1
WITHIN = 0.03
# what each sampler needs beyond Optuna (a sampler whose package is missing is skipped, with a note)
NEEDS = {"cmaes": "cmaes", "gp": "scipy"}


class SweepError(KascadeError):
    """A sweep file kascade cannot read, with what is accepted."""


@dataclass(frozen=True)
class Sweep:
    """Every config of one shape with its time (None: it failed)."""
    name: str
    schedule: Schedule
    extents: dict
    params: dict
    dtype: str
    target: str                      # target-table name, "h200"
    times: dict                      # config key -> seconds | None
    synthetic: bool
    provenance: dict = field(default_factory=dict)   # device, versions, date

    @property
    def best(self) -> float:
        ok = [s for s in self.times.values() if s is not None]
        if not ok:
            raise SweepError(f"every config of sweep {self.name} failed: nothing to replay")
        return min(ok)

    @property
    def kind(self) -> str:
        return "synthetic (cost-model predictions, not measurements)" if self.synthetic else \
            f"measured on {self.provenance.get('device', 'a GPU')} ({self.provenance.get('date', 'undated')})"


# ---- reading and writing -------------------------------------------------------------------------
def _bench_shape(key: str) -> tuple[Schedule, dict, str]:
    """``bench/tuner.py``'s shape key ``[B, H, Hkv, S, D, causal]``: the library's 2-pass bf16 attention."""
    from kascade.ir.library import attention
    from kascade.passes.schedule import attention_prefill_schedule
    try:
        B, H, Hkv, S, D, causal = json.loads(key)
        ext = dict(B=int(B), G=int(Hkv), R=int(H) // int(Hkv), P=int(S), M=int(S), E=int(D), F=int(D))
    except (ValueError, TypeError, ZeroDivisionError):
        raise SweepError(f"sweep shape {key!r} has no 'shapes' entry and is not bench/tuner.py's "
                         "[batch, heads, kv_heads, seq, head_dim, causal]") from None
    return attention_prefill_schedule(attention("2pass", causal=bool(causal))), ext, "bf16"


def _described_shape(key: str, d: Mapping) -> tuple[Schedule, dict, str]:
    from kascade.autotune.samples import rebuild_schedule
    from kascade.ir.parser import parse
    from kascade.passes.schedule import attention_prefill_schedule
    try:
        schedule = rebuild_schedule(d["schedule"], d["cascade"]) if d.get("schedule") else \
            attention_prefill_schedule(parse(d["cascade"]))
        return schedule, {k: int(v) for k, v in d["extents"].items()}, str(d.get("dtype") or
                                                                         input_dtype(schedule).value)
    except (KeyError, TypeError, ValueError, AttributeError, KascadeError) as e:
        raise SweepError(f"sweep shape {key!r}: its 'shapes' entry needs cascade text, extents and a dtype "
                         f"({type(e).__name__}: {e})") from None


def load_sweeps(source: Path | Mapping) -> list[Sweep]:
    """The sweeps of a file (or its parsed JSON); :class:`SweepError` says what is wrong."""
    if isinstance(source, Mapping):
        doc, where = source, "sweep document"
    else:
        where = str(source)
        try:
            doc = json.loads(Path(source).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SweepError(f"cannot read sweep {source}: {e}") from None
    if not isinstance(doc, Mapping) or doc.get("kascade_sweep") != SWEEP_SCHEMA or \
            not isinstance(doc.get("sweeps"), Mapping):
        raise SweepError(f"{where} is not a kascade sweep of schema {SWEEP_SCHEMA} (expected "
                         f"{{\"kascade_sweep\": {SWEEP_SCHEMA}, \"sweeps\": {{shape: {{config: seconds | null}}}}}})")
    target = str(doc.get("target", "h200"))
    get_target(target)   # an unknown target is the user's error, said by the target table
    provenance = {k: doc[k] for k in ("device", "versions", "date", "source") if k in doc}
    shapes = doc.get("shapes") or {}
    out = []
    for key, table in doc["sweeps"].items():
        if not isinstance(table, Mapping) or not all(v is None or (isinstance(v, (int, float)) and v > 0)
                                                     for v in table.values()):
            raise SweepError(f"{where}: sweep {key!r} must map config keys to positive seconds or null")
        desc = shapes.get(key)
        schedule, ext, dtype = _described_shape(key, desc) if desc is not None else _bench_shape(key)
        params = dict((desc or {}).get("params") or {})
        out.append(Sweep(key, schedule, ext, params, dtype, target, {k: (None if v is None else float(v))
                                                                     for k, v in table.items()},
                         bool(doc.get("synthetic", False)), provenance))
    return out


def sweep_doc(sweeps: Sequence[Sweep]) -> dict:
    """The JSON of :func:`load_sweeps` for ``sweeps`` (one target, one provenance)."""
    from kascade.ir.printer import format_cascade
    if not sweeps:
        raise SweepError("no sweeps to write")
    first = sweeps[0]
    return {"kascade_sweep": SWEEP_SCHEMA, **first.provenance, "target": first.target,
            "synthetic": any(s.synthetic for s in sweeps),
            "sweeps": {s.name: s.times for s in sweeps},
            "shapes": {s.name: {"cascade": format_cascade(s.schedule.cascade), "schedule": s.schedule.key(),
                                "extents": s.extents, "params": s.params, "dtype": s.dtype} for s in sweeps}}


def synthetic_sweep(schedule: Schedule, extents: Mapping[str, int], target: str = "h200", *,
                    params: Mapping[str, int | float] | None = None, name: str | None = None,
                    eff: Efficiency | None = None) -> Sweep:
    """Every feasible config of the shape with the cost model's prediction as its time: a stand-in
    for a GPU sweep (marked synthetic)."""
    itemsize = input_dtype(schedule).itemsize
    ranked = rank_configs(schedule, extents, get_target(target), itemsize, params, eff=eff or Efficiency())
    ext = {k: int(v) for k, v in extents.items()}
    return Sweep(name or ",".join(f"{k}={v}" for k, v in sorted(ext.items())), schedule, ext, dict(params or {}),
                 input_dtype(schedule).value, target, {c.key(): p.seconds for p, c in ranked}, True,
                 {"device": "none (cost model)", "versions": software_versions(),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})


def import_sweep(db: TuningDatabase, sweeps: Sequence[Sweep], source: str = "sweep") -> int:
    """Store the measured times of ``sweeps`` as calibration samples; returns how many. A synthetic
    sweep is refused: its times are the model's own predictions."""
    fake = [s.name for s in sweeps if s.synthetic]
    if fake:
        raise SweepError(f"sweeps {', '.join(fake)} are synthetic (cost-model predictions): calibrating the model "
                         "against itself is meaningless; record a sweep on the GPU (bench/tuner.py --sweep)")
    n = 0
    for s in sweeps:
        tkey = target_key(get_target(s.target))
        versions = str(s.provenance.get("versions") or "unknown")
        n += store_measurements(db, [measurement_of(s.schedule, s.extents, s.params, s.dtype, tkey, versions, cfg,
                                                    seconds, source=f"{source}:{s.name}")
                                     for cfg, seconds in s.times.items() if seconds is not None])
    return n


# ---- replay ----------------------------------------------------------------------------------------
def trials_to_within(history: Sequence, best: float, within: float = WITHIN) -> int | None:
    """1-based count of measured configs until the best so far is within ``within`` of ``best``."""
    so_far = math.inf
    for i, h in enumerate(history, 1):
        so_far = min(so_far, h.seconds)
        if so_far <= best * (1 + within):
            return i
    return None


@dataclass(frozen=True)
class SamplerScore:
    sweep: str
    sampler: str
    synthetic: bool
    configs: int                          # configs in the sweep (failures included)
    budget: int
    trials_to_within: tuple               # per seed; None: not within in the budget
    within: float

    @property
    def found(self) -> int:
        return sum(c is not None for c in self.trials_to_within)

    @property
    def median(self) -> float | None:
        """Median over seeds, a seed that never got within counting as worse than any that did;
        None when that median is such a seed."""
        xs = sorted(math.inf if c is None else c for c in self.trials_to_within)
        m = statistics.median(xs)
        return None if math.isinf(m) else float(m)

    def as_json(self) -> dict:
        return {"sweep": self.sweep, "sampler": self.sampler, "synthetic": self.synthetic, "configs": self.configs,
                "budget": self.budget, "within": self.within, "trials_to_within": list(self.trials_to_within),
                "median_trials_to_within": self.median, "found": f"{self.found}/{len(self.trials_to_within)}"}


def available_samplers(names: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """``(usable, notes)``: the samplers of ``names`` (default every one but the exhaustive grid)
    whose packages are installed, and a note for each one left out."""
    names = list(names) if names is not None else [s for s in SAMPLERS if s != "grid"]
    usable, notes = [], []
    for s in names:
        if s not in SAMPLERS:
            raise SweepError(f"unknown sampler {s!r}; accepted: {', '.join(SAMPLERS)}")
        need = NEEDS.get(s)
        if need is not None and importlib.util.find_spec(need) is None:
            notes.append(f"{s} skipped: it needs the {need} package")
            continue
        usable.append(s)
    return usable, notes


def replay(sweep: Sweep, samplers: Sequence[str], *, seeds: int = 5, budget: int = 60, within: float = WITHIN,
           warm_start: int = 0) -> list[SamplerScore]:
    """Each sampler tunes against ``sweep`` for ``budget`` trials under ``seeds`` seeds (a fresh
    study each, in a temporary SQLite file); the score is the trials it needed to get within
    ``within`` of the sweep's best. ``warm_start`` 0 (the default) compares the samplers alone,
    without the cost model's top configs enqueued first."""
    best = sweep.best

    def look_up(key: str) -> float:
        s = sweep.times.get(key)
        if s is None:
            raise MeasureError("error", f"{key} failed in the recorded sweep" if key in sweep.times else
                               f"{key} is not in the sweep")
        return s

    def factory(schedule, ext, worker):
        # measured=False: a replay stores predicted-kind records and no calibration samples
        return CallableMeasurer(look_up, measured=False)

    scores = []
    for sampler in samplers:
        counts = []
        for seed in range(seeds):
            with tempfile.TemporaryDirectory() as tmp:
                r = tune(sweep.schedule, [sweep.extents], sweep.target, backend=factory, trials=budget,
                         sampler=sampler, seed=seed, warm_start=warm_start, storage_url=f"sqlite:///{tmp}/replay.db",
                         params=sweep.params or None, retime_top=1).best
            counts.append(trials_to_within(r.history, best, within))
        scores.append(SamplerScore(sweep.name, sampler, sweep.synthetic, len(sweep.times), budget, tuple(counts),
                                   within))
    return scores
