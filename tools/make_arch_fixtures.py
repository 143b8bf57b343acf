#!/usr/bin/env python3
"""Writes the tiny random Qwen2, Qwen3 and Mistral checkpoints used by the architecture tests,
each as a Hugging Face directory and as a GGUF twin holding the same f32 weights.

usage: python3 tools/make_arch_fixtures.py [OUTDIR]     (default tests/fixtures/arch)
       needs: pip install numpy gguf safetensors        (no torch)

Weights are float32, drawn from numpy's default_rng(20250101 + k): matrices randn * 0.08,
norm weights 1 + randn * 0.08, biases randn * 0.2. Sizes are kept small (hidden 32, vocab 256)
because the folder is committed twice over (HF + GGUF) with two reference files.

  fixture         HF class / model_type              layers hidden heads:kv head_dim ffn  notes
  qwen2           Qwen2ForCausalLM / qwen2           2      32     4:2     8        64   q/k/v biases, tied head,
                                                                                          rope_theta 1e6, config as
                                                                                          transformers 5 writes it
  qwen2-untied    Qwen2ForCausalLM / qwen2           1      32     4:2     8        64   q/k/v biases, lm_head.weight,
                                                                                          config as Qwen2.5 hub files
                                                                                          (transformers 4 spelling):
                                                                                          sliding_window 32 but
                                                                                          use_sliding_window false
                                                                                          (the window must be ignored)
  qwen3           Qwen3ForCausalLM / qwen3           2      32     4:2     16 (!)   64   head_dim != hidden/heads,
                                                                                          q_norm/k_norm per head before
                                                                                          rope, untied, rope_theta 1e6
  mistral         MistralForCausalLM / mistral       2      32     4:1     8        64   untied, rope_theta 1e4,
                                                                                          sliding_window 4096 >
                                                                                          max_position_embeddings 512,
                                                                                          transformers 4 spelling, no
                                                                                          head_dim field
  mistral-window  MistralForCausalLM / mistral       1      32     4:1     8        64   sliding_window 64 <
                                                                                          max_position_embeddings 512
                                                                                          (for the refusal of a window
                                                                                          shorter than the context; the
                                                                                          48 reference ids fit in it)

OUTDIR/
  <name>/config.json            all fields of the model's config class; "transformers 5" ones are
                                PretrainedConfig.to_json_string(use_diff=True) of transformers 5.17
                                plus architectures and dtype (rope_parameters, layer_types); the
                                "transformers 4" ones use top-level rope_theta and torch_dtype
  <name>/model.safetensors      transformers' tensor names (model.embed_tokens.weight,
                                model.layers.N.self_attn.q_proj.weight/.bias, ...q_norm.weight, ...,
                                model.norm.weight, lm_head.weight unless tied), f32, metadata format=pt
  <name>/tokenizer.json         a 256-token byte-level BPE (96 byte tokens, 157 merges learnt from a
  <name>/tokenizer_config.json  fixed text, 3 special tokens): qwen* <|endoftext|> <|im_start|>
                                <|im_end|> = 253 254 255 (bos 253, eos 255), Qwen2's Split+ByteLevel
                                pre-tokenizer; mistral* <unk> <s> </s> = 0 1 2 (bos 1, eos 2), GPT-2
                                ByteLevel, <s> added in front. The GGUF twins carry the same
                                vocabulary (tokenizer.ggml.model gpt2, pre qwen2 / gpt-2)
  <name>.gguf                   the GGUF twin, as llama.cpp's convert_hf_to_gguf.py --outtype f32
                                writes it (not for mistral-window: llama.cpp writes no sliding-window
                                key for Mistral, so it would equal mistral.gguf but for its weights):
                                general.architecture qwen2 / qwen3 / llama (Mistral is "llama");
                                Q and K rows permuted for "llama" only (qwen2/qwen3 use NEOX rope)
  ids.json                      48 token ids in [3, 253) (no special token of either layout), fixed
  numpy_reference.safetensors   ids (int32) and logits_<name> (48, 256) f32 from a float64 NumPy
                                forward of each HF directory (tools/arch_numpy_reference.py, which
                                also checks every GGUF twin against its HF weights)
  reference.safetensors         the same keys from transformers (tools/arch_reference.py, run where
                                torch is installed)
"""
import json
import os
import re
import sys

