#!/usr/bin/env python
"""Measure every performance item of issue 2's bar side by side, in one run, and print a markdown table.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_bar.py            # ~5-8 min on 2 cores
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_bar.py --quick    # smoke run, ~1 min

(OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set on the development machine and slow NumPy's OpenBLAS down;
unset them for the benchmark only.)

Items (issue 2, "Bar"):
  (a) GEMM GFLOP/s of fastrec._core.sgemm vs numpy.matmul vs torch.mm on the 9 products of one training
      step of a 512-256-128-64 MLP on a 1024-sample batch (X.W, X^T.dZ, dZ.W^T per layer), 1 and 2 threads,
      each also as a fraction of the FMA peak measured at the start of the run (benchmarks/fma_peak.cpp:
      register-only FMA chains, ~175 GFLOP/s for one core and ~347 for two here; the nominal 220 / 457 of
      issue 2 assume a clock these cores do not hold while running 512-bit FMAs).
  (b) one training epoch of a dense MLP (Adam, ReLU): fastrec vs scikit-learn vs the NumPy reference, from
      narrow (32 features, 64-32 hidden, batch 64) to wide (256 features, 256-128 hidden, batch 256).
  (c) CSR input (20 stored entries per row, 64-32 hidden, batch 256): epoch time per sample fastrec vs
      scikit-learn at 10^6 columns, and fastrec's step time at 10^4 .. 10^7 columns.

Method. Implementations are measured round-robin: each round runs every implementation once (rotating the
order), each after a pause (--settle, default 0.3 s) and an untimed warm-up call. The pause matters: after a
multithreaded call OpenBLAS keeps its worker threads spinning for ~0.1-0.2 s, and a 2-thread call of another
library made during that time gets one core (see the "oversubscription probe" line of (a)). Medians are over
all timed samples of all rounds; the spread is [min - max]. All data is float32 (scikit-learn keeps float32
input in float32, so all implementations do float32 arithmetic).

Checks: every bar item the run measured is a row of the "Checks" table (pass / MISS / not checked); the script
exits with status 1 when any misses (after printing the tables; the missed ones are named on stderr). An item is
"not checked" where the run did not measure what the bar defines: torch not installed (the torch.mm item), CSR
columns other than 10^6 (the scikit-learn ratio) or a column sweep other than 10^4 -> 10^7 (--quick does both).

One epoch is timed as: fastrec and scikit-learn: ``partial_fit(X, y)`` on an estimator initialised by a first
partial_fit (scikit-learn's and fastrec's partial_fit run exactly one epoch: shuffle, then the minibatches);
reference: one call of ``fastrec.reference.train_epoch`` over a permutation (the loop a user of the oracle
writes). The CSR column sweep calls ``fastrec._core.train_epoch`` directly with float32 weights initialised
in place (the estimator's float64 Glorot draw of a 10^7 x 64 matrix would cost 5 GB and seconds), step time =
epoch time / number of minibatches.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

import fastrec
from timing import machine_info as base_machine_info
from timing import TIMER, fma_peak, fmt_t, settle, stats
from fastrec import _core, reference

try:
    import torch
except ImportError:  # the torch columns are skipped with a note
    torch = None

NOMINAL_PEAK = {1: 220.0, 2: 457.0}  # issue 2's figures; used only when fma_peak.cpp cannot be compiled


# ------------------------------------------------------------------------------------------------ helpers




def fmt_g(st):
    return f"{st['median']:.0f} [{st['min']:.0f} – {st['max']:.0f}]"


def threads_ctx(n_threads):
    """Limit NumPy's BLAS and OpenMP pools (scikit-learn, the reference) and torch to n_threads."""
    if torch is not None:
        torch.set_num_threads(n_threads)
    return threadpool_limits(limits=n_threads)


def machine_info():
    import sklearn

    return {**base_machine_info(), "sklearn": sklearn.__version__,
            "torch": None if torch is None else torch.__version__}


