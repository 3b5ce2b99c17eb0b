"""kascade.moe: numerics against an independent torch loop over experts on every CPU backend,
routing semantics, bad input, and the torch operator (opcheck, fullgraph compile)."""

from __future__ import annotations

import pytest
import torch

import kascade
from kascade.ir.errors import DeviceError, DTypeError, KascadeError, ShapeError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def weights(gen, E, D, F, dtype=torch.float32):
    x = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)   # noqa: E731
    return (x(E, 2 * F, D) * D ** -0.5).to(dtype), (x(E, D, F) * F ** -0.5).to(dtype)


def torch_loop(x, w1, w2, topk_weights, topk_ids):
    """The plain formulation: for each expert, its tokens through silu(gate) * up then down,
    weighted and added (float64)."""
    x, w1, w2 = x.double(), w1.double(), w2.double()
    F = w2.shape[2]
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w1[e].T
        act = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
        y.index_add_(0, tok, (act @ w2[e].T) * topk_weights.double()[tok, slot, None])
    return y


def softmax_topk(logits, k, renormalize=True):
    p = torch.softmax(logits.double(), -1)
    w, i = p.topk(k, -1)
    return (w / w.sum(-1, keepdim=True) if renormalize else w), i


CASES = [  # T, E, K, D, F
    (1, 8, 2, 40, 24),
    (3, 64, 8, 24, 56),
    (64, 8, 1, 40, 24),
    (17, 128, 2, 24, 24),
]


