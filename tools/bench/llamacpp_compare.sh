#!/usr/bin/env bash
# Prefill and decode speed on one GGUF file: moonshard vs llama.cpp (through llama-cpp-python),
# same machine, same threads, same synthetic prompt, measured the same way (prompt in one pass,
# then greedy decoding token by token; warm-up, then medians).
#
# Usage (from the repository root):
#   tools/bench/llamacpp_compare.sh [MODEL.gguf] [BUILD_DIR]
#     MODEL.gguf  default .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (./run.sh demo fetches it)
#     BUILD_DIR   default build
#   environment: THREADS (default: nproc), PROMPT_LEN (128), GEN_LEN (128), LOOPS (5),
#                DTYPE (moonshard's weights on the CPU: native, the default: as the file has them; f32 or f16),
#                ROUNDS (3: the engines alternate ROUNDS times; each figure is the median over rounds)
# Needs `pip install llama-cpp-python` (builds llama.cpp for this CPU; not part of moonshard).
# Prints one JSON object: both engines' prefill and decode tok/s and the ratios moonshard / llama.cpp.
# Not part of ctest: it measures, it does not test. Other load on the machine skews both engines
# (llama.cpp's spinning threads most): the load average at the start is printed with the results.
set -euo pipefail

MODEL=${1:-.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
BUILD=${2:-build}
THREADS=${THREADS:-$(nproc)}
PROMPT_LEN=${PROMPT_LEN:-128}
GEN_LEN=${GEN_LEN:-128}
LOOPS=${LOOPS:-5}
ROUNDS=${ROUNDS:-3}
DTYPE=${DTYPE:-native}

fail() { echo "llamacpp_compare: FAIL: $*" >&2; exit 1; }
[ -f tools/bench/llamacpp_bench.py ] || fail "run from the repository root"
[ -f "$MODEL" ] || fail "no model at $MODEL (./run.sh demo fetches the default one)"
[ -x "$BUILD/moonshard" ] || fail "no $BUILD/moonshard (build first: cmake -S . -B $BUILD && cmake --build $BUILD)"
python3 -c "import llama_cpp" 2>/dev/null || fail "llama-cpp-python is not installed (pip install llama-cpp-python)"

json_num() { sed -n "s/.*\"$1\": *\([-0-9.eE+]*\).*/\1/p" | tail -n 1; }
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) exit 1; if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

LOAD=$(cut -d' ' -f1 /proc/loadavg)
msh_pre=(); msh_dec=(); cpp_pre=(); cpp_dec=()
for r in $(seq 1 "$ROUNDS"); do
  out=$("$BUILD/moonshard" bench --model "$MODEL" --threads "$THREADS" --prompt-len "$PROMPT_LEN" \
        --gen-len "$GEN_LEN" --loops "$LOOPS" --dtype "$DTYPE") || fail "moonshard bench failed"
  msh_pre+=("$(json_num prefill_tok_s <<< "$out")"); msh_dec+=("$(json_num decode_tok_s <<< "$out")")
  out=$(python3 tools/bench/llamacpp_bench.py "$MODEL" --threads "$THREADS" --prompt-len "$PROMPT_LEN" \
        --gen-len "$GEN_LEN" --loops "$LOOPS") || fail "llama.cpp bench failed"
  cpp_pre+=("$(json_num prefill_tok_s <<< "$out")"); cpp_dec+=("$(json_num decode_tok_s <<< "$out")")
  echo "llamacpp_compare: round $r: moonshard prefill ${msh_pre[-1]} decode ${msh_dec[-1]};" \
       "llama.cpp prefill ${cpp_pre[-1]} decode ${cpp_dec[-1]} tok/s" >&2
done
mp=$(printf '%s\n' "${msh_pre[@]}" | median); md=$(printf '%s\n' "${msh_dec[@]}" | median)
cp=$(printf '%s\n' "${cpp_pre[@]}" | median); cd_=$(printf '%s\n' "${cpp_dec[@]}" | median)
VERSION=$(python3 -c "import llama_cpp; print(llama_cpp.__version__)")
awk -v model="$MODEL" -v threads="$THREADS" -v pl="$PROMPT_LEN" -v gl="$GEN_LEN" -v loops="$LOOPS" \
    -v rounds="$ROUNDS" -v load="$LOAD" -v ver="$VERSION" -v dt="$DTYPE" -v mp="$mp" -v md="$md" -v cp="$cp" -v cd="$cd_" \
  'BEGIN { printf "{\"model\":\"%s\",\"threads\":%d,\"prompt_len\":%d,\"gen_len\":%d,\"loops\":%d,\"rounds\":%d,\"load_avg_at_start\":%s,\"moonshard\":{\"weights\":\"%s\",\"prefill_tok_s\":%.1f,\"decode_tok_s\":%.1f},\"llama_cpp\":{\"version\":\"llama-cpp-python %s\",\"prefill_tok_s\":%.1f,\"decode_tok_s\":%.1f},\"ratio_prefill\":%.2f,\"ratio_decode\":%.2f}\n",
    model, threads, pl, gl, loops, rounds, load, dt, mp, md, ver, cp, cd, mp / cp, md / cd }'
