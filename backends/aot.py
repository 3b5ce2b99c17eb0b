"""Ahead-of-time compilation of generated kernels for ``sm_80`` and ``sm_90a``, without a GPU.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))``
runs Triton's whole pipeline down to PTX and a cubin. Shared memory comes from the
compiled metadata (dynamic) plus the cubin's static allocation; registers per thread and
stack / local memory (spills) from ``cuobjdump --dump-resource-usage`` on the cubin. The result
says whether the config fits the target; an over-limit config or a failed compile is
returned as data (``fits=False`` / ``ok=False`` with the reason), never raised, so a
search can score it as infinitely slow and move on.

The signature models the common layout: 16-byte aligned pointers, unit stride on each
tensor's innermost dim (what Triton's JIT specialises for contiguous inputs), other
strides and extents as ``i32``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from kascade.backends.targets import Target, get_target
from kascade.backends.triton import kernel
from kascade.codegen.source import KernelSource
from kascade.ir.dtypes import DType
from kascade.ir.errors import KascadeError

_POINTEE = {DType.F16: "fp16", DType.BF16: "bf16", DType.F32: "fp32", DType.F64: "fp64", DType.I32: "i32",
            DType.I64: "i64", DType.BOOL: "i1"}
_SCALAR = {DType.F32: "fp32", DType.F64: "fp64", DType.I32: "i32", DType.I64: "i64", DType.BOOL: "i1"}
REGISTERS_PER_THREAD = 255
REGISTERS_PER_BLOCK = 65536


@dataclass(frozen=True)
class GpuTarget:
    name: str                # "sm_80"
    capability: int          # 80
    shared_per_block: int    # bytes of shared memory a block may use (opt-in maximum)
    example: str


# An architecture name means the table's reference chip for it (shared-memory limit included).
_ARCH_TARGETS = {"sm_80": "a100-80gb", "sm_90a": "h100-sxm"}


@dataclass(frozen=True)
class CompiledKernel:
    """What compiling one kernel variant for one target produced. ``ok`` is False when the
    compile failed (``error`` says why; the other fields are empty); ``fits`` says whether a
    block can launch on the target (``reason`` names the limit it exceeds)."""
    name: str
    target: str
    ok: bool
    error: str | None = None
    ptx: str = ""
    cubin: bytes = b""
    shared_bytes: int = 0      # dynamic (Triton's allocation) + static, per block
    registers: int = 0         # per thread
    stack_bytes: int = 0       # per-thread stack frame: where ptxas puts what does not fit in registers
    local_bytes: int = 0       # other local memory per thread
    num_warps: int = 0
    num_stages: int = 0
    fits: bool = False
    reason: str | None = None

    @property
    def spills(self) -> bool:
        """Registers spilled to (slow, off-chip) local memory: a performance problem, not a limit."""
        return self.stack_bytes + self.local_bytes > 0


def signature(src: KernelSource) -> tuple[dict[str, str], dict[str, int]]:
    """Triton's ``(signature, constexprs)`` for ``src``, modelling contiguous innermost dims."""
    ranks = {a.ref: a.dim for a in src.args if a.kind == "stride"}   # last stride seen is the innermost dim
    sig, consts = {}, dict(src.constexprs)
    for a in src.args:
        if a.kind == "pointer":
            sig[a.name] = "*" + _POINTEE[a.dtype]
        elif a.kind == "stride" and a.dim == ranks[a.ref]:
            sig[a.name], consts[a.name] = "constexpr", 1
        elif a.kind in ("stride", "extent"):
            sig[a.name] = "i32"
        else:
            sig[a.name] = _SCALAR[a.dtype]
    for name in dict(src.constexprs):
        sig[name] = "constexpr"
    return sig, consts


def gpu_target(target) -> GpuTarget:
    """``"sm_80"`` / ``"sm_90a"``, a target name from ``backends.targets`` (``"h200"``), or a
    :class:`~kascade.backends.targets.Target`."""
    if isinstance(target, GpuTarget):
        return target
    if isinstance(target, str):
        target = get_target(_ARCH_TARGETS.get(target, target))
    if not isinstance(target, Target):
        raise KascadeError(f"a compile target is 'sm_80', 'sm_90a', a target name or a Target, got {target!r}")
    major, minor = target.compute_capability
    return GpuTarget(target.arch, 10 * major + minor, target.smem_per_block, target.name)


def compile_kernel(src: KernelSource, target="sm_90a", *, divisible: Collection[str] = ()) -> CompiledKernel:
    """Compile ``src`` for ``target`` (see :func:`gpu_target`) and report resources and fit.

    ``divisible`` names integer arguments (strides, extents) to mark divisible by 16, as
    Triton's JIT specialises an argument whose value is a multiple of 16: what lets it
    vectorise the masked loads of a GEMM's tiles and pipeline them. Without it the compile
    models arbitrary values."""
    t = gpu_target(target)
    target = t.name
    base = dict(name=src.name, target=target, num_warps=src.num_warps, num_stages=src.num_stages)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = kernel(src, interpret=False)
        sig, consts = signature(src)
        aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(src.args)
                   if a.kind == "pointer" or (a.name in divisible and sig[a.name] == "i32")}
        compiled = triton.compile(ASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", t.capability, 32),
                                  options=dict(num_warps=src.num_warps, num_stages=src.num_stages,
                                               enable_fp_fusion=True))
    except Exception as e:  # a failed compile is a result: the search scores it and moves on
        return CompiledKernel(**base, ok=False, error=f"{type(e).__name__}: {e}".strip()[:4000],
                              reason="compile failed")
    cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
    usage = resource_usage(cubin)
    shared = int(compiled.metadata.shared) + usage.get("SHARED", 0)
    regs = usage.get("REG", 0)
    threads = 32 * src.num_warps
    reason = None
    if shared > t.shared_per_block:
        reason = f"needs {shared} bytes of shared memory per block; {target} ({t.example}) has {t.shared_per_block}"
    elif regs > REGISTERS_PER_THREAD:
        reason = f"needs {regs} registers per thread; at most {REGISTERS_PER_THREAD}"
    elif regs * threads > REGISTERS_PER_BLOCK:
        reason = f"{regs} registers x {threads} threads exceed {REGISTERS_PER_BLOCK} registers per block"
    elif not usage:
        reason = "cuobjdump found no resource usage for the kernel"
    return CompiledKernel(**base, ok=True, ptx=ptx, cubin=cubin, shared_bytes=shared, registers=regs,
                          stack_bytes=usage.get("STACK", 0), local_bytes=usage.get("LOCAL", 0), fits=reason is None,
                          reason=reason)


def cuobjdump() -> Path | None:
    """The ``cuobjdump`` shipped inside the triton package, else one on ``PATH``."""
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return bundled
    found = shutil.which("cuobjdump")
    return Path(found) if found else None


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}`` of the (single) kernel in ``cubin``;
    empty when ``cuobjdump`` is missing or reports nothing."""
    tool = cuobjdump()
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                             timeout=120)
    line = next((x for x in res.stdout.splitlines() if "REG:" in x), "")
    return {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line) if "[" not in k}
