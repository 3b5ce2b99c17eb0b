"""The CUDA paged-decode kernels (split-KV partials + merge): rendering, nvcc builds, launcher, numerics.

Without a GPU: every variant family renders and compiles with nvcc for sm_80 and sm_90a within
its register budget and without spills; the launcher's checks raise kascade errors; and the
numerics suite runs the *generated CUDA source* on the CPU: g++ builds it against a small shim
(one std::thread per CUDA thread, barriers for ``__syncthreads`` and the warp shuffles, C++ for
the few lines of inline PTX) and the launcher drives it through its usual path. On a GPU the
same suite reruns through CuPy (``TestNumericsGPU`` subclasses ``TestNumericsHostEmulation``).
The oracle is the float64 evaluator on ``kascade.ir.library.decode.paged_decode``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import kascade.backends.cuda as cuda_backend
from kascade.backends import nvcc
from kascade.backends.reference import evaluate
from kascade.codegen.cuda_expr import CudaEmitError, cuda_literal, emit_cuda
from kascade.codegen.paged_decode_cuda import (
    PagedDecodeParams,
    default_params,
    render,
    score_epilogue,
    write_source,
)
from kascade.ir import DTypeError, KascadeError, ShapeError, access, param, sum_, tanh
from kascade.ir.cascade import Param
from kascade.ir.dtypes import DType
from kascade.ir.errors import CodegenError
from kascade.ir.expr import Op
from kascade.ir.library.decode import paged_decode

BF16, F16, F32 = DType.BF16, DType.F16, DType.F32
ARCHS = ("sm_80", "sm_90a")
TORCH_DTYPES = {BF16: torch.bfloat16, F16: torch.float16, F32: torch.float32}

# (dtype, D, Dv, page size, R, softcap): every dtype, head dims 64/128/256/96/80, pages 1/16/5,
# R 1/4/7 (and 16, the largest), softcap on and off
VARIANTS = [
    (BF16, 128, 128, 16, 4, False), (BF16, 128, 128, 16, 4, True), (BF16, 64, 64, 1, 1, False),
    (BF16, 256, 256, 5, 7, True), (BF16, 96, 96, 16, 7, False), (BF16, 80, 80, 5, 1, True),
    (BF16, 128, 64, 16, 4, False), (BF16, 128, 128, 16, 16, False),
    (F16, 128, 128, 16, 7, False), (F16, 64, 64, 5, 4, True), (F16, 256, 256, 1, 1, False),
    (F16, 80, 80, 16, 4, False),
    (F32, 128, 128, 16, 4, False), (F32, 96, 96, 1, 7, True), (F32, 256, 256, 16, 1, True),
    (F32, 64, 64, 5, 7, False),
]


def variant(dtype, d, dv, page, r, softcap) -> PagedDecodeParams:
    return default_params(dtype, d, dv, page, r, softcap)


pytestmark = pytest.mark.usefixtures("kascade_cache_dir")   # tests/conftest.py: a fresh cache per module


@pytest.fixture(scope="module")
def compiled(kascade_cache_dir):
    """Every variant compiled for every arch, one nvcc process per core."""
    try:
        nvcc.find_nvcc()
    except nvcc.NvccNotFoundError as e:
        pytest.skip(str(e))
    jobs = [(variant(*v), arch) for v in VARIANTS for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = pool.map(lambda job: nvcc.compile_cuda(render(job[0]).code, job[1]), jobs)
        return dict(zip(jobs, results))


# ---- rendering and nvcc builds ----------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", VARIANTS, ids=lambda v: variant(*v).name)
def test_variant_compiles_within_budget(spec, arch, compiled):
    params = variant(*spec)
    result = compiled[params, arch]
    assert result.ok, result.error
    assert result.cubin[:4] == b"\x7fELF"
    src = render(params)
    partial, merge = result.kernel(src.partial_kernel), result.kernel(src.merge_kernel)
    for k in (partial, merge):
        assert 0 < k.registers <= 255
        assert (k.spill_stores, k.spill_loads, k.stack_frame) == (0, 0, 0), k
    # the block's shared memory: per-group max and sum, and the R x Dv numerator being merged
    groups = params.threads // params.lanes_per_row
    assert partial.shared_bytes >= 4 * (2 * groups * params.group_size + params.group_size * params.head_dim_v)
    assert partial.barriers >= 1


def test_source_reads_rows_with_16_byte_vector_loads():
    code = render(variant(BF16, 128, 128, 16, 4, False)).code
    assert "ld.global.nc.v4.u32" in code
    assert "load_16B(krow + c * VEC)" in code and "load_16B(vrow + c * VEC)" in code
    assert "#include" not in code  # NVRTC and nvcc alike, no toolkit headers needed
    assert 'extern "C" __global__' in code


def test_lane_layout():
    p = variant(BF16, 128, 128, 16, 4, False)
    assert (p.vec, p.lanes_per_row, p.row_groups, p.k_chunks, p.v_chunks) == (8, 16, 8, 1, 1)
    p = variant(F32, 256, 256, 16, 1, False)  # 64 chunks of 4 floats: 2 per lane of a full warp
    assert (p.vec, p.lanes_per_row, p.k_chunks) == (4, 32, 2)
    p = variant(BF16, 80, 80, 5, 1, False)  # 10 chunks: 16 lanes, 6 idle
    assert (p.lanes_per_row, p.k_chunks) == (16, 1)


def test_rendering_is_deterministic_and_written_only_when_changed(tmp_path):
    params = variant(F16, 96, 96, 5, 7, True)
    render.cache_clear()
    first = render(params)
    render.cache_clear()
    assert render(params).code == first.code
    path = write_source(first, tmp_path)
    assert path.name == f"{params.name}.cu" and path.read_text() == first.code
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    write_source(render(params), tmp_path)
    assert path.stat().st_mtime_ns == 1_000_000_000, "an unchanged source was rewritten"
    changed = dataclasses.replace(first, code=first.code + "// changed\n")
    write_source(changed, tmp_path)
    assert path.read_text().endswith("// changed\n")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


def test_write_source_defaults_to_the_kascade_cache_dir(kascade_cache_dir):
    path = write_source(render(variant(BF16, 64, 64, 1, 1, False)))
    assert str(path).startswith(kascade_cache_dir) and path.parent.name == "kernels"


def test_variant_names_are_readable_unique_and_filename_safe():
    names = {variant(*v).name for v in VARIANTS}
    assert len(names) == len(VARIANTS)
    assert variant(BF16, 128, 128, 16, 4, False).name == "paged_decode_bf16_d128_dv128_bs16_r4_t128_u2"
    assert all(n.replace("_", "").isalnum() for n in names)


@pytest.mark.parametrize("kwargs, error, says", [
    (dict(dtype=DType.I32), DTypeError, "bf16, f16, f32"),
    (dict(head_dim=100), CodegenError, "multiples of 8 from 8 to 256"),
    (dict(head_dim_v=264), CodegenError, "multiples of 8 from 8 to 256"),
    (dict(block_size=0), CodegenError, "any positive int"),
    (dict(group_size=17), CodegenError, "1 to 16"),
    (dict(threads=100), CodegenError, "threads=100"),
    (dict(tokens_per_group=3), CodegenError, "tokens_per_group=3"),
    (dict(dtype=F32, head_dim=256, head_dim_v=256, group_size=16), CodegenError, "registers"),
])
def test_bad_params_say_what_is_accepted(kwargs, error, says):
    base = dict(dtype=BF16, head_dim=128, head_dim_v=128, block_size=16, group_size=4)
    with pytest.raises(error, match=says):
        PagedDecodeParams(**{**base, **kwargs})


# ---- the IR -> C++ emitter ---------------------------------------------------------------
def test_score_epilogue_is_emitted_from_ir():
    names = {"S": "S", "scale": "scale", "softcap": "softcap"}
    assert emit_cuda(score_epilogue(False), names) == "(S * scale)"
    assert emit_cuda(score_epilogue(True), names) == "(softcap * tanhf(((S * scale) / softcap)))"
    assert "tanhf(((S * scale) / softcap))" in render(variant(BF16, 64, 64, 1, 1, True)).code


def test_cuda_emitter_tables_and_errors():
    x = param("x")
    assert emit_cuda(x * 2.0 + 1, {"x": "v"}) == "((v * 2.0f) + 1)"
    assert emit_cuda(tanh(-x), {"x": "v"}) == "tanhf((-v))"
    assert cuda_literal(float("-inf")) == "__int_as_float(0xff800000)"
    assert cuda_literal(1e-5) == "1e-05f" and cuda_literal(True) == "true"
    with pytest.raises(CudaEmitError, match="'//'"):
        emit_cuda(x // 2, {"x": "v"})
    with pytest.raises(CudaEmitError, match="'reduce'"):
        emit_cuda(sum_("e", access("Q", param("e"))), {})
    with pytest.raises(CudaEmitError, match="'y'"):
        emit_cuda(x + param("y"), {"x": "v"})
    assert isinstance(CudaEmitError("op"), KascadeError)


# ---- nvcc as a library --------------------------------------------------------------------
def test_compile_error_is_data_not_an_exception():
    try:
        nvcc.find_nvcc()
    except nvcc.NvccNotFoundError as e:
        pytest.skip(str(e))
    result = nvcc.compile_cuda('extern "C" __global__ void k() { undefined_name(); }', "sm_80")
    assert not result.ok and result.cubin == b"" and "undefined_name" in result.error


def test_missing_nvcc_is_a_kascade_error(monkeypatch):
    monkeypatch.setattr(nvcc.shutil, "which", lambda name: None)
    monkeypatch.setattr(nvcc, "CUDA_ROOTS", ())
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with pytest.raises(nvcc.NvccNotFoundError, match="install the CUDA toolkit"):
        nvcc.compile_cuda("", "sm_80")


def test_ptxas_log_parsing():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'b' for 'sm_90a'
ptxas info    : Function properties for b
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2304 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'a' for 'sm_90a'
ptxas info    : Function properties for a
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
"""
    assert nvcc.parse_ptxas_log(log) == (nvcc.KernelResources("a", 8, 0, 0, 0, 0, 0),
                                         nvcc.KernelResources("b", 40, 2304, 4, 12, 8, 1))


