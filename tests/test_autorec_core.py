"""AutoRec's core (cpp/autorec.cpp) against the NumPy oracle (fastrec.reference), the oracle against finite
differences, determinism across thread counts, and the core's argument checks."""

import numpy as np
import pytest
import scipy.sparse as sp

from fastrec import _core, available_isas
from fastrec import reference as ref

ACTIVATIONS = ["logistic", "identity", "tanh", "relu"]


def _problem(n_rows=9, n_cols=23, hidden=17, density=0.3, seed=0, empty_row=None, dtype=np.float32):
    """Random parameters and a CSR batch of ratings (1..5) with targets (rating - 3.4); optionally one row with
    no entries."""
    rng = np.random.default_rng(seed)
    params = [rng.normal(0, 0.3, (n_cols, hidden)), rng.normal(0, 0.3, hidden), rng.normal(0, 0.3, (n_cols, hidden)),
              rng.normal(0, 0.3, n_cols)]
    params = [p.astype(dtype) for p in params]
    M = sp.random(n_rows, n_cols, density=density, random_state=seed, format="lil", dtype=np.float64)
    if empty_row is not None:
        M[empty_row, :] = 0
    M = M.tocsr()
    M.eliminate_zeros()
    M.sort_indices()
    M.data = np.ceil(M.data * 5)
    X = (M.indptr.astype(np.int64), M.indices.astype(np.int32), M.data.astype(np.float32), n_cols)
    t = (M.data - 3.4).astype(np.float32)
    return params, X, t


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("hidden", [1, 7, 16, 17, 64, 65])
def test_loss_and_gradients_match_oracle(isa, act, hidden):
    params, X, t = _problem(hidden=hidden, seed=hidden)
    loss, grads = _core.autorec_loss_and_gradients(params, X, t, 0.7, act, n_threads=1, isa=isa)
    p64 = [p.astype(np.float64) for p in params]
    loss_ref, grads_ref = ref.autorec_loss_and_gradients(p64, X, t, 0.7, act)
    # float32 core vs float64 oracle on sums of at most ~20 terms of size ~1: float32 rounding is ~1e-7
    # relative; 1e-4 (the bar) leaves room, and a wrong term (a missing mask, derivative or L2 row) is
    # off by far more.
    assert abs(loss - loss_ref) / loss_ref < 1e-5
    for g, g_ref, name in zip(grads, grads_ref, ["W_enc", "b_enc", "W_dec", "b_dec"]):
        assert g.dtype == np.float32 and g.shape == g_ref.shape
        assert _rel(g, g_ref) < 1e-4, name


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_predict_and_hidden_match_oracle(act):
    params, X, t = _problem(seed=3)
    rng = np.random.default_rng(1)
    n_rows = len(X[0]) - 1
    counts = rng.integers(0, 5, n_rows)
    q_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    q_cols = rng.integers(0, X[3], q_indptr[-1]).astype(np.int32)
    p64 = [p.astype(np.float64) for p in params]
    assert _rel(_core.autorec_hidden(params, X, act), ref.autorec_hidden(p64, X, act)) < 1e-5
    out = _core.autorec_predict(params, X, q_indptr, q_cols, act)
    assert _rel(out, ref.autorec_predict(p64, X, q_indptr, q_cols, act)) < 1e-5


def test_oracle_matches_finite_differences():
    params, X, t = _problem(n_rows=4, n_cols=6, hidden=3, density=0.5, seed=5, dtype=np.float64)
    _, grads = ref.autorec_loss_and_gradients(params, X, t, 0.3, "logistic")
    eps = 1e-6
    for p, g in zip(params, grads):
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + eps
            up = ref.autorec_loss_and_gradients(params, X, t, 0.3, "logistic")[0]
            p[idx] = old - eps
            down = ref.autorec_loss_and_gradients(params, X, t, 0.3, "logistic")[0]
            p[idx] = old
            numeric = (up - down) / (2 * eps)
            # L2 covers touched columns only: an untouched column's rows have gradient 0 both ways
            assert abs(numeric - g[idx]) < 1e-6 * max(1.0, abs(numeric)), idx


