"""``kascade.compile``: a cascade (text or value) to a callable over tensors by name.

    kern = kascade.compile(open("my_attention.kc").read(), target="h200")
    out = kern(Q=q, K=k, V=v, scale=0.125)["O"]          # the cascade's own layout and names

Any cascade the code generators can lower gets a kernel: today, attention-shaped
cascades (one softmax over a key rank feeding a value sum, whatever the score
expression: masks, soft-caps, biases read from other inputs). A new variant written as
a cascade needs no new template. Cascades that no schedule matches raise a
:class:`~kascade.passes.schedule.ScheduleError` that says which part did not match.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch

from kascade.backends.aot import CompiledKernel, compile_kernel
from kascade.backends.reference import evaluate
from kascade.backends.targets import Target, get_target
from kascade.codegen.attention_prefill import KernelSource, render
from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import DType
from kascade.ir.errors import DTypeError, KascadeError
from kascade.ir.extents import bind_extents
from kascade.ir.parser import parse
from kascade.ir.settings import settings
from kascade.passes.schedule import Config, Schedule, attention_prefill_schedule, choose_config, padded_head_dim

BACKENDS = ("triton", "interpret", "reference")
_TORCH_DTYPES = {DType.F16: torch.float16, DType.BF16: torch.bfloat16, DType.F32: torch.float32}


class CompiledCascade:
    """A scheduled cascade; call it with its inputs and params by name."""

    def __init__(self, cascade: Cascade, target: Target):
        self.cascade = cascade
        self.target = target
        self.schedule: Schedule = attention_prefill_schedule(cascade)

    def __repr__(self) -> str:
        return f"CompiledCascade({self.cascade.name!r}, target={self.target.name!r})"

    # ---- sources ------------------------------------------------------------------
    def config(self, extents: Mapping[str, int], itemsize: int = 2) -> tuple[Config, str]:
        return choose_config(self.schedule, {**extents, "itemsize": itemsize})

    def source(self, extents: Mapping[str, int], config: Config | None = None, itemsize: int = 2) -> KernelSource:
        """The generated kernel for these extents (the head dims decide the tile widths)."""
        body = self.schedule.kernels[0].body
        ext = bind_extents(self.cascade, None, extents, complete=False)
        heads = {}
        for r in (body.head, body.vhead):
            x = self.cascade.rank_extent(r)
            if x not in ext:
                raise KascadeError(f"the kernel's tile widths depend on extent {x}; pass it (e.g. {x}=128)")
            heads[x] = padded_head_dim(ext[x])
        return render(self.schedule, config or self.config(ext, itemsize)[0], heads)

    def ptx(self, extents: Mapping[str, int], config: Config | None = None) -> CompiledKernel:
        """Compile ahead of time for this target (no GPU needed): PTX, cubin, registers, spills."""
        return compile_kernel(self.source(extents, config), self.target)

    # ---- running ------------------------------------------------------------------
    def __call__(self, *, backend: str | None = None, extents: Mapping[str, int] | None = None,
                 **named) -> dict[str, torch.Tensor]:
        c = self.cascade
        missing = [t.name for t in c.inputs if t.name not in named] + [p.name for p in c.params if p.name not in named]
        unknown = sorted(set(named) - {t.name for t in c.inputs} - {p.name for p in c.params})
        if missing or unknown:
            raise KascadeError(f"inputs and params by name: missing {missing}, unknown {unknown}; this cascade "
                               f"takes {[t.name for t in c.inputs] + [p.name for p in c.params]}")
        inputs = {t.name: named[t.name] for t in c.inputs}
        params = {p.name: named[p.name] for p in c.params}
        first = inputs[c.inputs[0].name]
        backend = backend or ("triton" if first.device.type == "cuda" else "reference")
        if backend not in BACKENDS:
            raise KascadeError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
        if backend == "reference":
            outs = evaluate(c, inputs, params, extents)
            return {k: v.to(first.dtype) if v.is_floating_point() else v for k, v in outs.items()}
        for t in c.inputs:  # the kernel is specialised to the declared dtypes
            want = _TORCH_DTYPES.get(t.dtype)
            if want is not None and inputs[t.name].dtype != want:
                raise DTypeError(f"input {t.name} is declared {t.dtype} but given {inputs[t.name].dtype}; the "
                                 f"generated kernel takes {want} (backend='reference' accepts any float dtype)")
        ext = bind_extents(c, {n: tuple(t.shape) for n, t in inputs.items()}, extents)
        config, why = self.config(ext, first.element_size())
        src = self.source(ext, config, first.element_size())
        if settings().debug:
            print(f"kascade.compile: backend={backend} kernel={src.name} config={config.key()} ({why})",
                  file=sys.stderr)
        from kascade.backends.triton import run
        return {src.output.name: run(src, inputs, params, ext, interpret=backend == "interpret")}


def compile(cascade: str | Cascade, target: str | Target = "h200") -> CompiledCascade:  # noqa: A001
    """Schedule ``cascade`` (IR text or a :class:`Cascade`) for ``target``; see the module docstring."""
    if isinstance(cascade, str):
        cascade = parse(cascade)
    if not isinstance(cascade, Cascade):
        raise KascadeError(f"kascade.compile takes cascade text or a Cascade, got {type(cascade).__name__}")
    return CompiledCascade(cascade, target if isinstance(target, Target) else get_target(target))
