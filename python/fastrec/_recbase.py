"""`RecommenderBase`: what every users x items recommender family shares, whatever its model.

Users and items are *entities* numbered 1..N (0 = unknown) from the raw ids seen in the interactions and in
the side-feature tables (`IdIndex`). The base owns everything that is not the model: the two `IdIndex`es
(raw ids of either kind), the seen pairs (a CSR of item entities per user entity: what ``recommend`` excludes
and what a sampler rejects as negatives), the side-feature tables (column types, vocabularies and scaling of
the first fit), the early-stopping split and validation scoring, the clipping of ratings, the argument
checking of ``fit`` / ``partial_fit`` / ``add_features`` / ``predict`` / ``recommend`` / ``similar_items``,
the entity growth of ``partial_fit``, and the mapping between raw ids and entity rows.

A family (`fastrec.Recommender`, a two-tower model, ...) subclasses it and implements the hooks below; all of
them take and return *entity rows* (int32, 1..N; 0 = unknown), never raw ids.

Required hooks
--------------
``_validate_params(implicit) -> config``
    Check the family's own parameters (the base checks epochs, early_stopping, validation_fraction,
    n_iter_no_change, clip_predictions, n_threads) for implicit feedback (ratings=None) or ratings; raise
    ValueError / TypeError naming the parameter. The return value is handed to ``_build`` unchanged.
``_build(user_rows, item_rows, tables, config)``
    A first fit: create the parameters (and optimizer state) for user entities 0..n_users and item entities
    0..n_items. user_rows / item_rows: the entity rows of the training interactions (the pairs held out for
    early stopping excluded); tables: {"user": FeatureTable or None, "item": ...}, whose ids may cover
    entities absent from the interactions. May draw from ``self._rng``. The base has set the entities, the
    feature encoding (``_feature_inputs`` works), ``implicit_``, ``rating_mean_`` and the empty seen pairs.
``_grow_model(user_rows, item_rows, tables, old)``
    After partial_fit / add_features added entities (they are numbered after the old ones): grow the
    parameters to n_users / n_items. old: {"user": n_users, "item": n_items} before the growth; user_rows /
    item_rows: the entity rows of the new interactions (empty for add_features); tables as in ``_build``
    (features of the new entities; those of known entities are not changed). On any error, raise and leave
    the model as it was (the base restores the entities and seen pairs).
``_train(user_rows, item_rows, y, weight, epochs, validate)``
    Run ``epochs`` epochs over the interactions (the base has already added them to the seen pairs). y:
    float32 targets (implicit feedback: ones; ratings: rating - rating_mean_), weight: float32 or None.
    validate: None or (score(), metric name, higher_is_better), to be scored after every epoch as
    ``_fieldnet.run_epochs`` does (which also keeps ``history_``, early stopping and ``best_epoch_``).
``_score_pairs(user_rows, item_rows) -> (n,) float``
    The model's output for each pair, before ``rating_mean_`` is added and before clipping.
``_topk(user_rows, k, exclude_seen, candidate_rows) -> (item_rows, scores)``
    The k best of candidate_rows (int32, sorted, distinct, >= 1; every item when recommend got no ``items``)
    for each user, best first, as (n_users, k) int32 entity rows and float scores on ``_score_pairs``'
    scale; exclude_seen: skip each user's seen items (``self._seen``). Fewer than k left: row -1, any score.
``_item_vectors() -> (vectors, candidate_rows)``
    For ``similar_items``: vectors (n_items + 1, d) of every item entity (row 0: the unknown item), compared
    by cosine, and the sorted entity rows that may be returned as similar.

Optional hook and class attributes
----------------------------------
``_seen_changed()``: the entities or seen pairs changed (fit, partial_fit, add_features): refresh what the
family derives from them (a sampling distribution, history bags). Default: nothing.
``_forget_model(side, keep)``: ``forget_users`` / ``forget_items`` erase the entities of ``side`` where the
bool mask ``keep`` (over entity numbers 0..N, keep[0] True) is False: zero every parameter row (and its
optimizer state) that only those entities own, and compact every array the family keeps per entity of that
side to the kept entities, in order. The base then renumbers the entities and the seen pairs and calls
``_seen_changed``. Default: refuse (the family has not said what it keeps per entity).
``_fitted_attr``: the attribute holding the family's parameters; its presence means fitted (fit drops it
first). ``_structure_params``: the parameters the model is built from (partial_fit refuses to continue after
set_params changed one). ``_caches``: attributes rebuilt on demand, never saved, dropped by fit.

The parameters the base reads must be in the family's ``__init__``: epochs, validation_metric,
early_stopping, validation_fraction, n_iter_no_change, clip_predictions, random_state, n_threads, verbose.

Side features become field inputs per side through ``_feature_inputs`` (fields, dense blocks, bag and
dense tables for one side's table, read through any key column) and grow with ``_grown_feature_bags`` /
``_grown_numeric_rows``; ``id_rows`` / ``grown_id_rows`` give an id field's rows. A model that reads both
sides through one row (the field model: user key 0, item key 1) and one that has a tower per side (each
read through key 0) call them the same way.
"""

from __future__ import annotations

import copy
import os
import secrets
import sys
import time

import numpy as np
import scipy.sparse as sp

from fastrec._base import BaseEstimator, exclusive_fit
from fastrec._checks import (as_array, check_bool, check_float, check_int, check_random_state, check_sample_weight,
                             not_fitted_error)
