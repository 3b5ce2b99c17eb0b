"""The pieces under the prefill kernel: schedule matching, configs, Triton expression text, AOT."""

from __future__ import annotations

import dataclasses

import pytest

from kascade.backends.aot import compile_kernel, gpu_target, signature
from kascade.codegen.attention_prefill import render
from kascade.codegen.triton_expr import Binding, TensorArg, emit
from kascade.ir import RewriteError, f16
from kascade.ir import expr as E
from kascade.ir.errors import CodegenError
from kascade.ir.library import attention, gemm
from kascade.passes.schedule import (
    Choice,
    Config,
    Schedule,
    ScheduleError,
    attention_prefill_schedule,
    choose_config,
    default_config,
    key_bound,
    mask_conjuncts,
    padded_head_dim,
)


# ---- schedule --------------------------------------------------------------------------------
def test_config_is_a_sorted_frozen_value_with_a_stable_key():
    cfg = Config.of(num_warps=4, BLOCK_N=32, BLOCK_M=64, num_stages=2)
    assert cfg.key() == "BLOCK_M=64,BLOCK_N=32,num_stages=2,num_warps=4"
    assert cfg == Config.of({"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 2, "num_warps": 4}) and hash(cfg)
    assert cfg["BLOCK_N"] == 32 and cfg.as_dict()["num_warps"] == 4 and cfg.replace(BLOCK_N=64)["BLOCK_N"] == 64
    with pytest.raises(KeyError, match="no parameter 'BLOCK_K'"):
        cfg["BLOCK_K"]


def test_prefill_schedule_finds_the_roles_of_gqa_attention():
    """The 3-pass cascade with a causal window: roles, grid ranks, score and key bounds."""
    s = attention_prefill_schedule(attention("3pass", causal=True, window=(4, -1), alibi=True))
    (k,) = s.kernels
    b = k.body
    assert (b.q.name, b.k.name, b.v.name, b.out.name) == ("Q", "K", "V", "O")
    assert (b.grid_ranks, b.query, b.key, b.head, b.vhead) == (("b", "g", "r"), "p", "m", "e", "f")
    assert k.grid == ((("p",), "BLOCK_M"), (("b", "g", "r"), None)) and k.loops == (("m", "BLOCK_N"),)
    assert str(b.contraction) == "sum[e](Q[b, g, r, p, e] * K[b, g, m, e])"
    assert [e.name for e in b.extra_inputs] == ["AS"]
    assert [(kb.side, kb.coeff, str(kb.offset)) for kb in b.key_bounds] == [("upper", 1, "M - P"),
                                                                           ("lower", 1, "M - P - wl")]
    assert str(b.output) == "where(SD[b, g, r, p] > 0, AV[b, g, r, p, f] / SD[b, g, r, p], 0)"
    assert s.cascade.name == "attention_3pass_causal_window_alibi"   # the schedule holds what it implements


@pytest.mark.parametrize("cascade, message", [
    (gemm(), "expected one softmax max"),
    (attention("1pass"), "must multiply two inputs indexed by plain ranks"),
])
def test_a_cascade_that_is_not_prefill_attention_is_refused_by_name(cascade, message):
    with pytest.raises(ScheduleError, match=message) as info:
        attention_prefill_schedule(cascade)
    assert isinstance(info.value, RewriteError)


def test_an_extra_statement_is_named():
    c = attention("2pass")
    extra = dataclasses.replace(c.stmts[-1], name="O2")
    with pytest.raises(ScheduleError, match="expected one output Einsum"):
        attention_prefill_schedule(c.with_stmts((*c.stmts, extra)))


@pytest.mark.parametrize("cond, bound", [
    ("m <= p + M - P", ("upper", 1, "M - P")),
    ("m < p + 3", ("upper", 1, "2")),
    ("p + M - P - wl <= m", ("lower", 1, "M - P - wl")),
    ("m > 2 * p", ("lower", 2, "1")),
    ("m + p >= M", ("lower", -1, "M")),
    ("2 * m <= p", None),                 # not a unit coefficient on m: a mask only
    ("m * p <= 3", None),                 # not linear
    ("m <= p + scale", None),             # a float param
])
def test_key_bounds_from_mask_conjuncts(cond, bound):
    env = {"m": E.rank("m"), "p": E.rank("p"), "M": E.extent("M"), "P": E.extent("P"), "wl": E.param("wl"),
           "scale": E.param("scale")}
    kb = key_bound(eval(cond, {}, env), "m", "p", frozenset({"wl"}))
    assert (None if kb is None else (kb.side, kb.coeff, str(kb.offset))) == bound


def test_mask_conjuncts_split_nested_wheres_and_ands():
    s = attention_prefill_schedule(attention("2pass", causal=True, window=(2, 3))).kernels[0].body.score
    assert [str(c) for c in mask_conjuncts(s)] == ["m <= p + M - P", "m >= p + M - P - wl", "m <= p + M - P + wr"]


def test_feasibility_says_why_a_config_is_rejected():
    s = attention_prefill_schedule(attention("2pass"))
    ok = Config.of(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    assert s.feasible(ok, {"E": 128, "F": 128}) is None
    assert "BLOCK_M=256 is not one of [16, 32, 64, 128]" in s.feasible(ok.replace(BLOCK_M=256))
    assert "must bind exactly" in s.feasible(Config.of(BLOCK_M=64))
    assert "registers" in s.feasible(Config.of(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=1),
                                     {"E": 256, "F": 256})
    assert "at least 4 warps" in s.feasible(Config.of(BLOCK_M=128, BLOCK_N=128, num_warps=2, num_stages=1))
    assert "shared_memory" in s.feasible(ok.replace(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=4),
                                         {"E": 256, "F": 256})
    assert "head dim E=300" in s.feasible(ok, {"E": 300, "F": 64})
    assert len(list(s.configs({"E": 64, "F": 64}))) > len(list(s.configs({"E": 256, "F": 256}))) > 0


def test_default_config_by_dtype_head_dim_and_sequence_length():
    s = attention_prefill_schedule(attention("2pass"))
    long = {"P": 4096, "M": 4096}
    assert default_config(s, {**long, "E": 64, "F": 64}) == Config.of(BLOCK_M=128, BLOCK_N=64, num_warps=8,
                                                                        num_stages=3)
    assert default_config(s, {**long, "E": 256, "F": 256})["BLOCK_M"] == 64
    assert default_config(s, {**long, "E": 128, "F": 128, "itemsize": 4}) == Config.of(
        BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    cfg, why = choose_config(s, {"P": 1, "M": 20, "E": 256, "F": 256})
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (16, 32) and "for 1 queries" in why
    assert s.feasible(cfg, {"E": 256, "F": 256}) is None
    assert [padded_head_dim(d) for d in (1, 16, 17, 40, 64, 80, 256)] == [16, 16, 32, 64, 64, 128, 256]


# ---- Triton expression text ----------------------------------------------------------------
def _binding(**extra) -> Binding:
    return Binding(ranks={"p": "offs_p[:, None]", "m": "offs_m[None, :]", "g": "idx_g"},
                   extents={"M": "seqlen_k", "P": "seqlen_q", "G": "size_g"},
                   params={"scale": "scale", "cap": "cap"}, **extra)


@pytest.mark.parametrize("expr, text", [
    (E.where(E.rank("m") <= E.rank("p") + E.extent("M") - E.extent("P"), E.param("scale"), -E.INF),
     'tl.where(offs_m[None, :] <= offs_p[:, None] + seqlen_k - seqlen_q, scale, float("-inf"))'),
    (E.logical_and(E.rank("m") >= 0, E.rank("m") < E.extent("M")),
     "(offs_m[None, :] >= 0) & (offs_m[None, :] < seqlen_k)"),
    (E.logical_or(E.logical_not(E.rank("m") < 1), E.rank("p").eq(0)),
     "~(offs_m[None, :] < 1) | (offs_p[:, None] == 0)"),
    (E.param("cap") * E.tanh(E.param("scale") / E.param("cap")), "cap * (2 / (1 + tl.exp(-2 * (scale / cap))) - 1)"),
    (E.exp(E.param("scale") - (E.param("cap") - 1.5)), "tl.exp(scale - (cap - 1.5))"),
    (E.maximum(E.sigmoid(E.param("scale")), E.abs_(-E.param("cap"))),
     "tl.maximum((1 / (1 + tl.exp(-scale))), tl.abs(-cap))"),
    (E.cast(f16, E.param("scale") * 2), "(scale * 2).to(tl.float16)"),
    (-(E.param("scale") + 1), "-(scale + 1)"),
    (E.param("scale") / (E.param("cap") * 2), "scale / (cap * 2)"),
])
def test_emit_is_table_driven_and_parenthesised_by_precedence(expr, text):
    assert emit(expr, _binding()) == text


def test_emit_binds_nodes_and_loads_other_inputs():
    dot = E.sum_("e", E.access("Q", E.rank("p"), E.rank("e")) * E.access("K", E.rank("m"), E.rank("e")))
    expr = dot * E.param("scale") - E.access("AS", E.rank("g")) * E.access("BIAS", E.rank("p"), E.rank("m"))
    tensors = {"AS": TensorArg("AS", ("stride_as_g",), ("size_g",)),
               "BIAS": TensorArg("BIAS", ("stride_bias_p", "stride_bias_m"), ("seqlen_q", "seqlen_k"))}
    text = emit(expr, _binding(nodes={dot: "qk"}, tensors=tensors, in_range=frozenset({"g"})))
    assert text == ("qk * scale - tl.load(AS + idx_g * stride_as_g) * tl.load(BIAS + offs_p[:, None] * stride_bias_p"
                    " + offs_m[None, :] * stride_bias_m, mask=(offs_p[:, None] >= 0) & (offs_p[:, None] < seqlen_q)"
                    " & (offs_m[None, :] >= 0) & (offs_m[None, :] < seqlen_k), other=0)")


@pytest.mark.parametrize("expr, message", [
    (E.rank("p") // 2, "integer //"),
    (E.rank("p") % 2, "integer %"),
    (E.Expr(E.Op.FUNC, (E.param("scale"),), "erfc"), "function 'erfc' has no Triton lowering"),
    (E.rank("q"), "rank 'q' has no binding"),
    (E.access("X", E.rank("p")), "tensor 'X' is read as X\\[p\\] but is not a kernel argument"),
    (E.sum_("e", E.param("scale")), "a reduction not bound to a tile variable"),
])
def test_emit_names_what_it_cannot_lower(expr, message):
    with pytest.raises(CodegenError, match=message):
        emit(expr, _binding())


# ---- ahead-of-time compilation ----------------------------------------------------------------
SCHEDULE = attention_prefill_schedule(attention("2pass", causal=True, dtype=f16))


@pytest.mark.parametrize("target", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("cfg, d", [(Config.of(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), 128),
                                    (Config.of(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2), 64)])
def test_aot_compile_reports_ptx_cubin_and_resources(cfg, d, target):
    k = compile_kernel(render(SCHEDULE, cfg, {"E": d, "F": d}), target)
    assert k.ok and k.error is None and k.fits and k.reason is None, k
    assert f".target {target}" in k.ptx and len(k.cubin) > 1000
    assert 0 < k.registers <= 255 and k.shared_bytes > 0 and (k.num_warps, k.num_stages) == (
        cfg["num_warps"], cfg["num_stages"])


def test_aot_reports_a_config_that_does_not_fit_instead_of_failing():
    """64 x 256 tiles of head dim 256 with 4 stages: more shared memory than an A100 block has."""
    space = (Choice("BLOCK_M", (64,)), Choice("BLOCK_N", (256,)), Choice("num_warps", (8,)), Choice("num_stages", (4,)))
    huge = Schedule(SCHEDULE.cascade, SCHEDULE.kernels, space, ())
    k = compile_kernel(render(huge, Config.of(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=4),
                              {"E": 256, "F": 256}), "sm_80")
    assert k.ok and not k.fits and "shared memory" in k.reason and k.shared_bytes > 163 * 1024
    absurd = Config.of(BLOCK_M=256, BLOCK_N=256, num_warps=4, num_stages=4)   # pruned before any compile
    assert "BLOCK_M=256 is not one of" in SCHEDULE.feasible(absurd, {"E": 256, "F": 256})


def test_aot_returns_a_failed_compile_as_data():
    src = render(SCHEDULE, Config.of(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1), {"E": 64, "F": 64})
    broken = dataclasses.replace(src, name=src.name + "_broken",
                                 text=src.text.replace(src.name, src.name + "_broken").replace("tl.dot(q", "tl.dot(qq"))
    k = compile_kernel(broken, "sm_90a")
    assert not k.ok and not k.fits and "qq" in k.error and k.cubin == b""


def test_aot_signature_models_contiguous_innermost_dims():
    src = render(SCHEDULE, Config.of(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1), {"E": 64, "F": 64})
    sig, consts = signature(src)
    assert sig["Q"] == "*fp16" and sig["scale"] == "fp32" and sig["seqlen_k"] == "i32"
    assert sig["stride_q_e"] == "constexpr" and consts["stride_q_e"] == 1 and sig["stride_q_p"] == "i32"
    assert consts["BLOCK_E"] == 64 and gpu_target("sm_90a").shared_per_block == 227 * 1024
