"""scikit-learn compatible MLPClassifier and MLPRegressor trained by `fastrec._core`.

The mathematics is scikit-learn's (sklearn/neural_network/_multilayer_perceptron.py and
_stochastic_optimizers.py): Glorot-uniform initialisation drawn in the same order from the same
RandomState, batch_size="auto" = min(200, n), per-epoch shuffling with the same draws, loss_ = sum of
batch_loss * batch_len / n, SGD learning-rate schedules, the tol/n_iter_no_change and early-stopping rules.
This module validates, converts, initialises, keeps the optimizer state and runs the epoch loop; each epoch
is one `_core.train_epoch` call and each prediction one `_core.forward` call.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from fastrec import _core
from fastrec._base import BaseEstimator, exclusive_fit
from fastrec._checks import (
    INT_MAX,
    ConvergenceWarning,
    NotFittedError,
    as_array,
    check_random_state,
    check_sample_weight,
    check_X,
    check_y,
    classification_target_type,
    core_X,
    not_fitted_error,
    warn,
)
from fastrec._registry import persistable

__all__ = ["ConvergenceWarning", "MLPClassifier", "MLPRegressor", "NotFittedError"]

_ACTIVATIONS = ("identity", "logistic", "tanh", "relu")
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_SOLVERS = ("sgd", "adam")
_LEARNING_RATES = ("constant", "invscaling", "adaptive")


_PARAMS_DOC = """
    Parameters
    ----------
    hidden_layer_sizes : int or sequence of int, default=(100,)
        Number of units of each hidden layer.
    activation : {"identity", "logistic", "tanh", "relu"}, default="relu"
        Hidden-layer activation.
    solver : {"adam", "sgd"}, default="adam"
        "lbfgs" is not supported (fastrec is a minibatch trainer); it raises ValueError at fit.
    alpha : float, default=1e-4
        L2 penalty, scaled as in scikit-learn: ``0.5 * alpha * ||W||^2 / batch_len``.
    batch_size : int or "auto", default="auto"
        Minibatch size; "auto" is ``min(200, n_samples)``; larger values are clipped with a warning.
    learning_rate : {"constant", "invscaling", "adaptive"}, default="constant"
        SGD schedule (Adam ignores it, as in scikit-learn). invscaling:
        ``learning_rate_init / (t_ + 1) ** power_t`` after each epoch; adaptive: divided by 5 after
        ``n_iter_no_change`` epochs without improvement, stopping once it is at most 1e-6.
    learning_rate_init : float, default=1e-3
    power_t : float, default=0.5
    max_iter : int, default=200
        Number of epochs.
    shuffle : bool, default=True
        Shuffle the samples before each epoch.
    random_state : None, int or numpy.random.RandomState, default=None
        Seeds the initial weights, the shuffles and the validation split.
    tol : float, default=1e-4
    verbose : bool or int, default=False
    warm_start : bool, default=False
    momentum : float, default=0.9
    nesterovs_momentum : bool, default=True
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the data (stratified for single-output classifiers), stop when
        the validation score has not improved by ``tol`` for ``n_iter_no_change`` epochs, and restore the
        weights of the best epoch.
    validation_fraction : float, default=0.1
    beta_1, beta_2, epsilon : float, default=0.9, 0.999, 1e-8
        Adam parameters.
    n_iter_no_change : int, default=10
    n_threads : int or None, default=None
        Threads of the core; None uses all cores. Results are bitwise identical for any value.

    Differences from scikit-learn
    -----------------------------
    * All numerical work is float32 (scikit-learn computes in float64 unless X is float32); inputs of any
      numeric dtype are converted. Predictions are returned as float64 arrays (probabilities and regression
      values) for compatibility with scikit-learn's API, but carry float32 precision.
    * Sparse input is trained with lazy updates: momentum, Adam moments and the L2 penalty act only on the
      rows of the first weight matrix whose features occur in the batch (DESIGN.md).
    * The log loss is computed from logits rather than from clipped probabilities (same gradients).
    * No "lbfgs" solver and no ``max_fun``; ``MLPRegressor`` has no ``loss`` parameter (squared error only).
    * ``sample_weight`` follows scikit-learn (>= 1.7): each sample's loss and output gradient are multiplied by
      its weight and every minibatch mean divides by the batch's sum of weights; the validation score of
      ``early_stopping`` is weighted too. A minibatch whose weights are all zero makes no update (scikit-learn
      would divide by zero there).
    * The stratified early-stopping split allocates validation rows per class by largest remainder; it is
      not the same draw as scikit-learn's ``StratifiedShuffleSplit`` (the unstratified split is).
