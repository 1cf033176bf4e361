"""Input preparation in the core (fastrec._core.hash_buckets) against the Python definitions it replaces."""

import zlib

import numpy as np
import pytest
import scipy.sparse as sp

import fastrec
from fastrec import _core


def _python_buckets(values, buckets):
    """fastrec's documented hash, written with the standard library: crc32 of the value's text."""
    return np.array([zlib.crc32(str(v).encode()) % buckets + 1 for v in values.tolist()], np.int64)


INTS = np.concatenate([np.random.default_rng(0).integers(-2**63, 2**63 - 1, 5000, dtype=np.int64),
                       np.array([0, -1, 1, 9, 10, 2**63 - 1, -2**63], np.int64),
                       # texts of every length 1..20: whole 8-byte slices of the CRC and every tail
                       np.array([s * 10**k - d for k in range(19) for d in (0, 1) for s in (1, -1)], np.int64)])
STRINGS = np.array(["", "a", "A", "héllo", "日本語", "emoji😀x", "a\x00b", "x" * 80, "12", "-7", "\ud800"[:0] + "ß"])


@pytest.mark.parametrize("buckets", [1, 2, 97, 1_000_003, 2**31 - 2])
def test_int_ids_hash_like_python(buckets):
    assert np.array_equal(_core.hash_buckets(INTS, buckets), _python_buckets(INTS, buckets))


@pytest.mark.parametrize("buckets", [1, 97, 2**31 - 2])
def test_string_ids_hash_like_python(buckets):
    # UTF-8 of 1-, 2-, 3- and 4-byte code points, an interior NUL (kept by NumPy, as by str()), varying widths
    assert np.array_equal(_core.hash_buckets(STRINGS, buckets), _python_buckets(STRINGS, buckets))
    many = np.array([f"user-{i}-ü" for i in range(20000)])
    assert np.array_equal(_core.hash_buckets(many, buckets), _python_buckets(many, buckets))


def test_same_codes_for_any_thread_count():
    many = np.arange(-50_000, 50_000, dtype=np.int64) * 7919
    one = _core.hash_buckets(many, 1000, 1)
    assert np.array_equal(one, _core.hash_buckets(many, 1000, 2))
    assert np.array_equal(one, _core.hash_buckets(many, 1000, 3))


@pytest.mark.parametrize("values, buckets, match", [
    (np.zeros(3, np.float64), 5, "int64 or str"),
    (np.zeros(3, np.int32), 5, "int64 or str"),
    (np.zeros((2, 2), np.int64), 5, "1-D"),
    (np.arange(10, dtype=np.int64)[::2], 5, "C-contiguous"),
    (np.zeros(3, np.int64), 0, "buckets"),
    (np.zeros(3, np.int64), 2**31 - 1, "buckets"),
])
def test_bad_input(values, buckets, match):
    with pytest.raises(ValueError, match=match):
        _core.hash_buckets(values, buckets)


def test_field_model_reads_hashed_columns_through_the_core():
    from fastrec import FieldModel

    rng = np.random.default_rng(1)
    X = {"city": np.array([f"c{i}" for i in rng.integers(0, 500, 2000)]), "x": rng.normal(size=2000)}
    y = (rng.random(2000) < 0.3).astype(int)
    model = FieldModel(fields={"city": {"hash_buckets": 64}}, epochs=1, random_state=0, n_threads=1).fit(X, y)
    # The city field's bag table: one row per example, its row = the Python formula's bucket.
    _, _, bags, _ = model._inputs(X, fit=False)
    assert np.array_equal(bags[0][1], _python_buckets(X["city"], 64))


@pytest.mark.parametrize("values", [
    np.random.default_rng(2).integers(0, 10**6, 50_000),
    np.random.default_rng(3).integers(-2**63, 2**63 - 1, 3000, dtype=np.int64),
    np.array([5, 5, 5]), np.array([-3, 7, -3, 0, 2**40]), np.zeros(0, np.int64),
    np.array(["b", "a", "b", "ü"]),
])
def test_id_index_with_codes_equals_unique_and_search(values):
    from fastrec._fieldnet import IdIndex

    index, codes = IdIndex.with_codes(values, what="ids")
    u, inverse = np.unique(values, return_inverse=True)  # NumPy's definition: sorted ids, position + 1
    assert np.array_equal(index.ids, u)
    assert np.array_equal(codes, inverse.ravel() + 1) and codes.dtype == np.int32
    assert np.array_equal(index.index(values), codes)  # the index searches the same numbers afterwards


