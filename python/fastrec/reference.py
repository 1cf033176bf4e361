"""Plain-NumPy oracle of the math in ``fastrec._core`` (see docs/DESIGN.md).

Every public function of ``fastrec._core`` that does arithmetic has a twin here with the same name and
signature (``isa`` and ``n_threads`` are accepted and ignored).  The building blocks they are made of
(activations, the output loss, the CSR products, the optimizer steps) are public too, so tests can check
each piece on its own.  Tests compare the compiled core against this module, and this module is itself
checked against finite differences and scikit-learn (tests/test_reference.py), so it is written for
clarity, not speed.

Conventions (scikit-learn's MLP conventions, DESIGN.md "Mathematics"):

* ``coefs[l]`` has shape ``(fan_in, fan_out)``, ``intercepts[l]`` shape ``(fan_out,)``.
* ``X`` is a dense 2-D array, a ``scipy.sparse`` matrix (converted to CSR), or the CSR tuple
  ``(indptr, indices, data, n_cols)``.  ``Y`` has shape ``(n, n_out)``.
* Arithmetic happens in the dtype of ``coefs[0]`` (float32 or float64); ``X`` and ``Y`` are cast to it,
  as the core casts everything to float32.  Only the scalar loss is accumulated in float64 (see
  ``_sum64``); arrays are never upcast.
"""

import math

import numpy as np
import scipy.sparse

__all__ = [
    "HIDDEN_ACTIVATIONS",
    "OUTPUT_ACTIVATIONS",
    "activation",
    "activation_derivative",
    "adam_update",
    "csr_matmul",
    "csr_touched_rows",
    "csr_transpose_matmul",
    "forward",
    "loss_and_gradients",
    "output_loss",
    "sgd_update",
    "sgemm",
    "train_epoch",
]

HIDDEN_ACTIVATIONS = ("identity", "logistic", "tanh", "relu")
OUTPUT_ACTIVATIONS = ("identity", "logistic", "softmax")


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def _sum64(x):
    """Sum of all elements of ``x`` accumulated in float64, returned as a Python float.

    The loss is a single number summed over the whole batch; accumulating it in float64 keeps the oracle's
    loss accurate to well under float32 resolution, so a float32 core can be judged against it.  This is the
    only place the module upcasts.
    """
    return float(np.sum(x, dtype=np.float64))


def _as_input(X, dtype):
    """Normalise ``X`` to ``("dense", array)`` or ``("csr", (indptr, indices, data, n_cols))``.

    Dense arrays and CSR values are cast to ``dtype``; CSR index arrays are made int64 for NumPy indexing.
    Explicit zeros of a sparse matrix are kept (they make their column "touched").
    """
    if scipy.sparse.issparse(X):
        X = X.tocsr()
        return "csr", (
            np.asarray(X.indptr, dtype=np.int64),
            np.asarray(X.indices, dtype=np.int64),
            np.asarray(X.data, dtype=dtype),
            int(X.shape[1]),
        )
    if isinstance(X, tuple):
        if len(X) != 4:
            raise ValueError(f"X: a CSR tuple must be (indptr, indices, data, n_cols), got {len(X)} items")
        indptr, indices, data, n_cols = X
        return "csr", (
            np.asarray(indptr, dtype=np.int64),
            np.asarray(indices, dtype=np.int64),
            np.asarray(data, dtype=dtype),
            int(n_cols),
        )
    X = np.asarray(X, dtype=dtype)
    if X.ndim != 2:
        raise ValueError(f"X: expected a 2-D array, got shape {X.shape}")
    return "dense", X


def _n_rows(kind, X):
    return X.shape[0] if kind == "dense" else len(X[0]) - 1


def _take_rows(kind, X, rows):
    """Rows ``rows`` (int array) of a normalised input, in that order, as the same kind of input."""
    if kind == "dense":
        return X[rows]
    indptr, indices, data, n_cols = X
    starts, stops = indptr[rows], indptr[rows + 1]
    new_indptr = np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int64)
    # positions in indices/data of the selected rows' entries, row by row
    pieces = [np.arange(s, e, dtype=np.int64) for s, e in zip(starts, stops)]
    gather = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return (new_indptr, indices[gather], data[gather], n_cols)


