"""DaskFieldModel: `fastrec.FieldModel` trained data-parallel on a Dask cluster from a dask DataFrame (or a dict of
dask Series / arrays partitioned alike) of categorical and numeric columns (the engine: `_engine`)."""

from __future__ import annotations

import numpy as np
import dask

from fastrec._fieldnet import IdIndex, check_structure, core_precision
from fastrec.fields import FieldModel
from fastrec.dask._engine import _Adapter, _DaskEstimator, _delayed_parts, _distinct, _draws

__all__ = ["DaskFieldModel"]


# --------------------------------------------------------------------------------------------- on workers
def _field_part(names, y, weight, *columns):
    """One partition: ({name: NumPy array}, y, weight)."""
    cols = {name: np.asarray(c) for name, c in zip(names, columns)}
    n = len(columns[0])
    for name, a in [*cols.items(), ("y", y), ("sample_weight", weight)]:
        if a is not None and len(a) != n:
            raise ValueError(f"a partition of X[{names[0]!r}] has {n} rows but the matching partition of {name} has "
                             f"{len(a)}: the collections must be partitioned alike")
    return cols, None if y is None else np.asarray(y), None if weight is None else np.asarray(weight)


def _field_stats(part, params):
    """What the driver needs of a partition (checked as a local fit checks it): the column kinds, each
    vocabulary column's distinct values, each numeric column's (rows, mean, M2) in float64 and the core's
    (mean, std), the targets' weighted mean and total weight. None for an empty partition."""
    cols, y, weight = part
    if len(next(iter(cols.values()))) == 0:
        return None
    est = FieldModel(**params)
    est._vocab_, est._scale_ = {}, {}
    n, kinds, _, _ = est._inputs(cols, fit=True)
    y, w = est._targets(y, n, weight)
    numeric = {}
    for name, kind in kinds:
        if kind == "numeric":
            v = np.asarray(cols[name], np.float64).reshape(n, -1)
            mean = v.mean(axis=0)
            numeric[name] = (n, mean, ((v - mean) ** 2).sum(axis=0), est._scale_[name])
    vocabs = {name: v.ids for name, v in est._vocab_.items() if isinstance(v, IdIndex)}
    return kinds, vocabs, numeric, (float(np.average(y, weights=w)), float(n if w is None else w.sum(dtype=np.float64)))


class _FieldAdapter(_Adapter):
    """A FieldModel: every column read through the example's own row. A first fit's spec: an `_Spec` of
    (params, seed, columns_, {column: distinct values}, {column: (mean, std)}, y offset)."""

    estimator = FieldModel
    sampled = False  # a FieldModel's epoch draws its permutation only
    caches = ("_serve",)

    def build(self, spec, tables):
        params, seed, columns, vocabs, scales, y_offset = spec.fields
        est = FieldModel(**params).set_params(random_state=seed)
        hidden = est._validate_params()
        est.columns_ = list(columns)
        est._vocab_ = {name: IdIndex(ids, what=f"values of X[{name!r}]") for name, ids in vocabs.items()}
        est._scale_ = dict(scales)
        rng, est._rng = _draws(seed, tables)
        try:
            est._new_net(hidden)
        finally:
            est._rng = rng
        est._y_offset = y_offset
        est.history_ = {"loss": [], "seconds": []}
        return est

    def prepare(self, est, parts):
        parts = [p for p in parts if len(p[1])]
        if not parts:  # this replica's partitions are empty: it sits every round out
            return [np.zeros(0, np.int32)], np.zeros(0, np.float32), None, None
        cols = {name: np.concatenate([p[0][name] for p in parts]) for name, _ in est.columns_}
        y = np.concatenate([p[1] for p in parts])
        weight = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
        n, _, bags, dense = est._inputs(cols, fit=False)
        y, weight = est._targets(y, n, weight)
        est._dask_inputs = (bags, dense)
        return [np.arange(n, dtype=np.int32)], (y - est._y_offset).astype(np.float32), weight, None

    def training(self, est):  # as FieldModel._train
        handle = est.net_.handle(*est._dask_inputs, training=True, precision=core_precision(est.precision))
        return handle, None, float(est.alpha), float(est.learning_rate)

    def ids(self, est):
        return [v.ids for _, v in sorted(est._vocab_.items(), key=lambda kv: str(kv[0])) if isinstance(v, IdIndex)]



_Adapter.register(_FieldAdapter())


def _field_predict(model, method, part):
    return getattr(model, method)(part[0])


# --------------------------------------------------------------------------------------------- the driver
def _columns(X, what="X"):
    """{name: dask Series / array} of a dask DataFrame or a dict of them."""
    if hasattr(X, "columns") and hasattr(X, "to_delayed"):
        return {name: X[name] for name in X.columns}
    if isinstance(X, dict) and X and all(hasattr(c, "to_delayed") for c in X.values()):
        return dict(X)
    raise TypeError(f"{what} must be a dask DataFrame or a non-empty dict of column name -> dask Series / array "
                    f"(got {type(X).__name__}); local data goes to fastrec.FieldModel.fit")


def _field_partitions(client, X, y, weight):
    """Futures of the partitions, each ({name: array}, y, weight)."""
    cols = _columns(X)
    names = list(cols)
    parts = [_delayed_parts(c, f"X[{name!r}]", "fastrec.FieldModel.fit") for name, c in cols.items()]
    extra = [_delayed_parts(x, name, "fastrec.FieldModel.fit") for x, name in ((y, "y"), (weight, "sample_weight"))]
    n = len(parts[0])
    for c, name in [*zip(parts[1:], [f"X[{n!r}]" for n in names[1:]]), *zip(extra, ("y", "sample_weight"))]:
        if c is not None and len(c) != n:
            raise ValueError(f"X[{names[0]!r}] has {n} partitions but {name} has {len(c)}: partition them alike")
    part = dask.delayed(_field_part, pure=True)
    return client.compute([part(names, *(None if c is None else c[p] for c in extra), *(c[p] for c in parts))
                           for p in range(n)])


