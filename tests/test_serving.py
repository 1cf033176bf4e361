"""The single-row serving paths (issue 17): the row product at widths the one-row MLP uses, the core's id
lookup, and FieldModel's one-row dict after partial_fit added ids (the lookup through the order array)."""

import numpy as np
import pytest

from fastrec import _core


@pytest.mark.parametrize("N", [129, 200, 256, 257, 300, 520])
def test_row_product_matches_float64_and_is_the_same_for_any_row_count(isa, rng, N):
    """Up to 4 rows run row by row (the row kernel: groups of up to 256 columns). Tolerance 1e-5 relative:
    float32 sums of at most 300 products of standard normals against the float64 product."""
    for K in (1, 17, 256, 300):
        a = rng.standard_normal((3, K)).astype(np.float32)
        b = rng.standard_normal((K, N)).astype(np.float32)
        want = a.astype(np.float64) @ b.astype(np.float64)
        c = _core.sgemm(a, b, False, False, isa, 1)
        assert np.abs(c - want).max() <= 1e-5 * np.abs(want).max() * np.sqrt(K), (N, K)
        one = _core.sgemm(a[1:2], b, False, False, isa, 1)  # one row: the same chains as in the 3-row call
        assert one.tobytes() == c[1:2].tobytes(), (N, K)


def test_id_lookup_equals_the_index():
    from fastrec._fieldnet import IdIndex

    index = IdIndex(np.array([40, 7, 10**12, 0], np.int64))
    index.add(np.array([-3, 5], np.int64))  # ids added after the first: looked up through the order array
    assert index._order is not None
    order = None if index._order is None else np.require(index._order, np.int64, ["C", "A"])
    lookup = _core.IdLookup(np.require(index._sorted, np.int64, ["C", "A"]), order)
    for x in [40, -3, 5, 7, 10**12, 0, 1, -4, 2**62]:
        assert lookup(x) == index.index_one(x), x
    with pytest.raises(TypeError):
        lookup(2**70)  # beyond int64: the Python layer takes the general path, which reports it
    with pytest.raises(ValueError, match="order"):
        _core.IdLookup(np.arange(3, dtype=np.int64), np.arange(2, dtype=np.int64))


def test_field_model_one_row_after_partial_fit_equals_batch_path():
    import fastrec

    rng = np.random.default_rng(2)
    n = 2000
    X = {"user": rng.integers(0, 200, n), "item": rng.integers(0, 100, n), "x": rng.normal(size=n)}
    y = (rng.random(n) < 0.4).astype(int)
    model = fastrec.FieldModel(epochs=1, random_state=0, n_threads=1).fit(X, y)
    # ids below and above the old ones: the vocabulary's sorted order now needs its order array
    model.partial_fit({"user": np.array([-9, 500]), "item": np.array([-1, 7]), "x": np.array([0.1, 0.2])},
                      np.array([1, 0]))
    probe = {"user": np.array([-9, 500, 3, 10**6]), "item": np.array([7, -1, 99, -50]),
             "x": np.array([0.0, 1.0, -1.0, 2.0])}
    batch = model.predict_proba(probe)
    for j in range(4):
        one = model.predict_proba({k: [int(v[j])] if k != "x" else [float(v[j])] for k, v in probe.items()})
        assert model._serve not in (None, False)
        assert np.array_equal(one, batch[j:j + 1]), j


def _recommender(rng, **kw):
    pd = pytest.importorskip("pandas")  # the item feature table (the test extra installs it)

    import fastrec

    n, n_users, n_items = 3000, 120, 300
    users, items = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    ratings = rng.integers(1, 6, n).astype(np.float64)
    features = pd.DataFrame({"genre": rng.integers(0, 7, n_items).astype(str), "year": rng.normal(2000, 10, n_items)},
                            index=pd.Index(np.arange(n_items), name="item"))
    model = fastrec.Recommender(hidden_layer_sizes=(32, 16), epochs=1, early_stopping=False, random_state=0,
                                n_threads=1, **kw)
    return model.fit(users, items, ratings, item_features=features), users, items


