"""A discrete-event simulator of iteration-level (continuous) batching on a modelled cluster.

Each *engine* serves requests in iterations; the time of one iteration is
:meth:`IterationModel.iteration` of the batch it runs (prefill chunks as ``(new tokens,
tokens already cached)``, decodes as context lengths). Between iterations the scheduler of
the engine picks the next batch by its :class:`Policy`:

* ``prefill_first`` (vLLM's original default): when requests wait and fit, run an iteration of
  whole prompts only (up to ``token_budget`` tokens, at least one prompt); otherwise one decode
  step of every running request. Running decodes stall while prompts are prefilled.
* ``chunked`` (Sarathi-Serve, vLLM V1): every iteration carries one token of every running
  decode, and prefill chunks fill the rest of ``token_budget``: decodes never stall.
* ``disaggregated`` (DistServe, Splitwise): the first ``prefill_replicas`` replicas only prefill,
  the others only decode; a finished prefill's KV cache moves to a decode replica in
  :meth:`IterationModel.kv_transfer_seconds`. The first token comes from the prefill replica.
* ``nanoflow`` (NanoFlow): chunked batching, but the iteration's compute-, memory- and
  network-bound work overlap across ``nano_batches`` nano-batches (:func:`overlapped_seconds`).

KV cache: an engine (one replica) has ``kv_capacity_tokens // block_size`` blocks (pipeline
stages are inside the replica's iteration time: its micro-batches); a request holds ``ceil(tokens /
block_size)`` blocks. When a decode step needs a block and none is free, the most recently
admitted request is preempted (recompute: its blocks are freed and it re-enters the front of
the queue, to prefill its prompt plus the tokens it already produced). A request whose KV can
never fit is dropped with the reason.

Speed: decodes are not advanced one by one. An engine keeps a decode step counter ``S``; a
running request stores ``off = cached tokens - S`` at admission, so its context is ``off + S``,
the sum of contexts is ``sum(off) + n S``, the blocks a step needs are the requests with
``(off + S) % block_size == 0`` (a count per residue class) and its finish is a heap entry at
a known step. Iteration costs are memoised on a rounded batch descriptor (:class:`CostTable`:
lengths to 1/16 of an octave, the decode batch as ``n`` requests at the mean context).
Everything is deterministic: ties break by request id and engine index.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kascade.backends.iteration import RESOURCE, IterationCost, IterationModel
from kascade.ir.errors import KascadeError

if TYPE_CHECKING:
    from kascade.backends.targets import Target
    from kascade.backends.workload import SLO, Request

POLICIES = ("prefill_first", "chunked", "disaggregated", "nanoflow")
ROUTERS = ("round_robin", "least_loaded")


class SimulationError(KascadeError):
    """A simulation that cannot run as asked; the message says what is accepted."""


@dataclass(frozen=True)
class Policy:
    """How engines batch. ``token_budget``: tokens per iteration (chunked, nanoflow), or the
    most prompt tokens one prefill iteration batches (prefill_first, disaggregated prefill).
    ``max_batch``: requests an engine holds at once (running plus partly prefilled)."""
    name: str = "chunked"
    max_batch: int = 256
    token_budget: int = 2048
    prefill_replicas: int = 1          # disaggregated: replicas that prefill; the rest decode
    nano_batches: int = 2              # nanoflow
    overlap_overhead: float = 0.05     # nanoflow: lost efficiency per extra nano-batch
    router: str = "least_loaded"

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise SimulationError(f"unknown policy {self.name!r}; accepted: {', '.join(POLICIES)}")
        if self.router not in ROUTERS:
            raise SimulationError(f"unknown router {self.router!r}; accepted: {', '.join(ROUTERS)}")
        if self.max_batch < 1 or self.token_budget < 1 or self.nano_batches < 1 or self.prefill_replicas < 1:
            raise SimulationError(f"max_batch, token_budget, nano_batches and prefill_replicas must be >= 1, got "
                                  f"{self.max_batch}, {self.token_budget}, {self.nano_batches}, "
                                  f"{self.prefill_replicas}")
        if not 0 <= self.overlap_overhead < 1:
            raise SimulationError(f"overlap_overhead is a fraction in [0, 1), got {self.overlap_overhead}")


# ---- iteration costs ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1 << 16)
def rounded(x: int) -> int:
    """``x`` to 1/16 of an octave (within 2.2 %); exact up to 64, where rounding would show."""
    if x <= 64:
        return x
    return int(round(2.0 ** (round(math.log2(x) * 16) / 16)))


class CostTable:
    """Memoised :meth:`IterationModel.iteration` on rounded batch descriptors. Share one table
    between simulations of the same model (a plan search reuses it across trials)."""

    def __init__(self, model: IterationModel):
        self.model = model
        self.memo: dict[tuple, IterationCost] = {}
        self.calls = 0

    def key(self, chunks: Sequence[tuple[int, int]], n_decode: int, ctx_sum: int) -> tuple:
        ctx = rounded(max(1, round(ctx_sum / n_decode))) if n_decode else 0
        if not chunks:
            return (), rounded(n_decode), ctx
        return tuple(sorted((rounded(n), rounded(c)) for n, c in chunks)), rounded(n_decode), ctx

    def cost(self, key: tuple) -> IterationCost:
        got = self.memo.get(key)
        if got is None:
            pre, n, ctx = key
            self.calls += 1
            got = self.memo[key] = self.model.iteration(list(pre), [ctx] * n)
        return got


def overlapped_seconds(cost: IterationCost, nano_batches: int, overhead: float, peak_flops: float,
                       peak_bandwidth: float) -> float:
    """NanoFlow's iteration time: the compute-, memory- and network-bound kernel classes of the
    breakdown (:data:`~kascade.backends.iteration.RESOURCE`) overlap across ``nano_batches``
    nano-batches instead of running one after another: ``max(parts) + (sum(parts) - max(parts)) / n``
    (the pipeline's fill and drain), never below the replica's roofline (``flops / peak_flops``,
    ``hbm_bytes / peak_bandwidth``: a small decode batch's GEMMs are memory-bound and gain little),
    times ``1 + overhead (n - 1)`` for the smaller, less efficient kernels. Pipeline bubbles stay
    serial. ``n = 1`` is the serial sum."""
    n = nano_batches
    if n == 1:
        return cost.seconds
    parts: dict[str, float] = {}
    for name, s in cost.breakdown:
        r = RESOURCE.get(name, "compute")
        parts[r] = parts.get(r, 0.0) + s
    idle = parts.pop("idle", 0.0)
    total = sum(parts.values())
    top = max(parts.values(), default=0.0)
    floor = max(cost.flops / peak_flops if peak_flops > 0 else 0.0,
                cost.hbm_bytes / peak_bandwidth if peak_bandwidth > 0 else 0.0)
    overlapped = min(total, max(top + (total - top) / n, floor))
    return (overlapped + idle) * (1 + overhead * (n - 1))


# ---- results -------------------------------------------------------------------------------------
@dataclass
class SimResult:
    """Per request (in the order of ``requests``; NaN for a dropped one): ``arrival``, ``ttft``,
    ``tpot`` (mean time per output token after the first; 0 for one-token outputs), ``e2e``.
    ``itl``: inter-token gaps as (seconds, how many tokens saw it). ``flops`` / ``hbm_bytes`` /
    ``breakdown``: summed over every iteration run (breakdown as serial seconds per kernel class
    and collective). ``busy_seconds``: engine-seconds spent in iterations."""
    policy: Policy
    replicas: int
    gpus: int
    arrival: np.ndarray
    ttft: np.ndarray
    tpot: np.ndarray
    e2e: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    dropped: list[tuple[int, str]]
    preemptions: int
    iterations: int
    makespan: float
    busy_seconds: float
    flops: float
    hbm_bytes: float
    breakdown: dict[str, float]
    kv_capacity_tokens: int
    peak_kv_tokens: int
    itl: tuple[np.ndarray, np.ndarray]
    peak_flops: float = math.nan       # of all GPUs
    peak_bandwidth: float = math.nan
    slo: SLO | None = None
    cost_calls: int = 0
    role_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        return int(np.isfinite(self.e2e).sum())

    @property
    def throughput(self) -> float:
        """Completed requests per second."""
        return self.completed / self.makespan if self.makespan > 0 else 0.0

    @property
    def token_throughput(self) -> float:
        """Generated tokens per second."""
        done = np.isfinite(self.e2e)
        return float(self.output[done].sum()) / self.makespan if self.makespan > 0 else 0.0

    def met(self, slo: SLO | None = None) -> np.ndarray:
        """Which requests met both SLOs (a dropped one did not)."""
        slo = slo or self.slo
        if slo is None:
            raise SimulationError("goodput needs an SLO: simulate(..., slo=SLO(ttft, tpot))")
        with np.errstate(invalid="ignore"):
            return (self.ttft <= slo.ttft) & (self.tpot <= slo.tpot)

    def attainment(self, slo: SLO | None = None) -> float:
        """Fraction of all requests that met both SLOs."""
        return float(self.met(slo).mean()) if len(self.e2e) else 0.0

    def goodput(self, slo: SLO | None = None) -> float:
        """Requests per second that met both SLOs."""
        return float(self.met(slo).sum()) / self.makespan if self.makespan > 0 else 0.0

    def goodput_per_gpu(self, slo: SLO | None = None) -> float:
        return self.goodput(slo) / self.gpus

    def meets(self, slo: SLO | None = None) -> bool:
        """At least ``slo.percentile`` of the requests met both SLOs."""
        slo = slo or self.slo
        return self.attainment(slo) >= (slo.percentile if slo else 1.0)

    @property
    def mfu(self) -> float:
        """Model FLOP utilisation: the FLOPs iterations did over peak FLOP/s x makespan (all GPUs)."""
        return self.flops / (self.peak_flops * self.makespan) if self.makespan > 0 else 0.0

    @property
    def mbu(self) -> float:
        """HBM bandwidth utilisation, likewise."""
        return self.hbm_bytes / (self.peak_bandwidth * self.makespan) if self.makespan > 0 else 0.0

    @property
    def peak_kv_fraction(self) -> float:
        return self.peak_kv_tokens / self.kv_capacity_tokens if self.kv_capacity_tokens else 0.0

    def percentile(self, metric: str, q: float) -> float:
        """``q`` in [0, 100] of ``ttft``, ``tpot``, ``e2e`` (finished requests) or ``itl`` (weighted)."""
        if metric == "itl":
            v, w = self.itl
            if not len(v):
                return math.nan
            order = np.argsort(v, kind="stable")
            cum = np.cumsum(w[order])
            return float(v[order][min(len(v) - 1, np.searchsorted(cum, q / 100 * cum[-1]))])
        x = getattr(self, metric)
        x = x[np.isfinite(x)]
        return float(np.percentile(x, q)) if len(x) else math.nan


# ---- one engine ----------------------------------------------------------------------------------
class _Seq:
    __slots__ = ("i", "prompt", "output", "g", "cached", "target", "off", "epoch", "entered", "kv_ready",
                 "first", "s0")

    def __init__(self, i: int, r: Request):
        self.i, self.prompt, self.output = i, r.prompt_tokens, r.output_tokens
        self.g = 0                 # tokens produced so far
        self.cached = 0            # tokens of ``target`` prefilled in this pass
        self.target = r.prompt_tokens
        self.off = 0
        self.epoch = 0             # bumps on preemption: stale finish entries are skipped
        self.entered = 0.0         # when it last joined the running set (its last token)
        self.kv_ready = False      # disaggregated: arrived at a decode engine with its KV
        self.first = math.nan
        self.s0 = 0                # the engine's decode step when it joined the running set


class _Batch:
    __slots__ = ("chunks", "decode", "key", "role")

    def __init__(self, chunks, decode, key, role):
        self.chunks, self.decode, self.key, self.role = chunks, decode, key, role


class _Engine:
    def __init__(self, idx: int, role: str, blocks: int, block: int):
        self.idx, self.role, self.B = idx, role, block
        self.total = self.free = blocks
        self.waiting: deque[_Seq] = deque()
        self.prefilling: dict[int, _Seq] = {}
        self.running: dict[int, _Seq] = {}
        self.S = 0
        self.phase = [0] * block
        self.sum_off = 0
        self.finish: list[tuple[int, int, int, _Seq]] = []
        self.busy = False
        self.batch: _Batch | None = None
        self.last_decode = 0.0
        self.cohorts: dict[float, int] = {}
        self.peak = 0

    def load(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.B)

    def note_peak(self) -> None:
        used = self.total - self.free
        if used > self.peak:
            self.peak = used


class _Sim:
    def __init__(self, requests, costs: CostTable, policy: Policy, engines: list[_Engine], seconds_of,
                 transfer):
        self.reqs, self.costs, self.policy, self.engines = requests, costs, policy, engines
        self.seconds_of, self.transfer = seconds_of, transfer
        n = len(requests)
        self.ttft = np.full(n, math.nan)
        self.tpot = np.full(n, math.nan)
        self.e2e = np.full(n, math.nan)
        self.dropped: list[tuple[int, str]] = []
        self.preemptions = self.iterations = 0
        self.counts: dict[tuple[str, tuple], int] = {}
        self.busy = 0.0
        self.itl_v: list[float] = []
        self.itl_w: list[int] = []
        self.events: list[tuple] = []
        self.n_events = 0
        self.rr = {"mixed": 0, "prefill": 0, "decode": 0}
        self.end = 0.0
        self.secs: dict[tuple, float] = {}
        self.role_seconds: dict[str, float] = {}

    # -- routing --
    def route(self, role: str) -> _Engine:
        pool = [e for e in self.engines if e.role == role]
        if self.policy.router == "round_robin":
            e = pool[self.rr[role] % len(pool)]
            self.rr[role] += 1
            return e
        return min(pool, key=lambda e: (e.load(), e.idx))

    def push(self, t: float, kind: int, a, b=None) -> None:
        self.n_events += 1
        heapq.heappush(self.events, (t, self.n_events, kind, a, b))

    # -- bookkeeping --
    def drop(self, s: _Seq, why: str) -> None:
        self.dropped.append((self.reqs[s.i].id, why))

    def done(self, s: _Seq, now: float) -> None:
        r = self.reqs[s.i]
        self.e2e[s.i] = now - r.arrival
        self.tpot[s.i] = (now - s.first) / (s.output - 1) if s.output > 1 else 0.0
        self.end = max(self.end, now)

    def run(self) -> None:
        order = sorted(range(len(self.reqs)), key=lambda i: (self.reqs[i].arrival, self.reqs[i].id))
        ai, n = 0, len(order)
        entry = "prefill" if self.policy.name == "disaggregated" else "mixed"
        while True:
            t_arr = self.reqs[order[ai]].arrival if ai < n else math.inf
            if self.events and self.events[0][0] <= t_arr:
                t, _, kind, a, b = heapq.heappop(self.events)
                if kind == 0:
                    self.complete(a, t)
                    self.kick(a, t)
                else:   # a KV transfer landed: free the prefill engine, queue at a decode engine
                    a.free += a.blocks(b.target)
                    self.kick(a, t)
                    e = self.route("decode")
                    b.kv_ready = True
                    e.waiting.append(b)
                    self.kick(e, t)
            elif ai < n:
                i = order[ai]
                ai += 1
                e = self.route(entry)
                e.waiting.append(_Seq(i, self.reqs[i]))
                self.kick(e, t_arr)
            else:
                return

    def kick(self, e: _Engine, now: float) -> None:
        if e.busy:
            return
        batch = self.compose_chunked(e, now) if self.policy.name in ("chunked", "nanoflow") and e.role == "mixed" \
            else self.compose_whole(e, now)
        if batch is None:
            return
        secs = self.secs.get(batch.key)
        if secs is None:
            secs = self.secs[batch.key] = self.seconds_of(self.costs.cost(batch.key))
        ck = (e.role, batch.key)
        self.counts[ck] = self.counts.get(ck, 0) + 1
        self.iterations += 1
        self.busy += secs
        self.role_seconds[e.role] = self.role_seconds.get(e.role, 0.0) + secs
        e.busy, e.batch = True, batch
        self.push(now + secs, 0, e)

    # -- decode-side KV: make room for one step of every running request --
    def reserve_decode(self, e: _Engine, now: float) -> None:
        B = e.B
        need = e.phase[(-e.S) % B]
        while need > e.free:
            if e.prefilling:   # the newest partly prefilled request goes first: it has produced nothing
                _, v = e.prefilling.popitem()
                e.free += e.blocks(v.cached)
                v.cached = 0
                e.waiting.appendleft(v)
                self.preemptions += 1
                continue
            if not e.running:
                break
            _, v = e.running.popitem()
            T = v.off + e.S
            e.free += e.blocks(T)
            e.phase[v.off % B] -= 1
            e.sum_off -= v.off
            if v.off % B == (-e.S) % B:
                need -= 1
            key = max(v.entered, e.last_decode)
            e.cohorts[key] -= 1
            v.epoch += 1
            v.g += e.S - v.s0      # the tokens it produced while running
            v.cached, v.target, v.kv_ready = 0, v.prompt + v.g, False
            if e.blocks(v.target) > e.total:
                self.drop(v, f"its context of {v.target} tokens outgrew the KV cache ({e.total * B} tokens)")
            else:
                e.waiting.appendleft(v)
            self.preemptions += 1
        e.free -= need
        e.note_peak()

    def decode_key(self, e: _Engine, chunks: list) -> tuple:
        n = len(e.running)
        ctx = e.sum_off + n * (e.S + 1)
        return self.costs.key([(c, k) for _, c, k in chunks] if chunks else (), n, ctx)

    def compose_whole(self, e: _Engine, now: float) -> _Batch | None:
        """prefill_first, and both sides of disaggregation: whole prompts first, else one decode step."""
        p = self.policy
        chunks, tokens = [], 0
        while e.waiting and len(e.running) + len(chunks) < p.max_batch:
            s = e.waiting[0]
            need = e.blocks(s.target)
            if need > e.total:
                e.waiting.popleft()
                self.drop(s, f"its {s.target} tokens exceed the KV cache ({e.total * e.B} tokens)")
                continue
            if need > e.free:
                break
            if s.kv_ready:   # decode engine: the KV arrived, no compute
                e.waiting.popleft()
                e.free -= need
                self.enter(e, s, now)
                continue
            if chunks and tokens + s.target > p.token_budget:
                break
            e.waiting.popleft()
            e.free -= need
            chunks.append((s, s.target, 0))
            tokens += s.target
        e.note_peak()
        if chunks:
            return _Batch(chunks, False, self.costs.key([(c, k) for _, c, k in chunks], 0, 0), e.role)
        if e.running:
            self.reserve_decode(e, now)
            if e.running:
                return _Batch([], True, self.decode_key(e, []), e.role)
            return self.compose_whole(e, now) if e.waiting else None
        return None

    def compose_chunked(self, e: _Engine, now: float) -> _Batch | None:
        """chunked / nanoflow: every running decode, then prefill chunks up to the token budget."""
        p, B = self.policy, e.B
        if e.running:
            self.reserve_decode(e, now)
        left = p.token_budget - len(e.running)
        chunks = []
        for s in list(e.prefilling.values()):
            if left <= 0:
                break
            room = (e.blocks(s.cached) + e.free) * B - s.cached
            n = min(s.target - s.cached, left, room)
            if n <= 0:
                break
            e.free -= e.blocks(s.cached + n) - e.blocks(s.cached)
            chunks.append((s, n, s.cached))
            left -= n
        while e.waiting and left > 0 and len(e.running) + len(e.prefilling) < p.max_batch:
            s = e.waiting[0]
            if e.blocks(s.target) > e.total:
                e.waiting.popleft()
                self.drop(s, f"its {s.target} tokens exceed the KV cache ({e.total * B} tokens)")
                continue
            n = min(s.target, left, e.free * B)
            if n <= 0:
                break
            e.waiting.popleft()
            e.prefilling[s.i] = s
            e.free -= e.blocks(n)
            chunks.append((s, n, 0))
            left -= n
        e.note_peak()
        if not chunks and not e.running:
            return None
        return _Batch(chunks, bool(e.running), self.decode_key(e, chunks), e.role)

    def enter(self, e: _Engine, s: _Seq, now: float) -> None:
        """``s`` joins the running decodes: it has ``s.target`` tokens cached and ``s.g`` produced."""
        B = e.B
        s.off = s.target - e.S
        s.s0 = e.S
        s.entered = now
        e.phase[s.off % B] += 1
        e.sum_off += s.off
        e.running[s.i] = s
        e.cohorts[now] = e.cohorts.get(now, 0) + 1
        heapq.heappush(e.finish, (e.S + s.output - s.g - 1, s.i, s.epoch, s))

    def complete(self, e: _Engine, now: float) -> None:
        batch, e.busy, e.batch = e.batch, False, None
        if batch.decode:
            for t, c in e.cohorts.items():
                if c:
                    self.itl_v.append(now - t)
                    self.itl_w.append(c)
            S, B = e.S, e.B
            while e.finish and e.finish[0][0] <= S:
                _, _, epoch, s = heapq.heappop(e.finish)
                if epoch != s.epoch or s.i not in e.running:
                    continue
                del e.running[s.i]
                e.free += e.blocks(s.off + S + 1)
                e.phase[s.off % B] -= 1
                e.sum_off -= s.off
                s.g = s.output
                self.done(s, now)
            e.S += 1
            e.last_decode = now
            e.cohorts = {now: len(e.running)}
        for s, n, _ in batch.chunks:
            s.cached += n
            if s.cached < s.target:
                continue
            e.prefilling.pop(s.i, None)
            s.g += 1
            if s.g == 1:
                s.first = now
                self.ttft[s.i] = now - self.reqs[s.i].arrival
            if s.g >= s.output:
                e.free += e.blocks(s.target)
                self.done(s, now)
            elif e.role == "prefill":
                self.push(now + self.transfer(s.target), 1, e, s)
            else:
                self.enter(e, s, now)


# ---- the entry point -----------------------------------------------------------------------------
def simulate(requests: Sequence[Request], model: IterationModel, policy: Policy = Policy(), *, replicas: int = 1,
             gpus_per_replica: int = 1, block_size: int = 16, target: Target | None = None,
             slo: SLO | None = None, costs: CostTable | None = None) -> SimResult:
    """Serve ``requests`` with ``replicas`` data-parallel copies of ``model`` (each
    ``gpus_per_replica`` GPUs; ``block_size`` the KV block the model was built with) under
    ``policy``. ``target`` gives the per-GPU peaks for utilisation (and NanoFlow's roofline floor);
    ``slo`` the goodput's thresholds; ``costs`` a :class:`CostTable` to share between runs."""
    if not requests:
        raise SimulationError("no requests to simulate: give a workload with at least one request")
    if replicas < 1 or gpus_per_replica < 1 or block_size < 1:
        raise SimulationError(f"replicas, gpus_per_replica and block_size must be >= 1, got {replicas}, "
                              f"{gpus_per_replica}, {block_size}")
    if policy.name == "disaggregated" and replicas <= policy.prefill_replicas:
        raise SimulationError(f"disaggregation with {policy.prefill_replicas} prefill replica(s) needs more "
                              f"replicas than that (some decode), got {replicas}")
    costs = costs or CostTable(model)
    capacity = model.kv_capacity_tokens()
    blocks = capacity // block_size
    if blocks < 1:
        raise SimulationError(f"the KV cache holds {capacity} tokens: not one block of {block_size}")
    engines = []
    for r in range(replicas):
        role = "mixed" if policy.name != "disaggregated" else \
            "prefill" if r < policy.prefill_replicas else "decode"
        engines.append(_Engine(r, role, blocks, block_size))
    gpus = replicas * gpus_per_replica
    peak_f = target.tensor_peak("bf16") if target else math.nan
    peak_b = target.hbm_bandwidth if target else math.nan
    if policy.name == "nanoflow":
        def seconds_of(c: IterationCost) -> float:
            return overlapped_seconds(c, policy.nano_batches, policy.overlap_overhead,
                                      peak_f * gpus_per_replica if target else 0.0,
                                      peak_b * gpus_per_replica if target else 0.0)
    else:
        def seconds_of(c: IterationCost) -> float:
            return c.seconds
    sim = _Sim(list(requests), costs, policy, engines, seconds_of, model.kv_transfer_seconds)
    sim.run()
    flops = hbm = 0.0
    breakdown: dict[str, float] = {}
    for (_, key), n in sim.counts.items():
        c = costs.memo[key]
        flops += n * c.flops
        hbm += n * c.hbm_bytes
        for name, s in c.breakdown:
            breakdown[name] = breakdown.get(name, 0.0) + n * s
    start = min(r.arrival for r in requests)
    arrival = np.array([r.arrival for r in requests], dtype=float)
    return SimResult(
        policy, replicas, gpus, arrival, sim.ttft, sim.tpot, sim.e2e,
        np.array([r.prompt_tokens for r in requests]), np.array([r.output_tokens for r in requests]),
        sim.dropped, sim.preemptions, sim.iterations, max(sim.end - start, 1e-12), sim.busy, flops, hbm, breakdown,
        blocks * block_size, max(e.peak for e in engines) * block_size,
        (np.array(sim.itl_v), np.array(sim.itl_w, dtype=float)), peak_f * gpus, peak_b * gpus, slo, costs.calls,
        sim.role_seconds)
