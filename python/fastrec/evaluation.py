"""Train/test splits of interaction logs and ranking evaluation of a fitted recommender.

Splits return sorted int64 index arrays ``(train_idx, test_idx)`` into the interaction arrays, so one split
applies to users, items, ratings and timestamps alike.

Evaluation functions take any model with ``predict(users, items) -> (n,) scores`` (for
:func:`sampled_ranking`) or ``recommend(users, k=k, exclude_seen=True) -> (items (n, k), scores (n, k))``
(for :func:`full_ranking`), users and items given as raw ids.

``random_state`` everywhere is None, an int, a ``numpy.random.Generator`` or a ``numpy.random.RandomState``.
"""

from __future__ import annotations

import numbers

import numpy as np

from fastrec._checks import as_array
from fastrec.features import as_id_array
from fastrec.metrics import _per_user

__all__ = ["full_ranking", "leave_last_out", "random_split", "sampled_ranking"]


def check_generator(random_state) -> np.random.Generator:
    """A ``numpy.random.Generator`` from None, an int, a Generator or a RandomState (which is advanced)."""
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(0, 2**31 - 1))
    if random_state is None or isinstance(random_state, np.random.Generator) or (
        isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool) and random_state >= 0
    ):
        return np.random.default_rng(random_state)
    raise ValueError(f"random_state must be None, a non-negative int, a Generator or a RandomState; "
                     f"got {random_state!r}")


def random_split(*arrays, test_size=0.2, random_state=None):
    """Split ``n`` rows at random: returns ``(train_idx, test_idx)``, sorted int64 index arrays.

    ``arrays`` is either one int ``n`` or one or more arrays of equal length ``n`` (only their length is
    used). ``test_size`` is a fraction in (0, 1) (the test set gets ``ceil(test_size * n)`` rows, as in
    scikit-learn) or an int count. Both parts must be non-empty.
    """
    if not arrays:
        raise TypeError("random_split needs n or at least one array")
    if len(arrays) == 1 and isinstance(arrays[0], numbers.Integral) and not isinstance(arrays[0], bool):
        n = int(arrays[0])
        if not 0 <= n <= np.iinfo(np.int64).max:
            raise ValueError(f"n must be >= 0 and fit int64; got {n}")
    else:
        try:
            lengths = [len(a) for a in arrays]
        except TypeError:  # a float, None, a 0-d array
            raise TypeError(f"arrays must be one int n or arrays of equal length; got {arrays!r}") from None
        if len(set(lengths)) != 1:
            raise ValueError(f"arrays have different lengths: {lengths}")
        n = lengths[0]
    if isinstance(test_size, numbers.Integral) and not isinstance(test_size, bool):
        n_test = int(test_size)
    elif isinstance(test_size, numbers.Real) and 0 < test_size < 1:
        n_test = int(np.ceil(test_size * n))
    else:
        raise ValueError(f"test_size must be a float in (0, 1) or an int; got {test_size!r}")
    if not 0 < n_test < n:
        raise ValueError(f"test_size={test_size!r} leaves {n_test} test and {n - n_test} train rows of n={n}; "
                         "both must be non-empty")
    perm = check_generator(random_state).permutation(n)
    return np.sort(perm[n_test:]).astype(np.int64), np.sort(perm[:n_test]).astype(np.int64)


