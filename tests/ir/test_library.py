"""The cascade library, run by the reference evaluator in float64 against independent torch code.

Shapes are the awkward ones from STYLE.md (head dims 40..256, sequence lengths 1..1025,
Sq != Sk, GQA ratios 1 / 4 / 7 and MQA); every input is fresh random data.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from masks import visible

from kascade.backends.reference import evaluate
from kascade.ir import parse, validate
from kascade.ir.library import (
    LIBRARY,
    attention,
    attention_varlen,
    decoder_layer,
    gemm,
    moe,
    paged_decode,
    rmsnorm,
    swiglu_mlp,
)

f64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


def randn(gen: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=f64) * std


def run(cascade, inputs, params=None, extents=None) -> torch.Tensor:
    (out,) = evaluate(cascade, inputs, params, extents, dtype=f64).values()
    return out


# ---- attention --------------------------------------------------------------------
def attention_ref(q, k, v, scale, *, causal=False, window=None, cap=None, slopes=None) -> torch.Tensor:
    """torch SDPA (explicit softmax when soft-capping) on ``q[b, g, r, p, e]``; rows that see
    no key are 0."""
    B, G, R, P, E = q.shape
    M = k.shape[2]
    qh = q.reshape(B, G * R, P, E)
    ok = visible(P, M, causal, window)
    bias = torch.zeros(G * R, P, M, dtype=f64)
    if slopes is not None:
        i = torch.arange(P)[:, None] + M - P
        bias = bias - slopes.reshape(G * R, 1, 1) * (i - torch.arange(M)[None, :]).abs()
    if cap is None:
        mask = bias.masked_fill(~ok, -math.inf)
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        kh, vh = k.repeat_interleave(R, dim=1), v.repeat_interleave(R, dim=1)
        s = torch.einsum("bhpe,bhme->bhpm", qh, kh) * scale
        s = cap * torch.tanh(s / cap) + bias
        w = torch.softmax(s.masked_fill(~ok, -math.inf), dim=-1)
        out = torch.einsum("bhpm,bhmf->bhpf", torch.nan_to_num(w), vh)
    out = torch.where(ok.any(-1)[:, None], out, 0.0)
    return out.reshape(B, G, R, P, v.shape[-1])


def attention_case(gen, B, G, R, P, M, E, Fv):
    q, k, v = randn(gen, B, G, R, P, E), randn(gen, B, G, M, E), randn(gen, B, G, M, Fv)
    return q, k, v, E ** -0.5


@pytest.mark.parametrize("form", ["3pass", "2pass", "1pass"])
@pytest.mark.parametrize("B, G, R, P, M, E, Fv", [
    (2, 2, 1, 17, 97, 40, 40),      # MHA
    (1, 1, 7, 1, 257, 111, 59),     # MQA decode-like, V dim != QK dim
    (1, 2, 4, 113, 17, 59, 80),     # GQA, Sq > Sk
    (1, 1, 1, 5, 1025, 256, 128),
])
def test_attention_matches_sdpa(form, B, G, R, P, M, E, Fv):
    gen = torch.Generator().manual_seed(1)
    q, k, v, scale = attention_case(gen, B, G, R, P, M, E, Fv)
    out = run(attention(form), {"Q": q, "K": k, "V": v}, {"scale": scale}, {"M0": 16} if form == "1pass" else None)
    torch.testing.assert_close(out, attention_ref(q, k, v, scale), **TOL)


@pytest.mark.parametrize("form", ["3pass", "2pass", "1pass"])
@pytest.mark.parametrize("P, M", [(17, 97), (113, 17), (1, 257), (97, 97)])
def test_attention_causal_bottom_right(form, P, M):
    gen = torch.Generator().manual_seed(2)
    q, k, v, scale = attention_case(gen, 1, 2, 4, P, M, 80, 96)
    out = run(attention(form, causal=True), {"Q": q, "K": k, "V": v}, {"scale": scale},
              {"M0": 16} if form == "1pass" else None)
    ref = attention_ref(q, k, v, scale, causal=True)
    torch.testing.assert_close(out, ref, **TOL)
    if P > M:  # the first P - M queries see no key: exactly 0
        assert torch.all(out[..., : P - M, :] == 0) and torch.all(out[..., P - M:, :] != 0)


def test_attention_causal_matches_torch_lower_right_bias():
    """The alignment is torch's own ``causal_lower_right`` definition (Sq < Sk)."""
    from torch.nn.attention.bias import causal_lower_right
    gen = torch.Generator().manual_seed(3)
    q, k, v, scale = attention_case(gen, 1, 1, 4, 17, 113, 96, 96)
    out = run(attention("2pass", causal=True), {"Q": q, "K": k, "V": v}, {"scale": scale})
    ref = F.scaled_dot_product_attention(q.reshape(1, 4, 17, 96), k.repeat_interleave(4, 1),
                                         v.repeat_interleave(4, 1), attn_mask=causal_lower_right(17, 113), scale=scale)
    torch.testing.assert_close(out.reshape(1, 4, 17, 96), ref, **TOL)