def test_compiles_are_cached_by_source_hash(compiled, monkeypatch):
    params = variant(*VARIANTS[0])
    code = render(params).code
    monkeypatch.setattr(nvcc.subprocess, "run", lambda *a, **k: pytest.fail("recompiled a cached source"))
    again = nvcc.compile_cuda(code, "sm_90a")
    assert again == compiled[params, "sm_90a"]
    monkeypatch.setattr(nvcc, "_memory", {})  # as in a new process: the on-disk entry serves
    assert nvcc.compile_cuda(code, "sm_90a") == again


# ---- the launcher's checks (no GPU needed) --------------------------------------------------
def _small_inputs(dtype=torch.bfloat16, B=2, Hkv=2, R=2, D=64, Dv=64, page=4, blocks=3, device="cpu"):
    q = torch.randn(B, Hkv * R, D, dtype=dtype, device=device)
    kc = torch.randn(B * blocks, page, Hkv, D, dtype=dtype, device=device)
    vc = torch.randn(B * blocks, page, Hkv, Dv, dtype=dtype, device=device)
    bt = torch.arange(B * blocks, dtype=torch.int32, device=device).view(B, blocks)
    sl = torch.full((B,), page * blocks, dtype=torch.int32, device=device)
    return q, kc, vc, bt, sl


