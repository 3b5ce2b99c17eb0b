"""`kascade compile --emit triton|ptx|cuda`: the generated code and its resources, without a GPU."""

from __future__ import annotations


def test_emit_triton_prints_the_generated_kernel(run_kascade):
    r = run_kascade("compile", "attention_causal", "-x", "E=128", "-x", "F=128")
    assert r.returncode == 0, r.stderr
    assert "def attn_fwd_causal_d128" in r.stdout and "m <= p + M - P" in r.stdout


def test_emit_ptx_reports_resources(run_kascade):
    r = run_kascade("compile", "attention_softcap", "--emit", "ptx", "--target", "a100", "-x", "E=64", "-x", "F=64")
    assert r.returncode == 0, r.stderr
    assert ".target sm_80" in r.stdout
    assert "registers/thread" in r.stderr and "fits: True" in r.stderr


def test_emit_cuda_compiles_the_paged_decode_family(run_kascade):
    r = run_kascade("compile", "paged_decode", "--emit", "cuda", "-x", "E=128", "-x", "F=128", "-x", "M0=16",
                    "-x", "R=4")
    assert r.returncode == 0, r.stderr
    assert 'extern "C" __global__' in r.stdout
    assert "spill stores 0" in r.stderr


def test_compile_errors_say_what_is_accepted(run_kascade):
    r = run_kascade("compile", "gemm")
    assert r.returncode == 2 and "max reductions found: none" in r.stderr
    r = run_kascade("compile", "attention", "--emit", "sass")
    assert r.returncode == 2 and "accepted: triton, ptx, cuda" in r.stderr
    r = run_kascade("compile", "attention", "--emit", "cuda")
    assert r.returncode == 2 and "paged decode" in r.stderr
