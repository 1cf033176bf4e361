"""`fastrec.EASE`: the closed-form linear autoencoder of Steck ("Embarrassingly Shallow Autoencoders for Sparse
Data", WWW 2019) over implicit feedback.

With X the binary users x items matrix of the interactions, EASE's item-item weights B minimise
``||X - X B||^2 + l2 ||B||^2`` subject to ``diag(B) = 0``, and have a closed form:
``G = X^T X + l2 I``, ``P = G^-1``, ``B = I - P diagMat(1 / diag(P))`` (so ``B[i, j] = -P[i, j] / P[j, j]``
off the diagonal). A user's scores are ``X_u B``: the sum of the rows of B of the items in the user's bag,
which is also how a bag never seen in training (a new user, a session) is scored, with no refit.

The model has no user parameters: users are their bags (the seen pairs of `RecommenderBase`). Items are entities
1..n_items; ``weights_[e - 1]`` is item entity e's row of B. An unknown item has no row and scores 0.
"""

from __future__ import annotations

import os
import time

import numpy as np
import scipy.sparse as sp

from fastrec import _core
from fastrec._base import exclusive_fit
from fastrec._checks import check_bool, check_float, check_int
from fastrec._recbase import RecommenderBase, _is_scalar
from fastrec._registry import persistable
from fastrec.features import as_id_array

__all__ = ["EASE"]

# Peak bytes per items^2 entry of a fit: the float64 Gram matrix inverted in place (8) and the float32 weights
# cast from it (4).
_BYTES_PER_ENTRY = 12
# Users scored per call of the core (each a dense row of n_items float32 scores): 2**24 scores, 64 MiB.
_SCORES_PER_CHUNK = 1 << 24


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable; else free physical pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n_bytes) -> str:
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.1f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes:,} bytes"


def _symmetrize_lower(a, block=512):
    """Copy the lower triangle of the square C-ordered `a` onto its upper one, in place, one block of rows at a
    time (no n x n temporary)."""
    n = len(a)
    for s in range(0, n, block):
        e = min(s + block, n)
        d = a[s:e, s:e]
        d[...] = np.tril(d) + np.tril(d, -1).T
        a[s:e, e:] = a[e:, s:e].T


def _blas_threads(n_threads):
    """A context limiting the BLAS threads of LAPACK to n_threads (threadpoolctl, when installed)."""
    import contextlib

    if n_threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(int(n_threads), user_api="blas")


