"""One training epoch and predict: fastrec vs its NumPy oracle vs scikit-learn's MLP, dense and CSR input.

Every implementation starts from the same seeded data with the same settings (ReLU, Adam, alpha=1e-4,
lr 1e-3, shuffle, float32 data). An epoch is timed as
  * fastrec / sklearn: ``MLPRegressor.partial_fit(X, y)`` (exactly one epoch over X, in minibatches of
    ``batch_size``) on an estimator already initialised by one partial_fit in setup;
  * reference: one call of ``fastrec.reference.train_epoch`` over a fresh permutation (common.ReferenceEpoch).
Threads: fastrec uses all cores (n_threads=None), NumPy/scikit-learn their BLAS default (all cores).
"""

import warnings

import numpy as np

from .common import (BATCH_SIZES, CSR_EPOCH_MIN_ROWS, CSR_HIDDEN, CSR_N_COLS, IMPLS, N_SAMPLES, TIMER, WIDTHS,
                     ReferenceEpoch, csr_data, dense_data, dense_hidden, epoch_rows, make_estimator)


def _fitted(impl, X, y, hidden, batch_size):
    """(epoch, predict) callables for `impl`, initialised by one epoch over X (so the timed epoch is warm)."""
    est = make_estimator("fastrec" if impl == "reference" else impl, hidden, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning, batch_size clipping
        est.partial_fit(X, y)
    if impl == "reference":
        # The oracle starts from fastrec's weights after one epoch (same scale of activations).
        ref = ReferenceEpoch(est.coefs_, est.intercepts_, X, y, batch_size)
        return ref.epoch, ref.predict

    def epoch():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.partial_fit(X, y)

    return epoch, est.predict


class TimeEpochDense:
    """One epoch over max(batch_size, 1024) rows; n_features = width, hidden = (width, width/2), one output."""

    params = [IMPLS, BATCH_SIZES, WIDTHS]
    param_names = ["impl", "batch_size", "width"]
    timer = TIMER
    timeout = 300
    number = 1  # an epoch is long enough to time on its own
    repeat = (1, 5, 20.0)

    def setup(self, impl, batch_size, width):
        X, y = dense_data(N_SAMPLES, width)
        n = epoch_rows(batch_size)
        self.epoch, _ = _fitted(impl, X[:n], y[:n], dense_hidden(width), batch_size)

    def time_epoch(self, impl, batch_size, width):
        self.epoch()


class TimePredictDense:
    """predict on `batch_size` rows with the TimeEpochDense networks (weights after one short epoch)."""

    params = [IMPLS, BATCH_SIZES, WIDTHS]
    param_names = ["impl", "batch_size", "width"]
    timer = TIMER
    timeout = 300

    def setup(self, impl, batch_size, width):
        X, y = dense_data(N_SAMPLES, width)
        _, self.predict = _fitted(impl, X[:256], y[:256], dense_hidden(width), 256)
        self.Xb = np.ascontiguousarray(X[:batch_size])

    def time_predict(self, impl, batch_size, width):
        self.predict(self.Xb)


class TimeEpochCSR:
    """One epoch over max(batch_size, 512) CSR rows (20 stored entries per row), hidden (64, 32), one output.

    scikit-learn computes and applies a dense gradient for the whole first layer (n_cols x 64) every step;
    fastrec and the reference touch only the rows of the columns present in the batch.
    """

    params = [IMPLS, BATCH_SIZES, CSR_N_COLS]
    param_names = ["impl", "batch_size", "n_cols"]
    timer = TIMER
    timeout = 300
    number = 1
    repeat = (1, 5, 20.0)

    def setup(self, impl, batch_size, n_cols):
        X, y = csr_data(N_SAMPLES, n_cols)
        n = epoch_rows(batch_size, CSR_EPOCH_MIN_ROWS)
        self.epoch, _ = _fitted(impl, X[:n], y[:n], CSR_HIDDEN, batch_size)

    def time_epoch(self, impl, batch_size, n_cols):
        self.epoch()


class TimePredictCSR:
    """predict on `batch_size` CSR rows with the TimeEpochCSR networks."""

    params = [IMPLS, BATCH_SIZES, CSR_N_COLS]
    param_names = ["impl", "batch_size", "n_cols"]
    timer = TIMER
    timeout = 300

    def setup(self, impl, batch_size, n_cols):
        X, y = csr_data(N_SAMPLES, n_cols)
        _, self.predict = _fitted(impl, X[:256], y[:256], CSR_HIDDEN, 256)
        self.Xb = X[:batch_size]

    def time_predict(self, impl, batch_size, n_cols):
        self.predict(self.Xb)
