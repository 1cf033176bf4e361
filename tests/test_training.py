"""Training control (issue 4): partial_fit with new ids, resume after save, validation and early stopping,
history, progress output, divergence and Ctrl-C.

Models are tiny and seeded; n_threads=1 except where noted (the results do not depend on it).
"""

import _thread
import threading
import time

import numpy as np
import pytest

import fastrec
from fastrec.datasets import make_interactions
from fastrec.features import FeatureTable


@pytest.fixture(scope="module")
def data():
    return make_interactions(n_users=300, n_items=200, n_interactions=6000, random_state=3)


def _params(model):
    """Every learned array and its optimizer state (GMF included)."""
    return model.net_._arrays()


def _assert_same(a, b):
    pa, pb = _params(a), _params(b)
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        assert x.shape == y.shape and np.array_equal(x, y)
    assert a.net_.adam_t == b.net_.adam_t


# ------------------------------------------------------------------------------------- partial_fit
def test_partial_fit_adds_new_users_and_items(data):
    old = data.items < 150  # items 150.. and the users only they have appear later
    rec = fastrec.Recommender(early_stopping=False, epochs=2, random_state=0, n_threads=1)
    rec.fit(data.users[old], data.items[old], data.ratings[old])
    n_items, vocab = rec.n_items_, rec.net_.fields[1].vocab
    before = rec.predict(data.users[:20], data.items[:20])
    new_items = np.unique(data.items[~old])
    rec.partial_fit(data.users[~old], data.items[~old], data.ratings[~old])
    assert rec.n_items_ == n_items + len(new_items)
    assert rec.net_.fields[1].vocab == vocab + len(new_items)  # one id row per new item
    assert rec.net_.tables[1].shape[0] == rec.net_.table_state1[1].shape[0] == vocab + len(new_items)
    # New items are no longer unknown: their predictions differ from the unknown id's.
    unknown = rec.predict([data.users[0]], [10**9])[0]
    assert not np.allclose(rec.predict(np.full(len(new_items), data.users[0]), new_items), unknown)
    # Training continued: the old pairs' predictions moved, and recommend excludes the new interactions.
    assert not np.allclose(before, rec.predict(data.users[:20], data.items[:20]))
    user = data.users[~old][0]
    seen = set(data.items[data.users == user].tolist())
    top, _ = rec.recommend(user, k=rec.n_items_)
    assert not seen & set(top[top >= 0].tolist())
    assert len(rec.history_["loss"]) == 3


def test_partial_fit_reads_features_of_new_items():
    d = make_interactions(n_users=200, n_items=120, n_interactions=4000, random_state=1)
    first = d.items < 100
    table = d.item_features
    rec = fastrec.Recommender(early_stopping=False, epochs=1, random_state=0, n_threads=1)
    rec.fit(d.users[first], d.items[first], d.ratings[first], item_features=table)
    rec.partial_fit(d.users[~first], d.items[~first], d.ratings[~first], item_features=table)
    genres = [i for i, f in enumerate(rec.net_.fields) if f.name == "item:genres"][0]
    indptr, ids, _ = rec._bags[genres]
    X, labels = table.multi_hot["genres"]
    for item in np.unique(d.items[~first])[:10]:
        entity = rec._items.index(np.array([item]))[0]
        got = set(np.asarray(labels)[ids[indptr[entity]:indptr[entity + 1]]].tolist())
        row = table.row_positions(np.array([item]))[0]
        assert got == set(np.asarray(labels)[X[row].indices].tolist())
    year = rec._dense_tables[0]
    mean, std = rec._numeric_stats_["item"]["year"]
    item = np.unique(d.items[~first])[0]
    row = table.row_positions(np.array([item]))[0]
    np.testing.assert_allclose(year[rec._items.index(np.array([item]))[0]],
                               (table.numeric["year"].reshape(len(table), -1)[row] - mean) / std, rtol=1e-6)


