"""Item side features of the sequential model: the core (cpp/sequential.cpp, SeqItemFeatures) against the
NumPy oracle (fastrec.reference.sequential_features_*), and the estimator's `item_features`.

Tolerances as tests/test_sequential_core.py (float32 core vs float64 oracle on the same float32 parameters:
relative error 1e-4 of the largest entry compared; a missing or wrong term shows up as an error of order 1).
"""

import copy
import importlib.util
import pathlib

import numpy as np
import pytest

import fastrec
from fastrec import _core
from fastrec import reference as ref
from fastrec.features import FeatureTable

# The core tests' helpers (pytest's importlib mode does not put tests/ on sys.path).
_spec = importlib.util.spec_from_file_location("_sequential_core_helpers",
                                               pathlib.Path(__file__).with_name("test_sequential_core.py"))
_core_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_core_tests)
arrays, assert_grads_close, batch = _core_tests.arrays, _core_tests.assert_grads_close, _core_tests.batch
copy_params, histories, make_params = _core_tests.copy_params, _core_tests.histories, _core_tests.make_params
rel_err, training, zeros_state = _core_tests.rel_err, _core_tests.training, _core_tests.zeros_state

N_ITEMS = 25
N_FEATURES = 9


def with_features(rng, p, n_items=N_ITEMS, n_features=N_FEATURES, frozen=(3, 7), scale=0.3):
    """p with a feature table and a CSR of 0-4 weighted feature rows per item (some items with none; a
    repeated feature row in one item); items `frozen` have id_trained 0 and a zero id row."""
    d = p["item_table"].shape[1]
    counts = rng.integers(0, 5, n_items)
    counts[0] = 0
    counts[1] = 3
    ids = rng.integers(0, n_features, counts.sum()).astype(np.int32)
    ids[counts[0]:counts[0] + 2] = 4  # item 1 holds feature row 4 twice
    weights = rng.uniform(0.2, 1.5, counts.sum()).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    trained = np.ones(n_items, np.uint8)
    trained[list(frozen)] = 0
    p["item_table"][list(frozen)] = 0
    p["feature_table"] = rng.normal(0, scale, (n_features, d)).astype(np.float32)
    p["item_features"] = (indptr, ids, weights, trained)
    return p


def feature_params(rng, **kw):
    n_items = kw.pop("n_items", N_ITEMS)
    return with_features(rng, make_params(rng, n_items=n_items, **kw), n_items=n_items)


def copy_fparams(p):
    out = copy_params(p)
    out["feature_table"] = p["feature_table"].copy()
    return out


def fzeros_state(p):
    s = zeros_state({k: v for k, v in p.items() if k != "item_features"})
    return s


def test_item_vectors_oracle_is_the_plain_model_on_composite_rows():
    rng = np.random.default_rng(0)
    p = feature_params(rng)
    V = ref.sequential_item_vectors(p)
    indptr, ids, w, _ = p["item_features"]
    i = 1
    want = p["item_table"][i] + sum(w[k] * p["feature_table"][ids[k]] for k in range(indptr[i], indptr[i + 1]))
    np.testing.assert_allclose(V[i], want, rtol=1e-6)
    np.testing.assert_array_equal(V[0], p["item_table"][0])  # no features: the id row
    plain = make_params(rng)
    assert ref.sequential_item_vectors(plain) is plain["item_table"]


@pytest.mark.parametrize("heads", [1, 2])
def test_forward_matches_oracle(heads):
    rng = np.random.default_rng(heads)
    p = feature_params(rng, heads=heads)
    m = _core.SequentialModel(p)
    seqs, _, _ = batch(rng, 9, 7, 1)
    z = m.forward(seqs, False, 1, "auto")
    zr = ref.sequential_features_forward(ref.float64_copy(p), seqs)
    assert rel_err(z, zr) < 1e-4
    np.testing.assert_array_equal(m.forward(seqs, True, 1, "auto"), z[:, -1])
    # the features are read: without them the states differ
    plain = {k: v for k, v in p.items() if k not in ("feature_table", "item_features")}
    assert rel_err(_core.SequentialModel(plain).forward(seqs, False, 1, "auto"), zr) > 1e-2