@pytest.mark.parametrize("window, causal, wl, wr", [((3, 5), False, 3, 5), ((-1, 2), False, 0, 2),
                                                    ((8, -1), True, 8, 0), ((0, 0), False, 0, 0)])
@pytest.mark.parametrize("form", ["3pass", "1pass"])
def test_attention_window(window, causal, wl, wr, form):
    gen = torch.Generator().manual_seed(4)
    q, k, v, scale = attention_case(gen, 1, 2, 1, 113, 97, 59, 40)
    c = attention(form, causal=causal, window=window)
    params = {"scale": scale, **({"wl": wl} if window[0] >= 0 else {}), **({"wr": wr} if window[1] >= 0 else {})}
    out = run(c, {"Q": q, "K": k, "V": v}, params, {"M0": 16} if form == "1pass" else None)
    ref = attention_ref(q, k, v, scale, causal=causal, window=(wl if window[0] >= 0 else -1,
                                                               wr if window[1] >= 0 else -1))
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("form", ["3pass", "2pass", "1pass"])
def test_attention_softcap_and_alibi(form):
    gen = torch.Generator().manual_seed(5)
    q, k, v, scale = attention_case(gen, 1, 2, 4, 97, 113, 128, 80)
    slopes = torch.rand(2, 4, generator=gen, dtype=f64) * 0.5 + 0.01
    cap, ext = 5.0, ({"M0": 32} if form == "1pass" else None)
    inputs = {"Q": q * 4, "K": k, "V": v}  # large scores so the cap matters
    out = run(attention(form, softcap=True), inputs, {"scale": scale, "cap": cap}, ext)
    torch.testing.assert_close(out, attention_ref(q * 4, k, v, scale, cap=cap), **TOL)
    out = run(attention(form, alibi=True), {**inputs, "AS": slopes}, {"scale": scale}, ext)
    torch.testing.assert_close(out, attention_ref(q * 4, k, v, scale, slopes=slopes), **TOL)
    out = run(attention(form, causal=True, softcap=True, alibi=True), {**inputs, "AS": slopes},
              {"scale": scale, "cap": cap}, ext)
    torch.testing.assert_close(out, attention_ref(q * 4, k, v, scale, causal=True, cap=cap, slopes=slopes), **TOL)


@pytest.mark.parametrize("P, M, M0", [(17, 97, 16), (17, 96, 16), (9, 97, 1), (9, 97, 97), (9, 97, 128),
                                      (113, 17, 5)])
def test_attention_forms_agree(P, M, M0):
    """All three forms, every option on, tiles that do and do not divide M."""
    gen = torch.Generator().manual_seed(6)
    q, k, v, scale = attention_case(gen, 1, 1, 7, P, M, 40, 59)
    inputs = {"Q": q, "K": k, "V": v, "AS": torch.rand(1, 7, generator=gen, dtype=f64)}
    params = {"scale": scale, "cap": 3.0, "wl": 20, "wr": 4}
    outs = [run(attention(form, causal=True, window=(20, 4), softcap=True, alibi=True), inputs, params,
                {"M0": M0} if form == "1pass" else None) for form in ("3pass", "2pass", "1pass")]
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    torch.testing.assert_close(outs[2], outs[0], **TOL)
    ref = attention_ref(q, k, v, scale, causal=True, window=(20, 4), cap=3.0, slopes=inputs["AS"])
    torch.testing.assert_close(outs[0], ref, **TOL)


