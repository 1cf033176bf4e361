"""DaskRecommender and DaskTwoTower: `fastrec.Recommender` and `fastrec.TwoTower` trained data-parallel on a Dask
cluster from dask arrays / Series of (user, item[, rating]) interactions (the engine: `_engine`)."""

from __future__ import annotations

import uuid

import numpy as np
import dask

from fastrec._fieldnet import core_precision
from fastrec._recbase import _merge_seen
from fastrec.recommender import Recommender
from fastrec.two_tower import TwoTower
from fastrec.dask._engine import _Adapter, _DaskEstimator, _delayed_parts, _distinct, _draws, _worker_addresses

__all__ = ["DaskRecommender", "DaskTwoTower"]


# --------------------------------------------------------------------------------------------- on workers
def _part(users, items, ratings, weight):
    """One partition as NumPy arrays (pandas Series and dask chunks alike)."""
    out = [None if a is None else np.asarray(a) for a in (users, items, ratings, weight)]
    n = len(out[0])
    for name, a in zip(("items", "ratings", "sample_weight"), out[1:]):
        if a is not None and len(a) != n:
            raise ValueError(f"a partition of users has {n} rows but the matching partition of {name} has {len(a)}: "
                             "the collections must be partitioned alike")
    return out


def _part_stats(part):
    users, items, ratings, weight = part
    stats = None
    if ratings is not None:
        r = ratings.astype(np.float64)
        w = np.ones(len(r)) if weight is None else weight.astype(np.float64)
        stats = (float((w * r).sum()), float(w.sum()), float(r.min()) if len(r) else np.inf,
                 float(r.max()) if len(r) else -np.inf)
    return _distinct(users), _distinct(items), stats, len(users)


def _codes(index, raw):
    """index.index(raw) for ids all known to `index` (the vocabulary is every partition's ids): for int ids over
    a span at most a few times their number, one gather from a lookup table instead of a binary search per id
    (2.5 s for 5 x 10^6 users and items into 1.1 x 10^6 ids)."""
    ids = index.ids
    if raw.dtype.kind in "iu" and ids.dtype.kind == "i" and len(ids) and len(raw):
        lo, hi = int(ids.min()), int(ids.max())
        if hi - lo < 4 * len(ids) + 1024 and int(raw.min()) >= lo and int(raw.max()) <= hi:
            lut = np.zeros(hi - lo + 1, np.int32)
            lut[ids - lo] = np.arange(1, len(ids) + 1, dtype=np.int32)
            return lut[raw.astype(np.int64, copy=False) - lo]
    return index.index(raw)


class _InteractionsAdapter(_Adapter):
    """A RecommenderBase model: users and items, seen pairs, item counts. A first fit's spec: an `_Spec` of
    (params, seed, distinct users, distinct items, rating (mean, min, max) or None, user_features, item_features,
    feature_types)."""

    def build(self, spec, tables):
        params, seed, users, items, rating_stats, user_features, item_features, feature_types = spec.fields
        est = self.estimator(**params).set_params(random_state=seed)
        config = est._validate_params(rating_stats is None)
        est._check_base_params()
        user_features, item_features = est._new_tables(user_features, item_features, feature_types)
        rng, est._rng = _draws(seed, tables)
        try:
            est._new_model(users, items, rating_stats, user_features, item_features, config)
        finally:
            est._rng = rng
        return est

    def prepare(self, est, parts):
        users = np.concatenate([p[0] for p in parts])
        items = np.concatenate([p[1] for p in parts])
        ratings = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
        weight = None if parts[0][3] is None else np.concatenate([p[3] for p in parts]).astype(np.float32)
        u, i = _codes(est._users, users), _codes(est._items, items)
        n_i = len(est._items) + 1
        est._seen = _merge_seen(*est._seen, u, i, n_i)
        y = np.ones(len(u), np.float32) if est.implicit_ else (ratings - est.rating_mean_).astype(np.float32)
        return [u, i], y, weight, np.bincount(i, minlength=n_i).astype(np.float64)

    def add_counts(self, est, counts):
        est._add_item_counts(counts)

    def ids(self, est):
        return [est._users.ids, est._items.ids]

    def seen(self, est):
        return est._seen

    def finish(self, model, counts, seen):
        model._seen = seen
        self.add_counts(model, counts)
        super().finish(model, counts, seen)