import numpy as np
import gguf
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 48
VOCAB = 256


# --------------------------------------------------------------------------------- tokenizer

def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


CORPUS = """The quick brown fox jumps over the lazy dog. A small model reads the tokens one
at a time and writes the next one. The weights are random, so the text it writes means
nothing; the tests only compare its logits with the reference. Moonshard loads Llama, Qwen
and Mistral models from Hugging Face directories and from GGUF files, then runs them on the
CPU or on a GPU. Rotary position embeddings turn each pair of numbers by an angle that grows
with the position. Grouped query attention shares the keys and values between heads. There
are 1234 lines in the file, and 5678 tokens in the batch; it's the test's job to check them.
"""

QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def make_tokenizer(specials, at_end):
    """tokens (byte-level text, id order), merges ("left right", by priority), special ids:
    the special tokens first (Mistral: <unk> <s> </s> = 0 1 2) or last (Qwen: 253 254 255)."""
    b2u = bytes_to_unicode()
    tokens = []
    alphabet = [0x0A] + list(range(0x20, 0x7F))
    tokens += [b2u[b] for b in alphabet]
    have = set(tokens)
    # pre-tokenize roughly as GPT-2 does (words with their leading space), then learn merges
    words = {}
    for w in re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", CORPUS):
        key = tuple(b2u[b] for b in w.encode())
        words[key] = words.get(key, 0) + 1
    merges = []
    while len(tokens) < VOCAB - len(specials):
        pairs = {}
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            raise SystemExit("the corpus is too small for %d tokens" % VOCAB)
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best[0] + " " + best[1])
        joined = best[0] + best[1]
        if joined not in have:
            tokens.append(joined)
            have.add(joined)
        new = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new
    if at_end:
        return tokens + list(specials), merges, list(range(len(tokens), VOCAB))
    return list(specials) + tokens, merges, list(range(len(specials)))


