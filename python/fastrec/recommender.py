"""`fastrec.Recommender`: a neural recommender (NCF / NeuMF family with side features) over users x items.

Users and items are *entities* numbered 1..N (0 = unknown) from the raw ids seen in the interactions and in
the side-feature tables. Key column 0 names the user entity, key column 1 the item entity; every input field
of the underlying field model (`fastrec._fieldnet.FieldNet`, docs/DESIGN.md) is read through one of them:
the user / item id embeddings, one embedding per categorical or multi-hot side-feature column, the numeric
columns as dense blocks, and optionally the GMF pair of id embeddings. An entity known only from a feature
table (a cold item) reads the "unknown" id row and its own features; the unknown rows are trained by
id dropout (a small fraction of training examples read them instead of their own id).
"""

from __future__ import annotations

import numbers
import time

import numpy as np
import scipy.sparse as sp

from fastrec._base import BaseEstimator
from fastrec._checks import (as_array, check_bool, check_float, check_int, check_random_state, check_sample_weight,
                             not_fitted_error)
from fastrec._fieldnet import ACTIVATIONS, OPTIMIZERS, DenseBlock, Field, FieldNet, bags_of_csr, bags_of_ids
from fastrec.features import FeatureTable, as_id_array

__all__ = ["Recommender"]

USER, ITEM = 0, 1  # key columns
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _Entities:
    """Raw ids <-> entity numbers 1..N (0 = unknown)."""

    def __init__(self, *id_arrays, side="user"):
        present = [a for a in id_arrays if a is not None and len(a)]
        kinds = {a.dtype.kind == "U" for a in present}
        if len(kinds) > 1:
            raise TypeError(f"ids mix strings and integers between the interactions ({side}s) and {side}_features")
        self.ids = np.unique(np.concatenate(present)) if present else np.zeros(0, np.int64)
        self._lookup = None  # raw id -> entity, built on the first small query

    def __len__(self):
        return len(self.ids)

    def index(self, raw) -> np.ndarray:
        """Entity number of each raw id (int32), 0 for ids never seen."""
        n = len(self.ids)
        if n == 0 or len(raw) == 0 or (raw.dtype.kind == "U") != (self.ids.dtype.kind == "U"):
            return np.zeros(len(raw), np.int32)
        if len(raw) <= 16:  # a few ids (online predictions): a dict lookup beats the array passes
            if self._lookup is None:
                self._lookup = dict(zip(self.ids.tolist(), range(1, n + 1)))
            return np.fromiter((self._lookup.get(x, 0) for x in raw.tolist()), np.int32, len(raw))
        pos = self.ids.searchsorted(raw)
        np.minimum(pos, n - 1, out=pos)
        return np.where(self.ids[pos] == raw, pos + 1, 0).astype(np.int32)

    def __getstate__(self):
        return {"ids": self.ids}  # the lookup dict is rebuilt on demand

    def __setstate__(self, state):
        self.ids, self._lookup = state["ids"], None


def _is_scalar(value) -> bool:
    """One id rather than an array of them (ragged nested lists are neither: as_id_array reports them)."""
    try:
        return np.ndim(value) == 0
    except ValueError:
        return False