def test_partial_fit_rejects_other_feedback_kind_and_id_type(data):
    rec = fastrec.Recommender(early_stopping=False, epochs=1, random_state=0, n_threads=1).fit(data.users, data.items, data.ratings)
    with pytest.raises(ValueError, match="ratings"):
        rec.partial_fit(data.users, data.items)
    with pytest.raises(TypeError, match=r"users must be integer ids like those of the first fit; got 'u\d+' among them"):
        rec.partial_fit(np.char.add("u", data.users.astype(str)), data.items, data.ratings)
    before = rec.predict(data.users, data.items)
    rec.partial_fit(data.users[:3].astype(str), data.items[:3], data.ratings[:3])  # "12" is 12: converted
    assert rec.n_users_ == len(np.unique(data.users)) and not np.array_equal(rec.predict(data.users, data.items),
                                                                             before)


@pytest.mark.parametrize("change", [dict(embedding_dim=8), dict(hidden_layer_sizes=(16,)), dict(optimizer="sgd"),
                                    dict(gmf=False), dict(wide=False), dict(user_history=True), dict(id_dropout=0.2)])
def test_partial_fit_refuses_a_changed_structural_parameter(data, change, tmp_path):
    """partial_fit continues the fitted model: a set_params change it cannot honour is refused, naming the
    parameter, and the model is left as it was; also after save and load. Training parameters
    (learning_rate, alpha, batch_size, ...) may change between calls."""
    rec = fastrec.Recommender(early_stopping=False, epochs=1, random_state=0, n_threads=1).fit(data.users, data.items, data.ratings)
    rec.set_params(learning_rate=5e-3, alpha=1e-4, batch_size=64).partial_fit(data.users[:50], data.items[:50],
                                                                             data.ratings[:50])
    rec.save(tmp_path / "m.fastrec")
    (name, value), = change.items()
    for model in (rec, fastrec.load(tmp_path / "m.fastrec")):
        before = [a.copy() for a in _params(model)]
        model.set_params(**change)
        with pytest.raises(ValueError, match=f"partial_fit continues the fitted model, built with {name}="):
            model.partial_fit(data.users[:50], data.items[:50], data.ratings[:50])
        assert all(np.array_equal(a, b) for a, b in zip(before, _params(model)))
        model.set_params(**{name: fastrec.Recommender().get_params()[name]})  # set back: continues
        model.partial_fit(data.users[:50], data.items[:50], data.ratings[:50])


def test_field_model_partial_fit_refuses_a_changed_structural_parameter():
    rng = np.random.default_rng(0)
    X = {"a": rng.integers(0, 20, 300), "b": rng.standard_normal(300)}
    y = (rng.random(300) < 0.5).astype(float)
    model = fastrec.FieldModel(epochs=1, random_state=0, n_threads=1).fit(X, y)
    model.set_params(embedding_dim=4)
    with pytest.raises(ValueError, match="built with embedding_dim=16 \\(now 4\\)"):
        model.partial_fit(X, y)
    model.set_params(embedding_dim=16, learning_rate=1e-2).partial_fit(X, y)


def test_partial_fit_on_unfitted_model_is_one_epoch_fit(data):
    a = fastrec.Recommender(early_stopping=False, epochs=1, random_state=0, n_threads=1).fit(data.users, data.items, data.ratings)
    b = fastrec.Recommender(early_stopping=False, epochs=5, random_state=0, n_threads=1).partial_fit(data.users, data.items, data.ratings)
    _assert_same(a, b)


@pytest.mark.parametrize("implicit", [False, True])
def test_save_load_partial_fit_equals_uninterrupted(data, implicit, tmp_path):
    ratings = None if implicit else data.ratings
    half = data.users < 150
    parts = [(data.users[half], data.items[half], None if implicit else ratings[half]),
             (data.users[~half], data.items[~half], None if implicit else ratings[~half])]
    kw = dict(early_stopping=False, epochs=2, wide=True, random_state=0, n_threads=1)
    a = fastrec.Recommender(**kw).fit(*parts[0], item_features=data.item_features)
    b = fastrec.Recommender(**kw).fit(*parts[0], item_features=data.item_features)
    b.save(tmp_path / "b.fastrec")
    b = fastrec.load(tmp_path / "b.fastrec", mmap=True)
    for model in (a, b):
        model.partial_fit(*parts[1])
        model.partial_fit(*parts[0])
    _assert_same(a, b)
    np.testing.assert_array_equal(a.recommend(data.users[:5], k=5)[0], b.recommend(data.users[:5], k=5)[0])


