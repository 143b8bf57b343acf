#!/usr/bin/env python3
"""Reference logits from PyTorch + transformers for the architecture fixtures written by
tools/make_arch_fixtures.py (Qwen2, Qwen3, Mistral).

usage: python3 tools/arch_reference.py [FIXDIR]   (default tests/fixtures/arch)
       needs torch, transformers, safetensors; runs on a GPU machine or on the CPU (CPU is used:
       the fixtures are tiny and float32 on the CPU avoids TF32)

Every FIXDIR/<name>/ with a config.json is loaded with AutoModelForCausalLM (float32, eval,
attn_implementation="eager"); a missing or unexpected weight, or any load error, stops the run.
FIXDIR/ids.json (48 ids) is run in one forward and FIXDIR/reference.safetensors gets
  ids            (48,) int32
  logits_<name>  (48, vocab) float32
It prints the transformers version, each fixture's max |logit|, and, where
numpy_reference.safetensors is present, the largest difference from the NumPy float64 forward.
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(d):
    kw = dict(attn_implementation="eager", output_loading_info=True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw)
    except TypeError:  # transformers 4 spells it torch_dtype
        model, info = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, **kw)
    cfg = model.config
    missing = [k for k in info.get("missing_keys", [])
               if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    bad = {k: v for k, v in (("missing", missing), ("unexpected", info.get("unexpected_keys", [])),
                             ("mismatched", info.get("mismatched_keys", []))) if v}
    if bad:
        raise SystemExit("%s: weights not loaded as saved: %s" % (d, bad))
    return model.float().eval()


def main():
    fixdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests", "fixtures", "arch")
    print("torch", torch.__version__, "transformers", transformers.__version__)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with open(os.path.join(fixdir, "ids.json")) as f:
        ids = torch.tensor(json.load(f), dtype=torch.long)
    npref_path = os.path.join(fixdir, "numpy_reference.safetensors")
    npref = load_file(npref_path) if os.path.exists(npref_path) else {}
    out = {"ids": ids.to(torch.int32)}
    names = sorted(n for n in os.listdir(fixdir) if os.path.isfile(os.path.join(fixdir, n, "config.json")))
    if not names:
        raise SystemExit("no fixture directories under " + fixdir)
    for name in names:
        d = os.path.join(fixdir, name)
        try:
            model = load(d)
        except SystemExit:
            raise
        except Exception as e:  # fail loudly, naming the fixture
            raise SystemExit("%s: transformers cannot load it: %s: %s" % (d, type(e).__name__, e))
        with torch.no_grad():
            logits = model(ids[None, :]).logits[0].float().contiguous()
        out["logits_" + name] = logits
        line = "%-15s %-22s logits %s max|logit| %.4f" % (name, type(model).__name__, tuple(logits.shape),
                                                         logits.abs().max().item())
        if "logits_" + name in npref:
            line += "  max|transformers - numpy| %.2e" % (logits - npref["logits_" + name]).abs().max().item()
        print(line)
    save_file(out, os.path.join(fixdir, "reference.safetensors"))
    print("wrote", os.path.join(fixdir, "reference.safetensors"), sorted(out))


if __name__ == "__main__":
    main()
