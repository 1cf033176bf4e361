"""Issue 14 quality: a 2-worker DaskRecommender against the single-machine Recommender, same hyper-parameters.

    python benchmarks/dask_quality.py /path/to/ml-100k [--epochs 20] [--sync-every 1 10 0]

MovieLens-100k's ratings, random 80/20 split (`fastrec.evaluation.random_split`, random_state=0). Both models
get the same hyper-parameters (the Recommender's defaults with a fixed `epochs` and early_stopping=False:
distributed fits train a fixed number of epochs) and random_state=0; the distributed one runs on a
LocalCluster of 2 worker processes x 1 thread, its training rows in 2 partitions (contiguous halves of the
training rows in file order). Prints test RMSE of each and the gap, per sync_every (0: once per epoch).
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
    args = ap.parse_args()

    import dask.array as da
    from distributed import Client, LocalCluster

    from fastrec.dask import DaskRecommender

    data = load_movielens(args.path)
    u, i, r = data.users, data.items, data.ratings.astype(np.float64)
    train, test = random_split(len(u), test_size=0.2, random_state=0)
    u_tr, i_tr, r_tr, u_te, i_te, r_te = u[train], i[train], r[train], u[test], i[test], r[test]
    params = dict(epochs=args.epochs, early_stopping=False, random_state=0, n_threads=1)

    def rmse(m):
        return float(np.sqrt(np.mean((m.predict(u_te, i_te) - r_te) ** 2)))

    t = time.perf_counter()
    local = fastrec.Recommender(**params).fit(u_tr, i_tr, r_tr)
    print(f"| model | sync_every | test RMSE | gap to local | fit s |\n|---|---|---|---|---|")
    print(f"| Recommender (1 machine) | - | {rmse(local):.4f} | - | {time.perf_counter() - t:.1f} |")
    chunks = -(-len(u_tr) // args.workers)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        for s in args.sync_every:
            t = time.perf_counter()
            dm = DaskRecommender(client=client, sync_every=s or None, **params).fit(
                da.from_array(u_tr, chunks=chunks), da.from_array(i_tr, chunks=chunks),
                da.from_array(r_tr, chunks=chunks))
            e = rmse(dm.to_local())
            print(f"| DaskRecommender, {args.workers} workers | {s or 'epoch'} | {e:.4f} | {e - rmse(local):+.4f} | "
                  f"{time.perf_counter() - t:.1f} |")


if __name__ == "__main__":
    main()
