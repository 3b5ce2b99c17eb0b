"""Execution-plan search for serving: how to lay a model over a cluster and batch its requests.

A :class:`Plan` fixes tensor / pipeline / expert / data-parallel degrees, the batching policy
(prefill-first, chunked, disaggregated with a prefill:decode replica split, NanoFlow with a
nano-batch count), the chunked-prefill token budget, the largest batch and the KV block size.
:func:`evaluate` simulates a workload under a plan (:mod:`kascade.backends.simulator`);
:func:`search_plans` searches the space with Optuna: NSGA-II on two objectives (goodput per
GPU, maximised; GPUs used, minimised) by default, or one objective (goodput per GPU) with TPE.
Infeasible plans (weights do not fit, degrees do not divide heads or experts, more GPUs than the
cluster has, a disaggregation without a decode replica) are completed trials with the penalty
values and an ``infeasible`` user attribute holding the reason, and violate the sampler's
constraint, as kernel tuning does (:mod:`kascade.autotune.study`). The study lives in the same
storage URL as kernel tuning (SQLite in the cache dir by default; PostgreSQL lets many workers
share one study). :func:`capacity` bisects the request rate for the highest one a plan serves
within the SLOs. :func:`write_plan` writes the versioned plan JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from kascade.autotune.db import default_url
from kascade.autotune.study import TuneError, make_sampler, masked, open_storage, supports_set_constraint
from kascade.backends.cluster import Cluster
from kascade.backends.iteration import IterationModel, KernelSeconds, Parallelism
from kascade.backends.simulator import POLICIES, CostTable, Policy, SimResult, simulate
from kascade.backends.workload import SLO, Request
from kascade.ir.errors import KascadeError
from kascade.ir.library.models import ModelSpec

PLAN_VERSION = 1
PLAN_SAMPLERS = ("nsga2", "tpe", "random")

# the plan space (static choices, so that NSGA-II sees one search space on every trial)
TP = (1, 2, 4, 8)
PP = (1, 2, 4)
EP = (1, 2, 4, 8)
DP = (1, 2, 3, 4, 6, 8)
BUDGET = (512, 1024, 2048, 4096, 8192)
MAX_BATCH = (32, 64, 128, 256, 512)
PD_RATIO = ("1:3", "1:2", "1:1", "2:1", "3:1")
NANO = (2, 3, 4)
BLOCK = (8, 16, 32)


class PlanError(KascadeError):
    """A plan search or plan file kascade cannot use; the message says what is accepted."""


@dataclass(frozen=True)
class Plan:
    """One execution plan. ``prefill_replicas``: disaggregated only (of ``dp`` replicas);
    ``nano_batches``: nanoflow only (1 otherwise)."""
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    policy: str = "chunked"
    token_budget: int = 2048
    max_batch: int = 256
    prefill_replicas: int = 0
    nano_batches: int = 1
    block_size: int = 16
    router: str = "least_loaded"

    @property
    def replica_gpus(self) -> int:
        return self.parallelism().replica_gpus

    @property
    def gpus(self) -> int:
        return self.parallelism().gpus

    def parallelism(self) -> Parallelism:
        return Parallelism(self.tp, self.pp, self.ep, self.dp)

    def policy_spec(self) -> Policy:
        return Policy(self.policy, max_batch=self.max_batch, token_budget=self.token_budget,
                      prefill_replicas=max(1, self.prefill_replicas), nano_batches=self.nano_batches,
                      router=self.router)

    def label(self) -> str:
        par = f"TP{self.tp} PP{self.pp}" + (f" EP{self.ep}" if self.ep > 1 else "") + f" x{self.dp}"
        pol = {"disaggregated": f"disagg {self.prefill_replicas}P:{self.dp - self.prefill_replicas}D",
               "nanoflow": f"nanoflow n={self.nano_batches}"}.get(self.policy, self.policy)
        return f"{par}, {pol}, budget {self.token_budget}, batch {self.max_batch}, block {self.block_size}"

    def why_not(self, model: ModelSpec, cluster: Cluster) -> str | None:
        """The plan-level reasons it cannot run (the iteration model adds memory and divisibility)."""
        if self.gpus > cluster.gpus:
            return (f"needs {self.gpus} GPUs (tp {self.tp} x pp {self.pp} x ep {self.ep} x dp {self.dp}); the "
                    f"cluster has {cluster.gpus}")
        if self.ep > 1 and not model.is_moe:
            return f"ep={self.ep} needs a mixture-of-experts model; {model.name} is dense"
        if self.policy == "disaggregated" and not 1 <= self.prefill_replicas < self.dp:
            return f"disaggregation needs at least one prefill and one decode replica; dp={self.dp}"
        return None


@dataclass
class Outcome:
    """A plan's result on the search workload (``infeasible`` set: not simulated)."""
    plan: Plan
    infeasible: str | None = None
    goodput: float = 0.0              # requests/s meeting both SLOs
    goodput_per_gpu: float = 0.0
    attainment: float = 0.0
    throughput: float = 0.0
    ttft_p99: float = math.nan
    tpot_p99: float = math.nan
    mfu: float = 0.0
    mbu: float = 0.0
    preemptions: int = 0
    dropped: int = 0
    capacity: float | None = None     # requests/s within the SLOs (capacity search; best plans only)
    trial: int | None = None
    result: SimResult | None = field(default=None, repr=False)

    def as_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("result", "plan")}
        d = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
        return {"plan": asdict(self.plan), "label": self.plan.label(), "gpus": self.plan.gpus, **d}


