#!/usr/bin/env python
"""Exact maximum-inner-product top-k (fastrec._core.inner_product_topk) against the machine's read bandwidth
and against faiss's exact IndexFlatIP, in one run, and check issue 12's bars.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_retrieval.py            # ~1-2 min
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_retrieval.py --threads 1

(OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set on the development machine and slow OpenBLAS, faiss's BLAS
included, down; unset them for the benchmark only.)

Items, all on --items x --dim float32 vectors (default 10^6 x 64: 256 MB, far larger than the caches), seeded:
  (a) read bandwidth on --threads threads: a parallel sum over the item matrix itself, in C++
      (benchmarks/read_bandwidth.cpp, compiled at the start with the system's C++ compiler, -O3 -fopenmp,
      called through ctypes; without a compiler, NumPy sums of equal shares on Python threads, and the table
      says so).
  (b) fastrec's exact top-10 for ONE query over all items: time, GB/s of item matrix read, and that as a
      fraction of (a) (ratio of the medians; also per round, median [min - max]). Bar: >= 80%.
  (c) a batch of --batch queries (default 1024), top-10 each: fastrec vs faiss IndexFlatIP.search (BLAS
      sgemm + heaps), both on --threads threads (faiss.omp_set_num_threads and threadpoolctl for its BLAS):
      queries/s and the ratio. Bar: fastrec >= 1.2x faiss. Skipped (not checked) when faiss is not installed
      (pip install faiss-cpu; never a fastrec dependency).
  (d) with --ann: fastrec.ann.ApproximateIndex (faiss HNSW, the defaults of TwoTower(index="hnsw")) over the
      same items: recall@10 against (c)'s exact answers, batch queries/s against fastrec's exact batch (c)
      measured in the same rounds, and one query's latency (--single calls, median [p10 - p90]). Bars:
      recall >= 0.95, >= 20x the exact batch, one query <= 1 ms. Building the graph takes minutes at 10^6,
      so one run can sweep: a graph per --efc value (with --m), each searched at every --efs value, every
      (graph, ef) pair one more job of the interleaved rounds. The bars are checked on the index's defaults
      (the row marked "default"; the run fails if the defaults are not among the rows).

Data (--data): "clustered" (default; two-tower-like: 1000 gaussian clusters, decaying spectrum, log-normal
norms, queries from the same mixture, as benchmarks/bench_ann.py) or "gaussian" (i.i.d. normal, structureless:
no graph index reaches recall 0.95 there at speed, see benchmarks/ANN.md). The exact path's time does not
depend on it.

Method: --rounds rounds; each runs every measurement once (the order rotated each round), each after a pause
(--settle, 0.3 s: OpenMP / OpenBLAS workers of the previous call spin for ~0.1-0.2 s) and, for the fast
items (a) and (b), --reps back-to-back timed calls. Medians are over all samples; the spread is [min - max].
A first untimed call of each warms caches, page tables and thread pools. fastrec's and faiss's answers
are compared (same items where scores are not tied).

Exit status 1 when a checked bar is missed (after printing the table; the missed ones are named on stderr).
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from fastrec import _core
from timing import TIMER, fmt_t, settle, stats

HERE = Path(__file__).resolve().parent
BAR_BANDWIDTH = 0.80
BAR_FAISS = 1.2


def bandwidth_reader(threads):
    """(description, f(array) -> sum): the C++ parallel sum, or NumPy shares on Python threads."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is not None:
        tmp = tempfile.mkdtemp(prefix="fastrec_bw_")
        lib = str(Path(tmp) / "read_bandwidth.so")
        cmd = [compiler, "-O3", "-fopenmp", "-shared", "-fPIC", str(HERE / "read_bandwidth.cpp"), "-o", lib]
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            so = ctypes.CDLL(lib)
            so.read_sum.restype = ctypes.c_double
            so.read_sum.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
            return "C++ parallel sum (read_bandwidth.cpp)", lambda a: so.read_sum(a.ctypes.data, a.size, threads)

    def numpy_sum(a):
        flat = a.reshape(-1)
        shares = np.array_split(flat, threads)
        out = [0.0] * threads

        def run(i):
            out[i] = float(shares[i].sum(dtype=np.float32))  # NumPy releases the GIL in the reduction

        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(out)

    return "NumPy sums on Python threads (no C++ compiler found)", numpy_sum


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--items", type=int, default=10**6)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5, help="timed calls per round of the fast items (a) and (b)")
    ap.add_argument("--settle", type=float, default=0.3)
    ap.add_argument("--isa", default="auto")
    ap.add_argument("--data", choices=("clustered", "gaussian"), default="clustered")
    ap.add_argument("--ann", action="store_true", help="also measure the HNSW index (d)")
    ap.add_argument("--single", type=int, default=200, help="one-query calls timed for (d)")
    ap.add_argument("--m", type=int, default=None, help="(d) graph degree M (default: ApproximateIndex's)")
    ap.add_argument("--efc", default=None, help="(d) comma-separated ef_construction values, one graph each")
    ap.add_argument("--efs", default=None, help="(d) comma-separated ef_search values searched on each graph")
    args = ap.parse_args()
    T = args.threads

    from bench_ann import make_data

    items, queries = make_data(args.data, args.items, args.batch + 1, args.dim, 12)
    one, batch = queries[:1], queries[1:]
    nbytes = items.nbytes

    bw_kind, read_sum = bandwidth_reader(T)
    try:
        import faiss
        from threadpoolctl import threadpool_limits
    except ImportError:
        faiss = None
    index = None
    if faiss is not None:
        faiss.omp_set_num_threads(T)
        index = faiss.IndexFlatIP(args.dim)
        index.add(items)

    def fastrec_one():
        return _core.inner_product_topk(one, items, args.k, n_threads=T, isa=args.isa)

    def fastrec_batch():
        return _core.inner_product_topk(batch, items, args.k, n_threads=T, isa=args.isa)

    def faiss_batch():
        with threadpool_limits(T):
            return index.search(batch, args.k)

    jobs = {"bandwidth": (lambda: read_sum(items), args.reps), "fastrec_one": (fastrec_one, args.reps),
            "fastrec_batch": (fastrec_batch, 1)}
    if index is not None:
        jobs["faiss_batch"] = (faiss_batch, 1)
    anns = {}  # (ef_construction, ef_search) -> index
    if args.ann:
        import inspect

        from fastrec.ann import ApproximateIndex

        defaults = {n: p.default for n, p in inspect.signature(ApproximateIndex).parameters.items()}
        m = defaults["M"] if args.m is None else args.m
        efcs = [defaults["ef_construction"]] if args.efc is None else [int(v) for v in args.efc.split(",")]
        efss = [defaults["ef_search"]] if args.efs is None else [int(v) for v in args.efs.split(",")]
        default_key = (defaults["ef_construction"], defaults["ef_search"]) if m == defaults["M"] else None
        for efc in efcs:
            t0 = TIMER()
            ann = ApproximateIndex(items, M=m, ef_construction=efc, n_threads=T)
            print(f"HNSW M {m} ef_construction {efc} built in {TIMER() - t0:.0f} s (space {ann.space!r}, "
                  f"trial recall@10 {ann.trial_})", file=sys.stderr)
            for ef in efss:
                anns[efc, ef] = ann
                jobs[f"ann_{efc}_{ef}"] = ((lambda a, e: lambda: a.search(batch, args.k, n_threads=T, ef_search=e))(
                    ann, ef), 3)
    for f, _ in jobs.values():  # warm-up
        f()
        settle(args.settle)
    samples = {name: [] for name in jobs}
    names = list(jobs)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            f, reps = jobs[name]
            settle(args.settle)
            for _ in range(reps):
                t0 = TIMER()
                f()
                samples[name].append(TIMER() - t0)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    st = {name: stats(s) for name, s in samples.items()}
    gbs = {name: nbytes / st[name]["median"] / 1e9 for name in ("bandwidth", "fastrec_one")}
    fraction = st["bandwidth"]["median"] / st["fastrec_one"]["median"]
    # The same ratio per round (each round's median bandwidth time over its median one-query time): the machine's
    # bandwidth drifts between rounds (other tenants), so the spread of the paired ratio is the honest error bar.
    R = args.reps
    per_round = [np.median(samples["bandwidth"][r * R:(r + 1) * R]) / np.median(samples["fastrec_one"][r * R:(r + 1) * R])
                 for r in range(args.rounds)]
    qps_fastrec = args.batch / st["fastrec_batch"]["median"]
    checks = [("(b) one query >= 80% of the read bandwidth", fraction >= BAR_BANDWIDTH, f"{fraction:.0%}")]

    print(f"\n## Exact top-{args.k}: {args.items} x {args.dim} float32 items ({nbytes / 1e6:.0f} MB), "
          f"{T} thread(s), isa {args.isa} ({_core.show_config().get('active_isa')} when auto)\n")
    print("| item | time median [min - max] | figure |")
    print("|---|---|---|")
    print(f"| (a) read bandwidth: {bw_kind} | {fmt_t(st['bandwidth'])} | {gbs['bandwidth']:.1f} GB/s |")
    print(f"| (b) fastrec, 1 query | {fmt_t(st['fastrec_one'])} | {gbs['fastrec_one']:.1f} GB/s = "
          f"{fraction:.0%} of (a); per round {np.median(per_round):.0%} [{min(per_round):.0%} - {max(per_round):.0%}] |")
    print(f"| (c) fastrec, {args.batch} queries | {fmt_t(st['fastrec_batch'])} | {qps_fastrec:,.0f} queries/s |")
    if index is not None:
        qps_faiss = args.batch / st["faiss_batch"]["median"]
        ratio = qps_fastrec / qps_faiss
        print(f"| (c) faiss IndexFlatIP, {args.batch} queries | {fmt_t(st['faiss_batch'])} | "
              f"{qps_faiss:,.0f} queries/s; fastrec / faiss = {ratio:.2f}x |")
        checks.append(("(c) batch >= 1.2x faiss IndexFlatIP", ratio >= BAR_FAISS, f"{ratio:.2f}x"))
        got_items, got_scores = fastrec_batch()
        ref_scores, ref_items = faiss_batch()
        same = float(np.mean(got_items == ref_items))
        close = float(np.max(np.abs(got_scores - ref_scores)))
        print(f"\nAgreement with faiss: {same:.2%} of (query, rank) items equal; max |score difference| {close:.2e}")
    else:
        checks.append(("(c) batch >= 1.2x faiss IndexFlatIP", None, "faiss not installed"))
    if args.ann:
        exact_items, _ = fastrec_batch()
        print(f"\n(d) HNSW, M {m}: recall@{args.k} against fastrec's exact top-{args.k}, {args.batch} queries; "
              f"batch queries/s and the ratio to fastrec's exact batch (c) ({qps_fastrec:,.0f} queries/s, same "
              f"rounds); one query ({args.single} calls)\n")
        print("| ef_construction | ef_search | recall@10 | batch time median [min - max] | queries/s | x exact batch "
              "| one query ms median [p10 - p90] |")
        print("|---|---|---|---|---|---|---|")
        for (efc, ef), ann in anns.items():
            ann_items, _ = ann.search(batch, args.k, n_threads=T, ef_search=ef)
            rec = float(np.mean([len(set(a) & set(e)) / args.k
                                 for a, e in zip(ann_items.tolist(), exact_items.tolist())]))
            single = []
            for j in range(args.single):
                q = batch[j % len(batch)][None]
                t0 = TIMER()
                ann.search(q, args.k, n_threads=T, ef_search=ef)
                single.append(TIMER() - t0)
            p10, p50, p90 = np.percentile(single, [10, 50, 90]) * 1e3
            name = f"ann_{efc}_{ef}"
            qps_ann = args.batch / st[name]["median"]
            speedup = qps_ann / qps_fastrec
            mark = " (default)" if (efc, ef) == default_key else ""
            print(f"| {efc} | {ef}{mark} | {rec:.3f} | {fmt_t(st[name])} | {qps_ann:,.0f} | {speedup:.1f}x | "
                  f"{p50:.3f} [{p10:.3f} - {p90:.3f}] |")
            if (efc, ef) == default_key:
                checks += [("(d) HNSW recall@10 >= 0.95", rec >= 0.95, f"{rec:.3f}"),
                           ("(d) HNSW batch >= 20x the exact batch", speedup >= 20, f"{speedup:.1f}x"),
                           ("(d) HNSW one query <= 1 ms", p50 <= 1.0, f"{p50:.3f} ms")]
        if default_key not in anns:
            checks.append(("(d) HNSW bars (on the defaults)", None, "defaults not measured"))
    print(f"\nData: {args.data}. Samples: (a), (b) {args.rounds} rounds x {args.reps} calls; (c) {args.rounds} "
          f"rounds x 1 call; (d) batch {args.rounds} rounds x 3 calls each.\n")
    print("| check | result | value |")
    print("|---|---|---|")
    missed = []
    for name, ok, value in checks:
        print(f"| {name} | {'not checked' if ok is None else 'pass' if ok else 'MISS'} | {value} |")
        if ok is False:
            missed.append(name)
    if missed:
        print("missed: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
