#!/usr/bin/env python3
"""Predicts how attention_bench's calls speed up with threads, from their task grids.

Usage:
  OMP_NUM_THREADS=1 attention_bench --benchmark_filter=... --benchmark_out=one.json
  OMP_NUM_THREADS=2 attention_bench --benchmark_filter=... --benchmark_out=two.json   # optional
  python3 bench/thread_scaling_model.py one.json [two.json]

The model: a call is `tasks` tasks (the benchmark's counter: its largest stage), each costing
time_1_thread / tasks, except the slices of a causal forward of `full`, whose cost grows with
their position (a slice sees the keys up to its end). Tasks are handed out in order to the
first free thread (the library's dynamic schedule; causal slices heaviest first), and the
predicted speed-up at T threads is the 1-thread time over the longest thread's total. Full's
forward splits a head's queries into min(ceil(2T / problems), n / 96) slices, so its task count
grows with T; every other grid is fixed by the shapes. What the model leaves out: waits between
stages and merges, memory bandwidth shared by the cores, and the start of a parallel region
(microseconds). A second run at 2 threads is printed beside the prediction.
"""
import heapq
import json
import math
import re
import sys

THREADS = [1, 2, 4, 8, 16, 32, 64]


def runs(path):
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        name = re.sub(r"_median$", "", b["name"]).replace("/real_time", "")
        out[name] = b
    return out


def makespan(costs, threads):
    free = [0.0] * threads
    heapq.heapify(free)
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def task_costs(name, b, threads):
    total = b["real_time"]
    tasks = max(1, int(b.get("tasks", 1)))
    m = re.match(r"attention/full/n:(\d+)/h:(\d+)/d:\d+/causal:(\d)", name)
    if not m:
        return [total / tasks] * tasks
    n, heads, causal = int(m[1]), int(m[2]), m[3] == "1"
    problems = heads  # batch 1
    splits = 1
    if problems < 2 * threads:
        splits = max(1, min(math.ceil(2 * threads / problems), n // 96))
    weights = [(2 * s + 1) if causal else 1 for s in range(splits)]
    weights.sort(reverse=True)  # heaviest first
    per = total / (problems * sum(weights))
    return [w * per for _ in range(problems) for w in weights]


def main():
    one = runs(sys.argv[1])
    two = runs(sys.argv[2]) if len(sys.argv) > 2 else {}
    head = "| benchmark | tasks (1 thread) | " + " | ".join(f"{t}" for t in THREADS)
    head += " | measured 2 |" if two else " |"
    print(head)
    print("|---" * (len(THREADS) + 2 + (1 if two else 0)) + "|")
    for name, b in one.items():
        if "tasks" not in b:
            continue
        cells = []
        for t in THREADS:
            costs = task_costs(name, b, t)
            cells.append(f"{sum(costs) / makespan(costs, t):.2f}")
        row = f"| {name} | {int(b['tasks'])} | " + " | ".join(cells)
        if two:
            m2 = two.get(name)
            row += f" | {b['real_time'] / m2['real_time']:.2f} |" if m2 else " | |"
        else:
            row += " |"
        print(row)


if __name__ == "__main__":
    main()
