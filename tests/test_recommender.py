"""Tests of the public `fastrec.Recommender` API (issue 3).

What is checked, and against what:

- learning: explicit ratings beat the global-mean baseline, implicit feedback beats popularity in
  `fastrec.evaluation.sampled_ranking`, and training items outrank unseen ones (planted data of
  `fastrec.datasets.make_interactions`);
- `predict` against the NumPy oracle `fastrec.reference.field_predict` in float64, on the model's own spec;
- `recommend` against brute-force `predict` over every (user, item) pair;
- unknown ids, cold items known only by their features, and the "unknown" rows trained by id dropout;
- determinism across thread counts, pickling, `similar_items`, and the errors bad input raises.

Everything is seeded. Models are tiny (<= 9000 interactions, <= 10 epochs) so the file runs in seconds;
training uses n_threads=1 except where the thread count is what is tested (on a loaded 2-core machine an
oversubscribed OpenMP team can be far slower than one thread).
"""

import pickle

import numpy as np
import pytest

import fastrec
from fastrec import reference
from fastrec._checks import NotFittedError
from fastrec.datasets import make_interactions
from fastrec.evaluation import leave_last_out, random_split, sampled_ranking
from fastrec.features import FeatureTable

# recommend() and predict() score the same pairs through different core paths (blocked top-k vs row-wise
# forward), both float32; observed differences are ~2e-7 on scores of order 1-5, so 1e-5 is a safe bound
# that still catches any real mismatch (a wrong row or a missing term moves a score by >= 1e-3).
SCORE_ATOL = 1e-5


def _oracle_predict(rec, users, items):
    """fastrec.reference.field_predict in float64 on the fitted model's arrays (without rating_mean_)."""
    spec = reference.float64_copy(rec.net_.spec(rec._bags, rec._dense_tables))
    keys = [rec._users.index(np.asarray(users)), rec._items.index(np.asarray(items))]
    return reference.field_predict(spec, keys)


def _seen_sets(users, items):
    seen = {}
    for u, i in zip(users.tolist(), items.tolist()):
        seen.setdefault(u, set()).add(i)
    return seen


# ------------------------------------------------------------------------------------------------ fixtures
def _at_most_per_user(d, cap):
    """The interactions of d keeping each user's first `cap` events: make_interactions' log-normal activity
    gives some users nearly every item, and top-k over unseen items needs k of them left."""
    rank = np.zeros(len(d), np.int64)
    order = np.argsort(d.users, kind="stable")
    starts = np.searchsorted(d.users[order], d.users[order])
    rank[order] = np.arange(len(d)) - starts
    return d.subset(np.flatnonzero(rank < cap))


@pytest.fixture(scope="module")
def explicit_data():
    # 80 users x 60 items, at most 30 ratings per user: every user leaves >= 25 items unseen, so top-k over
    # unseen items is never padded (see the padding test).
    return _at_most_per_user(make_interactions(80, 60, 1200, random_state=3), 30)


@pytest.fixture(scope="module")
def explicit_model(explicit_data):
    """Explicit ratings with every kind of side feature (categorical user segment, multi-hot genres,
    numeric year), plus 5 cold items that exist only in the item feature table."""
    d = explicit_data
    cold = np.array([55, 56, 57, 58, 59])
    keep = ~np.isin(d.items, cold)
    rec = fastrec.Recommender(early_stopping=False, embedding_dim=8, hidden_layer_sizes=(16, 8), epochs=4, learning_rate=1e-2,
                              id_dropout=0.1, random_state=0, n_threads=1)
    rec.fit(d.users[keep], d.items[keep], d.ratings[keep], user_features=d.user_features,
            item_features=d.item_features)
    rec.cold_items_for_test = cold  # not an attribute of the API; just carried along
    rec.train_pairs_for_test = (d.users[keep], d.items[keep])
    return rec


@pytest.fixture(scope="module")
def implicit_model():
    d = _at_most_per_user(make_interactions(80, 60, 1000, implicit=True, random_state=4), 30)
    rec = fastrec.Recommender(early_stopping=False, embedding_dim=8, hidden_layer_sizes=(16,), epochs=3, learning_rate=1e-2,
                              random_state=1, n_threads=1)
    rec.fit(d.users, d.items)
    rec.train_pairs_for_test = (d.users, d.items)
    return rec


# ------------------------------------------------------------------------------------------------ learning
def test_explicit_ratings_beat_global_mean():
    d = make_interactions(200, 100, 4000, random_state=0)
    train, test = random_split(len(d), test_size=0.2, random_state=0)
    rec = fastrec.Recommender(early_stopping=False, epochs=10, learning_rate=3e-3, random_state=0, n_threads=1)
    rec.fit(d.users[train], d.items[train], d.ratings[train])
    pred = rec.predict(d.users[test], d.items[test])
    rmse = np.sqrt(np.mean((pred - d.ratings[test]) ** 2))
    baseline = np.sqrt(np.mean((d.ratings[train].mean() - d.ratings[test]) ** 2))
    # Observed 0.88 vs 1.08 (ratio 0.82). The planted a_ui term has std ~1 against noise 0.5 plus
    # rounding, so a model that learns nothing sits at ratio ~1; 0.9 leaves room for seed-level wobble.
    assert rmse < 0.9 * baseline, (rmse, baseline)
    assert rec.rating_mean_ == pytest.approx(float(np.mean(d.ratings[train])), rel=1e-6)
    assert len(rec.loss_curve_) == 10 and rec.loss_curve_[-1] < 0.7 * rec.loss_curve_[0]


@pytest.fixture(scope="module")
def implicit_split():
    d = make_interactions(300, 400, 6000, implicit=True, random_state=1)
    train, test = leave_last_out(d.users, d.timestamps, random_state=0)
    rec = fastrec.Recommender(early_stopping=False, epochs=10, learning_rate=3e-3, random_state=0, n_threads=1)
    rec.fit(d.users[train], d.items[train])
    return d, train, test, rec


