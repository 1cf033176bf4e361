"""The parameters of a field model and the calls into `fastrec._core.field_*` (docs/DESIGN.md).

`FieldNet` owns the learned arrays (embedding tables, MLP weights, GMF vector) and their optimizer state;
the *data* side of a call (which rows each key names, the bag and dense tables read through the keys) is
passed per call. `FieldModel` (click-through data) and `Recommender` (users x items) both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastrec import _core

OPTIMIZERS = ("sgd", "adagrad", "adam")
ACTIVATIONS = ("identity", "logistic", "tanh", "relu")


@dataclass
class Field:
    """An embedding table of `vocab` rows x `dim`, read through key column `key`.

    role: "mlp" (pooled vector feeds the MLP), "gmf_u" / "gmf_v" (the two sides of the GMF term), "wide"
        (dim 1: the pooled scalar is added to the logit, the linear part of Wide & Deep).
    dropout: training-time probability of reading bag row 0 (the "unknown" row) instead of the example's own.
    """

    name: str
    vocab: int
    dim: int
    key: int
    role: str = "mlp"
    dropout: float = 0.0
    alpha: float | None = None  # this table's L2 weight (None: the model's alpha)


@dataclass
class DenseBlock:
    """`width` numeric columns read through key column `key`."""

    name: str
    width: int
    key: int


def bags_of_ids(ids: np.ndarray) -> tuple:
    """Bag table with one (id, 1.0) entry per row: a one-id-per-row field."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    return (np.arange(len(ids) + 1, dtype=np.int64), ids, np.ones(len(ids), np.float32))


def bags_of_csr(X, mean: bool) -> tuple:
    """Bag table from a CSR matrix (rows = bags, columns = ids, values = weights); mean pooling divides each
    bag's weights by their sum (an empty or zero-sum bag pools to zero)."""
    X = X.tocsr()
    weights = np.asarray(X.data, dtype=np.float32).copy()
    indptr = np.asarray(X.indptr, dtype=np.int64)
    if mean and len(weights):
        sums = np.add.reduceat(weights.astype(np.float64), indptr[:-1][np.diff(indptr) > 0])
        counts = np.diff(indptr)[np.diff(indptr) > 0]
        scale = np.where(sums != 0, 1.0 / np.where(sums != 0, sums, 1.0), 0.0)
        weights *= np.repeat(scale, counts).astype(np.float32)
    return (indptr, np.asarray(X.indices, dtype=np.int32), weights)


