"""EASE beside popularity, the Recommender and the TwoTower on MovieLens-100k, in the users-held-out protocol of
Liang et al. (WWW 2018), issue 15.

    python benchmarks/autoencoder_quality.py /path/to/ml-100k --seeds 0 1 2 [--heldout 100] [--threads 2]
        [--json results.json]
    python benchmarks/autoencoder_quality.py --combine results0.json results1.json ...   # the table of saved runs
    python benchmarks/autoencoder_quality.py --fit-times 2000 5000 10000 [--threads 2]   # EASE fit time by items

Protocol (``fastrec.evaluation.heldout_users_split``, one split per seed, ``random_state = seed``): ratings >= 4
kept as positives, users with >= 5 of them; ``--heldout`` validation and as many test users drawn at random, the
others are training users; held-out users keep only the training users' items; each held-out user with >= 5
items left has floor(20%) of them, at random, to predict, and folds in the rest.

- EASE: fit on the training users only (the paper's protocol); held-out users are scored from their fold-in
  bag (``recommend(histories=...)``). l2 is chosen on the validation users' NDCG@100 from ``L2_GRID``.
  "EASE + fold-in rows" is the same model fit with the held-out users' fold-in rows too, the training data the
  factorisations get: the difference shows what that extra data is worth.
- Recommender and TwoTower: a user needs interactions in training to have a vector, so they are fit on the
  training users plus every held-out user's fold-in rows (never the held-out 20%). Early stopping follows the
  validation users' NDCG@100 after every epoch (``validation_data`` = a callable, patience 3); each
  configuration of ``RECOMMENDER_GRID`` / ``TWO_TOWER_GRID`` is fit once and the one with the best validation
  NDCG@100 is scored on the test users, at its best epoch.
- Mult-VAE and Mult-DAE: fit on the training users only, like EASE, held-out users scored from their fold-in
  bag; the validation users' NDCG@100 after every epoch picks the best epoch (patience ``AUTOENCODER_PATIENCE``)
  and the configuration of ``MULTVAE_GRID`` / ``MULTDAE_GRID``.
- Popularity: item counts over the training users.

Test users are scored once, by ``fastrec.evaluation.heldout_users_ranking``: Recall@k = hits / min(k, held-out
items), NDCG@100 normalised by the ideal DCG of min(100, held-out items) hits, means over the test users.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import fastrec
from fastrec.datasets import load_movielens
from fastrec.evaluation import Popularity, heldout_users_ranking, heldout_users_split

L2_GRID = [10, 20, 50, 100, 200, 300, 500, 1000, 2000]
# The Recommender's defaults, more negatives (8 was the best of a first grid with the defaults, embedding_alpha
# 0.01 and learning_rate 1e-3) and a lighter embedding penalty; the TwoTower's temperatures around the best
# (0.2) of a first grid from 0.05.
RECOMMENDER_GRID = [{}, {"negatives": 8}, {"negatives": 16}, {"negatives": 8, "embedding_alpha": 0.01},
                    {"negatives": 16, "embedding_alpha": 0.01}]
TWO_TOWER_GRID = [{"temperature": t, "learning_rate": lr} for t in (0.1, 0.2, 0.5) for lr in (2e-3, 5e-3)]
# Mult-VAE / Mult-DAE (Liang et al.'s 600-200-600, dropout 0.5, Adam), batch 100 users (738 training users: 8
# steps an epoch), at most 150 epochs, patience 10 on the validation users; grids from a first look at seed 0's
# validation users (VAE: beta_max 0.5 above 0.2, learning rate 3e-3 and batch 50 below 1e-3 / 100; DAE: 3e-3
# and l2 1e-3 above the paper's 1e-3 / 0.01).
MULTVAE_GRID = [{"beta_max": 0.2}, {"beta_max": 0.5}]
MULTDAE_GRID = [{"learning_rate": 3e-3}, {"l2": 1e-3}]
AUTOENCODER_EPOCHS, AUTOENCODER_PATIENCE = 150, 10
KS = (20, 50, 100)
MODELS = ("popularity", "ease", "ease_fold_in_rows", "multvae", "multdae", "recommender", "two_tower")


def run_seed(data, seed, heldout, threads, models):
    U, I = data.users, data.items
    parts = heldout_users_split(U, I, data.ratings, n_heldout_users=heldout, min_rating=4, random_state=seed)
    val = (U[parts.validation_fold_in], I[parts.validation_fold_in], U[parts.validation_test],
           I[parts.validation_test])
    test = (U[parts.test_fold_in], I[parts.test_fold_in], U[parts.test_test], I[parts.test_test])
    train = parts.train
    with_fold_in = np.concatenate([parts.train, parts.validation_fold_in, parts.test_fold_in])
    sizes = {name: int(len(p)) for name, p in parts._asdict().items()}
    print(f"seed {seed}: {sizes}", flush=True)
    out = {"seed": seed, "sizes": sizes, "models": {}}

    def record(name, model, chosen, val_ndcg, seconds):
        scores = heldout_users_ranking(model, *test, k=KS)
        out["models"][name] = {"chosen": chosen, "val_ndcg@100": val_ndcg, "seconds": seconds, **scores}
        print(f"  {name}: {chosen} (validation NDCG@100 {val_ndcg:.4f}) -> test Recall@20 {scores['recall@20']:.4f} "
              f"Recall@50 {scores['recall@50']:.4f} NDCG@100 {scores['ndcg@100']:.4f} ({seconds:.0f} s)", flush=True)

    if "popularity" in models:
        start = time.perf_counter()
        pop = Popularity().fit(U[train], I[train])
        record("popularity", pop, {}, heldout_users_ranking(pop, *val, k=(100,))["ndcg@100"],
               time.perf_counter() - start)
    for name, rows in (("ease", train), ("ease_fold_in_rows", with_fold_in)):
        if name not in models:
            continue
        start = time.perf_counter()
        best = None
        for l2 in L2_GRID:
            m = fastrec.EASE(l2=float(l2), n_threads=threads).fit(U[rows], I[rows])
            v = heldout_users_ranking(m, *val, k=(100,))["ndcg@100"]
            print(f"    {name} l2={l2}: validation NDCG@100 {v:.4f}", flush=True)
            if best is None or v > best[0]:
                best = (v, l2, m)
        record(name, best[2], {"l2": best[1]}, best[0], time.perf_counter() - start)
    for name, cls, grid in (("multvae", fastrec.MultVAE, MULTVAE_GRID), ("multdae", fastrec.MultDAE, MULTDAE_GRID)):
        if name not in models:
            continue
        start = time.perf_counter()
        best = None
        for params in grid:
            def score(model, epoch):
                return heldout_users_ranking(model, *val, k=(100,))["ndcg@100"]  # fold-in bags, as for EASE

            m = cls(**{"batch_size": 100, **params}, epochs=AUTOENCODER_EPOCHS, n_iter_no_change=AUTOENCODER_PATIENCE,
                    random_state=seed, n_threads=threads)
            m.fit(U[train], I[train], validation_data=score)
            v = max(m.history_["val_score"])
            print(f"    {name} {params}: validation NDCG@100 {v:.4f} at epoch {m.best_epoch_}", flush=True)
            if best is None or v > best[0]:
                best = (v, {**params, "epochs": m.best_epoch_}, m)
        record(name, best[2], best[1], best[0], time.perf_counter() - start)
    for name, cls, grid, epochs in (("recommender", fastrec.Recommender, RECOMMENDER_GRID, 40),
                                    ("two_tower", fastrec.TwoTower, TWO_TOWER_GRID, 60)):
        if name not in models:
            continue
        start = time.perf_counter()
        best = None
        for params in grid:
            def score(model, epoch):
                return heldout_users_ranking(model, *val, k=(100,), fold_in="users")["ndcg@100"]

            m = cls(**params, epochs=epochs, n_iter_no_change=3, random_state=seed, n_threads=threads)
            m.fit(U[with_fold_in], I[with_fold_in], validation_data=score)
            v = max(m.history_["val_score"])
            print(f"    {name} {params}: validation NDCG@100 {v:.4f} at epoch {m.best_epoch_}", flush=True)
            if best is None or v > best[0]:
                best = (v, {**params, "epochs": m.best_epoch_}, m)
        record(name, best[2], best[1], best[0], time.perf_counter() - start)
    return out


def fit_times(n_items_list, threads, repeats=3):
    """Seconds of EASE fits on synthetic clicks (20,000 users x 50 distinct items each, item popularity ~ 1/rank):
    median [min-max] of `repeats` fits per catalogue size."""
    rng = np.random.default_rng(0)
    for n_items in n_items_list:
        p = 1.0 / np.arange(1, n_items + 1)
        users = np.repeat(np.arange(20_000), 50)
        items = np.concatenate([rng.choice(n_items, 50, replace=False, p=p / p.sum()) for _ in range(20_000)])
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            fastrec.EASE(l2=300.0, n_threads=threads).fit(users, items)
            seconds.append(time.perf_counter() - start)
        flops = float(n_items) ** 3  # dpotrf n^3/3 + dpotri 2n^3/3
        print(f"EASE fit, {n_items:,} items, {len(users):,} interactions, {threads} threads: "
              f"{np.median(seconds):.2f} s [{min(seconds):.2f}-{max(seconds):.2f}] (the inversion: "
              f"{flops / 1e9:.3g} GFLOP)", flush=True)


def table(runs):
    """Markdown rows: mean [min-max] over the seeds of each test metric."""
    lines = ["| model | Recall@20 | Recall@50 | NDCG@100 | validation NDCG@100 | chosen (per seed) |",
             "|---|---|---|---|---|---|"]
    for name in MODELS:
        got = [r["models"][name] for r in runs if name in r["models"]]
        if not got:
            continue

        def cell(key):
            v = np.array([g[key] for g in got])
            return f"{v.mean():.4f} [{v.min():.4f}-{v.max():.4f}]" if len(v) > 1 else f"{v[0]:.4f}"

        chosen = "; ".join(", ".join(f"{k}={v}" for k, v in g["chosen"].items()) or "-" for g in got)
        lines.append(f"| {name} | {cell('recall@20')} | {cell('recall@50')} | {cell('ndcg@100')} | "
                     f"{cell('val_ndcg@100')} | {chosen} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("path", nargs="?")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heldout", type=int, default=100, help="validation users, and as many test users")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--json")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="print the table of these saved runs")
    ap.add_argument("--fit-times", type=int, nargs="+", metavar="ITEMS", help="time EASE fits on synthetic data")
    args = ap.parse_args(argv)
    if args.fit_times:
        fit_times(args.fit_times, args.threads)
        return
    if args.combine:
        runs = [r for path in args.combine for r in json.load(open(path))["runs"]]
        print(table(runs))
        return
    if args.path is None:
        ap.error("give the MovieLens-100k directory (or --combine)")
    data = load_movielens(args.path)
    runs = [run_seed(data, seed, args.heldout, args.threads, args.models) for seed in args.seeds]
    print(table(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "fastrec": fastrec.__version__, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