def test_field_model_partial_fit_grows_categorical_vocabularies():
    rng = np.random.default_rng(0)
    site = rng.integers(0, 10, 2000)
    y = (site % 2).astype(float)
    model = fastrec.FieldModel(epochs=3, random_state=0, n_threads=1, fields={"h": {"hash_buckets": 8}})
    X = {"site": site, "h": site, "x": rng.standard_normal(2000)}
    model.fit(X, y)
    assert model.net_.fields[0].vocab == 11
    new = {"site": site + 10, "h": site + 10, "x": rng.standard_normal(2000)}
    p_unknown = model.predict_proba({"site": np.array([15]), "h": np.array([15]), "x": np.zeros(1)})[0, 1]
    for _ in range(5):
        model.partial_fit(new, y)
    assert model.net_.fields[0].vocab == 21 and model.net_.tables[0].shape[0] == 21
    assert model.net_.fields[1].vocab == 9  # hashed: fixed buckets
    p = model.predict_proba({"site": np.array([15, 16]), "h": np.array([15, 16]), "x": np.zeros(2)})[:, 1]
    assert p[0] > p[1] and p[0] != p_unknown  # the new values learned their labels (15 odd -> 1, 16 even -> 0)


# ------------------------------------------------------------------------------------- validation
def test_validation_history_and_early_stopping_restore_best(data):
    train = np.arange(len(data.users)) % 5 != 0
    val = (data.users[~train], data.items[~train], data.ratings[~train])
    # A large learning rate overfits fast, so the validation RMSE turns up within a few epochs.
    kw = dict(early_stopping=False, learning_rate=0.02, embedding_dim=32, alpha=0.0, random_state=0, n_threads=1)
    full = fastrec.Recommender(epochs=12, n_iter_no_change=None, **kw).fit(data.users[train], data.items[train], data.ratings[train],
                                                    validation_data=val)
    curve = full.history_["val_rmse"]
    assert len(curve) == len(full.history_["loss"]) == len(full.history_["seconds"]) == 12
    best = int(np.argmin(curve)) + 1
    assert best < 12 and full.best_epoch_ == best  # overfitting happened: the test can tell
    # The reported metric is the model's own: recompute it for the last epoch.
    resid = full.predict(*val[:2]) - val[2]
    assert np.isclose(curve[-1], np.sqrt(np.mean(resid**2)), rtol=1e-9)

    stopped = fastrec.Recommender(epochs=12, n_iter_no_change=2, **kw).fit(
        data.users[train], data.items[train], data.ratings[train], validation_data=val)
    assert len(stopped.history_["loss"]) == min(best + 2, 12)
    assert stopped.history_["val_rmse"] == curve[: len(stopped.history_["loss"])]  # same training until then
    # The best epoch's parameters were restored.
    resid = stopped.predict(*val[:2]) - val[2]
    assert np.isclose(np.sqrt(np.mean(resid**2)), curve[best - 1], rtol=1e-6)


def test_implicit_validation_uses_ranking_metric(data):
    rec = fastrec.Recommender(early_stopping=False, epochs=2, random_state=0, n_threads=1, validation_metric="hr@5")
    rec.fit(data.users[100:], data.items[100:], validation_data=(data.users[:100], data.items[:100]))
    assert len(rec.history_["val_hr@5"]) == 2 and all(0 <= v <= 1 for v in rec.history_["val_hr@5"])
    with pytest.raises(ValueError, match="validation_metric"):
        fastrec.Recommender(early_stopping=False, epochs=1, validation_metric="rmse").fit(
            data.users, data.items, validation_data=(data.users[:5], data.items[:5]))
    with pytest.raises(ValueError, match="validation_data"):
        fastrec.Recommender(early_stopping=False, epochs=1).fit(data.users, data.items, data.ratings,
                                          validation_data=(data.users[:5], data.items[:5]))


def test_field_model_validation_auc():
    rng = np.random.default_rng(0)
    X = {"c": rng.integers(0, 20, 3000), "x": rng.standard_normal(3000)}
    y = ((X["c"] % 3 == 0) ^ (X["x"] > 1)).astype(float)
    val = ({"c": X["c"][:500], "x": X["x"][:500]}, y[:500])
    model = fastrec.FieldModel(epochs=3, validation_metric="auc", random_state=0, n_threads=1)
    model.fit(X, y, validation_data=val)
    from fastrec.metrics import roc_auc

    assert np.isclose(model.history_["val_auc"][-1], roc_auc(val[1], model.predict_proba(val[0])[:, 1]))
    assert model.history_["val_auc"][-1] > 0.8


