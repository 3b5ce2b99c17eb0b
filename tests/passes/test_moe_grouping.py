"""group_experts: both MoE library forms become the expert-grouped form, the same function.

Every check evaluates the source and the rewritten cascade in float64 on fresh random
inputs; the grouped form's routing bookkeeping is also checked against plain torch.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kascade.backends.reference import evaluate
from kascade.ir import RewriteError, parse
from kascade.ir.cascade import Einsum, Operator
from kascade.ir.library import LIBRARY, attention, gemm
from kascade.ir.library.layer import decoder_layer
from kascade.ir.library.moe import moe
from kascade.passes.analysis import count
from kascade.passes.moe_grouping import group_experts, has_expert_part
from kascade.passes.pipeline import default_steps, lower

f64 = torch.float64
D, F = 24, 40
SHAPES = [(T, E, K) for T, E, K in itertools.product((1, 3, 17), (4, 8), (1, 2, 3))]


def moe_inputs(gen, T, E, *, router, logits=None) -> dict[str, torch.Tensor]:
    x = torch.randn(T, D, generator=gen, dtype=f64)
    inputs = {"X": x, "W13": torch.randn(E, 2, F, D, generator=gen, dtype=f64) / D ** 0.5,
              "W2": torch.randn(E, D, F, generator=gen, dtype=f64) / F ** 0.5}
    if router:
        inputs["WR"] = torch.randn(E, D, generator=gen, dtype=f64)
    else:
        inputs["LG"] = torch.randn(T, E, generator=gen, dtype=f64) if logits is None else logits
    return inputs


def both(before, after, inputs, K, params=None, extents=None) -> tuple[dict, dict]:
    ext = {"K": K, **(extents or {})}
    want = evaluate(before, inputs, params, ext, dtype=f64)
    got = evaluate(after, inputs, params, ext, dtype=f64, keep_all=True)
    assert not torch.isnan(want["Y"]).any()
    torch.testing.assert_close(got["Y"], want["Y"], rtol=1e-12, atol=1e-12)
    return want, got


def check_bookkeeping(got: dict, T: int, E: int, K: int) -> None:
    """The grouped form's routing tensors, against plain torch on its own top-k choice."""
    ids = got["TI"].reshape(-1)
    assert torch.equal(got["EID"], ids)
    assert torch.equal(got["CNT"], torch.bincount(ids, minlength=E))
    order = torch.sort(ids, stable=True).indices
    assert torch.equal(got["PAIR"], order) and torch.equal(got["ROWEXP"], ids[order])
    assert torch.equal(got["PAIR"][got["POS"]], torch.arange(T * K))


def expert_loop(inputs, TI, TW) -> torch.Tensor:
    """Mixtral's MoE as a plain loop over tokens and their chosen experts."""
    x, w13, w2 = inputs["X"], inputs["W13"], inputs["W2"]
    y = torch.zeros_like(x)
    for t, k in itertools.product(range(TI.shape[0]), range(TI.shape[1])):
        e = int(TI[t, k])
        h = torch.nn.functional.silu(w13[e, 0] @ x[t]) * (w13[e, 1] @ x[t])
        y[t] += TW[t, k] * (w2[e] @ h)
    return y


