"""`fastrec.TwoStage`: recommend by retrieving candidates with one model and re-ranking them with another.

Scoring every item with a `Recommender`'s MLP costs about 280 ms per user over 10^6 items (benchmarks/RECSYS.md);
a `TwoTower` finds a user's best few hundred items by inner product in well under a millisecond with
``index="hnsw"``. `TwoStage` chains them: the retriever's ``recommend`` gives ``n_candidates`` items per
user, their raw ids are mapped to the ranker's items (ids the ranker does not know are dropped), and the ranker
picks the k best of each user's list. For a `Recommender` ranker that last step is one call into the core
(``FieldHandle.topk_candidates``), parallel over the users of a batch, with the scores, seen-item exclusion
and tie order (lower item first) of ``Recommender.recommend``; any other fastrec recommender (a second
`TwoTower`, say) is re-ranked through its pair scores, in one vectorised pass.

Persistence: a `TwoStage` holds nothing of its own beyond ``n_candidates``. Save the two models
(``retriever.save(path)``, ``ranker.save(path)``) and build it again after ``fastrec.load``.
"""

from __future__ import annotations

import numpy as np

from fastrec._checks import NotFittedError, check_bool, check_int, sklearn_compatible
from fastrec._recbase import RecommenderBase, _is_scalar
from fastrec.features import as_id_array
from fastrec.recommender import Recommender

__all__ = ["TwoStage"]


def _in_rows(indptr, indices, rows, values):
    """Whether values[j] is in the sorted CSR row rows[j] (a seen item): a binary search per pair, run for
    all pairs at once, so only the rows asked about are read (the seen pairs may number in the billions)."""
    lo, end = indptr[rows].astype(np.int64), indptr[rows + 1].astype(np.int64)
    hi = end.copy()
    if len(indices) == 0:
        return np.zeros(len(values), bool)
    last = len(indices) - 1
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        less = indices[np.minimum(mid, last)] < values
        lo = np.where(active & less, mid + 1, lo)
        hi = np.where(active & ~less, mid, hi)
    return (lo < end) & (indices[np.minimum(lo, last)] == values)


