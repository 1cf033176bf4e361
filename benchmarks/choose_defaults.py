"""How fastrec.Recommender's defaults were chosen: candidate default settings scored on validation splits of
several data sets (never a test split).

    python benchmarks/choose_defaults.py --ml100k /path/to/ml-100k [--threads 1] [--only NAME ...]

Data sets (each cut from the TRAINING part of the split that benchmarks/bench_defaults.py scores, so the
test parts are never seen):
- ml100k-explicit: MovieLens-100k ratings, random 80/20 split (seed 0); inner random 90/10 of the 80%.
  Metric: RMSE (lower is better).
- ml100k-implicit: MovieLens-100k as implicit feedback, leave-latest-out (seed 0); inner leave-latest-out
  of the training part; each held-out item ranked against 99 sampled items. Metric: HR@10.
- synth-explicit-small / synth-explicit-noisy: fastrec.datasets.make_interactions (2,000 x 1,000 users x
  items, 60k ratings, noise 0.5; 6,000 x 3,000, 300k ratings, noise 1.0), random 80/20 then 90/10.
- synth-implicit: make_interactions(4,000 x 2,000, 120k, implicit), leave-latest-out twice.

Each candidate is a dict of Recommender parameters on top of the library's defaults; every fit uses the
defaults' early stopping (its own validation split inside the inner training part). Prints one row per
candidate and data set, and the mean rank of each candidate.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import fastrec
from fastrec.datasets import load_movielens, make_interactions
from fastrec.evaluation import leave_last_out, random_split, sampled_ranking
from fastrec.metrics import rmse


def explicit_task(data, seed=0):
    tr, _ = random_split(len(data), test_size=0.2, random_state=seed)
    itr, iva = random_split(len(tr), test_size=0.1, random_state=seed + 1)
    fit, val = tr[itr], tr[iva]
    U, I, R = data.users, data.items, data.ratings

    def score(params):
        m = fastrec.Recommender(**params).fit(U[fit], I[fit], R[fit])
        return rmse(R[val], m.predict(U[val], I[val])), m
    return score, False


def implicit_task(data, seed=0):
    U, I, T = data.users, data.items, data.timestamps
    universe = np.unique(I)
    tr, _ = leave_last_out(U, T, random_state=seed)
    itr, iva = leave_last_out(U[tr], T[tr], random_state=seed + 1)
    fit, val = tr[itr], tr[iva]

    def score(params):
        m = fastrec.Recommender(**params).fit(U[fit], I[fit])
        res = sampled_ranking(m, U[val], I[val], seen_users=U[fit], seen_items=I[fit], items=universe,
                              n_negatives=99, k=10, random_state=seed + 2)
        return res["hr@10"], m
    return score, True


def tasks(ml100k, only):
    out = {}
    if ml100k:
        ml = load_movielens(ml100k)
        out["ml100k-explicit"] = lambda: explicit_task(ml)
        out["ml100k-implicit"] = lambda: implicit_task(ml)
    out["synth-explicit-small"] = lambda: explicit_task(
        make_interactions(n_users=2000, n_items=1000, n_interactions=60_000, noise=0.5, random_state=0))
    out["synth-explicit-noisy"] = lambda: explicit_task(
        make_interactions(n_users=6000, n_items=3000, n_interactions=300_000, noise=1.0, random_state=1))
    out["synth-implicit"] = lambda: implicit_task(
        make_interactions(n_users=4000, n_items=2000, n_interactions=120_000, implicit=True, random_state=2))
    return {k: v for k, v in out.items() if not only or k in only}


CANDIDATES = [
    {},  # the library's defaults as they stand
    {"user_history": False, "item_history": False},  # ratings without the SVD++ history fields
    {"user_history": True, "item_history": True},  # implicit feedback with them
    {"embedding_dim": 32, "hidden_layer_sizes": (64, 32)},  # the previous, smaller model
    # the defaults before issue 11 (with early stopping, which they did not have)
    {"embedding_dim": 32, "hidden_layer_sizes": (64, 32), "alpha": 1e-5, "embedding_alpha": None,
     "learning_rate": 1e-3, "wide": False, "user_history": False, "item_history": False, "n_iter_no_change": 3},
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ml100k", help="MovieLens-100k directory (load_movielens)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=[])
    p.add_argument("--candidates", help="JSON list of parameter dicts (default: the list in this script)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    candidates = json.loads(args.candidates) if args.candidates else CANDIDATES
    results = {}
    for name, make in tasks(args.ml100k, args.only).items():
        score, higher = make()
        for c, params in enumerate(candidates):
            start = time.perf_counter()
            value, m = score({"random_state": 0, "n_threads": args.threads, **params})
            results.setdefault(name, []).append(value)
            print(f"{name:22s} cand {c:2d} {value:.4f}  epochs {len(m.history_['loss']):2d} "
                  f"best {getattr(m, 'best_epoch_', '-')}  {time.perf_counter() - start:5.1f} s  {params}",
                  flush=True)
        ranks = np.argsort(np.argsort(-np.array(results[name]) if higher else np.array(results[name])))
        results[name + ":rank"] = ranks.tolist()
    rank_names = [k for k in results if k.endswith(":rank")]
    mean_rank = np.mean([results[k] for k in rank_names], axis=0)
    for c, params in enumerate(candidates):
        print(f"cand {c:2d} mean rank {mean_rank[c]:.2f}  {params}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"candidates": candidates, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
