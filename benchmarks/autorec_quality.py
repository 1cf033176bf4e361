"""I-AutoRec on MovieLens-100k's random 80/20 rating split (issue 15's quality bar: test RMSE <= 0.905), beside the
`Recommender` with default settings and the damped-bias baseline on the same split.

    python benchmarks/autorec_quality.py /path/to/ml-100k [--seed 0] [--threads 1] [--json out.json]

Protocol (benchmarks/movielens_quality.py's protocol (a), the split of the Recommender's quality figures):
- test: `fastrec.evaluation.random_split(n, test_size=0.2, random_state=seed)`;
- validation: `random_split(len(train), test_size=0.1, random_state=seed + 1)` cut from the training 80% only;
- search: every configuration of GRID is fit on the training part minus validation with `validation_data` =
  the validation ratings, for up to MAX_EPOCHS epochs with early stopping (patience PATIENCE); the one with the
  lowest validation RMSE wins, with its best epoch count;
- test: the winner refit on the whole training 80% for that many epochs (no early stopping, nothing held out),
  scored once on the test 20%. Predictions clipped to the training range (the estimator's default).
Baselines: global mean + damped user and item biases (damping chosen on the same validation split), and
`fastrec.Recommender(random_state=seed)` with every other setting default (its own early stopping inside the
training part), both fit on the training 80%. The script exits with status 1 when the bar is missed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

import fastrec
from fastrec.datasets import load_movielens
from fastrec.evaluation import random_split
from fastrec.metrics import rmse

sys.path.insert(0, str(Path(__file__).parent))
from movielens_quality import DampedBias, choose_damping  # noqa: E402  (the same baseline)

BAR = 0.905
GRID = dict(l2=[2.0, 3.0, 5.0, 10.0], learning_rate=[1e-4, 2e-4, 3e-4], hidden=[300, 500])
FIXED = dict(batch_size=64, activation="sigmoid", item_based=True)
MAX_EPOCHS, PATIENCE = 300, 15


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args(argv)
    data = load_movielens(args.path)
    U, I, R = data.users, data.items, data.ratings
    tr, te = random_split(len(data), test_size=0.2, random_state=args.seed)
    itr, iva = random_split(len(tr), test_size=0.1, random_state=args.seed + 1)
    fit_idx, val_idx = tr[itr], tr[iva]
    log = {"seed": args.seed, "sizes": [len(fit_idx), len(val_idx), len(te)], "search": []}
    print(f"fastrec {fastrec.__version__}; MovieLens-100k random 80/20 (seed {args.seed}); "
          f"fit/validation/test {len(fit_idx)}/{len(val_idx)}/{len(te)}", flush=True)

    damping = choose_damping(U[fit_idx], I[fit_idx], R[fit_idx], (U[val_idx], I[val_idx], R[val_idx]))
    log["bias"] = rmse(R[te], DampedBias(damping).fit(U[tr], I[tr], R[tr]).predict(U[te], I[te]))
    start = time.perf_counter()
    rec = fastrec.Recommender(random_state=args.seed, n_threads=args.threads).fit(U[tr], I[tr], R[tr])
    log["recommender_defaults"] = rmse(R[te], rec.predict(U[te], I[te]))
    log["recommender_seconds"] = time.perf_counter() - start
    print(f"bias baseline {log['bias']:.4f}; Recommender defaults {log['recommender_defaults']:.4f}", flush=True)

    best = None
    for values in itertools.product(*GRID.values()):
        params = dict(zip(GRID, values), **FIXED)
        start = time.perf_counter()
        model = fastrec.AutoRec(epochs=MAX_EPOCHS, n_iter_no_change=PATIENCE, random_state=args.seed,
                                n_threads=args.threads, **params)
        model.fit(U[fit_idx], I[fit_idx], R[fit_idx], validation_data=(U[val_idx], I[val_idx], R[val_idx]))
        val = min(model.history_["val_rmse"])
        row = {"params": {k: params[k] for k in GRID}, "val_rmse": val, "epochs": model.best_epoch_,
               "seconds": time.perf_counter() - start}
        log["search"].append(row)
        print(f"  {row['params']}: val {val:.4f} at epoch {model.best_epoch_} ({row['seconds']:.0f} s)", flush=True)
        if best is None or val < best["val_rmse"]:
            best = row
    log["chosen"] = best
    params = dict(best["params"], **FIXED)
    start = time.perf_counter()
    model = fastrec.AutoRec(epochs=best["epochs"], early_stopping=False, random_state=args.seed,
                            n_threads=args.threads, **params).fit(U[tr], I[tr], R[tr])
    log["autorec"] = rmse(R[te], model.predict(U[te], I[te]))
    log["autorec_seconds"] = time.perf_counter() - start
    # the defaults as shipped (their own early stopping on 10% of the training part)
    start = time.perf_counter()
    model = fastrec.AutoRec(random_state=args.seed, n_threads=args.threads).fit(U[tr], I[tr], R[tr])
    log["autorec_defaults"] = rmse(R[te], model.predict(U[te], I[te]))
    log["autorec_defaults_epochs"] = model.best_epoch_
    log["autorec_defaults_seconds"] = time.perf_counter() - start
    ok = log["autorec"] <= BAR
    print(f"I-AutoRec chosen {best['params']} x {best['epochs']} epochs: test RMSE {log['autorec']:.4f} "
          f"({'meets' if ok else 'MISSES'} the bar {BAR}); AutoRec() defaults {log['autorec_defaults']:.4f} "
          f"(best epoch {log['autorec_defaults_epochs']}); Recommender defaults {log['recommender_defaults']:.4f}; "
          f"bias {log['bias']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(log, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
