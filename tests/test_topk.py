"""Exact inner-product top-k of the core (cpp/topk.h) against brute-force NumPy scoring, once per SIMD path.

Vectors are small integers stored as float32, so every product and partial sum is an exact integer: any
summation order gives the same scores, which then equal NumPy's float64 ones exactly, and ties (broken by
the lower item index) are frequent. Random-float tests check what exactness cannot: bitwise equality across
thread counts and between a query scored alone and in a batch (the chain path for a few queries, the
micro-kernel tiles for many).
"""

import numpy as np
import pytest

from fastrec import _core

DIMS = [1, 7, 15, 16, 17, 31, 33, 64, 65]


def brute_force(queries, items, k, candidates=None, exclude=None, exclude_rows=None):
    """Scores in float64, stable order by (score desc, item asc); a duplicate candidate counts once."""
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    pool = np.arange(items.shape[0]) if candidates is None else np.unique(candidates)
    out_items = np.full((queries.shape[0], k), -1, np.int32)
    out_scores = np.full((queries.shape[0], k), -np.inf, np.float32)
    for q in range(queries.shape[0]):
        c = pool
        if exclude is not None:
            indptr, ex = exclude
            r = q if exclude_rows is None else exclude_rows[q]
            c = c[~np.isin(c, ex[indptr[r]:indptr[r + 1]])]
        s = scores[q, c]
        order = np.lexsort((c, -s))[:k]
        out_items[q, :len(order)] = c[order]
        out_scores[q, :len(order)] = s[order]
    return out_items, out_scores


def int_vectors(rng, n, dim):
    return rng.integers(-2, 3, (n, dim)).astype(np.float32)


def random_exclude(rng, rows, n_items, max_len=40):
    lens = rng.integers(0, max_len, rows)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    items = [np.sort(rng.choice(n_items, size=n, replace=False)) for n in lens]
    return indptr, np.concatenate(items + [np.zeros(0)]).astype(np.int32)


def assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("n_queries", [1, 2, 3, 4, 40])
def test_matches_brute_force(isa, rng, dim, n_queries):
    items = int_vectors(rng, 500, dim)
    queries = int_vectors(rng, n_queries, dim)
    for k in (1, 10):
        assert_same(_core.inner_product_topk(queries, items, k, isa=isa), brute_force(queries, items, k))


@pytest.mark.parametrize("dim", [7, 64])
@pytest.mark.parametrize("n_queries", [1, 40])
def test_exclusion_and_candidates(isa, rng, dim, n_queries):
    items = int_vectors(rng, 600, dim)
    queries = int_vectors(rng, n_queries, dim)
    exclude = random_exclude(rng, n_queries, 600)
    want = brute_force(queries, items, 10, exclude=exclude)
    assert_same(_core.inner_product_topk(queries, items, 10, exclude=exclude, isa=isa), want)
    candidates = rng.choice(600, 250, replace=False).astype(np.int32)
    want = brute_force(queries, items, 10, candidates=candidates)
    assert_same(_core.inner_product_topk(queries, items, 10, candidates=candidates, isa=isa), want)
    want = brute_force(queries, items, 10, candidates=candidates, exclude=exclude)
    got = _core.inner_product_topk(queries, items, 10, candidates=candidates, exclude=exclude, isa=isa)
    assert_same(got, want)


@pytest.mark.parametrize("n_queries", [1, 40])
def test_a_run_of_consecutive_candidates_is_read_in_place(isa, rng, n_queries):
    # candidates [3, 590): read as a table from row 3 (not gathered); 587 rows leave a partial micro-panel.
    items = int_vectors(rng, 600, 33)
    queries = int_vectors(rng, n_queries, 33)
    exclude = random_exclude(rng, n_queries, 600)
    candidates = np.arange(3, 590, dtype=np.int32)
    want = brute_force(queries, items, 10, candidates=candidates, exclude=exclude)
    got = _core.inner_product_topk(queries, items, 10, candidates=candidates, exclude=exclude, isa=isa)
    assert_same(got, want)


def test_exclude_rows_map_queries_to_rows(isa, rng):
    items = int_vectors(rng, 300, 16)
    queries = int_vectors(rng, 30, 16)
    exclude = random_exclude(rng, 5, 300, max_len=120)
    rows = rng.integers(0, 5, 30).astype(np.int32)
    want = brute_force(queries, items, 7, exclude=exclude, exclude_rows=rows)
    assert_same(_core.inner_product_topk(queries, items, 7, exclude=exclude, exclude_rows=rows, isa=isa), want)


