"""`fastrec.Recommender`: a neural recommender (NCF / NeuMF family with side features) over users x items.

Users and items are *entities* numbered 1..N (0 = unknown) from the raw ids seen in the interactions and in
the side-feature tables. Key column 0 names the user entity, key column 1 the item entity; every input field
of the underlying field model (`fastrec._fieldnet.FieldNet`, docs/DESIGN.md) is read through one of them:
the user / item id embeddings, one embedding per categorical or multi-hot side-feature column, the numeric
columns as dense blocks, optionally the GMF pair of id embeddings, and optionally history fields (SVD++'s
implicit feedback: the bag of items of each user, of users of each item). An entity known only from a feature
table (a cold item) reads the "unknown" id row and its own features; the unknown rows are trained by
id dropout (a small fraction of training examples read them instead of their own id).
"""

from __future__ import annotations

import copy
import numbers

import numpy as np
import scipy.sparse as sp

from fastrec._base import BaseEstimator, exclusive_fit
from fastrec._checks import (as_array, check_bool, check_float, check_int, check_random_state, check_sample_weight,
                             not_fitted_error)
from fastrec._fieldnet import (ACTIVATIONS, OPTIMIZERS, DenseBlock, Field, FieldNet, IdIndex, bags_of_csr,
                               bags_of_ids, callable_score, check_structure, loss_curve_from_history,
                               record_structure, run_epochs)
from fastrec._registry import persistable
from fastrec.features import FeatureTable, as_id_array, column_types, split_types

__all__ = ["Recommender"]

USER, ITEM = 0, 1  # key columns
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# What "auto" means for these parameters, by loss: chosen by benchmarks/choose_defaults.py on validation
# splits of MovieLens-100k and three synthetic sets (benchmarks/QUALITY.md, "Defaults"). Ratings (mse) gain
# most from the SVD++ history fields (MovieLens-100k validation RMSE 0.924 -> 0.907) and want a smaller step;
# implicit feedback (bce) gains nothing from them there (HR@10 0.685 both ways) at 4-8x the epoch time.
_AUTO = {"mse": {"alpha": 0.1, "learning_rate": 5e-4, "embedding_alpha": 0.01, "user_history": True,
                 "item_history": True},
         "bce": {"alpha": 0.3, "learning_rate": 4e-3, "embedding_alpha": 0.03, "user_history": False,
                 "item_history": False}}
# Validation pairs scored per epoch by a ranking metric (each against 99 negatives): 10^4 pairs give a
# standard error of HR@10 under 0.005, and cost 10^6 predictions.
_MAX_RANKED = 10_000
# History fields: name -> (key column, the id field whose rows the bag lists).
_HISTORY = {"user_history": (USER, "item_id"), "item_history": (ITEM, "user_id")}
# What a fit builds the model from; partial_fit refuses to continue after set_params changed one of them.
_STRUCTURE = ("embedding_dim", "hidden_layer_sizes", "activation", "loss", "gmf", "gmf_item_features", "wide",
              "user_history", "item_history", "optimizer", "id_dropout")


def _table_rows(table, ids) -> np.ndarray:
    """Row of each id in a feature table (-1: none, or no table)."""
    return np.full(len(ids), -1, np.int64) if table is None else table.row_positions(ids)


def _append_bags(bags, extra):
    """Bag table `bags` with the rows of bag table `extra` appended."""
    indptr, ids, weights = bags
    return (np.concatenate([indptr, indptr[-1] + extra[0][1:]]), np.concatenate([ids, extra[1]]),
            np.concatenate([weights, extra[2]]))


def _item_feature_bags(fields, bags):
    """Bag table over a table laid out as [values of each categorical / multi-hot item field | item id rows]:
    each item's feature values (weights as in their own fields) and its id row. Returns (bag table, number of
    feature rows before the id rows)."""
    parts = [sp.csr_matrix((w, ids, indptr), shape=(len(indptr) - 1, f.vocab))
             for f, (indptr, ids, w) in zip(fields, bags) if f.role == "mlp" and f.name.startswith("item:")]
    n_features = sum(p.shape[1] for p in parts)
    indptr, ids, w = bags[ITEM]  # the id field's bags: item -> id row
    parts.append(sp.csr_matrix((w, ids, indptr), shape=(len(indptr) - 1, fields[ITEM].vocab)))
    X = sp.hstack(parts).tocsr()
    X.sort_indices()
    return bags_of_csr(X, mean=False), n_features


