"""Throughput with 1, all and automatic (n_threads=None) threads, on a quiet machine and while other processes
keep cores busy: training, top-k (recommend) and predict.

    python benchmarks/bench_contention.py [--busy 1] [--rounds 5] [--what train topk predict]

Each round measures every (load, n_threads) cell once, in a rotated order: load "quiet", or "busy" with
`--busy` processes that spin on the CPU (what another job on a shared machine does), started by this script
before the cell and stopped after it. Cells:

- train: `FieldModel.fit` of the recommender benchmark's reference model (bench_fit.py: user 32, item 32,
  tags 16 dims, 13 numeric columns, MLP 256-128-64, plain SGD) on `--examples` rows, batch `--batch`, one
  epoch; examples/s over the epoch (history_["seconds"]) and the whole fit's wall time.
- topk: `Recommender.recommend` with k=10 of `--topk-users` users, one call per user (each call scans every
  item: the per-user path whose items are split over the threads) and one call for all of them (users split
  over the threads); users/s.
- predict: `Recommender.predict` of `--predict-pairs` pairs in one call; pairs/s.

Every parallel region waits for its slowest thread, so with a core busy a fixed "all cores" can be far slower
than one thread; n_threads=None measures and picks (docs/DESIGN.md "Busy machines"). Results are identical
for any thread count. Prints median [min - max] over the rounds and auto / quiet-1-thread (bar, issue 17:
>= 0.85 with one busy core, for training and top-k).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fit import DIMS, HIDDEN, LR, make_data  # noqa: E402
from timing import TIMER, machine_info  # noqa: E402

import fastrec  # noqa: E402


class Spinners:
    """`n` processes that spin on the CPU while the block runs."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.3)  # started and running
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        time.sleep(0.2)


def train_cell(data, batch, threads):
    X, y = data
    fields = {name: {"dim": d} for name, d in DIMS.items()}
    model = fastrec.FieldModel(fields=fields, hidden_layer_sizes=HIDDEN, optimizer="sgd", learning_rate=LR,
                               alpha=0.0, epochs=1, batch_size=batch, random_state=0, n_threads=threads)
    t = TIMER()
    model.fit(X, y)
    wall = TIMER() - t
    rows = len(y)
    return {"train examples/s": rows / float(sum(model.history_["seconds"])), "fit wall s": wall}


def topk_cell(rec, users, threads):
    rec.set_params(n_threads=threads)
    t = TIMER()
    for u in users:
        rec.recommend([u], k=10)
    one = len(users) / (TIMER() - t)
    t = TIMER()
    rec.recommend(users, k=10)
    many = len(users) / (TIMER() - t)
    return {"topk one user/call users/s": one, "topk all users/call users/s": many}


def predict_cell(rec, pairs, threads):
    rec.set_params(n_threads=threads)
    t = TIMER()
    rec.predict(*pairs)
    return {"predict pairs/s": len(pairs[0]) / (TIMER() - t)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=1, help="spinning processes in the busy cells (default 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--what", nargs="+", default=["train", "topk", "predict"],
                        choices=["train", "topk", "predict"])
    parser.add_argument("--threads", nargs="+", default=None,
                        help="n_threads values (default: 1, all cores, auto); 'auto' means None")
    parser.add_argument("--examples", type=int, default=409_600)
    parser.add_argument("--samples", action="store_true", help="print every sample (in round order)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--topk-items", type=int, default=200_000)
    parser.add_argument("--topk-users", type=int, default=64)
    parser.add_argument("--predict-pairs", type=int, default=200_000)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    info = machine_info()
    print(f"{info['date']}  commit {info['commit']}  {info['cpu']}, {cores} cores  "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
    threads = [None if t == "auto" else int(t) for t in args.threads] if args.threads else [1, cores, None]

    jobs = []
    if "train" in args.what:
        data = make_data(args.examples)
        train_cell(data, args.batch, 1)  # warm-up
        jobs.append(lambda n: train_cell(data, args.batch, n))
    if "topk" in args.what or "predict" in args.what:
        rng = np.random.default_rng(0)
        n = 200_000  # implicit pairs: 20k users, every one of --topk-items items at least once
        inter_users = rng.integers(0, 20_000, n)
        inter_items = np.concatenate([np.arange(args.topk_items), rng.integers(0, args.topk_items, n)])[:max(
            n, args.topk_items)]
        inter_users = np.resize(inter_users, len(inter_items))
        rec = fastrec.Recommender(epochs=1, random_state=0, early_stopping=False, user_history=False,
                                  item_history=False).fit(inter_users, inter_items)
        users = rng.choice(np.unique(inter_users), args.topk_users, replace=False)
        pairs = (inter_users[rng.integers(0, len(inter_users), args.predict_pairs)],
                 inter_items[rng.integers(0, len(inter_items), args.predict_pairs)])
        if "topk" in args.what:
            topk_cell(rec, users, 1)  # warm-up (builds the top-k cache)
            jobs.append(lambda n: topk_cell(rec, users, n))
        if "predict" in args.what:
            predict_cell(rec, pairs, 1)
            jobs.append(lambda n: predict_cell(rec, pairs, n))

    cells = [(load, n) for load in ("quiet", "busy") for n in threads]
    results = {}  # (metric, load, n) -> samples
    for r in range(args.rounds):
        k = r % len(cells)
        for load, n in cells[k:] + cells[:k]:
            for job in jobs:
                if load == "busy":
                    with Spinners(args.busy):
                        out = job(n)
                else:
                    out = job(n)
                for metric, v in out.items():
                    results.setdefault((metric, load, n), []).append(v)
                    if args.samples:
                        print(f"    {load} n_threads={n} {metric}: {v:.4g}", flush=True)
        print(f"  round {r + 1}/{args.rounds} done", flush=True)

    print(f"\n{args.rounds} rounds, busy = {args.busy} spinning process(es), median [min - max]")
    metrics = list(dict.fromkeys(m for m, _, _ in results))
    for metric in metrics:
        print(f"{metric}:")
        for load, n in cells:
            v = results[(metric, load, n)]
            print(f"  {load:5s} n_threads={str(n):4s}: {statistics.median(v):12.4g} [{min(v):.4g} - {max(v):.4g}]"
                  + (f"   samples: {' '.join(f'{x:.4g}' for x in v)}" if args.samples else ""))
        if metric.endswith("/s") and (metric, "quiet", 1) in results and (metric, "busy", None) in results:
            q1 = statistics.median(results[(metric, "quiet", 1)])
            auto = results[(metric, "busy", None)]
            ratios = [a / q1 for a in auto]
            print(f"  busy auto / quiet 1 thread: {statistics.median(ratios):.3f} "
                  f"[{min(ratios):.3f} - {max(ratios):.3f}] (bar >= 0.85)")
            if (metric, "quiet", cores) in results:
                qa = statistics.median(results[(metric, "quiet", None)])
                qc = statistics.median(results[(metric, "quiet", cores)])
                print(f"  quiet auto / quiet {cores} threads: {qa / qc:.3f}")


if __name__ == "__main__":
    main()
