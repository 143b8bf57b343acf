#!/usr/bin/env python3
"""eval_picks.py REFERENCE.json OTHER.json [OTHER.json ...]: the rows of README's placement table.

Each file is `moonshard eval --output F --log-samples` of multiple-choice tasks. For every OTHER,
per task: acc / acc_norm, how many documents pick the same choice as REFERENCE (by log-probability
sum and by its length-normalised form), and the largest difference of any choice's summed
log-probability; for each document whose pick moved, the reference's margin of its pick over the
new one against that document's largest change (a move by arithmetic has a margin of at most the
two sums' changes). Exit status 1 when a file lacks a task or a document of the reference.
"""
import json
import sys


def load(path):
    with open(path) as f:
        res = json.load(f)
    if "samples" not in res:
        sys.exit(f"{path}: no samples (run eval with --log-samples)")
    return res


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    ref = load(argv[1])
    status = 0
    for path in argv[2:]:
        other = load(path)
        place = other.get("config", {}).get("placement", {})
        print(f"{path}: {json.dumps(place, sort_keys=True)}")
        for task, rs in ref["samples"].items():
            os_ = other["samples"].get(task)
            if os_ is None or len(os_) != len(rs):
                print(f"  {task}: missing or of another length")
                status = 1
                continue
            same = same_n = 0
            worst = 0.0
            moved = []
            for a, b in zip(rs, os_):
                same += a["pick"] == b["pick"]
                same_n += a.get("pick_norm") == b.get("pick_norm")
                doc_worst = 0.0
                for x, y in zip(a["loglikelihoods"], b["loglikelihoods"]):
                    doc_worst = max(doc_worst, abs(x - y))
                worst = max(worst, doc_worst)
                if a["pick"] != b["pick"]:
                    ll = a["loglikelihoods"]
                    moved.append((a.get("doc_id"), ll[a["pick"]] - ll[b["pick"]], doc_worst))
            r = other["results"][task]
            acc, accn = r.get("acc,none"), r.get("acc_norm,none")
            print(f"  {task}: acc {acc:.3f} / acc_norm {accn if accn is None else format(accn, '.3f')}, "
                  f"same picks {same}/{len(rs)} (normalised {same_n}/{len(rs)}), largest |d log p| {worst:.2g}")
            # a pick that moves by arithmetic had a reference margin (its choice over the new one)
            # smaller than twice that document's largest change of a sum
            for doc, margin, dw in moved:
                print(f"    moved: document {doc}, reference margin {margin:.3g} nats, the document's largest "
                      f"|d log p| {dw:.3g} ({'within' if margin <= 2 * dw else 'BEYOND'} twice its change)")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
