"""fastrec.MLPClassifier / MLPRegressor: scikit-learn's estimator checks, equality with scikit-learn's MLP
updates, accuracy, sparse input, input validation, determinism across threads, warm start, partial_fit,
early stopping and pickling."""

import io
import pickle
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal
from sklearn import neural_network as sknn
from sklearn.base import clone, is_classifier, is_regressor
from sklearn.datasets import make_classification, make_regression
from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
from sklearn.exceptions import NotFittedError as SkNotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

import fastrec
from fastrec import MLPClassifier, MLPRegressor

# Float32 tolerances. One update: both sides compute the same float32 products, in different summation
# orders (fastrec's GEMM vs NumPy's BLAS), so parameters agree to a few float32 ulps of the largest
# term: rtol 1e-5 with atol 1e-6 (weights are O(0.1-1)). A few epochs compound this: rtol 1e-3.
RTOL_STEP, ATOL_STEP = 1e-5, 1e-6
# Adam's first step is lr * g / (|g| + epsilon / sqrt(1 - beta_2)) ~ lr * sign(g): for the few gradient
# elements near 3e-7 the summation-order noise of g moves the step by a small fraction of lr.
ATOL_ADAM_STEP_PER_LR = 2e-4
RTOL_EPOCHS, ATOL_EPOCHS = 1e-3, 1e-5

ignore_convergence = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


# --------------------------------------------------------------------------- scikit-learn's checks
# The two checks fit one model with integer sample weights (15 rows) and one on the rows repeated that many times
# (27 rows), then compare predictions at rtol 1e-7. batch_size="auto" (min(200, n)) makes each fit one full batch, the
# same model in exact arithmetic; test_sample_weight_equivalence_misses_only_by_float32_rounding checks the
# facts of this reason.
_FLOAT32_WEIGHTS = ("float32 rounding: fastrec trains in float32, and the weighted and repeated-row fits (the same "
                    "model in exact arithmetic: one full batch each) differ by float32 rounding of differently "
                    "grouped sums, 2e-7 to 1.2e-6 relative against the check's rtol 1e-7 (refitting the repeated "
                    "rows in another order moves them as much); scikit-learn's MLPs pass it by computing in float64 "
                    "for the check's float64 X")


def _expected_failed_checks(estimator):
    return {"check_sample_weight_equivalence_on_dense_data": _FLOAT32_WEIGHTS,
            "check_sample_weight_equivalence_on_sparse_data": _FLOAT32_WEIGHTS}


def _estimator_checks():
    # Generating the checks warns that the estimators do not inherit from sklearn's BaseEstimator:
    # deliberate (scikit-learn is not a runtime dependency); the checks themselves are what matters.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not inherit from", category=UserWarning)
        return parametrize_with_checks([MLPClassifier(), MLPRegressor()], expected_failed_checks=_expected_failed_checks)