@pytest.mark.parametrize("form", ["dense", "gather"])
def test_grouped_form_computes_the_same_moe(form, gen):
    """before: moe(form)   after: EID, CNT, sort, GU/ACT/EO over rows q, POS, combine.
    Claim: the same Y at every T in {1, 3, 17}, E in {4, 8}, K in {1, 2, 3}."""
    c = moe(form=form)
    g = group_experts(c)
    for T, E, K in SHAPES:
        inputs = moe_inputs(gen, T, E, router=False)
        _, got = both(c, g, inputs, K)
        check_bookkeeping(got, T, E, K)
    torch.testing.assert_close(got["Y"], expert_loop(inputs, got["TI"], got["TW"]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["dense", "gather"])
@pytest.mark.parametrize("router", [False, True], ids=["logits", "router"])
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
def test_router_and_renormalisation_variants(form, router, renormalize, gen):
    """before: moe(renormalize, router, form)   after: grouped.  Claim: the same Y; the
    combine weighs by TV without renormalisation."""
    c = moe(renormalize, router=router, form=form)
    g = group_experts(c)
    for T, E, K in [(3, 8, 2), (17, 4, 3)]:
        inputs = moe_inputs(gen, T, E, router=router)
        _, got = both(c, g, inputs, K)
        check_bookkeeping(got, T, E, K)
    weights = got["TW"] if renormalize else got["TV"]
    torch.testing.assert_close(got["Y"], expert_loop(inputs, got["TI"], weights), rtol=1e-12, atol=1e-12)
    assert ("sum[k](TW[t, k] * EO[POS[t * K + k], d])" in str(g)) is renormalize


def test_grouped_form_is_the_contract():
    """before: moe(form='gather')   after: the statements the grouped-GEMM schedule matches,
    in order, and a text form that parses back to the same cascade."""
    for form in ("dense", "gather"):
        g = group_experts(moe(form=form))
        assert parse(str(g)) == g
        names = [s.names if isinstance(s, Operator) else s.name for s in g.stmts]
        assert names[names.index("TW") + 1:] == ["EID", "CNT", ("ROWEXP", "PAIR"), "GU", "ACT", "EO",
                                                 ("PID", "POS"), "Y"]
        text = str(g)
        for line in ["extent P = T * K",
                     "EID[p]: i32 = TI[p // K, p % K]",
                     "CNT[x]: i32 = sum[p](where(EID[p] == x, 1, 0))",
                     "ROWEXP[q]: i32, PAIR[q]: i32 = sort[p](EID[p])",
                     "GU[q, h, f] = sum[d](X[PAIR[q] // K, d] * W13[ROWEXP[q], h, f, d])",
                     "ACT[q, f] = silu(GU[q, 0, f]) * GU[q, 1, f]",
                     "EO[q, d] = sum[f](ACT[q, f] * W2[ROWEXP[q], d, f])",
                     "PID[p]: i32, POS[p]: i32 = sort[q](PAIR[q])",
                     "output Y[t, d]: bf16 = sum[k](TW[t, k] * EO[POS[t * K + k], d])"]:
            assert line in text.splitlines(), (line, text)


@pytest.mark.parametrize("form", ["dense", "gather"])
def test_every_token_picks_the_same_experts(form, gen):
    """Logits far apart per expert (no ties in the softmax): all T tokens choose the same K
    experts, so K experts get T rows each and the rest none.  Claim: same Y."""
    T, E, K = 17, 8, 3
    c = moe(form=form)
    logits = torch.arange(E, dtype=f64).repeat(T, 1) * 4 + 0.1 * torch.rand(T, E, generator=gen, dtype=f64)
    _, got = both(c, group_experts(c), moe_inputs(gen, T, E, router=False, logits=logits), K)
    assert torch.equal(got["CNT"], torch.tensor([0] * (E - K) + [T] * K))
    check_bookkeeping(got, T, E, K)


@pytest.mark.parametrize("form", ["dense", "gather"])
def test_experts_without_tokens(form, gen):
    """One token, two of eight experts: six experts get no row.  Claim: same Y."""
    c = moe(form=form)
    _, got = both(c, group_experts(c), moe_inputs(gen, 1, 8, router=False), 2)
    assert int((got["CNT"] == 0).sum()) == 6


@pytest.mark.parametrize("form", ["dense", "gather"])
def test_moe_decoder_layer(form, gen):
    """before: decoder_layer(moe=True) (the MoE block reads HN, adds the residual HA)
    after: grouped, the residual kept.  Claim: same Y."""
    c = decoder_layer(moe=True, moe_form=form)
    g = group_experts(c)
    assert parse(str(g)) == g
    assert "output Y[t, d]: bf16 = HA[t, d] + sum[k](TW[t, k] * EO[POS[t * K + k], d])" in str(g)
    ext = dict(T=5, X=4, G=2, R=2, E=8, D=D, F=F, H=2)
    inputs = {n.name: torch.randn([ext[r.upper()] for r in n.ranks], generator=gen, dtype=f64) for n in c.inputs}
    both(c, g, inputs, 2, {"scale": 8 ** -0.5, "eps": 1e-6}, ext)


def test_any_activation_and_per_expert_terms_survive(gen):
    """before: a dense MoE with gelu(gate) * up + a per-expert bias B[x, f] and a per-expert
    scale S[x] inside the combine.  Claim: grouped, reads B[ROWEXP[q], f], same Y."""
    c = parse("""
input X[t, d]: f32
input LG[t, x]: f32
input W13[x, h, f, d]: f32
input W2[x, d, f]: f32
input B[x, f]: f32
input S[x]: f32
TV[t, k], TI[t, k] = topk[x](LG[t, x])
R[t, x] = sum[k](where(x == TI[t, k], TV[t, k], 0.0))
GU[t, x, h, f] = sum[d](X[t, d] * W13[x, h, f, d])
ACT[t, x, f] = gelu(GU[t, x, 0, f]) * GU[t, x, 1, f] + B[x, f]
EO[t, x, d] = sum[f](ACT[t, x, f] * W2[x, d, f])
output Y[t, d]: f32 = sum[x](S[x] * R[t, x] * EO[t, x, d])
""")
    g = group_experts(c)
    assert "ACT[q, f] = gelu(GU[q, 0, f]) * GU[q, 1, f] + B[ROWEXP[q], f]" in str(g)
    assert "R" not in set(g.tensor_names())
    inputs = moe_inputs(gen, 7, 5, router=False)
    inputs.update(B=torch.randn(5, F, generator=gen, dtype=f64), S=torch.rand(5, generator=gen, dtype=f64) + 0.5)
    both(c, g, inputs, 2)


@pytest.mark.parametrize("text, message", [
    ("input A[m, k]: f32\ninput W[k, n]: f32\noutput C[m, n]: f32 = sum[k](A[m, k] * W[k, n])\n",
     "expected exactly one topk operator"),
    ("input LG[t, x]: f32\nTV[t, k], TI[t, k] = topk[x](LG[t, x])\noutput S[t]: f32 = sum[k](TV[t, k])\n",
     "weighted sum of expert results"),
    # an expert result that some other statement also reads
    ("""input X[t, d]: f32
input LG[t, x]: f32
input W[x, f, d]: f32
TV[t, k], TI[t, k] = topk[x](LG[t, x])
EO[t, k, f] = sum[d](X[t, d] * W[TI[t, k], f, d])
output Z[t, k]: f32 = max[f](EO[t, k, f])
output Y[t, f]: f32 = sum[k](TV[t, k] * EO[t, k, f])
""", "also read by Einsum 'Z'"),
    # an expert result read at another token's position
    ("""input X[t, d]: f32
input LG[t, x]: f32
input W[x, f, d]: f32
TV[t, k], TI[t, k] = topk[x](LG[t, x])
GU[t, k, f] = sum[d](X[t, d] * W[TI[t, k], f, d])
EO[t, k, f] = GU[t, k, f] + GU[(t + 1) % T, k, f]
output Y[t, f]: f32 = sum[k](TV[t, k] * EO[t, k, f])
""", "away from its own"),
])
def test_what_is_not_an_moe_is_refused(text, message):
    """Claim: a cascade without the MoE structure raises RewriteError naming what is missing."""
    c = parse(text)
    with pytest.raises(RewriteError, match=message):
        group_experts(c)
    assert not has_expert_part(c)


def test_attention_is_refused():
    with pytest.raises(RewriteError, match="group_experts: expected exactly one topk"):
        group_experts(attention())


def test_counts_of_the_grouped_form():
    """Grouped GEMMs run T*K rows: tensor MACs T*K*(2F*D + D*F) whichever form it came from
    (the dense source runs every expert: E/K times as many); weights are read for the
    experts touched, at most the whole pool."""
    for T, E, K in [(64, 8, 2), (1, 8, 2)]:
        ext = dict(T=T, X=E, K=K, D=128, F=256, H=2)
        want = T * K * (2 * 256 * 128 + 128 * 256)
        for form in ("dense", "gather"):
            n = count(group_experts(moe(form=form)), ext)
            assert n.tensor_macs == want
            assert dict(n.bytes_in)["W13"] == min(E, T * K) * 2 * 256 * 128 * 2
            assert n.flops < want // 10  # the combine and the routing are not GEMM-sized
        assert count(moe(form="dense"), ext).tensor_macs == want * E // K


def test_pipeline_groups_experts_last():
    assert [s.name for s in default_steps(moe())] == ["defer_normalization", "group_experts"]
    assert [s.name for s in default_steps(LIBRARY["moe_router"]())][-1] == "group_experts"
    assert [s.name for s in default_steps(decoder_layer(moe=True))] == [
        "defer_normalization", "split_rank", "online_softmax", "group_experts"]
    assert "group_experts" not in [s.name for s in default_steps(gemm())]
    trace = lower(moe(form="gather"), default_steps(moe(form="gather")), check=True)
    assert trace[-1][0] == "group_experts" and "EID" in set(trace[-1][1].tensor_names())
    assert all(isinstance(s, (Einsum, Operator)) for s in trace[-1][1].stmts)


@pytest.mark.parametrize("target", ["moe_gather"])
def test_cli_lower_shows_and_checks_the_grouping(target, run_kascade):
    r = run_kascade("lower", target, "--print-after-all")
    assert r.returncode == 0, r.stderr
    assert "# ---- after group_experts ---- passes over" in r.stdout
    assert "GU[q, h, f] = sum[d](X[PAIR[q] // K, d] * W13[ROWEXP[q], h, f, d])" in r.stdout
    checked = r.stdout.split("reference evaluator")[1]
    assert "group_experts" in checked