# ------------------------------------------------------------------------------------- progress
def test_verbose_prints_one_line_per_epoch_without_tqdm(data, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    fastrec.Recommender(early_stopping=False, epochs=3, verbose=True, random_state=0, n_threads=1).fit(
        data.users, data.items, data.ratings, validation_data=(data.users[:50], data.items[:50], data.ratings[:50]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4  # one line per epoch, then where the fit's time went
    assert all(line.startswith(f"epoch {e}/3: loss ") and "val_rmse" in line and "examples/s" in line
               for e, line in enumerate(err[:3], 1))
    assert err[3].startswith("fit: prepare ") and "validate" in err[3] and "total" in err[3]
    fastrec.Recommender(early_stopping=False, epochs=2, random_state=0, n_threads=1).fit(data.users, data.items, data.ratings)
    assert capsys.readouterr().err == ""  # quiet unless verbose


# ------------------------------------------------------------------------------------- failures
def test_divergence_stops_with_advice_and_finite_parameters():
    rng = np.random.default_rng(0)
    X = {"c": rng.integers(0, 5, 500), "x": rng.standard_normal((500, 3)) * 1e18}
    y = rng.standard_normal(500) * 1e18
    model = fastrec.FieldModel(loss="mse", optimizer="sgd", learning_rate=10.0, epochs=20, random_state=0,
                               n_threads=1)
    with pytest.raises(ValueError, match="learning_rate") as info:
        model.fit(X, y)
    assert "diverged" in str(info.value) and "scal" in str(info.value)
    assert all(np.isfinite(a).all() for a in _params(model))

    mlp = fastrec.MLPRegressor((8,), solver="sgd", learning_rate_init=10.0, max_iter=50, random_state=0)
    with pytest.raises(ValueError, match="diverged"):
        mlp.fit(X["x"], y)
    assert all(np.isfinite(w).all() for w in mlp.coefs_ + mlp.intercepts_)


def _interrupt_after(seconds):
    timer = threading.Timer(seconds, _thread.interrupt_main)
    timer.start()
    return timer


def test_ctrl_c_stops_fit_quickly_and_leaves_a_usable_model():
    d = make_interactions(n_users=2000, n_items=1000, n_interactions=60_000, random_state=0)
    rec = fastrec.Recommender(early_stopping=False, epochs=10_000, batch_size=64, random_state=0, n_threads=1)
    start = time.perf_counter()
    timer = _interrupt_after(1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            rec.fit(d.users, d.items, d.ratings)
    finally:
        timer.cancel()
    # 10,000 epochs would take hours; the interrupt lands at the next batch boundary (checked every 50 ms).
    assert time.perf_counter() - start < 10
    pred = rec.predict(d.users[:100], d.items[:100])
    assert np.isfinite(pred).all()
    items, _ = rec.recommend(d.users[:3], k=5)
    assert items.shape == (3, 5)
    assert len(rec.history_["loss"]) == len(rec.history_["seconds"])  # only completed epochs are listed
    # The interrupted model trains on: partial_fit continues from where Ctrl-C left it.
    rec.partial_fit(d.users[:1000], d.items[:1000], d.ratings[:1000])
    assert np.isfinite(rec.history_["loss"][-1])


def test_ctrl_c_in_mlp_fit_warns_like_scikit_learn():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20_000, 50)).astype(np.float32)
    y = X[:, 0] > 0
    clf = fastrec.MLPClassifier((64,), batch_size=32, max_iter=10_000, tol=0, n_iter_no_change=10**6,
                                random_state=0, n_threads=1)
    timer = _interrupt_after(1.0)
    try:
        with pytest.warns(UserWarning, match="interrupted"):
            clf.fit(X, y)
    finally:
        timer.cancel()
    assert clf.n_iter_ < 10_000
    assert clf.score(X, y) > 0.9


def test_add_features_makes_cold_items_scoreable_without_training():
    d = make_interactions(n_users=200, n_items=120, n_interactions=4000, random_state=2)
    known = d.items < 100
    table = d.item_features
    rec = fastrec.Recommender(early_stopping=False, epochs=3, wide=True, random_state=0, n_threads=1)
    rec.fit(d.users[known], d.items[known], d.ratings[known],
            item_features=FeatureTable(table.ids[:100], multi_hot={"genres": (table.multi_hot["genres"][0][:100],
                                                                              table.multi_hot["genres"][1])},
                                       numeric={"year": table.numeric["year"][:100]}))
    params = [a.copy() for a in _params(rec)]
    cold = np.arange(100, 120)
    before = rec.predict(np.zeros(20, np.int64), cold)
    assert np.allclose(before, before[0])  # unknown items without features all score alike
    known_before = rec.predict(d.users[known][:30], d.items[known][:30])
    rec.add_features(item_features=table)
    assert rec.n_items_ == 120
    after = rec.predict(np.zeros(20, np.int64), cold)
    assert len(np.unique(np.round(after, 6))) > 10  # now each is scored from its own genres and year
    assert all(np.array_equal(a, b) for a, b in zip(params, _params(rec)))  # no training happened
    top, _ = rec.recommend(0, k=120)
    assert set(cold) <= set(top.tolist())  # cold items are candidates of recommend
    # Items known before keep their features, hence their scores.
    np.testing.assert_array_equal(rec.predict(d.users[known][:30], d.items[known][:30]), known_before)


def test_rejected_partial_fit_leaves_the_model_unchanged(data, tmp_path):
    rec = fastrec.Recommender(early_stopping=False, epochs=1, wide=True, random_state=0, n_threads=1).fit(
        data.users, data.items, data.ratings, item_features=data.item_features)
    rec.save(tmp_path / "before.fastrec")
    before = fastrec.load(tmp_path / "before.fastrec")
    # New int users are added before the string items fail to match the int item ids.
    with pytest.raises(TypeError):
        rec.partial_fit(np.array([10_000, 10_001]), np.array(["a", "b"]), [3.0, 4.0])
    bad_year = FeatureTable(np.array([10_000]), numeric={"year": np.ones((1, 2), np.float32)})
    with pytest.raises(ValueError, match="year"):
        rec.partial_fit(np.array([1]), np.array([10_000]), [3.0], item_features=bad_year)
    pa, pb = _params(rec), _params(before)
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb)) and len(pa) == len(pb)
    assert rec.n_users_ == before.n_users_ and len(rec._users) == len(before._users)
    np.testing.assert_array_equal(rec.predict(data.users[:50], data.items[:50]),
                                  before.predict(data.users[:50], data.items[:50]))
    rec.partial_fit(np.array([10_000]), np.array([data.items[0]]), [4.0])  # and it still trains
    assert rec.n_users_ == before.n_users_ + 1

    model = fastrec.FieldModel(epochs=1, random_state=0, n_threads=1).fit({"c": np.arange(6)}, np.arange(6) % 2)
    with pytest.raises(ValueError, match="0/1"):
        model.partial_fit({"c": np.array([7, 8])}, [0.5, 2.0])
    assert len(model._vocab_["c"]) == 6 and model.net_.tables[0].shape[0] == 7
    assert np.isfinite(model.predict_proba({"c": np.array([7])})).all()  # 7 is still simply unknown


def test_add_features_and_partial_fit_with_history_fields():
    d = make_interactions(n_users=120, n_items=80, n_interactions=2500, random_state=4)
    first = d.users < 100
    ut = d.user_features
    rec = fastrec.Recommender(early_stopping=False, epochs=1, user_history=True, item_history=True, random_state=0, n_threads=1)
    rec.fit(d.users[first], d.items[first], d.ratings[first],
            user_features=FeatureTable(ut.ids[:100], categorical={"segment": ut.categorical["segment"][:100]}))
    rec.add_features(user_features=ut)  # users 100..119: known by their segment only, empty histories
    assert rec.n_users_ == 120
    assert np.isfinite(rec.predict(np.arange(100, 120), np.zeros(20, np.int64))).all()
    rec.partial_fit(d.users[~first], d.items[~first], d.ratings[~first])
    user_history = [i for i, f in enumerate(rec.net_.fields) if f.name == "user_history"][0]
    indptr = rec._bags[user_history][0]
    entity = rec._users.index(np.array([d.users[~first][0]]))[0]
    assert indptr[entity + 1] - indptr[entity] == len(np.unique(d.items[d.users == d.users[~first][0]]))
