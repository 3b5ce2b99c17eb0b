"""The pipeline's named steps, its dumps, and the `kascade lower` / `kascade analyze` commands."""

from __future__ import annotations

import pytest

from kascade.ir import CascadeError, parse
from kascade.ir.library import attention, gemm, paged_decode
from kascade.passes.pipeline import Step, default_steps, format_trace, lower, softmax_ranks


def test_default_steps_pick_prefill_or_decode():
    assert [s.name for s in default_steps(attention())] == ["defer_normalization", "split_rank", "online_softmax"]
    assert [s.name for s in default_steps(paged_decode())] == ["defer_normalization", "split_kv"]
    assert [s.name for s in default_steps(gemm())] == ["defer_normalization"]
    assert softmax_ranks(paged_decode()) == ("m1", "m0")


def test_dump_names_every_step_with_its_pass_counts():
    text = format_trace(lower(attention(), default_steps(attention())))
    for step, passes in [("input", "m: 3"), ("defer_normalization", "m: 2"), ("online_softmax", "m1: 1")]:
        assert f"# ---- after {step} ---- passes over" in text
        header = next(line for line in text.splitlines() if f"after {step} " in line)
        assert passes in header


def test_checker_runs_after_every_step():
    """A step that returns an ill-formed cascade is caught right after it, by name."""
    bad = Step("break_it", lambda c: c.with_stmts(c.stmts[1:]))
    with pytest.raises(CascadeError, match="undefined tensor 'QK'"):
        lower(attention(), (bad,), check=True)


def test_cli_lower_attention_print_after_all(run_kascade):
    r = run_kascade("lower", "attention", "--print-after-all")
    assert r.returncode == 0, r.stderr
    assert "# ---- after input ---- passes over e: 1, m: 3" in r.stdout
    assert "# ---- after online_softmax ---- passes over e: 1, m0: 2, m1: 1" in r.stdout
    assert "RGM[b, g, r, p, m1 + 1] = max(RGM[b, g, r, p, m1], LGM[b, g, r, p, m1])" in r.stdout
    assert "online_softmax" in r.stdout.split("reference evaluator")[1]


def test_cli_lower_a_text_file(tmp_path, run_kascade):
    f = tmp_path / "softmax.kc"
    f.write_text("input S[m, p]: f32\nGM[p] = max[m](S[m, p])\nSN[m, p] = exp(S[m, p] - GM[p])\n"
                 "SD[p] = sum[m](SN[m, p])\noutput O[m, p]: f32 = SN[m, p] / SD[p]\n")
    parse(f.read_text())
    r = run_kascade("lower", str(f), "--pipeline", "none")
    assert r.returncode == 0, r.stderr
    assert "output O[m, p]: f32 = SN[m, p] / SD[p]" in r.stdout


def test_cli_analyze(run_kascade):
    r = run_kascade("analyze", "gemm", "-x", "M=64", "-x", "N=32", "-x", "K=16")
    assert r.returncode == 0, r.stderr
    assert f"{2 * 64 * 32 * 16:,}" in r.stdout


@pytest.mark.parametrize("args, message", [
    (("lower", "no_such_thing"), "neither a library cascade nor a file"),
    (("analyze", "gemm", "-x", "M=abc"), "NAME=INT"),
    (("lower", "attention", "--pipeline", "fast"), "unknown pipeline"),
])
def test_cli_bad_input_is_a_clear_error(args, message, run_kascade):
    r = run_kascade(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_cli_reports_a_syntax_error_with_its_position(tmp_path, run_kascade):
    f = tmp_path / "bad.kc"
    f.write_text("input X[i]: f32\noutput Y[i]: f32 = X[i] +\n")
    r = run_kascade("lower", str(f))
    assert r.returncode == 2 and "line 2, column" in r.stderr
