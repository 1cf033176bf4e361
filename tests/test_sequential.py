"""fastrec.SequentialRecommender: the estimator (the core's math is checked in test_sequential_core.py)."""

import numpy as np
import pytest

import fastrec
from fastrec import SequentialRecommender


def _walks(n_users=80, n_items=40, seed=0, min_len=5, max_len=14):
    """Each user walks the cycle 0 -> 1 -> ... -> n_items - 1 -> 0 from a random start: the next item is
    always the current one plus 1, which only the order of events reveals (every item is equally popular)."""
    rng = np.random.default_rng(seed)
    users, items, times = [], [], []
    for u in range(n_users):
        start, length = rng.integers(n_items), rng.integers(min_len, max_len)
        for t in range(length):
            users.append(u)
            items.append((start + t) % n_items)
            times.append(1000.0 * t + rng.random())
    users, items, times = np.array(users), np.array(items), np.array(times)
    perm = rng.permutation(len(users))  # input order is not the time order
    return users[perm], items[perm], times[perm]


def _model(**kw):
    params = dict(embedding_dim=16, max_len=10, epochs=40, batch_size=32, learning_rate=5e-3, dropout=0.0,
                  random_state=0, n_iter_no_change=None, n_threads=1)
    params.update(kw)
    return SequentialRecommender(**params)


@pytest.fixture(scope="module")
def walks():
    return _walks()


@pytest.fixture(scope="module")
def fitted(walks):
    users, items, times = walks
    return _model().fit(users, items, times)


def _latest(users, items, times):
    """Each user's latest item."""
    order = np.lexsort((times, users))
    last = np.ones(len(order), bool)
    last[:-1] = users[order][1:] != users[order][:-1]
    return dict(zip(users[order][last], items[order][last]))


def test_learns_the_order_of_events(fitted, walks):
    # The next item is (latest + 1) mod 40; a model blind to order ranks it 1 in 40 on average.
    latest = _latest(*walks)
    users = np.array(sorted(latest))
    ids, _ = fitted.recommend(users, k=1)
    hits = np.mean([ids[q, 0] == (latest[u] + 1) % 40 for q, u in enumerate(users)])
    assert hits >= 0.8, hits


def test_softmax_objective_learns_the_order(walks):
    users, items, times = walks
    model = _model(loss="softmax").fit(users, items, times)
    latest = _latest(users, items, times)
    ids, _ = model.recommend(np.array(sorted(latest)), k=1)
    hits = np.mean([ids[q, 0] == (latest[u] + 1) % 40 for q, u in enumerate(sorted(latest))])
    assert hits >= 0.8, hits


def test_recommend_histories_equals_trained_user(fitted, walks):
    users, items, times = walks
    u = users[0]
    mine = np.argsort(times[users == u])
    history = list(items[users == u][mine])
    by_user = fitted.recommend([u], k=5)
    by_history = fitted.recommend(histories=[history], k=5)
    np.testing.assert_array_equal(by_user[0], by_history[0])
    np.testing.assert_array_equal(by_user[1], by_history[1])  # the same forward pass: the same bits


def test_observe_changes_the_next_recommendation(walks):
    users, items, times = walks
    model = _model().fit(users, items, times)
    u = users[0]
    latest = _latest(users, items, times)[u]
    before = model.recommend([u], k=1)[0][0, 0]
    jump = (latest + 20) % 40  # far along the cycle: the next item should follow it
    model.observe([u], [jump], [times.max() + 1.0])
    after_ids, _ = model.recommend([u], k=3)
    assert after_ids[0, 0] == (jump + 1) % 40 != before
    assert jump not in after_ids[0]  # observed items count as seen
    assert jump not in model.recommend([u], k=39)[0][0]


def test_timestamps_order_events(walks):
    users, items, times = walks
    order = np.lexsort((times, users))
    a = _model(epochs=3).fit(users, items, times)
    b = _model(epochs=3).fit(users[order], items[order])  # already in time order: no timestamps needed
    for x, y in zip(a.recommend(np.unique(users), k=5), b.recommend(np.unique(users), k=5)):
        np.testing.assert_array_equal(x, y)


def test_ties_keep_input_order():
    users = np.array([0, 0, 0, 1, 1, 1] * 3)
    items = np.array([1, 2, 3, 4, 5, 6] * 3)
    times = np.zeros(len(users))  # all tied: input order decides
    m = _model(epochs=1, early_stopping=False).fit(users, items, times)
    z_tied = m.user_vectors([0])
    z_hist = m._hidden(m._padded(np.array([0, 9]), np.array([0, 1, 2] * 3, np.int32), [0]))
    np.testing.assert_array_equal(z_tied, z_hist)


