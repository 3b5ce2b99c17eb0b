"""Renders a prefill-attention :class:`~kascade.passes.schedule.Schedule` + Config to a Triton module.

The template (``attention_prefill.py.j2``, next to this file) lays out the kernel: the
FlashAttention-2 loop over key tiles with an online softmax. This module computes the
leaf values it needs from the schedule: the kernel's arguments (pointers, one stride per
dim, extents, params), the score and output expressions lowered by
:mod:`kascade.codegen.triton_expr`, the key-loop bounds implied by the mask, and the
variant's readable name (``attn_fwd_causal_d128_bm64_bn64_w4_s2_fp16_1a2b3c4d``; the last
part is a hash of what the kernel computes, so two cascades never share a file). A varlen
schedule (packed sequences) renders the same template with its switch on: each program reads
its sequence's start and lengths from the offsets, and the mask's ``M - P`` becomes that
sequence's ``seqlen_k - seqlen_q``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

from kascade.codegen.source import DTYPE_NAMES, ArgumentBuilder, KernelArg, KernelSource, template
from kascade.codegen.triton_expr import Binding, TensorArg, emit
from kascade.ir import expr as E
from kascade.ir.dtypes import DType
from kascade.ir.errors import CodegenError
from kascade.ir.expr import Expr, Op, extents_used, free_ranks
from kascade.passes.schedule import Config, Schedule, TensorRole, padded_head_dim

__all__ = ["KernelArg", "KernelSource", "render", "variant_name"]   # KernelArg / KernelSource: codegen.source

TEMPLATE = Path(__file__).with_name("attention_prefill.py.j2")
_LOCALS = {"start_p", "pid_h", "rest", "offs_p", "offs_n", "offs_e", "offs_f", "offs_m", "p_in", "e_in", "f_in",
           "m_in", "q_base", "k_base", "v_base", "o_base", "q", "k", "v", "qk", "s", "m_i", "l_i", "acc", "m_new",
           "m_use", "pr", "alpha", "out", "p_first", "p_last", "lo", "hi", "start_n", "tl", "triton", "float",
           "range", "BLOCK_M", "BLOCK_N", "BLOCK_E", "BLOCK_F", "start_q", "start_k"}


def variant_name(schedule: Schedule, config: Config, block_e: int, block_f: int, dtype: DType) -> str:
    body = schedule.kernels[0].body
    tags = re.sub(r"^attention_?|\d+pass_?", "", schedule.cascade.name.lower())
    tags = re.sub(r"[^a-z0-9]+", "_", tags).strip("_")
    dims = f"d{block_e}" + (f"v{block_f}" if block_f != block_e else "")
    what = "\n".join(str(x) for x in (body.score, body.output, body.q, body.k, body.v, body.out, body.extra_inputs))
    if body.packed is not None:
        what += f"\n{body.packed}"
    digest = hashlib.sha256(what.encode()).hexdigest()[:8]
    parts = ["attn_fwd", "varlen" if body.packed is not None else "", tags, dims, f"bm{config['BLOCK_M']}",
             f"bn{config['BLOCK_N']}", f"w{config['num_warps']}", f"s{config['num_stages']}", DTYPE_NAMES[dtype],
             digest]
    return "_".join(p for p in parts if p)


def render(schedule: Schedule, config: Config, sizes: Mapping[str, int]) -> KernelSource:
    """The kernel module for ``config`` at head dims ``sizes`` (extent symbols of the two head
    ranks; the tile width is their padded power of two, the kernel masks the rest). A varlen
    schedule (:func:`~kascade.passes.schedule.attention_varlen_schedule`) renders the same
    template with its packed-sequence switch on."""
    why = schedule.feasible(config, _head_sizes(schedule, sizes))
    if why is not None:
        raise CodegenError(f"config {config.key()} is not feasible: {why}")
    return _Emitter(schedule, config, sizes).render()


def _head_sizes(schedule: Schedule, sizes: Mapping[str, int]) -> dict[str, int]:
    c, body = schedule.cascade, schedule.kernels[0].body
    out = {role: sizes[c.rank_extent(r)] for role, r in (("E", body.head), ("F", body.vhead))
           if c.rank_extent(r) in sizes}
    return {**out, "itemsize": body.q.dtype.itemsize}


class _Emitter(ArgumentBuilder):
    def __init__(self, schedule: Schedule, config: Config, sizes: Mapping[str, int]):
        super().__init__(schedule.cascade, _LOCALS)
        self.s, self.cfg = schedule, config
        self.b = schedule.kernels[0].body
        head = _head_sizes(schedule, sizes)
        if "E" not in head or "F" not in head:
            want = [self.extent(self.b.head), self.extent(self.b.vhead)]
            raise CodegenError(f"render needs the head dims' extents {want} in sizes=, got {dict(sizes)}")
        self.block_e, self.block_f = padded_head_dim(head["E"]), padded_head_dim(head["F"])
        self.dtype = self.b.q.dtype
        if self.dtype not in DTYPE_NAMES:
            raise CodegenError(f"prefill attention kernels take fp16, bf16 or fp32 inputs, not {self.dtype}")

    # ---- the module ----------------------------------------------------------------------
    def render(self) -> KernelSource:
        b, c = self.b, self.c
        packed = b.packed
        roles = [b.q, b.k, b.v, b.out, *b.extra_inputs]
        if packed is not None:
            roles += [packed.query_starts, packed.key_starts]
        tensors = self.tensors(roles)
        (q_ptr, sq), (k_ptr, sk), (v_ptr, sv), (o_ptr, so) = tensors[:4]
        idx = {r: self.names.take(f"idx_{r}") for r in b.grid_ranks}
        sizes = {r: self.extent_arg(self.extent(r), f"size_{r}") for r in b.grid_ranks}
        if packed is None:
            seqlen_q = self.extent_arg(self.extent(b.query), "seqlen_q")
            seqlen_k = self.extent_arg(self.extent(b.key), "seqlen_k")
        else:   # each program's sequence lengths come from the offsets, not from arguments
            seqlen_q = self.extent_local(self.extent(b.query), "seqlen_q")
            seqlen_k = self.extent_local(self.extent(b.key), "seqlen_k")
        head_dim = self.extent_arg(self.extent(b.head), "head_dim")
        head_dim_v = self.extent_arg(self.extent(b.vhead), "head_dim_v")
        for expr in (b.score, b.output):
            for sym in sorted(extents_used(expr)):
                self.extent_arg(sym)
        extra = {}
        for role, (ptr, strides) in zip(b.extra_inputs, tensors[4:]):
            dims = tuple(self.extent_arg(self.extent(r)) for r in role.ranks)
            extra[role.name] = TensorArg(ptr, tuple(strides[r] for r in role.ranks), dims)
        params = {}
        for prm in c.params:
            if prm.name in {n.arg for x in (b.score, b.output) for n in x.walk() if n.op is Op.PARAM}:
                params[prm.name] = self.add(prm.name, "param", prm.name, dtype=prm.dtype)
        extents = {}
        for sym in {n.arg for x in (b.score, b.output) for n in x.walk() if n.op is Op.EXTENT}:
            extents[sym] = self.extent_args[c.canonical_extent(sym)]
        base = Binding(ranks=idx, extents=extents, params=params, tensors=extra, in_range=frozenset(b.grid_ranks))

        # scalar loads that depend on the program only (ALiBi slopes) are hoisted out of the key loop
        prologue, hoisted = [], {}
        for expr in (b.score, b.output):
            for n in expr.walk():
                if n.op is Op.ACCESS and n.arg in extra and n not in hoisted and free_ranks(n) <= set(b.grid_ranks):
                    var = self.names.take(f"{n.arg.lower()}_val")
                    prologue.append(f"{var} = {emit(n, base)}")
                    hoisted[n] = var
        tile = lambda ranks, nodes: Binding({**idx, **ranks}, extents, params, {**hoisted, **nodes},  # noqa: E731
                                            extra, frozenset(b.grid_ranks))
        score = emit(b.score, tile({b.query: "offs_p[:, None]", b.key: "offs_m[None, :]"}, {b.contraction: "qk"}))
        output = emit(b.output, tile({b.query: "offs_p[:, None]", b.vhead: "offs_f[None, :]"},
                                     {b.denominator: "l_i[:, None]", b.numerator: "acc"}))
        bounds = [self.bound(kb, tile({}, {})) for kb in b.key_bounds]

        starts = {}
        if packed is not None:   # packed rows: the sequence's first row instead of a batch stride
            (cq_ptr, scq), (ck_ptr, sck) = tensors[-2:]
            s_idx = idx[packed.rank]
            starts = {b.query: "start_q", b.key: "start_k"}
            seq = [f"start_q = tl.load({cq_ptr} + {s_idx} * {scq[packed.rank]})",
                   f"{seqlen_q} = tl.load({cq_ptr} + ({s_idx} + 1) * {scq[packed.rank]}) - start_q",
                   f"start_k = tl.load({ck_ptr} + {s_idx} * {sck[packed.rank]})",
                   f"{seqlen_k} = tl.load({ck_ptr} + ({s_idx} + 1) * {sck[packed.rank]}) - start_k"]

        def offset(ptr: str, role: TensorRole, strides: dict[str, str]) -> str:
            terms = [f"{idx[r]} * {strides[r]}" for r in role.ranks if r in idx]
            terms += [f"{starts[r]}.to(tl.int64) * {strides[r]}" for r in role.ranks if r in starts]
            return " + ".join([ptr, *terms])

        decompose, grid_ranks = [], list(b.grid_ranks)
        if len(grid_ranks) == 1:
            decompose.append(f"{idx[grid_ranks[0]]} = pid_h")
        elif grid_ranks:
            decompose.append("rest = pid_h")
            for r in reversed(grid_ranks[1:]):
                decompose += [f"{idx[r]} = rest % {sizes[r]}", f"rest = rest // {sizes[r]}"]
            decompose.append(f"{idx[grid_ranks[0]]} = rest")
        name = variant_name(self.s, self.cfg, self.block_e, self.block_f, self.dtype)
        p = dict(
            name=name, cascade_name=c.name, cascade_hash=c.structural_hash()[:12], config_key=self.cfg.key(),
            score_ir=str(b.score), output_ir=str(b.output), block_m_doc=f"BLOCK_M ({b.query})",
            grid_doc=", ".join(b.grid_ranks) or "one", args=self.arg_lines(), decompose=decompose,
            seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, head_dim_v=head_dim_v,
            q_base=offset(q_ptr, b.q, sq), k_base=offset(k_ptr, b.k, sk), v_base=offset(v_ptr, b.v, sv),
            o_base=offset(o_ptr, b.out, so), stride_q_p=sq[b.query], stride_q_e=sq[b.head],
            stride_k_m=sk[b.key], stride_k_e=sk[b.head], stride_v_m=sv[b.key], stride_v_f=sv[b.vhead],
            stride_o_p=so[b.query], stride_o_f=so[b.vhead], prologue=prologue, bounds=bounds,
            has_lower=any(kb.side == "lower" for kb in b.key_bounds), score=score, output=output,
            out_pointer=o_ptr, dot_kwargs=', input_precision="ieee"' if self.dtype is DType.F32 else "",
            varlen=packed is not None, sequence=seq if packed is not None else [],
            packed_doc=(f"sequence {packed.rank}: rows [{packed.query_starts.name}[{packed.rank}], "
                        f"{packed.query_starts.name}[{packed.rank} + 1]) of {b.q.name} / {b.out.name}, "
                        f"[{packed.key_starts.name}[{packed.rank}], {packed.key_starts.name}[{packed.rank} + 1]) "
                        f"of {b.k.name} / {b.v.name}") if packed is not None else "",
        )
        text = template(TEMPLATE).render(p=p)
        consts = (("BLOCK_M", self.cfg["BLOCK_M"]), ("BLOCK_N", self.cfg["BLOCK_N"]),
                  ("BLOCK_E", self.block_e), ("BLOCK_F", self.block_f))
        grid = (((self.extent(b.query),), "BLOCK_M"), (tuple(self.extent(r) for r in b.grid_ranks), None))
        return KernelSource(name, text, tuple(self.args), consts, self.cfg["num_warps"], self.cfg["num_stages"],
                            grid, b.out, tuple(self.extent(r) for r in b.out.ranks))

    def bound(self, kb, binding: Binding) -> dict[str, str]:
        """``hi = min(hi, max_p(coeff * p + offset) + 1)`` or ``lo = max(lo, min_p(coeff * p + offset))``
        over the tile's queries: the extreme is at its first or last query, by the sign of ``coeff``."""
        upper = kb.side == "upper"
        at = "p_last" if (kb.coeff >= 0) == upper else "p_first"
        term: Expr = E.rank("__p") if kb.coeff == 1 else E.const(kb.coeff) * E.rank("__p")
        off = kb.offset
        negative = off.op is Op.CONST and off.arg < 0
        value = (term - E.const(-off.arg) if negative else term + off) if kb.coeff else off
        value = value + 1 if upper else value
        text = emit(value, Binding({**binding.ranks, "__p": at}, binding.extents, binding.params, binding.nodes,
                                   binding.tensors, binding.in_range))
        line = f"hi = tl.minimum(hi, {text})" if upper else f"lo = tl.maximum(lo, {text})"
        return {"line": line, "source": str(kb.source)}