# Default max_iter=200 does not converge on the checks' tiny data sets: scikit-learn's own MLP warns there too.
@ignore_convergence
@pytest.mark.filterwarnings("ignore:.*does not inherit from:UserWarning")
@_estimator_checks()
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@ignore_convergence
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_sample_weight_equivalence_misses_only_by_float32_rounding(kind, sparse):
    """The facts in the xfail reason of scikit-learn's two sample-weight equivalence checks, on the checks' own
    data (sklearn/utils/estimator_checks.py, _check_sample_weight_equivalence): scikit-learn's MLP passes the
    check; fastrec's weighted and repeated-row models agree within float32 rounding, rtol 1e-5 (measured
    1.2e-6 at most; float32's epsilon is 6e-8 and the rounding of each epoch's sums compounds over 147-200
    Adam epochs); and the repeated rows refitted in another order (the same model in exact arithmetic) already
    miss the check's rtol 1e-7."""
    from sklearn.utils import shuffle
    from sklearn.utils.estimator_checks import (check_sample_weight_equivalence_on_dense_data,
                                                check_sample_weight_equivalence_on_sparse_data)

    ours, theirs = (MLPClassifier, sknn.MLPClassifier) if kind == "classifier" else (MLPRegressor, sknn.MLPRegressor)
    check = check_sample_weight_equivalence_on_sparse_data if sparse else check_sample_weight_equivalence_on_dense_data
    check(theirs.__name__, theirs())  # raises AssertionError if scikit-learn's MLP failed it too

    rng = np.random.RandomState(42)
    X = rng.rand(15, 30)
    y = rng.randint(0, 3, size=15)
    sw = rng.randint(0, 5, size=15)
    X_rep, y_rep = X.repeat(sw, axis=0), y.repeat(sw)
    X_w, y_w, sw = shuffle(X, y, sw, random_state=0)
    convert = sp.csr_array if sparse else np.asarray
    perm = np.random.RandomState(1).permutation(len(y_rep))

    def prediction(X_fit, y_fit, sample_weight=None):
        model = ours(random_state=0).fit(convert(X_fit), y_fit, sample_weight=sample_weight)
        return model.predict_proba(X) if kind == "classifier" else model.predict(X)

    repeated = prediction(X_rep, y_rep)
    assert_allclose(prediction(X_w, y_w, sw), repeated, rtol=1e-5, atol=0)
    reordered = prediction(X_rep[perm], y_rep[perm])
    assert_allclose(reordered, repeated, rtol=1e-5, atol=0)
    assert np.max(np.abs(reordered - repeated) / np.abs(repeated)) > 1e-7


