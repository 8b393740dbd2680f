#!/usr/bin/env bash
# One call on a GPU machine (no network): build flashsae, run the GPU tests, compute-sanitizer and
# the GPU benchmark suites, and leave logs + JSON in $OUT (the device tool brings $OUT back):
# everything packed in $OUT/device-results.tar.gz, plus $OUT/summary.log (the tail of every step's log).
#
#   bash benchmarks/run_device.sh                # every step; OUT defaults to ./device-out
#   bash benchmarks/run_device.sh tests encode   # only these steps (build outputs survive on a warm machine)
#
# Steps (each one logs to $OUT/<step>.log; a failing step does not stop the later ones, the exit
# status is the number of failed steps):
#   env      nvidia-smi, torch / triton / CUDA versions            -> env.log
#   build    pip install --no-build-isolation --no-deps -e .        -> build.log (stops the script if it fails)
#   tests    every test under tests/ that names triton, on CUDA tensors (interpreter off) -> tests.log, tests.xml
#   cuda     every test under tests/ that names cuda (not triton; the CPU "fake" variants run in CI):
#            the CUDA kernels against the float64 references        -> cuda.log, cuda.xml
#   sanitize compute-sanitizer memcheck, then racecheck, over tests/cuda_sanitize.py (every
#            _C_cuda kernel path once, small odd sizes)             -> sanitize.log
#   encode   benchmarks/test_bench_ops.py::test_topk_encode, CUDA cases only: each provider (torch_dense,
#            torch_sparse, torch_gemm, every flashsae backend) checked against torch_dense, then
#            timed; peak memory, roofline fractions              -> encode.log, bench_encode.json
#   decode   the same for test_sparse_decode                     -> decode.log, bench_decode.json
#   loss     the same for test_sae_loss                          -> loss.log, bench_loss.json
#   train    benchmarks/test_bench_train_step.py, CUDA cases     -> train.log, bench_train.json
#   report   benchmarks/report.py over the JSON files: markdown + PNGs -> report.md, *.png
# The tests are chosen by name (-k), not by path, so that moving a test file keeps it in its step.
# CUDA kernels awaiting their first GPU validation (flashsae._backend.CUDA_AWAITING_VALIDATION) are
# skipped by backend="auto"; when this run's cuda and sanitize steps both pass, the benchmark steps
# run with FLASHSAE_AUTO_UNVALIDATED=1 so that the CUDA backend is among their providers (once the
# tests and compute-sanitizer pass, the set is to be emptied in the code: see _backend.py).
# Budget: the device tool allows 10 minutes per call; the step limits below add up to 570 s.
# A subset of steps (e.g. `env build cuda sanitize`) leaves more of a call for a longer look.
# DRY_RUN=1 prints each step's command instead of running it (no GPU needed: a check of the script).
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
STEPS=" ${*:-env build tests cuda sanitize encode decode loss train report} "
failed=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    [[ "$STEPS" == *" $name "* ]] || return 0
    echo "== $name ($(date +%T))"
    if [[ -n "${DRY_RUN:-}" ]]; then
        printf '   %q' "$@" >"$OUT/$name.log"
        echo >>"$OUT/$name.log"
    elif ! timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
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
TESTS=(-m pytest -q -p no:cacheprovider tests -m "not compile")  # torch.compile runs: CI
step tests 80 $PY "${TESTS[@]}" -k "triton and not fake" --junitxml="$OUT/tests.xml"
before_cuda=$failed
step cuda 60 $PY "${TESTS[@]}" -k "cuda and not triton and not fake" --junitxml="$OUT/cuda.xml"
SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
# PYTORCH_NO_CUDA_MEMORY_CACHING=1: one allocation per tensor, so an out-of-bounds access leaves its
# allocation (memcheck sees it) instead of landing in a neighbour inside torch's cache
step sanitize 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 bash -c "rc=0; \
    echo '--- memcheck'; '$SANITIZER' --tool memcheck --error-exitcode 1 $PY tests/cuda_sanitize.py || rc=1; \
    echo '--- racecheck'; '$SANITIZER' --tool racecheck --error-exitcode 1 $PY tests/cuda_sanitize.py || rc=1; \
    exit \$rc"
if [[ "$STEPS" == *" cuda "* && "$STEPS" == *" sanitize "* && "$failed" -eq "$before_cuda" ]]; then
    export FLASHSAE_AUTO_UNVALIDATED=1  # the CUDA kernels passed here: let auto pick them for the benchmarks
    echo "   CUDA tests and compute-sanitizer passed: benchmarks run with FLASHSAE_AUTO_UNVALIDATED=1"
fi
# BENCH_FILTER: the benchmark cases to run (-k); a CPU check of these steps: BENCH_FILTER="cpu and n8192 and not bwd".
# One pytest per op, each with its own JSON: a suite stopped by its time limit loses only its own rows.
BENCH_FILTER="${BENCH_FILTER:-cuda}"
bench_step() {  # bench_step NAME SECONDS FILE TEST
    step "$1" "$2" $PY -m pytest -q -p no:cacheprovider "benchmarks/$3" --benchmark-only -k "($BENCH_FILTER) and $4" \
        --benchmark-json="$OUT/bench_$1.json"
}
bench_step encode 90 test_bench_ops.py test_topk_encode
bench_step decode 50 test_bench_ops.py test_sparse_decode
bench_step loss 50 test_bench_ops.py test_sae_loss
bench_step train 40 test_bench_train_step.py test_train_step
# over whichever suites wrote their JSON (pytest-benchmark writes it when the suite ends; a suite
# stopped by its time limit leaves an empty file)
step report 10 bash -c "$PY benchmarks/report.py \$(find '$OUT' -name 'bench_*.json' -size +0) --out '$OUT'"
echo "== done: $failed failed step(s)"
{ for f in "$OUT"/*.log; do echo "===== $(basename "$f")"; tail -n 40 "$f"; done; } >"$FINAL_OUT/summary.log" 2>&1
tar -czf "$FINAL_OUT/device-results.tar.gz" -C "$OUT" . && rm -rf "$OUT"
echo "   outputs: $FINAL_OUT/device-results.tar.gz, $FINAL_OUT/summary.log"
exit "$failed"
