"""Serving workloads: requests with arrival times and lengths, synthetic or from a trace, and SLOs.

Synthetic arrivals are Poisson (exponential gaps) or bursty (gamma gaps with a coefficient
of variation ``cv``: ``cv = 1`` is Poisson, ``cv > 1`` burstier), at a mean ``rate`` in
requests per second. Prompt and output lengths come from a :class:`LengthDist`, written as

* an int, or ``"fixed:N"`` / ``"N"``: always ``N`` tokens;
* ``"uniform:LO-HI"`` (or ``"uniform:LO,HI"``): integers uniform in ``[LO, HI]``;
* ``"lognormal:MEAN,STD"``: a lognormal with that mean and standard deviation, rounded,
  at least 1 (the shape of real prompt / response lengths, e.g. BurstGPT's).

Every draw comes from one ``numpy.random.Generator(seed)``: the same arguments give the
same requests on every machine.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kascade.ir.errors import KascadeError


@dataclass(frozen=True)
class Request:
    id: int
    arrival: float          # seconds from the start of the workload
    prompt_tokens: int
    output_tokens: int      # tokens generated, the first (from prefill) included


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts: ``kind`` fixed (``a``), uniform (``a`` to ``b``
    inclusive) or lognormal (mean ``a``, standard deviation ``b``)."""
    kind: str
    a: float
    b: float = 0.0

    def __post_init__(self) -> None:
        ok = {"fixed": self.a >= 1, "uniform": 1 <= self.a <= self.b, "lognormal": self.a >= 1 and self.b >= 0}
        if self.kind not in ok:
            raise KascadeError(f"unknown length distribution {self.kind!r}; known: fixed, uniform, lognormal")
        if not ok[self.kind] or not all(math.isfinite(v) for v in (self.a, self.b)):
            raise KascadeError(f"bad {self.kind} length distribution ({self.a}, {self.b}): fixed needs N >= 1, "
                               f"uniform 1 <= LO <= HI, lognormal MEAN >= 1 and STD >= 0")

    @property
    def mean(self) -> float:
        return {"fixed": self.a, "uniform": (self.a + self.b) / 2, "lognormal": self.a}[self.kind]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(round(self.a)), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n, dtype=np.int64)
        sigma2 = math.log1p((self.b / self.a) ** 2)
        mu = math.log(self.a) - sigma2 / 2
        return np.maximum(1, np.rint(rng.lognormal(mu, math.sqrt(sigma2), size=n))).astype(np.int64)


def length_dist(spec: int | str | LengthDist) -> LengthDist:
    """Parses the length spec of the module docstring."""
    if isinstance(spec, LengthDist):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return LengthDist("fixed", spec)
    if not isinstance(spec, str):
        raise KascadeError(f"a length spec is an int, 'fixed:N', 'uniform:LO-HI' or 'lognormal:MEAN,STD'; "
                           f"got {spec!r}")
    kind, _, rest = spec.strip().partition(":")
    if not rest:
        kind, rest = "fixed", kind
    try:
        values = [float(v) for v in rest.replace("-", ",").split(",")]
    except ValueError:
        values = []
    want = {"fixed": 1, "uniform": 2, "lognormal": 2}.get(kind)
    if want is None or len(values) != want:
        raise KascadeError(f"bad length spec {spec!r}; accepted: N, 'fixed:N', 'uniform:LO-HI', "
                           f"'lognormal:MEAN,STD'")
    return LengthDist(kind, *values)


def _requests(gaps: np.ndarray, n: int, prompt, output, rng: np.random.Generator) -> list[Request]:
    arrivals = np.cumsum(gaps)
    prompts = length_dist(prompt).sample(rng, n)
    outputs = length_dist(output).sample(rng, n)
    return [Request(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs))]


def _check(rate: float, n: int) -> None:
    if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
        raise KascadeError(f"the request rate must be a positive number of requests per second, got {rate!r}")
    if not isinstance(n, int) or n < 0:
        raise KascadeError(f"the number of requests must be an integer >= 0, got {n!r}")


def poisson_workload(rate: float, n: int, prompt: int | str | LengthDist, output: int | str | LengthDist,
                     seed: int = 0) -> list[Request]:
    """``n`` requests arriving as a Poisson process of ``rate`` per second (the first after one gap)."""
    _check(rate, n)
    rng = np.random.default_rng(seed)
    return _requests(rng.exponential(1.0 / rate, size=n), n, prompt, output, rng)


def gamma_workload(rate: float, cv: float, n: int, prompt: int | str | LengthDist,
                   output: int | str | LengthDist, seed: int = 0) -> list[Request]:
    """``n`` requests with gamma-distributed gaps of mean ``1 / rate`` and coefficient of
    variation ``cv`` (shape ``1 / cv^2``): bursts of close arrivals and long lulls when ``cv > 1``."""
    _check(rate, n)
    if not (isinstance(cv, int | float) and math.isfinite(cv) and cv > 0):
        raise KascadeError(f"the coefficient of variation must be a positive number, got {cv!r}")
    rng = np.random.default_rng(seed)
    shape = 1.0 / cv ** 2
    return _requests(rng.gamma(shape, 1.0 / (rate * shape), size=n), n, prompt, output, rng)