def test_cpu_tensors_are_a_clear_device_error():
    with pytest.raises(cuda_backend.DeviceError, match="one CUDA device.*q on cpu"):
        cuda_backend.paged_decode_attention_cuda(*_small_inputs())


def test_missing_cupy_is_a_clear_install_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(cuda_backend.CupyMissingError, match=r"pip install cupy-cuda13x"):
        cuda_backend.import_cupy()


def test_importing_the_backend_needs_no_cupy():
    code = "import sys; sys.modules['cupy'] = None; import kascade.backends.cuda"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _bad(change):
    q, kc, vc, bt, sl = _small_inputs()
    args = dict(q=q, k_cache=kc, v_cache=vc, block_table=bt, seq_lens=sl)
    change(args)
    return args


@pytest.mark.parametrize("change, error, says", [
    (lambda a: a.update(q=a["q"].float()), DTypeError, "share one dtype"),
    (lambda a: a.update(q=a["q"].int(), k_cache=a["k_cache"].int(), v_cache=a["v_cache"].int()), DTypeError,
     "torch.bfloat16, torch.float16, torch.float32"),
    (lambda a: a.update(block_table=a["block_table"].float()), DTypeError, "block_table must be torch.int32"),
    (lambda a: a.update(seq_lens=a["seq_lens"].bool()), DTypeError, "seq_lens must be torch.int32"),
    (lambda a: a.update(q=a["q"][:, :, None]), ShapeError, r"expected q \(B, Hq, D\)"),
    (lambda a: a.update(q=a["q"][:, :3]), ShapeError, "Hq=3 must be R \\* Hkv"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :2]), ShapeError, "must agree"),
    (lambda a: a.update(seq_lens=a["seq_lens"][:1]), ShapeError, "one row per sequence"),
    (lambda a: a.update(q=a["q"][..., :60], k_cache=a["k_cache"][..., :60]), ShapeError,
     "D=60 is not supported; supported head dims: multiples of 8 from 8 to 256"),
    (lambda a: a.update(seq_lens=a["seq_lens"] + 1), ShapeError, r"seq_lens\[0\]=13 is outside 0..12"),
    (lambda a: a.update(seq_lens=a["seq_lens"] - 20), ShapeError, r"seq_lens\[0\]=-8 is outside"),
    (lambda a: a.update(q=[1.0]), DTypeError, "q must be a torch.Tensor"),
])
def test_bad_inputs_say_what_is_accepted(change, error, says):
    with pytest.raises(error, match=says):
        cuda_backend.paged_decode_attention_cuda(**_bad(change))


