"""The generated Triton paged-decode kernels (split-KV partials + merge) against independent references.

Numerics run the generated source under the CPU interpreter (``backend="interpret"``) and
compare with the float64 evaluator of the library's paged-decode cascade (the definition)
and with a torch loop that gathers each sequence's blocks through the block table and
attends in float64. Low precision follows flash-attn's rule: ``max|out - ref| <= 2 *
max|ref_lowp - ref| + floor``, ``ref_lowp`` being the same loop in the inputs' dtype.
Outputs are poisoned with NaN first. GPU tests (bf16 / fp16, and agreement with the CUDA
backend) carry the ``gpu`` marker.
"""

from __future__ import annotations

import math

import pytest
import torch

from kascade.api import paged_decode_attention
from kascade.backends.aot import compile_kernel
from kascade.backends.reference import evaluate
from kascade.backends.triton import run_paged_decode
from kascade.codegen.paged_decode import render
from kascade.ir import DTypeError, KascadeError, ShapeError, f16, f32, parse
from kascade.ir.errors import DeviceError
from kascade.ir.library import attention as attention_cascade
from kascade.ir.library import paged_decode as paged_decode_cascade
from kascade.passes.schedule import Config, ScheduleError
from kascade.passes.schedule_decode import (
    MAX_SPLITS,
    choose_decode_config,
    default_num_splits,
    paged_decode_schedule,
)
from kascade.passes.score import soft_cap

CUDA = torch.cuda.is_available()
FLOOR = {torch.float16: 1e-4, torch.float32: 1e-6, torch.bfloat16: 1e-3}


