"""Quality of fastrec.SequentialRecommender on MovieLens-100k (issue 13), beside three baselines.

    python benchmarks/sequential_quality.py /path/to/ml-100k [--seed 0] [--threads 2] [--configs 6] [--json out.json]
                                            [--genres]
    python benchmarks/sequential_quality.py /path/to/ml-100k --max-len 50 100 [--seed 0] [--json out.json]

Protocol (the SASRec paper's, Kang & McAuley, ICDM 2018, section IV-B, on MovieLens-100k): every rating is an
event; each user's latest event (by timestamp; among ties one drawn at random, `fastrec.evaluation.
leave_last_out`) is the test item, ranked against 99 items the user never touched, drawn uniformly (ties count
against the model: `fastrec.evaluation.sampled_ranking`); HR@10 and NDCG@10 over users. Hyper-parameters
and epochs are chosen on the previous-latest event (the same split applied to the training part), the
chosen configuration is refit on the whole training part and scored once on test.

Models, all computed here:
- popularity: training events per item;
- the `Recommender` (NeuMF-style field model) with its default settings (it early-stops on its own split);
- transitions: score(i) = sum over the latest five events j (r = 1 latest) of decay^(r-1) P(i | j), with
  P(i | j) the share of j's training successors that are i (plus 1e-9 x popularity to break ties); decay
  chosen on validation from (1, 0.5, 0.25);
- `SequentialRecommender`: a random search of `--configs` settings (the defaults first) on validation, each
  trained with early stopping on the validation events (patience 10), the best refit for its best epoch;
  and the defaults as a user gets them (`fit` on the training part, early stopping on its own held-out latest
  events). With ``--genres``, the same search (same configurations), refit and defaults again with
  ``item_features`` = each movie's genres (multi-hot, from ml-100k.item), reported beside.
With ``--max-len``, no search: the baselines, then for each length the defaults with that ``max_len`` fit on the
search part (early stopping on the validation events; validation HR@10 / NDCG@10 of its best epoch) and fit
as a user gets them on the training part (test HR@10 / NDCG@10, whole-fit seconds).
MovieLens may not be redistributed: `pip download --no-deps recbole==1.2.1`, unzip
`recbole/dataset_example/ml-100k/` from the wheel.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import fastrec
from fastrec.datasets import load_movielens
from fastrec.evaluation import check_generator, leave_last_out, sampled_ranking
from fastrec.features import FeatureTable


class Popularity:
    def fit(self, users, items):
        ids, counts = np.unique(items, return_counts=True)
        self.counts = dict(zip(ids.tolist(), counts.tolist()))
        return self

    def predict(self, users, items):
        return np.array([self.counts.get(i, 0) for i in np.asarray(items).tolist()], np.float64)


class Transitions:
    """Item-to-item transition counts over each user's latest five events."""

    def __init__(self, decay=0.5, window=5):
        self.decay, self.window = decay, window

    def fit(self, users, items, timestamps):
        order = np.lexsort((np.arange(len(users)), timestamps, users))
        u, i = np.asarray(users)[order], np.asarray(items)[order]
        self.items = {x: n for n, x in enumerate(np.unique(i).tolist())}
        codes = np.array([self.items[x] for x in i.tolist()])
        same = u[1:] == u[:-1]
        n = len(self.items)
        C = np.zeros((n, n))
        np.add.at(C, (codes[:-1][same], codes[1:][same]), 1.0)
        self.P = C / np.maximum(C.sum(axis=1, keepdims=True), 1.0)
        self.pop = np.bincount(codes, minlength=n) * 1e-9
        self.latest = {}
        for user in np.unique(u).tolist():
            self.latest[user] = codes[u == user][-self.window:][::-1]  # latest first
        return self

    def predict(self, users, items):
        out = np.empty(len(users))
        weights = self.decay ** np.arange(self.window)
        cache = {}
        for r, (user, item) in enumerate(zip(np.asarray(users).tolist(), np.asarray(items).tolist())):
            if user not in cache:
                hist = self.latest.get(user, np.zeros(0, int))
                cache[user] = weights[:len(hist)] @ self.P[hist] + self.pop if len(hist) else self.pop
            code = self.items.get(item)
            out[r] = cache[user][code] if code is not None else 0.0
        return out


