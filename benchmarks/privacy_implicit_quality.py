#!/usr/bin/env python
"""Issue 16's implicit quality figure: HR@10 on MovieLens-100k under the leave-latest-out protocol of a
Recommender trained with DP-SGD at epsilon 8 (delta 1e-5, example level), beside the non-private Recommender of
the same architecture and beside popularity.

    python benchmarks/privacy_implicit_quality.py /path/to/ml-100k [--seed 0] [--threads 2] \\
        [--mechanisms dense sparse] [--epsilon 8]

Protocol (NCF's, as benchmarks/bench_defaults.py and sequential_quality.py): every rating is an implicit
interaction; each user's latest one (`fastrec.evaluation.leave_last_out`) is the test item, ranked against 99
items the user never touched in training, drawn uniformly (`sampled_ranking`, ties count against the model);
HR@10 and NDCG@10 over users. Hyper-parameters are chosen on the previous-latest interaction of each user (the
same split applied to the training part: `leave_last_out(..., validation=True)`), trained on the rest of the
training part; the chosen setting is refit on the whole training part and scored once on test. The private
fits choose their noise multiplier for the target epsilon over their epochs (dp-accounting, RDP); the choice
on validation reads training data and is outside the guarantee (the usual practice, reported as such).

Architecture (all fastrec models): embedding_dim 32, MLP (64, 32), GMF and wide terms, no history fields (not
trainable privately), no id dropout, Adam, loss "bce" with 4 uniform negatives per positive, early stopping
off (refused under privacy: the epochs are a searched hyper-parameter instead). Grids: non-private learning
rate x epochs at batch 256; private learning rate x epochs x clipping norm at batch 4096 (large batches: the
noise is divided by the expected batch).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from pathlib import Path

import numpy as np

import fastrec
from fastrec.datasets import load_movielens
from fastrec.evaluation import leave_last_out, sampled_ranking

sys.path.insert(0, str(Path(__file__).parent))
from sequential_quality import Popularity  # noqa: E402  (the same baseline)

ARCH = dict(embedding_dim=32, hidden_layer_sizes=(64, 32), gmf=True, wide=True, user_history=False,
            item_history=False, id_dropout=0.0, optimizer="adam", loss="bce", negatives=4, early_stopping=False)
PLAIN_GRID = [dict(learning_rate=lr, epochs=e, batch_size=256) for lr, e in itertools.product((1e-3, 4e-3), (5, 10, 20))]
PRIVATE_GRID = [dict(learning_rate=lr, epochs=e, batch_size=4096, max_grad_norm=c)
                for lr, e, c in itertools.product((3e-3, 1e-2), (10, 30), (0.3, 1.0, 3.0))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--mechanisms", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    args = ap.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's RDP orders that do not converge, per probe
    data = load_movielens(args.path)
    U, I, T = np.asarray(data.users), np.asarray(data.items), np.asarray(data.timestamps)
    universe = np.unique(I)
    fit_idx, val_idx, te = leave_last_out(U, T, random_state=args.seed, validation=True)
    tr = np.sort(np.concatenate([fit_idx, val_idx]))
    print(f"# MovieLens-100k implicit, leave-latest-out (seed {args.seed}): train {len(tr)}, test {len(te)}; "
          f"search: fit {len(fit_idx)}, validation {len(val_idx)}; {args.threads} threads", flush=True)

    def rank(model, train, test, rs):
        r = sampled_ranking(model, U[test], I[test], seen_users=U[train], seen_items=I[train], items=universe,
                            n_negatives=99, k=10, random_state=rs)
        return r["hr@10"], r["ndcg@10"]

    def fit(params, train, mechanism=None):
        p = dict(params)
        privacy = None
        if mechanism is not None:
            privacy = fastrec.DPConfig(target_epsilon=args.epsilon, delta=args.delta,
                                       max_grad_norm=p.pop("max_grad_norm"), embedding_mechanism=mechanism)
        model = fastrec.Recommender(**ARCH, **p, random_state=args.seed, n_threads=args.threads, privacy=privacy)
        return model.fit(U[train], I[train])

    def choose(grid, mechanism=None):
        scored = []
        for params in grid:
            hr, _ = rank(fit(params, fit_idx, mechanism), fit_idx, val_idx, args.seed + 2)
            scored.append((hr, params))
        return max(scored, key=lambda s: s[0])

    t0 = time.time()
    rows = []
    pop_hr, pop_ndcg = rank(Popularity().fit(U[tr], I[tr]), tr, te, args.seed + 3)
    rows.append(("popularity", "-", "-", "-", pop_hr, pop_ndcg))
    val, params = choose(PLAIN_GRID)
    hr, ndcg = rank(fit(params, tr), tr, te, args.seed + 3)
    rows.append(("non-private", "-", params, val, hr, ndcg))
    print(f"  non-private: {params} validation HR@10 {val:.4f}; test HR@10 {hr:.4f} ({time.time() - t0:.0f} s)",
          flush=True)
    for mech in args.mechanisms:
        val, params = choose(PRIVATE_GRID, mech)
        model = fit(params, tr, mech)
        hr, ndcg = rank(model, tr, te, args.seed + 3)
        eps, delta = model.privacy_spent_
        rows.append((f"private ({mech}), epsilon {args.epsilon:g}", f"{eps:.3f} (delta {delta:g})", params, val, hr,
                     ndcg))
        print(f"  private {mech}: {params} validation HR@10 {val:.4f}; test HR@10 {hr:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    print("\n| model | epsilon spent | chosen (validation HR@10) | test HR@10 | test NDCG@10 |\n|---|---|---|---|---|")
    for name, spent, params, val, hr, ndcg in rows:
        chosen = "-" if params == "-" else f"{params} ({val:.4f})"
        print(f"| {name} | {spent} | {chosen} | {hr:.4f} | {ndcg:.4f} |")
    print(f"\n{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
