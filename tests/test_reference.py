"""Tests of the NumPy oracle ``fastrec.reference`` itself (float64).

The oracle is what every core test trusts, so it is checked against things that do not share its code:
central finite differences of its own loss, scikit-learn's loss functions, backprop and optimizers, and
closed-form values.  All data are drawn from seeded generators.
"""


import numpy as np
import pytest
import scipy.sparse
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.neural_network import _base as sk_base
from sklearn.neural_network._stochastic_optimizers import AdamOptimizer, SGDOptimizer

from fastrec import reference

HIDDEN = ("identity", "logistic", "tanh", "relu")
OUTPUT = ("identity", "logistic", "softmax")
N_ROWS = 7
# Two hidden layers so the backward recursion D_{l-1} = (D_l W_l^T) * act'(A_l) runs twice.
SIZES = (8, 5, 4, 3)
# CSR test matrix layout over SIZES[0] = 8 columns: columns 0..4 hold random entries, column 5 holds only
# explicit zeros (touched, but contributes nothing to X @ W_0), columns 6 and 7 are never stored (untouched).
EXPLICIT_ZERO_COL = 5
UNTOUCHED_COLS = np.array([6, 7])

# The minimum |pre-activation| kept for relu so that a finite-difference step of H cannot cross its kink:
# a step of H = 1e-6 on one weight moves a pre-activation by at most H * |input| ~ 1e-6, far below 1e-3.
RELU_MARGIN = 1e-3
H = 1e-6
# Central differences: truncation error ~ H^2 * |f'''| / 6 ~ 1e-13 and rounding error ~ eps * |loss| / H
# ~ 1e-10 for the O(1) losses here, so 1e-7 (absolute) / 1e-6 (relative) leaves a wide margin, while any
# real mistake (a missing 1/n, a wrong derivative, a dropped L2 term) is off by > 1e-3.
FD_RTOL, FD_ATOL = 1e-6, 1e-7
# Comparisons with scikit-learn: same formulas in float64, different evaluation order (logits vs clipped
# probabilities, in-place products); differences are a few ulps of O(1) values.
SK_RTOL, SK_ATOL = 1e-12, 1e-13


# ----------------------------------------------------------------------------------------------------------
# Problem construction (independent of the oracle)
# ----------------------------------------------------------------------------------------------------------


def _draw_x(rng, sparse):
    """Dense (n, 8) matrix and, if sparse, the CSR tuple of it with an explicit zero in column 5."""
    n, f = N_ROWS, SIZES[0]
    X = rng.normal(size=(n, f))
    if not sparse:
        return X, X
    mask = rng.random((n, f)) < 0.5
    mask[:, EXPLICIT_ZERO_COL:] = False
    mask[np.arange(n), rng.integers(0, EXPLICIT_ZERO_COL, n)] = True  # every row has an entry
    indptr, indices, data = [0], [], []
    for i in range(n):
        cols = list(np.flatnonzero(mask[i]))
        vals = list(X[i, cols])
        if i in (1, 4):
            cols.append(EXPLICIT_ZERO_COL)
            vals.append(0.0)
        indices += cols
        data += vals
        indptr.append(len(indices))
    X_dense = np.where(mask, X, 0.0)
    csr = (np.array(indptr, np.int64), np.array(indices, np.int32), np.array(data, np.float64), f)
    return X_dense, csr


def _draw_y(rng, out):
    n, n_out = N_ROWS, SIZES[-1]
    if out == "identity":
        return rng.normal(size=(n, n_out))
    if out == "logistic":  # multi-label 0/1 targets
        return (rng.random((n, n_out)) < 0.5).astype(np.float64)
    return np.eye(n_out)[rng.integers(0, n_out, n)]  # one-hot


def _hidden_preactivations(coefs, intercepts, X_dense, act):
    """Pre-activations of the hidden layers, computed here with plain NumPy (not the oracle)."""
    f = {"identity": lambda z: z, "relu": lambda z: np.maximum(z, 0), "tanh": np.tanh,
         "logistic": lambda z: 0.5 * (1 + np.tanh(0.5 * z))}[act]
    pre, A = [], X_dense
    for W, b in zip(coefs[:-1], intercepts[:-1]):
        pre.append(A @ W + b)
        A = f(pre[-1])
    return pre