def test_row_without_entries_adds_nothing_but_counts_in_the_batch():
    params, X, t = _problem(empty_row=2, seed=7)
    indptr = X[0]
    assert indptr[3] == indptr[2]
    loss, grads = _core.autorec_loss_and_gradients(params, X, t, 0.5, "logistic", n_threads=1)
    loss_ref, grads_ref = ref.autorec_loss_and_gradients([p.astype(np.float64) for p in params], X, t, 0.5, "logistic")
    assert abs(loss - loss_ref) / loss_ref < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert _rel(g, g_ref) < 1e-4
    # Without the empty row: the same sums over a batch of one row fewer (the 1/B changes by B/(B-1)).
    keep = np.delete(np.arange(len(indptr) - 1), 2)
    X2 = (np.concatenate([[0], np.cumsum(np.diff(indptr)[keep])]).astype(np.int64), X[1], X[2], X[3])
    loss2, grads2 = _core.autorec_loss_and_gradients(params, X2, t, 0.5, "logistic", n_threads=1)
    B = len(indptr) - 1
    assert loss2 * (B - 1) == pytest.approx(loss * B, rel=1e-6)
    assert np.allclose(grads2[2] * (B - 1), grads[2] * B, rtol=1e-5, atol=1e-7)
    # Its code is act(b_enc), and predicting at it reads the decoder there
    H = _core.autorec_hidden(params, X, "logistic")
    assert np.allclose(H[2], 1 / (1 + np.exp(-params[1].astype(np.float64))), rtol=1e-6)
    # a batch of empty rows only: no loss, zero gradients except none at all
    Xe = (np.zeros(4, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), X[3])
    loss_e, grads_e = _core.autorec_loss_and_gradients(params, Xe, np.zeros(0, np.float32), 0.5, "logistic")
    assert loss_e == 0.0 and all(not g.any() for g in grads_e)


def _train(params, X, t, order, threads, solver="adam", batch_size=4, epochs=2, isa="auto"):
    params = [p.copy() for p in params]
    state = [[np.zeros_like(p) for p in params] for _ in range(2)]
    adam_t, losses = 0, []
    for _ in range(epochs):
        loss_sum, adam_t, rows, diverged, error = _core.autorec_train_epoch(
            params, state[0], state[1], X, t, order, batch_size, 0.5, "logistic", solver, 1e-2, adam_t=adam_t,
            n_threads=threads, isa=isa)
        assert error is None and not diverged and rows == len(order)
        losses.append(loss_sum)
    return params, state, losses


@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_train_epoch_bitwise_identical_for_any_thread_count(solver):
    # big enough for the passes to split over threads (their thresholds are 2^18 multiply-adds)
    params, X, t = _problem(n_rows=300, n_cols=400, hidden=96, density=0.08, seed=11)
    order = np.random.default_rng(0).permutation(300).astype(np.int64)
    runs = [_train(params, X, t, order, threads, solver, batch_size=128) for threads in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0][0], other[0]):
            assert np.array_equal(a, b)
        assert runs[0][2] == other[2]
        for sa, sb in zip(runs[0][1][0] + runs[0][1][1], other[1][0] + other[1][1]):
            assert np.array_equal(sa, sb)


def test_one_adam_step_is_the_oracle_gradient_applied_to_touched_rows():
    params, X, t = _problem(n_rows=6, n_cols=40, hidden=9, density=0.1, seed=2)
    order = np.arange(6, dtype=np.int64)
    new, state, _ = _train(params, X, t, order, 1, "adam", batch_size=6, epochs=1)
    p64 = [p.astype(np.float64) for p in params]
    _, grads = ref.autorec_loss_and_gradients(p64, X, t, 0.5, "logistic")
    touched = np.unique(X[1])
    untouched = np.setdiff1d(np.arange(40), touched)
    expected = []
    for p, g in zip(p64, grads):
        m, s = np.zeros_like(p), np.zeros_like(p)
        q = p.copy()
        ref.adam_update(q, g, m, s, 1, 1e-2, 0.9, 0.999, 1e-8)
        expected.append(q)
    for i in (0, 2, 3):  # lazy: untouched rows (and their state) are not read or written
        assert np.array_equal(new[i][untouched], params[i][untouched])
        assert not state[0][i][untouched].any()
        assert np.abs(new[i][touched] - expected[i][touched]).max() < 1e-5
    assert np.abs(new[1] - expected[1]).max() < 1e-5


