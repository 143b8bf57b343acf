#!/usr/bin/env python3
"""An independent check of `moonshard eval`'s scores: for the first N ARC-Easy and PIQA items,
each choice's summed log-probability (the loglikelihood request) and each item's pick, from a
NumPy float64 forward pass over the SmolLM2 GGUF weights dequantized by the `gguf` package
(tools/gguf_reference.py's Model), against moonshard's with --dtype f32 (the same token ids, read
from its --log-samples output). Agreement: |difference| <= 1e-3 nats and the same pick.

Usage: python3 tools/eval_reference.py [--model M.gguf] [--limit 20] [--exe build/moonshard]
Prints one line per disagreement and a summary; exit status 1 when any item disagrees.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from gguf_reference import Model  # noqa: E402


def logsoftmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, ".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--exe", default=os.path.join(ROOT, "build/moonshard"))
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--tol-token", type=float, default=1e-5, help="nats per scored token (long endings)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        subprocess.run([a.exe, "eval", "--model", a.model, "--dtype", "f32", "--tasks", "arc_easy,piqa",
                        "--limit", str(a.limit), "--batch-size", "8", "--log-samples", "--output", out],
                       check=True, stdout=subprocess.DEVNULL)
        res = json.load(open(out))
    m = Model(a.model)
    worst, worst_token, bad, n = 0.0, 0.0, 0, 0
    for task in ("arc_easy", "piqa"):
        for s in res["samples"][task]:
            lls = []
            for c, r in enumerate(s["requests"]):
                ids, first = r["ids"], r["first"]
                lp = logsoftmax(m.forward(ids[:-1], [None] * m.n_layers))
                ll = float(sum(lp[p - 1, ids[p]] for p in range(first, len(ids))))
                lls.append(ll)
                diff = abs(ll - s["loglikelihoods"][c])
                scored = len(ids) - first
                worst = max(worst, diff)
                worst_token = max(worst_token, diff / max(scored, 1))
                if diff > max(a.tol, a.tol_token * scored):
                    bad += 1
                    print(f"{task} doc {s['doc_id']} choice {c} ({scored} tokens): moonshard {s['loglikelihoods'][c]:.6f}, "
                          f"reference {ll:.6f}")
            pick = int(np.argmax(lls))
            if pick != s["pick"]:
                bad += 1
                print(f"{task} doc {s['doc_id']}: moonshard picks {s['pick']}, the reference {pick}")
            n += 1
    print(f"{n} items ({a.limit} per task), {bad} disagreements, largest |difference| {worst:.2e} nats, "
          f"{worst_token:.2e} nats per scored token")
    if bad == 0:
        print("all agree")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