def test_same_result_for_any_thread_count(walks):
    users, items, times = walks
    models = [_model(epochs=3, n_threads=t, dropout=0.2).fit(users, items, times) for t in (1, 2, 3)]
    for m in models[1:]:
        assert m.history_["loss"] == models[0].history_["loss"]
        np.testing.assert_array_equal(m.params_["item_table"], models[0].params_["item_table"])
        np.testing.assert_array_equal(m.recommend([1, 2], k=5)[1], models[0].recommend([1, 2], k=5)[1])


def test_early_stopping_holds_out_latest_and_returns_it(walks):
    users, items, times = walks
    m = _model(epochs=4, early_stopping=True, n_iter_no_change=2).fit(users, items, times)
    assert len(m.history_["val_ndcg@10"]) == len(m.history_["loss"]) >= 1
    latest = _latest(users, items, times)
    # the held-out latest events joined the histories after fit: they are excluded and read
    ids, _ = m.recommend([users[0]], k=39)
    assert latest[users[0]] not in ids[0]
    seen_u, seen_i = m.seen_pairs()
    assert len(seen_u) == len(set(zip(users.tolist(), items.tolist())))


def test_save_load_round_trip(fitted, tmp_path):
    fitted.observe([3], [7])  # buffered events are saved too
    path = tmp_path / "seq.fastrec"
    fitted.save(path)
    for mmap in (False, True):
        loaded = fastrec.load(path, mmap=mmap)
        for x, y in zip(fitted.recommend([1, 3], k=5), loaded.recommend([1, 3], k=5)):
            np.testing.assert_array_equal(x, y)


def test_partial_fit_adds_items_and_trains(walks):
    users, items, times = walks
    m = _model(epochs=2).fit(users, items, times)
    n_epochs, n_items = len(m.history_["loss"]), m.n_items_
    m.partial_fit([0, 0, 0], [100, 101, 100], [1e9, 1e9 + 1, 1e9 + 2])
    assert len(m.history_["loss"]) == n_epochs + 1
    assert m.n_items_ == n_items + 2 and m.params_["item_table"].shape[0] == n_items + 2
    assert 100 not in m.recommend([0], k=10)[0][0]


def test_unknown_users_and_items(fitted):
    ids, scores = fitted.recommend([12345], k=4)  # no history: the empty sequence's state
    assert ids.shape == (1, 4) and np.isfinite(scores).all()
    assert fitted.predict([0], [999])[0] == 0.0  # an item without an embedding
    fitted.observe([0], [999])  # unknown items are ignored by observe
    assert 999 not in fitted.recommend(histories=[[1, 999, 2]], k=3)[0][0]


def test_candidates_and_padding(fitted):
    ids, scores = fitted.recommend(histories=[[1, 2]], k=5, items=[3, 4, 1])
    assert set(ids[0][:2]) == {3, 4} and ids[0][2] == -1 and scores[0][2] == -np.inf


@pytest.mark.parametrize("kw, match", [
    ({"n_heads": 3}, "divisible"),
    ({"dropout": 1.0}, "dropout"),
    ({"loss": "mse"}, "loss"),
    ({"optimizer": "lbfgs"}, "optimizer"),
    ({"max_len": 0}, "max_len"),
])
def test_bad_parameters(walks, kw, match):
    users, items, times = walks
    with pytest.raises(ValueError, match=match):
        _model(**kw).fit(users, items, times)


def test_bad_input(fitted, walks):
    users, items, times = walks
    with pytest.raises(ValueError, match="timestamps"):
        _model().fit(users, items, times[:-1])
    with pytest.raises(ValueError, match="timestamps"):
        _model().fit(users, items, np.where(np.arange(len(times)) == 3, np.nan, times))
    with pytest.raises(TypeError, match="timestamps"):
        _model().fit(users, items, times.astype(str))
    with pytest.raises(ValueError, match="users or histories"):
        fitted.recommend(k=3)
    with pytest.raises(ValueError, match="not both"):
        fitted.recommend([1], histories=[[1]])
    with pytest.raises(ValueError, match="list of item-id sequences"):
        fitted.recommend(histories=np.array([1, 2, 3]))