class _RecommenderAdapter(_InteractionsAdapter):
    estimator = Recommender
    caches = Recommender._caches

    def training(self, est):  # as Recommender._train
        handle = est.net_.handle(est._bags, est._dense_tables, training=True, precision=core_precision(est.precision))
        sampler = est._sampler(negatives=est.negatives if est.implicit_ else 0, seed=0)
        return handle, sampler, est._setting("alpha", est.loss_), est._setting("learning_rate", est.loss_)


_Adapter.register(_RecommenderAdapter())


class _TwoTowerAdapter(_InteractionsAdapter):
    estimator = TwoTower
    caches = TwoTower._caches

    def training(self, est):  # as TwoTower._train; _training() reads the seen pairs and item counts: fixed by now
        handle = est.net_.handle(est._side_data("user"), est._side_data("item"), training=True)
        return handle, est._training(), float(est.alpha), float(est._setting("learning_rate"))

    def finish(self, model, counts, seen):
        super().finish(model, counts, seen)
        if model.index == "hnsw":  # as after a local fit
            model._build_index()


_Adapter.register(_TwoTowerAdapter())


def _recommend_part(model, users, k, exclude_seen, items):
    import pandas as pd

    users = np.asarray(users)
    ids, scores = model.recommend(users, k, exclude_seen=exclude_seen, items=items)
    n, kk = ids.shape
    return pd.DataFrame({"user": np.repeat(users, kk), "rank": np.tile(np.arange(1, kk + 1), n),
                         "item": ids.ravel(), "score": scores.ravel()})


def _predict_part(model, users, items):
    return model.predict(np.asarray(users), np.asarray(items))


# --------------------------------------------------------------------------------------------- the driver
def _partitions(client, users, items, ratings, weight, local):
    """Futures of the partitions, each (users, items, ratings, weight) as NumPy arrays."""
    cols = [_delayed_parts(x, n, local) for x, n in ((users, "users"), (items, "items"), (ratings, "ratings"),
                                                      (weight, "sample_weight"))]
    n = len(cols[0])
    for c, name in zip(cols[1:], ("items", "ratings", "sample_weight")):
        if c is not None and len(c) != n:
            raise ValueError(f"users has {n} partitions but {name} has {len(c)}: partition them alike")
    part = dask.delayed(_part, pure=True)
    return client.compute([part(*(None if c is None else c[p] for c in cols)) for p in range(n)])


def _distinct_ids(stats):
    """The distinct users and items of every partition, from their `_part_stats`."""
    if sum(s[3] for s in stats) == 0:
        raise ValueError("users is empty: nothing to train on")
    if len({s[0].dtype.kind == "U" for s in stats if len(s[0])}) > 1:
        raise TypeError("users mix strings and integers across partitions")
    return _distinct(np.concatenate([s[0] for s in stats])), _distinct(np.concatenate([s[1] for s in stats]))