def test_duplicate_candidates_count_once(isa, rng):
    items = int_vectors(rng, 50, 9)
    queries = int_vectors(rng, 5, 9)
    candidates = np.repeat(rng.choice(50, 8, replace=False), 3).astype(np.int32)
    rng.shuffle(candidates)
    got = _core.inner_product_topk(queries, items, 12, candidates=candidates, isa=isa)
    assert_same(got, brute_force(queries, items, 12, candidates=candidates))
    assert (got[0][:, 8:] == -1).all() and np.isneginf(got[1][:, 8:]).all()
    for row in got[0]:
        assert len(set(row[:8])) == 8


@pytest.mark.parametrize("n_queries", [1, 40])
def test_k_beyond_the_items_pads(isa, rng, n_queries):
    items = int_vectors(rng, 20, 5)
    queries = int_vectors(rng, n_queries, 5)
    exclude = random_exclude(rng, n_queries, 20, max_len=10)
    got = _core.inner_product_topk(queries, items, 25, exclude=exclude, isa=isa)
    assert_same(got, brute_force(queries, items, 25, exclude=exclude))
    assert (got[0][:, 20:] == -1).all() and np.isneginf(got[1][:, 20:]).all()
    none = _core.inner_product_topk(queries, items, 3, candidates=np.zeros(0, np.int32), isa=isa)
    assert (none[0] == -1).all() and np.isneginf(none[1]).all()
    empty = np.zeros((0, 5), np.float32)
    got = _core.inner_product_topk(queries, empty, 2, isa=isa)
    assert (got[0] == -1).all() and np.isneginf(got[1]).all()


def test_no_queries_and_zero_dim(isa):
    items_out, scores_out = _core.inner_product_topk(np.zeros((0, 8), np.float32), np.ones((10, 8), np.float32), 4,
                                                     isa=isa)
    assert items_out.shape == (0, 4) and items_out.dtype == np.int32
    assert scores_out.shape == (0, 4) and scores_out.dtype == np.float32
    got = _core.inner_product_topk(np.zeros((3, 0), np.float32), np.zeros((6, 0), np.float32), 4, isa=isa)
    np.testing.assert_array_equal(got[0], np.tile(np.arange(4, dtype=np.int32), (3, 1)))  # all 0: ties by index
    np.testing.assert_array_equal(got[1], np.zeros((3, 4), np.float32))


def test_nan_scores_are_never_returned(isa):
    items = np.array([[1.0, 0.0], [np.nan, 0.0], [2.0, 0.0]], np.float32)
    for queries in (np.array([[1.0, 0.0]], np.float32), np.ones((40, 2), np.float32)):
        got = _core.inner_product_topk(queries, items, 3, isa=isa)
        np.testing.assert_array_equal(got[0], np.tile(np.array([2, 0, -1], np.int32), (len(queries), 1)))


@pytest.mark.parametrize("dim", [16, 33, 300])  # 300 > kc: the chain in two k blocks
def test_float_scores_close_to_float64(isa, rng, dim):
    items = rng.standard_normal((2000, dim)).astype(np.float32)
    queries = rng.standard_normal((20, dim)).astype(np.float32)
    got_items, got_scores = _core.inner_product_topk(queries, items, 10, isa=isa)
    exact = queries.astype(np.float64) @ items.astype(np.float64).T
    np.testing.assert_allclose(got_scores, np.take_along_axis(exact, got_items.astype(np.int64), 1), rtol=0,
                               atol=1e-5 * np.sqrt(dim) * np.abs(exact).max())
    # what float32 rounding may reorder is within that tolerance of the exact k-th score
    kth = -np.sort(-exact, axis=1)[:, 9]
    assert (got_scores[:, 9] >= kth - 1e-4).all()


