#!/usr/bin/env bash
# The checks and benchmarks that need a CUDA GPU, in one go (run from the repository root):
#   1. the GPU tests: the PyTorch CUDA backend reproduces the reference loop (fp32, both modes, the
#      demo and two paper presets), fp16 agreement, zero-copy CUDA inputs; TensorRT tests where
#      TensorRT is installed (skipped with the reason otherwise);
#   2. adafocus-bench on the GPU: Something-Something V1 (t12, random weights, budget 14 GFLOPs) at
#      batch 128 in fp16 (paper Table 3's measurement) and in fp32, and the built-in demo.
# Results go to $OUT if set (a lent machine's output folder), else benchmarks/results/.
# Each step has its own time limit, so that one slow step cannot eat the others' time.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 ADAFOCUS_CACHE=${ADAFOCUS_CACHE:-/tmp/adafocus-cache}
step() { echo; echo "=== $* ($(date +%T))"; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "benchmark: Something-Something V1, batch 128, fp16"
timeout 240 python3 -m adafocus bench --preset sthsth-v1 --budget 14.0 --backend pytorch --device cuda --precision fp16 \
    --batch 128 --repeats 10 --warmup 2 --out "$out/bench-sthsth-v1-t12-pytorch-cuda-fp16.json"

step "GPU tests"
# -p no:warnings: this host's torch may warn where the pinned one does not; warnings are not what is checked here
timeout 240 python3 -m pytest -q -rs -s -p no:warnings -p no:cacheprovider tests/test_runtime.py tests/test_tensorrt.py \
    -k "${GPU_TESTS:-cuda or tensorrt}" 2>&1 | tee "$out/gpu-tests.log"

step "benchmark: Something-Something V1, batch 128, fp32"
timeout 90 python3 -m adafocus bench --preset sthsth-v1 --budget 14.0 --backend pytorch --device cuda --precision fp32 \
    --batch 128 --repeats 10 --warmup 2 --out "$out/bench-sthsth-v1-t12-pytorch-cuda-fp32.json"

step "benchmark: built-in demo, batch 128, fp32"
timeout 150 python3 -m adafocus bench --backend pytorch --device cuda --batch 128 --repeats 10 --warmup 2 \
    --out "$out/bench-demo-pytorch-cuda.json"
step "done"