@pytest.mark.parametrize("dropout,K,softmax", [(0.0, 2, False), (0.3, 3, False), (0.0, 0, True), (0.25, 0, True)])
def test_loss_and_gradients_match_oracle(dropout, K, softmax):
    rng = np.random.default_rng(int(10 * dropout) + K)
    p = feature_params(rng, n_items=11, heads=2)
    seqs, targets, negatives = batch(rng, 8, 7, K, n_items=11)
    seqs[1, -3:] = [3, 7, 3]  # frozen id rows read as inputs, targets and negatives
    targets[1, -3:] = [7, 3, 2]
    negatives[1, -1] = 7
    log_q = rng.normal(0, 0.5, 11).astype(np.float32) if softmax else None
    neg = None if softmax else negatives
    m = _core.SequentialModel(p)
    loss, g = m.loss_and_gradients(seqs, targets, neg, dropout, 777, 1, "auto", log_q)
    loss_r, gr = ref.sequential_features_loss_and_gradients(ref.float64_copy(p), seqs, targets, neg, dropout, 777,
                                                            log_q=log_q)
    assert abs(loss - loss_r) < 1e-5 * abs(loss_r)
    assert_grads_close(g, gr)
    assert rel_err(g["feature_table"], gr["feature_table"]) < 1e-4
    assert np.abs(gr["feature_table"]).max() > 1e-3  # the features get a gradient
    # frozen id rows: no gradient, though their items were read
    assert not g["item_table"][[3, 7]].any()
    # feature rows of no item in the batch: exactly zero
    used = np.unique(np.concatenate([seqs[seqs >= 0], targets[targets >= 0]] +
                                    ([] if softmax else [negatives[targets >= 0].ravel()])))
    indptr, ids, _, _ = p["item_features"]
    read = np.unique(np.concatenate([ids[indptr[i]:indptr[i + 1]] for i in used]))
    assert not g["feature_table"][np.setdiff1d(np.arange(N_FEATURES), read)].any()


def test_deterministic_across_thread_counts():
    rng = np.random.default_rng(8)
    p = with_features(rng, make_params(rng, n_items=200, d=32, L=20, heads=2, f=64), n_items=200, n_features=40)
    m = _core.SequentialModel(p)
    seqs, targets, negatives = batch(rng, 192, 20, 2, n_items=200)
    z1 = m.forward(seqs, False, 1, "auto")
    l1, g1 = m.loss_and_gradients(seqs, targets, negatives, 0.2, 9, 1, "auto")
    for n in (2, 3):
        np.testing.assert_array_equal(m.forward(seqs, False, n, "auto"), z1)
        ln, gn = m.loss_and_gradients(seqs, targets, negatives, 0.2, 9, n, "auto")
        assert ln == l1
        for (name, a), (_, b) in zip(arrays(gn), arrays(g1)):
            np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(gn["feature_table"], g1["feature_table"])
    # whole Adam epochs
    indptr, items, seen = histories(rng, 300, 200)
    order = rng.permutation(300).astype(np.int64)
    outs = []
    for n in (1, 2, 3):
        q = copy_fparams(p)
        q["item_features"] = p["item_features"]
        s1, s2 = fzeros_state(q), fzeros_state(q)
        mq = _core.SequentialModel(q, True)
        mq.train_epoch(s1, s2, indptr, items, order, 50, training(seen, n_items=200), 0.2, "adam", 1e-2, 0.9,
                       0.98, 1e-8, 0, 0, n, "auto")
        outs.append((q, s1))
    for q, s1 in outs[1:]:
        for (name, a), (_, b) in zip(arrays(q), arrays(outs[0][0])):
            np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(q["feature_table"], outs[0][0]["feature_table"])
        np.testing.assert_array_equal(s1["feature_table"], outs[0][1]["feature_table"])


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_sgd_epoch_matches_oracle(dropout):
    """Plain SGD: each step's change of every array, feature table included, is the oracle's gradient times
    the learning rate (compared on the change, as tests/test_sequential_core.py); frozen id rows never move."""
    rng = np.random.default_rng(10)
    p = feature_params(rng)
    p0 = copy_fparams(p)
    p0["item_features"] = p["item_features"]
    m = _core.SequentialModel(p, True)
    indptr, items, seen = histories(rng, 10, N_ITEMS)
    items[items == 5] = 3  # a frozen item in the histories
    order = np.arange(10, dtype=np.int64)
    tr = training(seen)
    del tr["seen"]  # (the seen lists no longer match the histories)
    lr = 0.05
    m.train_epoch(None, None, indptr, items, order, 6, tr, dropout, "sgd", lr, 0.9, 0.999, 1e-8, 0, 0, 1, "auto")
    pr = ref.float64_copy(p0)
    for seqs, targets, negatives, stream in m.epoch_batches(indptr, items, order, 6, tr, 0):
        _, g = ref.sequential_features_loss_and_gradients(pr, seqs, targets, negatives, dropout, stream)
        for (name, a), (_, b) in zip(arrays(pr), arrays(g)):
            a -= lr * b
        pr["feature_table"] -= lr * g["feature_table"]
    for (name, a), (_, b), (_, a0) in zip(arrays(p), arrays(pr), arrays(p0)):
        change, want = a.astype(np.float64) - a0, b - a0
        if name.endswith(".bk"):  # zero in exact arithmetic: rounding noise (tests/test_sequential_core.py)
            continue
        assert np.max(np.abs(change - want)) <= 1e-3 * max(np.max(np.abs(want)), 1e-6), name
    change, want = p["feature_table"].astype(np.float64) - p0["feature_table"], pr["feature_table"] - p0["feature_table"]
    assert np.max(np.abs(want)) > 1e-4
    assert np.max(np.abs(change - want)) <= 1e-3 * np.max(np.abs(want))
    assert not p["item_table"][[3, 7]].any()


