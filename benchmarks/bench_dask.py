"""Issue 14 speed: DaskRecommender on 2 worker processes x 1 thread against 1 worker x 1 thread, one run.

    python benchmarks/bench_dask.py [--interactions 10000000] [--users 1000000] [--items 100000] [--rounds 2]

Synthetic implicit interactions (users uniform, items Zipf-like popularity with exponent 0.8) with side
features (users: a 100-value categorical "region" and a numeric "age"; items: a 1,000-value categorical
"category"), written once to Parquet (--data, 8 files) and read with dask.dataframe.read_parquet: each fit
reads its partitions from the files. Model: the Recommender's defaults except embedding_dim 32, hidden
(64, 32), epochs 1, early_stopping False, n_threads 1; sync once per epoch (DaskRecommender's default).
For each round, in alternating order, a LocalCluster of 1 worker and one of 2 workers (processes, 1 thread
each) run the whole `fit` (reading, distributed unique, replicas, training, combining, collecting the seen
items): interactions per second of that wall time. Then the batch top-10 of --score-users users (every
item, seen items excluded) through `DaskRecommender.recommend(...).compute()`: users per second. Prints
median [min-max] of each and the per-round ratios, and the bytes the fit exchanged per round.

--limit: in each round, after the two fits, what the hardware allows the training itself: one replica's
training (the workers' own functions, half the files, in a plain process without Dask) alone, then both halves'
replicas side by side in two processes; the limit on the training speed-up is 2 x alone / the slower of the pair
(a 1-worker fit trains both halves one after the other). The plain processes get this process's environment as
it started (a LocalCluster's nanny leaves its pre-spawn variables in the environment of the process that
starts it). --limit-dask-env: the same with the environment a Dask nanny gives its workers
(`distributed.nanny.pre-spawn-environ`: MALLOC_TRIM_THRESHOLD_=65536 among them), interleaved with the plain
one. --malloc-trim unset: the clusters start their workers without MALLOC_TRIM_THRESHOLD_. --cluster lean: the
clusters get the other Dask settings of the one fastrec's CLI starts (fastrec.dask._LEAN_CLUSTER_CONFIG: no
worker profiler, a 1 s event-loop tick); both together are that cluster.
"""

import argparse
import os
import time

import numpy as np


def make_data(path, n, n_users, n_items, seed=0):
    import pandas as pd

    if os.path.exists(os.path.join(path, "_done")):
        return
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.8
    cdf = np.cumsum(weights / weights.sum())
    users = rng.integers(0, n_users, n)
    items = rng.permutation(n_items)[np.minimum(np.searchsorted(cdf, rng.random(n)), n_items - 1)]
    os.makedirs(path, exist_ok=True)
    for p, idx in enumerate(np.array_split(np.arange(n), 8)):
        pd.DataFrame({"user": users[idx], "item": items[idx]}).to_parquet(f"{path}/part-{p}.parquet")
    pd.DataFrame({"region": rng.integers(0, 100, n_users).astype(str), "age": rng.normal(35, 10, n_users)},
                 index=pd.RangeIndex(n_users, name="user")).to_parquet(f"{path}/../users.parquet")
    pd.DataFrame({"category": rng.integers(0, 1000, n_items).astype(str)},
                 index=pd.RangeIndex(n_items, name="item")).to_parquet(f"{path}/../items.parquet")
    open(os.path.join(path, "_done"), "w").close()


