"""`fastrec.FieldModel`: click-through-rate style models over named input columns.

`X` is a dict column name -> values, one row per example:
- a 1-D array of ints or strings: a categorical id field (one embedding row per distinct training value,
  row 0 for values never seen in training, or `hash_buckets` rows for unbounded vocabularies);
- a scipy sparse matrix (n, v): a multi-hot field, a bag of column ids per row with the stored values as
  weights, pooled by "mean" (default) or "sum";
- a float array (n,) or (n, c): numeric features (standardised with the training mean and deviation).
The pooled embeddings and numeric columns feed an MLP with one output (`loss` "bce": a probability, "mse": a
value). It runs on the same engine as `fastrec.Recommender` (`fastrec._fieldnet.FieldNet`): here every field
is read through one key column, the example's own row.
"""

from __future__ import annotations

import copy
import numbers

import numpy as np
import scipy.sparse as sp

from fastrec._base import BaseEstimator, exclusive_fit
from fastrec._checks import (as_array, as_numeric, check_bool, check_csr, check_float, check_int, check_random_state,
                             check_sample_weight, not_fitted_error)
from fastrec._fieldnet import (ACTIVATIONS, OPTIMIZERS, DenseBlock, Field, FieldNet, Float32Normals, IdIndex,
                               bags_of_csr, bags_of_ids, callable_score, check_precision, check_structure,
                               core_precision, loss_curve_from_history, record_structure, run_epochs)
from fastrec import _core
from fastrec._registry import persistable
from fastrec.features import as_id_array

__all__ = ["FieldModel"]

_FLOAT32_MAX = float(np.finfo(np.float32).max)  # the core computes in float32


def _hash_codes(values: np.ndarray, buckets: int, n_threads: int = 0) -> np.ndarray:
    """Stable bucket 1..buckets of each value: zlib.crc32(str(value).encode()) % buckets + 1, the same in every
    process, run and platform (computed by the core, in parallel)."""
    return _core.hash_buckets(np.require(values, requirements=["C", "A"]), int(buckets), n_threads)