class _DaskInteractions(_DaskEstimator):
    """fit / partial_fit on (users, items[, ratings]) dask collections, recommend and predict on the cluster."""

    def fit(self, users, items, ratings=None, *, sample_weight=None, user_features=None, item_features=None,
            feature_types=None):
        """Train on dask collections (users, items[, ratings, sample_weight]) partitioned alike by rows.

        Feature tables are local (a FeatureTable or pandas DataFrame indexed by id): each worker gets a copy.
        Returns self; ``to_local()`` is the trained local model.
        """
        return self._fit((users, items, ratings, sample_weight, user_features, item_features, feature_types), True)

    def partial_fit(self, users, items, ratings=None, *, sample_weight=None, user_features=None, item_features=None,
                    feature_types=None):
        """One more epoch over these dask collections, continuing from the current model (as the local
        ``partial_fit``: new ids are added, the interactions join the seen items). Each worker starts from a
        copy of the model (sent once); on an unfitted model it is ``fit`` with one epoch."""
        return self._fit((users, items, ratings, sample_weight, user_features, item_features, feature_types),
                         not hasattr(self, "model_"), epochs=1)

    def _read(self, client, data):
        parts = _partitions(client, *data[:4], f"fastrec.{self._local.__name__}.fit")
        return parts, client.map(_part_stats, parts, pure=False)

    def _spec_fields(self, stats, data):
        users, items = _distinct_ids(stats)
        rating_stats = None
        if data[2] is not None:
            wr, w = sum(s[2][0] for s in stats), sum(s[2][1] for s in stats)
            rating_stats = (wr / w, min(s[2][2] for s in stats), max(s[2][3] for s in stats))
        return (users, items, rating_stats, *data[4:])

    def _grow_copy(self, model, stats, data):
        """As the local partial_fit grows."""
        users, items = _distinct_ids(stats)
        ratings, user_features, item_features, feature_types = data[2], *data[4:]
        if (ratings is None) != model.implicit_:
            raise ValueError("partial_fit needs the kind of feedback (ratings or implicit) of the first fit")
        model._validate_params(ratings is None)
        model._grow(users, items, model._check_table(user_features, "user_features", feature_types),
                    model._check_table(item_features, "item_features", feature_types))

    # ---------------------------------------------------------------------------------------- scoring
    def recommend(self, users, k=10, *, exclude_seen=True, items=None):
        """Top-k items of each user of a dask array / Series, as a dask DataFrame (user, rank, item, score):
        what ``to_local().recommend`` returns, one row per (user, rank); write it with ``to_parquet``."""
        import dask.dataframe as dd
        import pandas as pd

        model = self.to_local()
        client = self._client()
        m = self._model_future(client)
        parts = client.compute(_delayed_parts(users, "users", f"fastrec.{self._local.__name__}.recommend"))
        # Spread the blocks so that every worker gets about the same number of users and all finish together
        # (left to itself the scheduler runs them where the user blocks happen to lie): largest block first
        # to the least loaded worker. A preference only: if a worker dies, Dask reruns its blocks elsewhere.
        workers = _worker_addresses(client)
        lengths = client.gather(client.map(len, parts, pure=False))
        load, where = {w: 0 for w in workers}, [None] * len(parts)
        for j in sorted(range(len(parts)), key=lambda j: -lengths[j]) if workers else ():
            where[j] = min(workers, key=lambda w: load[w])
            load[where[j]] += lengths[j]
        calls = [client.submit(_recommend_part, m, p, k, exclude_seen, items, pure=False, key=f"fastrec-recommend-"
                               f"{uuid.uuid4().hex}", workers=None if w is None else [w], allow_other_workers=True)
                 for p, w in zip(parts, where)]
        kind = model._items.ids.dtype
        meta = pd.DataFrame({"user": np.zeros(0, np.asarray(model._users.ids).dtype), "rank": np.zeros(0, np.int64),
                             "item": np.zeros(0, kind), "score": np.zeros(0, np.float64)})
        return dd.from_delayed(calls, meta=meta, verify_meta=False)

    def predict(self, users, items):
        """Scores of the pairs of two dask arrays / Series partitioned alike, as a dask array."""
        import dask.array as da

        client = self._client()
        m = self._model_future(client)
        cols = [client.compute(_delayed_parts(x, name, f"fastrec.{self._local.__name__}.predict"))
                for x, name in ((users, "users"), (items, "items"))]
        if len(cols[0]) != len(cols[1]):
            raise ValueError(f"users has {len(cols[0])} partitions but items has {len(cols[1])}")
        blocks = [da.from_delayed(dask.delayed(client.submit(_predict_part, m, u, i, pure=False)), shape=(np.nan,),
                                  dtype=np.float64) for u, i in zip(*cols)]
        return da.concatenate(blocks)


_PARAMETERS = """
    Parameters
    ----------
    client : distributed.Client, optional
        The cluster to use (default: the current client).
    sync_every : int or None, default None
        Combine the replicas every this many batches of each replica; None: once per epoch (the fewest bytes;
        the coarsest averaging).
    timeout : float, default 600
        Seconds a round may run without finishing before the fit gives up with ``WorkerLostError``. A dead
        worker is noticed sooner: as soon as the scheduler removes it.
    **params
        Any `fastrec.{local}` parameter but ``privacy`` (ValueError: private training is not distributed). The
        fit trains ``epochs`` epochs: early stopping and validation data are not used on the cluster (evaluate
        ``to_local()`` instead). With ``verbose``, each round prints its rows, rows/s and loss on the client.
"""


class DaskRecommender(_DaskInteractions):
    __doc__ = """A `fastrec.Recommender` trained data-parallel on a Dask cluster (fastrec.dask; docs/DESIGN.md).
""" + _PARAMETERS.format(local="Recommender")

    _local = Recommender


class DaskTwoTower(_DaskInteractions):
    __doc__ = """A `fastrec.TwoTower` trained data-parallel on a Dask cluster (fastrec.dask; docs/DESIGN.md): both
    towers' id and feature tables are combined by their touched rows, the MLPs averaged. ``recommend`` scores
    with the local model's search (exact or its HNSW index) on every worker.
""" + _PARAMETERS.format(local="TwoTower")

    _local = TwoTower
