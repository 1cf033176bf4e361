"""Approximate inner-product top-k over item vectors (the optional extra ``fastrec[ann]``).

A two-tower model scores a (user, item) pair by the inner product of their vectors; recommending is then a
maximum-inner-product search (MIPS) over the item matrix. The exact search (brute force, one GEMM per batch
of queries) is always available and is what recall is measured against; this module is the approximate
path, an HNSW graph built by faiss (``faiss-cpu``, imported lazily: fastrec itself needs only numpy and
scipy). benchmarks/ANN.md has the measurements behind the choice of library and of the defaults.

    from fastrec.ann import ApproximateIndex
    index = ApproximateIndex(item_vectors)                  # float32 [n_items, dim]
    rows, scores = index.search(user_vectors, 10, exclude=(indptr, seen_items))
    blob = index.to_bytes()                                 # numpy uint8 array, stored in a model file
    index = ApproximateIndex.from_bytes(blob)

Scores are the float32 inner products of the returned rows (as faiss computes them; recomputed for the L2
reduction's graph), so they are comparable with the exact path's; only which rows are found is approximate.
"""

from __future__ import annotations

import contextlib
import numbers

import numpy as np
import scipy.sparse as sp

__all__ = ["ApproximateIndex"]

SPACES = ("auto", "ip", "l2")

# Rows whose over-fetch (k + number of excluded items) exceeds this are answered by the exact brute-force
# search over the index's own stored vectors instead of the graph: an HNSW search with ef in the thousands
# costs about as much as a scan, and a scan is exact.
_GRAPH_FETCH_LIMIT = 2048
# space="auto": norms within this ratio count as one norm; the trial's sample of items and of queries, and
# the recall@10 by which the L2 reduction must beat the inner-product graph to be chosen.
_SAME_NORM = 1.01
_TRIAL_ITEMS = 10_000
_TRIAL_QUERIES = 200
_TRIAL_MARGIN = 0.02


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching the import
        raise ImportError(
            "fastrec.ann needs the faiss-cpu package, which is an optional extra: "
            "pip install 'fastrec[ann]'"
        ) from exc
    return faiss


def _check_int(value, name, low):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if value > 2**31 - 1:
        raise ValueError(f"{name} must be < 2**31, got {value}")
    return int(value)


def _check_matrix(x, name, dim=None):
    try:
        a = np.asarray(x)
    except Exception as exc:
        raise ValueError(f"{name} must be a 2-D array of floats: {exc}") from None
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got {a.ndim} dimension(s)")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must hold numbers, got dtype {a.dtype}")
    if a.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} has {a.shape[1]} columns but the index holds vectors of dimension {dim}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values (or values too large for float32)")
    return a