class Evaluator:
    """Simulates plans of one model on one cluster for one workload and SLO, sharing iteration
    models and their cost tables between plans of the same parallelism and block size.
    ``kernel_seconds``: the iteration models' kernel-time hook (``autotune/plan_kernels``'s
    tuned kernels); None: the cost model alone."""

    def __init__(self, model: ModelSpec, cluster: Cluster, requests: Sequence[Request], slo: SLO, *,
                 kernel_seconds: KernelSeconds | None = None):
        if not requests:
            raise PlanError("the workload has no requests")
        self.model, self.cluster, self.requests, self.slo = model, cluster, list(requests), slo
        self.kernel_seconds = kernel_seconds
        self._models: dict[tuple, tuple[IterationModel, CostTable]] = {}

    def iteration_model(self, plan: Plan) -> tuple[IterationModel, CostTable]:
        key = (plan.tp, plan.pp, plan.ep, plan.block_size)
        if key not in self._models:
            m = IterationModel(self.model, self.cluster, Parallelism(plan.tp, plan.pp, plan.ep, 1),
                               block_size=plan.block_size, db=self.kernel_seconds)
            self._models[key] = (m, CostTable(m))
        return self._models[key]

    def infeasible(self, plan: Plan) -> str | None:
        why = plan.why_not(self.model, self.cluster)
        if why is None:
            m, _ = self.iteration_model(plan)
            why = m.infeasible()
        return why

    def simulate(self, plan: Plan, requests: Sequence[Request] | None = None) -> SimResult:
        m, costs = self.iteration_model(plan)
        return simulate(requests or self.requests, m, plan.policy_spec(), replicas=plan.dp,
                        gpus_per_replica=plan.replica_gpus, block_size=plan.block_size, target=self.cluster.target,
                        slo=self.slo, costs=costs)

    def evaluate(self, plan: Plan, keep: bool = False) -> Outcome:
        why = self.infeasible(plan)
        if why is not None:
            return Outcome(plan, infeasible=why)
        r = self.simulate(plan)
        return Outcome(plan, None, r.goodput(), r.goodput_per_gpu(), r.attainment(), r.throughput,
                       r.percentile("ttft", 99), r.percentile("tpot", 99), r.mfu, r.mbu, r.preemptions,
                       len(r.dropped), result=r if keep else None)

    # ---- capacity ------------------------------------------------------------------------------
    def capacity(self, plan: Plan, *, steps: int = 7, limit: int = 1000) -> float:
        """The highest request rate (requests/s) at which ``plan`` meets the SLO (at least
        ``slo.percentile`` of the requests within both targets): the workload's arrival times are
        scaled (its first ``limit`` requests), doubled or halved until the answer changes, then
        bisected ``steps`` times. 0 when even a 64th of the workload's rate fails."""
        why = self.infeasible(plan)
        if why is not None:
            raise PlanError(f"plan {plan.label()} cannot run: {why}")
        reqs = sorted(self.requests, key=lambda r: r.arrival)[:limit]
        t0 = reqs[0].arrival
        span = reqs[-1].arrival - t0
        base = len(reqs) / span if span > 0 else 1.0
        if span <= 0:   # a burst at one instant: spread it at one request per second first
            reqs = [replace(r, arrival=float(i)) for i, r in enumerate(reqs)]
            t0 = 0.0

        def ok(factor: float) -> bool:
            scaled = [replace(r, arrival=(r.arrival - t0) / factor) for r in reqs]
            return self.simulate(plan, scaled).meets()
        lo, hi = 0.0, 1.0
        if ok(1.0):
            lo, hi = 1.0, 2.0
            while ok(hi) and hi < 1024:
                lo, hi = hi, hi * 2
        else:
            while not ok(hi / 2) and hi > 1 / 64:
                hi /= 2
            lo = hi / 2 if hi > 1 / 64 else 0.0
            if lo == 0.0:
                return 0.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo * base