from fastrec._fieldnet import (DenseBlock, Field, IdIndex, bags_of_csr, bags_of_ids, callable_score,
                               check_structure, loss_curve_from_history, record_structure)
from fastrec.features import FeatureTable, as_id_array, column_types, split_types

__all__ = ["RecommenderBase", "grown_id_rows", "id_rows", "kept_bags", "zero_rows"]

SIDES = ("user", "item")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Validation pairs scored per epoch by a ranking metric (each against 99 negatives): 10^4 pairs give a
# standard error of HR@10 under 0.005, and cost 10^6 predictions.
_MAX_RANKED = 10_000
# Default users per chunk of recommend_all (one recommend call, one Parquet row group): about this many
# (user, candidate) pairs, within these bounds (measurements in recommend_all's docstring).
_CHUNK_PAIRS = 2**27
# predict of at most this many pairs of int ids scores them row by row in the core (the serving path), not
# through batch tables (measured: benchmarks/SERVING.md)
_SMALL_PAIRS = 16
_CHUNK_USERS = (1024, 8192)


# ------------------------------------------------------------------------------------------- helpers
def entity_numbers(index, raw):
    """index.index(raw) (IdIndex: entity numbers, 0 for unknown ids). Integer ids spanning a range not much
    wider than their count are looked up in a table indexed by id: 409,600 ids take ~5 ms instead of ~45 ms of
    binary searches."""
    ids = index.ids
    if not (len(ids) and len(raw) > len(ids) and ids.dtype.kind == "i" and raw.dtype.kind == "i"):
        return index.index(raw)
    lo, hi = int(ids.min()), int(ids.max())
    if hi - lo > 4 * len(ids) + 1024:
        return index.index(raw)
    table = np.zeros(hi - lo + 1, np.int32)
    table[ids - lo] = np.arange(1, len(ids) + 1, dtype=np.int32)
    if int(raw.min()) >= lo and int(raw.max()) <= hi:
        return table[raw - lo]
    inside = (raw >= lo) & (raw <= hi)
    out = np.zeros(len(raw), np.int32)
    out[inside] = table[raw[inside] - lo]
    return out


def id_rows(entities, n_entities):
    """An id field's rows: each distinct entity of `entities` (those trained on) gets its own row, 1, 2, ...
    in entity order; the others read row 0 (unknown). Returns (row of each entity 0..n_entities-1 (int32),
    vocabulary size)."""
    row = np.zeros(n_entities, np.int32)
    trained = np.flatnonzero(np.bincount(entities, minlength=n_entities))  # np.unique, in O(n) (ids < n_entities)
    row[trained] = np.arange(1, len(trained) + 1, dtype=np.int32)
    return row, len(trained) + 1


def grown_id_rows(row, entities, n_entities, vocab):
    """`id_rows` after growth to n_entities: the entities of `entities` without a row of their own yet (new
    ones, or ones known only by their features) get the next rows. Returns (new row array, new vocabulary
    size); `row` is not modified."""
    row = np.concatenate([row, np.zeros(n_entities - len(row), np.int32)])
    needing = np.unique(entities)
    needing = needing[row[needing] == 0]
    row[needing] = np.arange(vocab, vocab + len(needing), dtype=np.int32)
    return row, vocab + len(needing)


def kept_bags(bags, keep):
    """Bag table `bags` (indptr, indices, weights) with only the rows where `keep` is True."""
    indptr, indices, weights = bags
    sizes = np.diff(indptr)
    entries = np.repeat(keep, sizes)
    return (np.concatenate([[0], np.cumsum(sizes[keep])]).astype(np.int64), indices[entries], weights[entries])


def zero_rows(arrays, rows):
    """Set rows `rows` of each array (tables and optimizer state; None entries skipped) to zero, in place."""
    for a in arrays:
        if a is not None and len(rows):
            a[rows] = 0


def _table_rows(table, ids) -> np.ndarray:
    """Row of each id in a feature table (-1: none, or no table)."""
    return np.full(len(ids), -1, np.int64) if table is None else table.row_positions(ids)


def _append_bags(bags, extra):
    """Bag table `bags` with the rows of bag table `extra` appended."""
    indptr, ids, weights = bags
    return (np.concatenate([indptr, indptr[-1] + extra[0][1:]]), np.concatenate([ids, extra[1]]),
            np.concatenate([weights, extra[2]]))


