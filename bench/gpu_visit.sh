#!/usr/bin/env bash
# One whole visit to the GPU host in one call: install the carried wheels (see
# ../shared/device/fetch-wheels.sh) and kascade, run the GPU tests and the benchmarks, and
# leave JSON, logs and a short table under $OUT. Commit what comes back under
# bench/results/<date>-<gpu>/ together with provenance.json (written here).
#
#   bash bench/gpu_visit.sh [STAGE...]     stages: tests attention moe sweep tune (default: all, in that order)
#
# A device call is limited to 10 minutes: split a visit over two calls by naming stages.
set -uo pipefail
STAGES=${*:-tests attention moe sweep tune}
want() { [[ " $STAGES " == *" $1 "* ]]; }
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
want tests && python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 5
want attention && python3 bench/attention.py --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | tail -n 12
# MoE (kascade vs torch loop vs torch._grouped_mm; ~2-3 min): capped so the visit stays in its 10 minutes;
# moe.json is rewritten after every token count, so a capped run keeps what it measured
want moe && timeout 240 python3 bench/moe.py --out "$OUT" 2>&1 | tee "$OUT/moe.log" | tail -n 20
if want sweep; then
  python3 bench/tuner.py --sweep "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" | tail -n 8
  # fit the cost model's efficiency factors to the sweep; its rank correlation before and after
  kascade calibrate --target h200 --sweep "$OUT/sweep.json" --storage "sqlite:///$OUT/calibration.db" --json \
    > "$OUT/calibration.json" 2> "$OUT/calibration.log"; tail -n 5 "$OUT/calibration.log"
fi
if want tune; then
  # measured tuning of each family (records + trials land in $OUT/tuning.db; export them for shipping)
  db="sqlite:///$OUT/tuning.db"
  timeout 150 kascade tune attention --target h200 --causal --seq 4096 --trials 30 --storage "$db" 2>&1 | tail -n 3
  timeout 120 kascade tune decode --target h200 --batch 32 --heads 32 --kv-heads 8 --seq 4096 --trials 30 \
    --storage "$db" 2>&1 | tail -n 3
  timeout 150 kascade tune moe --target h200 --tokens 16 --tokens 4096 --trials 25 --storage "$db" 2>&1 | tail -n 3
  kascade export "$OUT/tuned-h200.json" --target h200 --storage "$db" 2>&1 | tail -n 1
  kascade calibrate --target h200 --storage "$db" --json > "$OUT/calibration-tuned.json" 2>/dev/null
fi
