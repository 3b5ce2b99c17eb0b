"""Measuring in isolated worker processes: crashes, hangs and errors are failed trials, never the end
of a study; on a GPU, the generated kernel is checked and timed."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from functools import partial

import optuna
import pytest

from kascade.autotune.measure import IsolatedWorker, MeasureError, ModelMeasurer, ProcessMeasurer, Timing, paired
from kascade.autotune.search import tune
from kascade.backends.model import rank_configs
from kascade.backends.targets import get_target
from kascade.ir.library import attention
from kascade.passes.schedule import attention_prefill_schedule

SCHED = attention_prefill_schedule(attention("2pass", causal=True))
EXT = dict(B=2, G=8, R=4, P=2048, M=2048, E=128, F=128)
H200 = get_target("h200")


def test_a_worker_survives_crashes_hangs_and_errors_with_a_fresh_process():
    w = IsolatedWorker()
    try:
        first = w.call(os.getpid, timeout=30)
        assert first != os.getpid()
        with pytest.raises(MeasureError, match="SIGSEGV") as e:
            w.call(signal.raise_signal, signal.SIGSEGV, timeout=30)
        assert e.value.kind == "crash"
        second = w.call(os.getpid, timeout=30)
        assert second != first
        with pytest.raises(MeasureError, match="no answer in 0.5 s") as e:
            w.call(time.sleep, 60, timeout=0.5)
        assert e.value.kind == "timeout"
        with pytest.raises(MeasureError, match="exit code 3"):
            w.call(os._exit, 3, timeout=30)
        with pytest.raises(MeasureError, match="ValueError: math domain error") as e:
            w.call(__import__("math").sqrt, -1, timeout=30)
        assert e.value.kind == "error"
        third = w.call(os.getpid, timeout=30)
        assert third not in (first, second) and w.starts == 4
        with pytest.raises(MeasureError, match="illegal memory access") as e:   # the CUDA context is gone
            w.call(exec, "raise RuntimeError('CUDA error: an illegal memory access was encountered')", timeout=30)
        assert e.value.kind == "crash" and w.call(os.getpid, timeout=30) != third and w.starts == 5
    finally:
        w.close()


def test_timing_keeps_quantiles_and_rejects_nonsense():
    t = Timing.of([3e-6, 1e-6, 2e-6, 4e-6, 5e-6])
    assert t.median == 3e-6 and t.quantiles["0.2"] == pytest.approx(1.8e-6) and t.samples == 5
    with pytest.raises(MeasureError):
        Timing.of([1e-6, float("nan")])


def test_paired_retiming_interleaves_every_round():
    calls = []
    out = paired(lambda k, phase: calls.append(k) or [1.0], ["a", "b", "c"], rounds=4)
    assert out == {"a": [1.0] * 4, "b": [1.0] * 4, "c": [1.0] * 4}
    assert all(sorted(calls[i:i + 3]) == ["a", "b", "c"] for i in range(0, 12, 3))


def test_the_model_measurer_is_the_cost_model():
    ranked = rank_configs(SCHED, EXT, H200)
    m = ModelMeasurer(SCHED, EXT, H200, "bf16")
    assert [m.measure(c).median for _, c in ranked[:5]] == [p.seconds for p, _ in ranked[:5]]
    assert not m.measured


FAKE = """
import os, signal, time

def run(crash, hang, key, phase):
    '''Simulated kernels: a config in ``crash`` segfaults its process, one in ``hang`` never returns.'''
    if key in crash:
        os.kill(os.getpid(), signal.SIGSEGV)
    if key in hang:
        time.sleep(3600)
    cfg = dict(kv.split("=") for kv in key.split(","))
    m, n, w = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"]), int(cfg["num_warps"])
    t = 1e-4 * (1 + abs(m - 64) / 64 + abs(n - 32) / 64 + 0.01 * w)
    return [t * (1 + 0.001 * i) for i in range(5)]
