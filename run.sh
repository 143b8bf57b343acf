#!/usr/bin/env bash
# run.sh: one entry point that installs what is missing (Debian packages), configures, builds
# and runs moonshard. Idempotent: a second run only rebuilds what changed.
#
#   ./run.sh demo        generate a story with the bundled stories260K model (CPU, no GPU)
#   ./run.sh test        build and run the whole test suite (C, Lua, GPU tests skip without GPU)
#   ./run.sh asan        the test suite under AddressSanitizer + UndefinedBehaviorSanitizer
#   ./run.sh build       configure and build only
#   ./run.sh bench       CPU benchmarks (JSON lines)
set -euo pipefail
cd "$(dirname "$0")"

DEPS=(build-essential cmake pkg-config luajit libluajit-5.1-dev libuv1-dev lua-luv lua-luv-dev
      lua-cjson libcjson-dev libedit-dev libopenblas-dev libpcre2-dev lua-busted)
DATA=../shared/data
JOBS=$(nproc 2>/dev/null || echo 2)

install_deps() {
  local missing=()
  for p in "${DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "run.sh: installing ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# build DIR [cmake options...]
build() {
  local dir=$1
  shift
  if [ ! -f "$dir/CMakeCache.txt" ]; then
    cmake -S . -B "$dir" "$@"
  fi
  cmake --build "$dir" -j"$JOBS"
}

need_data() {
  if [ ! -d "$DATA/models/stories260K" ]; then
    echo "run.sh: $DATA/models/stories260K not found (the shared data folder sits beside the repository)" >&2
    exit 1
  fi
}

cmd=${1:-}
case "$cmd" in
  demo)
    install_deps
    build build
    need_data
    ./build/moonshard generate --model "$DATA/models/stories260K" --prompt "${2:-Once upon a time}" \
      --max-tokens 200 --temperature 0.8 --seed 42
    ;;
  test)
    install_deps
    build build -DMSH_WERROR="${MSH_WERROR:-ON}"
    need_data
    ctest --test-dir build --output-on-failure -j"$JOBS"
    ;;
  asan)
    install_deps
    build build-asan -DMSH_SANITIZE=ON -DMSH_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug
    need_data
    ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build-asan --output-on-failure -j"$JOBS"
    ;;
  build)
    install_deps
    build build
    ;;
  bench)
    install_deps
    build build
    need_data
    ./build/moonshard bench --model "$DATA/models/stories260K" "${@:2}"
    ;;
  *)
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