class _Popularity:
    def __init__(self, items, n_items):
        self.counts = np.bincount(items, minlength=n_items).astype(np.float64)

    def predict(self, users, items):
        return self.counts[items]


def test_implicit_hit_rate_beats_popularity(implicit_split):
    d, train, test, rec = implicit_split
    kw = dict(seen_users=d.users[train], seen_items=d.items[train], n_negatives=50, k=10, random_state=0)
    model = sampled_ranking(rec, d.users[test], d.items[test], **kw)
    pop = sampled_ranking(_Popularity(d.items[train], 400), d.users[test], d.items[test], **kw)
    # Observed HR@10 0.74 vs popularity 0.47 over 293 test users (std error of each ~0.03): a margin of
    # 0.1 is > 3 standard errors yet far below what the model achieves.
    assert model["hr@10"] > pop["hr@10"] + 0.1, (model, pop)
    assert model["ndcg@10"] > pop["ndcg@10"], (model, pop)


def test_implicit_ranks_training_items_above_unseen(implicit_split):
    d, train, _, rec = implicit_split
    users, items = d.users[train], d.items[train]
    rng = np.random.default_rng(0)
    other = rng.integers(0, 400, users.size)
    seen = set(zip(users.tolist(), items.tolist()))
    unseen = np.array([(u, j) not in seen for u, j in zip(users.tolist(), other.tolist())])
    pos = rec.predict(users[unseen], items[unseen])
    neg = rec.predict(users[unseen], other[unseen])
    assert np.all((pos > 0) & (pos < 1)) and np.all((neg > 0) & (neg < 1))  # bce: probabilities
    # AUC-like: a positive beats a random unseen item of the same user. Observed 0.96; chance is 0.5.
    assert np.mean(pos > neg) > 0.85


# ------------------------------------------------------------------------------------------------ oracle
@pytest.mark.parametrize("which", ["explicit_model", "implicit_model"])
def test_predict_matches_reference_oracle(which, request):
    rec = request.getfixturevalue(which)
    users = np.repeat(np.concatenate([np.arange(80), [-1, 10**6]]), 62)  # unknown users too
    items = np.tile(np.concatenate([np.arange(60), [-1, 10**6]]), 82)  # cold and unknown items too
    expected = _oracle_predict(rec, users, items)
    got = rec.predict(users, items) - rec.rating_mean_
    if rec.rating_range_ is not None:  # explicit: predictions are clipped to the training range
        expected = np.clip(expected, rec.rating_range_[0] - rec.rating_mean_, rec.rating_range_[1] - rec.rating_mean_)
    # float32 core vs float64 oracle through a 3-layer MLP of width <= 56: |error| observed ~1e-7 on
    # outputs of order 0.1-1; 1e-5 absolute + 1e-4 relative is the project's float32-vs-oracle bound.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.ptp(expected) > 1e-2  # the comparison is not between constants


# ------------------------------------------------------------------------------------------------ recommend
def _check_top_k(rec, user, ids, scores, candidates, exclude, k):
    """ids/scores of one user are a correct top-k of the candidates minus `exclude`, by brute force."""
    pool = np.array(sorted(set(candidates.tolist()) - set(exclude)))
    assert len(pool) >= k
    brute = rec.predict(np.full(pool.size, user), pool)
    order = np.argsort(-brute, kind="stable")  # higher first, ties to the lower item id (= entity index)
    assert ids.shape == (k,) and scores.shape == (k,)
    assert len(set(ids.tolist())) == k and set(ids.tolist()) <= set(pool.tolist())
    assert np.all(np.diff(scores) <= SCORE_ATOL)
    # each returned score is that item's predicted score, and they are the k best scores available
    np.testing.assert_allclose(scores, brute[np.searchsorted(pool, ids)], atol=SCORE_ATOL, rtol=0)
    np.testing.assert_allclose(scores, brute[order[:k]], atol=SCORE_ATOL, rtol=0)
    # where no near-tie straddles the cut, the set is determined; where none straddles a position, the order
    sorted_brute = brute[order]
    if k < pool.size and sorted_brute[k - 1] - sorted_brute[k] > 2 * SCORE_ATOL:
        assert set(ids.tolist()) == set(pool[order[:k]].tolist())
    # clear[j]: position j is separated from both neighbours (the ends count as separated)
    gaps = np.concatenate([[True], np.abs(np.diff(sorted_brute)) > 2 * SCORE_ATOL, [True]])
    clear = gaps[:-1] & gaps[1:]
    assert clear[:k].mean() > 0.5  # the order check below is not vacuous
    for j in np.flatnonzero(clear[:k]):
        assert ids[j] == pool[order[j]]


def test_recommend_equals_brute_force(explicit_model):
    rec = explicit_model
    seen = _seen_sets(*rec.train_pairs_for_test)
    users = np.concatenate([np.arange(80), [10**6]])  # every user and one unknown
    all_items = np.arange(60)
    assert max(len(s) for s in seen.values()) <= 60 - 10
    ids, scores = rec.recommend(users, k=7)
    assert ids.shape == (81, 7) and scores.shape == (81, 7) and np.all(np.isfinite(scores))
    for row, u in enumerate(users.tolist()):
        _check_top_k(rec, u, ids[row], scores[row], all_items, seen.get(u, set()), 7)


