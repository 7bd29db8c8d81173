#!/usr/bin/env python3
"""Times benchmarks at 1 and 2 threads, interleaved, for speed-ups on a noisy machine.

Usage:
  python3 bench/interleaved_threads.py <attention_bench> '<filter>' [passes] [out dir]

For each benchmark the filter selects, runs it with OMP_NUM_THREADS=1 then =2, `passes` times
(default 3; each a median of 3 repetitions), so that both thread counts meet the same state of a
shared machine, and writes the median pass of each to <out dir>/t1.json and t2.json (default
the current folder) in Google Benchmark's format, which bench/thread_scaling_model.py reads.
"""
import json
import os
import subprocess
import sys
import tempfile


def main():
    binary, pattern = sys.argv[1], sys.argv[2]
    passes = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    out_dir = sys.argv[4] if len(sys.argv) > 4 else "."
    names = subprocess.run([binary, "--benchmark_list_tests", "--benchmark_filter=" + pattern],
                           capture_output=True, text=True, check=True).stdout.split()
    runs = {1: {}, 2: {}}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "one.json")
        for name in names:
            for _ in range(passes):
                for threads in (1, 2):
                    subprocess.run([binary, "--benchmark_min_time=0.2", "--benchmark_repetitions=3",
                                    "--benchmark_report_aggregates_only=true",
                                    "--benchmark_filter=^" + name + "$", "--benchmark_out=" + out],
                                   capture_output=True, check=True,
                                   env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
                    with open(out) as f:
                        for b in json.load(f)["benchmarks"]:
                            if b.get("aggregate_name") == "median":
                                runs[threads].setdefault(name, []).append(b)
    for threads in (1, 2):
        chosen = []
        for name, rows in runs[threads].items():
            rows.sort(key=lambda b: b["real_time"])
            chosen.append(dict(rows[len(rows) // 2], name=name, run_name=name))
        with open(os.path.join(out_dir, f"t{threads}.json"), "w") as f:
            json.dump({"context": {"passes": passes}, "benchmarks": chosen}, f, indent=1)


if __name__ == "__main__":
    main()
