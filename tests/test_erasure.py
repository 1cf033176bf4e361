"""forget_users / forget_items and save(include_history=False): what a re-saved file may still hold."""

import json
import zipfile

import numpy as np
import pytest

import fastrec
from fastrec.datasets import make_interactions

TINY = dict(embedding_dim=8, hidden_layer_sizes=(16,), epochs=2, early_stopping=False, random_state=0,
            n_threads=1)
GONE_USERS = ["user_0007", "user_0042", "user_0105"]
GONE_ITEMS = ["item_0003", "item_0077"]


@pytest.fixture(scope="module")
def data():
    d = make_interactions(n_users=150, n_items=90, n_interactions=3000, implicit=True, random_state=0)
    # String ids that can be searched for in a file's metadata and arrays.
    return np.array([f"user_{u:04d}" for u in d.users]), np.array([f"item_{i:04d}" for i in d.items])


def _file_contents(path):
    """(metadata text, every array) of a saved model file."""
    with zipfile.ZipFile(path) as z:
        meta = z.read("fastrec.json").decode()
        json.loads(meta)
    with np.load(path, allow_pickle=False) as archive:
        arrays = [archive[name] for name in archive.files if name.startswith("arrays/")]
    return meta, arrays


def _assert_absent(path, ids, rows):
    """No id of `ids` in the file's metadata or string arrays; no row of `rows` (float32 vectors) as a row of
    any float32 array with that width."""
    meta, arrays = _file_contents(path)
    for i in ids:
        assert i not in meta
    for a in arrays:
        if a.dtype.kind == "U":
            assert not np.isin(a, ids).any()
        if a.dtype == np.float32 and a.ndim == 2 and len(rows):
            for r in rows:
                if a.shape[1] == len(r) and np.any(r != 0):
                    assert not (a == r).all(axis=1).any()


def _recommender_rows(model, ids):
    """The user id-embedding rows of these users (Recommender: field 0 is the user id field)."""
    entities = model._users.index(np.array(ids))
    return model.net_.tables[0][model._bags[0][1][entities]].copy()


def test_recommender_forget_users_leaves_no_trace(data, tmp_path):
    users, items = data
    model = fastrec.Recommender(**TINY).fit(users, items)
    rows = _recommender_rows(model, GONE_USERS)
    assert np.all(np.abs(rows).sum(axis=1) > 0)
    model.save(tmp_path / "before.npz")
    _, arrays = _file_contents(tmp_path / "before.npz")  # the check below can fail: they are there before
    assert any(a.dtype.kind == "U" and np.isin(a, GONE_USERS).any() for a in arrays)

    assert model.forget_users(GONE_USERS + ["never_seen"]) is model
    model.save(tmp_path / "after.npz")
    _assert_absent(tmp_path / "after.npz", GONE_USERS, rows)
    loaded = fastrec.load(tmp_path / "after.npz")
    assert loaded.n_users_ == len(np.unique(users)) - len(GONE_USERS)
    seen_u, _ = loaded.seen_pairs()
    assert not np.isin(seen_u, GONE_USERS).any()
    # A forgotten user is an unknown user now.
    unknown = loaded.predict(["nobody"] * 3, items[:3])
    assert np.array_equal(loaded.predict(GONE_USERS, items[:3]), unknown)


def test_forget_keeps_other_users_predictions(data):
    users, items = data
    model = fastrec.Recommender(**TINY, user_history=False, item_history=False).fit(users, items)
    keep = ~np.isin(users, GONE_USERS)
    before = model.predict(users[keep], items[keep])
    recs_before = model.recommend(np.unique(users[keep])[:20], k=5)
    model.forget_users(GONE_USERS)
    # Nothing the remaining users are scored from changed (no history fields): bitwise equal.
    assert np.array_equal(model.predict(users[keep], items[keep]), before)
    recs_after = model.recommend(np.unique(users[keep])[:20], k=5)
    assert np.array_equal(recs_after[0], recs_before[0]) and np.array_equal(recs_after[1], recs_before[1])


@pytest.mark.parametrize("family", ["recommender", "two_tower"])
def test_forget_items_never_recommended(data, family, tmp_path):
    users, items = data
    cls = {"recommender": fastrec.Recommender, "two_tower": fastrec.TwoTower}[family]
    model = cls(**TINY).fit(users, items)
    model.forget_items(GONE_ITEMS)
    assert model.n_items_ == len(np.unique(items)) - len(GONE_ITEMS)
    ids, _ = model.recommend(np.unique(users), k=model.n_items_, exclude_seen=False)
    assert not np.isin(ids, GONE_ITEMS).any()
    assert set(ids[0]) == set(np.unique(items)) - set(GONE_ITEMS)
    _, seen_i = model.seen_pairs()
    assert not np.isin(seen_i, GONE_ITEMS).any()
    model.save(tmp_path / "m.npz")
    _assert_absent(tmp_path / "m.npz", GONE_ITEMS, [])
    similar, _ = fastrec.load(tmp_path / "m.npz").similar_items(np.unique(items)[:4], k=5)
    assert not np.isin(similar, GONE_ITEMS).any()


