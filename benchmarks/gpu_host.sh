#!/usr/bin/env bash
# The checks and benchmarks that need a CUDA GPU, in one go (run from the repository root; the lent
# machine allows one 10-minute call, so every step has its own time limit and the order is by value):
#   1. Something-Something V1 (t12, random weights): export, then AOTInductor packages compiled for
#      this GPU in fp16 (compile time per graph is printed), and adafocus-bench at batch 128, fp16,
#      compiled (`aoti`, its dense baseline compiled the same way) beside eager PyTorch, same run;
#   2. the GPU tests: the PyTorch CUDA backend reproduces the reference loop, fp16 agreement,
#      zero-copy CUDA inputs; the demo's AOTInductor CUDA packages (fp32 parity with the reference in
#      both modes, fp16 agreement, the C++ runner on CUDA); TensorRT tests where TensorRT is
#      installed (skipped with the reason);
#   3. the same in fp32, if the time allows.
# Results go to $OUT if set (a lent machine's output folder), else benchmarks/results/ (a DRY_RUN's to
# the git-ignored adafocus-results/gpu-host-dry-run/: a CPU check is not a result to record).
# DRY_RUN=1 runs the same steps on the CPU with the demo (to check the script without a GPU).
# Exit status 1 when a step failed or was cut off (named at the end); the other steps still run.
set -uo pipefail
# Every step's limit is cut to what is left of BUDGET_S (default 580 s: the call's 10 minutes less the
# transfers; 1500 s for a DRY_RUN on 2 CPU cores), so the script always ends in time and what it
# measured is kept.
deadline=$((SECONDS + ${BUDGET_S:-$([ "${DRY_RUN:-0}" = 1 ] && echo 1500 || echo 580)}))
limit() { local left=$((deadline - SECONDS)); echo $(($1 < left ? $1 : (left > 1 ? left : 1))); }
out=${OUT:-$([ "${DRY_RUN:-0}" = 1 ] && echo adafocus-results/gpu-host-dry-run || echo benchmarks/results)}
failed=()  # steps that failed or ran out of time: each step still runs, the status says so at the end
mkdir -p "$out"
export PYTHONUNBUFFERED=1 ADAFOCUS_CACHE=${ADAFOCUS_CACHE:-/tmp/adafocus-cache}
step() { echo; echo "=== $* ($(date +%T))"; }
if [ "${DRY_RUN:-0}" = 1 ]; then
    # the CPU test selection compiles the demo's CPU packages itself (~150 s on 2 cores)
    device=cpu precision=fp32 preset=demo budget=0.08 batch=32 repeats=1 warmup=0 tests="aoti and batches_past"
    test_limit=300
else
    # on the GPU: the PyTorch CUDA backend, AOTInductor CUDA packages of the demo (fp32 parity, fp16
    # agreement, the C++ runner on CUDA), TensorRT where installed
    device=cuda precision=fp16 preset=sthsth-v1 budget=14.0 batch=128 repeats=10 warmup=2 tests="cuda or tensorrt"
    test_limit=240
fi

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"

step "export $preset (ONNX graphs, validated)"
export_dir=$(timeout "$(limit 150)" python3 -c "
import sys
from adafocus.builtin import demo_export, random_export
e = demo_export() if '$preset' == 'demo' else random_export('$preset')
print(e.path)" | tail -1) || failed+=(export)
echo "$export_dir"

step "AOTInductor packages, $device $precision"
timeout "$(limit 240)" python3 -m adafocus export --aoti --device "$device" --precision "$precision" --into "$export_dir" \
    2>&1 | tee "$out/aoti-compile-$preset-$device-$precision.log" || failed+=("aoti $precision")

step "benchmark: $preset, batch $batch, $precision: aoti (compiled) vs pytorch (eager)"
timeout "$(limit 200)" python3 -m adafocus bench "$export_dir" --budget "$budget" --backend aoti --backend pytorch \
    --device "$device" --precision "$precision" --batch "$batch" --repeats "$repeats" --warmup "$warmup" \
    --out "$out/bench-$preset-aoti-pytorch-$device-$precision.json" || failed+=("bench $precision")

step "GPU tests"
# -p no:warnings: this host's torch may warn where the pinned one does not; warnings are not what is checked here
timeout "$(limit "$test_limit")" python3 -m pytest -q -rs -s -p no:warnings -p no:cacheprovider tests/test_runtime.py tests/test_tensorrt.py \
    tests/test_aoti.py -k "${GPU_TESTS:-$tests}" 2>&1 | tee "$out/gpu-tests.log" || failed+=(tests)

if [ "$device" = cuda ]; then
    step "fp32: packages and benchmark (if the time allows)"
    timeout "$(limit 120)" python3 -m adafocus export --aoti --device cuda --precision fp32 --into "$export_dir" \
        2>&1 | tee "$out/aoti-compile-$preset-cuda-fp32.log" &&
    timeout "$(limit 60)" python3 -m adafocus bench "$export_dir" --budget "$budget" --backend aoti --backend pytorch \
        --device cuda --precision fp32 --batch "$batch" --repeats "$repeats" --warmup "$warmup" \
        --out "$out/bench-$preset-aoti-pytorch-cuda-fp32.json" || failed+=("fp32")
fi
step "done ($SECONDS s)"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed or cut off: ${failed[*]}"
    exit 1
fi
