"""The generated varlen prefill kernel (packed sequences, flash-attn layout) against independent references.

Numerics run the generated source under the CPU interpreter and compare with the float64
evaluator of the library's cascades (the dense 3-pass cascade one sequence at a time, and the
packed ``attention_varlen`` cascade where it expresses the variant) and with torch SDPA per
sequence with an explicit bottom-right mask. Low precision follows flash-attn's rule; outputs
are poisoned with NaN first. GPU tests carry the ``gpu`` marker.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from masks import visible

from kascade.api import attention, attention_varlen
from kascade.backends.aot import compile_kernel
from kascade.backends.reference import evaluate
from kascade.codegen.attention_prefill import render
from kascade.ir import DTypeError, KascadeError, ShapeError, bf16, f16, f32
from kascade.ir.errors import DeviceError
from kascade.ir.library import attention as attention_cascade
from kascade.ir.library import attention_varlen as attention_varlen_cascade
from kascade.passes.schedule import Config, ScheduleError, attention_varlen_schedule, choose_config

CUDA = torch.cuda.is_available()
FLOOR = {torch.float16: 1e-4, torch.float32: 1e-6, torch.bfloat16: 1e-3}


# ---- references ---------------------------------------------------------------------------
def offsets(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def per_sequence(fn, q, k, v, lens_q, lens_k, Dv):
    """``fn(q_i, k_i, v_i)`` on each sequence's (1, H, S, D) slices, packed back to (total_q, Hq, Dv)."""
    out = torch.zeros(q.shape[0], q.shape[1], Dv, dtype=torch.float64)
    cq, ck = offsets(lens_q).tolist(), offsets(lens_k).tolist()
    for i in range(len(lens_q)):
        qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t, (a, b) in ((q, cq[i:i + 2]), (k, ck[i:i + 2]),
                                                                        (v, ck[i:i + 2])))
        if qi.shape[2]:
            out[cq[i]:cq[i + 1]] = fn(qi, ki, vi)[0].transpose(0, 1).double()
    return out


