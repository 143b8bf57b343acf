#!/usr/bin/env bash
# tools/gpu_check.sh: the one command for a GPU machine: unpack the build dependencies
# (tools/gpu_env.sh), configure and build in build-gpu for sm_90a, run the GPU tests and the C
# tests, run the op benchmarks, and print a short table last.
#
#   bash tools/gpu_check.sh 2>&1 | tee $OUT/log          (through the device tool: carry .carry)
#
# Environment: OUT (where logs and bench.jsonl go; default /tmp/msh-gpu-check), MSH_GPU_TESTS=0
# skips the tests, MSH_GPU_SUITE=0 only the whole suite that follows the GPU tests,
# MSH_GPU_BENCH=0 skips the benchmarks (MSH_GPU_BENCH_FILTER=NAME runs only those of bench_gpu_ops NAME), MSH_GPU_SANITIZE=1 runs the GPU tests under
# compute-sanitizer too, MSH_GPU_PROFILE=1 runs Nsight Compute over the attention and GEMV
# kernels (ncu_*.txt) and times every kernel of the 8B decode step and prefill (ncu_*.csv, tables
# by tools/bench/ncu_kernels.py), MSH_JOBS sets the build parallelism. MSH_GPU_PARITY8B=1 runs the 8B
# parity check against transformers (tools/parity: a random Llama-3-8B shape saved under
# MSH_PARITY8B_DIR, default $TMPDIR/msh-parity-8b, and reused there; 16 GB of disk, about two
# minutes), then tools/parity/noise_8b.py for the bar's noise floor; it is on by default when the GPU has
# at least 40 GB.
# MSH_GPU_TEST_REGEX runs only the GPU tests it matches (ctest -R); MSH_GPU_TARGETS="moonshard
# moonshard_cuda moonshard_exe gpu_test_cuda_ops" builds only those targets (a short run; the
# specs and the model benchmarks need moonshard_exe, the command).
# MSH_GPU_SPECS="gpu_spec arch_spec" runs those Lua specs after the GPU tests (with
# MSH_GPU_SUITE=0: instead of the whole suite).
# MSH_GPU_OFFLOAD_BENCH=1 times resident bf16 and i4g64 decode and --cpu-offload streaming (bf16
# at batch 1 and 32, i4g64 at batch 1) on the 8B shape (offload_bench.jsonl); MSH_GPU_OFFLOAD_CFGS
# (bench options, ';' between runs) replaces that list.
# MSH_GPU_SERVE_BENCH=1 runs bench-serve on the 8B shape (1024 requests of 128 + 128 tokens at batch
# 256 and 1024, then the chunked-prefill effect: 7900-token prompts arriving while 32 requests
# decode, chunking on and off, with slots and a pool that hold both beside the decodes;
# MSH_GPU_SERVE_CFGS replaces the list) and transformers' batched generate on the first
# MSH_GPU_SERVE_PEER_REQUESTS (256) of those requests (serve_bench.jsonl).
# MSH_GPU_PLAN_CHECK=1 runs `moonshard doctor` and prints the planner's device memory for the 8B
# shape (resident and host tier) beside what MSH_GPU_OFFLOAD_BENCH measured.
# MSH_GPU_OFFLOAD_70B=1 times the Llama-2-70B shape: i4g64 streamed from an offload file under
# MSH_GPU_OFFLOAD_DIR (default .msh-offload here: 39 GB, removed after) against that file's own
# O_DIRECT read rate, and i8g64 from pinned memory (71 GB; MSH_PIN_SHARE default 0.8 for it);
# MSH_GPU_70B_CFGS replaces the list (offload_70b.jsonl).
# MSH_GPU_QGEMV_VARIANTS="5 0" runs test_cuda_quant and the 8B shape's i4g64 decode under each
# MSH_QGEMV_VARIANT (kernels/gemv_quant.cu: 5 and 6 the tensor-core kernel; qvariants.jsonl).
# MSH_GPU_PREBUILT=DIR takes build-gpu's libraries, command and test programs from DIR instead of
# configuring and building (tools/gpu_prebuild.sh stages them on a machine with the same CUDA
# toolkit and no GPU: a fresh device machine then skips its two-minute build).
# MSH_GPU_BEFORE=TARBALL builds a second tree (`git archive` of an earlier commit) in build-before
# beside this one, and the model benchmarks then alternate the two builds in the same run
# (model_ab.jsonl, each line tagged "build": "before" or "after"; a before/after table last).
# MSH_GPU_DS_PEER=DIR runs DeepSpeed ZeRO-Inference (../shared/peers/deepspeed: its wheels and zero_inf.py in
# DIR) on the 8B shape at the --cpu-offload runs' lengths, batches MSH_GPU_DS_BATCHES (1,32; ds.jsonl).
# MSH_GPU_EVAL_MODEL=PATH runs `moonshard eval` on the GPU: the first 100 ARC-Easy and PIQA items in f32,
# bf16 and int8 with each document's scores (eval_f32/bf16/i8.json), then MSH_GPU_EVAL_FULL (default gsm8k)
# on its full set with the weights as stored (eval_full.json; MSH_GPU_EVAL_BATCH documents generated side by side).
# MSH_ARCH_REFERENCE=1 (default where transformers imports) writes transformers' logits of the
# architecture fixtures (tools/arch_reference.py -> tests/fixtures/arch/reference.safetensors,
# copied to $OUT) before the tests run.
# Exit status: 0 when the build and every test passed, 1 otherwise.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
root=$(pwd)
out=${OUT:-/tmp/msh-gpu-check}
mkdir -p "$out"
# NVLink multicast stays off on shared machines
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
jobs=${MSH_JOBS:-$(nproc)}
status=0
t_start=$(date +%s)

