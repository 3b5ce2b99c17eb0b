"""Measuring configs: the cost model (dry run), or kernels timed in an isolated worker process.

A :class:`Measurer` answers three questions about a config, as seconds:

* ``probe``: a short measurement (compile, check, a few repetitions), enough for the pruner
  to drop a clearly worse config;
* ``measure``: the full measurement, a :class:`Timing` (median and quantiles of many repetitions);
* ``retime``: the top few configs measured again *paired* (interleaved, round after round),
  so that drift and noise affect all of them alike and do not pick the winner.

:class:`ModelMeasurer` answers from the roofline model (``measured = False``).
:class:`ProcessMeasurer` runs a callable ``fn(config_key, phase) -> samples`` in an
:class:`IsolatedWorker`, a child process started with ``spawn``: a config that crashes the
process (illegal address, segfault), hangs past its timeout or fails to compile comes back as
a :class:`MeasureError`, and the next call gets a *fresh* worker. :func:`prefill_samples` is
the GPU callable: the generated kernel compiled, its output checked against the reference
evaluator before it is timed, then timed with ``triton.testing.do_bench`` (warm-up, L2 flushed
between repetitions) or, for kernels too short for event timing, with CUDA graphs.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import random
import signal
import statistics
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kascade.autotune.space import parse_config
from kascade.backends.model import Efficiency, Prediction, cost_rule, input_dtype, predict, schedule_cost
from kascade.backends.targets import Target
from kascade.ir.errors import KascadeError
from kascade.passes.schedule import Config, Schedule, padded_head_dim

QUANTILES = (0.2, 0.5, 0.8)


class MeasureError(KascadeError):
    """A config that could not be measured. ``kind``: ``compile`` (it did not compile), ``wrong``
    (its output disagreed with the reference), ``crash`` (the worker process died), ``timeout``
    (no answer in time; the worker was killed) or ``error`` (any other exception)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class WrongResult(Exception):
    """Raised in the worker when a kernel's output disagrees with the reference."""
    kind = "wrong"


@dataclass(frozen=True)
class Timing:
    """Repetition times of one config, in seconds."""
    median: float
    quantiles: dict = field(default_factory=dict, compare=False, hash=False)   # {"0.2": s, "0.5": s, "0.8": s}
    samples: int = 1

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        xs = sorted(float(x) for x in samples)
        if not xs or not all(math.isfinite(x) and x > 0 for x in xs):
            raise MeasureError("error", f"a measurement must be positive finite seconds, got {list(samples)[:5]}")
        return cls(statistics.median(xs), {str(q): _quantile(xs, q) for q in QUANTILES}, len(xs))