"""

_ATTRS_DOC = """
    Attributes
    ----------
    coefs_, intercepts_ : list of float32 ndarray
        Weights ``(fan_in, fan_out)`` and biases ``(fan_out,)`` of each layer.
    loss_ : float
        Training loss of the last epoch (including the L2 term).
    loss_curve_ : list of float
    best_loss_ : float or None
    validation_scores_ : list of float or None
    best_validation_score_ : float or None
    n_iter_ : int
        Epochs run by the last fit (1 after partial_fit, as in scikit-learn).
    t_ : int
        Training samples seen by the optimizer.
    n_layers_, n_outputs_ : int
    out_activation_ : str
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when X had string column names.
"""


def _int_like(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _real_like(v) -> bool:
    """A real number other than NaN, and not a bool; an int too large for a float is not one."""
    if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_)):
        return False
    try:
        return not math.isnan(float(v))
    except OverflowError:
        return False


def _bool_like(v) -> bool:
    return isinstance(v, (bool, np.bool_))


class _BaseMLP(BaseEstimator):
    def __init__(
        self,
        hidden_layer_sizes=(100,),
        activation="relu",
        *,
        solver="adam",
        alpha=0.0001,
        batch_size="auto",
        learning_rate="constant",
        learning_rate_init=0.001,
        power_t=0.5,
        max_iter=200,
        shuffle=True,
        random_state=None,
        tol=1e-4,
        verbose=False,
        warm_start=False,
        momentum=0.9,
        nesterovs_momentum=True,
        early_stopping=False,
        validation_fraction=0.1,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        n_iter_no_change=10,
        n_threads=None,
    ):
        # Stored as given; validated at fit time (scikit-learn's convention: set_params never raises).
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.n_threads = n_threads

    # ------------------------------------------------------------------ validation
    def _validate_params(self) -> list[int]:
        """Check the hyper-parameters; returns hidden_layer_sizes as a list of ints."""

        def bad(name, expected):
            return ValueError(f"{name} must be {expected}; got {getattr(self, name)!r}.")

        hls = self.hidden_layer_sizes
        if _int_like(hls):
            hls = [hls]
        elif isinstance(hls, str) or not hasattr(hls, "__iter__"):
            raise bad("hidden_layer_sizes", "an int or a sequence of ints >= 1")
        hls = list(hls)
        if not all(_int_like(h) and 1 <= h <= INT_MAX for h in hls):
            raise bad("hidden_layer_sizes", f"an int or a sequence of ints in [1, {INT_MAX}]")
        if self.solver == "lbfgs":
            raise ValueError("solver='lbfgs' is not supported by fastrec; use solver='adam' or 'sgd'.")
        checks = [
            ("activation", lambda v: isinstance(v, str) and v in _ACTIVATIONS, f"one of {_ACTIVATIONS}"),
            ("solver", lambda v: isinstance(v, str) and v in _SOLVERS, f"one of {_SOLVERS}"),
            ("alpha", lambda v: _real_like(v) and 0 <= v < np.inf, "a finite float >= 0"),
            ("batch_size", lambda v: (isinstance(v, str) and v == "auto") or (_int_like(v) and v >= 1),
             "'auto' or an int >= 1"),
            ("learning_rate", lambda v: isinstance(v, str) and v in _LEARNING_RATES, f"one of {_LEARNING_RATES}"),
            ("learning_rate_init", lambda v: _real_like(v) and 0 < v < np.inf, "a finite float > 0"),
            ("power_t", lambda v: _real_like(v) and 0 <= v < np.inf, "a finite float >= 0"),
            ("max_iter", lambda v: _int_like(v) and 1 <= v <= INT_MAX, f"an int in [1, {INT_MAX}]"),
            ("shuffle", _bool_like, "a bool"),
            ("tol", lambda v: _real_like(v) and 0 <= v < np.inf, "a finite float >= 0"),
            ("verbose", lambda v: _bool_like(v) or (_int_like(v) and v >= 0), "a bool or an int >= 0"),
            ("warm_start", _bool_like, "a bool"),
            ("momentum", lambda v: _real_like(v) and 0 <= v <= 1, "a float in [0, 1]"),
            ("nesterovs_momentum", _bool_like, "a bool"),
            ("early_stopping", _bool_like, "a bool"),
            ("validation_fraction", lambda v: _real_like(v) and 0 <= v < 1, "a float in [0, 1)"),
            # The core computes in float32: a beta that rounds to 1 or an epsilon that rounds to 0 would divide
            # by zero in Adam's step.
            ("beta_1", lambda v: _real_like(v) and 0 <= v < 1 and np.float32(v) < 1, "a float in [0, 1) in float32"),
            ("beta_2", lambda v: _real_like(v) and 0 <= v < 1 and np.float32(v) < 1, "a float in [0, 1) in float32"),
            ("epsilon", lambda v: _real_like(v) and _FLOAT32_TINY <= v < np.inf,
             f"a finite float >= {_FLOAT32_TINY:.3g} (float32's smallest normal number)"),
            ("n_iter_no_change", lambda v: (_int_like(v) and v >= 1) or (_real_like(v) and v == np.inf),
             "an int >= 1 or numpy.inf"),
            ("n_threads", lambda v: v is None or (_int_like(v) and 1 <= v <= INT_MAX),
             f"None or an int in [1, {INT_MAX}]"),
        ]
        for name, ok, expected in checks:
            if not ok(getattr(self, name)):
                raise bad(name, expected)
        check_random_state(self.random_state)  # ValueError naming random_state
        return [int(h) for h in hls]

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "coefs_")

    def _check_fitted(self):
        if not hasattr(self, "coefs_"):
            raise not_fitted_error(self)

    # ------------------------------------------------------------------ parameters
    def _initialize(self, layer_units, rng):
        self.n_iter_ = 0
        self.t_ = 0
        self.n_layers_ = len(layer_units)
        self.coefs_, self.intercepts_ = [], []
        # Glorot uniform as in scikit-learn's _init_coef: float64 draws in the same order, cast to float32.
        factor = 2.0 if self.activation == "logistic" else 6.0
        for fan_in, fan_out in zip(layer_units[:-1], layer_units[1:]):
            bound = np.sqrt(factor / (fan_in + fan_out))
            coef = rng.uniform(-bound, bound, (fan_in, fan_out))
            intercept = rng.uniform(-bound, bound, fan_out)
            self.coefs_.append(np.ascontiguousarray(coef, dtype=np.float32))
            self.intercepts_.append(np.ascontiguousarray(intercept, dtype=np.float32))
        self._best_coefs = [c.copy() for c in self.coefs_]
        self._best_intercepts = [b.copy() for b in self.intercepts_]
        self.loss_curve_ = []
        self._no_improvement_count = 0
        if self.early_stopping:
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
            self.best_loss_ = None
        else:
            self.best_loss_ = np.inf
            self.validation_scores_ = None
            self.best_validation_score_ = None

    def _own_parameters(self, layer_units):
        """Make coefs_/intercepts_ the writable float32 C-contiguous arrays the core updates in place.

        They may have been set by the user (e.g. copied from scikit-learn) or unpickled read-only; converting
        here, once, is what lets the core update them without a hidden temporary copy.
        """
        expected = list(zip(layer_units[:-1], layer_units[1:]))
        shapes = [np.shape(c) for c in self.coefs_]
        bshapes = [np.shape(b) for b in self.intercepts_]
        if shapes != expected or bshapes != [(o,) for _, o in expected]:
            raise ValueError(
                f"coefs_ shapes {shapes} / intercepts_ shapes {bshapes} do not match the layer sizes "
                f"{layer_units} of this fit (hidden_layer_sizes, n_features or outputs changed since the "
                "previous fit; set warm_start=False to start again)."
            )
        req = ["C_CONTIGUOUS", "ALIGNED", "WRITEABLE"]
        self.coefs_ = [np.require(c, np.float32, req) for c in self.coefs_]
        self.intercepts_ = [np.require(b, np.float32, req) for b in self.intercepts_]

    def _reset_optimizer(self):
        params = self.coefs_ + self.intercepts_
        self._state1 = [np.zeros_like(p) for p in params]
        self._state2 = [np.zeros_like(p) for p in params] if self.solver == "adam" else []
        self._adam_t = 0
        self._lr = float(self.learning_rate_init)
        self._optimizer_solver = self.solver

    # ------------------------------------------------------------------ training
    def _validation_split(self, n, y, rng):
        """Indices (train, val): scikit-learn's ShuffleSplit draw; stratified for single-output classifiers."""
        n_val = int(np.ceil(self.validation_fraction * n))
        perm = rng.permutation(n)
        if self._stratify_split(y):
            _, codes = np.unique(y, return_inverse=True)
            # Validation rows per class by largest remainder, taken from each class in permutation order.
            counts = np.bincount(codes)
            exact = counts * (n_val / n)
            take = np.floor(exact).astype(np.int64)
            rest = n_val - take.sum()
            take[np.argsort(-(exact - take), kind="stable")[:rest]] += 1
            ranked = perm[np.argsort(codes[perm], kind="stable")]
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            val = np.concatenate([ranked[s : s + t] for s, t in zip(starts, take)])
            mask = np.ones(n, dtype=bool)
            mask[val] = False
            train = perm[mask[perm]]
            val = perm[~mask[perm]]
        else:
            val, train = perm[:n_val], perm[n_val:]
        if len(val) < 2:
            raise ValueError(
                "The validation set is too small. Increase 'validation_fraction' or the size of your dataset."
            )
        if len(train) < 1:
            raise ValueError("validation_fraction leaves no training samples; decrease it.")
        return train, val

    @exclusive_fit
    def _fit(self, X, y, *, incremental: bool, classes=None, sample_weight=None):
        hidden = self._validate_params()
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X = check_X(X, self, reset=first_pass)
        n_samples = X.shape[0]
        y_checked, Y = self._encode_targets(y, n_samples, incremental=incremental, classes=classes)
        if sample_weight is not None:
            sample_weight = check_sample_weight(sample_weight, n_samples).astype(np.float32)
        layer_units = [X.shape[1], *hidden, Y.shape[1]]

        rng = check_random_state(self.random_state)
        if first_pass:
            self._initialize(layer_units, rng)
            self.out_activation_ = self._out_activation()
        self._own_parameters(layer_units)
        self.n_outputs_ = Y.shape[1]
        if (
            not incremental
            or not hasattr(self, "_state1")
            or self._optimizer_solver != self.solver
        ):
            self._reset_optimizer()
        if self.early_stopping and self.validation_scores_ is None:
            # warm_start fit with early stopping after one without: start the validation bookkeeping.
            self.validation_scores_, self.best_validation_score_ = [], -np.inf
            self._best_coefs = [c.copy() for c in self.coefs_]
            self._best_intercepts = [b.copy() for b in self.intercepts_]

        X_val = y_val = w_val = None
        if self.early_stopping:
            train, val = self._validation_split(n_samples, y_checked, rng)
            X_val, y_val = X[val], y_checked[val]
            X, Y = X[train], np.ascontiguousarray(Y[train])
            if sample_weight is not None:
                sample_weight, w_val = np.ascontiguousarray(sample_weight[train]), sample_weight[val].astype(np.float64)
            n_samples = X.shape[0]

        if self.batch_size == "auto":
            batch_size = min(200, n_samples)
        else:
            if self.batch_size > n_samples:
                warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped")
            batch_size = int(np.clip(self.batch_size, 1, n_samples))

        Xc = core_X(X)
        X_val_core = None if X_val is None else core_X(X_val)
        order = np.arange(n_samples, dtype=np.int64)
        n_threads = self._threads()
        try:
            self.n_iter_ = 0
            for _ in range(self.max_iter):
                if self.shuffle:
                    # sklearn.utils.shuffle(order, random_state=rng): the same draw, hence the same batches.
                    perm = np.arange(n_samples)
                    rng.shuffle(perm)
                    order = order[perm]
                # Adam ignores the schedule (as in scikit-learn): its step size comes from adam_t.
                lr = self._lr if self.solver == "sgd" else float(self.learning_rate_init)
                loss_sum, self._adam_t, _, diverged, error = _core.train_epoch(
                    self.coefs_, self.intercepts_, self._state1, self._state2, Xc, Y, order, batch_size,
                    self.activation, self.out_activation_, float(self.alpha), self.solver, lr,
                    float(self.momentum), bool(self.nesterovs_momentum), float(self.beta_1),
                    float(self.beta_2), float(self.epsilon), int(self._adam_t), n_threads,
                    sample_weight=sample_weight,
                )  # fmt: skip
                if error is not None:
                    raise error  # Ctrl-C (or an exception from a signal handler), at a batch boundary
                if diverged:
                    raise ValueError(
                        f"training diverged in iteration {self.n_iter_ + 1}: a batch's loss became NaN or "
                        "infinite, so training stopped before applying it (the weights are those of the last "
                        "finite step). Try a lower learning_rate_init, a larger alpha, or scaling the features "
                        "(e.g. sklearn.preprocessing.StandardScaler)."
                    )
                self.n_iter_ += 1
                self.loss_ = float(loss_sum) / n_samples
                self.t_ += n_samples
                self.loss_curve_.append(self.loss_)
                if self.verbose:
                    print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
                if not math.isfinite(self.loss_):
                    break  # diverged (activations overflowed even if the weights did not): reported below

                self._update_no_improvement_count(X_val_core, y_val, w_val)
                if self.solver == "sgd" and self.learning_rate == "invscaling":
                    self._lr = float(self.learning_rate_init) / (self.t_ + 1) ** self.power_t

                if self._no_improvement_count > self.n_iter_no_change:
                    what = "Validation score" if self.early_stopping else "Training loss"
                    msg = (
                        f"{what} did not improve more than tol={self.tol:f} for "
                        f"{self.n_iter_no_change} consecutive epochs."
                    )
                    if self._trigger_stopping(msg):
                        break
                    self._no_improvement_count = 0
                if incremental:
                    break
                if self.n_iter_ == self.max_iter:
                    warn(
                        f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                        "optimization hasn't converged yet.",
                        ConvergenceWarning,
                    )
        except KeyboardInterrupt:
            warn("Training interrupted by user.")

        if self.early_stopping:
            self.coefs_ = [c.copy() for c in self._best_coefs]
            self.intercepts_ = [b.copy() for b in self._best_intercepts]
        if not math.isfinite(self.loss_) or not all(np.isfinite(w).all() for w in self.coefs_ + self.intercepts_):
            raise ValueError(
                "Solver produced non-finite parameter weights. The input data (X, y) may contain large values "
                "and need to be preprocessed, or learning_rate_init or alpha is too large."
            )
        return self

    def _trigger_stopping(self, msg: str) -> bool:
        """scikit-learn's rule: stop, except that SGD with learning_rate='adaptive' first divides lr by 5."""
        if self.solver != "sgd" or self.learning_rate != "adaptive":
            if self.verbose:
                print(msg + " Stopping.")
            return True
        if self._lr <= 1e-6:
            if self.verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        self._lr /= 5.0
        if self.verbose:
            print(msg + " Setting learning rate to %f" % self._lr)
        return False

    def _update_no_improvement_count(self, X_val, y_val, w_val):
        if self.early_stopping:
            score = self._score_core(X_val, y_val, w_val)
            self.validation_scores_.append(score)
            if self.verbose:
                print("Validation score: %f" % score)
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_coefs = [c.copy() for c in self.coefs_]
                self._best_intercepts = [b.copy() for b in self.intercepts_]
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    # ------------------------------------------------------------------ prediction
    def _forward_core(self, Xc) -> np.ndarray:
        """Output-layer activations (float32, (n, n_outputs_)) for an already converted X."""
        coefs = [np.ascontiguousarray(c, dtype=np.float32) for c in self.coefs_]
        intercepts = [np.ascontiguousarray(b, dtype=np.float32) for b in self.intercepts_]
        return _core.forward(coefs, intercepts, Xc, self.activation, self.out_activation_, self._threads())

    def _forward(self, X) -> np.ndarray:
        self._check_fitted()
        out = self._forward_core(core_X(check_X(X, self, reset=False)))
        if not np.isfinite(out).all():  # float32 overflow: NaN or inf would pass for a prediction
            raise ValueError(
                "The network output is not finite for some rows of X: X holds values too large for this "
                "model, or its weights are (training diverged; lower learning_rate_init)."
            )
        return out

    def _score_core(self, Xc, y, sample_weight=None) -> float:
        pred = self._predict_from_output(self._forward_core(Xc))
        if pred.dtype.kind == "f" and not np.isfinite(pred).all():
            return float("nan")
        return self._score_function(y, pred, sample_weight)

    def _check_score_args(self, X, y, sample_weight):
        pred = self.predict(X)
        n = pred.shape[0]
        y = check_y(y, n, self, numeric=self._estimator_kind == "regressor", warn_column=False)
        if pred.ndim == 2:  # several outputs: y must have as many columns
            y = y.reshape(n, -1)
            if y.shape != pred.shape:
                raise ValueError(f"y must have shape {pred.shape} like the predictions; got {y.shape}.")
        if sample_weight is not None:
            sample_weight = check_sample_weight(sample_weight, n)
        return y, pred, sample_weight

    def score(self, X, y, sample_weight=None) -> float:
        y, pred, sample_weight = self._check_score_args(X, y, sample_weight)
        return self._score_function(y, pred, sample_weight)


