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