def _quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics of sorted ``xs``."""
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Measurer:
    """What a search measures configs with (see the module docstring)."""
    measured = True      # False: predictions (records are stored with measured=False)
    two_phase = True     # probe before measuring, so the pruner may stop a config early

    def probe(self, config: Config) -> float:
        return self.measure(config).median

    def measure(self, config: Config) -> Timing:
        """Time one config; subclasses (the model's dry run, the GPU worker) say how."""
        raise TypeError(f"{type(self).__name__} must implement measure()")

    def retime(self, configs: Sequence[Config]) -> dict[str, Timing]:
        return {c.key(): self.measure(c) for c in configs}

    def close(self) -> None:
        pass


# ---- the cost model ---------------------------------------------------------------------
class ModelMeasurer(Measurer):
    """The dry run: the roofline model's prediction is the measurement (deterministic)."""
    measured = False
    two_phase = False

    def __init__(self, schedule: Schedule, extents: Mapping[str, int], target: Target, dtype: str,
                 params: Mapping[str, int | float] | None = None, eff: Efficiency | None = None):
        cost_rule(schedule)   # a family without a cost rule: a clear error here, not mid-study
        self.schedule, self.extents, self.target, self.dtype = schedule, dict(extents), target, dtype
        self.params = dict(params or {})
        self.itemsize = input_dtype(schedule).itemsize
        self.eff = eff or Efficiency()   # the target's calibrated factors, or the model's defaults

    def predict(self, config: Config) -> Prediction:
        cost = schedule_cost(self.schedule, config, self.extents, self.target, self.itemsize, self.params)
        return predict(cost, self.target, self.dtype, self.eff)

    def measure(self, config: Config) -> Timing:
        s = self.predict(config).seconds
        return Timing(s, {str(q): s for q in QUANTILES}, 1)


class CallableMeasurer(Measurer):
    """In-process measurements from ``fn(config_key) -> seconds`` (raise :class:`MeasureError` for
    a failure): replaying a recorded sweep, or a test double. No isolation."""

    def __init__(self, fn: Callable[[str], float], *, measured: bool = True):
        self.fn, self.measured = fn, measured
        self.two_phase = False

    def measure(self, config: Config) -> Timing:
        return Timing.of([self.fn(config.key())])


# ---- isolated worker processes ---------------------------------------------------------------
def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _error_kind(e: BaseException) -> str:
    kind = getattr(e, "kind", None)
    if isinstance(kind, str):
        return kind
    name = type(e).__name__
    if name in ("CompilationError", "CompileTimeAssertionFailure", "OutOfResources", "CodegenError",
                "PTXASError", "MLIRCompilationError"):
        return "compile"
    return "error"


_FATAL = ("CUDA error", "illegal memory access", "illegal address", "unspecified launch failure",
          "misaligned address", "device-side assert")


def _is_fatal(e: BaseException) -> bool:
    """An error after which the process's CUDA context is unusable: the worker must not go on."""
    return bool(getattr(e, "fatal", False)) or type(e).__name__ == "AcceleratorError" or \
        any(m in str(e) for m in _FATAL)


def _serve(conn, device: int | None) -> None:
    """The worker's loop: receive ``(fn, args)``, answer ``("ok", value)`` or ``("error", info)``.
    After an error that leaves the CUDA context unusable (an illegal address ...) it exits, and the
    parent starts a fresh worker for the next config."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides when to stop
    global _DEVICE
    _DEVICE = device
    conn.send(("ready", os.getpid()))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            msg = pickle.loads(data)
            if msg is None:
                return
            fn, args = msg
            reply = ("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
            first = (str(e).strip().splitlines() or [""])[0][:500]
            fatal = _is_fatal(e)
            reply = ("error", {"kind": "crash" if fatal else _error_kind(e), "message": f"{type(e).__name__}: {first}",
                               "detail": traceback.format_exc()[-4000:], "fatal": fatal})
        try:
            conn.send(reply)
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result
            conn.send(("error", {"kind": "error", "message": f"cannot send the result back: {e}", "detail": ""}))
        if reply[0] == "error" and reply[1].get("fatal"):
            os._exit(70)


_DEVICE: int | None = None   # the CUDA device a worker measures on (set in the child)


class IsolatedWorker:
    """Runs callables in a child process (``multiprocessing`` spawn) with a timeout per call.

    ``call(fn, *args, timeout=s)`` returns ``fn(*args)`` computed in the child. A child that
    dies (a signal, ``os._exit``) raises :class:`MeasureError` ``crash``; one that does not answer
    in time is killed and raises ``timeout``; an exception in ``fn`` raises its ``kind``. After a
    crash or a timeout the next call starts a fresh child. ``fn`` and ``args`` must be picklable
    (module-level functions, ``functools.partial`` of them)."""

    def __init__(self, *, device: int | None = None, start_timeout: float = 300.0):
        self.device = device
        self.start_timeout = start_timeout
        self._ctx = multiprocessing.get_context("spawn")
        self._proc = None
        self._conn = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child, self.device), daemon=True, name="kascade-measure")
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        self.starts += 1
        if not parent.poll(self.start_timeout):
            self._kill()
            raise MeasureError("timeout", f"the measurement worker did not start in {self.start_timeout:.0f} s")
        try:
            parent.recv()
        except (EOFError, OSError):
            code = self._kill()
            raise MeasureError("crash", f"the measurement worker died while starting ({_describe_exit(code)})") \
                from None

    def _kill(self) -> int | None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is None:
            return None
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        return proc.exitcode

    def call(self, fn: Callable, *args: Any, timeout: float) -> Any:
        if self._proc is None or not self._proc.is_alive():
            self._kill()
            self._start()
        try:
            self._conn.send_bytes(pickle.dumps((fn, args)))
        except (BrokenPipeError, ConnectionResetError, OSError):
            code = self._kill()
            raise MeasureError("crash", f"the measurement worker is gone ({_describe_exit(code)})") from None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                raise MeasureError("timeout", f"no answer in {timeout:g} s; the worker was killed")
            if self._conn.poll(min(left, 0.25)):
                try:
                    status, payload = self._conn.recv()
                except (EOFError, OSError):
                    self._proc.join(5)
                    code = self._kill()
                    raise MeasureError("crash", f"the measurement worker died ({_describe_exit(code)})") from None
                break
            if not self._proc.is_alive() and not self._conn.poll(0):
                code = self._kill()
                raise MeasureError("crash", f"the measurement worker died ({_describe_exit(code)})")
        if status == "ok":
            return payload
        if payload.get("fatal"):
            self._kill()   # it exits by itself; waiting here keeps the next config off a dying process
        raise MeasureError(payload["kind"], payload["message"])

    def close(self) -> None:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send_bytes(pickle.dumps(None))
                self._proc.join(5)
            except OSError:
                pass
        self._kill()


def paired(fn: Callable[[str, str], Sequence[float]], keys: Sequence[str], rounds: int,
           seed: int = 0) -> dict[str, list[float]]:
    """Round after round, every config once, in a fresh random (seeded) order: the samples of
    each config interleave with the others', so slow drift is shared by all. Runs in the worker."""
    rng = random.Random(seed)
    out: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(rounds):
        order = list(keys)
        rng.shuffle(order)
        for k in order:
            out[k].extend(fn(k, "retime"))
    return out


class ProcessMeasurer(Measurer):
    """Measurements by ``fn(config_key, phase) -> samples (seconds)`` run in an :class:`IsolatedWorker`;
    ``phase`` is ``probe``, ``full`` or ``retime``."""

    def __init__(self, fn: Callable[[str, str], Sequence[float]], *, device: int | None = None,
                 probe_timeout: float = 180.0, timeout: float = 120.0, retime_rounds: int = 5):
        self.fn = fn
        self.worker = IsolatedWorker(device=device)
        self.probe_timeout, self.timeout, self.retime_rounds = probe_timeout, timeout, retime_rounds

    def probe(self, config: Config) -> float:
        return Timing.of(self.worker.call(self.fn, config.key(), "probe", timeout=self.probe_timeout)).median

    def measure(self, config: Config) -> Timing:
        return Timing.of(self.worker.call(self.fn, config.key(), "full", timeout=self.timeout))

    def retime(self, configs: Sequence[Config]) -> dict[str, Timing]:
        keys = [c.key() for c in configs]
        samples = self.worker.call(paired, self.fn, keys, self.retime_rounds,
                                   timeout=self.timeout * max(1, len(keys)) * max(1, self.retime_rounds) / 4)
        return {k: Timing.of(v) for k, v in samples.items()}

    def close(self) -> None:
        self.worker.close()


# ---- the GPU measurement (runs in the worker) ------------------------------------------------
@dataclass(frozen=True)
class MeasureJob:
    """What the worker needs to time one schedule's configs at one shape (any kernel family: the
    schedule's key is part of ``ident``)."""
    schedule: Schedule
    extents: tuple[tuple[str, int], ...]
    params: tuple[tuple[str, int | float], ...] = ()
    seed: int = 0
    probe_ms: float = 10.0       # do_bench repetition time of a probe
    rep_ms: float = 100.0        # ... of a full measurement
    retime_ms: float = 25.0      # ... of one config in one round of the paired re-timing
    graph_below_s: float = 20e-6   # kernels shorter than this are timed as CUDA graphs
    check: bool = True

    def ident(self) -> str:
        return f"{self.schedule.key()}|{self.extents}|{self.params}|{self.seed}"


PrefillJob = MeasureJob


def gpu_measurer(schedule: Schedule, extents: Mapping[str, int], params: Mapping[str, int | float] | None = None,
                 *, device: int = 0, **job: Any) -> ProcessMeasurer:
    """A :class:`ProcessMeasurer` timing the generated prefill kernel on CUDA device ``device``."""
    j = PrefillJob(schedule, tuple(sorted(extents.items())), tuple(sorted((params or {}).items())), **job)
    return ProcessMeasurer(partial(prefill_samples, j), device=device)


_STATE: dict[str, Any] = {}   # in the worker: the one job being measured (inputs, reference, kernels)


def _check_extents(schedule: Schedule, ext: Mapping[str, int]) -> dict[str, int]:
    """A small awkward shape with the same head dims: the kernel is specialised to the head dims and
    the config, not to the lengths, so its output is checked here (float64 reference) cheaply."""
    c, body = schedule.cascade, schedule.kernels[0].body
    out = dict(ext)
    for r in body.grid_ranks:
        out[c.rank_extent(r)] = min(ext[c.rank_extent(r)], 2)
    out[c.rank_extent(body.query)] = min(ext[c.rank_extent(body.query)], 97)
    out[c.rank_extent(body.key)] = min(ext[c.rank_extent(body.key)], 131)
    return out


_TOLERANCE = {"bf16": 3e-2, "f16": 5e-3, "f32": 1e-4}


class _PrefillState:
    """Inputs, the reference output at the check shape and launchers of one job, kept by the worker.
    ``interpret``: check under Triton's CPU interpreter (tests without a GPU; no timing)."""

    def __init__(self, job: PrefillJob, interpret: bool = False):
        import torch

        from kascade.backends.reference import evaluate
        self.job, self.interpret = job, interpret
        self.device = torch.device("cpu") if interpret else torch.device("cuda", _DEVICE or 0)
        if not interpret:
            torch.cuda.set_device(self.device)
        c, body = job.schedule.cascade, job.schedule.kernels[0].body
        self.dtype = input_dtype(job.schedule)
        self.out_dtype = _torch_dtype(body.out.dtype.value)
        ext = dict(job.extents)
        self.heads = {c.rank_extent(r): padded_head_dim(ext[c.rank_extent(r)]) for r in (body.head, body.vhead)}
        self.gen = torch.Generator().manual_seed(job.seed)
        self.check_inputs, self.check_params, self.check_ext = self._inputs(_check_extents(job.schedule, ext))
        if job.check:
            ref_in = {n: t.double() if t.is_floating_point() else t for n, t in self.check_inputs.items()}
            self.ref = evaluate(c, ref_in, self.check_params, self.check_ext)[body.out.name]
        self.full = None   # inputs at the timed shape, made on first use
        self.kernels: dict[str, Callable[[], None]] = {}
        self.graph: dict[str, bool] = {}

    def _inputs(self, x: Mapping[str, int]):
        """Random inputs in their declared dtypes on the device, params, every extent bound."""
        import torch

        from kascade.backends.inputs import random_inputs
        from kascade.ir.extents import bind_extents
        c, body = self.job.schedule.cascade, self.job.schedule.kernels[0].body
        ins, prm = random_inputs(c, x, generator=self.gen, dtype=torch.float32)
        if "scale" in prm:
            prm["scale"] = x[c.rank_extent(body.head)] ** -0.5
        prm.update(dict(self.job.params))
        ins = {n: t.to(device=self.device, dtype=_torch_dtype(c.input(n).dtype.value)) for n, t in ins.items()}
        return ins, prm, bind_extents(c, {n: tuple(t.shape) for n, t in ins.items()}, x)

    def source(self, key: str):
        from kascade.codegen.attention_prefill import render
        return render(self.job.schedule, parse_config(key), self.heads)

    def launcher(self, key: str) -> Callable[[], None]:
        """A no-argument launch of config ``key`` at the timed shape, checked first."""
        if key in self.kernels:
            return self.kernels[key]
        import torch

        from kascade.backends.triton import kernel, launch_args
        src = self.source(key)
        if self.job.check:
            self.check(src)
        if self.full is None:
            self.full = self._inputs(dict(self.job.extents))
        inputs, params, ext = self.full
        out = torch.empty(tuple(ext[x] for x in src.output_extents), dtype=self.out_dtype, device=self.device)
        args = launch_args(src, {**inputs, src.output.name: out}, params, ext)
        fn = kernel(src, interpret=False)[src.grid_size(ext)]
        consts = dict(src.constexprs)

        def run() -> None:
            fn(*args, **consts, num_warps=src.num_warps, num_stages=src.num_stages)
        self.kernels[key] = run
        return run

    def check(self, src) -> float:
        """Max |out - reference| at the check shape; :class:`WrongResult` when it is past the bar."""
        import torch

        from kascade.backends.triton import launch
        shape = tuple(self.check_ext[x] for x in src.output_extents)
        out = torch.full(shape, float("nan"), dtype=self.out_dtype, device=self.device)   # poisoned
        launch(src, {**self.check_inputs, src.output.name: out}, self.check_params, self.check_ext,
               interpret=self.interpret)
        if not self.interpret:
            torch.cuda.synchronize()
        got, ref = out.double(), self.ref
        if (got.isnan() & ~ref.isnan()).any():
            raise WrongResult(f"{src.name} left or wrote NaN at the check shape {self.check_ext}")
        err = (got - ref).nan_to_num(0.0).abs().max().item() if got.numel() else 0.0
        bar = _TOLERANCE.get(self.dtype.value, 3e-2) * max(1.0, ref.nan_to_num(0.0).abs().max().item())
        if not err <= bar:
            raise WrongResult(f"{src.name}: max |out - reference| = {err:.3g} > {bar:.3g} at {self.check_ext}")
        return err


def _torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "f64": torch.float64}.get(
        name, torch.float32)


