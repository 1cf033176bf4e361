"""fastrec.AutoRec, the estimator: predictions against the oracle on the fitted parameters, recommend against
predict, cold fallbacks, partial_fit, persistence, determinism, argument checks, the CLI."""

import numpy as np
import pytest

import fastrec
from fastrec import AutoRec
from fastrec import reference as ref


def _ratings(n_users=40, n_items=30, n=500, seed=0):
    """Ratings 1..5 with a user and an item effect; ids that are not 0..n-1; a few repeated pairs."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, n_users, n)
    i = rng.integers(0, n_items, n)
    r = np.clip(np.round(3 + 0.8 * np.sin(u) + 0.8 * np.cos(i) + rng.normal(0, 0.5, n)), 1, 5)
    return 100 + u, 7 * i + 3, r


def _model(**kw):
    params = dict(hidden=12, epochs=5, batch_size=8, early_stopping=False, clip_predictions=False, random_state=0,
                  n_threads=1)
    params.update(kw)
    return AutoRec(**params)


@pytest.fixture(scope="module")
def data():
    return _ratings()


@pytest.fixture(scope="module", params=[True, False], ids=["item_based", "user_based"])
def fitted(request, data):
    return _model(item_based=request.param).fit(*data)


def _oracle_predict(model, users, items):
    """The reconstruction computed by the NumPy oracle from the model's parameters and its training ratings
    (the last rating of a repeated pair), written independently of AutoRec's own bookkeeping."""
    U, I, R = _ratings()
    rows_ids, cols_ids = (model.item_ids_, model.user_ids_) if model.item_based else (model.user_ids_, model.item_ids_)
    row_of = {v: k for k, v in enumerate(rows_ids.tolist())}
    col_of = {v: k for k, v in enumerate(cols_ids.tolist())}
    last = {}
    for u, i, r in zip(U.tolist(), I.tolist(), R.tolist()):
        row, col = (i, u) if model.item_based else (u, i)
        last[(row_of[row], col_of[col])] = r
    rows = []
    out = []
    params = [p.astype(np.float64) for p in model.params_]
    for u, i in zip(users.tolist(), items.tolist()):
        row, col = (i, u) if model.item_based else (u, i)
        r, c = row_of[row], col_of[col]
        entries = sorted((cc, v) for (rr, cc), v in last.items() if rr == r)
        X = (np.array([0, len(entries)], np.int64), np.array([e[0] for e in entries], np.int32),
             np.array([e[1] for e in entries], np.float32), len(cols_ids))
        out.append(ref.autorec_predict(params, X, np.array([0, 1]), np.array([c]), "logistic")[0])
        rows.append(r)
    return np.array(out) + model.rating_mean_


def test_predict_matches_oracle(data, fitted):
    users, items = data[0][:60], data[1][:60]
    expected = _oracle_predict(fitted, users, items)
    # float32 core vs float64 oracle with the same parameters: sums of ~20 terms, 1e-5 absolute on ratings ~3
    assert np.abs(fitted.predict(users, items) - expected).max() < 1e-4


def test_training_fits_the_ratings(data, fitted):
    loss = fitted.history_["loss"]
    assert len(loss) == 5 and loss[-1] < loss[0]
    model = _model(item_based=fitted.item_based, epochs=60, learning_rate=3e-3, l2=1.0).fit(*data)
    err = model.predict(data[0], data[1]) - data[2]
    mean_err = data[2] - data[2].mean()
    # the mean alone: ~0.93; the noise floor: 0.5
    assert np.sqrt(np.mean(err**2)) < 0.75 * np.sqrt(np.mean(mean_err**2))


def test_recommend_scores_are_predictions(data, fitted):
    users = np.unique(data[0])[:5]
    ids, scores = fitted.recommend(users, k=fitted.n_items_, exclude_seen=False)
    assert ids.shape == (5, fitted.n_items_)
    for row, u in enumerate(users):
        pred = fitted.predict(np.full(fitted.n_items_, u), ids[row])
        # top-k scores are float32 inner products with the bias folded in: 1e-5 absolute
        assert np.abs(scores[row] - pred).max() < 1e-4
        assert np.all(np.diff(scores[row]) <= 0)
    ids, _ = fitted.recommend(users, k=10)
    seen = set(zip(data[0].tolist(), data[1].tolist()))
    for row, u in enumerate(users):
        assert not any((u, i) in seen for i in ids[row] if i != -1)
    candidates = np.unique(data[1])[:6]
    ids, _ = fitted.recommend(users[0], k=3, items=candidates, exclude_seen=False)
    assert set(ids.tolist()) <= set(candidates.tolist())


def test_cold_fallbacks(data, fitted):
    known_user, known_item = data[0][0], data[1][0]
    if fitted.item_based:  # unknown user: no decoder row, the training mean
        assert fitted.predict([99999], [known_item])[0] == pytest.approx(fitted.rating_mean_)
    else:  # unknown item: no decoder row
        assert fitted.predict([known_user], [99999])[0] == pytest.approx(fitted.rating_mean_)
    # an unknown row entity reads the empty vector: the decoder at the code act(b_enc)
    W_enc, b_enc, W_dec, b_dec = [p.astype(np.float64) for p in fitted.params_]
    h = 1 / (1 + np.exp(-b_enc))
    if fitted.item_based:
        col = np.searchsorted(fitted.user_ids_, known_user)
        got = fitted.predict([known_user], [99999])[0]
    else:
        col = np.searchsorted(fitted.item_ids_, known_item)
        got = fitted.predict([99999], [known_item])[0]
    assert got == pytest.approx(h @ W_dec[col] + b_dec[col] + fitted.rating_mean_, abs=1e-5)
    # both unknown: the mean; no crash on recommend for an unknown user
    assert fitted.predict([99999], [99998])[0] == pytest.approx(fitted.rating_mean_)
    ids, scores = fitted.recommend([99999], k=3)
    assert ids.shape == (1, 3) and np.isfinite(scores).all()


