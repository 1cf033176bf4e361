"""fastrec.evaluation: splits, and ranking protocols driven by fake models whose scores the test controls."""

import numpy as np
import pytest

from fastrec import evaluation


# --- splits -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, test_size, n_test", [(10, 0.2, 2), (11, 0.2, 3), (100, 0.25, 25), (5, 1, 1)])
def test_random_split_sizes_and_partition(n, test_size, n_test):
    train, test = evaluation.random_split(n, test_size=test_size, random_state=0)
    assert test.size == n_test and train.size == n - n_test
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert train.dtype == np.int64


def test_random_split_seeded():
    a = evaluation.random_split(np.zeros(50), np.ones(50), random_state=3)
    b = evaluation.random_split(50, random_state=3)
    c = evaluation.random_split(50, random_state=4)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    d = evaluation.random_split(50, random_state=np.random.RandomState(0))
    assert d[1].size == 10


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((np.zeros(3), np.zeros(4)), {}, ValueError, "different lengths"),
        ((10,), {"test_size": 1.5}, ValueError, "test_size"),
        ((10,), {"test_size": 10}, ValueError, "both must be non-empty"),
        ((1,), {}, ValueError, "both must be non-empty"),
        ((), {}, TypeError, "needs n"),
        ((10,), {"random_state": "x"}, ValueError, "random_state"),
    ],
)
def test_random_split_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        evaluation.random_split(*args, **kwargs)


def test_leave_last_out_brute_force():
    rng = np.random.default_rng(0)
    n = 400
    users = rng.integers(0, 60, n)
    timestamps = rng.permutation(n)  # distinct: the latest is unique
    train, test = evaluation.leave_last_out(users, timestamps, random_state=1)
    expected = []
    for u in np.unique(users):
        idx = np.flatnonzero(users == u)
        if idx.size >= 2:
            expected.append(idx[np.argmax(timestamps[idx])])
    np.testing.assert_array_equal(test, np.sort(expected))
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(n))


def test_leave_last_out_ties_and_single_users():
    users = np.array(["a", "a", "a", "b", "c", "c"])
    ts = np.array([5, 9, 9, 1, 3, 3])
    chosen = set()
    for seed in range(30):
        train, test = evaluation.leave_last_out(users, ts, random_state=seed)
        assert set(users[test]) == {"a", "c"}  # "b" has one interaction: stays in train
        assert 3 in train and 0 in train
        chosen.add(tuple(test))
        again = evaluation.leave_last_out(users, ts, random_state=seed)[1]
        np.testing.assert_array_equal(test, again)
    assert chosen == {(1, 4), (1, 5), (2, 4), (2, 5)}  # every tied candidate gets drawn


def test_leave_last_out_bad_input():
    with pytest.raises(ValueError, match="timestamps must have shape"):
        evaluation.leave_last_out([1, 2], [1])
    with pytest.raises(ValueError, match="timestamps contain NaN"):
        evaluation.leave_last_out([1, 1], [1.0, np.nan])
    with pytest.raises(TypeError, match="users must hold ints or strings"):
        evaluation.leave_last_out([1.5, 2.5], [1, 2])


# --- ranking with fake models -------------------------------------------------------------------------------


class Recorder:
    """Scores pairs with `score(users, items)` and records every call."""

    def __init__(self, score):
        self.score = score
        self.calls = []

    def predict(self, users, items):
        self.calls.append((np.asarray(users).copy(), np.asarray(items).copy()))
        return self.score(np.asarray(users), np.asarray(items))


def make_log(seed=0, n_users=40, n_items=150, n_seen=1500):
    rng = np.random.default_rng(seed)
    pairs = np.unique(rng.integers(0, [n_users, n_items], size=(n_seen, 2)), axis=0)
    test_rows = np.array([rng.choice(np.flatnonzero(pairs[:, 0] == u)) for u in np.unique(pairs[:, 0])])
    test = pairs[test_rows]
    seen = np.delete(pairs, test_rows, axis=0)
    return seen[:, 0], seen[:, 1], test[:, 0], test[:, 1]


def test_sampled_ranking_oracle_and_constant():
    su, si, tu, ti = make_log()
    truth = set(zip(tu.tolist(), ti.tolist()))
    oracle = Recorder(lambda u, i: np.array([float((a, b) in truth) for a, b in zip(u.tolist(), i.tolist())]))
    res = evaluation.sampled_ranking(oracle, tu, ti, seen_users=su, seen_items=si, random_state=0)
    assert res == {"hr@10": 1.0, "ndcg@10": 1.0, "n": tu.size}
    constant = Recorder(lambda u, i: np.zeros(len(u)))
    res = evaluation.sampled_ranking(constant, tu, ti, seen_users=su, seen_items=si, k=5, random_state=0)
    assert res["hr@5"] == 0.0 and res["ndcg@5"] == 0.0


