#!/usr/bin/env bash
# flash-triton's GPU check in one device call: install, GPU tests, tuning sweep, benchmark.
# Each phase has its own time limit so a slow one cannot starve the others; logs and JSON go to $OUT,
# short summaries are printed last (a device call returns only the tail of the output).
#
#   OUT=/tmp/out TEST_S=110 TUNE_S=150 BENCH_S=125 bash packages/flash-triton/scripts/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
TEST_S=${TEST_S:-110}
TUNE_S=${TUNE_S:-150}
BENCH_S=${BENCH_S:-125}
TESTS=${TESTS:-"tests/backends/test_triton_gpu.py tests/test_conformance.py --backend=triton -m gpu"}
TUNE=${TUNE:-"--head-dims 128,64"}
BENCH=${BENCH:-"--backends triton --seqlens 8192 --head-dims 128 --memory-seqlens 4096"}
WORKERS=${WORKERS:-8}
T0=$(date +%s)
stamp() { echo "[$(($(date +%s) - T0))s] $*"; }

stamp "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)'
for pkg in packages/flash-core packages/flash-triton packages/flash-bench; do
  python3 -m pip install -q --no-deps --no-build-isolation -e "$pkg" >>"$OUT/install.log" 2>&1 || { echo "install of $pkg FAILED"; tail -5 "$OUT/install.log"; }
done
python3 -c 'import flash; [print(" ", b) for b in flash.backends()]'

stamp "tests (limit ${TEST_S}s): pytest $TESTS -n $WORKERS"
# shellcheck disable=SC2086
timeout "$TEST_S" python3 -m pytest $TESTS -n "$WORKERS" -q -rfEs --tb=short -p no:cacheprovider >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"

stamp "tune (limit ${TUNE_S}s): $TUNE"
# shellcheck disable=SC2086
timeout "$TUNE_S" python3 packages/flash-triton/scripts/tune.py $TUNE --out "$OUT/tune.json" >"$OUT/tune.log" 2>&1
echo "tune exit $?"

stamp "bench (limit ${BENCH_S}s): $BENCH"
# shellcheck disable=SC2086
timeout "$BENCH_S" python3 -m flash bench $BENCH --out "$OUT/bench.json" >"$OUT/bench.log" 2>&1
echo "bench exit $?"

stamp "summaries"
echo "---- pytest"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | cut -c1-400 | head -30
tail -3 "$OUT/pytest.log"
echo "---- tune"
grep -E "ERROR|FAILED" "$OUT/tune.log" | cut -c1-300 | head -10
sed -n '/^== /,$p' "$OUT/tune.log" | cut -c1-260
[ -s "$OUT/tune.log" ] && ! grep -q '^== ' "$OUT/tune.log" && tail -15 "$OUT/tune.log" | cut -c1-300
echo "---- bench"
sed -n '/^results:/,$p' "$OUT/bench.log"
grep -iE "error|failed" "$OUT/bench.log" | cut -c1-300 | head -8
stamp "done"
