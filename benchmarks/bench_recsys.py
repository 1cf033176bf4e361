#!/usr/bin/env python
"""Measure issue 3's speed bar (the recommender) side by side with PyTorch, in one run; print a markdown table.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_recsys.py            # full, ~2 min on a quiet machine
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_recsys.py --quick    # smoke run, ~1 min
    python benchmarks/bench_recsys.py --only topk predict --topk-items 100000 --topk-threads 1   # checks only, seconds

The model (issue 3, "Bar", speed): user (100k x 32, one id per row), item (1M x 32, one id per row), tags
(1k x 16, 1-5 ids per row, mean pooling), 13 dense features; MLP 93-256-128-64-1 ReLU; sigmoid + BCE; plain SGD
(no momentum, no weight decay) on every parameter.

fastrec is driven through its low-level API (`fastrec._core.FieldHandle`, docs/DESIGN.md "The field model"),
with three key columns: key 0 = user index, key 1 = item index, key 2 = example index. user and item are
one-id-per-row bag tables over their vocabularies read through keys 0 and 1; tags is a per-example bag table
(bag r = the tags of example r, weights 1/len) read through key 2; the 13 dense features are a per-example
(n x 13) float32 table read through key 2. The spec dict is built by hand (tables allocated with np.empty and
filled in chunks, so a 10^7 x 32 table costs no float64 temporary) and the handle is built once.

PyTorch 2.13 (CPU): nn.EmbeddingBag(sparse=True) for the three fields (user / item: mode "sum", one index per
bag; tags: mode "mean" with offsets), nn.Linear layers with ReLU, nn.BCEWithLogitsLoss (mean), torch.optim.SGD
over all parameters (sparse gradients for the bags), initialised with the same numbers as fastrec. Every
minibatch's tensors are built BEFORE timing (torch's timed loop is only zero_grad / forward / backward / step),
whereas fastrec's timed train_epoch call gathers its minibatches itself: the comparison favours torch.

Items:
  (1) training throughput (examples/s) over the same examples in the same order, batch 256 and 1024, 1 and 2
      threads (fastrec n_threads, torch.set_num_threads); one sample = one pass over the data (fastrec: one
      train_epoch call, torch: the loop over the pre-built batches). Bar: fastrec >= 2x torch.
  (2) vocabulary sweep: item vocabulary 10^4 .. 10^7 (items drawn uniformly), step time = epoch time / batches
      at batch 1024 with 2 threads; fastrec (bar: step(10^7) / step(10^4) <= 1.2) and torch for context.
  (3) single-row predict from Python: `handle.predict([u], [i], [r]], 1)` with pre-built one-element int32
      arrays, each call timed with perf_counter_ns (median of --predict-calls); for context the public
      `fastrec.Recommender.predict` of one pair on a small fitted model, and torch's single-row forward under
      torch.no_grad() (1 thread). Bar: the handle's median < 10 µs.
  (4) top-10 for one user over 1M items with 2 threads (--topk-rounds rounds of --topk-calls calls per
      implementation, each for a different random user): a TWO-key model (user, item) is needed by
      `FieldHandle.topk`, so tags and the dense features become item side features (an item-keyed bag table,
      1M bags of 1-5 tags, and an item-keyed 1M x 13 table): same fields, same MLP width 93, same MLP.
      `handle.topk(sampler, [u], None, 10, False, 2)`; median over users. The handle caches the item side of
      the first layer (item inputs times W1's item rows) on its first top-k call: that call is timed apart
      ("first call"), the bar uses the warm calls. Torch, like for like: the same item side product computed
      once (timed apart), then per user the user's part, relu, layers 2-4 over all items in chunks of 65536,
      torch.topk, under no_grad. Torch brute force (context only, one call per round): the whole forward over
      all items for every user. Bar: fastrec's warm median < 300 ms.

Checks: every bar item above, and two correctness checks (the single-row predict equals torch's
sigmoid(logit) within 1e-6; fastrec's top-10 items are torch's, like for like and brute force, up to ties
within float32 rounding, with probabilities within 1e-5). A bar item is "not checked" when the run did not
measure what the bar defines (--quick sizes, other thread counts, no torch). The script exits with status 1
when any check misses, after printing the tables, and names the checks that missed on stderr.

Method: implementations are measured round-robin (each round runs every implementation once, order rotated
between rounds), each after a pause (--settle, default 0.3 s: OpenBLAS / OpenMP workers spin after a call)
and, in the first round, an untimed warm-up pass. Medians are over all timed samples; spread = [min - max].
The JSON (machine, settings, every sample) goes to benchmarks/results/recsys.json (git-ignored).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import fastrec
from timing import machine_info as base_machine_info
from timing import TIMER, fmt_t, fmt_time, settle, stats
from fastrec import _core

try:
    import torch
    from torch import nn
except ImportError:  # torch columns are skipped
    torch = None

N_USERS, N_ITEMS, N_TAGS = 100_000, 1_000_000, 1_000
D_USER, D_ITEM, D_TAG, N_DENSE = 32, 32, 16, 13
HIDDEN = (256, 128, 64)
LR = 0.01
PREDICT_TOL = 1e-6  # |fastrec's probability - torch's sigmoid(logit)| for the predict check


# ------------------------------------------------------------------------------------------------ helpers




def fmt_rate(st):
    return f"{st['median'] / 1e3:.1f}k [{st['min'] / 1e3:.1f}k – {st['max'] / 1e3:.1f}k]"


def set_threads(n):
    if torch is not None:
        torch.set_num_threads(n)


def machine_info():
    return {**base_machine_info(), "torch": None if torch is None else torch.__version__}


class LoadMeter:
    """Average number of cores used by OTHER processes over a section (/proc/stat busy time minus this process's
    CPU time): the machine is shared, and a 2-thread measurement is only meaningful when this stays near 0."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.t0 = self._sample()

    def _sample(self):
        try:
            with open("/proc/stat") as fh:
                v = [int(x) for x in fh.readline().split()[1:]]
            busy = (sum(v[:8]) - v[3] - v[4]) / self.hz
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        t = os.times()
        return time.monotonic(), busy, t.user + t.system

    def foreign_cores(self):
        w1, b1, o1 = self._sample()
        w0, b0, o0 = self.t0
        return max(0.0, ((b1 - b0) - (o1 - o0)) / max(w1 - w0, 1e-9))


