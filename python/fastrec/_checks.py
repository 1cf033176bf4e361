"""Input validation for the estimators: clear ValueError/TypeError that name the argument, never assert.

Inputs are converted to what `fastrec._core` takes (DESIGN.md): float32 C-contiguous 2-D arrays, or CSR
matrices with float32 data that `core_X` turns into the `(indptr int64, indices int32, data float32, n_cols)`
tuple. Messages for the cases scikit-learn's estimator checks look for use scikit-learn's wording.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import numpy as np
import scipy.sparse as sp

__all__ = [
    "ConvergenceWarning",
    "DataConversionWarning",
    "NotFittedError",
    "as_array",
    "as_numeric",
    "check_X",
    "check_bool",
    "check_csr",
    "check_float",
    "check_int",
    "check_random_state",
    "check_sample_weight",
    "core_X",
]

# Counts, sizes and thread numbers reach the core as C ints (and ids as int32), so larger values are refused
# here rather than overflowing in a cast.
INT_MAX = 2**31 - 1


class NotFittedError(ValueError, AttributeError):
    """Raised when predict/score is called before fit (like scikit-learn's NotFittedError)."""


class ConvergenceWarning(UserWarning):
    """Training stopped at max_iter before the tol/n_iter_no_change criterion was met."""


class DataConversionWarning(UserWarning):
    """The input was converted in a way the caller may not expect (e.g. a column-vector y)."""


_bridged: dict = {}


def sklearn_compatible(cls):
    """`cls`, or a cached subclass of both `cls` and scikit-learn's class of the same name.

    scikit-learn is not a runtime dependency and importing it costs about a second, so fastrec does not
    import it. But when it is already loaded, whoever catches or filters sklearn's NotFittedError /
    ConvergenceWarning (its estimator checks, user code) must see ours as such: raise the bridged class.
    """
    sk = sys.modules.get("sklearn.exceptions")
    if sk is None or not hasattr(sk, cls.__name__):
        return cls
    if cls not in _bridged:
        _bridged[cls] = type(cls.__name__, (cls, getattr(sk, cls.__name__)), {"__module__": cls.__module__})
    return _bridged[cls]


def not_fitted_error(estimator) -> Exception:
    name = type(estimator).__name__
    return sklearn_compatible(NotFittedError)(
        f"This {name} instance is not fitted yet. Call 'fit' with appropriate arguments before using this "
        "estimator."
    )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category=UserWarning) -> None:
    """Warn with the bridged category at the first frame outside fastrec: the user's line (or scikit-learn's,
    when it drives the estimator). The frames are counted rather than a fixed stacklevel given, because
    wrappers (exclusive_fit) and helpers sit between the public method and the warning, and fixed counts
    pointed at fastrec's own lines."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is our caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, sklearn_compatible(category), stacklevel=level)


def check_random_state(seed) -> np.random.RandomState:
    """scikit-learn's check_random_state: the same draws for the same seed, so weights match sklearn's."""
    if seed is None or seed is np.random:
        return np.random.mtrand._rand
    if isinstance(seed, numbers.Integral) and not isinstance(seed, (bool, np.bool_)) and 0 <= seed < 2**32:
        return np.random.RandomState(seed)
    if isinstance(seed, np.random.RandomState):
        return seed
    raise ValueError(f"random_state must be None, an int in [0, 2**32) or a numpy.random.RandomState; got {seed!r}")


def check_int(value, name: str, minimum: int = 1, maximum: int = INT_MAX) -> int:
    """`value` as an int in [minimum, maximum]; bools and floats (even 2.0) are refused."""
    integer = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if not integer or not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer >= {minimum} and <= {maximum}, got {value!r}")
    return int(value)


def check_float(value, name: str, low: float = 0.0, high: float = math.inf, *, low_open=False, high_open=True):
    """`value` as a finite float in the interval from low to high (open at an end where *_open says so)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    try:
        v = float(value) if ok else math.nan
    except OverflowError:  # an int beyond float range
        v = math.nan
    if not (math.isfinite(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return v


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def as_array(value, name: str) -> np.ndarray:
    """np.asarray(value), with numpy's complaint about ragged or odd input turned into one naming `name`."""
    try:
        return np.asarray(value)
    except (TypeError, ValueError, OverflowError) as exc:
        error = TypeError if isinstance(exc, TypeError) else ValueError
        raise error(f"{name} could not be converted to an array: {exc}") from None


def check_sample_weight(sample_weight, n: int) -> np.ndarray:
    """(n,) finite non-negative float64 weights, not all zero."""
    w = as_numeric(as_array(sample_weight, "sample_weight"), "sample_weight").astype(np.float64)
    if w.shape != (n,):
        raise ValueError(f"sample_weight must have shape ({n},), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or (w > np.finfo(np.float32).max).any():
        raise ValueError("sample_weight must hold non-negative numbers, finite in float32")
    if not w.any():
        raise ValueError("sample_weight is all zeros: no sample would count")
    return w


def check_csr(X, name: str):
    """Any scipy sparse matrix or array as a CSR matrix whose structure is checked.

    scipy's constructor does not compare indices with the shape, and an index array edited afterwards is
    never checked again; scipy's own routines (tocsr, sum_duplicates) and the core must not read out of bounds.
    """
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D; got a sparse input with shape {X.shape}")
    try:
        X = sp.csr_matrix(X)  # a new object (sharing the arrays): check_format may replace its index arrays
        X.check_format(full_check=True)
        if (np.diff(X.indptr) < 0).any():  # check_format skips this when indptr ends at 0
            raise ValueError("indptr must be non-decreasing")
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"{name} is not a valid sparse matrix: {exc}") from None
    return X


def _check_finite(values: np.ndarray, name: str) -> None:
    if not np.isfinite(values).all():
        if np.isnan(values).any():
            raise ValueError(f"Input {name} contains NaN.")
        # Also reached by finite float64 values beyond float32's range (they became inf in the cast).
        raise ValueError(f"Input {name} contains infinity or a value too large for dtype('float32').")


def as_numeric(arr: np.ndarray, name: str) -> np.ndarray:
    """A real numeric array, or a TypeError/ValueError that names `name` and the dtype."""
    kind = arr.dtype.kind
    if kind == "c":
        raise ValueError(f"Complex data not supported: {name} has dtype {arr.dtype}.")
    if kind == "O":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            # Keep numpy's text ("float() argument must be a string or a real number, not 'dict'").
            raise type(exc)(f"{name} must contain only numbers: {exc}") from None
    elif kind not in "biuf":
        raise TypeError(f"{name} must be numeric; got dtype {arr.dtype}.")
    return arr


def _to_float32(arr: np.ndarray) -> np.ndarray:
    # Values beyond float32's range become inf here and are reported by _check_finite, not as a warning.
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(arr, dtype=np.float32)


def _feature_names(X):
    """Column names of a DataFrame-like X when they are all strings (sklearn's feature_names_in_)."""
    cols = getattr(X, "columns", None)
    if cols is None or isinstance(X, np.ndarray) or sp.issparse(X):
        return None
    names = list(cols)
    if names and all(isinstance(c, str) for c in names):
        return np.asarray(names, dtype=object)
    return None


def check_X(X, estimator, *, reset: bool):
    """Validate X and convert it for the core; returns a float32 C-contiguous ndarray or a float32 CSR matrix.

    reset=True (fit) records n_features_in_ and feature_names_in_ on `estimator`; reset=False checks them.
    """
    est_name = type(estimator).__name__
    if X is None:
        raise ValueError(f"{est_name} requires X to be passed, but X is None.")
    names = _feature_names(X)
    if sp.issparse(X):
        X = check_csr(X, "X")  # any format (and sparse arrays) -> CSR; no copy when it is one already
        data = as_numeric(np.asarray(X.data), "X")
        data = _to_float32(data)
        _check_finite(data, "X")
        if X.shape[1] > np.iinfo(np.int32).max:
            raise ValueError(f"X has {X.shape[1]} columns; the core takes int32 column indices.")
        X = sp.csr_matrix((data, X.indices, X.indptr), shape=X.shape, copy=False)
        shape = X.shape
    else:
        try:
            arr = np.asarray(X)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"X could not be converted to a 2-D numeric array: {exc}") from None
        if arr.ndim == 0:
            raise ValueError(f"Expected 2D array, got scalar array instead: X={X!r}.")
        if arr.ndim == 1:
            raise ValueError(
                f"Expected 2D array, got 1D array instead: X has shape {arr.shape}. Reshape your data either "
                "using X.reshape(-1, 1) if your data has a single feature or X.reshape(1, -1) if it contains "
                "a single sample."
            )
        if arr.ndim > 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features); got {arr.ndim}-D array of shape {arr.shape}.")
        arr = as_numeric(arr, "X")
        shape = arr.shape
    n_samples, n_features = shape
    if n_samples < 1:
        raise ValueError(f"X has 0 sample(s) (shape={shape}) while a minimum of 1 is required.")
    if n_features < 1:
        # scikit-learn's estimator checks look for "0 feature(s) (shape=(n, 0)) while a minimum of 1 is required".
        raise ValueError(f"X has 0 feature(s) (shape={shape}) while a minimum of 1 is required.")
    if not sp.issparse(X):
        X = _to_float32(arr)
        _check_finite(X, "X")

    if reset:
        estimator.n_features_in_ = n_features
        if names is not None:
            estimator.feature_names_in_ = names
        elif hasattr(estimator, "feature_names_in_"):
            del estimator.feature_names_in_
    else:
        expected = estimator.n_features_in_
        if n_features != expected:
            raise ValueError(
                f"X has {n_features} features, but {est_name} is expecting {expected} features as input."
            )
        fitted_names = getattr(estimator, "feature_names_in_", None)
        if names is not None and fitted_names is not None and not np.array_equal(names, fitted_names):
            raise ValueError(
                "The feature names should match those that were passed during fit: "
                f"expected {list(fitted_names)}, got {list(names)}."
            )
    return X