@persistable
class FieldModel(BaseEstimator):
    """Embeddings of named categorical / multi-hot columns plus numeric columns, then an MLP.

    Parameters
    ----------
    fields : dict name -> dict, optional
        Per-column options: {"dim": int, "pooling": "mean" | "sum", "hash_buckets": int}.
    embedding_dim : int, default=16
        Dimension of every embedding without its own "dim".
    hidden_layer_sizes, activation, optimizer, learning_rate, alpha, epochs, batch_size, n_iter_no_change,
    random_state, n_threads, verbose : as in `fastrec.Recommender`.
    loss : {"bce", "mse"}, default="bce"
    validation_metric : {"auto", "log_loss", "auc", "rmse", "mae"}, default="auto"
        What ``fit(..., validation_data=(X_val, y_val))`` reports per epoch ("auto": "log_loss" for "bce",
        "rmse" for "mse").
    precision : {"float32", "bf16", "auto"}, default="auto"
        Precision of the MLP's training products (forward, weight gradients, deltas): "bf16" rounds their
        operands to bfloat16 and sums in float32 (mixed precision: weights, embeddings, gradients and optimizer
        state stay float32; a one-output layer stays float32); "auto" (the default) is "bf16" where the CPU
        has AVX512-BF16, else "float32": on MovieLens-100k both precisions scored within 0.0005 RMSE and
        0.005 HR@10 with the same settings. Predictions are computed in float32 either way. docs/DESIGN.md.

    Attributes
    ----------
    columns_ : list of (name, kind) with kind "categorical", "multi_hot" or "numeric", in input order.
    loss_curve_ : mean training loss per epoch.
    history_ : per epoch "loss", "seconds" and, with validation data, "val_<metric>".
    best_epoch_ : with validation data, the epoch (from 1) with the best validation metric.
    """

    loss_curve_ = loss_curve_from_history

    def __init__(self, fields=None, embedding_dim=16, hidden_layer_sizes=(64, 32), activation="relu", loss="bce",
                 optimizer="adam", learning_rate=1e-3, alpha=1e-5, epochs=5, batch_size=256, momentum=0.9,
                 nesterovs_momentum=True, validation_metric="auto", n_iter_no_change=None, random_state=None,
                 n_threads=None, verbose=False, precision="auto"):
        self.fields = fields
        self.embedding_dim = embedding_dim
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.loss = loss
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.alpha = alpha
        self.epochs = epochs
        self.batch_size = batch_size
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.validation_metric = validation_metric
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose
        self.precision = precision

    # ------------------------------------------------------------------------------------ inputs
    def _options(self, name):
        opts = (self.fields or {}).get(name, {})
        if not isinstance(opts, dict):
            raise TypeError(f"fields[{name!r}] must be a dict of options, got {opts!r}")
        unknown = set(opts) - {"dim", "pooling", "hash_buckets"}
        if unknown:
            raise ValueError(f"fields[{name!r}] has unknown options {sorted(unknown, key=str)}")
        dim = check_int(opts.get("dim", self.embedding_dim), f"fields[{name!r}]['dim']")
        pooling = opts.get("pooling", "mean")
        if not (isinstance(pooling, str) and pooling in ("mean", "sum")):
            raise ValueError(f"fields[{name!r}]['pooling'] must be 'mean' or 'sum', got {pooling!r}")
        buckets = opts.get("hash_buckets")
        if buckets is not None:
            buckets = check_int(buckets, f"fields[{name!r}]['hash_buckets']", maximum=2**31 - 2)  # +1: int32 ids
        return dim, pooling, buckets

    def _inputs(self, X, fit: bool, grow: bool = False):
        """Bag tables and dense tables of X (rows = examples), learning vocabularies and scalings when fit, and
        adding new categorical values to the vocabularies when grow."""
        if not isinstance(X, dict) or not X:
            raise TypeError("X must be a non-empty dict: column name -> array or sparse matrix")
        names = list(X)
        if not fit and names != [name for name, _ in self.columns_]:
            raise ValueError(f"X has columns {names}, the model was fitted on {[n for n, _ in self.columns_]}")
        n = None
        bags, dense, kinds = [], [], []
        for name in names:
            value = X[name]
            label = f"X[{name!r}]"
            if sp.issparse(value):
                kind = "multi_hot"
                value = check_csr(value, label)
                rows = value.shape[0]
            else:
                value = as_array(value.to_numpy() if hasattr(value, "to_numpy") else value, label)
                kind = "numeric" if np.issubdtype(value.dtype, np.floating) else "categorical"
                rows = value.shape[0] if value.ndim else 0
            if n is None:
                n = rows
            if rows != n or rows == 0:
                raise ValueError(f"{label} has {rows} rows; every column needs the same number, at least 1")
            if not fit and kind != dict(self.columns_)[name]:
                raise TypeError(f"{label} is {kind} but was {dict(self.columns_)[name]} at fit")
            kinds.append((name, kind))
            dim, pooling, buckets = self._options(name)
            if kind == "categorical":
                values = as_id_array(value, f"X[{name!r}]")
                if buckets:
                    codes = _hash_codes(values, buckets, self._threads())
                else:
                    if fit:
                        self._vocab_[name], codes = IdIndex.with_codes(values, what=f"values of X[{name!r}]")
                    else:
                        if grow:
                            self._vocab_[name].add(values)
                        codes = self._vocab_[name].index(values)
                bags.append(bags_of_ids(codes))
            elif kind == "multi_hot":
                if fit:
                    self._vocab_[name] = value.shape[1]
                if value.shape[1] != self._vocab_[name]:
                    raise ValueError(f"X[{name!r}] has {value.shape[1]} columns, the model was fitted on "
                                     f"{self._vocab_[name]}")
                as_numeric(np.asarray(value.data), label)
                bags.append(bags_of_csr(value, pooling == "mean", label, self._threads()))
            else:
                if value.ndim > 2:
                    raise ValueError(f"X[{name!r}] must have shape ({n},) or ({n}, c); got {value.shape}")
                values = value.reshape(n, -1)
                if values.dtype not in (np.float32, np.float64):
                    values = values.astype(np.float64)
                values = np.require(values, requirements=["C", "A"])
                if not fit and values.shape[1] != len(self._scale_[name][0]):
                    raise ValueError(f"X[{name!r}] has {values.shape[1]} columns, the model was fitted on "
                                     f"{len(self._scale_[name][0])}")
                # One parallel pass in the core (moments when fitting, float32 output, range checks).
                scaled, mean, std, status = _core.standardize(values, *(self._scale_[name] if not fit else ()),
                                                              n_threads=self._threads())
                if status == 1:
                    raise ValueError(f"X[{name!r}] contains NaN or infinity (or a value too large for float32)")
                if status == 2:  # e.g. 3e38 after training on values of std 0.1
                    raise ValueError(f"X[{name!r}] holds values too large for float32 once standardised")
                if fit:
                    self._scale_[name] = (mean, std)
                dense.append(scaled)
        return n, kinds, bags, dense

    # ------------------------------------------------------------------------------------ fit / predict
    def _validate_params(self):
        for name, options in (("loss", ("bce", "mse")), ("activation", ACTIVATIONS), ("optimizer", OPTIMIZERS)):
            if not (isinstance(getattr(self, name), str) and getattr(self, name) in options):
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "embedding_dim"):
            check_int(getattr(self, name), name)
        if self.n_iter_no_change is not None:
            check_int(self.n_iter_no_change, "n_iter_no_change")
        hidden = self.hidden_layer_sizes
        hidden = (hidden,) if isinstance(hidden, numbers.Integral) else hidden
        if isinstance(hidden, str) or not hasattr(hidden, "__iter__"):
            raise ValueError(f"hidden_layer_sizes must be an int or a sequence of ints, got {hidden!r}")
        hidden = tuple(check_int(h, "hidden_layer_sizes entries") for h in hidden)
        if self.fields is not None and not isinstance(self.fields, dict):
            raise TypeError(f"fields must be a dict: column name -> dict of options, got {self.fields!r}")
        check_float(self.learning_rate, "learning_rate", low_open=True)
        check_float(self.alpha, "alpha")
        check_float(self.momentum, "momentum", 0.0, 1.0, high_open=False)
        check_bool(self.nesterovs_momentum, "nesterovs_momentum")
        if self.n_threads is not None:
            check_int(self.n_threads, "n_threads")
        check_precision(self.precision)
        return hidden

    def _targets(self, y, n, sample_weight):
        y = as_numeric(as_array(y, "y"), "y").astype(np.float64)
        if y.shape != (n,) or not np.isfinite(y).all() or (np.abs(y) > _FLOAT32_MAX / 2).any():
            raise ValueError(f"y must be {n} finite numbers (within float32's range), got shape {y.shape}")
        if self.loss == "bce" and not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("y must hold 0/1 labels for loss='bce'")
        weight = None
        if sample_weight is not None:
            weight = check_sample_weight(sample_weight, n).astype(np.float32)
        return y, weight

    @exclusive_fit
    def fit(self, X, y, sample_weight=None, validation_data=None):
        """Train on X (dict of columns) and targets y (0/1 for "bce", values for "mse").

        validation_data : (X_val, y_val) or a callable, optional. A tuple is scored with
            ``validation_metric`` after every epoch (``history_["val_<metric>"]``); a callable
            ``score(model, epoch) -> float`` (higher is better, as scikit-learn's scorers) is called after every
            epoch (``history_["val_score"]``). With ``n_iter_no_change``, training stops when the score stops
            improving and the best epoch's parameters are kept.
        """
        return self._fit_new(X, y, sample_weight, validation_data, self.epochs)

    def _fit_new(self, X, y, sample_weight, validation_data, epochs):
        hidden = self._validate_params()
        for name in ("net_", "best_epoch_"):
            self.__dict__.pop(name, None)
        self._vocab_, self._scale_ = {}, {}
        n, kinds, bags, dense_tables = self._inputs(X, fit=True)
        y, weight = self._targets(y, n, sample_weight)
        self.columns_ = kinds
        validate = self._validation(validation_data)
        self._rng = check_random_state(self.random_state)
        self._new_net(hidden)
        self._y_offset = float(np.average(y, weights=weight)) if self.loss == "mse" else 0.0
        self.history_ = {"loss": [], "seconds": []}
        self._train(n, bags, dense_tables, y, weight, epochs, validate)
        return self

    def _new_net(self, hidden):
        """net_ for columns_ with the vocabularies and scalings learned, parameters drawn from self._rng (a
        RandomState, or the Float32Normals of fastrec.dask, which builds each worker's replica this way)."""
        fields, blocks = [], []
        for name, kind in self.columns_:
            if kind == "numeric":
                blocks.append(DenseBlock(name, len(self._scale_[name][0]), 0))
                continue
            dim, _, buckets = self._options(name)
            vocab = (buckets + 1) if buckets else (len(self._vocab_[name]) + 1 if kind == "categorical"
                                                   else self._vocab_[name])
            fields.append(Field(name, vocab, dim, 0))
        draws = Float32Normals.of(self._rng, self._threads())
        self.net_ = FieldNet(fields, blocks, hidden, self.activation, self.loss, 1, draws)
        self.net_.reset_optimizer(self.optimizer)
        record_structure(self, ("embedding_dim", "hidden_layer_sizes", "activation", "loss", "optimizer"))

    @exclusive_fit
    def partial_fit(self, X, y, sample_weight=None):
        """One more epoch over (X, y), continuing from the current parameters and optimizer state.

        Categorical values never seen before get new embedding rows (the tables and their optimizer state
        grow); hashed columns keep their buckets. On an unfitted model it is ``fit`` with one epoch.
        embedding_dim, hidden_layer_sizes, activation, loss and optimizer must be those of the fit (a change
        by ``set_params`` raises ValueError); training parameters may change.
        """
        if not hasattr(self, "net_"):
            return self._fit_new(X, y, sample_weight, None, 1)
        self._validate_params()
        check_structure(self)
        net = self.net_
        saved = ({k: copy.copy(v) for k, v in self._vocab_.items()}, [f.vocab for f in net.fields], list(net.tables),
                 list(net.table_state1), list(net.table_state2))
        try:  # bad input leaves the model as it was
            n, _, bags, dense_tables = self._inputs(X, fit=False, grow=True)
            y, weight = self._targets(y, n, sample_weight)
            self._grow_tables()
        except BaseException:
            self._vocab_, vocabs, net.tables, net.table_state1, net.table_state2 = saved
            for f, vocab in zip(net.fields, vocabs):
                f.vocab = vocab
            raise
        self._train(n, bags, dense_tables, y, weight, 1, None)
        return self

    def _grow_tables(self):
        """Rows (and optimizer state) for the values added to the vocabularies since the tables were sized (drawn
        from self._rng; fastrec.dask's partial_fit grows its copy of the model this way too)."""
        for i, f in enumerate(self.net_.fields):
            if isinstance(self._vocab_.get(f.name), IdIndex):
                self.net_.grow(i, len(self._vocab_[f.name]) + 1, self._rng)

    def _train(self, n, bags, dense_tables, y, weight, epochs, validate):
        self.__dict__.pop("_serve", None)  # the serving handle reads the net of its time
        targets = (y - self._y_offset).astype(np.float32)
        handle = self.net_.handle(bags, dense_tables, training=True, precision=core_precision(self.precision))
        fn, metric, higher = validate if validate is not None else (None, None, False)
        run_epochs(self, self.net_, handle, [np.arange(n, dtype=np.int32)], targets, weight, n, self._rng, epochs,
                   validate=fn, metric=metric, higher_is_better=higher,
                   advice=", a moderate alpha (too strong a penalty diverges too), or scaled y and numeric columns")

    def _validation(self, data):
        """(function scoring the current parameters on validation_data, metric, higher is better) or None."""
        if data is None:
            return None
        if callable(data):
            return callable_score(self, data), "score", True
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise ValueError("validation_data must be a tuple (X_val, y_val) or a callable score(model, epoch)")
        metric = self.validation_metric
        if metric == "auto":
            metric = "log_loss" if self.loss == "bce" else "rmse"
        allowed = ("log_loss", "auc", "rmse", "mae") if self.loss == "bce" else ("rmse", "mae")
        if metric not in allowed:
            raise ValueError(f"validation_metric must be 'auto' or one of {allowed} for loss={self.loss!r}, "
                             f"got {metric!r}")
        from fastrec import metrics

        n, _, bags, dense_tables = self._inputs(data[0], fit=False)
        y_val, _ = self._targets(data[1], n, None)
        keys = [np.arange(n, dtype=np.int32)]
        score = {"log_loss": metrics.log_loss, "auc": metrics.roc_auc, "rmse": metrics.rmse, "mae": metrics.mae}[metric]

        def validate():
            raw = self.net_.handle(bags, dense_tables).predict(keys, self._threads()).astype(np.float64)
            return score(y_val, raw if self.loss == "bce" else raw + self._y_offset)
        return validate, metric, metric == "auc"

    def _raw(self, X):
        if not hasattr(self, "net_"):
            raise not_fitted_error(self)
        one = self._one_row(X)
        if one is not None:
            return one
        n, _, bags, dense_tables = self._inputs(X, fit=False)
        handle = self.net_.handle(bags, dense_tables)
        return handle.predict([np.arange(n, dtype=np.int32)], self._threads()).astype(np.float64)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_serve", None)  # a core handle: rebuilt on first use
        return state

    def _one_row(self, X, scalars=False):
        """The serving path of one row (a dict of one-element lists or arrays, or of scalars when `scalars`;
        categorical and one-value numeric columns): the core's RowScorer writes the codes and standardised values
        into a handle kept between calls and predicts, one call. None when X is anything else (the general path
        checks and predicts it)."""
        serve = self.__dict__.get("_serve")
        if serve is None:
            serve = self._serve = self._serving_state()
        if serve is False:
            return None
        return serve(X, scalars)

    def _serving_state(self):
        """A core RowScorer over a handle of one-row bag and dense tables (per column: name, kind, the cell its
        code or value goes to, the lookup of its ids, hash buckets, mean, std), or False when a column is
        multi-hot or numeric with several values per row."""
        if any(kind == "multi_hot" for _, kind in self.columns_) or any(
                len(self._scale_[name][0]) != 1 for name, kind in self.columns_ if kind == "numeric"):
            return False
        bags, dense, plan = [], [], []
        for name, kind in self.columns_:
            if kind == "categorical":
                # id 1, not 0: the core reads a bag table of ids 0..n-1 as the identity, never its ids again
                bags.append(bags_of_ids(np.ones(1, np.int32)))
                buckets = self._options(name)[2]
                vocab = self._vocab_.get(name)
                if buckets:
                    plan.append((name, "hash", bags[-1][1], None, int(buckets), 0.0, 1.0))
                elif vocab is not None and vocab.ids.dtype.kind == "i" and len(vocab.ids):
                    order = None if vocab._order is None else np.require(vocab._order, np.int64, ["C", "A"])
                    lookup = _core.IdLookup(np.require(vocab._sorted, np.int64, ["C", "A"]), order)
                    plan.append((name, "id", bags[-1][1], lookup, 0, 0.0, 1.0))
                else:  # string ids: the index's own lookup (code, or None for an id of another kind)
                    plan.append((name, "call", bags[-1][1], vocab.index_one, 0, 0.0, 1.0))
            else:
                dense.append(np.zeros((1, 1), np.float32))
                mean, std = self._scale_[name]
                plan.append((name, "numeric", dense[-1].reshape(1), None, 0, float(mean[0]), float(std[0])))
        return _core.RowScorer(self.net_.handle(bags, dense), plan)

    def serving_handle(self):
        """A low-latency callable for scoring one row at a time: ``handle(row)`` with ``row`` a dict of column
        name -> one value (a scalar) returns a float, ``predict_proba`` of that row's label 1 (loss "bce") or
        its ``predict`` value (loss "mse"), the same number. Rows of categorical and one-value numeric
        columns run whole in the core (ids looked up, values hashed and standardised, the MLP on one row, no
        arrays); any other row goes through ``predict_proba`` / ``predict``, whose checks name what is wrong.
        The handle follows the model: after ``fit`` or ``partial_fit`` it scores with the new parameters.
        Not thread-safe: one call at a time per model (the GIL is held throughout).
        """
        self._check_fitted_field()
        return FieldServingHandle(self)

    def _check_fitted_field(self):
        if not hasattr(self, "net_"):
            raise not_fitted_error(self)

    def predict_proba(self, X):
        """(n, 2) probabilities of label 0 and 1 (loss "bce")."""
        if self.loss != "bce":
            raise ValueError("predict_proba needs loss='bce'")
        p = self._raw(X)
        if type(p) is float:  # the one-row path (filled in place: np.array of a nested list costs ~1 µs)
            out = np.empty((1, 2))
            out[0, 0] = 1.0 - p
            out[0, 1] = p
            return out
        return np.column_stack([1.0 - p, p])

    def predict(self, X):
        """Labels 0/1 (loss "bce", threshold 0.5) or predicted values (loss "mse")."""
        raw = self._raw(X)
        if type(raw) is float:  # the one-row path
            return np.array([int(raw >= 0.5)]) if self.loss == "bce" else np.array([raw + self._y_offset])
        return (raw >= 0.5).astype(np.int64) if self.loss == "bce" else raw + self._y_offset


class FieldServingHandle:
    """``FieldModel.serving_handle()``: see there."""

    __slots__ = ("_model", "_offset")

    def __init__(self, model):
        self._model = model
        self._offset = None if model.loss == "bce" else model._y_offset

    def __call__(self, row):
        model = self._model
        serve = model.__dict__.get("_serve")
        if serve:  # (None before the first call and after a fit: _one_row builds it)
            value = serve(row, True)
        else:
            value = model._one_row(row, True)
        if value is None:  # the general path: its checks name what is wrong
            if type(row) is not dict:
                raise TypeError(f"row must be a dict of column name -> value, got {type(row).__name__}")
            value = float(model._raw({name: [x] for name, x in row.items()})[0])
        return value if self._offset is None else value + self._offset

    def __repr__(self):
        return f"<FieldModel serving handle ({len(self._model.columns_)} columns)>"
