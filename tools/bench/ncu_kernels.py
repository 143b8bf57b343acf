"""Per-kernel time of a run under Nsight Compute, from its CSV:

  ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
      --print-units base CMD > run.csv
  python3 tools/bench/ncu_kernels.py run.csv [--last N] [--top K]

Groups the kernels by name and grid, sums their durations and prints the groups by total time
(microseconds), then the total. --last N keeps only the last N kernels (the steady state of a
decode run: a step's kernels times the steps wanted). Durations printed with thousands
separators ("17,760") are read as numbers.
"""
import argparse
import collections
import csv
import sys


def rows_of(path):
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    return [r for r in csv.DictReader(lines) if r.get("Metric Name") == "gpu__time_duration.sum"]


def summarize(rows, last=None, top=30):
    if last:
        rows = rows[-last:]
    groups = collections.OrderedDict()
    for r in rows:
        key = (r["Kernel Name"], r.get("Grid Size", ""), r.get("Block Size", ""))
        g = groups.setdefault(key, [0, 0.0])
        g[0] += 1
        g[1] += float(r["Metric Value"].replace(",", "")) / 1000.0
    total = sum(g[1] for g in groups.values())
    out = []
    for (name, grid, block), (n, us) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        out.append(f"{us:10.1f} us {n:5d}x {us / n:9.2f} us  {100 * us / total if total else 0:5.1f}%  "
                   f"{grid:>14} {block:>12}  {name[:90]}")
    out.append(f"total {total:.1f} us over {len(rows)} kernels")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--last", type=int, default=None, help="only the last N kernels")
    ap.add_argument("--top", type=int, default=30, help="groups to print")
    a = ap.parse_args()
    try:
        rows = rows_of(a.csv)
    except OSError as e:
        sys.exit(f"ncu_kernels: {e}")
    if not rows:
        sys.exit(f"ncu_kernels: no gpu__time_duration.sum rows in {a.csv}")
    print("\n".join(summarize(rows, a.last, a.top)))


if __name__ == "__main__":
    main()
