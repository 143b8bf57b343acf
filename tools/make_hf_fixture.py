"""Writes the small random Llama checkpoints in Hugging Face format used by the tests, with
reference logits computed by PyTorch + transformers.

usage: python3 tools/make_hf_fixture.py OUTDIR

OUTDIR/
  f32/      config.json, model.safetensors            (GQA 8:2, 3 layers, untied head)
  bf16/     config.json, model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
            (the same weights rounded to bf16, in two shards)
  llama3/   config.json, model.safetensors            (Llama-3 rope scaling, tied embeddings,
            head_dim != hidden/heads is not used by Llama; GQA 4:1)
  reference.safetensors  ids (T) int32 and logits_<name> (T, vocab) f32 for each model, computed
            in float32 (the bf16 model's weights are upcast, so its reference is exact f32 math
            over bf16-rounded weights)
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

out = sys.argv[1]
torch.manual_seed(1234)
T = 48
VOCAB = 256


def make(cfg):
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # transformers' init leaves norms at 1: randomize everything
            p.copy_(torch.randn_like(p) * 0.08 + (1.0 if p.dim() == 1 else 0.0))
    return model


def save(model, name, dtype=torch.float32, shards=1):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    model.config.torch_dtype = "float32" if dtype == torch.float32 else "bfloat16"
    cfg = model.config.to_dict()
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if shards == 1:
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(sd)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": {}}
    for s in range(shards):
        fname = "model-%05d-of-%05d.safetensors" % (s + 1, shards)
        part = {k: sd[k] for k in keys[s::shards]}
        save_file(part, os.path.join(d, fname), metadata={"format": "pt"})
        for k in part:
            index["weight_map"][k] = fname
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def logits(model, ids):
    with torch.no_grad():
        return model(ids[None, :]).logits[0].float().contiguous()


base = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                   attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2)
m32 = make(base)
ids = torch.randint(3, VOCAB, (T,), dtype=torch.long)
ref = {"ids": ids.to(torch.int32)}

save(m32, "f32")
ref["logits_f32"] = logits(m32, ids)

mbf = make(base)
mbf.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in m32.state_dict().items()})
save(mbf, "bf16", dtype=torch.bfloat16, shards=2)
ref["logits_bf16"] = logits(mbf, ids)

l3 = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                 rms_norm_eps=1e-6, rope_theta=500000.0, tie_word_embeddings=True,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                 bos_token_id=1, eos_token_id=2)
m3 = make(l3)
m3.lm_head.weight = m3.model.embed_tokens.weight
save(m3, "llama3")
ref["logits_llama3"] = logits(m3, ids)

save_file(ref, os.path.join(out, "reference.safetensors"))
print("wrote", out, {k: tuple(v.shape) for k, v in ref.items()})
