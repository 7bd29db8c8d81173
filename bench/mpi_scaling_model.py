# docs/mpi.md's scaling model of sequence-parallel attention, on paper: time of one forward
# layer (h = 8 heads of d = 64, float) on n = 2^20 tokens over P nodes, each computing at the
# rate of one rank measured by bench/attention_mpi_bench (docs/mpi.md's table, AMD EPYC with
# AVX-512, one core), joined by a network of B bytes/s and alpha seconds per message.
# Prints docs/mpi.md's markdown table: time, and in brackets the share of the ideal speed-up.
#   python3 bench/mpi_scaling_model.py
import math
n, h, d = 2**20, 8, 64
B, alpha = 12.5e9, 2e-6          # bytes/s (100 Gb/s), latency per message
R_full = {False: 77.1e9, True: 58.2e9}   # flop/s, one rank, measured (forward)
tok = {("favor", False): 251e-3/16384, ("favor", True): 440e-3/16384,
       ("lowrank", False): 223e-3/16384,
       ("lsh", False): 141e-3/4096, ("lsh", True): 93.2e-3/4096}
log2 = lambda P: math.ceil(math.log2(P)) if P > 1 else 0
def full(P, causal):
    t1 = 4*n*n*d*h*(0.5 if causal else 1.0) / R_full[causal]
    step_compute = t1 / P / P
    step_send = (n/P)*2*d*h*4/B + alpha          # one K, V block to the next rank
    return P*max(step_compute, step_send), t1
def favor(P, causal):
    S = 534e3                                     # Σφ(k)vᵀ, Σφ(k) for 8 heads, measured bytes
    comm = log2(P)*(S/B + alpha) if causal else 2*S/B + 2*log2(P)*alpha
    t1 = n*tok[("favor", causal)]
    return t1/P + comm, t1
def lowrank(P):
    S = 1.05e6                                    # E·K, F·V for 8 heads, measured bytes
    t1 = n*tok[("lowrank", False)]
    return t1/P + 2*S/B + 2*log2(P)*alpha, t1
def lsh(P, causal):
    r, c = 4, 64
    counts = r*(2*n/c)*h*4                        # bucket counts, all-reduced
    sort = (n/P)*r*h*12                           # (bucket, position) out, sorted index back
    remote = min(P - 1, r*(P - 1)/P)              # ranks each token's row goes to, besides its own
    rows = (n/P)*h*remote*(4*(2*d) + 4*(d + 2))   # k (= q) | v out, partial results back
    comm = 2*counts/B + 2*log2(P)*alpha + (sort + rows)/B + 6*P*alpha
    t1 = n*tok[("lsh", causal)]
    return t1/P + comm, t1
Ps = [8, 32, 128, 512, 1024]
def fmt(t):
    if t >= 7200:
        return f"{t / 3600:.2g} h"
    if t >= 1000:
        return f"{float(f'{t:.3g}'):.0f} s"
    return f"{t:.3g} s" if t >= 1 else f"{t*1e3:.3g} ms"
rows = [("Full, ring", lambda P: full(P, False)),
        ("Full, ring, causal (balanced)", lambda P: full(P, True)),
        ("Favor", lambda P: favor(P, False)),
        ("Favor, causal", lambda P: favor(P, True)),
        ("LowRank (dense, k = 256)", lowrank),
        ("LSH (4 rounds, chunks of 64)", lambda P: lsh(P, False)),
        ("LSH, causal", lambda P: lsh(P, True))]
print("| forward, n = 2²⁰ | one node | " + " | ".join(f"P = {P}" for P in Ps) + " |")
print("|---|---|" + "---|"*len(Ps))
for name, f in rows:
    t1 = f(1)[1]
    cells = [f"{fmt(f(P)[0])} ({100*t1/P/f(P)[0]:.0f} %)" for P in Ps]
    print(f"| {name} | {fmt(t1)} | " + " | ".join(cells) + " |")