class FieldNet:
    """Learned arrays of a field model: embedding tables, MLP (one output), optional GMF vector."""

    def __init__(self, fields, dense, hidden_layer_sizes, activation, loss, n_keys, rng, init_scale=0.05):
        self.fields = list(fields)
        self.dense = list(dense)
        self.activation = activation
        self.loss = loss
        self.n_keys = n_keys
        offset, self.offsets = 0, []
        for f in self.fields:
            self.offsets.append(offset if f.role == "mlp" else -1)
            offset += f.dim if f.role == "mlp" else 0
        self.dense_offsets = []
        for b in self.dense:
            self.dense_offsets.append(offset)
            offset += b.width
        self.width = offset
        if self.width == 0:
            raise ValueError("the model has no input: give at least one field or dense column")
        for f in self.fields:
            if f.role == "wide" and f.dim != 1:
                raise ValueError(f"wide field {f.name!r} must have dim 1")
        # Wide weights start at 0 (no bias before training); embeddings small and random.
        self.tables = [np.zeros((f.vocab, 1), np.float32) if f.role == "wide" else
                       rng.normal(0.0, init_scale, (f.vocab, f.dim)).astype(np.float32) for f in self.fields]
        # The MLP: scikit-learn's Glorot-uniform initialisation.
        sizes = [self.width, *hidden_layer_sizes, 1]
        factor = 2.0 if activation == "logistic" else 6.0
        self.coefs, self.intercepts = [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = np.sqrt(factor / (fan_in + fan_out))
            self.coefs.append(rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32))
            self.intercepts.append(rng.uniform(-bound, bound, fan_out).astype(np.float32))
        gmf = [i for i, f in enumerate(self.fields) if f.role == "gmf_u"], [
            i for i, f in enumerate(self.fields) if f.role == "gmf_v"]
        self.gmf_fields = (gmf[0][0], gmf[1][0]) if gmf[0] and gmf[1] else None
        self.gmf_w = None
        if self.gmf_fields:
            # Start as a plain dot product of the two GMF embeddings (NeuMF's GMF with unit weights).
            self.gmf_w = np.ones(self.fields[self.gmf_fields[0]].dim, np.float32)
        self.optimizer = None
        self.adam_t = 0

    # --------------------------------------------------------------------------------- optimizer state
    def reset_optimizer(self, optimizer: str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        params = self.coefs + self.intercepts
        self.state1 = [np.zeros_like(p) for p in params]
        self.state2 = [np.zeros_like(p) for p in params] if optimizer == "adam" else []
        self.table_state1 = [
            None if optimizer == "sgd" else np.zeros(t.shape[0] if optimizer == "adagrad" else t.shape, np.float32)
            for t in self.tables
        ]
        self.table_state2 = [np.zeros_like(t) if optimizer == "adam" else None for t in self.tables]
        self.gmf_state1 = None if self.gmf_w is None else np.zeros_like(self.gmf_w)
        self.gmf_state2 = None if self.gmf_w is None or optimizer != "adam" else np.zeros_like(self.gmf_w)
        self.optimizer = optimizer
        self.adam_t = 0

    # --------------------------------------------------------------------------------- the core's spec
    def spec(self, bags, dense_tables, *, training=False) -> dict:
        """The dict `_core.field_*` reads. bags[i]: bag table of field i; dense_tables[b]: (rows, width)."""
        fields = []
        for i, f in enumerate(self.fields):
            entry = {"table": self.tables[i], "bags": bags[i], "key": f.key, "offset": self.offsets[i],
                     "dropout": f.dropout if training else 0.0, "wide": f.role == "wide", "alpha": f.alpha}
            if self.optimizer is not None:
                entry["state_kind"] = {"sgd": "none", "adagrad": "row", "adam": "full"}[self.optimizer]
                entry["state1"], entry["state2"] = self.table_state1[i], self.table_state2[i]
            fields.append(entry)
        dense = [{"table": t, "key": b.key, "offset": o} for t, b, o in zip(dense_tables, self.dense,
                                                                           self.dense_offsets)]
        gmf = None
        if self.gmf_fields:
            gmf = {"field_u": self.gmf_fields[0], "field_v": self.gmf_fields[1], "w": self.gmf_w}
            if self.optimizer is not None:
                gmf["state1"], gmf["state2"] = self.gmf_state1, self.gmf_state2
        return {"n_keys": self.n_keys, "width": self.width, "loss": self.loss, "activation": self.activation,
                "coefs": self.coefs, "intercepts": self.intercepts,
                "state1": getattr(self, "state1", []), "state2": getattr(self, "state2", []),
                "fields": fields, "dense": dense, "gmf": gmf}

    # --------------------------------------------------------------------------------- calls
    def handle(self, bags, dense_tables, *, training=False):
        """A validated core object over the current arrays; rebuild it after the arrays are replaced."""
        return _core.FieldHandle(self.spec(bags, dense_tables, training=training), training)

    def train_epoch(self, handle, keys, y, weight, order, *, batch_size, alpha, learning_rate, momentum, nesterov,
                    beta_1, beta_2, epsilon, sampler, epoch, n_threads):
        loss_sum, self.adam_t, rows = handle.train_epoch(
            self.state1, self.state2, keys, y, weight, order, batch_size, alpha, self.optimizer, learning_rate,
            momentum, nesterov, beta_1, beta_2, epsilon, self.adam_t, sampler, epoch, n_threads)
        return loss_sum, rows

    def check_finite(self):
        arrays = self.tables + self.coefs + self.intercepts + ([self.gmf_w] if self.gmf_w is not None else [])
        return all(np.isfinite(a).all() for a in arrays)
