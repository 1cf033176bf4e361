"""fastrec.ann.ApproximateIndex: recall against exact brute force, exclusion, padding, persistence, input
validation, and the error that names the extra when faiss is missing."""

import builtins
import io
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from fastrec import ann

faiss = pytest.importorskip("faiss", reason="fastrec[ann] needs faiss-cpu")

K = 10


def clustered(n, dim, n_queries, seed):
    """Two-tower-like vectors: a mixture of gaussian clusters with varying norms (as benchmarks/bench_ann.py)."""
    rng = np.random.default_rng(seed)
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(dim) / 4.0)
    centres = rng.standard_normal((50, dim)) * spectrum
    labels = rng.integers(0, 50, size=n + n_queries)
    x = centres[labels] + 0.35 * rng.standard_normal((n + n_queries, dim)) * spectrum
    x *= rng.lognormal(0.0, 0.3, size=(n + n_queries, 1))
    x = x.astype(np.float32)
    return x[:n], x[n:]


def exact_topk(items, queries, k, exclude_rows=None):
    scores = queries @ items.T
    if exclude_rows is not None:
        for i, ex in enumerate(exclude_rows):
            scores[i, ex] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.fixture(scope="module")
def data():
    items, queries = clustered(20_000, 32, 200, seed=7)
    index = ann.ApproximateIndex(items, n_threads=2)
    return items, queries, index


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)])


def test_recall_against_exact(data):
    # With the defaults this build reaches about 0.99 (0.95 is the bar of issue 12 for 10^6 items); the
    # margin covers the graph's dependence on thread interleaving and faiss versions, not a flaky test:
    # 200 queries x 10 neighbours make the recall's standard error about 0.01.
    items, queries, index = data
    rows, scores = index.search(queries, K)
    truth, _ = exact_topk(items, queries, K)
    assert rows.dtype == np.int32 and scores.dtype == np.float32 and rows.shape == scores.shape == (200, K)
    assert recall(rows, truth) >= 0.95
    # Scores are the exact float32 inner products of the returned rows, best first.
    expect = np.einsum("ijk,ik->ij", items[rows], queries)
    np.testing.assert_allclose(scores, expect, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_larger_ef_search_does_not_lose_recall(data):
    items, queries, index = data
    truth, _ = exact_topk(items, queries, K)
    low = recall(index.search(queries, K, ef_search=10)[0], truth)
    high = recall(index.search(queries, K, ef_search=256)[0], truth)
    assert high >= low and high >= 0.99


def shifted(n, dim, n_queries, seed):
    """Unnormalised vectors as a bpr / bce two-tower model learns them (no L2 normalisation): items spread
    around a common offset, users around its opposite (on a trained bce model the mean user and mean item
    vectors have cosine -0.98). The best items for a user lie on the far side of the item cloud."""
    rng = np.random.default_rng(seed)
    offset = rng.standard_normal(dim)
    offset *= 4.0 / np.linalg.norm(offset)
    items = (offset + rng.standard_normal((n, dim))).astype(np.float32)
    return items, (-offset + rng.standard_normal((n_queries, dim))).astype(np.float32)


def test_unnormalised_vectors_need_the_l2_reduction():
    # An inner-product graph links each item to the items of largest inner product with it: the long vectors
    # on the items' side. Queries from the other side then reach few of their true neighbours (recall about
    # 0.38 here, 0.14 on a trained bce TwoTower); the MIPS-to-L2 reduction graph finds them (0.94-0.96 on
    # seeds 0-3). Builds are single-threaded, hence deterministic: the bounds have margins for other faiss
    # versions, not for chance.
    items, queries = shifted(2000, 16, 200, seed=0)
    truth, _ = exact_topk(items, queries, K)
    ip = ann.ApproximateIndex(items, space="ip", n_threads=1)
    l2 = ann.ApproximateIndex(items, space="l2", n_threads=1)
    auto = ann.ApproximateIndex(items, n_threads=1)
    assert (ip.space, l2.space, auto.space) == ("ip", "l2", "l2")
    assert recall(ip.search(queries, K)[0], truth) < 0.6
    rows, scores = l2.search(queries, K)
    assert recall(rows, truth) >= 0.9
    np.testing.assert_array_equal(auto.search(queries, K)[0], rows)
    assert auto.trial_["l2"] > auto.trial_["ip"] + 0.02
    # Scores are the inner products of the original vectors (not of the augmented ones), best first.
    np.testing.assert_allclose(scores, np.einsum("ijk,ik->ij", items[rows], queries), rtol=1e-5, atol=1e-5)
    assert l2.dim == 16 and np.all(np.diff(scores, axis=1) <= 0)
    # The trial also takes the user-like queries it is given.
    assert ann.ApproximateIndex(items, sample_queries=queries[:50], n_threads=1).space == "l2"


def test_space_auto_keeps_the_inner_product_graph_where_it_is_better(data):
    # Clustered vectors of varying norm: the inner-product graph is far better there (0.99 against about 0.6
    # for the reduction, benchmarks/ANN.md) and the trial keeps it; L2-normalised vectors skip the trial.
    items, queries, index = data
    assert index.space == "ip" and index.trial_["ip"] > index.trial_["l2"]
    unit = items / np.linalg.norm(items, axis=1, keepdims=True)
    normed = ann.ApproximateIndex(unit[:2000], n_threads=1)
    assert normed.space == "ip" and normed.trial_ is None


def test_l2_space_exclusion_round_trip_and_exact_fallback():
    items, queries = shifted(3000, 16, 40, seed=1)
    index = ann.ApproximateIndex(items, space="l2", n_threads=2)
    # Row i excludes its exact top-(2 * i) items; the last rows exclude thousands and are answered by the
    # exact fallback, which must score by inner product, not by the augmented L2 distance.
    truth, _ = exact_topk(items, queries, 3000)
    excl = [truth[i, :2 * i] if i < 30 else truth[i, :2500 + i] for i in range(len(queries))]
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in excl])]).astype(np.int64)
    flat = np.concatenate(excl).astype(np.int32)
    rows, _ = index.search(queries, K, exclude=(indptr, flat))
    expect, _ = exact_topk(items, queries, K, exclude_rows=excl)
    assert not any(np.isin(r, e).any() for r, e in zip(rows, excl))
    np.testing.assert_array_equal(rows[30:], expect[30:])
    assert recall(rows[:30], expect[:30]) >= 0.9
    again = ann.ApproximateIndex.from_bytes(index.to_bytes())
    assert (again.space, again.dim, again.n_items) == ("l2", 16, 3000)
    for a, b in zip(index.search(queries, K), again.search(queries, K)):
        np.testing.assert_array_equal(a, b)