class Recommender(BaseEstimator):
    """Neural recommender trained on (user, item[, rating]) interactions, with optional side features.

    Parameters
    ----------
    embedding_dim : int, default=32
        Dimension of the user / item id embeddings and of each side-feature embedding.
    hidden_layer_sizes : tuple of int, default=(64, 32)
        The MLP over the concatenated embeddings and numeric features.
    activation : {"relu", "tanh", "logistic", "identity"}, default="relu"
    loss : {"auto", "mse", "bce"}, default="auto"
        "auto": "mse" on ratings, "bce" on implicit feedback (ratings=None).
    gmf : bool, default=True
        Add NeuMF's generalized matrix factorisation term (its own user / item embeddings).
    wide : bool, default=False
        Add a linear term to the output (Wide & Deep): a learned bias per user, per item and per value of
        every categorical / multi-hot side feature. It is what lets items known only by their features get
        their features' typical rating.
    optimizer : {"adam", "adagrad", "sgd"}, default="adam"
        Lazy Adam, row-wise Adagrad or plain SGD on the embedding rows of each batch; Adam, Adagrad or SGD
        (with ``momentum``) on the MLP.
    learning_rate : float, default=1e-3
    alpha : float, default=1e-5
        L2 penalty ``0.5 * alpha * ||w||^2 / batch`` on the MLP weights and on the embedding rows a batch
        touches (only those: lazy regularisation keeps a step's cost independent of the vocabulary size).
    embedding_alpha : float or None, default=None
        L2 weight of the embedding tables if it should differ from ``alpha`` (a strong penalty on the
        embeddings without one on the MLP).
    epochs : int, default=10
    batch_size : int, default=256
        Interactions per step (negatives come on top).
    negatives : int, default=4
        Implicit feedback: items sampled per positive as label-0 examples, fresh each epoch, never an item
        the user interacted with in training.
    negative_sampling : {"uniform", "popularity"}, default="uniform"
        "popularity": proportional to count^0.75 (word2vec's smoothing).
    id_dropout : float, default=0.05
        Fraction of training examples that read the learned "unknown" id row instead of their own, which is
        what ids never seen in training (and items known only by side features) use.
    momentum, nesterovs_momentum : float, bool
        SGD on the MLP.
    random_state : int, RandomState or None
    n_threads : int or None
        Threads of the core (None: all cores). Results are identical for any value.
    verbose : bool

    Attributes
    ----------
    n_users_, n_items_ : int
        Entities known after fit (from interactions and feature tables).
    loss_curve_ : list of float
        Mean training loss per epoch.
    rating_mean_ : float
        Mean training rating (explicit feedback): the model predicts the deviation from it.
    """

    def __init__(self, embedding_dim=32, hidden_layer_sizes=(64, 32), activation="relu", loss="auto", gmf=True,
                 wide=False, optimizer="adam", learning_rate=1e-3, alpha=1e-5, embedding_alpha=None, epochs=10,
                 batch_size=256, negatives=4,
                 negative_sampling="uniform", id_dropout=0.05, momentum=0.9, nesterovs_momentum=True,
                 random_state=None, n_threads=None, verbose=False):
        self.embedding_dim = embedding_dim
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.loss = loss
        self.gmf = gmf
        self.wide = wide
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.alpha = alpha
        self.embedding_alpha = embedding_alpha
        self.epochs = epochs
        self.batch_size = batch_size
        self.negatives = negatives
        self.negative_sampling = negative_sampling
        self.id_dropout = id_dropout
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose

    # ------------------------------------------------------------------------------------ validation
    def _validate_params(self, implicit: bool):
        check_int(self.embedding_dim, "embedding_dim")
        hidden = self.hidden_layer_sizes
        if isinstance(hidden, numbers.Integral):
            hidden = (hidden,)
        if isinstance(hidden, str) or not hasattr(hidden, "__iter__"):
            raise ValueError(f"hidden_layer_sizes must be an int or a sequence of ints, got {hidden!r}")
        hidden = tuple(hidden)
        for h in hidden:
            check_int(h, "hidden_layer_sizes entries")
        for name, options in (("activation", ACTIVATIONS), ("loss", ("auto", "mse", "bce")), ("optimizer", OPTIMIZERS),
                              ("negative_sampling", ("uniform", "popularity"))):
            if not (isinstance(getattr(self, name), str) and getattr(self, name) in options):
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")
        check_float(self.learning_rate, "learning_rate", low_open=True)
        check_float(self.alpha, "alpha")
        if self.embedding_alpha is not None:
            check_float(self.embedding_alpha, "embedding_alpha")
        check_float(self.momentum, "momentum", 0.0, 1.0, high_open=False)
        for name in ("gmf", "wide", "nesterovs_momentum"):
            check_bool(getattr(self, name), name)
        check_int(self.epochs, "epochs")
        check_int(self.batch_size, "batch_size")
        check_int(self.negatives, "negatives", minimum=0)
        # The core reads id_dropout as a float32, where 0.99999999 is 1.
        dropout = self.id_dropout
        if not (isinstance(dropout, numbers.Real) and 0 <= dropout < 1 and np.float32(dropout) < 1):
            raise ValueError(f"id_dropout must lie in [0, 1), got {self.id_dropout!r}")
        if self.n_threads is not None:
            check_int(self.n_threads, "n_threads")
        loss = self.loss if self.loss != "auto" else ("bce" if implicit else "mse")
        if implicit and loss == "mse":
            raise ValueError("loss='mse' needs ratings; implicit feedback (ratings=None) trains with 'bce'")
        return hidden, loss

    def _threads(self):
        return 0 if self.n_threads is None else int(self.n_threads)

    # ------------------------------------------------------------------------------------ features
    def _feature_inputs(self, table: FeatureTable | None, entities: _Entities, key: int, side: str, fit: bool):
        """Fields, dense blocks, bag tables and dense tables of one side's feature table, rows by entity."""
        fields, dense, bags, dense_tables = [], [], [], []
        if table is None:
            return fields, dense, bags, dense_tables
        n = len(entities) + 1
        rows = table.row_positions(entities.ids)  # table row of each entity (-1: none)
        has = np.concatenate([[False], rows >= 0])
        rows = np.concatenate([[0], np.maximum(rows, 0)])
        if fit:
            self._vocab_[side] = {}
            self._numeric_stats_[side] = {}
        for name, values in table.categorical.items():
            if fit:
                self._vocab_[side][name] = np.unique(values)
            vocab = self._vocab_[side][name]
            pos = np.minimum(np.searchsorted(vocab, values), len(vocab) - 1)
            code = np.where(vocab[pos] == values, pos + 1, 0)  # 0 = unknown value
            ids = np.where(has, code[rows], 0)
            fields.append(Field(f"{side}:{name}", len(vocab) + 1, self.embedding_dim, key))
            bags.append(bags_of_ids(ids))
        for name, (X, vocabulary) in table.multi_hot.items():
            X = X.tocsr()[rows]
            X = sp.diags(has.astype(np.float32)) @ X  # entities without a row: empty bag
            X.eliminate_zeros()
            fields.append(Field(f"{side}:{name}", X.shape[1], self.embedding_dim, key))
            bags.append(bags_of_csr(X, mean=True))
        for name, values in table.numeric.items():
            values = values.reshape(len(table), -1)
            if fit:
                mean, std = values.mean(axis=0), values.std(axis=0)
                self._numeric_stats_[side][name] = (mean, np.where(std > 0, std, 1.0))
            mean, std = self._numeric_stats_[side][name]
            t = np.where(has[:, None], (values[rows] - mean) / std, 0.0).astype(np.float32)  # unknown: the mean
            dense.append(DenseBlock(f"{side}:{name}", t.shape[1], key))
            dense_tables.append(np.ascontiguousarray(t))
        return fields, dense, bags, dense_tables

    @staticmethod
    def _check_table(table, name):
        if table is None or isinstance(table, FeatureTable):
            return table
        if hasattr(table, "columns") and hasattr(table, "index"):  # a pandas DataFrame indexed by id
            return FeatureTable.from_dataframe(table)
        raise TypeError(f"{name} must be a fastrec.features.FeatureTable or a pandas DataFrame indexed by id")

    # ------------------------------------------------------------------------------------ fit
    def fit(self, users, items, ratings=None, *, user_features=None, item_features=None, sample_weight=None):
        """Train on interactions (users[i], items[i]) with ratings, or implicit feedback when ratings is None.

        users, items : (n,) arrays of raw ids (ints or strings).
        ratings : (n,) numbers, or None for implicit feedback (every pair a positive; negatives sampled).
        user_features, item_features : FeatureTable (or DataFrame indexed by id), optional. They may hold
            ids absent from the interactions (e.g. new items): those are scored from their features.
        sample_weight : (n,) non-negative weights, optional.
        """
        users = as_id_array(users, "users")
        items = as_id_array(items, "items")
        n = len(users)
        if n == 0:
            raise ValueError("users is empty: fit needs at least one interaction")
        if len(items) != n:
            raise ValueError(f"users and items must have the same length, got {n} and {len(items)}")
        implicit = ratings is None
        hidden, loss = self._validate_params(implicit)
        if not implicit:
            ratings = as_array(ratings, "ratings")
            if ratings.ndim != 1 or len(ratings) != n:
                raise ValueError(f"ratings must be a 1-D array of {n} numbers, got shape {ratings.shape}")
            if not np.issubdtype(ratings.dtype, np.number) or ratings.dtype.kind == "c":
                raise TypeError(f"ratings must be real numbers, got dtype {ratings.dtype}")
            ratings = ratings.astype(np.float64)
            if not np.isfinite(ratings).all():
                raise ValueError("ratings contains NaN or infinity")
            if np.abs(ratings).max() > _FLOAT32_MAX / 2:  # the core trains on float32 deviations from the mean
                raise ValueError(f"ratings must lie within +-{_FLOAT32_MAX / 2:.3g} (float32)")
        weight = None
        if sample_weight is not None:
            weight = check_sample_weight(sample_weight, n).astype(np.float32)
        user_features = self._check_table(user_features, "user_features")
        item_features = self._check_table(item_features, "item_features")
        rng = check_random_state(self.random_state)

        # Entities and the id rows that training interactions give them (others read the unknown row 0).
        self._users = _Entities(users, None if user_features is None else user_features.ids, side="user")
        self._items = _Entities(items, None if item_features is None else item_features.ids, side="item")
        u = self._users.index(users)
        i = self._items.index(items)
        n_u, n_i = len(self._users) + 1, len(self._items) + 1
        user_id_row = np.zeros(n_u, np.int32)
        trained_users = np.unique(u)
        user_id_row[trained_users] = np.arange(1, len(trained_users) + 1, dtype=np.int32)
        item_id_row = np.zeros(n_i, np.int32)
        trained_items = np.unique(i)
        item_id_row[trained_items] = np.arange(1, len(trained_items) + 1, dtype=np.int32)

        d = self.embedding_dim
        dropout = float(self.id_dropout)
        fields = [Field("user_id", len(trained_users) + 1, d, USER, dropout=dropout),
                  Field("item_id", len(trained_items) + 1, d, ITEM, dropout=dropout)]
        bags = [bags_of_ids(user_id_row), bags_of_ids(item_id_row)]
        self._vocab_, self._numeric_stats_ = {}, {}
        dense, dense_tables = [], []
        for table, entities, key, side in ((user_features, self._users, USER, "user"),
                                           (item_features, self._items, ITEM, "item")):
            f, b, bg, dt = self._feature_inputs(table, entities, key, side, fit=True)
            fields += f
            dense += b
            bags += bg
            dense_tables += dt
        if self.gmf:
            fields += [Field("user_gmf", len(trained_users) + 1, d, USER, role="gmf_u", dropout=dropout),
                       Field("item_gmf", len(trained_items) + 1, d, ITEM, role="gmf_v", dropout=dropout)]
            bags += [bags[0], bags[1]]
        if self.wide:  # a bias per id and per categorical / multi-hot feature value, on the same bags
            embedded = [(f, b) for f, b in zip(fields, bags) if f.role == "mlp"]
            for f, b in embedded:
                fields.append(Field(f"{f.name}:wide", f.vocab, 1, f.key, role="wide", dropout=f.dropout))
                bags.append(b)
        if self.embedding_alpha is not None:
            for f in fields:
                f.alpha = float(self.embedding_alpha)
        self._bags, self._dense_tables = bags, dense_tables
        self.net_ = FieldNet(fields, dense, hidden, self.activation, loss, 2, rng)
        self.net_.reset_optimizer(self.optimizer)
        self.n_users_, self.n_items_ = len(self._users), len(self._items)
        self.implicit_ = implicit
        self.loss_ = loss

        # Seen items per user entity (sorted), for negatives and exclude_seen.
        seen = sp.csr_matrix((np.ones(n, np.float32), (u, i)), shape=(n_u, n_i))
        seen.sum_duplicates()
        seen.sort_indices()
        self._seen = (seen.indptr.astype(np.int64), seen.indices.astype(np.int32))
        counts = np.bincount(i, minlength=n_i).astype(np.float64)
        popularity = counts ** 0.75 if self.negative_sampling == "popularity" else (counts > 0).astype(np.float64)
        self._cdf = np.cumsum(popularity)
        self._seen_counts = counts

        self.rating_mean_ = 0.0 if implicit else float(np.average(ratings, weights=weight))
        y = np.ones(n, np.float32) if implicit else (ratings - self.rating_mean_).astype(np.float32)
        keys = [u, i]
        handle = self.net_.handle(self._bags, self._dense_tables, training=True)
        sampler = self._sampler(negatives=self.negatives if implicit else 0, seed=0)
        self.loss_curve_ = []
        n_threads = self._threads()
        for epoch in range(self.epochs):
            start = time.perf_counter()
            order = rng.permutation(n).astype(np.int64)
            sampler["seed"] = int(rng.randint(0, 2**31 - 1))
            loss_sum, rows = self.net_.train_epoch(
                handle, keys, y, weight, order, batch_size=self.batch_size, alpha=float(self.alpha),
                learning_rate=float(self.learning_rate), momentum=float(self.momentum),
                nesterov=bool(self.nesterovs_momentum), beta_1=0.9, beta_2=0.999, epsilon=1e-8, sampler=sampler,
                epoch=epoch, n_threads=n_threads)
            loss = loss_sum / max(rows, 1)
            if not np.isfinite(loss) or not self.net_.check_finite():
                raise ValueError(
                    f"training diverged at epoch {epoch + 1} (loss {loss}); lower learning_rate, alpha or "
                    "embedding_alpha, or scale the ratings")
            self.loss_curve_.append(loss)
            if self.verbose:
                seconds = time.perf_counter() - start
                print(f"epoch {epoch + 1}/{self.epochs}: loss {loss:.5f}, {rows / seconds:,.0f} examples/s")
        self._predictor = None
        return self

    def _handle(self):
        """The prediction handle, built on first use after fit (and after unpickling)."""
        if getattr(self, "_predictor", None) is None:
            self._predictor = self.net_.handle(self._bags, self._dense_tables)
        return self._predictor

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_predictor", None)  # a view over this object's arrays; rebuilt on demand
        return state

    def _sampler(self, negatives, seed):
        return {"negatives": int(negatives), "user_key": USER, "item_key": ITEM, "n_items": len(self._items) + 1,
                "cdf": self._cdf, "seen": self._seen, "seed": int(seed)}

    # ------------------------------------------------------------------------------------ predict
    def _check_fitted(self):
        if not hasattr(self, "net_"):
            raise not_fitted_error(self)

    def __sklearn_is_fitted__(self):
        return hasattr(self, "net_")

    def predict(self, users, items):
        """Predicted rating (explicit feedback) or interaction probability (implicit) of each pair.

        Unknown users or items never raise: they use the learned unknown rows (and their features when they
        were in the feature tables given to fit).
        """
        self._check_fitted()
        users = as_id_array(users, "users")
        items = as_id_array(items, "items")
        if len(users) != len(items):
            raise ValueError(f"users and items must have the same length, got {len(users)} and {len(items)}")
        keys = [self._users.index(users), self._items.index(items)]
        out = self._handle().predict(keys, self._threads())
        return out.astype(np.float64) + self.rating_mean_

    def recommend(self, users, k=10, *, exclude_seen=True, items=None):
        """The k best items for each user: (item ids (n_users, k), scores (n_users, k)), best first.

        exclude_seen: skip the items each user interacted with in training. items: rank only these
        candidates (raw ids; unknown ones are ignored). k is capped at the number of candidates; a user with
        fewer than k candidates left gets padding: id -1 (or "" for string ids) and score -inf.
        """
        self._check_fitted()
        single = _is_scalar(users)
        users = as_id_array([users] if single else users, "users")
        k = check_int(k, "k")
        check_bool(exclude_seen, "exclude_seen")
        if items is None:
            candidates = np.arange(1, len(self._items) + 1, dtype=np.int32)
        else:
            candidates = self._items.index(as_id_array(items, "items"))
            candidates = np.unique(candidates[candidates > 0]).astype(np.int32)
        k = min(k, max(len(candidates), 1))
        sampler = self._sampler(negatives=0, seed=0)
        idx, scores = self._handle().topk(sampler, self._users.index(users), candidates, k, bool(exclude_seen),
                                          self._threads())
        ids = self._items.ids[np.maximum(idx, 1) - 1]
        missing = idx < 0  # fewer than k candidates left for that user (seen items excluded)
        if missing.any():
            ids = np.where(missing, "" if ids.dtype.kind == "U" else -1, ids)
        scores = scores.astype(np.float64) + self.rating_mean_
        if single:
            return ids[0], scores[0]
        return ids, scores

    def similar_items(self, items, k=10):
        """The k items whose id embeddings are closest (cosine) to each given item's: (ids, similarities)."""
        self._check_fitted()
        k = check_int(k, "k")
        single = _is_scalar(items)
        items = as_id_array([items] if single else items, "items")
        table = self.net_.tables[1]
        rows = self._bags[1][1]  # entity -> id row of the item id table
        unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
        entity_rows = unit[rows[1:]]  # rows of known item entities (1..N)
        query = unit[rows[self._items.index(items)]]
        sims = query @ entity_rows.T
        own = self._items.index(items) - 1
        valid = own >= 0
        sims[np.flatnonzero(valid), own[valid]] = -np.inf  # never the item itself
        k = min(k, entity_rows.shape[0] - 1) if entity_rows.shape[0] > 1 else 1
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        ids = self._items.ids[top]
        out = np.take_along_axis(sims, top, axis=1)
        return (ids[0], out[0]) if single else (ids, out)