def naive(q, k, v, *, causal, window, softcap, scale, dtype):
    q, k, v = (t.to(dtype) for t in (q, k, v))
    R = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(R, 1), v.repeat_interleave(R, 1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    mask = visible(q.shape[2], k.shape[2], causal, window)
    p = torch.where(mask.any(-1, keepdim=True), torch.softmax(s.masked_fill(~mask, -math.inf), -1), 0)
    return p @ v


def sdpa(q, k, v, *, causal, window, scale):
    mask = visible(q.shape[2], k.shape[2], causal, window)
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return torch.where(mask.any(-1)[:, None], out, 0)


def dense_evaluator(q, k, v, *, causal, window, softcap, scale):
    """The library's 3-pass cascade of one sequence (the definition), float64."""
    sides = None if window is None or window == (-1, -1) else window
    c = attention_cascade("3pass", causal=causal, window=sides, softcap=bool(softcap))
    G = k.shape[1]
    params = {"scale": scale if scale is not None else q.shape[-1] ** -0.5, "cap": softcap,
              "wl": max(sides[0], 0) if sides else 0, "wr": max(sides[1], 0) if sides else 0}
    inputs = {"Q": q.double().unflatten(1, (G, q.shape[1] // G)), "K": k.double(), "V": v.double()}
    return evaluate(c, inputs, {p.name: params[p.name] for p in c.params})["O"].flatten(1, 2)


def packed_evaluator(q, k, v, lens_q, lens_k, *, causal, scale):
    """The library's packed ``attention_varlen`` cascade, float64 (no windows or soft-caps there)."""
    c = attention_varlen_cascade(causal=causal)
    G = k.shape[1]
    inputs = {"Q": q.double().unflatten(1, (G, q.shape[1] // G)), "K": k.double(), "V": v.double(),
              "CQ": offsets(lens_q), "CK": offsets(lens_k)}
    out = evaluate(c, inputs, {"scale": scale if scale is not None else q.shape[-1] ** -0.5})["O"]
    return out.flatten(1, 2)


def check_numerics(out, q, k, v, lens_q, lens_k, *, floor, causal=False, window=None, softcap=None, scale=None):
    assert not out.isnan().any(), "the kernel left (or wrote) NaN"
    kw = dict(causal=causal, window=window, softcap=softcap, scale=scale)
    Dv = v.shape[-1]
    ref = per_sequence(lambda a, b, c: naive(a, b, c, dtype=torch.float64, **kw), q, k, v, lens_q, lens_k, Dv)
    ref_lowp = per_sequence(lambda a, b, c: naive(a, b, c, dtype=q.dtype, **kw), q, k, v, lens_q, lens_k, Dv)
    bound = 2 * (ref_lowp - ref).abs().max().item() + floor
    ev = per_sequence(lambda a, b, c: dense_evaluator(a, b, c, **kw), q, k, v, lens_q, lens_k, Dv)
    assert (ev - ref).abs().max().item() < 1e-9, "the float64 references disagree"
    if window is None and not softcap and q.shape[0] * k.shape[0] <= 2000 ** 2:   # it holds (Hq, Tk, Tq) scores
        packed = packed_evaluator(q, k, v, lens_q, lens_k, causal=causal, scale=scale)
        assert (packed - ref).abs().max().item() < 1e-9, "the packed library cascade disagrees"
    err = (out.double() - ev).abs().max().item()
    assert err <= bound, f"max |out - evaluator| = {err:.3g} > {bound:.3g}"
    if not softcap:
        via_sdpa = per_sequence(lambda a, b, c: sdpa(a, b, c, causal=causal, window=window, scale=scale), q, k, v,
                                lens_q, lens_k, Dv)
        err = (out.double() - via_sdpa).abs().max().item()
        assert err <= bound, f"max |out - sdpa| = {err:.3g} > {bound:.3g}"


def make(lens_q, lens_k, Hq, Hkv, D, Dv, dtype, gen, layout="contiguous", device="cpu"):
    """Packed q, k, v; ``strided``: views into wider rows and a head-major k (non-unit strides),
    made after the conversion to ``dtype`` (which would copy a sliced view contiguous)."""
    Tq, Tk = sum(lens_q), sum(lens_k)
    to = dict(dtype=dtype, device=device)
    if layout == "strided":
        q = torch.randn(Tq, Hq, D + 8, generator=gen).to(**to)[..., 5:D + 5]
        k = torch.randn(Hkv, Tk, D, generator=gen).to(**to).transpose(0, 1)
        v = torch.randn(Tk, Hkv, Dv + 3, generator=gen).to(**to)[..., :Dv]
        assert not q.is_contiguous() and not v.is_contiguous()
        return q, k, v
    return tuple(torch.randn(T, H, d, generator=gen).to(**to) for T, H, d in ((Tq, Hq, D), (Tk, Hkv, D), (Tk, Hkv, Dv)))


# ---- numerics on the interpreter ----------------------------------------------------------
# (dtype, lens_q, lens_k, Hq, Hkv, D, Dv, causal, window, softcap, layout): lengths 0, 1, 17, 97,
# 128, 257 and 1025 packed together, q shorter and longer than k, GQA 1, 4, 7 and MQA, masks.
CASES = {
    "fp16-d64-mqa-causal-mixed": (torch.float16, [1, 17, 97, 128, 0], [1, 17, 97, 128, 5], 4, 1, 64, 64, True, None,
                                  None, "contiguous"),
    "fp32-d40-mha-97x257": (torch.float32, [97, 17], [257, 17], 7, 7, 40, 40, False, None, None, "contiguous"),
    "fp16-d128-gqa4-causal-window": (torch.float16, [128, 1], [128, 257], 8, 2, 128, 128, True, (32, 0), None,
                                     "contiguous"),
    "fp32-d80-dv40-gqa7-window-softcap": (torch.float32, [17, 33], [40, 33], 14, 2, 80, 40, False, (5, 3), 10.0,
                                          "contiguous"),
    "fp16-d256-causal-softcap-strided": (torch.float16, [33, 64], [33, 64], 2, 1, 256, 256, True, None, 5.0,
                                         "strided"),
    "fp16-d64-dv128-q-longer-than-k-causal": (torch.float16, [40, 3], [10, 0], 4, 2, 64, 128, True, None, None,
                                              "strided"),
    "fp16-d64-causal-1025": (torch.float16, [1025], [1025], 2, 1, 64, 64, True, None, None, "contiguous"),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_interpreter_matches_evaluators_and_sdpa(case, gen):
    dtype, lens_q, lens_k, Hq, Hkv, D, Dv, causal, window, softcap, layout = case
    q, k, v = make(lens_q, lens_k, Hq, Hkv, D, Dv, dtype, gen, layout)
    out = torch.full((sum(lens_q), Hq, Dv), math.nan, dtype=dtype)
    got = attention_varlen(q, k, v, offsets(lens_q), offsets(lens_k), max(lens_q), max(lens_k), causal=causal,
                           window=window, softcap=softcap, backend="interpret", out=out)
    assert got is out
    check_numerics(out, q, k, v, lens_q, lens_k, floor=FLOOR[dtype], causal=causal, window=window, softcap=softcap)


def test_each_sequence_is_attended_as_attention_would_attend_it_alone(gen):
    """The same kernel template, dense and packed: per sequence, the same numbers."""
    lens = [9, 30]
    q, k, v = make(lens, lens, 4, 2, 32, 32, torch.float32, gen)
    packed = attention_varlen(q, k, v, offsets(lens), offsets(lens), 30, 30, causal=True, scale=0.2,
                              backend="interpret")
    for (a, b) in ((0, 9), (9, 39)):
        alone = attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                          causal=True, scale=0.2, backend="interpret")
        torch.testing.assert_close(packed[a:b], alone[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_oversized_max_seqlen_int64_offsets_and_an_empty_batch(gen):
    lens_q, lens_k = [5, 12], [7, 12]
    q, k, v = make(lens_q, lens_k, 2, 1, 16, 16, torch.float32, gen)
    tight = attention_varlen(q, k, v, offsets(lens_q), offsets(lens_k), 12, 12, backend="interpret")
    loose = attention_varlen(q, k, v, offsets(lens_q).long(), offsets(lens_k).long(), 100, 300, backend="interpret")
    assert torch.equal(tight, loose)
    none = attention_varlen(q[:0], k[:0], v[:0], torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                            0, 0, backend="interpret")
    assert none.shape == (0, 2, 16)


def test_reference_backend_is_the_default_on_cpu(gen):
    lens_q, lens_k = [3, 0, 8], [5, 2, 8]
    q, k, v = make(lens_q, lens_k, 4, 2, 24, 8, torch.float16, gen)
    out = attention_varlen(q, k, v, offsets(lens_q), offsets(lens_k), 8, 8, causal=True, window=(2, -1))
    assert out.dtype == torch.float16
    ref = per_sequence(lambda a, b, c: naive(a, b, c, causal=True, window=(2, -1), softcap=None, scale=None,
                                             dtype=torch.float64), q, k, v, lens_q, lens_k, 8)
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=0)


def test_debug_says_which_config_ran(gen, monkeypatch, capsys):
    monkeypatch.setenv("KASCADE_DEBUG", "1")
    q, k, v = make([17, 3], [17, 3], 2, 2, 40, 40, torch.float32, gen)
    attention_varlen(q, k, v, offsets([17, 3]), offsets([17, 3]), 17, 17, causal=True, backend="interpret")
    err = capsys.readouterr().err
    assert "backend=interpret kernel=attn_fwd_varlen_causal_d64" in err and "BLOCK_M=" in err
    assert "cost model's #1" in err  # no tuned record: the roofline model chose, and says so
    assert "max_seqlen_q=17" in err and "2 sequences" in err


# ---- the schedule and the source ------------------------------------------------------------
def test_varlen_schedule_packs_the_sequence_rank():
    s = attention_varlen_schedule(attention_cascade("2pass", causal=True, window=(4, 4)))
    body = s.kernels[0].body
    assert s.kernels[0].family == "attention_prefill_varlen" and s.key().startswith("attention_prefill_varlen:")
    assert body.packed.rank == "b" and (body.packed.query_starts.name, body.packed.key_starts.name) == ("CQ", "CK")
    assert body.q.ranks == ("p", "g", "r", "e") and body.k.ranks == ("m", "g", "e") and body.out.ranks[0] == "p"
    with pytest.raises(ScheduleError, match="the sequence rank must be one of the batch-like ranks"):
        attention_varlen_schedule(attention_cascade("2pass"), sequence="p")


def test_generated_source_reads_each_sequence_from_the_offsets():
    s = attention_varlen_schedule(attention_cascade("2pass", causal=True, dtype=f16))
    src = render(s, Config.of(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2), {"E": 80, "F": 80})
    text = src.text
    assert src.name.startswith("attn_fwd_varlen_causal_d128_bm64_bn32_w4_s2_fp16_")
    assert "seqlen_q = tl.load(CQ + (idx_b + 1) * stride_cq_b) - start_q" in text
    assert "if start_p >= seqlen_q:\n        return" in text
    assert "q_base = Q + idx_g * stride_q_g + idx_r * stride_q_r + start_q.to(tl.int64) * stride_q_p" in text
    assert "hi = tl.minimum(hi, p_last + (seqlen_k - seqlen_q) + 1)  # m <= p + M - P" in text
    assert "seqlen_k," not in text.split("):")[0], "the lengths are per sequence, not arguments"
    compile(text, src.name, "exec")


@pytest.mark.parametrize("target", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("dtype, d", [(bf16, 128), (f16, 64), (bf16, 256), (f32, 256)])
def test_aot_default_configs_fit_without_spills(target, dtype, d):
    s = attention_varlen_schedule(attention_cascade("2pass", causal=True, window=(8, 8), softcap=True, dtype=dtype))
    cfg, _ = choose_config(s, {"P": 4096, "M": 4096, "E": d, "F": d, "itemsize": dtype.itemsize})
    c = compile_kernel(render(s, cfg, {"E": d, "F": d}), target)
    assert c.ok and c.fits and not c.spills, (c.reason, c.error, c.stack_bytes)
    assert f".target {target}" in c.ptx and 0 < c.registers <= 255


# ---- bad input ---------------------------------------------------------------------------------
def _args(**over):
    gen = torch.Generator().manual_seed(0)
    a = dict(q=torch.randn(10, 4, 32, generator=gen), k=torch.randn(12, 2, 32, generator=gen),
             v=torch.randn(12, 2, 16, generator=gen), cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
             cu_seqlens_k=torch.tensor([0, 5, 12], dtype=torch.int32), max_seqlen_q=6, max_seqlen_k=7)
    a.update(over)
    return a


I32 = dict(dtype=torch.int32)
BAD = [
    (dict(q=torch.randn(10, 4, 1, 32)), {}, ShapeError, r"q must have 3 dims \(total_tokens, heads, head_dim\)"),
    (dict(v=torch.randn(12, 1, 16)), {}, ShapeError, "k has 2 heads but v has 1"),
    (dict(q=torch.randn(10, 3, 32)), {}, ShapeError, "q's 3 heads must be a multiple of k/v's 2 heads"),
    (dict(v=torch.randn(11, 2, 16)), {}, ShapeError, "k has 12 tokens but v has 11"),
    (dict(q=torch.randn(10, 4, 16)), {}, ShapeError, "q's head dim 16 differs from k's 32"),
    (dict(v=torch.randn(12, 2, 300)), {}, ShapeError, r"v head dim 300 is not supported; supported: 1\.\.256"),
    (dict(q=torch.randn(10, 4, 32).double()), {}, DTypeError, "accepted: torch.float16, torch.bfloat16"),
    (dict(v=torch.randn(12, 2, 16).half()), {}, DTypeError, "same dtype"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 4.0, 10.0])), {}, DTypeError, "cu_seqlens_q is torch.float32; accepted"),
    (dict(cu_seqlens_k=torch.tensor([[0, 5, 12]], **I32)), {}, ShapeError, r"cu_seqlens_k must have 1 dim \(batch"),
    (dict(cu_seqlens_k=torch.tensor([0, 12], **I32)), {}, ShapeError, r"both have batch \+ 1 >= 1 entries, got 3, 2"),
    (dict(cu_seqlens_q=torch.tensor([1, 4, 10], **I32)), {}, ShapeError,
     r"cu_seqlens_q must run from 0 to the number of tokens of q \(10\); got cu_seqlens_q\[0\]=1"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 11], **I32)), {}, ShapeError, r"tokens of k and v \(12\)"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], **I32), cu_seqlens_k=torch.tensor([0, 5, 6, 12], **I32)), {},
     ShapeError, r"cu_seqlens_q must be non-decreasing .* cu_seqlens_q\[1\]=6 > cu_seqlens_q\[2\]=4"),
    (dict(max_seqlen_q=5), {}, ShapeError, r"max_seqlen_q=5 is smaller than the longest sequence \(6 tokens"),
    (dict(max_seqlen_k=6.5), {}, KascadeError, "max_seqlen_k must be an int >= 0"),
    (dict(max_seqlen_q=True), {}, KascadeError, "max_seqlen_q must be an int >= 0"),
    (dict(cu_seqlens_q=[0, 4, 10]), {}, KascadeError, "cu_seqlens_q must be a torch.Tensor"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 12], device="meta", **I32)), {}, DeviceError,
     "cu_seqlens_k is on meta but q on cpu"),
    ({}, dict(window=(1, 2, 3)), KascadeError, "window must be None or"),
    ({}, dict(causal=1), KascadeError, "causal must be True or False"),
    ({}, dict(softcap=math.nan), KascadeError, "softcap must be"),
    ({}, dict(backend="cuda"), KascadeError, "unknown backend 'cuda'; accepted: triton, interpret, reference"),
    ({}, dict(backend="triton"), KascadeError, "backend='triton' runs CUDA tensors"),
    ({}, dict(out=torch.empty(10, 4, 32)), ShapeError, r"out must be a \[10, 4, 16\] torch.float32 tensor"),
    (dict(q=torch.randn(10, 4, 32).bfloat16(), k=torch.randn(12, 2, 32).bfloat16(),
          v=torch.randn(12, 2, 16).bfloat16()), dict(backend="interpret"), DTypeError,
     "interpreter computes bf16 tl.dot wrongly"),
    (dict(k=torch.randn(12, 2, 32, requires_grad=True)), {}, KascadeError, "attention_varlen is forward-only"),
    (dict(k=torch.randn(12, 2, 32, device="meta")), {}, KascadeError, "must be on the same device"),
]