class TwoStage:
    """Two-stage recommendation: ``retriever`` proposes ``n_candidates`` items per user, ``ranker`` re-ranks them.

    Parameters
    ----------
    retriever : fitted fastrec recommender, typically a `fastrec.TwoTower`
        Its ``recommend(users, n_candidates, exclude_seen=...)`` gives each user's candidates; with
        ``index="hnsw"`` that search is approximate (benchmarks/ANN.md).
    ranker : fitted fastrec recommender, typically a `fastrec.Recommender`
        Scores each user's candidates; the result is the ranker's top k among them, with the ranker's scores.
        Both models must have been fit on the same kind of ids (both int or both str); a candidate the ranker
        does not know is dropped.
    n_candidates : int, default=500
        Candidates retrieved per user; at least the k asked of ``recommend``. With n_candidates at least the
        number of items and an exact retriever, ``recommend`` returns what ``ranker.recommend`` does.

    A `TwoStage` has no state of its own: to persist one, save the two models and build it again from them.
    """

    def __init__(self, retriever, ranker, n_candidates=500):
        self.retriever = retriever
        self.ranker = ranker
        self.n_candidates = n_candidates
        self._check_models(fitted=False)
        check_int(n_candidates, "n_candidates")

    def __repr__(self) -> str:
        return (f"TwoStage(retriever={type(self.retriever).__name__}, ranker={type(self.ranker).__name__}, "
                f"n_candidates={self.n_candidates!r})")

    def _check_models(self, fitted: bool):
        """TypeError for a model that is no fastrec recommender; when `fitted`, NotFittedError for an unfitted
        one and ValueError when the two models know different kinds of ids."""
        for name in ("retriever", "ranker"):
            model = getattr(self, name)
            if not isinstance(model, RecommenderBase):
                raise TypeError(f"{name} must be a fastrec recommender (TwoTower, Recommender), got "
                                f"{type(model).__name__}")
            if fitted and not model.__sklearn_is_fitted__():
                raise sklearn_compatible(NotFittedError)(
                    f"{name} ({type(model).__name__}) is not fitted yet; fit it before TwoStage.recommend")
        if fitted:
            for side in ("user", "item"):
                kinds = [getattr(self, name)._entities(side).ids.dtype.kind == "U" for name in ("retriever", "ranker")]
                if kinds[0] != kinds[1]:
                    raise ValueError(f"retriever and ranker were fit on different kinds of {side} ids (retriever: "
                                     f"{'str' if kinds[0] else 'int'}, ranker: {'str' if kinds[1] else 'int'}); "
                                     "fit both on the same ids")

    def recommend(self, users, k=10, *, exclude_seen=True):
        """The k best of each user's retrieved candidates by the ranker: (item ids (n_users, k), scores
        (n_users, k)), best first, as ``ranker.recommend`` returns them (one user given as a scalar: 1-D).

        exclude_seen: each model skips the items the user interacted with in its training (the retriever does
        not propose them, the ranker does not rank them). k is capped at the ranker's number of items; a user
        with fewer than k candidates left (the ranker did not know some, or the retriever found fewer) gets
        padding: id -1 (or "" for string ids) and score -inf.
        """
        self._check_models(fitted=True)
        n_candidates = check_int(self.n_candidates, "n_candidates")
        single = _is_scalar(users)
        users = as_id_array([users] if single else users, "users")
        k = check_int(k, "k")
        check_bool(exclude_seen, "exclude_seen")
        if n_candidates < k:
            raise ValueError(f"n_candidates ({n_candidates}) must be >= k ({k}): the ranker picks k of them")
        ranker = self.ranker
        k = min(k, len(ranker._items))
        cand_ids, cand_scores = self.retriever.recommend(users, n_candidates, exclude_seen=bool(exclude_seen))
        # The candidates as a CSR of the ranker's item rows, user by user; padding (score -inf) and ids the
        # ranker does not know (row 0) are dropped.
        valid = ~np.isneginf(cand_scores)
        rows = ranker._items.index(cand_ids[valid])
        known = rows > 0
        counts = np.bincount(np.nonzero(valid)[0][known], minlength=len(users))
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        items = rows[known].astype(np.int32)
        user_rows = ranker._users.index(users)
        if isinstance(ranker, Recommender):
            idx, scores = ranker._handle().topk_candidates(ranker._sampler(negatives=0, seed=0), user_rows, indptr,
                                                           items, k, bool(exclude_seen), ranker._threads())
        else:
            idx, scores = _rerank_by_pairs(ranker, user_rows, indptr, items, k, bool(exclude_seen))
        # As RecommenderBase.recommend: raw ids, the ranker's scale (mean rating, clipping), padding.
        ids = ranker._items.ids[np.maximum(idx, 1) - 1]
        scores = scores.astype(np.float64) + ranker.rating_mean_
        missing = idx < 0
        if missing.any():
            ids = np.where(missing, "" if ids.dtype.kind == "U" else -1, ids)
            scores[missing] = -np.inf
        scores = ranker._clip(scores, padding=missing)
        if single:
            return ids[0], scores[0]
        return ids, scores


def _rerank_by_pairs(ranker, user_rows, indptr, items, k, exclude_seen):
    """Top-k over per-user candidate lists for a ranker without a core top-k (any RecommenderBase): its pair
    scores for every (user, candidate) in one call, then one sort by (user, score desc, item asc). Returns
    (item rows (n_users, k), -1 padding; scores, -inf padding)."""
    n_users = len(user_rows)
    owner = np.repeat(np.arange(n_users), np.diff(indptr))
    pair_users = user_rows[owner]
    if exclude_seen:
        fresh = ~_in_rows(*ranker._seen, pair_users, items)
        owner, pair_users, items = owner[fresh], pair_users[fresh], items[fresh]
    scores = np.asarray(ranker._score_pairs(pair_users, items), np.float64)
    order = np.lexsort((items, -scores, owner))
    owner, items, scores = owner[order], items[order], scores[order]
    first = np.searchsorted(owner, np.arange(n_users))
    rank = np.arange(len(owner)) - first[owner]
    top = rank < k
    idx = np.full((n_users, k), -1, np.int32)
    out = np.full((n_users, k), -np.inf)
    idx[owner[top], rank[top]] = items[top]
    out[owner[top], rank[top]] = scores[top]
    return idx, out
