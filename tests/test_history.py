"""History fields of `fastrec.Recommender` (user_history / item_history: SVD++'s implicit feedback).

What is checked, and against what:

- the bags: each user's bag lists exactly its training items (each item's bag its training users), each once,
  with weight 1/sqrt(bag size), as rows of the other side's id table; unknown entities have empty bags;
- that predict uses them: the core equals the NumPy oracle on the model's spec, and changing one history
  row changes exactly the predictions of the users whose bags hold it;
- partial_fit: new interactions extend the bags, new items grow the table, and a model saved, loaded and
  trained on equals one never saved; determinism across thread counts; bad values raise.

Everything is seeded; models are tiny (<= 3000 interactions) and train with n_threads=1 except where the
thread count is what is tested.
"""

import numpy as np
import pytest

import fastrec
from fastrec import reference
from fastrec.datasets import make_interactions

# float32 core vs float64 oracle on scores of order 1 (the same bound as test_recommender's oracle test:
# observed differences ~1e-7; a missing or wrong bag entry moves a score by >= 1e-4 at these weights).
ORACLE_RTOL = 1e-4


def _field(rec, name):
    return [f.name for f in rec.net_.fields].index(name)


def _bag_contents(rec, name):
    """{raw id: (sorted raw ids of the other side, weights)} of history field `name`, read back through the
    other side's id rows."""
    own, other = (rec._users, rec._items) if name == "user_history" else (rec._items, rec._users)
    other_rows = rec._bags[_field(rec, "item_id" if name == "user_history" else "user_id")][1]
    row_to_raw = {int(r): other.ids[e - 1] for e, r in enumerate(other_rows) if e > 0}
    indptr, ids, weights = rec._bags[_field(rec, name)]
    out = {}
    for e in range(1, len(own) + 1):
        raw = sorted(row_to_raw[int(r)] for r in ids[indptr[e]:indptr[e + 1]])
        out[own.ids[e - 1]] = (raw, weights[indptr[e]:indptr[e + 1]])
    return out, indptr


@pytest.fixture(scope="module")
def data():
    return make_interactions(60, 40, 1500, random_state=11)


@pytest.fixture(scope="module")
def model(data):
    return fastrec.Recommender(early_stopping=False, embedding_dim=8, hidden_layer_sizes=(16,), epochs=3, learning_rate=1e-2,
                               user_history=True, item_history=True, random_state=0, n_threads=1).fit(
        data.users, data.items, data.ratings, item_features=data.item_features)


@pytest.mark.parametrize("name", ["user_history", "item_history"])
def test_bags_hold_the_training_partners_with_svdpp_weights(model, data, name):
    own, other = (data.users, data.items) if name == "user_history" else (data.items, data.users)
    bags, indptr = _bag_contents(model, name)
    assert indptr[1] == 0  # entity 0 (unknown) has an empty bag
    for key in np.unique(own):
        partners = sorted(np.unique(other[own == key]).tolist())  # each partner once, even if repeated
        got, weights = bags[key]
        assert got == partners
        np.testing.assert_allclose(weights, 1.0 / np.sqrt(len(partners)), rtol=1e-6)
    # the table has one row per id row of the other side
    other_field = "item_id" if name == "user_history" else "user_id"
    assert model.net_.tables[_field(model, name)].shape == model.net_.tables[_field(model, other_field)].shape


def test_only_the_asked_fields_exist(data):
    for user, item in ((False, False), (True, False), (False, True)):
        rec = fastrec.Recommender(early_stopping=False, embedding_dim=4, hidden_layer_sizes=(8,), epochs=1, user_history=user,
                                  item_history=item, random_state=0, n_threads=1).fit(data.users, data.items,
                                                                                      data.ratings)
        names = [f.name for f in rec.net_.fields]
        assert ("user_history" in names) == user and ("item_history" in names) == item


def test_predict_uses_the_history_and_matches_the_oracle(model, data):
    users, items = np.repeat(np.arange(-1, 61), 41), np.tile(np.arange(-1, 40), 62)  # unknown ids too
    spec = reference.float64_copy(model.net_.spec(model._bags, model._dense_tables))
    keys = [model._users.index(users), model._items.index(items)]
    want = reference.field_predict(spec, keys) + model.rating_mean_
    got = model.predict(users, items)
    np.testing.assert_allclose(got, want, rtol=ORACLE_RTOL, atol=1e-5)

    # Changing the user-history row of one item changes the scores of exactly the users who rated it.
    item = data.items[0]
    raters = np.unique(data.users[data.items == item])
    table = model.net_.tables[_field(model, "user_history")]
    row = model._bags[_field(model, "item_id")][1][model._items.index(np.array([item]))[0]]
    saved = table[row].copy()
    try:
        table[row] += 0.5
        model._predictor = None
        moved = np.abs(model.predict(users, items) - got) > 1e-6
    finally:
        table[row] = saved
        model._predictor = None
    moved_users = np.unique(users[moved])
    np.testing.assert_array_equal(moved_users, raters)


