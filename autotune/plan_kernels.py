"""Kernel tuning and plan search, closing the loop: a plan's sharded kernels, and a plan's time from tuned ones.

Two directions:

* :func:`plan_kernel_shapes` lists the kernels a plan's serving iterations run, at the shapes one
  GPU sees after sharding (KV heads over ``tp``, experts over ``ep``, the batch split over the
  ``ep`` attention groups and the ``pp`` micro-batches), for the three tunable families
  (causal prefill attention, paged decode, the grouped SwiGLU MoE). It does not re-derive the
  sharding: it runs a few representative iterations through the plan's
  :class:`~kascade.backends.iteration.IterationModel` with a hook that records every kernel shape
  it asks about, so the tuned shapes are exactly the ones the simulator later asks for.
  ``kascade tune --from-plan plan.json`` tunes them.
* :func:`tuned_kernel_seconds` is the ``kernel_seconds`` hook of the iteration model, answered
  from MEASURED tuning records (predicted dry-run records are never used): the exact shape
  bucket, else the nearest bucket that agrees on what the kernel is specialised to
  (:func:`kascade.autotune.lookup.nearest_records`, the runtime lookup's rule). ``kascade plan``
  searches with it, and ``kascade plan --evaluate plan.json`` re-evaluates a written plan
  (:func:`reevaluate`) with the cost model alone and with the tuned kernels.

How a record's time transfers to another shape. A record keeps its bucket, not the exact shape
it was timed at; it is taken to have been timed at the bucket's canonical shape (every
power-of-two-rounded extent at its bucket's upper edge, which is where :func:`plan_kernel_shapes`
puts the shapes it asks to tune). The time at a shape is then ``measured x model(shape) /
model(canonical shape)``, both predictions with the record's own config: the measurement sets
the level (what the roofline misses: instruction overheads, real bandwidth), the cost model the
trend within and between buckets (prefill grows with ``P * M``, decode with ``B * L``, MoE with
tokens). A record tuned by hand at a shape inside its bucket is scaled as if it had been timed at
the upper edge, which overstates a kernel by at most the model's ratio across one bucket.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from kascade.autotune.db import TuningDatabase, TuningRecord
from kascade.autotune.lookup import (
    SHIPPED,
    _parse_bucket,
    nearest_records,
    shape_bucket,
    shipped_records,
    software_versions,
    target_key,
)
from kascade.autotune.plan import Evaluator, Outcome, Plan, PlanError
from kascade.autotune.study import journal_path, records_url
from kascade.backends.cluster import Cluster, Link, make_cluster
from kascade.backends.iteration import IterationModel
from kascade.backends.model import decode_extents, predict, schedule_cost, schedule_sizes
from kascade.backends.targets import Target, get_target
from kascade.backends.workload import SLO, Request
from kascade.ir.dtypes import DType
from kascade.ir.library.models import ModelSpec
from kascade.passes.schedule import Config, Schedule

KINDS = ("attention_prefill", "paged_decode", "moe")   # the iteration model's tunable kernel kinds
DTYPES = ("bf16", "f16", "f32")

# lengths when neither the plan file nor the caller says what the workload looks like
DEFAULT_PROMPT = (1024, 4096)   # p50, p90
DEFAULT_OUTPUT = 256            # p50


@dataclass(frozen=True)
class KernelShape:
    """One kernel of a plan to tune: its family (an iteration-model kind), the schedule
    ``kascade tune`` tunes, the extents (by the schedule's symbols) and a short label."""
    family: str
    schedule: Schedule = field(repr=False, compare=False)
    extents: Mapping[str, int]
    label: str

    @property
    def bucket(self) -> str:
        return shape_bucket(self.schedule, self.extents)


@cache
def kernel_schedules(dtype: str = "bf16") -> dict[str, Schedule]:
    """The schedules of the iteration model's tunable kinds, built as ``kascade tune attention
    --causal`` / ``decode`` / ``moe`` build them (same structural keys, so records are shared)."""
    from kascade.ir.library import attention, paged_decode
    from kascade.passes.schedule import attention_prefill_schedule
    from kascade.passes.schedule_decode import paged_decode_schedule
    from kascade.passes.schedule_moe import swiglu_moe_schedule
    if dtype not in DTYPES:
        raise PlanError(f"unknown kernel dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    dt = DType(dtype)
    return {"attention_prefill": attention_prefill_schedule(attention("2pass", causal=True, dtype=dt)),
            "paged_decode": paged_decode_schedule(paged_decode(dtype=dt)),
            "moe": swiglu_moe_schedule(dt)}


# ---- plan files -----------------------------------------------------------------------------------
def plan_context(doc: Mapping) -> tuple[Plan, ModelSpec, Cluster, SLO]:
    """The best plan of a plan document (:func:`kascade.autotune.plan.plan_document`) and what it
    was searched for."""
    try:
        plan = Plan(**doc["best"]["plan"])
        model = ModelSpec(**doc["model"])
        c = doc["cluster"]
        cluster = make_cluster(c["target"], int(c["gpus_per_node"]), int(c["nodes"]),
                               intra=Link(**c["intra"]), inter=Link(**c["inter"]))
        slo = SLO(**doc["slo"])
    except (KeyError, TypeError) as e:
        raise PlanError(f"the plan file lacks or garbles {e}: write it again with `kascade plan`") from None
    return plan, model, cluster, slo


def workload_lengths(requests: Sequence[Request]) -> dict[str, int]:
    """Prompt and output length percentiles of a workload (what :func:`plan_kernel_shapes` needs
    of it; ``kascade plan`` stores them in the plan file's ``workload``)."""
    if not requests:
        return {}

    def pct(xs: list[int], q: float) -> int:
        xs = sorted(xs)
        return int(xs[min(len(xs) - 1, int(q * len(xs)))])
    prompts = [r.prompt_tokens for r in requests]
    outputs = [r.output_tokens for r in requests]
    return {"prompt_p50": pct(prompts, 0.5), "prompt_p90": pct(prompts, 0.9), "output_p50": pct(outputs, 0.5)}


# ---- the shapes a plan runs -----------------------------------------------------------------------
def plan_kernel_shapes(doc_or_plan: Mapping | Plan, model: ModelSpec | None = None, *,
                       cluster: Cluster | None = None, requests: Sequence[Request] | None = None,
                       dtype: str = "bf16") -> list[KernelShape]:
    """The tunable kernels ``doc_or_plan`` runs on one GPU, one per tuning bucket, prefill first.

    ``doc_or_plan``: a plan document (its best plan, model, cluster and workload lengths are
    used) or a :class:`Plan` with its ``model``. Representative iterations (``requests`` or the
    document's workload percentiles give the lengths, else 1024 / 4096-token prompts and 256
    output tokens):

    * prefill alone, one prompt at the median and one at the 90th percentile (``chunked`` and
      ``nanoflow`` cut them to the token budget: prefill attention at ``P = M`` = the chunk);
    * decode alone, at ``max_batch`` sequences and at an eighth of it (a lightly loaded engine),
      each at the typical context ``median prompt + median output / 2``;
    * (chunked, nanoflow) a full iteration: the decodes of ``max_batch`` plus a chunk filling
      the budget, the tokens the MoE layer sees in a busy iteration.

    Shapes are moved to their bucket's canonical point (see the module docstring)."""
    if isinstance(doc_or_plan, Plan):
        if model is None:
            raise PlanError("plan_kernel_shapes(plan, model): a Plan needs its ModelSpec")
        plan, lengths = doc_or_plan, {}
        cluster = cluster or make_cluster("h200", 8, max(1, math.ceil(plan.gpus / 8)))
    elif isinstance(doc_or_plan, Mapping):
        plan, doc_model, doc_cluster, _ = plan_context(doc_or_plan)
        model, cluster = model or doc_model, cluster or doc_cluster
        lengths = dict(doc_or_plan.get("workload") or {})
    else:
        raise PlanError(f"plan_kernel_shapes takes a plan document or a Plan, got {type(doc_or_plan).__name__}")
    if requests:
        lengths = workload_lengths(requests)
    p50 = max(1, int(lengths.get("prompt_p50") or DEFAULT_PROMPT[0]))
    p90 = max(p50, int(lengths.get("prompt_p90") or DEFAULT_PROMPT[1]))
    out50 = max(1, int(lengths.get("output_p50") or DEFAULT_OUTPUT))
    context = p50 + out50 // 2

    seen: list[tuple[str, dict[str, int]]] = []

    def record(kind: str, shape: Mapping[str, int]) -> None:
        if kind in KINDS:
            seen.append((kind, dict(shape)))
        return None
    m = IterationModel(model, cluster, plan.parallelism(), db=record, block_size=plan.block_size)
    why = plan.why_not(model, cluster) or m.infeasible()
    if why is not None:
        raise PlanError(f"plan {plan.label()} cannot run {model.name}: {why}")
    chunked = plan.policy in ("chunked", "nanoflow")
    budget = plan.token_budget
    for p in (p50, p90):
        m.iteration([(min(p, budget) if chunked else p, 0)], [])
    for b in (plan.max_batch, max(1, plan.max_batch // 8)):
        m.iteration([], [context] * b)
    if chunked and budget > plan.max_batch:
        m.iteration([(budget - plan.max_batch, 0)], [context] * plan.max_batch)

    schedules = kernel_schedules(dtype)
    shapes: dict[str, KernelShape] = {}
    for kind, shape in sorted(seen, key=lambda ks: KINDS.index(ks[0])):
        sched = schedules[kind]
        ext = schedule_extents(kind, sched, shape)
        ext = at_bucket(kind, sched, ext, shape_bucket(sched, ext))
        ks = KernelShape(kind, sched, ext, _label(kind, ext))
        shapes.setdefault(f"{kind}|{ks.bucket}", ks)
    return list(shapes.values())


def _label(kind: str, x: Mapping[str, int]) -> str:
    if kind == "attention_prefill":
        return f"prefill P={x['P']} M={x['M']} B={x['B']} G={x['G']} R={x['R']} E={x['E']}"
    if kind == "paged_decode":
        return f"decode B={x['B']} L={x['L']} G={x['G']} R={x['R']} E={x['E']} page={x['M0']}"
    return f"moe T={x['T']} K={x['K']} E={x['E']} D={x['D']} F={x['F']}"


def schedule_extents(kind: str, schedule: Schedule, shape: Mapping[str, int]) -> dict[str, int]:
    """The iteration model's shape dict of ``kind`` (keys in ``backends/iteration.KernelSeconds``)
    as extents of ``schedule``: prefill by the kernel's roles (queries ``P``, keys ``M``, head
    dims ``E``/``F``, grid ranks ``B, G, R``), decode as :func:`decode_extents`, MoE as is."""
    if kind == "attention_prefill":
        c, body = schedule.cascade, schedule.kernels[0].body
        ext = {c.rank_extent(body.query): shape["P"], c.rank_extent(body.key): shape["M"],
               c.rank_extent(body.head): shape["E"], c.rank_extent(body.vhead): shape["F"]}
        ext.update(zip((c.rank_extent(r) for r in body.grid_ranks), (shape["B"], shape["G"], shape["R"])))
        return {k: int(v) for k, v in ext.items()}
    if kind == "paged_decode":
        return decode_extents(shape)
    if kind == "moe":
        return {k: int(shape[k]) for k in ("T", "K", "E", "D", "F")}
    raise PlanError(f"no tunable kernel kind {kind!r}; kinds: {', '.join(KINDS)}")


def _split(n: int, inner: int) -> tuple[int, int]:
    """``(outer, inner')`` with ``outer * inner' == n`` where the factors allow, ``inner`` kept if it
    divides ``n`` (a batch times heads product moved to another power of two)."""
    outer = max(1, n // inner)
    return outer, max(1, n // outer)


def at_bucket(kind: str, schedule: Schedule, ext: Mapping[str, int], bucket: str) -> dict[str, int]:
    """``ext`` moved to the canonical point of ``bucket``: every power-of-two-rounded entry at the
    bucket's value, the rest kept (a batch x heads product split batch first)."""
    b, x = _parse_bucket(bucket), dict(ext)
    if kind == "attention_prefill":
        c, body = schedule.cascade, schedule.kernels[0].body
        x[c.rank_extent(body.query)], x[c.rank_extent(body.key)] = b["P"], b["M"]
        B, G, R = (c.rank_extent(r) for r in body.grid_ranks)
        x[B], gr = _split(b["heads"], x[G] * x[R])
        if gr != x[G] * x[R]:
            x[G] = max(1, gr // x[R])
    elif kind == "paged_decode":
        x["L"] = b["L"]
        x["B"], x["G"] = _split(b["seqs"], x["G"])
        x["KV"] = x["B"] * x["L"]
    else:
        x["T"] = b["T"]
    return x


# ---- the hook -------------------------------------------------------------------------------------
def records_database(url: str | None) -> TuningDatabase:
    """The tuning records of a storage URL (a journal storage keeps them in the SQLite file beside it)."""
    return TuningDatabase(records_url(url) if url and journal_path(url) is not None else url)


class TunedKernelSeconds:
    """The iteration model's ``kernel_seconds(kind, shape)`` from measured tuning records (see
    :func:`tuned_kernel_seconds`). ``hits`` counts the shapes answered per kind; ``fingerprint``
    is a digest of the records it answers from ("" when it has none: then it is the cost model)."""

    def __init__(self, db: TuningDatabase, target: Target, dtype: str = "bf16", shipped: Path | None = SHIPPED):
        self.target, self.dtype = target, dtype
        self.schedules = kernel_schedules(dtype)
        self.itemsize = DType(dtype).itemsize
        versions, tkey = software_versions(), target_key(target)
        self.records: dict[str, list[TuningRecord]] = {}
        shipped_recs = shipped_records(shipped)
        for kind, sched in self.schedules.items():
            recs = list(db.records(schedule=sched.key(), dtype=dtype, target=tkey, versions=versions, measured=True))
            recs += [r for r, _ in shipped_recs if (r.key.schedule, r.key.dtype, r.key.target, r.key.versions,
                                                    r.key.measured) == (sched.key(), dtype, tkey, versions, True)]
            self.records[kind] = recs
        ids = sorted(f"{r.key.schedule}|{r.key.bucket}|{r.config}|{r.seconds!r}" for rs in self.records.values()
                     for r in rs)
        self.fingerprint = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:10] if ids else ""
        self.hits: Counter[str] = Counter()
        self._memo: dict[tuple, float | None] = {}

    def __len__(self) -> int:
        return sum(len(rs) for rs in self.records.values())

    def __call__(self, kind: str, shape: Mapping[str, int]) -> float | None:
        recs = self.records.get(kind)
        if not recs:
            return None
        key = (kind, tuple(sorted(shape.items())))
        if key not in self._memo:
            self._memo[key] = self._seconds(kind, shape, recs)
            if self._memo[key] is not None:
                self.hits[kind] += 1
        return self._memo[key]

    def _seconds(self, kind: str, shape: Mapping[str, int], recs: list[TuningRecord]) -> float | None:
        sched = self.schedules[kind]
        ext = schedule_extents(kind, sched, shape)
        sizes = schedule_sizes(sched, ext, self.itemsize)
        for rec in nearest_records(shape_bucket(sched, ext), recs):
            cfg = Config.of({k: int(v) for k, v in (item.split("=") for item in rec.config.split(","))})
            if sched.feasible(cfg, sizes) is not None:
                continue   # as the runtime lookup: a config the schedule no longer accepts here is a miss
            here = self._predict(sched, cfg, ext)
            there = self._predict(sched, cfg, at_bucket(kind, sched, ext, rec.key.bucket))
            scale = here / there if math.isfinite(here) and math.isfinite(there) and there > 0 else 1.0
            return rec.seconds * scale
        return None

    def _predict(self, sched: Schedule, cfg: Config, ext: Mapping[str, int]) -> float:
        dtype = {"f32": "tf32"}.get(self.dtype, self.dtype)
        return predict(schedule_cost(sched, cfg, ext, self.target, self.itemsize), self.target, dtype).seconds


def tuned_kernel_seconds(db: TuningDatabase | str | None, target: Target | str, dtype: str = "bf16", *,
                         shipped: Path | None = SHIPPED) -> TunedKernelSeconds:
    """The ``db`` hook of :class:`~kascade.backends.iteration.IterationModel`: for the kinds
    ``attention_prefill``, ``paged_decode`` and ``moe``, the time of the kernel at the hook's
    sharded shape from the MEASURED records of ``target`` (and this software) in ``db`` (a
    :class:`TuningDatabase` or a storage URL; None: the default one) and those shipped with the
    package: the exact bucket, else the nearest one of the same specialisation, scaled from the
    bucket's canonical shape by the cost model (module docstring). None for other kinds, for
    shapes no record transfers to, and for every shape when there are no measured records: the
    iteration model's cost model then decides. Records are read once, when the hook is made."""
    if not isinstance(db, TuningDatabase):
        db = records_database(db)
    return TunedKernelSeconds(db, target if isinstance(target, Target) else get_target(target), dtype, shipped)


# ---- re-evaluation --------------------------------------------------------------------------------
@dataclass
class Reevaluation:
    """One plan of a plan file simulated twice on the same workload: with the cost model alone
    (``before``) and with the tuned kernels (``after``)."""
    plan: Plan
    before: Outcome
    after: Outcome


def reevaluate(doc: Mapping, requests: Sequence[Request], kernel_seconds: TunedKernelSeconds | None, *,
               top: int = 5) -> list[Reevaluation]:
    """The best plan and the next of the plan file's top plans (``top`` in all), re-simulated on
    ``requests`` before and after tuning; ``after`` is ranked best first by goodput per GPU."""
    _, model, cluster, slo = plan_context(doc)
    plans: list[Plan] = []
    for entry in [doc["best"], *doc.get("top", [])]:
        p = Plan(**entry["plan"])
        if p not in plans:
            plans.append(p)
    before = Evaluator(model, cluster, requests, slo)
    after = Evaluator(model, cluster, requests, slo, kernel_seconds=kernel_seconds)
    out = [Reevaluation(p, before.evaluate(p), after.evaluate(p)) for p in plans[:max(1, top)]]
    return sorted(out, key=lambda r: (-r.after.goodput_per_gpu, r.plan.gpus))