def make_problem(seed, act, out, sparse):
    """Seeded weights, X (dense array or CSR tuple), its dense copy and Y. For relu, redraw until every
    hidden pre-activation is at least RELU_MARGIN away from 0."""
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        coefs = [rng.uniform(-1, 1, (a, b)) for a, b in zip(SIZES[:-1], SIZES[1:])]
        intercepts = [rng.uniform(-0.5, 0.5, b) for b in SIZES[1:]]
        X_dense, X = _draw_x(rng, sparse)
        if act != "relu":
            break
        if min(np.abs(z).min() for z in _hidden_preactivations(coefs, intercepts, X_dense, act)) > RELU_MARGIN:
            break
    else:
        raise RuntimeError("could not draw a relu problem away from the kink")
    return coefs, intercepts, X, X_dense, _draw_y(rng, out)


def numerical_gradients(coefs, intercepts, X, Y, act, out, alpha):
    """Central differences of reference.loss_and_gradients' loss w.r.t. every parameter."""
    coefs = [c.copy() for c in coefs]
    intercepts = [b.copy() for b in intercepts]

    n_out = coefs[-1].shape[1]
    l2_rows = slice(None) if isinstance(X, np.ndarray) else np.setdiff1d(np.arange(SIZES[0]), UNTOUCHED_COLS)

    def l2():
        w0 = coefs[0][l2_rows]
        return 0.5 * alpha * (np.sum(w0 * w0) + sum(np.sum(c * c) for c in coefs[1:])) / len(Y)

    def loss():
        value = reference.loss_and_gradients(coefs, intercepts, X, Y, act, out, alpha)[0]
        if out == "identity":
            # DESIGN.md / scikit-learn quirk: the squared loss is averaged over the n_out outputs but its
            # gradient uses dZ = P - Y, i.e. it is the gradient of n_out * data_loss + L2.
            return n_out * (value - l2()) + l2()
        return value

    grads = []
    for p in coefs + intercepts:
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            saved = p[idx]
            p[idx] = saved + H
            up = loss()
            p[idx] = saved - H
            down = loss()
            p[idx] = saved
            g[idx] = (up - down) / (2 * H)
        grads.append(g)
    return grads[: len(coefs)], grads[len(coefs):]


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("out", OUTPUT)
@pytest.mark.parametrize("act", HIDDEN)
def test_gradients_match_finite_differences(act, out, alpha, sparse):
    seed = 1000 + 100 * HIDDEN.index(act) + 10 * OUTPUT.index(out) + 2 * int(sparse) + int(alpha > 0)
    coefs, intercepts, X, _, Y = make_problem(seed, act, out, sparse)
    loss, coef_grads, intercept_grads = reference.loss_and_gradients(coefs, intercepts, X, Y, act, out, alpha)
    assert np.isfinite(loss)
    num_coef, num_int = numerical_gradients(coefs, intercepts, X, Y, act, out, alpha)
    for l, (g, ng) in enumerate(zip(coef_grads, num_coef)):
        assert g.shape == coefs[l].shape
        assert_allclose(g, ng, rtol=FD_RTOL, atol=FD_ATOL, err_msg=f"coef_grads[{l}]")
    for l, (g, ng) in enumerate(zip(intercept_grads, num_int)):
        assert g.shape == intercepts[l].shape
        assert_allclose(g, ng, rtol=FD_RTOL, atol=FD_ATOL, err_msg=f"intercept_grads[{l}]")
    if sparse:
        # Untouched rows of W_0: exactly zero gradient (the loss does not depend on them at all).
        assert_array_equal(coef_grads[0][UNTOUCHED_COLS], 0.0)
        # The explicit-zero column is touched: its gradient is the L2 term alone.
        assert_allclose(coef_grads[0][EXPLICIT_ZERO_COL], alpha * coefs[0][EXPLICIT_ZERO_COL] / N_ROWS,
                        rtol=1e-14, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("out", OUTPUT)
def test_csr_equals_dense_on_touched_rows_and_l2_counts_touched_rows_only(out, alpha):
    coefs, intercepts, X, X_dense, Y = make_problem(7, "tanh", out, sparse=True)
    loss_s, cg_s, ig_s = reference.loss_and_gradients(coefs, intercepts, X, Y, "tanh", out, alpha)
    loss_d, cg_d, ig_d = reference.loss_and_gradients(coefs, intercepts, X_dense, Y, "tanh", out, alpha)
    touched = np.setdiff1d(np.arange(SIZES[0]), UNTOUCHED_COLS)
    untouched_l2 = np.sum(coefs[0][UNTOUCHED_COLS] ** 2)
    assert untouched_l2 > 0.1  # so the check below can fail
    # Dense L2 counts every row of W_0; CSR leaves out the untouched ones.
    assert_allclose(loss_d - loss_s, 0.5 * alpha * untouched_l2 / N_ROWS, rtol=1e-10, atol=1e-14)
    assert_allclose(cg_s[0][touched], cg_d[0][touched], rtol=1e-12, atol=1e-14)
    assert_array_equal(cg_s[0][UNTOUCHED_COLS], 0.0)
    for a, b in zip(cg_s[1:] + ig_s, cg_d[1:] + ig_d):
        assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_input_formats_agree():
    """Dense-equivalent inputs: CSR tuple, scipy CSR (with its explicit zeros) and a scipy CSC matrix."""
    coefs, intercepts, X, X_dense, Y = make_problem(3, "logistic", "softmax", sparse=True)
    indptr, indices, data, n_cols = X
    sp = scipy.sparse.csr_matrix((data, indices, indptr), shape=(N_ROWS, n_cols))
    assert sp.nnz == len(data)  # explicit zeros kept
    results = [reference.loss_and_gradients(coefs, intercepts, x, Y, "logistic", "softmax", 0.2)
               for x in (X, sp, sp.tocsc())]
    for loss, cg, ig in results[1:]:
        assert_allclose(loss, results[0][0], rtol=1e-14)
        for a, b in zip(cg + ig, results[0][1] + results[0][2]):
            assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    P = reference.forward(coefs, intercepts, X, "logistic", "softmax")
    assert_allclose(P, reference.forward(coefs, intercepts, X_dense, "logistic", "softmax"), rtol=1e-13)
    assert_allclose(P, reference.forward(coefs, intercepts, sp, "logistic", "softmax"), rtol=1e-13)


@pytest.mark.parametrize("act", HIDDEN)
def test_activation_derivative_in_terms_of_output(act):
    rng = np.random.default_rng(11)
    z = rng.uniform(-3, 3, size=50)
    z = z[np.abs(z) > RELU_MARGIN]
    num = (reference.activation(z + H, act) - reference.activation(z - H, act)) / (2 * H)
    assert_allclose(reference.activation_derivative(reference.activation(z, act), act), num,
                    rtol=FD_RTOL, atol=FD_ATOL)


# ----------------------------------------------------------------------------------------------------------
# Agreement with scikit-learn on dense input
# ----------------------------------------------------------------------------------------------------------


def _sklearn_backprop(coefs, intercepts, X, Y, act, out, alpha):
    """scikit-learn's own loss and gradients for the same weights (private API of sklearn >= 1.6, confined
    here: BaseMultilayerPerceptron._backprop with the fitted attributes it reads set by hand)."""
    est = MLPRegressor(activation=act, alpha=alpha) if out == "identity" else \
        MLPClassifier(activation=act, alpha=alpha)
    est.coefs_ = [c.copy() for c in coefs]
    est.intercepts_ = [b.copy() for b in intercepts]
    est.n_layers_ = len(coefs) + 1
    est.n_outputs_ = Y.shape[1]
    est.out_activation_ = out
    activations = [X] + [None] * len(coefs)
    deltas = [None] * len(coefs)
    coef_grads = [np.empty_like(c) for c in coefs]
    intercept_grads = [np.empty_like(b) for b in intercepts]
    return est._backprop(X, Y, None, activations, deltas, coef_grads, intercept_grads)


SK_LOSS = {"identity": sk_base.squared_loss, "logistic": sk_base.binary_log_loss, "softmax": sk_base.log_loss}


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("out", OUTPUT)
@pytest.mark.parametrize("act", HIDDEN)
def test_loss_and_gradients_equal_sklearn(act, out, alpha):
    coefs, intercepts, X, _, Y = make_problem(50 + HIDDEN.index(act), act, out, sparse=False)
    P = reference.forward(coefs, intercepts, X, act, out)
    if out != "identity":  # stay away from scikit-learn's probability clipping at eps
        assert 1e-6 < P.min() and P.max() < 1 - 1e-6
    loss, cg, ig = reference.loss_and_gradients(coefs, intercepts, X, Y, act, out, alpha)
    l2 = 0.5 * alpha * sum(np.sum(c * c) for c in coefs) / N_ROWS
    assert_allclose(loss, SK_LOSS[out](Y, P) + l2, rtol=SK_RTOL)
    sk_loss, sk_cg, sk_ig = _sklearn_backprop(coefs, intercepts, X, Y, act, out, alpha)
    assert_allclose(loss, sk_loss, rtol=SK_RTOL)
    for l in range(len(coefs)):
        assert_allclose(cg[l], sk_cg[l], rtol=SK_RTOL, atol=SK_ATOL, err_msg=f"coef_grads[{l}]")
        assert_allclose(ig[l], sk_ig[l], rtol=SK_RTOL, atol=SK_ATOL, err_msg=f"intercept_grads[{l}]")


def _random_params(rng):
    shapes = [(a, b) for a, b in zip(SIZES[:-1], SIZES[1:])] + [(b,) for b in SIZES[1:]]
    return [rng.normal(size=s) for s in shapes]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_update_equals_sklearn(nesterov):
    rng = np.random.default_rng(21)
    params, velocities = _random_params(rng), _random_params(rng)  # nonzero state: tests the recurrence
    lr, momentum = 0.05, 0.9
    opt = SGDOptimizer([p.copy() for p in params], learning_rate_init=lr, momentum=momentum, nesterov=nesterov)
    opt.velocities = [v.copy() for v in velocities]
    sk_params = [p.copy() for p in params]
    for _ in range(3):
        grads = _random_params(rng)
        opt.update_params(sk_params, grads)
        for p, g, v in zip(params, grads, velocities):
            reference.sgd_update(p, g, v, lr, momentum, nesterov)
    # Same formula evaluated in the same order: equal to the last bit up to possible reassociation.
    for p, q, v, w in zip(params, sk_params, velocities, opt.velocities):
        assert_allclose(p, q, rtol=1e-14, atol=0)
        assert_allclose(v, w, rtol=1e-14, atol=0)


@pytest.mark.parametrize("t0", [0, 5])
def test_adam_update_equals_sklearn(t0):
    rng = np.random.default_rng(22 + t0)
    params = _random_params(rng)
    zeros = [np.zeros_like(p) for p in params]
    ms = zeros if t0 == 0 else _random_params(rng)
    ss = [z.copy() for z in zeros] if t0 == 0 else [q**2 for q in _random_params(rng)]
    ms, ss = [m.copy() for m in ms], [s.copy() for s in ss]
    lr, b1, b2, eps = 0.01, 0.8, 0.95, 1e-6  # non-default betas so bias corrections matter
    opt = AdamOptimizer([p.copy() for p in params], learning_rate_init=lr, beta_1=b1, beta_2=b2, epsilon=eps)
    opt.t, opt.ms, opt.vs = t0, [m.copy() for m in ms], [s.copy() for s in ss]
    sk_params = [p.copy() for p in params]
    t = t0
    for _ in range(3):
        grads = _random_params(rng)
        opt.update_params(sk_params, grads)
        t += 1
        for p, g, m, s in zip(params, grads, ms, ss):
            reference.adam_update(p, g, m, s, t, lr, b1, b2, eps)
    assert opt.t == t
    for p, q in zip(params + ms + ss, sk_params + opt.ms + opt.vs):
        assert_allclose(p, q, rtol=1e-14, atol=1e-300)


# ----------------------------------------------------------------------------------------------------------
# Numerical stability
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logistic_loss_stable_for_huge_logits(dtype):
    Z = np.array([[1e4, -1e4], [-1e4, 1e4]], dtype=dtype)
    # softplus(z) - y z: 0 when the label agrees with the sign, |z| when it disagrees.
    loss, P, dZ = reference.output_loss(Z, np.array([[1, 0], [0, 1]], dtype), "logistic")
    assert loss == pytest.approx(0.0, abs=1e-6)
    loss, P, dZ = reference.output_loss(Z, np.array([[0, 1], [1, 0]], dtype), "logistic")
    assert loss == pytest.approx(2e4, rel=1e-6)  # (1e4 + 1e4) per row, 2 rows, / n = 2
    assert_array_equal(P, [[1, 0], [0, 1]])
    assert P.dtype == dtype and np.all(np.isfinite(dZ))
    a = reference.activation(np.array([-1e4, -50.0, 0.0, 50.0, 1e4], dtype), "logistic")
    assert np.all((a >= 0) & (a <= 1)) and a[2] == 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_loss_stable_for_huge_logits(dtype):
    Z = np.array([[1e4, -1e4, 0.0]], dtype=dtype)
    loss, P, dZ = reference.output_loss(Z, np.array([[1, 0, 0]], dtype), "softmax")
    assert loss == pytest.approx(0.0, abs=1e-6)
    # logsumexp(Z) = 1e4 (other terms underflow), minus Z_1 = -1e4.
    loss, P, dZ = reference.output_loss(Z, np.array([[0, 1, 0]], dtype), "softmax")
    assert loss == pytest.approx(2e4, rel=1e-6)
    assert_allclose(P, [[1, 0, 0]], atol=1e-30)
    assert np.all(np.isfinite(dZ)) and P.dtype == dtype


@pytest.mark.parametrize("out", ["logistic", "softmax"])
def test_network_with_huge_logits_has_finite_loss_and_gradients(out):
    coefs, intercepts, X, _, Y = make_problem(9, "tanh", out, sparse=False)
    coefs[-1] = coefs[-1] * 1e4  # tanh outputs in (-1, 1): logits of magnitude up to ~1e4
    loss, cg, ig = reference.loss_and_gradients(coefs, intercepts, X, Y, "tanh", out, 0.1)
    assert np.isfinite(loss) and loss > 100
    assert all(np.all(np.isfinite(g)) for g in cg + ig)


# ----------------------------------------------------------------------------------------------------------
# train_epoch
# ----------------------------------------------------------------------------------------------------------

OPT_ARGS = dict(learning_rate=0.05, momentum=0.9, beta_1=0.8, beta_2=0.95, epsilon=1e-6)


def _state(rng, coefs, intercepts, solver):
    """Nonzero optimizer state (second moments positive), so lazy updates are observable."""
    s1 = [rng.normal(size=p.shape) for p in coefs + intercepts]
    s2 = [rng.normal(size=p.shape) ** 2 for p in coefs + intercepts] if solver == "adam" else []
    return s1, s2


def _manual_epoch(coefs, intercepts, s1, s2, X_batches, Y_batches, act, out, alpha, solver, nesterov, t,
                  lazy_rows):
    """Reference semantics spelled out: per batch, loss_and_gradients then one optimizer step per array;
    for a CSR batch, W_0 and its state only on the rows listed in lazy_rows[batch]."""
    a = OPT_ARGS
    loss_sum = 0.0
    for Xb, Yb, rows in zip(X_batches, Y_batches, lazy_rows):
        loss, cg, ig = reference.loss_and_gradients(coefs, intercepts, Xb, Yb, act, out, alpha)
        loss_sum += loss * len(Yb)
        t += solver == "adam"
        for i, (p, g) in enumerate(zip(coefs + intercepts, cg + ig)):
            sel = rows if (i == 0 and rows is not None) else slice(None)
            sub_p, sub_g, sub_1 = p[sel], g[sel], s1[i][sel]
            sub_2 = s2[i][sel] if solver == "adam" else None
            if solver == "sgd":
                reference.sgd_update(sub_p, sub_g, sub_1, a["learning_rate"], a["momentum"], nesterov)
            else:
                reference.adam_update(sub_p, sub_g, sub_1, sub_2, t, a["learning_rate"], a["beta_1"],
                                      a["beta_2"], a["epsilon"])
            p[sel], s1[i][sel] = sub_p, sub_1
            if solver == "adam":
                s2[i][sel] = sub_2
    return loss_sum, t


def _csr_rows(X, rows):
    """CSR tuple of the given rows, built directly (so the test does not use the oracle's row slicing)."""
    indptr, indices, data, n_cols = X
    sp = scipy.sparse.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, n_cols))
    sub = sp[rows]
    return (sub.indptr.astype(np.int64), sub.indices, sub.data, n_cols), np.unique(sub.indices)