def tokenizer_json(tokens, merges, special_ids, style):
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in special_ids]
    # Qwen2's file leaves its special tokens (the last ids) out of model.vocab; Mistral's (Llama's)
    # lists <unk> <s> </s> in model.vocab as well as in added_tokens
    vocab = {t: i for i, t in enumerate(tokens) if style != "qwen2" or i not in special_ids}
    if style == "qwen2":
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
            byte_level]}
        normalizer = {"type": "NFC"}
        post = byte_level
        merge_list = merges                               # "left right" strings, as Qwen2's file
    else:
        pre = dict(byte_level, use_regex=True)
        normalizer = None
        post = {"type": "TemplateProcessing",             # <s> in front, as Mistral's file
                "single": [{"SpecialToken": {"id": tokens[1], "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": tokens[1], "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": tokens[1], "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {tokens[1]: {"id": tokens[1], "ids": [1], "tokens": [tokens[1]]}}}
        merge_list = [m.split(" ") for m in merges]       # [left, right] lists (tokenizers >= 0.20)
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": post,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merge_list},
    }


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>"]


# ----------------------------------------------------------------------------------- configs

def v5_config(common, extra):
    """config.json as transformers 5.17 save_pretrained writes it (use_diff=True)."""
    c = dict(common)
    c.update(extra)
    c["dtype"] = "float32"
    c["transformers_version"] = "5.17.0"
    return c


QWEN2 = v5_config({}, {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 253,
    "eos_token_id": 255, "pad_token_id": None, "hidden_act": "silu", "hidden_size": 32,
    "initializer_range": 0.02, "intermediate_size": 64,
    "layer_types": ["full_attention", "full_attention"], "max_position_embeddings": 512,
    "max_window_layers": 2, "model_type": "qwen2", "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "sliding_window": None, "tie_word_embeddings": True, "use_cache": True,
    "use_sliding_window": False, "vocab_size": VOCAB,
})

# Qwen2.5 hub style (transformers 4): top-level rope_theta, torch_dtype, a sliding_window that
# use_sliding_window false switches off.
QWEN2_UNTIED = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 253,
    "eos_token_id": 255, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
    "intermediate_size": 64, "max_position_embeddings": 512, "max_window_layers": 1,
    "model_type": "qwen2", "num_attention_heads": 4, "num_hidden_layers": 1,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": 32, "tie_word_embeddings": False, "torch_dtype": "float32",
    "transformers_version": "4.51.3", "use_cache": True, "use_sliding_window": False,
    "vocab_size": VOCAB,
}

QWEN3 = v5_config({}, {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 253, "eos_token_id": 255, "pad_token_id": None, "head_dim": 16, "hidden_act": "silu",
    "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_types": ["full_attention", "full_attention"], "max_position_embeddings": 512,
    "max_window_layers": 2, "model_type": "qwen3", "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
    "use_sliding_window": False, "vocab_size": VOCAB,
})

# Mistral-7B-v0.1 hub style (transformers 4): no head_dim, top-level rope_theta, torch_dtype.
MISTRAL = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
    "intermediate_size": 64, "max_position_embeddings": 512, "model_type": "mistral",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 1,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.44.2",
    "use_cache": True, "vocab_size": VOCAB,
}

MISTRAL_WINDOW = v5_config({}, {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": None, "head_dim": 8, "hidden_act": "silu", "hidden_size": 32,
    "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 512,
    "model_type": "mistral", "num_attention_heads": 4, "num_hidden_layers": 1,
    "num_key_value_heads": 1, "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "sliding_window": 64, "tie_word_embeddings": False, "use_cache": True, "vocab_size": VOCAB,
})

# name, config, GGUF architecture (None: no twin)
FIXTURES = [
    ("qwen2", QWEN2, "qwen2"),
    ("qwen2-untied", QWEN2_UNTIED, "qwen2"),
    ("qwen3", QWEN3, "qwen3"),
    ("mistral", MISTRAL, "llama"),
    ("mistral-window", MISTRAL_WINDOW, None),
]


def theta_of(cfg):
    rp = cfg.get("rope_parameters")
    return float(cfg["rope_theta"] if "rope_theta" in cfg else rp["rope_theta"])


def head_dim_of(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


# ----------------------------------------------------------------------------------- weights

def make_weights(cfg, seed):
    rng = np.random.default_rng(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim_of(cfg)
    qwen2 = cfg["model_type"] == "qwen2"
    qwen3 = cfg["model_type"] == "qwen3"

    def mat(r, c):
        return (rng.standard_normal((r, c)) * 0.08).astype(np.float32)

    def norm(n):
        return (1.0 + rng.standard_normal(n) * 0.08).astype(np.float32)

    def bias(n):
        return (rng.standard_normal(n) * 0.2).astype(np.float32)

    sd = {"model.embed_tokens.weight": mat(V, D)}
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        sd[p + "input_layernorm.weight"] = norm(D)
        sd[p + "self_attn.q_proj.weight"] = mat(H * hd, D)
        sd[p + "self_attn.k_proj.weight"] = mat(KV * hd, D)
        sd[p + "self_attn.v_proj.weight"] = mat(KV * hd, D)
        if qwen2:
            sd[p + "self_attn.q_proj.bias"] = bias(H * hd)
            sd[p + "self_attn.k_proj.bias"] = bias(KV * hd)
            sd[p + "self_attn.v_proj.bias"] = bias(KV * hd)
        if qwen3:
            sd[p + "self_attn.q_norm.weight"] = norm(hd)
            sd[p + "self_attn.k_norm.weight"] = norm(hd)
        sd[p + "self_attn.o_proj.weight"] = mat(D, H * hd)
        sd[p + "post_attention_layernorm.weight"] = norm(D)
        sd[p + "mlp.gate_proj.weight"] = mat(F, D)
        sd[p + "mlp.up_proj.weight"] = mat(F, D)
        sd[p + "mlp.down_proj.weight"] = mat(D, F)
    sd["model.norm.weight"] = norm(D)
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = mat(V, D)
    return sd


# -------------------------------------------------------------------------------------- GGUF

def permute(w, n_head, n_head_kv=None):
    """llama.cpp's LlamaModel.permute: the rows of each head reordered from the half-split rope
    layout (x0..x{d/2-1} | x{d/2}..) to the interleaved one (pairs 2i, 2i+1)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {  # per-layer names (after "model.layers.N.") -> after "blk.N."
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    m = re.match(r"model\.layers\.(\d+)\.(.*)$", hf)
    return "blk.%s.%s" % (m.group(1), HF_TO_GGUF[m.group(2)])


def gguf_tensors(cfg, sd, arch):
    """(gguf name, array) in llama.cpp's order: the HF file's tensors, q/k permuted for llama."""
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = []
    for name in sorted(sd, key=hf_order):
        w = sd[name]
        if arch == "llama":
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                w = permute(w, H, H)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                w = permute(w, H, KV)
        out.append((gguf_name(name), np.ascontiguousarray(w, dtype=np.float32)))
    return out


def hf_order(name):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if name == "model.embed_tokens.weight":
        return (0, 0, name)
    if m:
        return (1, int(m.group(1)), name)
    return (2, 0, name)


def write_gguf(path, name, cfg, sd, arch, tokens, merges, special_ids, tok_style):
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_type("model")
    w.add_name(name)
    # TextModel.set_gguf_parameters
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(theta_of(cfg))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim") is not None:  # written only when config.json has the field
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "llama":  # LlamaModel.set_gguf_parameters
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(head_dim_of(cfg))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # _set_vocab_gpt2 + SpecialVocab
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if tok_style == "qwen2" else "gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL
                       for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    if tok_style == "qwen2":
        w.add_pad_token_id(special_ids[0])
        w.add_add_bos_token(False)
    else:
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
    for tname, arr in gguf_tensors(cfg, sd, arch):
        w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -------------------------------------------------------------------------------------- main

def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "arch")
    os.makedirs(out, exist_ok=True)
    ids = np.random.default_rng(48).integers(3, VOCAB - 3, T).tolist()  # no special token
    with open(os.path.join(out, "ids.json"), "w") as f:
        json.dump(ids, f)
        f.write("\n")
    for k, (name, cfg, arch) in enumerate(FIXTURES):
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        sd = make_weights(cfg, 20250101 + k)
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        style = "qwen2" if cfg["model_type"].startswith("qwen") else "gpt2"
        specials = QWEN_SPECIALS if style == "qwen2" else MISTRAL_SPECIALS
        tokens, merges, special_ids = make_tokenizer(specials, at_end=(style == "qwen2"))
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            json.dump(tokenizer_json(tokens, merges, special_ids, style), f, indent=1, ensure_ascii=False)
            f.write("\n")
        tc = {"tokenizer_class": "Qwen2Tokenizer" if style == "qwen2" else "LlamaTokenizerFast",
              "bos_token": None if style == "qwen2" else specials[1], "eos_token": specials[2],
              "pad_token": specials[0] if style == "qwen2" else None, "add_bos_token": style != "qwen2",
              "model_max_length": cfg["max_position_embeddings"]}
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(tc, f, indent=2)
            f.write("\n")
        if arch is not None:
            write_gguf(os.path.join(out, name + ".gguf"), name, cfg, sd, arch, tokens, merges, special_ids, style)
        print("wrote", name, "(%d tensors, %d parameters)" % (len(sd), sum(v.size for v in sd.values())))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import arch_numpy_reference
    arch_numpy_reference.main([out])


if __name__ == "__main__":
    main()