# ---- the Optuna search ---------------------------------------------------------------------------
def suggest(trial: optuna.Trial, model: ModelSpec) -> Plan:
    """A plan from a trial's parameters (every parameter is suggested on every trial; ones a
    policy does not use are normalised away, so equal plans share one evaluation)."""
    tp = trial.suggest_categorical("tp", TP)
    pp = trial.suggest_categorical("pp", PP)
    ep = trial.suggest_categorical("ep", EP) if model.is_moe else 1
    dp = trial.suggest_categorical("dp", DP)
    policy = trial.suggest_categorical("policy", POLICIES)
    budget = trial.suggest_categorical("token_budget", BUDGET)
    batch = trial.suggest_categorical("max_batch", MAX_BATCH)
    ratio = trial.suggest_categorical("pd_ratio", PD_RATIO)
    nano = trial.suggest_categorical("nano_batches", NANO)
    block = trial.suggest_categorical("block_size", BLOCK)
    p, d = (int(x) for x in ratio.split(":"))
    prefill = min(dp - 1, max(1, round(dp * p / (p + d)))) if policy == "disaggregated" else 0
    return Plan(tp, pp, ep, dp, policy, budget, batch, prefill, nano if policy == "nanoflow" else 1, block)


def params_of(plan: Plan, model: ModelSpec) -> dict:
    """Trial parameters that give ``plan`` (for enqueued starting points)."""
    d = {"tp": plan.tp, "pp": plan.pp, "dp": plan.dp, "policy": plan.policy, "token_budget": plan.token_budget,
         "max_batch": plan.max_batch, "pd_ratio": "1:1", "nano_batches": max(2, plan.nano_batches),
         "block_size": plan.block_size}
    if model.is_moe:
        d["ep"] = plan.ep
    return d


