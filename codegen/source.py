"""What every Triton kernel emitter shares: the rendered-kernel value and the argument builder.

A :class:`KernelSource` is a rendered module plus what launching or compiling it needs
(its runtime arguments, constexprs, warps, stages, grid). :class:`ArgumentBuilder` gives
an emitter kernel-local names that do not collide with the template's own, and the
runtime arguments of a kernel in signature order: one pointer and one stride per dim for
each tensor, one argument per extent (aliases share one), one per param.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2

from kascade.codegen.paths import kernel_cache_dir, write_if_changed
from kascade.ir.cascade import Cascade
from kascade.ir.dtypes import DType
from kascade.passes.schedule import TensorRole

DTYPE_NAMES = {DType.F16: "fp16", DType.BF16: "bf16", DType.F32: "fp32"}


@dataclass(frozen=True)
class KernelArg:
    """One runtime argument: ``kind`` is ``pointer`` (tensor ``ref``), ``stride`` (dim ``dim``
    of tensor ``ref``), ``extent`` (symbol ``ref``) or ``param`` (param ``ref``); ``dtype`` is
    the tensor's element type or the param's type."""
    name: str
    kind: str
    ref: str
    dim: int = -1
    dtype: DType | None = None


@dataclass(frozen=True)
class KernelSource:
    """A rendered kernel module and everything needed to launch or compile it."""
    name: str
    text: str
    args: tuple[KernelArg, ...]
    constexprs: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int
    grid: tuple[tuple[tuple[str, ...], str | None], ...]   # per axis: extent symbols multiplied, tile constexpr
    output: TensorRole
    output_extents: tuple[str, ...]   # the extent symbol of each dim of the output

    def grid_size(self, extents: Mapping[str, int]) -> tuple[int, ...]:
        consts = dict(self.constexprs)
        return tuple(math.prod(extents[x] for x in syms) if tile is None
                     else -(-math.prod(extents[x] for x in syms) // consts[tile]) for syms, tile in self.grid)

    def write(self, directory: Path | None = None) -> Path:
        """The module's file under the kernel cache, written only if its content changed."""
        path = (directory or kernel_cache_dir()) / f"{self.name}.py"
        write_if_changed(path, self.text)
        return path


class Names:
    """Kernel-local identifiers: the preferred name unless the template or an earlier name took it."""

    def __init__(self, template_locals: Iterable[str]):
        self.taken = set(template_locals)

    def take(self, preferred: str) -> str:
        name, i = preferred, 2
        while name in self.taken:
            name, i = f"{preferred}_{i}", i + 1
        self.taken.add(name)
        return name


class ArgumentBuilder:
    """The runtime arguments of one kernel of cascade ``c``, in signature order."""

    def __init__(self, c: Cascade, template_locals: Iterable[str]):
        self.c = c
        self.names = Names(template_locals)
        self.args: list[KernelArg] = []
        self.extent_args: dict[str, str] = {}   # canonical extent symbol -> argument (or local) name

    def extent(self, rank: str) -> str:
        return self.c.rank_extent(rank)

    def add(self, preferred: str, kind: str, ref: str, dim: int = -1, dtype: DType | None = None) -> str:
        name = self.names.take(preferred)
        self.args.append(KernelArg(name, kind, ref, dim, dtype))
        return name

    def tensor(self, role: TensorRole) -> tuple[str, dict[str, str]]:
        """Pointer argument and the preferred name of one stride per rank of ``role`` (added
        by :meth:`strides`, so that all pointers come first)."""
        ptr = self.add(role.name if role.name[:1].isupper() else f"ptr_{role.name}", "pointer", role.name,
                       dtype=role.dtype)
        return ptr, {r: f"stride_{role.name.lower()}_{r}" for r in role.ranks}

    def strides(self, role: TensorRole, strides: dict[str, str]) -> None:
        for i, r in enumerate(role.ranks):
            strides[r] = self.add(strides[r], "stride", role.name, i)

    def tensors(self, roles: Iterable[TensorRole]) -> list[tuple[str, dict[str, str]]]:
        """Pointers of every role, then each role's strides: ``[(pointer, {rank: stride})]``."""
        roles = list(roles)
        out = [self.tensor(r) for r in roles]
        for role, (_, strides) in zip(roles, out):
            self.strides(role, strides)
        return out

    def extent_arg(self, symbol: str, preferred: str | None = None) -> str:
        canon = self.c.canonical_extent(symbol)
        if canon not in self.extent_args:
            self.extent_args[canon] = self.add(preferred or f"extent_{canon}", "extent", canon)
        return self.extent_args[canon]

    def extent_local(self, symbol: str, preferred: str) -> str:
        """An extent the kernel computes itself (a per-sequence length): a local, not an argument."""
        canon = self.c.canonical_extent(symbol)
        if canon not in self.extent_args:
            self.extent_args[canon] = self.names.take(preferred)
        return self.extent_args[canon]

    def arg_lines(self) -> list[str]:
        """The signature, one line per group: pointers, each tensor's strides, extents, params."""
        groups: dict[tuple[str, str], list[str]] = {}
        for a in self.args:
            groups.setdefault((a.kind, a.ref if a.kind == "stride" else ""), []).append(a.name)
        return [", ".join(names) for names in groups.values()]


@cache
def template(path: Path) -> jinja2.Template:
    """A kernel template (next to its emitter); leaf values in, Python source out."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    return env.from_string(path.read_text())
