"""bench/moe.py: the CPU dry run runs end to end, the grouped-mm baseline is right with and without
padded groups, and a baseline that fails or is wrong becomes a row, never a crash or a timing."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_moe", ROOT / "bench" / "moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_checks_every_implementation_and_times_nothing(bench, tmp_path):
    assert bench.main(["--dry-run", "--out", str(tmp_path), "--tokens", "1,37"]) == 0
    doc = json.loads((tmp_path / "moe-dry-run.json").read_text())
    assert doc["kascade_moe_bench"] == bench.SCHEMA and doc["mode"] == "cpu-dry-run"
    assert {"torch", "triton", "date", "command"} <= set(doc["provenance"])
    assert len(doc["rows"]) == len(bench.DRY_SHAPES) * 2 * len(bench.IMPLS)
    for row in doc["rows"]:
        assert row["mode"] == "cpu-dry-run" and "ms" not in row and row["targets"] is None
        if hasattr(torch, "_grouped_mm") or row["impl"] != "grouped-mm":
            assert row["check"] == "ok" and row["max_err"] <= row["err_bar"], row
    assert {r["impl"] for r in doc["rows"]} == {"kascade", "torch-loop", "grouped-mm"}
    assert "cpu-dry-run" in (tmp_path / "moe-dry-run.md").read_text()


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_grouped_mm_pipeline_matches_the_loop(bench, align, dtype):
    gen = torch.Generator().manual_seed(7)
    T, E, K, D, F = 29, 12, 3, 32, 40      # experts left empty, uneven groups
    x = torch.randn(T, D, generator=gen).to(dtype)
    w1 = (torch.randn(E, 2 * F, D, generator=gen) / math.sqrt(D)).to(dtype)
    w2 = (torch.randn(E, D, F, generator=gen) / math.sqrt(F)).to(dtype)
    tw, ti = bench.torch_routing(torch.randn(T, E, generator=gen), K)
    ref = bench.torch_loop(x, w1, w2, tw, ti, compute=torch.float64)
    out = bench.grouped_mm_pipeline(x, w1, w2, tw, ti, align=align)
    low = bench.torch_loop(x, w1, w2, tw, ti)
    assert out.dtype == dtype and out.shape == (T, D)
    assert bench.max_error(out, ref) <= 2 * bench.max_error(low, ref) + 1e-5


def test_a_failing_or_wrong_candidate_is_recorded_and_the_next_one_used(bench):
    ref = torch.randn(4, 8)
    ctx = {"dtype": torch.float32, "device": "cpu", "gpu": False, "rep_ms": 1}

    def boom(out=None):
        raise RuntimeError("grouped gemm: offsets must be aligned\nmore detail")
    row = bench.measure([(boom, {"group_align": 1}), (lambda out=None: ref + 1, {"group_align": 16})],
                        ref, 1e-3, (4, 8), ctx)
    assert row["check"] == "wrong" and "unavailable: RuntimeError: grouped gemm" in row["error"]
    assert "wrong result" in row["error"] and "more detail" not in row["error"]
    row = bench.measure([(boom, {"group_align": 1}), (lambda out=None: ref.clone(), {"group_align": 16})],
                        ref, 1e-3, (4, 8), ctx)
    assert row["check"] == "ok" and row["group_align"] == 16 and len(row["rejected"]) == 1 and "ms" not in row
    # a kernel that leaves its (NaN-poisoned) output unwritten fails the check
    row = bench.measure([(lambda out=None: out, {})], ref, 1e-3, (4, 8), ctx)
    assert row["check"] == "wrong"


def test_timed_rows_get_ratios_bandwidth_and_targets(bench):
    base = {"flops": 2 * 4096 * 2 * 3 * 4096 * 14336, "weight_bytes": 8 * 3 * 4096 * 14336 * 2}
    gmm, loop = {**base, "ms": 30.0}, {**base, "ms": 60.0}
    row = {**base, "ms": 20.0}
    bench.derive(row, gmm, loop, copy_bw=4.3e12)
    assert row["speedup_vs_grouped_mm"] == pytest.approx(1.5) and row["speedup_vs_torch_loop"] == pytest.approx(3.0)
    assert row["tflops"] == pytest.approx(base["flops"] / 0.02 / 1e12)
    assert row["copy_fraction"] == pytest.approx(base["weight_bytes"] / 0.02 / 4.3e12)
    met = bench.targets("kascade", 4096, row, gpu=True)
    assert met == {">=1.2x grouped-mm": True, ">550 TFLOP/s": row["tflops"] > 550}
    small = {**base, "ms": 0.2}
    bench.derive(small, {}, loop, copy_bw=4.3e12)
    assert small["speedup_vs_grouped_mm"] is None
    assert list(bench.targets("kascade", 16, small, gpu=True)) == [">=75% copy bw"]
    assert bench.targets("grouped-mm", 16, small, gpu=True) is None
    assert bench.targets("kascade", 256, small, gpu=True) is None
    doc = {"mode": "gpu", "copy_bandwidth": 4.3e12, "rows": [
        {"shape": "mixtral-8x7b", "T": 4096, "impl": "kascade", "routing": "excluded", "check": "ok",
         "max_err": 0.01, "targets": met, **row},
        {"shape": "mixtral-8x7b", "T": 4096, "impl": "grouped-mm", "routing": "excluded", "check": "error",
         "error": "unavailable: RuntimeError: x | y", "targets": None}],
        "provenance": {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "date": "d", "command": "c"}}
    md = bench.markdown(doc)
    assert "| mixtral-8x7b | 4096 | kascade | excluded | 20.0000 |" in md and "x / y" in md
    assert ">=1.2x grouped-mm: yes" in bench.markdown(doc) and "1.50" in bench.summary(doc)
