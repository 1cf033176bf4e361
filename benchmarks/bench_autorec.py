"""One I-AutoRec epoch: fastrec.AutoRec against two PyTorch CPU implementations of the same model (issue 15's
speed bar: fastrec >= 3x PyTorch), at 1 and 2 threads, in interleaved rounds, each whole fit call timed.

    python benchmarks/bench_autorec.py [--threads 1 2] [--rounds 3] [--dense-rounds 2] [--json out.json]
    (figures of record: `flock -x /work/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python ...`)

Data: a synthetic rating matrix of 10^5 users x 2 * 10^4 items with 10^7 distinct ratings in 1..5 (items drawn
with a power-law popularity, users uniformly; seed 0), built once. Model: hidden 500, sigmoid encoder, linear
decoder, squared error on the observed ratings, L2, Adam (lr 3e-4), batches of --batch-size items, 1 epoch.

Implementations (each timed from raw (user, item, rating) arrays to the end of the epoch: id mapping, the
item x user CSR, parameter initialisation and the epoch):
- fastrec: ``fastrec.AutoRec(hidden=500, epochs=1, early_stopping=False, batch_size=..., n_threads=T).fit``.
  Per batch: the codes by a CSR x W_enc gather, the outputs at the observed entries only, backward grouped by
  user, lazy Adam and L2 on the users the batch touches (cpp/autorec.cpp).
- torch dense ("the common way", as AutoRec is usually written in PyTorch): nn.Linear encoder and decoder on
  the batch's dense item x user rows (a scipy CSR slice densified per batch), the decoder's full output masked
  by the observed entries, L2 on both weight matrices, torch.optim.Adam. Cost per epoch: 6 x items x users x
  hidden multiply-adds, whatever the sparsity.
- torch gather (the same masked model written sparse, as a PyTorch expert would): the encoder an
  nn.EmbeddingBag(mode="sum", per_sample_weights=ratings, sparse=True), the decoder's rows of the observed
  users gathered by nn.Embedding(sparse=True) and dotted with the codes, L2 on the rows the batch touches
  (fastrec's lazy L2), torch.optim.SparseAdam on the tables (lazy, as fastrec) and Adam on the encoder bias.
  Its multiply-adds are fastrec's.

FLOP rates: the masked model's products are 5 x ratings x hidden multiply-adds per epoch (encoder gather,
decoder dots, dL/dH, the decoder and encoder row gradients); torch dense executes 6 x items x users x hidden.
Both are printed against the FP32 FMA peak of this machine measured in the same run (benchmarks/fma_peak.cpp).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import fastrec

sys.path.insert(0, str(Path(__file__).parent))
from timing import fma_peak, fmt_t, machine_info, settle, stats  # noqa: E402

N_USERS, N_ITEMS, N_RATINGS, HIDDEN = 100_000, 20_000, 10_000_000, 500
LR, L2 = 3e-4, 5.0  # AutoRec's defaults


def make_data(seed=0, n_users=N_USERS, n_items=N_ITEMS, n=N_RATINGS):
    """n distinct (user, item) pairs: items by a power-law popularity (weight (rank + 10)^-0.8), users uniform;
    ratings 1..5 from a user and an item effect plus noise."""
    rng = np.random.default_rng(seed)
    weight = (np.arange(n_items) + 10.0) ** -0.8
    keys = np.zeros(0, np.int64)
    while len(keys) < n:
        m = int((n - len(keys)) * 1.2) + 1000
        new = rng.integers(0, n_users, m) * n_items + rng.choice(n_items, m, p=weight / weight.sum())
        keys = np.sort(np.concatenate([keys, new]))  # np.unique: hash-based in NumPy 2, 10x slower here
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    keys = rng.permutation(keys)[:n]
    users, items = keys // n_items, keys % n_items
    ratings = np.clip(np.round(3.5 + 0.7 * np.sin(users) + 0.7 * np.cos(items) + rng.normal(0, 0.8, n)), 1, 5)
    return users, items, ratings.astype(np.float64)


# ------------------------------------------------------------------------------------------------ fastrec
def fit_fastrec(users, items, ratings, threads, batch_size):
    model = fastrec.AutoRec(hidden=HIDDEN, epochs=1, early_stopping=False, batch_size=batch_size, l2=L2,
                            learning_rate=LR, random_state=0, n_threads=threads)
    model.fit(users, items, ratings)
    return model.history_["loss"][-1]


# ------------------------------------------------------------------------------------------------ torch
def _item_csr(users, items, ratings):
    """The item x user CSR of the ratings (ids mapped to 0..n-1), as both torch models read it."""
    import scipy.sparse as sp

    user_ids, u = np.unique(users, return_inverse=True)
    item_ids, i = np.unique(items, return_inverse=True)
    X = sp.csr_matrix((ratings.astype(np.float32), (i.ravel(), u.ravel())), shape=(len(item_ids), len(user_ids)))
    X.sort_indices()
    return X


def fit_torch_dense(users, items, ratings, threads, batch_size, seed=0):
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    X = _item_csr(users, items, ratings)
    n_items, n_users = X.shape
    mean = float(X.data.mean())

    class IAutoRec(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(n_users, HIDDEN)
            self.decoder = nn.Linear(HIDDEN, n_users)

        def forward(self, r):
            return self.decoder(torch.sigmoid(self.encoder(r)))

    model = IAutoRec()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = np.random.default_rng(seed).permutation(n_items)
    total = 0.0
    for s in range(0, n_items, batch_size):
        rows = X[order[s:s + batch_size]]
        r = torch.from_numpy(rows.toarray())
        mask = r != 0
        out = model(r)
        err = (out - (r - mean)) * mask
        loss = 0.5 * err.pow(2).sum() / len(r) + 0.5 * L2 / len(r) * (
            model.encoder.weight.pow(2).sum() + model.decoder.weight.pow(2).sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(r)
    return total / n_items


def fit_torch_gather(users, items, ratings, threads, batch_size, seed=0):
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    X = _item_csr(users, items, ratings)
    n_items, n_users = X.shape
    mean = float(X.data.mean())
    indptr, cols, values = (torch.from_numpy(a) for a in (X.indptr.astype(np.int64), X.indices.astype(np.int64),
                                                          X.data))
    bound = (6.0 / (n_users + HIDDEN)) ** 0.5
    enc = nn.EmbeddingBag(n_users, HIDDEN, mode="sum", sparse=True)
    dec = nn.Embedding(n_users, HIDDEN, sparse=True)
    dec_bias = nn.Embedding(n_users, 1, sparse=True)
    with torch.no_grad():
        enc.weight.uniform_(-bound, bound)
        dec.weight.uniform_(-bound, bound)
        dec_bias.weight.zero_()
    enc_bias = nn.Parameter(torch.zeros(HIDDEN))
    sparse_opt = torch.optim.SparseAdam([enc.weight, dec.weight, dec_bias.weight], lr=LR)
    dense_opt = torch.optim.Adam([enc_bias], lr=LR)
    order = np.random.default_rng(seed).permutation(n_items)
    total = 0.0
    for s in range(0, n_items, batch_size):
        batch = torch.from_numpy(order[s:s + batch_size])
        starts, ends = indptr[batch], indptr[batch + 1]
        lengths = ends - starts
        at = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths) + torch.arange(
            int(lengths.sum()))
        c, v = cols[at], values[at]
        offsets = torch.cumsum(lengths, 0) - lengths
        h = torch.sigmoid(enc(c, offsets, per_sample_weights=v) + enc_bias)
        row = torch.repeat_interleave(torch.arange(len(batch)), lengths)
        out = (h[row] * dec(c)).sum(1) + dec_bias(c).squeeze(1)
        err = out - (v - mean)
        touched = torch.unique(c)
        B = len(batch)
        loss = 0.5 * err.pow(2).sum() / B + 0.5 * L2 / B * (
            enc(touched, torch.arange(len(touched))).pow(2).sum() + dec(touched).pow(2).sum())
        sparse_opt.zero_grad(set_to_none=True)
        dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
        total += float(loss.detach()) * B
    return total / n_items


def report(threads, times, peak, masked_flop, dense_flop):
    """The table rows of one thread count: median [min - max] per implementation, its FLOP rate against the
    measured peak, and how many times fastrec's median time it took."""
    print(f"{threads} thread(s):", flush=True)
    row = {name: stats(t) for name, t in times.items() if t}
    for name, st in row.items():
        flop = dense_flop if name == "torch_dense" else masked_flop
        rate = flop / st["median"] / 1e9
        share = f", {rate / peak[threads]:.1%} of the {peak[threads]:.0f} GFLOP/s peak" if peak and threads in peak else ""
        ratio = "" if name == "fastrec" or "fastrec" not in row else \
            f"; fastrec {st['median'] / row['fastrec']['median']:.2f}x faster (median ratio)"
        print(f"  {name:13s} {fmt_t(st)} (n={st['n']}): {rate:.1f} GFLOP/s of its products{share}{ratio}", flush=True)


