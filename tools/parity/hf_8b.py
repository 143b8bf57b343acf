"""A random-weight Llama-3-8B-shaped model made with PyTorch + transformers on the GPU, saved in
Hugging Face format (config.json, sharded safetensors with model.safetensors.index.json), and
transformers' own answers on it for tools/parity/check_8b.lua to compare with moonshard's:

  reference.json
    ids               512 fixed token ids (random, seeded: no tokenizer is needed)
    top1_bf16         transformers' bf16 model: argmax of the logits at each of the 512 positions
    ties_bf16         per position, every token whose bf16 logit equals the maximum (the logits
                      are rounded to bf16, so several tokens may share the top value)
    top5_bf16, top5_logits_bf16   the 5 largest logits per position and their tokens
    top1_f32          the same weights upcast to f32, computed in f32 (how far bf16 itself drifts)
    prompts           10 prompts of 32 random token ids
    greedy_bf16       64 greedy tokens after each prompt (bf16 model, KV cache)
    greedy_f32        the same in f32
    meta              versions, device, timings

usage: python3 tools/parity/hf_8b.py DIR [--force]

DIR is reused when it holds a complete earlier run (DIR/COMPLETE); --force rebuilds it. Weights:
normal(0, 0.02) for every matrix (embedding and head included), norms at 1, drawn on the GPU
from a fixed seed. Needs about 36 GB of GPU memory and 16 GB of disk; about a minute on an H100.
"""
import argparse
import json
import os
import sys
import time

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

POSITIONS = 512
N_PROMPTS = 10
PROMPT_LEN = 32
GEN = 64
SHARD_BYTES = 4 << 30

CONFIG = dict(
    model_type="llama", architectures=["LlamaForCausalLM"],
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu",
    attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
    initializer_range=0.02,
)


def log(*a):
    print("hf_8b:", *a, file=sys.stderr, flush=True)


