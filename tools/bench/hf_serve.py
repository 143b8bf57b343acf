"""Hugging Face transformers' batched `generate` on the requests `moonshard bench-serve --dummy
CONFIG --num-requests N --input-len I --output-len O` replays: random bf16 weights of the same
shape on the GPU, N prompts of I random token ids, each generating exactly O tokens (greedy, no
end-of-sequence stop), in static batches of --batch-size (equal lengths: no padding). The
reference figure for serving throughput measured in the same run. Prints one JSON line.

usage: python3 tools/bench/hf_serve.py CONFIG.json [--num-requests 1024] [--input-len 128]
           [--output-len 128] [--batch-size 256] [--max-requests N]

--max-requests times only the first N requests (whole batches) and reports the rate over them,
for when transformers would take longer than the run can wait.
"""
import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--num-requests", type=int, default=1024)
ap.add_argument("--input-len", type=int, default=128)
ap.add_argument("--output-len", type=int, default=128)
ap.add_argument("--batch-size", type=int, default=256)
ap.add_argument("--max-requests", type=int, default=0)
a = ap.parse_args()

cfg_dict = json.load(open(a.config))
cfg = AutoConfig.for_model(cfg_dict.get("model_type", "llama"), **{k: v for k, v in cfg_dict.items() if k != "model_type"})
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
n = a.num_requests if a.max_requests <= 0 else min(a.num_requests, a.max_requests)
ids = torch.randint(0, cfg.vocab_size, (n, a.input_len), device="cuda")
gen = dict(max_new_tokens=a.output_len, min_new_tokens=a.output_len, do_sample=False, eos_token_id=None,
           pad_token_id=0, use_cache=True)

with torch.no_grad():
    model.generate(ids[: min(n, a.batch_size), :8], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                   eos_token_id=None, pad_token_id=0)  # warm-up: kernels chosen, memory pools made
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out_tokens = 0
    for s in range(0, n, a.batch_size):
        batch = ids[s : s + a.batch_size]
        out = model.generate(batch, attention_mask=torch.ones_like(batch), **gen)
        out_tokens += (out.shape[1] - a.input_len) * out.shape[0]
    torch.cuda.synchronize()
    dur = time.perf_counter() - t0

print(json.dumps({
    "impl": "transformers-generate", "transformers": __import__("transformers").__version__,
    "config": a.config, "requests": n, "input_len": a.input_len, "output_len": a.output_len,
    "batch_size": a.batch_size, "duration_s": dur, "output_tokens": out_tokens,
    "output_tok_s": out_tokens / dur, "total_tok_s": (out_tokens + n * a.input_len) / dur,
    "peak_memory_bytes": torch.cuda.max_memory_allocated(),
}))
