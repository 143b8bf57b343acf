#!/usr/bin/env python3
"""llama.cpp's prefill and decode speed on a GGUF file, measured the way `moonshard bench` measures
its own: the same synthetic prompt (token i is (i * 7919) % vocab), the prompt in one pass, then
greedy decoding one token at a time; a warm-up run, then the median of --loops runs. Prints one
JSON object. Uses llama-cpp-python (pip install llama-cpp-python builds llama.cpp for this CPU).

Usage: python3 tools/bench/llamacpp_bench.py MODEL.gguf [--prompt-len 128] [--gen-len 128]
                                            [--loops 5] [--threads 2]
"""
import argparse
import json
import statistics
import time

import numpy as np
import llama_cpp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--loops", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    n_ctx = a.prompt_len + a.gen_len + 8
    llm = llama_cpp.Llama(a.model, n_ctx=n_ctx, n_batch=max(a.prompt_len, 32), n_ubatch=max(a.prompt_len, 32),
                          n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    vocab = llm.n_vocab()
    prompt = [(i * 7919) % vocab for i in range(1, a.prompt_len + 1)]

    def last_logits():  # the last token's logits, read in place
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(vocab,))

    def once():
        llm.reset()  # eval() drops the cache past n_tokens
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(last_logits()))
        t1 = time.perf_counter()
        for _ in range(a.gen_len - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    for _ in range(a.warmup):
        once()
    pre, dec = [], []
    for _ in range(a.loops):
        p, d = once()
        pre.append(p)
        dec.append(d)
    p, d = statistics.median(pre), statistics.median(dec)
    print(json.dumps({
        "engine": "llama.cpp", "version": "llama-cpp-python " + llama_cpp.__version__, "model": a.model,
        "threads": a.threads, "prompt_len": a.prompt_len, "gen_len": a.gen_len, "loops": a.loops,
        "prefill_tok_s": a.prompt_len / p, "decode_tok_s": (a.gen_len - 1) / d,
    }))


if __name__ == "__main__":
    main()
