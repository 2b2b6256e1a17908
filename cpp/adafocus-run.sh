#!/usr/bin/env bash
# Run the built adafocus-run with torch/lib on the loader path (the AOTInductor packages need it).
#   cpp/adafocus-run.sh EXPORT_DIR VIDEOS.npy [--device cpu|cuda] [--precision ...] [--thresholds ...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
torch_dir=$("${PYTHON:-python3}" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "${ADAFOCUS_RUN:-$here/build/adafocus-run}" "$@"
