"""Quality of fastrec.TwoTower (and of two stages) on MovieLens-100k, issue 12.

    python benchmarks/two_tower_quality.py /path/to/ml-100k [--seed 0] [--threads 2] [--configs 12]

Protocol: protocol (b) of benchmarks/movielens_quality.py (He et al., WWW 2017, NCF): each user's latest
interaction is the test pair; hyper-parameters are chosen on a validation split cut from the TRAINING part
only (each user's latest training interaction), then the chosen configuration is refit on the whole training
part for the chosen number of epochs and scored once on test:

- sampled: the test item ranked against 99 items the user never touched (ties count against the model),
  HR@10 and NDCG@10 (``fastrec.evaluation.sampled_ranking``); selection by validation NDCG@10;
- full ranking: every item ranked, training items excluded, recall@20 / NDCG@20 / HR@10
  (``fastrec.evaluation.full_ranking``, RecBole's protocol).

Side by side: popularity, the ``Recommender`` with its defaults (its own early stopping on a split of the
training part), the tuned ``TwoTower``, and two stages (``fastrec.TwoStage``: the TwoTower retrieves 500 items
per user, the Recommender re-ranks them) when that class exists. The number of epochs of each TwoTower
configuration is that of the best validation epoch of one fit with early stopping (``validation_data`` =
the validation split, ``n_iter_no_change=3``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import fastrec
from fastrec.datasets import load_movielens
from fastrec.evaluation import Popularity, check_generator, full_ranking, leave_last_out, sampled_ranking

SPACE = dict(temperature=[0.05, 0.1, 0.2], learning_rate=[1e-3, 2e-3, 5e-3], alpha=[0.0, 1e-4, 1e-3],
             batch_size=[256, 1024], hidden_layer_sizes=[(128,), (256,)], id_dropout=[0.0, 0.05],
             features=[True, False])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", type=int, default=12)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    data = load_movielens(args.path)
    U, I, T = data.users, data.items, data.timestamps
    universe = np.unique(I)
    tr, te = leave_last_out(U, T, random_state=args.seed)
    itr, iva = leave_last_out(U[tr], T[tr], random_state=args.seed + 1)
    fit_idx, val_idx = tr[itr], tr[iva]

    def feats(on):
        return dict(user_features=data.user_features, item_features=data.item_features) if on else {}

    def sampled(model, train, test, rs):
        return sampled_ranking(model, U[test], I[test], seen_users=U[train], seen_items=I[train], items=universe,
                               n_negatives=99, k=10, random_state=rs)

    # ---- search on validation
    rng = check_generator(args.seed + 300)
    configs = [dict(features=True)]  # the defaults first
    while len(configs) < args.configs:
        c = {k: v[rng.integers(len(v))] for k, v in SPACE.items()}
        if c not in configs:
            configs.append(c)
    rows = []
    for c in configs:
        params = {k: v for k, v in c.items() if k != "features"}
        start = time.perf_counter()
        m = fastrec.TwoTower(**params, epochs=60, n_iter_no_change=3, random_state=args.seed,
                             n_threads=args.threads)
        m.fit(U[fit_idx], I[fit_idx], validation_data=(U[val_idx], I[val_idx]), **feats(c["features"]))
        val = sampled(m, fit_idx, val_idx, args.seed + 2)
        rows.append((c, m.best_epoch_, val["ndcg@10"], val["hr@10"]))
        print(f"  {c} -> val NDCG@10 {val['ndcg@10']:.4f} HR@10 {val['hr@10']:.4f} at epoch {m.best_epoch_} "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
    best, epochs, val_ndcg, val_hr = max(rows, key=lambda r: r[2])
    print(f"chosen: {best}, {epochs} epochs (validation NDCG@10 {val_ndcg:.4f}, HR@10 {val_hr:.4f})", flush=True)

    # ---- refit on the whole training part, score once on test
    models = {"popularity": Popularity().fit(U[tr], I[tr])}
    models["Recommender (defaults)"] = fastrec.Recommender(random_state=args.seed, n_threads=args.threads).fit(
        U[tr], I[tr], **feats(True))
    params = {k: v for k, v in best.items() if k != "features"}
    models["TwoTower (tuned)"] = fastrec.TwoTower(**params, epochs=epochs, early_stopping=False,
                                                  random_state=args.seed, n_threads=args.threads).fit(
        U[tr], I[tr], **feats(best["features"]))
    models["TwoTower (defaults)"] = fastrec.TwoTower(random_state=args.seed, n_threads=args.threads).fit(
        U[tr], I[tr], **feats(True))
    if hasattr(fastrec, "TwoStage"):
        models["two stages (TwoTower 500 -> Recommender)"] = fastrec.TwoStage(
            models["TwoTower (tuned)"], models["Recommender (defaults)"], n_candidates=500)
    results = {}
    for name, model in models.items():
        r = {}
        if hasattr(model, "predict"):
            s = sampled(model, tr, te, args.seed + 3)
            r.update({"sampled hr@10": s["hr@10"], "sampled ndcg@10": s["ndcg@10"]})
        f = full_ranking(model, U[te], I[te], k=(10, 20))
        r.update({"full hr@10": f["hr@10"], "full recall@20": f["recall@20"], "full ndcg@20": f["ndcg@20"]})
        results[name] = r
        print(f"{name:45s} " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()), flush=True)
    print("\n| model | sampled HR@10 | sampled NDCG@10 | full HR@10 | full recall@20 | full NDCG@20 |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = [f"{r[k]:.4f}" if k in r else "-" for k in ("sampled hr@10", "sampled ndcg@10", "full hr@10",
                                                             "full recall@20", "full ndcg@20")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"chosen": {**best, "epochs": epochs}, "validation": [
                {"config": {k: str(v) for k, v in c.items()}, "epochs": e, "ndcg@10": n, "hr@10": h}
                for c, e, n, h in rows], "test": results}, fh, indent=1)
    ok = results["TwoTower (tuned)"]["sampled hr@10"] >= 0.60
    print(f"bar: TwoTower sampled HR@10 >= 0.60: {'PASS' if ok else 'MISS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