SPACE = dict(loss=["bce", "softmax"], dropout=[0.2, 0.5], learning_rate=[1e-3, 2e-3], max_len=[50, 100],
             negatives=[1, 4], n_blocks=[1, 2])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", type=int, default=6)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--json")
    ap.add_argument("--genres", action="store_true", help="also with item_features = the movies' genres")
    ap.add_argument("--precision", default="auto", choices=["float32", "bf16", "auto"],
                    help="SequentialRecommender's training precision in every fit of the run")
    ap.add_argument("--defaults-only", action="store_true",
                    help="fit SequentialRecommender with its defaults only (no search, no chosen refit, no baselines)")
    ap.add_argument("--max-len", type=int, nargs="+",
                    help="compare the defaults at these max_len values (validation and test; no search)")
    args = ap.parse_args(argv)
    data = load_movielens(args.path)
    U, I, T = data.users, data.items, data.timestamps
    universe = np.unique(I)
    fit_idx, val_idx, te = leave_last_out(U, T, random_state=args.seed, validation=True)
    tr = np.sort(np.concatenate([fit_idx, val_idx]))
    print(f"# MovieLens-100k: {len(U)} events, {len(np.unique(U))} users, {len(universe)} items; train {len(tr)}, "
          f"test {len(te)}; search: fit {len(fit_idx)}, validation {len(val_idx)}", flush=True)

    def rank(model, train, test, rs):
        r = sampled_ranking(model, U[test], I[test], seen_users=U[train], seen_items=I[train], items=universe,
                            n_negatives=99, k=10, random_state=rs)
        return r["hr@10"], r["ndcg@10"]

    results = {}
    if args.defaults_only:
        t0 = time.perf_counter()
        plain = fastrec.SequentialRecommender(random_state=args.seed, n_threads=args.threads,
                                              precision=args.precision).fit(U[tr], I[tr], T[tr])
        hr, ndcg = rank(plain, tr, te, args.seed + 3)
        print(f"SequentialRecommender (defaults, precision {args.precision}, seed {args.seed}): HR@10 {hr:.4f} "
              f"NDCG@10 {ndcg:.4f}; fit {time.perf_counter() - t0:.1f} s ({len(plain.history_['loss'])} epochs, "
              f"best {plain.best_epoch_})", flush=True)
        ok = hr >= 0.69 and ndcg >= 0.40
        print(f"bar HR@10 >= 0.69 and NDCG@10 >= 0.40: {'PASS' if ok else 'MISS'}")
        return 0 if ok else 1
    results["popularity"] = rank(Popularity().fit(U[tr], I[tr]), tr, te, args.seed + 3)
    best = max((rank(Transitions(d).fit(U[fit_idx], I[fit_idx], T[fit_idx]), fit_idx, val_idx, args.seed + 2)[1], d)
               for d in (1.0, 0.5, 0.25))
    results["transitions (last 5)"] = rank(Transitions(best[1]).fit(U[tr], I[tr], T[tr]), tr, te, args.seed + 3)
    print(f"transitions: decay {best[1]} chosen (validation NDCG@10 {best[0]:.4f})", flush=True)
    t0 = time.perf_counter()
    rec = fastrec.Recommender(random_state=args.seed, n_threads=args.threads).fit(U[tr], I[tr])
    results["Recommender (defaults)"] = rank(rec, tr, te, args.seed + 3)
    print(f"Recommender: {time.perf_counter() - t0:.1f} s", flush=True)

    if args.max_len:
        return compare_max_len(args, U, I, T, universe, fit_idx, val_idx, tr, te, rank, results)
    rng = check_generator(args.seed + 100)
    defaults = fastrec.SequentialRecommender(precision=args.precision).get_params()
    print(f"SequentialRecommender precision {args.precision}", flush=True)
    configs = [{}] + [{k: v[rng.integers(len(v))] for k, v in SPACE.items()} for _ in range(args.configs - 1)]
    variants = [("", None)]
    if args.genres:
        f = data.item_features
        variants.append((" + genres", FeatureTable(f.ids, multi_hot={"genres": f.multi_hot["genres"]})))
    searches = {}
    for label, table in variants:
        print(f"SequentialRecommender{label}:", flush=True)
        search = []
        for cfg in configs:
            params = dict(defaults, **cfg, random_state=args.seed, n_threads=args.threads, epochs=args.max_epochs,
                          n_iter_no_change=10)
            t0 = time.perf_counter()
            m = fastrec.SequentialRecommender(**params).fit(U[fit_idx], I[fit_idx], T[fit_idx], item_features=table,
                                                            validation_data=(U[val_idx], I[val_idx]))
            val = max(m.history_["val_ndcg@10"])
            search.append((val, m.best_epoch_, cfg))
            print(f"  config {cfg or 'defaults'}: validation NDCG@10 {val:.4f} at epoch {m.best_epoch_} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        val, epochs, cfg = max(search, key=lambda r: r[0])
        t0 = time.perf_counter()
        model = fastrec.SequentialRecommender(**dict(defaults, **cfg, random_state=args.seed, n_threads=args.threads,
                                                     epochs=epochs, early_stopping=False)).fit(
            U[tr], I[tr], T[tr], item_features=table)
        fit_s = time.perf_counter() - t0
        results[f"SequentialRecommender{label} (chosen)"] = rank(model, tr, te, args.seed + 3)
        t0 = time.perf_counter()
        plain = fastrec.SequentialRecommender(random_state=args.seed, n_threads=args.threads,
                                              precision=args.precision).fit(
            U[tr], I[tr], T[tr], item_features=table)
        results[f"SequentialRecommender{label} (defaults)"] = rank(plain, tr, te, args.seed + 3)
        print(f"  defaults: fit {time.perf_counter() - t0:.1f} s ({len(plain.history_['loss'])} epochs, best "
              f"{plain.best_epoch_})", flush=True)
        d_val = search[0]
        print(f"  chosen {cfg or 'defaults'} for {epochs} epochs (validation NDCG@10 {val:.4f}; defaults "
              f"{d_val[0]:.4f}); refit {fit_s:.1f} s", flush=True)
        searches[label] = {"search": [(v, e, c) for v, e, c in search], "chosen": cfg, "epochs": epochs}
    print("\n| model | HR@10 | NDCG@10 |\n|---|---|---|")
    for name, (hr, ndcg) in results.items():
        print(f"| {name} | {hr:.4f} | {ndcg:.4f} |")
    hr, ndcg = results["SequentialRecommender (chosen)"]
    ok = hr >= 0.69 and ndcg >= 0.40
    print(f"\nbar HR@10 >= 0.69 and NDCG@10 >= 0.40: {'PASS' if ok else 'MISS'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, **searches[""], "genres": searches.get(" + genres")}, f, indent=1,
                      default=str)
    return 0 if ok else 1


def compare_max_len(args, U, I, T, universe, fit_idx, val_idx, tr, te, rank, results):
    """The defaults at each max_len: validation (search part, early stopping on the validation events) and the
    fit a user gets (training part, its own early stopping) scored on test."""
    rows = {}
    for n in args.max_len:
        params = dict(max_len=n, random_state=args.seed, n_threads=args.threads, precision=args.precision)
        t0 = time.perf_counter()
        m = fastrec.SequentialRecommender(**params).fit(U[fit_idx], I[fit_idx], T[fit_idx],
                                                        validation_data=(U[val_idx], I[val_idx]))
        val_s = time.perf_counter() - t0
        val = rank(m, fit_idx, val_idx, args.seed + 2)
        t0 = time.perf_counter()
        plain = fastrec.SequentialRecommender(**params).fit(U[tr], I[tr], T[tr])
        fit_s = time.perf_counter() - t0
        test = rank(plain, tr, te, args.seed + 3)
        rows[n] = dict(validation=val, val_best_epoch=m.best_epoch_, val_fit_s=val_s,
                       val_ndcg_early_stopping=max(m.history_["val_ndcg@10"]), test=test, fit_s=fit_s,
                       epochs=len(plain.history_["loss"]), best_epoch=plain.best_epoch_)
        print(f"max_len {n}: validation HR@10 {val[0]:.4f} NDCG@10 {val[1]:.4f} (best epoch {m.best_epoch_}, "
              f"{val_s:.1f} s); defaults fit: test HR@10 {test[0]:.4f} NDCG@10 {test[1]:.4f}, fit {fit_s:.1f} s "
              f"({rows[n]['epochs']} epochs, best {plain.best_epoch_})", flush=True)
    print("\n| model | HR@10 | NDCG@10 |\n|---|---|---|")
    for name, (hr, ndcg) in results.items():
        print(f"| {name} | {hr:.4f} | {ndcg:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "baselines": results, "max_len": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