def test_attention_one_pass_fully_masked_tiles_give_no_nan():
    """Sq > Sk causal with a window: whole key tiles are masked for many queries."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, scale = attention_case(gen, 1, 1, 1, 257, 97, 40, 40)
    out = run(attention("1pass", causal=True, window=(5, -1)), {"Q": q, "K": k, "V": v}, {"scale": scale, "wl": 5},
              {"M0": 16})
    assert not out.isnan().any()
    torch.testing.assert_close(out, attention_ref(q, k, v, scale, causal=True, window=(5, -1)), **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_varlen_matches_per_sequence_sdpa(causal):
    gen = torch.Generator().manual_seed(8)
    q_lens, k_lens = [17, 1, 40, 5], [97, 13, 40, 2]  # Sq < Sk, Sq = Sk and Sq > Sk (empty causal rows)
    G, R, E, Fv = 2, 4, 59, 40
    U, V_ = sum(q_lens), sum(k_lens)
    q, k, v = randn(gen, U, G, R, E), randn(gen, V_, G, E), randn(gen, V_, G, Fv)
    cq = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    scale = E ** -0.5
    out = run(attention_varlen(causal=causal), {"Q": q, "K": k, "V": v, "CQ": cq, "CK": ck}, {"scale": scale})
    for i in range(len(q_lens)):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        ref = attention_ref(q[qs].permute(1, 2, 0, 3)[None], k[ks].permute(1, 0, 2)[None],
                            v[ks].permute(1, 0, 2)[None], scale, causal=causal)
        torch.testing.assert_close(out[qs], ref[0].permute(2, 0, 1, 3), **TOL)


# ---- paged decode -----------------------------------------------------------------
def paged_case(gen, lens, block, G, R, E, Fv, unused):
    """A cache of shuffled blocks; block-table entries past each sequence hold ``unused``
    (-1) or random block ids (``"random"``)."""
    nblocks = [math.ceil(n / block) for n in lens]
    M1 = max(nblocks) + 1
    N = sum(nblocks) + 3
    perm = torch.randperm(N, generator=gen)
    bt = (torch.randint(0, N, (len(lens), M1), generator=gen) if unused == "random"
          else torch.full((len(lens), M1), -1)).to(torch.int32)
    at = 0
    for b, n in enumerate(nblocks):
        bt[b, :n] = perm[at: at + n].to(torch.int32)
        at += n
    kc, vc = randn(gen, N, block, G, E), randn(gen, N, block, G, Fv)
    q = randn(gen, len(lens), G, R, E)
    return {"Q": q, "KC": kc, "VC": vc, "BT": bt, "SL": torch.tensor(lens, dtype=torch.int32)}


def paged_ref(inputs, scale) -> torch.Tensor:
    q, kc, vc, bt, sl = (inputs[n] for n in ("Q", "KC", "VC", "BT", "SL"))
    B, G, R, _ = q.shape
    block = kc.shape[1]
    out = torch.zeros(B, G, R, vc.shape[-1], dtype=f64)
    for b in range(B):
        n = int(sl[b])
        if n == 0:
            continue
        blocks = bt[b, : math.ceil(n / block)].long()
        k = kc[blocks].reshape(-1, G, kc.shape[-1])[:n]  # [n, G, E]
        v = vc[blocks].reshape(-1, G, vc.shape[-1])[:n]
        s = torch.einsum("gre,nge->grn", q[b], k)
        out[b] = torch.einsum("grn,ngf->grf", torch.softmax(s * scale, dim=-1), v)
    return out


@pytest.mark.parametrize("block, lens, G, R, E, Fv, unused", [
    (16, [1, 300, 37, 16], 2, 4, 128, 128, -1),
    (1, [5, 1, 23], 1, 7, 59, 40, "random"),
    (5, [113, 0, 6, 64], 2, 1, 80, 96, "random"),
])
def test_paged_decode_matches_gathered_torch(block, lens, G, R, E, Fv, unused):
    gen = torch.Generator().manual_seed(9)
    inputs = paged_case(gen, lens, block, G, R, E, Fv, unused)
    scale = E ** -0.5
    ref = paged_ref(inputs, scale)
    out = run(paged_decode(), inputs, {"scale": scale})
    torch.testing.assert_close(out, ref, **TOL)
    M1 = inputs["BT"].shape[1]
    for C in (1, 2, 3, M1, M1 + 4):
        split = run(paged_decode(split_kv=True), inputs, {"scale": scale}, {"C": C})
        torch.testing.assert_close(split, out, **TOL)


# ---- MoE --------------------------------------------------------------------------
def moe_ref(x, logits, w1, w2, top_k, renormalize) -> torch.Tensor:
    """vLLM's torch MoE: softmax, top-k, loop over experts, weighted index_add."""
    probs = torch.softmax(logits, dim=-1)
    tw, ti = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        tw = tw / tw.sum(-1, keepdim=True)
    F_ = w2.shape[-1]
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = (ti == e).nonzero(as_tuple=True)
        if len(tok) == 0:
            continue
        h = x[tok] @ w1[e].T
        y = (F.silu(h[:, :F_]) * h[:, F_:]) @ w2[e].T
        out.index_add_(0, tok, y * tw[tok, slot, None])
    return out


