"""MoE routing bookkeeping: the torch ``align_blocks`` and its CUDA counterpart ``align_blocks_cuda``.

The oracle is a plain-Python statement of the contract (:func:`reference_alignment`: lists, one
loop over the pairs), and :func:`check_alignment` checks the invariants the grouped GEMMs rely
on. Without a GPU: ``align_blocks`` against the oracle over many shapes; every CUDA variant
renders and compiles with nvcc for sm_80 and sm_90a (resources within bounds, no spills); the
launcher's checks raise kascade errors; and the *generated CUDA source* runs on the CPU, built
with g++ against a small shim (one std::thread per CUDA thread, barriers for ``__syncthreads``,
``__syncwarp`` and ``__match_any_sync``), through the launcher's usual path. On a GPU the same
suite reruns through CuPy (``TestKernelGPU`` subclasses ``TestKernelHostEmulation``). Outputs are
poisoned before every launch, so an element the kernel leaves unwritten fails.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import kascade.backends.cuda_moe as cuda_moe
from kascade.backends import nvcc
from kascade.backends.moe_routing import BlockAlignment, align_blocks, capacity
from kascade.codegen.moe_routing_cuda import (
    EXPERT_BUCKETS,
    MoeRoutingParams,
    default_params,
    expert_bucket,
    render,
    write_source,
)
from kascade.ir.dtypes import DType
from kascade.ir.errors import CodegenError, DeviceError, DTypeError, KascadeError, ShapeError

ARCHS = ("sm_80", "sm_90a")
POISON = 0x7F7F7F7F  # what every output element holds before a launch


pytestmark = pytest.mark.usefixtures("kascade_cache_dir")   # tests/conftest.py: a fresh cache per module


# ---- the oracle ------------------------------------------------------------------------------
def reference_alignment(ids: list[list[int]], experts: int, block_m: int) -> dict[str, list[int]]:
    """The contract in plain Python: each expert's pairs in pair order, padded with the sentinel
    ``P`` to whole blocks, runs in expert order, then sentinels up to the capacity (every pair,
    plus under a block of padding per expert that has a pair, rounded up to whole blocks).
    Ids outside ``[0, experts)`` get no row (what the CUDA kernel does with them)."""
    T = len(ids)
    K = len(ids[0]) if T else 0
    P = T * K
    runs: list[list[int]] = [[] for _ in range(experts)]
    for t, row in enumerate(ids):
        for k, e in enumerate(row):
            if 0 <= e < experts:
                runs[e].append(t * K + k)
    sorted_pairs, block_expert = [], []
    for e, run in enumerate(runs):
        padded = run + [P] * (-len(run) % block_m)
        sorted_pairs += padded
        block_expert += [e] * (len(padded) // block_m)
    num_rows = len(sorted_pairs)
    cap = -(-(P + min(experts, P) * (block_m - 1)) // block_m) * block_m
    assert num_rows <= cap
    return dict(sorted_pairs=sorted_pairs + [P] * (cap - num_rows),
                block_expert=block_expert + [-1] * (cap // block_m - len(block_expert)),
                num_rows=[num_rows], counts=[len(r) for r in runs])


def assert_matches_reference(got: BlockAlignment, ids: list[list[int]], experts: int, block_m: int) -> None:
    ref = reference_alignment(ids, experts, block_m)
    for field, expected in ref.items():
        tensor = getattr(got, field)
        assert tensor.dtype == torch.int32, field
        assert tensor.cpu().tolist() == expected, f"{field} differs from the reference"


def check_alignment(a: BlockAlignment, ids: torch.Tensor, experts: int, block_m: int) -> None:
    """The invariants the grouped GEMMs rely on, checked on the outputs alone."""
    T, K = ids.shape
    P = T * K
    flat = ids.reshape(-1).long().cpu()
    rows, blocks, n = a.sorted_pairs.cpu().long(), a.block_expert.cpu().long(), int(a.num_rows.item())
    assert rows.numel() == capacity(T, K, experts, block_m) and blocks.numel() == rows.numel() // block_m
    assert n % block_m == 0 and n <= rows.numel()
    assert (rows[n:] == P).all(), "rows past num_rows hold the sentinel"
    assert (blocks[n // block_m:] == -1).all() and (blocks[:n // block_m] >= 0).all()
    assert (blocks[:n // block_m].diff() >= 0).all(), "runs come in expert order"
    used, real = rows[:n], rows[:n] != P
    assert sorted(used[real].tolist()) == list(range(P)), "every pair exactly once"
    assert a.counts.cpu().tolist() == torch.bincount(flat, minlength=experts).tolist()
    if not n:
        return
    expert = flat[used[real]]
    assert (expert == blocks[:n // block_m].repeat_interleave(block_m)[real]).all(), "a block mixes experts"
    # inside a block the pairs come first, then padding; a padded block is the last of its expert's run
    per_block = real.view(-1, block_m).int()
    assert (per_block[:, 0] == 1).all(), "a block holds only padding"
    assert (per_block.diff(dim=1) <= 0).all(), "a pair after padding"
    padded = per_block[:, -1] == 0
    assert (blocks[:n // block_m][1:][padded[:-1]] != blocks[:n // block_m][:-1][padded[:-1]]).all(), \
        "padding in the middle of a run"
    # stable: in row order, (expert, pair) increases strictly
    assert (expert * P + used[real]).diff().gt(0).all(), "pairs out of order inside an expert (not stable)"


def routing(T: int, K: int, E: int, gen: torch.Generator, *, experts_used: int | None = None,
            dtype=torch.int32) -> torch.Tensor:
    """Top-k ids as a router makes them: K distinct experts per token, drawn from the first
    ``experts_used`` experts (the rest get no pair)."""
    used = E if experts_used is None else experts_used
    scores = torch.rand(T, used, generator=gen)
    return scores.topk(K, dim=1).indices.to(dtype)


# ---- the torch formulation against the oracle ---------------------------------------------
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("T", [1, 3, 64, 1000])
@pytest.mark.parametrize("K", [1, 2, 8])
@pytest.mark.parametrize("E", [8, 64, 128])
def test_align_blocks_matches_the_reference(E, K, T, block_m, gen):
    ids = routing(T, K, E, gen)
    got = align_blocks(ids, E, block_m)
    assert_matches_reference(got, ids.tolist(), E, block_m)
    check_alignment(got, ids, E, block_m)


@pytest.mark.parametrize("case", ["one_expert", "few_experts", "last_expert", "int64", "block_m_1", "zero_tokens"])
def test_align_blocks_edge_cases(case, gen):
    T, K, E, block_m, dtype = 257, 2, 64, 16, torch.int32
    if case == "one_expert":     # every pair to expert 5 (K = 1: a token picks distinct experts)
        ids = torch.full((T, 1), 5, dtype=dtype)
    elif case == "few_experts":  # experts 0..2 only: 61 experts have no pairs, no blocks
        ids = routing(T, K, E, gen, experts_used=3)
    elif case == "last_expert":
        ids = torch.full((T, 1), E - 1, dtype=dtype)
    elif case == "int64":
        ids = routing(T, K, E, gen, dtype=torch.int64)
    elif case == "block_m_1":
        ids, block_m = routing(T, K, E, gen), 1
    else:
        ids = torch.empty(0, K, dtype=dtype)
    got = align_blocks(ids, E, block_m)
    assert_matches_reference(got, ids.tolist(), E, block_m)
    check_alignment(got, ids, E, block_m)


def test_reference_on_a_hand_worked_example():
    """Tokens 0..2, K = 2; expert 1 gets pairs 0, 3, 5, expert 2 gets 1, 2; block_m 2."""
    ref = reference_alignment([[1, 2], [2, 1], [3, 1]], 4, 2)
    assert ref["sorted_pairs"] == [0, 3, 5, 6, 1, 2, 4, 6, 6, 6]
    assert ref["block_expert"] == [1, 1, 2, 3, -1]
    assert ref["num_rows"] == [8] and ref["counts"] == [0, 3, 2, 1]


def test_capacity_bounds_the_rows():
    assert capacity(3, 2, 4, 2) == 10
    assert capacity(0, 8, 64, 16) == 0
    assert capacity(1000, 8, 8, 64) == 8000 + 8 * 64  # 8000 + 8 * 63 rounded up to whole blocks


# ---- rendering and nvcc builds --------------------------------------------------------------
VARIANTS = [default_params(dt, e) for dt in (DType.I32, DType.I64) for e in EXPERT_BUCKETS]


@pytest.fixture(scope="module")
def compiled(kascade_cache_dir):
    """Every launcher variant compiled for every arch, one nvcc process per core."""
    try:
        nvcc.find_nvcc()
    except nvcc.NvccNotFoundError as e:
        pytest.skip(str(e))
    jobs = [(p, arch) for p in VARIANTS for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(jobs, pool.map(lambda job: nvcc.compile_cuda(render(job[0]).code, job[1]), jobs)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("params", VARIANTS, ids=lambda p: p.name)
def test_variant_compiles_within_budget(params, arch, compiled):
    result = compiled[params, arch]
    assert result.ok, result.error
    assert result.cubin[:4] == b"\x7fELF"
    k = result.kernel(render(params).kernel)
    # 1024 threads in one block leave 64 registers per thread; no local memory
    assert 0 < k.registers <= 65536 // params.threads and k.registers <= 255, k
    assert (k.spill_stores, k.spill_loads, k.stack_frame) == (0, 0, 0), k
    assert k.shared_bytes == params.shared_bytes <= 48 * 1024, k
    assert k.barriers >= 1
    print(f"{params.name} {arch}: {k.registers} registers, {k.shared_bytes} B shared, {params.threads} threads")


def test_source_is_self_contained_and_stable_by_construction():
    code = render(default_params(DType.I64, 256)).code
    assert "#include" not in code and 'extern "C" __global__' in code
    assert "typedef long long index_t;" in code and "__match_any_sync" in code
    assert "int hist[WARPS][MAX_E]" in code


def test_default_variants_keep_the_histogram_within_budget():
    assert [(p.max_experts, p.threads) for p in VARIANTS[:5]] == [(64, 1024), (128, 1024), (256, 1024),
                                                                   (512, 512), (1024, 256)]
    assert expert_bucket(1) == 64 and expert_bucket(65) == 128 and expert_bucket(1024) == 1024
    with pytest.raises(CodegenError, match="up to 1024 experts"):
        expert_bucket(1025)


@pytest.mark.parametrize("kwargs, error, says", [
    (dict(index_dtype=DType.F32), DTypeError, "i32 or i64"),
    (dict(max_experts=100), CodegenError, "one of \\(64, 128"),
    (dict(threads=100), CodegenError, "multiple of 32 from 32 to 1024"),
    (dict(max_experts=1024, threads=512), CodegenError, "at most 256 threads"),
])
def test_bad_params_say_what_is_accepted(kwargs, error, says):
    with pytest.raises(error, match=says):
        MoeRoutingParams(**{**dict(index_dtype=DType.I32, max_experts=64, threads=1024), **kwargs})


def test_rendering_is_deterministic_and_written_only_when_changed(tmp_path):
    params = default_params(DType.I32, 8)
    render.cache_clear()
    first = render(params)
    render.cache_clear()
    assert render(params).code == first.code
    path = write_source(first, tmp_path)
    assert path.name == "moe_align_i32_e64_t1024.cu" and path.read_text() == first.code
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    write_source(render(params), tmp_path)
    assert path.stat().st_mtime_ns == 1_000_000_000


# ---- the launcher's checks (no GPU needed) --------------------------------------------------
@pytest.mark.parametrize("args, error, says", [
    (([[0, 1]], 8, 16), DTypeError, "topk_ids must be a torch.Tensor"),
    ((torch.zeros(4, 2), 8, 16), DTypeError, "torch.int32 or torch.int64, got torch.float32"),
    ((torch.zeros(4, 2, dtype=torch.int16), 8, 16), DTypeError, "torch.int32 or torch.int64"),
    ((torch.zeros(8, dtype=torch.int32), 8, 16), ShapeError, r"2-D \(tokens T, choices K\), got shape \(8,\)"),
    ((torch.zeros(4, 2, dtype=torch.int32), 0, 16), KascadeError, "num_experts must be an int from 1 to 1024"),
    ((torch.zeros(4, 2, dtype=torch.int32), 1025, 16), KascadeError, "from 1 to 1024, got 1025"),
    ((torch.zeros(4, 2, dtype=torch.int32), 8.0, 16), KascadeError, "num_experts must be an int"),
    ((torch.zeros(4, 2, dtype=torch.int32), 8, 0), KascadeError, "block_m must be an int from 1 to 4096"),
    ((torch.zeros(4, 2, dtype=torch.int32), 8, True), KascadeError, "block_m must be an int"),
    ((torch.zeros(4, 2, dtype=torch.int32), 8, 16), DeviceError, "on a CUDA device; got it on cpu"),
])
def test_bad_inputs_say_what_is_accepted(args, error, says):
    with pytest.raises(error, match=says):
        cuda_moe.align_blocks_cuda(*args)


def test_too_many_rows_is_a_shape_error():
    ids = torch.zeros(2**28, 8, dtype=torch.int32, device="meta")  # no memory behind it
    with pytest.raises(ShapeError, match="int32 rows hold at most"):
        cuda_moe.check_inputs(ids, 8, 16)


def test_importing_the_backend_needs_no_cupy():
    code = "import sys; sys.modules['cupy'] = None; import kascade.backends.cuda_moe"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- running the generated CUDA source on the CPU ------------------------------------------
_SHIM = r"""
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
static thread_local dim3 threadIdx;
static std::barrier<>* block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
static int warp_slots[32][32];
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static  /* one block */
static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
static inline void __syncwarp() { warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
static inline int __popc(unsigned m) { return __builtin_popcount(m); }
static inline unsigned __match_any_sync(unsigned, int v) {
    const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
    warp_slots[w][l] = v;
    warp_barriers[w]->arrive_and_wait();
    unsigned same = 0;
    for (unsigned i = 0; i < 32; ++i) same |= (unsigned)(warp_slots[w][i] == v) << i;
    warp_barriers[w]->arrive_and_wait();
    return same;
}
"""

_DRIVER = r"""
template <class... P, std::size_t... I>
static void call_packed(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<P*>(args[I])...);
}
template <class... P>
static void call(void (*kernel)(P...), void** args) { call_packed(kernel, args, std::index_sequence_for<P...>{}); }
// cuLaunchKernel's contract: args[i] points at the i-th argument's value. One OS thread per CUDA thread.
extern "C" void run(unsigned threads, void** args) {
    std::barrier<> block(threads);
    block_barrier = &block;
    warp_barriers.clear();
    for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([=] {
            threadIdx = {t, 0, 0};
            call(KERNEL, args);
        });
    for (auto& th : pool) th.join();
}
"""

_CTYPES = {np.uint64: ctypes.c_uint64, np.int32: ctypes.c_int32}


@functools.cache
def _host_compiler_ready() -> bool:
    if shutil.which("g++") is None:
        return False
    probe = "#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); return 0; }"
    out = subprocess.run(["g++", "-std=c++20", "-x", "c++", "-fsyntax-only", "-"], input=probe, capture_output=True,
                         text=True)
    return out.returncode == 0


@functools.cache
def emulated_kernel(params: MoeRoutingParams, device_index=None):
    """A CPU stand-in for the variant's ``cupy.RawKernel``: ``kernel(grid, block, args)``."""
    if not _host_compiler_ready():
        pytest.skip("running the kernel on the CPU needs g++ with C++20 <barrier> (GCC 11+)")
    src = render(params)
    source = _SHIM + src.code + _DRIVER.replace("KERNEL", src.kernel)
    root = os.path.join(os.environ["KASCADE_CACHE_DIR"], "host")
    os.makedirs(root, exist_ok=True)
    lib = os.path.join(root, f"{params.name}-{hashlib.sha256(source.encode()).hexdigest()[:12]}.so")
    if not os.path.exists(lib):
        cpp = lib[:-3] + ".cpp"
        with open(cpp, "w") as f:
            f.write(source)
        cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o", lib, cpp]
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-4000:]
    fn = ctypes.CDLL(lib).run
    fn.argtypes, fn.restype = [ctypes.c_uint, ctypes.c_void_p], None

    def launch(grid, block, args):
        assert tuple(grid) == (1,), "one block"
        values = [_CTYPES[type(a)](a.item()) for a in args]
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        fn(block[0], pointers)
    return launch