def test_default_num_splits_fills_the_gpu():
    split = cuda_backend.default_num_splits
    assert split(4 * 132 * 8, 4096, 16, 132) == 1          # already enough blocks
    assert split(8, 32768, 16, 132) == 66                   # 4 blocks per SM over 132 SMs
    assert split(8, 200, 16, 132) == 3                      # at least 64 keys per split
    assert split(1, 10, 1, 132) == 1 and split(1, 0, 16, 132) == 1
    assert split(1, 10**6, 1, 10**4) == cuda_backend.MAX_SPLITS


# ---- running the generated CUDA source on the CPU ------------------------------------------
_SHIM = r"""
#include <math.h>
#include <string.h>
#include <algorithm>
#include <barrier>
#include <cstddef>
#include <memory>
#include <thread>
#include <utility>
#include <vector>
using std::max;
using std::min;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
static thread_local dim3 threadIdx, blockIdx;
static dim3 gridDim, blockDim;
static std::barrier<>* block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
static float warp_slots[32][32];
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static  /* blocks run one at a time */
#define __align__(n) __attribute__((aligned(n)))
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
static inline float __shfl_xor_sync(unsigned, float v, int o) {
    const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
    warp_slots[w][l] = v;
    warp_barriers[w]->arrive_and_wait();
    const float r = warp_slots[w][l ^ o];
    warp_barriers[w]->arrive_and_wait();
    return r;
}
// the device primitives, in C++
static inline uint4 load_16B(const void* p) { uint4 v; memcpy(&v, p, 16); return v; }
static inline float f16_to_f32(unsigned short h) { _Float16 x; memcpy(&x, &h, 2); return (float)x; }
static inline unsigned short f32_to_f16(float f) {
    _Float16 x = (_Float16)f;
    unsigned short h; memcpy(&h, &x, 2); return h;
}
static inline unsigned short f32_to_bf16(float f) {
    unsigned u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
"""

_DRIVER = r"""
template <class... P, std::size_t... I>
static void call_packed(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<P*>(args[I])...);
}
// cuLaunchKernel's contract: args[i] points at the i-th argument's value. One OS thread per CUDA thread
// of a block, reused for every block; a barrier between blocks keeps their shared memory apart.
template <class... P>
static void run_grid(void (*kernel)(P...), unsigned gx, unsigned gy, unsigned gz, unsigned threads, void** args) {
    gridDim = {gx, gy, gz};
    blockDim = {threads, 1, 1};
    std::barrier<> block(threads);
    block_barrier = &block;
    warp_barriers.clear();
    for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([=, &block] {
            threadIdx = {t, 0, 0};
            for (unsigned z = 0; z < gz; ++z)
                for (unsigned y = 0; y < gy; ++y)
                    for (unsigned x = 0; x < gx; ++x) {
                        blockIdx = {x, y, z};
                        call_packed(kernel, args, std::index_sequence_for<P...>{});
                        block.arrive_and_wait();
                    }
        });
    for (auto& th : pool) th.join();
}
extern "C" void run_partial(unsigned gx, unsigned gy, unsigned gz, unsigned threads, void** args) {
    run_grid(PARTIAL, gx, gy, gz, threads, args);
}
extern "C" void run_merge(unsigned gx, unsigned gy, unsigned gz, unsigned threads, void** args) {
    run_grid(MERGE, gx, gy, gz, threads, args);
}
"""

