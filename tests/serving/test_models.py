"""Model specs: config.json loading, presets' sizes, the serving-step cascade against a torch loop."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from kascade.backends.reference import evaluate
from kascade.ir.errors import KascadeError
from kascade.ir.library.models import PRESETS, ModelSpec, load_model, serving_step_cascade
from kascade.passes.analysis import count

LLAMA_3_8B_CONFIG = {   # meta-llama/Meta-Llama-3-8B config.json (trimmed to what matters)
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "model_type": "llama",
}
QWEN3_MOE_CONFIG = {    # Qwen/Qwen3-30B-A3B config.json (trimmed)
    "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048, "intermediate_size": 6144, "head_dim": 128,
    "moe_intermediate_size": 768, "num_attention_heads": 32, "num_key_value_heads": 4, "num_hidden_layers": 48,
    "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "model_type": "qwen3_moe", "norm_topk_prob": True,
}


def _write(tmp_path, cfg: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_config_json_gives_the_preset(tmp_path):
    """A config.json with HF field names loads to the same numbers as the preset."""
    spec = load_model(str(_write(tmp_path, LLAMA_3_8B_CONFIG)))
    preset = PRESETS["llama-3-8b"]
    for f in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "experts", "dtype_bytes"):
        assert getattr(spec, f) == getattr(preset, f), f
    assert spec.head_dim == 128   # hidden / heads, as the config gives none


def test_moe_config_and_directory(tmp_path):
    """Qwen3-MoE's field names (num_experts, moe_intermediate_size); a directory means its config.json."""
    _write(tmp_path, QWEN3_MOE_CONFIG)
    spec = load_model(tmp_path)
    assert (spec.experts, spec.experts_per_token, spec.moe_intermediate, spec.head_dim) == (128, 8, 768, 128)
    assert spec.param_count() == PRESETS["qwen3-30b-a3b"].param_count()


def test_mixtral_and_shared_expert_fields(tmp_path):
    """Mixtral's num_local_experts uses intermediate_size for its experts; Qwen2-MoE's one wide shared expert
    counts as expert-sized ones."""
    mixtral = dict(LLAMA_3_8B_CONFIG, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)
    spec = load_model(_write(tmp_path, mixtral))
    assert spec.param_count() == PRESETS["mixtral-8x7b"].param_count()
    qwen2 = dict(QWEN3_MOE_CONFIG, moe_intermediate_size=1408, shared_expert_intermediate_size=5632)
    assert load_model(_write(tmp_path, qwen2)).shared_experts == 4


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                   "intermediate_size"])
def test_missing_field_is_named(tmp_path, field):
    cfg = {k: v for k, v in LLAMA_3_8B_CONFIG.items() if k != field}
    path = _write(tmp_path, cfg)
    with pytest.raises(KascadeError, match=field) as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_bad_configs(tmp_path):
    moe = {k: v for k, v in QWEN3_MOE_CONFIG.items() if k != "num_experts_per_tok"}
    with pytest.raises(KascadeError, match="num_experts_per_tok"):
        load_model(_write(tmp_path, moe))
    with pytest.raises(KascadeError, match="num_attention_heads"):
        load_model(_write(tmp_path, dict(LLAMA_3_8B_CONFIG, num_attention_heads=-4)))
    with pytest.raises(KascadeError, match="torch_dtype"):
        load_model(_write(tmp_path, dict(LLAMA_3_8B_CONFIG, torch_dtype="complex64")))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(KascadeError, match="not a readable JSON"):
        load_model(tmp_path / "broken.json")
    with pytest.raises(KascadeError, match="llama-3-8b"):   # the message lists the presets
        load_model("gpt-17")


@pytest.mark.parametrize("name, total, active", [
    ("llama-3-8b", 8.03e9, 8.03e9), ("llama-3-70b", 70.6e9, 70.6e9),
    ("mixtral-8x7b", 46.7e9, 12.9e9), ("qwen3-30b-a3b", 30.5e9, 3.3e9)])
def test_presets_have_their_published_sizes(name, total, active):
    spec = load_model(name.upper())
    assert spec.param_count() == pytest.approx(total, rel=0.01)
    assert spec.param_count(active=True) == pytest.approx(active, rel=0.02)
    assert spec.weight_bytes() == 2 * spec.param_count()


def test_kv_bytes_and_flops():
    s = PRESETS["llama-3-8b"]
    assert s.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2          # 128 KiB per token
    # 2 FLOPs per active weight (no embedding lookup) plus QK^T and PV over the context
    assert s.flops_per_token(0) == pytest.approx(2 * (s.param_count() - s.vocab * s.hidden))
    assert s.flops_per_token(1000) - s.flops_per_token(0) == pytest.approx(4 * 32 * 32 * 128 * 1000)