def test_train_epoch_stops_at_a_batch_whose_loss_overflows():
    # a huge learning rate: the first batch's step makes the weights ~1e35, the second batch's outputs overflow
    params, X, t = _problem(n_rows=8, seed=4)
    state = [[np.zeros_like(p) for p in params] for _ in range(2)]
    _, adam_t, rows, diverged, error = _core.autorec_train_epoch(
        params, state[0], state[1], X, t, np.arange(8, dtype=np.int64), 4, 0.0, "identity", "adam", 1e35)
    assert diverged and error is None
    assert rows == 4 and adam_t == 1  # the second batch was not applied and gave its step back
    assert all(np.isfinite(p).all() for p in params)


def test_bad_arguments():
    params, X, t = _problem()
    with pytest.raises(ValueError, match="params"):
        _core.autorec_hidden(params[:3], X, "logistic")
    with pytest.raises(ValueError, match="b_dec"):
        _core.autorec_hidden(params[:3] + [params[3][:-1]], X, "logistic")
    with pytest.raises(TypeError, match="W_enc"):
        _core.autorec_hidden([params[0].astype(np.float64)] + params[1:], X, "logistic")
    with pytest.raises(ValueError, match="softmax"):
        _core.autorec_hidden(params, X, "softmax")
    with pytest.raises(ValueError, match="columns"):
        _core.autorec_hidden(params, (X[0], X[1], X[2], X[3] + 1), "logistic")
    with pytest.raises(ValueError, match="X.indices"):
        bad = X[1].copy()
        bad[0] = X[3]
        _core.autorec_hidden(params, (X[0], bad, X[2], X[3]), "logistic")
    with pytest.raises(ValueError, match="t must have"):
        _core.autorec_loss_and_gradients(params, X, t[:-1], 0.1, "logistic")
    with pytest.raises(ValueError, match="finite"):
        bad_t = t.copy()
        bad_t[0] = np.nan
        _core.autorec_loss_and_gradients(params, X, bad_t, 0.1, "logistic")
    with pytest.raises(ValueError, match="l2"):
        _core.autorec_loss_and_gradients(params, X, t, -1.0, "logistic")
    with pytest.raises(ValueError, match="q_cols"):
        n = len(X[0]) - 1
        _core.autorec_predict(params, X, np.concatenate([[0], np.ones(n, np.int64)]), np.array([X[3]], np.int32),
                              "logistic")
    state = [[np.zeros_like(p) for p in params] for _ in range(2)]
    order = np.arange(len(X[0]) - 1, dtype=np.int64)
    with pytest.raises(ValueError, match="order"):
        _core.autorec_train_epoch(params, state[0], state[1], X, t, order + 100, 4, 0.1, "logistic", "adam", 1e-3)
    with pytest.raises(ValueError, match="solver"):
        _core.autorec_train_epoch(params, state[0], state[1], X, t, order, 4, 0.1, "logistic", "rmsprop", 1e-3)
    with pytest.raises(ValueError, match="state1"):
        _core.autorec_train_epoch(params, state[0][:3], state[1], X, t, order, 4, 0.1, "logistic", "adam", 1e-3)
    with pytest.raises(ValueError, match="batch_size"):
        _core.autorec_train_epoch(params, state[0], state[1], X, t, order, 0, 0.1, "logistic", "adam", 1e-3)
    read_only = [p.copy() for p in params]
    read_only[2].setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        _core.autorec_train_epoch(read_only, state[0], state[1], X, t, order, 4, 0.1, "logistic", "adam", 1e-3)
    # a read-only model still predicts
    _core.autorec_hidden(read_only, X, "logistic")