# ---- references ---------------------------------------------------------------------------
def gathered(q, k_cache, v_cache, block_table, seq_lens, *, softcap=None, scale=None, dtype=torch.float64):
    """Each sequence's keys gathered page by page through the block table, attended in ``dtype``."""
    B, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(B, Hq, v_cache.shape[-1], dtype=dtype)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        pages = block_table[b, :-(-n // bs)].long()
        k = k_cache[pages].reshape(-1, Hkv, D)[:n].to(dtype).repeat_interleave(Hq // Hkv, 1)   # (n, Hq, D)
        v = v_cache[pages].reshape(-1, Hkv, v_cache.shape[-1])[:n].to(dtype).repeat_interleave(Hq // Hkv, 1)
        s = torch.einsum("hd,nhd->hn", q[b].to(dtype), k) * (scale if scale is not None else D ** -0.5)
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        out[b] = torch.einsum("hn,nhf->hf", torch.softmax(s, -1), v)
    return out


def evaluator(q, k_cache, v_cache, block_table, seq_lens, *, softcap=None, scale=None):
    """The library's 2-pass paged-decode cascade (soft-capped by the pass when asked), float64."""
    c = paged_decode_cascade()
    c = soft_cap(c) if softcap else c
    G = k_cache.shape[2]
    inputs = {"Q": q.double().unflatten(1, (G, q.shape[1] // G)), "KC": k_cache.double(),
              "VC": v_cache.double(), "BT": block_table, "SL": seq_lens}
    params = {"scale": scale if scale is not None else q.shape[-1] ** -0.5, "cap": softcap}
    return evaluate(c, inputs, {p.name: params[p.name] for p in c.params})["O"].flatten(1, 2)


def check_numerics(out, q, kc, vc, bt, sl, *, floor, **kw):
    assert not out.isnan().any(), "the kernel left (or wrote) NaN"
    ref = gathered(q, kc, vc, bt, sl, **kw)
    ref_lowp = gathered(q, kc, vc, bt, sl, dtype=q.dtype, **kw).double()
    bound = 2 * (ref_lowp - ref).abs().max().item() + floor
    ev = evaluator(q, kc, vc, bt, sl, **kw)
    assert (ev - ref).abs().max().item() < 1e-9, "the two float64 references disagree"
    err = (out.double() - ev).abs().max().item()
    assert err <= bound, f"max |out - evaluator| = {err:.3g} > {bound:.3g}"


def padded(t: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """``t`` as a view into rows padded with ``front`` / ``back`` extra elements (non-unit strides)."""
    big = torch.full((*t.shape[:-1], front + t.shape[-1] + back), math.nan, dtype=t.dtype, device=t.device)
    big[..., front:front + t.shape[-1]] = t
    return big[..., front:front + t.shape[-1]]


def make_inputs(paged_cache, gen, dtype, lens, G, R, D, Dv, page, layout="contiguous", device="cpu"):
    """q and a paged cache of ``lens`` in ``dtype`` on ``device``; ``strided``: q, the caches and
    the block table are views with non-unit strides (padded rows, every other column of a table)."""
    kc, vc, bt, sl, _, _ = paged_cache(lens, page, G, D, Dv, gen, dtype=torch.float32)
    q = torch.randn(len(lens), G * R, D, generator=gen)
    q, kc, vc, bt, sl = (t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                         for t in (q, kc, vc, bt, sl))
    if layout == "strided":   # views made after the conversion, which would copy them contiguous
        q, kc, vc = padded(q, 3, 5), padded(kc, 0, 5), padded(vc, 3, 0)
        wide = torch.full((bt.shape[0], 2 * bt.shape[1]), -7, dtype=bt.dtype, device=device)
        wide[:, ::2] = bt
        bt = wide[:, ::2]
        assert not any(t.is_contiguous() for t in (q, kc, vc, bt))
    return q, kc, vc, bt, sl


# ---- numerics on the interpreter ----------------------------------------------------------
# (dtype, lens, G, R, D, Dv, page size, softcap, num_splits, layout): lengths 0 and 1 next to long
# ones, page sizes 1, 16 and 5, GQA ratios 1, 4, 7 and MQA, every head dim, Dv != D, more splits
# than pages, soft-capping, strided views.
CASES = {
    "fp16-d128-gqa4-ps16-mixed-lengths": (torch.float16, [0, 1, 17, 97, 128, 257], 2, 4, 128, 128, 16, None, None,
                                          "contiguous"),
    "fp32-d40-mqa7-ps5-softcap": (torch.float32, [257, 5, 1], 1, 7, 40, 40, 5, 5.0, None, "contiguous"),
    "fp16-d80-mha-ps1-splits-beyond-pages": (torch.float16, [97, 0, 33], 2, 1, 80, 80, 1, None, 100, "contiguous"),
    "fp32-d64-dv40-gqa4-13-splits": (torch.float32, [17, 128], 2, 4, 64, 40, 16, None, 13, "contiguous"),
    "fp16-d256-mqa7-softcap-strided": (torch.float16, [257, 3], 1, 7, 256, 256, 16, 30.0, None, "strided"),
    "fp16-d64-gqa7-ps5-dv128-strided": (torch.float16, [1, 40, 0], 2, 7, 64, 128, 5, None, 3, "strided"),
    "fp32-d128-gqa4-1025": (torch.float32, [1025, 2], 2, 4, 128, 128, 16, None, None, "contiguous"),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_interpreter_matches_evaluator_and_gathered_torch(case, paged_cache, gen):
    dtype, lens, G, R, D, Dv, page, softcap, splits, layout = case
    q, kc, vc, bt, sl = make_inputs(paged_cache, gen, dtype, lens, G, R, D, Dv, page, layout)
    out = torch.full((len(lens), G * R, Dv), math.nan, dtype=dtype)
    got = paged_decode_attention(q, kc, vc, bt, sl, softcap=softcap, num_splits=splits, backend="interpret", out=out)
    assert got is out
    check_numerics(out, q, kc, vc, bt, sl, softcap=softcap, floor=FLOOR[dtype])
    assert torch.equal(out[sl == 0], torch.zeros_like(out[sl == 0]))


def test_split_count_does_not_change_the_result_beyond_rounding(paged_cache, gen):
    q, kc, vc, bt, sl = make_inputs(paged_cache, gen, torch.float32, [97, 33, 1], 2, 2, 32, 32, 4)   # 25 pages
    outs = [paged_decode_attention(q, kc, vc, bt, sl, num_splits=n, scale=0.3, backend="interpret")
            for n in (1, 2, 5, 25, 40)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-6, rtol=0)
    check_numerics(outs[0], q, kc, vc, bt, sl, scale=0.3, floor=1e-6)


def test_int64_tables_and_an_empty_batch(paged_cache, gen):
    q, kc, vc, bt, sl = make_inputs(paged_cache, gen, torch.float32, [9, 30], 1, 4, 16, 16, 8)
    a = paged_decode_attention(q, kc, vc, bt.long(), sl.long(), backend="interpret")
    b = paged_decode_attention(q, kc, vc, bt, sl, backend="interpret")
    assert torch.equal(a, b)
    empty = paged_decode_attention(q[:0], kc, vc, bt[:0], sl[:0], backend="interpret")
    assert empty.shape == (0, 4, 16)


def test_reference_backend_is_the_default_on_cpu(paged_cache, gen):
    q, kc, vc, bt, sl = make_inputs(paged_cache, gen, torch.float16, [5, 0, 20], 2, 2, 24, 24, 4)
    out = paged_decode_attention(q, kc, vc, bt, sl, softcap=2.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), gathered(q, kc, vc, bt, sl, softcap=2.0), atol=1e-3, rtol=0)


def test_debug_says_which_config_ran(paged_cache, gen, monkeypatch, capsys):
    monkeypatch.setenv("KASCADE_DEBUG", "1")
    q, kc, vc, bt, sl = make_inputs(paged_cache, gen, torch.float32, [300, 2], 2, 4, 40, 40, 16)
    paged_decode_attention(q, kc, vc, bt, sl, backend="interpret")
    err = capsys.readouterr().err
    assert "backend=interpret kernels=paged_decode_partial_d64_r16_ps16_bn32" in err
    assert "cost model's #1 of" in err and "predicted" in err   # no tuned record in the test's database
    paged_decode_attention(q, kc, vc, bt, sl, num_splits=3, backend="interpret")
    assert "num_splits=3 given" in capsys.readouterr().err


# ---- the schedule ---------------------------------------------------------------------------
RENAMED = """
param scale: f32
input QQ[s, kv, q, d]: f16
input KCACHE[blk, slot, kv, d]: f16
input VCACHE[blk, slot, kv, dv]: f16
input TABLE[s, pg]: i32
input LEN[s]: i32
input BIAS[kv]: f32
S[s, kv, q, pg, slot] = where(pg * SLOT + slot < LEN[s],
                              sum[d](QQ[s, kv, q, d] * KCACHE[TABLE[s, pg], slot, kv, d]) * scale + BIAS[kv], -inf)
MX[s, kv, q] = max[pg, slot](S[s, kv, q, pg, slot])
EX[s, kv, q, pg, slot] = exp(S[s, kv, q, pg, slot] - MX[s, kv, q])
DEN[s, kv, q] = sum[pg, slot](EX[s, kv, q, pg, slot])
NUM[s, kv, q, dv] = sum[pg, slot](where(pg * SLOT + slot < LEN[s],
                                        EX[s, kv, q, pg, slot] * VCACHE[TABLE[s, pg], slot, kv, dv], 0.0))
output OUT[s, kv, q, dv]: f16 = where(DEN[s, kv, q] > 0, NUM[s, kv, q, dv] / DEN[s, kv, q], 0)
"""


def test_a_cascade_written_as_text_gets_both_kernels(paged_cache, gen):
    """Other names, a per-KV-head bias the score reads (hoisted out of the loop): matched, split and run."""
    c = parse(RENAMED)
    s = paged_decode_schedule(c)
    body = s.kernels[0].body
    assert (body.batch, body.kv_head, body.group, body.page, body.slot, body.head, body.vhead) == (
        "s", "kv", "q", "pg", "slot", "d", "dv")
    assert [k.name for k in s.kernels] == ["paged_decode_partial", "paged_decode_merge"]
    assert str(body.score).startswith("where((c * W + w) * SLOT + slot < LEN[s], sum[d](QQ[s, kv, q, d] * "
                                      "KCACHE[TABLE[s, c * W + w], slot, kv, d]) * scale + BIAS[kv], -inf)")
    kc, vc, bt, sl, _, _ = paged_cache([0, 21, 50], 8, 2, 24, 16, gen, dtype=torch.float16)
    inputs = {"QQ": torch.randn(3, 2, 3, 24, generator=gen).half(), "KCACHE": kc, "VCACHE": vc, "TABLE": bt,
              "LEN": sl, "BIAS": torch.randn(2, generator=gen)}
    cfg = Config.of(BLOCK_N=16, num_warps=4, num_stages=1, num_splits=3)
    src = render(s, cfg, {"D": 24, "DV": 16, "Q": 3, "SLOT": 8})
    assert "bias_val = tl.load(BIAS + idx_kv * stride_bias_kv)" in src.partial.text
    out = torch.full((3, 2, 3, 16), math.nan, dtype=torch.float16)
    run_paged_decode(src, inputs, {"scale": 0.2}, {"S": 3, "KV": 2, "Q": 3, "D": 24, "DV": 16}, 3, interpret=True,
                     out=out)
    ref = evaluate(c, inputs, {"scale": 0.2})["OUT"]
    assert not out.isnan().any() and (out.double() - ref).abs().max().item() < 2e-3


@pytest.mark.parametrize("cascade, message", [
    (paged_decode_cascade(split_kv=True), "must read an integer input table at two plain ranks"),
    (attention_cascade("2pass"), "over a page and a slot rank"),
])
def test_schedule_names_what_does_not_match(cascade, message):
    with pytest.raises(ScheduleError, match=message):
        paged_decode_schedule(cascade)


def test_space_constraints_and_default_configs():
    s = paged_decode_schedule(paged_decode_cascade())
    ok = Config.of(BLOCK_N=64, num_warps=4, num_stages=2, num_splits=6)
    assert s.feasible(ok, {"E": 64, "F": 64, "R": 4}) is None
    assert "not one of" in s.feasible(ok.replace(num_splits=7))   # the tuned space steps by ~1.5x
    assert "must bind exactly" in s.feasible(Config.of(BLOCK_N=64))
    assert "registers" in s.feasible(ok, {"E": 256, "F": 256, "R": 8})
    assert "1..64" in s.feasible(ok, {"E": 64, "F": 64, "R": 65})
    assert "head dim E=300" in s.feasible(ok, {"E": 300, "F": 64})
    cfg, why = choose_decode_config(s, {"E": 128, "F": 128, "R": 4, "B": 2, "G": 8, "L": 4096, "M0": 16,
                                        "sm_count": 132})
    # the launcher's rule says 33 splits; the schedule's space has 32
    assert cfg == Config.of(BLOCK_N=32, num_warps=4, num_stages=2, num_splits=32) and "32 splits" in why
    cfg, why = choose_decode_config(s, {"E": 64, "F": 64, "R": 1, "B": 1, "G": 1, "L": 40, "M0": 16})
    assert cfg["num_splits"] == 1 and cfg["BLOCK_N"] == 64
    cfg, why = choose_decode_config(s, {"E": 256, "F": 256, "R": 7, "itemsize": 4, "L": 100})
    assert (cfg["BLOCK_N"], cfg["num_warps"]) == (16, 4) and s.feasible(cfg, {"E": 256, "F": 256, "R": 7,
                                                                               "itemsize": 4}) is None
    cfg, why = choose_decode_config(s, {"E": 128, "F": 128, "R": 64, "L": 100})
    assert (cfg["BLOCK_N"], cfg["num_warps"]) == (32, 8) and "BLOCK_R=64" in why


def test_default_split_count_is_the_cuda_launchers():
    from kascade.backends import cuda
    for args in [(4 * 132 * 8, 4096, 16, 132), (8, 32768, 16, 132), (8, 200, 16, 132), (1, 10, 1, 132),
                 (1, 0, 16, 132), (1, 10**6, 1, 10**4), (3, 1000, 5, 108)]:
        assert default_num_splits(*args) == cuda.default_num_splits(*args), args


def test_soft_cap_pass_gives_the_librarys_capped_attention():
    for causal in (False, True):
        assert soft_cap(attention_cascade("2pass", causal=causal)) == attention_cascade("2pass", causal=causal,
                                                                                         softcap=True)
    capped = soft_cap(paged_decode_cascade())
    assert [p.name for p in capped.params] == ["scale", "cap"] and capped.name == "paged_decode_softcap"
    assert "where(m1 * M0 + m0 < SL[b], cap * tanh(" in str(capped)
    with pytest.raises(KascadeError, match="param 'cap' is already declared"):
        soft_cap(capped)


# ---- the generated source -----------------------------------------------------------------
def test_generated_source_is_readable_and_written_once(tmp_path):
    s = paged_decode_schedule(soft_cap(paged_decode_cascade(dtype=f16)))
    src = render(s, Config.of(BLOCK_N=32, num_warps=4, num_stages=2, num_splits=9), {"E": 80, "F": 64, "R": 7,
                                                                                       "M0": 5})
    p, m = src.partial, src.merge
    assert p.name.startswith("paged_decode_partial_softcap_d128v64_r16_ps5_bn32_w4_s2_fp16_")
    assert m.name.startswith("paged_decode_merge_softcap_d64_fp16_")
    assert ("s = tl.where(page_n[None, :] * PAGE + slot_n[None, :] < seq_len, cap * (2 / (1 + tl.exp(-2 * "
            "(qk * scale / cap))) - 1), float(\"-inf\"))") in p.text
    assert "seq_len = tl.load(SL + idx_b * stride_sl_b)" in p.text
    assert "den += tl.where(c_in, tl.exp(lm - tl.where(gm > float(\"-inf\"), gm, 0)) * ls, 0.0)" in m.text
    assert "out = tl.where(sd > 0, av / sd, 0)" in m.text
    assert dict(p.constexprs) == {"BLOCK_R": 16, "BLOCK_N": 32, "BLOCK_E": 128, "BLOCK_F": 64, "PAGE": 5}
    again = render(s, Config.of(BLOCK_N=32, num_warps=4, num_stages=2, num_splits=1), {"E": 80, "F": 64, "R": 7,
                                                                                         "M0": 5})
    assert again.partial.text == p.text, "the split count is a launch argument, not part of the source"
    for k in (p, m):
        compile(k.text, k.name, "exec")
        path = k.write(tmp_path)
        first = path.stat().st_mtime_ns
        assert k.write(tmp_path) == path and path.stat().st_mtime_ns == first


@pytest.mark.parametrize("target", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("dtype, d, r", [(f16, 128, 4), (f16, 256, 7), (f16, 64, 32), (f32, 128, 16)])
def test_aot_default_configs_fit_without_spills(target, dtype, d, r):
    s = paged_decode_schedule(paged_decode_cascade(dtype=dtype))
    cfg, _ = choose_decode_config(s, {"E": d, "F": d, "R": r, "B": 8, "G": 8, "L": 4096, "M0": 16})
    src = render(s, cfg, {"E": d, "F": d, "R": r, "M0": 16})
    for k in (src.partial, src.merge):
        c = compile_kernel(k, target)
        assert c.ok and c.fits and not c.spills, (k.name, c.reason, c.error, c.stack_bytes)
        assert f".target {target}" in c.ptx and 0 < c.registers <= 255


# ---- bad input ---------------------------------------------------------------------------------
def _args(**over):
    gen = torch.Generator().manual_seed(0)
    a = {"q": torch.randn(2, 4, 32, generator=gen), "k_cache": torch.randn(6, 4, 2, 32, generator=gen),
         "v_cache": torch.randn(6, 4, 2, 16, generator=gen),
         "block_table": torch.tensor([[0, 1, 2], [3, 4, -1]], dtype=torch.int32),
         "seq_lens": torch.tensor([12, 7], dtype=torch.int32)}
    a.update(over)
    return a


BAD = [
    (dict(q=torch.randn(2, 4, 1, 32)), {}, ShapeError, r"q must have 3 dims \(batch, heads, head_dim\)"),
    (dict(k_cache=torch.randn(6, 4, 32)), {}, ShapeError, "k_cache must have 4 dims"),
    (dict(v_cache=torch.randn(6, 5, 2, 16)), {}, ShapeError, "k_cache has 6 blocks of 4 positions but v_cache 6 of 5"),
    (dict(v_cache=torch.randn(6, 4, 1, 16)), {}, ShapeError, "k_cache has 2 heads but v_cache has 1"),
    (dict(q=torch.randn(2, 3, 32)), {}, ShapeError, "q's 3 heads must be a multiple of the caches' 2 heads"),
    (dict(q=torch.randn(2, 4, 16)), {}, ShapeError, "q's head dim 16 differs from k_cache's 32"),
    (dict(q=torch.randn(2, 4, 320), k_cache=torch.randn(6, 4, 2, 320)), {}, ShapeError, r"supported: 1\.\.256"),
    (dict(q=torch.randn(2, 130, 32), k_cache=torch.randn(6, 4, 1, 32), v_cache=torch.randn(6, 4, 1, 16)), {},
     ShapeError, "up to 64"),
    (dict(q=torch.randn(2, 4, 32).double()), {}, DTypeError, "accepted: torch.float16"),
    (dict(k_cache=torch.randn(6, 4, 2, 32).half()), {}, DTypeError, "same dtype"),
    (dict(block_table=torch.zeros(2, 3)), {}, DTypeError, "block_table is torch.float32; accepted: torch.int32"),
    (dict(seq_lens=torch.tensor([1.0, 2.0])), {}, DTypeError, "seq_lens is torch.float32; accepted: torch.int32"),
    (dict(block_table=torch.zeros(2, dtype=torch.int32)), {}, ShapeError, r"block_table must have 2 dims"),
    (dict(seq_lens=torch.zeros(3, dtype=torch.int32)), {}, ShapeError, "one row per sequence of q"),
    (dict(seq_lens=torch.tensor([13, 7], dtype=torch.int32)), {}, ShapeError,
     r"seq_lens\[0\]=13 is outside 0..12, the cache capacity max_blocks \* block_size = 3 \* 4"),
    (dict(seq_lens=torch.tensor([12, -1], dtype=torch.int32)), {}, ShapeError, r"seq_lens\[1\]=-1 is outside"),
    (dict(seq_lens=torch.tensor([12, 9], dtype=torch.int32)), {}, ShapeError,
     r"block_table\[1, 2\]=-1 is not a cache block \(0..5\)"),
    (dict(block_table=torch.tensor([[0, 1, 6], [3, 4, 5]], dtype=torch.int32)), {}, ShapeError,
     r"block_table\[0, 2\]=6 is not a cache block"),
    (dict(block_table="table"), {}, KascadeError, "block_table must be a torch.Tensor"),
    ({}, dict(num_splits=0), KascadeError, "num_splits must be None"),
    ({}, dict(num_splits=MAX_SPLITS + 1), KascadeError, "an int from 1 to 1024"),
    ({}, dict(num_splits=2.0), KascadeError, "num_splits must be None"),
    ({}, dict(softcap=-1.0), KascadeError, "softcap must be"),
    ({}, dict(scale=math.inf), KascadeError, "scale must be"),
    ({}, dict(backend="cuda"), KascadeError, "backend='cuda' runs CUDA tensors"),
    ({}, dict(backend="triton"), KascadeError, "backend='triton' runs CUDA tensors"),
    ({}, dict(backend="tpu"), KascadeError, "unknown backend 'tpu'; accepted: triton, cuda, interpret, reference"),
    ({}, dict(out=torch.empty(2, 4, 32)), ShapeError, r"out must be a \[2, 4, 16\]"),
    (dict(q=torch.randn(2, 4, 32).bfloat16(), k_cache=torch.randn(6, 4, 2, 32).bfloat16(),
          v_cache=torch.randn(6, 4, 2, 16).bfloat16()), dict(backend="interpret"), DTypeError,
     "interpreter computes bf16 tl.dot wrongly"),
    (dict(q=torch.randn(2, 4, 32, requires_grad=True)), {}, KascadeError, "paged_decode_attention is forward-only"),
    (dict(block_table=torch.zeros(2, 3, dtype=torch.int32, device="meta")), {}, DeviceError,
     "block_table is on meta but q on cpu"),
]


@pytest.mark.parametrize("tensors, kwargs, exc, message", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_input_is_a_kascade_error_that_says_what_is_accepted(tensors, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        paged_decode_attention(**_args(**tensors), **kwargs)


def test_the_interpreter_refuses_large_shapes():
    big = _args(q=torch.randn(1, 64, 16), k_cache=torch.randn(2, 2**19, 1, 16), v_cache=torch.randn(2, 2**19, 1, 16),
                block_table=torch.tensor([[0, 1]], dtype=torch.int32),
                seq_lens=torch.tensor([2**20], dtype=torch.int32))
    with pytest.raises(ShapeError, match=r"for tests and small shapes: Hq \* sum\(seq_lens\)"):
        paged_decode_attention(**big, backend="interpret")


# ---- on the GPU -------------------------------------------------------------------------------
GPU_CASES = {
    "bf16-d128-gqa4-ps16": (torch.bfloat16, [0, 1, 17, 4097, 257, 1000], 8, 4, 128, 128, 16, None, None, "contiguous"),
    "bf16-d64-mqa7-ps5-softcap": (torch.bfloat16, [5000, 3, 1], 1, 7, 64, 64, 5, 30.0, None, "contiguous"),
    "fp16-d256-mha-ps1-strided": (torch.float16, [700, 0], 4, 1, 256, 256, 1, None, 64, "strided"),
    "fp16-d80-dv40-gqa8-ps16": (torch.float16, [2048] * 16, 2, 8, 80, 40, 16, None, None, "contiguous"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_triton_on_gpu_matches_the_references(case, paged_cache, gen):
    dtype, lens, G, R, D, Dv, page, softcap, splits, layout = case
    q, kc, vc, bt, sl = make_inputs(paged_cache, gen, dtype, lens, G, R, D, Dv, page, layout, "cuda")
    out = torch.full((len(lens), G * R, Dv), math.nan, dtype=dtype, device="cuda")
    paged_decode_attention(q, kc, vc, bt, sl, softcap=softcap, num_splits=splits, out=out)   # default: triton
    check_numerics(out.cpu(), q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), sl.cpu(), softcap=softcap, floor=FLOOR[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_and_cuda_backends_agree(dtype, paged_cache, gen):
    pytest.importorskip("cupy")
    q, kc, vc, bt, sl = make_inputs(paged_cache, gen, dtype, [0, 1, 33, 2000, 517], 4, 4, 128, 128, 16,
                                    device="cuda")
    for softcap in (None, 20.0):
        tri = paged_decode_attention(q, kc, vc, bt, sl, softcap=softcap, backend="triton")
        cu = paged_decode_attention(q, kc, vc, bt, sl, softcap=softcap, backend="cuda")
        ref = gathered(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), sl.cpu(), softcap=softcap)
        bound = 2 * (gathered(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), sl.cpu(), softcap=softcap, dtype=dtype)
                     .double() - ref).abs().max().item() + 1e-3
        assert (tri.cpu().double() - cu.cpu().double()).abs().max().item() <= 2 * bound


@pytest.mark.gpu
def test_interpreter_and_gpu_run_the_same_source(paged_cache, gen):
    q, kc, vc, bt, sl = make_inputs(paged_cache, gen, torch.float16, [70, 5], 2, 4, 64, 64, 16)
    cpu = paged_decode_attention(q, kc, vc, bt, sl, num_splits=3, backend="interpret")
    cuda = paged_decode_attention(q.cuda(), kc.cuda(), vc.cuda(), bt.cuda(), sl.cuda(), num_splits=3)
    torch.testing.assert_close(cuda.cpu(), cpu, atol=2e-3, rtol=0)