# ------------------------------------------------------------------------------------------------ (a) GEMM
def gemm_products(m=1024, layers=(512, 256, 128, 64)):
    """[(name, a, b, trans_a, trans_b, flops)] for op(a) @ op(b), operands C-contiguous float32."""
    rng = np.random.default_rng(1234)
    out = []
    for k, n in zip(layers[:-1], layers[1:]):
        X = rng.standard_normal((m, k), dtype=np.float32)
        W = rng.standard_normal((k, n), dtype=np.float32)
        dZ = rng.standard_normal((m, n), dtype=np.float32)
        f = 2.0 * m * k * n
        out += [(f"X·W {m}x{k}·{k}x{n}", X, W, False, False, f),
                (f"Xᵀ·dZ {k}x{m}·{m}x{n}", X, dZ, True, False, f),
                (f"dZ·Wᵀ {m}x{n}·{n}x{k}", dZ, W, False, True, f)]
    return out


def gemm_callables(impl, n_threads, a, b, ta, tb):
    if impl == "fastrec":
        return lambda: _core.sgemm(a, b, ta, tb, "auto", n_threads)
    if impl == "numpy":
        A, B = (a.T if ta else a), (b.T if tb else b)  # views: BLAS gets the transpose flags, no copies
        return lambda: np.matmul(A, B)
    ta_, tb_ = torch.from_numpy(a), torch.from_numpy(b)  # shares memory
    A, B = (ta_.t() if ta else ta_), (tb_.t() if tb else tb_)
    return lambda: torch.mm(A, B)


def bench_gemm(threads, rounds, reps, settle_s):
    impls = ["fastrec", "numpy"] + (["torch"] if torch is not None else [])
    prods = gemm_products()
    total_flops = sum(p[5] for p in prods)
    res = {}
    measured = fma_peak(max(threads))
    peak = {str(t): (measured or NOMINAL_PEAK).get(t, NOMINAL_PEAK.get(t, 0.0)) for t in threads}
    print(f"FMA peak ({'measured' if measured else 'nominal'}): " +
          ", ".join(f"{t} thread(s) {g:.0f} GFLOP/s" for t, g in peak.items()), file=sys.stderr)
    for t in threads:
        per_prod = {(i, p[0]): [] for i in impls for p in prods}
        agg = {i: [] for i in impls}
        with threads_ctx(t):
            for r in range(rounds):
                for impl in impls[r % len(impls):] + impls[: r % len(impls)]:
                    settle(settle_s)
                    round_time = 0.0
                    for name, a, b, ta, tb, f in prods:
                        fn = gemm_callables(impl, t, a, b, ta, tb)
                        fn()
                        fn()  # warm-up
                        ts = []
                        for _ in range(reps):
                            t0 = TIMER()
                            fn()
                            ts.append(TIMER() - t0)
                        med = statistics.median(ts)
                        per_prod[(impl, name)].append(f / med / 1e9)
                        round_time += med
                    agg[impl].append(total_flops / round_time / 1e9)
            probe = oversubscription_probe(t, prods, settle_s) if t > 1 else None
        res[t] = {"aggregate": {i: stats(agg[i]) for i in impls},
                  "per_product": {f"{i}|{name}": stats(v) for (i, name), v in per_prod.items()},
                  "probe": probe}
    return {"impls": impls, "products": [p[0] for p in prods], "threads": res, "peak": peak,
            "peak_measured": measured is not None}


def oversubscription_probe(t, prods, settle_s, k=10):
    """GFLOP/s of fastrec's first product called right after a NumPy call (OpenBLAS threads still spinning)."""
    name, a, b, ta, tb, f = prods[0]
    fr = gemm_callables("fastrec", t, a, b, ta, tb)
    npf = gemm_callables("numpy", t, a, b, ta, tb)
    ts = []
    for _ in range(k):
        npf()
        t0 = TIMER()
        fr()
        ts.append(TIMER() - t0)
    settle(settle_s)
    return {"product": name, "fastrec_after_numpy_gflops": f / statistics.median(ts) / 1e9}


# ------------------------------------------------------------------------------------------------ (b) dense epoch
DENSE_POINTS = [  # (label, n_features, hidden, batch)
    ("narrow", 32, (64, 32), 64),
    ("mid-1", 64, (128, 64), 128),
    ("mid-2", 128, (256, 128), 128),
    ("wide", 256, (256, 128), 256),
]


def dense_data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
    y = (np.tanh(X @ w) + 0.1 * rng.standard_normal(n)).astype(np.float32)
    return X, y


