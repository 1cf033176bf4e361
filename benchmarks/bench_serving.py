"""Single-row serving latency through the public API (issue 17): `Recommender.predict([u], [i])` on a model with
10^6 items, item features and hidden (256, 128, 64), and on the default-size model; `FieldModel.predict_proba`
of a one-row dict (user and item ids, a categorical, a hashed and a numeric column; hidden (256, 128, 64)).

Each timing is the median per-call time of `--calls` back-to-back calls, repeated `--rounds` times with the
models interleaved; reported as median [min-max] over rounds, with the thread's CPU time per call beside it
(on a shared machine it leaves out the waits for a core). One thread (serving is one row per request).

    python benchmarks/bench_serving.py            # about a minute on 2 cores (building the 10^6-item model)

Also (unless --bar-only): the serving handles (`serving_handle()`) on the same pair / row and over 4,096
distinct random pairs / rows in turn, `Recommender.predict` of 16 int pairs by the row path and by the batch
path, and the core's own time per row (`FieldHandle.time_predict_one`: no Python per call).

Exit status 1 when a median is above its bar (5 µs for the large Recommender, 10 µs for the FieldModel).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import numpy as np
import pandas as pd

import fastrec
from fastrec import _recbase
from fastrec.datasets import make_interactions

BAR_US = 5.0
FIELD_BAR_US = 10.0


def per_call_us(fn, calls):
    """(wall, this thread's CPU time) per call in µs. On a machine shared with other jobs the CPU time leaves
    out the time the thread waited for a core (the wall time is the bar's figure)."""
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6, (time.thread_time() - cpu) / calls * 1e6


def build_large(n_items, seed):
    rng = np.random.default_rng(seed)
    n = 200_000
    users = rng.integers(0, 50_000, n)
    items = rng.integers(0, n_items, n)
    ratings = rng.integers(1, 6, n).astype(np.float64)
    features = pd.DataFrame({"genre": rng.integers(0, 30, n_items).astype(str), "year": rng.normal(2000, 10, n_items)},
                            index=pd.Index(np.arange(n_items), name="item"))
    model = fastrec.Recommender(hidden_layer_sizes=(256, 128, 64), epochs=1, early_stopping=False, random_state=0,
                                n_threads=1)
    return model.fit(users, items, ratings, item_features=features), users, items


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--bar-only", action="store_true", help="only the three original cases (the bar's)")
    args = ap.parse_args()
    t = time.perf_counter()
    large, lu, li = build_large(args.items, 0)
    print(f"built the {args.items:,}-item model in {time.perf_counter() - t:.1f} s", flush=True)
    d = make_interactions(2000, 1000, 50_000, random_state=0)
    small = fastrec.Recommender(epochs=1, early_stopping=False, random_state=0, n_threads=1).fit(d.users, d.items,
                                                                                                  d.ratings)
    rng = np.random.default_rng(1)
    n = 200_000
    X = {"user": rng.integers(0, 50_000, n), "item": rng.integers(0, args.items, n), "genre": rng.integers(0, 30, n),
         "tag": rng.integers(0, 10**9, n), "price": rng.normal(10, 3, n)}
    y = (rng.random(n) < 0.3).astype(int)
    field = fastrec.FieldModel(fields={"tag": {"hash_buckets": 100_000}}, embedding_dim=32,
                               hidden_layer_sizes=(256, 128, 64), epochs=1, random_state=0, n_threads=1).fit(X, y)
    row = {k: v[:1] for k, v in X.items()}
    cases = {
        f"Recommender.predict([u], [i]), {args.items:,} items + features, hidden (256, 128, 64)":
            (large, [int(lu[0])], [int(li[0])]),
        "Recommender.predict([u], [i]), default model (2,000 x 1,000)": (small, [int(d.users[0])], [int(d.items[0])]),
    }
    calls = {k: (lambda m=m, u=u, i=i: m.predict(u, i)) for k, (m, u, i) in cases.items()}
    field_name = "FieldModel.predict_proba(one-row dict), hidden (256, 128, 64)"
    calls[field_name] = lambda: field.predict_proba(row)
    if not args.bar_only:
        # The serving handles (issue 17), on the same pair and row, and over distinct random pairs (no row
        # stays in cache between calls but the weights, as in real traffic).
        pair_handle, row_handle = large.serving_handle(), field.serving_handle()
        u0, i0 = int(lu[0]), int(li[0])
        calls["serving_handle()(u, i), large model, the same pair"] = lambda: pair_handle(u0, i0)
        pairs = list(zip(rng.integers(0, 60_000, 4096).tolist(), rng.integers(0, args.items, 4096).tolist()))
        cycle = itertools.cycle(pairs)
        calls["serving_handle()(u, i), large model, 4,096 random pairs in turn"] = lambda: pair_handle(*next(cycle))
        scalar_row = {k: v[0].item() for k, v in X.items()}
        calls["FieldModel serving_handle()(row of scalars)"] = lambda: row_handle(scalar_row)
        rows = [{k: v[j].item() for k, v in X.items()} for j in range(4096)]
        row_cycle = itertools.cycle(rows)
        calls["FieldModel serving_handle()(row), 4,096 distinct rows in turn"] = lambda: row_handle(next(row_cycle))
        few_u, few_i = lu[:16].astype(np.int64), li[:16].astype(np.int64)
        calls["Recommender.predict(16 int pairs), large model: row by row"] = lambda: large.predict(few_u, few_i)

        def batch_path():
            saved, _recbase._SMALL_PAIRS = _recbase._SMALL_PAIRS, 0
            try:
                return large.predict(few_u, few_i)
            finally:
                _recbase._SMALL_PAIRS = saved

        calls["Recommender.predict(16 int pairs), large model: batch path"] = batch_path
    for fn in calls.values():  # warm: handles and the pair scorer are built on first use
        fn()
    samples = {k: [] for k in calls}
    cpu_samples = {k: [] for k in calls}
    for r in range(args.rounds):
        names = list(calls)[r % len(calls):] + list(calls)[:r % len(calls)]
        for k in names:
            wall, cpu = per_call_us(calls[k], args.calls if "16 int pairs" not in k else args.calls // 20)
            samples[k].append(wall)
            cpu_samples[k].append(cpu)
    for k, v in samples.items():
        c = cpu_samples[k]
        print(f"{k}: {np.median(v):.2f} µs [{min(v):.2f}-{max(v):.2f}]  (CPU time {np.median(c):.2f} "
              f"[{min(c):.2f}-{max(c):.2f}])")
    if not args.bar_only:  # the core alone: the same pair, keys already looked up
        keys = [int(large._users.index(np.array([u0]))[0]), int(large._items.index(np.array([i0]))[0])]

        def core_us(timed):  # (wall per call timed in the core, CPU time per call around it)
            cpu = time.thread_time()
            wall = timed()[0] * 1e6
            return wall, (time.thread_time() - cpu) / args.calls * 1e6

        def show(name, runs):
            w, c = [r[0] for r in runs], [r[1] for r in runs]
            print(f"{name}: {np.median(w):.2f} µs [{min(w):.2f}-{max(w):.2f}]  (CPU time {np.median(c):.2f} "
                  f"[{min(c):.2f}-{max(c):.2f}])")

        show("core only (RowPredictor of the large model, no Python)",
             [core_us(lambda: large._handle().time_predict_one(keys, args.calls)) for _ in range(args.rounds)])
        scorer = large._pair_scorer()
        if hasattr(scorer, "time_score"):  # the pair scorer's own RowPredictor (aligned weight copies) and lookups
            show("core only (PairScorer.score: id lookups + RowPredictor over aligned copies)",
                 [core_us(lambda: scorer.time_score(u0, i0, args.calls)) for _ in range(args.rounds)])
    large_median = float(np.median(samples[list(cases)[0]]))
    field_median = float(np.median(samples[field_name]))
    ok = large_median <= BAR_US and field_median <= FIELD_BAR_US
    print(f"bar: Recommender.predict <= {BAR_US} µs on the large model: "
          f"{'met' if large_median <= BAR_US else 'MISSED'} ({large_median:.2f} µs)")
    print(f"bar: FieldModel.predict_proba <= {FIELD_BAR_US} µs: "
          f"{'met' if field_median <= FIELD_BAR_US else 'MISSED'} ({field_median:.2f} µs)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
