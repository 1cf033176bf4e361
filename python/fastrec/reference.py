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
    "bf16_gemm",
    "bf16_round",
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


def output_loss(Z, Y, out_activation, sample_weight=None):
    """Loss of a batch from its output logits, the output and the logit gradient.

    Z, Y: (n, n_out). Returns ``(loss, P, dZ)`` with ``loss`` a float averaged over the n rows (and, for
    identity, over the outputs too: scikit-learn's ``squared_loss``), ``P = out(Z)`` and ``dZ = P - Y``
    (NOT divided by n).  The log losses are computed from logits, so they are finite for any finite Z.
    With ``sample_weight`` (n,) (scikit-learn's): the weighted average of the rows' losses, and each row of
    dZ times its weight.
    """
    Z = np.asarray(Z)
    Y = np.asarray(Y, dtype=Z.dtype)
    if Z.ndim != 2 or Z.shape != Y.shape:
        raise ValueError(f"output_loss: Z {Z.shape} and Y {Y.shape} must be equal 2-D shapes")
    n, n_out = Z.shape
    P = activation(Z, out_activation)
    if out_activation == "identity":
        rows = np.sum((Y - P) ** 2, axis=1) / (2 * n_out)
    elif out_activation == "logistic":
        rows = np.sum(_softplus(Z) - Y * Z, axis=1)
    elif out_activation == "softmax":
        rows = _logsumexp_rows(Z) - np.sum(Y * Z, axis=1)
    else:
        raise ValueError(f"unknown output activation {out_activation!r}")
    if sample_weight is None:
        return _sum64(rows) / n, P, P - Y
    w = np.asarray(sample_weight, dtype=Z.dtype)
    return _sum64(w * rows) / _sum64(w), P, (P - Y) * w[:, None]


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


def loss_and_gradients(coefs, intercepts, X, Y, activation, out_activation, alpha, n_threads=0, sample_weight=None):
    """Loss with L2 penalty and its gradients for one batch.

    Returns ``(loss, coef_grads, intercept_grads)``: a float and lists shaped like ``coefs``/``intercepts``.
    ``loss = output_loss + 0.5 * alpha * sum_l ||W_l||^2 / n``; ``dW_l = (A_l^T D_l + alpha W_l) / n``,
    ``db_l = sum(D_l, axis=0) / n``, ``D_{l-1} = (D_l W_l^T) * act'(A_l)``.
    For CSR X, ``coef_grads[0]`` is dense with zeros in the rows of W_0 the batch does not touch, and the
    L2 term of W_0 (loss and gradient) counts touched rows only.
    With ``sample_weight`` (scikit-learn's): n is the sum of the weights and the output rows of D are
    weighted (``output_loss``).
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
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=dtype)
        n = _sum64(sample_weight)
    n_t = dtype.type(n)

    hidden, Z = _forward_pass(coefs, intercepts, kind, X, act)
    loss, _, D = output_loss(Z, Y, out_activation, sample_weight)

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
                solver, learning_rate, momentum, nesterov, beta_1, beta_2, epsilon, adam_t, n_threads=0,
                sample_weight=None):
    """Run the minibatches ``order[i:i+batch_size]`` in sequence, updating parameters and state in place.

    state1/state2: lists of 2L arrays shaped like ``coefs + intercepts``: SGD velocities in state1 (state2
    unused), or Adam first/second moments.  ``adam_t`` is the global Adam step count before the epoch; it
    goes up by one per minibatch.  For CSR X only the touched rows of ``coefs[0]`` and of its state are
    updated (lazy momentum/moments); everything else is updated densely.
    Returns ``(loss_sum, adam_t)`` with ``loss_sum = sum(batch_loss * batch_len)`` (losses before each step).
    ``sample_weight`` weights each batch as in ``loss_and_gradients``; a batch whose weights are all zero is
    skipped (no step, loss 0).
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
        wb = None if sample_weight is None else np.asarray(sample_weight)[idx]
        if wb is not None and not wb.any():
            continue
        Xb = _take_rows(kind, X, idx)
        loss, coef_grads, intercept_grads = loss_and_gradients(
            coefs, intercepts, Xb, Y[idx], activation, out_activation, alpha, sample_weight=wb)
        loss_sum += loss * len(idx)
        if solver == "adam":
            adam_t += 1
        touched = None if kind == "dense" else csr_touched_rows(Xb[0], Xb[1])
        for i, (p, g) in enumerate(zip(params, list(coef_grads) + list(intercept_grads))):
            step(p, g, i, rows=touched if i == 0 else None)
    return loss_sum, adam_t


# ----------------------------------------------------------------------------------------------------------
# The field model (DESIGN.md "The field model" and "fastrec._core.field_*")
# ----------------------------------------------------------------------------------------------------------
#
# ``spec`` is the same dict of arrays the core takes (float64 copies in the tests); the oracle reads it, and
# ``field_train_epoch`` updates its arrays in place like the core does.  Arithmetic happens in the dtype of
# ``spec["coefs"][0]``.

__all__ += [
    "adagrad_update",
    "field_loss_and_gradients",
    "field_predict",
    "field_topk",
    "field_train_epoch",
    "float64_copy",
    "row_adagrad_update",
]