def test_deep_fetch_searches_at_least_k_candidates():
    # faiss keeps an efSearch below k: 200 results from a short candidate list (the former efSearch 16 + 56 of
    # over-fetch) lose a quarter of the top-200 (recall 0.74 here); at least k candidates give 0.998.
    items, queries = clustered(5000, 32, 100, seed=7)
    items /= np.linalg.norm(items, axis=1, keepdims=True)  # as a softmax TwoTower's (the default) vectors
    index = ann.ApproximateIndex(items, n_threads=1)
    truth, _ = exact_topk(items, queries, 200)
    assert recall(index.search(queries, 200, ef_search=16)[0], truth) >= 0.97

@pytest.mark.parametrize("as_csr", [False, True])
def test_exclusion(data, as_csr):
    items, queries, index = data
    rng = np.random.default_rng(3)
    truth, _ = exact_topk(items, queries, 30)
    # Row i excludes its exact top-(i % 25) (the items a graph finds first) plus random others; some rows
    # exclude thousands, which takes the exact fallback.
    excl = []
    for i in range(queries.shape[0]):
        n_random = 3000 if i % 50 == 0 else int(rng.integers(0, 40))
        ex = np.union1d(truth[i, : i % 25], rng.choice(items.shape[0], n_random, replace=False))
        excl.append(ex.astype(np.int32))
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in excl])]).astype(np.int64)
    flat = np.concatenate(excl).astype(np.int32)
    exclude = (sp.csr_matrix((np.ones(flat.size), flat, indptr), shape=(len(excl), items.shape[0]))
               if as_csr else (indptr, flat))
    rows, scores = index.search(queries, K, exclude=exclude)
    for i, ex in enumerate(excl):
        assert not np.isin(rows[i], ex).any()
        assert (rows[i] >= 0).all() and len(set(rows[i])) == K
    expect, _ = exact_topk(items, queries, K, excl)
    assert recall(rows, expect) >= 0.95
    assert np.isfinite(scores).all()