def estimator(lib, kind, hidden, batch, n_threads):
    kw = dict(hidden_layer_sizes=hidden, activation="relu", solver="adam", alpha=1e-4, batch_size=batch,
              learning_rate_init=1e-3, shuffle=True, random_state=0)
    if lib == "fastrec":
        cls = fastrec.MLPRegressor if kind == "regressor" else fastrec.MLPClassifier
        return cls(n_threads=n_threads, **kw)
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    return (MLPRegressor if kind == "regressor" else MLPClassifier)(**kw)


class RefEpoch:
    """One epoch of fastrec.reference.train_epoch (Adam, float32) from the given weights."""

    def __init__(self, est, X, Y, batch, out_activation):
        self.c = [np.array(c, dtype=np.float32) for c in est.coefs_]
        self.b = [np.array(b, dtype=np.float32) for b in est.intercepts_]
        p = self.c + self.b
        self.s1, self.s2 = [np.zeros_like(x) for x in p], [np.zeros_like(x) for x in p]
        self.t, self.X, self.Y, self.batch, self.out = 0, X, Y, batch, out_activation
        self.rng = np.random.RandomState(0)

    def __call__(self):
        order = self.rng.permutation(self.Y.shape[0]).astype(np.int64)
        _, self.t = reference.train_epoch(self.c, self.b, self.s1, self.s2, self.X, self.Y, order, self.batch,
                                          "relu", self.out, 1e-4, "adam", 1e-3, 0.9, True, 0.9, 0.999, 1e-8,
                                          self.t, 0)


def epoch_runners(kind, X, y, hidden, batch, n_threads):
    """{impl: callable running one epoch}, each already initialised by one epoch."""
    classes = np.unique(y) if kind == "classifier" else None
    runners = {}
    for lib in ("fastrec", "sklearn"):
        est = estimator(lib, kind, hidden, batch, n_threads)
        fit = (lambda e=est: e.partial_fit(X, y, classes=classes)) if kind == "classifier" else \
            (lambda e=est: e.partial_fit(X, y))
        with threads_ctx(n_threads):
            fit()
        runners[lib] = fit
        if lib == "fastrec":
            if kind == "classifier":
                Y = np.zeros((len(y), len(classes)), np.float32)
                Y[np.arange(len(y)), np.searchsorted(classes, y)] = 1
                out = "softmax"
            else:
                Y, out = y.reshape(-1, 1).astype(np.float32), "identity"
            runners["reference"] = RefEpoch(est, X, Y, batch, out)
    return runners