# bench_each SHAPE CFGS NAME LIMIT: `moonshard bench --dummy SHAPE --device cuda` once per option
# list of CFGS (';' between runs), LIMIT seconds each; JSON lines tagged with their "cfg" go to
# $out/NAME.jsonl, stderr to $out/NAME.err
bench_each() {
  local cfg cfg_list
  IFS=';' read -r -a cfg_list <<< "$2"
  for cfg in "${cfg_list[@]}"; do
    # shellcheck disable=SC2086
    timeout "$4" build-gpu/moonshard bench --dummy "$1" --device cuda $cfg 2>> "$out/$3.err" |
      sed "s|^{|{\"cfg\":\"$cfg\",|" >> "$out/$3.jsonl" || { status=1; tail -3 "$out/$3.err"; }
  done
}

# offload_table FILE: a line per bench_each row: decode, its floor share, the stream against the
# pinned H2D ceiling, the disk's against the offload file's own read rate and the --kv-offload
# cache's reads across the link against the same H2D ceiling (each of the same run)
offload_table() {
  python3 - "$1" << 'EOF'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    f = lambda k, fmt="{:.3g}": fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "-"
    print(f"{r['cfg'][:60]:60s} load {f('load_s')} s, decode {f('decode_tok_s')} tok/s ({f('decode_step_ms')} ms, "
          f"floor share {f('decode_efficiency')}), stream {f('stream_gbs')} GB/s of pinned H2D {f('h2d_pinned_gbs')} "
          f"({f('stream_share_of_h2d')}), disk {f('nvme_gbs')} GB/s of the file's {f('disk_read_gbs')} "
          f"({f('nvme_share_of_disk')}), stalls {f('prefetch_stall_ms_per_token')} ms/token, KV over the link "
          f"{f('kv_link_gbs')} GB/s ({f('kv_link_share_of_h2d')})")
EOF
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -4
nvcc --version 2>&1 | tail -1
cmake --version | head -1

echo "== dependencies"
# shellcheck source=tools/gpu_env.sh
if ! source tools/gpu_env.sh; then
  echo "gpu_check: dependency setup failed"
  exit 1
fi
echo "unpacked into $MSH_DEPS; pkg-config: $(command -v pkg-config); luajit: $(command -v luajit)"

cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
if [ -n "${MSH_GPU_PREBUILT:-}" ]; then
  echo "== prebuilt: build-gpu from $MSH_GPU_PREBUILT (tools/gpu_prebuild.sh), no configure or build"
  mkdir -p build-gpu && cp -a "$MSH_GPU_PREBUILT"/. build-gpu/ || exit 1
  echo "built at $(tr '\n' ' ' < build-gpu/SOURCE 2> /dev/null); this tree: $(git rev-parse --short HEAD 2> /dev/null)"
  # the toolkit's libraries, linked by name, where the loader has no entry for them
  for f in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
    ldconfig -p | grep -q "$f" && continue
    p=$(find "$cuda_home" /usr/local /usr/lib /opt -name "$f" 2> /dev/null | head -1)
    [ -n "$p" ] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:${p%/*}"
  done
  if ldd build-gpu/libmoonshard_cuda.so build-gpu/moonshard | grep "not found"; then exit 1; fi
else
  echo "== configure (build-gpu, sm_90a)"
  if ! cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > "$out/configure.log" 2>&1; then
    tail -40 "$out/configure.log"
    exit 1
  fi
  grep -E "moonshard: CUDA" "$out/configure.log"
fi

before_pid=""
if [ -n "${MSH_GPU_BEFORE:-}" ]; then
  echo "== build-before from $MSH_GPU_BEFORE (in the background)"
  rm -rf /tmp/msh-before && mkdir -p /tmp/msh-before && tar -xzf "$MSH_GPU_BEFORE" -C /tmp/msh-before
  ( cmake -S /tmp/msh-before -B build-before -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a &&
    cmake --build build-before -j"$(( jobs / 2 ))" ) > "$out/build_before.log" 2>&1 &
  before_pid=$!
  jobs=$(( jobs / 2 ))
fi

if [ "${MSH_ARCH_REFERENCE:-1}" != 0 ] && python3 -c "import transformers, torch" 2> /dev/null; then
  echo "== transformers' logits of the architecture fixtures"
  timeout 300 python3 tools/arch_reference.py tests/fixtures/arch > "$out/arch_reference.log" 2>&1 || status=1
  tail -8 "$out/arch_reference.log"
  cp tests/fixtures/arch/reference.safetensors "$out/" 2> /dev/null || true
fi

if [ -z "${MSH_GPU_PREBUILT:-}" ]; then
  echo "== build (-j$jobs)"
  t0=$(date +%s)
  if ! cmake --build build-gpu -j"$jobs" ${MSH_GPU_TARGETS:+--target $MSH_GPU_TARGETS} > "$out/build.log" 2>&1; then
    grep -E -B2 -A6 "error" "$out/build.log" | head -120
    exit 1
  fi
  echo "built in $(( $(date +%s) - t0 )) s"
fi

bench_bin=build-gpu/bench_gpu_ops
if [ "${MSH_GPU_BENCH:-1}" != 0 ]; then
  cc -std=c11 -O2 -Wall -Wextra tools/bench_gpu_ops.c -Icore/include -Icore/src -Icore/cuda -Ikernels \
    -I"$cuda_home/include" -Lbuild-gpu -lmoonshard_cuda -lmoonshard -L"$cuda_home/lib64" \
    -lcudart -lcublas -lm -Wl,-rpath,"$root/build-gpu" -o "$bench_bin" || status=1
fi

gpu_summary="not run"
c_summary="not run"
if [ "${MSH_GPU_TESTS:-1}" != 0 ]; then
  echo "== GPU tests (ctest -L gpu)"
  t0=$(date +%s)
  (cd build-gpu && ctest -L gpu ${MSH_GPU_TEST_REGEX:+-R "$MSH_GPU_TEST_REGEX"} --output-on-failure --timeout 600) > "$out/ctest_gpu.log" 2>&1 || status=1
  cat "$out/ctest_gpu.log"
  gpu_summary="$(grep -E "tests passed|tests failed" "$out/ctest_gpu.log" | tail -1) ($(( $(date +%s) - t0 )) s)"
  if [ "${MSH_GPU_SANITIZE:-0}" = 1 ] && command -v compute-sanitizer > /dev/null; then
    echo "== compute-sanitizer memcheck"
    # API errors (the out-of-memory test's failed cudaMalloc) are expected: report memory errors only
    timeout 240 compute-sanitizer --tool memcheck --report-api-errors no build-gpu/gpu_test_cuda_ops \
      > "$out/sanitizer.log" 2>&1 || status=1
    grep -E "^=========" "$out/sanitizer.log" | head -30
  fi
  # the shared data folder sits beside the checkout; carried copies stand in for it on a device
  if [ ! -d ../shared/data ] && [ -d .carry/data ]; then
    mkdir -p ../shared && ln -sfn "$root/.carry/data" ../shared/data
  fi
  if [ -n "${MSH_GPU_SPECS:-}" ]; then
    # only the named Lua specs (e.g. MSH_GPU_SPECS="gpu_spec arch_spec"), not the whole suite
    for spec in $MSH_GPU_SPECS; do
      echo "== Lua spec $spec"
      timeout 300 build-gpu/moonshard -e "local h = require 'moonshard.host'
        package.path = h.root .. '/tests/lua/?.lua;' .. package.path
        _G.arg = { [0] = 'busted', '--output=plainTerminal', h.root .. '/tests/lua/$spec.lua' }
        require('busted.runner')({ standalone = false })" > "$out/spec_$spec.log" 2>&1 || status=1
      grep -E "successes|^(Failure|Error) ->" -A3 "$out/spec_$spec.log" | head -40
    done
  fi
  if [ "${MSH_GPU_SUITE:-1}" != 0 ]; then
    echo "== whole suite (ctest: C tests, Lua specs with the GPU model specs)"
    (cd build-gpu && ctest --output-on-failure --timeout 600 -j4) > "$out/ctest_c.log" 2>&1 || status=1
    grep -E "Test +#|tests passed|tests failed|Failed|\*\*\*|successes" "$out/ctest_c.log" | tail -20
    c_summary=$(grep -E "tests passed|tests failed" "$out/ctest_c.log" | tail -1)
  fi
fi

if [ "${MSH_GPU_SERVE_BENCH:-0}" = 1 ]; then
  echo "== serving (bench-serve, Llama-3-8B shape, random bf16 weights; floor from the run's ceilings)"
  shape=tools/bench/shapes/llama-3-8b.json
  serve_cfgs=${MSH_GPU_SERVE_CFGS:-"--num-requests 1024 --input-len 128 --output-len 128 --max-batch 256 --max-seq 256 --max-tokens-per-step 2048;--num-requests 1024 --input-len 128 --output-len 128 --max-batch 1024 --max-seq 256 --max-tokens-per-step 8192;--num-requests 32 --input-len 128 --output-len 256 --max-batch 34 --max-seq 8192 --kv-blocks 2400 --long-prompts 2 --long-len 7900 --long-at 0.5 --max-tokens-per-step 512;--num-requests 32 --input-len 128 --output-len 256 --max-batch 34 --max-seq 8192 --kv-blocks 2400 --long-prompts 2 --long-len 7900 --long-at 0.5 --no-chunked-prefill"}
  IFS=';' read -r -a serve_list <<< "$serve_cfgs"
  for cfg in "${serve_list[@]}"; do
    # shellcheck disable=SC2086
    timeout 240 build-gpu/moonshard bench-serve --dummy $shape --device cuda $cfg 2>> "$out/serve_bench.err" |
      sed "s/^{/{\"cfg\":\"$cfg\",/" >> "$out/serve_bench.jsonl" || { status=1; tail -3 "$out/serve_bench.err"; }
  done
  if [ "${MSH_GPU_PEER:-1}" != 0 ] || [ "${MSH_GPU_SERVE_PEER:-0}" = 1 ]; then
    timeout 300 python3 tools/bench/hf_serve.py $shape --num-requests 1024 --input-len 128 --output-len 128 \
      --batch-size 256 --max-requests "${MSH_GPU_SERVE_PEER_REQUESTS:-256}" >> "$out/serve_bench.jsonl" \
      2>> "$out/serve_bench.err" || tail -5 "$out/serve_bench.err"
  fi
  python3 - "$out/serve_bench.jsonl" << 'EOF'
import json, sys
def g(r, *keys):
    for k in keys:
        r = r.get(k) if isinstance(r, dict) else None
    return f"{r:.4g}" if isinstance(r, (int, float)) else "-"
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    if r.get("impl"):
        print(f"{r['impl']} {r['transformers']}: {r['requests']} requests, batches of {r['batch_size']}: "
              f"{r['output_tok_s']:.0f} output tok/s")
        continue
    print(f"{r['cfg'][:70]:70s} out {g(r, 'output_tok_s')} tok/s (floor {g(r, 'floor_output_tok_s')}, eff "
          f"{g(r, 'efficiency')}), TTFT p50/p99 {g(r, 'ttft_ms', 'p50')}/{g(r, 'ttft_ms', 'p99')} ms, ITL p50/p99 "
          f"{g(r, 'itl_ms', 'p50')}/{g(r, 'itl_ms', 'p99')} ms, long: decode ITL p99 {g(r, 'long', 'decode_itl_ms', 'p99')} "
          f"ms, TTFT {g(r, 'long', 'ttft_ms', 'mean')} ms, failed {r['failed']}")
EOF
fi

if [ "${MSH_GPU_BENCH:-1}" != 0 ] && [ -x "$bench_bin" ]; then
  echo "== benchmarks"
  # shellcheck disable=SC2086
  "$bench_bin" ${MSH_GPU_BENCH_FILTER:-} > "$out/bench.jsonl" 2> "$out/bench.err" || { status=1; cat "$out/bench.err"; }
  cat "$out/bench.jsonl"
fi

if [ -n "$before_pid" ]; then
  echo "== before/after: the model benchmarks of build-before and build-gpu, alternating"
  if wait "$before_pid"; then
    shape=tools/bench/shapes/llama-3-8b.json
    for rep in 1 2; do
      for cfg in "--prompt-len 128 --gen-len 129 --loops 3" "--prompt-len 2048 --gen-len 2 --loops 3 --no-ceilings" \
                 "--batch-size 64 --prompt-len 128 --gen-len 33 --loops 2 --no-ceilings"; do
        # the second round repeats batch-1 decode only (the figure that moves most run to run)
        if [ "$rep" = 2 ] && [ "${cfg#--prompt-len 128 --gen-len 129}" = "$cfg" ]; then continue; fi
        for b in before gpu; do
          tagb=$b; [ "$b" = gpu ] && tagb=after
          # shellcheck disable=SC2086
          timeout 200 build-$b/moonshard bench --dummy $shape --device cuda $cfg 2>> "$out/model_ab.err" |
            sed "s/^{/{\"build\":\"$tagb\",\"rep\":$rep,\"cfg\":\"$cfg\",/" >> "$out/model_ab.jsonl" || status=1
        done
      done
    done
    python3 - "$out/model_ab.jsonl" << 'EOF'
import json, sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        rows[(r["cfg"], r["build"])].append(r)
for cfg in dict.fromkeys(c for c, _ in rows):
    b, a = rows[(cfg, "before")], rows[(cfg, "after")]
    if not b or not a:
        continue
    key = "prefill_tok_s" if "2048" in cfg else "decode_tok_s"
    vb, va = [r[key] for r in b], [r[key] for r in a]
    print(f"{cfg:55s} {key}: before {', '.join(f'{v:.1f}' for v in vb)} | after "
          f"{', '.join(f'{v:.1f}' for v in va)} | best after/before {max(va) / max(vb):.3f}")
EOF
  else
    status=1
    tail -30 "$out/build_before.log"
  fi
fi

if [ "${MSH_GPU_OFFLOAD_BENCH:-0}" = 1 ]; then
  echo "== quantized and offloaded weights (Llama-3-8B shape, random weights; ceilings measured in each run)"
  shape=tools/bench/shapes/llama-3-8b.json
  ulimit -l unlimited 2> /dev/null || true
  cfgs=${MSH_GPU_OFFLOAD_CFGS:-"--prompt-len 128 --gen-len 65 --loops 2;--dtype i4g64 --prompt-len 128 --gen-len 65 --loops 2;--cpu-offload --prompt-len 32 --gen-len 9 --loops 2;--cpu-offload --batch-size 32 --prompt-len 32 --gen-len 9 --loops 2;--cpu-offload --dtype i4g64 --prompt-len 32 --gen-len 9 --loops 2"}
  bench_each "$shape" "$cfgs" offload_bench 150
  offload_table "$out/offload_bench.jsonl"
fi

if [ "${MSH_GPU_OFFLOAD_70B:-0}" = 1 ]; then
  # issue 18's 70B rows: int4 streamed from the disk (the offload file's own O_DIRECT read rate
  # measured in the same run: disk_read_gbs, nvme_share_of_disk) and int8 from pinned memory
  # (71 GB: MSH_PIN_SHARE lets the guard pin up to that share of RAM)
  echo "== Llama-2-70B shape: i4g64 --disk-offload, i8g64 --cpu-offload (random weights; ceilings measured in each run)"
  ulimit -l unlimited 2> /dev/null || true
  odir=${MSH_GPU_OFFLOAD_DIR:-$root/.msh-offload}
  mkdir -p "$odir"
  echo "offload dir $odir: $(df -h --output=avail,source "$odir" | tail -1)"
  cfgs=${MSH_GPU_70B_CFGS:-"--dtype i4g64 --disk-offload --offload-dir $odir --prompt-len 16 --gen-len 3 --loops 1 --warmup 0;--dtype i8g64 --cpu-offload --pin-memory --prompt-len 16 --gen-len 3 --loops 1"}
  MSH_PIN_SHARE=${MSH_PIN_SHARE:-0.8} bench_each tools/bench/shapes/llama-2-70b.json "$cfgs" offload_70b \
    "${MSH_GPU_70B_TIMEOUT:-400}"
  rm -rf "$odir"
  offload_table "$out/offload_70b.jsonl"
fi

if [ -n "${MSH_GPU_QGEMV_VARIANTS:-}" ]; then
  echo "== quantized GEMV variants (MSH_QGEMV_VARIANT): test_cuda_quant and the 8B shape's i4g64 decode under each"
  for v in $MSH_GPU_QGEMV_VARIANTS; do
    MSH_QGEMV_VARIANT=$v timeout 120 build-gpu/gpu_test_cuda_quant > "$out/quant_v$v.log" 2>&1 || status=1
    echo "variant $v: $(tail -1 "$out/quant_v$v.log")"
    MSH_QGEMV_VARIANT=$v timeout 150 build-gpu/moonshard bench --dummy tools/bench/shapes/llama-3-8b.json --device cuda \
      --dtype i4g64 --prompt-len 128 --gen-len 65 --loops 2 2>> "$out/qvariants.err" |
      sed "s/^{/{\"qgemv_variant\":$v,/" >> "$out/qvariants.jsonl" || status=1
  done
  python3 - "$out/qvariants.jsonl" << 'EOF'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print(f"variant {r['qgemv_variant']}: decode {r['decode_tok_s']:.1f} tok/s, step {r['decode_step_ms']:.3f} ms, "
              f"floor share {r.get('decode_efficiency', float('nan')):.3f}, prefill {r.get('prefill_tok_s', 0):.0f} tok/s")
EOF
fi

if [ -n "${MSH_GPU_DS_PEER:-}" ]; then
  # the peer side by side: DeepSpeed ZeRO-Inference on the same shape and lengths as the
  # --cpu-offload runs above (MSH_GPU_DS_PEER: a folder with ../shared/peers/deepspeed's wheels
  # and zero_inf.py)
  echo "== DeepSpeed ZeRO-Inference (Llama-3-8B shape, bf16 from pinned memory)"
  if python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ds-site "$MSH_GPU_DS_PEER"/*.whl \
      > "$out/ds.log" 2>&1; then
    PYTHONPATH=/tmp/ds-site PYTHONUNBUFFERED=1 OUT= timeout "${MSH_GPU_DS_TIMEOUT:-300}" python3 \
      "$MSH_GPU_DS_PEER/zero_inf.py" --model-size 8b --batch-sizes "${MSH_GPU_DS_BATCHES:-1,32}" --prompt-len 32 \
      --gen-len 9 --loops 2 --ref-batch-sizes "" --out "$out/ds.jsonl" >> "$out/ds.log" 2>&1 || tail -5 "$out/ds.log"
    grep "^{" "$out/ds.jsonl" 2> /dev/null | cut -c1-400
  else
    tail -5 "$out/ds.log"
  fi
fi

if [ "${MSH_GPU_PLAN_CHECK:-0}" = 1 ]; then
  echo "== moonshard doctor"
  timeout 60 build-gpu/moonshard doctor > "$out/doctor.txt" 2>&1; echo "doctor exit $?"
  head -40 "$out/doctor.txt"
  echo "== planned against measured device memory (8B shape, batch 1; the positions of the benchmark runs above)"
  for tier in resident host; do
    # bf16 weights, as the benchmarks measured (the balanced preset would pick int8 where it is faster);
    # positions: prompt + generated tokens of the resident (128 + 65) and --cpu-offload (32 + 9) runs
    seq=193; [ $tier = host ] && seq=41
    timeout 60 build-gpu/moonshard plan --dummy tools/bench/shapes/llama-3-8b.json --gpus 1 --tier $tier \
      --dtype bf16 --batch-size 1 --max-seq $seq --prefetch 4 --command bench --json > "$out/plan_$tier.json" 2>> "$out/plan.err" ||
      tail -3 "$out/plan.err"
  done
  python3 - "$out" << 'EOF'
import json, sys, os
out = sys.argv[1]
def walk(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from walk(v, path + "." + k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, x
bench = [json.loads(l) for l in open(os.path.join(out, "offload_bench.jsonl")) if l.startswith("{")] \
    if os.path.exists(os.path.join(out, "offload_bench.jsonl")) else []
for tier, cfg in (("resident", "--prompt-len 128 --gen-len 65 --loops 2"), ("host", "--cpu-offload --prompt-len 32 --gen-len 9 --loops 2")):
    try:
        plan = json.load(open(os.path.join(out, f"plan_{tier}.json")))
    except Exception as e:
        print(tier, "no plan:", e); continue
    mem = [(p, v) for p, v in walk(plan) if isinstance(v, (int, float)) and "total" in p.lower() and "mem" in p.lower() or p.endswith("device_bytes")]
    meas = [r for r in bench if r.get("cfg") == cfg]
    r = meas[0] if meas else {}
    proc, model = r.get("process_device_memory_bytes"), r.get("model_device_memory_bytes")
    planned = mem[0][1] if mem else None
    # the process's bytes after its CUDA context (model, cuBLAS workspaces, graphs) against the plan's total
    ratio = f"{proc / planned:.4f}" if proc and planned else "-"
    print(f"{tier}: planned total {planned} ({mem[0][0] if mem else '-'}), measured peak after the context {proc} "
          f"(measured/planned {ratio}), of it after the ceilings' cuBLAS handles {model}")
EOF
fi

if [ -n "${MSH_GPU_EVAL_MODEL:-}" ]; then
  echo "== evaluation on the GPU ($MSH_GPU_EVAL_MODEL)"
  # the placement table's GPU rows (first 100 ARC-Easy and PIQA items, each document's scores kept),
  # then the tasks of MSH_GPU_EVAL_FULL (default gsm8k) on their full sets with the weights as stored
  for form in "f32:--dtype f32" "bf16:--dtype bf16" "i8:--quant-bits 8"; do
    # shellcheck disable=SC2086
    timeout 300 build-gpu/moonshard eval --model "$MSH_GPU_EVAL_MODEL" --device cuda ${form#*:} --tasks arc_easy,piqa \
      --limit 100 --output "$out/eval_${form%%:*}.json" --log-samples > "$out/eval_${form%%:*}.md" 2>> "$out/eval.err" ||
      { status=1; tail -3 "$out/eval.err"; }
    cat "$out/eval_${form%%:*}.md"
  done
  full=${MSH_GPU_EVAL_FULL:-gsm8k}
  timeout 900 build-gpu/moonshard eval --model "$MSH_GPU_EVAL_MODEL" --device cuda --tasks "$full" \
    --gen-batch "${MSH_GPU_EVAL_BATCH:-64}" --output "$out/eval_full.json" > "$out/eval_full.md" 2>> "$out/eval.err" ||
    { status=1; tail -3 "$out/eval.err"; }
  cat "$out/eval_full.md"
fi

if [ "${MSH_GPU_MODEL_BENCH:-1}" != 0 ]; then
  echo "== model benchmarks (moonshard bench, Llama-3-8B shape, random bf16 weights)"
  shape=tools/bench/shapes/llama-3-8b.json
  for cfg in "--prompt-len 128 --gen-len 129 --loops 3" "--prompt-len 2048 --gen-len 2 --loops 3 --no-ceilings" \
             "--batch-size 64 --prompt-len 128 --gen-len 33 --loops 2 --no-ceilings"; do
    # shellcheck disable=SC2086
    timeout 300 build-gpu/moonshard bench --dummy $shape --device cuda $cfg >> "$out/model_bench.jsonl" \
      2>> "$out/model_bench.err" || { status=1; tail -5 "$out/model_bench.err"; }
  done
  # one TP=2 rank's share of the same model on this one GPU: a TP=2 step is this plus its
  # all-reduces (kernels/NOTES.md, "One tensor-parallel rank's decode step on one GPU")
  timeout 300 build-gpu/moonshard bench --dummy tools/bench/shapes/llama-3-8b-tp2-rank.json --device cuda \
    --prompt-len 128 --gen-len 129 --loops 3 --no-ceilings >> "$out/model_bench.jsonl" 2>> "$out/model_bench.err" ||
    { status=1; tail -5 "$out/model_bench.err"; }
  ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$ngpu" -ge 2 ]; then
    for cfg in "--dummy $shape --tp 2 --prompt-len 128 --gen-len 65 --loops 3" \
               "--dummy $shape --pp 2 --prompt-len 128 --gen-len 65 --loops 3" \
               "--dummy tools/bench/shapes/llama-2-70b.json --tp 2 --prompt-len 128 --gen-len 33 --loops 2"; do
      # shellcheck disable=SC2086
      # a hung pair of ranks costs 150 s, not the whole run
      timeout 150 build-gpu/moonshard launch -n 2 bench --device cuda $cfg >> "$out/model_bench.jsonl" \
        2>> "$out/model_bench.err" || { status=1; tail -5 "$out/model_bench.err"; }
    done
    # the micro-batched pipeline (moonshard.schedule) with telemetry: bubble against (p-1)/(m+p-1),
    # and the all-reduce share of TP decode; each rank's JSON Lines events go to $out/logs-*
    for cfg in "--dummy $shape --pp 2 --batch-size 8 --micro-batches 1 --prompt-len 128 --gen-len 33 --loops 3" \
               "--dummy $shape --pp 2 --batch-size 8 --micro-batches 2 --prompt-len 128 --gen-len 33 --loops 3" \
               "--dummy $shape --pp 2 --batch-size 8 --micro-batches 4 --prompt-len 128 --gen-len 33 --loops 3" \
               "--dummy $shape --pp 2 --batch-size 8 --micro-batches 4 --prompt-len 512 --gen-len 17 --loops 3" \
               "--dummy tools/bench/shapes/llama-2-70b.json --pp 2 --batch-size 8 --micro-batches 4 --prompt-len 128 --gen-len 17 --loops 2" \
               "--dummy $shape --tp 2 --prompt-len 128 --gen-len 65 --loops 3"; do
      tag=$(echo "$cfg" | tr -c 'a-z0-9' '_' | cut -c1-60)
      # shellcheck disable=SC2086
      timeout 150 build-gpu/moonshard launch -n 2 --log-dir "$out/logs-$tag" bench --device cuda $cfg \
        >> "$out/model_bench.jsonl" 2>> "$out/model_bench.err" || { status=1; tail -5 "$out/model_bench.err"; }
    done
  fi
  timeout 120 build-gpu/moonshard bench --model ../shared/data/models/stories260K --device cuda --dtype f32 \
    --kv-dtype f32 --prompt-len 1 --gen-len 200 --loops 5 --no-ceilings >> "$out/model_bench.jsonl" \
    2>> "$out/model_bench.err" || status=1
  if [ "${MSH_GPU_PEER:-1}" != 0 ]; then
    timeout 300 python3 tools/bench/hf_decode.py $shape --prompt-len 128 --gen-len 64 >> "$out/model_bench.jsonl" \
      2>> "$out/model_bench.err" || tail -5 "$out/model_bench.err"
  fi
  cat "$out/model_bench.jsonl"
fi

parity_summary="not run"
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc 0-9)
parity_default=0
if [ -n "$gpu_mib" ] && [ "$gpu_mib" -ge 40000 ]; then parity_default=1; fi
if [ "${MSH_GPU_PARITY8B:-$parity_default}" = 1 ]; then
  echo "== 8B parity with transformers (bf16, 512 positions, 10 greedy prompts)"
  pdir=${MSH_PARITY8B_DIR:-${TMPDIR:-/tmp}/msh-parity-8b}
  t0=$(date +%s)
  if timeout 900 python3 tools/parity/hf_8b.py "$pdir" > "$out/parity_8b_hf.log" 2>&1; then
    tail -4 "$out/parity_8b_hf.log"
    timeout 600 build-gpu/moonshard tools/parity/check_8b.lua "$pdir" > "$out/parity_8b.json" \
      2> "$out/parity_8b.err"
    prc=$?
    cat "$out/parity_8b.json"
    if [ -s "$out/parity_8b.err" ]; then tail -5 "$out/parity_8b.err"; fi
    [ "$prc" = 0 ] || status=1
    parity_summary=$(python3 - "$out/parity_8b.json" << 'EOF'
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception as e:
    print(f"no result ({e})")
    sys.exit(0)
print(f"{'PASS' if r['pass'] else 'FAIL'}: top-1 {100 * r['top1_agreement']:.1f}% (strict {100 * r['top1_agreement_strict']:.1f}%, "
      f"transformers bf16 vs f32 {100 * r['transformers_bf16_vs_f32_top1']:.1f}%), greedy identical "
      f"{r['prompts_identical']}/{r['prompts']}; load {r['load_bytes'] / 1e9:.1f} GB in {r['load_s']:.1f} s "
      f"= {r['load_GBps']:.1f} GB/s")
def share(k, n):
    v = r.get(k)
    return f"{100 * v:.1f}% of {r.get(n)}" if isinstance(v, (int, float)) else "none"
print(f"  top-1 where transformers' bf16 and f32 agree: {share('top1_agreement_stable', 'stable_positions')}; "
      f"where its lead is >= {r.get('decisive_gap')}: {share('top1_agreement_decisive', 'decisive_positions')}")
EOF
)
    # the bar's noise floor: transformers' own model with one kernel or rounding point changed
    # (tools/parity/noise_8b.py; informative, not part of the exit status)
    if timeout 300 python3 tools/parity/noise_8b.py --greedy > "$out/parity_noise.jsonl" 2> "$out/parity_noise.err"; then
      parity_summary="$parity_summary
$(python3 - "$out/parity_noise.jsonl" << 'EOF'
import json, sys
rows = [r for r in (json.loads(l) for l in open(sys.argv[1]) if l.startswith('{"variant"')) if "top1" in r]
print("  transformers' bf16 with one change (its noise floor): " + ", ".join(
    f"{r['variant']} {100 * r['top1']:.1f}%" + (f" {r['greedy_identical']}/10" if "greedy_identical" in r else "")
    for r in rows))
EOF
)"
    else
      tail -5 "$out/parity_noise.err"
    fi
  else
    status=1
    tail -20 "$out/parity_8b_hf.log"
    parity_summary="transformers reference failed (see parity_8b_hf.log)"
  fi
  parity_summary="$parity_summary ($(( $(date +%s) - t0 )) s)"
fi

if [ "${MSH_GPU_PROFILE:-0}" = 1 ] && command -v ncu > /dev/null && [ -x "$bench_bin" ]; then
  echo "== ncu (clocks left alone)"
  sections="--section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis"
  # shellcheck disable=SC2086
  ncu --clock-control none $sections -k "regex:prefill_kernel|decode_tc_kernel" -c 4 "$bench_bin" attn \
    > "$out/ncu_attn.txt" 2>&1 || true
  # shellcheck disable=SC2086
  ncu --clock-control none $sections -k "regex:gemv_vec_kernel" -s 2 -c 2 "$bench_bin" gemv_decode \
    > "$out/ncu_gemv.txt" 2>&1 || true
  grep -h -E "^  [a-z_]+.*\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Issued Warp" \
    "$out/ncu_attn.txt" "$out/ncu_gemv.txt" | cut -c1-150 | head -80
  # the model's kernels, Llama-3-8B shape: the last decode steps (6 of 163 kernels at 32 layers)
  # and one 2048-token prefill, grouped by kernel (tools/bench/ncu_kernels.py)
  ncu_time="--clock-control none --cache-control none --metrics gpu__time_duration.sum --csv --print-units base"
  model_bench="build-gpu/moonshard bench --dummy tools/bench/shapes/llama-3-8b.json --device cuda --no-ceilings"
  # shellcheck disable=SC2086
  timeout 300 ncu $ncu_time $model_bench --prompt-len 128 --gen-len 8 --loops 1 > "$out/ncu_decode.csv" 2>&1 &&
    { echo "-- decode step kernels (6 steps)"; python3 tools/bench/ncu_kernels.py "$out/ncu_decode.csv" --last 978; }
  # shellcheck disable=SC2086
  timeout 300 ncu $ncu_time $model_bench --prompt-len 2048 --gen-len 1 --loops 1 > "$out/ncu_prefill.csv" 2>&1 &&
    { echo "-- prefill kernels (2048 tokens, every pass of the run)"; python3 tools/bench/ncu_kernels.py "$out/ncu_prefill.csv"; }
fi

echo
echo "== summary ($(( $(date +%s) - t_start )) s)"
echo "GPU tests: $gpu_summary"
echo "C tests:   $c_summary"
echo "8B parity: $parity_summary"
if [ -s "$out/bench.jsonl" ]; then
  python3 - "$out/bench.jsonl" << 'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
    if r["bench"] == "device":
        print(f"device {r['name']}: {r['sm']} SMs, {r['l2_MB']:.0f} MB L2, {r['mem_GB']:.0f} GB")
    elif r["bench"] == "ceiling_copy_d2d":
        print(f"ceiling: device copy {r['GBps']:.0f} GB/s (read + write)")
    elif r["bench"] == "upload_file":
        print(f"upload of a 1 GiB file from the page cache: {r['GBps']:.1f} GB/s as is, {r['GBps_f32_to_bf16']:.1f} GB/s "
              f"f32 -> bf16 (pinned cudaMemcpy {r['pinned_memcpy_GBps']:.1f}, pageable {r['pageable_memcpy_GBps']:.1f}; "
              f"target >= 3)")
    elif r["bench"] == "ceiling_gemm_bf16_8192":
        print(f"ceiling: cuBLAS bf16 8192^3 {r['TFLOPs']:.0f} TFLOP/s")
    elif r["bench"].startswith("llama3"):
        print(f"Llama-3-8B decode projections, batch 1: {r['us']:.0f} us/token ({r['tok_s']:.0f} tok/s), "
              f"{100 * r['efficiency']:.0f}% of the bandwidth floor")
print("us: stream launches; graph: the same ops replayed from a CUDA graph; eff = floor / graph time")
print(f"{'bench':<13} {'shape':<24} {'path':<8} {'us':>8} {'graph':>8} {'floor':>8} {'eff':>5} {'GB/s':>6} {'TFLOP/s':>7}")
for r in rows:
    if "efficiency" not in r or r["bench"].startswith("llama3"):
        continue
    if r.get("op") == "matmul":
        shape = f"M{r['M']} {r['K']}->{r['N']}"
    elif "T" in r:
        shape = f"T{r['T']} ctx{r['ctx']} 32/8x128"
    else:
        shape = f"M{r.get('M', '?')} {r.get('op', '?')}"
    print(f"{r['bench']:<13} {shape:<24} {r.get('path', '-'):<8} {r['us']:>8.1f} {r['us_graph']:>8.1f} "
          f"{r['floor_us']:>8.1f} {100 * r['efficiency']:>4.0f}% {r['GBps']:>6.0f} {r['TFLOPs']:>7.1f}")
EOF
fi
if [ -s "$out/model_bench.jsonl" ]; then
  python3 tools/bench/summarize.py "$out/model_bench.jsonl"
fi
exit $status
