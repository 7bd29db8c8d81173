#!/usr/bin/env python3
"""Plots attention_bench results: time and peak scratch memory against n, log-log.

Usage: python3 bench/plot.py bench.json out.png
bench.json comes from attention_bench --benchmark_out=bench.json (JSON is the default
format of --benchmark_out). Needs matplotlib (Debian: python3-matplotlib).
"""
import json
import re
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = re.compile(r"^(attention\w*)/(\w+)/n:(\d+)/h:(\d+)/d:(\d+)/causal:([01])")


def load(path):
    with open(path) as f:
        data = json.load(f)
    series = defaultdict(list)
    for b in data["benchmarks"]:
        m = NAME.match(b["name"])
        if not m or b.get("run_type") == "aggregate":
            continue
        kind, policy, n, _, _, causal = m.groups()
        unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b.get("time_unit", "ns")]
        label = f"{kind} {policy}{' causal' if causal == '1' else ''}"
        series[label].append((int(n), b["real_time"] * unit, b.get("scratch_bytes", 0.0)))
    return data.get("context", {}), series


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    context, series = load(sys.argv[1])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, points in sorted(series.items()):
        points.sort()
        n = [p[0] for p in points]
        ax_t.loglog(n, [p[1] for p in points], marker="o", label=label)
        if any(p[2] > 0 for p in points):
            ax_m.loglog(n, [max(p[2], 1) for p in points], marker="o", label=label)
    ax_t.set(xlabel="sequence length n", ylabel="wall time per call (s)", title="time")
    ax_m.set(xlabel="sequence length n", ylabel="peak scratch (bytes)", title="scratch memory")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    machine = context.get("effattn.machine", context.get("host_name", ""))
    fig.suptitle(f"effattn attention_bench — {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=120)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