def test_padding_when_too_few_items_remain():
    items, queries = clustered(30, 8, 3, seed=1)
    index = ann.ApproximateIndex(items, n_threads=1)
    # Query 0 excludes 25 of 30 items, query 1 nothing, query 2 everything.
    indptr = np.array([0, 25, 25, 55], dtype=np.int64)
    flat = np.concatenate([np.arange(25), np.arange(30)]).astype(np.int32)
    rows, scores = index.search(queries, 8, exclude=(indptr, flat))
    assert sorted(rows[0, :5]) == [25, 26, 27, 28, 29] and (rows[0, 5:] == -1).all()
    assert np.isneginf(scores[0, 5:]).all() and np.isfinite(scores[0, :5]).all()
    assert (rows[1] >= 0).all() and len(set(rows[1])) == 8
    assert (rows[2] == -1).all() and np.isneginf(scores[2]).all()
    # Duplicated exclusions count once: 5 distinct of 30 excluded leaves exactly 25 for k = 25.
    dup = np.array([3, 3, 7, 7, 7, 11, 12, 29, 29], dtype=np.int32)
    rows, _ = index.search(queries[:1], 25, exclude=(np.array([0, dup.size]), dup))
    assert (rows >= 0).all() and len(set(rows[0])) == 25 and not np.isin(rows, dup).any()
    # k larger than the index: every item once, then padding; the exact top-k in order.
    rows, scores = index.search(queries, 40)
    truth, truth_scores = exact_topk(items, queries, 30)
    np.testing.assert_array_equal(rows[:, :30], truth)
    assert (rows[:, 30:] == -1).all() and np.isneginf(scores[:, 30:]).all()


def test_bytes_round_trip(data):
    items, queries, index = data
    blob = index.to_bytes()
    assert isinstance(blob, np.ndarray) and blob.dtype == np.uint8 and blob.ndim == 1
    again = ann.ApproximateIndex.from_bytes(blob)
    assert (again.n_items, again.dim, again.M, again.ef_search) == (index.n_items, index.dim, index.M,
                                                                   index.ef_search)
    for a, b in zip(index.search(queries, K), again.search(queries, K)):
        np.testing.assert_array_equal(a, b)
    assert ann.ApproximateIndex.from_bytes(blob, ef_search=200).ef_search == 200
    # Through a .npy file, as a model file stores it.
    buf = io.BytesIO()
    np.save(buf, blob)
    buf.seek(0)
    np.testing.assert_array_equal(ann.ApproximateIndex.from_bytes(np.load(buf)).search(queries, K)[0],
                                  index.search(queries, K)[0])


def test_single_thread_build_is_deterministic():
    items, _ = clustered(2000, 16, 0, seed=2)
    a = ann.ApproximateIndex(items, n_threads=1).to_bytes()
    b = ann.ApproximateIndex(items, n_threads=1).to_bytes()
    np.testing.assert_array_equal(a, b)


def test_thread_setting_restored(data):
    _, queries, index = data
    before = faiss.omp_get_max_threads()
    index.search(queries, K, n_threads=1)
    assert faiss.omp_get_max_threads() == before


def test_bad_inputs(data):
    items, queries, index = data
    with pytest.raises(ValueError, match="items is empty"):
        ann.ApproximateIndex(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="items"):
        ann.ApproximateIndex(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="items"):
        ann.ApproximateIndex(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="M"):
        ann.ApproximateIndex(items[:10], M=1)
    with pytest.raises(ValueError, match="queries has 31 columns"):
        index.search(queries[:, :31], K)
    with pytest.raises(ValueError, match="queries"):
        index.search(np.full((1, 32), np.inf, np.float32), K)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match="k must be an integer"):
        index.search(queries, 2.5)
    with pytest.raises(ValueError, match="n_threads"):
        index.search(queries, K, n_threads=0)
    with pytest.raises(ValueError, match="exclude indptr"):
        index.search(queries, K, exclude=(np.array([0, 1]), np.array([1], np.int32)))
    indptr = np.zeros(queries.shape[0] + 1, np.int64)
    indptr[1:] = 1
    with pytest.raises(ValueError, match="exclude items"):
        index.search(queries, K, exclude=(indptr, np.array([items.shape[0]], np.int32)))
    with pytest.raises(ValueError, match="array"):
        ann.ApproximateIndex.from_bytes(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="array"):
        ann.ApproximateIndex.from_bytes(np.frombuffer(b"not an index at all", np.uint8))


def test_missing_faiss_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "faiss", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match=r"pip install 'fastrec\[ann\]'"):
        ann.ApproximateIndex(np.ones((3, 2), np.float32))