@pytest.mark.parametrize("T, E, K, D, F", CASES)
@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_router_logits_against_the_torch_loop(gen, T, E, K, D, F, backend):
    x = torch.randn(T, D, generator=gen)
    w1, w2 = weights(gen, E, D, F)
    logits = torch.randn(T, E, generator=gen) * 2
    out = torch.full((T, D), float("nan"))                     # poisoned
    y = kascade.moe(x, w1, w2, logits, top_k=K, backend=backend, out=out)
    tw, ti = softmax_topk(logits, K)
    assert y is out
    torch.testing.assert_close(y.double(), torch_loop(x, w1, w2, tw, ti), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_fp16_meets_the_flash_attn_bar_and_renormalisation_is_optional(gen, renormalize):
    T, E, K, D, F = 33, 8, 2, 40, 56
    x = torch.randn(T, D, generator=gen)
    w1, w2 = weights(gen, E, D, F)
    logits = torch.randn(T, E, generator=gen)
    tw, ti = softmax_topk(logits, K, renormalize)
    ref = torch_loop(x, w1, w2, tw, ti)
    low = torch_loop(x.half(), w1.half(), w2.half(), tw, ti).half().double()   # the same loop, rounded to fp16
    y = kascade.moe(x.half(), w1.half(), w2.half(), logits, top_k=K, renormalize=renormalize, backend="interpret")
    assert y.dtype == torch.float16
    assert (y.double() - ref).abs().max() <= 2 * (low - ref).abs().max() + 1e-3


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_given_routing_all_tokens_on_one_expert_and_idle_experts(gen, backend):
    T, E, K, D, F = 40, 64, 2, 24, 40
    x = torch.randn(T, D, generator=gen)
    w1, w2 = weights(gen, E, D, F)
    ids = torch.stack([torch.full((T,), 5), torch.randint(60, 64, (T,), generator=gen)], 1)   # 58 experts idle
    ids[:, 1] = torch.where(ids[:, 1] == 5, 6, ids[:, 1])
    tw = torch.rand(T, K, generator=gen)
    y = kascade.moe(x, w1, w2, topk_weights=tw, topk_ids=ids.int(), backend=backend)
    torch.testing.assert_close(y.double(), torch_loop(x, w1, w2, tw, ids), atol=2e-5, rtol=1e-5)


def test_minus_infinity_excludes_an_expert(gen):
    T, E, D, F = 4, 8, 24, 24
    x = torch.randn(T, D, generator=gen)
    w1, w2 = weights(gen, E, D, F)
    logits = torch.randn(T, E, generator=gen)
    logits[:, 0] = 50.0
    banned = logits.clone()
    banned[:, 0] = float("-inf")
    y = kascade.moe(x, w1, w2, banned, top_k=2, backend="interpret")
    tw, ti = softmax_topk(banned, 2)
    assert not (ti == 0).any()
    torch.testing.assert_close(y.double(), torch_loop(x, w1, w2, tw, ti), atol=2e-5, rtol=1e-5)


def test_debug_says_which_config_ran(gen, monkeypatch, capsys):
    monkeypatch.setenv("KASCADE_DEBUG", "1")
    w1, w2 = weights(gen, 8, 24, 24)
    kascade.moe(torch.randn(2, 24, generator=gen), w1, w2, torch.randn(2, 8, generator=gen), top_k=2,
                backend="interpret")
    err = capsys.readouterr().err
    assert "kascade.moe: backend=interpret T=2 E=8 K=2" in err and "BLOCK_M=" in err
    assert "cost model's #1" in err or "tuned" in err


def test_a_tuned_record_is_used(gen, monkeypatch, capsys):
    from kascade.api_moe import _config
    from kascade.autotune.choose import _database, device_target
    from kascade.autotune.db import TuningKey, TuningRecord
    from kascade.autotune.lookup import shape_bucket, software_versions, target_key
    from kascade.ir.dtypes import f32
    from kascade.passes.schedule import Config
    from kascade.passes.schedule_moe import swiglu_moe_schedule
    sched = swiglu_moe_schedule(f32)
    tuned = Config.of(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2, WEIGHT_IN_DOWN=0,
                      FUSED_COMBINE=0)
    assert sched.feasible(tuned, {"D": 24, "F": 40, "itemsize": 4}) is None
    key = TuningKey(sched.key(), shape_bucket(sched, dict(T=8, K=3, E=16, D=24, F=40)), "f32",
                    target_key(device_target(torch.device("cpu"))), software_versions())
    _database().put(TuningRecord(key, tuned.key(), 2e-5, source="moe sweep"))
    _config.cache_clear()
    monkeypatch.setenv("KASCADE_DEBUG", "1")
    w1, w2 = weights(gen, 16, 24, 40)
    x, logits = torch.randn(7, 24, generator=gen), torch.randn(7, 16, generator=gen)
    y = kascade.moe(x, w1, w2, logits, top_k=3, backend="interpret")
    assert f"config={tuned.key()} (tuned:" in capsys.readouterr().err
    tw, ti = softmax_topk(logits, 3)
    torch.testing.assert_close(y.double(), torch_loop(x, w1, w2, tw, ti), atol=2e-5, rtol=1e-5)


# ---- bad input ------------------------------------------------------------------------------
def bad_case(gen, **over):
    T, E, D, F = 3, 8, 16, 8
    args = dict(x=torch.randn(T, D, generator=gen), w1=torch.randn(E, 2 * F, D, generator=gen),
                w2=torch.randn(E, D, F, generator=gen), router_logits=torch.randn(T, E, generator=gen), top_k=2)
    args.update(over)
    return args


@pytest.mark.parametrize("over, error, message", [
    (dict(w1=torch.randn(8, 16, 15)), ShapeError, "hidden size D disagrees"),
    (dict(w2=torch.randn(8, 16, 9)), ShapeError, "must stack gate and up as \\(E, 2F, D\\)"),
    (dict(w2=torch.randn(7, 16, 8)), ShapeError, "w1 has 8 experts and w2 7"),
    (dict(router_logits=torch.randn(3, 9)), ShapeError, "router_logits must be a floating-point \\(T, E\\)"),
    (dict(top_k=9), KascadeError, "top_k must be an int from 1 to the number of experts E=8"),
    (dict(top_k=0), KascadeError, "top_k must be an int from 1"),
    (dict(x=torch.randn(3, 16).double()), DTypeError, "accepted: torch.float16, torch.bfloat16, torch.float32"),
    (dict(w1=torch.randn(8, 16, 16).half()), DTypeError, "must share one dtype"),
    (dict(w1=torch.randn(8, 16, 16, device="meta")), DeviceError, "must be on one device"),
    (dict(router_logits=torch.tensor([[0.0] * 8, [float("nan")] + [0.0] * 7, [0.0] * 8])), KascadeError,
     "router_logits row 1 has NaN or \\+inf"),
    (dict(router_logits=torch.full((3, 8), float("-inf"))), KascadeError, "fewer than top_k=2 finite"),
    (dict(activation="gelu"), KascadeError, "accepted: swiglu"),
    (dict(backend="cuda"), KascadeError, "unknown backend 'cuda' for moe; accepted: triton, interpret, reference"),
    (dict(backend="triton"), DeviceError, "backend='triton' runs CUDA tensors"),
    (dict(topk_ids=torch.zeros(3, 2, dtype=torch.int32), topk_weights=torch.ones(3, 2)), KascadeError,
     "either router_logits .* or topk_weights and topk_ids"),
])
def test_bad_input_says_what_is_accepted(gen, over, error, message):
    with pytest.raises(error, match=message):
        kascade.moe(**bad_case(gen, **over))


@pytest.mark.parametrize("ids, error, message", [
    ([[0, 1], [2, 2], [3, 4]], ShapeError, "topk_ids row 1 names expert \\[2, 2\\] more than once"),
    ([[0, 1], [2, 8], [3, 4]], ShapeError, "must lie in \\[0, 8\\)"),
    ([[0, 1], [-1, 2], [3, 4]], ShapeError, "must lie in \\[0, 8\\)"),
    ([[0.0, 1.0], [2.0, 3.0], [3.0, 4.0]], DTypeError, "topk_ids must be torch.int32 or torch.int64"),
])
def test_bad_routing_is_refused(gen, ids, error, message):
    args = bad_case(gen, router_logits=None, top_k=None)
    with pytest.raises(error, match=message):
        kascade.moe(**args, topk_ids=torch.tensor(ids), topk_weights=torch.ones(3, 2))


# ---- the torch operator ------------------------------------------------------------------------
def test_opcheck_and_fullgraph_compile(gen):
    T, E, D, F = 5, 8, 16, 8
    x = torch.randn(T, D, generator=gen)
    w1, w2 = weights(gen, E, D, F)
    logits = torch.randn(T, E, generator=gen)
    assert "Tensor? router_logits" in str(torch.ops.kascade.moe.default._schema)
    torch.library.opcheck(torch.ops.kascade.moe.default, (x, w1, w2, logits), dict(top_k=2))
    tw, ti = softmax_topk(logits, 2)
    torch.library.opcheck(torch.ops.kascade.moe.default, (x, w1, w2),
                          dict(topk_weights=tw.float(), topk_ids=ti.int(), backend="interpret"))

    def block(x, logits):
        return kascade.moe(x * 2, w1, w2, logits, top_k=2) + x

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, logits), block(x, logits))
    explanation = torch._dynamo.explain(block)(x, logits)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_the_reference_refuses_a_shape_that_would_gather_gigabytes():
    x = torch.randn(64, 4096, dtype=torch.bfloat16)
    w1 = torch.empty(8, 2 * 14336, 4096, dtype=torch.bfloat16)     # Mixtral's experts: 1.9 GB, never read
    w2 = torch.empty(8, 4096, 14336, dtype=torch.bfloat16)
    with pytest.raises(ShapeError, match="backend='reference' gathers every chosen expert's weights"):
        kascade.moe(x, w1, w2, torch.randn(64, 8), top_k=2)