# column names accepted for each field (first match wins); BurstGPT's are the capitalised ones
ARRIVAL = ("arrival", "arrival_time", "timestamp", "Timestamp", "time")
PROMPT = ("prompt_tokens", "input_tokens", "prompt_len", "input_length", "Request tokens")
OUTPUT = ("output_tokens", "completion_tokens", "output_len", "output_length", "Response tokens")


def load_trace(path: str | Path) -> list[Request]:
    """Requests from a trace file, sorted by arrival (ties keep file order), ids in that order,
    times shifted so that the first request arrives at 0.

    Format: JSON Lines (``.jsonl``, one object per line, blank lines skipped) or CSV with a
    header row (any other suffix). Each record has an arrival time in seconds, a prompt length
    and an output length in tokens, under any of these names:

    * arrival: ``arrival``, ``arrival_time``, ``timestamp``, ``Timestamp``, ``time``;
    * prompt: ``prompt_tokens``, ``input_tokens``, ``prompt_len``, ``input_length``, ``Request tokens``;
    * output: ``output_tokens``, ``completion_tokens``, ``output_len``, ``output_length``, ``Response tokens``.

    Other fields are ignored, so BurstGPT's CSV (``Timestamp, Model, Request tokens, Response
    tokens, Total tokens, Log Type``) loads as it is. A record with a missing or non-numeric
    field, a negative or non-finite time, a prompt under 1 or an output under 1 token (BurstGPT
    logs failed requests with 0 response tokens: filter them out first) raises
    :class:`KascadeError` naming the file, the line and the problem; nothing is dropped silently."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KascadeError(f"cannot read trace {p}: {exc}") from exc
    rows = _jsonl_rows(p, text) if p.suffix.lower() in (".jsonl", ".ndjson") else _csv_rows(p, text)
    parsed, errors = [], []
    for line, row in rows:
        try:
            parsed.append(_parse_row(row))
        except KascadeError as exc:
            errors.append(f"line {line}: {exc}")
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise KascadeError(f"trace {p}: {len(errors)} malformed row(s): " + "; ".join(errors[:5]) + more)
    if not parsed:
        raise KascadeError(f"trace {p} holds no requests")
    parsed.sort(key=lambda r: r[0])
    t0 = parsed[0][0]
    return [Request(i, a - t0, pr, out) for i, (a, pr, out) in enumerate(parsed)]


def _jsonl_rows(p: Path, text: str):
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KascadeError(f"trace {p}: line {i} is not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise KascadeError(f"trace {p}: line {i} must be a JSON object, got {type(row).__name__}")
        yield i, row


def _csv_rows(p: Path, text: str):
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames:
        raise KascadeError(f"trace {p}: a CSV trace needs a header row")
    header = [h.strip() for h in reader.fieldnames]
    for need, names in (("arrival time", ARRIVAL), ("prompt tokens", PROMPT), ("output tokens", OUTPUT)):
        if not any(n in header for n in names):
            raise KascadeError(f"trace {p}: the header has no {need} column; accepted names: {', '.join(names)}")
    reader.fieldnames = header
    for row in reader:
        yield reader.line_num, row


def _field(row: dict, names: tuple[str, ...], what: str) -> float:
    for n in names:
        if n in row and row[n] not in (None, ""):
            v = row[n]
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise KascadeError(f"{what} {v!r} is not a number") from None
            if not math.isfinite(x):
                raise KascadeError(f"{what} {v!r} is not finite")
            return x
    raise KascadeError(f"no {what} (one of {', '.join(names)})")


def _parse_row(row: dict) -> tuple[float, int, int]:
    arrival = _field(row, ARRIVAL, "arrival time")
    if arrival < 0:
        raise KascadeError(f"arrival time {arrival} is negative")
    lengths = []
    for names, what in ((PROMPT, "prompt tokens"), (OUTPUT, "output tokens")):
        v = _field(row, names, what)
        if v != int(v) or v < 1:
            raise KascadeError(f"{what} must be an integer >= 1, got {v:g}")
        lengths.append(int(v))
    return arrival, lengths[0], lengths[1]


@dataclass(frozen=True)
class SLO:
    """Latency targets met at a percentile: time to first token ``ttft`` and time per output
    token ``tpot`` (seconds), ``percentile`` a fraction in (0, 1] (0.99 is p99; 1 is every request)."""
    ttft: float
    tpot: float
    percentile: float = 0.99

    def __post_init__(self) -> None:
        for name in ("ttft", "tpot"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise KascadeError(f"SLO {name} must be a positive number of seconds, got {v!r}")
        q = self.percentile
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q <= 1:
            hint = f" (write {q / 100:g} for p{q:g})" if isinstance(q, int | float) and 1 < q <= 100 else ""
            raise KascadeError(f"SLO percentile must be a fraction in (0, 1], got {q!r}{hint}")

    def met(self, ttft: float, tpot: float) -> bool:
        """Whether one request meets both targets."""
        return ttft <= self.ttft and tpot <= self.tpot