def test_recommender_serving_handle_equals_predict_bitwise_and_follows_the_model(rng):
    """The handle's float is predict's float64 value, bit for bit (the same one-row core path after the same
    lookups); unknown ids score from the unknown rows, as predict does; partial_fit's new ids and parameters
    are seen by a handle made before it. The batch path (more than 16 pairs) is the reference."""
    model, users, items = _recommender(rng)
    handle = model.serving_handle()
    probe_u = np.concatenate([users[:30], [10**9, -5, 7]])
    probe_i = np.concatenate([items[:30], [3, 10**12, -1]])
    batch = model.predict(probe_u, probe_i)  # 33 pairs: the batch tables
    for u, i, want in zip(probe_u.tolist(), probe_i.tolist(), batch):
        got = handle(u, i)
        assert type(got) is float and got == want, (u, i)
    model.partial_fit(np.array([10**9, 5]), np.array([3, 10**12]), np.array([5.0, 1.0]))
    after = model.predict(probe_u, probe_i)
    assert not np.array_equal(after, batch)
    assert [handle(u, i) for u, i in zip(probe_u.tolist(), probe_i.tolist())] == after.tolist()


def test_recommender_small_int_arrays_equal_the_batch_path(rng):
    """predict of 2..16 pairs of int ids runs row by row in the core: the same bits as the batch path (rows
    of a longer call), for int64 and int32 arrays."""
    model, users, items = _recommender(rng)
    probe_u = np.concatenate([users[:40], [10**9]])
    probe_i = np.concatenate([items[:40], [-1]])
    batch = model.predict(probe_u, probe_i)
    for lo, hi in ((0, 2), (3, 19), (25, 41)):
        small = model.predict(probe_u[lo:hi], probe_i[lo:hi])
        assert small.dtype == np.float64 and np.array_equal(small, batch[lo:hi]), (lo, hi)
        assert np.array_equal(model.predict(probe_u[lo:hi].astype(np.int32), probe_i[lo:hi].astype(np.int32)),
                              batch[lo:hi])


def test_recommender_serving_handle_bad_input_names_the_argument(rng):
    model, _, _ = _recommender(rng)
    handle = model.serving_handle()
    with pytest.raises(TypeError, match="user"):
        handle(1.5, 2)
    with pytest.raises(TypeError, match="item"):
        handle(1, [1, 2])
    with pytest.raises(ValueError, match="item"):
        handle(1, None)
    with pytest.raises(ValueError, match="user"):
        handle(2**70, 1)  # beyond int64 (the core's lookup refuses it; the general path says why)


def test_recommender_serving_handle_with_string_ids(rng):
    import fastrec

    n = 1500
    users = np.array([f"u{x}" for x in rng.integers(0, 60, n)])
    items = np.array([f"i{x}" for x in rng.integers(0, 80, n)])
    model = fastrec.Recommender(epochs=1, early_stopping=False, random_state=0, n_threads=1).fit(
        users, items, rng.integers(1, 6, n).astype(np.float64))
    handle = model.serving_handle()
    batch = model.predict(users[:20], items[:20])
    assert [handle(u, i) for u, i in zip(users[:20].tolist(), items[:20].tolist())] == batch.tolist()


def _field_rows(rng, n, n_users=150):
    return {"user": rng.integers(0, n_users, n), "item": np.array([f"i{x}" for x in rng.integers(0, 60, n)]),
            "tag": rng.integers(0, 10**9, n), "word": np.array([f"w{x}" for x in rng.integers(0, 500, n)]),
            "price": rng.normal(10, 3, n)}


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_field_model_serving_handle_equals_predict_bitwise(rng, loss):
    """Int ids (the core's lookup), string ids (the index's lookup), hashed int and str values, a numeric
    column given as float, int or numpy scalar: the handle's float is predict_proba's [0, 1] (bce) or
    predict's value (mse) of the same row through the batch path, bit for bit; unknown ids included."""
    import fastrec

    X = _field_rows(rng, 2000)
    y = (rng.random(2000) < 0.4).astype(int) if loss == "bce" else rng.normal(3, 1, 2000)
    model = fastrec.FieldModel(loss=loss, fields={"tag": {"hash_buckets": 997}, "word": {"hash_buckets": 101}},
                               hidden_layer_sizes=(32, 16), epochs=1, random_state=0, n_threads=1).fit(X, y)
    probe = _field_rows(rng, 24, n_users=300)  # half the users unknown
    probe["price"][3] = 12  # an int-valued float
    batch = model.predict_proba(probe)[:, 1] if loss == "bce" else model.predict(probe)
    handle = model.serving_handle()
    for j in range(24):
        row = {k: v[j].item() for k, v in probe.items()}
        if j % 3 == 1:
            row["price"] = np.float64(row["price"])  # numpy scalars
            row["user"] = np.int64(row["user"])
        if j == 3:
            row["price"] = 12  # a Python int
        got = handle(row)
        assert type(got) is float and got == batch[j], j
        one = model.predict_proba({k: v[j:j + 1] for k, v in probe.items()})[0, 1] if loss == "bce" else \
            model.predict({k: v[j:j + 1] for k, v in probe.items()})[0]
        assert one == batch[j], j