@pytest.mark.parametrize("n_queries", [1, 2, 3, 70])
def test_bitwise_deterministic_across_threads(isa, rng, n_queries):
    # 20000 items: the few-query path splits them into several chunks per thread.
    items = rng.standard_normal((20000, 33)).astype(np.float32)
    queries = rng.standard_normal((n_queries, 33)).astype(np.float32)
    exclude = random_exclude(rng, n_queries, 20000)
    results = [_core.inner_product_topk(queries, items, 15, exclude=exclude, n_threads=t, isa=isa) for t in (1, 2, 4)]
    for got in results[1:]:
        np.testing.assert_array_equal(got[0], results[0][0])
        np.testing.assert_array_equal(got[1].view(np.int32), results[0][1].view(np.int32))


@pytest.mark.parametrize("dim", [1, 17, 64, 300])
def test_a_query_alone_equals_the_same_query_in_a_batch(isa, rng, dim):
    items = rng.standard_normal((3000, dim)).astype(np.float32)
    queries = rng.standard_normal((100, dim)).astype(np.float32)
    batch = _core.inner_product_topk(queries, items, 8, n_threads=2, isa=isa)
    for q in (0, 37, 99):
        for lo in (q, max(0, q - 2)):  # alone, and in a batch of a few
            part = _core.inner_product_topk(queries[lo:q + 1], items, 8, n_threads=1, isa=isa)
            np.testing.assert_array_equal(part[0][-1], batch[0][q])
            np.testing.assert_array_equal(part[1][-1].view(np.int32), batch[1][q].view(np.int32))
    candidates = np.arange(2999, -1, -1, dtype=np.int32)  # gathered rows: the same bits too
    got = _core.inner_product_topk(queries, items, 8, candidates=candidates, isa=isa)
    np.testing.assert_array_equal(got[1].view(np.int32), batch[1].view(np.int32))


def test_bad_arguments_are_rejected_with_their_names():
    q = np.ones((2, 4), np.float32)
    items = np.ones((10, 4), np.float32)
    indptr, ex = np.array([0, 1, 2], np.int64), np.array([3, 4], np.int32)

    def raises(exc, match, *args, **kwargs):
        with pytest.raises(exc, match=match):
            _core.inner_product_topk(*args, **kwargs)

    raises(ValueError, "queries must be 2-D", np.ones(4, np.float32), items, 1)
    raises(TypeError, "queries must have dtype float32", q.astype(np.float64), items, 1)
    raises(ValueError, "items must be C-contiguous", q, np.ones((4, 10), np.float32).T, 1)
    raises(ValueError, "items must have 4 columns", q, np.ones((10, 5), np.float32), 1)
    raises(ValueError, "k must be >= 1", q, items, 0)
    raises(TypeError, "candidates must have dtype int32", q, items, 1, candidates=np.arange(3))
    raises(ValueError, r"candidates must lie in \[0, 10\)", q, items, 1, candidates=np.array([1, 10], np.int32))
    raises(ValueError, r"candidates must lie in \[0, 10\)", q, items, 1, candidates=np.array([-1], np.int32))
    raises(ValueError, "exclude must be None or a pair", q, items, 1, exclude=indptr)
    raises(TypeError, "exclude.indptr must have dtype int64", q, items, 1, exclude=(indptr.astype(np.int32), ex))
    raises(ValueError, "exclude.indptr must start at 0", q, items, 1, exclude=(np.array([0, 1, 3], np.int64), ex))
    raises(ValueError, "exclude.indptr must be non-decreasing", q, items, 1,
           exclude=(np.array([0, 2, 1, 2], np.int64), ex), exclude_rows=np.zeros(2, np.int32))
    raises(ValueError, "exclude.items must be sorted", q, items, 1,
           exclude=(np.array([0, 2, 2], np.int64), np.array([4, 3], np.int32)))
    raises(ValueError, r"exclude.items must lie in \[0, 10\)", q, items, 1,
           exclude=(indptr, np.array([3, 10], np.int32)))
    raises(ValueError, "exclude has 1 rows but queries has 2", q, items, 1,
           exclude=(np.array([0, 2], np.int64), ex))
    raises(ValueError, r"exclude_rows must lie in \[0, 2\)", q, items, 1, exclude=(indptr, ex),
           exclude_rows=np.array([0, 2], np.int32))
    raises(ValueError, r"exclude_rows must have shape \(2,\)", q, items, 1, exclude=(indptr, ex),
           exclude_rows=np.zeros(3, np.int32))
    raises(ValueError, "exclude_rows needs exclude", q, items, 1, exclude_rows=np.zeros(2, np.int32))
    raises(ValueError, "isa", q, items, 1, isa="sse9")
