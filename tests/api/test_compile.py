"""kascade.compile: cascade text -> a kernel, checked against the evaluator; a new score
variant written only as IR gets a kernel without a new template."""

from __future__ import annotations

import pytest
import torch

import kascade
from kascade.backends.reference import evaluate
from kascade.ir import parse
from kascade.passes.schedule import ScheduleError

# Attention with a per-head additive bias table and a soft-cap, in a made-up layout: no
# template was written for this variant; the score expression is emitted from the IR.
BIASED = """
param scale: f32
input Q[b, h, p, e]: f16
input K[b, h, m, e]: f16
input V[b, h, m, f]: f16
input HB[h]: f32
S[b, h, m, p] = where(m <= p + M - P, 8 * tanh((sum[e](Q[b, h, p, e] * K[b, h, m, e]) * scale + HB[h]) / 8), -inf)
GM[b, h, p] = max[m](S[b, h, m, p])
SN[b, h, m, p] = exp(S[b, h, m, p] - GM[b, h, p])
SD[b, h, p] = sum[m](SN[b, h, m, p])
AV[b, h, p, f] = sum[m](SN[b, h, m, p] * V[b, h, m, f])
output O[b, h, p, f]: f16 = where(SD[b, h, p] > 0, AV[b, h, p, f] / SD[b, h, p], 0)
"""


def inputs(gen, dtype=torch.float32):
    return dict(Q=torch.randn(2, 3, 19, 24, generator=gen).to(dtype),
                K=torch.randn(2, 3, 33, 24, generator=gen).to(dtype),
                V=torch.randn(2, 3, 33, 40, generator=gen).to(dtype),
                HB=torch.randn(3, generator=gen), scale=0.2)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 3e-3)])
def test_compiled_text_cascade_matches_the_evaluator(gen, dtype, tol):
    text = BIASED.replace("f16", "f32") if dtype == torch.float32 else BIASED
    kern = kascade.compile(text, target="h200")
    args = inputs(gen, dtype)
    got = kern(backend="interpret", **args)["O"]
    ref = evaluate(parse(text), {k: v for k, v in args.items() if k != "scale"}, {"scale": 0.2})["O"]
    assert not torch.isnan(got).any()
    assert (got.double() - ref).abs().max().item() < tol * max(1.0, ref.abs().max().item())


def test_the_emitted_source_carries_the_score_expression():
    src = kascade.compile(BIASED).source({"E": 24, "F": 40})
    assert "HB" in src.text and "scale" in src.text
    assert src.name.startswith("attn_fwd")


def test_ahead_of_time_compile_for_the_target():
    k = kascade.compile(BIASED, target="h200").ptx({"E": 24, "F": 40})
    assert k.ok and k.fits and k.ptx and k.cubin and k.registers > 0


def test_a_cascade_no_schedule_matches_says_why():
    with pytest.raises(ScheduleError, match="softmax"):
        kascade.compile("input A[m, k]: f16\ninput B[n, k]: f16\noutput C[m, n]: f16 = sum[k](A[m, k] * B[n, k])\n")


def test_the_kernel_takes_the_declared_dtypes(gen):
    with pytest.raises(kascade.KascadeError, match="declared f16 but given torch.float32"):
        kascade.compile(BIASED)(backend="interpret", **inputs(gen, torch.float32))


def test_inputs_by_name_are_checked(gen):
    kern = kascade.compile(BIASED)
    args = inputs(gen)
    del args["HB"]
    with pytest.raises(kascade.KascadeError, match=r"missing \['HB'\]"):
        kern(**args, extra=1)
