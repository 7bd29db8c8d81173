#!/usr/bin/env python3
"""Measures the sequence length at which each policy overtakes exact attention.

Usage:
  python3 bench/crossover.py <attention_bench> [passes] [max n]

For every n = 256, 512, … up to max n (default 8192), every policy's forward and training
step (`attention/…` and `attention_train/…`, batch 1, 8 heads of 64, bidirectional and causal)
run in one invocation of the benchmark binary right after `full` at the same n, `passes` times
(default 3, each a median of 3 repetitions), so that the policies and exact attention meet the
same state of a shared machine. Prints, as Markdown, time(full) / time(policy) at each n (the
median over the passes; above 1: the policy is faster) and the first n from which the policy
stays faster.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

POLICIES = ["favor", "lowrank", "lsh"]


def run(binary, pattern, out):
    subprocess.run([binary, "--benchmark_min_time=0.2", "--benchmark_repetitions=3",
                    "--benchmark_report_aggregates_only=true", "--benchmark_filter=" + pattern,
                    "--benchmark_out=" + out], capture_output=True, check=True)
    with open(out) as f:
        return {b["run_name"]: b["real_time"] for b in json.load(f)["benchmarks"]
                if b.get("aggregate_name") == "median"}


def main():
    binary = sys.argv[1]
    passes = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    max_n = int(sys.argv[3]) if len(sys.argv) > 3 else 8192
    sizes = [n for n in (256 * 2**i for i in range(16)) if n <= max_n]
    ratios = {}  # (mode, causal, policy) -> {n: [ratio per pass]}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "one.json")
        for _ in range(passes):
            for n in sizes:
                for mode in ("attention", "attention_train"):
                    times = run(binary, f"^{mode}/(full|{'|'.join(POLICIES)})/n:{n}/h:8/d:64/", out)
                    for causal in (0, 1):
                        full = times.get(f"{mode}/full/n:{n}/h:8/d:64/causal:{causal}/real_time")
                        for policy in POLICIES:
                            t = times.get(f"{mode}/{policy}/n:{n}/h:8/d:64/causal:{causal}/real_time")
                            if full and t:
                                ratios.setdefault((mode, causal, policy), {}).setdefault(
                                    n, []).append(full / t)
    print("| policy | causal | " + " | ".join(f"n = {n}" for n in sizes) + " | faster from |")
    print("|---|---|" + "---|" * len(sizes) + "---|")
    for mode in ("attention", "attention_train"):
        for causal in (0, 1):
            for policy in POLICIES:
                per_n = ratios.get((mode, causal, policy))
                if not per_n:
                    continue
                median = {n: statistics.median(r) for n, r in per_n.items()}
                cells = [f"{median[n]:.2f}" if n in median else "–" for n in sizes]
                measured = [n for n in sizes if n in median]
                from_n = next((n for i, n in enumerate(measured)
                               if all(median[m] > 1 for m in measured[i:])), None)
                label = "forward" if mode == "attention" else "training"
                print(f"| {policy} {label} | {'yes' if causal else 'no'} | " + " | ".join(cells)
                      + f" | {from_n if from_n else f'above {measured[-1]}'} |")


if __name__ == "__main__":
    main()