@contextlib.contextmanager
def _omp_threads(faiss, n_threads):
    if n_threads is None:
        yield
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _augmented(items):
    """The MIPS-to-L2 reduction (Bachrach et al., RecSys 2014; the transform faiss documents for inner-product
    search with an L2 index): item x -> [x, sqrt(R^2 - |x|^2)], R the largest norm, so every item has norm R
    and, for a query [q, 0], |q - x|^2 = |q|^2 + R^2 - 2<q, x>: L2 order is inner-product order."""
    sq = np.einsum("ij,ij->i", items, items, dtype=np.float64)
    extra = np.sqrt(np.maximum(sq.max() - sq, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.hstack([items, extra[:, None]]))


def _build(faiss, items, space, M, ef_construction, ef_search):
    if space == "ip":
        index = faiss.IndexHNSWFlat(items.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWFlat(items.shape[1] + 1, M, faiss.METRIC_L2)
        items = _augmented(items)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = ef_search
    index.add(items)
    return index


def _choose_space(faiss, items, queries, M, ef_construction, ef_search, n_threads):
    """("ip" or "l2", the trial's recalls or None) for space="auto".

    Neither graph is better everywhere (benchmarks/ANN.md): an inner-product graph links each item to the items
    of largest inner product with it, i.e. to the long vectors of its own side; when the queries point
    elsewhere (trained bpr / bce two-tower users point away from the mean item) most items are unreachable
    (recall@10 0.14 against 0.97 for the reduction on such a model). On well-spread clustered vectors with
    varying norms the reduction is the worse one (0.50 against 0.99): its appended coordinate squeezes the
    geometry. So: vectors of (nearly) one norm take the inner-product graph (the reduction would append a
    near-zero coordinate); otherwise both graphs are built on a seeded sample of the items and searched with
    ``queries`` (or, when none are given, sampled items and their negations: queries on the items' side and
    on the opposite side), and the reduction is taken only if its recall@10 is clearly higher.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", items, items, dtype=np.float64))
    if norms.max() <= _SAME_NORM * max(norms.min(), np.finfo(np.float32).tiny):
        return "ip", None
    rng = np.random.default_rng(0)
    n = items.shape[0]
    sample = items[np.sort(rng.choice(n, min(n, _TRIAL_ITEMS), replace=False))]
    if queries is None:
        some = sample[rng.choice(sample.shape[0], min(sample.shape[0], _TRIAL_QUERIES // 2), replace=False)]
        queries = np.vstack([some, -some])
    else:
        queries = queries[np.sort(rng.choice(queries.shape[0], min(queries.shape[0], _TRIAL_QUERIES),
                                             replace=False))]
    k = min(10, sample.shape[0])
    truth = np.argsort(-(queries @ sample.T), axis=1, kind="stable")[:, :k]
    recalls = {}
    with _omp_threads(faiss, n_threads):
        for space in ("ip", "l2"):
            graph = _build(faiss, sample, space, M, ef_construction, max(ef_search, k))
            q = queries if space == "ip" else np.hstack([queries, np.zeros((queries.shape[0], 1), np.float32)])
            _, found = graph.search(np.ascontiguousarray(q), k)
            recalls[space] = float(np.mean([len(set(f) & set(t)) / k
                                            for f, t in zip(found.tolist(), truth.tolist())]))
    return ("l2" if recalls["l2"] > recalls["ip"] + _TRIAL_MARGIN else "ip"), recalls


class ApproximateIndex:
    """Approximate top-k by inner product over a fixed item matrix (an HNSW graph, faiss IndexHNSWFlat).

    Named for what it is to a model (the approximate counterpart of the exact search, the ``index=`` option)
    rather than for the library or the graph, which could change without changing this interface.

    Parameters
    ----------
    items : array-like of float32 [n_items, dim]
        Item vectors; row i is item i. Must be finite and non-empty. The index keeps its own copy.
    M : int, default 32
        Graph degree (links per node on the upper layers; 2*M on the bottom layer). Larger: better recall at
        a given ef_search, slower build, more memory (about 8*M bytes per item on top of the vectors).
    ef_construction : int, default 200
        Candidate-list length while building. Larger: better graph, slower build (200: about 160 s for
        10^6 x 64 on 2 threads, 2.7x the time of 100, and recall@10 0.965 instead of 0.931 at ef_search 32).
    ef_search : int, default 32
        Candidate-list length while searching (at least k is used). The recall/speed knob; can be changed
        after the build (attribute ``ef_search``) or per call.
    space : {"auto", "ip", "l2"}, default "auto"
        The graph. "ip": an HNSW graph under the inner product itself. "l2": the MIPS-to-L2 reduction
        (Bachrach et al., RecSys 2014, the transform faiss documents for inner-product search with an L2
        index): each item gets one more coordinate sqrt(R^2 - |x|^2), R the largest norm, each query a 0,
        and the graph is built and searched by L2 distance, whose order is then the inner-product order.
        "auto": "ip" for vectors of one norm (L2-normalised models: both are then the same search);
        otherwise the one of higher recall@10 in a trial on a sample of 10,000 items (a few seconds; the
        inner-product graph unless the reduction is better by more than 0.02). Neither is better on all
        data: see benchmarks/ANN.md, and the attributes ``space`` (chosen) and ``trial_`` (the recalls).
    sample_queries : array-like of float32 [n, dim] or None
        Queries like the ones the index will serve (e.g. a few hundred user vectors), used only by the
        "auto" trial; without them it uses sampled items and their negations.
    n_threads : int or None, default None
        OpenMP threads for the build (None: faiss's default, all cores or OMP_NUM_THREADS). The build is
        deterministic with n_threads=1 (faiss draws node levels from a fixed seed); with more threads the
        graph depends on the insertion interleaving, with the same recall statistically.

    With the defaults, recall@10 against the exact top-10 was 0.965 on 10^6 x 64 clustered, two-tower-like
    vectors at 38.7k queries/s on 2 threads (25x fastrec's exact batch search), 0.16 ms per single query
    (benchmarks/ANN.md; ef_search=48: 0.975 at 20x). I.i.d. gaussian 64-d vectors, with no structure, are far
    harder for every library measured: check recall against the exact path on your own vectors and raise
    ef_search (and M) until it is enough.

    An index written by an earlier fastrec (always an inner-product graph) loads as ``space="ip"``.
    """

    def __init__(self, items, *, M=32, ef_construction=200, ef_search=32, space="auto", sample_queries=None,
                 n_threads=None):
        faiss = _faiss()
        M = _check_int(M, "M", 2)
        ef_construction = _check_int(ef_construction, "ef_construction", 1)
        self.ef_search = _check_int(ef_search, "ef_search", 1)
        if n_threads is not None:
            n_threads = _check_int(n_threads, "n_threads", 1)
        if not (isinstance(space, str) and space in SPACES):
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        items = _check_matrix(items, "items")
        if items.shape[0] == 0:
            raise ValueError("items is empty: an index needs at least one item vector")
        if sample_queries is not None:
            sample_queries = _check_matrix(sample_queries, "sample_queries", items.shape[1])
            if sample_queries.shape[0] == 0:
                sample_queries = None
        self.trial_ = None
        if space == "auto":
            space, self.trial_ = _choose_space(faiss, items, sample_queries, M, ef_construction, self.ef_search,
                                               n_threads)
        self.space = space
        with _omp_threads(faiss, n_threads):
            self._index = _build(faiss, items, space, M, ef_construction, self.ef_search)
        self._flat = None

    # -- properties ----------------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d) - (self.space == "l2")

    @property
    def M(self) -> int:
        return int(self._index.hnsw.nb_neighbors(1))

    @property
    def ef_construction(self) -> int:
        return int(self._index.hnsw.efConstruction)

    def __repr__(self):
        return (f"ApproximateIndex(n_items={self.n_items}, dim={self.dim}, M={self.M}, "
                f"ef_construction={self.ef_construction}, ef_search={self.ef_search}, space={self.space!r})")

    # -- persistence ---------------------------------------------------------------------------------------
    def to_bytes(self) -> np.ndarray:
        """The whole index (graph and vectors) as a 1-D numpy uint8 array (faiss's serialisation)."""
        faiss = _faiss()
        self._index.hnsw.efSearch = self.ef_search
        return np.asarray(faiss.serialize_index(self._index), dtype=np.uint8)

    @classmethod
    def from_bytes(cls, array, *, ef_search=None):
        """Load an index written by `to_bytes`; ef_search overrides the stored one when given."""
        faiss = _faiss()
        a = np.asarray(array)
        if a.ndim != 1 or a.dtype != np.uint8 or a.size == 0:
            raise ValueError("array must be the non-empty 1-D uint8 array returned by to_bytes()")
        try:
            # deserialize_index returns the owning, already downcast object (downcasting again would leave a
            # non-owning view of an index freed with the temporary).
            index = faiss.deserialize_index(np.ascontiguousarray(a))
        except RuntimeError as exc:
            raise ValueError(f"array is not a serialised index: {exc}") from None
        # An inner-product graph (every index written before the L2 reduction existed is one) or the
        # MIPS-to-L2 reduction (an L2 graph over the items with one appended coordinate).
        if not isinstance(index, faiss.IndexHNSWFlat) or index.metric_type not in (
                faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2) or (index.metric_type == faiss.METRIC_L2 and index.d < 2):
            raise ValueError("array holds a faiss index that is not an HNSW-flat index written by ApproximateIndex")
        self = cls.__new__(cls)
        self._index = index
        self.space = "ip" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
        self.trial_ = None
        self._flat = None
        self.ef_search = int(index.hnsw.efSearch) if ef_search is None else _check_int(ef_search, "ef_search", 1)
        return self

    # -- search --------------------------------------------------------------------------------------------
    def _check_exclude(self, exclude, n_queries):
        if exclude is None:
            return None, np.zeros(n_queries, dtype=np.int64)
        if sp.issparse(exclude):
            if exclude.shape[0] != n_queries:
                raise ValueError(f"exclude has {exclude.shape[0]} rows but there are {n_queries} queries")
            exclude = sp.csr_matrix(exclude)
            indptr, items = exclude.indptr, exclude.indices
        else:
            try:
                indptr, items = exclude
            except (TypeError, ValueError):
                raise ValueError("exclude must be None, a scipy CSR matrix, or a pair (indptr, items)") from None
        indptr = np.asarray(indptr)
        items = np.asarray(items)
        if indptr.ndim != 1 or indptr.shape[0] != n_queries + 1 or not np.issubdtype(indptr.dtype, np.integer):
            raise ValueError(f"exclude indptr must be a 1-D integer array of length n_queries + 1 = {n_queries + 1}")
        if items.ndim != 1 or not (np.issubdtype(items.dtype, np.integer) or items.size == 0):
            raise ValueError("exclude items must be a 1-D integer array")
        indptr = indptr.astype(np.int64)
        if indptr[0] != 0 or indptr[-1] != items.shape[0] or np.any(np.diff(indptr) < 0):
            raise ValueError("exclude indptr must start at 0, never decrease and end at len(items)")
        items = items.astype(np.int64)
        if items.size and (items.min() < 0 or items.max() >= self.n_items):
            raise ValueError(f"exclude items must be item rows in [0, {self.n_items})")
        keys = np.unique(np.repeat(np.arange(n_queries, dtype=np.int64), np.diff(indptr)) * self.n_items + items)
        # Distinct excluded items per row (duplicates in the input count once).
        return keys, np.bincount(keys // self.n_items, minlength=n_queries).astype(np.int64)

    def _fetch(self, index, queries, rows, fetch, keys, params):
        """(distances, rows): top-`fetch` of `index` for queries[rows], excluded keys masked to -1 (order kept)."""
        if params is None:
            dist, cand = index.search(queries[rows], fetch)
        else:
            dist, cand = index.search(queries[rows], fetch, params=params)
        cand = cand.astype(np.int64)
        if keys is not None and keys.size:
            k2 = rows[:, None].astype(np.int64) * self.n_items + cand
            pos = np.minimum(np.searchsorted(keys, k2), keys.size - 1)
            cand[(keys[pos] == k2) & (cand >= 0)] = -1
        return dist, cand

    def search(self, queries, k, *, exclude=None, n_threads=None, ef_search=None):
        """Approximate top-k items by inner product for each query row, best first.

        Parameters
        ----------
        queries : array-like of float [n_queries, dim]
        k : int >= 1
        exclude : None, scipy CSR matrix [n_queries, n_items] or pair (indptr int64, items int32)
            Items to skip per query row (e.g. the user's seen items): row i excludes
            items[indptr[i]:indptr[i+1]]. Excluded items never appear in the result; while at least k
            items remain, k are returned.
        n_threads : int or None
            OpenMP threads for this call (None: faiss's current setting). Restored afterwards.
        ef_search : int or None
            Overrides the index's ef_search for this call. Rows with excluded items fetch
            k + (number excluded) candidates and search with ef_search grown by as much.

        Returns
        -------
        rows : int32 [n_queries, k], item rows best first, -1 padding when fewer than k items are eligible.
        scores : float32 [n_queries, k], the inner products of those rows, -inf padding.
        """
        faiss = _faiss()
        queries = _check_matrix(queries, "queries", self.dim)
        k = _check_int(k, "k", 1)
        if n_threads is not None:
            n_threads = _check_int(n_threads, "n_threads", 1)
        ef = self.ef_search if ef_search is None else _check_int(ef_search, "ef_search", 1)
        n_q, n_items = queries.shape[0], self.n_items
        keys, counts = self._check_exclude(exclude, n_q)
        out = np.full((n_q, k), -1, dtype=np.int64)
        if n_q == 0:
            return out.astype(np.int32), np.zeros((0, k), dtype=np.float32)
        need = k + counts                                     # enough candidates whatever is excluded
        # Round the fetch up to a power of two so rows fall into few batched searches; rows that exclude
        # nothing fetch exactly k (rounding 10 up to 16 would search with a longer list: ef_search + 6).
        fetch = np.left_shift(1, np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))
        fetch[counts == 0] = k
        fetch = np.minimum(fetch, n_items)
        on_graph = (need <= _GRAPH_FETCH_LIMIT) & (need < n_items)
        # Rows answered exactly: they ask for (almost) everything, or exclude thousands of items.
        graph_queries = queries
        if self.space == "l2":  # the query's appended coordinate is 0: L2 order = inner-product order
            graph_queries = np.hstack([queries, np.zeros((n_q, 1), dtype=np.float32)])
        scores = np.full((n_q, k), -np.inf, dtype=np.float32)
        with _omp_threads(faiss, n_threads):
            todo = []
            for f in np.unique(fetch[on_graph]):
                rows = np.flatnonzero(on_graph & (fetch == f))
                # faiss keeps efSearch even below k (recall@500 0.82 at efSearch 76 on a TwoTower's
                # vectors): use at least k, grown by the over-fetch.
                params = faiss.SearchParametersHNSW(efSearch=int(max(ef, k) + f - k))
                todo.append((rows, self._fetch(self._index, graph_queries, rows, int(f), keys, params)))
            exact = ~on_graph
            for rows, (dist, cand) in todo:
                out[rows], scores[rows] = self._compact(dist, cand, k)
                # A graph search can come back short (unreachable nodes, tiny ef): redo those rows exactly.
                short = (out[rows] >= 0).sum(axis=1) < np.minimum(k, n_items - counts[rows])
                exact[rows[short]] = True
            if self.space == "l2":  # the graph's distances are L2 ones: inner products of the found rows
                graph = np.flatnonzero(~exact)
                scores[graph] = self._rescore(queries[graph], out[graph])
            for f in np.unique(np.minimum(need[exact], n_items)):
                rows = np.flatnonzero(exact & (np.minimum(need, n_items) == f))
                out[rows], scores[rows] = self._compact(
                    *self._fetch(self._exact(faiss), queries, rows, int(f), keys, None), k)
        # Best first, ties by row (faiss's heaps leave equal scores in no particular order).
        order = np.lexsort((np.where(out >= 0, out, np.iinfo(np.int64).max), -scores.astype(np.float64)), axis=1)
        return (np.take_along_axis(out, order, axis=1).astype(np.int32), np.take_along_axis(scores, order, axis=1))

    def _exact(self, faiss):
        """A brute-force inner-product index over the items: the graph's own storage for "ip"; for "l2" a flat
        index of the original vectors, built on first need (an L2 scan of the augmented vectors would rank
        by |q|^2 + M^2 - 2<q, x> in float32, losing the inner products' low bits to M^2)."""
        if self.space == "ip":
            return faiss.downcast_index(self._index.storage)
        if self._flat is None:
            flat = faiss.IndexFlatIP(self.dim)
            flat.add(np.ascontiguousarray(self._vectors(np.arange(self.n_items))))
            self._flat = flat
        return self._flat

    def _vectors(self, ids):
        """The stored item vectors of these rows (without the appended coordinate of "l2")."""
        return np.ascontiguousarray(self._index.reconstruct_batch(ids)[:, :self.dim])

    @staticmethod
    def _compact(dist, cand, k):
        """(rows, scores): valid candidates moved to the front in their order, first k kept, -1 / -inf after."""
        order = np.argsort(cand < 0, axis=1, kind="stable")[:, :k]
        got = np.take_along_axis(cand, order, axis=1)
        score = np.where(got >= 0, np.take_along_axis(dist, order, axis=1), -np.inf).astype(np.float32)
        if got.shape[1] < k:
            pad = k - got.shape[1]
            got = np.hstack([got, np.full((got.shape[0], pad), -1, dtype=got.dtype)])
            score = np.hstack([score, np.full((score.shape[0], pad), -np.inf, dtype=np.float32)])
        return got, score

    def _rescore(self, queries, rows):
        """float32 inner products of queries[i] with the items rows[i] (-inf where rows is -1)."""
        valid = rows >= 0
        scores = np.full(rows.shape, -np.inf, dtype=np.float32)
        if valid.any():
            ids, inverse = np.unique(rows[valid], return_inverse=True)
            vecs = self._vectors(ids)
            qi = np.nonzero(valid)[0]
            scores[valid] = np.einsum("ij,ij->i", queries[qi], vecs[inverse.ravel()], dtype=np.float32)
        return scores
