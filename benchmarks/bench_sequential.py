"""Sequential-model training throughput: fastrec's core (_core.SequentialModel.train_epoch) against a PyTorch
model of exactly the same math (docs/DESIGN.md, "Sequential model (issue 13)").

Both train on MovieLens-100k histories (each user's events by timestamp, the latest max_len + 1 per user) with
the issue's configuration: batch 128, 2 blocks, 1 head, width 64, feed-forward width 64, max_len 50, 1 sampled
negative per position, dropout 0.2 (and 0.0), Adam (lazy on the item rows: PyTorch's SparseAdam on a sparse
embedding, Adam on the rest). PyTorch gets the very batches the core builds (the epoch_batches hook: same
inputs, targets, negatives), prepared outside its timed region, so its time is forward + backward + step only,
while fastrec's also includes building the batches and sampling the negatives.

PyTorch's model: nn.Embedding(sparse=True) shared by input and output, a learned position table, pre-norm blocks
with F.scaled_dot_product_attention under a causal mask that also hides padding keys (a padding query attends to
itself only, so no row is all -inf; padding rows are zeroed after each block, as in the reference, so they do not
reach any event row), inverted dropout at the same three sites, the final layer norm, BCE over the target and
the negatives averaged over positions.

Rounds are interleaved (fastrec 1 thread, torch 1 thread, fastrec 2 threads, torch 2 threads, repeated), each
sample one epoch; examples/s = users (sequences) per second; reported as median [min-max] over the rounds with
the machine's load average before and after.

The floor, measured in the same rounds: after each thread count's two epochs, the dense products that epoch's
batches need, at the shapes the core runs, through fastrec's own `_core.sgemm` on that many threads: per
block and batch (R event rows, width d, feed-forward f) the forward products h1 [Wq|Wk|Wv], o Wo, h2 W1, u W2
and both backward products of each (the weight gradient Xᵀ dY over the R rows and dX = dY Wᵀ); plus the
attention products (per sequence of n events: Q Kᵀ, A V, Aᵀ dO, dO Vᵀ, dS K, dSᵀ Q of n x n x d/heads),
timed per call on one thread with the Python call's own cost (the same number of 1 x 1 products)
subtracted, and divided by the thread count (sequences split evenly, the best a parallel loop can do).
floor examples/s = users / (those products' time): what training would reach if everything else (layer
norms, softmax, dropout, loss, embedding, updates, sampling) cost nothing. As a check, the FMA peak of the
machine (benchmarks/fma_peak.cpp: register-only FMA chains) gives a second, lower bound on the time: the
multiply-adds of those products (attention counted causal: the lower triangle only) at that peak.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_sequential.py --rounds 7

Precision (issue 13's 1-thread bar): ``--precision float32 bf16`` times one fastrec model per precision in the
same interleaved rounds (each from the same initial parameters, with its own Adam state, on the same batches);
bf16 is ``SequentialModel(precision="bf16")``: the projection and feed-forward products in bfloat16. Every
ratio is against float32 PyTorch (the bar's); ``--torch-bf16`` also times PyTorch under
``torch.autocast("cpu", dtype=torch.bfloat16)`` for information. ``--no-floor`` skips the products floor.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_sequential.py --rounds 7 \
        --precision float32 bf16 --torch-bf16 --no-floor
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np


def load_histories(path, L):
    """CSR histories (time-ordered item rows), their sorted seen lists, n_items."""
    raw = np.loadtxt(path, skiprows=1, usecols=(0, 1, 3))
    users = np.unique(raw[:, 0], return_inverse=True)[1]
    items = np.unique(raw[:, 1], return_inverse=True)[1].astype(np.int32)
    order = np.lexsort((np.arange(len(raw)), raw[:, 2], users))
    users, items = users[order], items[order]
    counts = np.bincount(users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    seen = np.concatenate([np.sort(items[indptr[u]:indptr[u + 1]]) for u in range(len(counts))]).astype(np.int32)
    return indptr, items, (indptr.copy(), seen), int(items.max()) + 1


def init_params(rng, n_items, d, L, n_blocks, heads, f):
    def glorot(fan_in, fan_out):
        lim = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-lim, lim, (fan_in, fan_out)).astype(np.float32)

    p = {"item_table": rng.normal(0, 1.0 / math.sqrt(d), (n_items, d)).astype(np.float32),
         "position_table": rng.normal(0, 0.02, (L, d)).astype(np.float32), "heads": heads, "blocks": [],
         "final_gamma": np.ones(d, np.float32), "final_beta": np.zeros(d, np.float32)}
    for _ in range(n_blocks):
        blk = {"ln1_gamma": np.ones(d, np.float32), "ln1_beta": np.zeros(d, np.float32),
               "ln2_gamma": np.ones(d, np.float32), "ln2_beta": np.zeros(d, np.float32),
               "W1": glorot(d, f), "b1": np.zeros(f, np.float32), "W2": glorot(f, d), "b2": np.zeros(d, np.float32)}
        for k in ("q", "k", "v", "o"):
            blk["W" + k] = glorot(d, d)
            blk["b" + k] = np.zeros(d, np.float32)
        p["blocks"].append(blk)
    return p


def zeros_like_params(p):
    s = {k: np.zeros_like(v) for k, v in p.items() if isinstance(v, np.ndarray)}
    s["blocks"] = [{k: np.zeros_like(v) for k, v in blk.items()} for blk in p["blocks"]]
    return s


def torch_model(params, dropout):
    import torch
    from torch import nn
    import torch.nn.functional as F

    d = params["item_table"].shape[1]
    heads = params["heads"]

    def lin(W, b):
        layer = nn.Linear(W.shape[0], W.shape[1])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(W.T.copy()))
            layer.bias.copy_(torch.from_numpy(b))
        return layer

    def norm(g, b):
        ln = nn.LayerNorm(d, eps=1e-5)
        with torch.no_grad():
            ln.weight.copy_(torch.from_numpy(g))
            ln.bias.copy_(torch.from_numpy(b))
        return ln

    class Block(nn.Module):
        def __init__(self, blk):
            super().__init__()
            self.ln1, self.ln2 = norm(blk["ln1_gamma"], blk["ln1_beta"]), norm(blk["ln2_gamma"], blk["ln2_beta"])
            self.q, self.k, self.v = lin(blk["Wq"], blk["bq"]), lin(blk["Wk"], blk["bk"]), lin(blk["Wv"], blk["bv"])
            self.o, self.w1, self.w2 = lin(blk["Wo"], blk["bo"]), lin(blk["W1"], blk["b1"]), lin(blk["W2"], blk["b2"])

        def forward(self, x, m, allowed):
            B, L, _ = x.shape
            h = self.ln1(x)
            split = lambda t: t.view(B, L, heads, d // heads).transpose(1, 2)  # noqa: E731
            o = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)),
                                               attn_mask=allowed)
            x = x + F.dropout(self.o(o.transpose(1, 2).reshape(B, L, d)), dropout, self.training)
            f = F.dropout(self.w2(F.relu(self.w1(self.ln2(x)))), dropout, self.training)
            return (x + f) * m

    class Sequential(nn.Module):
        def __init__(self):
            super().__init__()
            self.item = nn.Embedding(*params["item_table"].shape, sparse=True)
            with torch.no_grad():
                self.item.weight.copy_(torch.from_numpy(params["item_table"]))
            self.pos = nn.Parameter(torch.from_numpy(params["position_table"].copy()))
            self.blocks = nn.ModuleList([Block(b) for b in params["blocks"]])
            self.final = norm(params["final_gamma"], params["final_beta"])

        def forward(self, seqs, targets, negatives):
            B, L = seqs.shape
            mask = seqs >= 0
            m = mask[:, :, None].float()
            x = (self.item(seqs.clamp(min=0)) * math.sqrt(d) + self.pos) * m
            x = F.dropout(x, dropout, self.training)
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            allowed = (causal[None] & mask[:, None, :]) | torch.eye(L, dtype=torch.bool)[None]
            allowed = allowed[:, None]  # broadcast over heads
            for blk in self.blocks:
                x = blk(x, m, allowed)
            z = self.final(x)
            active = targets >= 0
            zt = z[active]
            s_pos = (zt * self.item(targets[active])).sum(-1)
            s_neg = (zt[:, None, :] * self.item(negatives[active])).sum(-1)
            return (F.softplus(-s_pos).sum() + F.softplus(s_neg).sum()) / zt.shape[0]

    model = Sequential()
    dense = [p for n, p in model.named_parameters() if not n.startswith("item.")]
    opts = [torch.optim.Adam(dense, lr=1e-3, betas=(0.9, 0.98), eps=1e-8),
            torch.optim.SparseAdam(list(model.item.parameters()), lr=1e-3, betas=(0.9, 0.98), eps=1e-8)]
    return model, opts


def fmt(v):
    return f"{statistics.median(v):,.0f} [{min(v):,.0f}-{max(v):,.0f}]"


def load_avg():
    return os.getloadavg()[0]


def fma_peak_runner():
    """A function threads -> FP32 GFLOP/s measured now by benchmarks/fma_peak.cpp (compiled once), or None."""
    import shutil
    import subprocess
    import tempfile

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return None
    exe = str(Path(tempfile.mkdtemp()) / "fma_peak")
    source = str(Path(__file__).resolve().parent / "fma_peak.cpp")
    if subprocess.run([compiler, "-O2", "-pthread", source, "-o", exe], capture_output=True).returncode:
        return None

    def run(threads):
        out = subprocess.run([exe, str(threads)], capture_output=True, text=True).stdout.split()
        peak = {int(t): float(g) for isa, t, g in zip(out[0::3], out[1::3], out[2::3]) if isa != "none"}
        return peak.get(threads)
    return run


class ProductFloor:
    """The dense products of training batches (module docstring), timed through _core.sgemm."""

    def __init__(self, d, f, n_blocks, heads):
        self.d, self.f, self.n_blocks, self.dh = d, f, n_blocks, d // heads
        self.heads = heads
        self.rng = np.random.default_rng(2)
        self.buf = {}

    def arr(self, name, rows, cols):
        """A random (rows, cols) float32 C-contiguous view of a buffer grown once (no allocation per batch)."""
        a = self.buf.get(name)
        if a is None or a.shape[0] < rows or a.shape[1] != cols:
            a = self.buf[name] = self.rng.standard_normal((max(rows, 1), cols)).astype(np.float32)
        return a[:rows]

    def dense_calls(self, R):
        """(a, b, trans_a, trans_b) of one block's projection and feed-forward products over R rows."""
        d, f, arr = self.d, self.f, self.arr
        X, X3, Xf = arr("X", R, d), arr("X3", R, 3 * d), arr("Xf", R, f)
        Wcat, Wo, W1, W2 = arr("Wcat", d, 3 * d), arr("Wo", d, d), arr("W1", d, f), arr("W2", f, d)
        return [(X, Wcat, False, False), (X, Wo, False, False), (X, W1, False, False), (Xf, W2, False, False),
                (Xf, X, True, False), (X, W2, False, True),      # W2: gradient uᵀ dF, dU = dF W2ᵀ
                (X, Xf, True, False), (Xf, W1, False, True),     # W1
                (X, X, True, False), (X, Wo, False, True),       # Wo
                (X, X3, True, False), (X3, Wcat, False, True)]   # Wq | Wk | Wv

    def attention_calls(self, n):
        dh, arr = self.dh, self.arr
        Q, A = arr(f"Q{n}", n, dh), arr(f"A{n}", n, n)
        return [(Q, Q, False, True), (A, Q, False, False), (A, Q, True, False), (Q, Q, False, True),
                (A, Q, False, False), (A, Q, True, False)]

    def fmas(self, lengths):
        """Multiply-adds of one batch's products: dense as run, attention causal (lower triangle only)."""
        R, d, f = int(lengths.sum()), self.d, self.f
        dense = 3 * R * (3 * d * d + d * d + d * f + f * d)
        attention = 6 * self.heads * int((lengths * (lengths + 1) // 2).sum()) * self.dh
        return self.n_blocks * (dense + attention)

    def time_epoch(self, batch_lengths, n_threads):
        """Seconds of the epoch's products on n_threads: (dense, attention)."""
        from fastrec import _core

        dense = attention = 0.0
        tiny = self.arr("tiny", 1, 1)
        for lengths in batch_lengths:
            calls = self.dense_calls(int(lengths.sum()))
            t0 = time.perf_counter()
            for _ in range(self.n_blocks):
                for a, b, ta, tb in calls:
                    _core.sgemm(a, b, ta, tb, n_threads=n_threads)
            dense += time.perf_counter() - t0
            att_calls = [c for n in lengths if n > 0 for _ in range(self.heads) for c in self.attention_calls(int(n))]
            t0 = time.perf_counter()
            for _ in range(self.n_blocks):
                for a, b, ta, tb in att_calls:
                    _core.sgemm(a, b, ta, tb, n_threads=1)
            t1 = time.perf_counter()
            for _ in range(self.n_blocks):
                for _c in att_calls:
                    _core.sgemm(tiny, tiny, False, False, n_threads=1)
            t2 = time.perf_counter()
            attention += max((t1 - t0) - (t2 - t1), 0.0) / n_threads
        return dense, attention


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("FASTREC_ML100K", "/work/data/ml-100k"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.2, 0.0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--precision", nargs="+", default=["float32"], choices=["float32", "bf16"],
                    help="fastrec's training precision(s), each timed in the same interleaved rounds (bf16: the "
                         "projection and feed-forward products in bfloat16, SequentialModel(precision='bf16'))")
    ap.add_argument("--torch-bf16", action="store_true",
                    help="also time PyTorch under torch.autocast('cpu', dtype=torch.bfloat16) (information: the bar "
                         "compares with float32 PyTorch)")
    ap.add_argument("--no-floor", action="store_true", help="skip the products floor and the FMA peak")
    args = ap.parse_args()

    import torch
    from fastrec import _core

    L, d, n_blocks, heads, f, K = 50, 64, 2, 1, 64, 1
    path = Path(args.data)
    path = path / "ml-100k.inter" if (path / "ml-100k.inter").exists() else path / "u.data"
    indptr, items, seen, n_items = load_histories(path, L)
    n_users = len(indptr) - 1
    training = {"negatives": K, "n_items": n_items, "seed": 1, "seen": seen}
    print(f"MovieLens-100k: {n_users} users, {n_items} items, {len(items)} events; L={L} d={d} blocks={n_blocks} "
          f"heads={heads} ffn={f} negatives={K} batch={args.batch_size}; torch {torch.__version__}")
    print(f"load average at start: {load_avg():.2f}")
    floor = None if args.no_floor else ProductFloor(d, f, n_blocks, heads)
    peak_of = None if args.no_floor else fma_peak_runner()

    for dropout in args.dropout:
        rng = np.random.default_rng(0)
        params = init_params(rng, n_items, d, L, n_blocks, heads, f)
        model, opts = torch_model(params, dropout)
        model.train()
        # one core model per precision, each from the same initial parameters with its own Adam state
        cores = {}
        for prec in args.precision:
            core_params = {**params, "blocks": [{k: v.copy() for k, v in b.items()} for b in params["blocks"]],
                           "item_table": params["item_table"].copy(),
                           "position_table": params["position_table"].copy(),
                           "final_gamma": params["final_gamma"].copy(), "final_beta": params["final_beta"].copy()}
            cores[prec] = {"handle": _core.SequentialModel(core_params, True, prec), "adam_t": 0,
                           "state": (zeros_like_params(params), zeros_like_params(params))}
        handle = cores[args.precision[0]]["handle"]
        epoch_no = [0]

        def fastrec_epoch(prec, order, n_threads):
            c = cores[prec]
            out = c["handle"].train_epoch(*c["state"], indptr, items, order, args.batch_size, training, dropout,
                                          "adam", 1e-3, 0.9, 0.98, 1e-8, c["adam_t"], epoch_no[0], n_threads, "auto")
            c["adam_t"] = out[1]

        def core_batches(order):
            return handle.epoch_batches(indptr, items, order, args.batch_size, training, epoch_no[0])

        def torch_batches(batches):
            return [tuple(torch.from_numpy(a.astype(np.int64)) for a in b[:3]) for b in batches]

        def torch_epoch(batches, n_threads, model=model, opts=opts, bf16=False):
            torch.set_num_threads(n_threads)
            for seqs, targets, negatives in batches:
                for o in opts:
                    o.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(seqs, targets, negatives)
                loss.backward()
                for o in opts:
                    o.step()

        if args.torch_bf16:  # a second PyTorch model (same initial parameters) trained under bf16 autocast
            model16, opts16 = torch_model(params, dropout)
            model16.train()

        impls = [f"fastrec {p}" for p in args.precision] + ["torch"] + (["torch bf16"] if args.torch_bf16 else [])
        times = {(impl, n): [] for impl in impls + ["dense", "attention", "peak"] for n in args.threads}
        load_before = load_avg()
        order_rng = np.random.default_rng(1)
        for r in range(args.rounds + 1):  # round 0 warms up (allocations, thread pools), not recorded
            for n in args.threads:
                order = order_rng.permutation(n_users).astype(np.int64)
                core = core_batches(order)
                batches = torch_batches(core)
                lengths = [(b[0] >= 0).sum(axis=1) for b in core]
                for impl in impls:
                    t0 = time.perf_counter()
                    if impl == "torch":
                        torch_epoch(batches, n)
                    elif impl == "torch bf16":
                        torch_epoch(batches, n, model16, opts16, True)
                    else:
                        fastrec_epoch(impl.split()[1], order, n)
                    if r:
                        times[impl, n].append(time.perf_counter() - t0)
                epoch_no[0] += 1
                if floor is None:
                    continue
                dense, attention = floor.time_epoch(lengths, n)
                gflops = peak_of(n) if peak_of else None
                if r:
                    times["dense", n].append(dense)
                    times["attention", n].append(attention)
                    if gflops:  # seconds of the epoch's multiply-adds at the measured peak
                        times["peak", n].append(2.0 * sum(floor.fmas(x) for x in lengths) / (gflops * 1e9))
        load_after = load_avg()
        print(f"\ndropout {dropout}: {args.rounds} rounds, load average {load_before:.2f} -> {load_after:.2f}")
        print("| threads | model | examples/s | vs PyTorch float32 (per-round ratio) |")
        print("|---|---|---|---|")
        for n in args.threads:
            tr = [n_users / t for t in times["torch", n]]
            for impl in impls:
                ex = [n_users / t for t in times[impl, n]]
                ratios = [a / b for a, b in zip(ex, tr)]
                print(f"| {n} | {impl} | {fmt(ex)} | {statistics.median(ratios):.2f} "
                      f"[{min(ratios):.2f}-{max(ratios):.2f}] |")
        if floor is None:
            continue
        print("\nfloor (the same rounds): the products alone, examples/s; the bar needs PyTorch's x 3")
        print("| threads | dense products ms/epoch | attention products ms/epoch | floor examples/s "
              "| FMA-peak floor examples/s | PyTorch x 3 | fastrec examples/s |")
        print("|---|---|---|---|---|---|---|")
        for n in args.threads:
            def ms(v):
                return f"{statistics.median(v) * 1e3:.1f} [{min(v) * 1e3:.1f}-{max(v) * 1e3:.1f}]"

            fl = [n_users / (a + b) for a, b in zip(times["dense", n], times["attention", n])]
            pk = [n_users / t for t in times["peak", n]]
            need = [3 * n_users / t for t in times["torch", n]]
            fr = [n_users / t for t in times[impls[0], n]]
            print(f"| {n} | {ms(times['dense', n])} | {ms(times['attention', n])} | {fmt(fl)} | "
                  f"{fmt(pk) if pk else 'n/a'} | {fmt(need)} | {fmt(fr)} |")


if __name__ == "__main__":
    main()
