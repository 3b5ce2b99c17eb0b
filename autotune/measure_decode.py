"""GPU measurement of paged-decode configs (runs in the isolated worker, like prefill's).

A :class:`DecodeJob` is one decode workload (:func:`~kascade.backends.model.decode_extents`
sizes: every sequence ``L`` keys long, pages scattered over the cache in a random order, so
the block table's indirection is exercised as in serving). Each config is first run at a small
check shape with poisoned outputs and compared with the float64 evaluator of the same cascade,
then timed by :func:`~kascade.autotune.measure.bench_samples`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from kascade.autotune import measure
from kascade.autotune.measure import MeasureJob, WrongResult
from kascade.autotune.space import parse_config
from kascade.backends.model import decode_extents
from kascade.passes.schedule import Config, Schedule, padded_head_dim

_TOLERANCE = {"bf16": 3e-2, "f16": 5e-3, "f32": 1e-4}


DecodeJob = MeasureJob   # schedule, extents, params, seed and the timing options


def check_sizes(x: Mapping[str, int]) -> dict[str, int]:
    """A small shape with the same kernel (head dims, group, page size): 3 sequences of uneven
    lengths up to 300 keys, at most 2 KV heads."""
    return {**x, "B": 3, "G": min(x["G"], 2), "L": min(x["L"], 300)}


class DecodeState:
    """Inputs, reference and launchers of one decode job (``interpret``: CPU, check only)."""

    def __init__(self, job: DecodeJob, interpret: bool = False):
        import torch

        from kascade.backends.reference import evaluate
        self.job, self.interpret = job, interpret
        self.device = torch.device("cpu") if interpret else torch.device("cuda", measure._DEVICE or 0)
        body = job.schedule.kernels[0].body
        self.dtype = body.q.dtype
        self.torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[self.dtype.value]
        self.gen = torch.Generator().manual_seed(job.seed)
        self.x = decode_extents(dict(job.extents))
        cx = check_sizes(self.x)
        lengths = [cx["L"], max(1, cx["L"] // 3), max(1, cx["L"] - 17)]
        self.check_in, self.check_params, self.check_ext = self._inputs(cx, lengths)
        if job.check:
            ref_in = {n: t.double() if t.is_floating_point() else t for n, t in self.check_in.items()}
            self.ref = evaluate(job.schedule.cascade, ref_in, self.check_params, self.check_ext)[body.out.name]
        self.full = None
        self.kernels: dict[str, Callable[[], None]] = {}
        self.graph: dict[str, bool] = {}

    def _inputs(self, x: Mapping[str, int], lengths: list[int]):
        import torch
        B, G, R, E, F, M0 = (x[k] for k in ("B", "G", "R", "E", "F", "M0"))
        pages = max(1, math.ceil(max(lengths) / M0))
        blocks = B * pages
        cast = dict(dtype=self.torch_dtype, device=self.device)
        q = torch.randn((B, G, R, E), generator=self.gen).to(**cast)
        kc = torch.randn((blocks, M0, G, E), generator=self.gen).to(**cast)
        vc = torch.randn((blocks, M0, G, F), generator=self.gen).to(**cast)
        table = torch.randperm(blocks, generator=self.gen).reshape(B, pages).to(torch.int32).to(self.device)
        lens = torch.tensor(lengths, dtype=torch.int32, device=self.device)
        c = self.job.schedule.cascade
        params = {p.name: 1.0 for p in c.params}
        params["scale"] = E ** -0.5
        params.update(dict(self.job.params))
        ext = {"B": B, "G": G, "R": R, "E": E, "F": F}
        return {"Q": q, "KC": kc, "VC": vc, "BT": table, "SL": lens}, params, ext

    def sources(self, cfg: Config):
        from kascade.codegen.paged_decode import render
        body, c = self.job.schedule.kernels[0].body, self.job.schedule.cascade
        sizes = {c.rank_extent(body.head): padded_head_dim(self.x["E"]), c.rank_extent(body.vhead):
                 padded_head_dim(self.x["F"]), c.rank_extent(body.group): self.x["R"],
                 c.rank_extent(body.slot): self.x["M0"]}
        return render(self.job.schedule, cfg.replace(num_splits=1), sizes)

    def run(self, cfg: Config, inputs, params, ext, out):
        from kascade.backends.triton import run_paged_decode
        return run_paged_decode(self.sources(cfg), inputs, params, ext, cfg["num_splits"],
                                interpret=self.interpret, out=out)

    def check(self, cfg: Config) -> float:
        import torch
        ext = self.check_ext
        out = torch.full((ext["B"], ext["G"], ext["R"], ext["F"]), float("nan"), dtype=self.torch_dtype,
                         device=self.device)
        self.run(cfg, self.check_in, self.check_params, ext, out)
        got, ref = out.double().cpu(), self.ref.cpu()
        if got.isnan().any():
            raise WrongResult(f"paged decode {cfg.key()} left NaN at the check shape {ext}")
        err = (got - ref).abs().max().item()
        bar = _TOLERANCE.get(self.dtype.value, 3e-2) * max(1.0, ref.abs().max().item())
        if not err <= bar:
            raise WrongResult(f"paged decode {cfg.key()}: max |out - reference| = {err:.3g} > {bar:.3g}")
        return err

    def launcher(self, key: str) -> Callable[[], None]:
        if key in self.kernels:
            return self.kernels[key]
        import torch
        cfg = parse_config(key)
        if self.job.check:
            self.check(cfg)
        if self.full is None:
            self.full = self._inputs(self.x, [self.x["L"]] * self.x["B"])
        inputs, params, ext = self.full
        out = torch.empty((ext["B"], ext["G"], ext["R"], ext["F"]), dtype=self.torch_dtype, device=self.device)

        def run() -> None:
            self.run(cfg, inputs, params, ext, out)
        self.kernels[key] = run
        return run


def decode_measurer(schedule: Schedule, extents: Mapping[str, int], params: Mapping[str, int | float] | None = None,
                    *, device: int = 0, **job: Any) -> measure.ProcessMeasurer:
    from functools import partial
    j = DecodeJob(schedule, tuple(sorted(decode_extents(extents).items())), tuple(sorted((params or {}).items())),
                  **job)
    return measure.ProcessMeasurer(partial(measure.job_samples, DecodeState, j), device=device)