@pytest.mark.parametrize("tensors, kwargs, exc, message", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_input_is_a_kascade_error_that_says_what_is_accepted(tensors, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        attention_varlen(**_args(**tensors), **kwargs)


def test_the_interpreter_refuses_large_shapes():
    n = 3000
    big = _args(q=torch.randn(n, 4, 16), k=torch.randn(n, 2, 16), v=torch.randn(n, 2, 16),
                cu_seqlens_q=torch.tensor([0, n], **I32), cu_seqlens_k=torch.tensor([0, n], **I32),
                max_seqlen_q=n, max_seqlen_k=n)
    with pytest.raises(ShapeError, match=r"for tests and small shapes: Hq \* sum\(Sq_i \* Sk_i\) = 36000000"):
        attention_varlen(**big, backend="interpret")


# ---- on the GPU -------------------------------------------------------------------------------
GPU_CASES = {
    "bf16-d128-gqa4-causal": (torch.bfloat16, [1, 1025, 97, 0, 2000], [1, 1025, 300, 5, 2000], 8, 2, 128, 128, True,
                              None, None, "contiguous"),
    "bf16-d64-mqa7-window-softcap": (torch.bfloat16, [257, 513], [513, 257], 7, 1, 64, 64, False, (64, 0), 30.0,
                                     "strided"),
    "fp16-d256-causal": (torch.float16, [97, 200], [200, 97], 4, 4, 256, 256, True, None, None, "contiguous"),
    "fp16-d80-dv40-strided": (torch.float16, [113] * 5, [113] * 5, 4, 2, 80, 40, False, None, None, "strided"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_triton_on_gpu_matches_the_references(case, gen):
    dtype, lens_q, lens_k, Hq, Hkv, D, Dv, causal, window, softcap, layout = case
    q, k, v = make(lens_q, lens_k, Hq, Hkv, D, Dv, dtype, gen, layout, "cuda")
    out = torch.full((sum(lens_q), Hq, Dv), math.nan, dtype=dtype, device="cuda")
    attention_varlen(q, k, v, offsets(lens_q).cuda(), offsets(lens_k).cuda(), max(lens_q), max(lens_k),
                     causal=causal, window=window, softcap=softcap, out=out)   # default backend: triton
    check_numerics(out.cpu(), q.cpu(), k.cpu(), v.cpu(), lens_q, lens_k, floor=FLOOR[dtype], causal=causal,
                   window=window, softcap=softcap)


@pytest.mark.gpu
def test_interpreter_and_gpu_run_the_same_source(gen):
    q, k, v = make([65, 3], [65, 70], 2, 1, 64, 64, torch.float16, gen)
    args = (offsets([65, 3]), offsets([65, 70]), 65, 70)
    cpu = attention_varlen(q, k, v, *args, causal=True, backend="interpret")
    cuda = attention_varlen(q.cuda(), k.cuda(), v.cuda(), *(a.cuda() if torch.is_tensor(a) else a for a in args),
                            causal=True, backend="triton")
    torch.testing.assert_close(cuda.cpu(), cpu, atol=2e-3, rtol=0)
