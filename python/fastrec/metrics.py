"""Metrics for rating prediction, click probabilities and top-k recommendation lists.

Pointwise metrics take 1-D arrays of equal length ``(n,)``:

- :func:`rmse`, :func:`mae` -- ratings;
- :func:`log_loss`, :func:`roc_auc` -- binary labels in {0, 1} against probabilities / scores.

Ranking metrics compare top-k lists with the items each user actually interacted with:

- ``recommended``: ``(n_users, k_rec)`` array of item ids, best first (what ``Recommender.recommend``
  returns). Padding (fewer than ``k_rec`` items for a user) is ``-1`` for integer ids, ``None`` or ``""``
  for string ids. A row may not repeat an item.
- ``relevant``: the relevant items of each of those users, either a sequence of ``n_users``
  arrays / lists / sets of item ids, or a scipy sparse ``(n_users, n_items)`` matrix whose stored non-zero
  entries mark relevant items by column index (relevance is binary; weights are ignored).
- ``k`` (default ``k_rec``): the cut-off. Columns past ``k`` are ignored; a ``k`` larger than ``k_rec``
  counts the missing positions as misses.

Every ranking metric is the mean over users with at least one relevant item; users without relevant items
are excluded (they have no defined recall or NDCG), and a ``ValueError`` is raised if no user has any.
Per user, with ``hits`` the relevant items among the first ``k`` recommended:

- ``hit_rate_at_k``: 1 if ``hits`` is non-empty, else 0;
- ``precision_at_k``: ``|hits| / k``;
- ``recall_at_k``: ``|hits| / |relevant|``, the denominator *not* capped at ``k`` (RecBole's Recall and
  the common definition; Liang et al., "Variational Autoencoders for Collaborative Filtering", WWW 2018,
  divide by ``min(k, |relevant|)`` instead: ``recall_at_k(..., capped=True)``). Both agree whenever
  ``|relevant| <= k``, e.g. with one held-out item per user; with more relevant items than ``k`` the uncapped
  recall cannot reach 1;
- ``ndcg_at_k``: ``DCG / IDCG`` with binary gains, ``DCG = sum over hit positions p (0-based) of
  1 / log2(p + 2)`` and IDCG the DCG of ``min(k, |relevant|)`` hits at the top (scikit-learn's
  ``ndcg_score`` with binary relevance and no tied scores).
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

from fastrec._checks import as_array, check_bool, check_csr
from fastrec.features import as_id_array

__all__ = [
    "hit_rate_at_k",
    "log_loss",
    "mae",
    "ndcg_at_k",
    "precision_at_k",
    "recall_at_k",
    "rmse",
    "roc_auc",
]


# ---------------------------------------------------------------------------------------------------------
# pointwise metrics


def _check_1d_float(x, name: str) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be array-like of numbers; got {type(x).__name__}") from exc
    if a.dtype.kind not in "biuf":  # not complex, timedelta or object either
        raise TypeError(f"{name} must hold numbers; got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinity")
    return a


def _check_pair(y_true, y_pred, names=("y_true", "y_pred")):
    a = _check_1d_float(y_true, names[0])
    b = _check_1d_float(y_pred, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} have different lengths: {a.shape[0]} and {b.shape[0]}")
    return a, b


def _check_binary(y: np.ndarray, name: str) -> np.ndarray:
    if not np.all((y == 0) | (y == 1)):
        bad = np.unique(y[(y != 0) & (y != 1)])[:5]
        raise ValueError(f"{name} must hold binary labels 0/1; found {bad.tolist()}")
    return y


def rmse(y_true, y_pred) -> float:
    """Root mean squared error of ``(n,)`` predictions."""
    a, b = _check_pair(y_true, y_pred)
    with np.errstate(over="ignore"):  # errors beyond float64's range: inf, the honest answer
        d = a.astype(np.float64) - b.astype(np.float64)
        return float(np.sqrt(np.mean(d * d)))


def mae(y_true, y_pred) -> float:
    """Mean absolute error of ``(n,)`` predictions."""
    a, b = _check_pair(y_true, y_pred)
    with np.errstate(over="ignore"):  # errors beyond float64's range: inf, the honest answer
        return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def log_loss(y_true, y_prob) -> float:
    """Mean binary cross-entropy of probabilities ``y_prob`` (n,) of the label 1 against ``y_true`` in {0, 1}.

    Like scikit-learn, probabilities are clipped to ``[eps, 1 - eps]`` with ``eps`` the machine epsilon of
    ``y_prob``'s float dtype (float64 for integer input), so a confident mistake costs a large finite loss.
    Unlike scikit-learn, a ``y_true`` holding only one class is fine (the loss is still defined).
    """
    y, p = _check_pair(y_true, y_prob, ("y_true", "y_prob"))
    _check_binary(y, "y_true")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("y_prob must hold probabilities in [0, 1]")
    eps = np.finfo(p.dtype).eps
    p = np.clip(p, eps, 1 - eps).astype(np.float64)
    y = y.astype(np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve of scores ``y_score`` (n,) for binary labels ``y_true`` (n,) in {0, 1}.

    The probability that a random positive scores above a random negative, ties counting one half
    (Mann-Whitney U with average ranks). Both classes must be present.
    """
    y, s = _check_pair(y_true, y_score, ("y_true", "y_score"))
    pos = _check_binary(y, "y_true") == 1
    n_pos = int(pos.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both classes in y_true; only one is present")
    ranks = rankdata(s.astype(np.float64), method="average")
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# ---------------------------------------------------------------------------------------------------------
# ranking metrics


def _check_k(k, k_rec: int) -> int:
    if k is None:
        k = k_rec
    if not isinstance(k, numbers.Integral) or isinstance(k, bool):
        raise TypeError(f"k must be an int; got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    return int(k)


def _id_kind(a: np.ndarray, name: str) -> str:
    """'int' or 'str' for an array of item ids (after removing padding)."""
    if np.issubdtype(a.dtype, np.integer):
        return "int"
    if a.dtype.kind == "U":
        return "str"
    if a.dtype == object:
        if all(isinstance(v, str) for v in a):
            return "str"
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in a):
            return "int"
    raise TypeError(f"{name} must hold integer or string item ids; got dtype {a.dtype}")


def _hits(recommended, relevant, k):
    """Hit matrix ``(n_users, min(k, k_rec))`` (bool; positions past k_rec are misses), the number of relevant
    items per user ``(n_users,)`` and the checked ``k``."""
    rec = as_array(recommended, "recommended")
    if rec.ndim != 2:
        raise ValueError(f"recommended must be 2-D (n_users, k); got shape {rec.shape}")
    n_users, k_rec = rec.shape
    if n_users == 0:
        raise ValueError("recommended is empty (0 users)")
    if k_rec == 0 and k is None:
        raise ValueError("recommended has 0 columns: pass k to score empty lists")
    k = _check_k(k, k_rec)
    rec = rec[:, : min(k, k_rec)]

    if np.issubdtype(rec.dtype, np.integer):
        pad = rec == -1
    elif rec.dtype.kind == "U":
        pad = rec == ""
    elif rec.dtype == object:
        pad = np.frompyfunc(lambda v: v is None or (isinstance(v, str) and v == ""), 1, 1)(rec).astype(bool)
    else:
        raise TypeError(f"recommended must hold integer or string item ids; got dtype {rec.dtype}")
    rec_rows, rec_cols = np.nonzero(~pad)
    rec_items = rec[rec_rows, rec_cols]

    # relevant -> parallel arrays (user row, item id)
    if sp.issparse(relevant):
        rel = check_csr(relevant, "relevant")
        if rel.shape[0] != n_users:
            raise ValueError(f"relevant has {rel.shape[0]} rows but recommended has {n_users} users")
        rel = rel.copy()
        rel.eliminate_zeros()
        rel_users = np.repeat(np.arange(n_users), np.diff(rel.indptr))
        rel_items = rel.indices.astype(np.int64)
    else:
        if isinstance(relevant, (str, bytes)) or not hasattr(relevant, "__len__") or getattr(relevant, "ndim", 1) == 0:
            raise TypeError("relevant must be a sequence of per-user item collections or a sparse matrix")
        if len(relevant) != n_users:
            raise ValueError(f"relevant has {len(relevant)} users but recommended has {n_users}")
        parts = [as_array(list(r) if isinstance(r, (set, frozenset)) else r, "relevant").ravel() for r in relevant]
        rel_users = np.repeat(np.arange(n_users), [p.size for p in parts])
        nonempty = [as_id_array(p, "relevant") for p in parts if p.size]
        if len({p.dtype.kind for p in nonempty}) > 1:
            raise TypeError("relevant mixes integer and string item ids")
        rel_items = np.concatenate(nonempty) if nonempty else np.zeros(0, dtype=np.int64)

    if rel_items.size and rec_items.size:
        if _id_kind(rec_items, "recommended") != _id_kind(rel_items, "relevant"):
            raise TypeError("recommended and relevant hold item ids of different types (int vs str)")
        rel_items = as_id_array(rel_items, "relevant")
        rec_items = as_id_array(rec_items, "recommended")
    elif rec_items.size:
        _id_kind(rec_items, "recommended")
        rec_items = as_id_array(rec_items, "recommended")
        rel_items = rel_items.astype(rec_items.dtype)
    else:
        if rel_items.size:
            _id_kind(rel_items, "relevant")
            rel_items = as_id_array(rel_items, "relevant")
        rec_items = rec_items.astype(rel_items.dtype)
    # one code per distinct item, then one int64 key per (user, item) pair
    _, codes = np.unique(np.concatenate([rel_items, rec_items]), return_inverse=True)
    codes = codes.ravel().astype(np.int64)
    n_codes = int(codes.max()) + 1 if codes.size else 1
    rel_keys = np.unique(rel_users * n_codes + codes[: rel_items.size])
    rec_keys = rec_rows * n_codes + codes[rel_items.size :]
    n_relevant = np.bincount(rel_keys // n_codes, minlength=n_users)

    sorted_keys = np.sort(rec_keys)
    repeated = sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]]
    if repeated.size:
        raise ValueError(f"recommended repeats an item within a row (row {int(repeated.min() // n_codes)})")

    hits = np.zeros((n_users, rec.shape[1]), dtype=bool)
    pos = np.searchsorted(rel_keys, rec_keys)
    found = pos < rel_keys.size
    found[found] = rel_keys[pos[found]] == rec_keys[found]
    hits[rec_rows[found], rec_cols[found]] = True
    return hits, n_relevant, k


