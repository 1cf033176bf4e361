"""Issue 14 quality: a 2-worker Dask estimator against the single-machine one, same hyper-parameters.

    python benchmarks/dask_quality.py /path/to/ml-100k [--epochs 20] [--sync-every 1 10 0]
        [--model recommender|two_tower|field]

MovieLens-100k's ratings, random 80/20 split (`fastrec.evaluation.random_split`, random_state=0). Both models
get the same hyper-parameters (the local estimator's defaults with a fixed `epochs` and, where it has one,
early_stopping=False: distributed fits train a fixed number of epochs) and random_state=0; the distributed one
runs on a LocalCluster of 2 worker processes x 1 thread, its training rows in 2 partitions (contiguous halves of
the training rows in file order). `--model field`: a FieldModel with loss "mse" over the categorical columns
user and item; `two_tower`: a TwoTower on the ratings (loss "mse"). Prints test RMSE of each and the gap, per
sync_every (0: once per epoch).
"""

import argparse
import time

import numpy as np

import fastrec
from fastrec.datasets import load_movielens
from fastrec.evaluation import random_split


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--sync-every", type=int, nargs="+", default=[1, 10, 0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", choices=["recommender", "two_tower", "field"], default="recommender")
    args = ap.parse_args()

    import dask.array as da
    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client, LocalCluster

    from fastrec.dask import DaskFieldModel, DaskRecommender, DaskTwoTower

    data = load_movielens(args.path)
    u, i, r = data.users, data.items, data.ratings.astype(np.float64)
    train, test = random_split(len(u), test_size=0.2, random_state=0)
    u_tr, i_tr, r_tr, u_te, i_te, r_te = u[train], i[train], r[train], u[test], i[test], r[test]
    params = dict(epochs=args.epochs, random_state=0, n_threads=1)
    chunks = -(-len(u_tr) // args.workers)
    if args.model == "field":
        params["loss"] = "mse"
        local_cls, dask_cls = fastrec.FieldModel, DaskFieldModel
        train_x = pd.DataFrame({"user": u_tr, "item": i_tr})
        test_x = {"user": u_te, "item": i_te}
        local_fit = lambda m: m.fit(dict(train_x), r_tr)  # noqa: E731
        dask_fit = lambda m: m.fit(dd.from_pandas(train_x, chunksize=chunks, sort=False),  # noqa: E731
                                   da.from_array(r_tr, chunks=chunks))

        def predict(m):
            return m.predict(test_x)
    else:
        params["early_stopping"] = False
        local_cls, dask_cls = ((fastrec.Recommender, DaskRecommender) if args.model == "recommender" else
                               (fastrec.TwoTower, DaskTwoTower))
        local_fit = lambda m: m.fit(u_tr, i_tr, r_tr)  # noqa: E731
        dask_fit = lambda m: m.fit(*(da.from_array(x, chunks=chunks) for x in (u_tr, i_tr, r_tr)))  # noqa: E731

        def predict(m):
            return m.predict(u_te, i_te)

    def rmse(m):
        return float(np.sqrt(np.mean((predict(m) - r_te) ** 2)))

    t = time.perf_counter()
    local = local_fit(local_cls(**params))
    print(f"| model | sync_every | test RMSE | gap to local | fit s |\n|---|---|---|---|---|")
    print(f"| {local_cls.__name__} (1 machine) | - | {rmse(local):.4f} | - | {time.perf_counter() - t:.1f} |")
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        for s in args.sync_every:
            t = time.perf_counter()
            dm = dask_fit(dask_cls(client=client, sync_every=s or None, **params))
            e = rmse(dm.to_local())
            print(f"| {dask_cls.__name__}, {args.workers} workers | {s or 'epoch'} | {e:.4f} | "
                  f"{e - rmse(local):+.4f} | {time.perf_counter() - t:.1f} |")


if __name__ == "__main__":
    main()
