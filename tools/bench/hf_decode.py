"""Hugging Face transformers (eager) on the same shape as `moonshard bench --dummy CONFIG`, for
a peer figure measured in the same run: random bf16 weights on the GPU, greedy decode with the
KV cache, batch 1. Prints one JSON line.

usage: python3 tools/bench/hf_decode.py CONFIG.json [--prompt-len 128] [--gen-len 64] [--batch-size 1]
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--prompt-len", type=int, default=128)
ap.add_argument("--gen-len", type=int, default=64)
ap.add_argument("--batch-size", type=int, default=1)
a = ap.parse_args()

cfg = LlamaConfig(**json.load(open(a.config)))
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
ids = torch.randint(0, cfg.vocab_size, (a.batch_size, a.prompt_len), device="cuda")


def run():
    with torch.no_grad():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(a.gen_len - 1):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


run()
pre, dec = run()
print(json.dumps({
    "impl": "transformers-eager", "config": a.config, "batch_size": a.batch_size,
    "prompt_len": a.prompt_len, "gen_len": a.gen_len,
    "prefill_tok_s": a.batch_size * a.prompt_len / pre,
    "decode_tok_s": a.batch_size * (a.gen_len - 1) / dec,
}))
