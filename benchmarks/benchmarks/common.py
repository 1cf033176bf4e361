"""Shared, seeded data for the fastrec asv benchmarks (the numpy/numpy benchmarks/common.py pattern).

Everything here is built from fixed seeds and cached, so each benchmark's ``setup`` pays for it once per
process and every implementation sees the same arrays. All data is float32: fastrec computes in float32,
and scikit-learn's MLP keeps float32 input in float32, so every implementation does the same arithmetic.
"""

import functools
import timeit

import numpy as np
import scipy.sparse as sp

# Wall clock: the implementations are multithreaded; process time sums CPU time over threads.
TIMER = timeit.default_timer

IMPLS = ["fastrec", "reference", "sklearn"]

# Grid (kept modest so a full `asv run` takes minutes): batch sizes 32..4096, layer widths 64..1024.
BATCH_SIZES = [32, 256, 4096]
WIDTHS = [64, 256, 1024]
# One epoch = max(batch_size, EPOCH_MIN_ROWS) rows: at least 32 steps at batch 32, one full batch at 4096.
# (Epoch time is what is compared between implementations, so the row count only sets the run time.)
EPOCH_MIN_ROWS = 1024
N_SAMPLES = max(BATCH_SIZES)  # rows generated; epochs use a prefix

# Sparse (CSR) input: 20 stored entries per row, a 64-32 network, as in issue 2's CSR bar item.
CSR_NNZ_PER_ROW = 20
CSR_HIDDEN = (64, 32)
CSR_EPOCH_MIN_ROWS = 512  # scikit-learn updates the whole first layer densely every step: keep epochs short
CSR_N_COLS = [10_000, 100_000]

SEED = 1234


def epoch_rows(batch_size, min_rows=EPOCH_MIN_ROWS):
    return max(batch_size, min_rows)


def dense_hidden(width):
    """A two-hidden-layer network whose widest layer is `width`: n_features = width, hidden = (width, width/2)."""
    return (width, max(width // 2, 1))


@functools.lru_cache(maxsize=None)
def dense_data(n_samples, n_features, seed=SEED):
    """(X float32 (n, d), y float32 (n,)): y is a smooth nonlinear function of X plus noise."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, n_features), dtype=np.float32)
    w = rng.standard_normal(n_features).astype(np.float32) / np.sqrt(n_features)
    y = np.tanh(X @ w) + np.float32(0.1) * rng.standard_normal(n_samples, dtype=np.float32)
    return X, y.astype(np.float32)


@functools.lru_cache(maxsize=None)
def csr_data(n_samples, n_cols, nnz_per_row=CSR_NNZ_PER_ROW, seed=SEED):
    """(X scipy CSR float32 (n, n_cols) with nnz_per_row distinct sorted columns per row, y float32 (n,))."""
    rng = np.random.default_rng(seed)
    cols = np.empty((n_samples, nnz_per_row), dtype=np.int64)
    for i in range(n_samples):  # distinct columns per row
        cols[i] = np.sort(rng.choice(n_cols, size=nnz_per_row, replace=False))
    data = rng.random((n_samples, nnz_per_row), dtype=np.float32)
    indptr = np.arange(0, n_samples * nnz_per_row + 1, nnz_per_row, dtype=np.int64)
    X = sp.csr_matrix((data.ravel(), cols.ravel().astype(np.int32), indptr), shape=(n_samples, n_cols))
    y = (data.sum(axis=1) + np.float32(0.1) * rng.standard_normal(n_samples, dtype=np.float32)).astype(np.float32)
    return X, y


def make_estimator(impl, hidden, batch_size, n_threads=None, solver="adam"):
    """A regressor with identical settings for fastrec and scikit-learn (one epoch per partial_fit)."""
    kw = dict(hidden_layer_sizes=hidden, activation="relu", solver=solver, alpha=1e-4,
              batch_size=batch_size, learning_rate_init=1e-3, shuffle=True, random_state=0)
    if impl == "fastrec":
        import fastrec

        return fastrec.MLPRegressor(n_threads=n_threads, **kw)
    from sklearn.neural_network import MLPRegressor

    return MLPRegressor(**kw)


class ReferenceEpoch:
    """One epoch of `fastrec.reference.train_epoch` (Adam), starting from given weights.

    This is the loop a user of the NumPy oracle would write: shuffle, then run the minibatches.
    """

    def __init__(self, coefs, intercepts, X, y, batch_size, seed=0):
        from fastrec import reference

        self.ref = reference
        self.coefs = [np.array(c, dtype=np.float32) for c in coefs]
        self.intercepts = [np.array(b, dtype=np.float32) for b in intercepts]
        params = self.coefs + self.intercepts
        self.state1 = [np.zeros_like(p) for p in params]
        self.state2 = [np.zeros_like(p) for p in params]
        self.adam_t = 0
        self.X = X
        self.Y = np.ascontiguousarray(np.asarray(y, dtype=np.float32).reshape(len(y), -1))
        self.batch_size = batch_size
        self.rng = np.random.RandomState(seed)

    def epoch(self):
        order = self.rng.permutation(self.Y.shape[0]).astype(np.int64)
        _, self.adam_t = self.ref.train_epoch(
            self.coefs, self.intercepts, self.state1, self.state2, self.X, self.Y, order, self.batch_size,
            "relu", "identity", 1e-4, "adam", 1e-3, 0.9, True, 0.9, 0.999, 1e-8, self.adam_t, 0)

    def predict(self, X):
        return self.ref.forward(self.coefs, self.intercepts, X, "relu", "identity", 0)


# --------------------------------------------------------------------------------------- GEMM shapes
# The products of one training step of a 512-256-128-64 MLP on a 1024-sample batch, per layer l with
# fan_in k and fan_out n:  forward X.W (m x k)(k x n), weight gradient X^T.dZ (k x m)(m x n),
# input gradient dZ.W^T (m x n)(n x k).
GEMM_BATCH = 1024
GEMM_LAYERS = [512, 256, 128, 64]


def gemm_products():
    """{name: (a_shape, b_shape, trans_a, trans_b, flops)}, op(a) @ op(b) with a, b stored C-contiguous."""
    m = GEMM_BATCH
    out = {}
    for k, n in zip(GEMM_LAYERS[:-1], GEMM_LAYERS[1:]):
        flops = 2.0 * m * k * n
        out[f"XW_{m}x{k}x{n}"] = ((m, k), (k, n), False, False, flops)
        out[f"XtdZ_{k}x{m}x{n}"] = ((m, k), (m, n), True, False, flops)
        out[f"dZWt_{m}x{n}x{k}"] = ((m, n), (k, n), False, True, flops)
    return out


@functools.lru_cache(maxsize=None)
def gemm_operands(name, seed=SEED):
    a_shape, b_shape, ta, tb, flops = gemm_products()[name]
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(a_shape, dtype=np.float32)
    b = rng.standard_normal(b_shape, dtype=np.float32)
    return a, b, ta, tb, flops


def numpy_product(a, b, ta, tb):
    """op(a) @ op(b) with NumPy: .T is a view, so BLAS gets the transpose flag and no copy is made."""
    return (a.T if ta else a) @ (b.T if tb else b)
