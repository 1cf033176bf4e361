"""fastrec.metrics against scikit-learn, brute force and hand-computed values."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from fastrec import metrics


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_rmse_mae_match_sklearn(n):
    rng = np.random.default_rng(n)
    y, p = rng.normal(3, 1, n), rng.normal(3, 1, n).astype(np.float32)
    assert metrics.rmse(y, p) == pytest.approx(np.sqrt(skm.mean_squared_error(y, p)), rel=1e-12)
    assert metrics.mae(y, p) == pytest.approx(skm.mean_absolute_error(y, p), rel=1e-12)


def test_rmse_by_hand():
    assert metrics.rmse([1, 2, 3], [1, 2, 5]) == pytest.approx(np.sqrt(4 / 3))
    assert metrics.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_log_loss_matches_sklearn(dtype):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = rng.random(200).astype(dtype)
    p[:5] = [0.0, 1.0, 0.0, 1.0, 0.5]  # exercises clipping
    expected = skm.log_loss(y, p, labels=[0, 1])
    assert metrics.log_loss(y, p) == pytest.approx(expected, rel=1e-6)


def test_log_loss_one_class_by_hand():
    assert metrics.log_loss([1, 1], [0.5, 0.25]) == pytest.approx((np.log(2) + np.log(4)) / 2)


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 5, 300).astype(float)  # many ties
    assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), rel=1e-12)


def test_roc_auc_brute_force():
    y = np.array([0, 1, 1, 0, 1])
    s = np.array([0.2, 0.2, 0.9, 0.5, 0.1])
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert metrics.roc_auc(y, s) == pytest.approx(brute)


@pytest.mark.parametrize(
    "func, args, exc, match",
    [
        (metrics.rmse, ([1, 2], [1]), ValueError, "different lengths"),
        (metrics.rmse, ([], []), ValueError, "y_true is empty"),
        (metrics.mae, ([1, np.nan], [1, 2]), ValueError, "y_true contains NaN"),
        (metrics.mae, ([[1, 2]], [[1, 2]]), ValueError, "y_true must be 1-D"),
        (metrics.rmse, (["a"], [1]), TypeError, "y_true must hold numbers"),
        (metrics.log_loss, ([0, 2], [0.1, 0.2]), ValueError, "y_true must hold binary"),
        (metrics.log_loss, ([0, 1], [0.1, 1.2]), ValueError, "y_prob must hold probabilities"),
        (metrics.roc_auc, ([1, 1], [0.1, 0.2]), ValueError, "both classes"),
        (metrics.roc_auc, ([1, 0], [0.1, np.inf]), ValueError, "y_score contains NaN"),
    ],
)
def test_pointwise_bad_input(func, args, exc, match):
    with pytest.raises(exc, match=match):
        func(*args)


# --- ranking ------------------------------------------------------------------------------------------------


def brute_force(rec_row, rel_set, k):
    """Per-user (hit, precision, recall, ndcg) straight from the definitions."""
    hits = [j for j, i in enumerate(list(rec_row)[:k]) if i != -1 and i in rel_set]  # padding keeps its slot
    dcg = sum(1 / np.log2(j + 2) for j in hits)
    idcg = sum(1 / np.log2(j + 2) for j in range(min(k, len(rel_set))))
    return float(bool(hits)), len(hits) / k, len(hits) / len(rel_set), dcg / idcg


def random_case(seed, n_users=30, n_items=40, k_rec=8):
    rng = np.random.default_rng(seed)
    rec = np.stack([rng.permutation(n_items)[:k_rec] for _ in range(n_users)])
    rec[rng.random(rec.shape) < 0.1] = -1  # padding anywhere
    relevant = [set(rng.choice(n_items, rng.integers(0, 6), replace=False).tolist()) for _ in range(n_users)]
    return rec, relevant


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 8, 12])
def test_ranking_metrics_brute_force(seed, k):
    rec, relevant = random_case(seed)
    rows = [brute_force(r, s, k) for r, s in zip(rec, relevant) if s]
    expected = np.mean(rows, axis=0)
    got = [metrics.hit_rate_at_k(rec, relevant, k), metrics.precision_at_k(rec, relevant, k),
           metrics.recall_at_k(rec, relevant, k), metrics.ndcg_at_k(rec, relevant, k)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_relevant_as_csr_and_lists_agree():
    rec, relevant = random_case(7)
    csr = sp.lil_matrix((len(relevant), 40))
    for u, s in enumerate(relevant):
        for i in s:
            csr[u, i] = 2.0
    lists = [np.array(sorted(s), dtype=np.int64) for s in relevant]
    for f in (metrics.hit_rate_at_k, metrics.precision_at_k, metrics.recall_at_k, metrics.ndcg_at_k):
        assert f(rec, csr.tocsr(), 5) == pytest.approx(f(rec, relevant, 5))
        assert f(rec, lists, 5) == pytest.approx(f(rec, relevant, 5))


@pytest.mark.parametrize("seed", range(4))
def test_ndcg_matches_sklearn(seed):
    # the top-k of distinct random scores, compared with sklearn's ndcg_score on binary relevance
    rng = np.random.default_rng(seed)
    n_users, n_items, k = 25, 30, 5
    scores = rng.random((n_users, n_items))
    truth = (rng.random((n_users, n_items)) < 0.15).astype(float)
    truth[truth.sum(axis=1) == 0, 0] = 1.0  # sklearn counts users without relevant items as 0; avoid them
    rec = np.argsort(-scores, axis=1)[:, :k]
    ours = metrics.ndcg_at_k(rec, sp.csr_matrix(truth), k)
    assert ours == pytest.approx(skm.ndcg_score(truth, scores, k=k), rel=1e-10)


def test_ranking_by_hand():
    rec = np.array([[1, 2, 3], [4, -1, -1], [7, 8, 9]])
    relevant = [{2, 9}, [4], []]  # third user has none: excluded from every mean
    assert metrics.hit_rate_at_k(rec, relevant) == 1.0
    assert metrics.precision_at_k(rec, relevant) == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert metrics.recall_at_k(rec, relevant) == pytest.approx((1 / 2 + 1) / 2)
    ndcg0 = (1 / np.log2(3)) / (1 + 1 / np.log2(3))
    assert metrics.ndcg_at_k(rec, relevant) == pytest.approx((ndcg0 + 1) / 2)
    assert metrics.hit_rate_at_k(rec, relevant, k=1) == pytest.approx(0.5)


def test_string_item_ids():
    rec = np.array([["a", "b"], ["c", ""]])
    assert metrics.recall_at_k(rec, [["b", "z"], ["c"]]) == pytest.approx((0.5 + 1) / 2)
    rec_obj = np.array([["a", None], ["c", "d"]], dtype=object)
    assert metrics.hit_rate_at_k(rec_obj, [["b"], ["d"]]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "rec, relevant, k, exc, match",
    [
        (np.array([1, 2]), [[1]], None, ValueError, "recommended must be 2-D"),
        (np.zeros((0, 3), int), [], None, ValueError, "recommended is empty"),
        (np.array([[1, 2]]), [[1], [2]], None, ValueError, "relevant has 2 users"),
        (np.array([[1, 2]]), [[1]], 0, ValueError, "k must be >= 1"),
        (np.array([[1, 2]]), [[1]], 1.5, TypeError, "k must be an int"),
        (np.array([[1, 1]]), [[1]], None, ValueError, "repeats an item"),
        (np.array([[1, 2]]), [[]], None, ValueError, "no user in relevant"),
        (np.array([[1.0, 2.0]]), [[1]], None, TypeError, "recommended must hold integer or string"),
        (np.array([[1, 2]]), [["a"]], None, TypeError, "different types"),
        (np.array([[1, 2]]), sp.csr_matrix((2, 5)), None, ValueError, "relevant has 2 rows"),
    ],
)
def test_ranking_bad_input(rec, relevant, k, exc, match):
    with pytest.raises(exc, match=match):
        metrics.ndcg_at_k(rec, relevant, k)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 10), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_ranking_properties(n_users, k_rec, k, seed):
    rng = np.random.default_rng(seed)
    n_items = k_rec + 3
    rec = np.stack([rng.permutation(n_items)[:k_rec] for _ in range(n_users)])
    relevant = [rng.choice(n_items, rng.integers(1, n_items), replace=False) for _ in range(n_users)]
    values = [f(rec, relevant, k) for f in (metrics.hit_rate_at_k, metrics.precision_at_k,
                                            metrics.recall_at_k, metrics.ndcg_at_k)]
    assert all(0.0 <= v <= 1.0 for v in values)
    hr, prec, rec_, ndcg = values
    assert ndcg <= hr + 1e-12 and rec_ <= hr + 1e-12 and prec <= hr + 1e-12
    # all relevant items at the top -> perfect ndcg
    ideal = np.stack([np.concatenate([r, np.setdiff1d(np.arange(n_items), r)])[:k_rec] for r in relevant])
    assert metrics.ndcg_at_k(ideal, relevant, min(k, k_rec)) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(3))
def test_one_hit_matrix_serves_every_smaller_k(seed):
    # full_ranking computes hits once at the largest k and slices them for the others
    rec, relevant = random_case(seed)
    hits, n_rel, _ = metrics._hits(rec, relevant, 12)
    for k in (1, 3, 8, 12):
        sliced, direct = metrics._from_hits(hits, n_rel, k), metrics._per_user(rec, relevant, k)
        for name in ("hit_rate", "precision", "recall", "ndcg"):
            np.testing.assert_allclose(sliced[name], direct[name], rtol=1e-12)


def test_capped_recall_by_hand():
    """Liang et al.'s Recall@k divides by min(k, |relevant|): 3 relevant items, one in the top 2 -> 1/2 (the
    uncapped recall: 1/3); two in the top 4 -> 2/3 either way."""
    rec, rel = np.array([[1, 2, 3, 4]]), [[2, 4, 9]]
    assert metrics.recall_at_k(rec, rel, k=2, capped=True) == pytest.approx(1 / 2)
    assert metrics.recall_at_k(rec, rel, k=2) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(rec, rel, k=4, capped=True) == pytest.approx(2 / 3)
    assert metrics.recall_at_k(rec, [[1, 2]], k=2, capped=True) == 1.0
    with pytest.raises(ValueError, match="capped must be a bool"):
        metrics.recall_at_k(rec, rel, capped=1)