def time_round_robin(runners, n_threads, rounds, reps, settle_s):
    samples = {k: [] for k in runners}
    names = list(runners)
    with threads_ctx(n_threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                settle(settle_s)
                runners[name]()  # warm-up
                for _ in range(reps):
                    t0 = TIMER()
                    runners[name]()
                    samples[name].append(TIMER() - t0)
    return {k: stats(v) for k, v in samples.items()}


def bench_dense(threads, rounds, reps, settle_s, n_rows, classifier_points):
    out = []
    for t in threads:
        for label, d, hidden, batch in DENSE_POINTS:
            kinds = ["regressor"] + (["classifier"] if label in classifier_points else [])
            for kind in kinds:
                X, y = dense_data(n_rows, d)
                if kind == "classifier":  # 10 balanced-ish classes from the regression target's deciles
                    y = np.searchsorted(np.quantile(y, np.linspace(0.1, 0.9, 9)), y).astype(np.int64)
                runners = epoch_runners(kind, X, y, hidden, batch, t)
                st = time_round_robin(runners, t, rounds, reps, settle_s)
                out.append({"point": label, "kind": kind, "threads": t, "n_features": d, "hidden": hidden,
                            "batch": batch, "rows": n_rows, "times": st})
                print(f"  (b) {label} {kind} t={t}: " + ", ".join(f"{k} {fmt_t(v)}" for k, v in st.items()),
                      file=sys.stderr, flush=True)
    return out


# ------------------------------------------------------------------------------------------------ (c) CSR
def csr_data(n, n_cols, nnz=20, seed=0):
    """CSR float32 (n, n_cols), `nnz` distinct uniformly drawn columns per row (sorted), and y float32."""
    rng = np.random.default_rng(seed)
    cols = np.sort(rng.integers(0, n_cols, (n, nnz)), axis=1)
    dup = np.nonzero((np.diff(cols, axis=1) == 0).any(axis=1))[0]
    for i in dup:  # rare for large n_cols
        cols[i] = np.sort(rng.choice(n_cols, nnz, replace=False))
    data = rng.random((n, nnz), dtype=np.float32)
    X = sp.csr_matrix((data.ravel(), cols.ravel().astype(np.int32), np.arange(0, n * nnz + 1, nnz)),
                      shape=(n, n_cols))
    y = (data.sum(1) + 0.1 * rng.standard_normal(n)).astype(np.float32)
    return X, y


def bench_csr_vs_sklearn(n_threads, rounds, settle_s, n_rows, n_cols, batch=256, hidden=(64, 32)):
    X, y = csr_data(n_rows, n_cols)
    runners = {}
    for lib in ("fastrec", "sklearn"):
        est = estimator(lib, "regressor", hidden, batch, n_threads)
        with threads_ctx(n_threads), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.partial_fit(X, y)
        runners[lib] = lambda e=est: e.partial_fit(X, y)
    # fastrec's epoch is ~1000x shorter: give it more timed epochs per round (same rounds, same pauses).
    samples = {k: [] for k in runners}
    with threads_ctx(n_threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(rounds):
            for name in (["fastrec", "sklearn"] if r % 2 == 0 else ["sklearn", "fastrec"]):
                settle(settle_s)
                runners[name]()
                for _ in range(1 if name == "sklearn" else 10):
                    t0 = TIMER()
                    runners[name]()
                    samples[name].append((TIMER() - t0) / n_rows)
    del runners
    gc.collect()
    return {"n_rows": n_rows, "n_cols": n_cols, "batch": batch, "threads": n_threads,
            "per_sample": {k: stats(v) for k, v in samples.items()}}


def bench_csr_columns(n_threads, rounds, settle_s, col_counts, n_steps=32, batch=256, hidden=(64, 32)):
    n = n_steps * batch
    models = {}
    for n_cols in col_counts:
        X, y = csr_data(n, n_cols, seed=1)
        Xc = (X.indptr.astype(np.int64), X.indices.astype(np.int32), X.data.astype(np.float32), n_cols)
        rng = np.random.default_rng(0)
        sizes = [n_cols, *hidden, 1]
        coefs, ints = [], []
        for fi, fo in zip(sizes[:-1], sizes[1:]):
            w = np.empty((fi, fo), np.float32)
            # Fill in 1M-row chunks (keeps the float64 temporaries small); Glorot-uniform bound.
            bound = np.float32(np.sqrt(6.0 / (fi + fo)))
            for s in range(0, fi, 1 << 20):
                blk = w[s:s + (1 << 20)]
                blk[...] = rng.random(blk.shape, dtype=np.float32)
                blk *= 2 * bound
                blk -= bound
            coefs.append(w)
            ints.append(np.zeros(fo, np.float32))
        p = coefs + ints
        s1, s2 = [np.zeros_like(x) for x in p], [np.zeros_like(x) for x in p]
        Y = y.reshape(-1, 1)
        state = {"t": 0, "rng": np.random.default_rng(2)}

        def epoch(coefs=coefs, ints=ints, s1=s1, s2=s2, Xc=Xc, Y=Y, state=state):
            order = state["rng"].permutation(n).astype(np.int64)
            _, state["t"], *_ = _core.train_epoch(coefs, ints, s1, s2, Xc, Y, order, batch, "relu", "identity", 1e-4,
                                              "adam", 1e-3, 0.9, True, 0.9, 0.999, 1e-8, state["t"], n_threads)
        epoch()  # first touch of the state arrays (page faults) outside the timing
        models[n_cols] = epoch
    samples = {c: [] for c in col_counts}
    for r in range(rounds):
        for c in col_counts[r % len(col_counts):] + col_counts[: r % len(col_counts)]:
            settle(settle_s / 3)
            models[c]()
            for _ in range(3):
                t0 = TIMER()
                models[c]()
                samples[c].append((TIMER() - t0) / n_steps)
    del models
    gc.collect()
    return {"threads": n_threads, "batch": batch, "n_steps": n_steps,
            "step": {str(c): stats(v) for c, v in samples.items()}}


# ------------------------------------------------------------------------------------------------ report
def verdict(ok):
    return "**pass**" if ok else "**MISS**"


def report(info, res, args):
    L = []
    L.append(f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores, shared machine), "
             f"fastrec {info['fastrec']} (active ISA {info['fastrec_core'].get('active_isa')}), numpy "
             f"{info['numpy']}, scikit-learn {info['sklearn']}, torch {info['torch'] or 'not installed'}.")
    blas = "; ".join(f"{b['internal_api']} {b['version']} ({b.get('architecture')}, {b['threading_layer']})"
                     for b in info["blas"] if b["internal_api"] != "openmp")
    L.append(f"NumPy BLAS: {blas}. Command: `{args.command}`. Median [min – max] over "
             f"{args.rounds} interleaved rounds.")
    L.append("")
    g = res.get("gemm")
    if g:
        L.append("### (a) GEMM, products of a 1024-sample step through a 512-256-128-64 MLP (9 products)")
        L.append("")
        hdr = "| threads | " + " | ".join(f"{i} GFLOP/s (% of peak)" for i in g["impls"]) + \
              " | fastrec / numpy | fastrec / torch | verdict |"
        L += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
        for t, r in g["threads"].items():
            a = r["aggregate"]
            cells = [f"{fmt_g(a[i])} ({a[i]['median'] / g['peak'][str(t)]:.0%})" for i in g["impls"]]
            fn = a["fastrec"]["median"] / a["numpy"]["median"]
            ft = a["fastrec"]["median"] / a["torch"]["median"] if "torch" in a else None
            ok = fn >= 1.0 and (ft is None or ft >= 0.9)
            L.append(f"| {t} | " + " | ".join(cells) + f" | {fn:.2f} | " +
                     (f"{ft:.2f}" if ft is not None else "n/a (no torch)") + f" | {verdict(ok)} |")
        L.append("")
        kind = "measured by benchmarks/fma_peak.cpp" if g.get("peak_measured") else "nominal (no compiler for fma_peak.cpp)"
        L.append("Peak (" + kind + "): " + ", ".join(f"{t} thread(s) {p:.0f} GFLOP/s" for t, p in g["peak"].items()) + ".")
        L.append("Aggregate = total flops of the 9 products / sum of their median times. Per product (median "
                 "GFLOP/s):")
        L.append("")
        hdr = "| product | " + " | ".join(f"{i} {t}T" for t in g["threads"] for i in g["impls"]) + " |"
        L += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
        for p in g["products"]:
            L.append(f"| {p} | " + " | ".join(f"{g['threads'][t]['per_product'][f'{i}|{p}']['median']:.0f}"
                                             for t in g["threads"] for i in g["impls"]) + " |")
        for t, r in g["threads"].items():
            if r["probe"]:
                L.append("")
                L.append(f"Oversubscription probe ({t} threads): fastrec's {r['probe']['product']} called right "
                         f"after a {t}-thread NumPy matmul: {r['probe']['fastrec_after_numpy_gflops']:.1f} GFLOP/s "
                         "(OpenBLAS's worker threads are still spinning; the table above pauses between "
                         "libraries).")
        if torch is None:
            L.append("")
            L.append("torch is not installed: its columns are skipped (`pip install torch==2.13.0` to add them).")
        L.append("")
    d = res.get("dense")
    if d:
        L.append("### (b) One training epoch, dense input (Adam, ReLU, float32)")
        L.append("")
        L.append("| point | model | threads | features | hidden | batch | rows | fastrec | scikit-learn | "
                 "reference | vs sklearn | vs reference | needed | verdict |")
        L.append("|" + "---|" * 14)
        for e in d:
            tm = e["times"]
            f = tm["fastrec"]["median"]
            s, rf = tm["sklearn"]["median"] / f, tm["reference"]["median"] / f
            need, strict = dense_need(e["point"])
            ok = min(s, rf) > need if strict else min(s, rf) >= need
            L.append(f"| {e['point']} | {e['kind']} | {e['threads']} | {e['n_features']} | "
                     f"{'-'.join(map(str, e['hidden']))} | {e['batch']} | {e['rows']} | {fmt_t(tm['fastrec'])} | "
                     f"{fmt_t(tm['sklearn'])} | {fmt_t(tm['reference'])} | {s:.2f}x | {rf:.2f}x | "
                     f"{'>' if need == 1.0 else '≥'}{need:g}x | {verdict(ok)} |")
        L.append("")
    c = res.get("csr_sklearn")
    if c:
        ps = c["per_sample"]
        ratio = ps["sklearn"]["median"] / ps["fastrec"]["median"]
        L.append(f"### (c) CSR input: {c['n_cols']:,} columns, 20 nonzeros/row, 64-32 hidden, batch {c['batch']}, "
                 f"{c['threads']} threads")
        L.append("")
        L.append("| epoch over | fastrec per sample | scikit-learn per sample | speed-up | needed | verdict |")
        L.append("|---|---|---|---|---|---|")
        L.append(f"| {c['n_rows']} rows | {fmt_t(ps['fastrec'])} | {fmt_t(ps['sklearn'])} | {ratio:.0f}x | ≥100x | "
                 f"{verdict(ratio >= 100) if c['n_cols'] == 10**6 else 'not checked (the bar: 10^6 columns)'} |")
        L.append("")
    cc = res.get("csr_columns")
    if cc:
        steps = cc["step"]
        cols = list(steps)
        L.append(f"fastrec step time (batch {cc['batch']}, Adam, {cc['threads']} threads, "
                 f"`_core.train_epoch` over {cc['n_steps']} steps) by column count:")
        L.append("")
        L.append("| " + " | ".join(f"{int(k):.0e} cols" for k in cols) + " | ratio last / first | needed | verdict |")
        L.append("|" + "---|" * (len(cols) + 3))
        ratio = steps[cols[-1]]["median"] / steps[cols[0]]["median"]
        bar_range = (int(cols[0]), int(cols[-1])) == (10**4, 10**7)
        shown = verdict(ratio <= 1.2) if bar_range else "not checked"
        L.append("| " + " | ".join(fmt_t(steps[k]) for k in cols) +
                 f" | {ratio:.2f} | ≤1.2 (1e+04 → 1e+07) | {shown} |")
        L.append("")
    L.append("### Checks (the script exits with status 1 if any misses)")
    L.append("")
    L.append("| check | result | measured |")
    L.append("|---|---|---|")
    for c in checks(res):
        L.append(f"| {c['check']} | {c['status']} | {c['detail']} |")
    L.append("")
    return "\n".join(L)


def dense_need(point):
    """The speed-up over scikit-learn and the reference issue 2 asks for at a sweep point: (factor, strict)."""
    return {"narrow": (3.0, False), "wide": (1.3, False)}.get(point, (1.0, True))


def checks(res):
    """Every bar item of issue 2 this run measured: [{"check", "status", "detail"}], status "pass", "MISS", or
    "not checked" where the run did not measure what the bar defines (no torch, --quick sizes, other
    options); the reason is in detail."""
    out = []

    def add(name, ok, detail):
        out.append({"check": name, "status": "not checked" if ok is None else "pass" if ok else "MISS",
                    "detail": detail})

    g = res.get("gemm")
    if g:
        for t, r in g["threads"].items():
            a = r["aggregate"]
            f, n = a["fastrec"]["median"], a["numpy"]["median"]
            add(f"GEMM ≥ NumPy matmul, {t} thread(s)", f >= n, f"{f:.0f} vs {n:.0f} GFLOP/s ({f / n:.2f}x)")
            if "torch" in a:
                tt = a["torch"]["median"]
                add(f"GEMM ≥ 90% of torch.mm, {t} thread(s)", f >= 0.9 * tt,
                    f"{f:.0f} vs {tt:.0f} GFLOP/s ({f / tt:.2f}x)")
            else:
                add(f"GEMM ≥ 90% of torch.mm, {t} thread(s)", None, "torch not installed")
    for e in res.get("dense") or []:
        tm = e["times"]
        f = tm["fastrec"]["median"]
        s, rf = tm["sklearn"]["median"] / f, tm["reference"]["median"] / f
        need, strict = dense_need(e["point"])
        ok = min(s, rf) > need if strict else min(s, rf) >= need
        add(f"dense epoch {e['point']} {e['kind']}, {e['threads']} thread(s): {'>' if strict else '≥'}{need:g}x "
            "scikit-learn and the reference", ok, f"{s:.2f}x scikit-learn, {rf:.2f}x reference")
    c = res.get("csr_sklearn")
    if c:
        ps = c["per_sample"]
        ratio = ps["sklearn"]["median"] / ps["fastrec"]["median"]
        name = "CSR epoch ≥ 100x scikit-learn (10^6 columns)"
        if c["n_cols"] == 10**6:
            add(name, ratio >= 100, f"{ratio:.0f}x")
        else:
            add(name, None, f"measured at {c['n_cols']:.0e} columns: {ratio:.0f}x")
    cc = res.get("csr_columns")
    if cc:
        steps = cc["step"]
        cols = list(steps)
        ratio = steps[cols[-1]]["median"] / steps[cols[0]]["median"]
        name = "CSR step time within 1.2x from 10^4 to 10^7 columns"
        detail = (f"{fmt_t(steps[cols[0]])} → {fmt_t(steps[cols[-1]])} ({ratio:.2f}x, "
                  f"{int(cols[0]):.0e} → {int(cols[-1]):.0e})")
        add(name, ratio <= 1.2 if (int(cols[0]), int(cols[-1])) == (10**4, 10**7) else None, detail)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds and small sizes: a smoke run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--settle", type=float, default=0.3, help="pause (s) before each implementation's turn")
    ap.add_argument("--threads", default="1,2", help="thread counts for (a) and (b)")
    ap.add_argument("--csr-threads", type=int, default=2)
    ap.add_argument("--items", default="a,b,c")
    ap.add_argument("--dense-rows", type=int, default=8192)
    ap.add_argument("--csr-rows", type=int, default=2048)
    ap.add_argument("--csr-cols", type=int, default=10**6)
    ap.add_argument("--sweep-cols", default="1e4,1e5,1e6,1e7")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "bar.json"))
    args = ap.parse_args()
    args.command = " ".join(["python", "benchmarks/bench_bar.py", *sys.argv[1:]])
    if args.quick:
        args.rounds, args.dense_rows, args.csr_rows, args.csr_cols = 2, 1024, 512, 10**5
        args.sweep_cols = "1e4,1e5"
    threads = [int(t) for t in args.threads.split(",")]
    items = set(args.items.split(","))
    info = machine_info()
    print(f"# fastrec bar benchmark: {info['cpu']}, {info['cores']} cores", file=sys.stderr)
    if info["env"]["OPENBLAS_CORETYPE"] or info["env"]["OPENBLAS_L2_SIZE"]:
        print("warning: OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE are set; run with `env -u OPENBLAS_CORETYPE "
              "-u OPENBLAS_L2_SIZE` for representative NumPy numbers", file=sys.stderr)
    res = {}
    t_start = TIMER()
    if "a" in items:
        res["gemm"] = bench_gemm(threads, args.rounds, 10 if not args.quick else 3, args.settle)
        print(f"  (a) done {TIMER() - t_start:.0f}s", file=sys.stderr, flush=True)
    if "b" in items:
        res["dense"] = bench_dense(threads, args.rounds, 2 if not args.quick else 1, args.settle, args.dense_rows,
                                   {"narrow", "wide"})
        print(f"  (b) done {TIMER() - t_start:.0f}s", file=sys.stderr, flush=True)
    if "c" in items:
        res["csr_sklearn"] = bench_csr_vs_sklearn(args.csr_threads, max(2, args.rounds - 2), args.settle,
                                                  args.csr_rows, args.csr_cols)
        print(f"  (c) sklearn done {TIMER() - t_start:.0f}s", file=sys.stderr, flush=True)
        cols = [int(float(c)) for c in args.sweep_cols.split(",")]
        res["csr_columns"] = bench_csr_columns(args.csr_threads, args.rounds, args.settle, cols)
        print(f"  (c) sweep done {TIMER() - t_start:.0f}s", file=sys.stderr, flush=True)
    text = report(info, res, args)
    print(text)
    found = checks(res)
    if args.json:
        p = Path(args.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"machine": info, "args": vars(args), "results": res, "checks": found}, indent=1,
                                default=str))
        print(f"\n(JSON: {p})", file=sys.stderr)
    missed = [c for c in found if c["status"] == "MISS"]
    for c in missed:
        print(f"MISS: {c['check']}: {c['detail']}", file=sys.stderr)
    if missed:
        print(f"{len(missed)} bar check(s) missed: exit status 1", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