def test_adam_epoch_updates_feature_rows_lazily():
    """Adam: the feature rows no trained item reads keep their value and state; the others move."""
    rng = np.random.default_rng(11)
    p = feature_params(rng)
    indptr_f, ids, w, trained = p["item_features"]
    # feature row 8 belongs to no item
    ids[ids == 8] = 0
    m = _core.SequentialModel(p, True)
    before = p["feature_table"].copy()
    s1, s2 = fzeros_state(p), fzeros_state(p)
    indptr, items, seen = histories(rng, 12, N_ITEMS)
    out = m.train_epoch(s1, s2, indptr, items, np.arange(12, dtype=np.int64), 4, training(seen), 0.0, "adam", 1e-2,
                        0.9, 0.98, 1e-8, 0, 0, 1, "auto")
    assert out[1] > 0
    np.testing.assert_array_equal(p["feature_table"][8], before[8])
    assert not s1["feature_table"][8].any()
    assert np.abs(p["feature_table"][:8] - before[:8]).max() > 1e-4
    assert not p["item_table"][[3, 7]].any() and not s1["item_table"][[3, 7]].any()


def test_bad_item_features_raise_value_errors():
    rng = np.random.default_rng(12)
    p = feature_params(rng)
    indptr, ids, w, trained = p["item_features"]

    def build(**change):
        q = dict(p)
        q.update(change)
        return _core.SequentialModel(q)

    with pytest.raises(ValueError, match="both"):
        _core.SequentialModel({k: v for k, v in p.items() if k != "item_features"})
    with pytest.raises(ValueError, match="tuple"):
        build(item_features=(indptr, ids, w))
    with pytest.raises(ValueError, match="indptr"):
        build(item_features=(indptr[:-1], ids, w, trained))
    bad = ids.copy()
    bad[0] = N_FEATURES
    with pytest.raises(ValueError, match="feature rows"):
        build(item_features=(indptr, bad, w, trained))
    with pytest.raises(ValueError, match="finite"):
        build(item_features=(indptr, ids, np.where(np.arange(len(w)) == 0, np.nan, w).astype(np.float32), trained))
    with pytest.raises(ValueError, match="id_trained"):
        build(item_features=(indptr, ids, w, trained[:-1]))
    with pytest.raises(TypeError, match="dtype"):
        build(item_features=(indptr, ids.astype(np.int64), w, trained))
    with pytest.raises(ValueError, match="columns"):
        build(feature_table=np.zeros((N_FEATURES, 3), np.float32))
    # Adam without the feature table's state
    m = _core.SequentialModel(p, True)
    hist = histories(rng, 4, N_ITEMS)
    s = zeros_state({k: v for k, v in p.items() if k not in ("item_features", "feature_table")})
    with pytest.raises(ValueError, match="feature_table"):
        m.train_epoch(s, s, hist[0], hist[1], np.arange(4, dtype=np.int64), 2, training(hist[2]), 0.0, "adam",
                      1e-3, 0.9, 0.98, 1e-8, 0, 0, 1, "auto")


# ---- the estimator: SequentialRecommender(item_features=...) ----

pd = pytest.importorskip("pandas")

N_COLORS = 5


