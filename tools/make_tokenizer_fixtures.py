#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/tiny_random_tokens.json: token ids that llama.cpp (through
llama-cpp-python, an independent implementation) gives for the 32000-token SentencePiece ("llama")
vocabulary of ../shared/data/models/tiny-random-gguf/tiny-random-llama.gguf, with and without
special-token parsing, no BOS. Read by tests/lua/bpe_spec.lua.

Usage: python3 tools/make_tokenizer_fixtures.py   (needs pip install llama-cpp-python)
"""
import json
import os

import llama_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "..", "shared", "data", "models", "tiny-random-gguf", "tiny-random-llama.gguf")
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf", "tiny_random_tokens.json")

CASES = [
    "Hello world", "Once upon a time, Lily went to the park.", "na\u00efve caf\u00e9 \u65e5\u672c \U0001F642",
    "  two leading spaces", "trailing  ", "line1\nline2\ttab\r\n", "1234567890 3.14159",
    "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST] Hello </s><s>[INST] again [/INST]",
    "don't stop", "e\u0301 a\u0308 \u0645\u0631\u062d\u0628\u0627 \u041f\u0440\u0438\u0432\u0435\u0442",
    "def f(x):\n    return x ** 2\n", "\U0001F44D\U0001F3FD \u00a0nbsp", "a" * 50, "x</s>y<unk>z",
]


def main():
    m = llama_cpp.Llama(TINY, vocab_only=True, verbose=False)
    out = []
    for c in CASES:
        out.append({"text": c,
                    "ids": m.tokenize(c.encode(), add_bos=False, special=False),
                    "ids_special": m.tokenize(c.encode(), add_bos=False, special=True)})
    with open(OUT, "w") as f:
        json.dump({"source": f"llama-cpp-python {llama_cpp.__version__}", "cases": out}, f, indent=1,
                  ensure_ascii=False)
        f.write("\n")
    print(f"{OUT}: {len(out)} cases")


if __name__ == "__main__":
    main()
