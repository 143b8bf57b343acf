#!/usr/bin/env bash
# CPU decode speed: moonshard vs. a plain single-file C reference (ref_llama2c.c),
# same model (stories260K), same machine, same run.
#
# Usage (from the repository root): tools/bench/cpu_compare.sh [BUILD_DIR]   (default: build)
#
# 1. builds BUILD_DIR/ref_llama2c with cc -O3 -march=native;
# 2. runs it RUNS times (default 5) for 200 greedy steps from BOS, checks its text equals
#    expected_greedy_200.txt byte for byte, and takes the median tok/s;
# 3. runs `moonshard bench` (prompt 1, 200 generated, 20 loops, median) with its default
#    threads, and once more with --threads 1 for a like-for-like single-thread figure;
# 4. prints one JSON line with both numbers and the ratio moonshard / reference.
# Not part of ctest: it measures, it does not test.
set -euo pipefail

BUILD=${1:-build}
RUNS=${RUNS:-5}
STEPS=200
MODEL_DIR=../shared/data/models/stories260K
CKPT=$MODEL_DIR/stories260K.bin
TOK=$MODEL_DIR/tok512.bin
GOLDEN=$MODEL_DIR/expected_greedy_200.txt

fail() { echo "cpu_compare: FAIL: $*" >&2; exit 1; }

[ -f tools/bench/ref_llama2c.c ] || fail "run from the repository root"
for f in "$CKPT" "$TOK" "$GOLDEN"; do [ -f "$f" ] || fail "missing $f"; done

# moonshard: use BUILD_DIR/moonshard if there is one, else build a CPU-only tree in build-ref.
MSH_BUILD=$BUILD
if [ ! -x "$MSH_BUILD/moonshard" ]; then
  MSH_BUILD=build-ref
  echo "cpu_compare: $BUILD/moonshard not found; building $MSH_BUILD" >&2
  ok=0
  for attempt in 1 2 3 4 5; do
    if cmake -S . -B "$MSH_BUILD" -DMSH_CUDA=OFF >&2 && cmake --build "$MSH_BUILD" -j2 >&2; then
      ok=1; break
    fi
    echo "cpu_compare: moonshard build failed (attempt $attempt); the tree may be mid-edit, retrying in 60 s" >&2
    sleep 60
  done
  [ "$ok" = 1 ] || fail "could not build moonshard"
fi

mkdir -p "$BUILD"
REF=$BUILD/ref_llama2c
cc -O3 -march=native -o "$REF" tools/bench/ref_llama2c.c -lm || fail "could not compile ref_llama2c"

# JSON number extraction without extra dependencies: json_num KEY <<< '{"KEY":1.5,...}'
json_num() { sed -n "s/.*\"$1\":\([-0-9.eE+]*\).*/\1/p" | tail -n 1; }
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) exit 1; if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

ref_rates=()
for i in $(seq 1 "$RUNS"); do
  "$REF" "$CKPT" "$TOK" "$STEPS" > "$TMP/ref.txt" 2> "$TMP/ref.err" || { cat "$TMP/ref.err" >&2; fail "ref_llama2c exited non-zero"; }
  if ! cmp -s "$TMP/ref.txt" "$GOLDEN"; then
    echo "---- ref_llama2c printed:" >&2; cat "$TMP/ref.txt" >&2; echo >&2
    cmp "$TMP/ref.txt" "$GOLDEN" >&2 || true
    fail "ref_llama2c output differs from $GOLDEN"
  fi
  line=$(grep '"impl":"ref_llama2c"' "$TMP/ref.err" | tail -n 1)
  echo "ref run $i: $line" >&2
  ref_rates+=("$(json_num tok_s <<< "$line")")
done
ref_tok_s=$(printf '%s\n' "${ref_rates[@]}" | median)
ref_tokens=$(json_num tokens <<< "$line")

run_msh() {
  local out
  out=$("$MSH_BUILD/moonshard" bench --model "$MODEL_DIR" --prompt-len 1 --gen-len "$STEPS" --loops 20 "$@") \
    || fail "moonshard bench $* failed"
  grep decode_tok_s <<< "$out" | tail -n 1
}
msh_line=$(run_msh)
echo "moonshard: $msh_line" >&2
msh_tok_s=$(json_num decode_tok_s <<< "$msh_line")
msh_threads=$(json_num threads <<< "$msh_line")
[ -n "$msh_tok_s" ] || fail "no decode_tok_s in moonshard bench output"

msh1_line=$(run_msh --threads 1)
echo "moonshard (1 thread): $msh1_line" >&2
msh1_tok_s=$(json_num decode_tok_s <<< "$msh1_line")

awk -v r="$ref_tok_s" -v m="$msh_tok_s" -v m1="$msh1_tok_s" -v t="$msh_threads" \
    -v n="$RUNS" -v k="$ref_tokens" -v cpu="$(nproc)" 'BEGIN {
  printf "{\"bench\":\"cpu_compare\",\"model\":\"stories260K\",\"gen_len\":200,\"cpus\":%d,", cpu
  printf "\"ref_tok_s\":%.1f,\"ref_runs\":%d,\"ref_tokens\":%d,\"ref_golden_match\":true,", r, n, k
  printf "\"moonshard_tok_s\":%.1f,\"moonshard_threads\":%d,\"ratio\":%.3f,", m, t, m / r
  printf "\"moonshard_1thread_tok_s\":%.1f,\"ratio_1thread\":%.3f}\n", m1, m1 / r
}'
