"""GPU measurement of MoE grouped-GEMM configs (runs in the isolated worker, like prefill's).

A :class:`MoeJob` is one MoE shape (``T`` tokens, ``K`` experts per token, ``E`` experts,
hidden ``D``, FFN ``F``) with routing drawn once from random router logits (fixed seed), so
every config sees the same expert loads. Each config first runs at a small check shape (same
D, F, E, K; 37 tokens) with a poisoned output and is compared with a float64 loop over
experts, then is timed by :func:`~kascade.autotune.measure.job_samples` (routing
bookkeeping included: it depends on BLOCK_M).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kascade.autotune import measure
from kascade.autotune.measure import MeasureJob, WrongResult
from kascade.autotune.space import parse_config
from kascade.backends.model import input_dtype
from kascade.passes.schedule import Schedule

_TOLERANCE = {"bf16": 3e-2, "f16": 5e-3, "f32": 1e-4}
CHECK_TOKENS = 37


MoeJob = MeasureJob   # schedule, extents, params, seed and the timing options


def expert_loop(x, w1, w2, topk_weights, topk_ids):
    """The plain float64 formulation: each expert's tokens through silu(gate) * up, then down."""
    import torch
    x, w1, w2 = x.double(), w1.double(), w2.double()
    F = w2.shape[2]
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel():
            h = x[tok] @ w1[e].T
            act = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
            y.index_add_(0, tok, (act @ w2[e].T) * topk_weights.double()[tok, slot, None])
    return y


class MoeState:
    """Inputs, reference and launchers of one MoE job (``interpret``: CPU, check only)."""

    def __init__(self, job: MoeJob, interpret: bool = False):
        import torch
        self.job, self.interpret = job, interpret
        self.device = torch.device("cpu") if interpret else torch.device("cuda", measure._DEVICE or 0)
        self.dtype = input_dtype(job.schedule)
        self.torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[self.dtype.value]
        self.gen = torch.Generator().manual_seed(job.seed)
        self.x = dict(job.extents)
        self.check_in = self._inputs(CHECK_TOKENS)
        if job.check:
            self.ref = expert_loop(*self.check_in).cpu()
        self.full = None
        self.kernels: dict[str, Callable[[], None]] = {}
        self.graph: dict[str, bool] = {}

    def _inputs(self, tokens: int):
        import torch
        E, K, D, F = (self.x[k] for k in ("E", "K", "D", "F"))
        cast = dict(dtype=self.torch_dtype, device=self.device)
        x = torch.randn((tokens, D), generator=self.gen).to(**cast)
        w1 = (torch.randn((E, 2 * F, D), generator=self.gen) * D ** -0.5).to(**cast)
        w2 = (torch.randn((E, D, F), generator=self.gen) * F ** -0.5).to(**cast)
        probs = torch.softmax(torch.randn((tokens, E), generator=self.gen), -1)
        weights, ids = probs.topk(K, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        return x, w1, w2, weights.to(self.device), ids.to(torch.int32).to(self.device)

    def run(self, key: str, inputs, out):
        from kascade.backends.moe_triton import run_moe_triton
        return run_moe_triton(*inputs, parse_config(key), interpret=self.interpret, out=out,
                              schedule=self.job.schedule)

    def check(self, key: str) -> float:
        import torch
        out = torch.full((CHECK_TOKENS, self.x["D"]), float("nan"), dtype=self.torch_dtype, device=self.device)
        self.run(key, self.check_in, out)
        got = out.double().cpu()
        if got.isnan().any():
            raise WrongResult(f"moe {key} left NaN at the check shape ({CHECK_TOKENS} tokens)")
        err = (got - self.ref).abs().max().item()
        bar = _TOLERANCE.get(self.dtype.value, 3e-2) * max(1.0, self.ref.abs().max().item())
        if not err <= bar:
            raise WrongResult(f"moe {key}: max |out - reference| = {err:.3g} > {bar:.3g}")
        return err

    def launcher(self, key: str) -> Callable[[], None]:
        if key in self.kernels:
            return self.kernels[key]
        import torch
        if self.job.check:
            self.check(key)
        if self.full is None:
            self.full = self._inputs(self.x["T"])
        out = torch.empty((self.x["T"], self.x["D"]), dtype=self.torch_dtype, device=self.device)

        def run() -> None:
            self.run(key, self.full, out)
        self.kernels[key] = run
        return run


def moe_measurer(schedule: Schedule, extents: Mapping[str, int], params: Mapping[str, int | float] | None = None,
                 *, device: int = 0, **job: Any) -> measure.ProcessMeasurer:
    from functools import partial
    ext = tuple(sorted((k, int(extents[k])) for k in ("T", "K", "E", "D", "F")))
    return measure.ProcessMeasurer(partial(measure.job_samples, MoeState, MoeJob(schedule, ext, **job)),
                                   device=device)
