"""torch.ops.kascade.attention_varlen and .paged_decode_attention: opcheck, fullgraph compile,
and the same numbers as the Python API (reference backend on the CPU)."""

from __future__ import annotations

import pytest
import torch

import kascade


def varlen_args(gen, lens_q=(3, 1, 6), lens_k=(5, 4, 6), Hq=4, Hkv=2, D=16, Dv=8):
    cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cq[-1]), Hq, D, generator=gen)
    k = torch.randn(int(ck[-1]), Hkv, D, generator=gen)
    v = torch.randn(int(ck[-1]), Hkv, Dv, generator=gen)
    return q, k, v, cq, ck, max(lens_q), max(lens_k)


def decode_args(gen, paged_cache, lens=(1, 9, 30), block=4, Hq=4, Hkv=2, D=16, Dv=8):
    KC, VC, BT, SL, _, _ = paged_cache(list(lens), block, Hkv, D, Dv, gen, dtype=torch.float32)
    return torch.randn(len(lens), Hq, D, generator=gen), KC, VC, BT, SL


def test_operators_are_registered():
    assert hasattr(torch.ops.kascade, "attention_varlen") and hasattr(torch.ops.kascade, "paged_decode_attention")


@pytest.mark.parametrize("kwargs", [dict(), dict(causal=True, window_left=2, window_right=0, softcap=4.0)])
def test_opcheck_varlen(gen, kwargs):
    torch.library.opcheck(torch.ops.kascade.attention_varlen.default, varlen_args(gen), kwargs)


@pytest.mark.parametrize("kwargs", [dict(), dict(softcap=4.0, scale=0.2, num_splits=3)])
def test_opcheck_paged_decode(gen, paged_cache, kwargs):
    torch.library.opcheck(torch.ops.kascade.paged_decode_attention.default, decode_args(gen, paged_cache), kwargs)


def test_fullgraph_compile_of_both(gen, paged_cache):
    va, da = varlen_args(gen), decode_args(gen, paged_cache)

    def step(va, da):
        return kascade.attention_varlen(*va, causal=True).sum() + kascade.paged_decode_attention(*da).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(va, da), step(va, da))


def test_operators_agree_with_the_api(gen, paged_cache):
    from kascade import api
    va, da = varlen_args(gen), decode_args(gen, paged_cache)
    torch.testing.assert_close(kascade.attention_varlen(*va, causal=True), api.attention_varlen(*va, causal=True))
    torch.testing.assert_close(kascade.paged_decode_attention(*da), api.paged_decode_attention(*da))


def test_bad_arguments_get_the_api_error(gen, paged_cache):
    with pytest.raises(kascade.KascadeError):
        kascade.paged_decode_attention(*decode_args(gen, paged_cache), num_splits="many")
    with pytest.raises(kascade.KascadeError):
        kascade.attention_varlen(*varlen_args(gen), window=(1, 2, 3))