def core_X(X):
    """The argument `fastrec._core` takes for X (DESIGN.md): the ndarray itself, or the CSR tuple."""
    if sp.issparse(X):
        return (
            np.ascontiguousarray(X.indptr, dtype=np.int64),
            np.ascontiguousarray(X.indices, dtype=np.int32),
            np.ascontiguousarray(X.data, dtype=np.float32),
            int(X.shape[1]),
        )
    return X


def check_y(y, n_samples: int, estimator, *, numeric: bool, warn_column: bool = True) -> np.ndarray:
    """y as a 1-D array (or 2-D for several outputs) with n_samples rows; a (n, 1) column is ravelled, with a
    DataConversionWarning where warn_column (fit), as scikit-learn does. numeric=True also converts to float64
    and checks finiteness."""
    est_name = type(estimator).__name__
    if y is None:
        raise ValueError(f"{est_name} requires y to be passed, but the target y is None.")
    if sp.issparse(y):
        y = y.toarray()
    try:
        y = np.asarray(y)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"y could not be converted to an array: {exc}") from None
    if y.ndim == 0 or y.ndim > 2:
        raise ValueError(f"y must be 1-D (n_samples,) or 2-D (n_samples, n_outputs); got shape {y.shape}.")
    if y.shape[0] != n_samples:
        raise ValueError(
            "Found input variables with inconsistent numbers of samples: "
            f"X has {n_samples} samples, y has {y.shape[0]}."
        )
    if y.ndim == 2 and y.shape[1] == 0:
        raise ValueError(f"y has 0 outputs (shape={y.shape}); at least one is required.")
    if y.ndim == 2 and y.shape[1] == 1:
        if warn_column:
            warn(
                "A column-vector y was passed when a 1d array was expected. Please change the shape of y to "
                "(n_samples, ), for example using ravel().",
                DataConversionWarning,
            )
        y = y[:, 0]
    if y.dtype.kind == "c":
        raise ValueError(f"Complex data not supported: y has dtype {y.dtype}.")
    if numeric:
        y = as_numeric(y, "y").astype(np.float64, copy=False)
        if not np.isfinite(y).all():
            if np.isnan(y).any():
                raise ValueError("Input y contains NaN.")
            raise ValueError("Input y contains infinity or a value too large for dtype('float64').")
        with np.errstate(over="ignore"):
            if not np.isfinite(y.astype(np.float32)).all():
                raise ValueError("Input y contains infinity or a value too large for dtype('float32').")
    return y


