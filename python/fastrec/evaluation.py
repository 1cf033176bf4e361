"""Train/test splits of interaction logs and ranking evaluation of a fitted recommender.

Splits return sorted int64 index arrays ``(train_idx, test_idx)`` into the interaction arrays, so one split
applies to users, items, ratings and timestamps alike.

Evaluation functions take any model with ``predict(users, items) -> (n,) scores`` (for
:func:`sampled_ranking`) or ``recommend(users, k=k, exclude_seen=True) -> (items (n, k), scores (n, k))``
(for :func:`full_ranking`, which ranks the whole catalogue with each user's seen items excluded, and
:func:`heldout_users_ranking`, which also takes ``recommend(histories=bags, ...)``), users and items given as
raw ids. :class:`Popularity`, the most-popular baseline, has both, so it can stand beside any
model under either protocol.

``random_state`` everywhere is None, an int, a ``numpy.random.Generator`` or a ``numpy.random.RandomState``.
"""

from __future__ import annotations

import inspect
import numbers
from typing import NamedTuple

import numpy as np

from fastrec._checks import as_array, check_bool
from fastrec.features import as_id_array
from fastrec.metrics import _from_hits, _hits

__all__ = ["HeldOutUsers", "Popularity", "full_ranking", "heldout_users_ranking", "heldout_users_split",
           "leave_last_out", "random_split", "sampled_ranking"]


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


def leave_last_out(users, timestamps, random_state=None, *, validation=False):
    """Each user's latest interaction goes to test: returns ``(train_idx, test_idx)``, sorted int64.

    ``users`` (n,) raw ids, ``timestamps`` (n,) numbers. Among interactions tied at a user's latest
    timestamp one is drawn at random (seeded by ``random_state``). Users with a single interaction keep it in
    train, so every test user has history.

    validation=True: also hold out each user's previous-latest interaction (the same rule applied to the
    training part) for choosing hyper-parameters, and return ``(train_idx, validation_idx, test_idx)``: the
    protocol of the sequential-recommendation papers (SASRec), whose validation item precedes the test item.
    """
    check_bool(validation, "validation")
    if validation:
        rng = check_generator(random_state)
        train, test = leave_last_out(users, timestamps, rng)
        u, t = as_id_array(users, "users"), as_array(timestamps, "timestamps")
        inner, val = leave_last_out(u[train], t[train], rng)
        return train[inner], train[val], test
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


class HeldOutUsers(NamedTuple):
    """The parts of :func:`heldout_users_split`: sorted int64 indices into the interaction arrays."""

    train: np.ndarray
    validation_fold_in: np.ndarray
    validation_test: np.ndarray
    test_fold_in: np.ndarray
    test_test: np.ndarray