SOLVERS = [("sgd", False), ("sgd", True), ("adam", False)]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize(("solver", "nesterov"), SOLVERS)
@pytest.mark.parametrize("batch_size", [N_ROWS, 3])
def test_train_epoch_equals_manual_steps(batch_size, solver, nesterov, sparse):
    act, out, alpha, t0 = "relu", "softmax", 0.2, 4
    rng = np.random.default_rng(31)
    coefs, intercepts, X, X_dense, Y = make_problem(31, act, out, sparse)
    s1, s2 = _state(rng, coefs, intercepts, solver)
    order = np.arange(N_ROWS) if batch_size == N_ROWS else rng.permutation(N_ROWS)
    batches = [order[i:i + batch_size] for i in range(0, N_ROWS, batch_size)]
    if sparse:
        sub = [_csr_rows(X, b) for b in batches]
        X_batches, lazy_rows = [x for x, _ in sub], [r for _, r in sub]
    else:
        X_batches, lazy_rows = [X[b] for b in batches], [None] * len(batches)
    exp = [[a.copy() for a in group] for group in (coefs, intercepts, s1, s2)]
    exp_loss, exp_t = _manual_epoch(*exp, X_batches, [Y[b] for b in batches], act, out, alpha, solver,
                                    nesterov, t0, lazy_rows)
    ids = [id(a) for a in coefs + intercepts + s1 + s2]
    loss_sum, t = reference.train_epoch(coefs, intercepts, s1, s2, X, Y, order, batch_size, act, out, alpha,
                                        solver, OPT_ARGS["learning_rate"], OPT_ARGS["momentum"], nesterov,
                                        OPT_ARGS["beta_1"], OPT_ARGS["beta_2"], OPT_ARGS["epsilon"], t0)
    assert [id(a) for a in coefs + intercepts + s1 + s2] == ids  # updated in place
    assert t == (t0 + len(batches) if solver == "adam" else t0)
    assert_allclose(loss_sum, exp_loss, rtol=1e-13)
    for got, want in zip(coefs + intercepts + s1 + s2, sum(exp, [])):
        assert_allclose(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("solver", "nesterov"), SOLVERS)