@pytest.mark.parametrize("T, E, top_k, D, F_, bias_to", [
    (3, 8, 2, 72, 40, None),
    (64, 8, 1, 24, 59, 5),       # every token to expert 5: seven experts get none
    (64, 64, 8, 40, 24, None),   # many experts with zero tokens
    (1, 64, 2, 17, 33, 0),
    (17, 8, 8, 24, 20, None),    # top_k = E
])
@pytest.mark.parametrize("form", ["dense", "gather"])
def test_moe_matches_expert_loop(T, E, top_k, D, F_, bias_to, form):
    gen = torch.Generator().manual_seed(10)
    x = randn(gen, T, D)
    logits = randn(gen, T, E)
    if bias_to is not None:
        logits[:, bias_to] += 30.0
    w1, w2 = randn(gen, E, 2 * F_, D, std=D ** -0.5), randn(gen, E, D, F_, std=F_ ** -0.5)
    for renorm in (True, False):
        out = run(moe(renorm, form=form), {"X": x, "LG": logits, "W13": w1.view(E, 2, F_, D), "W2": w2},
                  extents={"K": top_k})
        torch.testing.assert_close(out, moe_ref(x, logits, w1, w2, top_k, renorm), **TOL)


def test_moe_router_and_forms_agree():
    gen = torch.Generator().manual_seed(11)
    T, E, D, F_, top_k = 17, 8, 40, 24, 2
    x, wr = randn(gen, T, D), randn(gen, E, D)
    w1, w2 = randn(gen, E, 2 * F_, D), randn(gen, E, D, F_)
    inputs = {"X": x, "WR": wr, "W13": w1.view(E, 2, F_, D), "W2": w2}
    ref = moe_ref(x, x @ wr.T, w1, w2, top_k, True)
    for form in ("dense", "gather"):
        torch.testing.assert_close(run(moe(router=True, form=form), inputs, extents={"K": top_k}), ref, **TOL)


# ---- dense blocks -----------------------------------------------------------------
@pytest.mark.parametrize("epilogue", [None, "bias", "gelu", "silu", "bias_gelu", "bias_silu"])
def test_gemm_epilogues(epilogue):
    gen = torch.Generator().manual_seed(12)
    a, w, bias = randn(gen, 37, 59), randn(gen, 23, 59), randn(gen, 23)
    inputs = {"A": a, "B": w, **({"BIAS": bias} if epilogue and epilogue.startswith("bias") else {})}
    ref = F.linear(a, w, inputs.get("BIAS"))
    if epilogue and epilogue.endswith("gelu"):
        ref = F.gelu(ref)
    if epilogue and epilogue.endswith("silu"):
        ref = F.silu(ref)
    torch.testing.assert_close(run(gemm(epilogue), inputs), ref, **TOL)


def test_rmsnorm():
    gen = torch.Generator().manual_seed(13)
    x, w = randn(gen, 17, 111, std=3.0), randn(gen, 111)
    ref = F.rms_norm(x, (111,), w, eps=1e-5)
    torch.testing.assert_close(run(rmsnorm(), {"X": x, "W": w}, {"eps": 1e-5}), ref, **TOL)


def test_swiglu_mlp():
    gen = torch.Generator().manual_seed(14)
    x, wg, wu, wd = randn(gen, 13, 40), randn(gen, 72, 40), randn(gen, 72, 40), randn(gen, 40, 72)
    ref = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    torch.testing.assert_close(run(swiglu_mlp(), {"X": x, "WG": wg, "WU": wu, "WD": wd}), ref, **TOL)


# ---- decoder layer ----------------------------------------------------------------
def rope_tables(T, E, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, E, 2, dtype=f64) / E)
    emb = torch.cat([torch.outer(torch.arange(T, dtype=f64), inv)] * 2, dim=-1)
    return emb.cos(), emb.sin()