def _merge_seen(indptr, indices, users, items, n_items):
    """The seen-items CSR (rows sorted, no duplicates) with the pairs (users, items) added. Only the rows of
    these users are searched and the rest is copied once (np.insert), so a small partial_fit on a long
    history costs a copy, not a re-sort of every pair."""
    if len(users) == 0:
        return indptr, indices
    new = np.unique(users.astype(np.int64) * n_items + items)  # sorted, deduplicated (user, item) keys
    rows = np.unique(new // n_items)
    starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
    before = np.concatenate([[0], np.cumsum(lengths)])  # entries of the touched rows ahead of each row
    at = np.repeat(starts - before[:-1], lengths) + np.arange(before[-1])  # their positions in indices
    old = np.repeat(rows, lengths) * n_items + indices[at]  # their keys, sorted
    j = np.searchsorted(old, new)
    fresh = old[np.minimum(j, len(old) - 1)] != new if len(old) else np.ones(len(new), bool)
    new, j = new[fresh], j[fresh]
    row = new // n_items
    # position in the row = keys of the row below the new one = j - entries of the touched rows before it
    pos = indptr[row] + j - before[np.searchsorted(rows, row)]
    indices = np.insert(indices, pos, (new % n_items).astype(np.int32))
    indptr = indptr + np.concatenate([[0], np.cumsum(np.bincount(row, minlength=len(indptr) - 1))]).astype(np.int64)
    return indptr, indices


def _validation_split(users, items, fraction, rng) -> np.ndarray:
    """Mask of the interactions held out for early stopping: a random `fraction`, except those whose user or
    item would be left with no training interaction (an id seen only in validation would be scored from its
    untrained row and mislead the stopping rule)."""
    held = rng.random_sample(len(users)) < fraction
    for ids in (users, items):
        _, entity, total = np.unique(ids, return_inverse=True, return_counts=True)
        entity = entity.ravel()
        trained = total - np.bincount(entity, weights=held, minlength=len(total))
        held &= trained[entity] > 0  # returning a pair to training only adds training interactions
    return held


def _rankable(users, items, val_users):
    """(mask of the validation pairs whose user has at least n_negatives untouched items, n_negatives), where
    (users, items) are all the pairs touched (training and validation, repeats allowed): the validation
    ranking draws min(99, half the items) negatives per pair among the items its user never touched."""
    universe, item_codes = np.unique(items, return_inverse=True)
    n_negatives = min(99, len(universe) // 2)
    user_ids, user_codes = np.unique(users, return_inverse=True)
    pairs = np.unique(user_codes.ravel().astype(np.int64) * len(universe) + item_codes.ravel())
    touched = np.bincount(pairs // len(universe), minlength=len(user_ids))  # distinct items per user
    untouched = len(universe) - touched[np.searchsorted(user_ids, val_users)]
    return (untouched >= n_negatives) & (n_negatives >= 1), n_negatives


def _as_known_kind(model, users, items):
    """Validation pairs with ids of the model's kind (int or str): converted where exact, else dropped, as
    predict would treat them as unknown (and IdIndex reports it)."""
    if (users.dtype.kind == "U") == (model._users.ids.dtype.kind == "U") and \
            (items.dtype.kind == "U") == (model._items.ids.dtype.kind == "U"):
        return users, items
    eu, ei = model._users.index(users), model._items.index(items)
    keep = (eu > 0) & (ei > 0)
    return model._users.ids[eu[keep] - 1], model._items.ids[ei[keep] - 1]


def _is_auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


def _is_scalar(value) -> bool:
    """One id rather than an array of them (ragged nested lists are neither: as_id_array reports them)."""
    try:
        return np.ndim(value) == 0
    except ValueError:
        return False


@persistable
class Recommender(BaseEstimator):
    """Neural recommender trained on (user, item[, rating]) interactions, with optional side features.

    Parameters
    ----------
    embedding_dim : int, default=64
        Dimension of the user / item id embeddings and of each side-feature embedding.
    hidden_layer_sizes : tuple of int, default=(128, 64)
        The MLP over the concatenated embeddings and numeric features.
    activation : {"relu", "tanh", "logistic", "identity"}, default="relu"
    loss : {"auto", "mse", "bce"}, default="auto"
        "auto": "mse" on ratings, "bce" on implicit feedback (ratings=None).
    gmf : bool, default=True
        Add NeuMF's generalized matrix factorisation term (its own user / item embeddings).
    gmf_item_features : bool, default=False
        With ``gmf``: the item's GMF vector is the sum of its id embedding and of an embedding per value of its
        categorical / multi-hot item features (LightFM's item representation), so that a user's GMF vector
        meets the item's genres directly, and an item known only by its features (a cold item) gets a GMF
        vector from them. This GMF item vector is never dropped by ``id_dropout``: a cold item's id part is
        zero and its features are the rest. On MovieLens-100k cold items it validated ~0.002 RMSE better
        (benchmarks/QUALITY.md).
    wide : bool, default=True
        Add a linear term to the output (Wide & Deep): a learned bias per user, per item and per value of
        every categorical / multi-hot side feature. It is what lets items known only by their features get
        their features' typical rating.
    user_history : bool or "auto", default="auto"
        "auto": True for ratings, False for implicit feedback. Add SVD++'s implicit feedback as an input
        field: each user is also described by the bag of items it interacted with in training (its own item
        embedding table, weights 1/sqrt(bag size) as in SVD++).
        A user unknown at fit time has an empty bag; ``partial_fit`` extends the bags with its interactions.
        ``id_dropout`` applies to it as to the id (a dropped example reads the empty bag).
    item_history : bool or "auto", default="auto"
        "auto" as ``user_history``. The same on the item side: each item is also described by the bag of
        users who interacted with it.
    optimizer : {"adam", "adagrad", "sgd"}, default="adam"
        Lazy Adam, row-wise Adagrad or plain SGD on the embedding rows of each batch; Adam, Adagrad or SGD
        (with ``momentum``) on the MLP.
    learning_rate : float or "auto", default="auto"
        "auto": 5e-4 for ratings (loss "mse"), 4e-3 for implicit feedback (loss "bce").
    alpha : float or "auto", default="auto"
        L2 penalty ``0.5 * alpha * ||w||^2 / batch`` on the MLP weights (and on the embedding rows a batch
        touches, unless ``embedding_alpha`` is set: lazy regularisation keeps a step's cost independent of
        the vocabulary size). "auto": 0.1 for ratings, 0.3 for implicit feedback. The "auto" values and the
        other defaults were chosen on validation splits of several data sets (benchmarks/choose_defaults.py).
    embedding_alpha : float, None or "auto", default="auto"
        L2 weight of the embedding tables (None: ``alpha``). "auto": 0.01 for ratings, 0.03 for implicit
        feedback: a strong penalty on the MLP and a weak one on the embeddings is what validated best.
    epochs : int, default=50
        The most epochs a fit runs (early stopping usually ends it sooner).
    batch_size : int, default=256
        Interactions per step (negatives come on top).
    negatives : int, default=4
        Implicit feedback: items sampled per positive as label-0 examples, fresh each epoch. A draw that is
        one of the user's training items is drawn again, up to 64 draws, and the 64th is kept, so a user whose
        items hold most of the sampling mass (or who interacted with every item) also gets some of them as
        negatives.
    negative_sampling : {"uniform", "popularity"}, default="uniform"
        "uniform": uniform over the items with training interactions; "popularity": proportional to
        count^0.75 (word2vec's smoothing), count being the item's interactions given to fit / partial_fit
        (repeats and the pairs held out by ``early_stopping`` included). Items known only from feature
        tables are never sampled.
    id_dropout : float, default=0.05
        Fraction of training examples that read the learned "unknown" id row instead of their own, which is
        what ids never seen in training (and items known only by side features) use.
    momentum, nesterovs_momentum : float, bool
        SGD on the MLP.
    validation_metric : str, default="auto"
        What ``fit(..., validation_data=...)`` reports after each epoch in ``history_``: "rmse" or "mae" for
        ratings ("auto": "rmse"); "ndcg@K" or "hr@K" for implicit feedback ("auto": "ndcg@10"), each
        validation pair ranked against 99 items its user never interacted with (half the items, when there
        are fewer than 200; pairs whose user touched almost every item are left out).
    early_stopping : bool, default=True
        When ``fit`` gets no ``validation_data``: hold out ``validation_fraction`` of the interactions (never
        an interaction whose user or item has no other one), train on the rest, score ``validation_metric``
        on the held-out ones after every epoch, stop after ``n_iter_no_change`` epochs without improvement and
        keep the best epoch (``best_epoch_``). The held-out interactions count as seen (``recommend`` excludes
        them) but never enter the history fields' bags. False: train on every interaction for ``epochs``
        epochs. Like scikit-learn's ``early_stopping``. Nothing is held out by ``partial_fit``, with
        ``epochs=1``, or when no interaction qualifies (then training runs all ``epochs``; implicit
        feedback: a pair qualifies only if its user leaves enough untouched items to rank it against).
    validation_fraction : float, default=0.1
        The fraction held out by ``early_stopping``.
    n_iter_no_change : int or None, default=5
        With validation (``validation_data`` or ``early_stopping``): stop after this many epochs without
        improvement of the validation score and keep the parameters of the best epoch (``best_epoch_``).
        None: never stop early (the scores are still recorded in ``history_``).
    clip_predictions : bool, default=True
        Explicit ratings: ``predict`` and ``recommend`` scores are clipped to the range of the training ratings
        (``rating_range_``), which lowers the error of every prediction beyond it.
    random_state : int, RandomState or None
    n_threads : int or None
        Threads of the core (None: all cores). Results are identical for any value.
    verbose : bool

    Attributes
    ----------
    n_users_, n_items_ : int
        Entities known after fit (from interactions and feature tables).
    loss_curve_ : list of float
        Mean training loss per epoch (``history_["loss"]``).
    history_ : dict of lists
        Per epoch: "loss", "seconds" and, with validation data, "val_<metric>".
    best_epoch_ : int
        With validation data: the epoch (from 1) with the best validation metric.
    rating_mean_ : float
        Mean training rating (explicit feedback): the model predicts the deviation from it.
    rating_range_ : (float, float) or None
        Smallest and largest training rating (None for implicit feedback): the clipping range.
    validation_size_ : int
        With ``early_stopping`` and no ``validation_data``: how many interactions were held out.
    """

    loss_curve_ = loss_curve_from_history

    def __init__(self, embedding_dim=64, hidden_layer_sizes=(128, 64), activation="relu", loss="auto", gmf=True,
                 gmf_item_features=False, wide=True, user_history="auto", item_history="auto",
                 optimizer="adam", learning_rate="auto", alpha="auto", embedding_alpha="auto", epochs=50,
                 batch_size=256, negatives=4,
                 negative_sampling="uniform", id_dropout=0.05, momentum=0.9, nesterovs_momentum=True,
                 validation_metric="auto", early_stopping=True, validation_fraction=0.1, n_iter_no_change=5,
                 clip_predictions=True, random_state=None, n_threads=None, verbose=False):
        self.embedding_dim = embedding_dim
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.loss = loss
        self.gmf = gmf
        self.gmf_item_features = gmf_item_features
        self.wide = wide
        self.user_history = user_history
        self.item_history = item_history
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
        self.validation_metric = validation_metric
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.clip_predictions = clip_predictions
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
        if not _is_auto(self.learning_rate):
            check_float(self.learning_rate, "learning_rate", low_open=True)
        if not _is_auto(self.alpha):
            check_float(self.alpha, "alpha")
        if self.embedding_alpha is not None and not _is_auto(self.embedding_alpha):
            check_float(self.embedding_alpha, "embedding_alpha")
        check_float(self.momentum, "momentum", 0.0, 1.0, high_open=False)
        for name in ("gmf", "gmf_item_features", "wide", "nesterovs_momentum"):
            check_bool(getattr(self, name), name)
        for name in _HISTORY:
            if not _is_auto(getattr(self, name)):
                check_bool(getattr(self, name), name)
        check_int(self.epochs, "epochs")
        for name in ("early_stopping", "clip_predictions"):
            check_bool(getattr(self, name), name)
        check_float(self.validation_fraction, "validation_fraction", 0.0, 1.0, low_open=True, high_open=True)
        check_int(self.batch_size, "batch_size")
        check_int(self.negatives, "negatives", minimum=0)
        # The core reads id_dropout as a float32, where 0.99999999 is 1.
        dropout = self.id_dropout
        if not (isinstance(dropout, numbers.Real) and 0 <= dropout < 1 and np.float32(dropout) < 1):
            raise ValueError(f"id_dropout must lie in [0, 1), got {self.id_dropout!r}")
        if self.n_threads is not None:
            check_int(self.n_threads, "n_threads")
        if self.n_iter_no_change is not None:
            check_int(self.n_iter_no_change, "n_iter_no_change")
        loss = self.loss if self.loss != "auto" else ("bce" if implicit else "mse")
        if implicit and loss == "mse":
            raise ValueError("loss='mse' needs ratings; implicit feedback (ratings=None) trains with 'bce'")
        return hidden, loss

    def _setting(self, name, loss):
        """Parameter `name` with "auto" resolved for this loss (_AUTO)."""
        value = getattr(self, name)
        return _AUTO[loss][name] if _is_auto(value) else value

    # ------------------------------------------------------------------------------------ features
    def _feature_inputs(self, table: FeatureTable | None, ids, key: int, side: str, fit: bool):
        """Fields, dense blocks, bag tables and dense tables of one side's feature table, one row per entity
        (entity 0, the unknown one, first)."""
        fields, dense, bags, dense_tables = [], [], [], []
        if table is None:
            return fields, dense, bags, dense_tables
        rows = np.concatenate([[-1], table.row_positions(ids)])  # table row of each entity (-1: none)
        if fit:
            # name -> (kind, vocabulary): categorical values sorted, multi-hot labels in column order.
            self._vocab_[side] = {name: ("categorical", np.unique(v)) for name, v in table.categorical.items()}
            self._vocab_[side].update({name: ("multi_hot", np.asarray(v)) for name, (_, v) in table.multi_hot.items()})
            self._numeric_stats_[side] = {}
            for name, values in table.numeric.items():
                values = values.reshape(len(table), -1)
                std = values.std(axis=0)
                self._numeric_stats_[side][name] = (values.mean(axis=0), np.where(std > 0, std, 1.0))
        for name in [*table.categorical, *table.multi_hot]:
            vocab = len(self._vocab_[side][name][1]) + (name in table.categorical)  # + the unknown value
            fields.append(Field(f"{side}:{name}", vocab, self.embedding_dim, key))
            bags.append(self._feature_bags(table, rows, side, name))
        for name in table.numeric:
            t = self._numeric_rows(table, rows, side, name)
            dense.append(DenseBlock(f"{side}:{name}", t.shape[1], key))
            dense_tables.append(t)
        return fields, dense, bags, dense_tables

    def _feature_bags(self, table, rows, side, name):
        """Bag table of column `name` for table rows `rows` (-1: no row, an unknown value / empty bag),
        encoded with the vocabulary of the first fit."""
        kind, vocab = self._vocab_[side][name]
        has = rows >= 0
        if table is None or name not in (table.categorical if kind == "categorical" else table.multi_hot):
            # No table (or no such column) for these entities: unknown values, empty bags.
            if kind == "categorical":
                return bags_of_ids(np.zeros(len(rows), np.int32))
            return (np.zeros(len(rows) + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
        if kind == "categorical":
            values = table.categorical[name]
            if (values.dtype.kind == "U") != (vocab.dtype.kind == "U"):  # str vs int: no value is known
                return bags_of_ids(np.zeros(len(rows), np.int32))
            pos = np.minimum(np.searchsorted(vocab, values), len(vocab) - 1)
            code = np.where(vocab[pos] == values, pos + 1, 0)  # 0 = unknown value
            return bags_of_ids(np.where(has, code[np.maximum(rows, 0)], 0))
        X, labels = table.multi_hot[name]
        column = {v: j for j, v in enumerate(vocab.tolist())}
        to_fit = np.array([column.get(v, -1) for v in np.asarray(labels).tolist()], np.int64)
        X = sp.diags(has.astype(np.float32)) @ X.tocsr()[np.maximum(rows, 0)]  # no row: empty bag
        X = X.tocoo()
        keep = (X.data != 0) & (to_fit[X.col] >= 0)  # values the first fit never saw are dropped
        X = sp.csr_matrix((X.data[keep], (X.row[keep], to_fit[X.col[keep]])), shape=(len(rows), len(vocab)))
        return bags_of_csr(X, mean=True)

    def _numeric_rows(self, table, rows, side, name):
        """Standardised numeric column `name` for table rows `rows` (-1 or no table: 0, the mean)."""
        mean, std = self._numeric_stats_[side][name]
        if table is None or name not in table.numeric:
            return np.zeros((len(rows), len(mean)), np.float32)
        values = table.numeric[name].reshape(len(table), -1)
        if values.shape[1] != len(mean):
            raise ValueError(f"{side}_features column {name!r} has {values.shape[1]} values per row; the model "
                             f"was fit with {len(mean)}")
        t = np.where((rows >= 0)[:, None], (values[np.maximum(rows, 0)] - mean) / std, 0.0)
        return np.ascontiguousarray(t, dtype=np.float32)

    def _check_table(self, table, name, feature_types=None, *, first_fit=False):
        """`table` as a FeatureTable; a DataFrame's column types are those given, else those of the first fit,
        else guessed (and reported)."""
        if table is None or isinstance(table, FeatureTable):
            return table
        if not (hasattr(table, "columns") and hasattr(table, "index")):
            raise TypeError(f"{name} must be a fastrec.features.FeatureTable or a pandas DataFrame indexed by id")
        if not first_fit:  # partial_fit / add_features read the new rows as the first fit read its table
            known = {(tuple(c) if isinstance(c, list) else c): t  # saved as pairs (JSON has no tuple keys)
                     for c, t in getattr(self, "_column_types_", {}).get(name, [])}
            feature_types = {**known, **(feature_types or {})}
        types = column_types(table, feature_types, label=name, verbose=bool(self.verbose))
        if first_fit:
            self._column_types_[name] = [[c, t] for c, t in types.items()]
        categorical, multi_hot, numeric = split_types(types)
        return FeatureTable.from_dataframe(table, categorical=categorical, multi_hot=multi_hot, numeric=numeric)

    # ------------------------------------------------------------------------------------ fit
    def _check_interactions(self, users, items, ratings, sample_weight):
        users = as_id_array(users, "users")
        items = as_id_array(items, "items")
        n = len(users)
        if n == 0:
            raise ValueError("users is empty: fit needs at least one interaction")
        if len(items) != n:
            raise ValueError(f"users and items must have the same length, got {n} and {len(items)}")
        if ratings is not None:
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
        return users, items, ratings, weight

    @exclusive_fit
    def fit(self, users, items, ratings=None, *, user_features=None, item_features=None, sample_weight=None,
            validation_data=None, feature_types=None):
        """Train on interactions (users[i], items[i]) with ratings, or implicit feedback when ratings is None.

        users, items : (n,) arrays of raw ids (ints or strings).
        ratings : (n,) numbers, or None for implicit feedback (every pair a positive; negatives sampled).
        user_features, item_features : FeatureTable (or DataFrame indexed by id), optional. They may hold
            ids absent from the interactions (e.g. new items): those are scored from their features.
        sample_weight : (n,) non-negative weights, optional.
        validation_data : (users, items) or (users, items, ratings), or a callable, optional. A tuple is
            scored with ``validation_metric`` after every epoch (``history_["val_<metric>"]``); a callable
            ``score(model, epoch) -> float`` (higher is better, as scikit-learn's scorers: return -rmse for
            an error) is called after every epoch (``history_["val_score"]``), so early stopping can follow
            any protocol. With ``n_iter_no_change``, training stops when the score stops improving and the
            best epoch's parameters are kept. Without validation_data and with ``early_stopping`` (the
            default), ``validation_fraction`` of the interactions is held out for this (see the class
            docstring).
        feature_types : dict column name -> kind, optional. The kind of DataFrame columns of
            ``user_features`` / ``item_features``: "categorical", "numeric", "multi_hot" (labels joined by
            "|") or "multi_hot:SEP" (joined by SEP, e.g. "multi_hot: " for spaces). Columns not named here
            are guessed by ``fastrec.features.column_types`` (lists -> multi_hot; floats -> numeric;
            integers -> numeric, or categorical when they take at most 16 distinct values; strings ->
            categorical, or multi_hot when they look like delimited lists of labels); the guesses that may be
            wrong are reported by a warning, and ``verbose=True`` prints every guess.
        """
        users, items, ratings, weight = self._check_interactions(users, items, ratings, sample_weight)
        self._fit_new(users, items, ratings, weight, user_features, item_features, self.epochs, validation_data,
                      feature_types, auto_validation=True)
        return self

    def _fit_new(self, users, items, ratings, weight, user_features, item_features, epochs, validation_data,
                 feature_types=None, auto_validation=False):
        """A first fit (fit, or partial_fit of an unfitted model): fresh entities, fields and parameters."""
        hidden, loss = self._validate_params(ratings is None)
        validate = self._validation(validation_data, ratings is None)
        if feature_types is not None:
            if not isinstance(feature_types, dict):
                raise TypeError(f"feature_types must be a dict column name -> type, got {type(feature_types).__name__}")
            columns = {c for t in (user_features, item_features) if hasattr(t, "columns") and not
                       isinstance(t, FeatureTable) for c in t.columns}
            unknown = [c for c in feature_types if c not in columns]
            if unknown:
                raise ValueError(f"feature_types names {unknown}, not a column of a user_features / item_features "
                                 f"DataFrame (columns: {sorted(map(str, columns))})")
        self._column_types_ = {}  # filled by _check_table: the types partial_fit and add_features reuse
        user_features = self._check_table(user_features, "user_features", feature_types, first_fit=True)
        item_features = self._check_table(item_features, "item_features", feature_types, first_fit=True)
        for name in ("net_", "_predictor", "best_epoch_", "validation_size_", "_held_out"):
            self.__dict__.pop(name, None)
        self._rng = check_random_state(self.random_state)
        held_out = None
        if auto_validation and validate is None and self.early_stopping and epochs > 1:
            held = _validation_split(users, items, self.validation_fraction, self._rng)
            if ratings is None:  # a tiny catalogue, or users who touched almost every item: nothing to rank
                held[held] = _rankable(users, items, users[held])[0]
            if held.any():
                held_out = (users[held], items[held])
                self.validation_size_ = int(held.sum())
                validate = self._validation((users[held], items[held], None if ratings is None else ratings[held]),
                                            ratings is None)
                keep = ~held
                users, items = users[keep], items[keep]
                ratings = None if ratings is None else ratings[keep]
                weight = None if weight is None else weight[keep]
        self._build(users, items, ratings, weight, user_features, item_features, hidden, loss)
        record_structure(self, _STRUCTURE)
        self._train(users, items, ratings, weight, epochs, validate, also_seen=held_out)

    @exclusive_fit
    def partial_fit(self, users, items, ratings=None, *, user_features=None, item_features=None,
                    sample_weight=None, feature_types=None):
        """One more epoch over these interactions, continuing from the current parameters and optimizer state.

        Ids never seen before are added: the id tables and their optimizer state grow, the new ids' features
        are read from ``user_features`` / ``item_features`` if given (with the vocabularies and scaling of the
        first fit; the features of ids already known are not changed; ids only in these tables are added
        too, scored from their features), and the interactions join the seen items (excluded by
        ``recommend``, and rejected as negatives up to the sampler's 64-draw cap). On an unfitted model it is ``fit``
        with one epoch. The ratings' kind (explicit or implicit) must match the first fit. Training
        parameters (learning_rate, alpha, batch_size, negatives, ...) may change between calls; a parameter
        the model was built from (embedding_dim, hidden_layer_sizes, activation, loss, gmf,
        gmf_item_features, wide, user_history, item_history, optimizer, id_dropout) may not: changing one
        with ``set_params`` makes partial_fit raise ValueError, and ``fit`` builds a new model.
        DataFrame feature columns are read with the types of the first fit; ``feature_types`` (as in ``fit``)
        types the columns that fit did not see (or all of them, on an unfitted model).
        """
        users, items, ratings, weight = self._check_interactions(users, items, ratings, sample_weight)
        if not hasattr(self, "net_"):
            self._fit_new(users, items, ratings, weight, user_features, item_features, 1, None, feature_types)
            return self
        if (ratings is None) != self.implicit_:
            raise ValueError(f"this model was fit on {'implicit feedback' if self.implicit_ else 'ratings'}; "
                             f"partial_fit needs {'ratings=None' if self.implicit_ else 'ratings'} too")
        self._validate_params(ratings is None)
        check_structure(self)
        self._grow(users, items, self._check_table(user_features, "user_features", feature_types),
                   self._check_table(item_features, "item_features", feature_types))
        self._train(users, items, ratings, weight, 1, None)
        if ratings is not None and getattr(self, "rating_range_", None) is not None:
            self.rating_range_ = (min(self.rating_range_[0], float(ratings.min())),
                                  max(self.rating_range_[1], float(ratings.max())))
        return self

    def _validation(self, data, implicit):
        """A function scoring the current parameters on validation_data (None without it), its metric name
        and direction."""
        if data is None:
            return None
        if callable(data):
            return callable_score(self, data), "score", True
        if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
            raise ValueError("validation_data must be a tuple (users, items) or (users, items, ratings), or a "
                             "callable score(model, epoch)")
        metric = self.validation_metric
        if metric == "auto":
            metric = "ndcg@10" if implicit else "rmse"
        if implicit and len(data) == 3 and data[2] is not None:
            raise ValueError("validation_data has ratings but fit got implicit feedback (ratings=None)")
        if not implicit and (len(data) != 3 or data[2] is None):
            raise ValueError("validation_data needs ratings: (users, items, ratings)")
        val_users, val_items, val_ratings, _ = self._check_interactions(
            data[0], data[1], None if implicit else data[2], None)
        if metric in ("rmse", "mae") and not implicit:
            from fastrec.metrics import mae, rmse

            error = {"rmse": rmse, "mae": mae}[metric]
            return lambda: error(val_ratings, self.predict(val_users, val_items)), metric, False
        kind, _, k = metric.partition("@")
        if implicit and kind in ("hr", "ndcg") and k.isdigit() and int(k) > 0:
            from fastrec.evaluation import rank_candidates, sampled_candidates

            if len(val_users) > _MAX_RANKED:  # 100 predictions per pair: a fixed subset keeps an epoch's check cheap
                pick = np.sort(np.random.default_rng(0).choice(len(val_users), _MAX_RANKED, replace=False))
                val_users, val_items = val_users[pick], val_items[pick]

            ranked = {}

            def score():
                """Each validation pair against min(99, half the items) items its user never touched, drawn once
                (the seen pairs do not change during a fit) and ranked again after every epoch; pairs of users
                with fewer untouched items than that are left out, and with none left the score is NaN (it
                never counts as an improvement)."""
                if not ranked:
                    seen_users, seen_items = self.seen_pairs()
                    users, items = _as_known_kind(self, val_users, val_items)
                    keep, n_negatives = _rankable(np.concatenate([seen_users, users]),
                                                  np.concatenate([seen_items, items]), users)
                    ranked["candidates"] = None
                    if n_negatives >= 1 and keep.any():
                        ranked["candidates"] = sampled_candidates(
                            users[keep], items[keep], seen_users=seen_users, seen_items=seen_items,
                            n_negatives=n_negatives, random_state=0)
                if ranked["candidates"] is None:
                    return float("nan")
                return rank_candidates(self, *ranked["candidates"], int(k))[metric]
            return score, metric, True
        allowed = "'ndcg@K' or 'hr@K'" if implicit else "'rmse' or 'mae'"
        raise ValueError(f"validation_metric must be 'auto' or {allowed} for this data, got {metric!r}")

    def _build(self, users, items, ratings, weight, user_features, item_features, hidden, loss):
        """Entities, fields, parameters and optimizer state for a first fit."""
        rng = self._rng
        self._users = IdIndex(users, None if user_features is None else user_features.ids, what="users")
        self._items = IdIndex(items, None if item_features is None else item_features.ids, what="items")
        u = self._users.index(users)
        i = self._items.index(items)
        n_u, n_i = len(self._users) + 1, len(self._items) + 1
        # Id rows: entities seen in interactions get one each, in entity order (others read row 0, unknown).
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
            f, b, bg, dt = self._feature_inputs(table, entities.ids, key, side, fit=True)
            fields += f
            dense += b
            bags += bg
            dense_tables += dt
        if self.gmf:
            fields.append(Field("user_gmf", len(trained_users) + 1, d, USER, role="gmf_u", dropout=dropout, source=0))
            bags.append(bags[0])
            item_bags, n_features = _item_feature_bags(fields, bags) if self.gmf_item_features else (None, 0)
            if n_features:
                # Its own bags over [feature values | id rows]; never dropped (a dropped example would read entity
                # 0's bag, losing its features too): the features are what cold items read here.
                fields.append(Field("item_gmf", n_features + len(trained_items) + 1, d, ITEM, role="gmf_v"))
                bags.append(item_bags)
            else:
                fields.append(Field("item_gmf", len(trained_items) + 1, d, ITEM, role="gmf_v", dropout=dropout,
                                    source=1))
                bags.append(bags[1])
        if self.wide:  # a bias per id and per categorical / multi-hot feature value, on the same bags
            embedded = [(i, f, b) for i, (f, b) in enumerate(zip(fields, bags)) if f.role == "mlp"]
            for i, f, b in embedded:
                fields.append(Field(f"{f.name}:wide", f.vocab, 1, f.key, role="wide", dropout=f.dropout, source=i))
                bags.append(b)
        for name, (key, source) in _HISTORY.items():  # their bags are built from the seen pairs by _train
            if self._setting(name, loss):
                fields.append(Field(name, fields[[f.name for f in fields].index(source)].vocab, d, key,
                                    dropout=dropout))
                bags.append(None)
        embedding_alpha = self._setting("embedding_alpha", loss)
        if embedding_alpha is not None:
            for f in fields:
                f.alpha = float(embedding_alpha)
        self._bags, self._dense_tables = bags, dense_tables
        self.net_ = FieldNet(fields, dense, hidden, self.activation, loss, 2, rng)
        for i, f in enumerate(fields):
            if f.role == "gmf_v" and f.source is None:
                # The unknown item's id part (never trained: the field is never dropped) adds nothing.
                self.net_.tables[i][f.vocab - len(trained_items) - 1] = 0.0
        self.net_.reset_optimizer(self.optimizer)
        self.implicit_ = ratings is None
        self.loss_ = loss
        self.rating_mean_ = 0.0 if self.implicit_ else float(np.average(ratings, weights=weight))
        self.rating_range_ = None if self.implicit_ else (float(ratings.min()), float(ratings.max()))
        self._seen = (np.zeros(n_u + 1, np.int64), np.zeros(0, np.int32))
        self._seen_counts = np.zeros(n_i, np.float64)
        self.history_ = {"loss": [], "seconds": []}

    def _grow(self, users, items, user_features, item_features):
        """Add the entities of these interactions (and their features) to a fitted model; on any error the
        model is left as it was."""
        net = self.net_
        saved = (copy.copy(self._users), copy.copy(self._items), list(self._bags), list(self._dense_tables),
                 [f.vocab for f in net.fields], list(net.tables), list(net.table_state1), list(net.table_state2),
                 self._seen, self._seen_counts)
        try:
            self._grow_unguarded(users, items, user_features, item_features)
        except BaseException:
            (self._users, self._items, self._bags, self._dense_tables, vocabs, net.tables, net.table_state1,
             net.table_state2, self._seen, self._seen_counts) = saved
            for f, vocab in zip(net.fields, vocabs):
                f.vocab = vocab
            raise
        self._predictor = None

    def _grow_unguarded(self, users, items, user_features, item_features):
        old = {USER: len(self._users), ITEM: len(self._items)}
        for entities, raw, table in ((self._users, users, user_features), (self._items, items, item_features)):
            entities.add(raw)
            if table is not None:  # ids known only by their features are scored from them, as after fit
                entities.add(table.ids)
        sides = {USER: ("user", self._users, users, user_features), ITEM: ("item", self._items, items, item_features)}
        # Id rows (fields USER and ITEM are the user and item id fields): the entities of these interactions
        # without one yet (new ones, or ones known only by features) get the next rows.
        id_rows = {}
        for key, (_, entities, raw, _) in sides.items():
            vocab = self.net_.fields[key].vocab
            id_row = np.concatenate([self._bags[key][1], np.zeros(len(entities) - old[key], np.int32)])
            needing = np.unique(entities.index(raw))
            needing = needing[id_row[needing] == 0]
            id_row[needing] = np.arange(vocab, vocab + len(needing), dtype=np.int32)
            id_rows[key] = (id_row, vocab + len(needing))

        def new_table_rows(key):  # feature-table row of each new entity of that side (-1: none)
            side, entities, _, table = sides[key]
            return _table_rows(table, entities.ids[old[key]:])

        grown = {}  # source field -> its grown bag table (GMF and wide fields read their source's bags)
        for i, f in enumerate(self.net_.fields):
            if f.name in _HISTORY:  # one row per id row of the other side; bags rebuilt from the seen pairs
                self.net_.grow(i, id_rows[USER if _HISTORY[f.name][1] == "user_id" else ITEM][1], self._rng)
                continue
            if f.role == "gmf_v" and f.source is None:  # gmf_item_features: the grown id and feature bags
                self._bags[i], n_features = _item_feature_bags(self.net_.fields[:i], self._bags[:i])
                self.net_.grow(i, n_features + id_rows[ITEM][1], self._rng)
                continue
            source = i if f.source is None else f.source
            if source not in grown:
                if source in id_rows:
                    grown[source] = bags_of_ids(id_rows[source][0])
                else:
                    side, column = self.net_.fields[source].name.split(":", 1)
                    table = sides[f.key][3]
                    grown[source] = _append_bags(self._bags[source],
                                                 self._feature_bags(table, new_table_rows(f.key), side, column))
            self._bags[i] = grown[source]
            if source in id_rows:
                self.net_.grow(i, id_rows[source][1], self._rng)
        for b, block in enumerate(self.net_.dense):
            side, column = block.name.split(":", 1)
            extra = self._numeric_rows(sides[block.key][3], new_table_rows(block.key), side, column)
            self._dense_tables[b] = np.ascontiguousarray(np.vstack([self._dense_tables[b], extra]))
        n_new_users, n_new_items = len(self._users) - old[USER], len(self._items) - old[ITEM]
        self._seen = (np.concatenate([self._seen[0], np.full(n_new_users, self._seen[0][-1], np.int64)]),
                      self._seen[1])
        self._seen_counts = np.concatenate([self._seen_counts, np.zeros(n_new_items)])

    def _update_counts(self):
        """What follows from the seen pairs: entity counts, the negative-sampling distribution over item
        entities, the history fields' bags."""
        counts = self._seen_counts
        popularity = counts ** 0.75 if self.negative_sampling == "popularity" else (counts > 0).astype(np.float64)
        self._cdf = np.cumsum(popularity)
        self.n_users_, self.n_items_ = len(self._users), len(self._items)
        self._history_bags()

    @exclusive_fit
    def add_features(self, *, user_features=None, item_features=None, feature_types=None):
        """Make users or items known only by their features scoreable, without training (cold start: an item
        in the catalogue before anyone interacted with it, a user who just signed up).

        Ids of these tables that the model does not know are added and scored from then on from their
        features (with the vocabularies and scaling of the first fit) and the learned unknown id rows. Ids
        already known keep their features. DataFrame columns are read as in ``partial_fit``. Returns self.
        """
        self._check_fitted()
        user_features = self._check_table(user_features, "user_features", feature_types)
        item_features = self._check_table(item_features, "item_features", feature_types)
        none = np.zeros(0, np.int64)
        self._grow(none, none, user_features, item_features)
        self._update_counts()
        return self

    def _train(self, users, items, ratings, weight, epochs, validate, also_seen=None):
        """Add the interactions (and `also_seen`, held-out (users, items) pairs never trained on) to the seen
        items and popularity, then run `epochs` epochs over the interactions."""
        n = len(users)
        u = self._users.index(users)
        i = self._items.index(items)
        n_i = len(self._items) + 1
        seen_u, seen_i = u, i
        if also_seen is not None:
            hu, hi = self._users.index(also_seen[0]), self._items.index(also_seen[1])
            seen_u, seen_i = np.concatenate([u, hu]), np.concatenate([i, hi])
            # Held-out pairs never enter the history bags: a validation item in its user's bag would leak.
            held = np.setdiff1d(np.unique(hu.astype(np.int64) * n_i + hi), u.astype(np.int64) * n_i + i)
            self._held_out = ((held // n_i).astype(np.int32), (held % n_i).astype(np.int32))
        elif getattr(self, "_held_out", None) is not None:  # held-out pairs partial_fit trains join the bags
            hu, hi = self._held_out
            kept = ~np.isin(hu.astype(np.int64) * n_i + hi, u.astype(np.int64) * n_i + i)
            self._held_out = (hu[kept], hi[kept])
        self._seen = _merge_seen(*self._seen, seen_u, seen_i, n_i)
        self._seen_counts = self._seen_counts + np.bincount(seen_i, minlength=n_i)
        self._update_counts()

        y = np.ones(n, np.float32) if self.implicit_ else (ratings - self.rating_mean_).astype(np.float32)
        handle = self.net_.handle(self._bags, self._dense_tables, training=True)
        sampler = self._sampler(negatives=self.negatives if self.implicit_ else 0, seed=0)
        self._predictor = None  # also what makes an interrupted fit predict with the new parameters
        fn, metric, higher = validate if validate is not None else (None, None, False)
        run_epochs(self, self.net_, handle, [u, i], y, weight, n, self._rng, epochs, sampler=sampler, validate=fn,
                   alpha=self._setting("alpha", self.loss_), learning_rate=self._setting("learning_rate", self.loss_),
                   metric=metric, higher_is_better=higher,
                   advice=", a moderate alpha or embedding_alpha (too strong a penalty diverges too), or scaled "
                          "ratings and numeric features")
        self._predictor = None

    def _history_bags(self):
        """Bags of the history fields from the seen pairs (user entities x item entities): each user's items
        (each item's users) as rows of the item (user) id table, weights 1/sqrt(bag size) as in SVD++."""
        if not any(f.name in _HISTORY for f in self.net_.fields):
            return
        indptr, indices = self._seen
        seen = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr),
                             shape=(len(indptr) - 1, len(self._items) + 1))
        held = getattr(self, "_held_out", None)
        if held is not None and len(held[0]):  # the pairs early stopping held out (never trained on)
            seen = seen - seen.multiply(sp.csr_matrix((np.ones(len(held[0]), np.float32), held), shape=seen.shape))
            seen.eliminate_zeros()
        for f_index, f in enumerate(self.net_.fields):
            if f.name not in _HISTORY:
                continue
            key, source = _HISTORY[f.name]
            X = seen if key == USER else seen.T.tocsr()
            id_row = self._bags[[g.name for g in self.net_.fields].index(source)][1]  # entity -> id row
            X = sp.csr_matrix((np.ones(X.nnz, np.float32), id_row[X.indices], X.indptr),
                              shape=(X.shape[0], f.vocab))
            X.sort_indices()
            sizes = np.diff(X.indptr)
            # 1/sqrt(n) (SVD++): on MovieLens-100k (a) it validated better than 1/n (mean) and 1 (sum).
            X.data = np.repeat(1.0 / np.sqrt(np.maximum(sizes, 1)), sizes).astype(np.float32)
            self._bags[f_index] = bags_of_csr(X, mean=False)

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
    def seen_pairs(self):
        """The distinct (user ids, item ids) pairs trained on: what ``recommend`` excludes by default."""
        self._check_fitted()
        indptr, indices = self._seen
        entities = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        return self._users.ids[entities - 1], self._items.ids[indices - 1]

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
        out = np.add(out, self.rating_mean_, dtype=np.float64)  # one pass: single-row latency counts
        return self._clip(out)

    def _clip(self, ratings, padding=None):
        """Predicted ratings within the training range (clip_predictions), in place; `padding` (a mask of
        recommend's -inf entries) is left alone."""
        bounds = getattr(self, "rating_range_", None)
        if bounds is not None and self.clip_predictions:
            np.clip(ratings, bounds[0], bounds[1], out=ratings, where=True if padding is None else ~padding)
        return ratings

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
        scores = self._clip(scores.astype(np.float64) + self.rating_mean_, padding=missing)
        if single:
            return ids[0], scores[0]
        return ids, scores

    def similar_items(self, items, k=10):
        """The k items whose id embeddings are closest (cosine) to each given item's: (ids, similarities).

        Candidates are the items trained on (with an id embedding of their own); an item without one (unknown,
        or known only by features) is compared through the learned unknown embedding.
        """
        self._check_fitted()
        k = check_int(k, "k")
        single = _is_scalar(items)
        items = as_id_array([items] if single else items, "items")
        table = self.net_.tables[ITEM]
        rows = self._bags[ITEM][1]  # entity -> id row of the item id table (0: none of its own)
        unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
        candidates = np.flatnonzero(rows > 0)  # entities with their own id row
        entities = self._items.index(items)
        sims = unit[rows[entities]] @ unit[rows[candidates]].T
        own = np.searchsorted(candidates, entities)
        is_candidate = (own < len(candidates)) & (candidates[np.minimum(own, len(candidates) - 1)] == entities)
        sims[np.flatnonzero(is_candidate), own[is_candidate]] = -np.inf  # never the item itself
        k = max(1, min(k, len(candidates) - 1))
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        ids = self._items.ids[candidates[top] - 1]
        out = np.take_along_axis(sims, top, axis=1)
        return (ids[0], out[0]) if single else (ids, out)