def test_recommend_matches_reference_topk(implicit_model):
    """field_topk of the oracle (float64 brute force + stable argsort) on the model's spec."""
    rec = implicit_model
    users = np.arange(80)
    ids, scores = rec.recommend(users, k=5)
    spec = reference.float64_copy(rec.net_.spec(rec._bags, rec._dense_tables))
    candidates = np.arange(1, rec.n_items_ + 1, dtype=np.int32)  # entity numbers of the known items
    ref_idx, ref_scores = reference.field_topk(spec, rec._sampler(0, 0), rec._users.index(users), candidates, 5,
                                               True)
    assert np.all(ref_idx > 0)
    np.testing.assert_allclose(scores, ref_scores, atol=SCORE_ATOL, rtol=0)
    # rows without a near-tie inside the top 5 must agree on the order too (observed: all 80 rows)
    clear = ~(np.abs(np.diff(ref_scores, axis=1)) < 2 * SCORE_ATOL).any(axis=1)
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(ids[clear], rec._items.ids[ref_idx[clear] - 1])


def test_recommend_without_exclusion_returns_seen_items(explicit_model):
    rec = explicit_model
    seen = _seen_sets(*rec.train_pairs_for_test)
    ids, scores = rec.recommend(np.arange(80), k=60, exclude_seen=False)
    assert ids.shape == (80, 60)
    for row in range(80):
        assert set(ids[row].tolist()) == set(range(60))  # every item, seen or not
        _check_top_k(rec, row, ids[row], scores[row], np.arange(60), set(), 60)
    # and with exclusion the seen ones are gone
    ids_ex, _ = rec.recommend(np.arange(80), k=10)
    assert not any(set(ids_ex[row].tolist()) & seen[row] for row in range(80))
    assert any(set(ids[row, :10].tolist()) & seen[row] for row in range(80))


def test_recommend_candidate_subset(explicit_model):
    rec = explicit_model
    seen = _seen_sets(*rec.train_pairs_for_test)
    candidates = np.array([3, 17, 42, 8, 29, 11, 50, 1, 57, 33, 21, 4, 45])  # 57 is a cold item
    with_unknown = np.concatenate([candidates, [10**6, -5]])  # unknown candidates are ignored
    for u in (0, 5, 40, 79):
        unseen = [c for c in candidates.tolist() if c not in seen[u]]
        k = min(3, len(unseen))
        ids, scores = rec.recommend(u, k=k, items=with_unknown)
        _check_top_k(rec, u, ids, scores, candidates, seen[u], k)
        # without exclusion: k larger than the candidate set is capped at the number of known candidates
        ids_all, scores_all = rec.recommend(u, k=100, items=with_unknown, exclude_seen=False)
        assert ids_all.shape == (13,) and set(ids_all.tolist()) == set(candidates.tolist())
        _check_top_k(rec, u, ids_all, scores_all, candidates, set(), 13)


def test_recommend_k_larger_than_catalogue_is_capped(implicit_model):
    rec = implicit_model
    ids, scores = rec.recommend([0, 1], k=1000, exclude_seen=False)
    assert ids.shape == (2, rec.n_items_) and scores.shape == (2, rec.n_items_)


def test_recommend_single_user_returns_1d(explicit_model):
    rec = explicit_model
    ids, scores = rec.recommend(7, k=4)
    assert ids.shape == (4,) and scores.shape == (4,)
    many_ids, many_scores = rec.recommend([7], k=4)
    assert many_ids.shape == (1, 4)
    np.testing.assert_array_equal(ids, many_ids[0])
    np.testing.assert_array_equal(scores, many_scores[0])
    ids_np, _ = rec.recommend(np.int64(7), k=4)  # a NumPy scalar is a single user too
    np.testing.assert_array_equal(ids_np, ids)


def test_recommend_never_returns_seen_or_foreign_items_when_padding(explicit_model):
    rec = explicit_model
    seen = _seen_sets(*rec.train_pairs_for_test)
    user = 0
    seen_items = sorted(seen[user])[:3]
    assert 0 not in seen_items[1:] and seen_items[-1] != 0
    ids, scores = rec.recommend(user, k=3, items=seen_items[1:] + [10**6])  # every known candidate is seen
    # the padding slots (score -inf) must not name an item the user has seen or that was not a candidate
    real = [i for i in ids.tolist() if i in set(range(60))]
    assert not (set(real) & seen[user])
    assert set(real) <= set(seen_items[1:])
    assert (ids == -1).all() and np.isneginf(scores).all()  # documented padding


# ------------------------------------------------------------------------------------------------ string ids
def test_string_ids_give_the_same_model_as_order_preserving_int_ids():
    """Zero-padded strings sort like the ints they encode, so entity numbers, initialisation and every
    training step coincide: the string-id model must be bitwise the int-id model."""
    d = make_interactions(50, 40, 600, random_state=7)
    su = np.array([f"u{u:03d}" for u in d.users])
    si = np.array([f"i{i:03d}" for i in d.items])
    ft = d.item_features
    str_features = FeatureTable(np.array([f"i{i:03d}" for i in ft.ids]), multi_hot=ft.multi_hot, numeric=ft.numeric)
    kw = dict(early_stopping=False, embedding_dim=8, hidden_layer_sizes=(8,), epochs=2, random_state=5, n_threads=1)
    rec_int = fastrec.Recommender(**kw).fit(d.users, d.items, d.ratings, item_features=ft)
    rec_str = fastrec.Recommender(**kw).fit(su, si, d.ratings, item_features=str_features)
    np.testing.assert_array_equal(rec_str.predict(su, si), rec_int.predict(d.users, d.items))
    ids_str, scores_str = rec_str.recommend(["u001", "u017"], k=5)
    ids_int, scores_int = rec_int.recommend([1, 17], k=5)
    assert ids_str.dtype.kind == "U"
    np.testing.assert_array_equal(ids_str, np.array([[f"i{i:03d}" for i in row] for row in ids_int]))
    np.testing.assert_array_equal(scores_str, scores_int)
    sim_str, _ = rec_str.similar_items("i003", k=3)
    sim_int, _ = rec_int.similar_items(3, k=3)
    np.testing.assert_array_equal(sim_str, [f"i{i:03d}" for i in sim_int])
    # int ids on a string model are converted ("1"), here unknown ids: a warning, not an error
    with pytest.warns(UserWarning, match="fit with string ids and are queried with integer ids"):
        assert np.all(np.isfinite(rec_str.predict([1, 2], [3, 4])))