def _merge_seen(indptr, indices, users, items, n_items):
    """The seen-items CSR (rows sorted, no duplicates) with the pairs (users, items) added. Only the rows of
    these users are searched and the rest is copied once (np.insert), so a small partial_fit on a long
    history costs a copy, not a re-sort of every pair."""
    if len(users) == 0:
        return indptr, indices
    # Sorted, deduplicated (user, item) keys. Sort + mask, not np.unique: NumPy 2's hash-based unique takes
    # 7x longer on these wide-range keys (143 vs 19 ms for 409,600 pairs).
    new = np.sort(users.astype(np.int64) * n_items + items)
    new = new[np.concatenate([[True], new[1:] != new[:-1]])]
    if len(indices) == 0:  # a first fit: the CSR straight from the sorted keys
        counts = np.bincount(new // n_items, minlength=len(indptr) - 1)
        return (np.concatenate([[0], np.cumsum(counts)]).astype(indptr.dtype, copy=False),
                (new % n_items).astype(np.int32))
    rows = new // n_items
    rows = rows[np.concatenate([[True], rows[1:] != rows[:-1]])]  # sorted already
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


class PairServingHandle:
    """``serving_handle()`` of a recommender: see there."""

    __slots__ = ("_model",)

    def __init__(self, model):
        self._model = model

    def __call__(self, user, item):
        model = self._model
        fast = model.__dict__.get("_fast")  # (handle, predict_lists, score_ints, ...) of its current pair scorer
        if fast is not None and fast[0] is model.__dict__.get("_predictor"):
            out = fast[2](user, item)  # two ints within int64, checked in C; else None
            if out is not None:
                return out
        return self._general(user, item)

    def _general(self, user, item):
        model = self._model
        if type(user) is int and type(item) is int and model._pair_scorer() is not None:  # (re)built
            out = model.__dict__["_fast"][2](user, item)
            if out is not None:
                return out
        for value, name in ((user, "user"), (item, "item")):
            if not _is_scalar(value):
                raise TypeError(f"{name} must be one id (an int or a str), got {type(value).__name__}")
        return float(model.predict(as_id_array([user], "user"), as_id_array([item], "item"))[0])

    def __repr__(self):
        return f"<{type(self._model).__name__} serving handle>"


def _one_int(ids) -> bool:
    """Whether ids is a list or array of one int: predict's single-pair serving path."""
    if type(ids) is list:
        return len(ids) == 1 and type(ids[0]) is int
    return type(ids) is np.ndarray and ids.shape == (1,) and ids.dtype.kind == "i"


def _is_scalar(value) -> bool:
    """One id rather than an array of them (ragged nested lists are neither: as_id_array reports them)."""
    try:
        return np.ndim(value) == 0
    except ValueError:
        return False


class _ChunkProgress:
    """verbose output of recommend_all, as `_fieldnet._Progress` gives it for an epoch: a tqdm bar where tqdm is
    installed, else a line on stderr every `_EVERY` seconds and one at the end (a job may run for minutes)."""

    _EVERY = 10.0

    def __init__(self, verbose, total):
        self.bar = None
        self.verbose = bool(verbose)
        self.total, self.done = total, 0
        self.start = self.last = time.perf_counter()
        if self.verbose:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc="recommend_all", unit="user", leave=True)

    def update(self, users):
        self.done += users
        if self.bar is not None:
            self.bar.update(users)
        elif self.verbose and time.perf_counter() - self.last >= self._EVERY:
            self.last = time.perf_counter()
            print(f"recommend_all: {self.done:,}/{self.total:,} users", file=sys.stderr, flush=True)

    def close(self, rows, path, ok=True):
        if self.bar is not None:
            if ok:
                self.bar.set_postfix_str(f"{rows:,} rows")
            self.bar.close()
        elif self.verbose and ok:
            seconds = time.perf_counter() - self.start
            print(f"recommend_all: {self.done:,} users, {rows:,} rows to {path} in {seconds:.1f} s "
                  f"({self.done / max(seconds, 1e-9):,.0f} users/s)", file=sys.stderr, flush=True)