def leave_last_out(users, timestamps, random_state=None):
    """Each user's latest interaction goes to test: returns ``(train_idx, test_idx)``, sorted int64.

    ``users`` (n,) raw ids, ``timestamps`` (n,) numbers. Among interactions tied at a user's latest
    timestamp one is drawn at random (seeded by ``random_state``). Users with a single interaction keep it in
    train, so every test user has history.
    """
    u = as_id_array(users, "users")
    t = as_array(timestamps, "timestamps")
    if t.ndim != 1 or t.shape[0] != u.shape[0]:
        raise ValueError(f"timestamps must have shape ({u.shape[0]},) like users; got {t.shape}")
    if not np.issubdtype(t.dtype, np.number) or t.dtype.kind == "c":
        raise TypeError(f"timestamps must be numbers; got dtype {t.dtype}")
    if np.issubdtype(t.dtype, np.floating) and np.isnan(t).any():
        raise ValueError("timestamps contain NaN")
    n = u.shape[0]
    if n == 0:
        raise ValueError("users is empty")
    _, codes = np.unique(u, return_inverse=True)
    codes = codes.ravel()
    tie_break = check_generator(random_state).random(n)
    order = np.lexsort((tie_break, t, codes))  # by user, then time, then the random draw
    sorted_codes = codes[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = sorted_codes[1:] != sorted_codes[:-1]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_codes[1:] != sorted_codes[:-1]
    is_test = np.zeros(n, dtype=bool)
    is_test[order[last & ~first]] = True  # last of its user and not also the first (single interaction)
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def _check_pairs(users, items, names):
    u = as_id_array(users, names[0])
    i = as_id_array(items, names[1])
    if u.shape != i.shape:
        raise ValueError(f"{names[0]} and {names[1]} have different lengths: {u.shape[0]} and {i.shape[0]}")
    return u, i


def _sample_negatives(rng, n_items, touched_keys, pair_users, n_negatives, user_labels):
    """``(len(pair_users), n_negatives)`` distinct item codes per row, none in touched_keys (user*n_items+item).

    Vectorised rejection sampling with a per-row exact fallback for rows that ran short (users who touched
    most items). Rows are i.i.d. uniform samples without replacement from the untouched items.
    """
    n = pair_users.shape[0]
    out = np.empty((n, n_negatives), dtype=np.int64)
    m = 2 * n_negatives + 16
    cand = rng.integers(0, n_items, size=(n, m))
    keys = pair_users[:, None] * n_items + cand
    pos = np.minimum(np.searchsorted(touched_keys, keys), max(touched_keys.size - 1, 0))
    valid = touched_keys[pos] != keys if touched_keys.size else np.ones_like(keys, dtype=bool)
    # drop repeats within a row, keeping the first occurrence (stable sort keeps column order among equals)
    order = np.argsort(cand, axis=1, kind="stable")
    s = np.take_along_axis(cand, order, axis=1)
    repeat_sorted = np.zeros_like(valid)
    repeat_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    repeat = np.empty_like(valid)
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    valid &= ~repeat
    enough = valid.sum(axis=1) >= n_negatives
    rows = np.flatnonzero(enough)
    if rows.size:
        # the first n_negatives valid columns of each row
        col_rank = np.cumsum(valid[rows], axis=1)
        take = valid[rows] & (col_rank <= n_negatives)
        out[rows] = cand[rows][take].reshape(rows.size, n_negatives)
    for r in np.flatnonzero(~enough):
        u = pair_users[r]
        lo, hi = np.searchsorted(touched_keys, [u * n_items, (u + 1) * n_items])
        free = np.setdiff1d(np.arange(n_items), touched_keys[lo:hi] - u * n_items, assume_unique=True)
        if free.size < n_negatives:
            raise ValueError(f"test user {user_labels[r].item()!r} has only {free.size} untouched items; "
                             f"n_negatives={n_negatives}")
        out[r] = rng.choice(free, size=n_negatives, replace=False)
    return out


def _predict(model, users, items, n_rows, n_cols, batch_pairs=1 << 20):
    scores = []
    for start in range(0, users.shape[0], batch_pairs):
        s = np.asarray(model.predict(users[start:start + batch_pairs], items[start:start + batch_pairs]),
                       dtype=np.float64).ravel()
        if s.shape[0] != min(batch_pairs, users.shape[0] - start):
            raise ValueError(f"model.predict returned {s.shape[0]} scores for "
                             f"{min(batch_pairs, users.shape[0] - start)} pairs")
        scores.append(s)
    scores = np.concatenate(scores).reshape(n_rows, n_cols)
    if np.isnan(scores).any():
        raise ValueError("model.predict returned NaN scores")
    return scores


def sampled_ranking(model, test_users, test_items, *, seen_users, seen_items, n_negatives=99, k=10,
                    items=None, random_state=None):
    """Rank each held-out item against ``n_negatives`` sampled items (the NCF protocol).

    For each test pair ``(u, i)`` (``test_users``, ``test_items``: (n,) raw ids), ``n_negatives`` distinct
    items are drawn uniformly from ``items`` (default: every item in ``seen_items`` or ``test_items``)
    among those ``u`` never touched: not in any ``(seen_users, seen_items)`` pair (m,) -- normally the
    training interactions -- nor in any of ``u``'s test pairs. The positive and its negatives are scored
    with ``model.predict(users, items)`` (batched, about 2**20 pairs per call). Ties count against the model:
    ``rank = #(negatives scoring >= the positive)``; a hit is ``rank < k``, its NDCG ``1 / log2(rank + 2)``.

    Returns ``{"hr@k": mean hit rate, "ndcg@k": mean NDCG, "n": number of test pairs}`` with ``k``
    substituted in the keys (e.g. ``"hr@10"``).
    """
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1; got {k!r}")
    users, candidates = sampled_candidates(test_users, test_items, seen_users=seen_users, seen_items=seen_items,
                                           n_negatives=n_negatives, items=items, random_state=random_state)
    return rank_candidates(model, users, candidates, k)


def sampled_candidates(test_users, test_items, *, seen_users, seen_items, n_negatives=99, items=None,
                       random_state=None):
    """The draw of `sampled_ranking`: (test users (n,), candidate items (n, 1 + n_negatives)), raw ids, the
    positive in column 0. Drawn once, they can be scored again as the model changes (`rank_candidates`):
    early stopping ranks the same candidates after every epoch."""
    tu, ti = _check_pairs(test_users, test_items, ("test_users", "test_items"))
    su, si = _check_pairs(seen_users, seen_items, ("seen_users", "seen_items"))
    if tu.size == 0:
        raise ValueError("test_users is empty")
    if not isinstance(n_negatives, numbers.Integral) or isinstance(n_negatives, bool) or n_negatives < 1:
        raise ValueError(f"n_negatives must be an int >= 1; got {n_negatives!r}")
    for a, b, names in ((tu, su, "test_users and seen_users"), (ti, si, "test_items and seen_items")):
        if a.size and b.size and (a.dtype.kind == "U") != (b.dtype.kind == "U"):
            raise TypeError(f"{names} hold ids of different types (int vs str)")
    if items is None:
        universe = np.unique(np.concatenate([si, ti]) if si.size else ti)
    else:
        universe = np.unique(as_id_array(items, "items"))
        if not np.all(np.isin(ti, universe)):
            raise ValueError("items must contain every test item")
    n_items = universe.size
    if n_negatives >= n_items:  # also keeps a huge n_negatives from sizing the candidate arrays
        raise ValueError(f"n_negatives={n_negatives} must be smaller than the number of items ({n_items})")

    user_ids, user_codes = np.unique(np.concatenate([tu, su]) if su.size else tu, return_inverse=True)
    user_codes = user_codes.ravel().astype(np.int64)
    tu_c, su_c = user_codes[: tu.size], user_codes[tu.size:]
    ti_c = np.searchsorted(universe, ti).astype(np.int64)
    si_c = np.searchsorted(universe, si).astype(np.int64)
    si_known = si_c < n_items
    si_known[si_known] = universe[si_c[si_known]] == si[si_known]  # seen items outside `items` never collide
    touched = np.unique(np.concatenate([tu_c * n_items + ti_c, su_c[si_known] * n_items + si_c[si_known]]))

    rng = check_generator(random_state)
    neg = _sample_negatives(rng, n_items, touched, tu_c, int(n_negatives), tu)
    cand = np.concatenate([ti_c[:, None], neg], axis=1)  # column 0: the positive
    return tu, universe[cand]


def rank_candidates(model, users, candidates, k):
    """HR@k and NDCG@k of column 0 of `candidates` (n, c) among its row, each row scored for its user by
    ``model.predict`` (ties count against the model)."""
    scores = _predict(model, np.repeat(users, candidates.shape[1]), candidates.ravel(), *candidates.shape)
    rank = np.sum(scores[:, 1:] >= scores[:, :1], axis=1)
    hit = rank < k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(ndcg.mean()), "n": int(users.size)}