@pytest.mark.parametrize("ratings", [True, False])
def test_single_pair_predict_equals_the_batch_path(ratings):
    """Recommender.predict of one pair of int ids runs whole in the core (PairScorer): the same numbers as the
    general path, for known and unknown ids, ids added by partial_fit (unsorted: the order array), clipping."""
    import fastrec
    from fastrec.datasets import make_interactions

    d = make_interactions(300, 200, 5000, random_state=0)
    r = d.ratings if ratings else None
    rec = fastrec.Recommender(epochs=2, early_stopping=False, random_state=0, n_threads=1).fit(d.users, d.items, r)
    rec.partial_fit(np.array([-7, 3]), np.array([5, -7]), None if r is None else np.array([3.0, 4.0]))
    assert rec._users._order is not None  # -7 sorts before the old ids: searched through _order
    users = list(d.users[:40]) + [10**9, -5, -7]
    items = list(d.items[:40]) + [3, 10**9, -7]
    batch = rec.predict(np.array(users), np.array(items))
    for j, (u, i) in enumerate(zip(users, items)):
        one = rec.predict([int(u)], [int(i)])
        assert one.dtype == np.float64 and one.shape == (1,) and one[0] == batch[j]
        assert rec.predict(np.array([u]), np.array([i]))[0] == batch[j]
    if ratings:
        rec.set_params(clip_predictions=False)
        unclipped = rec.predict(np.array(users), np.array(items))
        assert all(rec.predict([int(u)], [int(i)])[0] == unclipped[j] for j, (u, i) in enumerate(zip(users, items)))
    with pytest.raises(ValueError, match="int64"):
        rec.predict([2**70], [3])


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_field_model_one_row_path_equals_batch_path(loss, tmp_path):
    """FieldModel's one-row path (a dict of scalars: codes and scaled values written into a kept handle) gives
    the general path's numbers: known, unknown and hashed values, ints and strings, lists and arrays."""
    import fastrec

    rng = np.random.default_rng(4)
    n = 3000
    X = {"user": rng.integers(0, 300, n), "city": np.array([f"c{i}" for i in rng.integers(0, 40, n)]),
         "tag": rng.integers(0, 10**6, n), "x": rng.normal(3.0, 2.0, n)}
    y = (rng.random(n) < 0.3).astype(int) if loss == "bce" else rng.normal(size=n)
    model = fastrec.FieldModel(fields={"tag": {"hash_buckets": 50}}, loss=loss, epochs=2, random_state=0,
                               n_threads=1).fit(X, y)
    probe = {"user": np.array([3, 299, 10**7]), "city": np.array(["c1", "c39", "nowhere"]),
             "tag": np.array([5, 77, -1]), "x": np.array([0.5, -4.0, 1e6])}
    batch = model.predict_proba(probe) if loss == "bce" else model.predict(probe)
    for j in range(3):
        forms = [{k: [v[j].item()] for k, v in probe.items()}, {k: [v[j]] for k, v in probe.items()},
                 {k: v[j:j + 1] for k, v in probe.items()}]
        for row in forms:
            one = model.predict_proba(row) if loss == "bce" else model.predict(row)
            assert one.dtype == batch.dtype and np.array_equal(one, batch[j:j + 1])
            assert model._serve not in (None, False)  # the one-row path was taken
    assert np.array_equal(model.predict(forms[0]), model.predict({k: v[2:3] for k, v in probe.items()}))
    # The kept handle is not saved; the loaded model takes the same path to the same numbers.
    model.save(tmp_path / "m.fastrec")
    loaded = fastrec.load(tmp_path / "m.fastrec")
    assert np.array_equal(loaded.predict(forms[0]), model.predict(forms[0]))
    # A bad one-row input still gets the general path's error.
    with pytest.raises(ValueError, match="NaN"):
        model.predict({"user": [3], "city": ["c1"], "tag": [5], "x": [float("nan")]})


def test_misaligned_arrays():
    """Arrays unpickled on a Dask worker may start at any byte: the core refuses them (a misaligned int64 load
    is undefined behaviour), and the Python layer hands it aligned copies."""
    from fastrec._fieldnet import IdIndex

    buf = np.zeros(8 * 100 + 1, np.uint8)
    mis = np.frombuffer(buf.data, dtype=np.int64, count=100, offset=1).copy()  # aligned copy for reference
    raw = np.frombuffer(buf.data, dtype=np.int64, count=100, offset=1)
    assert not raw.flags.aligned
    with pytest.raises(ValueError, match="aligned"):
        _core.unique_ids(raw)
    with pytest.raises(ValueError, match="aligned"):
        _core.hash_buckets(raw, 7)
    index, codes = IdIndex.with_codes(raw)
    assert np.array_equal(codes, IdIndex.with_codes(mis)[1])


