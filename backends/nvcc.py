"""Ahead-of-time compilation of CUDA C++ with ``nvcc``: cubins and their resource usage, no GPU needed.

``compile_cuda(source, "sm_90a")`` runs ``nvcc -cubin -O3 -arch=sm_90a -lineinfo -Xptxas -v`` and
returns a frozen :class:`CudaCompileResult`: the cubin, and per kernel the registers per thread,
static shared memory, spill stores / loads and stack frame that ptxas reports. A source that
does not compile is a result too (``ok`` false, ``error`` the compiler's message): a tuner scores
it infinity rather than aborting. A missing ``nvcc`` raises :class:`NvccNotFoundError`.

Results are cached by a hash of the source, the arch, the options and the nvcc version: in
memory for the process and on disk under ``$KASCADE_CACHE_DIR/kernels/nvcc`` (else
``~/.cache/kascade/kernels/nvcc``), so a variant compiles once per machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from kascade.codegen.paths import kernel_cache_dir
from kascade.ir.errors import KascadeError

ARCHS = ("sm_80", "sm_90a")
OPTIONS = ("-O3", "-lineinfo", "-std=c++17")
TIMEOUT_S = 600
CUDA_ROOTS = ("/usr/local/cuda",)  # searched after $CUDA_HOME and $CUDA_PATH


class NvccNotFoundError(KascadeError):
    """No ``nvcc`` to compile CUDA C++ with."""


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one ``__global__`` function (bytes, except registers)."""
    name: str
    registers: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    barriers: int = 0


@dataclass(frozen=True)
class CudaCompileResult:
    """The outcome of one compile: a cubin and its resources, or the compiler's error."""
    arch: str
    source_hash: str
    ok: bool
    cubin: bytes = b""
    kernels: tuple[KernelResources, ...] = ()
    log: str = ""
    error: str | None = None

    def kernel(self, name: str) -> KernelResources:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(f"no kernel {name!r} in this cubin; it has {[k.name for k in self.kernels]}")


def find_nvcc() -> str:
    """The path of ``nvcc``: on PATH, else under ``$CUDA_HOME`` / ``$CUDA_PATH`` / ``/usr/local/cuda``."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *CUDA_ROOTS):
        if root and os.access(Path(root, "bin", "nvcc"), os.X_OK):
            return str(Path(root, "bin", "nvcc"))
    raise NvccNotFoundError("nvcc (the CUDA toolkit's compiler) was not found on PATH, under $CUDA_HOME, $CUDA_PATH "
                            "or /usr/local/cuda; install the CUDA toolkit (12.x or 13.x) or put nvcc on PATH")


@functools.cache
def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "unknown"


def cache_dir() -> Path:
    """Cubins and their resource reports, beside the generated sources."""
    return kernel_cache_dir() / "nvcc"


_FUNCTION = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> tuple[KernelResources, ...]:
    """Per-entry resources from ``-Xptxas -v`` output (``Compiling entry function 'k'``, then its
    ``Function properties`` frame line and its ``Used N registers, ... M bytes smem`` line)."""
    frames: dict[str, tuple[int, int, int]] = {}
    usage: dict[str, tuple[int, int, int]] = {}
    entries: list[str] = []
    current_fn = current_entry = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current_entry = m.group(1)
            entries.append(current_entry)
        elif m := _FUNCTION.search(line):
            current_fn = m.group(1)
        elif (m := _FRAME.search(line)) and current_fn:
            frames[current_fn] = tuple(int(x) for x in m.groups())
        elif (m := _USED.search(line)) and current_entry:
            barriers, smem = _BARRIERS.search(line), _SMEM.search(line)
            usage[current_entry] = (int(m.group(1)), int(smem.group(1)) if smem else 0,
                                    int(barriers.group(1)) if barriers else 0)
    out = []
    for name in entries:
        if name not in usage:
            continue
        regs, smem, barriers = usage[name]
        stack, stores, loads = frames.get(name, (0, 0, 0))
        out.append(KernelResources(name, regs, smem, stores, loads, stack, barriers))
    return tuple(sorted(out, key=lambda k: k.name))


_memory: dict[str, CudaCompileResult] = {}
_lock = threading.Lock()


def _key(source: str, arch: str, options: tuple[str, ...], version: str) -> str:
    return hashlib.sha256("\0".join((source, arch, *options, version)).encode()).hexdigest()


def _load(path: Path) -> CudaCompileResult | None:
    meta = path.with_suffix(".json")
    if not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text())
        kernels = tuple(KernelResources(**k) for k in data.pop("kernels"))
        cubin = path.read_bytes() if data["ok"] else b""
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged entry is recompiled
    return CudaCompileResult(cubin=cubin, kernels=kernels, **data)


def _store(path: Path, result: CudaCompileResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in asdict(result).items() if k not in ("cubin", "kernels")}
    data["kernels"] = [asdict(k) for k in result.kernels]
    if result.ok:
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(result.cubin)
        os.replace(tmp, path)
    tmp = path.with_suffix(f".jtmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path.with_suffix(".json"))  # written last: its presence marks a complete entry


def compile_cuda(source: str, arch: str = "sm_90a", *, options: tuple[str, ...] = OPTIONS,
                 use_cache: bool = True) -> CudaCompileResult:
    """Compile ``source`` to a cubin for ``arch`` (``sm_80``, ``sm_90a``, ...) and report its
    kernels' resources; a compile error comes back as data. Thread-safe."""
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise KascadeError(f"arch {arch!r} is not a real GPU architecture; accepted: sm_<number>[a], e.g. {ARCHS}")
    nvcc = find_nvcc()
    key = _key(source, arch, options, nvcc_version(nvcc))
    path = cache_dir() / f"{key[:32]}-{arch}.cubin"
    if use_cache:
        with _lock:
            hit = _memory.get(key)
        if hit is None:
            hit = _load(path)
        if hit is not None:
            with _lock:
                _memory[key] = hit
            return hit
    with tempfile.TemporaryDirectory(prefix="kascade-nvcc-") as tmp:
        src, out = Path(tmp, "kernel.cu"), Path(tmp, "kernel.cubin")
        src.write_text(source)
        cmd = [nvcc, "-cubin", f"-arch={arch}", *options, "-Xptxas", "-v", "-o", str(out), str(src)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            result = CudaCompileResult(arch, key, False, log="", error=f"nvcc timed out after {TIMEOUT_S} s")
            return result
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or not out.is_file():
            result = CudaCompileResult(arch, key, False, log=log, error=log.strip() or f"nvcc exit {proc.returncode}")
        else:
            result = CudaCompileResult(arch, key, True, out.read_bytes(), parse_ptxas_log(log), log)
    if use_cache:
        with _lock:
            _memory[key] = result
        try:
            _store(path, result)
        except OSError:
            pass  # an unwritable cache costs a recompile next time, nothing else
    return result
