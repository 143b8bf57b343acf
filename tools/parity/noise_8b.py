"""How much of the 8B parity bar (top-1 agreement with transformers' bf16 logits, identical greedy
continuations) an exact bf16 implementation can meet: the same random Llama-3-8B shape as
tools/parity/hf_8b.py (same seed, same weights), computed by a plain PyTorch forward that rounds
to bf16 exactly where transformers' Llama does, then again with one change at a time:

  base          transformers' rounding points and kernels: its logits must equal transformers'
                (exit status 1 otherwise: the other rows then mean nothing)
  attn_*        attention by a named scaled_dot_product_attention backend (flash / efficient /
                math), or eager (softmax in f32, P rounded to bf16)
  fused_gemm    q, k, v in one GEMM and gate, up in another (the same sums, other cuBLAS kernels)
  no_rrp        cuBLAS without bf16 reduced-precision reductions
  rope_f32      RoPE from f32 cos and sin, rounded once (transformers rounds cos, sin and each
                product to bf16)
  act_f32       SiLU(gate) x up rounded once (transformers rounds SiLU's output, then the product)
  resid_f32     the residual stream in f32 (transformers rounds it to bf16 after every add)
  logits_f32    the head's sums kept in f32 (transformers returns bf16 logits)
  f32_between   rope_f32 + act_f32 + resid_f32 + logits_f32 (where moonshard keeps f32)

Each prints top-1 agreement over the 512 positions against transformers' bf16 (ties counted as
check_8b.lua counts them) and, for the greedy rows, how many of the 10 continuations of 64 tokens
are identical. One JSON object per line on stdout; about a minute on an H200 (36 GB of GPU memory).
Results: README.md, "The 8B parity check".

usage: python3 tools/parity/noise_8b.py [--greedy]
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_8b  # noqa: E402

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # older PyTorch
    SDPBackend = sdpa_kernel = None

BF = torch.bfloat16


def weights(model):
    sd = model.state_dict()
    L = model.config.num_hidden_layers
    layers = []
    for i in range(L):
        p = f"model.layers.{i}."
        w = {k: sd[p + v] for k, v in dict(
            q="self_attn.q_proj.weight", k="self_attn.k_proj.weight", v="self_attn.v_proj.weight",
            o="self_attn.o_proj.weight", gate="mlp.gate_proj.weight", up="mlp.up_proj.weight",
            down="mlp.down_proj.weight", n1="input_layernorm.weight", n2="post_attention_layernorm.weight").items()}
        layers.append(w)
    return dict(embed=sd["model.embed_tokens.weight"], norm=sd["model.norm.weight"],
                head=sd["lm_head.weight"], layers=layers)


def fuse(W):
    for w in W["layers"]:
        w["qkv"] = torch.cat([w["q"], w["k"], w["v"]], 0)
        w["gu"] = torch.cat([w["gate"], w["up"]], 0)


def rmsnorm(x, w, eps):
    """transformers' LlamaRMSNorm: f32 statistics, the result rounded to x's dtype, times the weight"""
    dt = x.dtype
    x = x.float()
    var = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)
    return w * x.to(BF if dt == torch.float32 else dt)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_tables(inv_freq, pos):
    freqs = inv_freq[None, :].float() * pos[:, None].float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()  # f32


def rope(x, cos, sin, v):
    """x (B, H, T, hd) bf16; cos, sin (T, hd) f32"""
    if v.get("rope_f32"):
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(BF)
    c, s = cos.to(BF), sin.to(BF)
    return (x * c) + (rotate_half(x) * s)


def attention(q, k, v, causal, scale, var):
    """q (B, H, T, hd), k, v (B, KVH, S, hd): transformers' sdpa path (K, V repeated per head)"""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    mode = var.get("attn")
    if mode == "eager":
        s = torch.matmul(q, k.transpose(2, 3)) * scale
        if causal:
            T, S = q.shape[2], k.shape[2]
            m = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            s = s.masked_fill(~m, float("-inf"))
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)
    if mode and sdpa_kernel is not None:
        be = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
              "flash": SDPBackend.FLASH_ATTENTION}[mode]
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def forward(W, cfg, ids, var, cache=None, pos0=0):
    """ids (B, T) -> logits (B, T, V); cache: list of [k, v] per layer, extended in place"""
    B, T = ids.shape
    H, KVH, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    pos = torch.arange(pos0, pos0 + T, device=ids.device)
    cos, sin = rope_tables(W["inv_freq"], pos)
    resid32 = var.get("resid_f32")
    x = W["embed"][ids]
    if resid32:
        x = x.float()
    fused = var.get("fused_gemm")
    for i, w in enumerate(W["layers"]):
        h = rmsnorm(x, w["n1"], eps)
        if fused:
            qkv = F.linear(h, w["qkv"])
            q, k, v = qkv.split([H * hd, KVH * hd, KVH * hd], dim=-1)
        else:
            q, k, v = F.linear(h, w["q"]), F.linear(h, w["k"]), F.linear(h, w["v"])
        q = q.reshape(B, T, H, hd).transpose(1, 2)
        k = k.reshape(B, T, KVH, hd).transpose(1, 2)
        v = v.reshape(B, T, KVH, hd).transpose(1, 2)
        q, k = rope(q, cos, sin, var), rope(k, cos, sin, var)
        if cache is not None:
            if len(cache) <= i:
                cache.append([k, v])
            else:
                cache[i][0] = torch.cat([cache[i][0], k], dim=2)
                cache[i][1] = torch.cat([cache[i][1], v], dim=2)
            k, v = cache[i]
        a = attention(q, k, v, T > 1, hd ** -0.5, var)
        a = a.transpose(1, 2).reshape(B, T, H * hd)
        o = F.linear(a, w["o"])
        x = x + o if not resid32 else x + o.float()
        h = rmsnorm(x, w["n2"], eps)
        if fused:
            g, u = F.linear(h, w["gu"]).chunk(2, dim=-1)
        else:
            g, u = F.linear(h, w["gate"]), F.linear(h, w["up"])
        if var.get("act_f32"):
            m = (F.silu(g.float()) * u.float()).to(BF)
        else:
            m = F.silu(g) * u
        d = F.linear(m, w["down"])
        x = x + d if not resid32 else x + d.float()
    h = rmsnorm(x, W["norm"], eps)
    if var.get("logits_f32"):  # the head's f32 sums kept (f32 GEMM of the same bf16 values, no TF32)
        return F.linear(h.float(), W["head"].float())
    return F.linear(h, W["head"])