_CTYPES = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32,
           np.float32: ctypes.c_float}


class EmulatedKernel:
    """A CPU stand-in for a ``cupy.RawKernel``: ``kernel(grid, block, args)`` with numpy scalars."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, grid, block, args):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        values = [_CTYPES[type(a)](a.item()) for a in args]
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        self.fn(*grid, block[0], pointers)


def _host_source(params: PagedDecodeParams) -> str:
    src = render(params)
    begin, end = "// ---- device primitives (begin)", "// ---- device primitives (end)"
    code = src.code[:src.code.index(begin)] + src.code[src.code.index(end) + len(end):]
    driver = _DRIVER.replace("PARTIAL", src.partial_kernel).replace("MERGE", src.merge_kernel)
    return _SHIM + code + driver


_emulated: dict[PagedDecodeParams, tuple[EmulatedKernel, EmulatedKernel]] = {}


@functools.cache
def _host_compiler_ready() -> bool:
    if shutil.which("g++") is None:
        return False
    probe = "#include <barrier>\nint main() { std::barrier<> b(1); _Float16 h = 1; b.arrive_and_wait(); return h > 2; }"
    out = subprocess.run(["g++", "-std=c++20", "-x", "c++", "-fsyntax-only", "-"], input=probe, capture_output=True,
                         text=True)
    return out.returncode == 0


def emulated_kernels(params: PagedDecodeParams, device_index=None):
    """The variant's kernels built for the CPU with g++ (once per session)."""
    if params not in _emulated:
        if not _host_compiler_ready():
            pytest.skip("running the kernels on the CPU needs g++ with C++20 <barrier> and _Float16 (GCC 12+)")
        source = _host_source(params)
        root = os.path.join(os.environ["KASCADE_CACHE_DIR"], "host")
        os.makedirs(root, exist_ok=True)
        lib = os.path.join(root, f"{params.name}-{hashlib.sha256(source.encode()).hexdigest()[:12]}.so")
        if not os.path.exists(lib):
            cpp = lib[:-3] + ".cpp"
            with open(cpp, "w") as f:
                f.write(source)
            cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas", "-o", lib, cpp]
            out = subprocess.run(cmd, capture_output=True, text=True)
            assert out.returncode == 0, out.stderr[-4000:]
        so = ctypes.CDLL(lib)
        for fn in (so.run_partial, so.run_merge):
            fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p]
            fn.restype = None
        _emulated[params] = EmulatedKernel(so.run_partial), EmulatedKernel(so.run_merge)
    return _emulated[params]


# ---- numerics ------------------------------------------------------------------------------
def with_softcap(cascade):
    """``cascade`` with its scores soft-capped: ``s * scale`` becomes ``softcap * tanh(s * scale / softcap)``."""
    cap = param("softcap")

    def rewrite(e):
        if e.op is Op.MUL and e.args[1] == param("scale"):
            return cap * tanh(e / cap)
        return None
    stmts = tuple(dataclasses.replace(s, expr=s.expr.rewrite(rewrite)) if s.name == "QK" else s
                  for s in cascade.stmts)
    return dataclasses.replace(cascade, params=cascade.params + (Param("softcap", DType.F32),), stmts=stmts)


def poison_unused_cache(kc, vc, bt, sl, page):
    """NaN in every cache position no valid key lives at: past each sequence's end in its last
    block, and in blocks no sequence uses. A read there that is not masked shows up as NaN."""
    used = torch.zeros(kc.shape[0], dtype=torch.bool)
    for i, n in enumerate(sl.tolist()):
        blocks = max(1, math.ceil(n / page))
        used[bt[i, :blocks].long()] = True
        last = int(bt[i, blocks - 1])
        kc[last, n - (blocks - 1) * page:] = float("nan")
        vc[last, n - (blocks - 1) * page:] = float("nan")
    kc[~used] = float("nan")
    vc[~used] = float("nan")