def normal_table(rng, rows, cols, scale=0.05, chunk=1 << 18):
    """float32 (rows, cols) ~ N(0, scale^2), filled in chunks (no full-size float64 temporary)."""
    t = np.empty((rows, cols), np.float32)
    for s in range(0, rows, chunk):
        e = min(rows, s + chunk)
        t[s:e] = rng.standard_normal((e - s, cols), dtype=np.float32) * np.float32(scale)
    return t


def identity_bags(rows):
    """One-id-per-row bag table: bag q = [(q, 1.0)]."""
    return (np.arange(rows + 1, dtype=np.int64), np.arange(rows, dtype=np.int32), np.ones(rows, np.float32))


def random_bags(rng, rows, vocab, lo=1, hi=5):
    """rows bags of lo..hi distinct-or-not ids in [0, vocab), mean pooling (weights 1/len)."""
    lens = rng.integers(lo, hi + 1, rows)
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    ids = rng.integers(0, vocab, int(indptr[-1])).astype(np.int32)
    weights = np.repeat((1.0 / lens).astype(np.float32), lens)
    return indptr, ids, weights


def mlp_params(rng, width):
    sizes = [width, *HIDDEN, 1]
    coefs, intercepts = [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        coefs.append(rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32))
        intercepts.append(rng.uniform(-bound, bound, fan_out).astype(np.float32))
    return coefs, intercepts


# ------------------------------------------------------------------------------------------------ the model
class Model:
    """Initial parameters (user / item / tag tables, MLP) shared by the fastrec spec and the torch module."""

    def __init__(self, n_items, seed=0):
        rng = np.random.default_rng(seed)
        self.user = normal_table(rng, N_USERS, D_USER)
        self.item = normal_table(rng, n_items, D_ITEM)
        self.tag = normal_table(rng, N_TAGS, D_TAG)
        self.width = D_USER + D_ITEM + D_TAG + N_DENSE
        self.coefs, self.intercepts = mlp_params(rng, self.width)
        self.n_items = n_items


class Data:
    """n examples: random users, items, per-example tag bags and dense features, random 0/1 labels."""

    def __init__(self, n, n_items, seed=1):
        rng = np.random.default_rng(seed)
        self.n = n
        self.users = rng.integers(0, N_USERS, n).astype(np.int32)
        self.items = rng.integers(0, n_items, n).astype(np.int32)
        self.rows = np.arange(n, dtype=np.int32)
        self.tags = random_bags(rng, n, N_TAGS)
        self.dense = rng.standard_normal((n, N_DENSE), dtype=np.float32)
        self.y = rng.integers(0, 2, n).astype(np.float32)
        self.order = rng.permutation(n).astype(np.int64)


def fastrec_spec(model: Model, data_tags, data_dense, key_tags=2, key_dense=2, n_keys=3, copy=True):
    """The `_core` spec dict (docs/DESIGN.md) of the model; arrays copied so fastrec trains its own."""
    c = (lambda a: a.copy()) if copy else (lambda a: a)
    fields = [
        {"table": c(model.user), "bags": identity_bags(N_USERS), "key": 0, "offset": 0, "state_kind": "none",
         "state1": None, "state2": None},
        {"table": c(model.item), "bags": identity_bags(model.n_items), "key": 1, "offset": D_USER,
         "state_kind": "none", "state1": None, "state2": None},
        {"table": c(model.tag), "bags": data_tags, "key": key_tags, "offset": D_USER + D_ITEM,
         "state_kind": "none", "state1": None, "state2": None},
    ]
    dense = [{"table": data_dense, "key": key_dense, "offset": D_USER + D_ITEM + D_TAG}]
    coefs = [c(w) for w in model.coefs]
    intercepts = [c(b) for b in model.intercepts]
    state1 = [np.zeros_like(p) for p in coefs + intercepts]
    return {"n_keys": n_keys, "width": model.width, "loss": "bce", "activation": "relu", "coefs": coefs,
            "intercepts": intercepts, "state1": state1, "state2": [], "fields": fields, "dense": dense, "gmf": None}