def float64_copy(obj):
    """Deep copy of a field spec (dicts, lists, tuples of arrays) with every float32 array as float64: the
    oracle computes in the dtype of the arrays it is given, and updates them in place when training."""
    if isinstance(obj, dict):
        return {k: float64_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(float64_copy(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.astype(np.float64) if obj.dtype == np.float32 else obj.copy()
    return obj

FIELD_LOSSES = ("mse", "bce")
FIELD_OPTIMIZERS = ("sgd", "adagrad", "adam")


def adagrad_update(param, grad, accumulator, lr, epsilon):
    """One element-wise Adagrad step in place: ``s += g^2; p -= lr g / (sqrt(s) + eps)`` (the MLP's and the
    GMF vector's rule under ``optimizer="adagrad"``)."""
    lr, eps = _hyper(param.dtype, lr, epsilon)
    accumulator += grad * grad
    param -= lr * grad / (np.sqrt(accumulator) + eps)


def row_adagrad_update(rows, grad, accumulator, lr, epsilon):
    """Row-wise Adagrad (DLRM / TorchRec) in place on the embedding rows ``rows`` (m, d), with one accumulator
    per row (m,): ``a += mean_j(G_j^2); E -= lr G / (sqrt(a) + eps)``."""
    lr, eps = _hyper(rows.dtype, lr, epsilon)
    accumulator += np.mean(grad * grad, axis=1)
    rows -= (lr / (np.sqrt(accumulator) + eps))[:, None] * grad


def _bag_rows(bags, q, dtype):
    """The bags of rows ``q`` (int array) of a bag table, as a CSR ``(indptr, ids int64, weights)``."""
    indptr, ids, weights = (np.asarray(a) for a in bags)
    indptr = indptr.astype(np.int64)
    sub_indptr, sub_ids, sub_w, _ = _take_rows("csr", (indptr, ids.astype(np.int64), weights.astype(dtype), 0),
                                               np.asarray(q, dtype=np.int64))
    return sub_indptr, sub_ids, sub_w


def _check_field_spec(spec, keys):
    """Shape and range checks with messages that name the problem (the oracle's subset of the core's)."""
    coefs, intercepts = spec["coefs"], spec["intercepts"]
    _check_layers(coefs, intercepts)
    if spec["loss"] not in FIELD_LOSSES:
        raise ValueError(f"loss must be one of {FIELD_LOSSES}, got {spec['loss']!r}")
    if coefs[-1].shape[1] != 1:
        raise ValueError("the MLP must end in one output")
    width = int(spec["width"])
    if coefs[0].shape[0] != width:
        raise ValueError(f"coefs[0] has {coefs[0].shape[0]} rows but the fields and dense blocks give {width} "
                         "input columns")
    n_keys = int(spec["n_keys"])
    if len(keys) != n_keys:
        raise ValueError(f"keys must hold {n_keys} columns, got {len(keys)}")
    keys = [np.asarray(k, dtype=np.int64) for k in keys]
    if len({len(k) for k in keys}) > 1:
        raise ValueError("all key columns must have the same length")
    for i, f in enumerate(spec["fields"]):
        V, d = f["table"].shape
        indptr, ids, _ = f["bags"]
        if not 0 <= f["key"] < n_keys:
            raise ValueError(f"field {i}: key column out of range")
        if f["offset"] >= 0 and f["offset"] + d > width:
            raise ValueError(f"field {i}: columns beyond the MLP input width")
        ids = np.asarray(ids)[: int(indptr[-1])]
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"field {i}: bag ids must lie in [0, {V})")
        k = keys[f["key"]]
        if k.size and (k.min() < 0 or k.max() >= len(indptr) - 1):
            raise ValueError(f"key column {f['key']} must hold values in [0, {len(indptr) - 1})")
    for b, blk in enumerate(spec["dense"]):
        if blk["offset"] < 0 or blk["offset"] + blk["table"].shape[1] > width:
            raise ValueError(f"dense block {b}: columns beyond the MLP input width")
        k = keys[blk["key"]]
        if k.size and (k.min() < 0 or k.max() >= blk["table"].shape[0]):
            raise ValueError(f"key column {blk['key']} must hold values in [0, {blk['table'].shape[0]})")
    gmf = spec.get("gmf")
    if gmf is not None:
        fu, fv = spec["fields"][gmf["field_u"]], spec["fields"][gmf["field_v"]]
        if fu["table"].shape[1] != fv["table"].shape[1]:
            raise ValueError("the two GMF fields must have the same dimension")
    return keys


def _field_forward(spec, keys, precision="float32"):
    """The forward pass of one batch (precision: as field_loss_and_gradients').

    Returns ``(x, hidden, z, pooled, bags)``: the MLP input x (n, width), the MLP's hidden activations, the
    logits z (n,) with the GMF term, the pooled vector of every field (n, d_f) and every field's batch bags
    (a CSR over its vocabulary: row r is the bag of example r).
    """
    dtype = spec["coefs"][0].dtype
    keys = _check_field_spec(spec, keys)
    n = len(keys[0])
    x = np.zeros((n, int(spec["width"])), dtype=dtype)
    pooled, bags = [], []
    for f in spec["fields"]:
        b = _bag_rows(f["bags"], keys[f["key"]], dtype)
        p = csr_matmul(*b, np.asarray(f["table"], dtype=dtype))
        if f["offset"] >= 0:
            x[:, f["offset"]:f["offset"] + p.shape[1]] = p
        pooled.append(p)
        bags.append(b)
    for blk in spec["dense"]:
        T = np.asarray(blk["table"], dtype=dtype)
        x[:, blk["offset"]:blk["offset"] + T.shape[1]] = T[keys[blk["key"]]]
    if precision == "bf16":
        hidden, Z = _forward_pass_bf16(spec["coefs"], spec["intercepts"], x, spec["activation"])
    else:
        hidden, Z = _forward_pass(spec["coefs"], spec["intercepts"], "dense", x, spec["activation"])
    z = Z[:, 0].copy()
    for f, p in zip(spec["fields"], pooled):  # wide fields: a (n, 1) pooled scalar added to the logit
        if f.get("wide"):
            z += p[:, 0]
    gmf = spec.get("gmf")
    if gmf is not None:
        z += (pooled[gmf["field_u"]] * pooled[gmf["field_v"]]) @ np.asarray(gmf["w"], dtype=dtype)
    return x, hidden, z, pooled, bags


def field_predict(spec, keys, n_threads=0, isa="auto"):
    """Predictions of the field model, shape (n,): ``sigmoid(z)`` for "bce", ``z`` for "mse"."""
    _, _, z, _, _ = _field_forward(spec, keys)
    return _activation(z, "logistic") if spec["loss"] == "bce" else z


def field_loss_and_gradients(spec, keys, y, weight, alpha, n_threads=0, isa="auto", precision="float32"):
    """Loss and gradients of the field model on all examples as one batch.

    precision "bf16" (the core's spec["precision"], cpp/mlp.h Network::bf16): the MLP's products of every layer
    with more than one output, A_l W_l, A_l^T D_l and D_l W_l^T, with both operands rounded to bf16
    (``_output_matmul``: their float32 values rounded by ``bf16_round``) and summed in float64; the rest as
    with "float32". Give a float64 copy of a float32 spec.

    Returns ``(loss, table_grads, gmf_grad, coef_grads, intercept_grads)``: ``table_grads[f]`` is dense
    (V_f, d_f), zero outside the rows the batch touches (ids stored in the bags read, weight 0 included);
    ``gmf_grad`` is None without a GMF term.  With n rows, per-row weights s (1 when ``weight`` is None) and
    ``dz = s (sigmoid(z) - y)`` ("bce") or ``s (z - y)`` ("mse"):

    * loss = sum(s (softplus(z) - y z)) / n or sum(s (z - y)^2) / (2n), plus
      ``0.5 alpha (sum ||W_l||^2 + ||gmf_w||^2) / n + 0.5 sum_f alpha_f (sum over touched rows
      ||E_f[id]||^2) / n`` (alpha_f: the field's own "alpha" when given, else alpha);
    * MLP: ``dW_l = (A_l^T D_l + alpha W_l) / n``, ``db_l = sum(D_l) / n`` with ``D_L = dz``;
    * GMF: ``(sum_r dz_r p_u(r) * p_v(r) + alpha w) / n``;
    * tables: ``G_f[id] = (sum_{r,j: id_rj = id} w_rj up_f[r] + alpha_f E_f[id]) / n`` where ``up_f`` is the
      gradient reaching the pooled vector: ``D_0 W_0^T`` on the field's columns of x, plus for a GMF field
      ``dz * w * (the other GMF field's pooled vector)``.
    """
    dtype = spec["coefs"][0].dtype
    coefs, act = spec["coefs"], spec["activation"]
    x, hidden, z, pooled, bags = _field_forward(spec, keys, precision)
    n = len(z)
    if n < 1:
        raise ValueError("need at least one example")
    y = np.asarray(y, dtype=dtype).reshape(-1)
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},), got {y.shape}")
    s = np.ones(n, dtype=dtype) if weight is None else np.asarray(weight, dtype=dtype).reshape(-1)
    if s.shape != (n,):
        raise ValueError(f"weight must have shape ({n},), got {s.shape}")
    (alpha_t,) = _hyper(dtype, alpha)
    n_t = dtype.type(n)

    if spec["loss"] == "bce":
        loss = _sum64(s * (_softplus(z) - y * z)) / n
        dz = s * (_activation(z, "logistic") - y)
    else:
        loss = 0.5 * _sum64(s * (z - y) ** 2) / n
        dz = s * (z - y)

    gmf = spec.get("gmf")
    gmf_grad = None
    upstream = [np.zeros_like(p) for p in pooled]
    if gmf is not None:
        w = np.asarray(gmf["w"], dtype=dtype)
        pu, pv = pooled[gmf["field_u"]], pooled[gmf["field_v"]]
        gmf_grad = (dz @ (pu * pv) + alpha_t * w) / n_t
        upstream[gmf["field_u"]] += dz[:, None] * w * pv
        upstream[gmf["field_v"]] += dz[:, None] * w * pu
        loss += 0.5 * alpha * _sum64(w * w) / n

    # The MLP, as in loss_and_gradients, with the 1/n applied at each gradient (D stays a sum over rows).
    L = len(coefs)
    coef_grads, intercept_grads = [None] * L, [None] * L
    D = dz[:, None]
    loss += 0.5 * alpha * sum(_sum64(W * W) for W in coefs) / n
    for l in range(L - 1, -1, -1):
        A = hidden[l - 1] if l > 0 else x
        bf16 = precision == "bf16" and coefs[l].shape[1] > 1
        coef_grads[l] = (_output_matmul(A.T, D, bf16) + alpha_t * coefs[l]) / n_t
        intercept_grads[l] = np.sum(D, axis=0) / n_t
        D_in = _output_matmul(D, coefs[l].T, bf16)
        D = D_in * activation_derivative(A, act) if l > 0 else D_in
    dx = D  # D_0 W_0^T, (n, width)

    table_grads = []
    for i, f in enumerate(spec["fields"]):
        E = np.asarray(f["table"], dtype=dtype)
        up = upstream[i]
        if f["offset"] >= 0:
            up = up + dx[:, f["offset"]:f["offset"] + E.shape[1]]
        if f.get("wide"):
            up = up + dz[:, None]
        touched = csr_touched_rows(bags[i][0], bags[i][1])
        G = np.zeros_like(E)
        # A field may carry its own L2 weight ("alpha" in its spec entry; negative or absent: the global one).
        alpha_f = f.get("alpha", -1.0)
        alpha_f = alpha if alpha_f is None or alpha_f < 0 else alpha_f
        (alpha_ft,) = _hyper(dtype, alpha_f)
        G[touched] = (csr_transpose_matmul(*bags[i], up, touched) + alpha_ft * E[touched]) / n_t
        loss += 0.5 * alpha_f * _sum64(E[touched] ** 2) / n
        table_grads.append(G)
    return loss, table_grads, gmf_grad, coef_grads, intercept_grads