def _mean_over_users(values: np.ndarray, n_relevant: np.ndarray) -> float:
    keep = n_relevant > 0
    if not np.any(keep):
        raise ValueError("no user in relevant has any relevant item")
    return float(np.mean(values[keep]))


def _per_user(recommended, relevant, k=None) -> dict:
    """All four per-user ranking metrics at once: dict of ``(n_users,)`` arrays plus ``n_relevant``."""
    hits, n_rel, k = _hits(recommended, relevant, k)
    return _from_hits(hits, n_rel, k)


def _from_hits(hits: np.ndarray, n_rel: np.ndarray, k: int) -> dict:
    """The per-user metrics of a hit matrix (n_users, any width) and relevant counts (n_users,) at cut-off ``k``;
    columns past ``k`` are ignored, so one hit matrix serves every smaller cut-off."""
    hits = hits[:, :k]
    n_hits = hits.sum(axis=1)
    # Discounts of the positions that matter, not of all k: k may be far larger than any list.
    m = min(k, max(int(n_rel.max()) if n_rel.size else 0, hits.shape[1]))
    discounts = 1.0 / np.log2(np.arange(m) + 2.0)
    idcg = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(n_rel, m)]
    safe = np.maximum(n_rel, 1)
    return {
        "hit_rate": (n_hits > 0).astype(np.float64),
        "precision": n_hits / k,
        "recall": n_hits / safe,
        # Liang et al.'s recall, n_hits / min(n_rel, k): min(n_rel, m) is min(n_rel, k), and k may not fit int64
        "recall_capped": n_hits / np.maximum(np.minimum(n_rel, m), 1),
        "ndcg": (hits @ discounts[: hits.shape[1]]) / np.where(idcg > 0, idcg, 1.0),
        "n_relevant": n_rel,
    }