"""


def test_a_study_goes_on_past_segfaulting_and_hanging_configs(tmp_path, monkeypatch):
    (tmp_path / "fake_kernels.py").write_text(textwrap.dedent(FAKE))
    monkeypatch.syspath_prepend(str(tmp_path))   # spawned workers inherit sys.path
    import fake_kernels
    top = [c.key() for _, c in rank_configs(SCHED, EXT, H200)]
    crash, hang = {top[0]}, {top[1]}   # the warm start tries them first

    def factory(schedule, ext, worker):
        return ProcessMeasurer(partial(fake_kernels.run, crash, hang), probe_timeout=2.0, timeout=2.0)

    url = f"sqlite:///{tmp_path / 'crash.db'}"
    r = tune(SCHED, [EXT], "h200", backend=factory, trials=6, storage_url=url, warm_start=4).best
    kinds = {h.config: h.error.split(":")[0] for h in r.history if h.state == "failed"}
    assert kinds == {top[0]: "crash", top[1]: "timeout"}
    assert r.trials == 6 and r.failures == 2 and r.config is not None and r.config.key() not in crash | hang
    assert r.key.measured and r.retimed and r.stored
    study = optuna.load_study(study_name=r.study, storage=url)
    failed = [t for t in study.trials if t.state.name == "FAIL" and "duplicate" not in t.user_attrs]
    assert sorted(t.user_attrs["error_kind"] for t in failed) == ["crash", "timeout"]
    assert "SIGSEGV" in next(t.user_attrs["error"] for t in failed if t.user_attrs["error_kind"] == "crash")


@pytest.mark.gpu
def test_gpu_tuning_checks_and_times_the_generated_kernel(tmp_path):
    """On a GPU: a short measured study; every completed config passed the numerics check first."""
    ext = dict(B=1, G=4, R=2, P=1024, M=1024, E=128, F=128)
    url = f"sqlite:///{tmp_path / 'gpu.db'}"
    r = tune(SCHED, [ext], "h200", backend="gpu", trials=6, storage_url=url, warm_start=4).best
    assert r.key.measured and r.config is not None and 1e-7 < r.seconds < 1e-1
    assert set(r.quantiles) == {"0.2", "0.5", "0.8"} and r.quantiles["0.2"] <= r.seconds <= r.quantiles["0.8"]
    assert r.retimed and r.stored


@pytest.mark.gpu
def test_gpu_measurement_of_one_config():
    from kascade.autotune.measure import gpu_measurer
    m = gpu_measurer(SCHED, dict(B=1, G=2, R=2, P=512, M=512, E=64, F=64))
    try:
        cfg = rank_configs(SCHED, dict(B=1, G=2, R=2, P=512, M=512, E=64, F=64), H200)[0][1]
        t = m.measure(cfg)
        assert t.samples > 10 and 0 < t.median < 1e-2
        again = m.retime([cfg])
        assert cfg.key() in again
    finally:
        m.close()


def test_the_numerics_check_runs_the_generated_kernel_against_the_reference():
    """What a GPU worker does before timing, here under Triton's CPU interpreter (fp16)."""
    from kascade.autotune.measure import PrefillJob, WrongResult, _PrefillState, check_config
    from kascade.ir.dtypes import f16
    sched = attention_prefill_schedule(attention("2pass", causal=True, dtype=f16))
    job = PrefillJob(sched, tuple(sorted(dict(B=1, G=2, R=2, P=300, M=500, E=40, F=40).items())))
    key = "BLOCK_M=32,BLOCK_N=32,num_stages=1,num_warps=4"
    assert check_config(job, key, interpret=True) < 5e-3
    st = _PrefillState(job, interpret=True)
    assert st.check_ext["P"] == 97 and st.check_ext["M"] == 131   # a small awkward shape, same head dims
    st.ref = st.ref + 0.1
    with pytest.raises(WrongResult, match="max |out - reference|"):
        st.check(st.source(key))


def test_decode_and_moe_jobs_check_configs_against_independent_references():
    """The GPU measurers' numerics checks, run under the interpreter: a correct config passes; a
    reference that disagrees (as a wrong kernel would) is a WrongResult, never a timing."""
    from kascade.autotune.measure import WrongResult
    from kascade.autotune.measure_decode import DecodeJob, DecodeState
    from kascade.autotune.measure_moe import MoeJob, MoeState
    from kascade.ir.dtypes import f16
    from kascade.ir.library import paged_decode
    from kascade.passes.schedule import Config
    from kascade.passes.schedule_decode import paged_decode_schedule
    from kascade.passes.schedule_moe import choose_moe_config, swiglu_moe_schedule
    dec = DecodeState(DecodeJob(paged_decode_schedule(paged_decode(dtype=f16)),
                                tuple(sorted(dict(B=4, G=2, R=3, E=40, F=40, M0=5, L=500).items()))), interpret=True)
    cfg = Config.of(BLOCK_N=16, num_warps=2, num_stages=2, num_splits=3)
    assert dec.check(cfg) < 5e-3
    moe_sched = swiglu_moe_schedule(f16)
    ext = dict(T=100, K=2, E=8, D=40, F=24)
    moe = MoeState(MoeJob(moe_sched, tuple(sorted(ext.items()))), interpret=True)
    key = choose_moe_config(moe_sched, ext)[0].key()
    assert moe.check(key) < 5e-3
    dec.ref = dec.ref + 0.5
    moe.ref = moe.ref * 1.5
    with pytest.raises(WrongResult, match="max \\|out - reference\\|"):
        dec.check(cfg)
    with pytest.raises(WrongResult, match="max \\|out - reference\\|"):
        moe.check(key)
