"""kascade's calls as torch operators: opcheck, torch.compile(fullgraph=True), and the same
numbers as the Python API."""

from __future__ import annotations

import pytest
import torch

import kascade


def qkv(gen, B=2, Hq=4, Hkv=2, Sq=9, Sk=13, D=16, Dv=8, dtype=torch.float32):
    return (torch.randn(B, Hq, Sq, D, generator=gen, dtype=dtype),
            torch.randn(B, Hkv, Sk, D, generator=gen, dtype=dtype),
            torch.randn(B, Hkv, Sk, Dv, generator=gen, dtype=dtype))


def test_the_operator_is_registered_on_import():
    assert hasattr(torch.ops.kascade, "attention")
    schema = str(torch.ops.kascade.attention.default._schema)
    assert "Tensor q, Tensor k, Tensor v" in schema and "float? scale=None" in schema


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(causal=True),
    dict(window_left=3, window_right=0, softcap=5.0, scale=0.3),
    dict(causal=True, backend="interpret"),
])
def test_opcheck(gen, kwargs):
    q, k, v = qkv(gen)
    torch.library.opcheck(torch.ops.kascade.attention.default, (q, k, v), kwargs)


def test_fullgraph_compile_has_no_graph_break(gen):
    q, k, v = qkv(gen)

    def layer(q, k, v):
        return kascade.attention(q * 2, k, v, causal=True, window=(4, -1), softcap=10.0).sum(-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))
    explanation = torch._dynamo.explain(layer)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_operator_and_api_agree_with_sdpa(gen):
    q, k, v = qkv(gen, Dv=16)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                                           v.double().repeat_interleave(2, 1), is_causal=False)
    via_op = kascade.attention(q, k, v)
    via_api = kascade.attention(q, k, v, out=torch.full_like(via_op, float("nan")))
    torch.testing.assert_close(via_op.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(via_api, via_op)


@pytest.mark.parametrize("kwargs, message", [
    (dict(causal="yes"), "causal must be True or False"),
    (dict(window=(1, 2, 3)), "window must be None or"),
    (dict(softcap="big"), "softcap must be None"),
    (dict(scale=float("nan")), "scale must be None"),
    (dict(backend="tpu"), "unknown backend"),
])
def test_bad_arguments_get_the_api_error_not_a_schema_error(gen, kwargs, message):
    q, k, v = qkv(gen)
    with pytest.raises(kascade.KascadeError, match=message):
        kascade.attention(q, k, v, **kwargs)
