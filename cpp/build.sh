#!/usr/bin/env bash
# Build adafocus-run against the headers and libraries of the installed torch wheel (no CMake, no
# other libtorch): g++ (C++20: the torch 2.14 headers need it), nlohmann-json and OpenSSL from the
# OS's packages (Debian/Ubuntu: apt-get install g++ nlohmann-json3-dev libssl-dev).
#   cpp/build.sh [OUT]     (default OUT: cpp/build/adafocus-run)
# At run time the AOTInductor packages' own libraries need torch/lib on LD_LIBRARY_PATH (the
# executable's RUNPATH does not reach them): cpp/adafocus-run.sh sets it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build/adafocus-run}
python=${PYTHON:-python3}
torch_dir=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
mkdir -p "$(dirname "$out")"
abi=$("$python" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
g++ -std=c++20 -O2 -D_GLIBCXX_USE_CXX11_ABI="$abi" "$here/adafocus_run.cpp" -o "$out" \
    -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
    -L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -ltorch -ltorch_cpu -lc10 -lcrypto
echo "$out"