def _python_fill_normal(seed, first, n, loc, scale):
    """The documented draw, in Python integers: splitmix64 of seed ^ (index * 0xd1b54a32d192ed03), four 16-bit
    fields summed with their midpoints, centred and scaled to unit variance."""
    mask = 2**64 - 1
    out = []
    for i in range(first, first + n):
        z = ((seed ^ (i * 0xd1b54a32d192ed03 & mask)) + 0x9e3779b97f4a7c15) & mask
        z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & mask
        z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & mask
        h = z ^ (z >> 31)
        s = sum((h >> k) & 0xFFFF for k in (0, 16, 32, 48)) + 2 - 131072
        out.append(np.float32(loc) + np.float32(scale) * np.float32(s * (3**0.5 / 65536)))
    return np.array(out, np.float32)


@pytest.mark.parametrize("isa", _core.available_isas())
def test_fill_normal_is_the_documented_draw_for_any_thread_count(isa):
    seed = 0x1234_5678_9ABC_DEF0
    a = np.empty((3000, 7), np.float32)  # 21,000 values: whole vectors of 8 (`odd` below ends in a tail of 5)
    _core.fill_normal(a, seed, 0, 0.5, 0.05, 1, isa)
    # Only (seed, index) decide a value: exactly the Python definition (the same two float32 roundings of
    # scale * z and loc + that, never fused), on every ISA, whatever the thread count, and a later slice of the
    # stream is the same numbers as drawing it whole.
    assert np.array_equal(a.ravel(), _python_fill_normal(seed, 0, a.size, 0.5, 0.05))
    for threads in (2, 3):
        b = np.empty_like(a)
        _core.fill_normal(b, seed, 0, 0.5, 0.05, threads, isa)
        assert np.array_equal(a, b)
    odd = np.empty(1005, np.float32)
    _core.fill_normal(odd, seed, 3, -3.0, 0.3, 2, isa)
    assert np.array_equal(odd, _python_fill_normal(seed, 3, odd.size, -3.0, 0.3))
    tail = np.empty(1000, np.float32)
    _core.fill_normal(tail, seed, 20000, 0.5, 0.05)
    assert np.array_equal(tail, a.ravel()[20000:])


def test_fill_normal_moments_and_bounds():
    z = np.empty(1_000_000, np.float32)
    _core.fill_normal(z, 7, 0, 0.0, 1.0)
    # Mean 0 and variance 1 by construction: with 10^6 draws the sample mean's standard error is 0.001 and
    # the variance's about 0.0014 (kurtosis 2.7): 5 standard errors.
    assert abs(z.mean()) < 0.005 and abs(z.var() - 1) < 0.007
    assert np.abs(z).max() <= 3**0.5 * 2 + 1e-6  # support +-2 sqrt(3)