def merge(paths):
    """Pool the samples of several --json runs per (threads, implementation) and print the table."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    pooled, peaks = {}, {}
    for run in runs:
        for threads, row in run["runs"].items():
            for name, samples in row["samples"].items():
                pooled.setdefault(int(threads), {}).setdefault(name, []).extend(samples)
        for threads, gflops in (run.get("peak") or {}).items():
            peaks.setdefault(int(threads), []).append(gflops)
    peak = {t: float(np.median(v)) for t, v in peaks.items()}
    print(f"{len(runs)} runs pooled; FMA peak (median of the runs' measurements): {peak}")
    for threads in sorted(pooled):
        report(threads, pooled[threads], peak, runs[0]["masked_flop"], runs[0]["dense_flop"])
    return 0


IMPLEMENTATIONS = {"fastrec": fit_fastrec, "torch_gather": fit_torch_gather, "torch_dense": fit_torch_dense}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dense-rounds", type=int, default=None, help="rounds of torch dense (default: --rounds)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--only", nargs="+", choices=tuple(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS))
    p.add_argument("--ratings", type=int, default=N_RATINGS, help="ratings (smaller for a quick check)")
    p.add_argument("--json")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="print the pooled table of these runs' --json files "
                   "(runs split so that each exclusive hold of the machine stays short) and exit")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge)
    import torch

    info = machine_info()
    info["torch"] = torch.__version__
    print(f"fastrec {fastrec.__version__} (commit {info.get('commit')}), torch {torch.__version__}, "
          f"{info.get('cpu')}, {info['cores']} cores", flush=True)
    start = time.perf_counter()
    users, items, ratings = make_data(n=args.ratings)
    print(f"data: {len(ratings):,} ratings, {len(np.unique(users)):,} users x {len(np.unique(items)):,} items "
          f"({time.perf_counter() - start:.1f} s); hidden {HIDDEN}, batch {args.batch_size} items", flush=True)
    peak = fma_peak(max(args.threads))
    print(f"FP32 FMA peak measured now: {peak} GFLOP/s", flush=True)
    small = make_data(n=20_000, n_users=2_000, n_items=500)
    for name in args.only:  # first calls pay one-time costs (torch's lazy initialisation: ~10 s): not timed
        IMPLEMENTATIONS[name](*small, 1, args.batch_size)
    n_items_seen = len(np.unique(items))
    masked_flop = 2 * 5 * len(ratings) * HIDDEN
    dense_flop = 2 * 6 * n_items_seen * len(np.unique(users)) * HIDDEN
    results = {"info": info, "peak": peak, "batch_size": args.batch_size, "ratings": len(ratings), "runs": {}}
    for threads in args.threads:
        times = {name: [] for name in args.only}
        losses = {}
        for rnd in range(args.rounds):
            for name in args.only:
                if name == "torch_dense" and args.dense_rounds is not None and rnd >= args.dense_rounds:
                    continue
                settle(0.3)
                t0 = time.perf_counter()
                losses[name] = IMPLEMENTATIONS[name](users, items, ratings, threads, args.batch_size)
                times[name].append(time.perf_counter() - t0)
                print(f"  {threads} thread(s) round {rnd + 1} {name}: {times[name][-1]:.2f} s (loss {losses[name]:.4g})",
                      flush=True)
        row = {name: stats(t) for name, t in times.items() if t}
        row["samples"] = times
        row["losses"] = losses
        results["runs"][threads] = row
        report(threads, times, peak, masked_flop, dense_flop)
    results.update(masked_flop=masked_flop, dense_flop=dense_flop)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