def _pyarrow():
    """pyarrow and pyarrow.parquet, imported only when Parquet is written (an optional dependency)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("recommend_all writes Parquet with pyarrow, which is not installed: "
                          "pip install 'fastrec[parquet]'") from None
    return pa, pq


def _exclusive_temp(path):
    """A new file beside `path` (same directory, so os.replace is an atomic rename), opened for binary
    writing. Created with the default mode (0666 less the umask) as a plain open() would, unlike mkstemp's
    0600, so the renamed file has the permissions the user expects."""
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        temp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return temp, open(temp, "xb")
        except FileExistsError:  # a 48-bit name taken: draw another
            continue


class RecommenderBase(BaseEstimator):
    """Base of the users x items recommender families (see the module docstring for the hooks)."""

    _fitted_attr = "model_"
    _structure_params: tuple = ()
    _caches: tuple = ()
    _scores_from_history = False  # a known user is scored from their stored interactions (EASE, sequential)

    loss_curve_ = loss_curve_from_history

    # ------------------------------------------------------------------------------------ hooks
    def _validate_params(self, implicit: bool):
        raise NotImplementedError

    def _build(self, user_rows, item_rows, tables, config):
        raise NotImplementedError

    def _grow_model(self, user_rows, item_rows, tables, old):
        raise NotImplementedError

    def _train(self, user_rows, item_rows, y, weight, epochs, validate):
        raise NotImplementedError

    def _score_pairs(self, user_rows, item_rows):
        raise NotImplementedError

    def _topk(self, user_rows, k, exclude_seen, candidate_rows):
        raise NotImplementedError

    def _item_vectors(self):
        raise NotImplementedError

    def _seen_changed(self):
        pass

    def _forget_model(self, side, keep):
        raise NotImplementedError(f"{type(self).__name__} cannot forget {side}s")

    # ------------------------------------------------------------------------------------ state
    def _check_fitted(self):
        if not hasattr(self, self._fitted_attr):
            raise not_fitted_error(self)

    def __sklearn_is_fitted__(self):
        return hasattr(self, self._fitted_attr)

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in self._caches:  # views over this object's arrays; rebuilt on demand
            state.pop(name, None)
        return state

    def set_params(self, **params):
        super().set_params(**params)
        self.__dict__.pop("_fast", None)  # a one-pair scorer clips in the core as clip_predictions was at its build
        return self

    def _entities(self, side: str) -> IdIndex:
        return self._users if side == "user" else self._items

    def _check_base_params(self):
        check_int(self.epochs, "epochs")
        for name in ("early_stopping", "clip_predictions"):
            check_bool(getattr(self, name), name)
        check_float(self.validation_fraction, "validation_fraction", 0.0, 1.0, low_open=True, high_open=True)
        if self.n_threads is not None:
            check_int(self.n_threads, "n_threads")
        if self.n_iter_no_change is not None:
            check_int(self.n_iter_no_change, "n_iter_no_change")

    # ------------------------------------------------------------------------------------ features
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

    def _fit_feature_encoding(self, side: str, table: FeatureTable | None):
        """The first fit's encoding of one side's features, used for every later table of that side:
        name -> (kind, vocabulary) (categorical values sorted, multi-hot labels in column order) and the
        mean and standard deviation of each numeric column."""
        if table is None:
            return
        self._vocab_[side] = {name: ("categorical", np.unique(v)) for name, v in table.categorical.items()}
        self._vocab_[side].update({name: ("multi_hot", np.asarray(v)) for name, (_, v) in table.multi_hot.items()})
        self._numeric_stats_[side] = {}
        for name, values in table.numeric.items():
            values = values.reshape(len(table), -1)
            std = values.std(axis=0)
            self._numeric_stats_[side][name] = (values.mean(axis=0), np.where(std > 0, std, 1.0))

    def _feature_inputs(self, table: FeatureTable | None, side: str, key: int, dim: int):
        """The inputs of one side's feature table, one bag / dense row per entity of that side (entity 0, the
        unknown one, first): (fields, dense blocks, bag tables, dense tables). A field "side:column" of
        `dim` per categorical and multi-hot column (vocabulary + 1 for categorical: row 0 is the unknown
        value), a dense block "side:column" per numeric column, all read through key column `key`."""
        fields, dense, bags, dense_tables = [], [], [], []
        if table is None:
            return fields, dense, bags, dense_tables
        rows = np.concatenate([[-1], table.row_positions(self._entities(side).ids)])  # -1: no table row
        for name in [*table.categorical, *table.multi_hot]:
            vocab = len(self._vocab_[side][name][1]) + (name in table.categorical)  # + the unknown value
            fields.append(Field(f"{side}:{name}", vocab, dim, key))
            bags.append(self._feature_bags(table, rows, side, name))
        for name in table.numeric:
            t = self._numeric_rows(table, rows, side, name)
            dense.append(DenseBlock(f"{side}:{name}", t.shape[1], key))
            dense_tables.append(t)
        return fields, dense, bags, dense_tables

    def _grown_feature_bags(self, bags, name: str, tables, old):
        """Bag table `bags` of feature field `name` ("side:column") with rows for the entities of that side
        added since there were old[side] (read from tables[side]; none: unknown value / empty bag)."""
        side, column = name.split(":", 1)
        rows = _table_rows(tables[side], self._entities(side).ids[old[side]:])
        return _append_bags(bags, self._feature_bags(tables[side], rows, side, column))

    def _grown_numeric_rows(self, dense_table, name: str, tables, old):
        """Dense table of numeric block `name` ("side:column") with rows for the entities added since old."""
        side, column = name.split(":", 1)
        rows = _table_rows(tables[side], self._entities(side).ids[old[side]:])
        extra = self._numeric_rows(tables[side], rows, side, column)
        return np.ascontiguousarray(np.vstack([dense_table, extra]))

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
        """A first fit (fit, or partial_fit of an unfitted model): fresh entities, features and parameters."""
        config = self._validate_params(ratings is None)
        self._check_base_params()
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
        user_features, item_features = self._new_tables(user_features, item_features, feature_types)
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
        rating_stats = None if ratings is None else (
            float(np.average(ratings, weights=weight)), float(ratings.min()), float(ratings.max()))
        rows = self._new_model(users, items, rating_stats, user_features, item_features, config)
        self._fit_interactions(users, items, ratings, weight, epochs, validate, also_seen=held_out, rows=rows)

    def _new_tables(self, user_features, item_features, feature_types):
        """The feature tables of a first fit, checked (their column types recorded); forgets a previous fit."""
        self._column_types_ = {}  # filled by _check_table: the types partial_fit and add_features reuse
        user_features = self._check_table(user_features, "user_features", feature_types, first_fit=True)
        item_features = self._check_table(item_features, "item_features", feature_types, first_fit=True)
        for name in (self._fitted_attr, *self._caches, "best_epoch_", "validation_size_", "_held_out",
                     "_without_history"):
            self.__dict__.pop(name, None)
        return user_features, item_features

    def _new_model(self, users, items, rating_stats, user_features, item_features, config):
        """Entities of these interactions' ids (and the feature tables'), fresh parameters drawn from self._rng,
        no seen pairs yet. rating_stats: (mean, min, max) of the ratings, None for implicit feedback. Returns the
        interactions' (user entities, item entities). fastrec.dask builds each worker's replica this way, from
        the distinct ids of every partition."""
        tables = {"user": user_features, "item": item_features}
        rows = []
        for side, raw, table in (("user", users, user_features), ("item", items, item_features)):
            if table is None:
                index, codes = IdIndex.with_codes(raw, what=f"{side}s")
            else:
                index = IdIndex(raw, table.ids, what=f"{side}s")
                codes = entity_numbers(index, raw)
            setattr(self, f"_{side}s", index)
            rows.append(codes)
        self._vocab_, self._numeric_stats_ = {}, {}
        for side in SIDES:
            self._fit_feature_encoding(side, tables[side])
        self.implicit_ = rating_stats is None
        self.rating_mean_ = 0.0 if self.implicit_ else rating_stats[0]
        self.rating_range_ = None if self.implicit_ else (rating_stats[1], rating_stats[2])
        self._seen = (np.zeros(len(self._users) + 2, np.int64), np.zeros(0, np.int32))
        self._seen_counts = np.zeros(len(self._items) + 1, np.float64)
        self.history_ = {"loss": [], "seconds": []}
        rows = tuple(rows)  # once, for both uses
        self._build(*rows, tables, config)
        record_structure(self, self._structure_params)
        return rows

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
        the model was built from (a Recommender's embedding_dim, hidden_layer_sizes, activation, loss, gmf,
        gmf_item_features, wide, user_history, item_history, optimizer, id_dropout) may not: changing one
        with ``set_params`` makes partial_fit raise ValueError, and ``fit`` builds a new model.
        DataFrame feature columns are read with the types of the first fit; ``feature_types`` (as in ``fit``)
        types the columns that fit did not see (or all of them, on an unfitted model).
        """
        users, items, ratings, weight = self._check_interactions(users, items, ratings, sample_weight)
        if not hasattr(self, self._fitted_attr):
            self._fit_new(users, items, ratings, weight, user_features, item_features, 1, None, feature_types)
            return self
        if self._scores_from_history:
            self._refuse_without_history("partial_fit would continue from empty histories; fit again instead")
        if (ratings is None) != self.implicit_:
            raise ValueError(f"this model was fit on {'implicit feedback' if self.implicit_ else 'ratings'}; "
                             f"partial_fit needs {'ratings=None' if self.implicit_ else 'ratings'} too")
        self._validate_params(ratings is None)
        self._check_base_params()
        check_structure(self)
        self._grow(users, items, self._check_table(user_features, "user_features", feature_types),
                   self._check_table(item_features, "item_features", feature_types))
        self._fit_interactions(users, items, ratings, weight, 1, None)
        if ratings is not None and getattr(self, "rating_range_", None) is not None:
            self.rating_range_ = (min(self.rating_range_[0], float(ratings.min())),
                                  max(self.rating_range_[1], float(ratings.max())))
        return self

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

    def _grow(self, users, items, user_features, item_features):
        """Add the entities of these interactions (and of these feature tables) to a fitted model and grow the
        model with them; on any error the model is left as it was."""
        old = {"user": len(self._users), "item": len(self._items)}
        saved = (copy.copy(self._users), copy.copy(self._items), self._seen, self._seen_counts)
        try:
            for entities, raw, table in ((self._users, users, user_features), (self._items, items, item_features)):
                entities.add(raw)
                if table is not None:  # ids known only by their features are scored from them, as after fit
                    entities.add(table.ids)
            n_new_users = len(self._users) - old["user"]
            self._seen = (np.concatenate([self._seen[0], np.full(n_new_users, self._seen[0][-1], np.int64)]),
                          self._seen[1])
            self._seen_counts = np.concatenate([self._seen_counts, np.zeros(len(self._items) - old["item"])])
            self._grow_model(self._users.index(users), self._items.index(items),
                             {"user": user_features, "item": item_features}, old)
        except BaseException:
            self._users, self._items, self._seen, self._seen_counts = saved
            raise

    def _update_counts(self):
        """What follows from the entities and the seen pairs."""
        self.n_users_, self.n_items_ = len(self._users), len(self._items)
        self._seen_changed()

    def _add_item_counts(self, counts):
        """Add `counts` (one per item entity: the items of pairs just added to the seen pairs) to the item counts,
        and update what follows. fastrec.dask adds every replica's to each replica and to the driver's model."""
        self._seen_counts = self._seen_counts + counts
        self._update_counts()

    def _fit_interactions(self, users, items, ratings, weight, epochs, validate, also_seen=None, rows=None):
        """Add the interactions (and `also_seen`, held-out (users, items) pairs never trained on) to the seen
        items and counts, then train `epochs` epochs on the interactions (`_train`)."""
        u, i = rows if rows is not None else (self._users.index(users), self._items.index(items))
        n_i = len(self._items) + 1
        seen_u, seen_i = u, i
        if also_seen is not None:
            hu, hi = self._users.index(also_seen[0]), self._items.index(also_seen[1])
            seen_u, seen_i = np.concatenate([u, hu]), np.concatenate([i, hi])
            # Held-out pairs are kept apart (_held_out): e.g. a validation item in its user's history would leak.
            held = np.setdiff1d(np.unique(hu.astype(np.int64) * n_i + hi), u.astype(np.int64) * n_i + i)
            self._held_out = ((held // n_i).astype(np.int32), (held % n_i).astype(np.int32))
        elif getattr(self, "_held_out", None) is not None:  # held-out pairs that partial_fit trains on are no more
            hu, hi = self._held_out
            kept = ~np.isin(hu.astype(np.int64) * n_i + hi, u.astype(np.int64) * n_i + i)
            self._held_out = (hu[kept], hi[kept])
        self._seen = _merge_seen(*self._seen, seen_u, seen_i, n_i)
        self._add_item_counts(np.bincount(seen_i, minlength=n_i))
        y = np.ones(len(u), np.float32) if self.implicit_ else (ratings - self.rating_mean_).astype(np.float32)
        self._train(u, i, y, weight, epochs, validate)

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

    # ------------------------------------------------------------------------------------ predict
    def seen_pairs(self):
        """The distinct (user ids, item ids) pairs trained on: what ``recommend`` excludes by default."""
        self._check_fitted()
        self._refuse_without_history("it has no seen pairs")
        indptr, indices = self._seen
        entities = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        return self._users.ids[entities - 1], self._items.ids[indices - 1]

    def predict(self, users, items):
        """Predicted rating (explicit feedback) or score (implicit: higher means more likely; a Recommender's
        is a probability, a TwoTower's the vectors' inner product / temperature) of each pair.

        Unknown users or items never raise: they use the learned unknown rows (and their features when they
        were in the feature tables given to fit).
        """
        fast = self.__dict__.get("_fast")  # (handle, predict_lists, score_ints, ...) of the current pair scorer
        if fast is not None and fast[0] is self.__dict__.get("_predictor"):
            out = fast[1](users, items)  # two lists of one int each, checked in C; else None
            if out is not None:
                return out
        self._check_fitted()
        if _one_int(users) and _one_int(items):  # the serving path: one pair, whole in the core
            scorer = self._pair_scorer()
            if scorer is not None:
                try:
                    return scorer(users[0], items[0])
                except (TypeError, OverflowError):  # beyond int64: the checks below say what is wrong
                    pass
        if (type(users) is np.ndarray and type(items) is np.ndarray and users.shape == items.shape
                and users.ndim == 1 and 1 < len(users) <= _SMALL_PAIRS and users.dtype.kind == "i"
                and items.dtype.kind == "i"):  # a few pairs of int ids: row by row in the core, no batch tables
            scorer = self._pair_scorer()
            if scorer is not None:
                return scorer.scores(users.astype(np.int64, copy=False), items.astype(np.int64, copy=False))
        users = as_id_array(users, "users")
        items = as_id_array(items, "items")
        if len(users) != len(items):
            raise ValueError(f"users and items must have the same length, got {len(users)} and {len(items)}")
        if self._scores_from_history:
            self._refuse_without_history("it scores users from their histories; use recommend(histories=...)")
        out = self._score_pairs(self._users.index(users), self._items.index(items))
        out = np.add(out, self.rating_mean_, dtype=np.float64)  # one pass: single-row latency counts
        return self._clip(out)

    def _pair_scorer(self):
        """A callable (user id, item id) -> predict's array of one, or None: the family has no such path."""
        return None

    def serving_handle(self):
        """A low-latency callable for scoring one pair at a time: ``handle(user, item)`` returns a float,
        ``predict([user], [item])[0]`` (the same number). A pair of int ids, on a model with int ids, runs
        whole in the core (both id lookups, the one-row model, the rating mean and clipping; no arrays); any
        other pair goes through ``predict``, whose checks name what is wrong. The handle follows the model:
        after ``fit`` or ``partial_fit`` it scores with the new parameters. Not thread-safe: one call at a
        time per model (the GIL is held throughout).
        """
        self._check_fitted()
        return PairServingHandle(self)

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
        self._check_history_for_users(exclude_seen)
        if items is None:
            candidates = np.arange(1, len(self._items) + 1, dtype=np.int32)
        else:
            candidates = self._items.index(as_id_array(items, "items"))
            candidates = np.unique(candidates[candidates > 0]).astype(np.int32)
        k = min(k, max(len(candidates), 1))
        idx, scores = self._topk(self._users.index(users), k, bool(exclude_seen), candidates)
        ids = self._items.ids[np.maximum(idx, 1) - 1]
        scores = scores.astype(np.float64) + self.rating_mean_
        missing = idx < 0  # fewer than k candidates left for that user (seen items excluded)
        if missing.any():
            ids = np.where(missing, "" if ids.dtype.kind == "U" else -1, ids)
            scores[missing] = -np.inf
        scores = self._clip(scores, padding=missing)
        if single:
            return ids[0], scores[0]
        return ids, scores

    def _recommend_users_or_histories(self, users, k, exclude_seen, items, histories):
        """recommend of the families that score a user from a bag or history (EASE, Mult-VAE / DAE, sequential):
        users through RecommenderBase.recommend, or histories through the family's
        ``_histories_topk(histories, k, exclude_seen, candidate_rows) -> (item rows, scores)``."""
        if histories is None:
            if users is None:
                raise ValueError("recommend needs users or histories")
            return RecommenderBase.recommend(self, users, k, exclude_seen=exclude_seen, items=items)
        if users is not None:
            raise ValueError("give users or histories, not both")
        self._check_fitted()
        k = check_int(k, "k")
        check_bool(exclude_seen, "exclude_seen")
        candidates = self._candidates(items)
        k = min(k, max(len(candidates), 1))
        idx, scores = self._histories_topk(histories, k, bool(exclude_seen), candidates)
        ids, scores = self._items.ids[np.maximum(idx, 1) - 1], scores.astype(np.float64)
        missing = idx < 0  # padding, as recommend's
        if missing.any():
            ids = np.where(missing, "" if ids.dtype.kind == "U" else -1, ids)
            scores[missing] = -np.inf
        return ids, scores

    def _check_history_for_users(self, exclude_seen):
        if self._scores_from_history:
            self._refuse_without_history("it scores users from their histories; use recommend(histories=...)")
        if exclude_seen:
            self._refuse_without_history("pass exclude_seen=False and remove each user's seen items yourself")

    def recommend_all(self, path, k=10, *, exclude_seen=True, users=None, items=None, chunk_size=None,
                      verbose=None) -> int:
        """Write the top-k items of every known user (or of ``users``) to a Parquet file; returns the number of
        rows written.

        The file has one row per (user, recommended item): columns ``user``, ``rank`` (int32, 1 = best),
        ``item`` and ``score`` (float64), ids typed like the model's (int64 or string), users in the order
        walked (the model's known users in its order: sorted after fit, then those partial_fit or add_features
        added; or ``users`` as given, repeats included) and ranks ascending within
        a user. The rows are exactly ``recommend``'s, with its padding (a user with fewer than k candidates
        left) dropped, so such a user has fewer than k rows. ``k``, ``exclude_seen`` and ``items`` are as in
        ``recommend``; unknown ``users`` get what a new user would.

        The users are walked in chunks of ``chunk_size`` users: one ``recommend`` call and one Parquet row
        group per chunk, so memory is bounded by a chunk (its ids and scores; the top-k passes store no users x
        items scores), not by the number of users. The chunk size never changes the file's rows. The default
        gives a chunk about 2**27 (user, candidate item) pairs, within 1,024 to 8,192 users: 8,192 below
        16,384 candidates, 1,024 above 131,072. Measured on 2 cores, 100,000 users, k = 10: a TwoTower over
        19,353 items writes 17,000 users/s in chunks of 512, 24,000 in chunks of 1,024 and 28,000 from 4,096
        to 16,384 (batched exact search reuses each block of item vectors across the chunk's users; writing
        the Parquet file is about 5% of the time); a Recommender scores about 4 million pairs/s whatever the
        chunk, so 2**27 pairs bound a chunk to about 30 s (until the 1,024 floor), which keeps the progress
        moving and Ctrl-C prompt on large catalogues. Row groups then hold 10,000 to 80,000 rows at k = 10.

        The file is written to a temporary file in the same directory and renamed over ``path`` only once
        complete: an error or Ctrl-C midway leaves no partial file and any existing ``path`` untouched.

        verbose: show progress (a tqdm bar where tqdm is installed, else lines on stderr); None: the model's
        ``verbose``. Needs pyarrow (``pip install 'fastrec[parquet]'``).
        """
        self._check_fitted()
        check_bool(exclude_seen, "exclude_seen")
        self._check_history_for_users(exclude_seen)
        pa, pq = _pyarrow()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot write {path}: no directory {folder}")
        if os.path.isdir(path):  # found now rather than by the rename after all the work
            raise IsADirectoryError(f"cannot write {path}: it is a directory")
        k = check_int(k, "k")
        check_bool(exclude_seen, "exclude_seen")
        verbose = self.verbose if verbose is None else verbose
        if users is None:
            users = self._users.ids
        else:
            users = as_id_array([users] if _is_scalar(users) else users, "users")
            if len(users) == 0:  # an empty list is int64 whatever the ids: type the column like the model's
                users = self._users.ids[:0]
        if items is not None:  # the distinct known candidates once, rather than once per chunk
            rows = self._items.index(as_id_array(items, "items"))
            items = self._items.ids[np.unique(rows[rows > 0]) - 1]
        if chunk_size is None:
            n_candidates = len(self._items) if items is None else len(items)
            chunk_size = int(np.clip(_CHUNK_PAIRS // max(n_candidates, 1), *_CHUNK_USERS))
        else:
            chunk_size = check_int(chunk_size, "chunk_size")

        def arrow_type(ids):
            return pa.string() if ids.dtype.kind == "U" else pa.int64()

        schema = pa.schema([("user", arrow_type(users)), ("rank", pa.int32()),
                            ("item", arrow_type(self._items.ids)), ("score", pa.float64())])
        progress = _ChunkProgress(verbose, len(users))
        temp, file = _exclusive_temp(path)
        written = 0
        try:
            with file:
                with pq.ParquetWriter(file, schema) as writer:  # no users: a valid file with no rows
                    for start in range(0, len(users), chunk_size):
                        chunk = users[start:start + chunk_size]
                        ids, scores = self.recommend(chunk, k, exclude_seen=exclude_seen, items=items)
                        keep = scores != -np.inf  # recommend's padding: fewer than k candidates left
                        ranks = np.broadcast_to(np.arange(1, ids.shape[1] + 1, dtype=np.int32), ids.shape)
                        writer.write_table(pa.table([
                            pa.array(np.repeat(chunk, keep.sum(axis=1)), schema.field("user").type),
                            pa.array(ranks[keep]), pa.array(ids[keep], schema.field("item").type),
                            pa.array(scores[keep])], schema=schema))
                        written += int(keep.sum())
                        progress.update(len(chunk))
                file.flush()  # the writer leaves the file open once its footer is written
                os.fsync(file.fileno())  # the data reaches the disk before the rename can
            os.replace(temp, path)
        except BaseException:
            progress.close(written, path, ok=False)
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        progress.close(written, path)
        return written

    # ------------------------------------------------------------------------------------ files
    def save(self, path, *, include_history=True) -> None:
        """Write the model to one file (docs/DESIGN.md, "Model files"), loadable with `fastrec.load`.

        include_history=False writes no per-user interaction lists: no seen pairs, no pairs held out for early
        stopping, no event histories. The loaded model then needs them passed in: ``recommend`` needs
        ``exclude_seen=False`` (filter what each user has seen yourself), and a model that scores a user from
        their history (EASE, SequentialRecommender) serves only ``recommend(histories=...)``. A model whose
        parameters are built from the histories (a Recommender with ``user_history`` / ``item_history``) is
        refused: ValueError. Aggregate item counts (negative sampling) are kept.
        """
        check_bool(include_history, "include_history")
        if include_history:
            return super().save(path)
        self._check_fitted()

        def save_without(model):
            reason = model._history_in_parameters()
            if reason:
                raise ValueError(f"include_history=False: {reason}")
            bare = copy.copy(model)
            bare._seen = (np.zeros(len(model._users) + 2, np.int64), np.zeros(0, np.int32))
            bare.__dict__.pop("_held_out", None)
            bare._without_history = True
            bare._drop_history()
            from fastrec._persist import save

            save(bare, path)

        exclusive_fit(save_without)(self)

    def _history_in_parameters(self):
        """Why this model cannot be saved without its histories (None: it can)."""
        return None

    def _drop_history(self):
        """On a shallow copy about to be saved without histories: drop the family's own per-user lists."""

    def _refuse_without_history(self, what):
        if getattr(self, "_without_history", False):
            raise ValueError(f"this model was saved with include_history=False, so it has no interaction "
                             f"histories: {what}")

    # ------------------------------------------------------------------------------------ erasure
    @exclusive_fit
    def forget_users(self, users):
        """Erase these users from the model: their id rows (embeddings and optimizer state, set to zero and
        owned by no id), their id mappings, seen items, held-out pairs, feature rows and history bags. A file
        saved afterwards holds none of them. Ids the model does not know are ignored. Returns self.

        What remains is their influence on what other entities share (the MLP, feature embeddings, other
        users' and items' embeddings trained on batches that held their interactions, item popularity
        counts): erasure is not retraining; training with ``privacy=`` bounds that influence. A forgotten
        user who comes back is a new, unknown user.
        """
        self._forget("user", users)
        return self

    @exclusive_fit
    def forget_items(self, items):
        """Erase these items from the model, as ``forget_users`` does for users: ``recommend`` and
        ``similar_items`` never return them again, and other users' seen pairs lose them. Returns self."""
        self._forget("item", items)
        return self

    def _forget(self, side, raw) -> int:
        """Erase the entities of these raw ids; returns how many there were."""
        self._check_fitted()
        raw = as_id_array(raw, f"{side}s")
        entities = self._entities(side)
        gone = np.unique(entities.index(raw))
        gone = gone[gone > 0]
        if not len(gone):
            return 0
        keep = np.ones(len(entities) + 1, bool)
        keep[gone] = False
        self._forget_model(side, keep)
        number = (np.cumsum(keep) - 1).astype(np.int32)  # old entity number -> new (forgotten ones: unused)
        entities.ids = entities.ids[keep[1:]]
        entities._index_ids()
        indptr, indices = self._seen
        sizes = np.diff(indptr)  # per user entity 0..n_users
        owner = np.repeat(np.arange(len(sizes)), sizes)
        held = getattr(self, "_held_out", None)
        if side == "user":
            kept = keep[owner]
            gone_counts = np.bincount(indices[~kept], minlength=len(self._seen_counts))
            self._seen_counts = np.maximum(self._seen_counts - gone_counts, 0)
            self._seen = (np.concatenate([[0], np.cumsum(sizes[keep])]).astype(np.int64), indices[kept])
            if held is not None:
                k = keep[held[0]]
                self._held_out = (number[held[0][k]], held[1][k])
        else:
            kept = keep[indices]
            self._seen = (np.concatenate([[0], np.cumsum(np.bincount(owner[kept], minlength=len(sizes)))]
                                         ).astype(np.int64), number[indices[kept]])
            self._seen_counts = self._seen_counts[keep]
            if held is not None:
                k = keep[held[1]]
                self._held_out = (held[0][k], number[held[1][k]])
        for name in self._caches:
            self.__dict__.pop(name, None)
        self._update_counts()
        return len(gone)

    def similar_items(self, items, k=10):
        """The k items whose vectors are closest (cosine) to each given item's: (ids, similarities).

        For a Recommender the vectors are the item id embeddings, and the candidates the items trained on
        (with an id embedding of their own); an item without one (unknown, or known only by features) is
        compared through the learned unknown embedding.
        """
        self._check_fitted()
        k = check_int(k, "k")
        single = _is_scalar(items)
        items = as_id_array([items] if single else items, "items")
        vectors, candidates = self._item_vectors()
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        entities = self._items.index(items)
        sims = unit[entities] @ unit[candidates].T
        own = np.searchsorted(candidates, entities)
        is_candidate = (own < len(candidates)) & (candidates[np.minimum(own, len(candidates) - 1)] == entities)
        sims[np.flatnonzero(is_candidate), own[is_candidate]] = -np.inf  # never the item itself
        k = max(1, min(k, len(candidates) - 1))
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        ids = self._items.ids[candidates[top] - 1]
        out = np.take_along_axis(sims, top, axis=1)
        return (ids[0], out[0]) if single else (ids, out)