@persistable
class MLPClassifier(_BaseMLP):
    __doc__ = (
        "Multi-layer perceptron classifier trained by fastrec's C++ core; a drop-in for "
        "sklearn.neural_network.MLPClassifier.\n\n    Binary and multi-label targets use a logistic output "
        "(log loss), multiclass targets a softmax.\n" + _PARAMS_DOC + _ATTRS_DOC
        + "    classes_ : ndarray\n        Class labels (0..n_outputs-1 for multi-label indicator targets).\n"
    )
    _estimator_kind = "classifier"

    def _more_sklearn_tags(self, tags):
        tags.classifier_tags.multi_label = True
        return tags

    def _stratify_split(self, y) -> bool:
        return self._target_type != "multilabel-indicator"

    def _out_activation(self) -> str:
        return "softmax" if self._target_type == "multiclass" else "logistic"

    def _set_classes(self, labels_or_y, target_type):
        self._target_type = target_type
        if target_type == "multilabel-indicator":
            self.classes_ = np.arange(labels_or_y.shape[1])
            self._y_dtype = labels_or_y.dtype
        else:
            self.classes_ = np.unique(labels_or_y)
            self._target_type = "multiclass" if len(self.classes_) > 2 else "binary"

    def _encode_targets(self, y, n_samples, *, incremental, classes):
        y = check_y(y, n_samples, self, numeric=False)
        target_type = classification_target_type(y)
        if incremental and classes is not None:
            # partial_fit(classes=...): scikit-learn's _check_partial_fit_first_call.
            classes = as_array(classes, "classes")
            if classes.ndim != 1 or classes.size == 0 or classes.dtype.kind not in "biufUSO":
                raise ValueError(f"classes must be a non-empty 1-D array of labels; got {classes!r}.")
            if classes.dtype == object and all(isinstance(c, numbers.Real) for c in classes):
                classes = classes.astype(np.float64)  # numbers of mixed types (np.float32, int) compare as float64
            try:
                classes = np.unique(classes)
            except TypeError as exc:  # labels that cannot be ordered, e.g. a mix of str and int
                raise TypeError(f"classes must be labels of one kind: {exc}") from None
            if hasattr(self, "classes_"):
                if not np.array_equal(classes, self.classes_):
                    raise ValueError(
                        f"classes={classes!r} is not the same as on last call to partial_fit, "
                        f"was: {self.classes_!r}"
                    )
            elif target_type == "multilabel-indicator":
                self._set_classes(y, target_type)
            else:
                self._set_classes(classes, target_type)
        elif incremental and not hasattr(self, "classes_"):
            raise ValueError("classes must be passed on the first call to partial_fit.")
        elif not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._set_classes(y, target_type)
        else:
            if (target_type == "multilabel-indicator") != (self._target_type == "multilabel-indicator"):
                raise ValueError(
                    f"y is {target_type} but the model was fitted on {self._target_type} targets."
                )
            if target_type != "multilabel-indicator":
                seen = np.unique(y)
                if self.warm_start and not incremental and not np.array_equal(seen, self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same classes as in the previous "
                        f"call to fit. Previously got {self.classes_}, `y` has {seen}"
                    )

        if self._target_type == "multilabel-indicator":
            if y.ndim != 2 or y.shape[1] != len(self.classes_):
                raise ValueError(
                    f"y must be a multilabel indicator with {len(self.classes_)} columns; got shape {y.shape}."
                )
            return y, np.ascontiguousarray(y, dtype=np.float32)
        if y.ndim != 1:
            raise ValueError(f"y must be 1-D class labels for this model; got shape {y.shape}.")
        try:
            codes = np.searchsorted(self.classes_, y)
            known = self.classes_[np.minimum(codes, len(self.classes_) - 1)] == y
        except TypeError:  # labels of another kind than classes_ (e.g. strings vs numbers)
            known = np.zeros(len(y), dtype=bool)
        if not np.all(known):
            raise ValueError(
                f"`y` has classes not in `self.classes_`. `self.classes_` has {self.classes_}. "
                f"'y' has {np.unique(y[~known])}."
            )
        if self._target_type == "multiclass":
            Y = np.zeros((n_samples, len(self.classes_)), dtype=np.float32)
            Y[np.arange(n_samples), codes] = 1.0
        else:  # binary (or a single class: every target 0, like scikit-learn's LabelBinarizer)
            Y = (codes == 1).astype(np.float32).reshape(-1, 1)
        return y, Y

    def _proba_from_output(self, out) -> np.ndarray:
        P = np.asarray(out, dtype=np.float64)
        if self._target_type == "multiclass":
            return P / P.sum(axis=1, keepdims=True)  # exact row sums in float64
        if self._target_type == "multilabel-indicator":
            return P
        if len(self.classes_) == 1:
            return np.ones((P.shape[0], 1))
        p = P[:, 0]
        return np.column_stack([1.0 - p, p])

    def _predict_from_output(self, out) -> np.ndarray:
        if self._target_type == "multilabel-indicator":
            return (np.asarray(out) > 0.5).astype(self._y_dtype)
        return self.classes_[np.argmax(self._proba_from_output(out), axis=1)]

    @staticmethod
    def _score_function(y, pred, sample_weight) -> float:
        correct = (y == pred) if pred.ndim == 1 else np.all(y == pred, axis=1)
        return float(np.average(correct, weights=sample_weight))

    def fit(self, X, y, sample_weight=None):
        """Fit the model to X (array-like or scipy sparse, (n_samples, n_features)) and labels y, each sample's
        loss weighted by `sample_weight` (non-negative; scikit-learn's semantics, see the class notes)."""
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y); `classes` (all labels) is required on the first call."""
        return self._fit(X, y, incremental=True, classes=classes, sample_weight=sample_weight)

    def predict(self, X) -> np.ndarray:
        return self._predict_from_output(self._forward(X))

    def predict_proba(self, X) -> np.ndarray:
        """Probabilities (n_samples, n_classes), float64 arrays of float32 precision."""
        return self._proba_from_output(self._forward(X))

    def predict_log_proba(self, X) -> np.ndarray:
        P = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(P, out=P)


@persistable
class MLPRegressor(_BaseMLP):
    __doc__ = (
        "Multi-layer perceptron regressor (squared error) trained by fastrec's C++ core; a drop-in for "
        "sklearn.neural_network.MLPRegressor.\n" + _PARAMS_DOC + _ATTRS_DOC
    )
    _estimator_kind = "regressor"

    def _more_sklearn_tags(self, tags):
        tags.target_tags.multi_output = True  # several outputs are supported
        return tags

    def _stratify_split(self, y) -> bool:
        return False

    def _out_activation(self) -> str:
        return "identity"

    def _encode_targets(self, y, n_samples, *, incremental, classes):
        y = check_y(y, n_samples, self, numeric=True)
        # A changed number of outputs under warm_start/partial_fit is reported by _own_parameters.
        return y, np.ascontiguousarray(y.reshape(n_samples, -1), dtype=np.float32)

    def _predict_from_output(self, out) -> np.ndarray:
        pred = np.asarray(out, dtype=np.float64)
        return pred[:, 0] if pred.shape[1] == 1 else pred

    @staticmethod
    def _score_function(y, pred, sample_weight) -> float:
        """R^2 averaged over outputs, as sklearn.metrics.r2_score (force_finite=True)."""
        y = np.asarray(y, dtype=np.float64).reshape(pred.shape[0], -1)
        pred = pred.reshape(y.shape)
        w = np.ones(y.shape[0]) if sample_weight is None else sample_weight
        w = w[:, None]
        ss_res = (w * (y - pred) ** 2).sum(axis=0)
        ss_tot = (w * (y - np.average(y, axis=0, weights=w[:, 0])) ** 2).sum(axis=0)
        r2 = np.where(ss_tot != 0, 1 - ss_res / np.where(ss_tot != 0, ss_tot, 1), np.where(ss_res == 0, 1.0, 0.0))
        return float(r2.mean())

    def fit(self, X, y, sample_weight=None):
        """Fit the model to X (array-like or scipy sparse, (n_samples, n_features)) and targets y, each sample's
        loss weighted by `sample_weight` (non-negative; scikit-learn's semantics, see the class notes)."""
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y)."""
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    def predict(self, X) -> np.ndarray:
        """Predicted values, float64 arrays of float32 precision; 1-D when there is one output."""
        return self._predict_from_output(self._forward(X))