def _combined_scale(moments):
    """(mean, std) of a numeric column over every partition from each one's (rows, mean, M2, core's (mean,
    std)): the core's own figures when there is one partition (a local fit's, bit for bit), else the pooled
    moments (Chan et al.), the population std, 1 where it is 0 (as the core)."""
    moments = [m for m in moments if m[0]]
    if len(moments) == 1:
        return moments[0][3]
    n = sum(m[0] for m in moments)
    mean = sum(m[0] * m[1] for m in moments) / n
    m2 = sum(m[2] + m[0] * (m[1] - mean) ** 2 for m in moments)
    std = np.sqrt(m2 / n)
    return mean, np.where(std > 0, std, 1.0)


def _required(y):
    if y is None:
        raise TypeError("y is required")
    return y


def _checked(stats):
    """The non-empty partitions' `_field_stats`, their column kinds (the same in every partition) and each
    vocabulary column's distinct values over all of them."""
    stats = [s for s in stats if s is not None]
    if not stats:
        raise ValueError("X is empty: nothing to train on")
    kinds = stats[0][0]
    for s in stats[1:]:
        if s[0] != kinds:
            raise TypeError(f"the partitions' columns differ: {kinds} and {s[0]} (a column numeric in one "
                            "partition and categorical in another?)")
    vocabs = {}
    for name in stats[0][1]:
        values = [s[1][name] for s in stats]
        if len({v.dtype.kind == "U" for v in values if len(v)}) > 1:
            raise TypeError(f"X[{name!r}] mixes strings and integers across partitions")
        vocabs[name] = _distinct(np.concatenate(values))
    return stats, kinds, vocabs


class DaskFieldModel(_DaskEstimator):
    """A `fastrec.FieldModel` trained data-parallel on a Dask cluster (fastrec.dask; docs/DESIGN.md).

    ``X`` is a dask DataFrame (or a dict column name -> dask Series / array, partitioned alike): int or string
    columns are categorical fields, float columns numeric (multi-hot columns, scipy sparse matrices, are not
    read from dask collections). Vocabularies are every partition's distinct values; numeric columns are
    standardised with the mean and deviation over all partitions.

    Parameters
    ----------
    client : distributed.Client, optional
        The cluster to use (default: the current client).
    sync_every : int or None, default None
        Combine the replicas every this many batches of each replica; None: once per epoch.
    timeout : float, default 600
        Seconds a round may run without finishing before the fit gives up with ``WorkerLostError``.
    **params
        Any `fastrec.FieldModel` parameter. The fit trains ``epochs`` epochs (no validation data on the
        cluster: evaluate ``to_local()``). With ``verbose``, each round prints its rows, rows/s and loss.
    """

    _local = FieldModel

    def fit(self, X, y, sample_weight=None):
        """Train on X (dask DataFrame / dict of dask columns) and y (dask array / Series), partitioned alike."""
        return self._fit((X, _required(y), sample_weight), True)

    def partial_fit(self, X, y, sample_weight=None):
        """One more epoch over (X, y), continuing from the current model (new categorical values get new rows,
        as `FieldModel.partial_fit`); on an unfitted model it is ``fit`` with one epoch."""
        return self._fit((X, _required(y), sample_weight), not hasattr(self, "model_"), epochs=1)

    def _read(self, client, data):
        parts = _field_partitions(client, *data)
        return parts, client.map(_field_stats, parts, params=self.params, pure=False)

    def _spec_fields(self, stats, data):
        stats, kinds, vocabs = _checked(stats)
        scales = {name: _combined_scale([s[2][name] for s in stats]) for name, kind in kinds if kind == "numeric"}
        offset = 0.0
        if self.params.get("loss", "bce") == "mse":
            means = [s[3] for s in stats if s[3][1] > 0]
            offset = means[0][0] if len(means) == 1 else sum(m * w for m, w in means) / sum(w for _, w in means)
        return kinds, vocabs, scales, float(offset)

    def _grow_copy(self, model, stats, data):
        """As FieldModel.partial_fit grows."""
        _, kinds, vocabs = _checked(stats)
        model._validate_params()
        check_structure(model)
        if kinds != model.columns_:
            raise ValueError(f"X has columns {kinds}, the model was fitted on {model.columns_}")
        for name, values in vocabs.items():
            model._vocab_[name].add(values)
        model._grow_tables()

    # ---------------------------------------------------------------------------------------- scoring
    def _score(self, X, method, shape):
        import dask.array as da

        self.to_local()
        client = self._client()
        m = self._model_future(client)
        parts = _field_partitions(client, X, None, None)
        blocks = [da.from_delayed(dask.delayed(client.submit(_field_predict, m, method, p, pure=False)),
                                  shape=shape, dtype=np.float64 if method != "predict" or
                                  self.model_.loss == "mse" else np.int64) for p in parts]
        return da.concatenate(blocks)

    def predict(self, X):
        """``to_local().predict`` of each partition of X, as a dask array."""
        return self._score(X, "predict", (np.nan,))

    def predict_proba(self, X):
        """``to_local().predict_proba`` of each partition of X (loss "bce"), as a dask array (n, 2)."""
        if self.to_local().loss != "bce":
            raise ValueError("predict_proba needs loss='bce'")
        return self._score(X, "predict_proba", (np.nan, 2))
