#!/usr/bin/env bash
# One GPU check in one device call: install the packages, run the GPU test tier, run the benchmark.
# Full logs go under $OUT (packed into $OUT/results.tgz at the end); the short summaries are printed last.
#
# Run from the repository root on the device machine (the `device` tool's `run`):
#   bash tests/gpu/device_check.sh
#   TESTS="tests -m gpu -k triton" BENCH="--sections attention --backends triton" bash tests/gpu/device_check.sh
#   TESTS=skip  BENCH=skip  EXTRA="compute-sanitizer ..." bash tests/gpu/device_check.sh
#
# Several benchmark runs: separate their arguments with ";" in BENCH; each writes $OUT/bench-N.json.
# Time limits (seconds; 0: none): TEST_LIMIT for the test tier, BENCH_LIMIT for each benchmark run
# or "N:" before a run's arguments for that run, so a slow step leaves time for the next one and
# every step's log still comes back:
#   TEST_LIMIT=180 BENCH="60:--sections decode;--sections overhead" BENCH_LIMIT=30 bash tests/gpu/device_check.sh
#
# Compile caches: Triton's and CuPy's caches are restored from .device-cache/caches.tar.part-*
# when those files exist (carry the git-ignored folder .device-cache with the call) and written
# back to $OUT/caches.tar.part-* at the end, in parts of 15 MiB (a file returned from the device
# may not exceed 16 MiB), so the next call starts warm: copy the parts into .device-cache/.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
TESTS=${TESTS:-"tests -m gpu"}
WORKERS=${WORKERS:-6}
BENCH=${BENCH:-""}
EXTRA=${EXTRA:-""}
TEST_LIMIT=${TEST_LIMIT:-0}
BENCH_LIMIT=${BENCH_LIMIT:-0}
SAVE_CACHES=${SAVE_CACHES:-1}
CACHES=${CACHES:-/tmp/flash-caches}
export TRITON_CACHE_DIR="$CACHES/triton" CUPY_CACHE_DIR="$CACHES/cupy"
export FLASH_SANITIZER_LOG="$OUT"  # tests/backends/test_cuda_sanitizer.py writes its reports here
section() { printf '\n==== %s\n' "$*"; }

section "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)'
python3 -c 'import cupy; print("cupy", cupy.__version__)' 2>/dev/null || echo "cupy: not importable"
mkdir -p "$CACHES"
if compgen -G ".device-cache/caches.tar.part-*" >/dev/null; then
  cat .device-cache/caches.tar.part-* | tar -xz -C "$CACHES" && echo "compile caches restored ($(du -sh "$CACHES" | cut -f1))"
fi

section "install"
for pkg in packages/flash-core packages/flash-triton packages/flash-cuda packages/flash-bench; do
  [ -f "$pkg/pyproject.toml" ] || continue
  if ! python3 -m pip install -q --no-deps --no-build-isolation -e "$pkg" >>"$OUT/install.log" 2>&1; then
    echo "install of $pkg FAILED"; tail -20 "$OUT/install.log"
  fi
done
python3 -c 'import flash; [print(" ", b) for b in flash.backends()]'

status=0
if [ "$TESTS" != skip ]; then
  section "tests: pytest $TESTS (-n $WORKERS)"
  start=$(date +%s)
  parallel=()
  if python3 -c 'import xdist' 2>/dev/null && [ "$WORKERS" -gt 1 ]; then
    parallel=(-n "$WORKERS" --dist loadgroup)
  fi
  # shellcheck disable=SC2086
  # -v: every result is in the log as it happens, so a run cut by TEST_LIMIT still reports what ran.
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout -k 10 "$TEST_LIMIT" python3 -m pytest $TESTS "${parallel[@]}" -v -rfEs --tb=short \
    -p no:cacheprovider --durations="${DURATIONS:-15}" >"$OUT/pytest.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -40
  for outcome in PASSED FAILED ERROR SKIPPED; do
    printf '%s %s  ' "$outcome" "$(grep -cE "(^| )$outcome " "$OUT/pytest.log")"
  done
  echo
  tail -3 "$OUT/pytest.log"
  echo "GPU tier wall time: $(( $(date +%s) - start )) s"
fi
if [ -n "$EXTRA" ]; then
  section "extra: $EXTRA"
  bash -c "$EXTRA" >"$OUT/extra.log" 2>&1 || status=1
  tail -"${EXTRA_TAIL:-40}" "$OUT/extra.log"
fi
if [ "$BENCH" != skip ]; then
  IFS=';' read -ra runs <<<"$BENCH"
  for n in "${!runs[@]}"; do
    args=${runs[$n]} limit=$BENCH_LIMIT
    if [[ $args =~ ^\ *([0-9]+):(.*)$ ]]; then
      limit=${BASH_REMATCH[1]} args=${BASH_REMATCH[2]}
    fi
    section "benchmark $n: python -m flash bench $args"
    start=$(date +%s)
    # shellcheck disable=SC2086
    timeout -k 10 "$limit" python3 -m flash bench $args --out "$OUT/bench-$n.json" \
      >"$OUT/bench-$n.log" 2>&1
    rc=$?
    [ $rc = 0 ] || { status=1; echo "(exit status $rc; 124: cut by BENCH_LIMIT)"; }
    sed -n '/^results:/,$p' "$OUT/bench-$n.log"
    grep -iE "error|failed|Traceback" "$OUT/bench-$n.log" | head -10
    echo "wall time: $(( $(date +%s) - start )) s"
  done
fi
# The device tool returns few files: every log and result goes back in one archive.
(cd "$OUT" && tar -czf results.tgz --exclude 'caches.tar.part-*' --exclude results.tgz ./* &&
  find . -mindepth 1 -maxdepth 1 ! -name "caches.tar.part-*" ! -name results.tgz -exec rm -rf {} +)
if [ "$SAVE_CACHES" = 1 ]; then
  tar -cz -C "$CACHES" . 2>/dev/null | split -b 15M - "$OUT/caches.tar.part-" &&
    echo "compile caches saved: $(cat "$OUT"/caches.tar.part-* | wc -c) bytes in $(ls "$OUT"/caches.tar.part-* | wc -l) parts"
fi
exit $status
