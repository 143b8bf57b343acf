#!/bin/sh
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each for SECONDS (default 60).
#   tools/fuzz/run.sh [SECONDS] [TARGET...]      targets: safetensors (default), tokenizer, gguf, bpe,
#                                                llama2c, http, lua (the Lua-side parsers, tools/fuzz/lua_fuzz.lua),
#                                                lua-tokenizer (tokenizer.json / tokenizer_config.json),
#                                                lua-gguf (GGUF metadata to a description and tokenizer)
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SECS=${1:-60}
[ $# -gt 0 ] && shift
TARGETS=${*:-safetensors}
OUT=${MSH_FUZZ_DIR:-$ROOT/build-fuzz}
mkdir -p "$OUT"
CC=${CC:-clang}
CFLAGS="-std=gnu11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
  -I$ROOT/core/include -I$ROOT/core/src -DMSH_VERSION=\"fuzz\""
CORE="$ROOT/core/src/status.c $ROOT/core/src/dtype.c $ROOT/core/src/file.c $ROOT/core/src/tensor.c
  $ROOT/tools/fuzz/backend_stub.c"
for t in $TARGETS; do
  OBJS=$CORE
  case $t in
    # the Lua-side parsers (config.json through moonshard.validate, argument parsing, chat-template
    # detection, the rendezvous frame reader; tokenizer.json and tokenizer_config.json; GGUF
    # metadata), mutated from tools/fuzz/seeds_lua by a Lua fuzzer run inside the moonshard host
    # (MSH_FUZZ_EXE, default build/moonshard), SECONDS for each of the three targets
    lua|lua-tokenizer|lua-gguf)
      case $t in
        lua) KINDS=config,argv,template,frame,openai ;;
        lua-tokenizer) KINDS=tokenizer ;;
        lua-gguf) KINDS=gguf ;;
      esac
      "${MSH_FUZZ_EXE:-$ROOT/build/moonshard}" "$ROOT/tools/fuzz/lua_fuzz.lua" "$SECS" "$ROOT/tools/fuzz/seeds_lua" "$KINDS"
      continue ;;
  esac
  case $t in
    safetensors) SRC="$ROOT/core/src/safetensors.c"; LIBS=$(pkg-config --libs libcjson) ;;
    tokenizer) SRC="-DMSH_DATA_DIR=\"$ROOT/../shared/data\""; LIBS="" ;;
    # the GGUF target brings its own CPU allocator (the stub keeps only the backend table)
    gguf) SRC="$ROOT/core/src/gguf.c -DMSH_FUZZ_OWN_CPU"; LIBS="" ;;
    # the BPE target includes the tokenizer's source
    bpe) SRC="-I$ROOT/tests/c -DMSH_ROOT=\"$ROOT\""; LIBS=$(pkg-config --libs libpcre2-8)
         OBJS="$ROOT/core/src/status.c" ;;
    # HTTP messages (moonshard serve's requests, bench-serve's responses) through http_parser
    http) SRC="$ROOT/core/src/http.c"; LIBS="-lhttp_parser"
          OBJS="$ROOT/core/src/status.c" ;;
    # the header check needs only files and statuses
    llama2c) SRC="$ROOT/core/src/llama2c.c"; LIBS=""
             OBJS="$ROOT/core/src/status.c $ROOT/core/src/file.c" ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086
  $CC $CFLAGS -o "$OUT/fuzz_$t" "$ROOT/tools/fuzz/fuzz_$t.c" $SRC $OBJS $LIBS -lm
  mkdir -p "$OUT/corpus_$t"
  cp "$ROOT"/tools/fuzz/seeds_$t/* "$OUT/corpus_$t/" 2>/dev/null || true
  [ "$t" = gguf ] && cp "$ROOT/tests/fixtures/gguf/synth.gguf" "$OUT/corpus_$t/" 2>/dev/null
  DICT=""
  [ -f "$ROOT/tools/fuzz/$t.dict" ] && DICT="-dict=$ROOT/tools/fuzz/$t.dict"
  # shellcheck disable=SC2086
  "$OUT/fuzz_$t" -max_total_time="$SECS" -max_len=4096 -print_final_stats=1 $DICT "$OUT/corpus_$t"
done