def test_clipping_to_the_rating_range(data):
    model = _model(clip_predictions=True, learning_rate=0.3, epochs=3).fit(*data)
    pred = model.predict(data[0], data[1])
    assert pred.min() >= 1.0 and pred.max() <= 5.0


def test_partial_fit_adds_rows_and_columns_and_replaces_a_rating(data):
    model = _model().fit(*data)
    n_users, n_items = model.n_users_, model.n_items_
    model.partial_fit([100, 5000], [3, 7000], [1.0, 4.0])  # (100, 3) was rated before: new rating wins
    assert model.n_users_ == n_users + 1 and model.n_items_ == n_items + 1
    assert len(model.history_["loss"]) == 6
    indptr, cols, values = model._ratings
    row = model._items.index(np.array([3]))[0]
    col = model._users.index(np.array([100]))[0] - 1
    at = indptr[row] + np.searchsorted(cols[indptr[row]:indptr[row + 1]], col)
    assert cols[at] == col and values[at] == pytest.approx(1.0, abs=1e-6)
    assert np.isfinite(model.predict([5000], [7000])).all()
    assert model.params_[0].shape[0] == model.n_users_ and model._state[0][2].shape == model.params_[2].shape


def test_early_stopping_keeps_the_best_epoch(data):
    model = _model(epochs=12, early_stopping=True, n_iter_no_change=3, learning_rate=0.05).fit(*data)
    val = model.history_["val_rmse"]
    assert len(val) >= 1 and model.best_epoch_ == int(np.argmin(val)) + 1
    assert model.validation_size_ > 0


def test_save_load_round_trip(tmp_path, data, fitted):
    path = tmp_path / "autorec.fastrec"
    fitted.save(path)
    for mmap in (False, True):
        loaded = fastrec.load(path, mmap=mmap)
        assert isinstance(loaded, AutoRec) and loaded.get_params() == fitted.get_params()
        assert np.array_equal(loaded.predict(data[0], data[1]), fitted.predict(data[0], data[1]))
        a, b = loaded.recommend(data[0][:4], k=5), fitted.recommend(data[0][:4], k=5)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    loaded = fastrec.load(path)
    loaded.partial_fit(data[0][:10], data[1][:10], data[2][:10])  # training continues from the file
    assert len(loaded.history_["loss"]) == len(fitted.history_["loss"]) + 1


def test_deterministic_across_threads(data):
    models = [_model(n_threads=t, hidden=200, batch_size=30, epochs=3).fit(*data) for t in (1, 2, 3)]
    for other in models[1:]:
        for a, b in zip(models[0].params_, other.params_):
            assert np.array_equal(a, b)


def test_similar_items(data, fitted):
    ids, sims = fitted.similar_items(data[1][:3], k=4)
    assert ids.shape == (3, 4) and np.all(sims <= 1 + 1e-6)
    assert not any(data[1][q] in ids[q] for q in range(3))


@pytest.mark.parametrize("params, match", [
    (dict(hidden=0), "hidden"), (dict(activation="softmax"), "activation"), (dict(optimizer="rmsprop"), "optimizer"),
    (dict(l2=-1.0), "l2"), (dict(learning_rate=0.0), "learning_rate"), (dict(batch_size=0), "batch_size"),
    (dict(item_based=1), "item_based"), (dict(validation_metric="ndcg@10"), "validation_metric")])
def test_bad_parameters(data, params, match):
    with pytest.raises(ValueError, match=match):
        _model(**params).fit(*data)


def test_bad_arguments(data, fitted):
    with pytest.raises(ValueError, match="explicit ratings"):
        _model().fit(data[0], data[1])
    with pytest.raises(ValueError, match="same length"):
        fitted.predict(data[0][:3], data[1][:2])
    with pytest.raises(ValueError, match="ratings"):
        _model().fit(data[0], data[1], data[2][:-1])
    with pytest.raises(ValueError, match="NaN"):
        _model().fit(data[0], data[1], np.where(np.arange(len(data[2])) == 3, np.nan, data[2]))
    with pytest.raises(Exception, match="not fitted"):
        AutoRec().predict([1], [2])


def test_cli_train_autorec(tmp_path, capsys, data):
    from fastrec import cli

    csv = tmp_path / "ratings.csv"
    csv.write_text("user_id,item_id,rating\n" + "".join(f"{u},{i},{r}\n" for u, i, r in zip(*data)))
    out = tmp_path / "m.fastrec"
    assert cli.main(["train", str(csv), "--rating-col", "rating", "--model", "autorec", "--hidden-units", "8",
                     "--epochs", "2", "--l2", "0.5", "--no-item-based", "--seed", "0", "--threads", "1",
                     "-o", str(out)]) == 0
    model = fastrec.load(out)
    assert isinstance(model, AutoRec) and model.hidden == 8 and model.l2 == 0.5 and not model.item_based
    expect = AutoRec(hidden=8, epochs=2, l2=0.5, item_based=False, random_state=0, n_threads=1).fit(*data)
    assert np.array_equal(model.params_[2], expect.params_[2])
    assert cli.main(["train", str(csv), "--model", "autorec", "-o", str(out)]) == 1  # no ratings
    assert "explicit ratings" in capsys.readouterr().err
    assert cli.main(["train", str(csv), "--rating-col", "rating", "--model", "autorec", "--negatives", "3",
                     "-o", str(out)]) == 1
    assert "--negatives applies to" in capsys.readouterr().err