def test_field_model_serving_handle_follows_partial_fit_and_reports_bad_input(rng):
    import fastrec

    X = _field_rows(rng, 1000)
    y = (rng.random(1000) < 0.4).astype(int)
    model = fastrec.FieldModel(fields={"tag": {"hash_buckets": 997}}, hidden_layer_sizes=(16,), epochs=1,
                               random_state=0, n_threads=1).fit(X, y)
    handle = model.serving_handle()
    row = {"user": 10**7, "item": "new", "tag": 5, "word": "w1", "price": 1.0}
    before = handle(row)
    model.partial_fit({k: [v] for k, v in row.items()}, [1])
    assert handle(row) == model.predict_proba({k: [v] for k, v in row.items()})[0, 1] != before
    with pytest.raises(TypeError, match="row"):
        handle([1, 2, 3])
    with pytest.raises(ValueError, match="price"):
        handle({**row, "price": float("nan")})
    with pytest.raises((KeyError, ValueError), match="word"):
        handle({k: v for k, v in row.items() if k != "word"})
    with pytest.raises((TypeError, ValueError), match="user"):
        handle({**row, "user": 1.5})


@pytest.mark.parametrize("N", [64, 128, 192, 256, 320, 512])
def test_row_product_skipping_zeros_is_the_blocked_product(isa, rng, N):
    """A one-row product whose input is mostly zeros (a hidden layer after ReLU) skips those rows of B: each
    column's chain is the blocked micro-kernel's (fma(0, b, acc) = acc), so the row equals its row of a
    16-row (packed, blocked) call bit for bit; and it stays within float32 rounding of the float64 product
    (1e-5 relative per sqrt(K), as above)."""
    for K, zeros in ((17, 0.5), (256, 0.5), (300, 0.9), (300, 0.3), (520, 0.6)):
        a = np.maximum(rng.standard_normal((16, K)), 0).astype(np.float32)
        a[rng.random((16, K)) < zeros] = 0.0
        b = rng.standard_normal((K, N)).astype(np.float32)
        blocked = _core.sgemm(a, b, False, False, isa, 1)
        want = a.astype(np.float64) @ b.astype(np.float64)
        assert np.abs(blocked - want).max() <= 1e-5 * np.abs(want).max() * np.sqrt(K), (N, K)
        for j in (0, 7, 15):
            one = _core.sgemm(a[j:j + 1], b, False, False, isa, 1)
            assert one.tobytes() == blocked[j:j + 1].tobytes(), (N, K, j)


def _outcome(fn):
    """fn()'s value (as bytes of a float64 array) or its exception's type and message."""
    try:
        return ("value", np.asarray(fn(), np.float64).tobytes())
    except Exception as e:  # noqa: BLE001 - the outcome itself is compared
        return ("error", type(e), str(e))


def test_recommender_predict_fast_calls_equal_the_checked_path(rng):
    """predict([u], [i]) of two Python ints runs through the pair scorer's C function (PairScorer.fast_calls):
    a float64 array of one, bit for bit the batch path's value, unknown ids included (the unknown rows). The C
    functions return None for anything but two one-element lists of Python ints within int64 (predict_lists) or
    two such ints (score_ints)."""
    model, users, items = _recommender(rng)
    probe_u = np.concatenate([users[:30], [10**9, -5, 7, 2**63 - 1]])
    probe_i = np.concatenate([items[:30], [3, 10**12, -1, -2**63]])
    batch = model.predict(probe_u, probe_i)  # 34 pairs: the batch tables
    model.predict([int(users[0])], [int(items[0])])  # builds the scorer
    assert model._fast[0] is model._predictor
    predict_lists, score_ints = model._fast[1:3]
    for u, i, want in zip(probe_u.tolist(), probe_i.tolist(), batch):
        fast = predict_lists([u], [i])
        assert fast is not None and fast.dtype == np.float64 and fast.shape == (1,) and fast[0] == want, (u, i)
        got = model.predict([u], [i])
        assert got.dtype == np.float64 and got.tobytes() == fast.tobytes(), (u, i)
        assert score_ints(u, i) == want and type(score_ints(u, i)) is float, (u, i)
    u0, i0 = int(users[0]), int(items[0])
    for args in [([u0], [i0, i0]), ((u0,), [i0]), ([np.int64(u0)], [i0]), ([True], [i0]), ([u0], [float(i0)]),
                 ([2**63], [i0]), ([u0], [-2**63 - 1]), ([str(u0)], [i0]), ([u0], []), (u0, i0), ([u0],)]:
        assert predict_lists(*args) is None, args
    for args in [(np.int64(u0), i0), (True, i0), (u0, 2**64), (1.0, i0), ("1", i0), (u0,), (u0, i0, 0)]:
        assert score_ints(*args) is None, args
    assert predict_lists(*([u0], [i0])).tobytes() == model.predict(np.array([u0]), np.array([i0])).tobytes()