def test_sample_weight_scales_each_row_and_the_batch_mean():
    """Integer weights w vs the unweighted model on each row repeated w times, one full batch and no
    shuffling: the same steps (scikit-learn's definition: weighted loss mean over sum(w)), so the same model
    within the float32 tolerance of a few epochs (RTOL_EPOCHS: the sums are grouped differently); zero
    weights drop rows; bad weights raise naming sample_weight."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 6)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    w = rng.integers(0, 4, 40)
    w[np.argmax(y == 0)], w[np.argmax(y == 1)] = 1, 2  # both classes keep weight (and rows)
    params = dict(hidden_layer_sizes=(7,), solver="adam", batch_size=10**6, shuffle=False, max_iter=3,
                  random_state=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        weighted = MLPClassifier(**params).fit(X, y, sample_weight=w)
        repeated = MLPClassifier(**params).fit(np.repeat(X, w, axis=0), np.repeat(y, w))
    for a, b in zip(weighted.coefs_ + weighted.intercepts_, repeated.coefs_ + repeated.intercepts_):
        np.testing.assert_allclose(a, b, rtol=RTOL_EPOCHS, atol=ATOL_EPOCHS)
    np.testing.assert_allclose(weighted.loss_curve_, repeated.loss_curve_, rtol=1e-5)
    for bad, match in ((np.full(40, -1.0), "non-negative"), (np.zeros(40), "all zeros"), (np.ones(39), "shape"),
                       (np.full(40, np.nan), "non-negative")):
        with pytest.raises(ValueError, match=match):
            MLPClassifier(**params).fit(X, y, sample_weight=bad)


def test_sklearn_protocol():
    clf = MLPClassifier(hidden_layer_sizes=(5,), alpha=0.1)
    assert is_classifier(clf) and not is_regressor(clf)
    assert is_regressor(MLPRegressor())
    assert repr(clf) == "MLPClassifier(alpha=0.1, hidden_layer_sizes=(5,))"
    assert clone(clf).get_params() == clf.get_params()
    assert clf.get_params()["n_threads"] is None
    assert clf.set_params(max_iter=3) is clf and clf.max_iter == 3
    with pytest.raises(ValueError, match="Invalid parameter 'bogus'"):
        clf.set_params(bogus=1)
    # Bad values are accepted by __init__/set_params and reported at fit (scikit-learn's convention).
    MLPClassifier(hidden_layer_sizes=-1, solver="lbfgs").set_params(alpha=-1)


# --------------------------------------------------------------------------- equality with scikit-learn
def _problem(kind, n=64, n_features=7, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, n_features)).astype(np.float32)
    if kind == "binary":
        y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    elif kind == "multiclass":
        y = np.digitize(X[:, 0] + X[:, 2], [-0.7, 0.0, 0.7])
    elif kind == "multilabel":
        y = (X[:, :3] > 0).astype(int)
    else:
        y = X[:, 0] - 2 * X[:, 1] + 0.1 * rng.normal(size=n)
        if kind == "multioutput":
            y = np.column_stack([y, X[:, 2]])
    return X, y


def _pair(kind, **params):
    ours, theirs = (MLPRegressor, sknn.MLPRegressor) if kind in ("regression", "multioutput") else (
        MLPClassifier, sknn.MLPClassifier)
    return ours(**params), theirs(**params)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel", "regression", "multioutput"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "logistic", "identity"])
@pytest.mark.parametrize("solver,nesterov", [("adam", True), ("sgd", True), ("sgd", False)])
def test_one_update_equals_sklearn(kind, activation, solver, nesterov, weighted):
    X, y = _problem(kind)
    sw = np.random.RandomState(2).uniform(0.0, 2.0, len(X)) if weighted else None
    params = dict(hidden_layer_sizes=(16, 8), activation=activation, solver=solver, alpha=1e-3,
                  batch_size=len(X), shuffle=False, max_iter=1, learning_rate_init=0.05,
                  nesterovs_momentum=nesterov, random_state=0, warm_start=True)
    ours, sk = _pair(kind, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkConvergenceWarning)
        # Same random_state: the same initial weights (float64 draws cast to float32), then one update.
        sk.fit(X, y, sample_weight=sw)
        ours.fit(X, y, sample_weight=sw)
        atol = ATOL_ADAM_STEP_PER_LR * params["learning_rate_init"] if solver == "adam" else ATOL_STEP
        for a, b in zip(ours.coefs_ + ours.intercepts_, sk.coefs_ + sk.intercepts_):
            assert a.dtype == np.float32
            assert_allclose(a, b, rtol=RTOL_STEP, atol=atol)
        assert_allclose(ours.loss_, sk.loss_, rtol=1e-5)

        # From identical (new) weights, with a fresh optimizer (warm_start fit), one more update.
        rng = np.random.RandomState(1)
        start = [rng.normal(scale=0.3, size=w.shape).astype(np.float32) for w in sk.coefs_ + sk.intercepts_]
        L = len(sk.coefs_)
        sk.coefs_, sk.intercepts_ = [w.copy() for w in start[:L]], [w.copy() for w in start[L:]]
        ours.coefs_, ours.intercepts_ = [w.copy() for w in start[:L]], [w.copy() for w in start[L:]]
        sk.fit(X, y, sample_weight=sw)
        ours.fit(X, y, sample_weight=sw)
    atol = ATOL_ADAM_STEP_PER_LR * params["learning_rate_init"] if solver == "adam" else ATOL_STEP
    for a, b, w0 in zip(ours.coefs_ + ours.intercepts_, sk.coefs_ + sk.intercepts_, start):
        assert not np.array_equal(a, w0)  # an update happened
        assert_allclose(a, b, rtol=RTOL_STEP, atol=atol)
    assert_allclose(ours.loss_, sk.loss_, rtol=1e-5)
    assert ours.t_ == sk.t_ and ours.n_iter_ == sk.n_iter_ == 1


@pytest.mark.parametrize(
    "solver,learning_rate", [("adam", "constant"), ("sgd", "constant"), ("sgd", "invscaling"), ("sgd", "adaptive")]
)
def test_training_trajectory_equals_sklearn(solver, learning_rate):
    """Several shuffled minibatch epochs: same batches (same shuffles), same schedule, same stopping."""
    X, y = _problem("multiclass", n=150)
    params = dict(hidden_layer_sizes=(12,), solver=solver, learning_rate=learning_rate, batch_size=32,
                  learning_rate_init=0.05, power_t=0.25, max_iter=12, n_iter_no_change=2, tol=1e-2,
                  random_state=3)
    ours, sk = _pair("multiclass", **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkConvergenceWarning)
        sk.fit(X, y)
        ours.fit(X, y)
    assert ours.n_iter_ == sk.n_iter_ and ours.t_ == sk.t_
    assert_allclose(ours.loss_curve_, sk.loss_curve_, rtol=RTOL_EPOCHS)
    for a, b in zip(ours.coefs_ + ours.intercepts_, sk.coefs_ + sk.intercepts_):
        assert_allclose(a, b, rtol=RTOL_EPOCHS, atol=ATOL_EPOCHS)


@ignore_convergence
def test_accuracy_comparable_to_sklearn():
    X, y = make_classification(n_samples=1200, n_features=20, n_informative=10, n_classes=3, random_state=0)
    Xtr, Xte, ytr, yte = X[:900], X[900:], y[:900], y[900:]
    ours, sk = _pair("multiclass", hidden_layer_sizes=(64,), max_iter=60, random_state=0)
    ours_score, sk_score = ours.fit(Xtr, ytr).score(Xte, yte), sk.fit(Xtr, ytr).score(Xte, yte)
    assert ours_score >= sk_score - 0.02, (ours_score, sk_score)

    X, y = make_regression(n_samples=1000, n_features=10, noise=5.0, random_state=0)
    y = (y - y.mean()) / y.std()
    ours, sk = _pair("regression", hidden_layer_sizes=(64,), max_iter=60, random_state=0)
    ours_score, sk_score = ours.fit(X[:800], y[:800]).score(X[800:], y[800:]), sk.fit(
        X[:800], y[:800]).score(X[800:], y[800:])
    assert ours_score >= sk_score - 0.02, (ours_score, sk_score)


# --------------------------------------------------------------------------- sparse input
@ignore_convergence
@pytest.mark.parametrize("fmt", [sp.csr_matrix, sp.csr_array, sp.csc_matrix, sp.coo_array])
def test_sparse_predictions_equal_dense(fmt):
    X, y = _problem("multiclass", n=80, n_features=30)
    X[np.abs(X) < 1.0] = 0  # about 2/3 zeros
    clf = MLPClassifier(hidden_layer_sizes=(17,), max_iter=5, random_state=0).fit(X, y)
    assert_allclose(clf.predict_proba(fmt(X)), clf.predict_proba(X), rtol=1e-5, atol=1e-6)
    reg = MLPRegressor(hidden_layer_sizes=(17,), max_iter=5, random_state=0).fit(fmt(X), X[:, 0])
    assert_allclose(reg.predict(fmt(X)), reg.predict(X), rtol=1e-5, atol=1e-6)


@ignore_convergence
def test_sparse_training_equals_dense_where_every_row_is_touched():
    # With no zero in X every feature occurs in every batch, so the lazy (touched-rows) updates of the
    # sparse path are the dense updates: Adam, momentum and L2 included.
    X, y = _problem("binary", n=90, n_features=12)
    params = dict(hidden_layer_sizes=(9,), alpha=1e-2, max_iter=4, batch_size=20, random_state=0)
    dense = MLPClassifier(**params).fit(X, y)
    sparse = MLPClassifier(**params).fit(sp.csr_matrix(X), y)
    for a, b in zip(sparse.coefs_ + sparse.intercepts_, dense.coefs_ + dense.intercepts_):
        assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@ignore_convergence
def test_sparse_untouched_rows_are_not_updated():
    # fastrec's documented difference: Adam moments and L2 act only on touched rows of W_0.
    X, y = _problem("binary", n=60, n_features=10)
    X[:, 7] = 0  # feature 7 never occurs
    clf = MLPClassifier(hidden_layer_sizes=(5,), alpha=0.1, max_iter=1, random_state=0, warm_start=True)
    clf.fit(sp.csr_matrix(X), y)
    before = [c.copy() for c in clf.coefs_]
    clf.fit(sp.csr_matrix(X), y)
    assert_array_equal(clf.coefs_[0][7], before[0][7])
    assert not np.array_equal(clf.coefs_[0][6], before[0][6])


# --------------------------------------------------------------------------- input validation
X4 = np.random.RandomState(0).normal(size=(20, 4))
y4 = np.arange(20) % 2


def _fitted(cls=MLPClassifier):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkConvergenceWarning)
        return cls(hidden_layer_sizes=(3,), max_iter=2, random_state=0).fit(X4, y4)


def _with(X=None, **kw):
    X = X4.copy() if X is None else X
    for idx, v in kw.items():
        X[tuple(map(int, idx[1:].split("_")))] = v
    return X


BAD_FIT = [
    (dict(X=X4[:, 0]), ValueError, "Reshape your data"),
    (dict(X=X4.reshape(20, 2, 2)), ValueError, "must be 2-D"),
    (dict(X=_with(i0_0=np.nan)), ValueError, "Input X contains NaN"),
    (dict(X=_with(i3_1=np.inf)), ValueError, "Input X contains infinity"),
    (dict(X=_with(i3_1=1e39)), ValueError, "too large for dtype\\('float32'\\)"),
    (dict(X=X4 + 1j), ValueError, "Complex data not supported"),
    (dict(X=X4.astype(str)), TypeError, "X must be numeric"),
    (dict(X=np.array([[{"a": 1}]] * 20, dtype=object)), TypeError, "X must contain only numbers"),
    (dict(X=[[1.0, 2.0], [3.0]]), ValueError, "X could not be converted"),
    (dict(X=np.empty((0, 4)), y=[]), ValueError, "0 sample\\(s\\)"),
    (dict(X=np.empty((20, 0))), ValueError, "0 feature\\(s\\)"),
    (dict(X=None), ValueError, "requires X"),
    (dict(X=sp.csr_matrix(_with(i0_0=np.nan))), ValueError, "Input X contains NaN"),
    (dict(y=y4[:-1]), ValueError, "inconsistent numbers of samples"),
    (dict(y=None), ValueError, "requires y to be passed"),
    (dict(y=y4 + 0.5), ValueError, "Unknown label type: continuous"),
    (dict(y=np.column_stack([y4, y4 * 2])), ValueError, "Unknown label type: multiclass-multioutput"),
    (dict(y=y4 + 1j), ValueError, "Complex data not supported"),
    (dict(hidden_layer_sizes=(10, -1)), ValueError, "hidden_layer_sizes must be"),
    (dict(hidden_layer_sizes=(10, 2.5)), ValueError, "hidden_layer_sizes must be"),
    (dict(hidden_layer_sizes="10"), ValueError, "hidden_layer_sizes must be"),
    (dict(solver="lbfgs"), ValueError, "solver='lbfgs' is not supported"),
    (dict(solver="newton"), ValueError, "solver must be"),
    (dict(activation="softmax"), ValueError, "activation must be"),
    (dict(alpha=-1.0), ValueError, "alpha must be"),
    (dict(alpha=np.nan), ValueError, "alpha must be"),
    (dict(batch_size=0), ValueError, "batch_size must be"),
    (dict(learning_rate="fast"), ValueError, "learning_rate must be"),
    (dict(learning_rate_init=0.0), ValueError, "learning_rate_init must be"),
    (dict(max_iter=0), ValueError, "max_iter must be"),
    (dict(max_iter=2.0), ValueError, "max_iter must be"),
    (dict(shuffle="yes"), ValueError, "shuffle must be"),
    (dict(momentum=1.5), ValueError, "momentum must be"),
    (dict(validation_fraction=1.0), ValueError, "validation_fraction must be"),
    (dict(beta_1=1.0), ValueError, "beta_1 must be"),
    (dict(epsilon=0.0), ValueError, "epsilon must be"),
    (dict(n_iter_no_change=0), ValueError, "n_iter_no_change must be"),
    (dict(n_threads=-2), ValueError, "n_threads must be"),
    (dict(n_threads=0), ValueError, "n_threads must be"),
    (dict(random_state="seed"), ValueError, "random_state must be"),
    (dict(early_stopping=True, validation_fraction=0.05), ValueError, "validation set is too small"),
]


@pytest.mark.parametrize("case,exc,match", BAD_FIT)
def test_bad_fit_inputs_raise(case, exc, match):
    case = dict(case)
    X, y = case.pop("X", X4), case.pop("y", y4)
    params = {"hidden_layer_sizes": (3,), "max_iter": 2, **case}
    with pytest.raises(exc, match=match):
        MLPClassifier(**params).fit(X, y)


@pytest.mark.parametrize("y,match", [(np.full(20, np.nan), "Input y contains NaN"),
                                     (np.full(20, np.inf), "Input y contains infinity"),
                                     (np.full(20, 1e39), "too large for dtype\\('float32'\\)"),
                                     (np.array(["a"] * 20), "y must contain only numbers|y must be numeric")])
def test_bad_regression_targets_raise(y, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MLPRegressor(max_iter=2).fit(X4, y)


def test_bad_predict_inputs_raise():
    clf = _fitted()
    with pytest.raises(ValueError, match="X has 3 features, but MLPClassifier is expecting 4 features as input"):
        clf.predict(X4[:, :3])
    with pytest.raises(ValueError, match="Reshape your data"):
        clf.predict_proba(X4[0])
    with pytest.raises(ValueError, match="Input X contains NaN"):
        clf.predict(_with(i2_2=np.nan))
    for method in ("predict", "predict_proba", "predict_log_proba"):
        with pytest.raises(SkNotFittedError, match="not fitted yet"):
            getattr(MLPClassifier(), method)(X4)
    with pytest.raises(fastrec.mlp.NotFittedError):
        MLPRegressor().predict(X4)


@ignore_convergence
def test_partial_fit_and_warm_start_errors():
    with pytest.raises(ValueError, match="classes must be passed on the first call to partial_fit"):
        MLPClassifier().partial_fit(X4, y4)
    clf = MLPClassifier(hidden_layer_sizes=(3,)).partial_fit(X4, y4, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="classes not in `self.classes_`"):
        clf.partial_fit(X4, y4 + 5)
    with pytest.raises(ValueError, match="is not the same as on last call"):
        clf.partial_fit(X4, y4, classes=[0, 1])
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X4, y4, classes=[0, 1])
    clf = _fitted().set_params(warm_start=True, hidden_layer_sizes=(4,))
    with pytest.raises(ValueError, match="do not match the layer sizes"):
        clf.fit(X4, y4)
    with pytest.raises(ValueError, match="same classes as in the previous call"):
        _fitted().set_params(warm_start=True).fit(X4, y4 * 3)


@ignore_convergence
def test_any_layout_and_dtype_is_converted():
    base = MLPClassifier(hidden_layer_sizes=(5,), max_iter=3, random_state=0)
    Xi = (X4 * 10).astype(np.int64)
    ref = clone(base).fit(Xi.astype(np.float32), y4).coefs_
    variants = [Xi, Xi.astype(np.int32), np.asfortranarray(Xi), Xi.tolist(), Xi.astype(object),
                np.repeat(Xi, 2, axis=1)[:, ::2], Xi.astype(np.float16)]
    for X in variants:
        got = clone(base).fit(X, y4).coefs_
        for a, b in zip(got, ref):
            assert_array_equal(a, b)
    ro = Xi.astype(np.float32)
    ro.flags.writeable = False
    clone(base).fit(ro, y4).predict(ro)


# --------------------------------------------------------------------------- determinism
@ignore_convergence
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_same_model_for_any_thread_count(sparse, solver):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(301, 40)).astype(np.float32)
    X[rng.uniform(size=X.shape) < 0.7] = 0
    y = np.digitize(X[:, 0] + X[:, 1] - X[:, 2], [-0.5, 0.5])
    Xin = sp.csr_matrix(X) if sparse else X
    models = [MLPClassifier(hidden_layer_sizes=(33, 17), solver=solver, alpha=1e-3, batch_size=64, max_iter=4,
                            random_state=0, n_threads=t).fit(Xin, y) for t in (1, 2, 3)]
    for m in models[1:]:
        for a, b in zip(m.coefs_ + m.intercepts_, models[0].coefs_ + models[0].intercepts_):
            assert a.tobytes() == b.tobytes()
        assert m.predict_proba(Xin).tobytes() == models[0].predict_proba(Xin).tobytes()


# --------------------------------------------------------------------------- warm start, partial_fit
def test_partial_fit_equals_fit_epochs():
    X, y = _problem("multiclass", n=100)
    params = dict(hidden_layer_sizes=(8,), solver="sgd", learning_rate="invscaling", shuffle=False,
                  batch_size=25, random_state=0, max_iter=4, n_iter_no_change=100)
    with pytest.warns(SkConvergenceWarning, match="Maximum iterations \\(4\\) reached"):
        full = MLPClassifier(**params).fit(X, y)
    inc = MLPClassifier(**params)
    for _ in range(4):
        inc.partial_fit(X, y, classes=np.unique(y))
    assert inc.n_iter_ == 1 and inc.t_ == full.t_ == 400
    assert inc.loss_curve_ == full.loss_curve_
    for a, b in zip(inc.coefs_ + inc.intercepts_, full.coefs_ + full.intercepts_):
        assert_array_equal(a, b)


@ignore_convergence
def test_partial_fit_with_subset_of_classes_and_regressor():
    X, y = _problem("multiclass", n=120)
    clf = MLPClassifier(hidden_layer_sizes=(10,), random_state=0)
    for start in range(0, 120, 30):
        clf.partial_fit(X[start:start + 30][y[start:start + 30] != 3], y[start:start + 30][y[start:start + 30] != 3],
                        classes=[0, 1, 2, 3])
    assert_array_equal(clf.classes_, [0, 1, 2, 3]) and clf.predict_proba(X).shape == (120, 4)
    Xr, yr = _problem("regression", n=100)
    reg = MLPRegressor(hidden_layer_sizes=(10,), random_state=0, learning_rate_init=0.01)
    losses = [reg.partial_fit(Xr, yr).loss_ for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0] and reg.t_ == 3000


@ignore_convergence
def test_warm_start_continues_from_previous_weights():
    X, y = _problem("binary", n=100)
    params = dict(hidden_layer_sizes=(8,), max_iter=5, random_state=0, n_iter_no_change=100)
    ws = MLPClassifier(warm_start=True, **params).fit(X, y)
    first = [c.copy() for c in ws.coefs_]
    ws.fit(X, y)
    assert len(ws.loss_curve_) == 10 and ws.n_iter_ == 5 and ws.t_ == 1000
    assert not np.array_equal(ws.coefs_[0], first[0])
    # warm_start=False starts again: two fits with the same random_state give the same model.
    cold = MLPClassifier(**params).fit(X, y)
    assert_array_equal(cold.fit(X, y).coefs_[0], first[0])


@ignore_convergence
def test_early_stopping_restores_best_weights():
    X, y = _problem("multiclass", n=400, seed=2)
    y[::7] = (y[::7] + 1) % 4  # label noise so that validation accuracy peaks early
    params = dict(hidden_layer_sizes=(64,), learning_rate_init=0.05, early_stopping=True, n_iter_no_change=5,
                  random_state=0, max_iter=200)
    clf = MLPClassifier(**params).fit(X, y)
    scores = clf.validation_scores_
    best = int(np.argmax(scores))
    assert clf.best_validation_score_ == scores[best] and clf.best_loss_ is None
    assert len(scores) == clf.n_iter_ and clf.n_iter_ > best + 1  # stopped after the best epoch
    # The same run cut at the best epoch ends with the weights the early-stopped model restored.
    cut = MLPClassifier(**{**params, "max_iter": best + 1}).fit(X, y)
    for a, b in zip(clf.coefs_ + clf.intercepts_, cut.coefs_ + cut.intercepts_):
        assert_array_equal(a, b)


# --------------------------------------------------------------------------- pickling, misc
@ignore_convergence
@pytest.mark.parametrize("kind", ["binary", "multilabel", "multioutput"])
def test_pickle_round_trip(kind):
    X, y = _problem(kind, n=50)
    est = _pair(kind, hidden_layer_sizes=(6,), max_iter=3, random_state=0)[0].fit(X, y)
    again = pickle.loads(pickle.dumps(est))
    assert_array_equal(again.predict(X), est.predict(X))
    again.set_params(warm_start=True).fit(X, y)  # and it trains on


def test_convergence_warning_and_verbose(capsys):
    with pytest.warns(fastrec.mlp.ConvergenceWarning) as record:
        MLPRegressor(hidden_layer_sizes=(3,), max_iter=2, verbose=True, random_state=0).fit(X4, X4[:, 0])
    assert isinstance(record[0].message, SkConvergenceWarning)  # sklearn's filters apply to it
    assert "Iteration 2, loss = " in capsys.readouterr().out


def test_training_warnings_point_at_the_callers_line():
    """ConvergenceWarning and the batch_size clipping warning name the line that called fit / partial_fit (this
    file), not fastrec's own code: that is where a user (or a warnings filter on the module) looks."""
    y = X4[:, 0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MLPClassifier(hidden_layer_sizes=(3,), max_iter=2, random_state=0).fit(X4, y > 0)
        MLPRegressor(hidden_layer_sizes=(3,), max_iter=2, batch_size=10**6, random_state=0).fit(X4, y)
        MLPRegressor(hidden_layer_sizes=(3,), batch_size=10**6, random_state=0).partial_fit(X4, y)
    kinds = [w.category.__name__ for w in caught]
    assert kinds.count("ConvergenceWarning") == 2 and kinds.count("UserWarning") == 2, kinds
    assert [w.filename for w in caught] == [__file__] * len(caught)


@ignore_convergence
def test_predict_outputs():
    clf = _fitted()
    P = clf.predict_proba(X4)
    assert P.shape == (20, 2) and P.dtype == np.float64
    assert_allclose(P.sum(axis=1), 1.0)
    assert_allclose(clf.predict_log_proba(X4), np.log(P))
    assert_array_equal(clf.predict(X4), clf.classes_[P.argmax(axis=1)])
    assert 0.0 <= clf.score(X4, y4) <= 1.0
    reg = _fitted(MLPRegressor)
    assert reg.predict(X4).shape == (20,) and reg.out_activation_ == "identity"
    X, y = _problem("multilabel", n=40)
    ml = MLPClassifier(max_iter=300, random_state=0).fit(X, y.astype(bool))
    assert ml.predict(X).dtype == bool and ml.out_activation_ == "logistic" and ml.n_outputs_ == 3


class _Frame:
    """The two things a DataFrame offers that matter here: column names and conversion to an array."""

    def __init__(self, values, columns):
        self.values, self.columns = np.asarray(values), list(columns)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)


@ignore_convergence
def test_feature_names_in():
    clf = MLPClassifier(hidden_layer_sizes=(3,), max_iter=2).fit(_Frame(X4, "abcd"), y4)
    assert_array_equal(clf.feature_names_in_, list("abcd")) and clf.feature_names_in_.dtype == object
    clf.predict(_Frame(X4, "abcd"))
    clf.predict(X4)  # plain arrays have no names to compare
    with pytest.raises(ValueError, match="feature names should match"):
        clf.predict(_Frame(X4, "abdc"))
    assert not hasattr(clf.fit(X4, y4), "feature_names_in_")


def test_show_config():
    out = io.StringIO()
    info = fastrec.show_config(file=out)
    assert info["fastrec"] == fastrec.__version__ and info["numpy"] == np.__version__
    assert isinstance(info["core"], dict) and "numpy: " in out.getvalue()
