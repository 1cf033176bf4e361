"""Two-stage recommend (issue 12): the core's top-k over per-user candidate lists (`FieldHandle.topk_candidates`)
and `fastrec.TwoStage` (retrieve with a TwoTower, re-rank with a Recommender).

What is checked, and against what:

- the core top-k over each user's own candidates against brute force (the same model's `predict` / the core's
  row-wise forward over each user's candidates, then a stable argsort: ties by lower item), with and without
  seen-item exclusion, duplicates in a list, empty lists and lists shorter than k (padding -1 / -inf), an
  exact tie, once per SIMD path;
- the same results, bitwise, for n_threads 1, 2 and 3, split over users and over item chunks of one user;
- `TwoStage.recommend` with n_candidates >= the number of items equals `Recommender.recommend` (and a TwoTower
  re-ranking itself equals its own recommend); candidates unknown to the ranker are dropped; a scalar user gives
  1-D arrays; the errors bad input raises.

Models are tiny and seeded (a few thousand interactions, 3 epochs): the file runs in seconds.
"""

import numpy as np
import pytest

import fastrec
from fastrec import _core
from fastrec._checks import NotFittedError
from fastrec.datasets import make_interactions

# topk_candidates and predict score the same pairs through different core paths (the first layer split into a
# cached item part and a user part, vs the row-wise forward), both float32: they agree to float32 rounding of
# the MLP's sums (observed ~1e-7 on scores of order 1); 1e-5 still catches a wrong row or a missing term.
SCORE_ATOL = 1e-5


# ------------------------------------------------------------------------------------------------ helpers
def _csr(lists):
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    items = np.concatenate([np.asarray(x, np.int64) for x in lists] + [np.zeros(0, np.int64)]).astype(np.int32)
    return indptr, items


def _brute_force(score, users, lists, k, seen):
    """Top-k of each user over its distinct candidates by score(user, items) (float array), seen items
    (dict user -> set, or None) skipped; stable argsort over increasing items, so ties go to the lower item."""
    items_out = np.full((len(users), k), -1, np.int32)
    scores_out = np.full((len(users), k), -np.inf)
    for row, (u, cand) in enumerate(zip(users, lists)):
        c = np.unique(np.asarray(cand, np.int64))
        if seen is not None:
            c = c[~np.isin(c, list(seen.get(int(u), ())))]
        if len(c) == 0:
            continue
        s = np.asarray(score(u, c), np.float64)
        best = np.argsort(-s, kind="stable")[:k]
        items_out[row, :len(best)], scores_out[row, :len(best)] = c[best], s[best]
    return items_out, scores_out


def _assert_same_ranking(items, scores, want_items, want_scores):
    """Same padding, scores within SCORE_ATOL, and the same items in the same order wherever the brute force
    has no near-tie (two scores within 2 * SCORE_ATOL) among its first k + 1; most rows must be clear."""
    assert np.array_equal(items < 0, want_items < 0)
    pad = want_items < 0
    assert np.isneginf(scores[pad]).all()
    np.testing.assert_allclose(scores[~pad], want_scores[~pad], atol=SCORE_ATOL, rtol=0)
    gaps = np.abs(np.diff(np.where(pad, -1e9 * np.arange(pad.shape[1]), want_scores), axis=1))
    clear = ~(gaps < 2 * SCORE_ATOL).any(axis=1)
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(items[clear], want_items[clear])