def test_sampled_ranking_negatives_and_ranks_brute_force():
    su, si, tu, ti = make_log(1)
    model = Recorder(lambda u, i: -((i * 7919 + u * 31) % 101).astype(float))  # arbitrary, with ties
    n_neg, k = 30, 7
    res = evaluation.sampled_ranking(model, tu, ti, seen_users=su, seen_items=si, n_negatives=n_neg, k=k,
                                     random_state=5)
    users = np.concatenate([c[0] for c in model.calls]).reshape(tu.size, n_neg + 1)
    items = np.concatenate([c[1] for c in model.calls]).reshape(tu.size, n_neg + 1)
    touched = set(zip(su.tolist(), si.tolist())) | set(zip(tu.tolist(), ti.tolist()))
    universe = set(si.tolist()) | set(ti.tolist())
    hits, ndcgs = [], []
    for r in range(tu.size):
        assert np.all(users[r] == tu[r])
        pos_item, negs = items[r, 0], items[r, 1:]
        assert pos_item == ti[r]
        assert len(set(negs.tolist())) == n_neg  # distinct
        assert all((tu[r], j) not in touched and j in universe for j in negs.tolist())
        s = -((items[r] * 7919 + tu[r] * 31) % 101)
        rank = int(np.sum(s[1:] >= s[0]))
        hits.append(rank < k)
        ndcgs.append(1 / np.log2(rank + 2) if rank < k else 0.0)
    assert res["hr@7"] == pytest.approx(np.mean(hits))
    assert res["ndcg@7"] == pytest.approx(np.mean(ndcgs))
    again = evaluation.sampled_ranking(Recorder(model.score), tu, ti, seen_users=su, seen_items=si,
                                       n_negatives=n_neg, k=k, random_state=5)
    assert again == res


def test_sampled_negatives_uniform_and_exhaustive():
    rng = np.random.default_rng(3)
    # one user touched items 0..9 of 0..49 in training; 400 test pairs of other users keep the universe
    n_test = 2000
    tu = np.full(n_test, 0)
    ti = np.full(n_test, 10)
    su, si = np.zeros(10, int), np.arange(10)
    si_all = np.concatenate([si, np.arange(11, 50)])
    su_all = np.concatenate([su, np.full(39, 1)])  # user 1 holds the rest so they are in the universe
    model = Recorder(lambda u, i: rng.random(len(u)))
    evaluation.sampled_ranking(model, tu, ti, seen_users=su_all, seen_items=si_all, n_negatives=5,
                               random_state=0)
    negs = np.concatenate([c[1] for c in model.calls]).reshape(n_test, 6)[:, 1:]
    counts = np.bincount(negs.ravel(), minlength=50)
    assert counts[:11].sum() == 0  # touched items and the test item are never negatives
    expected = n_test * 5 / 39
    assert np.all(np.abs(counts[11:] - expected) < 0.25 * expected)
    # a user with exactly n_negatives untouched items gets all of them (the exact fallback path)
    model = Recorder(lambda u, i: np.zeros(len(u)))
    evaluation.sampled_ranking(model, [0], [10], seen_users=su_all, seen_items=si_all, n_negatives=39,
                               random_state=0)
    assert set(model.calls[0][1][1:].tolist()) == set(range(11, 50))
    with pytest.raises(ValueError, match="test user 0 has only 39 untouched items"):
        evaluation.sampled_ranking(model, [0], [10], seen_users=su_all, seen_items=si_all, n_negatives=40)


def test_sampled_ranking_string_ids_and_errors():
    model = Recorder(lambda u, i: np.array([1.0 if x == "pos" else 0.0 for x in i]))
    res = evaluation.sampled_ranking(model, ["u"], ["pos"], seen_users=["v"] * 5,
                                     seen_items=["a", "b", "c", "d", "e"], n_negatives=3, k=1)
    assert res["hr@1"] == 1.0
    with pytest.raises(ValueError, match="test_users and test_items have different lengths"):
        evaluation.sampled_ranking(model, ["u"], [], seen_users=[], seen_items=[])
    with pytest.raises(ValueError, match="n_negatives"):
        evaluation.sampled_ranking(model, ["u"], ["a"], seen_users=["v"], seen_items=["b"], n_negatives=0)
    with pytest.raises(TypeError, match="different types"):
        evaluation.sampled_ranking(model, [1], ["a"], seen_users=["v"], seen_items=["b"], n_negatives=1)
    bad = Recorder(lambda u, i: np.zeros(len(u) + 1))
    with pytest.raises(ValueError, match="model.predict returned"):
        evaluation.sampled_ranking(bad, ["u"], ["a"], seen_users=["v"], seen_items=["b"], n_negatives=1)


class FakeRecommender:
    def __init__(self, lists):
        self.lists = lists  # user -> list of recommended items
        self.calls = []

    def recommend(self, users, k=10, exclude_seen=True):
        self.calls.append((np.asarray(users).copy(), k, exclude_seen))
        items = np.full((len(users), k), -1, dtype=np.int64)
        for r, u in enumerate(users):
            top = self.lists[u][:k]
            items[r, : len(top)] = top
        return items, np.zeros(items.shape, dtype=np.float32)


def test_full_ranking_by_hand():
    model = FakeRecommender({7: [1, 2, 3], 3: [4], 5: [9, 8, 7]})
    tu = np.array([7, 3, 7, 5])
    ti = np.array([2, 4, 9, 0])
    res = evaluation.full_ranking(model, tu, ti, k=3)
    (users, k, exclude), = model.calls
    np.testing.assert_array_equal(users, [3, 5, 7])
    assert k == 3 and exclude is True
    # user 3: hit at 0 of 1 relevant; user 5: no hit; user 7: relevant {2, 9}, hit at position 1
    ndcg7 = (1 / np.log2(3)) / (1 + 1 / np.log2(3))
    assert res["hr@3"] == pytest.approx(2 / 3)
    assert res["precision@3"] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    assert res["recall@3"] == pytest.approx((1 + 0 + 1 / 2) / 3)
    assert res["ndcg@3"] == pytest.approx((1 + 0 + ndcg7) / 3)
    assert res["n_users"] == 3


def test_full_ranking_bad_model():
    class Wrong:
        def recommend(self, users, k=10, exclude_seen=True):
            return np.zeros((len(users) + 1, k), dtype=int), None

    with pytest.raises(ValueError, match="model.recommend returned items of shape"):
        evaluation.full_ranking(Wrong(), [1, 2], [3, 4], k=2)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        evaluation.full_ranking(Wrong(), [1], [3], k=0)
