"""CUDA C++ for MoE routing bookkeeping: counting, prefix sum and stable scatter in one launch.

One template (``moe_routing_cuda.cu.j2``, beside this file) renders one kernel from a typed
:class:`MoeRoutingParams`. It computes what :func:`kascade.backends.moe_routing.align_blocks`
computes (the contract is stated there): per-expert counts, the exclusive prefix sum of the
block-padded counts, the pairs permuted into expert order (stable: pair order is kept inside
an expert) with the padding and the tail filled with the sentinel ``P = T * K``, the block ->
expert map with ``-1`` past the used blocks, and the rows in use. Every output element is
written by the kernel, so the caller allocates with ``torch.empty``.

One thread block does all of it, so the phases are separated by ``__syncthreads`` and no
second launch or grid-wide barrier is needed (the work is O(T * K + E) and tiny next to the
grouped GEMMs it feeds). Stability: warp ``w`` owns the contiguous chunk ``w`` of the pairs and
walks it in order, 32 pairs per step; ``__match_any_sync`` finds the lanes with the same expert,
so a pair's rank is the number of earlier lanes with its expert plus what earlier steps of the
warp saw plus what the earlier warps' chunks hold (a per-warp, per-expert histogram in shared
memory, scanned over warps). The histogram's size, ``warps * max_experts`` ints, is what bounds
the experts per variant: the warps are chosen so that it stays within :data:`HISTOGRAM_BYTES`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jinja2

from kascade.codegen.paths import kernel_cache_dir, write_if_changed
from kascade.ir.dtypes import DType
from kascade.ir.errors import CodegenError, DTypeError

INDEX_DTYPES = (DType.I32, DType.I64)
EXPERT_BUCKETS = (64, 128, 256, 512, 1024)   # max_experts of a variant; a call uses the smallest that holds E
HISTOGRAM_BYTES = 32 * 1024                  # per-warp histograms; the rest of the 48 KiB static limit is spare
MAX_THREADS = 1024
TEMPLATE = "moe_routing_cuda.cu.j2"
_CTYPES = {DType.I32: "int", DType.I64: "long long"}


@dataclass(frozen=True)
class MoeRoutingParams:
    """Everything one compiled variant depends on; T * K, E, ``block_m`` and the capacity are
    kernel arguments (E up to ``max_experts``)."""
    index_dtype: DType
    max_experts: int
    threads: int

    def __post_init__(self) -> None:
        self.check_invariants()

    def check_invariants(self) -> None:
        if self.index_dtype not in INDEX_DTYPES:
            raise DTypeError(f"the MoE routing kernel reads topk ids of dtype i32 or i64, got {self.index_dtype}")
        if self.max_experts not in EXPERT_BUCKETS:
            raise CodegenError(f"MoE routing CUDA params: max_experts={self.max_experts} is not supported; "
                               f"accepted: one of {EXPERT_BUCKETS}")
        if not (isinstance(self.threads, int) and 32 <= self.threads <= MAX_THREADS and self.threads % 32 == 0):
            raise CodegenError(f"MoE routing CUDA params: threads={self.threads} is not supported; accepted: a "
                               f"multiple of 32 from 32 to {MAX_THREADS}")
        if self.histogram_bytes > HISTOGRAM_BYTES:
            raise CodegenError(f"MoE routing CUDA params: {self.warps} warps x {self.max_experts} experts need "
                               f"{self.histogram_bytes} bytes of per-warp histograms; at most {HISTOGRAM_BYTES} "
                               f"fit (use at most {HISTOGRAM_BYTES // (4 * self.max_experts) * 32} threads)")

    @property
    def warps(self) -> int:
        return self.threads // 32

    @property
    def histogram_bytes(self) -> int:
        return 4 * self.warps * self.max_experts

    @property
    def experts_per_thread(self) -> int:
        """Experts each thread owns in the per-expert phases (the prefix sum)."""
        return -(-self.max_experts // self.threads)

    @property
    def shared_bytes(self) -> int:
        """Static shared memory of the kernel: histograms, counts, starts (E + 1), scan slots."""
        return self.histogram_bytes + 4 * (2 * self.max_experts + 1) + 4 * self.threads

    @property
    def name(self) -> str:
        """Readable and filename-safe; every field appears, so it names the variant uniquely."""
        return f"moe_align_{self.index_dtype}_e{self.max_experts}_t{self.threads}"


def expert_bucket(num_experts: int) -> int:
    """The smallest supported ``max_experts`` that holds ``num_experts``."""
    for bucket in EXPERT_BUCKETS:
        if num_experts <= bucket:
            return bucket
    raise CodegenError(f"the MoE routing CUDA kernel handles up to {EXPERT_BUCKETS[-1]} experts, got {num_experts}")


def default_params(index_dtype: DType, num_experts: int) -> MoeRoutingParams:
    """The variant the launcher uses: the smallest expert bucket, and as many warps (up to 32)
    as the histogram budget allows, since every warp walks its own chunk of pairs."""
    bucket = expert_bucket(num_experts)
    warps = min(MAX_THREADS // 32, HISTOGRAM_BYTES // (4 * bucket))
    return MoeRoutingParams(index_dtype, bucket, 32 * warps)


@dataclass(frozen=True)
class MoeRoutingSource:
    """Rendered CUDA source and the name of its ``extern "C"`` kernel."""
    params: MoeRoutingParams
    code: str

    @property
    def name(self) -> str:
        return self.params.name

    @property
    def kernel(self) -> str:
        return self.params.name


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


@functools.cache
def render(params: MoeRoutingParams) -> MoeRoutingSource:
    """The CUDA source of ``params``' variant (deterministic: the same params give the same text)."""
    code = _environment().get_template(TEMPLATE).render(
        name=params.name, p=params, index_ctype=_CTYPES[params.index_dtype])
    return MoeRoutingSource(params, code)


def write_source(source: MoeRoutingSource, directory: Path | None = None) -> Path:
    """Write ``<name>.cu`` under ``directory`` (default: :func:`kascade.codegen.paths.kernel_cache_dir`)
    only when its content changed; returns the path."""
    path = (kernel_cache_dir() if directory is None else Path(directory)) / f"{source.name}.cu"
    write_if_changed(path, source.code)
    return path
