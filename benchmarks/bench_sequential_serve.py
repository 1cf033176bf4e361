"""Sequential model serving latency (issue 13): one user's recommend over 10^5 items, and observe + recommend.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_sequential_serve.py [--items 100000]

A `SequentialRecommender` of the issue's shape (width 64, 2 blocks, 1 head, max_len 50) is fit for one epoch on
synthetic histories (--users users x 60 events over --items items, every item used), which only gives a model
of that size: latency does not depend on what it learned. Then, in interleaved rounds (a short pause before
each call so OpenMP workers sleep as they would between requests), for a different random user each call:
- `recommend([user], k=10)`: the user's latest 50 events through the blocks (last slot only), then the exact
  inner-product top-10 over every item with the user's ~60 seen items excluded;
- `observe([user], [item])` followed by `recommend([user], k=10)`: the new event read at once;
- `recommend(histories=[h], k=10)` for a 50-event history not in training.
Bars: recommend < 2 ms, observe + recommend < 3 ms. Prints median [p10-p90] in ms per --threads value.
--max-len: the model's max_len (default: the estimator's); histories of `recommend(histories=)` have 50 events.
--item-features: the items get side features (a categorical column of 1000 values and a multi-hot bag of 3 of
100 tags): recommend then searches the composite item table built once after fit.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import fastrec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--events", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--settle", type=float, default=0.02)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--item-features", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.users * args.events
    users = np.repeat(np.arange(args.users), args.events)
    items = rng.permutation(np.resize(np.arange(args.items), n))
    table = None
    if args.item_features:
        import scipy.sparse as sp

        from fastrec.features import FeatureTable

        tags = np.sort(np.stack([rng.choice(100, 3, replace=False) for _ in range(args.items)]), axis=1)
        bags = sp.csr_matrix((np.ones(tags.size, np.float32), tags.ravel(), np.arange(0, tags.size + 1, 3)),
                             shape=(args.items, 100))
        table = FeatureTable(np.arange(args.items), categorical={"brand": rng.integers(0, 1000, args.items)},
                             multi_hot={"tags": bags})
    extra = {} if args.max_len is None else {"max_len": args.max_len}
    t0 = time.perf_counter()
    model = fastrec.SequentialRecommender(epochs=1, early_stopping=False, random_state=0, **extra).fit(
        users, items, item_features=table)
    print(f"# {args.items} items, {args.users} users x {args.events} events; max_len {model.max_len}; item "
          f"features {'yes' if table is not None else 'no'}; fit (1 epoch) {time.perf_counter() - t0:.1f} s; "
          f"load {os.getloadavg()[0]:.2f}")
    history = rng.integers(0, args.items, 50)
    samples = {(t, kind): [] for t in args.threads for kind in ("recommend", "observe+recommend", "histories")}
    stamp = 1e9
    for r in range(args.rounds):
        for t in args.threads:
            model.set_params(n_threads=t)
            for kind in ("recommend", "observe+recommend", "histories"):
                u = int(rng.integers(args.users))
                time.sleep(args.settle)
                start = time.perf_counter()
                if kind == "recommend":
                    model.recommend([u], k=10)
                elif kind == "histories":
                    model.recommend(histories=[history], k=10)
                else:
                    stamp += 1
                    model.observe([u], [int(rng.integers(args.items))], [stamp])
                    model.recommend([u], k=10)
                samples[(t, kind)].append((time.perf_counter() - start) * 1e3)
    print(f"# load after {os.getloadavg()[0]:.2f}; {args.rounds} calls each\n")
    print("| threads | call | median ms [p10-p90] | bar |\n|---|---|---|---|")
    for (t, kind), v in samples.items():
        v = np.asarray(v[5:])  # the first calls warm caches
        bar = {"recommend": 2.0, "observe+recommend": 3.0}.get(kind)
        med = np.median(v)
        verdict = "" if bar is None else ("PASS" if med < bar else "MISS") + f" (< {bar:g} ms)"
        print(f"| {t} | {kind} | {med:.3f} [{np.percentile(v, 10):.3f}-{np.percentile(v, 90):.3f}] | {verdict} |")


if __name__ == "__main__":
    main()