def _train_half(data, half, n_users, n_items, params, queue, barrier):
    """A replica of a 2-worker fit (half `half` of the files), built and trained by fastrec.dask's worker
    functions in this process; puts (half, training seconds, rows)."""
    import pandas as pd

    import fastrec
    from fastrec.dask import _counts, _part, _round, _start
    from fastrec.dask._engine import _Spec

    files = sorted(f for f in os.listdir(data) if f.endswith(".parquet"))
    files = files[len(files) * half // 2:len(files) * (half + 1) // 2]
    parts = [pd.read_parquet(os.path.join(data, f)) for f in files]
    parts = [_part(p["user"], p["item"], None, None) for p in parts]
    spec = _Spec(fastrec.Recommender, params, 0, np.arange(n_users), np.arange(n_items), None,
                 pd.read_parquet(f"{data}/../users.parquet"), pd.read_parquet(f"{data}/../items.parquet"),
                 FEATURE_TYPES)
    counts, _ = _start("limit", half, 2, spec, None if half == 0 else 7919, *parts)
    _counts("limit", half, counts)
    barrier.wait()
    stats = _round("limit", half, None, None, 0, 1 << 62)["stats"]
    queue.put((half, stats["train_s"], stats["rows"]))


# The environment this process started with: the nanny of a LocalCluster sets its pre-spawn variables
# (MALLOC_TRIM_THRESHOLD_ among them) in the environment of the process that starts the cluster, where they stay
# and would reach every process spawned later (the plain limit's included) and override the Dask config.
CLEAN_ENV = dict(os.environ)


def training_limits(data, n_users, n_items, params, environs):
    """For each environment added to CLEAN_ENV ({name: dict}): (alone seconds, paired seconds of the slower,
    limit on the speed-up): one half's replica trained alone, then both halves side by side (spawned processes,
    1 thread each); the environments interleaved (alone in each, then paired in each)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    saved = dict(os.environ)
    out = {name: {} for name in environs}
    try:
        for label, halves in (("alone", (0,)), ("paired", (0, 1))):
            for name, environ in environs.items():
                os.environ.clear()  # read by the children as they start
                os.environ.update(CLEAN_ENV)
                os.environ.update({k: str(v) for k, v in environ.items()})
                queue, barrier = ctx.Queue(), ctx.Barrier(len(halves))
                procs = [ctx.Process(target=_train_half, args=(data, h, n_users, n_items, params, queue, barrier))
                         for h in halves]
                for p in procs:
                    p.start()
                got = [queue.get() for _ in procs]
                for p in procs:
                    p.join()
                out[name][label] = max(t for _, t, _ in got)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {name: (o["alone"], o["paired"], 2 * o["alone"] / o["paired"]) for name, o in out.items()}


def local_cluster(workers, malloc_trim, lean):
    """A LocalCluster of `workers` processes x 1 thread, started in this process's original environment;
    malloc_trim False: its nannies start the workers without Dask's MALLOC_TRIM_THRESHOLD_ (the documented way:
    the config key set to None); lean: with the settings of the cluster that fastrec's CLI starts (no worker
    profiler, a 1 s event-loop tick: fastrec.dask._LEAN_CLUSTER_CONFIG but MALLOC_TRIM_THRESHOLD_, which
    malloc_trim decides)."""
    import dask
    from distributed import LocalCluster

    from fastrec.dask import _LEAN_CLUSTER_CONFIG

    os.environ.clear()
    os.environ.update(CLEAN_ENV)
    trim = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    config = {k: v for k, v in _LEAN_CLUSTER_CONFIG.items() if k != trim} if lean else {}
    if not malloc_trim:
        config[trim] = None
    with dask.config.set(config):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                            memory_limit=None)


FEATURE_TYPES = {"region": "categorical", "age": "numeric", "category": "categorical"}


def table_bytes(dm):
    net = dm.to_local().net_
    return sum(a.nbytes for a in net.tables + net.table_state1 + net.table_state2 if a is not None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interactions", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--first-round", type=int, default=0, help="number of the first round (odd: 2 workers first), "
                    "to alternate the order across runs of --rounds 1")
    ap.add_argument("--score-users", type=int, default=20_000)
    ap.add_argument("--data", default="/tmp/fastrec_bench_dask/interactions")
    ap.add_argument("--what", choices=("fit", "top10", "both", "none"), default="both",
                    help="top10 alone scores a model fitted once (untimed) and saved beside the data; none: only "
                    "the limits")
    ap.add_argument("--limit", action="store_true", help="also measure the training's own limit (module docstring)")
    ap.add_argument("--limit-dask-env", action="store_true", help="the limit measured with the "
                    "environment a Dask nanny gives its workers (distributed.nanny.pre-spawn-environ)")
    ap.add_argument("--malloc-trim", choices=("dask", "unset"), default="dask", help="dask: the clusters' workers "
                    "get Dask's MALLOC_TRIM_THRESHOLD_; unset: started without it")
    ap.add_argument("--cluster", choices=("dask", "lean"), default="dask", help="dask: Dask's default settings; "
                    "lean: those of the cluster fastrec's CLI starts (no worker profiler, 1 s event-loop tick; with "
                    "--malloc-trim unset, all of them)")
    args = ap.parse_args()

    import dask.array as da
    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client

    from fastrec.dask import DaskRecommender

    make_data(args.data, args.interactions, args.users, args.items)
    user_features = pd.read_parquet(f"{args.data}/../users.parquet")
    item_features = pd.read_parquet(f"{args.data}/../items.parquet")
    params = dict(embedding_dim=32, hidden_layer_sizes=(64, 32), epochs=1, early_stopping=False, n_threads=1,
                  random_state=0)
    score_users = np.random.default_rng(1).choice(args.users, args.score_users, replace=False)
    results = {1: {"fit": [], "top10": []}, 2: {"fit": [], "top10": []}}
    limits, train = [], {1: [], 2: []}
    print(f"# {args.interactions:,} interactions, {args.users:,} users, {args.items:,} items; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    fit_kwargs = dict(user_features=user_features, item_features=item_features, feature_types=FEATURE_TYPES)
    model = None
    if args.what == "top10":  # a model fitted once (not timed), saved beside the data, scored in every round
        import fastrec

        path = f"{args.data}/../model.fastrec"
        if not os.path.exists(path):
            with local_cluster(2, args.malloc_trim == "dask", args.cluster == "lean") as cluster, \
                    Client(cluster) as client:
                frame = dd.read_parquet(args.data)
                DaskRecommender(client=client, **params).fit(frame["user"], frame["item"], **fit_kwargs
                                                             ).to_local().save(path)
        model = fastrec.load(path)
    for r in range(args.first_round, args.first_round + args.rounds):
        for workers in ((1, 2) if r % 2 == 0 else (2, 1)) if args.what != "none" else ():
            with local_cluster(workers, args.malloc_trim == "dask", args.cluster == "lean") as cluster, \
                    Client(cluster) as client:
                env = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
                line = (f"round {r} workers {workers} ({args.cluster} cluster, MALLOC_TRIM_THRESHOLD_ "
                        f"{sorted(set(env.values()))}):")
                if args.what in ("fit", "both"):
                    frame = dd.read_parquet(args.data)
                    start = time.perf_counter()
                    dm = DaskRecommender(client=client, **params).fit(frame["user"], frame["item"], **fit_kwargs)
                    fit_s = time.perf_counter() - start
                    if workers == 2 and not os.path.exists(f"{args.data}/../model.fastrec"):  # for --what top10
                        dm.to_local().save(f"{args.data}/../model.fastrec")
                    results[workers]["fit"].append(args.interactions / fit_s)
                    st = dm.round_stats_
                    train[workers].append(st[0]["train_s"])
                    touched = [round(x["touched_bytes"] / 1e6) for x in st]
                    line += (f" fit {fit_s:.1f} s ({args.interactions / fit_s:,.0f}/s; epoch "
                             f"{dm.to_local().history_['seconds'][0]:.1f} s, of which training {st[0]['train_s']:.1f} "
                             "s on the slowest replica); phases " +
                             ", ".join(f"{k} {v:.1f} s" for k, v in dm.phase_seconds_.items()) +
                             f"\n    bytes per round exchanged between workers "
                             f"{[f'{b / 1e6:.0f} MB' for b in dm.round_bytes_]} (rows touched in the round, with their "
                             f"optimizer state: {[f'{x} MB' for x in touched]}); to the driver at the end "
                             f"{dm.final_bytes_ / 1e6:.0f} MB; tables with their optimizer state "
                             f"{table_bytes(dm) / 1e6:.0f} MB per copy\n   ")
                else:
                    dm = DaskRecommender.from_local(model, client=client)
                if args.what in ("top10", "both"):
                    users = da.from_array(score_users, chunks=-(-len(score_users) // (4 * workers)))
                    start = time.perf_counter()
                    top = dm.recommend(users, k=10).compute()
                    top_s = time.perf_counter() - start
                    assert len(top) == 10 * len(score_users)
                    results[workers]["top10"].append(len(score_users) / top_s)
                    line += f" top-10 {top_s:.1f} s ({len(score_users) / top_s:,.0f} users/s);"
                print(f"{line} load {os.getloadavg()[0]:.2f}", flush=True)
        environs = {}
        if args.limit:
            environs["plain"] = {}
        if args.limit_dask_env:
            import distributed  # noqa: F401 (sets Dask's defaults for the nanny)
            import dask

            environs["nanny's"] = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
                                   if v is not None}
        for name, (alone, paired, limit) in training_limits(args.data, args.users, args.items, params,
                                                            environs).items():
            if name == "plain":
                limits.append(limit)
            print(f"round {r} training limit, {name} environment {environs[name]}: one half alone {alone:.1f} s, "
                  f"both halves side by side {paired:.1f} s (slower): 2-worker training at most {limit:.2f}x; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    print("\n| what | 1 worker | 2 workers | ratio per round |\n|---|---|---|---|")
    for what, unit in (("fit", "interactions/s"), ("top10", "users/s")):
        if not results[1][what]:
            continue
        one, two = np.array(results[1][what]), np.array(results[2][what])
        ratio = two / one
        print(f"| {what} ({unit}) | {np.median(one):,.0f} [{one.min():,.0f}-{one.max():,.0f}] | "
              f"{np.median(two):,.0f} [{two.min():,.0f}-{two.max():,.0f}] | {np.median(ratio):.2f} "
              f"[{ratio.min():.2f}-{ratio.max():.2f}] |")
    if train[1] and train[2]:
        ratio = np.array(train[1]) / np.array(train[2])
        print(f"| training alone (the slowest replica's seconds) | {np.median(train[1]):.1f} | "
              f"{np.median(train[2]):.1f} | {np.median(ratio):.2f} [{ratio.min():.2f}-{ratio.max():.2f}] |")
    if limits:
        print(f"| training limit (two plain processes side by side) | | | {np.median(limits):.2f} "
              f"[{min(limits):.2f}-{max(limits):.2f}] |")


if __name__ == "__main__":
    main()
