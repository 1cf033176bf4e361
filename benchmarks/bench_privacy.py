#!/usr/bin/env python
"""Issue 16's speed bar: private (DP-SGD, sparse mechanism) vs non-private training of the recommender
benchmark's reference model (benchmarks/bench_recsys.py: user 100k x 32, item 10^6 x 32, tags 1k x 16, 13
dense features, MLP 93-256-128-64-1, BCE, plain SGD), batch 1024, 2 threads; and the private step time at
10^5 vs 10^7 item rows.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_privacy.py [--examples 65536] [--rounds 5]

Both train through `fastrec._core.FieldHandle` on the same examples: non-private `train_epoch` (the examples
in a fixed order, batches of 1024), private `train_private` (n / 1024 steps of Poisson samples at q = 1024 / n,
so the same number of examples in expectation; noise multiplier 1, C = 1, count noise 2, threshold at a
false-positive rate of 1e-5 per row and step). Throughput = examples / s (private: expected examples).
Also the unit "user" (users sampled at q = 1024 / n_8, at most 8 examples each, n_8 = the examples so capped;
each user's summed gradient clipped by its exact norm): reported, no bar. Rounds interleave the three;
medians and [min - max]. Bars: private >= 0.5x non-private; private step time at 10^7 item rows <= 1.2x that
at 10^5.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_recsys import LR, Data, Model, fastrec_spec  # noqa: E402
from timing import TIMER, settle, stats  # noqa: E402

from fastrec import _core  # noqa: E402
from fastrec.privacy import _normal_quantile, user_units  # noqa: E402

BATCH, THREADS, USER_CAP = 1024, 2, 8
SIGMA, C, COUNT_SIGMA = 1.0, 1.0, 2.0


class Runs:
    def __init__(self, n_items, n, seed=0):
        model = Model(n_items, seed=10 + seed)
        self.data = Data(n, n_items, seed=11 + seed)
        self.plain = fastrec_spec(model, self.data.tags, self.data.dense)
        self.private = fastrec_spec(model, self.data.tags, self.data.dense)
        self.plain_handle = _core.FieldHandle(self.plain, True)
        self.private_handle = _core.FieldHandle(self.private, True)
        self.user = fastrec_spec(model, self.data.tags, self.data.dense)
        self.user_handle = _core.FieldHandle(self.user, True)
        self.units = user_units(self.data.users)
        self.capped = int(np.minimum(np.diff(self.units[0]), USER_CAP).sum())
        self.user_steps = max(1, round(self.capped / BATCH))
        self.user_step = 0
        self.keys = [self.data.users, self.data.items, self.data.rows]
        self.step = 0
        self.epoch = 0
        self.steps = max(1, n // BATCH)

    def plain_epoch(self):
        d = self.data
        self.epoch += 1
        self.plain_handle.train_epoch(self.plain["state1"], self.plain["state2"], self.keys, d.y, None, d.order, BATCH,
                                      0.0, "sgd", LR, 0.0, False, 0.9, 0.999, 1e-8, 0, None, self.epoch, THREADS)

    def private_epoch(self):
        d = self.data
        q = BATCH / d.n
        privacy = {"noise_multiplier": SIGMA, "max_grad_norm": C, "sampling_rate": q, "sparse": True,
                   "count_noise": COUNT_SIGMA, "threshold": COUNT_SIGMA * _normal_quantile(1 - 1e-5), "seed": 3}
        self.private_handle.train_private(self.private["state1"], self.private["state2"], self.keys, d.y, None,
                                          privacy, 0.0, float(BATCH), "sgd", LR, 0.0, False, 0.9, 0.999, 1e-8, 0,
                                          None, self.step, self.steps, THREADS)
        self.step += self.steps

    def private_user_epoch(self):
        d = self.data
        privacy = {"noise_multiplier": SIGMA, "max_grad_norm": C, "sampling_rate": BATCH / self.capped,
                   "sparse": True, "count_noise": COUNT_SIGMA, "threshold": COUNT_SIGMA * _normal_quantile(1 - 1e-5),
                   "seed": 3, "unit_indptr": self.units[0], "unit_rows": self.units[1], "unit_cap": USER_CAP}
        self.user_handle.train_private(self.user["state1"], self.user["state2"], self.keys, d.y, None, privacy, 0.0,
                                       float(BATCH), "sgd", LR, 0.0, False, 0.9, 0.999, 1e-8, 0, None,
                                       self.user_step, self.user_steps, THREADS)
        self.user_step += self.user_steps


def timed(fn, settle_s):
    settle(settle_s)
    t0 = TIMER()
    fn()
    return TIMER() - t0


def fmt(st, scale=1.0, unit=""):
    return f"{st['median'] * scale:,.4g}{unit} [{st['min'] * scale:,.4g} - {st['max'] * scale:,.4g}]"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--settle", type=float, default=0.3)
    ap.add_argument("--vocabs", type=int, nargs=2, default=[100_000, 10_000_000])
    args = ap.parse_args()
    n = args.examples
    print(f"# private vs non-private, reference model, item table 10^6 x 32, batch {BATCH}, {THREADS} threads, "
          f"{n} examples per pass, {args.rounds} rounds", flush=True)
    runs = Runs(1_000_000, n)
    runs.plain_epoch(), runs.private_epoch(), runs.private_user_epoch()  # warm-up
    plain, private, ratios, user, user_ratios = [], [], [], [], []
    for r in range(args.rounds):
        a = timed(runs.plain_epoch, args.settle) if r % 2 == 0 else None
        b = timed(runs.private_epoch, args.settle)
        c = timed(runs.private_user_epoch, args.settle)
        if a is None:
            a = timed(runs.plain_epoch, args.settle)
        plain.append(n / a)
        private.append(runs.steps * BATCH / b)
        ratios.append(private[-1] / plain[-1])
        user.append(runs.user_steps * BATCH / c)
        user_ratios.append(user[-1] / plain[-1])
    print("| training | examples/s, median [min - max] |\n|---|---|")
    print(f"| non-private | {fmt(stats(plain))} |")
    print(f"| private (sparse) | {fmt(stats(private))} |")
    print(f"| ratio private / non-private (per round) | {fmt(stats(ratios))} |")
    print(f"| private (sparse, unit user, <= {USER_CAP} examples each) | {fmt(stats(user))} |")
    print(f"| ratio private user / non-private (per round) | {fmt(stats(user_ratios))} |", flush=True)
    del runs
    gc.collect()
    sweep = {v: Runs(v, n, seed=1) for v in args.vocabs}
    for v in args.vocabs:
        sweep[v].private_epoch()
    steps = {v: [] for v in args.vocabs}
    for r in range(args.rounds):
        order = args.vocabs if r % 2 == 0 else args.vocabs[::-1]
        for v in order:
            steps[v].append(timed(sweep[v].private_epoch, args.settle) / sweep[v].steps)
    lo, hi = args.vocabs
    step_ratio = [b / a for a, b in zip(steps[lo], steps[hi])]
    print("\n| item rows | private step time, ms, median [min - max] |\n|---|---|")
    for v in args.vocabs:
        print(f"| {v:,} | {fmt(stats(steps[v]), 1e3)} |")
    print(f"| ratio {hi:,} / {lo:,} (per round) | {fmt(stats(step_ratio))} |")
    ok = stats(ratios)["median"] >= 0.5 and stats(step_ratio)["median"] <= 1.2
    print(f"\nbars: throughput ratio >= 0.5 and step ratio <= 1.2: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