class FastrecTrainer:
    def __init__(self, model: Model, data: Data):
        self.spec = fastrec_spec(model, data.tags, data.dense)
        self.handle = _core.FieldHandle(self.spec, True)
        self.keys = [data.users, data.items, data.rows]
        self.data = data
        self.epoch = 0

    def epoch_fn(self, batch_size, n_threads):
        d = self.data

        def run():
            self.epoch += 1
            return self.handle.train_epoch(self.spec["state1"], self.spec["state2"], self.keys, d.y, None, d.order,
                                           batch_size, 0.0, "sgd", LR, 0.0, False, 0.9, 0.999, 1e-8, 0, None,
                                           self.epoch, n_threads)

        return run


if torch is not None:
    class TorchModel(nn.Module):
        def __init__(self, model: Model):
            super().__init__()
            self.user = nn.EmbeddingBag(N_USERS, D_USER, mode="sum", sparse=True)
            self.item = nn.EmbeddingBag(model.n_items, D_ITEM, mode="sum", sparse=True)
            self.tag = nn.EmbeddingBag(N_TAGS, D_TAG, mode="mean", sparse=True)
            with torch.no_grad():
                self.user.weight.copy_(torch.from_numpy(model.user))
                self.item.weight.copy_(torch.from_numpy(model.item))
                self.tag.weight.copy_(torch.from_numpy(model.tag))
            layers = []
            for w, b in zip(model.coefs, model.intercepts):
                lin = nn.Linear(w.shape[0], w.shape[1])
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(w.T.copy()))
                    lin.bias.copy_(torch.from_numpy(b))
                layers += [lin, nn.ReLU()]
            self.mlp = nn.Sequential(*layers[:-1])  # no ReLU after the output layer

        def forward(self, users, items, tag_ids, tag_offsets, dense):
            x = torch.cat([self.user(users), self.item(items), self.tag(tag_ids, tag_offsets), dense], dim=1)
            return self.mlp(x).squeeze(1)

    class TorchTrainer:
        def __init__(self, model: Model, data: Data):
            self.net = TorchModel(model)
            self.opt = torch.optim.SGD(self.net.parameters(), lr=LR)
            self.loss = nn.BCEWithLogitsLoss()
            self.data = data
            self.batches = {}

        def make_batches(self, batch_size):
            """Every minibatch's tensors, in fastrec's order (built once, outside the timing)."""
            if batch_size in self.batches:
                return self.batches[batch_size]
            d = self.data
            indptr, ids, _ = d.tags
            out = []
            for s in range(0, d.n, batch_size):
                rows = d.order[s:s + batch_size]
                lens = indptr[rows + 1] - indptr[rows]
                offs = np.zeros(len(rows), np.int64)
                np.cumsum(lens[:-1], out=offs[1:])
                tag_ids = np.concatenate([ids[indptr[r]:indptr[r + 1]] for r in rows]).astype(np.int64)
                out.append((torch.from_numpy(d.users[rows].astype(np.int64)).unsqueeze(1),
                            torch.from_numpy(d.items[rows].astype(np.int64)).unsqueeze(1),
                            torch.from_numpy(tag_ids), torch.from_numpy(offs),
                            torch.from_numpy(d.dense[rows]), torch.from_numpy(d.y[rows])))
            self.batches[batch_size] = out
            return out

        def epoch_fn(self, batch_size, n_threads):
            batches = self.make_batches(batch_size)
            net, opt, loss_fn = self.net, self.opt, self.loss

            def run():
                total = 0.0
                for u, i, t, o, x, y in batches:
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(net(u, i, t, o, x), y)
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(y)
                return total

            return run


# ------------------------------------------------------------------------------------------------ (1) throughput
def bench_throughput(args, model, data, impls):
    trainers = {"fastrec": FastrecTrainer(model, data)}
    if "torch" in impls:
        trainers["torch"] = TorchTrainer(model, data)
    res = {}
    for bs in args.batches:
        for t in args.threads:
            set_threads(t)
            fns = {name: tr.epoch_fn(bs, t) for name, tr in trainers.items()}
            samples = {name: [] for name in fns}
            for name, fn in fns.items():  # warm-up pass
                settle(args.settle)
                fn()
            for r in range(args.rounds):
                names = list(fns)
                names = names[r % len(names):] + names[:r % len(names)]
                for name in names:
                    settle(args.settle)
                    t0 = TIMER()
                    fns[name]()
                    samples[name].append(TIMER() - t0)
            entry = {name: {"epoch_s": stats(v), "examples_per_s": stats([data.n / s for s in v]),
                            "samples_s": v} for name, v in samples.items()}
            if "torch" in entry:
                entry["speedup"] = entry["torch"]["epoch_s"]["median"] / entry["fastrec"]["epoch_s"]["median"]
            res[f"b{bs}_t{t}"] = {"batch": bs, "threads": t, **entry}
            print(f"  throughput batch {bs} threads {t}: "
                  + ", ".join(f"{n} {fmt_rate(entry[n]['examples_per_s'])}/s" for n in samples)
                  + (f", speedup {entry['speedup']:.2f}x" if "speedup" in entry else ""), flush=True)
    return res, trainers


