"""Issue 17's top-k bar: top-10 over 10^6 items with the `Recommender`, 2 threads, exact against
`topk="approximate"` at several `topk_candidates` C, with the approximate mode's recall@10 against the exact
top-10 and the bf16 peak and floor measured in the same run.

    flock -x /work/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python benchmarks/bench_topk_approx.py --model recommender      # about 5 minutes on 2 cores

The model (--model recommender): bench_serving.py's 10^6-item Recommender (item features, hidden (256, 128,
64)), fitted for --epochs epochs on 200,000 random ratings (--data ratings) or on 200,000 implicit interactions
with zipf(1.3) item popularity (--data implicit). Timings: `recommend(u, 10)` of one user at a time
through the public API, a different user each call, the modes interleaved in each round; median [min - max]
over --rounds users, warm (the first calls, which build the item caches, are timed apart). Recall@10: the share
of the exact top-10 found by the approximate top-10, over --recall-users users (batch `recommend` calls), with
the share of users it finds in full.

The floor: a float32 top-k of one user runs the MLP above its first layer on every item (the first layer's
item side is cached): 2 (256 x 128 + 128 x 64 + 64) flops per item, 82 GFLOP for 10^6 items; at the bf16
dot-product peak (benchmarks/bf16_peak.cpp, measured here) that is the least time any exact bf16 top-k could
take on this machine. Exit status 1 when the approximate time at the default C is above the bar (100 ms).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import fastrec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bf16_gemm import bf16_peak  # noqa: E402
from timing import TIMER, fma_peak, fmt_t, stats  # noqa: E402

BAR_S = 0.100
DEFAULT_C = 0.02


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def build(args):
    """bench_serving.py's build_large with --epochs and --threads: (model, known users in a random order)."""
    rng = np.random.default_rng(0)
    n = 200_000
    users = rng.integers(0, 50_000, n)
    if args.data == "ratings":  # bench_serving.py's model
        items = rng.integers(0, args.items, n)
        ratings = rng.integers(1, 6, n).astype(np.float64)
    else:  # implicit feedback, zipf item popularity: a model whose scores carry structure (popularity)
        items = (rng.zipf(1.3, n) - 1) % args.items
        ratings = None
    features = pd.DataFrame({"genre": rng.integers(0, 30, args.items).astype(str),
                             "year": rng.normal(2000, 10, args.items)},
                            index=pd.Index(np.arange(args.items), name="item"))
    model = fastrec.Recommender(hidden_layer_sizes=(256, 128, 64), epochs=args.epochs, early_stopping=False,
                                random_state=0, n_threads=args.threads)
    model.fit(users, items, ratings, item_features=features)
    return model, rng.permutation(np.unique(users))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="recommender", choices=["recommender"])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--data", default="ratings", choices=["ratings", "implicit"],
                    help="ratings: uniform random ratings (bench_serving.py's model); implicit: zipf-popular items, "
                         "4 negatives per positive")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9, help="users timed one call each, per mode")
    ap.add_argument("--candidates", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05])
    ap.add_argument("--recall-users", type=int, default=200)
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args(argv)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load: {uptime()}", flush=True)
    print(f"FASTREC_ISA={os.environ.get('FASTREC_ISA')}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")
    start = TIMER()
    model, users = build(args)
    print(f"model: {args.items:,} items, {args.data}, hidden {model.hidden_layer_sizes}, {args.epochs} epoch(s), "
          f"fitted in {TIMER() - start:.1f} s", flush=True)
    k = args.k

    def call(u, mode, c=DEFAULT_C):
        model.set_params(topk=mode, topk_candidates=c)
        t0 = TIMER()
        model.recommend(u, k)
        return TIMER() - t0

    # First calls: the exact one builds the float32 item cache, the first approximate one its bf16 copy.
    first_exact = call(users[0], "exact")
    first_approx = call(users[0], "approximate")
    print(f"first calls: exact {first_exact * 1e3:.0f} ms (builds the item cache), approximate "
          f"{first_approx * 1e3:.0f} ms (builds the bf16 copy)", flush=True)
    modes = [("exact", None)] + [("approximate", c) for c in args.candidates]
    times = {m: [] for m in modes}
    for r in range(args.rounds):
        u = users[1 + r]
        for mode in modes:
            times[mode].append(call(u, mode[0], mode[1] if mode[1] is not None else DEFAULT_C))
    peak16 = bf16_peak(args.threads)
    peak32 = fma_peak(args.threads)
    hidden = (256, 128, 64)
    flop = 2 * args.items * sum(a * b for a, b in zip(hidden, hidden[1:] + (1,)))
    print(f"\n## top-{k} of one user over {args.items:,} items, {args.threads} threads, warm, "
          f"{args.rounds} users (median [min - max])\n")
    print("| mode | time per user | vs exact |")
    print("|---|---|---|")
    exact_median = stats(times[("exact", None)])["median"]
    for mode in modes:
        st = stats(times[mode])
        name = "exact (float32)" if mode[0] == "exact" else f"approximate, C = {mode[1]:g}"
        print(f"| {name} | {fmt_t(st)} | {exact_median / st['median']:.1f}x |")
    # Recall against exact, users in batches (one call per mode).
    ru = users[1:1 + args.recall_users]
    model.set_params(topk="exact")
    t0 = TIMER()
    exact_ids, exact_scores = model.recommend(ru, k)
    t_exact = TIMER() - t0
    print(f"\n## recall@{k} against the exact top-{k}, {len(ru)} users (exact batch: {t_exact:.1f} s)\n")
    print(f"| C | recall@{k} | users with all {k} | top-1 found | batch time per user |")
    print("|---|---|---|---|---|")
    recall_default = None
    for c in args.candidates:
        model.set_params(topk="approximate", topk_candidates=c)
        t0 = TIMER()
        ids, scores = model.recommend(ru, k)
        t = TIMER() - t0
        found = np.array([len(np.intersect1d(a, b)) for a, b in zip(ids, exact_ids)])
        top1 = np.mean([e[0] in a for a, e in zip(ids, exact_ids)])
        recall = found.mean() / k
        if c == DEFAULT_C:
            recall_default = recall
        print(f"| {c:g} | {recall:.4f} | {np.mean(found == k):.3f} | {top1:.3f} | {t / len(ru) * 1e3:.1f} ms |")
    print()
    if peak16 and args.threads in peak16:
        p = peak16[args.threads]
        print(f"bf16 dot-product peak (bf16_peak.cpp, this run): {peak16} GFLOP/s; exact floor at the {args.threads}-"
              f"thread peak: {flop / 1e9:.1f} GFLOP / {p:.0f} GFLOP/s = {flop / p / 1e9 * 1e3:.0f} ms")
    else:
        print("bf16 peak: not measured (no compiler or no avx512_bf16)")
    if peak32:
        print(f"FP32 FMA peak (fma_peak.cpp, this run): {peak32} GFLOP/s; exact float32 at "
              f"{flop / exact_median / 1e9:.0f} GFLOP/s")
    print(f"# end {datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC; load: {uptime()}")
    approx_default = stats(times[("approximate", DEFAULT_C)])["median"] if DEFAULT_C in args.candidates else None
    if approx_default is not None:
        ok = approx_default <= BAR_S
        print(f"bar: approximate C = {DEFAULT_C} at most {BAR_S * 1e3:.0f} ms: {'PASS' if ok else 'MISS'} "
              f"({approx_default * 1e3:.1f} ms, recall@{k} {recall_default})")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
