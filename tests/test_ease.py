"""fastrec.EASE against a dense NumPy computation of Steck's closed form, and its estimator surface."""

import numpy as np
import pytest

import fastrec
from fastrec import EASE


def _clicks(n_users=60, n_items=25, n=700, seed=0):
    """Implicit feedback with repeats (EASE counts a pair once) and string-free int ids that are not 0..n-1."""
    rng = np.random.default_rng(seed)
    users = 1000 + rng.integers(0, n_users, n)
    items = 7 * rng.integers(0, n_items, n) + 3
    return users, items


def _dense_ease(users, items, l2):
    """The paper's formula, written independently of fastrec: X binary (rows: sorted users, columns: sorted
    items), P = inv(X^T X + l2 I) by numpy.linalg.inv in float64, B = I - P / diag(P) (column-wise), B_jj = 0."""
    u_ids, i_ids = np.unique(users), np.unique(items)
    X = np.zeros((len(u_ids), len(i_ids)))
    X[np.searchsorted(u_ids, users), np.searchsorted(i_ids, items)] = 1.0
    P = np.linalg.inv(X.T @ X + l2 * np.eye(len(i_ids)))
    B = np.eye(len(i_ids)) - P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    return u_ids, i_ids, X, B


@pytest.fixture(scope="module")
def clicks():
    return _clicks()


@pytest.fixture(scope="module")
def fitted(clicks):
    return EASE(l2=7.0, n_threads=1).fit(*clicks)


def test_weights_match_dense_formula(clicks, fitted):
    _, i_ids, X, B = _dense_ease(*clicks, 7.0)
    assert np.array_equal(fitted.item_ids_, i_ids)
    # B is solved in float64 and stored in float32: the difference is float32 rounding of entries below 1,
    # so 1e-6 absolute (8 float32 ulps at 1) bounds it; a wrong formula (e.g. the row-wise 1/diag(P)) misses it
    # by orders of magnitude.
    assert np.abs(fitted.weights_ - B).max() < 1e-6
    assert np.all(np.diag(fitted.weights_) == 0)
    # The objective ||X - XB||^2 + l2 ||B||^2 of history_ (computed from the identity tr(G0) - sum(B * G0))
    objective = ((X - X @ B) ** 2).sum() + 7.0 * (B**2).sum()
    assert fitted.history_["loss"] == [pytest.approx(objective, rel=1e-9)]


def test_scores_are_bag_times_weights(clicks, fitted):
    u_ids, i_ids, X, B = _dense_ease(*clicks, 7.0)
    S = X @ B
    users = u_ids[[0, 5, 17]]
    pairs_u, pairs_i = np.repeat(users, len(i_ids)), np.tile(i_ids, 3)
    # float32 sums of float32 weights (bags of <= 25 items): 1e-5 absolute covers their rounding
    assert np.allclose(fitted.predict(pairs_u, pairs_i), S[[0, 5, 17]].ravel(), rtol=0, atol=1e-5)
    ids, scores = fitted.recommend(users, k=len(i_ids), exclude_seen=False)
    assert np.allclose(scores, np.sort(S[[0, 5, 17]], axis=1)[:, ::-1], rtol=0, atol=1e-5)
    assert np.allclose(fitted.predict(np.repeat(users, ids.shape[1]), ids.ravel()), scores.ravel(), rtol=0, atol=0)


def test_exclude_seen_and_candidates(clicks, fitted):
    users, items = clicks
    u = users[0]
    seen = set(items[users == u].tolist())
    ids, scores = fitted.recommend(u, k=fitted.n_items_)
    assert len(ids) == fitted.n_items_
    kept = ids[scores > -np.inf]
    assert not seen & set(kept.tolist()) and len(kept) == fitted.n_items_ - len(seen)
    assert np.all(ids[len(kept):] == -1) and np.all(np.diff(scores[:len(kept)]) <= 0)
    ids_all, _ = fitted.recommend(u, k=fitted.n_items_, exclude_seen=False)
    assert set(ids_all.tolist()) == set(fitted.item_ids_.tolist())
    candidates = fitted.item_ids_[::3]
    ids_c, _ = fitted.recommend(u, k=3, items=candidates)
    assert set(ids_c.tolist()) <= set(candidates.tolist()) - seen


def test_fold_in_equals_trained_user(clicks, fitted):
    users, items = clicks
    trained = np.unique(users)[:10]
    bags = [items[users == u][::-1].tolist() + [items[users == u][0]] for u in trained]  # order, repeats ignored
    for exclude in (True, False):
        expect = fitted.recommend(trained, k=8, exclude_seen=exclude)
        got = fitted.recommend(histories=bags, k=8, exclude_seen=exclude)
        assert np.array_equal(got[0], expect[0]) and np.array_equal(got[1], expect[1])  # bitwise: same sums
    # A new user's bag, with an unknown item (skipped), scored as a model refit with that user would not be:
    # fold-in does not change B. Its scores are the bag's rows of B summed.
    bag = [fitted.item_ids_[2], fitted.item_ids_[9], -5]
    ids, scores = fitted.recommend(histories=[bag], k=fitted.n_items_, exclude_seen=False)
    expect = fitted.weights_[[2, 9]].sum(axis=0, dtype=np.float64)
    assert np.allclose(scores[0], expect[np.searchsorted(fitted.item_ids_, ids[0])], rtol=0, atol=1e-6)
    ids, _ = fitted.recommend(histories=[[]], k=3)  # an empty bag: all zeros, ties to the first items
    assert np.array_equal(ids[0], fitted.item_ids_[:3])


