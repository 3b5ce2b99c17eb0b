"""Workloads: seeded arrivals and length distributions, trace files (JSONL, CSV, BurstGPT), SLOs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kascade.backends.workload import (
    SLO,
    LengthDist,
    Request,
    gamma_workload,
    length_dist,
    load_trace,
    poisson_workload,
)
from kascade.ir.errors import KascadeError


def test_poisson_is_deterministic_with_the_right_rate():
    a = poisson_workload(5.0, 20000, "uniform:10-100", "lognormal:200,150", seed=7)
    assert a == poisson_workload(5.0, 20000, "uniform:10-100", "lognormal:200,150", seed=7)
    assert a != poisson_workload(5.0, 20000, "uniform:10-100", "lognormal:200,150", seed=8)
    gaps = np.diff([0.0] + [r.arrival for r in a])
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)        # exponential: cv 1
    prompts = np.array([r.prompt_tokens for r in a])
    outputs = np.array([r.output_tokens for r in a])
    assert prompts.min() >= 10 and prompts.max() <= 100 and prompts.mean() == pytest.approx(55, rel=0.03)
    assert outputs.min() >= 1 and outputs.mean() == pytest.approx(200, rel=0.03)
    assert outputs.std() == pytest.approx(150, rel=0.1)
    assert [r.id for r in a[:3]] == [0, 1, 2] and all(x.arrival < y.arrival for x, y in zip(a, a[1:]))


def test_gamma_is_bursty_at_the_same_mean_rate():
    g = gamma_workload(2.0, 3.0, 20000, 128, 64, seed=1)
    assert g == gamma_workload(2.0, 3.0, 20000, 128, 64, seed=1)
    gaps = np.diff([0.0] + [r.arrival for r in g])
    assert gaps.mean() == pytest.approx(0.5, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)
    assert {r.prompt_tokens for r in g} == {128} and {r.output_tokens for r in g} == {64}


def test_length_specs():
    assert length_dist(32) == LengthDist("fixed", 32)
    assert length_dist("fixed:32") == length_dist("32")
    assert length_dist("uniform:8,16") == LengthDist("uniform", 8, 16)
    assert length_dist("lognormal:512,256").mean == 512
    for bad in ("uniform:16-8", "normal:3,4", "lognormal:5", "fixed:0", "abc", 2.5):
        with pytest.raises(KascadeError, match="length"):
            length_dist(bad)
    for rate in (0, -1, float("nan")):
        with pytest.raises(KascadeError, match="rate"):
            poisson_workload(rate, 10, 1, 1)
    with pytest.raises(KascadeError, match="variation"):
        gamma_workload(1.0, 0.0, 10, 1, 1)


def test_jsonl_trace(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [{"arrival": 2.5, "prompt_tokens": 10, "output_tokens": 3, "user": "x"},
            {"arrival_time": 1.5, "input_tokens": 20, "completion_tokens": 4}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_trace(p) == [Request(0, 0.0, 20, 4), Request(1, 1.0, 10, 3)]


def test_burstgpt_csv(tmp_path):
    """BurstGPT's columns load as they are; other columns are ignored; times are shifted to start at 0."""
    p = tmp_path / "BurstGPT_1.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,472,18,490,Conversation log\n"
                 "45,ChatGPT,1087,223,1310,Conversation log\n"
                 "118,GPT-4,417,276,693,API log\n")
    reqs = load_trace(p)
    assert [(r.arrival, r.prompt_tokens, r.output_tokens) for r in reqs] == [(0, 472, 18), (40, 1087, 223),
                                                                             (113, 417, 276)]


def test_malformed_rows_are_reported_with_their_line(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("arrival,prompt_tokens,output_tokens\n"
                 "0.1,10,5\n"
                 "0.2,ten,5\n"
                 "0.3,10,5\n"
                 "-1,10,5\n"
                 "0.5,10,0\n"
                 "0.6,10\n")
    with pytest.raises(KascadeError) as err:
        load_trace(p)
    msg = str(err.value)
    assert "4 malformed" in msg, msg
    for line, what in ((3, "'ten' is not a number"), (5, "negative"), (6, "output tokens must be an integer >= 1"),
                       (7, "no output tokens")):
        assert f"line {line}: " in msg and what in msg, msg
    assert "line 2" not in msg and "line 4" not in msg
    j = tmp_path / "t.jsonl"
    j.write_text('{"arrival": 0, "prompt_tokens": 3, "output_tokens": 1}\n[1, 2]\n')
    with pytest.raises(KascadeError, match="line 2 must be a JSON object"):
        load_trace(j)
    j.write_text('{"arrival": 0, "prompt_tokens": 3, "output_tokens": 1}\n{"arrival": 1\n')
    with pytest.raises(KascadeError, match="line 2 is not JSON"):
        load_trace(j)
    c = tmp_path / "nohead.csv"
    c.write_text("when,prompt_tokens,output_tokens\n1,2,3\n")
    with pytest.raises(KascadeError, match="no arrival time column"):
        load_trace(c)


def test_slo_validation():
    assert SLO(0.5, 0.05).percentile == 0.99
    assert SLO(0.5, 0.05).met(0.4, 0.05) and not SLO(0.5, 0.05).met(0.6, 0.01)
    for bad in ((0, 0.05), (0.5, -1), (float("inf"), 0.05)):
        with pytest.raises(KascadeError, match="positive"):
            SLO(*bad)
    with pytest.raises(KascadeError, match="write 0.99 for p99"):
        SLO(0.5, 0.05, 99)
    with pytest.raises(KascadeError, match=r"\(0, 1\]"):
        SLO(0.5, 0.05, 0)