def test_partial_fit_extends_bags_and_grows_the_table(data):
    first = data.users < 40
    rec = fastrec.Recommender(early_stopping=False, embedding_dim=8, hidden_layer_sizes=(16,), epochs=2, user_history=True,
                              item_history=True, random_state=0, n_threads=1)
    rec.fit(data.users[first], data.items[first], data.ratings[first])
    rows_before = rec.net_.tables[_field(rec, "user_history")].shape[0]
    # old users rate a brand-new item 100; new users 40.. arrive with their interactions
    extra_u = np.concatenate([data.users[~first], [0, 1]])
    extra_i = np.concatenate([data.items[~first], [100, 100]])
    extra_r = np.concatenate([data.ratings[~first], [5.0, 1.0]])
    rec.partial_fit(extra_u, extra_i, extra_r)
    all_u, all_i = np.concatenate([data.users[first], extra_u]), np.concatenate([data.items[first], extra_i])
    assert rec.net_.tables[_field(rec, "user_history")].shape[0] == rows_before + 1  # the new item's row
    assert rec.net_.tables[_field(rec, "item_history")].shape[0] == rec.net_.tables[_field(rec, "user_id")].shape[0]
    for name, own, other in (("user_history", all_u, all_i), ("item_history", all_i, all_u)):
        bags, _ = _bag_contents(rec, name)
        for key in np.unique(own):
            assert bags[key][0] == sorted(np.unique(other[own == key]).tolist()), (name, key)
    assert 100 in bags and bags[100][0] == [0, 1]
    assert np.isfinite(rec.predict([0, 45, 999], [100, 3, 100])).all()


def test_save_load_partial_fit_equals_uninterrupted(data, tmp_path):
    half = data.users < 30
    kw = dict(early_stopping=False, embedding_dim=8, hidden_layer_sizes=(16,), epochs=2, user_history=True, item_history=True,
              random_state=0, n_threads=1)
    a = fastrec.Recommender(**kw).fit(data.users[half], data.items[half], data.ratings[half])
    b = fastrec.Recommender(**kw).fit(data.users[half], data.items[half], data.ratings[half])
    b.save(tmp_path / "b.fastrec")
    b = fastrec.load(tmp_path / "b.fastrec", mmap=True)
    assert b.user_history and b.item_history
    for m in (a, b):
        m.partial_fit(data.users[~half], data.items[~half], data.ratings[~half])
    users, items = np.repeat(np.arange(60), 40), np.tile(np.arange(40), 60)
    np.testing.assert_array_equal(a.predict(users, items), b.predict(users, items))
    for x, y in zip(a._bags, b._bags):
        for p, q in zip(x, y):
            np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("implicit", [False, True])
def test_same_seed_same_model_for_any_thread_count(data, implicit):
    ratings = None if implicit else data.ratings
    kw = dict(early_stopping=False, embedding_dim=8, hidden_layer_sizes=(16,), epochs=2, batch_size=64, user_history=True,
              item_history=True, random_state=3)
    fits = [fastrec.Recommender(n_threads=t, **kw).fit(data.users, data.items, ratings) for t in (1, 2)]
    users, items = np.repeat(np.arange(60), 40), np.tile(np.arange(40), 60)
    np.testing.assert_array_equal(fits[0].predict(users, items), fits[1].predict(users, items))
    for x, y in zip(fits[0].recommend(np.arange(60), k=5), fits[1].recommend(np.arange(60), k=5)):
        np.testing.assert_array_equal(x, y)
    # and the history changes the model (same seed without it differs)
    plain = fastrec.Recommender(n_threads=1, **{**kw, "user_history": False, "item_history": False}).fit(
        data.users, data.items, ratings)
    assert np.max(np.abs(plain.predict(users, items) - fits[0].predict(users, items))) > 1e-3


@pytest.mark.parametrize("name", ["user_history", "item_history"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_values_raise(data, name, value):
    with pytest.raises(ValueError, match=name):
        fastrec.Recommender(**{name: value}).fit(data.users, data.items, data.ratings)