def check_config(job: PrefillJob, key: str, *, interpret: bool = False) -> float:
    """The numerics check alone (in this process): compile config ``key``, run it at the check shape
    and compare with the float64 reference; returns the max error or raises :class:`WrongResult`.
    ``interpret=True`` runs it under Triton's CPU interpreter (fp16 / fp32: bf16 dots are wrong there)."""
    st = _PrefillState(job, interpret=interpret)
    return st.check(st.source(key))


def job_samples(make_state: Callable[[Any], Any], job, key: str, phase: str) -> list[float]:
    """Seconds per repetition of config ``key`` of ``job`` (runs in the worker): the job's state
    (inputs, reference, launchers: ``make_state(job)``) is kept for the job's shape, each config is
    compiled and checked on first use, then timed by :func:`bench_samples`."""
    st = _STATE.get(job.ident())
    if st is None:
        _STATE.clear()   # one shape at a time: free the previous inputs
        st = _STATE[job.ident()] = make_state(job)
    return bench_samples(st.launcher(key), st.graph, key, job, phase)


def prefill_samples(job: PrefillJob, key: str, phase: str) -> list[float]:
    """:func:`job_samples` of a prefill-attention job."""
    return job_samples(_PrefillState, job, key, phase)


def bench_samples(run: Callable[[], None], graph: dict[str, bool], key: str, job, phase: str) -> list[float]:
    """Seconds per repetition of ``run``: ``do_bench`` with the L2 flushed between repetitions, or a
    CUDA graph of many launches when one launch is shorter than ``job.graph_below_s`` (decided once
    per config key, remembered in ``graph``)."""
    from triton.testing import do_bench, do_bench_cudagraph
    rep = {"probe": job.probe_ms, "full": job.rep_ms}.get(phase, job.retime_ms)
    if key not in graph:
        ms = do_bench(run, warmup=5, rep=job.probe_ms, return_mode="median")
        graph[key] = ms * 1e-3 < job.graph_below_s
    if graph[key]:
        import torch
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):   # graphs are captured off the default stream (older tritons)
            times = do_bench_cudagraph(run, rep=max(rep, 10), return_mode="all")
    else:
        times = do_bench(run, warmup=25 if phase == "full" else 5, rep=rep, return_mode="all")
    return [t * 1e-3 for t in times]