# ------------------------------------------------------------------------------------------------ (2) vocab sweep
def bench_vocab(args, data_seed_n, impls):
    bs, t = 1024, 2
    set_threads(t)
    runs = {}
    for v in args.vocabs:
        model = Model(v, seed=10)
        data = Data(data_seed_n, v, seed=11)
        runs[(v, "fastrec")] = FastrecTrainer(model, data).epoch_fn(bs, t)
        if "torch" in impls and v <= args.torch_max_vocab:
            runs[(v, "torch")] = TorchTrainer(model, data).epoch_fn(bs, t)
        del model
        gc.collect()
    n_batches = -(-data_seed_n // bs)
    samples = {k: [] for k in runs}
    for k, fn in runs.items():
        settle(args.settle)
        fn()
    keys = list(runs)
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            settle(args.settle)
            t0 = TIMER()
            runs[k]()
            samples[k].append((TIMER() - t0) / n_batches)
    res = {"batch": bs, "threads": t, "examples": data_seed_n, "steps": {}}
    for (v, name), s in samples.items():
        res["steps"][f"{name}|{v}"] = {"vocab": v, "impl": name, "step_s": stats(s), "samples_s": s}
    lo, hi = min(args.vocabs), max(args.vocabs)
    for name in ("fastrec", "torch"):
        a, b = res["steps"].get(f"{name}|{lo}"), res["steps"].get(f"{name}|{hi}")
        if a and b:
            res[f"ratio_{name}"] = b["step_s"]["median"] / a["step_s"]["median"]
    print("  vocab sweep: " + ", ".join(f"{k} {fmt_time(v['step_s']['median'])}" for k, v in res["steps"].items())
          + f"; fastrec ratio {res.get('ratio_fastrec', float('nan')):.3f}", flush=True)
    runs.clear()
    gc.collect()
    return res


# ------------------------------------------------------------------------------------------------ (3) predict
def per_call_ns(fn, calls):
    fn()
    fn()
    out = np.empty(calls, np.int64)
    pc = time.perf_counter_ns
    for j in range(calls):
        t0 = pc()
        fn()
        out[j] = pc() - t0
    return out


def ns_stats(a):
    a = np.sort(a) / 1e9
    return {"median": float(np.median(a)), "min": float(a[0]), "max": float(a[-1]),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "n": int(len(a))}


def bench_predict(args, model, data, impls, trainers):
    set_threads(1)
    spec = fastrec_spec(model, data.tags, data.dense)
    handle = _core.FieldHandle(spec, False)
    u, i, r = int(data.users[7]), int(data.items[7]), 7
    keys = [np.array([u], np.int32), np.array([i], np.int32), np.array([r], np.int32)]
    fns = {"fastrec handle.predict": lambda: handle.predict(keys, 1)}
    check = None
    # The public API on a small fitted model (context): one (user, item) pair of raw ids.
    from fastrec.datasets import make_interactions

    inter = make_interactions(n_users=500, n_items=300, n_interactions=5000, random_state=0)
    rec = fastrec.Recommender(epochs=1, random_state=0, n_threads=1)
    rec.fit(inter.users, inter.items, inter.ratings)
    pu, pi = np.asarray(inter.users[:1]), np.asarray(inter.items[:1])
    fns["fastrec Recommender.predict (small model)"] = lambda: rec.predict(pu, pi)
    if "torch" in impls:
        net = TorchModel(model)
        net.eval()
        tu, ti = torch.tensor([[u]]), torch.tensor([[i]])
        lo, hi = int(data.tags[0][r]), int(data.tags[0][r + 1])
        tt, to = torch.from_numpy(data.tags[1][lo:hi].astype(np.int64)), torch.zeros(1, dtype=torch.int64)
        tx = torch.from_numpy(data.dense[r:r + 1].copy())

        def torch_forward():
            with torch.no_grad():
                return net(tu, ti, tt, to, tx)

        fns["torch forward (no_grad)"] = torch_forward
        want, got = float(torch_forward()[0]), float(handle.predict(keys, 1)[0])
        want_p = 1 / (1 + np.exp(-want))
        check = {"fastrec_p": got, "torch_p": want_p, "abs_diff": abs(got - want_p), "tolerance": PREDICT_TOL,
                 "ok": abs(got - want_p) <= PREDICT_TOL}
        print(f"  predict check: fastrec p {got:.7f} vs torch sigmoid(logit) {want_p:.7f}: "
              f"{'ok' if check['ok'] else 'FAILED'} (abs diff {check['abs_diff']:.1e}, tolerance {PREDICT_TOL:g})")
    samples = {k: [] for k in fns}
    per_round = max(1, args.predict_calls // args.rounds)
    for rr in range(args.rounds):
        names = list(fns)
        names = names[rr % len(names):] + names[:rr % len(names)]
        for k in names:
            settle(args.settle)
            samples[k].append(per_call_ns(fns[k], per_round))
    res = {k: ns_stats(np.concatenate(v)) for k, v in samples.items()}
    print("  predict: " + ", ".join(f"{k} {fmt_time(v['median'])}" for k, v in res.items()), flush=True)
    return res, check


# ------------------------------------------------------------------------------------------------ (4) top-k
def top_items_match(items, probs, logits, k, tol_logit=1e-4, tol_prob=1e-5):
    """Whether fastrec's top-k (`items`, probabilities `probs`) is a top-k of torch's `logits` over all items.

    The item sets must be equal, except that an item may be swapped for another whose torch logit is within
    `tol_logit` of torch's k-th best (a tie up to float32 rounding: the two sum in different orders); and
    fastrec's probabilities must equal sigmoid(torch's logits) of the same items within `tol_prob`.
    Returns (ok, detail)."""
    logits = logits.double()
    top = torch.topk(logits, k).indices.tolist()
    kth = float(logits[top[-1]])
    differ = sorted(set(items) ^ set(top))
    ties = all(abs(float(logits[j]) - kth) <= tol_logit * max(1.0, abs(kth)) for j in differ)
    p_err = float((torch.sigmoid(logits[torch.tensor(items)]) - torch.tensor(probs, dtype=torch.float64)).abs().max())
    ok = ties and p_err <= tol_prob
    detail = (f"same top-{k} items" if not differ else f"{len(differ)} items differ"
              + (" (all within float32 rounding of the k-th score)" if ties else " (not ties)"))
    return ok, f"{detail}; max abs(p_fastrec - sigmoid(logit_torch)) = {p_err:.2e} (tolerance {tol_prob:g})"


def bench_topk(args, impls):
    """Top-10 for one user over args.topk_items items, fastrec's warm handle vs torch.

    fastrec's handle caches, on its first top-k call, the item side of the first layer: item_part[j] = the item
    side input columns of item j (item embedding, pooled tags, dense features) times the matching rows of W1.
    A call then computes the user's part once (user embedding times W1's user rows, plus b1) and runs per item
    only relu(item_part[j] + user part) and layers 2-4. The like-for-like torch figure does the same: the item
    part is precomputed once, outside the per-user timing (its time is reported beside fastrec's first call),
    and a call computes the user part, then relu + layers 2-4 over all items in chunks, then torch.topk.
    The brute-force torch figure (whole forward per (user, item), the item side recomputed for every user) is
    shown apart, as context only."""
    n_items = args.topk_items
    rng = np.random.default_rng(20)
    model = Model(n_items, seed=21)
    item_tags = random_bags(rng, n_items, N_TAGS)
    item_dense = rng.standard_normal((n_items, N_DENSE), dtype=np.float32)
    spec = fastrec_spec(model, item_tags, item_dense, key_tags=1, key_dense=1, n_keys=2, copy=False)
    handle = _core.FieldHandle(spec, False)
    sampler = {"negatives": 0, "user_key": 0, "item_key": 1, "n_items": n_items, "cdf": None, "seen": None,
               "seed": 0}
    users = rng.integers(0, N_USERS, args.topk_calls * args.topk_rounds + 2).astype(np.int32)
    t = args.topk_threads
    set_threads(t)
    fns = {}
    pos = {}

    def next_user(name):
        pos[name] = pos.get(name, 0) + 1
        return users[(pos[name] - 1) % len(users)]

    def fastrec_topk():
        return handle.topk(sampler, np.array([next_user("fastrec")], np.int32), None, 10, False, t)

    fns["fastrec"] = fastrec_topk
    res = {"threads": t, "n_items": n_items}
    # The handle caches the items' part of the first layer on its first top-k call: time that call apart.
    u0 = users[-1]
    settle(args.settle)
    t0 = TIMER()
    fi, fp = handle.topk(sampler, np.array([u0], np.int32), None, 10, False, t)
    res["fastrec_first_call_s"] = TIMER() - t0
    print(f"  topk first call (builds the handle's item cache): {fmt_time(res['fastrec_first_call_s'])}", flush=True)
    if "torch" in impls:
        net = TorchModel(model)
        net.eval()
        ind, ids, _ = item_tags
        t_ids, t_off = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(ind[:-1].copy())
        item_emb_w, tag_w, dense_t = net.item.weight, net.tag.weight, torch.from_numpy(item_dense)
        first, rest = net.mlp[0], net.mlp[2:]  # mlp = Linear, ReLU, Linear, ReLU, Linear, ReLU, Linear
        w_user, w_item = first.weight[:, :D_USER], first.weight[:, D_USER:]  # columns: user | item, tags, dense
        chunk = 65536

        def item_inputs(s, e):
            lo, hi = int(ind[s]), int(ind[e])
            tagv = nn.functional.embedding_bag(t_ids[lo:hi], tag_w, t_off[s:e] - lo, mode="mean")
            return torch.cat([item_emb_w[s:e], tagv, dense_t[s:e]], dim=1)

        def brute_force_scores(u):
            uvec = net.user.weight[int(u)]
            scores = torch.empty(n_items)
            for s in range(0, n_items, chunk):
                e = min(n_items, s + chunk)
                x = torch.cat([uvec.expand(e - s, -1), item_inputs(s, e)], dim=1)
                scores[s:e] = net.mlp(x).squeeze(1)
            return scores

        def torch_brute_force():
            with torch.no_grad():
                return torch.topk(brute_force_scores(next_user("torch_bf")), 10)

        # The item side of the first layer, once (as fastrec's cache): item_part = x_item @ W1[:, item cols]^T.
        settle(args.settle)
        t0 = TIMER()
        with torch.no_grad():
            item_part = torch.empty(n_items, first.out_features)
            for s in range(0, n_items, chunk):
                e = min(n_items, s + chunk)
                torch.mm(item_inputs(s, e), w_item.t(), out=item_part[s:e])
        res["torch_item_part_s"] = TIMER() - t0
        buf = torch.empty(min(chunk, n_items), first.out_features)

        def cached_scores(u):
            user_part = w_user @ net.user.weight[int(u)] + first.bias
            scores = torch.empty(n_items)
            for s in range(0, n_items, chunk):
                e = min(n_items, s + chunk)
                h = torch.add(item_part[s:e], user_part, out=buf[:e - s]).relu_()
                scores[s:e] = rest(h).squeeze(1)
            return scores

        def torch_cached():
            with torch.no_grad():
                return torch.topk(cached_scores(next_user("torch")), 10)

        fns["torch"] = torch_cached
        fns["torch brute force"] = torch_brute_force
        # Correctness: fastrec's top-10 for the check user against both torch computations.
        with torch.no_grad():
            checks = {"like for like": cached_scores(u0), "brute force": brute_force_scores(u0)}
        res["check"] = {}
        for name, logits in checks.items():
            ok, detail = top_items_match(fi[0].tolist(), fp[0].tolist(), logits, 10)
            res["check"][name] = {"ok": ok, "detail": detail}
            print(f"  topk check vs torch ({name}): {'ok' if ok else 'FAILED'}: {detail}", flush=True)
    samples = {k: [] for k in fns}
    for rr in range(args.topk_rounds):
        names = list(fns)
        names = names[rr % len(names):] + names[:rr % len(names)]
        for k in names:
            for _ in range(args.topk_calls if k != "torch brute force" else 1):
                settle(args.settle)
                t0 = TIMER()
                fns[k]()
                samples[k].append(TIMER() - t0)
    res.update({k: {"time_s": stats(v), "samples_s": v} for k, v in samples.items()})
    print("  topk: " + ", ".join(f"{k} {fmt_t(res[k]['time_s'])}" for k in samples), flush=True)
    return res


# ------------------------------------------------------------------------------------------------ report
def report(res):
    """Markdown tables of the parts that ran."""
    lines = []
    thr = res.get("throughput")
    if thr:
        lines.append(f"### (1) Training throughput, examples/s ({res['settings']['examples']} examples per pass, "
                     "median [min – max])\n")
        lines.append("| batch | threads | fastrec | PyTorch | speedup (bar ≥ 2x) |")
        lines.append("|---:|---:|---:|---:|---:|")
        for v in thr.values():
            tor = fmt_rate(v["torch"]["examples_per_s"]) if "torch" in v else "—"
            sp = f"{v['speedup']:.2f}x {'pass' if v['speedup'] >= 2 else 'MISS'}" if "speedup" in v else "—"
            lines.append(f"| {v['batch']} | {v['threads']} | {fmt_rate(v['fastrec']['examples_per_s'])} | {tor} | "
                         f"{sp} |")
    voc = res.get("vocab")
    if voc:
        lines.append(f"\n### (2) Step time vs item vocabulary (batch {voc['batch']}, {voc['threads']} threads)\n")
        lines.append("| item vocab | fastrec step | PyTorch step (context) |")
        lines.append("|---:|---:|---:|")
        for v in res["settings"]["vocabs"]:
            f = voc["steps"].get(f"fastrec|{v}")
            t = voc["steps"].get(f"torch|{v}")
            lines.append(f"| 10^{int(round(np.log10(v)))} | {fmt_t(f['step_s'])} | "
                         f"{fmt_t(t['step_s']) if t else '—'} |")
        if "ratio_fastrec" in voc:
            lo, hi = (int(round(np.log10(f(res["settings"]["vocabs"])))) for f in (min, max))
            lines.append(f"| ratio 10^{hi} / 10^{lo} | **{voc['ratio_fastrec']:.3f}** (bar ≤ 1.2, 10^4 to 10^7) | "
                         + (f"{voc['ratio_torch']:.3f} |" if "ratio_torch" in voc else "— |"))
    if res.get("predict"):
        lines.append("\n### (3) Single-row predict from Python (1 thread; per-call perf_counter_ns)\n")
        lines.append("| call | median | p90 | p99 | min – max |")
        lines.append("|---|---:|---:|---:|---:|")
        for k, v in res["predict"].items():
            lines.append(f"| {k} | {fmt_time(v['median'])} | {fmt_time(v['p90'])} | {fmt_time(v['p99'])} | "
                         f"{fmt_time(v['min'])} – {fmt_time(v['max'])} |")
    tk = res.get("topk")
    if tk:
        plural = "s" if tk["threads"] > 1 else ""
        lines.append(f"\n### (4) Top-10 for one user over {tk['n_items']:,} items ({tk['threads']} thread{plural})\n")
        lines.append("| implementation | time median [min – max] |")
        lines.append("|---|---:|")
        labels = {"fastrec": "fastrec `handle.topk`, warm (item side of the first layer cached)",
                  "torch": "torch, item side of the first layer precomputed (like for like)",
                  "torch brute force": "torch brute force, item side recomputed per user (context)"}
        for k, label in labels.items():
            if k in tk:
                lines.append(f"| {label}, {tk[k]['time_s']['n']} call(s) | {fmt_t(tk[k]['time_s'])} |")
        lines.append(f"| fastrec first call on a new handle (builds the item cache), 1 sample | "
                     f"{fmt_time(tk['fastrec_first_call_s'])} |")
        if "torch_item_part_s" in tk:
            lines.append(f"| torch: precomputing the item side (once), 1 sample | "
                         f"{fmt_time(tk['torch_item_part_s'])} |")
    if res.get("foreign_cpu_cores"):
        lines.append("\nCPU used by other processes during each part (average cores; ~0 = quiet machine): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in res["foreign_cpu_cores"].items()) + ".")
    lines.append("\n### Checks\n")
    lines.append("| check | kind | result | measured |")
    lines.append("|---|---|---|---|")
    for c in checks(res):
        lines.append(f"| {c['check']} | {c['kind']} | {c['status']} | {c['detail']} |")
    return "\n".join(lines)


def checks(res):
    """Every check of the run: the speed bar's items (kind "bar") and the agreement with torch (kind
    "correctness"). status: "pass", "MISS" / "FAIL" (the script exits nonzero), or "not checked" where the run
    did not measure what the bar defines (sizes, threads or torch); the reason is in `detail`."""
    out = []

    def add(name, kind, ok, detail):
        status = "not checked" if ok is None else "pass" if ok else ("MISS" if kind == "bar" else "FAIL")
        out.append({"check": name, "kind": kind, "status": status, "detail": detail})

    st = res["settings"]
    thr = res.get("throughput")
    if thr is not None:
        name = "training throughput ≥ 2x PyTorch (each batch / threads measured)"
        if all("speedup" in v for v in thr.values()):
            sps = {k: v["speedup"] for k, v in thr.items()}
            add(name, "bar", all(s >= 2 for s in sps.values()),
                ", ".join(f"batch {thr[k]['batch']} / {thr[k]['threads']}t {s:.2f}x" for k, s in sps.items()))
        else:
            add(name, "bar", None, "torch not measured")
    voc = res.get("vocab")
    if voc is not None:
        name = "step time within 1.2x from item vocabulary 10^4 to 10^7 (batch 1024, 2 threads)"
        lo, hi = min(st["vocabs"]), max(st["vocabs"])
        if (lo, hi) == (10**4, 10**7):
            add(name, "bar", voc["ratio_fastrec"] <= 1.2, f"{voc['ratio_fastrec']:.3f}x")
        else:
            add(name, "bar", None, f"the sweep ran {lo:.0e} → {hi:.0e} (ratio {voc['ratio_fastrec']:.3f}x)")
    if res.get("predict") is not None:
        p = res["predict"]["fastrec handle.predict"]["median"]
        add("single-row predict < 10 µs median (handle.predict, 1 thread)", "bar", p < 10e-6, f"{p * 1e6:.2f} µs")
        c = res.get("predict_check")
        add("single-row predict equals torch's sigmoid(logit)", "correctness", None if c is None else c["ok"],
            "torch not measured" if c is None else
            f"abs diff {c['abs_diff']:.1e} (tolerance {c['tolerance']:g}; {c['fastrec_p']:.7f} vs {c['torch_p']:.7f})")
    tk = res.get("topk")
    if tk is not None:
        name = "top-10 for one user over 1M items < 300 ms, 2 threads (warm handle)"
        t = tk["fastrec"]["time_s"]["median"]
        measured = f"{t * 1e3:.1f} ms"
        if "torch" in tk:
            measured += (f" (torch like for like {tk['torch']['time_s']['median'] * 1e3:.0f} ms: "
                         f"{tk['torch']['time_s']['median'] / t:.2f}x fastrec's time)")
        if tk["n_items"] == N_ITEMS and tk["threads"] == 2:
            add(name, "bar", t < 0.3, measured)
        else:
            add(name, "bar", None, f"{tk['n_items']:,} items, {tk['threads']} thread(s): {measured}")
        for which in ("like for like", "brute force"):
            c = (tk.get("check") or {}).get(which)
            add(f"top-10 items equal torch's ({which})", "correctness", None if c is None else c["ok"],
                "torch not measured" if c is None else c["detail"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 rounds (smoke run)")
    ap.add_argument("--examples", type=int, default=None, help="examples per training pass (default 65536)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per item (default 5)")
    ap.add_argument("--settle", type=float, default=0.3, help="pause before each timed call, s")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--vocabs", type=int, nargs="+", default=None, help="item vocabularies of the sweep")
    ap.add_argument("--torch-max-vocab", type=int, default=10_000_000, help="largest vocab torch runs in sweep")
    ap.add_argument("--predict-calls", type=int, default=None, help="single-row predict calls (default 10000)")
    ap.add_argument("--topk-calls", type=int, default=None, help="fastrec top-k calls per round (default 2)")
    ap.add_argument("--topk-rounds", type=int, default=None,
                    help="top-k rounds (default 3; torch like for like: --topk-calls calls each, brute force: 1)")
    ap.add_argument("--topk-items", type=int, default=None,
                    help=f"items of the top-k part (default {N_ITEMS:,}, --quick 131,072; the bar is at 1M)")
    ap.add_argument("--topk-threads", type=int, default=2, help="threads of the top-k part (the bar: 2)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--only", nargs="+", choices=["throughput", "vocab", "predict", "topk"], default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "recsys.json"))
    args = ap.parse_args()
    q = args.quick
    args.examples = args.examples or (8192 if q else 65536)
    args.rounds = args.rounds or (2 if q else 5)
    args.vocabs = args.vocabs or ([10**4, 10**6] if q else [10**4, 10**5, 10**6, 10**7])
    args.predict_calls = args.predict_calls or (2000 if q else 10000)
    args.topk_calls = args.topk_calls or (1 if q else 2)
    args.topk_rounds = args.topk_rounds or (1 if q else 3)
    args.topk_items = args.topk_items or (1 << 17 if q else N_ITEMS)
    impls = ["fastrec"] + (["torch"] if torch is not None and not args.no_torch else [])
    only = set(args.only or ["throughput", "vocab", "predict", "topk"])

    info = machine_info()
    print(f"# fastrec recommender speed bar (issue 3) — {info['date']}, {info['cpu']}, {info['cores']} cores, "
          f"fastrec {info['fastrec']}, torch {info['torch']}", flush=True)
    res = {"machine": info, "command": " ".join(sys.argv),
           "settings": {k: v for k, v in vars(args).items()}, "impls": impls}
    t_all = TIMER()
    model = data = trainers = None
    if only & {"throughput", "predict"}:
        model = Model(N_ITEMS, seed=0)
        data = Data(args.examples, N_ITEMS, seed=1)
    loads = res["foreign_cpu_cores"] = {}
    if "throughput" in only:
        meter = LoadMeter()
        res["throughput"], trainers = bench_throughput(args, model, data, impls)
        loads["throughput"] = meter.foreign_cores()
        trainers = None
        gc.collect()
    if "predict" in only:
        meter = LoadMeter()
        res["predict"], res["predict_check"] = bench_predict(args, model, data, impls, trainers)
        loads["predict"] = meter.foreign_cores()
    model = data = None
    gc.collect()
    if "vocab" in only:
        meter = LoadMeter()
        res["vocab"] = bench_vocab(args, args.examples, impls)
        loads["vocab"] = meter.foreign_cores()
        gc.collect()
    if "topk" in only:
        meter = LoadMeter()
        res["topk"] = bench_topk(args, impls)
        loads["topk"] = meter.foreign_cores()
    print("  CPU used by other processes (average cores): "
          + ", ".join(f"{k} {v:.2f}" for k, v in loads.items()), flush=True)
    res["wall_s"] = TIMER() - t_all
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res["checks"] = checks(res)
    out.write_text(json.dumps(res, indent=1, default=float))
    print()
    print(report(res))
    print(f"\n(wall {res['wall_s']:.0f} s; JSON: {out})")
    failed = [c for c in res["checks"] if c["status"] in ("MISS", "FAIL")]
    for c in failed:
        print(f"{c['status']}: {c['check']}: {c['detail']}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} check(s) missed: exit status 1", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