def lowp_reference(q, k_dense, v_dense, R, scale, softcap):
    """Attention computed in q's dtype (scores, probabilities and output rounded to it)."""
    out = torch.zeros(q.shape[0], q.shape[1], v_dense[0].shape[-1], dtype=q.dtype, device=q.device)
    for i, (k, v) in enumerate(zip(k_dense, v_dense)):
        if k.shape[0] == 0:
            continue
        k = k.to(q.device, q.dtype).repeat_interleave(R, dim=1)  # (n, Hq, D)
        v = v.to(q.device, q.dtype).repeat_interleave(R, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i], k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        p = torch.softmax(s, dim=-1).to(q.dtype)
        out[i] = torch.einsum("hn,nhd->hd", p, v)
    return out


# (dtype, D, Dv, page, R, softcap, lens, num_splits) for the suite; the emulator takes the first few
NUMERIC_CASES = [
    (F32, 64, 64, 5, 4, False, [1, 1030, 0, 77], (1, 3, 300)),
    (F16, 80, 80, 1, 7, True, [1, 1025, 37], (2, 40)),
    (BF16, 128, 128, 16, 1, True, [1, 1040, 200], (1, 4, 100)),
    (BF16, 128, 64, 16, 4, False, [1, 1030, 0, 257], (None, 7)),
    (F16, 256, 256, 16, 7, False, [1, 1500, 97], (None, 2)),
    (BF16, 96, 96, 5, 8, False, [1, 113, 1100, 3], (None, 3, 500)),
    (BF16, 64, 64, 1, 16, True, [1, 1031], (None, 5)),
]


def use_host_emulation(monkeypatch):
    """The real launcher with CuPy swapped for the CPU build of the same source (and an H100's 132 SMs)."""
    monkeypatch.setattr(cuda_backend, "_kernels", emulated_kernels)
    monkeypatch.setattr(cuda_backend, "_launch", lambda kernel, grid, block, args, device: kernel(grid, block, args))
    monkeypatch.setattr(cuda_backend, "check_devices", lambda **tensors: None)
    monkeypatch.setattr(cuda_backend, "sm_count", lambda device: 132)
    return cuda_backend


def case_id(case) -> str:
    dtype, d, dv, page, r, softcap, lens, _ = case
    return f"{dtype}-d{d}-dv{dv}-bs{page}-r{r}" + ("-softcap" if softcap else "") + f"-{len(lens)}seqs"