def field_train_epoch(spec, keys, y, weight, order, batch_size, alpha, optimizer, learning_rate, momentum, nesterov,
                      beta_1, beta_2, epsilon, adam_t, sampler, epoch, n_threads=0, isa="auto"):
    """One epoch of the field model over the minibatches ``order[i:i+batch_size]``, updating ``spec`` in place.

    Update rules (``optimizer`` names the family for every parameter):

    * MLP weights/intercepts and the GMF vector: "sgd" = SGD with momentum/Nesterov (``sgd_update``),
      "adagrad" = element-wise Adagrad (``adagrad_update``), "adam" = Adam (``adam_update``); their state is
      ``spec["state1"]/["state2"]`` (2L arrays) and ``gmf["state1"]/["state2"]``.
    * embedding rows, only the rows the batch touches and only their state: "sgd" = plain ``E -= lr G``,
      "adagrad" = row-wise (``row_adagrad_update``, state1 of shape (V,)), "adam" = lazy Adam with the
      global step count (state1/state2 of shape (V, d)).

    Negative sampling draws from the core's ``splitmix64`` streams, which this oracle does not reproduce:
    a sampler with ``negatives > 0`` raises NotImplementedError (the tests check sampling by its properties).
    Returns ``(loss_sum, adam_t, rows)``: ``sum(batch_loss * batch_rows)`` (losses before each step), the
    new Adam step count and the number of rows trained on.
    """
    if optimizer not in FIELD_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {FIELD_OPTIMIZERS}, got {optimizer!r}")
    if sampler is not None and sampler.get("negatives", 0) > 0:
        raise NotImplementedError("the oracle does not reproduce the core's negative sampling (negatives > 0)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    coefs, intercepts = spec["coefs"], spec["intercepts"]
    L = len(coefs)
    params = list(coefs) + list(intercepts)
    state1, state2 = spec["state1"], spec["state2"]
    if len(state1) != 2 * L or len(state2) != (2 * L if optimizer == "adam" else 0):
        raise ValueError(f"state1/state2 must hold {2 * L}/{2 * L if optimizer == 'adam' else 0} arrays")
    for i, f in enumerate(spec["fields"]):
        if optimizer != "sgd" and f.get("state1") is None:
            raise ValueError(f"every field needs state1 for optimizer {optimizer!r} (field {i})")
        if optimizer == "adam" and f.get("state2") is None:
            raise ValueError(f"every field needs state2 for 'adam' (field {i})")
    gmf = spec.get("gmf")
    if gmf is not None and (gmf.get("state1") is None or (optimizer == "adam" and gmf.get("state2") is None)):
        raise ValueError(f"gmf needs state1 (and state2 for 'adam') for optimizer {optimizer!r}")
    keys = [np.asarray(k, dtype=np.int64) for k in keys]
    order = np.asarray(order, dtype=np.int64)
    y = np.asarray(y)
    lr = learning_rate

    def dense_step(p, g, s1, s2):
        if optimizer == "sgd":
            sgd_update(p, g, s1, lr, momentum, nesterov)
        elif optimizer == "adagrad":
            adagrad_update(p, g, s1, lr, epsilon)
        else:
            adam_update(p, g, s1, s2, adam_t, lr, beta_1, beta_2, epsilon)

    loss_sum, rows = 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch_keys = [k[idx] for k in keys]
        loss, table_grads, gmf_grad, coef_grads, intercept_grads = field_loss_and_gradients(
            spec, batch_keys, y[idx], None if weight is None else np.asarray(weight)[idx], alpha)
        loss_sum += loss * len(idx)
        rows += len(idx)
        if optimizer == "adam":
            adam_t += 1
        # Which rows each field touches, before any table changes.
        touched = []
        for f in spec["fields"]:
            b = _bag_rows(f["bags"], batch_keys[f["key"]], f["table"].dtype)
            touched.append(csr_touched_rows(b[0], b[1]))
        for i, (p, g) in enumerate(zip(params, list(coef_grads) + list(intercept_grads))):
            dense_step(p, g, state1[i], state2[i] if optimizer == "adam" else None)
        if gmf is not None:
            dense_step(gmf["w"], gmf_grad, gmf["state1"], gmf.get("state2") if optimizer == "adam" else None)
        for f, G, rows_f in zip(spec["fields"], table_grads, touched):
            E = f["table"]
            sub_E, sub_G = E[rows_f], G[rows_f]
            if optimizer == "sgd":
                (lr_t,) = _hyper(E.dtype, lr)
                sub_E -= lr_t * sub_G
            elif optimizer == "adagrad":
                acc = f["state1"].reshape(-1)
                sub_a = acc[rows_f]
                row_adagrad_update(sub_E, sub_G, sub_a, lr, epsilon)
                acc[rows_f] = sub_a
            else:
                m, s = f["state1"].reshape(E.shape), f["state2"].reshape(E.shape)
                sub_m, sub_s = m[rows_f], s[rows_f]
                adam_update(sub_E, sub_G, sub_m, sub_s, adam_t, lr, beta_1, beta_2, epsilon)
                m[rows_f], s[rows_f] = sub_m, sub_s
            E[rows_f] = sub_E
    return loss_sum, adam_t, rows


def field_topk(spec, sampler, users, candidates, k, exclude_seen, n_threads=0, isa="auto"):
    """Brute-force top-k: ``field_predict`` over every (user, candidate) pair, best first, ties to the lower
    item index (a stable sort of the negated scores over candidates in increasing item order), seen items
    skipped when ``exclude_seen``; -1 / -inf padding.  Returns ``(items int32 (n_users, k), scores (n_users, k))``
    with scores in the spec's dtype."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dtype = spec["coefs"][0].dtype
    n_items = int(sampler["n_items"])
    cand = np.arange(n_items) if candidates is None else np.sort(np.asarray(candidates, dtype=np.int64))
    users = np.asarray(users, dtype=np.int64)
    seen = sampler.get("seen")
    items_out = np.full((len(users), k), -1, dtype=np.int32)
    scores_out = np.full((len(users), k), -np.inf, dtype=dtype)
    for row, u in enumerate(users):
        c = cand
        if exclude_seen and seen is not None:
            c = np.setdiff1d(c, np.asarray(seen[1])[int(seen[0][u]):int(seen[0][u + 1])])
        if len(c) == 0:
            continue
        keys = [np.zeros(len(c), dtype=np.int32) for _ in range(int(spec["n_keys"]))]
        keys[sampler["user_key"]][:] = u
        keys[sampler["item_key"]][:] = c
        scores = field_predict(spec, keys)
        best = np.argsort(-scores, kind="stable")[:k]
        items_out[row, :len(best)] = c[best]
        scores_out[row, :len(best)] = scores[best]
    return items_out, scores_out


TOPK_PROXY_SAMPLE = 4096
TOPK_PROXY_SEED = 0x7F4A7C15B5AD4ECE
TOPK_PROXY_RIDGE = 1e-4


def field_topk_proxy(spec, sampler, user, candidates=None):
    """The approximate top-k's first stage for one user (cpp/fields.h field_topk, approx_fraction), in float64
    apart from the bf16 rounding of the cached first layer's item side.

    The sample: the first TOPK_PROXY_SAMPLE outputs of splitmix64 from TOPK_PROXY_SEED modulo the number of
    candidates n, as positions (sorted, each once; every position when n <= TOPK_PROXY_SAMPLE). Its best
    quarter by exact score (ties to the lower position) is the fit set; the features are
    ``act(bf16(item part of layer 0) + user part of layer 0)``, the target the MLP's output; least squares on
    the centred features and targets with a ridge of TOPK_PROXY_RIDGE times the mean feature variance (the
    trace of the centred Gram matrix over its size). Proxy = features @ a + intercept + the GMF and wide terms.
    Returns ``(sample items, a (fan_out(0),), proxy (n,))``.
    """
    spec = float64_copy(spec)
    n_items = int(sampler["n_items"])
    cand = np.arange(n_items) if candidates is None else np.asarray(candidates, dtype=np.int64)
    n = len(cand)
    keys = [np.zeros(n, dtype=np.int32) for _ in range(int(spec["n_keys"]))]
    keys[sampler["user_key"]][:] = user
    keys[sampler["item_key"]][:] = cand
    x, _, z, _, _ = _field_forward(spec, keys)
    item_cols = np.zeros(x.shape[1], dtype=bool)
    for f in spec["fields"]:
        if f["key"] == sampler["item_key"] and f["offset"] >= 0:
            item_cols[f["offset"]:f["offset"] + f["table"].shape[1]] = True
    for blk in spec["dense"]:
        if blk["key"] == sampler["item_key"]:
            item_cols[blk["offset"]:blk["offset"] + blk["table"].shape[1]] = True
    W0, b0 = spec["coefs"][0], spec["intercepts"][0]
    item_part = x[:, item_cols] @ W0[item_cols]
    user_part = x[0, ~item_cols] @ W0[~item_cols] + b0
    act = spec["activation"]
    features = _activation(bf16_round(item_part.astype(np.float32)).astype(np.float64) + user_part, act)
    _, out = _forward_pass(spec["coefs"][1:], spec["intercepts"][1:], "dense", _activation(item_part + user_part, act),
                           act)
    mlp = out[:, 0]
    side = z - mlp  # the GMF and wide terms
    if n <= TOPK_PROXY_SAMPLE:
        pos = np.arange(n)
    else:
        pos = np.unique(splitmix64_outputs(np.uint64(TOPK_PROXY_SEED), TOPK_PROXY_SAMPLE) % np.uint64(n))
        pos = pos.astype(np.int64)
    q = max(1, len(pos) // 4)
    best = pos[np.lexsort((pos, -z[pos]))[:q]]
    F, y = features[best], mlp[best]
    mean, y_mean = F.mean(axis=0), y.mean()
    Fc = F - mean
    G = Fc.T @ Fc
    G[np.diag_indices_from(G)] += TOPK_PROXY_RIDGE * np.trace(G) / G.shape[0] + np.finfo(np.float64).tiny
    a = np.linalg.solve(G, Fc.T @ (y - y_mean))
    proxy = features @ a + (y_mean - mean @ a) + side
    return np.sort(cand[pos]).astype(np.int32), a, proxy


# ----------------------------------------------------------------------------------------------------------
# The two-tower model (docs/DESIGN.md, "The two-tower model")
# ----------------------------------------------------------------------------------------------------------


def _tower_forward(spec, keys):
    """A tower's forward pass over key values ``keys``: ``(x, hidden, out, bags)``, out (n, dim)."""
    dtype = spec["coefs"][0].dtype
    if spec["loss"] != "tower" or spec.get("gmf") is not None:
        raise ValueError("a tower spec has loss 'tower' and no GMF term")
    keys = np.asarray(keys, dtype=np.int64)
    n = len(keys)
    x = np.zeros((n, int(spec["width"])), dtype=dtype)
    bags = []
    for f in spec["fields"]:
        b = _bag_rows(f["bags"], keys, dtype)
        x[:, f["offset"]:f["offset"] + f["table"].shape[1]] = csr_matmul(*b, np.asarray(f["table"], dtype=dtype))
        bags.append(b)
    for blk in spec["dense"]:
        T = np.asarray(blk["table"], dtype=dtype)
        x[:, blk["offset"]:blk["offset"] + T.shape[1]] = T[keys]
    hidden, out = _forward_pass(spec["coefs"], spec["intercepts"], "dense", x, spec["activation"])
    return x, hidden, out, bags


def _tower_backward(spec, x, hidden, bags, D, alpha, denominator):
    """Gradients of a tower from ``D`` = dLoss/d(output) times ``denominator``; L2 terms divided by it.

    Returns ``(l2_loss, table_grads, coef_grads, intercept_grads)`` (tables dense, zero outside touched rows).
    """
    dtype = spec["coefs"][0].dtype
    coefs, act = spec["coefs"], spec["activation"]
    (alpha_t,) = _hyper(dtype, alpha)
    n_t = dtype.type(denominator)
    loss = 0.5 * alpha * sum(_sum64(W * W) for W in coefs) / denominator
    L = len(coefs)
    coef_grads, intercept_grads = [None] * L, [None] * L
    for l in range(L - 1, -1, -1):
        A = hidden[l - 1] if l > 0 else x
        coef_grads[l] = (A.T @ D + alpha_t * coefs[l]) / n_t
        intercept_grads[l] = np.sum(D, axis=0) / n_t
        D_in = D @ coefs[l].T
        D = D_in * activation_derivative(A, act) if l > 0 else D_in
    table_grads = []
    for f, b in zip(spec["fields"], bags):
        E = np.asarray(f["table"], dtype=dtype)
        up = D[:, f["offset"]:f["offset"] + E.shape[1]]
        touched = csr_touched_rows(b[0], b[1])
        alpha_f = f.get("alpha", -1.0)
        alpha_f = alpha if alpha_f is None or alpha_f < 0 else alpha_f
        (alpha_ft,) = _hyper(dtype, alpha_f)
        G = np.zeros_like(E)
        G[touched] = (csr_transpose_matmul(*b, up, touched) + alpha_ft * E[touched]) / n_t
        loss += 0.5 * alpha_f * _sum64(E[touched] ** 2) / denominator
        table_grads.append(G)
    return loss, table_grads, coef_grads, intercept_grads


def _normalized(out, normalize):
    """Rows divided by their norms (at least 1e-12) when ``normalize``, and the norms."""
    if not normalize:
        return out, None
    norms = np.maximum(np.sqrt(np.sum(out * out, axis=1)), out.dtype.type(1e-12))
    return out / norms[:, None], norms


def two_tower_vectors(user_spec, item_spec, normalize, temperature, user_side, keys, scale=1.0):
    """Tower vectors of ``keys`` (normalised when ``normalize``) times ``scale``: (n, dim)."""
    _, _, out, _ = _tower_forward(user_spec if user_side else item_spec, keys)
    vec, _ = _normalized(out, normalize)
    return vec * out.dtype.type(scale)


def two_tower_loss_and_gradients(user_spec, item_spec, normalize, temperature, users, items, y, weight, training,
                                 negatives, alpha):
    """Loss and gradients of the two-tower model on all pairs as one batch.

    ``training``: {"loss": "softmax" | "bpr" | "bce" | "mse", "negatives": int, "item_prob": None or
    (n_items,), "n_items": int}; ``negatives``: the m extra items (softmax) or n x negatives items (bpr,
    bce, row-major). With u_r, v_c the (normalised) vectors, s = <u_r, v_c> / temperature, w_r the
    sample weights (1 when ``weight`` is None), n positives:

    * softmax: candidates are the batch's items then the extra ones; logit z_rc = s_rc - log(n q_c + m /
      n_items) with the item_prob q (no correction when None); candidates c != r holding item_r are left out;
      loss = sum_r w_r (logsumexp_c z_rc - z_rr) / n;
    * bpr: loss = sum_{r,j} w_r softplus(s_rj - s_rr) / (n k), k negatives per positive;
    * bce: loss = (sum_r w_r softplus(-s_rr) + sum_{r,j} softplus(s_rj)) / (n (1 + k));
    * mse: loss = sum_r w_r (s_rr - y_r)^2 / (2 n);

    plus each tower's L2 terms over n (``_tower_backward``). Returns ``(loss, (tables, coefs, intercepts)
    of the user tower, the same of the item tower)``.
    """
    dtype = user_spec["coefs"][0].dtype
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    negatives = np.asarray(negatives, dtype=np.int64)
    n = len(users)
    w = np.ones(n, dtype) if weight is None else np.asarray(weight, dtype)
    kind, k = training["loss"], int(training["negatives"])
    keys_v = np.concatenate([items, negatives])
    xu, hu, out_u, bu = _tower_forward(user_spec, users)
    xv, hv, out_v, bv = _tower_forward(item_spec, keys_v)
    U, nu = _normalized(out_u, normalize)
    V, nv = _normalized(out_v, normalize)
    inv_t = dtype.type(1.0 / temperature)
    dU, dV = np.zeros_like(U), np.zeros_like(V)  # dLoss/d(U, V) times n
    if kind == "softmax":
        Z = (U @ V.T) * inv_t
        q = training.get("item_prob")
        if q is not None:
            extra = len(negatives) / float(training["n_items"])
            Z = Z - np.log(np.maximum(n * np.asarray(q, np.float64)[keys_v] + extra, 1e-30)).astype(dtype)
        hits = (keys_v[None, :] == items[:, None]) & ~np.eye(n, len(keys_v), dtype=bool)
        Z = np.where(hits, -np.inf, Z)
        zmax = Z.max(axis=1, keepdims=True)
        E = np.exp(Z - zmax)
        P = E / E.sum(axis=1, keepdims=True)
        lse = np.log(E.sum(axis=1)) + zmax[:, 0]
        loss = _sum64(w * (lse - Z[np.arange(n), np.arange(n)])) / n
        G = w[:, None] * (P - np.eye(n, len(keys_v), dtype=dtype)) * inv_t
        dU, dV = G @ V, G.T @ U
    elif kind in ("bpr", "bce"):
        neg = np.arange(n * k).reshape(n, k) + n  # rows of V holding each positive's negatives
        s_pos = np.sum(U * V[:n], axis=1) * inv_t
        s_neg = np.einsum("rd,rjd->rj", U, V[neg]) * inv_t
        if kind == "bpr":
            x = s_pos[:, None] - s_neg
            loss = _sum64(w[:, None] * _softplus(-x)) / (n * k)
            g = -w[:, None] * _activation(-x, "logistic") / dtype.type(k) * inv_t  # dLoss/dx * n
            dU = np.sum(g[:, :, None] * (V[:n][:, None, :] - V[neg]), axis=1)
            dV[:n] = np.sum(g, axis=1)[:, None] * U
            dV[n:] = (-g[:, :, None] * U[:, None, :]).reshape(n * k, -1)
        else:
            loss = (_sum64(w * _softplus(-s_pos)) + _sum64(_softplus(s_neg))) / (n * (1 + k))
            g_pos = w * (_activation(s_pos, "logistic") - 1) / dtype.type(1 + k) * inv_t
            g_neg = _activation(s_neg, "logistic") / dtype.type(1 + k) * inv_t
            dU = g_pos[:, None] * V[:n] + np.einsum("rj,rjd->rd", g_neg, V[neg])
            dV[:n] = g_pos[:, None] * U
            dV[n:] = (g_neg[:, :, None] * U[:, None, :]).reshape(n * k, -1)
    elif kind == "mse":
        y = np.asarray(y, dtype)
        e = np.sum(U * V, axis=1) * inv_t - y
        loss = 0.5 * _sum64(w * e * e) / n
        dU = (w * e * inv_t)[:, None] * V
        dV = (w * e * inv_t)[:, None] * U
    else:
        raise ValueError(f"unknown loss {kind!r}")

    def through_norm(vec, norms, g):
        if norms is None:
            return g
        return (g - vec * np.sum(vec * g, axis=1, keepdims=True)) / norms[:, None]

    lu, *grads_u = _tower_backward(user_spec, xu, hu, bu, through_norm(U, nu, dU), alpha, n)
    lv, *grads_v = _tower_backward(item_spec, xv, hv, bv, through_norm(V, nv, dV), alpha, n)
    return loss + lu + lv, tuple(grads_u), tuple(grads_v)


# ----------------------------------------------------------------------------------------------------------
# The sequential model (docs/DESIGN.md, "Sequential model (issue 13)")
# ----------------------------------------------------------------------------------------------------------

SEQ_BLOCK_KEYS = ("ln1_gamma", "ln1_beta", "Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo",
                  "ln2_gamma", "ln2_beta", "W1", "b1", "W2", "b2")
LAYER_NORM_EPS = 1e-5
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64_outputs(state, count):
    """The first ``count`` outputs of the core's ``splitmix64`` stream seeded with ``state`` (uint64 array).

    Output e is the finaliser of ``state + (e + 1) * golden``, so any element can be drawn on its own: the
    core's dropout uses this to draw the same masks whatever thread handles a row.
    """
    with np.errstate(over="ignore"):
        z = np.uint64(state) + (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def dropout_scale(stream, site, shape, rate, dtype=np.float32):
    """The dropout multiplier of dropout site ``site`` in the batch whose stream seed is ``stream``.

    Site s draws from the splitmix64 stream seeded with ``splitmix64_outputs(stream + s, 1)[0]``; element e
    (row-major over ``shape``) is kept when the top 24 bits of output e are ``>= floor(rate * 2**24)`` and
    kept elements are scaled by ``1 / (1 - rate)`` (inverted dropout). Returns an array of ``shape``.
    """
    n = int(np.prod(shape))
    if rate <= 0.0:
        return np.ones(shape, dtype)
    with np.errstate(over="ignore"):
        key = splitmix64_outputs(np.uint64(stream) + np.uint64(site), 1)[0]
    bits = splitmix64_outputs(key, n) >> np.uint64(40)
    keep = bits >= np.uint64(int(rate * (1 << 24)))
    dtype = np.dtype(dtype)
    return (keep.astype(dtype) / dtype.type(1.0 - rate)).reshape(shape)


def layer_norm(x, gamma, beta):
    """``(x - mean) / sqrt(var + eps) * gamma + beta`` over the last axis (population variance), and the
    cache ``(xhat, rstd)`` that ``layer_norm_backward`` needs."""
    dtype = x.dtype
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
    rstd = dtype.type(1.0) / np.sqrt(var + dtype.type(LAYER_NORM_EPS))
    xhat = (x - mu) * rstd
    return xhat * gamma + beta, (xhat, rstd)


def layer_norm_backward(dy, gamma, cache):
    """``(dx, dgamma, dbeta)`` of ``layer_norm`` from ``dy``; the parameter gradients summed over rows."""
    xhat, rstd = cache
    g = dy * gamma
    dx = rstd * (g - np.mean(g, axis=-1, keepdims=True) - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
    axes = tuple(range(dy.ndim - 1))
    return dx, np.sum(dy * xhat, axis=axes), np.sum(dy, axis=axes)


def causal_attention(q, k, v, mask, heads):
    """Masked multi-head attention over batches of sequences: q, k, v (B, L, d), mask (B, L) bool.

    Head h uses channels ``h*dh:(h+1)*dh`` (dh = d / heads). Position t of a sequence attends to the
    positions j <= t with ``mask[j]``; its weights are the softmax of ``q_t . k_j / sqrt(dh)`` over them
    (a row with no such j, a padding position before the first event, gets zero weights). Returns the
    output (B, L, d) and the weights (B, heads, L, L).
    """
    B, L, d = q.shape
    dh = d // heads
    dtype = q.dtype
    allowed = np.tril(np.ones((L, L), dtype=bool))[None, :, :] & mask[:, None, :]
    out = np.zeros_like(q)
    weights = np.zeros((B, heads, L, L), dtype)
    scale = dtype.type(1.0 / math.sqrt(dh))
    for h in range(heads):
        c = slice(h * dh, (h + 1) * dh)
        S = np.einsum("btc,bjc->btj", q[:, :, c], k[:, :, c]) * scale
        S = np.where(allowed, S, -np.inf)
        smax = np.max(S, axis=-1, keepdims=True)
        smax = np.where(np.isfinite(smax), smax, dtype.type(0))
        Ex = np.where(allowed, np.exp(S - smax), dtype.type(0))
        den = np.sum(Ex, axis=-1, keepdims=True)
        A = np.where(den > 0, Ex / np.where(den > 0, den, 1), dtype.type(0)).astype(dtype)
        weights[:, h] = A
        out[:, :, c] = np.einsum("btj,bjc->btc", A, v[:, :, c])
    return out, weights


def causal_attention_backward(dout, q, k, v, weights, heads):
    """``(dq, dk, dv)`` of ``causal_attention`` from its output gradient and weights."""
    d = q.shape[-1]
    dh = d // heads
    scale = q.dtype.type(1.0 / math.sqrt(dh))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for h in range(heads):
        c = slice(h * dh, (h + 1) * dh)
        A = weights[:, h]
        dv[:, :, c] = np.einsum("btj,btc->bjc", A, dout[:, :, c])
        dA = np.einsum("btc,bjc->btj", dout[:, :, c], v[:, :, c])
        dS = A * (dA - np.sum(dA * A, axis=-1, keepdims=True)) * scale
        dq[:, :, c] = np.einsum("btj,bjc->btc", dS, k[:, :, c])
        dk[:, :, c] = np.einsum("btj,btc->bjc", dS, q[:, :, c])
    return dq, dk, dv


def _seq_dtype(params):
    return np.asarray(params["item_table"]).dtype


def _seq_bf16(x, bf16):
    """An operand of a projection or feed-forward product: precision "bf16" rounds it to bfloat16 (from its
    float32 value, as the core rounds its float32 arrays), kept in x's dtype; "float32": x."""
    if not bf16:
        return x
    return bf16_round(np.asarray(x, np.float32)).astype(np.asarray(x).dtype)


def _seq_forward(params, seqs, dropout, stream, precision="float32"):
    """Forward pass with its caches. seqs (B, L) item rows, -1 = padding (left-padded histories).
    precision "bf16": the projection and feed-forward products take bf16-rounded operands (``_seq_bf16``)."""
    r = lambda x: _seq_bf16(x, precision == "bf16")  # noqa: E731
    E = params["item_table"]
    P = params["position_table"]
    dtype = E.dtype
    seqs = np.asarray(seqs, dtype=np.int64)
    B, L = seqs.shape
    d = E.shape[1]
    if P.shape[0] != L:
        raise ValueError(f"seqs: length {L} differs from the position table's {P.shape[0]}")
    mask = seqs >= 0
    m = mask[:, :, None].astype(dtype)
    x = (E[np.where(mask, seqs, 0)] * dtype.type(math.sqrt(d)) + P[None]) * m
    drop0 = dropout_scale(stream, 0, x.shape, dropout, dtype)
    x = x * drop0
    caches = []
    for b, blk in enumerate(params["blocks"]):
        x_in = x
        h, ln1 = layer_norm(x, blk["ln1_gamma"], blk["ln1_beta"])
        q = r(h) @ r(blk["Wq"]) + blk["bq"]
        k = r(h) @ r(blk["Wk"]) + blk["bk"]
        v = r(h) @ r(blk["Wv"]) + blk["bv"]
        o, A = causal_attention(q, k, v, mask, int(params["heads"]))
        da = dropout_scale(stream, 1 + 2 * b, x.shape, dropout, dtype)
        a = (r(o) @ r(blk["Wo"]) + blk["bo"]) * da
        x_mid = x + a
        h2, ln2 = layer_norm(x_mid, blk["ln2_gamma"], blk["ln2_beta"])
        u = np.maximum(r(h2) @ r(blk["W1"]) + blk["b1"], dtype.type(0))
        df = dropout_scale(stream, 2 + 2 * b, x.shape, dropout, dtype)
        f = (r(u) @ r(blk["W2"]) + blk["b2"]) * df
        x = (x_mid + f) * m
        caches.append((x_in, h, ln1, q, k, v, o, A, da, x_mid, h2, ln2, u, df))
    z, lnf = layer_norm(x, params["final_gamma"], params["final_beta"])
    return z, (seqs, mask, m, drop0, caches, lnf)


def sequential_forward(params, seqs, n_threads=0, isa="auto"):
    """Hidden states z (B, L, d) of the sequential model for item-row sequences ``seqs`` (B, L), -1 padding.

    ``params``: {"item_table" (n_items, d), "position_table" (L, d), "heads": int, "blocks": [per block the
    arrays named in ``SEQ_BLOCK_KEYS``: ln gammas/betas (d,), Wq/Wk/Wv/Wo (d, d), their biases (d,), W1
    (d, f), b1 (f,), W2 (f, d), b2 (d,)], "final_gamma", "final_beta" (d,)}. With m_t = 1 at events, 0 at
    padding: x = m (E[s] sqrt(d) + P); each block (pre-norm) does x += attn(LN1(x)) Wo + bo (``causal_attention``
    on LN1(x) Wq + bq, ... Wk, ... Wv), then x = m (x + relu(LN2(x) W1 + b1) W2 + b2); z = LN_final(x).
    The score of item i after position t is ``z[t] . E[i]``.
    """
    z, _ = _seq_forward(params, seqs, 0.0, 0)
    return z


def sequential_loss_and_gradients(params, seqs, targets, negatives, dropout=0.0, stream=0, n_threads=0,
                                  isa="auto", log_q=None, precision="float32"):
    """Loss of next-item prediction and the gradients of every parameter: BCE over sampled negatives
    (SASRec's), or, with ``negatives=None``, sampled softmax over the batch's targets.

    ``targets`` (B, L): the item row that follows each position (-1: no target, e.g. padding);
    ``negatives`` (B, L, K): K sampled item rows per position. Over the N positions with a target,
    loss = sum_t [softplus(-z_t . E[y_t]) + sum_j softplus(z_t . E[n_tj])] / N. Dropout (rate ``dropout``)
    multiplies the embedding sum (site 0), each block's attention output (site 1 + 2b) and feed-forward
    output (site 2 + 2b) by ``dropout_scale(stream, site, (B, L, d), dropout)``.

    Softmax (``negatives`` None): the candidates are the distinct target items of the batch, C; logit
    ``s_tc = z_t . E[c] - log_q[c]`` (``log_q`` (n_items,): the log-Q correction of the two-tower model,
    log of each item's expected count among the candidates; None: no correction);
    loss = sum_t [logsumexp_c s_tc - s_t,y_t] / N. Each position's own target is its positive; the other
    positions' targets are its negatives (distinct candidates: no accidental hit can repeat the positive).

    ``precision="bf16"`` (the core's ``SequentialModel(precision="bf16")`` in training): every projection and
    feed-forward product, forward (h Wq, h Wk, h Wv, o Wo, h2 W1, u W2) and both backward products of each
    (weight gradient, input gradient), takes its two operands rounded to bfloat16 (``bf16_round`` of their
    float32 values) and sums in the working dtype; everything else as "float32".

    Returns ``(loss, grads)`` with grads shaped like params ("item_table" dense, zero outside touched rows).
    """
    if precision not in ("float32", "bf16"):
        raise ValueError(f"precision must be 'float32' or 'bf16', got {precision!r}")
    r = lambda x: _seq_bf16(x, precision == "bf16")  # noqa: E731
    E = params["item_table"]
    dtype = E.dtype
    d = E.shape[1]
    z, (seqs, mask, m, drop0, caches, lnf) = _seq_forward(params, seqs, dropout, stream, precision)
    targets = np.asarray(targets, dtype=np.int64)
    softmax = negatives is None
    if not softmax:
        negatives = np.asarray(negatives, dtype=np.int64)
        if negatives.ndim != 3 or negatives.shape[:2] != targets.shape:
            raise ValueError("negatives must be (B, L, K) for targets (B, L)")
    if targets.shape != seqs.shape:
        raise ValueError("targets must be (B, L) like seqs")
    active = targets >= 0
    N = int(np.count_nonzero(active))
    gE = np.zeros_like(E)
    dz = np.zeros_like(z)
    loss = 0.0
    if N and softmax:
        bi, ti = np.nonzero(active)
        zt = z[bi, ti]
        y = targets[bi, ti]
        cand, pos = np.unique(y, return_inverse=True)
        S = zt @ E[cand].T
        if log_q is not None:
            S = S - np.asarray(log_q, dtype)[cand]
        smax = S.max(axis=1, keepdims=True)
        ex = np.exp(S - smax)
        P = ex / ex.sum(axis=1, keepdims=True)
        rows = np.arange(N)
        loss = _sum64(np.log(ex.sum(axis=1)) + smax[:, 0] - S[rows, pos.ravel()]) / N
        G = P
        G[rows, pos.ravel()] -= dtype.type(1)
        G = G / dtype.type(N)
        dz[bi, ti] = G @ E[cand]
        gE[cand] += G.T @ zt
    elif N:
        bi, ti = np.nonzero(active)
        zt = z[bi, ti]
        y = targets[bi, ti]
        neg = negatives[bi, ti]
        s_pos = np.sum(zt * E[y], axis=1)
        s_neg = np.einsum("rd,rkd->rk", zt, E[neg])
        loss = (_sum64(_softplus(-s_pos)) + _sum64(_softplus(s_neg))) / N
        g_pos = (activation(s_pos, "logistic") - dtype.type(1)) / dtype.type(N)
        g_neg = activation(s_neg, "logistic") / dtype.type(N)
        dz[bi, ti] = g_pos[:, None] * E[y] + np.einsum("rk,rkd->rd", g_neg, E[neg])
        np.add.at(gE, y, g_pos[:, None] * zt)
        np.add.at(gE, neg.reshape(-1), (g_neg[:, :, None] * zt[:, None, :]).reshape(-1, d))
    grads = {"blocks": []}
    dx, grads["final_gamma"], grads["final_beta"] = layer_norm_backward(dz, params["final_gamma"], lnf)
    heads = int(params["heads"])
    for b in range(len(params["blocks"]) - 1, -1, -1):
        blk = params["blocks"][b]
        x_in, h, ln1, q, k, v, o, A, da, x_mid, h2, ln2, u, df = caches[b]
        g = {}
        dx = dx * m
        dfo = dx * df
        g["W2"] = np.einsum("btf,btd->fd", r(u), r(dfo))
        g["b2"] = np.sum(dfo, axis=(0, 1))
        du = (r(dfo) @ r(blk["W2"]).T) * (u > 0)
        g["W1"] = np.einsum("btd,btf->df", r(h2), r(du))
        g["b1"] = np.sum(du, axis=(0, 1))
        dh2 = r(du) @ r(blk["W1"]).T
        dln2, g["ln2_gamma"], g["ln2_beta"] = layer_norm_backward(dh2, blk["ln2_gamma"], ln2)
        dx = dx + dln2  # dLoss/dx_mid
        dao = dx * da
        g["Wo"] = np.einsum("btc,btd->cd", r(o), r(dao))
        g["bo"] = np.sum(dao, axis=(0, 1))
        do = r(dao) @ r(blk["Wo"]).T
        dq, dk, dv = causal_attention_backward(do, q, k, v, A, heads)
        dh = np.zeros_like(h)
        for name, dp in (("q", dq), ("k", dk), ("v", dv)):
            g["W" + name] = np.einsum("btc,btd->cd", r(h), r(dp))
            g["b" + name] = np.sum(dp, axis=(0, 1))
            dh = dh + r(dp) @ r(blk["W" + name]).T
        dln1, g["ln1_gamma"], g["ln1_beta"] = layer_norm_backward(dh, blk["ln1_gamma"], ln1)
        dx = dx + dln1  # dLoss/dx_in
        grads["blocks"].insert(0, g)
    dx0 = dx * drop0 * m
    grads["position_table"] = np.sum(dx0, axis=0)
    rows = np.where(mask, seqs, 0)
    np.add.at(gE, rows[mask], dx0[mask] * dtype.type(math.sqrt(d)))
    grads["item_table"] = gE
    return loss, grads


# ----------------------------------------------------------------------------------------------------------
# The sequential model's item side features (docs/DESIGN.md, "Sequential model", "Item side features")
# ----------------------------------------------------------------------------------------------------------

def sequential_item_vectors(params):
    """The item vectors (n_items, d) the sequential model reads, for input tokens and for scoring.

    Without item features (no "feature_table" in ``params``) they are ``params["item_table"]``. With them,
    ``params["feature_table"]`` F (n_features, d) and ``params["item_features"]`` = (indptr, ids, weights,
    id_trained): item i's vector is ``E[i] + sum_k weights[k] F[ids[k]]`` over k in [indptr[i], indptr[i+1]).
    """
    E = params["item_table"]
    if "feature_table" not in params:
        return E
    indptr, ids, weights, _ = params["item_features"]
    F = params["feature_table"]
    dtype = E.dtype
    rows = np.repeat(np.arange(E.shape[0]), np.diff(np.asarray(indptr)))
    V = E.copy()
    np.add.at(V, rows, np.asarray(weights, dtype)[:, None] * F[np.asarray(ids, np.int64)])
    return V


def _with_item_vectors(params):
    """params with the item table replaced by the composite item vectors (the model the core computes)."""
    out = {k: v for k, v in params.items() if k not in ("feature_table", "item_features")}
    out["item_table"] = sequential_item_vectors(params)
    return out


def sequential_features_forward(params, seqs, n_threads=0, isa="auto"):
    """``sequential_forward`` with item side features: the model reads ``sequential_item_vectors(params)``
    wherever it reads the item table."""
    return sequential_forward(_with_item_vectors(params), seqs)


def sequential_features_loss_and_gradients(params, seqs, targets, negatives, dropout=0.0, stream=0, n_threads=0,
                                           isa="auto", log_q=None):
    """``sequential_loss_and_gradients`` with item side features. With dV the gradient of the item vectors
    (the plain model's item-table gradient over ``sequential_item_vectors``): the item table's gradient is
    ``dV[i] * id_trained[i]`` (rows of items known only by their features are not trained; id_trained None:
    all are) and the feature table's is ``dF[f] = sum over entries k with ids[k] = f of weights[k] dV[row(k)]``.
    Returns ``(loss, grads)`` with grads["feature_table"] added when params has item features.
    """
    loss, grads = sequential_loss_and_gradients(_with_item_vectors(params), seqs, targets, negatives, dropout,
                                                stream, log_q=log_q)
    if "feature_table" not in params:
        return loss, grads
    indptr, ids, weights, id_trained = params["item_features"]
    dV = grads["item_table"]
    rows = np.repeat(np.arange(dV.shape[0]), np.diff(np.asarray(indptr)))
    gF = np.zeros_like(params["feature_table"])
    np.add.at(gF, np.asarray(ids, np.int64), np.asarray(weights, dV.dtype)[:, None] * dV[rows])
    if id_trained is not None:
        grads["item_table"] = dV * (np.asarray(id_trained) != 0)[:, None].astype(dV.dtype)
    grads["feature_table"] = gF
    return loss, grads


# ----------------------------------------------------------------------------------------------------------
# AutoRec (issue 15; cpp/autorec.h): a sparse row in, its reconstruction read only at its observed columns
# ----------------------------------------------------------------------------------------------------------
def _autorec_parts(params, X, activation_name):
    W_enc, b_enc, W_dec, b_dec = params
    indptr, indices, data, _ = X
    indices = np.asarray(indices, np.int64)
    dtype = W_enc.dtype
    H = activation(csr_matmul(indptr, indices, np.asarray(data, dtype), W_enc) + b_enc, activation_name)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(np.asarray(indptr, np.int64)))
    return H, rows, indices


def autorec_hidden(params, X, activation, n_threads=0, isa="auto"):
    """Codes ``act(X W_enc + b_enc)`` of the CSR rows X = (indptr, indices, data, n_cols)."""
    return _autorec_parts(params, X, activation)[0]


def autorec_predict(params, X, q_indptr, q_cols, activation, n_threads=0, isa="auto"):
    """Row r's reconstruction read at its query columns: ``H[r] . W_dec[c] + b_dec[c]``."""
    H, _, _ = _autorec_parts(params, X, activation)
    q_cols = np.asarray(q_cols, np.int64)
    q_rows = np.repeat(np.arange(len(q_indptr) - 1), np.diff(np.asarray(q_indptr, np.int64)))
    W_dec, b_dec = params[2], params[3]
    return np.einsum("ij,ij->i", H[q_rows], W_dec[q_cols]) + b_dec[q_cols]


def autorec_loss_and_gradients(params, X, t, l2, activation, n_threads=0, isa="auto"):
    """Loss and gradients of AutoRec's masked squared error over the B rows of X as one batch:

    ``L = (1/B) sum_{observed (r, c)} (out[r, c] - t)^2 / 2 + (l2 / 2B) sum_{c touched} |W_enc[c]|^2 + |W_dec[c]|^2``

    with ``out[r, c] = act(X[r] W_enc + b_enc) . W_dec[c] + b_dec[c]`` computed at the observed entries only.
    t: one target per entry of X. Returns (loss, [dW_enc, db_enc, dW_dec, db_dec]).
    """
    W_enc, b_enc, W_dec, b_dec = params
    dtype = W_enc.dtype
    B = len(X[0]) - 1
    H, rows, cols = _autorec_parts(params, X, activation)
    out = np.einsum("ij,ij->i", H[rows], W_dec[cols]) + b_dec[cols]
    err = out - np.asarray(t, dtype)
    touched = np.unique(cols)
    loss = 0.5 * _sum64(err * err) / B
    loss += 0.5 * l2 / B * (_sum64(W_enc[touched] ** 2) + _sum64(W_dec[touched] ** 2))
    delta = err / dtype.type(B)
    g_W_dec = np.zeros_like(W_dec)
    np.add.at(g_W_dec, cols, delta[:, None] * H[rows])
    g_b_dec = np.zeros_like(b_dec)
    np.add.at(g_b_dec, cols, delta)
    dH = np.zeros_like(H)
    np.add.at(dH, rows, delta[:, None] * W_dec[cols])
    dpre = dH * activation_derivative(H, activation)
    g_W_enc = np.zeros_like(W_enc)
    np.add.at(g_W_enc, cols, np.asarray(X[2], dtype)[:, None] * dpre[rows])
    decay = dtype.type(l2 / B)
    g_W_enc[touched] += decay * W_enc[touched]
    g_W_dec[touched] += decay * W_dec[touched]
    return loss, [g_W_enc, dpre.sum(axis=0), g_W_dec, g_b_dec]

# Mult-VAE / Mult-DAE (Liang et al., WWW 2018; cpp/multvae.h)
# ----------------------------------------------------------------------------------------------------------

def multvae_noise(indptr, rows, latent, dropout, seed, step):
    """The training noise of the batch of Adam step ``step`` whose bags are CSR rows with ``indptr`` of data
    rows ``rows``: (input_scale float32 (nnz,), eps float32 (len(rows), latent)).

    The batch stream is output ``step`` of the splitmix64 stream seeded with ``seed``; row u's dropout key and
    Gaussian key are outputs 2u and 2u + 1 of the stream seeded with that. Entry e of a row is kept when the top
    24 bits of output e of its dropout key are ``>= floor(dropout * 2**24)`` (scaled by 1 / (1 - dropout));
    eps[c] is Box-Muller on outputs 2c, 2c + 1 of the Gaussian key (top 53 bits each).
    """
    def output(state, e):
        return splitmix64_outputs(np.uint64(state), int(e) + 1)[int(e)]

    stream = output(np.uint64(seed), step)
    scale = np.ones(int(indptr[-1]), np.float32)
    eps = np.zeros((len(rows), latent), np.float32)
    threshold = np.uint64(int(dropout * (1 << 24)))
    for i, u in enumerate(rows):
        p0, p1 = int(indptr[i]), int(indptr[i + 1])
        if dropout > 0.0 and p1 > p0:
            bits = splitmix64_outputs(output(stream, 2 * int(u)), p1 - p0) >> np.uint64(40)
            scale[p0:p1] = np.where(bits >= threshold, np.float32(1.0 / (1.0 - dropout)), np.float32(0.0))
        out = splitmix64_outputs(output(stream, 2 * int(u) + 1), 2 * latent) >> np.uint64(11)
        a, b = out[0::2].astype(np.float64) * 2.0**-53, out[1::2].astype(np.float64) * 2.0**-53
        eps[i] = np.sqrt(-2.0 * np.log1p(-a)) * np.cos(2.0 * np.pi * b)
    return scale, eps


def _multvae_activation(l, n_layers, n_encoder, variational):
    return "identity" if l == n_layers - 1 or (variational and l == n_encoder - 1) else "tanh"


def _multvae_dense(X, n_items):
    indptr, indices, data = X[0], X[1], X[2]
    dense = np.zeros((len(indptr) - 1, n_items))
    for r in range(len(indptr) - 1):
        np.add.at(dense[r], indices[indptr[r]:indptr[r + 1]], data[indptr[r]:indptr[r + 1]])
    return dense


def _multvae_forward(coefs, intercepts, n_encoder, variational, x_in, eps, precision="float32"):
    """float64 forward of the dense inputs x_in: (activations per layer, z)."""
    acts, z, h = [], None, x_in
    for l, (W, b) in enumerate(zip(coefs, intercepts)):
        if variational and l == n_encoder:
            h = z
        a = _output_matmul(h, W, l == len(coefs) - 1 and precision == "bf16") + np.asarray(b, np.float64)
        if _multvae_activation(l, len(coefs), n_encoder, variational) == "tanh":
            a = np.tanh(a)
        acts.append(a)
        if variational and l == n_encoder - 1:
            k = a.shape[1] // 2
            mu, logvar = a[:, :k], a[:, k:]
            z = mu if eps is None else mu + np.asarray(eps, np.float64) * np.exp(0.5 * logvar)
        h = a
    return acts, z


def multvae_forward(coefs, intercepts, n_encoder, variational, X):
    """The logits of each bag of the CSR tuple X = (indptr, indices, data, n_items): L2-normalised input, no
    dropout, z = mu."""
    x = _multvae_dense(X, X[3])
    norms = np.sqrt((x ** 2).sum(axis=1, keepdims=True))
    x_in = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return _multvae_forward(coefs, intercepts, n_encoder, variational, x_in, None)[0][-1]


def multvae_loss_and_gradients(coefs, intercepts, n_encoder, variational, X, input_scale, eps, beta, l2,
                               precision="float32"):
    """(loss, nll, kl, coef_grads, intercept_grads) in float64 for the rows of the CSR tuple X as one batch.

    Input: each bag divided by its L2 norm, times input_scale (per stored entry; None: ones). Encoder / decoder
    as in cpp/multvae.h (tanh; identity for [mu | logvar] and the logits); z = mu + eps exp(logvar / 2) (eps
    None: z = mu). loss = mean_r [-sum_j x_rj log softmax(logits_r)_j + beta KL_r] + l2 sum_l ||W_l||^2, with
    KL_r = 0.5 sum (exp(logvar) + mu^2 - 1 - logvar) (VAE only) and the first layer's L2 over the rows of the
    items whose scaled input is non-zero somewhere in the batch (the core's lazy regularisation).
    precision "bf16": the output layer's three products (logits, its weight gradient, its input gradient) take
    their operands rounded to bfloat16 (``bf16_round``), as the core's ``precision="bf16"`` does.
    """
    indptr, indices, data, n_items = X
    n = len(indptr) - 1
    x = _multvae_dense(X, n_items)
    scaled = (indptr, indices, np.asarray(data, np.float64) * (1.0 if input_scale is None else
                                                              np.asarray(input_scale, np.float64)), n_items)
    norms = np.sqrt((x ** 2).sum(axis=1, keepdims=True))
    x_in = _multvae_dense(scaled, n_items)
    x_in = np.divide(x_in, norms, out=np.zeros_like(x_in), where=norms > 0)
    acts, z = _multvae_forward(coefs, intercepts, n_encoder, variational, x_in, eps if variational else None,
                               precision)
    L = len(coefs)
    logits = acts[-1]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    nll = -(x * log_softmax).sum(axis=1).mean()
    D = (np.exp(log_softmax) * x.sum(axis=1, keepdims=True) - x) / n
    kl = 0.0
    touched = np.unique(np.asarray(indices)[np.asarray(scaled[2]) != 0])
    penalty = sum(float((np.asarray(W, np.float64) ** 2).sum()) for W in coefs[1:])
    penalty += float((np.asarray(coefs[0], np.float64)[touched] ** 2).sum())
    coef_grads, intercept_grads = [None] * L, [None] * L
    for l in range(L - 1, -1, -1):
        W = np.asarray(coefs[l], np.float64)
        inp = x_in if l == 0 else (z if variational and l == n_encoder else acts[l - 1])
        bf16 = precision == "bf16" and l == L - 1
        gw = _output_matmul(inp.T, D, bf16) + 2.0 * l2 * W
        if l == 0:
            mask = np.zeros(len(W), bool)
            mask[touched] = True
            gw[~mask] = 0.0
        coef_grads[l], intercept_grads[l] = gw, D.sum(axis=0)
        if l == 0:
            break
        d_in = _output_matmul(D, W.T, bf16)
        if variational and l == n_encoder:
            a = acts[l - 1]
            k = a.shape[1] // 2
            mu, logvar = a[:, :k], a[:, k:]
            kl = float((0.5 * (np.exp(logvar) + mu ** 2 - 1.0 - logvar)).sum(axis=1).mean())
            d_logvar = beta * 0.5 * (np.exp(logvar) - 1.0) / n
            if eps is not None:
                d_logvar = d_logvar + d_in * np.asarray(eps, np.float64) * 0.5 * np.exp(0.5 * logvar)
            D = np.concatenate([d_in + beta * mu / n, d_logvar], axis=1)
        elif _multvae_activation(l - 1, L, n_encoder, variational) == "tanh":
            D = d_in * (1.0 - acts[l - 1] ** 2)
        else:
            D = d_in
    loss = nll + (beta * kl if variational else 0.0) + l2 * penalty
    return loss, nll, kl, coef_grads, intercept_grads


# ----------------------------------------------------------------------------------------------------------
# bfloat16 products (issue 17; cpp/gemm.h bf16_gemm)
# ----------------------------------------------------------------------------------------------------------

def bf16_round(x):
    """x as float32 rounded to the nearest bfloat16, ties to even, returned as float32 (the low 16 bits of each
    value zero). NaN stays NaN (quiet); finite values past the largest bf16 (~3.39e38) become inf."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    out = np.where(nan, (u | 0x00400000) & 0xFFFF0000, rounded).astype(np.uint32)
    return out.view(np.float32).reshape(np.shape(x))


def bf16_gemm(a, b, trans_a=False, trans_b=False, kernel="auto", isa="auto", n_threads=0):
    """``op(a) @ op(b)`` with a and b rounded by ``bf16_round`` and the products (exact in float32: 8-bit
    significands) summed in float32. ``kernel``, ``isa`` and ``n_threads`` are ignored."""
    return sgemm(bf16_round(a), bf16_round(b), trans_a, trans_b)


def _output_matmul(a, b, bf16):
    """a @ b in float64; bf16: with both operands first rounded to float32, then to bf16 (the core rounds its
    float32 values), the products summed in float64."""
    if bf16:
        a, b = bf16_round(np.asarray(a, np.float32)), bf16_round(np.asarray(b, np.float32))
    return np.asarray(a, np.float64) @ np.asarray(b, np.float64)


def _forward_pass_bf16(coefs, intercepts, X, act):
    """_forward_pass of dense X with each layer of more than one output as ``_output_matmul(.., bf16=True)``
    (the field model's precision "bf16")."""
    hidden, Z = [], None
    for l, (W, b) in enumerate(zip(coefs, intercepts)):
        if l > 0:
            hidden.append(_activation(Z, act))
        Z = _output_matmul(X if l == 0 else hidden[-1], W, W.shape[1] > 1) + b
    return hidden, Z


# ----------------------------------------------------------------------------------------------------------
# Differentially private training (issue 16; cpp/private.h): one DP-SGD step, example by example
# ----------------------------------------------------------------------------------------------------------

def field_private_step(spec, keys, y, weight, *, max_grad_norm, noise_multiplier, denominator, alpha,
                       learning_rate, noise, sparse=False, count_noise=1.0, threshold=0.0, count_group=None,
                       units=None):
    """One plain-SGD DP-SGD step of the field model on the batch `keys` (every row one example, no negatives),
    with explicit per-example gradients (``field_loss_and_gradients`` on each example alone, alpha 0).

    Returns ``(new_spec_arrays, norms, selected)``: the updated copies of coefs, intercepts, gmf w and tables
    (dict), each example's gradient norm before clipping, and per field the rows updated. The rules:

    * c_r = min(1, C / ||g_r||); S = sum_r c_r g_r over every parameter (duplicate rows of a bag merged, as
      the dense table gradient of one example merges them);
    * dense arrays (MLP W_l, b_l, GMF w): g = (S + sigma C z + alpha p) / denominator (no alpha on biases),
      z = noise(stream, indices) with stream l for W_l, L + l for b_l, DP_STREAMS["gmf"] for w;
    * tables: rows selected (all rows, or with ``sparse`` those whose count plus count_noise * z_count exceeds
      threshold, z_count = noise(DP_STREAMS["field_count"] + group, row), each example adding 1/sqrt(k) to
      each of the k distinct rows it reads in the group's fields) get g = (S + sigma C z + alpha_f E) /
      denominator, z = noise(DP_STREAMS["field_grad"] + i, row * dim + j); other rows do not change;
    * p -= learning_rate * g.

    ``units`` (the privacy unit "user"): a list of lists of example indices; a unit's gradient is the sum of
    its examples' gradients, clipped as one (``norms`` are then the units'), and a unit adds 1/sqrt(k) to
    each of the k distinct rows its examples read. Default: each example its own unit.
    """
    from fastrec import _core

    streams = _core.DP_STREAMS
    spec = float64_copy(spec)
    n = len(y)
    per = []
    for r in range(n):
        _, tg, gg, cg, ig = field_loss_and_gradients(spec, [np.asarray(k)[r:r + 1] for k in keys],
                                                     np.asarray(y)[r:r + 1],
                                                     None if weight is None else np.asarray(weight)[r:r + 1], 0.0)
        per.append((tg, gg, cg, ig))
    units = [[r] for r in range(n)] if units is None else [list(u) for u in units]

    def summed(parts):  # elementwise sum of per-example gradient tuples (lists of arrays, None kept)
        def add(a, b):
            if isinstance(a, list):
                return [add(x, y) for x, y in zip(a, b)]
            return None if a is None else a + b
        total = parts[0]
        for p in parts[1:]:
            total = tuple(add(a, b) for a, b in zip(total, p))
        return total

    per = [summed([per[r] for r in u]) for u in units]
    norms = np.array([np.sqrt(sum(float((a ** 2).sum()) for part in p for a in
                                  (part if isinstance(part, list) else [part]) if a is not None)) for p in per])
    C, sigma = float(max_grad_norm), float(noise_multiplier)
    scale = np.minimum(1.0, C / np.maximum(norms, 1e-300))

    def clipped_sum(pick):
        return sum(scale[u] * pick(per[u]) for u in range(len(units)))

    L = len(spec["coefs"])
    out = {"coefs": [], "intercepts": [], "tables": [], "gmf_w": None}
    for l in range(L):
        W, b = spec["coefs"][l], spec["intercepts"][l]
        zw = noise(l, np.arange(W.size)).reshape(W.shape)
        zb = noise(L + l, np.arange(b.size))
        gW = (clipped_sum(lambda p: p[2][l]) + sigma * C * zw + alpha * W) / denominator
        gb = (clipped_sum(lambda p: p[3][l]) + sigma * C * zb) / denominator
        out["coefs"].append(W - learning_rate * gW)
        out["intercepts"].append(b - learning_rate * gb)
    if spec.get("gmf") is not None:
        w = spec["gmf"]["w"]
        g = (clipped_sum(lambda p: p[1]) + sigma * C * noise(streams["gmf"], np.arange(w.size)) + alpha * w)
        out["gmf_w"] = w - learning_rate * g / denominator
    fields = spec["fields"]
    groups = count_group if count_group is not None else list(range(len(fields)))
    selected = []
    for i, f in enumerate(fields):
        E = f["table"]
        V, d = E.shape
        if not sparse:
            rows = np.arange(V)
        else:
            members = [j for j in range(len(fields)) if groups[j] == groups[i]]
            counts = np.zeros(V)
            for unit in units:
                ids = set()
                for j in members:
                    indptr, bag_ids, _ = fields[j]["bags"]
                    for r in unit:
                        q = int(np.asarray(keys[fields[j]["key"]])[r])
                        ids.update(int(x) for x in bag_ids[indptr[q]:indptr[q + 1]])
                for x in ids:
                    counts[x] += 1.0 / np.sqrt(len(ids))
            z = noise(streams["field_count"] + groups[i], np.arange(V))
            rows = np.flatnonzero(counts + count_noise * z > threshold)
        selected.append(rows)
        alpha_f = f["alpha"] if f.get("alpha") is not None else alpha
        S = clipped_sum(lambda p: p[0][i])
        z = noise(streams["field_grad"] + i, (rows[:, None] * d + np.arange(d)).ravel()).reshape(len(rows), d)
        new = E.copy()
        new[rows] -= learning_rate * (S[rows] + sigma * C * z + alpha_f * E[rows]) / denominator
        out["tables"].append(new)
    return out, norms, selected


# ----------------------------------------------------------------------------------------------------------
# Combining data-parallel replicas (fastrec.dask; docs/DESIGN.md "Scale-out on Dask")
# ----------------------------------------------------------------------------------------------------------

def combine_replicas(start, replicas, touched):
    """One table after a round of the Dask engine's combine: every row is its value at the round's start plus
    each touching replica's change, and its optimizer states are their mean over the replicas that touched it
    (float64 here). start: the table at the round's start; replicas: per replica (table, state1, state2)
    after the round; touched: per replica a boolean mask of the rows it touched. Returns (table, state1,
    state2, count) with count the number of replicas that touched each row."""
    value = start.astype(np.float64)
    states = [np.zeros(replicas[0][k].shape) for k in (1, 2)]
    count = np.zeros(len(start), np.int64)
    for (table, *state), t in zip(replicas, touched):
        value[t] += table[t] - start[t]
        for total, s in zip(states, state):
            total[t] += s[t]
        count += t
    for total in states:
        total[count > 0] /= count[count > 0].reshape(-1, *[1] * (total.ndim - 1))
    return value, states[0], states[1], count
