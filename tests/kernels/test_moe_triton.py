"""The expert-grouped MoE kernels (grouped GEMMs + combine) against a plain torch loop over experts.

Every case runs ``run_moe_triton`` under Triton's CPU interpreter in fp32 and fp16 (bf16
``tl.dot`` is broken in the interpreter; bf16 runs on the GPU tests) on awkward dims (D, F
not multiples of the tiles), and compares with an independent float64 loop: for each expert,
its tokens, ``act(x @ gate^T, x @ up^T) @ w2^T``, weighted and summed. The bar for 16-bit
inputs is flash-attn's: ``max|out - ref| <= 2 * max|ref_lowp - ref| + floor`` with ``ref_lowp``
the same loop run in the input dtype. Outputs are NaN-poisoned before the kernels run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as Fn

from kascade.backends.moe_triton import run_moe_triton
from kascade.codegen.moe_grouped_gemm import render
from kascade.ir import bf16, f16, f32
from kascade.ir.errors import CodegenError, DeviceError, DTypeError, ShapeError
from kascade.ir.library.layer import decoder_layer
from kascade.ir.library.moe import moe
from kascade.ir.parser import parse
from kascade.passes.moe_grouping import group_experts
from kascade.passes.schedule import Config
from kascade.passes.schedule_moe import ScheduleError, choose_moe_config, moe_schedule, swiglu_moe_schedule

TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IR_DTYPES = {"fp32": f32, "fp16": f16, "bf16": bf16}
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ACTIVATIONS = {"silu": Fn.silu, "gelu": Fn.gelu}


def expert_loop(x, w1, w2, tw, ti, dtype, act="silu", residual=None):
    """The MoE written out expert by expert in ``dtype`` (vLLM fused_moe semantics)."""
    x, w1, w2, tw = (a.to(dtype) for a in (x, w1, w2, tw))
    F = w2.shape[2]
    y = torch.zeros_like(x) if residual is None else residual.to(dtype).clone()
    for e in range(w1.shape[0]):
        tok, choice = (ti == e).nonzero(as_tuple=True)
        if len(tok) == 0:
            continue
        h = x[tok]
        a = ACTIVATIONS[act](h @ w1[e, :F].T) * (h @ w1[e, F:].T)
        y.index_add_(0, tok, (a @ w2[e].T) * tw[tok, choice, None])
    return y


def make(T, K, E, D, F, dtype, gen, routing="random"):
    """Inputs scaled so that the outputs are O(1): x, w1, w2, and a softmax top-k routing.
    ``routing="one"``: every token picks expert 3 first (K=1: only expert 3 is used)."""
    x = torch.randn(T, D, generator=gen).to(dtype)
    w1 = (torch.randn(E, 2 * F, D, generator=gen) / math.sqrt(D)).to(dtype)
    w2 = (torch.randn(E, D, F, generator=gen) / math.sqrt(F)).to(dtype)
    logits = torch.randn(T, E, generator=gen)
    if routing == "one":
        logits[:, 3] += 100.0
    tw, ti = torch.softmax(logits, -1).topk(K, -1)
    return x, w1, w2, tw / tw.sum(-1, keepdim=True), ti


def check(out, x, w1, w2, tw, ti, act="silu", residual=None):
    ref = expert_loop(x, w1, w2, tw, ti, torch.float64, act, residual)
    lowp = expert_loop(x, w1, w2, tw, ti, x.dtype, act, residual)
    assert not out.isnan().any(), "rows left unwritten (poisoned NaN survived)"
    err, bar = (out.double() - ref).abs().max().item(), (lowp.double() - ref).abs().max().item()
    assert err <= 2 * bar + FLOOR[x.dtype], (err, bar)


def config(kind, wd=1, fc=0, **over):
    tiles = {"decode": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=4),
             "prefill": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)}[kind]
    return Config.of({**tiles, "WEIGHT_IN_DOWN": wd, "FUSED_COMBINE": fc, **over})


# (dtype, T, K, E, D, F, routing, config: "choose" or (kind, WEIGHT_IN_DOWN, FUSED_COMBINE))
CASES = {
    "fp32-decode-t1-k1-e8": ("fp32", 1, 1, 8, 40, 24, "random", "choose"),
    "fp16-t3-k2-e8-weight-in-combine": ("fp16", 3, 2, 8, 40, 56, "random", ("decode", 0, 0)),
    "fp16-t3-k2-e8-weight-in-down": ("fp16", 3, 2, 8, 40, 56, "random", ("decode", 1, 0)),
    "fp16-t3-k2-e8-fused-combine": ("fp16", 3, 2, 8, 40, 56, "random", ("decode", 1, 1)),
    "fp32-t3-k8-e8-every-expert": ("fp32", 3, 8, 8, 40, 24, "random", ("decode", 0, 0)),
    "fp16-prefill-t64-k2-e8": ("fp16", 64, 2, 8, 40, 24, "random", ("prefill", 1, 0)),
    "fp32-prefill-t64-k2-e8-fused": ("fp32", 64, 2, 8, 40, 56, "random", ("prefill", 1, 1)),
    "fp16-all-tokens-one-expert": ("fp16", 64, 1, 8, 40, 24, "one", ("prefill", 0, 0)),
    "fp16-t64-k8-e64-chosen": ("fp16", 64, 8, 64, 40, 24, "random", "choose"),
    "fp16-t3-k8-e128-mostly-empty": ("fp16", 3, 8, 128, 24, 24, "random", "choose"),
    "fp32-t1-k2-e64-decode": ("fp32", 1, 2, 64, 40, 56, "random", ("decode", 1, 1)),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_interpreter_matches_the_expert_loop(case, gen):
    dtype, T, K, E, D, F, routing, cfg = case
    x, w1, w2, tw, ti = make(T, K, E, D, F, TORCH[dtype], gen, routing)
    schedule = swiglu_moe_schedule(IR_DTYPES[dtype])
    if cfg == "choose":
        cfg, _ = choose_moe_config(schedule, {"T": T, "K": K, "E": E, "D": D, "F": F,
                                              "itemsize": x.element_size()})
    else:
        cfg = config(*cfg)
    out = torch.full((T, D), math.nan, dtype=x.dtype)
    y = run_moe_triton(x, w1, w2, tw, ti, cfg, interpret=True, out=out)
    assert y is out
    check(out, x, w1, w2, tw, ti)


def test_strided_inputs_and_int32_ids(gen):
    """A strided x (a column slice), int32 expert ids and bf16-free fp16 weights given as views."""
    x, w1, w2, tw, ti = make(5, 2, 8, 40, 24, torch.float16, gen)
    wide = torch.randn(5, 64, generator=gen).to(torch.float16)
    wide[:, 7:47] = x
    y = run_moe_triton(wide[:, 7:47], w1, w2, tw, ti.to(torch.int32), config("decode", 1, 0), interpret=True)
    check(y, x, w1, w2, tw, ti)


def test_another_activation_gets_its_own_kernel(gen):
    """An activation written in IR (gelu instead of silu) is emitted into the gate-up epilogue."""
    grouped = parse(str(group_experts(moe(form="gather", dtype=f32))).replace("silu(", "gelu("))
    schedule = moe_schedule(grouped)
    x, w1, w2, tw, ti = make(3, 2, 8, 40, 24, torch.float32, gen)
    y = run_moe_triton(x, w1, w2, tw, ti, config("decode", 0, 0), interpret=True, schedule=schedule)
    check(y, x, w1, w2, tw, ti, act="gelu")
    text = render(schedule, config("decode"), {"D": 40, "F": 24}).gate_up.text
    assert "act = (0.5 * acc_g * (1 + tl.erf(acc_g * 0.7071067811865476))) * acc_u" in text


@pytest.mark.parametrize("fused", [0, 1])
def test_the_residual_of_a_decoder_layer_is_added_by_the_combine(fused, gen):
    """The MoE of ``decoder_layer(moe=True)`` reads an intermediate X (HN) and adds a residual (HA)."""
    schedule = moe_schedule(group_experts(decoder_layer(moe=True, dtype=f16)))
    assert (schedule.kernels[0].body.x.name, schedule.kernels[0].body.residual.name) == ("HN", "HA")
    x, w1, w2, tw, ti = make(4, 2, 8, 40, 24, torch.float16, gen)
    res = torch.randn(4, 40, generator=gen).to(torch.float16)
    out = torch.full((4, 40), math.nan, dtype=torch.float16)
    run_moe_triton(x, w1, w2, tw, ti, config("decode", 1, fused), interpret=True, out=out, schedule=schedule,
                   residual=res)
    check(out, x, w1, w2, tw, ti, residual=res)


# ---- the schedule --------------------------------------------------------------------------
def test_schedule_matches_both_library_forms_and_names_its_kernels():
    for form in ("gather", "dense"):
        s = moe_schedule(group_experts(moe(form=form)))
        assert [k.name for k in s.kernels] == ["moe_gate_up", "moe_down", "moe_combine"]
        b = s.kernels[0].body
        assert (b.gu, b.act, b.eo, b.out.name, b.row, b.hidden, b.inner) == ("GU", "ACT", "EO", "Y", "q", "d", "f")
        assert str(b.activation) == "silu(GU[q, 0, f]) * GU[q, 1, f]"
        assert s.key().startswith("moe_gate_up+moe_down+moe_combine:")


def test_a_cascade_not_in_grouped_form_is_refused_by_name():
    with pytest.raises(ScheduleError, match=r"moe_schedule\(moe_gather\): expected one grouped GEMM 'GU"):
        moe_schedule(moe(form="gather"))
    text = str(group_experts(moe(form="gather")))
    with pytest.raises(ScheduleError, match="the activation ACT must read both the gate"):
        moe_schedule(parse(text.replace("silu(GU[q, 0, f]) * GU[q, 1, f]", "silu(GU[q, 0, f])")))
    with pytest.raises(ScheduleError, match="the activation ACT must be elementwise"):
        moe_schedule(parse(text.replace("silu(GU[q, 0, f])", "silu(GU[q, 0, f]) * F")))


def test_feasibility_rejects_by_reason():
    s = swiglu_moe_schedule(f16)
    sizes = {"D": 4096, "F": 14336, "itemsize": 2}
    ok = config("prefill")
    assert s.feasible(ok, sizes) is None
    assert s.feasible(ok.replace(FUSED_COMBINE=1, WEIGHT_IN_DOWN=0), sizes).startswith("fusion: FUSED_COMBINE=1")
    big = ok.replace(BLOCK_M=128, BLOCK_N=256, BLOCK_K=256, num_warps=8, num_stages=5)
    assert s.feasible(big, sizes).startswith("registers: ")
    assert s.feasible(big.replace(BLOCK_N=64), sizes).startswith("shared_memory: needs ~")
    assert s.feasible(ok.replace(BLOCK_K=256), {"D": 40, "F": 24}).startswith("tile_waste: BLOCK_K=256")
    with pytest.raises(CodegenError, match="not feasible: fusion"):
        render(s, ok.replace(FUSED_COMBINE=1, WEIGHT_IN_DOWN=0), {"D": 40, "F": 24})


def test_decode_and_prefill_are_scheduled_differently():
    s = swiglu_moe_schedule(f16)
    mixtral = {"E": 8, "K": 2, "D": 4096, "F": 14336}
    decode, why_d = choose_moe_config(s, {**mixtral, "T": 4})
    prefill, why_p = choose_moe_config(s, {**mixtral, "T": 8192})
    assert decode["BLOCK_M"] == 16 and decode["BLOCK_K"] >= 128 and decode["FUSED_COMBINE"] == 1
    assert "decode-sized" in why_d and decode["GROUP_M"] == 1
    assert prefill["BLOCK_M"] >= 64 and prefill["GROUP_M"] > 1 and "prefill-sized" in why_p
    for cfg in (decode, prefill):
        assert s.feasible(cfg, {"D": 4096, "F": 14336, "itemsize": 2}) is None
    # 64 experts, 8 each: 16 tokens spread thin are still decode-sized
    assert choose_moe_config(s, {"E": 64, "K": 8, "D": 2048, "F": 1408, "T": 16})[0]["BLOCK_M"] == 16
    with pytest.raises(ScheduleError, match=r"needs the extents \['T'\]"):
        choose_moe_config(s, {"E": 8, "K": 2, "D": 64, "F": 64})


def test_generated_source_is_readable():
    srcs = render(swiglu_moe_schedule(f16), config("prefill", 0, 0), {"D": 40, "F": 24})
    g, d, c = srcs.gate_up, srcs.down, srcs.combine
    assert g.name.startswith("moe_gate_up_silu_bm64_bn32_bk32_g8_w8_s3_fp16_")
    assert d.name.startswith("moe_down_wd0_fc0_bm64_") and c.name.startswith("moe_combine_wd0_bd64_fp16_")
    assert "act = (acc_g / (1 + tl.exp(-acc_g))) * acc_u" in g.text
    assert "if expert < 0:\n        return" in g.text and "row_in = pair < num_pairs" in g.text
    assert "tl.atomic_add" not in d.text and "acc += row * tl.load(TW" in c.text
    fused = render(swiglu_moe_schedule(f16), config("decode", 1, 1), {"D": 40, "F": 24})
    assert fused.combine is None and "tl.atomic_add(OUT" in fused.down.text
    for src in (*srcs.kernels, fused.down):
        compile(src.text, src.name, "exec")


# ---- bad input -----------------------------------------------------------------------------
def _args(**over):
    gen = torch.Generator().manual_seed(0)
    x, w1, w2, tw, ti = make(3, 2, 8, 40, 24, torch.float32, gen)
    a = dict(x=x, w1=w1, w2=w2, topk_weights=tw, topk_ids=ti)
    a.update(over)
    return a


BAD = [
    (dict(w1=torch.randn(8, 47, 40)), ShapeError, r"w1 \(E, 2F, D\)"),
    (dict(x=torch.randn(3, 40, 1)), ShapeError, "x must have 2 dims"),
    (dict(topk_ids=torch.zeros(4, 2, dtype=torch.int64)), ShapeError, r"must both be \(T, K\)"),
    (dict(x=torch.randn(3, 40, dtype=torch.float64)), DTypeError, "must share one dtype of float16"),
    (dict(topk_ids=torch.full((3, 2), 8)), ShapeError, r"topk_ids must lie in \[0, 8\)"),
    (dict(topk_ids=torch.zeros(3, 2)), DTypeError, "topk_ids integer"),
]


@pytest.mark.parametrize("over, exc, message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input_is_a_kascade_error_that_says_what_is_accepted(over, exc, message):
    with pytest.raises(exc, match=message):
        run_moe_triton(**_args(**over), config=config("decode"), interpret=True)


def test_the_gpu_path_refuses_cpu_tensors_and_the_schedule_must_fit_the_dtype():
    with pytest.raises(DeviceError, match="pass interpret=True"):
        run_moe_triton(**_args(), config=config("decode"), interpret=False)
    with pytest.raises(DTypeError, match="take f16 activations"):
        run_moe_triton(**_args(), config=config("decode"), interpret=True, schedule=swiglu_moe_schedule(f16))


# ---- on the GPU ---------------------------------------------------------------------------
GPU_CASES = {
    "bf16-mixtral-decode": ("bf16", 4, 2, 8, 1024, 1408, "choose"),
    "bf16-prefill-e64-k8": ("bf16", 777, 8, 64, 512, 344, "choose"),
    "fp16-prefill-unfused": ("fp16", 300, 2, 8, 1000, 700, ("prefill", 0, 0)),
    "bf16-all-one-expert": ("bf16", 513, 1, 16, 256, 200, ("prefill", 1, 1)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_triton_on_gpu_matches_the_expert_loop(case, gen):
    dtype, T, K, E, D, F, cfg = case
    routing = "one" if K == 1 else "random"
    x, w1, w2, tw, ti = make(T, K, E, D, F, TORCH[dtype], gen, routing)
    schedule = swiglu_moe_schedule(IR_DTYPES[dtype])
    if cfg == "choose":
        cfg, _ = choose_moe_config(schedule, {"T": T, "K": K, "E": E, "D": D, "F": F})
    else:
        cfg = config(*cfg, BLOCK_N=64, BLOCK_K=64)
    out = torch.full((T, D), math.nan, dtype=x.dtype, device="cuda")
    run_moe_triton(x.cuda(), w1.cuda(), w2.cuda(), tw.cuda(), ti.cuda(), cfg, interpret=False, out=out)
    check(out.cpu(), x, w1, w2, tw, ti)
