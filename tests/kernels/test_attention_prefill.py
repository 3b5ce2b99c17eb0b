"""The generated prefill-attention kernel against independent references.

Numerics run the generated Triton source under the CPU interpreter (``backend="interpret"``)
and compare with the float64 evaluator of the library's 3-pass cascade (the definition) and
with ``torch.nn.functional.scaled_dot_product_attention``. Low precision follows flash-attn's
rule: ``max|out - ref| <= 2 * max|ref_lowp - ref| + floor``, ``ref_lowp`` being the same
naive attention computed in the low precision. Outputs are poisoned with NaN before the
kernel writes them. The GPU tests (bf16 / fp16 on the ``triton`` backend) need CUDA.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from masks import visible

from kascade.api import attention
from kascade.backends.reference import evaluate
from kascade.backends.triton import run
from kascade.codegen.attention_prefill import render
from kascade.ir import DTypeError, KascadeError, ShapeError, f16, f32, parse
from kascade.ir.extents import bind_extents
from kascade.ir.library import attention as attention_cascade
from kascade.passes.schedule import Config, attention_prefill_schedule

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# ---- references ---------------------------------------------------------------------------
def naive(q, k, v, *, causal=False, window=None, softcap=None, scale=None, dtype=torch.float64):
    """Attention written out in ``dtype``: the float64 reference, or ref_lowp in q's dtype."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    R = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(R, 1), v.repeat_interleave(R, 1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    mask = visible(q.shape[2], k.shape[2], causal, window)
    p = torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1)
    p = torch.where(mask.any(-1, keepdim=True), p, 0)   # a row that sees no key outputs 0
    return p @ v


