#!/usr/bin/env python3
"""Predicts how attention_bench's calls speed up with threads, from their task grids.

Usage:
  OMP_NUM_THREADS=1 attention_bench --benchmark_filter=... --benchmark_out=one.json
  OMP_NUM_THREADS=2 attention_bench --benchmark_filter=... --benchmark_out=two.json   # optional
  python3 bench/thread_scaling_model.py one.json [two.json]

The model: a call is a list of tasks, handed out in order to the first free thread (the
library's schedule, block-major), each starting once the tasks it waits for have finished (a
block's order.wait) and, where it merges in block order, finishing no earlier than the merge
before it. The predicted speed-up at T threads is the 1-thread time over the time the last task
ends (work a split adds, such as Favor's causal key sums, counts against it). Task costs are shares of the 1-thread time:
- full, forward: min(ceil(2T / problems), n / 96) query slices per head, a causal slice costing
  in proportion to the keys it sees (heaviest first); training: `tasks` equal tasks.
- favor, bidirectional: key blocks, then query blocks that wait for all of them, equal costs
  (forward); training adds the backward's three stages, each a third of its time.
- favor, causal (h:1): B blocks (whole chunks of 64, at least 8 chunks, at most 32 blocks). One thread runs them in order; with two or more,
  block 0's queries, the key sums of blocks 1 … B−2 (each KEY_SUM of a block's forward: the
  keys' features and their sums, by the products' flop counts), then the query blocks, each
  once its prefix is merged. Backward: block 0's first sweep, the key sums, the other blocks'
  first sweeps from the last back (merging in that order), then the second sweeps (each
  SWEEP_SHARE and 1 − SWEEP_SHARE of a block's backward).
- lowrank (h:1): E k and F v in 2·2 blocks (256 projected rows), half of the forward, then the
  query blocks that wait for them. Backward: the same query blocks (the attention's backward
  over the projected rows, ATTENTION_SHARE of it by flop counts), then, once all have run, a task
  per 128 tokens of E's and F's gradient columns and of d_k and d_v (4·n/128, equal costs).
- lsh (h:1, the default 4 rounds of chunks of 64). One thread runs the blocks in order; with two
  or more: n/256 blocks of rows hash their keys (HASH of the forward, by flop counts), 4 blocks sort
  a round each (no cost), then a block per 64 sorted positions of each round, each merging
  after the one before it. Backward, once the forward is done: those chunk blocks again, then
  blocks of 512 rows that finish the gradients (no cost).
- anything else: `tasks` equal tasks.
What it leaves out: memory bandwidth shared by the cores, merges' own time and the start of a
parallel region (microseconds). A second run at 2 threads is printed beside the prediction.
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


KEY_SUM = 0.4  # a block's key sums over its forward (K' and K'ᵀV of K', Q', Q'K'ᵀ, AV, Q'S, K'ᵀV)
SWEEP_SHARE = 0.5  # the first (queries) sweep's share of a causal block's backward
LSH_ROUNDS, LSH_CHUNK = 4, 64  # the bench's LSH settings (LSHConfig's defaults)
ATTENTION_SHARE = 5 / 9  # LowRank backward: 5 products of n·r·d in attention, 4 in projections
HASH = 0.2  # hashing's share of an LSH forward: 2·n·d·b/2 against 4·n·w·d flops per round


def finish_time(tasks, threads):
    """tasks: (cost, waits_for, merges_after) in hand-out order; returns when the last ends."""
    free = [0.0] * threads
    heapq.heapify(free)
    end = []
    for cost, waits, after in tasks:
        start = max([heapq.heappop(free)] + [end[w] for w in waits])
        done = max([start + cost] + [end[a] for a in after])
        end.append(done)
        heapq.heappush(free, done)
    return max(end)


def independent(costs):
    return [(c, [], []) for c in costs]


def causal_favor(forward, backward, n, threads):
    """Tasks of a causal Favor call of one head (forward time, backward time or 0)."""
    rows = max(512, math.ceil(math.ceil(n / 32) / 64) * 64)
    blocks = max(1, math.ceil(n / rows))
    if threads < 2 or blocks < 2:
        return independent([forward + backward])
    u = forward / blocks
    tasks = [(u, [], [])]  # block 0's queries: prefix 1
    tasks += [(KEY_SUM * u, [], []) for _ in range(1, blocks - 1)]  # prefixes 2 … B−1
    prefix = lambda b: list(range(0, b))  # the tasks that merge prefixes 1 … b
    tasks += [(u, prefix(b), []) for b in range(1, blocks)]
    if backward == 0:
        return tasks
    w = backward / blocks
    base = len(tasks)
    tasks += [(SWEEP_SHARE * w, [], [])]
    tasks += [(KEY_SUM * u, [], []) for _ in range(1, blocks - 1)]
    first = {0: base}
    for b in range(blocks - 1, 0, -1):  # first sweeps from the last block back, in step order
        after = [len(tasks) - 1] if b < blocks - 1 else []
        first[b] = len(tasks)
        tasks.append((SWEEP_SHARE * w, [base + i for i in range(0, b)], after))
    for b in range(blocks - 1, -1, -1):
        waits = [first[b]] + [first[c] for c in range(b + 1, blocks)]
        tasks.append(((1 - SWEEP_SHARE) * w, waits, []))
    return tasks


def lsh(forward, backward, n, threads):
    """Tasks of an LSH call of one head (forward time, backward time or 0)."""
    if threads < 2:
        return independent([forward + backward])
    r, chunks = LSH_ROUNDS, math.ceil(n / LSH_CHUNK)
    h = math.ceil(n / 256)
    tasks = [(HASH * forward / h, [], []) for _ in range(h)]  # rows' buckets in every round
    tasks += [(0.0, list(range(h)), []) for _ in range(r)]  # each round's sort and chunks
    ready = list(range(h + r))
    for _ in range(r * chunks):  # chunk blocks, merged in block order
        tasks.append(((1 - HASH) * forward / (r * chunks), ready, [len(tasks) - 1]))
    if backward == 0:
        return tasks
    done = list(range(len(tasks)))
    for i in range(r * chunks):
        tasks.append((backward / (r * chunks), done, [len(tasks) - 1] if i else []))
    return tasks


def staged(stages):
    """Stages of (count, total cost), each task waiting for every task of the stage before."""
    tasks, previous = [], []
    for count, total in stages:
        mine = []
        for _ in range(count):
            mine.append(len(tasks))
            tasks.append((total / count, list(previous), []))
        previous = mine
    return tasks


def grid(name, b, forward_row, threads):
    total = b["real_time"]
    tasks = max(1, int(b.get("tasks", 1)))
    m = re.match(r"(attention|attention_train)/(\w+)/n:(\d+)/h:(\d+)/d:\d+/causal:(\d)", name)
    if not m:
        return independent([total / tasks] * tasks)
    train, policy = m[1] == "attention_train", m[2]
    n, heads, causal = int(m[3]), int(m[4]), m[5] == "1"
    row = forward_row(name) if train else b
    forward = row["real_time"] if row else None
    if policy == "full" and not train:
        problems = heads  # batch 1
        splits = 1
        if problems < 2 * threads:
            splits = max(1, min(math.ceil(2 * threads / problems), n // 96))
        weights = sorted(((2 * s + 1) if causal else 1 for s in range(splits)), reverse=True)
        per = total / (problems * sum(weights))
        return independent([w * per for _ in range(problems) for w in weights])
    if heads == 1 and forward is not None:
        blocks = max(1, math.ceil(n / 512))
        if policy == "favor" and causal:
            return causal_favor(forward, total - forward if train else 0, n, threads)
        if policy == "favor":
            stages = [(blocks, forward / 2), (blocks, forward / 2)]
            if train:
                stages += [(blocks, (total - forward) / 3)] * 3
            return staged(stages)
        if policy == "lsh":
            return lsh(forward, total - forward if train else 0, n, threads)
        if policy == "lowrank":
            queries = max(1, int(row.get("tasks", 5)) - 4)
            stages = [(4, forward / 2), (queries, forward / 2)]
            if train:
                backward = total - forward
                stages.append((queries, ATTENTION_SHARE * backward))
                stages.append((4 * math.ceil(n / 128), (1 - ATTENTION_SHARE) * backward))
            return staged(stages)
    return independent([total / tasks] * tasks)


def main():
    one = runs(sys.argv[1])
    two = runs(sys.argv[2]) if len(sys.argv) > 2 else {}

    def forward_row(name):
        return one.get(name.replace("attention_train/", "attention/", 1))

    head = "| benchmark | " + " | ".join(f"{t}" for t in THREADS)
    head += " | measured 2 |" if two else " |"
    print(head)
    print("|---" * (len(THREADS) + 1 + (1 if two else 0)) + "|")
    for name, b in one.items():
        if "tasks" not in b:
            continue
        cells = []
        for t in THREADS:
            tasks = grid(name, b, forward_row, t)
            cells.append(f"{b['real_time'] / finish_time(tasks, t):.2f}")
        row = f"| {name} | " + " | ".join(cells)
        if two:
            m2 = two.get(name)
            row += f" | {b['real_time'] / m2['real_time']:.2f} |" if m2 else " | |"
        else:
            row += " |"
        print(row)


if __name__ == "__main__":
    main()