# ---- the serving step ----------------------------------------------------------------------------
TINY = ModelSpec("tiny", hidden=24, layers=1, heads=4, kv_heads=2, head_dim=6, intermediate=20, vocab=50)
TINY_MOE = ModelSpec("tiny-moe", hidden=24, layers=1, heads=4, kv_heads=2, head_dim=6, intermediate=0, vocab=50,
                     experts=5, experts_per_token=2, moe_intermediate=10)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def _rms(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _reference_step(spec, w, inp, seqs, scale, eps):
    """The layer in plain torch, token by token: attention over the sequence's cached keys (read from
    the dense copies) and its new keys up to the token's position."""
    X, SQ, POS = inp["X"], inp["SQ"].long(), inp["POS"].long()
    xn = _rms(X, w["WN1"], eps)
    q = torch.einsum("td,gred->grte", xn, w["WQ"])
    k = torch.einsum("td,ged->gte", xn, w["WK"])
    v = torch.einsum("td,ged->gte", xn, w["WV"])
    q, k = _rope(q, inp["COS"], inp["SIN"]), _rope(k, inp["COS"], inp["SIN"])
    G, R, T, E = q.shape
    att = torch.empty(G, R, T, E, dtype=X.dtype)
    for t in range(T):
        s = int(SQ[t])
        Kc, Vc = seqs[s]                                 # (cached, G, E)
        new = [u for u in range(T) if SQ[u] == s and POS[u] <= POS[t]]
        keys = torch.cat([Kc.permute(1, 0, 2), k[:, new]], dim=1)     # (G, keys, E)
        vals = torch.cat([Vc.permute(1, 0, 2), v[:, new]], dim=1)
        p = torch.softmax(torch.einsum("gre,gme->grm", q[:, :, t], keys) * scale, dim=-1)
        att[:, :, t] = torch.einsum("grm,gme->gre", p, vals)
    ha = X + torch.einsum("grte,dgre->td", att, w["WO"])
    hn = _rms(ha, w["WN2"], eps)
    if not spec.is_moe:
        y = ha + (F.silu(hn @ w["WG"].T) * (hn @ w["WU"].T)) @ w["WD"].T
    else:
        probs = torch.softmax(hn @ w["WR"].T, dim=-1)
        tv, ti = probs.topk(spec.experts_per_token, dim=-1)
        tv = tv / tv.sum(-1, keepdim=True)
        y = ha.clone()
        for t in range(T):
            for j in range(spec.experts_per_token):
                x = int(ti[t, j])
                act = F.silu(w["W13"][x, 0] @ hn[t]) * (w["W13"][x, 1] @ hn[t])
                y[t] += tv[t, j] * (w["W2"][x] @ act)
    return y, k, v


@pytest.mark.parametrize("spec", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_serving_step_matches_torch(spec, gen, paged_cache):
    """Prefill chunks (with and without cached context) and decode tokens in one batch: the cascade under
    the float64 evaluator equals a token-by-token torch loop, new keys/values included."""
    chunks, contexts, block = [(3, 5), (2, 0)], [4, 1], 2
    step = serving_step_cascade(spec, chunks, contexts, block_size=block)
    cached = [c for _, c in chunks] + [c - 1 for c in contexts]
    news = [n for n, _ in chunks] + [1] * len(contexts)
    SQ = torch.tensor([s for s, n in enumerate(news) for _ in range(n)], dtype=torch.int32)
    POS = torch.tensor([cached[s] + i for s, n in enumerate(news) for i in range(n)], dtype=torch.int32)
    T, G, E, D = len(SQ), step.extents["G"], spec.head_dim, spec.hidden
    assert T == step.extents["T"] == 7
    KC, VC, BT, CL, Kd, Vd = paged_cache(cached, block, G, E, E, gen)
    ang = POS[:, None].double() * torch.rand(E // 2, generator=gen, dtype=torch.float64).repeat(2)[None]
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5  # noqa: E731
    R = step.extents["R"]
    w = {"WN1": 1 + rnd(D), "WN2": 1 + rnd(D), "WQ": rnd(G, R, E, D), "WK": rnd(G, E, D), "WV": rnd(G, E, D),
         "WO": rnd(D, G, R, E)}
    if spec.is_moe:
        Fm = spec.moe_intermediate
        w |= {"WR": rnd(spec.experts, D), "W13": rnd(spec.experts, 2, Fm, D), "W2": rnd(spec.experts, D, Fm)}
    else:
        w |= {"WG": rnd(spec.intermediate, D), "WU": rnd(spec.intermediate, D), "WD": rnd(D, spec.intermediate)}
    inp = {"X": torch.randn(T, D, generator=gen, dtype=torch.float64), "SQ": SQ, "POS": POS,
           "COS": torch.cos(ang), "SIN": torch.sin(ang), "KC": KC, "VC": VC, "BT": BT, "CL": CL}
    scale, eps = E ** -0.5, 1e-5
    extents = {"K": spec.experts_per_token} if spec.is_moe else {}
    out = evaluate(step.cascade, {**inp, **w}, {"scale": scale, "eps": eps}, extents)
    want_y, want_k, want_v = _reference_step(spec, w, inp, list(zip(Kd, Vd)), scale, eps)
    torch.testing.assert_close(out["Y"], want_y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["KNO"], want_k, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["VN"], want_v, rtol=1e-9, atol=1e-9)


def test_serving_step_sharded_extents_and_counts():
    """Under tp the step's extents are one GPU's shard (KV heads replicated past their count); its
    projection and FFN multiply-adds are what the iteration model charges for the same batch."""
    spec = PRESETS["llama-3-70b"]
    step = serving_step_cascade(spec, [(512, 1024)], [2000] * 8, tp=16)
    x = step.extents
    assert (x["G"], x["R"], x["F"], x["T"]) == (1, 4, 28672 // 16, 520)
    step = serving_step_cascade(PRESETS["llama-3-8b"], [(256, 0)], [100] * 4, tp=2)
    x = step.extents
    c = count(step.cascade, x)
    T, D, q, kv, Fi = x["T"], x["D"], x["G"] * x["R"] * x["E"], x["G"] * x["E"], x["F"]
    projections = T * D * (q + 2 * kv) + T * q * D + 3 * T * D * Fi
    attention = c.tensor_macs - projections
    assert 0 < attention < 0.2 * projections, (c.tensor_macs, projections)
    with pytest.raises(KascadeError, match="tp=3"):
        serving_step_cascade(spec, [(8, 0)], [], tp=3)
    with pytest.raises(KascadeError, match="at least one"):
        serving_step_cascade(spec, [], [])