def _gram_blocks(X):
    """(columns, dense float64 X^T X[:, columns]) for blocks of columns of the CSR X: the Gram matrix without
    its sparse form in memory at once (a block's product holds at most about 2**24 entries)."""
    n = X.shape[1]
    Xt, Xc = X.T.tocsr(), X.tocsc()
    step = max(1, (1 << 24) // max(n, 1))
    for s in range(0, n, step):
        cols = slice(s, min(s + step, n))
        yield cols, (Xt @ Xc[:, cols]).toarray()


def ease_weights(X, l2, n_threads=None):
    """B of EASE for the binary CSR matrix X (users x items), as float64 (n_items, n_items), and the training
    objective ``||X - X B||^2 + l2 ||B||^2``.

    G is inverted by LAPACK's Cholesky routines in place in one float64 array: ``dpotrf`` (G = U^T U) then
    ``dpotri`` (G^-1 from U), n_items^3 flops in all (a solve against the identity would need a second
    n_items x n_items array and more than twice the flops). float64, because a float32 inversion's error grows
    with G's condition number, (largest eigenvalue of X^T X + l2) / l2, at least (the largest item count + l2) /
    l2, so with the number of users: on MovieLens-100k (ratings >= 4, 942 users) it is 43 at l2 = 300 and 255
    at l2 = 50, and float32 (spotrf / spotri) gives B to 1.5e-6 and 4e-6 relative (harmless), but a data set
    with 10^5 users or more multiplies it by 100 or more. The float64 matrix exists only during the fit.
    """
    from scipy.linalg import lapack

    n = X.shape[1]
    G = np.empty((n, n))
    for cols, block in _gram_blocks(X):  # exact integer counts
        G[:, cols] = block
    G[np.diag_indices(n)] += l2
    with _blas_threads(n_threads):
        # G is symmetric, so G.T is the same matrix in Fortran order: LAPACK works on it in place.
        factor, info = lapack.dpotrf(G.T, lower=0, overwrite_a=1, clean=0)
        if info == 0:
            factor, info = lapack.dpotri(factor, lower=0, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the Cholesky factorisation of X^T X + l2 I failed (LAPACK info {info})")
    P = factor.T  # C-ordered; its lower triangle is the upper one LAPACK wrote in Fortran order
    _symmetrize_lower(P)
    diag = P.diagonal().copy()
    P /= -diag  # column j divided by -P[j, j]
    P[np.diag_indices(n)] = 0.0
    # At the optimum ||X - XB||^2 + l2 ||B||^2 = tr(G0) - sum(B * G0), G0 = X^T X (from (G0 + l2 I) B = G - D
    # with D = diagMat(1 / diag(P)), and diag(B) = 0).
    inner = sum(float(np.einsum("ij,ij->", P[:, cols], block)) for cols, block in _gram_blocks(X))
    return P, float(X.nnz) - inner


@persistable
class EASE(RecommenderBase):
    """EASE (Steck, WWW 2019): the closed-form linear item-item autoencoder for implicit feedback.

    Fit it on (user, item) interactions; it learns an items x items weight matrix B with a zero diagonal that
    reconstructs each user's bag of items from the other items of the bag, in one linear solve (no epochs, no
    learning rate, no random draws). A user's score for item j is the sum of B[i, j] over the items i of their
    bag, so a user never seen in training is scored from their bag at once (``recommend(histories=...)``).

    Cost: a fit takes memory in the square of the item count (12 bytes per items x items entry at the peak:
    1.2 GB at 10^4 items, 30 GB at 5 * 10^4) and n_items^3 flops for the inversion (10^12 at 10^4 items: a
    12 s fit on 2 cores, benchmarks/AUTOENCODERS.md), plus the sum over users of (bag size)^2 for X^T X;
    scoring a user costs (bag size) x n_items additions. Use it for catalogues of up to some 10^4 items; a
    factorisation (``fastrec.Recommender``, ``fastrec.TwoTower``) grows linearly with the item count.

    Parameters
    ----------
    l2 : float, default=500.0
        The L2 penalty lambda on B. 500 is the paper's setting for MovieLens-20M; the best value depends on the
        data, so tune it on validation data (benchmarks/AUTOENCODERS.md: 100-300 on MovieLens-100k).
    max_memory : int or "auto", default="auto"
        Bytes a fit may allocate for its items x items matrices. "auto": the memory available when fit starts.
        A fit that would need more raises ValueError before allocating anything, with the amount needed.
    n_threads : int or None, default=None
        Threads of the scoring (and, with threadpoolctl installed, of LAPACK's BLAS). None: all cores. Scores
        do not depend on it.
    verbose : bool, default=False

    Attributes
    ----------
    weights_ : float32 (n_items_, n_items_)
        B, in ``item_ids_`` order: row i holds how much item i in a bag adds to every item's score. Solved in
        float64 (see `ease_weights`) and stored in float32: half the memory and the scoring bandwidth, for a
        rounding of 6e-8 relative per entry.
    n_users_, n_items_
    history_ : {"loss": [objective], "seconds": [fit time]}
        The objective ``||X - X B||^2 + l2 ||B||^2`` of each fit / partial_fit.
    """

    _fitted_attr = "weights_"
    _scores_from_history = True

    # The base's training parameters, fixed for a closed form: one "epoch", no validation, no ratings.
    epochs = 1
    validation_metric = "auto"
    early_stopping = False
    validation_fraction = 0.1
    n_iter_no_change = None
    clip_predictions = False
    random_state = None

    def __init__(self, l2=500.0, max_memory="auto", n_threads=None, verbose=False):
        self.l2 = l2
        self.max_memory = max_memory
        self.n_threads = n_threads
        self.verbose = verbose

    # ------------------------------------------------------------------------------------ public API
    def fit(self, users, items, ratings=None):
        """Learn B from the interactions (users[i], items[i]) (raw ids; repeats count once: X is binary).

        ratings must be None: EASE learns from which items each user interacted with. To learn from ratings,
        keep the positive ones first (e.g. ratings >= 4, as Liang et al. and Steck do on MovieLens).
        """
        self._refuse_ratings(ratings)
        return super().fit(users, items)

    def partial_fit(self, users, items, ratings=None):
        """Add these interactions (new users and items included) and solve again over all of them: the result is
        the model ``fit`` would give on every interaction so far (the closed form has no incremental update;
        it costs a full fit). On an unfitted model it is ``fit``."""
        self._refuse_ratings(ratings)
        return super().partial_fit(users, items)

    def recommend(self, users=None, k=10, *, exclude_seen=True, items=None, histories=None):
        """The k best items: (item ids (n, k), scores (n, k)), best first, ties to the item first in
        ``item_ids_`` order.

        users: ids (each scored from their training items; an unknown user has an empty bag and gets the first k
        candidates with score 0); or histories: a list of bags of item ids (users never seen in training,
        sessions; unknown items are skipped, repeats count once), each scored exactly as a trained user with that
        bag. exclude_seen: skip the user's (or the bag's) items. items: rank only these candidates. Padding
        as in ``Recommender.recommend``.
        """
        return self._recommend_users_or_histories(users, k, exclude_seen, items, histories)

    def similar_items(self, items, k=10):
        """The k items that each given item's presence in a bag raises most: (ids, weights), the largest entries
        of the item's row of B (the item itself excluded): what ``recommend(histories=[[item]])`` returns. An
        unknown item has no row: every weight is 0."""
        self._check_fitted()
        single = _is_scalar(items)
        items = as_id_array([items] if single else items, "items")
        k = check_int(k, "k")
        k = max(1, min(k, len(self._items) - 1))
        ids, weights = self.recommend(histories=[[i] for i in items.tolist()], k=k)
        return (ids[0], weights[0]) if single else (ids, weights)

    @property
    def item_ids_(self) -> np.ndarray:
        """The raw ids of the known items, in the order of the rows and columns of ``weights_``."""
        self._check_fitted()
        return self._items.ids

    # ------------------------------------------------------------------------------------ hooks
    def _validate_params(self, implicit):
        if not implicit:
            self._refuse_ratings(True)
        check_float(self.l2, "l2", 0.0, low_open=True)
        if not (isinstance(self.max_memory, str) and self.max_memory == "auto"):
            check_int(self.max_memory, "max_memory")
        check_bool(self.verbose, "verbose")
        return None

    def _build(self, user_rows, item_rows, tables, config):
        self._check_memory(len(self._items))
        self.weights_ = np.zeros((len(self._items),) * 2, np.float32)  # solved by _train

    def _grow_model(self, user_rows, item_rows, tables, old):
        n, n_old = len(self._items), old["item"]
        if n == n_old:
            return
        self._check_memory(n)
        # New items without interactions have a zero row and column in B (G's row is l2 e_j, so P's is too):
        # exactly what a refit would give them. partial_fit solves again anyway.
        grown = np.zeros((n, n), np.float32)
        grown[:n_old, :n_old] = self.weights_
        self.weights_ = grown

    def _forget_model(self, side, keep):
        if side == "item":
            self.weights_ = self.weights_[keep[1:]][:, keep[1:]]

    def _forget(self, side, raw):
        """EASE erases exactly: B is solved again from the interactions that remain, equal to a fit without
        the forgotten users or items."""
        n = super()._forget(side, raw)
        if n:
            indptr, items = self._seen
            X = sp.csr_matrix((np.ones(len(items)), items - 1, indptr), shape=(len(indptr) - 1, len(self._items)))
            self.weights_ = ease_weights(X, float(self.l2), self.n_threads)[0].astype(np.float32)
        return n

    def _train(self, user_rows, item_rows, y, weight, epochs, validate):
        start = time.perf_counter()
        indptr, items = self._seen
        X = sp.csr_matrix((np.ones(len(items)), items - 1, indptr), shape=(len(indptr) - 1, len(self._items)))
        B, objective = ease_weights(X, float(self.l2), self.n_threads)
        self.weights_ = B.astype(np.float32)
        del B
        seconds = time.perf_counter() - start
        self.history_["loss"].append(objective)
        self.history_["seconds"].append(seconds)
        if self.verbose:
            print(f"EASE: {X.shape[1]:,} items, {X.nnz:,} interactions, objective {objective:.6g}, {seconds:.2f} s")

    def _score_pairs(self, user_rows, item_rows):
        out = np.zeros(len(user_rows), np.float64)
        users, at = np.unique(user_rows, return_inverse=True)
        at = at.ravel()
        step = max(1, _SCORES_PER_CHUNK // max(len(self._items), 1))
        for s in range(0, len(users), step):  # each distinct user scored once, a chunk of them at a time
            scores = self._scores(self._user_bags(users[s:s + step]))
            pick = (at >= s) & (at < s + step) & (item_rows > 0)
            out[pick] = scores[at[pick] - s, item_rows[pick] - 1]
        return out

    def _topk(self, user_rows, k, exclude_seen, candidate_rows):
        return self._bag_topk(self._user_bags(user_rows), k, exclude_seen, candidate_rows)

    def _item_vectors(self):  # similar_items is overridden: B's rows are weights, not vectors to compare
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ internals
    @staticmethod
    def _refuse_ratings(ratings):
        if ratings is not None:
            raise ValueError("EASE learns from implicit feedback (which items each user interacted with); "
                             "ratings must be None: keep the positive interactions first (e.g. ratings >= 4)")

    def _check_memory(self, n_items):
        need = _BYTES_PER_ENTRY * n_items * n_items
        auto = isinstance(self.max_memory, str)
        limit = available_memory() if auto else int(self.max_memory)
        if limit is not None and need > limit:
            have = f"{_size(limit)} available" if auto else f"max_memory={self.max_memory} ({_size(limit)})"
            raise ValueError(
                f"EASE over {n_items:,} items needs about {_size(need)} for its items x items matrices (12 bytes per "
                f"entry: a float64 Gram matrix and the float32 weights), more than {have}. Keep fewer items (e.g. "
                "drop those with few interactions), use a factorisation model (fastrec.Recommender or "
                "fastrec.TwoTower, linear in the item count), or run it where that much memory is free"
                + ("" if auto else " and raise max_memory") + ".")

    def _candidates(self, items):
        if items is None:
            return np.arange(1, len(self._items) + 1, dtype=np.int32)
        c = self._items.index(as_id_array(items, "items"))
        return np.unique(c[c > 0]).astype(np.int32)

    def _bags(self, histories):
        """CSR (indptr int64, item entities int32, sorted and distinct per row) of a list of bags of raw ids."""
        if isinstance(histories, np.ndarray) and histories.ndim == 1 and histories.dtype != object:
            raise ValueError("histories must be a list of bags of item ids (one per query), e.g. [[3, 7, 2]]")
        rows = []
        for q, h in enumerate(histories):
            r = self._items.index(as_id_array(list(h), f"histories[{q}]"))
            rows.append(np.unique(r[r > 0]).astype(np.int32))
        indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        return indptr, (np.concatenate(rows) if rows else np.zeros(0, np.int32))

    def _user_bags(self, user_rows):
        """CSR of the seen items of these user entities (rows of `_seen`, already sorted and distinct)."""
        indptr, items = self._seen
        user_rows = np.asarray(user_rows, np.int64)
        starts, ends = indptr[user_rows], indptr[user_rows + 1]
        lengths = ends - starts
        at = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), items[at].astype(np.int32)

    def _scores(self, bags):
        """float32 (n_bags, n_items) scores ``X_bag B``: the core's CSR x dense product (threaded, and the same
        for any thread count: each row's sum runs over its items in order)."""
        indptr, items = bags
        n, n_items = len(indptr) - 1, len(self._items)
        if n == 0 or n_items == 0:
            return np.zeros((n, n_items), np.float32)
        X = (indptr, items - 1, np.ones(len(items), np.float32), n_items)
        return _core.forward([self.weights_], [np.zeros(n_items, np.float32)], X, "identity", "identity",
                             self._threads(), "auto")

    def _histories_topk(self, histories, k, exclude_seen, candidate_rows):
        return self._bag_topk(self._bags(histories), k, exclude_seen, candidate_rows)

    def _bag_topk(self, bags, k, exclude_seen, candidate_rows):
        """Top-k item entities of `candidate_rows` for each bag, as `RecommenderBase._topk` returns them."""
        indptr, items = bags
        n = len(indptr) - 1
        out_rows = np.full((n, k), -1, np.int32)
        out_scores = np.full((n, k), -np.inf, np.float32)
        step = max(1, _SCORES_PER_CHUNK // max(len(self._items), 1))
        all_items = len(candidate_rows) == len(self._items)
        for s in range(0, n, step):
            e = min(s + step, n)
            chunk = (indptr[s:e + 1] - indptr[s], items[indptr[s]:indptr[e]])
            scores = self._scores(chunk)
            if exclude_seen:  # -inf on each bag's own items
                rows = np.repeat(np.arange(e - s), np.diff(chunk[0]))
                scores[rows, chunk[1] - 1] = -np.inf
            if not all_items:
                scores = scores[:, candidate_rows - 1]
            top, best = _top_k(scores, k)
            out_rows[s:e] = np.where(top >= 0, candidate_rows[np.maximum(top, 0)], -1)
            out_scores[s:e] = best
        return out_rows, out_scores


def _top_k(scores, k):
    """Columns of the k largest finite entries of each row of `scores` (n, c), best first, ties to the lower
    column, and their values; -1 / -inf where a row has fewer than k finite entries. A partition finds each
    row's k-th value; only the entries at or above it are sorted."""
    n, c = scores.shape
    k_eff = min(k, c)
    top = np.full((n, k), -1, np.int64)
    best = np.full((n, k), -np.inf, np.float32)
    if n == 0 or k_eff == 0:
        return top, best
    kth = -np.partition(-scores, k_eff - 1, axis=1)[:, k_eff - 1]
    r, col = np.nonzero((scores >= kth[:, None]) & np.isfinite(scores))  # row-major: columns ascending per row
    value = scores[r, col]
    order = np.lexsort((col, -value, r))
    r, col, value = r[order], col[order], value[order]
    rank = np.arange(len(r)) - np.searchsorted(r, r)  # position within its row
    keep = rank < k_eff
    top[r[keep], rank[keep]] = col[keep]
    best[r[keep], rank[keep]] = value[keep]
    return top, best