# ------------------------------------------------------------------------------------------------ unknown / cold
def test_unknown_ids_never_raise_and_share_the_unknown_row(explicit_model):
    rec = explicit_model
    p = rec.predict([10**6, -3, 5, 10**7], [4, 4, 10**6, 10**8])
    assert p.shape == (4,) and np.all(np.isfinite(p))
    assert p[0] == p[1]  # two unknown users read the same row, and have no features
    with pytest.warns(UserWarning, match="queried with string ids, some of which are not integers"):
        p_str = rec.predict(["nobody", "x"], ["nothing", "y"])  # strings on an int model: unknown
    assert np.all(np.isfinite(p_str)) and p_str[0] == p_str[1]
    ids_a, scores_a = rec.recommend(10**6, k=5)
    ids_b, scores_b = rec.recommend(-42, k=5)
    assert np.all(np.isfinite(scores_a))
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(scores_a, scores_b)
    assert rec.predict([], []).shape == (0,)


def test_cold_items_are_scored_from_their_features(explicit_model, explicit_data):
    rec = explicit_model
    cold = rec.cold_items_for_test
    assert rec.n_items_ == 60  # cold items are entities, known from the feature table
    feats = explicit_data.item_features
    genres, _ = feats.multi_hot["genres"]
    year = feats.numeric["year"]
    users = np.arange(80)
    by_item = {i: rec.predict(users, np.full(80, i)) for i in range(60)}
    unknown = rec.predict(users, np.full(80, 10**6))
    # cold items with different features score differently (their only input besides the unknown id row)
    distinct = [(a, b) for a in cold for b in cold if a < b
                and ((genres[a] != genres[b]).nnz or year[a] != year[b])]
    assert distinct
    for a, b in distinct:
        assert np.max(np.abs(by_item[a] - by_item[b])) > 1e-4, (a, b)
    # ... and differently from an id the model never saw (mean numeric features, no genres)
    for c in cold:
        assert np.max(np.abs(by_item[c] - unknown)) > 1e-4


def test_cold_item_with_a_warm_items_features():
    """A new item carrying exactly the features of a warm item reads the unknown id row instead of the
    warm item's id row: same features, different id input -> it must score like another cold item with those
    features (bitwise) and unlike the warm item."""
    d = make_interactions(60, 40, 800, random_state=11)
    ft = d.item_features
    genres, vocab = ft.multi_hot["genres"]
    warm = int(d.items[0])
    rows = np.concatenate([np.arange(40), [warm, warm]])
    table = FeatureTable(np.concatenate([np.arange(40), [1000, 1001]]),
                         multi_hot={"genres": (genres[rows], vocab)}, numeric={"year": ft.numeric["year"][rows]})
    rec = fastrec.Recommender(early_stopping=False, embedding_dim=8, hidden_layer_sizes=(8,), epochs=3, learning_rate=1e-2,
                              random_state=0, n_threads=1).fit(d.users, d.items, d.ratings, item_features=table)
    users = np.arange(60)
    p_warm = rec.predict(users, np.full(60, warm))
    p_new = rec.predict(users, np.full(60, 1000))
    p_twin = rec.predict(users, np.full(60, 1001))
    np.testing.assert_array_equal(p_new, p_twin)
    assert np.max(np.abs(p_new - p_warm)) > 1e-3  # the warm item's own id embedding counts
    assert np.all(np.isfinite(p_new))


def test_cold_item_features_carry_the_planted_signal():
    """Items held out of training entirely: their features (year ~ item bias, genres ~ item factors) must
    predict their ratings better than an id with no features at all."""
    d = make_interactions(300, 300, 9000, random_state=0)
    cold = np.random.default_rng(0).choice(300, 100, replace=False)
    keep = ~np.isin(d.items, cold)
    rec = fastrec.Recommender(early_stopping=False, embedding_dim=16, hidden_layer_sizes=(32, 16), epochs=10, learning_rate=3e-3,
                              id_dropout=0.1, random_state=0, n_threads=1)
    rec.fit(d.users[keep], d.items[keep], d.ratings[keep], item_features=d.item_features)
    u, i, r = d.users[~keep], d.items[~keep], d.ratings[~keep]
    rmse_features = np.sqrt(np.mean((rec.predict(u, i) - r) ** 2))
    rmse_no_features = np.sqrt(np.mean((rec.predict(u, np.full(u.size, 10**6)) - r) ** 2))
    # Observed 0.870 vs 0.907 (over seeds 0-4 the gap was 0.013-0.043).
    assert rmse_features < rmse_no_features - 0.01, (rmse_features, rmse_no_features)
    # per cold item, the mean prediction over all users tracks its mean true rating (observed corr 0.55,
    # 0.41-0.61 over seeds 0-4; the unknown id row alone would give a constant, corr undefined / 0)
    mean_pred = rec.predict(np.repeat(np.arange(300), 100), np.tile(cold, 300)).reshape(300, 100).mean(0)
    mean_true = np.array([d.ratings[d.items == c].mean() for c in cold])
    assert np.corrcoef(mean_pred, mean_true)[0, 1] > 0.3