@torch.no_grad()
def greedy(W, cfg, prompts, var, gen):
    cache = []
    lg = forward(W, cfg, prompts, var, cache, 0)
    nxt = lg[:, -1].argmax(-1, keepdim=True)
    toks = [nxt]
    P = prompts.shape[1]
    for s in range(gen - 1):
        lg = forward(W, cfg, nxt, var, cache, P + s)
        nxt = lg[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    return torch.cat(toks, dim=1).cpu().tolist()


def agreement(lg, ref_lg):
    """top-1 of lg against ref_lg's tied maxima, and strict"""
    mx = ref_lg.max(-1, keepdim=True).values
    ours = lg.float().argmax(-1)
    tied = (ref_lg.gather(-1, ours[:, None]) == mx).float().mean().item()
    strict = (ours == ref_lg.argmax(-1)).float().mean().item()
    return tied, strict


VARIANTS = [
    ("base", {}),
    ("attn_flash", {"attn": "flash"}),
    ("attn_efficient", {"attn": "efficient"}),
    ("attn_math", {"attn": "math"}),
    ("attn_eager", {"attn": "eager"}),
    ("fused_gemm", {"fused_gemm": True}),
    ("no_rrp", {"no_rrp": True}),
    ("rope_f32", {"rope_f32": True}),
    ("act_f32", {"act_f32": True}),
    ("resid_f32", {"resid_f32": True}),
    ("logits_f32", {"logits_f32": True}),
    ("f32_between", {"resid_f32": True, "rope_f32": True, "act_f32": True, "logits_f32": True}),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--greedy", action="store_true", help="greedy continuations for every variant too")
    a = ap.parse_args()
    t0 = time.time()
    model = hf_8b.build()
    cfg = model.config
    g = torch.Generator().manual_seed(42)
    V = cfg.vocab_size
    ids = torch.randint(0, V, (hf_8b.POSITIONS,), generator=g).cuda()
    prompts = torch.randint(0, V, (hf_8b.N_PROMPTS, hf_8b.PROMPT_LEN), generator=g).cuda()
    ref_lg = hf_8b.logits_of(model, ids.cpu())
    ref_greedy = hf_8b.greedy(model, prompts.cpu())
    W = weights(model)
    W["inv_freq"] = hf_8b.rotary_modules(model)[0].inv_freq.float()
    fuse(W)
    print(json.dumps({"transformers": hf_8b.transformers.__version__, "torch": torch.__version__,
                      "attn_implementation": getattr(cfg, "_attn_implementation", None),
                      "setup_s": round(time.time() - t0, 1)}), flush=True)
    for name, var in VARIANTS:
        if var.get("attn") in ("flash", "efficient", "math") and sdpa_kernel is None:
            print(json.dumps({"variant": name, "skipped": "this PyTorch has no torch.nn.attention.sdpa_kernel"}),
                  flush=True)
            continue
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = not var.get("no_rrp")
        with torch.no_grad():
            lg = forward(W, cfg, ids[None], var)[0]
        tied, strict = agreement(lg, ref_lg)
        row = {"variant": name, "top1": tied, "top1_strict": strict,
               "logits_equal": bool(torch.equal(lg.to(ref_lg.dtype), ref_lg)),
               "max_abs_diff": (lg.float() - ref_lg.float()).abs().max().item()}
        if a.greedy or name == "base":
            out = greedy(W, cfg, prompts, var, hf_8b.GEN)
            row["greedy_identical"] = sum(x == y for x, y in zip(out, ref_greedy))
        print(json.dumps(row), flush=True)
        if name == "base" and not row["logits_equal"]:
            raise SystemExit("noise_8b: the plain forward no longer reproduces transformers' logits "
                             "(its Llama changed its rounding points or kernels)")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True


if __name__ == "__main__":
    main()