def full_ranking(model, test_users, test_items, *, k=10):
    """Rank all items for each test user with ``model.recommend`` and score the top ``k``.

    Calls ``model.recommend(unique_test_users, k=k, exclude_seen=True)`` once, which must return
    ``(items (n_users, k), scores (n_users, k))`` with padding -1 (or None) where fewer than ``k`` items
    remain. The relevant items of a user are its test items (n,) pairs with ``test_users``; a test item the
    user also had in training is excluded by ``exclude_seen`` and can never be hit.

    Returns ``{"precision@k", "recall@k", "ndcg@k", "hr@k"}`` means over the test users (see
    :mod:`fastrec.metrics`), plus ``"n_users"``.
    """
    tu, ti = _check_pairs(test_users, test_items, ("test_users", "test_items"))
    if tu.size == 0:
        raise ValueError("test_users is empty")
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1; got {k!r}")
    users, codes = np.unique(tu, return_inverse=True)
    codes = codes.ravel()
    result = model.recommend(users, k=k, exclude_seen=True)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError("model.recommend must return (items, scores)")
    rec = np.asarray(result[0])
    if rec.ndim != 2 or rec.shape[0] != users.size or rec.shape[1] > k:
        raise ValueError(f"model.recommend returned items of shape {rec.shape}; expected ({users.size}, {k})")
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(users.size + 1))
    relevant = [ti[order[bounds[j]:bounds[j + 1]]] for j in range(users.size)]
    try:
        per = _per_user(rec, relevant, k)
    except TypeError as exc:  # e.g. str test_items against a model of int ids
        raise TypeError(f"test_items do not match the item ids model.recommend returned: {exc}") from None
    return {
        f"precision@{k}": float(per["precision"].mean()),
        f"recall@{k}": float(per["recall"].mean()),
        f"ndcg@{k}": float(per["ndcg"].mean()),
        f"hr@{k}": float(per["hit_rate"].mean()),
        "n_users": int(users.size),
    }
