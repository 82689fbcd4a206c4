#!/usr/bin/env bash
# The GPU check of issue 20 in one command: Triton kernel tests on CUDA (full shapes, CUDA-graph capture/replay),
# the kernel benchmark (Qwen3-30B-A3B and Mixtral layers, every method at ratio 0.3, M = 1..4096, against dense bf16
# and the compressed-bytes roofline; then FP8 factors on the Qwen3 layer at M = 1..512, appended to the same JSON) and
# one-layer GPU conversions at Qwen3-30B shape, all written to one folder.
#
# On the GPU machine (torch + Triton, no vLLM, no network): first, here, `make gpu-wheels` puts the missing Python
# packages (pydantic & co.) in .whl/; then run with .whl carried:
#     bash benchmarks/gpu_check.sh                    # results in $OUT (device tool) or benchmarks/results/gpu_check/
# On a CPU (what CI runs, so the script never rots; numbers mean nothing):
#     bash benchmarks/gpu_check.sh --smoke --out DIR  # Triton interpreter, tiny shapes, conversions on the CPU
# Each step has a time cap (caps sum to 8 minutes; at most 7 files in the results folder: kernels_fp8 logs into
# kernels.log); a failed step does not stop the others; the exit status is non-zero if any step failed. summary.json lists each step's exit status and seconds.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
SMOKE=0
RES=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --out) RES=$2; shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --smoke, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
RES=${RES:-${OUT:-$ROOT/benchmarks/results/gpu_check}}
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1
    TEST_ARGS=(-k "zero_tokens or registered or (matches_torch_path and lowrank and mixed) or (fp8_factors and lowrank and mixed)")
    BENCH_ARGS=(--smoke)
    FP8_BENCH_ARGS=(--smoke)
    CONVERT_ARGS=(--smoke --methods svd mobe --cpu-budget-s 120)
else
    # The package and its missing dependencies go to a private site folder (the machine has no network, and the
    # checkout's vllm_moe_lowrank/ has no kernels/ until installed: tests run from outside the checkout).
    SITE=/tmp/moe-lowrank-site
    if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" \
            .whl/*.whl . >"$RES/install.log" 2>&1; then
        echo "gpu_check.sh: installing the package failed (did you run 'make gpu-wheels' and carry .whl?):" >&2
        tail -5 "$RES/install.log" >&2
        exit 2
    fi
    rm -f "$RES/install.log"  # the device tool brings back at most 8 files
    export PYTHONPATH=$SITE
    TEST_ARGS=()
    BENCH_ARGS=(--layers qwen3 mixtral --methods svd mobe rs-moe rfid-moe moe-svd --ratios 0.3
                --ms 1 8 64 512 4096)
    FP8_BENCH_ARGS=(--layers qwen3 --methods svd mobe rs-moe rfid-moe moe-svd --ratios 0.3 --ms 1 8 64 512)
    CONVERT_ARGS=(--cpu-budget-s 100)
fi

STEPS=()
step() {  # step NAME SECONDS CMD...: run with a time cap, log to $RES/NAME.log (LOG=X: append to X.log instead),
    local name=$1 cap=$2 log=$RES/${LOG:-$1}.log  # record exit status and time
    shift 2
    local t0=$SECONDS rc
    echo "== $name (cap ${cap}s)"
    [ -n "${LOG:-}" ] || : >"$log"
    timeout --kill-after=10 "$cap" "$@" >>"$log" 2>&1
    rc=$?
    tail -n 25 "$log"
    STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
}

step device 30 "$PY" -c '
import json, platform, torch, triton
d = torch.cuda.is_available()
print(json.dumps({"device": torch.cuda.get_device_name() if d else "cpu", "torch": torch.__version__,
                  "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                  "sms": torch.cuda.get_device_properties(0).multi_processor_count if d else None}))'
mv "$RES/device.log" "$RES/device.json"
# shellcheck disable=SC2016  # expanded by the inner bash
step triton_tests 140 bash -c 'cd /tmp && "$0" -m pytest -q -p no:cacheprovider -rfs "$1/tests/test_triton_kernels.py" \
    "${@:2}"' "$PY" "$ROOT" "${TEST_ARGS[@]}"
step kernels 130 "$PY" benchmarks/kernels.py "${BENCH_ARGS[@]}" --out "$RES/kernels.json"
# FP8 factors (issue 14): the same benchmark on FP8-factor layers, rows appended to kernels.json (factor_dtype)
LOG=kernels step kernels_fp8 60 "$PY" benchmarks/kernels.py --factor-dtype fp8_e4m3 "${FP8_BENCH_ARGS[@]}" --append \
    --out "$RES/kernels.json"
step gpu_convert 120 "$PY" benchmarks/gpu_convert.py "${CONVERT_ARGS[@]}" --out "$RES/gpu_convert.json"

FAILED=0
for s in "${STEPS[@]}"; do case "$s" in *'"rc": 0,'*) ;; *) FAILED=1 ;; esac; done
(IFS=,; echo "{\"smoke\": $SMOKE, \"steps\": [${STEPS[*]}]}") >"$RES/summary.json"
echo "== summary ($RES/summary.json)"
cat "$RES/summary.json"
exit $FAILED
