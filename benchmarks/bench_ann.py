"""Approximate inner-product top-k: faiss-cpu vs hnswlib vs usearch (issue 12, fastrec[ann]).

Measures, for item vectors X [n, dim] float32 and 1024 query vectors Q, with a fixed thread count:
build time, recall@10 against exact top-10 (faiss IndexFlatIP, i.e. one GEMM-like brute force), batch
throughput (queries/s for the whole batch of 1024), and single-query latency (one query per call, median
and 10th/90th percentile over many calls), at a few search-breadth settings (efSearch / ef / expansion).

Two datasets:
  clustered  looks like trained two-tower vectors: a mixture of 1000 gaussian clusters whose centres have a
             decaying spectrum (effective rank ~ 20 of 64), within-cluster noise, item norms log-normal
             (popular items longer); queries are drawn from the same mixture.
  gaussian   i.i.d. N(0, 1) items and queries: the hard case (no structure for the graph to exploit).
Or --model PATH: a saved fastrec TwoTower's own vectors (items: item_vectors(), queries: the first --queries
users' user_vectors()), e.g. the unnormalised bce retriever saved by bench_two_stage.py --retriever-loss bce.

Methods: faiss IndexHNSWFlat(METRIC_INNER_PRODUCT), faiss HNSW on the MIPS-to-L2 reduction (append
sqrt(M^2 - |x|^2) to items, 0 to queries), faiss IndexIVFFlat(inner product), hnswlib space 'ip', usearch
metric 'ip'. Measurements of one method are repeated `--repeats` times, interleaved across methods
(all indexes are built first), and reported as median [min-max].

    OMP_NUM_THREADS=2 python benchmarks/bench_ann.py --n 1000000 --dim 64 --threads 2 --data clustered
    OMP_NUM_THREADS=2 python benchmarks/bench_ann.py --n 1000000 --data gaussian --methods faiss_hnsw,usearch

Needs faiss-cpu, hnswlib and usearch (pip install faiss-cpu hnswlib usearch); none is a fastrec dependency.
"""
import argparse
import os
import statistics
import time

import numpy as np