def rotary_modules(model):
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def build():
    cfg = LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)  # f32 (about 32 GB), cast to bf16 below
    model.eval()
    # the rotary frequencies transformers computes must be the config's (theta 500000)
    want = 1.0 / (CONFIG["rope_theta"] ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    rots = rotary_modules(model)
    if not rots:
        raise SystemExit("hf_8b: no rotary embedding module with inv_freq found in the model")
    for m in rots:
        inv = m.inv_freq.float().cpu()
        if inv.shape != want.shape or not torch.allclose(inv, want, rtol=1e-5):
            raise SystemExit("hf_8b: transformers did not take rope_theta 500000 from the config "
                             f"(inv_freq[1] = {inv[1].item():.6g}, want {want[1].item():.6g})")
    # every weight drawn here, whatever the library's own initialization did
    g = torch.Generator(device="cuda")
    g.manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model = model.to(torch.bfloat16)
    # Module.to() casts buffers too: keep the rotary frequencies in f32, as a model loaded with
    # from_pretrained(dtype=bfloat16) has them (bf16 frequencies would shift late positions' angles)
    for m in rots:
        m.inv_freq = want.to(m.inv_freq.device)
        if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
            m.original_inv_freq = want.to(m.inv_freq.device)
    log(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {time.time() - t0:.1f} s")
    return model


def save(model, d):
    t0 = time.time()
    os.makedirs(d, exist_ok=True)
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = "bfloat16"
    if "dtype" in cfg:  # transformers 5 spells it so
        cfg["dtype"] = "bfloat16"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True, default=str)
    sd = model.state_dict()
    names = sorted(sd)
    shards, cur, size = [], [], 0
    for k in names:
        b = sd[k].numel() * sd[k].element_size()
        if cur and size + b > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += b
    shards.append(cur)
    index = {"metadata": {"total_size": sum(sd[k].numel() * sd[k].element_size() for k in names)},
             "weight_map": {}}
    for i, part in enumerate(shards):
        fname = "model-%05d-of-%05d.safetensors" % (i + 1, len(shards))
        save_file({k: sd[k].detach().to("cpu").contiguous() for k in part}, os.path.join(d, fname),
                  metadata={"format": "pt"})
        for k in part:
            index["weight_map"][k] = fname
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    log(f"saved {len(shards)} shards, {index['metadata']['total_size'] / 1e9:.1f} GB, in {time.time() - t0:.1f} s")


@torch.no_grad()
def logits_of(model, ids):
    return model(ids[None, :].cuda(), use_cache=False).logits[0]


@torch.no_grad()
def greedy(model, prompts):
    """GEN greedy tokens after each prompt (all of one length: one batch), with the KV cache."""
    x = prompts.cuda()
    out = model(x, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    toks = [nxt]
    for _ in range(GEN - 1):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    return torch.cat(toks, dim=1).cpu().tolist()


def reference(model):
    g = torch.Generator().manual_seed(42)
    V = CONFIG["vocab_size"]
    ids = torch.randint(0, V, (POSITIONS,), generator=g)
    prompts = torch.randint(0, V, (N_PROMPTS, PROMPT_LEN), generator=g)
    ref = {"ids": ids.tolist(), "prompts": prompts.tolist()}
    t0 = time.time()
    lg = logits_of(model, ids)  # (512, V) bf16
    mx = lg.max(dim=-1, keepdim=True).values
    ref["top1_bf16"] = lg.argmax(-1).cpu().tolist()
    ties = []
    for row in (lg == mx).nonzero().cpu().tolist():
        while len(ties) <= row[0]:
            ties.append([])
        ties[row[0]].append(row[1])
    ref["ties_bf16"] = [t[:16] for t in ties]
    v5, i5 = lg.float().topk(5, dim=-1)
    ref["top5_bf16"] = i5.cpu().tolist()
    ref["top5_logits_bf16"] = v5.cpu().tolist()
    del lg
    ref["greedy_bf16"] = greedy(model, prompts)
    t_bf16 = time.time() - t0
    t0 = time.time()
    torch.cuda.empty_cache()
    model.float()  # the same weights, exactly upcast (the rotary frequencies were f32 already)
    ref["top1_f32"] = logits_of(model, ids).argmax(-1).cpu().tolist()
    ref["greedy_f32"] = greedy(model, prompts)
    t_f32 = time.time() - t0
    agree = sum(a == b for a, b in zip(ref["top1_bf16"], ref["top1_f32"])) / POSITIONS
    same = sum(a == b for a, b in zip(ref["greedy_bf16"], ref["greedy_f32"]))
    ref["meta"] = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0), "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "seconds_bf16": t_bf16, "seconds_f32": t_f32,
        "hf_bf16_vs_f32_top1": agree, "hf_bf16_vs_f32_prompts_identical": same,
        "positions": POSITIONS, "prompt_len": PROMPT_LEN, "gen": GEN,
    }
    log(f"reference: bf16 {t_bf16:.1f} s, f32 {t_f32:.1f} s; transformers bf16 vs f32: top-1 {agree:.4f}, "
        f"greedy identical {same}/{N_PROMPTS}")
    return ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--force", action="store_true", help="rebuild even when DIR holds a complete run")
    a = ap.parse_args()
    done = os.path.join(a.dir, "COMPLETE")
    if os.path.exists(done) and not a.force:
        log(f"reusing {a.dir}")
        return
    if os.path.exists(done):
        os.remove(done)
    if not torch.cuda.is_available():
        raise SystemExit("hf_8b: no CUDA device visible to PyTorch")
    t0 = time.time()
    model = build()
    save(model, a.dir)
    ref = reference(model)
    with open(os.path.join(a.dir, "reference.json"), "w") as f:
        json.dump(ref, f)
    with open(done, "w") as f:
        f.write(json.dumps(ref["meta"]) + "\n")
    log(f"done in {time.time() - t0:.1f} s: {a.dir}")


if __name__ == "__main__":
    main()