def test_two_tower_forget_users_zeroes_their_rows(data, tmp_path):
    users, items = data
    model = fastrec.TwoTower(**TINY).fit(users, items)
    tower = model.net_.towers[0]
    rows = tower.tables[0][model._bags["user"][0][1][model._users.index(np.array(GONE_USERS))]].copy()
    model.forget_users(GONE_USERS)
    model.save(tmp_path / "m.npz")
    _assert_absent(tmp_path / "m.npz", GONE_USERS, rows)
    unknown = model.user_vectors(["nobody"])[0]
    assert np.array_equal(model.user_vectors(GONE_USERS), np.tile(unknown, (3, 1)))


def test_ease_forget_equals_fit_without_them(data):
    users, items = data
    model = fastrec.EASE(l2=5.0, n_threads=1).fit(users, items)
    model.forget_users(GONE_USERS).forget_items(GONE_ITEMS)
    keep = ~np.isin(users, GONE_USERS) & ~np.isin(items, GONE_ITEMS)
    fresh = fastrec.EASE(l2=5.0, n_threads=1).fit(users[keep], items[keep])
    assert np.array_equal(model.item_ids_, fresh.item_ids_)
    # The same interactions solved the same way: equal up to float rounding of the Gram sums' order (none
    # here: rows are summed in the same user order), so exactly equal.
    assert np.array_equal(model.weights_, fresh.weights_)


def test_sequential_forget(tmp_path):
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(30), 8)
    items = (np.repeat(rng.integers(0, 20, 30), 8) + np.tile(np.arange(8), 30)) % 20
    times = np.tile(np.arange(8.0), 30)
    model = fastrec.SequentialRecommender(embedding_dim=8, max_len=6, epochs=2, random_state=0,
                                          n_iter_no_change=None, n_threads=1).fit(users, items, times)
    probe = [[1, 2, 3], [5, 6]]
    before = model.recommend(histories=probe, k=5, exclude_seen=False)
    model.forget_users([3, 4])
    after = model.recommend(histories=probe, k=5, exclude_seen=False)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert not np.isin(model.seen_pairs()[0], [3, 4]).any()
    table = model.params_["item_table"].copy()
    model.forget_items([7])
    assert model.params_["item_table"].shape[0] == 19
    assert np.array_equal(model.params_["item_table"], np.delete(table, 7, axis=0))
    ids, _ = model.recommend(np.arange(30)[5:], k=19, exclude_seen=False)
    assert not (ids == 7).any()
    assert not (model.seen_pairs()[1] == 7).any()
    model.save(tmp_path / "m.npz")
    loaded = fastrec.load(tmp_path / "m.npz")
    assert np.array_equal(loaded.recommend(np.arange(5, 30), k=3)[0], model.recommend(np.arange(5, 30), k=3)[0])


def test_save_without_history(data, tmp_path):
    users, items = data
    model = fastrec.TwoTower(**TINY).fit(users, items)
    model.save(tmp_path / "bare.npz", include_history=False)
    loaded = fastrec.load(tmp_path / "bare.npz")
    # No seen pairs in the file: the largest integer arrays are the id mappings, not n_interactions long.
    _, arrays = _file_contents(tmp_path / "bare.npz")
    assert max(len(a) for a in arrays if a.dtype.kind == "i" and a.ndim == 1) <= len(np.unique(users)) + 2
    with pytest.raises(ValueError, match="exclude_seen=False"):
        loaded.recommend(users[:3], k=5)
    with pytest.raises(ValueError, match="include_history=False"):
        loaded.seen_pairs()
    a = loaded.recommend(users[:3], k=5, exclude_seen=False)
    b = model.recommend(users[:3], k=5, exclude_seen=False)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # The model in memory keeps its histories.
    assert len(model.seen_pairs()[0]) > 0
    # A new fit on the loaded model is a model with histories again.
    assert len(loaded.fit(users, items).seen_pairs()[0]) > 0


def test_save_without_history_refused_when_parameters_read_it(data, tmp_path):
    users, items = data
    model = fastrec.Recommender(**TINY, user_history=True).fit(users, items)
    with pytest.raises(ValueError, match="user_history"):
        model.save(tmp_path / "m.npz", include_history=False)
    assert not (tmp_path / "m.npz").exists()
    with pytest.raises(ValueError, match="include_history"):
        model.save(tmp_path / "m.npz", include_history="no")