class TestNumericsHostEmulation:
    """The generated kernels, run through the launcher, against the float64 evaluator."""
    CASES = NUMERIC_CASES[:4]
    DEVICE = "cpu"

    @pytest.fixture
    def launcher(self, monkeypatch):
        return use_host_emulation(monkeypatch)

    @pytest.fixture(params=CASES, ids=case_id)
    def case(self, request):
        return request.param

    def test_output_matches_the_float64_cascade(self, launcher, case, paged_cache, gen):
        dtype, D, Dv, page, R, softcap, lens, splits = case
        G = 2
        kc64, vc64, bt, sl, k_dense, v_dense = paged_cache(lens, page, G, D, Dv, gen)
        tdtype = TORCH_DTYPES[dtype]
        q64 = torch.randn(len(lens), G * R, D, generator=gen, dtype=torch.float64)
        q, kc, vc = (t.to(tdtype) for t in (q64, kc64, vc64))
        poison_unused_cache(kc, vc, bt, sl, page)
        cap = 1.5 if softcap else None
        scale = 0.8 / math.sqrt(D)
        cascade = with_softcap(paged_decode()) if softcap else paged_decode()
        inputs = dict(Q=q.double().view(len(lens), G, R, D), KC=kc.double(), VC=vc.double(), BT=bt, SL=sl)
        ref = evaluate(cascade, inputs, dict(scale=scale, **({"softcap": cap} if softcap else {})))["O"]
        ref = ref.reshape(len(lens), G * R, Dv)
        dev = self.DEVICE
        lowp = lowp_reference(q.to(dev), [k.to(tdtype) for k in k_dense], [v.to(tdtype) for v in v_dense], R,
                              scale, cap).double().cpu()
        bound = 2 * (lowp - ref).abs().max().item() + (1e-3 if dtype is not F32 else 1e-5)
        args = [t.to(dev) for t in (q, kc, vc, bt, sl)]
        for num_splits in splits:
            out = torch.full((len(lens), G * R, Dv), float("nan"), dtype=tdtype, device=dev)
            got = launcher.paged_decode_attention_cuda(*args, scale=scale, softcap=cap, num_splits=num_splits,
                                                       out=out)
            assert got is out
            err = (out.double().cpu() - ref).abs().max().item()
            assert err <= bound, f"num_splits={num_splits}: max error {err:.3g} > {bound:.3g}"
            assert not out.isnan().any()
            for i, n in enumerate(lens):
                if n == 0:
                    assert (out[i] == 0).all()

    def test_partials_match_the_split_kv_cascade(self, launcher, case, paged_cache, gen):
        """Each split's max, sum and numerator are the split cascade's ``LM``, ``LD``, ``LNV`` for
        the sequence with its own block count as ``M1``; more splits than blocks leave empty
        splits (max -inf, sum 0, numerator 0)."""
        dtype, D, Dv, page, R, softcap, lens, _ = case
        G = 2
        kc64, vc64, bt, sl, _, _ = paged_cache(lens, page, G, D, Dv, gen)
        tdtype = TORCH_DTYPES[dtype]
        q = torch.randn(len(lens), G * R, D, generator=gen, dtype=torch.float64).to(tdtype)
        kc, vc = kc64.to(tdtype), vc64.to(tdtype)
        poison_unused_cache(kc, vc, bt, sl, page)
        scale, cap = 1.0 / math.sqrt(D), (2.0 if softcap else None)
        cascade = with_softcap(paged_decode(split_kv=True)) if softcap else paged_decode(split_kv=True)
        C = min(max(math.ceil(n / page) for n in lens) + 2, 64)  # short sequences get empty splits
        dev = self.DEVICE
        pm, ps, pn = launcher.paged_decode_partials_cuda(*(t.to(dev) for t in (q, kc, vc, bt, sl)), scale=scale,
                                                         softcap=cap, num_splits=C)
        for i, n in enumerate(lens):
            blocks = math.ceil(n / page)
            if n == 0:
                assert (pm[i] == float("-inf")).all() and (ps[i] == 0).all() and (pn[i] == 0).all()
                continue
            inputs = dict(Q=q[i:i + 1].double().view(1, G, R, D), KC=kc.double(), VC=vc.double(),
                          BT=bt[i:i + 1, :blocks], SL=sl[i:i + 1])
            env = evaluate(cascade, inputs, dict(scale=scale, **({"softcap": cap} if softcap else {})),
                           dict(C=C), keep_all=True)
            torch.testing.assert_close(pm[i].cpu().double(), env["LM"].reshape(G * R, C), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ps[i].cpu().double(), env["LD"].reshape(G * R, C), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(pn[i].cpu().double(), env["LNV"].reshape(G * R, C, Dv), rtol=1e-4,
                                       atol=1e-4)


@pytest.mark.parametrize("threads, tokens", [(32, 8), (256, 1)])
def test_other_lane_layouts_compute_the_same(threads, tokens, monkeypatch, paged_cache, gen):
    """A block of one warp with 8 keys per lane group, and of 8 warps with 1: same function."""
    def layout(*args, **kwargs):
        return dataclasses.replace(default_params(*args, **kwargs), threads=threads, tokens_per_group=tokens)
    use_host_emulation(monkeypatch)
    monkeypatch.setattr(cuda_backend, "default_params", layout)
    lens, page, G, R, D = [1, 300, 0, 45], 5, 2, 3, 64
    kc, vc, bt, sl, _, _ = paged_cache(lens, page, G, D, D, gen, dtype=torch.float32)
    poison_unused_cache(kc, vc, bt, sl, page)
    q = torch.randn(len(lens), G * R, D, generator=gen)
    inputs = dict(Q=q.double().view(len(lens), G, R, D), KC=kc.double(), VC=vc.double(), BT=bt, SL=sl)
    ref = evaluate(paged_decode(), inputs, dict(scale=D ** -0.5))["O"].reshape(len(lens), G * R, D)
    out = cuda_backend.paged_decode_attention_cuda(q, kc, vc, bt, sl, num_splits=4)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def _gpu_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        cuda_backend.import_cupy()
    except KascadeError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU and CuPy")
class TestNumericsGPU(TestNumericsHostEmulation):
    """The same suite on the GPU through CuPy, over more cases."""
    CASES = NUMERIC_CASES
    DEVICE = "cuda"

    @pytest.fixture
    def launcher(self):
        return cuda_backend

    @pytest.fixture(params=CASES, ids=case_id)
    def case(self, request):
        return request.param
