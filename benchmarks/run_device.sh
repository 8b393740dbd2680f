#!/usr/bin/env bash
# One call on a GPU machine (no network; DESIGN.md §7): build flashsae, run the GPU tests and the GPU
# benchmarks, and leave logs + JSON in $OUT (the device tool brings $OUT back): everything packed in
# $OUT/device-results.tar.gz, plus $OUT/summary.log (the tail of every step's log).
#
#   bash benchmarks/run_device.sh                # every step; OUT defaults to ./device-out
#   bash benchmarks/run_device.sh tests bench    # only these steps (build outputs survive on a warm machine)
#
# Steps (each one logs to $OUT/<step>.log; a failing step does not stop the later ones, the exit
# status is the number of failed steps):
#   env      nvidia-smi, torch / triton / CUDA versions            -> env.log
#   build    pip install --no-build-isolation --no-deps -e .        -> build.log (stops the script if it fails)
#   tests    the op tests' triton cases (tests/ops -k triton) on CUDA tensors (interpreter off) -> tests.log, tests.xml
#   cuda     the op tests' cuda cases (tests/ops -k cuda): the CUDA kernels against the float64 references
#                                                                    -> cuda.log, cuda.xml
#   sanitize compute-sanitizer memcheck, then racecheck, over benchmarks/cuda_sanitize.py (every
#            _C_cuda kernel path once, small odd sizes)             -> sanitize.log
#   cudabench benchmarks/bench_cuda.py: the CUDA select vs torch.topk, decoder and encoder per backend
#                                                                    -> cudabench.log, bench_cuda.json/.md
#   bench    benchmarks/test_bench_ops_triton.py: validation at the issue's sizes, then
#            triton.testing.do_bench timings against dense PyTorch  -> bench.log, bench_ops_triton.json
#   report   the bench JSON as a markdown table                     -> bench_ops_triton.md
#   ops      benchmarks/test_bench_ops.py + test_bench_train_step.py, CUDA cases only: every provider
#            side by side, peak memory, roofline fractions           -> ops.log, bench_ops.json
#   plots    flashsae's report of bench_ops.json: markdown + PNGs   -> report.md, *.png
# CUDA kernels awaiting their first GPU validation (flashsae._backend.CUDA_AWAITING_VALIDATION) are
# skipped by backend="auto"; when this run's cuda and sanitize steps both pass, the benchmark steps
# run with FLASHSAE_AUTO_UNVALIDATED=1 so that the CUDA backend is among their providers (once the
# tests and compute-sanitizer pass, the set is to be emptied in the code: see _backend.py).
# Budget: the device tool allows 10 minutes per call; the step limits below add up to 535 s (< 9 min).
# A subset of steps (e.g. `env build cuda sanitize`) leaves more of a call for a longer look.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"
FINAL_OUT="$OUT"
# The device tool brings back at most 8 files from $OUT: every step writes into $OUT/run, and the
# end of the script packs it into $OUT/device-results.tar.gz next to $OUT/summary.log.
OUT="$FINAL_OUT/run"
mkdir -p "$OUT"
export TRITON_INTERPRET=0            # compiled kernels: tests/conftest.py only sets it when unset
export TRITON_DEFAULT_FP_FUSION=1    # triton >= 3.9 warns when unset, and pytest turns warnings into errors
export FLASHSAE_CUDA=AUTO
PY="${PYTHON:-python}"
STEPS=" ${*:-env build tests cuda sanitize cudabench bench report ops plots} "
failed=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    [[ "$STEPS" == *" $name "* ]] || return 0
    echo "== $name ($(date +%T))"
    if ! timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "   $name FAILED (see $OUT/$name.log)"
        failed=$((failed + 1))
    fi
    tail -n 3 "$OUT/$name.log"
}

step env 10 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\"); print(\"triton\", triton.__version__)'; command -v nvcc && nvcc --version; true"
step build 90 $PY -m pip install --no-build-isolation --no-deps -e .
if [ "$failed" -ne 0 ]; then
    exit "$failed"
fi
step tests 70 $PY -m pytest -q -p no:cacheprovider tests/ops -k triton --junitxml="$OUT/tests.xml"
before_cuda=$failed
# (the cuda_fake cases of tests/ops and tests/ops/test_cuda_select_host.py are CPU tests that CI runs)
step cuda 50 $PY -m pytest -q -p no:cacheprovider tests/ops tests/test_cuda_boundary.py -k "cuda and not fake" \
    --junitxml="$OUT/cuda.xml"
SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
# PYTORCH_NO_CUDA_MEMORY_CACHING=1: one allocation per tensor, so an out-of-bounds access leaves its
# allocation (memcheck sees it) instead of landing in a neighbour inside torch's cache
step sanitize 100 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 bash -c "rc=0; \
    echo '--- memcheck'; '$SANITIZER' --tool memcheck --error-exitcode 1 $PY benchmarks/cuda_sanitize.py || rc=1; \
    echo '--- racecheck'; '$SANITIZER' --tool racecheck --error-exitcode 1 $PY benchmarks/cuda_sanitize.py || rc=1; \
    exit \$rc"
if [[ "$STEPS" == *" cuda "* && "$STEPS" == *" sanitize "* && "$failed" -eq "$before_cuda" ]]; then
    export FLASHSAE_AUTO_UNVALIDATED=1  # the CUDA kernels passed here: let auto pick them for the benchmarks
    echo "   CUDA tests and compute-sanitizer passed: benchmarks run with FLASHSAE_AUTO_UNVALIDATED=1"
fi
step cudabench 45 $PY benchmarks/bench_cuda.py "$OUT"
step bench 100 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_ops_triton.py --benchmark-only \
    --benchmark-json="$OUT/bench_ops_triton.json"
step report 5 $PY benchmarks/report_ops_triton.py "$OUT/bench_ops_triton.json" "$OUT/bench_ops_triton.md"
step ops 60 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_ops.py benchmarks/test_bench_train_step.py \
    --benchmark-only -k cuda --benchmark-json="$OUT/bench_ops.json"
step plots 5 $PY benchmarks/report.py "$OUT/bench_ops.json" --out "$OUT"
echo "== done: $failed failed step(s)"
{ for f in "$OUT"/*.log; do echo "===== $(basename "$f")"; tail -n 40 "$f"; done; } >"$FINAL_OUT/summary.log" 2>&1
tar -czf "$FINAL_OUT/device-results.tar.gz" -C "$OUT" . && rm -rf "$OUT"
echo "   outputs: $FINAL_OUT/device-results.tar.gz, $FINAL_OUT/summary.log"
exit "$failed"