def make_data(kind, n, n_queries, dim, seed):
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        x = rng.standard_normal((n + n_queries, dim), dtype=np.float32)
    else:
        n_clusters = 1000
        spectrum = (1.0 / np.sqrt(1.0 + np.arange(dim) / 4.0)).astype(np.float32)
        centres = rng.standard_normal((n_clusters, dim), dtype=np.float32) * spectrum
        weights = rng.dirichlet(np.full(n_clusters, 2.0))
        labels = rng.choice(n_clusters, size=n + n_queries, p=weights)
        x = centres[labels] + 0.35 * rng.standard_normal((n + n_queries, dim), dtype=np.float32) * spectrum
        x *= rng.lognormal(0.0, 0.3, size=(n + n_queries, 1)).astype(np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x[:n].copy(), x[n:].copy()


def recall(found, truth):
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


class Faiss:
    def __init__(self, kind, m, ef_construction, nlist):
        import faiss
        self.faiss, self.kind, self.m, self.efc, self.nlist = faiss, kind, m, ef_construction, nlist
        self.name = {"hnsw": "faiss HNSW ip", "hnsw_l2": "faiss HNSW l2-reduction", "ivf": "faiss IVF ip"}[kind]

    def _q(self, q):
        if self.kind == "hnsw_l2":
            return np.hstack([q, np.zeros((q.shape[0], 1), np.float32)])
        return q

    def build(self, x):
        faiss = self.faiss
        if self.kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(x.shape[1], self.m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = self.efc
            self.index.add(x)
        elif self.kind == "hnsw_l2":
            sq = np.einsum("ij,ij->i", x, x)
            aug = np.sqrt(np.maximum(sq.max() - sq, 0.0)).astype(np.float32)[:, None]
            self.index = faiss.IndexHNSWFlat(x.shape[1] + 1, self.m, faiss.METRIC_L2)
            self.index.hnsw.efConstruction = self.efc
            self.index.add(np.hstack([x, aug]))
        else:
            quantizer = faiss.IndexFlatIP(x.shape[1])
            self.index = faiss.IndexIVFFlat(quantizer, x.shape[1], self.nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            self.index.train(x[rng.choice(x.shape[0], min(x.shape[0], 64 * self.nlist), replace=False)])
            self.index.add(x)

    def set_ef(self, ef):
        if self.kind == "ivf":
            self.index.nprobe = ef
        else:
            self.index.hnsw.efSearch = ef

    def search(self, q, k):
        return self.index.search(self._q(q), k)[1]


class Hnswlib:
    name = "hnswlib ip"

    def __init__(self, m, ef_construction, threads):
        import hnswlib
        self.hnswlib, self.m, self.efc, self.threads = hnswlib, m, ef_construction, threads

    def build(self, x):
        self.index = self.hnswlib.Index(space="ip", dim=x.shape[1])
        self.index.init_index(max_elements=x.shape[0], M=self.m, ef_construction=self.efc, random_seed=0)
        self.index.add_items(x, num_threads=self.threads)

    def set_ef(self, ef):
        self.index.set_ef(ef)

    def search(self, q, k):
        return self.index.knn_query(q, k=k, num_threads=self.threads)[0]


class Usearch:
    name = "usearch ip"

    def __init__(self, m, ef_construction, threads):
        from usearch.index import Index
        self.Index, self.m, self.efc, self.threads = Index, m, ef_construction, threads

    def build(self, x):
        self.index = self.Index(ndim=x.shape[1], metric="ip", dtype="f32", connectivity=self.m,
                                expansion_add=self.efc)
        self.index.add(np.arange(x.shape[0], dtype=np.uint64), x, threads=self.threads)

    def set_ef(self, ef):
        self.index.expansion_search = ef

    def search(self, q, k):
        return self.index.search(q, k, threads=self.threads).keys


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--single", type=int, default=200, help="single-query calls timed per setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="clustered", choices=["clustered", "gaussian"])
    p.add_argument("--model", default=None, help="a saved fastrec TwoTower: use its vectors (--data ignored)")
    p.add_argument("--methods", default="faiss_hnsw,faiss_hnsw_l2,hnswlib,usearch")
    p.add_argument("--m", type=int, default=16, help="graph degree (M / connectivity)")
    p.add_argument("--efc", type=int, default=100, help="ef_construction / expansion_add")
    p.add_argument("--efs", default="16,32,64,128", help="search breadths (efSearch, ef, expansion)")
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--nprobe", default="8,16,32,64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import faiss
    faiss.omp_set_num_threads(args.threads)
    k = 10
    t = time.perf_counter()
    if args.model is not None:
        import fastrec
        model = fastrec.load(args.model)
        x = np.ascontiguousarray(model.item_vectors(), dtype=np.float32)
        q = np.ascontiguousarray(model.user_vectors(model._users.ids[:args.queries]), dtype=np.float32)
        args.data, args.n, args.dim, args.queries = f"model {os.path.basename(args.model)}", *x.shape, q.shape[0]
    else:
        x, q = make_data(args.data, args.n, args.queries, args.dim, args.seed)
    print(f"# {args.data} n={args.n} dim={args.dim} queries={args.queries} threads={args.threads} "
          f"M={args.m} efC={args.efc}  data {time.perf_counter() - t:.1f}s  "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)

    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    exact_times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        _, truth = flat.search(q, k)
        exact_times.append(time.perf_counter() - t)
    exact_qps = [args.queries / s for s in exact_times]
    single_exact = []
    for i in range(min(args.single, 50)):
        t = time.perf_counter()
        flat.search(q[i:i + 1], k)
        single_exact.append(time.perf_counter() - t)
    print(f"exact faiss IndexFlatIP: batch {statistics.median(exact_qps):.0f} q/s "
          f"[{min(exact_qps):.0f}-{max(exact_qps):.0f}], single {1e3 * statistics.median(single_exact):.2f} ms",
          flush=True)
    # The other exact stand-in: numpy GEMM in blocks of items + argpartition (BLAS threads follow
    # OMP_NUM_THREADS / OPENBLAS_NUM_THREADS, set them to --threads).
    gemm_times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        best_s = np.full((args.queries, k), -np.inf, np.float32)
        best_i = np.zeros((args.queries, k), np.int64)
        for lo in range(0, args.n, 65536):
            s = q @ x[lo:lo + 65536].T
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            cs = np.hstack([best_s, np.take_along_axis(s, part, 1)])
            ci = np.hstack([best_i, part + lo])
            top = np.argpartition(-cs, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)
        gemm_times.append(time.perf_counter() - t)
    gemm_qps = [args.queries / s for s in gemm_times]
    print(f"exact numpy blocked GEMM + argpartition: batch {statistics.median(gemm_qps):.0f} q/s "
          f"[{min(gemm_qps):.0f}-{max(gemm_qps):.0f}]", flush=True)
    bar = 20 * statistics.median(exact_qps)

    methods = []
    for name in args.methods.split(","):
        if name == "none":
            continue
        elif name == "faiss_hnsw":
            methods.append((Faiss("hnsw", args.m, args.efc, 0), args.efs))
        elif name == "faiss_hnsw_l2":
            methods.append((Faiss("hnsw_l2", args.m, args.efc, 0), args.efs))
        elif name == "faiss_ivf":
            methods.append((Faiss("ivf", 0, 0, args.nlist), args.nprobe))
        elif name == "hnswlib":
            methods.append((Hnswlib(args.m, args.efc, args.threads), args.efs))
        elif name == "usearch":
            methods.append((Usearch(args.m, args.efc, args.threads), args.efs))
        else:
            raise SystemExit(f"unknown method {name}")
    for method, _ in methods:
        t = time.perf_counter()
        method.build(x)
        print(f"built {method.name} in {time.perf_counter() - t:.1f}s", flush=True)

    results = {}   # (name, ef) -> dict of lists
    rng = np.random.default_rng(1)
    for rep in range(args.repeats):
        for method, efs in methods:
            for ef in [int(e) for e in efs.split(",")]:
                r = results.setdefault((method.name, ef), {"qps": [], "single": [], "recall": None})
                method.set_ef(ef)
                t = time.perf_counter()
                found = method.search(q, k)
                r["qps"].append(args.queries / (time.perf_counter() - t))
                if r["recall"] is None:
                    r["recall"] = recall(np.asarray(found), truth)
                rows = rng.choice(args.queries, size=max(1, args.single // args.repeats))
                for i in rows:
                    t = time.perf_counter()
                    method.search(q[i:i + 1], k)
                    r["single"].append(time.perf_counter() - t)
    print("\n| method | ef / nprobe | recall@10 | batch q/s median [min-max] | x exact | "
          "single query ms median [p10-p90] |")
    print("|---|---|---|---|---|---|")
    for (name, ef), r in results.items():
        qps = r["qps"]
        s = np.array(r["single"]) * 1e3
        print(f"| {name} | {ef} | {r['recall']:.3f} | {statistics.median(qps):.0f} [{min(qps):.0f}-{max(qps):.0f}] "
              f"| {statistics.median(qps) / statistics.median(exact_qps):.1f} | {np.median(s):.3f} "
              f"[{np.percentile(s, 10):.3f}-{np.percentile(s, 90):.3f}] |")
    print(f"\nbar: recall@10 >= 0.95, batch >= {bar:.0f} q/s (20x exact), single <= 1 ms", flush=True)


if __name__ == "__main__":
    main()