def color_walks(n_users=150, n_warm=50, seed=0):
    """Each user's next item is a random item of the next colour (colour = item % 5): the order of colours is
    what there is to learn, and the colour is a feature. Items n_warm .. n_warm + 4 (one per colour) are in the
    feature table only."""
    rng = np.random.default_rng(seed)
    users, items, times = [], [], []
    for u in range(n_users):
        c = rng.integers(N_COLORS)
        for t in range(rng.integers(6, 14)):
            users.append(u)
            items.append(N_COLORS * rng.integers(n_warm // N_COLORS) + c)
            times.append(float(t))
            c = (c + 1) % N_COLORS
    ids = np.arange(n_warm + N_COLORS)
    table = pd.DataFrame({"color": [f"c{i % N_COLORS}" for i in ids],
                          "tags": [["even" if i % 2 == 0 else "odd", "all"] for i in ids],
                          "size": rng.normal(10, 3, len(ids))}, index=ids)
    return np.array(users), np.array(items), np.array(times), table


TYPES = {"color": "categorical", "tags": "multi_hot", "size": "numeric"}


def seq_model(**kw):
    params = dict(embedding_dim=16, max_len=8, epochs=30, batch_size=32, learning_rate=5e-3, dropout=0.0,
                  random_state=0, n_iter_no_change=None, n_threads=1)
    params.update(kw)
    return fastrec.SequentialRecommender(**params)


@pytest.fixture(scope="module")
def colors():
    return color_walks()


@pytest.fixture(scope="module")
def fitted(colors):
    users, items, times, table = colors
    return seq_model().fit(users, items, times, item_features=table, feature_types=TYPES)


def test_item_vectors_are_id_rows_plus_features(fitted):
    p = fitted.params_
    V = ref.sequential_item_vectors(p)
    np.testing.assert_allclose(fitted.item_vectors(), V, rtol=1e-6, atol=1e-7)
    # the features are encoded as the Recommender's: 5 colours + the unknown value, 2 tags + 1 numeric column
    assert p["feature_table"].shape == (N_COLORS + 1 + 3 + 1, 16)
    cold = fitted._items.index(np.arange(50, 55)) - 1
    assert not p["item_table"][cold].any()  # items only in the table: their features alone
    assert p["item_features"][3][cold].sum() == 0 and p["item_features"][3].sum() == 50


def test_cold_items_are_recommended_from_their_features(fitted, colors):
    """Among the five items known only by their features, the one of the colour that follows the user's
    latest item ranks first far above chance (1 in 5): the colour embedding carries what was learnt."""
    users, items, times, _ = colors
    latest = {}
    for u, i, t in sorted(zip(users, items, times), key=lambda e: (e[0], e[2])):
        latest[u] = i
    us = np.array(sorted(latest))
    top, _ = fitted.recommend(us, k=1, items=np.arange(50, 55))
    want = 50 + (np.array([latest[u] for u in us]) + 1) % N_COLORS
    assert np.mean(top[:, 0] == want) > 0.8
    # and all items, cold ones included, are candidates of a plain recommend
    ids, _ = fitted.recommend(us[:40], k=55, exclude_seen=False)
    assert set(range(50, 55)) <= set(ids.ravel().tolist())


def test_histories_equal_trained_users_and_threads_give_the_same_model(fitted, colors):
    users, items, times, table = colors
    order = np.lexsort((times, users))
    hist = items[order][users[order] == 3].tolist()
    a = fitted.recommend([3], k=10)
    b = fitted.recommend(histories=[hist], k=10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    two = seq_model(n_threads=2, epochs=3).fit(users, items, times, item_features=table, feature_types=TYPES)
    one = seq_model(n_threads=1, epochs=3).fit(users, items, times, item_features=table, feature_types=TYPES)
    np.testing.assert_array_equal(one.params_["feature_table"], two.params_["feature_table"])
    np.testing.assert_array_equal(one.params_["item_table"], two.params_["item_table"])
    np.testing.assert_array_equal(one.recommend([0, 1], k=5)[1], two.recommend([0, 1], k=5)[1])


def test_save_load_round_trip_with_features(fitted, tmp_path, colors):
    users, items, times, table = colors
    path = tmp_path / "seq.fastrec"
    fitted.save(path)
    for loaded in (fastrec.load(path), fastrec.load(path, mmap=True)):
        assert "_item_matrix" in loaded.__dict__  # the composite table is built on load
        for a, b in zip(loaded.recommend([0, 5, 9], k=7), fitted.recommend([0, 5, 9], k=7)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(loaded.item_vectors(), fitted.item_vectors())
    # training goes on identically after a load; a cold item with an event gets a trained id row
    again = fastrec.load(path)
    base = copy.deepcopy(fitted)
    new = pd.DataFrame({"color": ["c1"], "tags": [["odd"]], "size": [12.0]}, index=[77])
    for m in (again, base):
        m.partial_fit([0, 0, 1], [51, 77, 52], [100.0, 101.0, 100.0], item_features=new)
    np.testing.assert_array_equal(again.params_["feature_table"], base.params_["feature_table"])
    np.testing.assert_array_equal(again.item_vectors(), base.item_vectors())
    rows = base._items.index(np.array([51, 77, 53])) - 1
    assert base.params_["item_features"][3][rows].tolist() == [1, 1, 0]
    assert base.params_["item_table"][rows[:2]].any(axis=1).all() and not base.params_["item_table"][rows[2]].any()
    # item 77's features: colour c1 (row 2 of colours c0..c4 after the unknown value 0), the mean of bag {odd}
    # (tags all, even, odd: rows 6-8), its standardised size (row 9)
    indptr, ids, weights, _ = base.params_["item_features"]
    assert ids[indptr[rows[1]]:indptr[rows[1] + 1]].tolist() == [2, 8, 9]
    mean, std = base._numeric_stats_["item"]["size"]
    np.testing.assert_allclose(weights[indptr[rows[1]]:indptr[rows[1] + 1]], [1, 1, (12 - mean[0]) / std[0]],
                               rtol=1e-6)
    F = base.params_["feature_table"]
    np.testing.assert_allclose(base.item_vectors([77])[0], base.params_["item_table"][rows[1]] +
                               F[2] + F[8] + weights[indptr[rows[1]] + 2] * F[9], rtol=1e-5, atol=1e-6)


def test_add_features_makes_new_items_recommendable(colors):
    users, items, times, table = colors
    m = seq_model(epochs=2).fit(users, items, times, item_features=table.iloc[:50], feature_types=TYPES)
    assert 53 not in set(m.item_ids_.tolist())
    m.add_features(item_features=table.iloc[50:])
    ids, scores = m.recommend([0], k=3, items=[53, 54, 999])
    assert ids[0, :2].tolist() in ([53, 54], [54, 53]) and np.isfinite(scores[0, :2]).all()
    np.testing.assert_allclose(m.item_vectors([53])[0], ref.sequential_item_vectors(m.params_)[-2], rtol=1e-6)


def test_items_missing_from_the_table_read_unknown_values(colors):
    users, items, times, table = colors
    m = seq_model(epochs=1).fit(users, items, times, item_features=table.drop(index=[0, 5]), feature_types=TYPES)
    row = m._items.index(np.array([0]))[0] - 1
    indptr, ids, weights, _ = m.params_["item_features"]
    assert ids[indptr[row]:indptr[row + 1]].tolist() == [0]  # the colour's unknown value, no tags, no size
    F, E = m.params_["feature_table"], m.params_["item_table"]
    np.testing.assert_array_equal(m.item_vectors([0])[0], E[row] + F[0])


def test_bad_item_features(colors):
    users, items, times, table = colors
    with pytest.raises(TypeError, match="item_features"):
        seq_model(epochs=1).fit(users, items, times, item_features=[[1, 2]])
    with pytest.raises(TypeError, match="mix strings and integers"):
        seq_model(epochs=1).fit(users, items, times, item_features=table.set_index(table.index.astype(str) + "x"),
                                feature_types=TYPES)
    with pytest.raises(ValueError, match="none of the items"):
        seq_model(epochs=1).fit(users, items, times, item_features=table.set_index(table.index + 1000),
                                feature_types=TYPES)
    with pytest.raises(ValueError, match="no columns"):
        seq_model(epochs=1).fit(users, items, times, item_features=FeatureTable(np.arange(55)))
    with pytest.raises(ValueError, match="feature_types"):
        seq_model(epochs=1).fit(users, items, times, item_features=table, feature_types={"nope": "numeric"})
    plain = seq_model(epochs=1).fit(users, items, times)
    with pytest.raises(ValueError, match="without item features"):
        plain.partial_fit([0], [1], item_features=table)
    with pytest.raises(ValueError, match="without item features"):
        plain.add_features(item_features=table)
    with pytest.raises(ValueError, match="user features"):
        plain.add_features(user_features=table)
