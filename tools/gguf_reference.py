#!/usr/bin/env python3
"""An independent reference for moonshard's GGUF path: the `gguf` Python package reads and
dequantizes the weights, NumPy runs the Llama forward pass in float64, and Hugging Face
`tokenizers` (built from the GGUF vocabulary, as tools/make_bpe_fixtures.py builds it) turns the
prompts into ids. Nothing here shares code with moonshard.

For each prompt it continues greedily for --steps tokens (the prompt in one pass, then one
token at a time with a KV cache) and records the prompt ids, the greedy ids and, at every step,
the --top highest logits with their ids. Output: JSON (the fixture the Lua spec
tests/lua/gguf_spec.lua compares against). With --dump FILE it also writes every step's full
logits as float32 little-endian (prompt by prompt, step by step), for a full-vocabulary
comparison (tools/gguf_parity.lua).

Usage:
  python3 tools/gguf_reference.py [MODEL.gguf] [--steps 32] [--top 8] [--dump FILE] \
      > tests/fixtures/gguf/smollm2_reference.json
  (default model: .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; needs pip install gguf numpy
   tokenizers)
  python3 tools/gguf_reference.py --ids 1,2,3 MODEL.gguf   one prompt given as ids (models whose
                                                           tokenizer is not byte-level BPE)
"""
import argparse
import json
import os
import sys

import numpy as np
import gguf
from gguf import quants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, ".cache", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(user):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


PROMPTS = [
    chatml("What is the capital of France? Answer in one word."),
    "Once upon a time, in a small village by the sea,",
    chatml("Write a haiku about the ocean."),
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    chatml("Give me three tips for learning a new language."),
]


class Model:
    def __init__(self, path):
        r = gguf.GGUFReader(path)
        self.reader = r

        def val(key, default=None):
            f = r.fields.get(key)
            return default if f is None else f.contents()

        arch = val("general.architecture")
        assert arch == "llama", arch
        self.dim = int(val("llama.embedding_length"))
        self.n_layers = int(val("llama.block_count"))
        self.n_heads = int(val("llama.attention.head_count"))
        self.n_kv = int(val("llama.attention.head_count_kv", self.n_heads))
        self.hd = self.dim // self.n_heads
        self.rot = int(val("llama.rope.dimension_count", self.hd))
        self.theta = float(val("llama.rope.freq_base", 10000.0))
        self.eps = float(val("llama.attention.layer_norm_rms_epsilon", 1e-5))
        self.val = val
        w = {}
        for t in r.tensors:
            a = quants.dequantize(t.data, t.tensor_type).astype(np.float64)
            w[t.name] = a.reshape([int(d) for d in reversed(t.shape)]) if a.ndim > 1 else a
        self.w = w
        self.embed = w["token_embd.weight"]
        self.out = w.get("output.weight", self.embed)
        # RoPE over adjacent pairs (x[2i], x[2i+1]): the convention GGUF's Q/K weights are stored in
        self.inv = self.theta ** (-np.arange(0, self.rot, 2, dtype=np.float64) / self.rot)

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):  # x (T, H, hd)
        ang = np.outer(pos, self.inv)  # (T, rot/2)
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x = x.copy()
        a, b = x[..., 0:self.rot:2].copy(), x[..., 1:self.rot:2].copy()
        x[..., 0:self.rot:2] = a * c - b * s
        x[..., 1:self.rot:2] = a * s + b * c
        return x

    def forward(self, ids, cache):
        """Logits (T, V) of tokens ids appended after the cache (a list of (K, V) per layer)."""
        T = len(ids)
        p0 = 0 if cache[0] is None else cache[0][0].shape[0]
        pos = np.arange(p0, p0 + T)
        x = self.embed[ids]
        H, KV, hd = self.n_heads, self.n_kv, self.hd
        for l in range(self.n_layers):
            g = lambda n: self.w[f"blk.{l}.{n}.weight"]
            h = self.rmsnorm(x, g("attn_norm"))
            q = self.rope((h @ g("attn_q").T).reshape(T, H, hd), pos)
            k = self.rope((h @ g("attn_k").T).reshape(T, KV, hd), pos)
            v = (h @ g("attn_v").T).reshape(T, KV, hd)
            if cache[l] is not None:
                k = np.concatenate([cache[l][0], k])
                v = np.concatenate([cache[l][1], v])
            cache[l] = (k, v)
            S = k.shape[0]
            rep = H // KV
            kk, vv = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # (S, H, hd)
            sc = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd)
            mask = np.arange(S)[None, :] > pos[:, None]
            sc = np.where(mask[None], -np.inf, sc)
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            sc /= sc.sum(-1, keepdims=True)
            att = np.einsum("hts,shd->thd", sc, vv).reshape(T, H * hd)
            x = x + att @ g("attn_output").T
            h = self.rmsnorm(x, g("ffn_norm"))
            gate, up = h @ g("ffn_gate").T, h @ g("ffn_up").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ g("ffn_down").T
        return self.rmsnorm(x, self.w["output_norm.weight"]) @ self.out.T


def hf_tokenizer(model):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import make_bpe_fixtures as mbf  # the SmolLM2 pre-tokenizer configuration, built in `tokenizers`
    tokens, merges, types, pre = mbf.read_gguf(model)
    cfg = {c[0]: c for c in mbf.CONFIGS}
    name = {"smollm": "smollm2", "gpt-2": "gpt2", "llama-bpe": "llama3", "qwen2": "qwen2"}[pre]
    _, _, _, pre_fn, ignore = cfg[name]
    return mbf.build(tokens, merges, types, pre_fn, ignore)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=MODEL)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--dump", help="write every step's full logits (f32) here")
    ap.add_argument("--ids", help="one prompt as comma-separated ids instead of the built-in prompts")
    a = ap.parse_args()
    m = Model(a.model)
    if a.ids:
        prompts = [(None, [int(x) for x in a.ids.split(",")])]
    else:
        tk = hf_tokenizer(a.model)
        prompts = [(p, tk.encode(p, add_special_tokens=False).ids) for p in PROMPTS]
    dump = open(a.dump, "wb") if a.dump else None
    cases = []
    for text, ids in prompts:
        cache = [None] * m.n_layers
        logits = m.forward(ids, cache)[-1]
        greedy, tops = [], []
        for step in range(a.steps):
            if dump:
                dump.write(logits.astype("<f4").tobytes())
            order = np.argsort(-logits, kind="stable")[: a.top]
            tops.append({"ids": [int(i) for i in order], "logits": [round(float(logits[i]), 5) for i in order]})
            nxt = int(order[0])
            greedy.append(nxt)
            if step + 1 < a.steps:
                logits = m.forward([nxt], cache)[-1]
        cases.append({"prompt": text, "prompt_ids": [int(i) for i in ids], "greedy": greedy, "top": tops})
        print(f"prompt of {len(ids)} tokens: greedy {greedy[:8]}...", file=sys.stderr)
    if dump:
        dump.close()
    json.dump({"model": os.path.basename(a.model), "steps": a.steps, "vocab_size": int(m.embed.shape[0]),
               "cases": cases}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