def _twin_spec(rng, n_items):
    """A two-key field model (user id, item id, an item dense block, a GMF pair; MLP 12-11-5-1, mse so scores
    are logits) in which items 3 and 7 are identical in every item-keyed table: they tie exactly, and the tie
    must go to item 3."""
    def one_hot(n):
        return np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int32), np.ones(n, np.float32)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    n_users = 9
    user, item, dense = normal(n_users, 4), normal(n_items, 5), normal(n_items, 3)
    gmf_u, gmf_v = normal(n_users, 4), normal(n_items, 4)
    for t in (item, dense, gmf_v):
        t[7] = t[3]
    sizes = [12, 11, 5, 1]
    coefs = [(rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
    intercepts = [(rng.standard_normal(b) * 0.1).astype(np.float32) for b in sizes[1:]]
    fields = [{"table": user, "bags": one_hot(n_users), "key": 0, "offset": 0},
              {"table": item, "bags": one_hot(n_items), "key": 1, "offset": 4},
              {"table": gmf_u, "bags": one_hot(n_users), "key": 0, "offset": -1},
              {"table": gmf_v, "bags": one_hot(n_items), "key": 1, "offset": -1}]
    spec = {"n_keys": 2, "width": 12, "loss": "mse", "activation": "relu", "coefs": coefs, "intercepts": intercepts,
            "fields": fields, "dense": [{"table": dense, "key": 1, "offset": 9}],
            "gmf": {"field_u": 2, "field_v": 3, "w": rng.standard_normal(4).astype(np.float32)}}
    return spec, n_users


def _seen_csr(seen, n_users):
    lists = [sorted(seen.get(u, ())) for u in range(n_users)]
    return _csr(lists)


@pytest.fixture(scope="module")
def data():
    return make_interactions(n_users=120, n_items=150, n_interactions=3000, implicit=True, random_state=3)


@pytest.fixture(scope="module")
def ranker(data):
    return fastrec.Recommender(embedding_dim=16, hidden_layer_sizes=(32, 16), epochs=3, early_stopping=False,
                               random_state=0, n_threads=1).fit(data.users, data.items)


@pytest.fixture(scope="module")
def retriever(data):
    return fastrec.TwoTower(output_dim=16, embedding_dim=16, hidden_layer_sizes=(32,), epochs=3,
                            early_stopping=False, random_state=0, n_threads=1).fit(data.users, data.items)


# ------------------------------------------------------------------------------------------------ the core
def test_core_equals_exact_brute_force_with_ties(isa):
    rng = np.random.default_rng(7)
    spec, n_users = _twin_spec(rng, 41)
    handle = _core.FieldHandle(spec, False)
    seen = {0: {3, 12}, 1: {7}, 2: set(range(41)), 4: {0, 1, 2}}
    sampler = {"negatives": 0, "user_key": 0, "item_key": 1, "n_items": 41, "cdf": None,
               "seen": _seen_csr(seen, n_users), "seed": 0}
    users = np.array([0, 1, 2, 3, 4, 5, 8, 1], np.int32)  # a repeated user too
    lists = [[7, 3, 30, 12, 0, 3],          # the twins, and a duplicate (counts once)
             [3, 7, 5, 6, 9, 11, 40, 20],   # user 1 has seen 7 but not its twin 3
             list(range(41)),               # user 2 has seen everything: all padding when excluding
             [],                            # no candidates: all padding
             [0, 1, 2, 5],                  # fewer than k left once the seen are excluded
             rng.choice(41, 20, replace=False),
             [40],
             [7, 3]]
    indptr, items = _csr(lists)

    def score(u, c):
        return _core.field_predict(spec, [np.full(len(c), u, np.int32), c.astype(np.int32)])

    for k in (1, 3, 6, 50):
        for exclude in (False, True):
            got_items, got_scores = handle.topk_candidates(sampler, users, indptr, items, k, exclude, 0, isa)
            assert got_items.dtype == np.int32 and got_items.shape == (len(users), k)
            want_items, want_scores = _brute_force(score, users, lists, k, seen if exclude else None)
            assert np.array_equal(got_items, want_items), (k, exclude)
            pad = want_items < 0
            assert np.isneginf(got_scores[pad]).all()
            np.testing.assert_allclose(got_scores[~pad], want_scores[~pad], atol=SCORE_ATOL, rtol=1e-6)
    # the twins really tie, and the lower item wins
    got, _ = handle.topk_candidates(sampler, np.array([0, 7], np.int32), *_csr([[7, 3], [3, 7]]), 2, False, 0, isa)
    assert got.tolist() == [[3, 7], [3, 7]]


def test_core_same_results_for_any_thread_count(isa):
    """Many users (split over users) and one user with a list longer than a work chunk (at most 64 * 8 * MR
    = 8192 items: split over item chunks, their best merged): bitwise the same for 1, 2 and 3 threads, and
    the ranking of the brute force."""
    rng = np.random.default_rng(11)
    n_items = 9000
    spec, n_users = _twin_spec(rng, n_items)
    handle = _core.FieldHandle(spec, False)
    sampler = {"negatives": 0, "user_key": 0, "item_key": 1, "n_items": n_items, "cdf": None, "seen": None,
               "seed": 0}

    def score(u, c):
        return _core.field_predict(spec, [np.full(len(c), u, np.int32), c.astype(np.int32)])

    many = np.arange(n_users, dtype=np.int32)
    many_lists = [rng.choice(n_items, rng.integers(0, 400), replace=False) for _ in many]
    one = np.array([4], np.int32)
    one_list = [rng.permutation(n_items)[:8500]]
    for users, lists in ((many, many_lists), (one, one_list)):
        indptr, items = _csr(lists)
        results = [handle.topk_candidates(sampler, users, indptr, items, 12, False, t, isa) for t in (1, 2, 3)]
        for got in results[1:]:
            assert np.array_equal(got[0], results[0][0]) and np.array_equal(got[1], results[0][1])
        _assert_same_ranking(*results[0], *_brute_force(score, users, lists, 12, None))


def test_core_equals_recommender_predict(ranker, data):
    """On a fitted Recommender: the top-k of each user's candidates is the stable argsort of `predict` (the
    model's probabilities) over them, with and without seen-item exclusion, padded where too few are left."""
    rng = np.random.default_rng(5)
    users = np.arange(0, 120, 3)
    lists = [rng.choice(150, rng.integers(0, 30), replace=False) for _ in users]  # raw item ids
    lists[0] = []
    lists[1] = lists[1][:2]
    seen = {}
    for u, i in zip(*ranker.seen_pairs()):
        seen.setdefault(int(u), set()).add(int(i))
    user_rows = ranker._users.index(users)
    indptr, items = _csr([ranker._items.index(np.asarray(c, np.int64)) for c in lists])
    for exclude in (False, True):
        idx, scores = ranker._handle().topk_candidates(ranker._sampler(0, 0), user_rows, indptr, items, 8, exclude, 1)
        got = np.where(idx > 0, ranker._items.ids[np.maximum(idx, 1) - 1], -1)
        want, want_scores = _brute_force(lambda u, c: ranker.predict(np.full(len(c), u), c), users, lists, 8,
                                         seen if exclude else None)
        _assert_same_ranking(got, scores.astype(np.float64), want, want_scores)
        assert (want[1] < 0).sum() >= 6 and (want[0] < 0).all()  # padding was exercised


def test_core_rejects_bad_candidate_lists(ranker):
    handle, sampler = ranker._handle(), ranker._sampler(0, 0)
    users = np.array([1, 2], np.int32)
    items = np.array([1, 2, 3], np.int32)
    with pytest.raises(ValueError, match="cand_indptr must have shape"):
        handle.topk_candidates(sampler, users, np.array([0, 3], np.int64), items, 2, False)
    with pytest.raises(ValueError, match="cand_indptr must start at 0"):
        handle.topk_candidates(sampler, users, np.array([0, 1, 2], np.int64), items, 2, False)
    with pytest.raises(ValueError, match="non-decreasing"):
        handle.topk_candidates(sampler, users, np.array([0, 4, 3], np.int64), np.arange(3, dtype=np.int32), 2, False)
    with pytest.raises(ValueError, match="cand_items must lie in"):
        handle.topk_candidates(sampler, users, np.array([0, 1, 3], np.int64), np.array([1, 2, 10**6], np.int32), 2,
                               False)
    with pytest.raises(TypeError, match="cand_items must have dtype int32"):
        handle.topk_candidates(sampler, users, np.array([0, 1, 3], np.int64), items.astype(np.int64), 2, False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        handle.topk_candidates(sampler, users, np.array([0, 1, 3], np.int64), items, 0, False)


# ------------------------------------------------------------------------------------------------ TwoStage
def test_two_stage_with_every_item_equals_recommend(retriever, ranker):
    users = np.concatenate([np.arange(120), [10**6]])  # every user and an unknown one
    for exclude in (True, False):
        ids, scores = fastrec.TwoStage(retriever, ranker, n_candidates=200).recommend(users, k=10,
                                                                                     exclude_seen=exclude)
        want_ids, want_scores = ranker.recommend(users, k=10, exclude_seen=exclude)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-12)


def test_two_stage_scalar_user_and_few_candidates(retriever, ranker):
    two = fastrec.TwoStage(retriever, ranker, n_candidates=20)
    ids, scores = two.recommend(7, k=5)
    assert ids.shape == (5,) and scores.shape == (5,)
    cand, _ = retriever.recommend(7, k=20)
    assert set(ids.tolist()) <= set(cand.tolist())
    # the ranker's order of the candidates: its own recommend restricted to them
    want_ids, want_scores = ranker.recommend(7, k=5, items=cand)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-12)
    assert fastrec.TwoStage(retriever, ranker, n_candidates=5).recommend([], k=5)[0].shape == (0, 5)


def test_candidates_unknown_to_the_ranker_are_dropped(data, retriever):
    """A ranker that never saw items 0-29: with every item retrieved the result is its own recommend, and
    with few candidates, a user whose candidates it does not know gets padding."""
    keep = data.items >= 30
    ranker = fastrec.Recommender(embedding_dim=8, hidden_layer_sizes=(16,), epochs=2, early_stopping=False,
                                 random_state=0, n_threads=1).fit(data.users[keep], data.items[keep])
    users = np.unique(data.users[keep])
    ids, _ = fastrec.TwoStage(retriever, ranker, n_candidates=150).recommend(users, k=10)
    np.testing.assert_array_equal(ids, ranker.recommend(users, k=10)[0])
    ids, scores = fastrec.TwoStage(retriever, ranker, n_candidates=10).recommend(users, k=10)
    cand, _ = retriever.recommend(users, k=10)
    n_known = (cand >= 30).sum(axis=1)
    assert np.array_equal((ids >= 0).sum(axis=1), n_known) and (n_known < 10).any()
    assert np.isneginf(scores[ids < 0]).all() and not (ids[ids >= 0] < 30).any()


def test_two_tower_reranking_itself_equals_its_recommend(retriever):
    """A ranker without a core top-k (any fastrec recommender) is re-ranked from its pair scores."""
    users = np.arange(0, 120, 2)
    for exclude in (True, False):
        ids, scores = fastrec.TwoStage(retriever, retriever, n_candidates=150).recommend(users, k=8,
                                                                                       exclude_seen=exclude)
        want_ids, want_scores = retriever.recommend(users, k=8, exclude_seen=exclude)
        _assert_same_ranking(ids, scores, want_ids, want_scores)


def test_string_ids(data):
    users, items = np.char.add("u", data.users.astype(str)), np.char.add("i", data.items.astype(str))
    small = dict(epochs=1, early_stopping=False, random_state=0, n_threads=1)
    tt = fastrec.TwoTower(output_dim=8, embedding_dim=8, hidden_layer_sizes=(8,), **small).fit(users, items)
    rec = fastrec.Recommender(embedding_dim=8, hidden_layer_sizes=(8,), **small).fit(users, items)
    ids, _ = fastrec.TwoStage(tt, rec, n_candidates=150).recommend(users[:20], k=4)
    np.testing.assert_array_equal(ids, rec.recommend(users[:20], k=4)[0])
    int_rec = fastrec.Recommender(embedding_dim=8, hidden_layer_sizes=(8,), **small).fit(data.users, data.items)
    with pytest.raises(ValueError, match="different kinds of user ids"):
        fastrec.TwoStage(tt, int_rec).recommend(users[:2])


def test_errors(retriever, ranker):
    with pytest.raises(TypeError, match="retriever must be a fastrec recommender"):
        fastrec.TwoStage("tt", ranker)
    with pytest.raises(TypeError, match="ranker must be a fastrec recommender"):
        fastrec.TwoStage(retriever, fastrec.MLPRegressor())
    for bad in (0, 2.0, True, "500"):
        with pytest.raises(ValueError, match="n_candidates must be an integer"):
            fastrec.TwoStage(retriever, ranker, n_candidates=bad)
    two = fastrec.TwoStage(retriever, ranker, n_candidates=5)
    with pytest.raises(ValueError, match=r"n_candidates \(5\) must be >= k \(6\)"):
        two.recommend([1, 2], k=6)
    with pytest.raises(ValueError, match="k must be an integer"):
        two.recommend([1, 2], k=0)
    with pytest.raises(ValueError, match="exclude_seen must be a bool"):
        two.recommend([1, 2], k=2, exclude_seen=1)
    with pytest.raises(TypeError):
        two.recommend([1.5, 2.5], k=2)
    with pytest.raises(NotFittedError, match="ranker"):
        fastrec.TwoStage(retriever, fastrec.Recommender()).recommend([1])
    with pytest.raises(NotFittedError, match="retriever"):
        fastrec.TwoStage(fastrec.TwoTower(), ranker).recommend([1])
