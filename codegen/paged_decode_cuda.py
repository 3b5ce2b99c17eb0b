"""CUDA C++ for paged-KV decode attention with split-KV: the partial kernel and the merge kernel.

One template (``paged_decode_cuda.cu.j2``, beside this file) renders both kernels from one
typed :class:`PagedDecodeParams`; the template receives leaf values only (the params, the
derived lane layout, the score epilogue as C++ emitted from an IR expression by
:mod:`kascade.codegen.cuda_expr`). Semantics are those of
``kascade.ir.library.decode.paged_decode(split_kv=True)`` applied to each sequence with its
own block count (see the template's header); the partial kernel writes the per-split max,
sum and unnormalised numerator, the merge kernel rescales and normalises them.

Lane layout: a K / V row is read in 16-byte chunks (8 bf16 / f16 or 4 f32 per load) by a
group of ``lanes_per_row`` lanes (the next power of two of the chunk count, at most 32;
lanes past the row idle), ``row_groups = threads / lanes_per_row`` groups per block each take
``tokens_per_group`` keys per step, so a warp has ``32 / lanes_per_row * tokens_per_group``
keys in flight per step.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import jinja2

from kascade.codegen.cuda_expr import emit_cuda
from kascade.codegen.paths import kernel_cache_dir, write_if_changed
from kascade.ir.dtypes import DType
from kascade.ir.errors import CodegenError, DTypeError
from kascade.ir.expr import Expr, access, param, tanh

DTYPES = (DType.BF16, DType.F16, DType.F32)
HEAD_DIMS = tuple(range(8, 257, 8))  # D and Dv: multiples of 8 up to 256
MAX_GROUP_SIZE = 16                  # R: query heads per KV head held in one block's registers
MAX_STATE_REGISTERS = 192            # queries + accumulators per lane; more spills (ptxas caps at 255)
THREADS = (32, 64, 128, 256, 512)
TOKENS_PER_GROUP = (1, 2, 4, 8)
MERGE_THREADS = 128
TEMPLATE = "paged_decode_cuda.cu.j2"


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PagedDecodeParams:
    """Everything one compiled variant depends on; runtime values (B, Hkv, lengths, scale,
    softcap's value, splits) are kernel arguments."""
    dtype: DType
    head_dim: int
    head_dim_v: int
    block_size: int
    group_size: int
    threads: int = 128
    softcap: bool = False
    tokens_per_group: int = 2

    def __post_init__(self) -> None:
        self.check_invariants()

    def check_invariants(self) -> None:
        if self.dtype not in DTYPES:
            raise DTypeError(f"paged decode CUDA kernels take {', '.join(map(str, DTYPES))}, got {self.dtype}")
        for what, value in (("head_dim", self.head_dim), ("head_dim_v", self.head_dim_v)):
            if not isinstance(value, int) or value not in HEAD_DIMS:
                raise CodegenError(f"{what}={value} is not supported; supported: multiples of 8 from 8 to 256")
        checks = [
            (isinstance(self.block_size, int) and self.block_size >= 1, f"block_size={self.block_size}",
             "any positive int"),
            (isinstance(self.group_size, int) and 1 <= self.group_size <= MAX_GROUP_SIZE,
             f"group_size={self.group_size}", f"1 to {MAX_GROUP_SIZE} query heads per KV head"),
            (self.threads in THREADS, f"threads={self.threads}",
             f"one of {THREADS}"),
            (self.tokens_per_group in TOKENS_PER_GROUP, f"tokens_per_group={self.tokens_per_group}",
             f"one of {TOKENS_PER_GROUP}"),
            (isinstance(self.softcap, bool), f"softcap={self.softcap!r}", "True or False"),
        ]
        for ok, got, accepted in checks:
            if not ok:
                raise CodegenError(f"paged decode CUDA params: {got} is not supported; accepted: {accepted}")
        if self.state_registers > MAX_STATE_REGISTERS:
            raise CodegenError(f"paged decode CUDA params: R={self.group_size} queries of head dim {self.head_dim} "
                               f"and {self.head_dim_v} in {self.dtype} need {self.state_registers} registers per lane "
                               f"for the queries and accumulators; at most {MAX_STATE_REGISTERS} fit without spills")

    # ---- the lane layout (leaf values for the template) -------------------------------
    @property
    def vec(self) -> int:
        """Elements per 16-byte load."""
        return 16 // self.dtype.itemsize

    @property
    def lanes_per_row(self) -> int:
        return min(32, _next_pow2(max(self.head_dim, self.head_dim_v) // self.vec))

    @property
    def row_groups(self) -> int:
        return self.threads // self.lanes_per_row

    @property
    def k_chunks(self) -> int:
        return _cdiv(self.head_dim // self.vec, self.lanes_per_row)

    @property
    def v_chunks(self) -> int:
        return _cdiv(self.head_dim_v // self.vec, self.lanes_per_row)

    @property
    def q_packed(self) -> bool:
        """Keep the queries in registers as loaded (16-bit) rather than widened to fp32: chosen
        when R widened queries and R accumulators would crowd the register file."""
        return self.dtype.itemsize == 2 and self.group_size * self.vec * self.k_chunks > 32

    @property
    def state_registers(self) -> int:
        """32-bit registers per lane for the queries and the fp32 numerator accumulators."""
        q = self.group_size * self.k_chunks * (4 if self.q_packed else self.vec)
        return q + self.group_size * self.v_chunks * self.vec

    @property
    def name(self) -> str:
        """Readable and filename-safe; every field appears, so it names the variant uniquely."""
        return (f"paged_decode_{self.dtype}_d{self.head_dim}_dv{self.head_dim_v}_bs{self.block_size}"
                f"_r{self.group_size}_t{self.threads}_u{self.tokens_per_group}"
                + ("_softcap" if self.softcap else ""))


def default_params(dtype: DType, head_dim: int, head_dim_v: int, block_size: int, group_size: int,
                   softcap: bool = False) -> PagedDecodeParams:
    """The variant the launcher uses: 128 threads, and keys per step chosen so that the
    loads in flight stay high while q, the accumulators and the loads fit in registers."""
    p = PagedDecodeParams(dtype, head_dim, head_dim_v, block_size, group_size, 128, softcap, 1)
    state = group_size * p.vec * max(p.k_chunks, p.v_chunks)  # fp32 registers for q, as many for the sums
    return dataclasses.replace(p, tokens_per_group=4 if state <= 16 else 2 if state <= 64 else 1)


def score_epilogue(softcap: bool) -> Expr:
    """The score of a (query head, key) from the raw dot product ``S``: ``S * scale``, or
    flash-attn's soft-capping ``softcap * tanh(S * scale / softcap)``."""
    s = access("S") * param("scale")
    return param("softcap") * tanh(s / param("softcap")) if softcap else s


@dataclass(frozen=True)
class PagedDecodeSource:
    """Rendered CUDA source and the names of its two ``extern "C"`` kernels."""
    params: PagedDecodeParams
    code: str

    @property
    def name(self) -> str:
        return self.params.name

    @property
    def partial_kernel(self) -> str:
        return f"{self.name}_partial"

    @property
    def merge_kernel(self) -> str:
        return f"{self.name}_merge"


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


@functools.cache
def render(params: PagedDecodeParams) -> PagedDecodeSource:
    """The CUDA source of ``params``' variant (deterministic: the same params give the same text)."""
    epilogue = score_epilogue(params.softcap)
    code = _environment().get_template(TEMPLATE).render(
        name=params.name, p=params, elem_ctype="float" if params.dtype is DType.F32 else "unsigned short",
        epilogue=emit_cuda(epilogue, {"S": "S", "scale": "scale", "softcap": "softcap"}),
        epilogue_ir=str(epilogue), merge_threads=MERGE_THREADS,
        partial_kernel=f"{params.name}_partial", merge_kernel=f"{params.name}_merge")
    return PagedDecodeSource(params, code)


def write_source(source: PagedDecodeSource, directory: Path | None = None) -> Path:
    """Write ``<name>.cu`` under ``directory`` (default: :func:`kascade.codegen.paths.kernel_cache_dir`)
    only when its content changed, so an unchanged file keeps its mtime; returns the path."""
    path = (kernel_cache_dir() if directory is None else Path(directory)) / f"{source.name}.cu"
    write_if_changed(path, source.code)
    return path