def hit_rate_at_k(recommended, relevant, k=None) -> float:
    """Fraction of users (with relevant items) having at least one relevant item in their top ``k``."""
    per = _per_user(recommended, relevant, k)
    return _mean_over_users(per["hit_rate"], per["n_relevant"])


def precision_at_k(recommended, relevant, k=None) -> float:
    """Mean over users (with relevant items) of ``|relevant in top k| / k``."""
    per = _per_user(recommended, relevant, k)
    return _mean_over_users(per["precision"], per["n_relevant"])


def recall_at_k(recommended, relevant, k=None, *, capped=False) -> float:
    """Mean over users (with relevant items) of ``|relevant in top k| / |relevant|``; with ``capped=True``,
    of ``|relevant in top k| / min(k, |relevant|)`` (Liang et al., WWW 2018: 1 when the top k are all relevant)."""
    check_bool(capped, "capped")
    per = _per_user(recommended, relevant, k)
    return _mean_over_users(per["recall_capped" if capped else "recall"], per["n_relevant"])


def ndcg_at_k(recommended, relevant, k=None) -> float:
    """Mean over users (with relevant items) of the binary-gain NDCG of the top ``k`` (see module doc)."""
    per = _per_user(recommended, relevant, k)
    return _mean_over_users(per["ndcg"], per["n_relevant"])