@pytest.mark.parametrize("bad", [np.zeros(3, np.float64), np.zeros((4, 2), np.float32)[:, :1]])
def test_fill_normal_refuses_arrays_it_would_not_write(bad):
    with pytest.raises(ValueError):
        _core.fill_normal(bad, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_standardize_equals_numpy(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((200_001, 5)) * [1, 3, 1e-3, 1e4, 0] + [0, 10, -5, 1e6, 7]).astype(dtype)
    out, mean, std, status = _core.standardize(x)
    x64 = x.astype(np.float64)
    ref_std = x64.std(axis=0)
    ref_std = np.where(ref_std > 0, ref_std, 1.0)
    assert status == 0
    # Float64 sums in another order than NumPy's pairwise ones: relative 1e-12 on the moments, and the
    # float32 outputs within one float32 rounding (plus the moments' error times |x| / std: < 1e-6 here).
    assert np.allclose(mean, x64.mean(axis=0), rtol=1e-12, atol=1e-9)
    assert np.allclose(std, ref_std, rtol=1e-12)
    ref = ((x64 - x64.mean(axis=0)) / ref_std).astype(np.float32)
    assert np.allclose(out, ref, rtol=1e-6, atol=1e-6)
    again, m2, s2, _ = _core.standardize(x, mean, std, n_threads=1)  # given moments: the same output
    assert np.array_equal(again, out) and np.array_equal(m2, mean)
    for threads in (1, 2, 3):
        assert np.array_equal(_core.standardize(x, n_threads=threads)[0], out)
    for isa in _core.available_isas():  # one float64 division per value on every ISA: the same bits
        assert np.array_equal(_core.standardize(x, isa=isa)[0], out)
        assert np.array_equal(_core.standardize(x[:13], isa=isa)[0], _core.standardize(x[:13], isa="scalar")[0])


@pytest.mark.parametrize("value, status", [(np.nan, 1), (np.inf, 1), (-1e39, 1), (1e30, 2)])
def test_standardize_status(value, status):
    x = np.zeros((10, 2))
    x[3, 1] = value
    if status == 2:  # in range itself, beyond float32 once divided by a small deviation
        assert _core.standardize(x, np.zeros(2), np.full(2, 1e-10))[3] == 2
    else:
        assert _core.standardize(x)[3] == status


def test_field_model_numeric_errors_name_the_column():
    import fastrec

    X = {"a": np.array([1, 2, 3]), "num": np.array([[1.0], [np.nan], [2.0]])}
    with pytest.raises(ValueError, match=r"X\['num'\] contains NaN"):
        fastrec.FieldModel(epochs=1).fit(X, np.array([0, 1, 0]))
    model = fastrec.FieldModel(epochs=1, random_state=0).fit({"a": X["a"], "num": np.array([1.0, 1.0, 1.0001])},
                                                             np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="too large for float32 once standardised"):
        model.predict_proba({"a": X["a"], "num": np.array([1e35, 0.0, 0.0])})


def _numpy_bag_weights(X, mean):
    """The pooled weights by NumPy: float32 weights, each row's divided by its float64 sum (in order) when mean."""
    w = X.data.astype(np.float32)
    if not mean:
        return w
    sums = np.array([sum(float(v) for v in w[a:b]) for a, b in zip(X.indptr[:-1], X.indptr[1:])])
    scale = np.where(sums != 0, 1.0 / np.where(sums != 0, sums, 1.0), 0.0).astype(np.float32)
    return w * np.repeat(scale, np.diff(X.indptr))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mean", [True, False])
def test_bag_weights_equal_numpy_for_any_thread_count(dtype, mean):
    rng = np.random.default_rng(1)
    lens = rng.integers(0, 12, 40_000)  # empty rows and rows longer than 8 (NumPy's pairwise blocks)
    indptr = np.concatenate([[0], np.cumsum(lens)])
    data = rng.uniform(0.1, 3, indptr[-1]).astype(dtype)
    data[indptr[5]:indptr[6]] = 0  # a zero-sum row pools to zero
    data[indptr[7]] = -data[indptr[7]]
    X = sp.csr_matrix((data, rng.integers(0, 50, indptr[-1]), indptr), shape=(len(lens), 50))
    weights, status = _core.bag_weights(X.indptr.astype(np.int64), X.data, mean, 1)
    assert status == 0
    # The same float32 arithmetic in the same order: exact.
    assert np.array_equal(weights, _numpy_bag_weights(X, mean))
    for threads in (2, 3):
        assert np.array_equal(_core.bag_weights(X.indptr.astype(np.int64), X.data, mean, threads)[0], weights)


@pytest.mark.parametrize("value", [np.nan, np.inf, -1e39])
def test_bag_weights_status_for_values_float32_cannot_hold(value):
    data = np.array([1.0, value, 2.0])
    assert _core.bag_weights(np.array([0, 2, 3]), data, True)[1] == 1
    assert _core.bag_weights(np.array([0, 2, 3]), data, False)[1] == 1


@pytest.mark.parametrize("indptr", [[0, 2], [1, 3], [0, 4, 3]])
def test_bag_weights_refuse_an_indptr_that_does_not_cover_the_data(indptr):
    with pytest.raises(ValueError, match="indptr"):
        _core.bag_weights(np.array(indptr, np.int64), np.ones(3), True)


def test_a_csr_column_with_spare_room_trains_like_the_pruned_one():
    # scipy lets data / indices run past indptr[-1] (set after construction); those are not entries.
    rng = np.random.default_rng(0)
    n = 50
    A = sp.random(n, 6, density=0.4, format="csr", random_state=1)
    B = A.copy()
    B.data, B.indices = np.concatenate([A.data, [7.0, np.nan]]), np.concatenate([A.indices, [0, 1]])
    users, y = rng.integers(0, 5, n), rng.random(n)
    fits = [fastrec.FieldModel(loss="mse", epochs=2, random_state=0).fit({"u": users, "t": t}, y) for t in (A, B)]
    assert np.array_equal(fits[0].predict({"u": users, "t": A}), fits[1].predict({"u": users, "t": B}))