@pytest.mark.parametrize("users, items", [
    ([2**70], [1]), ([1], [2**64]), ([True], [1]), ([1.5], [2]), (["5"], [2]), ([1, 2], [3]), ([[1]], [2]),
    ((1,), (2,)), ([np.int32(3)], [np.int64(4)]), ([], []), ([None], [1]),
])
def test_recommender_predict_fast_path_falls_back_with_the_checked_behaviour(rng, users, items):
    """Inputs the C function declines go through predict's checks: the same value or the same error as on a
    model whose fast path was never built (its first predict call takes the checked path)."""
    fresh, _, _ = _recommender(np.random.default_rng(5))  # two equal models: one fitted the same way
    model, _, _ = _recommender(np.random.default_rng(5))
    want = _outcome(lambda: fresh.predict(users, items))
    model.predict([1], [2])  # the fast path now built
    assert model.__dict__.get("_fast") is not None
    assert _outcome(lambda: model.predict(users, items)) == want


def test_recommender_pair_scorer_copies_follow_partial_fit_not_in_place_edits(rng):
    """The pair scorer reads aligned copies of the MLP made with it: partial_fit (a new prediction handle) is
    seen by the next predict([u], [i]) through a new scorer; an in-place edit of net_.coefs is not seen by the
    fast path until the handle is rebuilt (documented), after which it equals the batch path again."""
    model, users, items = _recommender(rng)
    u, i = [int(users[1])], [int(items[1])]
    before = model.predict(u, i)
    scorer = model._fast[3]
    model.partial_fit(users[:50], items[:50], np.full(50, 5.0))
    after = model.predict(u, i)
    assert model._fast[3] is not scorer and after[0] != before[0]
    assert after.tobytes() == model.predict(np.repeat(u, 20), np.repeat(i, 20))[:1].tobytes()
    model.net_.coefs[0] *= 2.0  # in place: the handle's arrays change under it, the scorer's copies do not
    assert model.predict(u, i).tobytes() == after.tobytes()
    model._predictor = None  # rebuilt: a new scorer copies the edited weights
    edited = model.predict(u, i)
    assert edited[0] != after[0]
    assert edited.tobytes() == model.predict(np.repeat(u, 20), np.repeat(i, 20))[:1].tobytes()


@pytest.mark.parametrize("N", [64, 256, 320])
def test_row_product_over_64_byte_aligned_rows_is_the_blocked_product(isa, rng, N):
    """B on 64-byte boundaries (the pair scorer's weight copies) takes the row kernel's prefetching loop: the
    same chains, so one row equals its row of a 16-row blocked call bit for bit, with and without zeros."""
    for K, zeros in ((17, 0.0), (300, 0.0), (321, 0.1), (256, 0.6)):
        raw = np.empty(K * N + 16, np.float32)
        start = (-raw.ctypes.data % 64) // 4
        b = raw[start:start + K * N].reshape(K, N)
        assert b.ctypes.data % 64 == 0
        b[:] = rng.standard_normal((K, N))
        a = rng.standard_normal((16, K)).astype(np.float32)
        a[rng.random((16, K)) < zeros] = 0.0
        blocked = _core.sgemm(a, b, False, False, isa, 1)
        for j in (0, 9, 15):
            one = _core.sgemm(a[j:j + 1], b, False, False, isa, 1)
            assert one.tobytes() == blocked[j:j + 1].tobytes(), (N, K, j)
