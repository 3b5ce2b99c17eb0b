"""Which config a kernel call runs, and why (printed with ``KASCADE_DEBUG=1``).

1. a tuned record for this schedule, shape bucket, dtype, target and software versions
   (the user's database, then configs shipped with kascade, then the nearest tuned bucket);
2. otherwise the config the roofline model ranks first for this shape on this target.

The target is the GPU the tensors live on; CPU runs (the interpreter) rank for the H200.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache

import torch

from kascade.autotune.calibrate import calibrated_efficiency
from kascade.autotune.db import TuningDatabase
from kascade.autotune.lookup import lookup
from kascade.backends.model import rank_configs, schedule_sizes
from kascade.backends.targets import Target, get_target, target_for_device
from kascade.ir.errors import KascadeError
from kascade.passes.schedule import Config, Schedule

_DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
CPU_TARGET = "h200"


@lru_cache(maxsize=8)
def device_target(device: torch.device) -> Target:
    """The target table's entry for a CUDA device (the H200 for CPU runs)."""
    if device.type != "cuda":
        return get_target(CPU_TARGET)
    props = torch.cuda.get_device_properties(device)
    try:
        return target_for_device(props.major, props.minor, props.multi_processor_count, props.total_memory)
    except KascadeError:
        return get_target(CPU_TARGET)


@lru_cache(maxsize=1)
def _database() -> TuningDatabase:
    return TuningDatabase()


def choose_config(schedule: Schedule, extents: Mapping[str, int], dtype: torch.dtype, device: torch.device,
                  params: Mapping[str, int | float] | None = None, db: TuningDatabase | None = None,
                  compiles_cleanly: Callable[[Config, Target], str | None] | None = None,
                  tries: int = 8, fallback: Callable[[], tuple[Config, str]] | None = None) -> tuple[Config, str]:
    """``(config, why)`` for one kernel call of ``schedule`` at ``extents`` (for paged decode, the
    sizes of :func:`~kascade.backends.model.decode_extents`).

    ``compiles_cleanly(config, target)``, when given, compiles a candidate ahead of time and
    says why it is unusable (spills, does not fit) or None: the model's ranking is walked
    until a candidate passes (at most ``tries``), since the model's register and shared-memory
    estimates are only estimates; then ``fallback()`` (a family's known-clean default) if given."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = schedule_sizes(schedule, extents, itemsize)
    target = device_target(device)
    found = lookup(schedule, extents, _DTYPE_NAMES[dtype], target, db or _database(), sizes=sizes)
    if found is not None:
        return found
    # the target's calibrated efficiency factors when `kascade calibrate` stored some
    ranked = rank_configs(schedule, extents, target, itemsize, params,
                          eff=calibrated_efficiency(target, db or _database()))
    if not ranked:
        if fallback is not None:
            cfg, why = fallback()
            return cfg, f"default ({why}): the cost model has no feasible candidate"
        raise KascadeError(f"no feasible config for {schedule.key()} at {dict(extents)}")
    rejected = []
    for i, (pred, cfg) in enumerate(ranked[:tries] if compiles_cleanly else ranked[:1]):
        why_not = compiles_cleanly(cfg, target) if compiles_cleanly else None
        if why_not is None:
            skipped = f"; skipped {'; '.join(rejected)}" if rejected else ""
            return cfg, (f"cost model's #{i + 1} of {len(ranked)} on {target.name}: {pred.seconds * 1e6:.1f} us "
                         f"predicted, {pred.bound}-bound{skipped}")
        rejected.append(f"{cfg.key()} ({why_not})")
    if fallback is not None:
        cfg, why = fallback()
        return cfg, f"default ({why}): none of the cost model's first {tries} compiles cleanly: " + "; ".join(rejected)
    raise KascadeError(f"none of the cost model's first {tries} configs compiles cleanly for {target.name}: "
                       + "; ".join(rejected))


@lru_cache(maxsize=512)
def _compile(src, target: Target, divisible: tuple[str, ...] = ()):
    from kascade.backends.aot import compile_kernel
    return compile_kernel(src, target, divisible=divisible)


def _kernels_to_check(schedule: Schedule, sizes: Mapping[str, int]) -> Callable[[Config], list]:
    """``config -> [(source, divisible args)]``: the kernels whose resources depend on the config.
    Paged decode: the partial kernel (the merge's do not). MoE: both grouped GEMMs, with strides
    and dims marked divisible by 16 where ``D`` and ``F`` are, as the JIT would see them."""
    family = schedule.kernels[0].family
    if family == "paged_decode_partial":
        from kascade.codegen.paged_decode import render as render_decode
        return lambda cfg: [(render_decode(schedule, cfg.replace(num_splits=1), sizes).partial, ())]
    if family == "moe_gate_up":
        from kascade.codegen.moe_grouped_gemm import render as render_moe
        aligned = all(v % 16 == 0 for v in sizes.values())

        def moe(cfg: Config) -> list:
            srcs = render_moe(schedule, cfg, sizes)
            return [(src, tuple(a.name for a in src.args if aligned and (a.kind == "stride" or a.name in
                                                                         ("hidden", "inner"))))
                    for src in (srcs.gate_up, srcs.down)]
        return moe
    from kascade.codegen.attention_prefill import render
    return lambda cfg: [(render(schedule, cfg, sizes), ())]


def aot_check(schedule: Schedule, sizes: Mapping[str, int]) -> Callable[[Config, Target], str | None]:
    """A ``compiles_cleanly`` that renders the candidate and compiles it ahead of time for the
    target with Triton: unusable if a kernel fails, does not fit, or spills registers. ``sizes``
    are the render sizes of the family's emitter."""
    kernels = _kernels_to_check(schedule, dict(sizes))

    def check(cfg: Config, target: Target) -> str | None:
        for src, divisible in kernels(cfg):
            k = _compile(src, target, divisible)
            if not k.ok:
                return f"{src.name} does not compile: {(k.error or '').splitlines()[0][:100]}"
            if not k.fits:
                return k.reason
            if k.spills:
                return f"{src.name} spills {k.stack_bytes + k.local_bytes} bytes per thread"
        return None
    return check