def _output_sizes(args) -> list[tuple[int, int]]:
    """(pointer, bytes) of each output, from the kernel's arguments (see the template's signature)."""
    _, _, experts, block_m, rows, sorted_pairs, block_expert, num_rows, counts = (int(a) for a in args)
    return [(sorted_pairs, 4 * rows), (block_expert, 4 * (rows // block_m)), (num_rows, 4), (counts, 4 * experts)]


def poison_then(launch, fill):
    """A ``_launch`` that fills every output with :data:`POISON` bytes first, so that an element
    the kernel does not write fails the comparison."""
    def poisoned(kernel, grid, block, args, device):
        for ptr, size in _output_sizes(args):
            if size:
                fill(ptr, size)
        launch(kernel, grid, block, args, device)
    return poisoned


def use_host_emulation(monkeypatch, threads: int | None = None):
    """The real launcher with CuPy swapped for the CPU build of the same source; ``threads``
    overrides the variant's block size (fewer OS threads: a faster emulation)."""
    def params(index_dtype, experts):
        p = default_params(index_dtype, experts)
        return p if threads is None else dataclasses.replace(p, threads=threads)
    monkeypatch.setattr(cuda_moe, "default_params", params)
    monkeypatch.setattr(cuda_moe, "_kernel", emulated_kernel)
    monkeypatch.setattr(cuda_moe, "check_device", lambda topk_ids: None)
    monkeypatch.setattr(cuda_moe, "_launch", poison_then(lambda kernel, grid, block, args, device:
                                                         kernel(grid, block, args),
                                                         lambda ptr, size: ctypes.memset(ptr, POISON & 0xFF, size)))
    return cuda_moe


# (T, K, E, block_m, dtype, threads, how the ids are drawn); threads None = the launcher's variant
KERNEL_CASES = [
    (3, 2, 8, 16, torch.int32, 64, "random"),
    (1000, 8, 64, 64, torch.int32, 64, "random"),
    (1000, 8, 128, 16, torch.int64, 64, "random"),
    (64, 1, 8, 16, torch.int32, 32, "random"),          # one warp: every pair in one chunk
    (1000, 1, 64, 16, torch.int32, 64, "one_expert"),
    (513, 2, 128, 64, torch.int32, 96, "few_experts"),
    (0, 8, 64, 16, torch.int32, 64, "random"),
    (300, 8, 512, 16, torch.int64, 64, "random"),
    (200, 8, 1000, 64, torch.int32, 64, "random"),
    (1024, 8, 256, 64, torch.int32, None, "random"),    # the launcher's 1024 threads, 32 warps of 256 pairs
    (250, 4, 128, 1, torch.int64, 64, "random"),
]
GPU_CASES = KERNEL_CASES + [
    (131072, 8, 256, 64, torch.int64, None, "random"),  # ~1M pairs
    (65536, 8, 512, 128, torch.int32, None, "few_experts"),
    (16384, 2, 1024, 16, torch.int32, None, "random"),
]


def kernel_case_id(case) -> str:
    T, K, E, block_m, dtype, threads, how = case
    return f"T{T}-K{K}-E{E}-bm{block_m}-{str(dtype)[6:]}-t{threads or 'default'}-{how}"


def draw_ids(case, gen) -> torch.Tensor:
    T, K, E, _, dtype, _, how = case
    if how == "one_expert":
        return torch.full((T, K), E // 2, dtype=dtype)
    return routing(T, K, E, gen, experts_used=K + 1 if how == "few_experts" else None, dtype=dtype)


class TestKernelHostEmulation:
    """The generated kernel, run through the launcher with poisoned outputs, against the oracle."""
    DEVICE = "cpu"

    @pytest.fixture
    def launcher(self, monkeypatch):
        """``launcher(threads)``: the backend module, its kernel built with ``threads`` per block."""
        return functools.partial(use_host_emulation, monkeypatch)

    @pytest.fixture(params=KERNEL_CASES, ids=kernel_case_id)
    def case(self, request):
        return request.param

    def test_matches_the_reference_and_align_blocks(self, launcher, case, gen):
        T, K, E, block_m, _, threads, _ = case
        ids = draw_ids(case, gen).to(self.DEVICE)
        got = launcher(threads).align_blocks_cuda(ids, E, block_m)
        assert all(t.device == ids.device for t in dataclasses.astuple(got))
        if T * K <= 100_000:  # the plain-Python oracle; beyond, the torch version (checked against it above)
            assert_matches_reference(got, ids.cpu().tolist(), E, block_m)
        want = align_blocks(ids, E, block_m)
        for field in ("sorted_pairs", "block_expert", "num_rows", "counts"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field
        check_alignment(got, ids, E, block_m)

    def test_out_of_range_ids_get_no_row(self, launcher, gen):
        """A caller's bug, not checked (it would cost a sync), but never a write out of bounds."""
        ids = routing(200, 2, 64, gen).to(self.DEVICE)
        ids[3, 1], ids[10, 0], ids[199, 1] = 64, -1, 1 << 30
        got = launcher(64).align_blocks_cuda(ids, 64, 16)
        assert_matches_reference(got, ids.cpu().tolist(), 64, 16)

    def test_non_contiguous_ids(self, launcher, gen):
        ids = routing(100, 4, 128, gen, dtype=torch.int64).to(self.DEVICE)[:, ::2]
        assert not ids.is_contiguous()
        assert_matches_reference(launcher(64).align_blocks_cuda(ids, 128, 16), ids.cpu().tolist(), 128, 16)


def _gpu_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        cuda_moe.import_cupy()
    except KascadeError:
        return False
    return True


def _cupy_fill(ptr: int, size: int) -> None:
    cupy = cuda_moe.import_cupy()
    memory = cupy.cuda.UnownedMemory(ptr, size, owner=None)
    cupy.cuda.MemoryPointer(memory, 0).memset_async(POISON & 0xFF, size)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU and CuPy")
class TestKernelGPU(TestKernelHostEmulation):
    """The same suite on the GPU through CuPy (the launcher's own variants), with more and larger cases."""
    DEVICE = "cuda"

    @pytest.fixture
    def launcher(self, monkeypatch):
        """The launcher's own variants (``threads`` is ignored), outputs poisoned before each launch."""
        def launch(kernel, grid, block, args, device):
            cupy = cuda_moe.import_cupy()
            stream = torch.cuda.current_stream(device)
            with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
                for ptr, size in _output_sizes(args):
                    if size:
                        _cupy_fill(ptr, size)
            original(kernel, grid, block, args, device)
        original = cuda_moe._launch
        monkeypatch.setattr(cuda_moe, "_launch", launch)
        return lambda threads: cuda_moe

    @pytest.fixture(params=GPU_CASES, ids=kernel_case_id)
    def case(self, request):
        return request.param

    def test_runs_on_torch_current_stream(self, gen):
        """Launched on a side stream, the outputs are complete once that stream is."""
        ids = routing(4096, 8, 128, gen).cuda()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            got = cuda_moe.align_blocks_cuda(ids, 128, 64)
        stream.synchronize()
        assert_matches_reference(got, ids.cpu().tolist(), 128, 64)
