"""The expert-grouped MoE schedule: two grouped GEMMs over block-aligned rows, and the combine.

:func:`moe_schedule` matches the expert-grouped form that
:func:`kascade.passes.moe_grouping.group_experts` produces (rows ``q`` = the (token, choice)
pairs sorted by expert) and lowers its expert part to three kernels:

- ``moe_gate_up``: grouped GEMM 1. One program per (block of ``BLOCK_M`` rows, ``BLOCK_N``
  columns of the FFN dim ``f``); the block's rows all belong to one expert (the routing
  bookkeeping pads every expert's run to whole blocks), so the program streams that expert's
  gate and up rows of ``W13`` with two fp32 accumulators, applies the cascade's activation
  (``ACT``) in the epilogue and writes ``ACT`` rows.
- ``moe_down``: grouped GEMM 2, ``ACT`` rows times the expert's ``W2``; its epilogue weights
  the rows by the routing weight ``TW`` (``WEIGHT_IN_DOWN=1``) and either adds them straight
  into an fp32 output with atomics (``FUSED_COMBINE=1``) or writes them in pair order.
- ``moe_combine`` (``FUSED_COMBINE=0``): one program per token and ``d`` tile sums the token's
  ``K`` rows (weighting them when ``WEIGHT_IN_DOWN=0``).

The schedule implements the expert part only. ``X``, the routing weights ``TW`` and a
residual may be computed by other statements (a decoder layer's normalised hidden state and
its attention output); the routing statements (softmax, top-k, the pair numbering, counting
and sort) are not kernels of this schedule either: their block-aligned result is what ``backends/moe_routing.py``
computes (``sorted_pairs``, ``block_expert``, ``num_rows``). The grid is fixed by the row
capacity (programs past the used rows return at once), so no launch depends on how many
tokens each expert got.

:func:`choose_moe_config` picks a config: decode-sized batches (a few rows per expert)
stream weights with 16-row blocks and wide ``N`` / ``K`` tiles; prefill-sized ones use
tensor-core tiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from kascade.ir.cascade import Cascade, Einsum, Operator
from kascade.ir.dtypes import DType
from kascade.ir.expr import Expr, Op, free_ranks
from kascade.ir.validate import validate
from kascade.passes.schedule import (
    SMEM_BUDGET,
    Choice,
    Config,
    Constraint,
    Kernel,
    Schedule,
    ScheduleError,
    TensorRole,
    padded_head_dim,
    plain_ranks,
)


@dataclass(frozen=True)
class MoeGrouped:
    """The matched expert-grouped MoE, in the cascade's own names.

    The kernels read ``x`` at the token of each row's pair (``pair // K``), ``w13`` / ``w2`` at
    the row's expert; ``activation`` is the ACT expression with ``gate`` / ``up`` (its reads of
    ``GU`` at ``h = 0`` / ``h = 1``) to be bound to the two accumulators."""
    x: TensorRole               # X[t, d]
    w13: TensorRole             # W13[x, h, f, d]: vLLM's w1 (E, 2F, D) viewed as (E, 2, F, D)
    w2: TensorRole              # W2[x, d, f]
    weights: TensorRole         # TW[t, k]: routing weight of each (token, choice)
    out: TensorRole             # Y[t, d]
    residual: TensorRole | None  # R[t, d] added by the combine, if the source had one
    gu: str                     # names of the grouped statements (GU, ACT, EO)
    act: str
    eo: str
    row: str                    # q: rows (pairs sorted by expert)
    token: str                  # t
    choice: str                 # k
    hidden: str                 # d: contracted by GEMM 1, the output columns of GEMM 2
    inner: str                  # f: the FFN dim, GEMM 1's columns, contracted by GEMM 2
    stack: str                  # h: gate / up
    activation: Expr
    gate: Expr                  # GU[q, 0, f] as the activation reads it
    up: Expr                    # GU[q, 1, f]
    row_expert: Expr            # SE_ID[q]: the expert of row q
    row_token: Expr             # PAIR[q] // K: the token of row q


# ---- free parameters and constraints ----------------------------------------------------
MOE_SPACE = (
    Choice("BLOCK_M", (16, 32, 64, 128)),
    Choice("BLOCK_N", (32, 64, 128, 256)),
    Choice("BLOCK_K", (32, 64, 128, 256)),
    Choice("GROUP_M", (1, 4, 8, 16)),
    Choice("num_warps", (4, 8)),
    Choice("num_stages", (2, 3, 4, 5)),
    Choice("WEIGHT_IN_DOWN", (0, 1)),
    Choice("FUSED_COMBINE", (0, 1)),
)
ACCUMULATOR_LIMIT = 64   # fp32 accumulator values per thread; see _registers


def _fusion(cfg: Config, sizes: Mapping[str, int]) -> str | None:
    if cfg["FUSED_COMBINE"] and not cfg["WEIGHT_IN_DOWN"]:
        return ("FUSED_COMBINE=1 adds the down GEMM's rows straight into the output, so they must be weighted "
                "there: it needs WEIGHT_IN_DOWN=1")
    return None


def _tile_waste(cfg: Config, sizes: Mapping[str, int]) -> str | None:
    """A contraction tile wider than both contracted dims (``D`` for GEMM 1, ``F`` for GEMM 2,
    padded to a power of two) only loads masked zeros; so does an output tile wider than both."""
    if "D" not in sizes or "F" not in sizes:
        return None
    widest = max(padded_head_dim(sizes["D"]), padded_head_dim(sizes["F"]))
    for name in ("BLOCK_K", "BLOCK_N"):
        if cfg[name] > max(32, widest):
            return f"{name}={cfg[name]} is wider than the padded hidden / FFN dims ({widest})"
    return None


def _registers(cfg: Config, sizes: Mapping[str, int]) -> str | None:
    """The gate-up kernel holds two fp32 ``BLOCK_M x BLOCK_N`` accumulators; spread over the
    threads they must leave room for the operand tiles and the epilogue's addresses (calibrated
    on sm_80 / sm_90a compiles with ``backends/aot.py``: at 128 values per thread the sm_80 kernel
    spills heavily, at 64 neither does). fp32 inputs, whose exact ``tl.dot`` runs on FMA units
    with its operands in registers, count four times and take at most 32 columns of K a step."""
    fp32 = sizes.get("itemsize", 2) >= 4
    per_thread = 2 * cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"]) * (4 if fp32 else 1)
    if fp32 and cfg["BLOCK_K"] > 32:
        return f"fp32 operand tiles of BLOCK_K={cfg['BLOCK_K']} spill (fp32 takes BLOCK_K=32)"
    if per_thread > ACCUMULATOR_LIMIT:
        return f"~{per_thread} accumulator values per thread (gate and up tiles) exceed {ACCUMULATOR_LIMIT}"
    return None


def _shared_memory(cfg: Config, sizes: Mapping[str, int]) -> str | None:
    """The gate-up kernel's pipelined operands: an ``x`` tile and two weight tiles per stage.
    Triton keeps ``num_stages`` buffers of each for sm_90a's wgmma tiles and ``num_stages - 1``
    otherwise (measured with ``backends/aot.py``); this bounds the larger."""
    item = sizes.get("itemsize", 2)
    need = item * cfg["num_stages"] * cfg["BLOCK_K"] * (cfg["BLOCK_M"] + 2 * cfg["BLOCK_N"])
    if need > SMEM_BUDGET:
        return f"needs ~{need // 1024} KiB of shared memory, more than {SMEM_BUDGET // 1024} KiB"
    return None


MOE_CONSTRAINTS = (
    Constraint("fusion", _fusion),
    Constraint("tile_waste", _tile_waste),
    Constraint("registers", _registers),
    Constraint("shared_memory", _shared_memory),
)


def moe_schedule(grouped: Cascade) -> Schedule:
    """The grouped-GEMM kernels for an expert-grouped MoE cascade (see the module docstring).

    Raises :class:`ScheduleError` naming the part of the grouped form that did not match.
    """
    c = validate(grouped)
    body = _Matcher(c).match()
    gate_up = Kernel("moe_gate_up", "moe_gate_up", (((body.row,), "BLOCK_M"), ((body.inner,), "BLOCK_N")),
                     ((body.hidden, "BLOCK_K"),), body)
    down = Kernel("moe_down", "moe_down", (((body.row,), "BLOCK_M"), ((body.hidden,), "BLOCK_N")),
                  ((body.inner, "BLOCK_K"),), body)
    combine = Kernel("moe_combine", "moe_combine", (((body.token,), None), ((body.hidden,), None)), (), body)
    return Schedule(c, (gate_up, down, combine), MOE_SPACE, MOE_CONSTRAINTS)


@cache
def swiglu_moe_schedule(dtype: DType) -> Schedule:
    """The schedule of the library's SwiGLU MoE (vLLM fused_moe semantics) with ``dtype``
    weights: ``moe(form="gather")`` grouped by :func:`~kascade.passes.moe_grouping.group_experts`."""
    from kascade.ir.library.moe import moe
    from kascade.passes.moe_grouping import group_experts
    return moe_schedule(group_experts(moe(form="gather", dtype=dtype)))


# ---- the default config -----------------------------------------------------------------
def expected_experts(experts: int, tokens: int, top_k: int = 1) -> float:
    """Expected number of distinct experts that ``tokens`` tokens pick when each picks ``top_k``
    distinct experts uniformly: ``E (1 - (1 - K/E)^T)`` (an expert is missed by a token with
    probability ``1 - K/E``). With ``K = 1`` it is the ``E (1 - (1 - 1/E)^(T*K))`` of ``T*K``
    independent picks; for ``K > 1`` that formula undercounts (a token never picks one expert
    twice: one token with K=2 touches exactly 2 experts, not 1.9)."""
    if experts <= 0 or tokens <= 0:
        return 0.0
    miss = max(0.0, 1.0 - min(top_k, experts) / experts)
    return experts * (1.0 - miss ** tokens)


def choose_moe_config(schedule: Schedule, shapes: Mapping[str, int]) -> tuple[Config, str]:
    """A config for ``shapes`` (``T`` tokens, ``K`` experts per token, ``E`` experts, hidden
    ``D``, FFN ``F``, optional ``itemsize``, default 2) and the reason, for ``KASCADE_DEBUG``.

    The deciding number is the expected rows per active expert, ``T*K / E_active`` with
    ``E_active = E (1 - (1 - K/E)^T)`` (:func:`expected_experts`). Decode-sized batches (up to
    16 rows an expert) are weight streaming: 16-row blocks (tl.dot's minimum), wide ``N`` and ``K`` tiles so each
    program reads long contiguous weight rows, deep pipelines, no L2 grouping (every weight
    tile is read once anyway), the routing weight in the down GEMM and the combine fused into
    it by atomics (one launch less, no row buffer). Prefill-sized ones get tensor-core tiles
    (128 x 64 or 64 x 128, 8 warps), ``GROUP_M=8`` so that neighbouring row blocks of one expert
    share its weight tiles in L2, and a separate, deterministic combine. fp32 inputs (exact
    ``tl.dot`` on FMA units) get smaller tiles. A rejected config is shrunk (stages, then
    ``K``, ``N`` and ``M`` tiles) until the constraints accept it.
    """
    missing = [s for s in ("T", "K", "E", "D", "F") if s not in shapes]
    if missing:
        raise ScheduleError(f"choose_moe_config needs the extents {missing} in shapes (T tokens, K experts per "
                            f"token, E experts, D hidden, F FFN), got {dict(shapes)}")
    T, K, E, D, F = (int(shapes[s]) for s in ("T", "K", "E", "D", "F"))
    item = int(shapes.get("itemsize", 2))
    pairs = T * K
    active = max(1.0, expected_experts(E, T, K))
    rows = pairs / active
    fp32 = item >= 4
    if rows <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32 if fp32 else 256, GROUP_M=1, num_warps=4, num_stages=3,
                   WEIGHT_IN_DOWN=1, FUSED_COMBINE=1)
        why = f"decode-sized ({pairs} pairs, ~{rows:.1f} rows per active expert): weight streaming"
    elif rows <= 48:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32 if fp32 else 128, GROUP_M=4, num_warps=8 if fp32 else 4,
                   num_stages=2 if fp32 else 4, WEIGHT_IN_DOWN=1, FUSED_COMBINE=1)
        why = f"small batch ({pairs} pairs, ~{rows:.1f} rows per active expert): 32-row blocks"
    else:
        bm = 128 if rows >= 256 and not fp32 else 64
        cfg = dict(BLOCK_M=bm, BLOCK_N=32 if fp32 else 64 if bm == 128 else 128, BLOCK_K=32 if fp32 else 64, GROUP_M=8,
                   num_warps=8, num_stages=2 if fp32 else 3, WEIGHT_IN_DOWN=1, FUSED_COMBINE=0)
        why = f"prefill-sized ({pairs} pairs, ~{rows:.0f} rows per active expert): {bm}-row tensor-core tiles"
    widest = max(32, padded_head_dim(D), padded_head_dim(F))
    for name in ("BLOCK_N", "BLOCK_K"):
        if cfg[name] > widest:
            cfg[name] = widest
            why += f"; {name}={widest} for D={D}, F={F}"
    config = Config.of(cfg)
    sizes = {"D": D, "F": F, "itemsize": item}
    while (reason := schedule.feasible(config, sizes)) is not None:
        if config["num_stages"] > 2:
            config = config.replace(num_stages=config["num_stages"] - 1)
        elif config["BLOCK_K"] > 32:
            config = config.replace(BLOCK_K=config["BLOCK_K"] // 2)
        elif config["BLOCK_N"] > 32:
            config = config.replace(BLOCK_N=config["BLOCK_N"] // 2)
        elif config["BLOCK_M"] > 16:
            config = config.replace(BLOCK_M=config["BLOCK_M"] // 2)
        else:
            raise ScheduleError(f"no MoE config fits: {reason}")
        why += f"; shrunk ({reason})"
    return config, why


# ---- matching ---------------------------------------------------------------------------
class _Matcher:
    """Finds the grouped GEMMs, the activation and the combine, failing with what is missing."""

    def __init__(self, c: Cascade):
        self.c = c

    def fail(self, msg: str) -> ScheduleError:
        return ScheduleError(f"moe_schedule({self.c.name}): {msg}")

    def match(self) -> MoeGrouped:
        c = self.c
        gu, xa, wa, d = self.gate_up()
        q = next(iter(free_ranks(wa.args[0])))
        h, f = (i.arg for i in wa.args[1:3])
        act, gate, up = self.activation(gu, q, h, f)
        eo, w2a = self.down(act, q, f, wa.args[0])
        d2 = w2a.args[1].arg
        if c.rank_extent(d2) != c.rank_extent(d):
            raise self.fail(f"{eo.name} writes {d2!r} ({c.rank_extent(d2)}), which must be the hidden dim "
                            f"{d!r} ({c.rank_extent(d)}) that {gu.name} contracts")
        y, tw, residual, k = self.combine(eo, d2, xa)
        t = y.ranks[0]
        w13_decl, w2_decl = c.input(wa.arg), c.input(w2a.arg)
        role = lambda decl: TensorRole(decl.name, decl.ranks, decl.dtype)  # noqa: E731
        # an intermediate X (a normalised hidden state inside a layer) without a declared dtype
        # reaches the kernels in the weights' dtype
        x_role = TensorRole(xa.arg, c.ranks_of(xa.arg), self.dtype_of(xa.arg, w13_decl.dtype))
        if len({x_role.dtype, w13_decl.dtype, w2_decl.dtype}) != 1:
            raise self.fail(f"{xa.arg}, {wa.arg} and {w2a.arg} must share one dtype, got "
                            f"{x_role.dtype}, {w13_decl.dtype}, {w2_decl.dtype}")
        tw_role = TensorRole(tw.arg, c.ranks_of(tw.arg), self.dtype_of(tw.arg))
        out = TensorRole(y.name, y.ranks, y.dtype or x_role.dtype)
        res_role = None if residual is None else TensorRole(residual.arg, plain_ranks(residual),
                                                            self.dtype_of(residual.arg, x_role.dtype))
        return MoeGrouped(x_role, role(w13_decl), role(w2_decl), tw_role, out, res_role, gu.name, act.name,
                          eo.name, q, t, k, d, f, h, act.expr, gate, up, wa.args[0], xa.args[0])

    def dtype_of(self, name: str, default: DType = DType.F32) -> DType:
        """A tensor's declared dtype; ``default`` for an intermediate that declares none."""
        decl = self.c.input(name)
        if decl is not None:
            return decl.dtype
        stmt = self.c.producer(name)
        dt = stmt.dtype if isinstance(stmt, Einsum) else stmt.dtypes[stmt.names.index(name)]
        return dt or default

    def sorted_by_expert(self, e: Expr) -> tuple[Operator, int] | None:
        """``(sort, output position)`` when ``e`` is ``S[q]`` for an output ``S`` of a ``sort``."""
        if e.op is not Op.ACCESS or len(e.args) != 1 or e.args[0].op is not Op.RANK:
            return None
        stmt = self.c.producer(e.arg)
        if isinstance(stmt, Operator) and stmt.kind == "sort":
            return stmt, stmt.names.index(e.arg)
        return None

    def gate_up(self) -> tuple[Einsum, Expr, Expr, str]:
        """``GU[q, h, f] = sum[d](X[PAIR[q] // K, d] * W13[SE_ID[q], h, f, d])``."""
        c, found, seen = self.c, [], []
        for s in c.einsums:
            x = s.expr
            if not (x.op is Op.REDUCE and x.reduce_kind == "sum" and len(x.reduce_ranks) == 1
                    and x.args[0].op is Op.MUL):
                continue
            a, b = x.args[0].args
            if not (a.op is Op.ACCESS and b.op is Op.ACCESS):
                continue
            seen.append(s.name)
            for xa, wa in ((a, b), (b, a)):
                if c.input(wa.arg) is not None and len(wa.args) == 4 and self.sorted_by_expert(wa.args[0]) \
                        and len(xa.args) == 2 and xa.args[0].op is not Op.RANK:
                    found.append((s, xa, wa, x.reduce_ranks[0]))
        if len(found) != 1:
            raise self.fail(f"expected one grouped GEMM 'GU[q, h, f] = sum[d](X[PAIR[q] // K, d] * "
                            f"W13[SE_ID[q], h, f, d])' reading the weights at a sorted expert id; sums of input "
                            f"products found: {seen or 'none'}, matching: {[f[0].name for f in found] or 'none'}")
        gu, xa, wa, d = found[0]
        q = wa.args[0].args[0].arg
        rest = plain_ranks(Expr(Op.ACCESS, wa.args[1:], wa.arg))
        if rest is None or rest[2] != d or xa.args[1] != Expr(Op.RANK, (), d):
            raise self.fail(f"{gu.name} must read {wa.arg}[expert, h, f, {d}] and {xa.arg}[row, {d}] "
                            f"(vLLM's w1 layout (E, 2F, D)), found {wa} and {xa}")
        if set(gu.ranks) != {q, rest[0], rest[1]} or gu.step is not None:
            raise self.fail(f"{gu.name}{list(gu.ranks)} must have the ranks {[q, *rest[:2]]}")
        tok = xa.args[0]
        sort, pos = self.sorted_by_expert(wa.args[0])
        pair = tok.args[0] if tok.op is Op.FLOORDIV else None
        if pos != 0 or pair is None or self.sorted_by_expert(pair) != (sort, 1) or tok.args[1].op is not Op.EXTENT:
            raise self.fail(f"{gu.name} must read {xa.arg} at the token of each row, PAIR[{q}] // K with "
                            f"SE_ID[{q}], PAIR[{q}] = sort[p](EID[p]); found {xa.arg}[{tok}, ..] and {wa.arg}"
                            f"[{wa.args[0]}, ..]")
        return gu, xa, wa, d

    def single_user(self, name: str, what: str) -> Einsum:
        users = self.c.users(name)
        if len(users) != 1 or not isinstance(users[0], Einsum):
            raise self.fail(f"{name} must be read by exactly one Einsum ({what}), found "
                            f"{[u.label for u in users] or 'none'}")
        return users[0]

    def activation(self, gu: Einsum, q: str, h: str, f: str) -> tuple[Einsum, Expr, Expr]:
        """``ACT[q, f] = act(GU[q, 0, f], GU[q, 1, f])``, elementwise, reading nothing else."""
        act = self.single_user(gu.name, "the activation")
        if set(act.ranks) != {q, f} or act.step is not None:
            raise self.fail(f"the activation {act.name}{list(act.ranks)} must have the ranks [{q}, {f}]")
        reads = {}
        for n in act.expr.walk():
            if n.op is not Op.ACCESS:
                continue
            if n.arg != gu.name:
                raise self.fail(f"the activation {act.name} may only read {gu.name}, found {n}")
            idx = dict(zip(gu.ranks, n.args))
            hv = idx[h]
            if idx[q] != Expr(Op.RANK, (), q) or idx[f] != Expr(Op.RANK, (), f) or hv.op is not Op.CONST \
                    or hv.arg not in (0, 1):
                raise self.fail(f"the activation must read {gu.name} at [{q}, 0 or 1, {f}] (gate, up), found {n}")
            reads[hv.arg] = n
        # what is left once the gate and up reads are leaves must be plain arithmetic on constants
        rest = act.expr.rewrite(lambda n: Expr(Op.CONST, (), 0.0) if n.op is Op.ACCESS else None)
        bad = [str(n) for n in rest.walk() if n.op in (Op.REDUCE, Op.PARAM, Op.EXTENT, Op.RANK)]
        if bad:
            raise self.fail(f"the activation {act.name} must be elementwise in the gate and up values and constants; "
                            f"it uses {bad}")
        if set(reads) != {0, 1}:
            raise self.fail(f"the activation {act.name} must read both the gate ({gu.name}[.., 0, ..]) and the up "
                            f"({gu.name}[.., 1, ..]) projections; it reads h = {sorted(reads)}")
        return act, reads[0], reads[1]

    def down(self, act: Einsum, q: str, f: str, expert: Expr) -> tuple[Einsum, Expr]:
        """``EO[q, d] = sum[f](ACT[q, f] * W2[SE_ID[q], d, f])``."""
        eo = self.single_user(act.name, "the down GEMM")
        x = eo.expr
        shape = f"'{eo.name}[{q}, d] = sum[{f}]({act.name}[{q}, {f}] * W2[{expert}, d, {f}])'"
        if not (x.op is Op.REDUCE and x.reduce_kind == "sum" and x.reduce_ranks == (f,) and x.args[0].op is Op.MUL):
            raise self.fail(f"the down GEMM must be {shape}, found {x}")
        a, b = x.args[0].args
        aa, wa = (a, b) if a.op is Op.ACCESS and a.arg == act.name else (b, a)
        if aa.op is not Op.ACCESS or aa.arg != act.name or plain_ranks(aa) != act.ranks or wa.op is not Op.ACCESS \
                or self.c.input(wa.arg) is None or len(wa.args) != 3 or wa.args[0] != expert \
                or wa.args[2] != Expr(Op.RANK, (), f) or wa.args[1].op is not Op.RANK:
            raise self.fail(f"the down GEMM must be {shape} (vLLM's w2 layout (E, D, F)), found {x}")
        if set(eo.ranks) != {q, wa.args[1].arg} or eo.step is not None:
            raise self.fail(f"{eo.name}{list(eo.ranks)} must have the ranks [{q}, {wa.args[1].arg}]")
        return eo, wa

    def combine(self, eo: Einsum, d: str, xa: Expr) -> tuple[Einsum, Expr, Expr | None, str]:
        """``Y[t, d] = (R[t, d] +) sum[k](TW[t, k] * EO[POS[t * K + k], d])``."""
        y = self.single_user(eo.name, "the combine")
        shape = f"'Y[t, {d}] = sum[k](TW[t, k] * {eo.name}[POS[t * K + k], {d}])' (plus a residual R[t, {d}])"
        if not y.output or y.step is not None or len(y.ranks) != 2 or y.ranks[1] != d:
            raise self.fail(f"the combine must be the output {shape}, found {y.name}{list(y.ranks)}")
        t = y.ranks[0]
        x, residual = y.expr, None
        if x.op is Op.ADD:
            for s, r in ((x.args[0], x.args[1]), (x.args[1], x.args[0])):
                if r.op is Op.ACCESS and plain_ranks(r) == (t, d) and s.op is Op.REDUCE:
                    x, residual = s, r
                    break
        if not (x.op is Op.REDUCE and x.reduce_kind == "sum" and len(x.reduce_ranks) == 1
                and x.args[0].op is Op.MUL):
            raise self.fail(f"the combine must be {shape}, found {y.expr}")
        k = x.reduce_ranks[0]
        a, b = x.args[0].args
        ea, wa = (a, b) if a.op is Op.ACCESS and a.arg == eo.name else (b, a)
        ok = (ea.op is Op.ACCESS and ea.arg == eo.name and wa.op is Op.ACCESS and plain_ranks(wa) == (t, k)
              and self.c.ranks_of(wa.arg) == (t, k) and dict(zip(eo.ranks, ea.args)).get(d) == Expr(Op.RANK, (), d))
        if ok:
            row = dict(zip(eo.ranks, ea.args))[next(r for r in eo.ranks if r != d)]
            stmt = self.c.producer(row.arg) if row.op is Op.ACCESS else None
            ok = isinstance(stmt, Operator) and stmt.kind == "sort" and row.arg == stmt.names[1] \
                and free_ranks(row) == {t, k}
        if not ok:
            raise self.fail(f"the combine must be {shape}, reading {eo.name} at the row of each pair (the indices "
                            f"of a sort of PAIR), found {y.expr}")
        if self.c.rank_extent(t) != self.c.rank_extent(self.c.ranks_of(xa.arg)[0]):
            raise self.fail(f"the combine's token rank {t!r} must index the tokens of {xa.arg}")
        return y, wa, residual, k