def test_similar_items_read_rows_of_weights(fitted):
    item = fitted.item_ids_[4]
    ids, weights = fitted.similar_items(item, k=5)
    row = fitted.weights_[4].astype(np.float64)
    row[4] = -np.inf
    assert np.array_equal(ids, fitted.item_ids_[np.argsort(-row, kind="stable")[:5]])
    assert np.allclose(weights, np.sort(row)[::-1][:5], rtol=0, atol=0)


def test_partial_fit_is_refit(clicks):
    users, items = clicks
    half = len(users) // 2
    grown = EASE(l2=7.0).fit(users[:half], items[:half]).partial_fit(users[half:], items[half:])
    whole = EASE(l2=7.0).fit(users, items)
    order = np.argsort(grown.item_ids_)  # partial_fit numbers new items after the old ones
    assert np.array_equal(grown.item_ids_[order], whole.item_ids_)
    # the same Gram matrix up to a permutation; LAPACK's sums then run in another order: 1e-6 as above
    assert np.abs(grown.weights_[np.ix_(order, order)] - whole.weights_).max() < 1e-6
    assert len(grown.history_["loss"]) == 2
    assert grown.history_["loss"][1] == pytest.approx(whole.history_["loss"][0], rel=1e-9)


def test_save_load_round_trip(tmp_path, clicks, fitted):
    path = tmp_path / "ease.fastrec"
    fitted.save(path)
    loaded = fastrec.load(path)
    assert isinstance(loaded, EASE) and loaded.get_params() == fitted.get_params()
    assert np.array_equal(loaded.weights_, fitted.weights_)
    users = np.unique(clicks[0])[:7]
    for a, b in zip(loaded.recommend(users, k=5), fitted.recommend(users, k=5)):
        assert np.array_equal(a, b)
    mapped = fastrec.load(path, mmap=True)
    assert np.array_equal(mapped.recommend(histories=[[clicks[1][0]]], k=4)[0],
                          fitted.recommend(histories=[[clicks[1][0]]], k=4)[0])


def test_memory_error_before_allocating(clicks):
    users, items = clicks
    n_items = len(np.unique(items))
    with pytest.raises(ValueError, match=rf"{n_items} items needs about 7,500 bytes.*max_memory=7499"):
        EASE(max_memory=7499).fit(users, items)
    model = EASE(max_memory=12 * n_items**2).fit(users, items)  # exactly enough
    with pytest.raises(ValueError, match="max_memory"):  # partial_fit growing the catalogue is refused ...
        model.partial_fit([1], [10**6])
    assert model.n_items_ == n_items and model.weights_.shape == (n_items, n_items)  # ... and changes nothing
    assert set(model.recommend(users[0], k=3)[0]) <= set(items.tolist())


@pytest.mark.parametrize("params, match", [
    ({"l2": 0.0}, "l2 must be"), ({"l2": -1.0}, "l2 must be"), ({"l2": float("nan")}, "l2 must be"),
    ({"l2": "500"}, "l2 must be"), ({"max_memory": 0}, "max_memory must be"),
    ({"max_memory": "lots"}, "max_memory must be"), ({"max_memory": 1.5e9}, "max_memory must be"),
    ({"verbose": 1}, "verbose must be"), ({"n_threads": 0}, "n_threads must be"),
])
def test_bad_parameters(clicks, params, match):
    with pytest.raises(ValueError, match=match):
        EASE(**params).fit(*clicks)


def test_bad_arguments(clicks, fitted):
    users, items = clicks
    with pytest.raises(ValueError, match="ratings must be None"):
        EASE().fit(users, items, np.ones(len(users)))
    with pytest.raises(ValueError, match="same length"):
        EASE().fit(users, items[:-1])
    with pytest.raises(ValueError, match="users is empty"):
        EASE().fit([], [])
    with pytest.raises(ValueError, match="users or histories"):
        fitted.recommend()
    with pytest.raises(ValueError, match="not both"):
        fitted.recommend(users[:1], histories=[[items[0]]])
    with pytest.raises(ValueError, match="histories must be a list of bags"):
        fitted.recommend(histories=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="k must be"):
        fitted.recommend(histories=[[items[0]]], k=0)
    with pytest.raises(ValueError, match="not fitted"):
        EASE().recommend(users[:1])


def test_deterministic_across_threads_and_runs(clicks):
    users, items = _clicks(n_users=300, n_items=700, n=9000, seed=1)  # LAPACK's blocked paths (> 64 columns)
    models = [EASE(l2=3.0, n_threads=t).fit(users, items) for t in (1, 2, None)]
    assert all(np.array_equal(models[0].weights_, m.weights_) for m in models[1:])
    queries = np.unique(users)[:50]
    results = [m.recommend(queries, k=20) for m in models]
    assert all(np.array_equal(results[0][j], r[j]) for r in results[1:] for j in (0, 1))


def test_cli_train_ease(tmp_path, capsys, clicks):
    from fastrec import cli

    users, items = clicks
    data = tmp_path / "clicks.csv"
    data.write_text("user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in zip(users, items)))
    out = tmp_path / "ease.fastrec"
    assert cli.main(["train", str(data), "--model", "ease", "--l2", "7", "--threads", "1", "-o", str(out)]) == 0
    assert "closed form" in capsys.readouterr().out
    model = fastrec.load(out)
    expect = EASE(l2=7.0).fit(users, items)
    assert np.array_equal(model.weights_, expect.weights_)
    assert cli.main(["train", str(data), "--model", "ease", "--epochs", "3", "-o", str(out)]) == 1
    assert "--epochs applies to" in capsys.readouterr().err
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("user_id,item_id,rating\n1,2,5\n")
    assert cli.main(["train", str(ratings), "--model", "ease", "--rating-col", "rating", "-o", str(out)]) == 1
    assert "implicit feedback" in capsys.readouterr().err