def test_train_epoch_csr_leaves_untouched_rows_bit_identical(solver, nesterov):
    act, out, alpha = "tanh", "logistic", 0.2
    rng = np.random.default_rng(41)
    coefs, intercepts, X, _, Y = make_problem(41, act, out, sparse=True)
    s1, s2 = _state(rng, coefs, intercepts, solver)
    before = [a.copy() for a in [coefs[0], s1[0]] + ([s2[0]] if solver == "adam" else [])]
    after = [coefs[0], s1[0]] + ([s2[0]] if solver == "adam" else [])
    reference.train_epoch(coefs, intercepts, s1, s2, X, Y, rng.permutation(N_ROWS), 2, act, out, alpha, solver,
                          OPT_ARGS["learning_rate"], OPT_ARGS["momentum"], nesterov, OPT_ARGS["beta_1"],
                          OPT_ARGS["beta_2"], OPT_ARGS["epsilon"], 0)
    for b, a in zip(before, after):
        assert b[UNTOUCHED_COLS].tobytes() == a[UNTOUCHED_COLS].tobytes()
        # Touched rows, the explicit-zero column included, did move (so this test can fail).
        touched = np.setdiff1d(np.arange(SIZES[0]), UNTOUCHED_COLS)
        assert np.all(np.any(b[touched] != a[touched], axis=1))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_float32_stays_float32(sparse):
    coefs, intercepts, X, _, Y = make_problem(61, "logistic", "softmax", sparse)
    c32 = [c.astype(np.float32) for c in coefs]
    i32 = [b.astype(np.float32) for b in intercepts]
    X32 = (X[0], X[1], X[2].astype(np.float32), X[3]) if sparse else X.astype(np.float32)
    Y32 = Y.astype(np.float32)
    assert reference.forward(c32, i32, X32, "logistic", "softmax").dtype == np.float32
    loss32, cg32, ig32 = reference.loss_and_gradients(c32, i32, X32, Y32, "logistic", "softmax", 0.1)
    loss64, cg64, ig64 = reference.loss_and_gradients(coefs, intercepts, X, Y, "logistic", "softmax", 0.1)
    assert all(g.dtype == np.float32 for g in cg32 + ig32)
    # float32 rounding of O(1) values through a 3-layer net: relative error ~1e-6, checked at 1e-4.
    assert_allclose(loss32, loss64, rtol=1e-4)
    for a, b in zip(cg32 + ig32, cg64 + ig64):
        assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    s1 = [np.zeros_like(p) for p in c32 + i32]
    s2 = [np.zeros_like(p) for p in c32 + i32]
    reference.train_epoch(c32, i32, s1, s2, X32, Y32, np.arange(N_ROWS), 3, "logistic", "softmax",
                          np.float64(0.1), "adam", np.float64(0.01), 0.9, False, 0.9, 0.999, 1e-8, 0)
    assert all(a.dtype == np.float32 for a in c32 + i32 + s1 + s2)


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (7, 15, 16), (17, 31, 33)])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_sgemm(m, n, k, trans_a, trans_b):
    rng = np.random.default_rng(m * 100 + n)
    a, b = rng.normal(size=(m, k)), rng.normal(size=(k, n))
    c = reference.sgemm(a.T.copy() if trans_a else a, b.T.copy() if trans_b else b, trans_a, trans_b, "scalar", 2)
    assert c.shape == (m, n) and c.flags.c_contiguous
    want = np.array([[sum(a[i, p] * b[p, j] for p in range(k)) for j in range(n)] for i in range(m)])
    assert_allclose(c, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        reference.sgemm(a, b[:-1] if k > 1 else np.ones((2, n)))


def test_csr_building_blocks_match_scipy():
    rng = np.random.default_rng(71)
    _, (indptr, indices, data, n_cols) = _draw_x(rng, sparse=True)
    sp = scipy.sparse.csr_matrix((data, indices, indptr), shape=(N_ROWS, n_cols))
    W, D = rng.normal(size=(n_cols, 4)), rng.normal(size=(N_ROWS, 4))
    assert_allclose(reference.csr_matmul(indptr, indices, data, W), sp @ W, rtol=1e-13, atol=1e-15)
    rows = reference.csr_touched_rows(indptr, indices)
    assert_array_equal(rows, np.setdiff1d(np.arange(n_cols), UNTOUCHED_COLS))  # explicit zeros count
    full = sp.T @ D
    assert_allclose(reference.csr_transpose_matmul(indptr, indices, data, D, rows), full[rows], rtol=1e-13,
                    atol=1e-15)
    subset = rows[::2]
    assert_allclose(reference.csr_transpose_matmul(indptr, indices, data, D, subset), full[subset], rtol=1e-13,
                    atol=1e-15)