def starting_plans(model: ModelSpec, cluster: Cluster) -> list[Plan]:
    """What a person would try first: each tensor-parallel degree that fits a node, every GPU
    used by replicas, chunked prefill with vLLM's defaults; and the same with disaggregation."""
    out = []
    for tp in TP:
        if tp <= cluster.gpus_per_node and cluster.gpus % tp == 0:
            dp = max([d for d in DP if d * tp <= cluster.gpus], default=1)
            out.append(Plan(tp=tp, dp=dp))
            if dp >= 2:
                out.append(Plan(tp=tp, dp=dp, policy="disaggregated", prefill_replicas=dp // 2))
    return out


@dataclass
class SearchResult:
    """Every evaluated plan of the study (this run and earlier ones), best first."""
    outcomes: list[Outcome]           # feasible, by goodput per GPU (then fewer GPUs)
    infeasible: list[Outcome]         # with their reasons
    pareto: list[Outcome]             # goodput per GPU against GPUs, non-dominated
    study: str
    storage: str
    sampler: str
    trials: int                       # trials run in this call
    elapsed: float

    @property
    def best(self) -> Outcome | None:
        return self.outcomes[0] if self.outcomes else None


def pareto_front(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Plans no other plan beats on both goodput per GPU (higher) and GPUs (fewer)."""
    front = []
    for o in outcomes:
        if not any((q.goodput_per_gpu >= o.goodput_per_gpu and q.plan.gpus <= o.plan.gpus)
                   and (q.goodput_per_gpu > o.goodput_per_gpu or q.plan.gpus < o.plan.gpus) for q in outcomes):
            front.append(o)
    return sorted(front, key=lambda o: (o.plan.gpus, -o.goodput_per_gpu))


def study_name_for(model: ModelSpec, cluster: Cluster, requests: Sequence[Request], slo: SLO, sampler: str) -> str:
    digest = hashlib.sha256(json.dumps([[r.arrival, r.prompt_tokens, r.output_tokens] for r in requests])
                            .encode()).hexdigest()[:10]
    return (f"kascade-plan:{model.name}:{cluster.target.name}x{cluster.gpus}:{digest}:"
            f"ttft{slo.ttft:g}:tpot{slo.tpot:g}:p{slo.percentile:g}:{sampler}:v{PLAN_VERSION}")


def search_plans(model: ModelSpec, cluster: Cluster, requests: Sequence[Request], slo: SLO, *, trials: int = 60,
                 storage_url: str | None = None, study_name: str | None = None, sampler: str = "nsga2",
                 seed: int = 0, timeout: float | None = None, capacity_top: int = 3,
                 progress: Callable[[int, int, Outcome | None], None] | None = None,
                 kernel_seconds: KernelSeconds | None = None) -> SearchResult:
    """Search plans for serving ``requests`` of ``model`` on ``cluster`` within ``slo``.

    ``trials``: plans this call evaluates (a resumed study keeps its earlier trials).
    ``sampler``: ``nsga2`` (two objectives: goodput per GPU up, GPUs down), ``tpe`` (goodput per
    GPU alone) or ``random``. The ``capacity_top`` best plans get a capacity search.
    ``progress(done, trials, outcome)`` after every trial. ``kernel_seconds``: kernel times from
    tuning records (:func:`kascade.autotune.plan_kernels.tuned_kernel_seconds`); a derived study
    name then carries its ``fingerprint``, so plans timed with other kernels are not mixed in."""
    start = time.monotonic()
    if sampler not in PLAN_SAMPLERS:
        raise PlanError(f"unknown plan sampler {sampler!r}; accepted: {', '.join(PLAN_SAMPLERS)}")
    if trials < 1:
        raise PlanError(f"trials must be at least 1, got {trials}")
    ev = Evaluator(model, cluster, requests, slo, kernel_seconds=kernel_seconds)
    url = storage_url or default_url()
    storage, _ = open_storage(url)
    name = study_name or study_name_for(model, cluster, requests, slo, sampler)
    tuned = "" if kernel_seconds is None else getattr(kernel_seconds, "fingerprint", "hook")
    if study_name is None and tuned:
        name += f":tuned-{tuned}"
    multi = sampler == "nsga2"
    directions = ["maximize", "minimize"] if multi else ["maximize"]
    opt = make_sampler(sampler, None, seed, deterministic=True, population=max(4, min(16, trials // 3)))
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=opt,
                                        load_if_exists=True)
        if [d.name.lower() for d in study.directions] != directions:
            raise PlanError(f"study {name!r} in {masked(url)} has other objectives; choose another study name")
        if not study.trials:
            study.set_user_attr("kind", "plan")
            study.set_user_attr("model", model.name)
            study.set_user_attr("target", cluster.target.name)
            for p in starting_plans(model, cluster)[:max(1, trials // 4)]:
                study.enqueue_trial(params_of(p, model), skip_if_exists=True)
        seen: dict[Plan, Outcome] = {}
        constrained = supports_set_constraint()
        done = 0

        def objective(trial: optuna.Trial):
            nonlocal done
            plan = suggest(trial, model)
            o = seen.get(plan)
            if o is None:
                o = seen[plan] = ev.evaluate(plan)
            o = replace(o, trial=trial.number)
            trial.set_user_attr("plan", asdict(plan))
            if constrained:
                trial.set_constraint("infeasible", 0.0 if o.infeasible is None else 1.0)
            if o.infeasible is not None:
                trial.set_user_attr("infeasible", o.infeasible)
            else:
                trial.set_user_attr("metrics", {k: v for k, v in o.as_json().items()
                                                if k not in ("plan", "label", "capacity", "trial", "infeasible")})
            done += 1
            if progress:
                progress(done, trials, o)
            return (o.goodput_per_gpu, float(plan.gpus)) if multi else o.goodput_per_gpu
        study.optimize(objective, n_trials=trials, timeout=timeout, gc_after_trial=False)
        all_trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        raise TuneError(f"storage {masked(url)} failed during the plan search: "
                        f"{(str(e).splitlines() or [''])[0]}") from None
    finally:
        optuna.logging.set_verbosity(level)
    feasible: dict[Plan, Outcome] = {}
    infeasible: dict[Plan, Outcome] = {}
    for t in all_trials:
        if "plan" not in t.user_attrs:
            continue
        plan = Plan(**t.user_attrs["plan"])
        if "infeasible" in t.user_attrs:
            infeasible.setdefault(plan, Outcome(plan, t.user_attrs["infeasible"], trial=t.number))
        elif plan not in feasible:
            m = t.user_attrs.get("metrics", {})
            feasible[plan] = Outcome(plan, None, trial=t.number, **{
                k: (math.nan if v is None else v) for k, v in m.items() if k in Outcome.__dataclass_fields__
                and k not in ("plan", "result")})
    # plans that meet the SLO at its percentile come first: a plan that serves more requests in
    # time per GPU but misses the p99 target is not a candidate a user would deploy
    ranked = sorted(feasible.values(), key=lambda o: (o.attainment < slo.percentile, -o.goodput_per_gpu, o.plan.gpus,
                                                      -o.throughput / o.plan.gpus, o.plan.label()))
    for o in ranked[:capacity_top]:
        o.capacity = ev.capacity(o.plan)
        o.result = ev.simulate(o.plan)
    meeting = [o for o in ranked if o.attainment >= slo.percentile]
    front = pareto_front(meeting or ranked)
    for o in front:
        if o.result is None:
            o.result = ev.simulate(o.plan)
    return SearchResult(ranked, sorted(infeasible.values(), key=lambda o: o.trial or 0), front,
                        name, masked(url), sampler, done, time.monotonic() - start)


# ---- plan files ------------------------------------------------------------------------------------
def plan_document(result: SearchResult, model: ModelSpec, cluster: Cluster, slo: SLO,
                  workload: dict, top: int = 10) -> dict:
    """The versioned plan JSON: the best plan, the Pareto front, the top plans, the infeasible
    ones with reasons, and what it was searched for."""
    if result.best is None:
        raise PlanError("no feasible plan: nothing to write")
    return {
        "kascade_plan": PLAN_VERSION,
        "model": asdict(model),
        "cluster": {"target": cluster.target.name, "gpus_per_node": cluster.gpus_per_node, "nodes": cluster.nodes,
                    "intra": asdict(cluster.intra), "inter": asdict(cluster.inter)},
        "slo": asdict(slo),
        "workload": workload,
        "best": result.best.as_json(),
        "pareto": [o.as_json() for o in result.pareto],
        "top": [o.as_json() for o in result.outcomes[:top]],
        "infeasible": [{"plan": asdict(o.plan), "reason": o.infeasible} for o in result.infeasible],
        "search": {"study": result.study, "storage": result.storage, "sampler": result.sampler,
                   "trials": result.trials, "elapsed_s": result.elapsed},
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_plan(doc: dict, path: Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    except OSError as e:
        raise PlanError(f"cannot write the plan to {path}: {e.strerror or e}") from None
    return path


def read_plan(path: Path) -> dict:
    """A plan JSON written by :func:`write_plan`; :class:`PlanError` for another file or version."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read plan {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("kascade_plan") != PLAN_VERSION:
        raise PlanError(f"{path} is not a kascade plan of version {PLAN_VERSION} (written by `kascade plan`)")
    return doc