def llama_layer_ref(x, w, G, R, E, eps, moe_top_k=None):
    """HF Llama's decoder layer, written out (rotate-half RoPE, GQA by repeat_interleave)."""
    T, D = x.shape

    def rms(h, weight):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate_half(h):
        return torch.cat([-h[..., E // 2:], h[..., : E // 2]], dim=-1)

    cos, sin = rope_tables(T, E)
    h = rms(x, w["WN1"])
    q = (h @ w["q_proj"].T).view(T, G * R, E).transpose(0, 1)
    k = (h @ w["k_proj"].T).view(T, G, E).transpose(0, 1)
    v = (h @ w["v_proj"].T).view(T, G, E).transpose(0, 1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    a = F.scaled_dot_product_attention(q, k.repeat_interleave(R, 0), v.repeat_interleave(R, 0), is_causal=True)
    ha = x + a.transpose(0, 1).reshape(T, G * R * E) @ w["o_proj"].T
    hn = rms(ha, w["WN2"])
    if moe_top_k is None:
        return ha + F.linear(F.silu(F.linear(hn, w["WG"])) * F.linear(hn, w["WU"]), w["WD"])
    return ha + moe_ref(hn, hn @ w["WR"].T, w["w1"], w["W2"], moe_top_k, True)


@pytest.mark.parametrize("moe_block", [False, True])
def test_decoder_layer_matches_llama(moe_block):
    gen = torch.Generator().manual_seed(15)
    T, D, G, R, E, F_, X_, top_k, eps = 17, 72, 2, 3, 40, 56, 8, 2, 1e-6
    x = randn(gen, T, D)
    w = {"WN1": 1 + 0.1 * randn(gen, D), "WN2": 1 + 0.1 * randn(gen, D),
         "q_proj": randn(gen, G * R * E, D, std=D ** -0.5), "k_proj": randn(gen, G * E, D, std=D ** -0.5),
         "v_proj": randn(gen, G * E, D, std=D ** -0.5), "o_proj": randn(gen, D, G * R * E, std=(G * R * E) ** -0.5),
         "WG": randn(gen, F_, D), "WU": randn(gen, F_, D), "WD": randn(gen, D, F_),
         "WR": randn(gen, X_, D), "w1": randn(gen, X_, 2 * F_, D), "W2": randn(gen, X_, D, F_)}
    cos, sin = rope_tables(T, E)
    inputs = {"X": x, "WN1": w["WN1"], "WN2": w["WN2"], "WQ": w["q_proj"].view(G, R, E, D),
              "WK": w["k_proj"].view(G, E, D), "WV": w["v_proj"].view(G, E, D),
              "WO": w["o_proj"].view(D, G, R, E), "COS": cos, "SIN": sin}
    if moe_block:
        inputs |= {"WR": w["WR"], "W13": w["w1"].view(X_, 2, F_, D), "W2": w["W2"]}
    else:
        inputs |= {"WG": w["WG"], "WU": w["WU"], "WD": w["WD"]}
    out = run(decoder_layer(moe=moe_block), inputs, {"scale": E ** -0.5, "eps": eps},
              {"K": top_k} if moe_block else None)
    torch.testing.assert_close(out, llama_layer_ref(x, w, G, R, E, eps, top_k if moe_block else None), **TOL)


# ---- the registry -----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_entry_builds_validates_and_round_trips(name):
    c = LIBRARY[name]()
    assert validate(c) is c
    assert parse(str(c)) == c
    assert c.outputs and c.name


@pytest.mark.parametrize("bad", [lambda: attention("4pass"), lambda: attention(window=(3,)),
                                 lambda: attention(window=(-2, 1)), lambda: moe(form="sparse"),
                                 lambda: gemm("relu")])
def test_bad_options_are_refused(bad):
    from kascade.ir import CascadeError
    with pytest.raises(CascadeError, match="accepted|window"):
        bad()


@pytest.mark.parametrize("build", [lambda dt: attention("1pass", dtype=dt), lambda dt: attention_varlen(dtype=dt),
                                   lambda dt: paged_decode(True, dtype=dt), lambda dt: moe(dtype=dt),
                                   lambda dt: gemm("bias", dtype=dt), lambda dt: rmsnorm(dtype=dt),
                                   lambda dt: swiglu_mlp(dtype=dt), lambda dt: decoder_layer(True, dtype=dt)])
def test_dtype_keyword_sets_inputs_and_outputs_only(build):
    """Float inputs and outputs take ``dtype``; intermediates stay undeclared (f32); router logits,
    ALiBi slopes and RoPE tables stay f32; integer inputs stay i32."""
    from kascade.ir import f16, f32, i32
    c = build(f16)
    assert all(s.dtype is f16 for s in c.einsums if s.output)
    assert all(s.dtype is None for s in c.einsums if not s.output)
    for t in c.inputs:
        assert t.dtype is (i32 if t.name in ("BT", "SL", "CQ", "CK") else
                           f32 if t.name in ("LG", "AS", "COS", "SIN") else f16), t
