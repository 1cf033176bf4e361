"""Mult-VAE training speed: fastrec.MultVAE vs PyTorch implementations of the same model (issue 15).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_multvae.py [--users 5000] \
        [--rounds 3] [--threads 1 2]

Data: synthetic implicit feedback, 10^5 users x 2 * 10^4 items, 50 draws per user from a 1 / rank^0.8 item
popularity (repeats dropped: ~4.5 * 10^6 interactions). Model: Liang et al.'s 600-200-600 Mult-VAE (encoder
n_items -> 600 -> 2 x 200, decoder 200 -> 600 -> n_items, tanh), dropout 0.5, batch 500 users, Adam 1e-3, KL
annealing. One "fit" = one epoch over ``--users`` users of the data drawn at random (each item none of them has is given
to one of them at random, so that the catalogue is the full 2 * 10^4 items), whole
fit timed: building the model and the input (ids -> rows, the users' bags), initialisation and every batch. A
fit of 5,000 users is 10 batches of the 200 of a full 10^5-user epoch, each of the same cost (same batch size,
same catalogue): the full epoch's time is 20x (printed too). Rounds are interleaved (fastrec, torch sparse,
torch dense, then again), median [min-max] per implementation and thread count. "fastrec bf16": the same
model with precision="bf16" (the output layer's three products in bfloat16 with float32 sums, on the
AVX512-BF16 kernel where the CPU has it; weights and everything else float32).

PyTorch, written the way users write it:
- "torch dense": RecBole's MultiVAE (recbole/model/general_recommender/multivae.py): each batch's rating rows
  as a dense users x items tensor, F.normalize, dropout, nn.Linear layers, log_softmax, Adam on every parameter;
- "torch sparse": the same model with the first layer as torch.sparse.mm over the batch's CSR rows (dropout
  on the nonzeros) and the likelihood gathered at the nonzeros; Adam still dense (as torch.optim.Adam is).

FLOP rate: the dense layers' flops (forward and the two backward products of every dense layer; the CSR first
layer is not counted) / fastrec's fit time, against the FP32 FMA peak measured in the same run
(benchmarks/fma_peak.cpp). The floor: the output layer's three GEMMs (logits, its weight gradient, its input
gradient: 6 x batch x 600 x n_items flops a batch) at that peak, which no float32 implementation can beat.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import TIMER, fma_peak, settle, stats  # noqa: E402

import fastrec  # noqa: E402

N_USERS, N_ITEMS, DRAWS = 100_000, 20_000, 50
HIDDEN, LATENT, BATCH, LR, DROPOUT = 600, 200, 500, 1e-3, 0.5


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8
    items = rng.choice(N_ITEMS, N_USERS * DRAWS, p=p / p.sum())
    users = np.repeat(np.arange(N_USERS), DRAWS)
    pairs = np.unique(users.astype(np.int64) * N_ITEMS + items)
    return pairs // N_ITEMS, pairs % N_ITEMS


def fit_fastrec(users, items, threads, precision="float32"):
    model = fastrec.MultVAE(hidden=(HIDDEN,), latent=LATENT, dropout=DROPOUT, epochs=1, batch_size=BATCH,
                            learning_rate=LR, early_stopping=False, random_state=0, n_threads=threads,
                            precision=precision)
    model.fit(users, items)
    return model.history_["loss"][-1]


def fit_torch(users, items, threads, sparse):
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # ids -> rows, the users' bags as CSR (what any implementation builds first)
    uid, urow = np.unique(users, return_inverse=True)
    iid, icol = np.unique(items, return_inverse=True)
    order = np.lexsort((icol, urow))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(urow, minlength=len(uid)))])
    cols = torch.from_numpy(icol[order].astype(np.int64))
    n_items = len(iid)

    class MultVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc1, self.enc2 = nn.Linear(n_items, HIDDEN), nn.Linear(HIDDEN, 2 * LATENT)
            self.dec1, self.dec2 = nn.Linear(LATENT, HIDDEN), nn.Linear(HIDDEN, n_items)

        def forward(self, h1):
            h = self.enc2(torch.tanh(h1))
            mu, logvar = h[:, :LATENT], h[:, LATENT:]
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return self.dec2(torch.tanh(self.dec1(z))), mu, logvar

    model = MultVAE()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    perm = np.random.default_rng(0).permutation(len(uid))
    total_anneal, step, last = 200_000, 0, 0.0
    for b0 in range(0, len(uid), BATCH):
        rows = perm[b0:b0 + BATCH]
        starts, ends = indptr[rows], indptr[rows + 1]
        lengths = ends - starts
        at = torch.from_numpy(np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]))
        r = torch.from_numpy(np.repeat(np.arange(len(rows)), lengths))
        c = cols[at]
        if sparse:
            norm = torch.from_numpy(1.0 / np.sqrt(np.maximum(lengths, 1)).astype(np.float32))[r]
            vals = F.dropout(norm, DROPOUT, training=True)
            x_in = torch.sparse_coo_tensor(torch.stack([r, c]), vals, (len(rows), n_items),
                                           check_invariants=False).coalesce()
            h1 = torch.sparse.mm(x_in, model.enc1.weight.t()) + model.enc1.bias
        else:  # RecBole: a dense rating matrix row per user
            x = torch.zeros(len(rows), n_items)
            x[r, c] = 1.0
            h1 = model.enc1(F.dropout(F.normalize(x), DROPOUT, training=True))
        logits, mu, logvar = model(h1)
        anneal = min(0.2, step / total_anneal)
        log_softmax = F.log_softmax(logits, 1)
        nll = -log_softmax[r, c].sum() / len(rows) if sparse else -(log_softmax * x).sum(1).mean()
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        loss = nll + anneal * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        last = float(loss.detach())
    return last


def dense_flops(n_batches_rows):
    """Flops of the dense layers (forward + dW + dInput each) over this many users, and those of the output
    layer alone."""
    per_row = 6 * (HIDDEN * 2 * LATENT + LATENT * HIDDEN + HIDDEN * N_ITEMS)
    return per_row * n_batches_rows, 6 * HIDDEN * N_ITEMS * n_batches_rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=5_000, help="users per timed fit (one epoch over them)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-dense", action="store_true", help="skip torch dense")
    ap.add_argument("--no-bf16", action="store_true", help="skip fastrec bf16")
    args = ap.parse_args(argv)
    import torch

    users, items = make_data()
    rng = np.random.default_rng(1)
    chosen = rng.permutation(N_USERS)[:args.users]
    pick = np.isin(users, chosen)
    u, i = users[pick], items[pick]
    # The full catalogue in every timed fit (the output layer's cost is per item): each item none of these users
    # has goes to one of them at random.
    missing = np.setdiff1d(np.arange(N_ITEMS), i)
    u, i = np.concatenate([u, rng.choice(chosen, len(missing))]), np.concatenate([i, missing])
    print(f"data: {N_USERS:,} users x {N_ITEMS:,} items, {len(users):,} interactions; timed fit: {args.users:,} "
          f"users ({len(u):,} interactions, {-(-args.users // BATCH)} batches of {BATCH}), {len(np.unique(i)):,} "
          f"items among them ({len(missing):,} added, one interaction each); torch {torch.__version__}, fastrec {fastrec.__version__}", flush=True)
    peak = fma_peak(max(args.threads))
    print(f"measured FP32 FMA peak: {peak} GFLOP/s", flush=True)
    impls = {"fastrec": lambda t: fit_fastrec(u, i, t)}
    if not args.no_bf16:
        impls["fastrec bf16"] = lambda t: fit_fastrec(u, i, t, "bf16")
    impls["torch sparse"] = lambda t: fit_torch(u, i, t, True)
    if not args.no_dense:
        impls["torch dense"] = lambda t: fit_torch(u, i, t, False)
    flops, out_flops = dense_flops(args.users)
    scale = N_USERS / args.users
    for t in args.threads:
        times = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                settle(0.3)
                start = TIMER()
                loss = fn(t)
                times[name].append(TIMER() - start)
                print(f"  {t} thread(s) {name}: {times[name][-1]:.2f} s (last loss {loss:.1f})", flush=True)
        ours = stats(times["fastrec"])
        print(f"{t} thread(s), fit over {args.users:,} users [x{scale:g} = a {N_USERS:,}-user epoch]:")
        ours_names = [n for n in impls if n.startswith("fastrec")]
        for name in impls:
            st = stats(times[name])
            line = (f"  {name:13s} {st['median']:.2f} s [{st['min']:.2f}-{st['max']:.2f}]  "
                    f"(epoch ~{st['median'] * scale:.0f} s)")
            for ours_name in ours_names if not name.startswith("fastrec") else []:
                ratio = np.array(times[name]) / np.array(times[ours_name])
                line += (f"  / {ours_name} {np.median(ratio):.2f}x [{ratio.min():.2f}-{ratio.max():.2f}]")
            print(line + (" (per round)" if not name.startswith("fastrec") else ""))
        if "fastrec bf16" in impls:
            ratio = np.array(times["fastrec"]) / np.array(times["fastrec bf16"])
            print(f"  fastrec float32 / bf16 {np.median(ratio):.2f}x [{ratio.min():.2f}-{ratio.max():.2f}] (per round)")
        if peak and t in peak:
            rate = flops / ours["median"] / 1e9
            floor = out_flops / (peak[t] * 1e9)
            print(f"  fastrec dense layers: {flops / 1e12:.2f} TFLOP in {ours['median']:.2f} s = {rate:.0f} GFLOP/s, "
                  f"{100 * rate / peak[t]:.0f}% of the measured {peak[t]:.0f} GFLOP/s peak on {t} thread(s)")
            best_torch = min(stats(times[n])["median"] for n in impls if n.startswith("torch"))
            print(f"  floor: the output layer's 3 GEMMs alone ({out_flops / 1e12:.2f} TFLOP) at peak take "
                  f"{floor:.2f} s = {100 * floor / ours['median']:.0f}% of fastrec's fit; 2x the better torch "
                  f"variant would need {best_torch / 2:.2f} s")
            if "fastrec bf16" in impls:
                bf = stats(times["fastrec bf16"])["median"]
                print(f"  fastrec bf16 (output layer's products in bf16): {flops / bf / 1e9:.0f} GFLOP/s over the "
                      f"dense layers = {100 * flops / bf / 1e9 / peak[t]:.0f}% of the FP32 FMA peak (a bf16 dot "
                      f"product instruction does 2 multiply-adds per lane: the bf16 ceiling is up to 2x that peak)")


if __name__ == "__main__":
    main()