def _hyper(dtype, *values):
    """Cast scalar hyper-parameters to the working dtype so that a NumPy float64 scalar passed by a caller
    cannot silently upcast float32 arrays."""
    return [dtype.type(v) for v in values]


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


def sgemm(a, b, trans_a=False, trans_b=False, isa="auto", n_threads=0):
    """``op(a) @ op(b)`` where ``op`` transposes when asked.

    a: (m, k), or (k, m) with ``trans_a``; b: (k, n), or (n, k) with ``trans_b``. Returns C-contiguous (m, n).
    ``isa`` and ``n_threads`` are ignored.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"sgemm: a and b must be 2-D, got shapes {a.shape} and {b.shape}")
    op_a = a.T if trans_a else a
    op_b = b.T if trans_b else b
    if op_a.shape[1] != op_b.shape[0]:
        raise ValueError(f"sgemm: inner dimensions differ: op(a) {op_a.shape}, op(b) {op_b.shape}")
    return np.ascontiguousarray(op_a @ op_b)


def activation(z, name):
    """Element-wise activation ``name`` of ``z`` (any shape); softmax is over the last axis.

    Stable for any finite ``z``: logistic never evaluates ``exp`` of a positive number, softmax subtracts the
    row maximum first.
    """
    z = np.asarray(z)
    if name == "identity":
        return z.copy()
    if name == "relu":
        return np.maximum(z, 0)
    if name == "tanh":
        return np.tanh(z)
    if name == "logistic":
        # e = exp(-|z|) is in (0, 1]; sigmoid(z) = 1/(1+e) for z >= 0 and e/(1+e) for z < 0.
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    if name == "softmax":
        e = np.exp(z - np.max(z, axis=-1, keepdims=True))
        return e / np.sum(e, axis=-1, keepdims=True)
    raise ValueError(f"unknown activation {name!r}")


# ``forward``/``loss_and_gradients``/``train_epoch`` take a parameter named ``activation`` (the core's
# signature), which hides the function above inside them; they call it through this alias.
_activation = activation


def activation_derivative(a, name):
    """Derivative of hidden activation ``name`` written in terms of its OUTPUT ``a = act(z)``.

    relu: ``a > 0``; logistic: ``a (1 - a)``; tanh: ``1 - a^2``; identity: 1. Same shape as ``a``.
    """
    a = np.asarray(a)
    if name == "identity":
        return np.ones_like(a)
    if name == "relu":
        return (a > 0).astype(a.dtype)
    if name == "tanh":
        return 1 - a * a
    if name == "logistic":
        return a * (1 - a)
    raise ValueError(f"unknown hidden activation {name!r}")


def _softplus(z):
    """``log(1 + exp(z))`` without overflow: ``max(z, 0) + log1p(exp(-|z|))``."""
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def _logsumexp_rows(z):
    """``log(sum_j exp(z_ij))`` per row of a 2-D ``z``, shape (n,), without overflow."""
    m = np.max(z, axis=1)
    return m + np.log(np.sum(np.exp(z - m[:, None]), axis=1))


def output_loss(Z, Y, out_activation):
    """Loss of a batch from its output logits, the output and the logit gradient.

    Z, Y: (n, n_out). Returns ``(loss, P, dZ)`` with ``loss`` a float averaged over the n rows (and, for
    identity, over the outputs too: scikit-learn's ``squared_loss``), ``P = out(Z)`` and ``dZ = P - Y``
    (NOT divided by n).  The log losses are computed from logits, so they are finite for any finite Z.
    """
    Z = np.asarray(Z)
    Y = np.asarray(Y, dtype=Z.dtype)
    if Z.ndim != 2 or Z.shape != Y.shape:
        raise ValueError(f"output_loss: Z {Z.shape} and Y {Y.shape} must be equal 2-D shapes")
    n, n_out = Z.shape
    P = activation(Z, out_activation)
    if out_activation == "identity":
        loss = _sum64((Y - P) ** 2) / (2 * n * n_out)
    elif out_activation == "logistic":
        loss = _sum64(_softplus(Z) - Y * Z) / n
    elif out_activation == "softmax":
        loss = (_sum64(_logsumexp_rows(Z)) - _sum64(Y * Z)) / n
    else:
        raise ValueError(f"unknown output activation {out_activation!r}")
    return loss, P, P - Y


def csr_matmul(indptr, indices, data, W):
    """``X @ W`` for CSR ``X`` by gathering rows of ``W``: ``out[i] = sum_k data[k] * W[indices[k]]``.

    indptr: (n+1,), indices/data: (nnz,), W: (n_cols, m). Returns (n, m) in W's dtype.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    W = np.asarray(W)
    data = np.asarray(data, dtype=W.dtype)
    n = len(indptr) - 1
    row_of_entry = np.repeat(np.arange(n), np.diff(indptr))
    out = np.zeros((n, W.shape[1]), dtype=W.dtype)
    np.add.at(out, row_of_entry, data[:, None] * W[indices])
    return out


def csr_touched_rows(indptr, indices):
    """Sorted unique column ids with a stored entry (explicit zeros included): the rows of W_0 a CSR batch
    touches.  Returns int64 (n_touched,)."""
    indices = np.asarray(indices, dtype=np.int64)[: int(np.asarray(indptr)[-1])]
    return np.unique(indices)


def csr_transpose_matmul(indptr, indices, data, D, rows):
    """``(X^T D)[rows]`` for CSR ``X`` (n, n_cols) and dense ``D`` (n, m); ``rows`` sorted unique column ids.

    Entries of X in columns outside ``rows`` are ignored. Returns (len(rows), m) in D's dtype.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    D = np.asarray(D)
    data = np.asarray(data, dtype=D.dtype)
    rows = np.asarray(rows, dtype=np.int64)
    n = len(indptr) - 1
    row_of_entry = np.repeat(np.arange(n), np.diff(indptr))
    pos = np.searchsorted(rows, indices)
    keep = pos < len(rows)
    keep[keep] = rows[pos[keep]] == indices[keep]
    out = np.zeros((len(rows), D.shape[1]), dtype=D.dtype)
    np.add.at(out, pos[keep], data[keep, None] * D[row_of_entry[keep]])
    return out


def sgd_update(param, grad, velocity, lr, momentum, nesterov):
    """One SGD-with-momentum step, in place on ``param`` and ``velocity`` (all the same shape).

    ``V = momentum * V - lr * G``; nesterov: ``P += momentum * V - lr * G``, else ``P += V``.  The expressions
    are written exactly as in scikit-learn's ``SGDOptimizer`` so float64 results match it bit for bit.
    """
    lr, momentum = _hyper(param.dtype, lr, momentum)
    velocity[...] = momentum * velocity - lr * grad
    if nesterov:
        param += momentum * velocity - lr * grad
    else:
        param += velocity


def adam_update(param, grad, m, s, t, lr, beta_1, beta_2, epsilon):
    """One Adam step, in place on ``param``, ``m`` (first moment) and ``s`` (second moment).

    ``t`` is the step count AFTER increment (1 for the first step).
    ``M = b1 M + (1-b1) G; S = b2 S + (1-b2) G^2; P -= lr_t M / (sqrt(S) + eps)`` with
    ``lr_t = lr sqrt(1-b2^t) / (1-b1^t)`` (scikit-learn's ``AdamOptimizer``: eps is added to sqrt(S), not to
    the bias-corrected sqrt).
    """
    # lr_t is a scalar: computed in double precision like scikit-learn, then cast to the working dtype.
    lr_t = lr * math.sqrt(1 - beta_2**t) / (1 - beta_1**t)
    b1, b2, eps, lr_t = _hyper(param.dtype, beta_1, beta_2, epsilon, lr_t)
    one = param.dtype.type(1)
    m[...] = b1 * m + (one - b1) * grad
    s[...] = b2 * s + (one - b2) * (grad * grad)
    param -= lr_t * m / (np.sqrt(s) + eps)


# ----------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------


def _check_layers(coefs, intercepts):
    if len(coefs) == 0 or len(coefs) != len(intercepts):
        raise ValueError(f"coefs ({len(coefs)}) and intercepts ({len(intercepts)}) must be equal, non-empty lists")
    for l, (W, b) in enumerate(zip(coefs, intercepts)):
        if W.ndim != 2 or b.shape != (W.shape[1],):
            raise ValueError(f"layer {l}: coefs {W.shape} and intercepts {b.shape} do not fit")
        if l > 0 and W.shape[0] != coefs[l - 1].shape[1]:
            raise ValueError(f"layer {l}: fan_in {W.shape[0]} != fan_out of layer {l - 1}")


def _forward_pass(coefs, intercepts, kind, X, act):
    """Hidden activations and output logits.

    Returns ``(hidden, Z)``: ``hidden[l]`` is the output of hidden layer l+1 (n, h_{l+1}), ``Z`` the output
    logits (n, n_out) before the output activation.
    """
    n_features = X.shape[1] if kind == "dense" else X[3]
    if n_features != coefs[0].shape[0]:
        raise ValueError(f"X has {n_features} columns, coefs[0] has {coefs[0].shape[0]} rows")
    if kind == "dense":
        Z = X @ coefs[0] + intercepts[0]
    else:
        Z = csr_matmul(X[0], X[1], X[2], coefs[0]) + intercepts[0]
    hidden = []
    for W, b in zip(coefs[1:], intercepts[1:]):
        hidden.append(_activation(Z, act))
        Z = hidden[-1] @ W + b
    return hidden, Z


def forward(coefs, intercepts, X, activation, out_activation, n_threads=0):
    """Network output ``out(Z)`` (probabilities for logistic/softmax), shape (n, n_out)."""
    _check_layers(coefs, intercepts)
    kind, X = _as_input(X, coefs[0].dtype)
    _, Z = _forward_pass(coefs, intercepts, kind, X, activation)
    return _activation(Z, out_activation)


def loss_and_gradients(coefs, intercepts, X, Y, activation, out_activation, alpha, n_threads=0):
    """Loss with L2 penalty and its gradients for one batch.

    Returns ``(loss, coef_grads, intercept_grads)``: a float and lists shaped like ``coefs``/``intercepts``.
    ``loss = output_loss + 0.5 * alpha * sum_l ||W_l||^2 / n``; ``dW_l = (A_l^T D_l + alpha W_l) / n``,
    ``db_l = sum(D_l, axis=0) / n``, ``D_{l-1} = (D_l W_l^T) * act'(A_l)``.
    For CSR X, ``coef_grads[0]`` is dense with zeros in the rows of W_0 the batch does not touch, and the
    L2 term of W_0 (loss and gradient) counts touched rows only.
    """
    act = activation
    _check_layers(coefs, intercepts)
    dtype = coefs[0].dtype
    kind, X = _as_input(X, dtype)
    Y = np.asarray(Y, dtype=dtype)
    n = _n_rows(kind, X)
    if Y.shape != (n, coefs[-1].shape[1]):
        raise ValueError(f"Y has shape {Y.shape}, expected {(n, coefs[-1].shape[1])}")
    (alpha_t,) = _hyper(dtype, alpha)
    n_t = dtype.type(n)

    hidden, Z = _forward_pass(coefs, intercepts, kind, X, act)
    loss, _, D = output_loss(Z, Y, out_activation)

    touched = None if kind == "dense" else csr_touched_rows(X[0], X[1])
    W0_penalised = coefs[0] if touched is None else coefs[0][touched]
    loss += 0.5 * alpha * (_sum64(W0_penalised * W0_penalised) + sum(_sum64(W * W) for W in coefs[1:])) / n

    L = len(coefs)
    coef_grads = [None] * L
    intercept_grads = [None] * L
    for l in range(L - 1, 0, -1):
        A = hidden[l - 1]
        coef_grads[l] = (A.T @ D + alpha_t * coefs[l]) / n_t
        intercept_grads[l] = np.sum(D, axis=0) / n_t
        D = (D @ coefs[l].T) * activation_derivative(A, act)
    if kind == "dense":
        coef_grads[0] = (X.T @ D + alpha_t * coefs[0]) / n_t
    else:
        coef_grads[0] = np.zeros_like(coefs[0])
        coef_grads[0][touched] = (csr_transpose_matmul(*X[:3], D, touched) + alpha_t * coefs[0][touched]) / n_t
    intercept_grads[0] = np.sum(D, axis=0) / n_t
    return loss, coef_grads, intercept_grads


def train_epoch(coefs, intercepts, state1, state2, X, Y, order, batch_size, activation, out_activation, alpha,
                solver, learning_rate, momentum, nesterov, beta_1, beta_2, epsilon, adam_t, n_threads=0):
    """Run the minibatches ``order[i:i+batch_size]`` in sequence, updating parameters and state in place.

    state1/state2: lists of 2L arrays shaped like ``coefs + intercepts``: SGD velocities in state1 (state2
    unused), or Adam first/second moments.  ``adam_t`` is the global Adam step count before the epoch; it
    goes up by one per minibatch.  For CSR X only the touched rows of ``coefs[0]`` and of its state are
    updated (lazy momentum/moments); everything else is updated densely.
    Returns ``(loss_sum, adam_t)`` with ``loss_sum = sum(batch_loss * batch_len)`` (losses before each step).
    """
    _check_layers(coefs, intercepts)
    L = len(coefs)
    if solver not in ("sgd", "adam"):
        raise ValueError(f"unknown solver {solver!r}")
    if len(state1) != 2 * L or (solver == "adam" and len(state2) != 2 * L):
        raise ValueError(f"state1/state2 must hold {2 * L} arrays for solver {solver!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kind, X = _as_input(X, coefs[0].dtype)
    Y = np.asarray(Y, dtype=coefs[0].dtype)
    order = np.asarray(order, dtype=np.int64)
    params = list(coefs) + list(intercepts)

    def step(p, g, i, rows=None):
        """Optimizer step on parameter array p (index i in params/state), only on ``rows`` if given."""
        if rows is None:
            sub_p, sub_g, sub_1 = p, g, state1[i]
            sub_2 = state2[i] if solver == "adam" else None
        else:  # lazy: update copies of the touched rows, then write them back
            sub_p, sub_g, sub_1 = p[rows], g[rows], state1[i][rows]
            sub_2 = state2[i][rows] if solver == "adam" else None
        if solver == "sgd":
            sgd_update(sub_p, sub_g, sub_1, learning_rate, momentum, nesterov)
        else:
            adam_update(sub_p, sub_g, sub_1, sub_2, adam_t, learning_rate, beta_1, beta_2, epsilon)
        if rows is not None:
            p[rows] = sub_p
            state1[i][rows] = sub_1
            if solver == "adam":
                state2[i][rows] = sub_2

    loss_sum = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        Xb = _take_rows(kind, X, idx)
        loss, coef_grads, intercept_grads = loss_and_gradients(
            coefs, intercepts, Xb, Y[idx], activation, out_activation, alpha)
        loss_sum += loss * len(idx)
        if solver == "adam":
            adam_t += 1
        touched = None if kind == "dense" else csr_touched_rows(Xb[0], Xb[1])
        for i, (p, g) in enumerate(zip(params, list(coef_grads) + list(intercept_grads))):
            step(p, g, i, rows=touched if i == 0 else None)
    return loss_sum, adam_t