def evaluator(q, k, v, *, causal=False, window=None, softcap=None, scale=None):
    """The library's 3-pass cascade (the definition) through the float64 evaluator."""
    sides = None if window is None or window == (-1, -1) else window
    c = attention_cascade("3pass", causal=causal, window=sides, softcap=bool(softcap))
    G = k.shape[1]
    params = {"scale": scale if scale is not None else q.shape[-1] ** -0.5, "cap": softcap,
              "wl": max(sides[0], 0) if sides else 0, "wr": max(sides[1], 0) if sides else 0}
    inputs = {"Q": q.double().unflatten(1, (G, q.shape[1] // G)), "K": k.double(), "V": v.double()}
    out = evaluate(c, inputs, {p.name: params[p.name] for p in c.params})["O"]
    return out.flatten(1, 2)


def sdpa(q, k, v, *, causal=False, window=None, scale=None):
    """torch SDPA in float64 with an explicit bottom-right mask; empty rows (NaN there) set to 0."""
    mask = visible(q.shape[2], k.shape[2], causal, window)
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return torch.where(mask.any(-1)[:, None], out, 0)


def make(shape, dtype, layout, gen, device="cpu"):
    """Fresh normal data in ``layout``: ``bhsd`` contiguous, ``bshd`` (a transposed view), or
    ``sliced`` (a view into wider rows: strides that are neither contiguous nor multiples of 16)."""
    B, H, S, D = shape
    if layout == "bhsd":
        t = torch.randn(B, H, S, D, generator=gen)
    elif layout == "bshd":
        t = torch.randn(B, S, H, D, generator=gen).transpose(1, 2)
    else:
        t = torch.randn(B, H, S, D + 3, generator=gen)[..., 1:D + 1]
    return t.to(dtype=dtype, device=device)


def check_numerics(out, q, k, v, *, floor, **kw):
    assert not out.isnan().any(), "the kernel left (or wrote) NaN"
    ref = naive(q, k, v, **kw)
    ref_lowp = naive(q, k, v, dtype=q.dtype, **kw).double()
    bound = 2 * (ref_lowp - ref).abs().max().item() + floor
    ev = evaluator(q, k, v, **kw)
    assert (ev - ref).abs().max().item() < 1e-9, "the two float64 references disagree"
    err = (out.double() - ev).abs().max().item()
    assert err <= bound, f"max |out - evaluator| = {err:.3g} > {bound:.3g}"
    if not kw.get("softcap"):
        err_sdpa = (out.double() - sdpa(q, k, v, causal=kw.get("causal", False), window=kw.get("window"),
                                        scale=kw.get("scale"))).abs().max().item()
        assert err_sdpa <= bound, f"max |out - sdpa| = {err_sdpa:.3g} > {bound:.3g}"


# ---- numerics on the interpreter ----------------------------------------------------------
# (dtype, B, Hq, Hkv, Sq, Sk, D, Dv, causal, window, softcap, layout): every head dim, awkward
# lengths, Sq < Sk and Sq > Sk, GQA ratios 1, 4, 7 and MQA, masks, soft-capping, strides.
CASES = {
    "fp16-d64-mha-causal-128": (torch.float16, 2, 3, 3, 128, 128, 64, 64, True, None, None, "bhsd"),
    "fp32-d40-mqa7-17x97": (torch.float32, 1, 7, 1, 17, 97, 40, 40, False, None, None, "bhsd"),
    "fp16-d80-gqa4-causal-97x17-empty-rows": (torch.float16, 2, 8, 2, 97, 17, 80, 80, True, None, None, "bhsd"),
    "fp32-d96-window-257": (torch.float32, 1, 2, 2, 257, 257, 96, 96, False, (32, 8), None, "bhsd"),
    "fp16-d128-gqa4-causal-decode-1x257": (torch.float16, 3, 8, 2, 1, 257, 128, 128, True, None, None, "bhsd"),
    "fp16-d256-softcap-causal-97": (torch.float16, 1, 2, 1, 97, 97, 256, 256, True, None, 5.0, "bhsd"),
    "fp32-d64-dv40-window-right-128x257": (torch.float32, 1, 2, 1, 128, 257, 64, 40, False, (-1, 16), None, "bhsd"),
    "fp16-d64-dv128-causal-window-softcap-257x128": (torch.float16, 1, 4, 4, 257, 128, 64, 128, True, (50, -1),
                                                     30.0, "bhsd"),
    "fp16-d80-gqa7-causal-bshd": (torch.float16, 1, 14, 2, 97, 128, 80, 80, True, None, None, "bshd"),
    "fp32-d40-gqa4-sliced-window": (torch.float32, 2, 4, 1, 97, 97, 40, 40, False, (5, 3), 10.0, "sliced"),
    "fp32-d128-1x1": (torch.float32, 1, 1, 1, 1, 1, 128, 128, False, None, None, "bhsd"),
    "fp16-d64-diagonal-window-0": (torch.float16, 1, 2, 2, 17, 33, 64, 64, False, (0, 0), None, "bhsd"),
    "fp16-d64-causal-1025": (torch.float16, 1, 2, 1, 1025, 1025, 64, 64, True, None, None, "bhsd"),
}
FLOOR = {torch.float16: 1e-4, torch.float32: 1e-6}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_interpreter_matches_evaluator_and_sdpa(case, gen):
    dtype, B, Hq, Hkv, Sq, Sk, D, Dv, causal, window, softcap, layout = case
    q = make((B, Hq, Sq, D), dtype, layout, gen)
    k = make((B, Hkv, Sk, D), dtype, layout, gen)
    v = make((B, Hkv, Sk, Dv), dtype, layout, gen)
    out = torch.full((B, Hq, Sq, Dv), math.nan, dtype=dtype)   # poisoned: every element must be written
    got = attention(q, k, v, causal=causal, window=window, softcap=softcap, backend="interpret", out=out)
    assert got is out
    check_numerics(out, q, k, v, causal=causal, window=window, softcap=softcap, floor=FLOOR[dtype])


def test_interpreter_with_explicit_scale_and_no_keys(gen):
    """A custom scale; zero keys give all-zero rows (every query sees nothing)."""
    q, k, v = (torch.randn(1, 2, n, 64, generator=gen) for n in (17, 33, 33))
    out = attention(q, k, v, scale=0.3, causal=True, backend="interpret")
    check_numerics(out, q, k, v, causal=True, scale=0.3, floor=1e-6)
    k0, v0 = k[:, :, :0], v[:, :, :0]
    out = attention(q, k0, v0, backend="interpret", out=torch.full((1, 2, 17, 64), math.nan))
    assert torch.equal(out, torch.zeros_like(out))


def test_interpreter_leaves_triton_as_it_found_it(gen):
    """The interpreter path needs no TRITON_INTERPRET and restores everything it patched, so a GPU
    compile in the same process still sees the real ``triton.language``."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    def snapshot():
        return {(m.__name__, n): getattr(m, n) for m in (tl, tl.core, tl.math, tl.standard, tl.tensor)
                for n in dir(m) if not n.startswith("__")}

    before, call = snapshot(), JITFunction.__call__
    q = torch.randn(1, 1, 5, 16, generator=gen)
    attention(q, q, q, softcap=3.0, backend="interpret")
    after = snapshot()
    assert "TRITON_INTERPRET" not in os.environ and JITFunction.__call__ is call
    assert [k for k in before if before[k] is not after.get(k)] == []


def test_reference_backend_is_the_default_on_cpu(gen):
    q, k, v = (torch.randn(1, 4, 9, 32, generator=gen, dtype=torch.float16) for _ in range(3))
    out = attention(q, k, v, causal=True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), naive(q, k, v, causal=True), atol=1e-3, rtol=0)


def test_debug_says_which_config_ran(gen, monkeypatch, capsys):
    monkeypatch.setenv("KASCADE_DEBUG", "1")
    q = torch.randn(1, 2, 17, 40, generator=gen)
    attention(q, q, q, causal=True, backend="interpret")
    err = capsys.readouterr().err
    assert "backend=interpret kernel=attn_fwd_causal_d64" in err and "BLOCK_M=" in err
    assert "cost model's #1" in err and "-bound" in err  # no tuned record here: the model decided, and says so


CUSTOM = """
param scale: f32
input Q[b, h, p, e]: f32
input K[b, h, m, e]: f32
input V[b, h, m, f]: f32
input SL[h]: f32
input QB[p]: f32

S[b, h, m, p] = where(m <= p + M - P and m + 4 >= p, sum[e](Q[b, h, p, e] * K[b, h, m, e]) * scale
                      - SL[h] * abs(p + M - P - m) + QB[p], -inf)
GM[b, h, p] = max[m](S[b, h, m, p])
SN[b, h, m, p] = exp(S[b, h, m, p] - GM[b, h, p])
SD[b, h, p] = sum[m](SN[b, h, m, p])
AV[b, h, p, f] = sum[m](SN[b, h, m, p] * V[b, h, m, f])
output O[b, h, p, f]: f32 = where(SD[b, h, p] > 0, AV[b, h, p, f] / SD[b, h, p], 0)
"""


def test_a_cascade_written_as_text_runs_as_a_kernel(gen):
    """Not the library's cascade: other rank names, no GQA split, a per-head slope hoisted out of
    the key loop, a per-query bias loaded in it, and a window bound the tile skipping derives."""
    c = parse(CUSTOM)
    s = attention_prefill_schedule(c)
    assert [(kb.side, kb.coeff, str(kb.offset)) for kb in s.kernels[0].body.key_bounds] == [
        ("upper", 1, "M - P"), ("lower", 1, "-4")]
    B, H, P, M, E_, F_ = 2, 3, 45, 70, 24, 40
    inputs = {"Q": torch.randn(B, H, P, E_, generator=gen), "K": torch.randn(B, H, M, E_, generator=gen),
              "V": torch.randn(B, H, M, F_, generator=gen), "SL": torch.rand(H, generator=gen),
              "QB": torch.randn(P, generator=gen)}
    ext = bind_extents(c, {n: t.shape for n, t in inputs.items()})
    src = render(s, Config.of(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2), ext)
    assert "sl_val = tl.load(SL + idx_h * stride_sl_h)" in src.text
    assert "tl.load(QB + offs_p[:, None] * stride_qb_p, mask=" in src.text
    out = run(src, inputs, {"scale": 0.25}, ext, interpret=True, out=torch.full((B, H, P, F_), math.nan))
    ref = evaluate(c, inputs, {"scale": 0.25})["O"]
    assert not out.isnan().any() and (out.double() - ref).abs().max().item() < 1e-5


# ---- bad input ---------------------------------------------------------------------------------
def _qkv(**over):
    t = {"q": torch.randn(2, 4, 8, 32), "k": torch.randn(2, 2, 8, 32), "v": torch.randn(2, 2, 8, 32)}
    t.update(over)
    return t


BAD = [
    (dict(q=torch.randn(2, 4, 8)), {}, ShapeError, "q must have 4 dims"),
    (dict(k=torch.randn(3, 2, 8, 32)), {}, ShapeError, "batch sizes differ"),
    (dict(v=torch.randn(2, 1, 8, 32)), {}, ShapeError, "k has 2 heads but v has 1"),
    (dict(q=torch.randn(2, 5, 8, 32)), {}, ShapeError, "5 heads must be a multiple of k/v's 2"),
    (dict(k=torch.randn(2, 2, 8, 16)), {}, ShapeError, "head dim 32 differs from k's 16"),
    (dict(v=torch.randn(2, 2, 9, 32)), {}, ShapeError, "k has 8 keys but v has 9"),
    (dict(q=torch.randn(2, 4, 8, 320), k=torch.randn(2, 2, 8, 320)), {}, ShapeError, r"supported: 1\.\.256"),
    (dict(v=torch.randn(2, 2, 8, 512)), {}, ShapeError, "v head dim 512 is not supported"),
    (dict(q=torch.randn(2, 4, 8, 32, dtype=torch.float64)), {}, DTypeError, "accepted: torch.float16"),
    (dict(k=torch.randn(2, 2, 8, 32, dtype=torch.float16)), {}, DTypeError, "same dtype"),
    (dict(q=[[1.0]]), {}, KascadeError, "q must be a torch.Tensor"),
    ({}, dict(window=(3,)), KascadeError, r"window must be None or \(left, right\)"),
    ({}, dict(window=(-2, 0)), KascadeError, "ints >= -1"),
    ({}, dict(window=(1.5, 0)), KascadeError, "ints >= -1"),
    ({}, dict(softcap=-1.0), KascadeError, "softcap must be"),
    ({}, dict(softcap=math.inf), KascadeError, "softcap must be"),
    ({}, dict(scale=math.nan), KascadeError, "scale must be"),
    ({}, dict(scale="big"), KascadeError, "scale must be"),
    ({}, dict(causal="yes"), KascadeError, "causal must be True or False"),
    ({}, dict(backend="cuda"), KascadeError, "unknown backend 'cuda'; accepted: triton, interpret, reference"),
    ({}, dict(backend="triton"), KascadeError, "backend='triton' runs CUDA tensors"),
    ({}, dict(out=torch.empty(2, 4, 8, 16)), ShapeError, "out must be a"),
    (dict(q=torch.randn(2, 4, 8, 32, dtype=torch.bfloat16), k=torch.randn(2, 2, 8, 32, dtype=torch.bfloat16),
          v=torch.randn(2, 2, 8, 32, dtype=torch.bfloat16)), dict(backend="interpret"), DTypeError,
     "interpreter computes bf16 tl.dot wrongly"),
    (dict(q=torch.randn(1, 8, 2048, 16), k=torch.randn(1, 8, 2048, 16), v=torch.randn(1, 8, 2048, 16)),
     dict(backend="interpret"), ShapeError, "for tests and small shapes"),
    (dict(q=torch.randn(2, 4, 8, 32, requires_grad=True)), {}, KascadeError, "forward-only"),
]


@pytest.mark.parametrize("tensors, kwargs, exc, message", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_input_is_a_kascade_error_that_says_what_is_accepted(tensors, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        attention(**_qkv(**tensors), **kwargs)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU for a second device")
def test_tensors_on_different_devices_are_refused():
    t = _qkv()
    with pytest.raises(KascadeError, match="same device"):
        attention(t["q"].cuda(), t["k"], t["v"])


def test_tensors_on_different_devices_are_refused_without_a_gpu():
    t = _qkv(k=torch.randn(2, 2, 8, 32, device="meta"))
    with pytest.raises(KascadeError, match="same device"):
        attention(**t)


# ---- the generated source ---------------------------------------------------------------------
def test_generated_source_is_readable_and_written_once(tmp_path):
    s = attention_prefill_schedule(attention_cascade("2pass", causal=True, softcap=True, dtype=f16))
    cfg = Config.of(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    src = render(s, cfg, {"E": 80, "F": 80})
    assert src.name.startswith("attn_fwd_causal_softcap_d128_bm64_bn32_w4_s2_fp16_")
    text = src.text
    assert f"def {src.name}(" in text
    assert "score:  where(m <= p + M - P, cap * tanh(sum[e](Q[b, g, r, p, e] * K[b, g, m, e]) * scale / cap)" in text
    assert "cap * (2 / (1 + tl.exp(-2 * (qk * scale / cap))) - 1)" in text                      # the emitted score
    assert "hi = tl.minimum(hi, p_last + (seqlen_k - seqlen_q) + 1)  # m <= p + M - P" in text   # tile skipping
    assert "out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0)" in text                    # the emitted output
    compile(text, src.name, "exec")
    path = src.write(tmp_path)
    first = path.stat().st_mtime_ns
    time.sleep(0.01)
    again = render(s, cfg, {"E": 80, "F": 80})
    assert again.write(tmp_path) == path and path.stat().st_mtime_ns == first and path.read_text() == text
    fp32 = render(attention_prefill_schedule(attention_cascade("2pass", dtype=f32)), cfg, {"E": 64, "F": 32})
    assert fp32.name.startswith("attn_fwd_d64v32_") and 'input_precision="ieee"' in fp32.text


def test_kernels_are_written_under_the_cache_dir(tmp_path, monkeypatch, gen):
    monkeypatch.setenv("KASCADE_CACHE_DIR", str(tmp_path))
    q = torch.randn(1, 1, 3, 24, generator=gen)
    attention(q, q, q, window=(1, 1), backend="interpret")
    files = list((tmp_path / "kernels").glob("attn_fwd_window_d32_*.py"))
    assert len(files) == 1


# ---- on the GPU -------------------------------------------------------------------------------
GPU_CASES = {
    "bf16-d128-gqa4-causal": (torch.bfloat16, 2, 8, 2, 1025, 1025, 128, 128, True, None, None, "bhsd"),
    "bf16-d64-window-softcap-bshd": (torch.bfloat16, 1, 7, 1, 257, 513, 64, 64, False, (64, 0), 30.0, "bshd"),
    "fp16-d256-causal": (torch.float16, 1, 4, 4, 97, 200, 256, 256, True, None, None, "bhsd"),
    "fp16-d80-dv40-sliced": (torch.float16, 2, 4, 2, 113, 113, 80, 40, False, None, None, "sliced"),
    "bf16-d96-decode": (torch.bfloat16, 4, 16, 2, 1, 777, 96, 96, True, None, None, "bhsd"),
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_triton_on_gpu_matches_the_references(case, gen):
    dtype, B, Hq, Hkv, Sq, Sk, D, Dv, causal, window, softcap, layout = case
    q = make((B, Hq, Sq, D), dtype, layout, gen, "cuda")
    k = make((B, Hkv, Sk, D), dtype, layout, gen, "cuda")
    v = make((B, Hkv, Sk, Dv), dtype, layout, gen, "cuda")
    out = torch.full((B, Hq, Sq, Dv), math.nan, dtype=dtype, device="cuda")
    attention(q, k, v, causal=causal, window=window, softcap=softcap, out=out)   # default backend: triton
    kw = dict(causal=causal, window=window, softcap=softcap)
    check_numerics(out.cpu(), q.cpu(), k.cpu(), v.cpu(), floor=1e-3, **kw)


@pytest.mark.gpu
@gpu
def test_interpreter_and_gpu_run_the_same_source(gen):
    q, k, v = (torch.randn(1, 2, 65, 64, generator=gen, dtype=torch.float16) for _ in range(3))
    cpu = attention(q, k, v, causal=True, backend="interpret")
    cuda = attention(q.cuda(), k.cuda(), v.cuda(), causal=True, backend="triton")
    torch.testing.assert_close(cuda.cpu(), cpu, atol=2e-3, rtol=0)
