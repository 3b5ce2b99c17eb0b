"""Attention benchmark: kascade against every SDPA backend that runs here, same process, same GPU.

    python bench/attention.py --out results.json            # prefill + decode, bf16, head dim 128

Prefill: TFLOP/s counted the standard way (4 * B * H * Sq * Sk * D, halved for causal)
and the ratio to the best SDPA backend (flash, cuDNN, memory-efficient, whichever run).
Decode (paged, split-KV): achieved KV bandwidth (bytes of K and V read once) against the
copy bandwidth measured in the same run. Every kernel's output is checked against the
float32 torch reference before it is timed; a wrong kernel is reported, never timed.
Timing: warm-up, the L2 flushed between repetitions, the median of many repetitions
(``triton.testing.do_bench``), inputs that are fresh random data (never zeros).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

PREFILL = [  # (batch, heads, kv heads, seq, head dim, causal)
    (8, 16, 16, 1024, 128, False), (4, 16, 16, 4096, 128, False), (4, 16, 16, 4096, 128, True),
    (2, 16, 16, 8192, 128, True), (1, 16, 16, 16384, 128, True), (4, 32, 8, 4096, 128, True),
]
DECODE = [  # (batch, heads, kv heads, context, head dim, page size)
    (32, 32, 8, 4096, 128, 16), (64, 32, 8, 4096, 128, 16), (32, 32, 8, 16384, 128, 16), (128, 32, 8, 8192, 128, 16),
]


def bench(fn, rep_ms: int = 200) -> float:
    """Median milliseconds, L2 flushed between repetitions (do_bench clears a 256 MB buffer)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    src = torch.randn(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def check(out: torch.Tensor, ref: torch.Tensor, low: torch.Tensor) -> tuple[bool, float]:
    """flash-attn's rule: error at most twice that of the torch reference run in low precision."""
    err = (out.float() - ref).abs().max().item()
    bar = 2 * (low.float() - ref).abs().max().item() + 1e-3
    return err <= bar, err


def prefill_rows(dtype: torch.dtype) -> list[dict]:
    from torch.nn.attention import sdpa_kernel

    import kascade
    rows = []
    for B, H, Hkv, S, D, causal in PREFILL:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=gen)
        k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=gen)
        v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=gen)
        flops = 4 * B * H * S * S * D / (2 if causal else 1)
        kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        ref = F.scaled_dot_product_attention(q.float(), kr.float(), vr.float(), is_causal=causal) if S <= 4096 \
            else None
        row = {"shape": dict(B=B, H=H, Hkv=Hkv, S=S, D=D, causal=causal), "dtype": str(dtype)}
        for name, backend in sdpa_backends().items():
            try:
                with sdpa_kernel([backend]):
                    fn = partial(F.scaled_dot_product_attention, q, kr, vr, is_causal=causal)
                    low = fn()
                    row[name] = flops / (bench(fn) * 1e-3) / 1e12
            except RuntimeError as e:  # a backend that does not support this shape or GPU
                row[name] = None
                row[f"{name}_error"] = str(e).split("\n")[0][:200]
        fn = partial(kascade.attention, q, k, v, causal=causal)
        out = fn()
        if ref is not None:
            ok, err = check(out, ref, low)
            row["kascade_max_err"] = err
            if not ok:
                row["kascade"] = None
                row["kascade_error"] = f"wrong result: max error {err:.3g}"
                rows.append(row)
                continue
        row["kascade"] = flops / (bench(fn) * 1e-3) / 1e12
        best = max((row[n] for n in sdpa_backends() if row.get(n)), default=None)
        row["ratio_to_best_sdpa"] = row["kascade"] / best if best else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def decode_rows(dtype: torch.dtype, copy_bw: float) -> list[dict]:
    import kascade
    rows = []
    for B, H, Hkv, ctx, D, page in DECODE:
        gen = torch.Generator(device="cuda").manual_seed(0)
        blocks = B * ctx // page
        kc = torch.randn(blocks, page, Hkv, D, device="cuda", dtype=dtype, generator=gen)
        vc = torch.randn(blocks, page, Hkv, D, device="cuda", dtype=dtype, generator=gen)
        bt = torch.randperm(blocks, device="cuda", generator=gen).to(torch.int32).view(B, ctx // page)
        lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(B, H, D, device="cuda", dtype=dtype, generator=gen)
        kv_bytes = 2 * B * ctx * Hkv * D * kc.element_size()
        row = {"shape": dict(B=B, H=H, Hkv=Hkv, context=ctx, D=D, page=page), "dtype": str(dtype)}
        for backend in ("triton", "cuda"):
            try:
                fn = partial(kascade.paged_decode_attention, q, kc, vc, bt, lens, backend=backend)
                fn()
                ms = bench(fn)
                row[backend] = {"ms": ms, "kv_bandwidth": kv_bytes / (ms * 1e-3),
                                "fraction_of_copy": kv_bytes / (ms * 1e-3) / copy_bw}
            except Exception as e:  # noqa: BLE001 - a missing backend is a row, not a crash
                row[backend] = {"error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("attention.json"))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--only", choices=["prefill", "decode"], default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    result = {
        "provenance": {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                       "cuda": torch.version.cuda, "triton": __import__("triton").__version__,
                       "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "command": " ".join(sys.argv)},
        "copy_bandwidth": copy_bw,
        "prefill": prefill_rows(dtype) if args.only in (None, "prefill") else [],
        "decode": decode_rows(dtype, copy_bw) if args.only in (None, "decode") else [],
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    print(f"{'prefill shape':48} {'kascade':>8} {'best sdpa':>9} {'ratio':>6}")
    for r in result["prefill"]:
        best = max((r[n] for n in sdpa_backends() if r.get(n)), default=0)
        ratio = r.get("ratio_to_best_sdpa") or 0
        print(f"{json.dumps(r['shape']):48} {r['kascade'] or 0:8.1f} {best:9.1f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
