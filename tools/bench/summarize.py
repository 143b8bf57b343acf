"""Prints a short table of `moonshard bench` and peer JSON lines (one object per line)."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
hf = [r for r in rows if r.get("impl") == "transformers-eager"]
for r in rows:
    if r.get("impl"):
        print(f"transformers eager, batch {r['batch_size']}: decode {r['decode_tok_s']:.1f} tok/s, "
              f"prefill {r['prefill_tok_s']:.0f} tok/s")
        continue
    par = f" tp{r['tp']} pp{r['pp']}" if r.get("world") else ""
    if r.get("micro_batches"):
        par += f" m{r['micro_batches']}"
    batch = f" batch {r['batch_size']}" if r.get("batch_size", 1) > 1 else ""
    line = (f"moonshard {r['model'].split('/')[-1]}{par}{batch} {r['dtype']} prompt {r['prompt_len']}: "
            f"decode {r['decode_tok_s']:.1f} tok/s ({r['decode_step_ms']:.2f} ms/token), "
            f"prefill {r['prefill_tok_s']:.0f} tok/s")
    if "decode_efficiency" in r:
        line += (f"; decode {100 * r['decode_efficiency']:.0f}% / prefill {100 * r['prefill_efficiency']:.0f}%"
                 f" of the floor")
    if "peak_device_memory_bytes" in r:
        line += f"; peak {r['peak_device_memory_bytes'] / 2**30:.1f} GiB"
    if r.get("allreduce_us") is not None:
        line += (f"; all-reduce {r['allreduce_us']:.1f} us ({r.get('allreduce_path', '')}), "
                 f"{100 * r['allreduce_share_isolated']:.0f}% of a step")
    if r.get("collectives_us_per_token") is not None:
        line += (f"; a step's collectives {r['collectives_us_per_token']:.0f} us, "
                 f"{100 * r['collectives_share_isolated']:.0f}%")
    if r.get("bubble") is not None:
        line += f"; bubble {100 * r['bubble']:.1f}%"
        if r.get("bubble_prefill") is not None:
            line += (f" (prefill {100 * r['bubble_prefill']:.1f}% against the bound "
                     f"{100 * r['bubble_bound']:.1f}% + 2)")
    one = [o for o in rows if not o.get("impl") and not o.get("world") and o["model"] == r["model"]
           and o.get("batch_size", 1) == 1 and o["prompt_len"] == r["prompt_len"]]
    if r.get("tp", 1) > 1 and r.get("pp", 1) == 1 and r.get("batch_size", 1) == 1 and one:
        line += f"; {r['decode_step_ms'] / one[0]['decode_step_ms']:.2f}x one GPU's latency"
    if hf and r["prompt_len"] == hf[0]["prompt_len"] and not par and r["model"] == hf[0]["config"]:
        line += f"; {r['decode_tok_s'] / hf[0]['decode_tok_s']:.1f}x transformers"
    print(line)
