"""Renders a paged-decode :class:`~kascade.passes.schedule.Schedule` + Config to two Triton modules.

The template (``paged_decode.py.j2``, next to this file) holds both kernels of the split-KV
lowering (:func:`~kascade.passes.schedule_decode.paged_decode_schedule`): the *partial*
kernel (one program per split, KV head and sequence, all R query heads of the KV head in
one ``tl.dot``) and the *merge* kernel (one program per sequence and query head). This
module computes their leaf values from the schedule: arguments, the score lowered by
:mod:`kascade.codegen.triton_expr` with the contraction bound to the ``qk`` tile, the
merge's rescaled sums and the output expression, and readable variant names
(``paged_decode_partial_softcap_d128_r16_ps16_bn64_w4_s2_fp16_1a2b3c4d``; the last part is
a hash of what the kernel computes). ``num_splits`` is a launch argument: one source
serves every split count.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kascade.codegen.source import DTYPE_NAMES, ArgumentBuilder, KernelSource, template
from kascade.codegen.triton_expr import Binding, TensorArg, emit
from kascade.ir.dtypes import DType
from kascade.ir.errors import CodegenError
from kascade.ir.expr import Op, extent_of, extents_used, free_ranks
from kascade.passes.schedule import Config, Schedule, TensorRole, padded_head_dim
from kascade.passes.schedule_decode import PagedDecode, group_rows

TEMPLATE = Path(__file__).with_name("paged_decode.py.j2")
MERGE_BLOCK_C = 16       # splits the merge kernel reads per step
MERGE_WARPS = 4
_PARTIAL_LOCALS = {"idx_c", "offs_r", "offs_n", "offs_e", "offs_f", "r_in", "e_in", "f_in", "n_pages",
                   "pages_per_split", "first_page", "lo", "hi", "q_base", "k_base", "v_base", "t_base", "q", "m_i",
                   "l_i", "acc", "start_n", "pos", "n_in", "page_n", "slot_n", "w_n", "blk", "k", "v", "qk", "s",
                   "m_new", "m_use", "pr", "alpha", "tl", "triton", "float", "range", "BLOCK_R", "BLOCK_N", "BLOCK_E",
                   "BLOCK_F", "PAGE", "seq_len"}
_MERGE_LOCALS = {"pid", "rest", "offs_c", "offs_f", "f_in", "lm_base", "ls_base", "ln_base", "mx", "start_c", "cs",
                 "lm", "gm", "den", "num", "c_in", "ls", "ln", "sd", "av", "out", "tl", "triton", "float", "range",
                 "BLOCK_C", "BLOCK_F"}


@dataclass(frozen=True)
class PagedDecodeSources:
    """The two rendered kernels and the fp32 workspace between them: each partial tensor's role
    and the extent symbol of each of its dims (the split rank's is the launch's ``num_splits``)."""
    partial: KernelSource
    merge: KernelSource
    workspace: tuple[tuple[TensorRole, tuple[str, ...]], ...]
    split_extent: str    # the extent symbol bound to num_splits at launch (``C``)


def render(schedule: Schedule, config: Config, sizes: Mapping[str, int]) -> PagedDecodeSources:
    """Both kernels for ``config`` at ``sizes``: the head dims' extents (``E``, ``F``), the page
    size (the slot rank's extent, ``M0``: a constexpr, any value >= 1) and the query heads per
    KV head (``R``: the program's rows are R padded to a power of two >= 16)."""
    body: PagedDecode = schedule.kernels[0].body
    c = schedule.cascade
    need = {role: c.rank_extent(r) for role, r in (("E", body.head), ("F", body.vhead), ("R", body.group),
                                                    ("M0", body.slot))}
    missing = [sym for sym in need.values() if sym not in sizes]
    if missing:
        raise CodegenError(f"render needs the extents {missing} in sizes= (head dims, query heads per KV head, "
                           f"page size), got {dict(sizes)}")
    dims = {role: sizes[sym] for role, sym in need.items()}
    if dims["M0"] < 1:
        raise CodegenError(f"the page size {need['M0']}={dims['M0']} must be at least 1")
    # the split count is a launch argument: any count renders the same source
    why = schedule.feasible(config.replace(num_splits=1),
                            {"E": dims["E"], "F": dims["F"], "R": dims["R"], "itemsize": body.q.dtype.itemsize})
    if why is not None:
        raise CodegenError(f"config {config.key()} is not feasible: {why}")
    if body.q.dtype not in DTYPE_NAMES:
        raise CodegenError(f"paged decode kernels take fp16, bf16 or fp32 inputs, not {body.q.dtype}")
    partial = _Partial(schedule, config, dims).render()
    merge = _Merge(schedule, dims).render()
    ext = lambda role: tuple(c.rank_extent(r) if r != body.split else _split_extent(schedule)  # noqa: E731
                             for r in role.ranks)
    workspace = tuple((role, ext(role)) for role in (body.partial_max, body.partial_sum, body.partial_num))
    return PagedDecodeSources(partial, merge, workspace, _split_extent(schedule))


def _split_extent(schedule: Schedule) -> str:
    """The extent symbol of the split rank, bound to ``num_splits`` at launch."""
    return extent_of(schedule.kernels[0].body.split)


def _tags(schedule: Schedule) -> str:
    tags = re.sub(r"^paged_decode_?", "", schedule.cascade.name.lower())
    return re.sub(r"[^a-z0-9]+", "_", tags).strip("_")


def _digest(*parts) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:8]


class _Partial(ArgumentBuilder):
    def __init__(self, schedule: Schedule, config: Config, dims: Mapping[str, int]):
        super().__init__(schedule.cascade, _PARTIAL_LOCALS)
        self.s, self.cfg, self.b = schedule, config, schedule.kernels[0].body
        self.block_e, self.block_f = padded_head_dim(dims["E"]), padded_head_dim(dims["F"])
        self.block_r, self.page = group_rows(dims["R"]), dims["M0"]

    def name(self) -> str:
        b = self.b
        d = f"d{self.block_e}" + (f"v{self.block_f}" if self.block_f != self.block_e else "")
        parts = ["paged_decode_partial", _tags(self.s), d, f"r{self.block_r}", f"ps{self.page}",
                 f"bn{self.cfg['BLOCK_N']}", f"w{self.cfg['num_warps']}", f"s{self.cfg['num_stages']}",
                 DTYPE_NAMES[b.q.dtype], _digest(b.score, b.q, b.k, b.v, b.table, b.lengths, b.extra_inputs)]
        return "_".join(x for x in parts if x)

    def render(self) -> KernelSource:
        b, c = self.b, self.c
        roles = [b.q, b.k, b.v, b.table, b.lengths, b.partial_max, b.partial_sum, b.partial_num, *b.extra_inputs]
        tensors = self.tensors(roles)
        (q_ptr, sq), (k_ptr, sk), (v_ptr, sv), (t_ptr, st), (l_ptr, sl) = tensors[:5]
        (lm_ptr, slm), (ls_ptr, sls), (ln_ptr, sln) = tensors[5:8]
        idx = {b.batch: self.names.take(f"idx_{b.batch}"), b.kv_head: self.names.take(f"idx_{b.kv_head}"),
               b.split: "idx_c"}
        size_r = self.extent_arg(self.extent(b.group), f"size_{b.group}")
        num_splits = self.extent_arg(_split_extent(self.s), "num_splits")
        head_dim = self.extent_arg(self.extent(b.head), "head_dim")
        head_dim_v = self.extent_arg(self.extent(b.vhead), "head_dim_v")
        # extents the kernel knows without an argument: per-sequence page counts and the page size
        local = {self.extent(b.slot): "PAGE", self.extent(b.page): "n_pages", self.extent(b.step): "pages_per_split"}
        for sym, name in local.items():
            self.extent_args.setdefault(self.c.canonical_extent(sym), name)
        for sym in sorted(extents_used(b.score)):
            if c.canonical_extent(sym) not in self.extent_args:
                self.extent_arg(sym)
        extra = {role.name: TensorArg(ptr, tuple(strides[r] for r in role.ranks),
                                      tuple(self.extent_arg(self.extent(r)) for r in role.ranks))
                 for role, (ptr, strides) in zip(b.extra_inputs, tensors[8:])}
        lengths = TensorArg(l_ptr, tuple(sl[r] for r in b.lengths.ranks),
                            tuple(self.extent_arg(self.extent(r), f"size_{r}") for r in b.lengths.ranks))
        params = {p.name: self.add(p.name, "param", p.name, dtype=p.dtype) for p in c.params
                  if p.name in {n.arg for n in b.score.walk() if n.op is Op.PARAM}}
        extents = {sym: self.extent_args[c.canonical_extent(sym)] for sym in extents_used(b.score)}
        grid_ranks = frozenset(idx)
        base = Binding(ranks=idx, extents=extents, params=params, tensors={**extra, b.lengths.name: lengths},
                       in_range=grid_ranks)
        # the sequence length (and other loads that depend on the program only) is read once
        prologue, hoisted = [], {}
        for n in b.score.walk():
            if n.op is Op.ACCESS and n.arg in base.tensors and n not in hoisted and free_ranks(n) <= grid_ranks:
                var = "seq_len" if n.arg == b.lengths.name else self.names.take(f"{n.arg.lower()}_val")
                prologue.append(f"{var} = {emit(n, base)}")
                hoisted[n] = var
        length_read = next((n for n in hoisted if n.arg == b.lengths.name), None)
        if length_read is None:
            raise CodegenError(f"the score {b.score} does not read the sequence lengths {b.lengths.name} "
                               f"at the program's {b.batch!r}")
        ranks = {**idx, b.group: "offs_r[:, None]", b.step: "w_n[None, :]", b.slot: "slot_n[None, :]"}
        nodes = {**hoisted, b.contraction: "qk", b.page_index: "page_n[None, :]"}
        score = emit(b.score, Binding(ranks, extents, params, nodes, base.tensors, grid_ranks))

        def at(ptr: str, role: TensorRole, strides: dict[str, str]) -> str:
            return " + ".join([ptr, *(f"{idx[r]} * {strides[r]}" for r in role.ranks if r in idx)])

        p = dict(
            kind="partial", name=self.name(), cascade_name=c.name, cascade_hash=c.structural_hash()[:12],
            config_key=",".join(f"{n}={v}" for n, v in self.cfg.items if n != "num_splits"), page=b.page,
            split=b.split, kv_head=b.kv_head, batch=b.batch,
            group=b.group, score_ir=str(b.score), lm_name=b.partial_max.name, ls_name=b.partial_sum.name,
            ln_name=b.partial_num.name, args=self.arg_lines(), idx_g=idx[b.kv_head], idx_b=idx[b.batch],
            size_r=size_r, head_dim=head_dim, head_dim_v=head_dim_v, prologue=prologue, seq_len="seq_len",
            num_splits=num_splits, q_base=at(q_ptr, b.q, sq), k_base=at(k_ptr, b.k, sk), v_base=at(v_ptr, b.v, sv),
            t_base=at(t_ptr, b.table, st), stride_q_r=sq[b.group], stride_q_e=sq[b.head], stride_t_page=st[b.page],
            stride_k_block=sk[b.block], stride_k_slot=sk[b.slot], stride_k_e=sk[b.head],
            stride_v_block=sv[b.block], stride_v_slot=sv[b.slot], stride_v_f=sv[b.vhead], score=score,
            dot_kwargs=', input_precision="ieee"' if b.q.dtype is DType.F32 else "",
            lm_base=at(lm_ptr, b.partial_max, slm), ls_base=at(ls_ptr, b.partial_sum, sls),
            ln_base=at(ln_ptr, b.partial_num, sln), stride_lm_r=slm[b.group], stride_ls_r=sls[b.group],
            stride_ln_r=sln[b.group], stride_ln_f=sln[b.vhead],
        )
        text = template(TEMPLATE).render(p=p)
        consts = (("BLOCK_R", self.block_r), ("BLOCK_N", self.cfg["BLOCK_N"]), ("BLOCK_E", self.block_e),
                  ("BLOCK_F", self.block_f), ("PAGE", self.page))
        grid = (((_split_extent(self.s),), None), ((self.extent(b.kv_head),), None), ((self.extent(b.batch),), None))
        out_ext = tuple(self.extent(r) if r != b.split else _split_extent(self.s) for r in b.partial_num.ranks)
        return KernelSource(p["name"], text, tuple(self.args), consts, self.cfg["num_warps"], self.cfg["num_stages"],
                            grid, b.partial_num, out_ext)


class _Merge(ArgumentBuilder):
    def __init__(self, schedule: Schedule, dims: Mapping[str, int]):
        super().__init__(schedule.cascade, _MERGE_LOCALS)
        self.s, self.b = schedule, schedule.kernels[0].body
        self.block_f = padded_head_dim(dims["F"])

    def render(self) -> KernelSource:
        b, c = self.b, self.c
        tensors = self.tensors([b.partial_max, b.partial_sum, b.partial_num, b.out])
        (lm_ptr, slm), (ls_ptr, sls), (ln_ptr, sln), (o_ptr, so) = tensors
        grid_ranks = (b.batch, b.kv_head, b.group)
        idx = {r: self.names.take(f"idx_{r}") for r in grid_ranks}
        sizes = {r: self.extent_arg(self.extent(r), f"size_{r}") for r in grid_ranks[1:]}
        num_splits = self.extent_arg(_split_extent(self.s), "num_splits")
        head_dim_v = self.extent_arg(self.extent(b.vhead), "head_dim_v")
        decompose = ["rest = pid"]
        for r in reversed(grid_ranks[1:]):
            decompose += [f"{idx[r]} = rest % {sizes[r]}", f"rest = rest // {sizes[r]}"]
        decompose.append(f"{idx[grid_ranks[0]]} = rest")
        lm_read = next(n for n in b.merge_den.walk() if n.op is Op.ACCESS and n.arg == b.partial_max.name)
        ls_read = next(n for n in b.merge_den.walk() if n.op is Op.ACCESS and n.arg == b.partial_sum.name)
        ln_read = next(n for n in b.merge_num.walk() if n.op is Op.ACCESS and n.arg == b.partial_num.name)
        ranks = {**idx, b.split: "cs", b.vhead: "offs_f"}
        den = emit(b.merge_den, Binding({**ranks, b.split: "cs"}, nodes={lm_read: "lm", ls_read: "ls",
                                                                       b.global_max: "gm"}))
        num = emit(b.merge_num, Binding({**ranks, b.split: "cs[:, None]", b.vhead: "offs_f[None, :]"},
                                        nodes={lm_read: "lm[:, None]", ln_read: "ln", b.global_max: "gm"}))
        output = emit(b.output, Binding(ranks, nodes={b.denominator: "sd", b.numerator: "av"}))

        def at(ptr: str, role: TensorRole, strides: dict[str, str]) -> str:
            return " + ".join([ptr, *(f"{idx[r]} * {strides[r]}" for r in role.ranks if r in idx)])

        name = "_".join(x for x in ("paged_decode_merge", _tags(self.s), f"d{self.block_f}", DTYPE_NAMES[b.q.dtype],
                                    _digest(b.merge_den, b.merge_num, b.output, b.out)) if x)
        p = dict(
            kind="merge", name=name, cascade_name=c.name, cascade_hash=c.structural_hash()[:12], page=b.page,
            den_ir=f"{b.denominator} = sum[{b.split}]({b.merge_den})",
            num_ir=f"{b.numerator} = sum[{b.split}]({b.merge_num})", output_ir=str(b.output),
            gm_ir=f"{b.global_max} = max[{b.split}]({lm_read})", args=self.arg_lines(), decompose=decompose,
            head_dim_v=head_dim_v, num_splits=num_splits, lm_base=at(lm_ptr, b.partial_max, slm),
            ls_base=at(ls_ptr, b.partial_sum, sls), ln_base=at(ln_ptr, b.partial_num, sln),
            stride_lm_c=slm[b.split], stride_ls_c=sls[b.split], stride_ln_c=sln[b.split], stride_ln_f=sln[b.vhead],
            merge_den=den, merge_num=num, output=output, o_base=at(o_ptr, b.out, so), stride_o_f=so[b.vhead],
            out_pointer=o_ptr,
        )
        text = template(TEMPLATE).render(p=p)
        consts = (("BLOCK_C", MERGE_BLOCK_C), ("BLOCK_F", self.block_f))
        grid = ((tuple(self.extent(r) for r in grid_ranks), None),)
        return KernelSource(name, text, tuple(self.args), consts, MERGE_WARPS, 1, grid, b.out,
                            tuple(self.extent(r) for r in b.out.ranks))