def heldout_users_split(users, items, ratings=None, *, n_heldout_users, min_rating=None, min_items=5,
                        test_fraction=0.2, random_state=None) -> HeldOutUsers:
    """The users-held-out ("strong generalization") protocol of Liang et al., "Variational Autoencoders for
    Collaborative Filtering", WWW 2018 (their code: github.com/dawenl/vae_cf), as index arrays.

    1. Interactions with ``ratings < min_rating`` are dropped (the paper keeps ratings >= 4 of MovieLens-20M:
       ``min_rating=4``), and repeats of a (user, item) pair after its first;
    2. users with fewer than ``min_items`` interactions left are dropped (the paper: 5);
    3. the users are shuffled; the last ``2 * n_heldout_users`` become held-out users, ``n_heldout_users``
       for validation then ``n_heldout_users`` for test (the paper: 10,000 each on MovieLens-20M), the rest are
       training users, all of whose interactions are ``train``;
    4. the items are those of the training users: held-out users' interactions with other items are dropped;
    5. each held-out user with at least ``min_items`` interactions left has ``floor(test_fraction * count)``
       of them, drawn at random, held out to predict (``*_test``; the paper: 20%); the others are folded in
       (``*_fold_in``: the model sees them as the user's history). A held-out user with fewer keeps all as
       fold-in and has nothing to predict.

    ``random_state`` seeds the shuffle and the draws (the paper seeds NumPy with 98765; NumPy's legacy and
    Generator streams differ, so the same seed does not give the paper's split). Returns a
    :class:`HeldOutUsers` of sorted int64 indices into ``users`` / ``items``: ``(train, validation_fold_in,
    validation_test, test_fold_in, test_test)``; dropped interactions are in none of them.
    """
    u, i = _check_pairs(users, items, ("users", "items"))
    n = u.shape[0]
    if n == 0:
        raise ValueError("users is empty")
    keep = np.ones(n, dtype=bool)
    if min_rating is not None:
        if ratings is None:
            raise ValueError("min_rating needs ratings")
        r = as_array(ratings, "ratings")
        if r.shape != (n,) or not np.issubdtype(r.dtype, np.number):
            raise ValueError(f"ratings must be ({n},) numbers like users; got shape {r.shape}, dtype {r.dtype}")
        if not isinstance(min_rating, numbers.Real) or isinstance(min_rating, bool) or not np.isfinite(min_rating):
            raise ValueError(f"min_rating must be a finite number; got {min_rating!r}")
        keep &= r >= min_rating
    elif ratings is not None:
        raise ValueError("ratings are only used with min_rating (which interactions to keep)")
    for name, value, low in (("n_heldout_users", n_heldout_users, 1), ("min_items", min_items, 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    if not (isinstance(test_fraction, numbers.Real) and not isinstance(test_fraction, bool)
            and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be a float in (0, 1); got {test_fraction!r}")
    rng = check_generator(random_state)
    _, user_codes = np.unique(u, return_inverse=True)
    _, item_codes = np.unique(i, return_inverse=True)
    user_codes, item_codes = user_codes.ravel().astype(np.int64), item_codes.ravel().astype(np.int64)
    kept = np.flatnonzero(keep)
    _, first = np.unique(user_codes[kept] * (item_codes.max() + 1) + item_codes[kept], return_index=True)
    keep[:] = False
    keep[kept[first]] = True  # each (user, item) pair once: its first occurrence
    counts = np.bincount(user_codes[keep], minlength=user_codes.max() + 1)
    keep &= counts[user_codes] >= min_items
    candidates = np.flatnonzero(counts >= min_items)  # user codes, sorted by id
    if 2 * n_heldout_users >= len(candidates):
        raise ValueError(f"n_heldout_users={n_heldout_users} leaves no training user: {len(candidates)} users "
                         f"have >= {min_items} interactions")
    shuffled = candidates[rng.permutation(len(candidates))]
    role = np.full(len(counts), -1)  # 0 train, 1 validation, 2 test
    n_train = len(candidates) - 2 * n_heldout_users
    role[shuffled[:n_train]] = 0
    role[shuffled[n_train:n_train + n_heldout_users]] = 1
    role[shuffled[n_train + n_heldout_users:]] = 2
    row_role = np.where(keep, role[user_codes], -1)
    train = np.flatnonzero(row_role == 0)
    known = np.zeros(item_codes.max() + 1, dtype=bool)
    known[item_codes[train]] = True
    parts = [train]
    for which in (1, 2):
        rows = np.flatnonzero((row_role == which) & known[item_codes])
        codes = user_codes[rows]
        order = np.lexsort((rng.random(len(rows)), codes))  # each user's rows in random order
        rows, codes = rows[order], codes[order]
        per_user = np.bincount(codes, minlength=len(counts))
        rank = np.arange(len(rows)) - np.searchsorted(codes, codes)
        n_test = np.where(per_user >= min_items, np.floor(test_fraction * per_user).astype(np.int64), 0)
        test = rank < n_test[codes]
        parts += [np.sort(rows[~test]), np.sort(rows[test])]
    return HeldOutUsers(*(p.astype(np.int64) for p in parts))


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


def _check_ks(k):
    """``k`` (an int or a non-empty sequence of ints, each >= 1) as a sorted tuple of distinct ints."""
    ks = (k,) if isinstance(k, numbers.Integral) and not isinstance(k, bool) else k
    try:
        ks = tuple(ks)
    except TypeError:
        ks = ()
    if not ks or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in ks):
        raise ValueError(f"k must be an int >= 1 or a non-empty sequence of them; got {k!r}")
    return tuple(sorted({int(v) for v in ks}))


def _group(codes, values, n_groups):
    """``values`` split by ``codes`` in 0..n_groups-1: (values sorted by code, bounds (n_groups + 1,))."""
    order = np.argsort(codes, kind="stable")
    return values[order], np.searchsorted(codes[order], np.arange(n_groups + 1))


def _without(rec, drop):
    """Each row of `rec` without its `drop` entries, kept items first in their order, padded at the end."""
    if not drop.any():
        return rec
    order = np.argsort(drop, axis=1, kind="stable")
    rec = np.take_along_axis(rec, order, axis=1)
    rec[np.arange(rec.shape[1]) >= (~drop).sum(axis=1)[:, None]] = _padding(rec.dtype)
    return rec


def _padding(dtype):
    return -1 if dtype.kind in "iu" else "" if dtype.kind == "U" else None


def full_ranking(model, test_users, test_items, *, k=(10, 20), exclude_seen=True, seen_users=None,
                 seen_items=None, batch_size=1024):
    """Rank every item the model knows for each test user and score the top ``k`` (full-catalogue protocol).

    ``test_users``, ``test_items``: (n,) raw ids of the held-out pairs. Each distinct test user is ranked
    once, in batches of ``batch_size`` users, by ``model.recommend(users, k=K, exclude_seen=exclude_seen)``,
    which must return ``(items (n_users, <= K), scores)``, best first, padded with -1 / "" / None where fewer
    than ``K`` items remain (any fastrec recommender, :class:`Popularity`, or anything with that method).
    ``K`` is ``max(k)``, plus the largest number of extra pairs of a batch's users when ``seen_users`` /
    ``seen_items`` are given.

    Protocol (the "full ranking" / "all-items" evaluation of RecBole, Zhao et al., CIKM 2021, and of Krichene
    & Rendle, KDD 2020, who show that sampled metrics such as :func:`sampled_ranking` can rank models
    inconsistently):

    - candidates: every item the model can recommend, minus each user's training items
      (``exclude_seen=True``: the model's own record of them) and minus the ``(seen_users, seen_items)``
      pairs (m,) when given -- e.g. a validation split, which RecBole also masks at test time, or the
      training pairs of a model that does not keep them;
    - relevant items of a user: its test items, kept as they are (RecBole's choice). A test item that is
      also one of the user's excluded items can never be recommended and counts as a miss, as does a test
      item unknown to the model (never among its candidates). Splits whose test pairs are not training pairs
      (:func:`leave_last_out` or :func:`random_split` on de-duplicated interactions) never meet the first;
    - per user, with ``hits`` the relevant items among the top ``k`` (binary relevance, see
      :mod:`fastrec.metrics`): ``hr@k`` 1 if any hit; ``recall@k`` ``|hits| / |relevant|`` (RecBole's
      Recall; Liang et al., WWW 2018, divide by ``min(k, |relevant|)`` -- the same with one test item per
      user); ``ndcg@k`` ``sum 1/log2(p + 2)`` over hit positions ``p`` divided by the DCG of
      ``min(k, |relevant|)`` hits at the top; ``precision@k`` ``|hits| / k``;
    - each metric is the mean over test users with at least one relevant item, which is every distinct test
      user (each has a test pair), unknown users included (the model decides what they get).

    Returns ``{"precision@k", "recall@k", "ndcg@k", "hr@k"}`` for each ``k`` (an int or a sequence of
    ints; ``k`` beyond the catalogue counts the missing positions as misses), plus ``"n_users"``.
    """
    ks = _check_ks(k)
    if not isinstance(exclude_seen, (bool, np.bool_)):
        raise ValueError(f"exclude_seen must be a bool; got {exclude_seen!r}")
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    if (seen_users is None) != (seen_items is None):
        raise ValueError("seen_users and seen_items must be given together")
    tu, ti = _check_pairs(test_users, test_items, ("test_users", "test_items"))
    if tu.size == 0:
        raise ValueError("test_users is empty")
    max_k = ks[-1]
    users, codes = np.unique(tu, return_inverse=True)
    codes = codes.ravel()
    rel_sorted, rel_bounds = _group(codes, ti, users.size)

    extra = None
    if seen_users is not None:
        su, si = _check_pairs(seen_users, seen_items, ("seen_users", "seen_items"))
        if su.size and (su.dtype.kind == "U") != (tu.dtype.kind == "U"):
            raise TypeError("test_users and seen_users hold ids of different types (int vs str)")
        pos = np.minimum(np.searchsorted(users, su), users.size - 1)
        mine = users[pos] == su  # seen pairs of test users only
        extra = _group(pos[mine], si[mine], users.size)
        n_extra = np.diff(extra[1])

    sums = {(name, kk): 0.0 for kk in ks for name in ("precision", "recall", "ndcg", "hit_rate")}
    n_scored = 0
    for start in range(0, users.size, int(batch_size)):
        stop = min(start + int(batch_size), users.size)
        request = max_k + (int(n_extra[start:stop].max()) if extra is not None else 0)
        result = model.recommend(users[start:stop], k=request, exclude_seen=bool(exclude_seen))
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError("model.recommend must return (items, scores)")
        rec = np.asarray(result[0])
        if rec.ndim != 2 or rec.shape[0] != stop - start or rec.shape[1] > request:
            raise ValueError(f"model.recommend returned items of shape {rec.shape}; expected "
                             f"({stop - start}, <= {request})")
        if extra is not None and rec.size:
            drop = np.zeros(rec.shape, dtype=bool)
            for r in np.flatnonzero(n_extra[start:stop]):
                lo, hi = extra[1][start + r], extra[1][start + r + 1]
                drop[r] = np.isin(rec[r], extra[0][lo:hi])
            rec = _without(rec, drop)
        rec = rec[:, :max_k]
        relevant = [rel_sorted[rel_bounds[j]:rel_bounds[j + 1]] for j in range(start, stop)]
        try:
            hits, n_rel, _ = _hits(rec, relevant, max_k)
        except TypeError as exc:  # e.g. str test_items against a model of int ids
            raise TypeError(f"test_items do not match the item ids model.recommend returned: {exc}") from None
        keep = n_rel > 0
        n_scored += int(keep.sum())
        for kk in ks:
            per = _from_hits(hits, n_rel, kk)
            for name in ("precision", "recall", "ndcg", "hit_rate"):
                sums[name, kk] += float(per[name][keep].sum())
    out = {}
    for kk in ks:
        out[f"precision@{kk}"] = sums["precision", kk] / n_scored
        out[f"recall@{kk}"] = sums["recall", kk] / n_scored
        out[f"ndcg@{kk}"] = sums["ndcg", kk] / n_scored
        out[f"hr@{kk}"] = sums["hit_rate", kk] / n_scored
    out["n_users"] = n_scored
    return out


def heldout_users_ranking(model, fold_in_users, fold_in_items, test_users, test_items, *, k=(20, 50, 100),
                          fold_in="auto", batch_size=1024):
    """Recall@k and NDCG@k of held-out users as Liang et al. (WWW 2018) define them (see
    :func:`heldout_users_split`).

    Each user of ``test_users`` (raw ids; the users with held-out pairs) is ranked over the whole catalogue with
    their fold-in items (``fold_in_users``, ``fold_in_items``) excluded, and scored against their held-out
    items ``test_items``. How the model sees the fold-in items:

    - ``fold_in="histories"``: as a bag, ``model.recommend(histories=[bag, ...], k=K, exclude_seen=True)``
      (EASE and the autoencoders, which score a bag directly: the model never trained on these users);
    - ``fold_in="users"``: as training data, ``model.recommend(users, k=K, exclude_seen=True)``: the model was
      fit with the fold-in pairs (a factorisation needs a user's interactions in training to have a vector for
      them). Fold-in items the model still returns are dropped from its lists;
    - ``"auto"``: "histories" when ``model.recommend`` takes ``histories``, else "users".

    Per user, with ``hits`` the held-out items among the top k and ``n`` the number of held-out items:
    ``recall@k = |hits| / min(k, n)`` (the paper's Recall@R: 1 when the top k are all held-out items, unlike
    :func:`full_ranking`'s ``|hits| / n``) and ``ndcg@k = DCG / IDCG``, ``DCG = sum over hit positions p
    (0-based) of 1 / log2(p + 2)``, IDCG the DCG of ``min(k, n)`` hits at the top. Means over the test users
    with at least one held-out item. Returns ``{"recall@k", "ndcg@k"}`` for each k, and ``"n_users"``.
    """
    ks = _check_ks(k)
    if fold_in not in ("auto", "histories", "users"):
        raise ValueError(f"fold_in must be 'auto', 'histories' or 'users'; got {fold_in!r}")
    if fold_in == "auto":
        fold_in = "histories" if "histories" in inspect.signature(model.recommend).parameters else "users"
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    tu, ti = _check_pairs(test_users, test_items, ("test_users", "test_items"))
    fu, fi = _check_pairs(fold_in_users, fold_in_items, ("fold_in_users", "fold_in_items"))
    if tu.size == 0:
        raise ValueError("test_users is empty")
    if fu.size and (fu.dtype.kind == "U") != (tu.dtype.kind == "U"):
        raise TypeError("test_users and fold_in_users hold ids of different types (int vs str)")
    users, codes = np.unique(tu, return_inverse=True)
    rel_sorted, rel_bounds = _group(codes.ravel(), ti, users.size)
    pos = np.minimum(np.searchsorted(users, fu), users.size - 1)
    mine = users[pos] == fu
    bag_sorted, bag_bounds = _group(pos[mine], fi[mine], users.size)
    max_k = ks[-1]
    sums = {(name, kk): 0.0 for kk in ks for name in ("recall", "ndcg")}
    n_scored = 0
    for start in range(0, users.size, int(batch_size)):
        stop = min(start + int(batch_size), users.size)
        bags = [bag_sorted[bag_bounds[j]:bag_bounds[j + 1]] for j in range(start, stop)]
        if fold_in == "histories":
            rec = np.asarray(model.recommend(histories=[b.tolist() for b in bags], k=max_k, exclude_seen=True)[0])
        else:
            extra = max(len(b) for b in bags)
            rec = np.asarray(model.recommend(users[start:stop], k=max_k + extra, exclude_seen=True)[0])
            drop = np.array([np.isin(rec[r], bags[r]) for r in range(len(bags))]).reshape(rec.shape)
            rec = _without(rec, drop)
        rec = rec[:, :max_k]
        relevant = [rel_sorted[rel_bounds[j]:rel_bounds[j + 1]] for j in range(start, stop)]
        hits, n_rel, _ = _hits(rec, relevant, max_k)
        keep = n_rel > 0
        n_scored += int(keep.sum())
        for kk in ks:
            per = _from_hits(hits, n_rel, kk)
            sums["recall", kk] += float(per["recall_capped"][keep].sum())
            sums["ndcg", kk] += float(per["ndcg"][keep].sum())
    out = {}
    for kk in ks:
        out[f"recall@{kk}"] = sums["recall", kk] / n_scored
        out[f"ndcg@{kk}"] = sums["ndcg", kk] / n_scored
    out["n_users"] = n_scored
    return out


class Popularity:
    """Most-popular baseline for both protocols: every user gets the items with the most training
    interactions, best first (ties by ascending item id), the user's own training items excluded.

    ``fit(users, items)`` counts the interactions (n,) per item; ``predict(users, items)`` returns those counts
    (0 for unknown items) as scores, for :func:`sampled_ranking`; ``recommend(users, k, exclude_seen=True)``
    ranks all items seen in fit as ``fastrec.Recommender.recommend`` does (k capped at the number of items,
    padding -1 / "" with score -inf when fewer remain; unknown users get the global ranking), for
    :func:`full_ranking`.
    """

    def fit(self, users, items):
        u, i = _check_pairs(users, items, ("users", "items"))
        if u.size == 0:
            raise ValueError("users is empty")
        ids, item_codes, counts = np.unique(i, return_inverse=True, return_counts=True)
        order = np.argsort(-counts, kind="stable")  # most interactions first, then the smaller id
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        self.items_, self.counts_ = ids[order], counts[order].astype(np.float64)
        self.users_, user_codes = np.unique(u, return_inverse=True)
        keys = np.unique(user_codes.ravel().astype(np.int64) * ids.size + rank[item_codes.ravel()])
        self._seen_keys = keys
        self._seen_bounds = np.searchsorted(keys, np.arange(self.users_.size + 1) * ids.size)
        return self

    def _check_fitted(self):
        if not hasattr(self, "items_"):
            raise ValueError("this Popularity is not fitted yet: call fit(users, items) first")

    def _codes(self, values, ids):
        """Positions of ``values`` in the sorted ``ids`` and whether each is there."""
        if values.size == 0 or (values.dtype.kind == "U") != (ids.dtype.kind == "U"):
            return np.zeros(values.size, dtype=np.int64), np.zeros(values.size, dtype=bool)
        pos = np.minimum(np.searchsorted(ids, values), ids.size - 1)
        return pos, ids[pos] == values

    def seen_pairs(self):
        """The distinct (user ids, item ids) pairs counted in fit: what ``recommend`` excludes by default."""
        self._check_fitted()
        n = self.items_.size
        return self.users_[self._seen_keys // n], self.items_[self._seen_keys % n]

    def predict(self, users, items):
        self._check_fitted()
        _, i = _check_pairs(users, items, ("users", "items"))
        order = np.argsort(self.items_, kind="stable")
        pos, known = self._codes(i, self.items_[order])
        return np.where(known, self.counts_[order][pos], 0.0)

    def recommend(self, users, k=10, *, exclude_seen=True):
        self._check_fitted()
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1; got {k!r}")
        u = as_id_array(users, "users")
        n_items = self.items_.size
        k = min(int(k), n_items)
        code, known = self._codes(u, self.users_)
        n_seen = np.where(known, np.diff(self._seen_bounds)[code], 0) if exclude_seen else np.zeros(u.size, int)
        out_items = np.empty((u.size, k), dtype=self.items_.dtype)
        out_scores = np.empty((u.size, k), dtype=np.float64)
        for start in range(0, u.size, 1024):
            rows = slice(start, min(start + 1024, u.size))
            m = min(n_items, k + int(n_seen[rows].max(initial=0)))
            keys = code[rows, None] * n_items + np.arange(m)
            pos = np.minimum(np.searchsorted(self._seen_keys, keys), self._seen_keys.size - 1)
            drop = (self._seen_keys[pos] == keys) & (n_seen[rows] > 0)[:, None]
            top = np.argsort(drop, axis=1, kind="stable")[:, :k]  # unseen ranks first, in order
            missing = np.arange(k) >= (~drop).sum(axis=1)[:, None]
            out_items[rows] = np.where(missing, _padding(self.items_.dtype), self.items_[top])
            out_scores[rows] = np.where(missing, -np.inf, self.counts_[top])
        return out_items, out_scores
