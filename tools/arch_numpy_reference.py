#!/usr/bin/env python3
"""A float64 NumPy forward of the Qwen2 / Qwen3 / Mistral fixtures of tests/fixtures/arch
(written by tools/make_arch_fixtures.py, which runs this at its end), independent of torch.

usage: python3 tools/arch_numpy_reference.py [FIXDIR]   (default tests/fixtures/arch)
       needs: pip install numpy gguf safetensors

  * FIXDIR/numpy_reference.safetensors: ids (int32, T) and logits_<name> (T, vocab) float32 for
    every HF directory, from the model as transformers computes it: RMSNorm, rope in the
    half-split (rotate_half) layout with the config's theta, q/k biases (qwen2), per-head q/k
    RMSNorm before rope (qwen3), causal GQA attention (with the sliding window where the config
    turns one on), SiLU-gated MLP, tied or untied head.
  * every GGUF twin FIXDIR/<name>.gguf is read back with gguf.GGUFReader: its tensors must equal
    the HF ones (q/k rows un-permuted for general.architecture "llama"), its metadata must match
    config.json, and a forward of the GGUF weights with the rope its architecture implies in
    llama.cpp (interleaved pairs for llama, NEOX half-split for qwen2/qwen3) must give the HF
    logits.
"""
import json
import os
import sys

import numpy as np
import gguf
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, theta, interleaved):
    """x (T, heads, d): rotates pairs (i, i + d/2) (half-split), or (2i, 2i+1) (interleaved)."""
    T, _, d = x.shape
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def window_of(cfg):
    """The attention window transformers applies, or None."""
    if cfg["model_type"] == "mistral":
        return cfg.get("sliding_window")
    if cfg.get("use_sliding_window"):
        raise SystemExit("layer-dependent sliding windows are not modelled here")
    return None


def forward(cfg, w, ids, interleaved=False):
    """w: HF tensor names -> float64 arrays. Returns logits (T, V) float64."""
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg["rms_norm_eps"]
    theta = float(cfg["rope_theta"] if "rope_theta" in cfg else cfg["rope_parameters"]["rope_theta"])
    T = len(ids)
    win = window_of(cfg)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = j <= i
    if win is not None:
        allowed &= (i - j) < win
    x = w["model.embed_tokens.weight"][ids]
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        h = rmsnorm(x, w[p + "input_layernorm.weight"], eps)

        def proj(n):
            y = h @ w[p + "self_attn.%s_proj.weight" % n].T
            b = w.get(p + "self_attn.%s_proj.bias" % n)
            return y if b is None else y + b
        q = proj("q").reshape(T, H, hd)
        k = proj("k").reshape(T, KV, hd)
        v = proj("v").reshape(T, KV, hd)
        if p + "self_attn.q_norm.weight" in w:
            q = rmsnorm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rmsnorm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = rope(q, theta, interleaved), rope(k, theta, interleaved)
        o = np.empty((T, H, hd))
        for hh in range(H):
            kv = hh // (H // KV)
            s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(hd)
            s = np.where(allowed, s, -np.inf)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            o[:, hh, :] = s @ v[:, kv, :]
        x = x + o.reshape(T, H * hd) @ w[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rmsnorm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight")
    if head is None:
        assert cfg["tie_word_embeddings"], "lm_head.weight missing from an untied model"
        head = w["model.embed_tokens.weight"]
    return x @ head.T


def field(r, key):
    f = r.fields.get(key)
    if f is None:
        return None
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[-1]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return len(f.data)
    return f.parts[-1][0].item()


def check_gguf(path, cfg, sd, ids, ref):
    import make_arch_fixtures as mk
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")
    want_arch = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}[cfg["model_type"]]
    assert arch == want_arch, (path, arch)
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    theta = float(cfg["rope_theta"] if "rope_theta" in cfg else cfg["rope_parameters"]["rope_theta"])
    meta = {
        "block_count": cfg["num_hidden_layers"], "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"], "feed_forward_length": cfg["intermediate_size"],
        "attention.head_count": H, "attention.head_count_kv": KV,
    }
    for k, v in meta.items():
        assert field(r, arch + "." + k) == v, (path, k, field(r, arch + "." + k), v)
    assert abs(field(r, arch + ".rope.freq_base") - theta) <= 1e-6 * theta
    assert abs(field(r, arch + ".attention.layer_norm_rms_epsilon") - cfg["rms_norm_eps"]) < 1e-12
    if cfg.get("head_dim") is not None:
        assert field(r, arch + ".attention.key_length") == hd
        assert field(r, arch + ".attention.value_length") == hd
    else:
        assert field(r, arch + ".attention.key_length") is None
    if arch == "llama":
        assert field(r, "llama.vocab_size") == cfg["vocab_size"]
        assert field(r, "llama.rope.dimension_count") == hd
    assert field(r, "tokenizer.ggml.tokens") == cfg["vocab_size"]
    assert field(r, "tokenizer.ggml.bos_token_id") == cfg["bos_token_id"]
    assert field(r, "tokenizer.ggml.eos_token_id") == cfg["eos_token_id"]
    tensors = {t.name: t for t in r.tensors}
    want = {mk.gguf_name(n) for n in sd}
    assert set(tensors) == want, (path, sorted(set(tensors) ^ want))
    back = {}
    for n, a in sd.items():
        t = tensors[mk.gguf_name(n)]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, (n, t.tensor_type)
        g = np.asarray(t.data).reshape(a.shape)
        if arch == "llama" and n.endswith(("q_proj.weight", "q_proj.bias")):
            g = mk.unpermute(g, H)
        elif arch == "llama" and n.endswith(("k_proj.weight", "k_proj.bias")):
            g = mk.unpermute(g, KV)
        assert np.array_equal(g, a), (path, n)
        back[n] = np.asarray(tensors[mk.gguf_name(n)].data, dtype=np.float64).reshape(a.shape)
    # the file's own weights, with llama.cpp's rope for the architecture
    got = forward(cfg, back, ids, interleaved=(arch == "llama"))
    err = np.abs(got - ref).max()
    assert err < 1e-9, (path, err)
    return arch, err


def main(argv):
    fixdir = argv[0] if argv else os.path.join(ROOT, "tests", "fixtures", "arch")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(fixdir, "ids.json")) as f:
        ids = np.array(json.load(f), dtype=np.int64)
    out = {"ids": ids.astype(np.int32)}
    for name in sorted(os.listdir(fixdir)):
        d = os.path.join(fixdir, name)
        if not os.path.isfile(os.path.join(d, "config.json")):
            continue
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        sd = load_file(os.path.join(d, "model.safetensors"))
        w = {k: v.astype(np.float64) for k, v in sd.items()}
        logits = forward(cfg, w, ids)
        out["logits_" + name] = logits.astype(np.float32)
        line = "%-15s %-8s logits %s max|logit| %.4f" % (name, cfg["model_type"], logits.shape,
                                                        np.abs(logits).max())
        g = os.path.join(fixdir, name + ".gguf")
        if os.path.exists(g):
            arch, err = check_gguf(g, cfg, sd, ids, logits)
            line += "  gguf (%s) tensors equal, logits err %.1e" % (arch, err)
        print(line)
    save_file(out, os.path.join(fixdir, "numpy_reference.safetensors"))
    print("wrote", os.path.join(fixdir, "numpy_reference.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1:])