def test_history_scored_families_serve_histories_only(data, tmp_path):
    users, items = data
    model = fastrec.EASE(l2=5.0, n_threads=1).fit(users, items)
    model.save(tmp_path / "e.npz", include_history=False)
    loaded = fastrec.load(tmp_path / "e.npz")
    bags = [list(items[:4]), list(items[10:13])]
    a, b = loaded.recommend(histories=bags, k=5), model.recommend(histories=bags, k=5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    for call in (lambda: loaded.recommend(users[:2], k=5, exclude_seen=False),
                 lambda: loaded.predict(users[:2], items[:2]),
                 lambda: loaded.partial_fit(users[:5], items[:5])):
        with pytest.raises(ValueError, match="include_history=False"):
            call()


def test_sequential_with_item_features_forgets_items(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(20), 6)
    items = rng.integers(0, 15, len(users))
    features = pd.DataFrame({"colour": [f"c{i % 3}" for i in range(15)]}, index=pd.Index(np.arange(15)))
    model = fastrec.SequentialRecommender(embedding_dim=8, max_len=5, epochs=2, random_state=0,
                                          n_iter_no_change=None, n_threads=1)
    model.fit(users, items, item_features=features)
    vectors = model.item_vectors()
    model.forget_items([4, 9])
    ids = list(np.delete(np.arange(15), [4, 9]))
    # The remaining items keep their vectors (id row + feature rows); the forgotten ones are unknown.
    assert np.array_equal(model.item_vectors(ids), vectors[ids])
    assert not np.isin(model.recommend(np.arange(20), k=13, exclude_seen=False)[0], [4, 9]).any()
    model.save(tmp_path / "m.npz")
    assert np.array_equal(fastrec.load(tmp_path / "m.npz").item_vectors(ids), vectors[ids])


@pytest.mark.parametrize("item_based", [True, False])
def test_autorec_forget(item_based, tmp_path):
    d = make_interactions(n_users=80, n_items=50, n_interactions=1500, random_state=2)
    model = fastrec.AutoRec(hidden=16, epochs=2, item_based=item_based, random_state=0, n_threads=1,
                            early_stopping=False).fit(d.users, d.items, d.ratings)
    gone_u, gone_i = np.unique(d.users)[[3, 10]], np.unique(d.items)[[5]]
    keep = ~np.isin(d.users, gone_u) & ~np.isin(d.items, gone_i)
    model.forget_users(gone_u).forget_items(gone_i)
    assert model.n_users_ == len(np.unique(d.users)) - 2 and model.n_items_ == len(np.unique(d.items)) - 1
    su, si = model.seen_pairs()
    assert not np.isin(su, gone_u).any() and not np.isin(si, gone_i).any()
    assert np.isfinite(model.predict(d.users[keep], d.items[keep])).all()
    ids, _ = model.recommend(np.unique(d.users[keep])[:5], k=model.n_items_, exclude_seen=False)
    assert not np.isin(ids, gone_i).any()
    model.save(tmp_path / "m.npz")
    loaded = fastrec.load(tmp_path / "m.npz")
    assert np.array_equal(loaded.predict(d.users[keep], d.items[keep]), model.predict(d.users[keep], d.items[keep]))
    with pytest.raises(ValueError, match="stored ratings"):
        model.save(tmp_path / "bare.npz", include_history=False)


@pytest.mark.parametrize("cls", ["MultVAE", "MultDAE"])
def test_autoencoder_forget(data, cls, tmp_path):
    users, items = data
    model = getattr(fastrec, cls)(epochs=2, random_state=0, n_threads=1, early_stopping=False).fit(users, items)
    bags = [list(items[:5]), list(items[20:26])]
    before = model.recommend(histories=bags, k=10, exclude_seen=False)
    model.forget_users(GONE_USERS)
    after = model.recommend(histories=bags, k=10, exclude_seen=False)
    # Users own no parameters: the same bags score the same.
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    model.forget_items(GONE_ITEMS)
    ids, _ = model.recommend(histories=bags, k=model.n_items_, exclude_seen=False)
    assert not np.isin(ids, GONE_ITEMS).any() and set(ids[0]) == set(np.unique(items)) - set(GONE_ITEMS)
    model.save(tmp_path / "m.npz")
    _assert_absent(tmp_path / "m.npz", GONE_USERS + GONE_ITEMS, [])
    assert np.array_equal(fastrec.load(tmp_path / "m.npz").recommend(histories=bags, k=5)[0],
                          model.recommend(histories=bags, k=5)[0])
