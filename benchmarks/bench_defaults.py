"""What `fastrec.Recommender()` does with default settings (only `random_state` set), beside the classic
baselines and the tuned settings of benchmarks/QUALITY.md: the bar of issue 11.

    python benchmarks/bench_defaults.py --ml100k /path/to/ml-100k [--json out.json]

Protocols (the same as benchmarks/movielens_quality.py):
- MovieLens-100k explicit: random 80/20 split (seed 0); test RMSE. Baseline: global mean + damped user and
  item biases (damping chosen on a random 10% of the training part). Bar: RMSE <= 0.920, and with clipping on
  (the default) no prediction outside the training rating range.
- MovieLens-100k implicit: each user's latest interaction held out (seed 0), ranked against 99 items the user
  never interacted with (sampled with seed 3, the same for every model; ties count against the model,
  `fastrec.evaluation.sampled_ranking`); HR@10 and NDCG@10 (He et al., WWW 2017, NCF's protocol). Baseline:
  popularity. Bar: HR@10 >= 0.62.
- Synthetic (`fastrec.datasets.make_interactions`, planted factors): two explicit sets (60k ratings with noise
  0.5; 300k ratings with noise 1.0), random 80/20, against the bias baseline; one implicit set (120k
  interactions), leave-latest-out, against popularity. Check: the defaults beat the baseline.

Every `fit` is timed whole (what a user waits for). The script exits with status 1 when a check fails.
MovieLens may not be redistributed: pass the directory of your own copy (see benchmarks/QUALITY.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import fastrec
from fastrec.datasets import load_movielens, make_interactions
from fastrec.evaluation import leave_last_out, random_split, sampled_ranking
from fastrec.metrics import rmse

sys.path.insert(0, str(Path(__file__).parent))
from movielens_quality import DampedBias, Popularity, choose_damping  # noqa: E402  (the same baselines)

BAR_RMSE, BAR_HR = 0.920, 0.62
# benchmarks/QUALITY.md's tuned settings (chosen on validation splits of the same training parts), every
# parameter that differs from today's defaults spelled out, so that they are the models QUALITY.md reports.
TUNED_EXPLICIT = dict(embedding_dim=256, hidden_layer_sizes=(256, 128), gmf=True, learning_rate=5e-4, alpha=0.1,
                      embedding_alpha=0.01, id_dropout=0.0, user_history=True, item_history=True, wide=False,
                      epochs=4, early_stopping=False, clip_predictions=False)
TUNED_IMPLICIT = dict(embedding_dim=32, hidden_layer_sizes=(128, 64), gmf=True, learning_rate=5e-4, alpha=0.01,
                      embedding_alpha=None, negatives=4, id_dropout=0.0, user_history=True, item_history=False,
                      wide=False, epochs=17, early_stopping=False)


def timed_fit(model, *args, **kwargs):
    start = time.perf_counter()
    model.fit(*args, **kwargs)
    return model, time.perf_counter() - start


def explicit(data, name, rows, failures, tuned=None, seed=0):
    tr, te = random_split(len(data), test_size=0.2, random_state=seed)
    U, I, R = data.users, data.items, data.ratings
    itr, iva = random_split(len(tr), test_size=0.1, random_state=seed + 1)
    damping = choose_damping(U[tr[itr]], I[tr[itr]], R[tr[itr]], (U[tr[iva]], I[tr[iva]], R[tr[iva]]))
    bias = rmse(R[te], DampedBias(damping).fit(U[tr], I[tr], R[tr]).predict(U[te], I[te]))
    model, seconds = timed_fit(fastrec.Recommender(random_state=seed), U[tr], I[tr], R[tr])
    pred = model.predict(U[te], I[te])
    score = rmse(R[te], pred)
    lo, hi = R[tr].min(), R[tr].max()
    outside = int(((pred < lo) | (pred > hi)).sum())
    top = model.recommend(U[te][:50], k=10)[1]
    outside += int(((top > hi) | (top < lo)).sum())
    row = {"data": name, "metric": "RMSE", "defaults": score, "baseline": bias, "baseline_name": "bias",
           "epochs": len(model.history_["loss"]), "best_epoch": getattr(model, "best_epoch_", None),
           "fit_s": seconds, "outside_range": outside}
    if tuned is not None:
        tuned_model, tuned_s = timed_fit(fastrec.Recommender(random_state=seed, **tuned), U[tr], I[tr], R[tr])
        row["tuned"], row["tuned_fit_s"] = rmse(R[te], tuned_model.predict(U[te], I[te])), tuned_s
        if score > BAR_RMSE:
            failures.append(f"{name}: default RMSE {score:.4f} > {BAR_RMSE}")
    if outside:
        failures.append(f"{name}: {outside} predictions or recommend scores outside [{lo}, {hi}] with clipping on")
    if score >= bias:
        failures.append(f"{name}: default RMSE {score:.4f} does not beat the bias baseline {bias:.4f}")
    rows.append(row)


def implicit(data, name, rows, failures, tuned=None, seed=0):
    U, I, T = data.users, data.items, data.timestamps
    universe = np.unique(I)
    tr, te = leave_last_out(U, T, random_state=seed)

    def rank(model):
        return sampled_ranking(model, U[te], I[te], seen_users=U[tr], seen_items=I[tr], items=universe,
                               n_negatives=99, k=10, random_state=seed + 3)

    pop = rank(Popularity().fit(U[tr], I[tr]))
    model, seconds = timed_fit(fastrec.Recommender(random_state=seed), U[tr], I[tr])
    res = rank(model)
    row = {"data": name, "metric": "HR@10", "defaults": res["hr@10"], "ndcg@10": res["ndcg@10"],
           "baseline": pop["hr@10"], "baseline_name": "popularity", "baseline_ndcg@10": pop["ndcg@10"],
           "epochs": len(model.history_["loss"]), "best_epoch": getattr(model, "best_epoch_", None),
           "fit_s": seconds}
    if tuned is not None:
        tuned_model, tuned_s = timed_fit(fastrec.Recommender(random_state=seed, **tuned), U[tr], I[tr])
        t = rank(tuned_model)
        row["tuned"], row["tuned_ndcg@10"], row["tuned_fit_s"] = t["hr@10"], t["ndcg@10"], tuned_s
        if res["hr@10"] < BAR_HR:
            failures.append(f"{name}: default HR@10 {res['hr@10']:.4f} < {BAR_HR}")
    if res["hr@10"] <= pop["hr@10"]:
        failures.append(f"{name}: default HR@10 {res['hr@10']:.4f} does not beat popularity {pop['hr@10']:.4f}")
    rows.append(row)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ml100k", required=True, help="MovieLens-100k directory (load_movielens)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows, failures = [], []
    ml = load_movielens(args.ml100k)
    explicit(ml, "ml100k explicit", rows, failures, tuned=TUNED_EXPLICIT)
    implicit(ml, "ml100k implicit", rows, failures, tuned=TUNED_IMPLICIT)
    explicit(make_interactions(n_users=2000, n_items=1000, n_interactions=60_000, noise=0.5, random_state=10),
             "synthetic explicit 60k noise 0.5", rows, failures)
    explicit(make_interactions(n_users=6000, n_items=3000, n_interactions=300_000, noise=1.0, random_state=11),
             "synthetic explicit 300k noise 1.0", rows, failures)
    implicit(make_interactions(n_users=4000, n_items=2000, n_interactions=120_000, implicit=True, random_state=12),
             "synthetic implicit 120k", rows, failures)
    print(f"fastrec {fastrec.__version__}; Recommender(random_state=0), everything else default")
    print(f"{'data':36s} {'metric':6s} {'defaults':>8s} {'baseline':>19s} {'tuned':>7s} {'epochs':>9s} {'fit s':>6s}")
    for r in rows:
        tuned = f"{r['tuned']:.4f}" if "tuned" in r else "-"
        print(f"{r['data']:36s} {r['metric']:6s} {r['defaults']:8.4f} {r['baseline_name']:>10s} {r['baseline']:.4f} "
              f"{tuned:>7s} {r['epochs']:4d} ({r['best_epoch']}) {r['fit_s']:6.1f}")
        if "ndcg@10" in r:
            tuned = f"{r['tuned_ndcg@10']:.4f}" if "tuned" in r else "-"
            print(f"{'':36s} {'NDCG10':6s} {r['ndcg@10']:8.4f} {r['baseline_name']:>10s} "
                  f"{r['baseline_ndcg@10']:.4f} {tuned:>7s}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    for f in failures:
        print("FAIL:", f)
    if failures:
        sys.exit(1)
    print("all checks pass")


if __name__ == "__main__":
    main()
