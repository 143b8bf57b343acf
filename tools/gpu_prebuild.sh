#!/usr/bin/env bash
# tools/gpu_prebuild.sh: build the CUDA side on a machine without a GPU (nvcc of the same toolkit
# as the device machines') and stage what tools/gpu_check.sh runs into build-carry/bin, so that a
# fresh device machine skips its two-minute build:
#
#   bash tools/gpu_prebuild.sh                     # here: build-gpu for sm_90a, then build-carry/bin
#   MSH_GPU_PREBUILT=build-carry/bin bash tools/gpu_check.sh   # there (carry build-carry and .carry/debs)
#
# The build targets x86-64-v3 CPUs and keeps this checkout's absolute paths (the CUDA module's directory, the Lua root), so
# the device's copy of the tree must sit at the same path, as the device tool's copy does. The
# libraries it links (LuaJIT, libuv, OpenBLAS ...) come from tools/gpu_env.sh's Debian packages
# there, the CUDA ones from the device's toolkit (same major version: the sonames say it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v nvcc > /dev/null || { echo "gpu_prebuild: no nvcc on PATH" >&2; exit 1; }
mkdir -p build-carry
# not -march=native: the device's CPU is another one; x86-64-v3 (AVX2, FMA, F16C: every x86 server
# CPU since 2015) keeps the CPU backend's vector paths (quantizing at load, the host-side ops)
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a -DMSH_NATIVE=OFF \
  -DCMAKE_C_FLAGS="-march=x86-64-v3" > build-carry/configure.log
grep -q "moonshard: CUDA backend ON" build-carry/configure.log ||
  { echo "gpu_prebuild: the configuration has no CUDA backend (build-carry/configure.log)" >&2; exit 1; }
cmake --build build-gpu -j"$(nproc)"
rm -rf build-carry/bin && mkdir -p build-carry/bin
cp -a build-gpu/libmoonshard.so build-gpu/libmoonshard_cuda.so build-gpu/moonshard build-gpu/lua \
  build-gpu/CTestTestfile.cmake build-carry/bin/
find build-gpu -maxdepth 1 -type f -executable -name '*test_*' -exec cp -a {} build-carry/bin/ \;
# what the build is of: the commit, and compiled sources changed since it (gpu_check prints it)
{ git rev-parse --short HEAD; git status --porcelain -- core kernels CMakeLists.txt tools/bench_gpu_ops.c tests/gpu tests/c; } \
  > build-carry/bin/SOURCE
du -sh build-carry/bin