def test_id_dropout_trains_the_unknown_rows():
    d = make_interactions(200, 100, 3000, random_state=0)
    moved = {}
    for dropout in (0.0, 0.1):
        rec = fastrec.Recommender(early_stopping=False, embedding_dim=16, hidden_layer_sizes=(32,), epochs=5, learning_rate=3e-3,
                                  id_dropout=dropout, random_state=0, n_threads=1)
        rec.fit(d.users, d.items, d.ratings)
        # The id tables are the core's draws with scale 0.05 (_core.fill_normal), user table then item table,
        # each seeded by the next 63-bit integer of a Generator seeded by the first two draws of fit's
        # RandomState(0) (_fieldnet.Float32Normals).
        gen = np.random.default_rng(np.random.RandomState(0).randint(0, 2**31 - 1, size=2))
        init_user, init_item = (np.empty(t.shape, np.float32) for t in rec.net_.tables[:2])
        for init in (init_user, init_item):
            fastrec._core.fill_normal(init, int(gen.integers(0, 2**63)), 0, 0.0, 0.05)
        moved[dropout] = (np.linalg.norm(rec.net_.tables[0][0] - init_user[0]),
                          np.linalg.norm(rec.net_.tables[1][0] - init_item[0]),
                          np.linalg.norm(rec.net_.tables[0][1:] - init_user[1:], axis=1).mean())
    # without dropout no training example reads row 0: it stays bitwise at its initialisation (this also
    # checks that init_* above is the real initialisation) while the trained rows move
    assert moved[0.0][0] == 0.0 and moved[0.0][1] == 0.0 and moved[0.0][2] > 0.05
    # with dropout 0.1 the unknown rows get ~10% of 5 epochs of updates (observed moves 0.047 and 0.05,
    # the init row norm being ~0.2): > 0.01 cannot come from float noise
    assert moved[0.1][0] > 0.01 and moved[0.1][1] > 0.01, moved


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("implicit", [False, True])
def test_same_seed_same_model_for_any_thread_count(implicit):
    d = make_interactions(100, 80, 1000, implicit=implicit, random_state=2)
    kw = dict(early_stopping=False, embedding_dim=8, hidden_layer_sizes=(16,), epochs=2, batch_size=64, random_state=7)
    ratings = None if implicit else d.ratings
    fits = [fastrec.Recommender(n_threads=t, **kw).fit(d.users, d.items, ratings, item_features=d.item_features)
            for t in (1, 2)]
    users, items = np.repeat(np.arange(100), 80), np.tile(np.arange(80), 100)
    p1, p2 = (f.predict(users, items) for f in fits)
    np.testing.assert_array_equal(p1, p2)  # bitwise: DESIGN.md "Determinism"
    for a, b in zip(fits[0].recommend(np.arange(100), k=5), fits[1].recommend(np.arange(100), k=5)):
        np.testing.assert_array_equal(a, b)
    # predicting with a different thread count than training changes nothing either
    fits[0].n_threads = 2
    np.testing.assert_array_equal(fits[0].predict(users, items), p1)
    # refitting the same estimator reproduces it
    np.testing.assert_array_equal(fits[1].fit(d.users, d.items, ratings, item_features=d.item_features)
                                  .predict(users, items), p2)
    other = fastrec.Recommender(n_threads=1, **{**kw, "random_state": 8}).fit(
        d.users, d.items, ratings, item_features=d.item_features)
    assert np.max(np.abs(other.predict(users, items) - p1)) > 1e-3


# ------------------------------------------------------------------------------------------------ similar_items
def test_similar_items_basic(explicit_model):
    rec = explicit_model
    ids, sims = rec.similar_items(10, k=5)
    assert ids.shape == (5,) and sims.shape == (5,)
    assert 10 not in ids.tolist() and len(set(ids.tolist())) == 5
    assert np.all(np.diff(sims) <= 0) and np.all(sims <= 1 + 1e-6) and np.all(sims >= -1 - 1e-6)
    many_ids, many_sims = rec.similar_items([10, 20, 30], k=5)
    assert many_ids.shape == (3, 5)
    np.testing.assert_array_equal(many_ids[0], ids)
    for q, row in zip((10, 20, 30), many_ids):
        assert q not in row.tolist()
    # cosine of the id embeddings, symmetric: sim(10, ids[0]) is also what ids[0] sees for 10
    # Candidates: the items trained on (those only in the feature table have no id embedding of their own).
    trained = rec._items.ids[np.flatnonzero(rec._bags[1][1] > 0) - 1]
    others = len(trained) - 1
    back_ids, back_sims = rec.similar_items(int(ids[0]), k=others)
    assert back_ids.shape == (others,) and int(ids[0]) not in back_ids.tolist()
    assert set(back_ids.tolist()) == set(trained.tolist()) - {int(ids[0])}
    np.testing.assert_allclose(back_sims[back_ids.tolist().index(10)], sims[0], atol=1e-6)
    # k beyond the catalogue is capped at the other items
    assert rec.similar_items(10, k=1000)[0].shape == (others,)


