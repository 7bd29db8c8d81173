# effattn's harness (bench/peers/README.md): times one peer attention core in this process.
# usage: peer_bench.py POLICY N CAUSAL MODE [MIN_SECONDS] [MAX_ITERS]
#   POLICY: favor (performer-pytorch FastAttention, nb_features=256, softmax kernel)
#           lowrank (linformer LinformerSelfAttention, k=256, to_q/to_k/to_v/to_out = Identity)
#           lsh (reformer-pytorch LSHAttention, n_hashes=4, bucket_size=64, shared QK)
#   MODE: fwd | train (forward + backward through autograd)
# Prints one line: RESULT policy n causal mode median_ms min_ms iters rss_before_mib
import os, sys, time, statistics, resource
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.environ.get('PEERS_DIR', os.path.join(_here, 'src')), os.path.join(_here, 'stubs')]
import torch
torch.set_num_threads(2)
policy, n, causal, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1', sys.argv[4]
min_s = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
max_it = int(sys.argv[6]) if len(sys.argv) > 6 else 20
H, D, B = 8, 64, 1
torch.manual_seed(0)
train = mode == 'train'
import contextlib, io

if policy == 'favor':
    from performer_pytorch import FastAttention
    with contextlib.redirect_stdout(io.StringIO()):
        mod = FastAttention(dim_heads=D, nb_features=256, causal=causal, generalized_attention=False)
    assert mod.causal_linear_fn.__name__ == 'causal_linear_attention_noncuda' if causal else True
    q, k, v = (torch.randn(B, H, n, D, requires_grad=train) for _ in range(3))
    inputs = (q, k, v)
    run = lambda: mod(q, k, v)
elif policy == 'lowrank':
    assert not causal
    from linformer import LinformerSelfAttention
    mod = LinformerSelfAttention(dim=H * D, seq_len=n, k=256, heads=H)
    # attention core only: the input/output projections become identities, so the module
    # computes E·K, F·V (headwise-shared E, F as effattn's default) and softmax attention.
    mod.to_q = mod.to_k = mod.to_v = mod.to_out = torch.nn.Identity()
    x = torch.randn(B, n, H * D, requires_grad=train)
    inputs = (x,)
    run = lambda: mod(x)
elif policy == 'lsh':
    from reformer_pytorch import LSHAttention
    mod = LSHAttention(bucket_size=64, n_hashes=4, causal=causal)
    mod.train(train)
    qk = torch.randn(B * H, n, D, requires_grad=train)  # heads folded into batch, as LSHSelfAttention does
    v = torch.randn(B * H, n, D, requires_grad=train)
    inputs = (qk, v)
    run = lambda: mod(qk, v)[0]
else:
    raise SystemExit('unknown policy')

rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def step():
    if train:
        out = run()
        out.backward(out.detach())  # d_out = out (any dense gradient)
        for t in list(inputs) + list(mod.parameters()):
            t.grad = None
    else:
        with torch.no_grad():
            out = run()
    return out

if os.environ.get('WARMUP', '1') == '1':
    step()  # warm-up
times = []
t_start = time.perf_counter()
while len(times) < max_it:
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
    if time.perf_counter() - t_start >= min_s and len(times) >= 1:
        break
print(f"RESULT {policy} {n} {int(causal)} {mode} {statistics.median(times)*1e3:.3f} {min(times)*1e3:.3f} {len(times)} {rss_before:.0f}", flush=True)
