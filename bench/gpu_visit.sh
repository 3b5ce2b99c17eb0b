#!/usr/bin/env bash
# One whole visit to the GPU host in one call: install the carried wheels (see
# ../shared/device/fetch-wheels.sh) and kascade, run the GPU tests and the benchmarks, and
# leave JSON, logs and a short table under $OUT. Commit what comes back under
# bench/results/<date>-<gpu>/ together with provenance.json (written here).
set -uo pipefail
OUT=${OUT:-/tmp/kascade-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.csv"
python3 - > "$OUT/provenance.json" <<'PY'
import json, platform, subprocess, time, torch, triton
print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "triton": triton.__version__, "python": platform.python_version(),
                  "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip(),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": "bash bench/gpu_visit.sh"}, indent=1))
PY
python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 5
python3 bench/attention.py --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | tail -n 12
# MoE (kascade vs torch loop vs torch._grouped_mm; ~2-3 min): capped so the visit stays in its 10 minutes;
# moe.json is rewritten after every token count, so a capped run keeps what it measured
timeout 240 python3 bench/moe.py --out "$OUT" 2>&1 | tee "$OUT/moe.log" | tail -n 20
python3 bench/tuner.py --sweep "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" | tail -n 8