def test_similar_items_recover_planted_blocks():
    """Two disjoint communities: users 0-49 only touch items 0-19, users 50-99 only items 20-39. The id
    embeddings must separate them, so an item's nearest items come from its own block."""
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(100), 8)
    items = np.concatenate([rng.choice(20, 8, replace=False) + 20 * (u // 50) for u in range(100)])
    # The settings this was calibrated with (before issue 11's defaults): a weak penalty on the embeddings.
    rec = fastrec.Recommender(early_stopping=False, embedding_dim=16, epochs=30, batch_size=64, learning_rate=1e-2,
                              gmf=False, alpha=1e-5, embedding_alpha=None, wide=False, random_state=0,
                              n_threads=1).fit(users, items)
    ids, _ = rec.similar_items(np.arange(40), k=5)
    same_block = (ids // 20) == (np.arange(40) // 20)[:, None]
    # chance is 19/39 ~ 0.49; observed 0.975-0.985 over seeds 0-3
    assert same_block.mean() > 0.85, same_block.mean()


# ------------------------------------------------------------------------------------------------ pickling
@pytest.mark.parametrize("which", ["explicit_model", "implicit_model"])
def test_pickle_round_trip(which, request):
    rec = request.getfixturevalue(which)
    users, items = np.repeat(np.arange(82) - 1, 61), np.tile(np.arange(61), 82)
    before = rec.predict(users, items)  # builds the prediction handle, which must not be pickled
    clone = pickle.loads(pickle.dumps(rec))
    np.testing.assert_array_equal(clone.predict(users, items), before)
    for a, b in zip(clone.recommend(np.arange(80), k=5), rec.recommend(np.arange(80), k=5)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(clone.similar_items([1, 2], k=3), rec.similar_items([1, 2], k=3)):
        np.testing.assert_array_equal(a, b)
    assert clone.get_params() == rec.get_params()


# ------------------------------------------------------------------------------------------------ bad input
USERS, ITEMS, RATINGS = np.array([1, 2, 3, 1]), np.array([10, 20, 10, 30]), np.array([4.0, 3.0, 5.0, 1.0])


@pytest.mark.parametrize("params, args, kwargs, error, match", [
    ({}, ([1, 2, 3], [10, 20], None), {}, ValueError, "same length"),
    ({}, (USERS, ITEMS, [4.0, 3.0]), {}, ValueError, "ratings must be a 1-D array of 4"),
    ({}, ([], [], None), {}, ValueError, "empty"),
    ({}, (USERS, ITEMS, [4.0, np.nan, 5.0, 1.0]), {}, ValueError, "ratings contains NaN"),
    ({}, (USERS, ITEMS, ["a", "b", "c", "d"]), {}, TypeError, "ratings must be real numbers"),
    ({}, (USERS, ITEMS, RATINGS), {"sample_weight": [1.0, -1.0, 1.0, 1.0]}, ValueError, "sample_weight"),
    ({}, (USERS, ITEMS, RATINGS), {"sample_weight": [1.0, 1.0]}, ValueError, "sample_weight"),
    ({}, ([1.0, 2.0, 3.0, 1.0], ITEMS, RATINGS), {}, TypeError, "users must hold ints or strings"),
    ({}, (USERS, [10, np.nan, 10, 30], RATINGS), {}, ValueError, "items has missing values"),
    ({}, ([[1, 2]], [[10, 20]], None), {}, ValueError, "users must be 1-D"),
    ({"embedding_dim": 0}, (USERS, ITEMS, RATINGS), {}, ValueError, "embedding_dim"),
    ({"hidden_layer_sizes": (8, 0)}, (USERS, ITEMS, RATINGS), {}, ValueError, "hidden_layer_sizes"),
    ({"optimizer": "bogus"}, (USERS, ITEMS, RATINGS), {}, ValueError, "optimizer must be one of"),
    ({"activation": "bogus"}, (USERS, ITEMS, RATINGS), {}, ValueError, "activation"),
    ({"loss": "mse"}, (USERS, ITEMS, None), {}, ValueError, "loss='mse' needs ratings"),
    ({"loss": "hinge"}, (USERS, ITEMS, RATINGS), {}, ValueError, "loss must be"),
    ({"id_dropout": 1.0}, (USERS, ITEMS, RATINGS), {}, ValueError, "id_dropout"),
    ({"id_dropout": -0.1}, (USERS, ITEMS, RATINGS), {}, ValueError, "id_dropout"),
    ({"learning_rate": 0.0}, (USERS, ITEMS, RATINGS), {}, ValueError, "learning_rate"),
    ({"epochs": 0}, (USERS, ITEMS, RATINGS), {}, ValueError, "epochs"),
    ({"negatives": -1}, (USERS, ITEMS, None), {}, ValueError, "negatives"),
    ({"negative_sampling": "bogus"}, (USERS, ITEMS, None), {}, ValueError, "negative_sampling"),
    ({"n_threads": 0}, (USERS, ITEMS, RATINGS), {}, ValueError, "n_threads"),
    ({}, (USERS, ITEMS, RATINGS), {"item_features": {"a": 1}}, TypeError, "item_features"),
    ({}, (["a", "b", "c", "a"], ITEMS, RATINGS),
     {"user_features": FeatureTable([1, 2], numeric={"x": [0.0, 1.0]})}, TypeError, "mix strings and integers"),
])
def test_fit_rejects_bad_input(params, args, kwargs, error, match):
    rec = fastrec.Recommender(**{"epochs": 1, "n_threads": 1, "random_state": 0, **params})
    with pytest.raises(error, match=match):
        rec.fit(*args, **kwargs)
    assert not hasattr(rec, "net_")


def test_fit_rejects_all_zero_sample_weight():
    with pytest.raises(ValueError, match="sample_weight"):
        fastrec.Recommender(early_stopping=False, epochs=1, n_threads=1).fit(USERS, ITEMS, RATINGS, sample_weight=np.zeros(4))


def test_bad_input_after_fit(explicit_model):
    rec = explicit_model
    with pytest.raises(ValueError, match="same length"):
        rec.predict([1, 2], [3])
    with pytest.raises(TypeError, match="users must hold ints or strings"):
        rec.predict([1.5], [2])
    with pytest.raises(TypeError, match="items must hold ints or strings"):
        rec.recommend(1, items=[2.5])
    for bad_k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            rec.recommend(1, k=bad_k)
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            rec.similar_items(1, k=bad_k)


@pytest.mark.parametrize("call", [
    lambda r: r.predict([1], [2]),
    lambda r: r.recommend(1),
    lambda r: r.similar_items(1),
])
def test_not_fitted(call):
    rec = fastrec.Recommender()
    with pytest.raises(NotFittedError, match="not fitted"):
        call(rec)
    assert not rec.__sklearn_is_fitted__()


def test_wide_terms_match_the_oracle_and_learn_item_biases():
    """wide=True adds a bias per id / feature value to the logit; the core's predictions still equal the
    NumPy oracle on the same spec (float32 vs float64: ~1e-7 observed, 1e-4 stated bar)."""
    rng = np.random.default_rng(5)
    users = rng.integers(0, 30, 600)
    items = rng.integers(0, 20, 600)
    ratings = 3.0 + (items % 2) + rng.normal(0, 0.1, 600)  # odd items are rated one point higher
    rec = fastrec.Recommender(early_stopping=False, wide=True, epochs=20, learning_rate=1e-2, random_state=0, n_threads=1).fit(
        users, items, ratings)
    names = [f.name for f in rec.net_.fields]
    assert "user_id:wide" in names and "item_id:wide" in names
    item_bias = rec.net_.tables[names.index("item_id:wide")][1:, 0]  # row 0: unknown items
    odd = rec._items.ids % 2 == 1
    assert item_bias[odd].mean() > item_bias[~odd].mean()
    spec = rec.net_.spec(rec._bags, rec._dense_tables)
    spec64 = {**spec, "coefs": [c.astype(np.float64) for c in spec["coefs"]],
              "intercepts": [b.astype(np.float64) for b in spec["intercepts"]],
              "fields": [{**f, "table": f["table"].astype(np.float64)} for f in spec["fields"]],
              "gmf": None if spec["gmf"] is None else {**spec["gmf"], "w": spec["gmf"]["w"].astype(np.float64)}}
    keys = [rec._users.index(users[:50]), rec._items.index(items[:50])]
    want = reference.field_predict(spec64, keys) + rec.rating_mean_
    np.testing.assert_allclose(rec.predict(users[:50], items[:50]), want, rtol=1e-4, atol=1e-5)


def test_embedding_alpha_is_the_tables_own_l2_in_core_and_oracle():
    """embedding_alpha replaces alpha for the embedding tables only; the core's gradients equal the oracle's
    with the per-field weights (float32 vs float64, 1e-4 relative to each array's scale)."""
    from fastrec import _core

    rng = np.random.default_rng(9)
    users, items = rng.integers(0, 20, 300), rng.integers(0, 15, 300)
    ratings = rng.integers(1, 6, 300).astype(float)
    rec = fastrec.Recommender(early_stopping=False, embedding_alpha=0.5, alpha=0.01, epochs=2, random_state=0, n_threads=1).fit(
        users, items, ratings)
    assert all(f.alpha == 0.5 for f in rec.net_.fields)
    spec = rec.net_.spec(rec._bags, rec._dense_tables)
    keys = [rec._users.index(users[:64]), rec._items.index(items[:64])]
    y = (ratings[:64] - rec.rating_mean_).astype(np.float32)
    got = _core.field_loss_and_gradients(spec, keys, y, None, 0.01)
    spec64 = {**spec, "coefs": [c.astype(np.float64) for c in spec["coefs"]],
              "intercepts": [b.astype(np.float64) for b in spec["intercepts"]],
              "fields": [{**f, "table": f["table"].astype(np.float64)} for f in spec["fields"]],
              "gmf": {**spec["gmf"], "w": spec["gmf"]["w"].astype(np.float64)}}
    want = reference.field_loss_and_gradients(spec64, keys, y.astype(np.float64), None, 0.01)
    assert abs(got[0] - want[0]) <= 1e-4 * abs(want[0])
    for g, w in zip(got[1], want[1]):
        assert np.abs(g - w).max() <= 1e-4 * max(np.abs(w).max(), 1e-12)
    # the same spec without the per-field weights gives other table gradients: the setting is used
    plain = _core.field_loss_and_gradients({**spec, "fields": [{**f, "alpha": None} for f in spec["fields"]]},
                                           keys, y, None, 0.01)
    assert not np.allclose(plain[1][0], got[1][0])


def _item_gmf(rec):
    return [i for i, f in enumerate(rec.net_.fields) if f.role == "gmf_v"][0]


def test_gmf_item_features_give_cold_items_a_gmf_vector_and_match_the_oracle(explicit_data):
    """gmf_item_features: the item GMF field reads [genre rows | id rows] (the multi-hot genres are its only
    categorical / multi-hot item column); each item's bag is its genres (mean weights, as the genres field)
    plus its id row; the unknown id part is zero and never dropped; predictions equal the oracle's."""
    d = explicit_data
    cold = np.array([55, 56, 57, 58, 59])
    keep = ~np.isin(d.items, cold)
    rec = fastrec.Recommender(early_stopping=False, clip_predictions=False, embedding_dim=8, hidden_layer_sizes=(8,),
                              epochs=3, learning_rate=1e-2, id_dropout=0.2, gmf_item_features=True, random_state=0,
                              n_threads=1)
    rec.fit(d.users[keep], d.items[keep], d.ratings[keep], user_features=d.user_features,
            item_features=d.item_features)
    g = _item_gmf(rec)
    genres, vocab = d.item_features.multi_hot["genres"]
    n_genres, n_trained = len(vocab), len(np.unique(d.items[keep]))
    field = rec.net_.fields[g]
    assert field.vocab == n_genres + n_trained + 1 and field.dropout == 0.0
    assert rec.net_.spec(rec._bags, rec._dense_tables, training=True)["fields"][g]["dropout"] == 0.0
    np.testing.assert_array_equal(rec.net_.tables[g][n_genres], 0.0)  # the unknown id part: never trained
    indptr, ids, weights = rec._bags[g]
    for item in (int(d.items[keep][0]), int(cold[0])):
        e = rec._items.index(np.array([item]))[0]
        row = d.item_features.row_positions(np.array([item]))[0]
        own_genres = genres[row].indices
        id_row = rec._bags[1][1][e]  # 0 for the cold item
        assert (id_row == 0) == (item in cold)
        np.testing.assert_array_equal(ids[indptr[e]:indptr[e + 1]], [*own_genres, n_genres + id_row])
        np.testing.assert_allclose(weights[indptr[e]:indptr[e + 1]], [*np.full(len(own_genres), 1 / len(own_genres)), 1])
    users = np.repeat(np.arange(80), 62)
    items = np.tile(np.concatenate([np.arange(60), [-1, 10**6]]), 80)
    np.testing.assert_allclose(rec.predict(users, items) - rec.rating_mean_, _oracle_predict(rec, users, items),
                               rtol=1e-4, atol=1e-5)
    # Cold items with different genres differ through the GMF term as well: zeroing the genre rows of the
    # GMF table changes their scores.
    before = rec.predict(np.arange(80), np.full(80, cold[0]))
    saved = rec.net_.tables[g][:n_genres].copy()
    rec.net_.tables[g][:n_genres] = 0.0
    rec._predictor = None
    assert np.max(np.abs(rec.predict(np.arange(80), np.full(80, cold[0])) - before)) > 1e-4
    rec.net_.tables[g][:n_genres] = saved
    rec._predictor = None


def test_gmf_item_features_grow_with_add_features_and_partial_fit(tmp_path):
    d = make_interactions(n_users=100, n_items=80, n_interactions=2500, random_state=6)
    first = d.items < 60
    ft = d.item_features
    genres, vocab = ft.multi_hot["genres"]
    rec = fastrec.Recommender(early_stopping=False, embedding_dim=8, hidden_layer_sizes=(8,), epochs=2, gmf_item_features=True,
                              random_state=0, n_threads=1)
    rec.fit(d.users[first], d.items[first], d.ratings[first],
            item_features=FeatureTable(ft.ids[:60], multi_hot={"genres": (genres[:60], vocab)},
                                       numeric={"year": ft.numeric["year"][:60]}))
    g = _item_gmf(rec)
    rows = rec.net_.tables[g].shape[0]
    rec.add_features(item_features=ft)  # items 60..79: features only, no id row, so the table keeps its size
    assert rec.net_.tables[g].shape[0] == rows
    cold = rec.predict(np.zeros(20, np.int64), np.arange(60, 80))
    assert len(np.unique(np.round(cold, 6))) > 5
    users = np.repeat(np.arange(100), 80)
    items = np.tile(np.arange(80), 100)
    np.testing.assert_allclose(rec.predict(users, items) - rec.rating_mean_, _oracle_predict(rec, users, items),
                               rtol=1e-4, atol=1e-5)
    rec.partial_fit(d.users[~first], d.items[~first], d.ratings[~first])  # now they get id rows
    assert rec.net_.tables[g].shape[0] == rows + 20
    np.testing.assert_allclose(rec.predict(users, items) - rec.rating_mean_, _oracle_predict(rec, users, items),
                               rtol=1e-4, atol=1e-5)
    rec.save(tmp_path / "m.fastrec")
    loaded = fastrec.load(tmp_path / "m.fastrec")
    assert loaded.gmf_item_features
    np.testing.assert_array_equal(loaded.predict(users, items), rec.predict(users, items))


def test_merge_seen_equals_rebuilding_the_csr():
    """partial_fit adds its pairs to the seen-items CSR by insertion; the result must equal building the CSR
    from all pairs (scipy: sum_duplicates + sort_indices): rows sorted, duplicates within the new pairs and
    with old ones dropped, empty rows and an empty history handled."""
    import scipy.sparse as sp

    from fastrec.recommender import _merge_seen

    rng = np.random.default_rng(5)

    def build(users, items, n_users, n_items):
        s = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(n_users, n_items))
        s.sum_duplicates()
        s.sort_indices()
        return s.indptr.astype(np.int64), s.indices.astype(np.int32)

    for _ in range(300):
        n_users, n_items = int(rng.integers(1, 20)), int(rng.integers(1, 20))
        old_u = rng.integers(0, n_users, int(rng.integers(0, 60)))
        old_i = rng.integers(0, n_items, len(old_u))
        new_u = rng.integers(0, n_users, int(rng.integers(0, 30))).astype(np.int32)
        new_i = rng.integers(0, n_items, len(new_u)).astype(np.int32)
        indptr, indices = _merge_seen(*build(old_u, old_i, n_users, n_items), new_u, new_i, n_items)
        want_ptr, want_idx = build(np.concatenate([old_u, new_u]), np.concatenate([old_i, new_i]), n_users, n_items)
        assert indptr.dtype == np.int64 and indices.dtype == np.int32
        np.testing.assert_array_equal(indptr, want_ptr)
        np.testing.assert_array_equal(indices, want_idx)


def test_validation_during_fit_scores_the_current_parameters():
    """A validation callable scores each epoch's parameters: what it sees in the last epoch (no early stopping:
    the final parameters) is the fitted model's. A prediction handle built in epoch 1 and kept would rank with
    some of epoch 1's arrays in the later epochs."""
    data = make_interactions(n_users=60, n_items=40, n_interactions=1500, implicit=True, random_state=0)
    pairs = (data.users[:50], data.items[:50])
    users = np.unique(data.users)[:10]
    seen = []

    def score(model, epoch):
        seen.append((model.predict(*pairs), *model.recommend(users, k=5)))
        return float(epoch)

    model = fastrec.Recommender(embedding_dim=8, hidden_layer_sizes=(16,), epochs=3, n_iter_no_change=None,
                                random_state=0, n_threads=1)
    model.fit(data.users, data.items, validation_data=score)
    assert len(seen) == 3 and not np.array_equal(seen[0][0], seen[2][0])
    for during, after in zip(seen[-1], (model.predict(*pairs), *model.recommend(users, k=5))):
        assert np.array_equal(during, after)