def classification_target_type(y: np.ndarray) -> str:
    """'binary', 'multiclass' or 'multilabel-indicator' for a checked y; ValueError for anything else."""
    if y.ndim == 2:
        ok = y.dtype.kind in "biuf" and np.isin(y, (0, 1)).all()
        if not ok:
            raise ValueError(
                "Unknown label type: multiclass-multioutput. A 2-D y must be a multilabel indicator "
                "matrix of 0s and 1s."
            )
        return "multilabel-indicator"
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise ValueError("Input y contains NaN." if np.isnan(y).any() else "Input y contains infinity.")
        if np.any(y != np.round(y)):
            raise ValueError("Unknown label type: continuous. Classifier targets y must be discrete labels.")
    elif y.dtype.kind == "O":
        kinds = {type(v) for v in y.tolist()}
        if not all(issubclass(k, (str, numbers.Real)) for k in kinds):
            raise ValueError(f"Unknown label type: y holds {sorted(k.__name__ for k in kinds)}.")
        if any(issubclass(k, float) for k in kinds):
            vals = np.asarray([v for v in y.tolist() if isinstance(v, float)])
            if not np.isfinite(vals).all() or np.any(vals != np.round(vals)):
                raise ValueError("Unknown label type: continuous or non-finite values in y.")
        if any(issubclass(k, str) for k in kinds) and not all(issubclass(k, str) for k in kinds):
            raise ValueError("Unknown label type: y mixes strings and numbers.")
    elif y.dtype.kind not in "biuUS":
        raise ValueError(f"Unknown label type: y has dtype {y.dtype}.")
    return "multiclass" if len(np.unique(y)) > 2 else "binary"
