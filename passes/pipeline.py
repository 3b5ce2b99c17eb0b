"""The lowering pipeline: a flat list of named steps, top to bottom.

The step names are the names in ``--print-after-all`` dumps. With
``KASCADE_CHECK_IR=1`` (or ``check=True``) the checker runs after every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from kascade.ir.cascade import Cascade, Operator
from kascade.ir.expr import Op
from kascade.ir.printer import format_cascade
from kascade.ir.settings import settings
from kascade.ir.validate import validate
from kascade.passes.analysis import pass_counts
from kascade.passes.moe_grouping import group_experts, has_expert_part
from kascade.passes.normalize import defer_normalization
from kascade.passes.softmax import online_softmax, split_reduction
from kascade.passes.split_rank import split_rank


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Cascade], Cascade]


def prefill_steps(rank: str = "m", tile: int | str | None = None) -> tuple[Step, ...]:
    """3-pass -> 2-pass -> tiled -> FuseMax 1-pass: one fused kernel streams the keys."""
    return (
        Step("defer_normalization", defer_normalization),
        Step("split_rank", partial(split_rank, rank=rank, tile=tile)),
        Step("online_softmax", partial(online_softmax, rank=f"{rank}1")),
    )


def decode_steps(rank: str = "m1", parts: int | str | None = None) -> tuple[Step, ...]:
    """Split-KV: the keys of one query spread over independent workers, then a merge."""
    return (
        Step("defer_normalization", defer_normalization),
        Step("split_kv", partial(split_reduction, rank=rank, parts=parts)),
    )


def moe_steps() -> tuple[Step, ...]:
    """MoE: the expert part runs once per expert over the rows routed to it (grouped GEMMs)."""
    return (Step("group_experts", group_experts),)


def softmax_ranks(c: Cascade) -> tuple[str, ...]:
    """The ranks of the first max that is read as ``exp(x - max)`` (empty if none). A softmax
    over a rank that an operator also runs over (a router's softmax before its top-k) is
    left alone: operators are not tiled."""
    op_ranks = {r for s in c.stmts if isinstance(s, Operator) for r in (s.over, *s.ranks)}
    readers = {n.args[0].args[1].arg for s in c.stmts for n in s.expr.walk()
               if n.op is Op.FUNC and n.arg == "exp" and n.args[0].op is Op.SUB
               and n.args[0].args[1].op is Op.ACCESS}
    for s in c.stmts:
        if s.expr.op is Op.REDUCE and s.expr.reduce_kind == "max" and s.name in readers \
                and not set(s.expr.reduce_ranks) & op_ranks:
            return s.expr.reduce_ranks
    return ()


def default_steps(c: Cascade, tile: int | str | None = None, parts: int | str | None = None) -> tuple[Step, ...]:
    """A softmax over one rank gets the prefill pipeline; over several ranks (a paged
    cache's blocks and slots) the split-KV decode pipeline over the outer one. An MoE
    block (alone or in a layer) gets its experts grouped last."""
    ranks = softmax_ranks(c)
    moe = moe_steps() if has_expert_part(c) else ()
    if len(ranks) == 1:
        return prefill_steps(ranks[0], tile) + moe
    if len(ranks) > 1:
        return decode_steps(ranks[0], parts) + moe
    return (Step("defer_normalization", defer_normalization),) + moe


def lower(c: Cascade, steps: tuple[Step, ...], *, check: bool | None = None) -> list[tuple[str, Cascade]]:
    """Run ``steps``; return ``[("input", c), (step name, cascade after it), ...]``."""
    check = settings().check_ir if check is None else check
    trace = [("input", validate(c))]
    for step in steps:
        c = step.run(c)
        if check:
            validate(c)
        trace.append((step.name, c))
    return trace


def format_trace(trace: list[tuple[str, Cascade]], all_steps: bool = True) -> str:
    """The ``--print-after-all`` dump: each step's cascade under a header with its pass counts."""
    out = []
    for name, c in trace if all_steps else trace[-1:]:
        passes = ", ".join(f"{r}: {n}" for r, n in pass_counts(c).items())
        out.append(f"# ---- after {name} ---- passes over {passes}\n{format_cascade(c)}")
    return "\n".join(out)
