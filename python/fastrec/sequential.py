"""`fastrec.SequentialRecommender`: next-item recommendation by causal self-attention over each user's
ordered history (SASRec-style; docs/DESIGN.md "Sequential model").

A user is their history: the model has no user parameters, so a user never seen in training, a session, or
a user whose latest events arrived a second ago is scored from the history alone (``recommend(histories=)``,
``observe``). Items are entities of `RecommenderBase`; the core sees item entity e as row e - 1 of the item
table (the model has no "unknown item" row: an item not in the table scores 0 and is left out of histories).

Item side features (``fit(..., item_features=)``, docs/DESIGN.md "Sequential model", "Item side features"):
an item's vector, read both as its input token and as the vector scored against the hidden state, is its id
embedding plus, summed over the table's columns, each column's embedding (a categorical value's row, the mean
of a multi-hot bag's label rows, a numeric column's standardised values times rows of their own: a linear
projection), the encoding of `RecommenderBase` (vocabularies and scaling of the first fit). Items known only
by their features (in ``item_features``, never in a training event) keep a zero id row that is never trained:
their vector is their features' alone, and they are recommended like any other item.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import scipy.sparse as sp

from fastrec import _core
from fastrec._checks import as_array, check_bool, check_float, check_int
from fastrec._fieldnet import check_structure, run_epochs
from fastrec._recbase import RecommenderBase, _merge_seen, kept_bags
from fastrec._registry import persistable
from fastrec.features import as_id_array

__all__ = ["SequentialRecommender"]

OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("float32", "bf16", "auto")
LOSSES = ("bce", "softmax")
_BLOCK_KEYS = ("ln1_gamma", "ln1_beta", "Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo",
               "ln2_gamma", "ln2_beta", "W1", "b1", "W2", "b2")
_STRUCTURE = ("embedding_dim", "max_len", "n_blocks", "n_heads", "ffn_dim", "optimizer")
# Buffered observe() events are merged into the history arrays once they exceed this share of them (or 4096):
# one merge costs a pass over every event, so merging in proportion keeps observe amortised O(1).
_MERGE_SHARE = 1 / 64


def _check_timestamps(timestamps, n):
    """timestamps as float64 (n,), or None; datetime64 become nanoseconds."""
    if timestamps is None:
        return None
    if hasattr(timestamps, "to_numpy"):
        timestamps = timestamps.to_numpy()
    t = as_array(timestamps, "timestamps")
    if t.ndim != 1 or len(t) != n:
        raise ValueError(f"timestamps must be a 1-D array of {n} values (one per interaction), got shape {t.shape}")
    if np.issubdtype(t.dtype, np.datetime64):
        if np.isnat(t).any():
            raise ValueError("timestamps contains NaT")
        return t.astype("datetime64[ns]").astype(np.int64).astype(np.float64)
    if not np.issubdtype(t.dtype, np.number) or t.dtype.kind == "c":
        raise TypeError(f"timestamps must be real numbers or datetime64, got dtype {t.dtype}")
    t = t.astype(np.float64)
    if not np.isfinite(t).all():
        raise ValueError("timestamps contains NaN or infinity")
    return t


def _time_order(users, timestamps):
    """The permutation that orders interactions by timestamp, ties (and no timestamps) by input order."""
    n = len(users)
    if timestamps is None:
        return np.arange(n)
    return np.lexsort((np.arange(n), timestamps))


def _csr_rows(indptr, values, rows):
    """The values of CSR rows `rows`, concatenated, and their lengths."""
    starts, ends = indptr[rows], indptr[rows + 1]
    lengths = ends - starts
    at = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
    return values[at], lengths


@persistable
class SequentialRecommender(RecommenderBase):
    """Next-item recommender: causal self-attention over each user's time-ordered history.

    Fit it on (user, item, timestamp) events; ``recommend`` ranks items for what each user is likely to do
    next given their latest ``max_len`` events, ``recommend(histories=...)`` does the same for sessions or
    users never seen in training (no retraining: the history is the input), and ``observe`` appends events
    so that the next ``recommend`` reflects them at once; ``partial_fit`` also trains on them.

    Item side features (``fit(..., item_features=)``: a FeatureTable or a DataFrame indexed by item id, as
    for `Recommender`): an item's vector (its input token and what hidden states are scored against) is its
    id embedding plus the sum of its columns' embeddings: a categorical value's row, the mean of a multi-hot
    bag's label rows, a numeric column's standardised values times rows of their own (a linear projection).
    Items of the table that never occur in a training event are recommended from their features alone (their
    id row stays zero until ``partial_fit`` trains on an event of theirs); training items missing from the
    table read the learned "unknown value" row of each categorical column and empty bags.

    Parameters
    ----------
    embedding_dim : int, default=64
        Width d of the item embeddings (and of each feature embedding) and of every block.
    max_len : int, default=50
        Events of a history the model reads (the latest ones). Padding is compacted away, so short histories
        cost what they hold; long ones cost more (attention grows with the square of the length), and the
        padded history arrays hold users x max_len int32 values. On dense data raise it: on MovieLens-100k
        (106 events a user on average) 200 validated better than 50 over seeds 0-9 (HR@10 +0.022, NDCG@10
        +0.023; test +0.022 / +0.027) at about 3.3x the fit time (benchmarks/SEQUENTIAL.md). 50 stays the
        default (RecBole's and SASRec's for sparse data) for its cost at scale.
    n_blocks : int, default=2
        Self-attention blocks.
    n_heads : int, default=1
        Attention heads (they split the d channels; d must be divisible by it).
    ffn_dim : int or None, default=None
        Width of each block's feed-forward layer (None: embedding_dim).
    dropout : float, default=0.2
        Dropout rate on the embedding sum, each attention output and each feed-forward output.
    loss : {"bce", "softmax"}, default="bce"
        "bce": binary cross-entropy of the next item against ``negatives`` sampled items at every position
        (SASRec). "softmax": cross-entropy over the batch's distinct next items, with the log-Q correction for
        how often each item is a target (as the TwoTower's in-batch softmax); ``negatives`` is not used.
    negatives : int, default=1
        Sampled negatives per position for "bce" (never an item of the user's history).
    optimizer : {"adam", "sgd"}, default="adam"
        Dense weights: Adam or plain SGD; item rows: lazy Adam / plain SGD on the rows a batch touches.
    learning_rate : float, default=1e-3
    batch_size : int, default=128
        Users (sequences) per batch.
    epochs : int, default=200
        Epochs of ``fit`` (one sequence per user each); early stopping usually ends it sooner.
    validation_metric : "auto", "ndcg@K" or "hr@K", default="auto" (ndcg@10)
        Scored after every epoch on the validation events (with ``early_stopping``: each user's latest event,
        held out of training and ranked against sampled items the user never touched).
    early_stopping : bool, default=True
        Hold out each user's latest event (users with 3 or more) to score ``validation_metric`` after every
        epoch; with ``n_iter_no_change`` training stops when it stops improving and the best epoch is kept.
        The held-out events join the histories when fit ends (untrained on, like ``observe``).
    n_iter_no_change : int or None, default=10
    random_state : int, RandomState or None, default=None
    n_threads : int or None, default=None
        Threads of the core (None: all cores). Results are the same for any value.
    verbose : bool, default=False
    precision : "float32", "bf16" or "auto", default="auto"
        Arithmetic of training's projection and feed-forward products (q, k, v, attention output, both
        feed-forward layers: forward and both backward products of each, most of an epoch's flops). "bf16":
        operands rounded to bfloat16, products summed in float32; weights, Adam state, layer norms, attention,
        softmax and the loss float32. On CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later) the products
        run ~1.5-2x faster (an epoch ~1.2x on one thread), elsewhere emulated (slower than float32). "auto"
        (the default): "bf16" where AVX512-BF16 is available, else "float32": on MovieLens-100k the defaults
        scored the same in both precisions within the seed-to-seed spread (benchmarks/SEQUENTIAL.md), and a
        model's bits already depend on the CPU's kernels. Scoring (recommend, validation, vectors) is float32
        always.
    """

    _fitted_attr = "params_"
    _structure_params = _STRUCTURE
    _caches = ("_handle_cache", "_item_matrix")
    _scores_from_history = True

    # run_epochs reads these of every estimator; the sequential model has no momentum and no L2 term.
    momentum = 0.0
    nesterovs_momentum = False
    alpha = 0.0
    # Base parameters the sequential model does not expose: validation is leave-latest-out, scores are not
    # ratings.
    validation_fraction = 0.1
    clip_predictions = False

    def __init__(self, embedding_dim=64, max_len=50, n_blocks=2, n_heads=1, ffn_dim=None, dropout=0.2, loss="bce",
                 negatives=1, optimizer="adam", learning_rate=1e-3, batch_size=128, epochs=200,
                 validation_metric="auto", early_stopping=True, n_iter_no_change=10, random_state=None,
                 n_threads=None, verbose=False, precision="auto"):
        self.embedding_dim = embedding_dim
        self.max_len = max_len
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.ffn_dim = ffn_dim
        self.dropout = dropout
        self.loss = loss
        self.negatives = negatives
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.validation_metric = validation_metric
        self.early_stopping = early_stopping
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose
        self.precision = precision

    # ------------------------------------------------------------------------------------ public API
    def fit(self, users, items, timestamps=None, *, item_features=None, feature_types=None, validation_data=None):
        """Train on events (users[i], items[i]) at timestamps[i] (numbers or datetime64; None: the input order
        is the time order). Each user's events are ordered by timestamp, ties by input order.

        item_features : FeatureTable, or a pandas DataFrame indexed by item id, optional. Side features of
            the items (see the class docstring); items only in the table are recommendable from them.
        feature_types : dict column -> "categorical" / "numeric" / "multi_hot[:SEP]", optional: the kinds of
            the DataFrame's columns (others are guessed, as `Recommender.fit`).
        validation_data : (users, items), or a callable ``score(model, epoch)``, optional. Pairs are ranked
            after every epoch against the users' histories from the training events. Without it and with
            ``early_stopping``, each user's latest event is held out for this.
        """
        return self._fit(users, items, timestamps, validation_data, item_features, feature_types)

    def _fit(self, users, items, timestamps, validation_data, item_features=None, feature_types=None):
        users, items, _, _ = self._check_interactions(users, items, None, None)
        timestamps = _check_timestamps(timestamps, len(users))
        order = _time_order(users, timestamps)
        users, items = users[order], items[order]
        times = np.arange(len(users), dtype=np.float64) if timestamps is None else timestamps[order]
        held = np.zeros(len(users), bool)
        if validation_data is None and self.early_stopping and self.epochs > 1:
            held = self._latest_events(users)
            if held.any():
                validation_data = (users[held], items[held])
        self._pending_times = times[~held]
        try:
            self._fit_new(users[~held], items[~held], None, None, None, item_features, self.epochs, validation_data,
                          feature_types)
        finally:
            self.__dict__.pop("_pending_times", None)
        if held.any():
            self.validation_size_ = int(held.sum())
            self._observe(users[held], items[held], times[held])
        return self

    def partial_fit(self, users, items, timestamps=None, *, item_features=None, feature_types=None):
        """Append these events to the histories (new users and items are added) and train one epoch on the
        sequences of the users they belong to. On an unfitted model it is ``fit`` with one epoch.

        item_features: features of new items (read with the first fit's encoding; known items keep theirs;
        items only in the table are added, recommendable from their features). Only for a model fit with
        item_features."""
        users, items, _, _ = self._check_interactions(users, items, None, None)
        timestamps = _check_timestamps(timestamps, len(users))
        order = _time_order(users, timestamps)
        users, items = users[order], items[order]
        if not hasattr(self, self._fitted_attr):
            self._pending_times = np.arange(len(users), dtype=np.float64) if timestamps is None \
                else timestamps[order]
            try:
                self._fit_new(users, items, None, None, None, item_features, 1, None, feature_types)
            finally:
                self.__dict__.pop("_pending_times", None)
            return self
        self._refuse_without_history("partial_fit would continue from empty histories; fit again instead")
        self._validate_params(True)
        self._check_base_params()
        check_structure(self)
        self._merge_buffer()
        self._grow(users, items, None, self._new_item_features(item_features, feature_types))
        self._pending_times = self._next_times(users, None if timestamps is None else timestamps[order])
        try:
            self._fit_interactions(users, items, None, None, 1, None)
        finally:
            self.__dict__.pop("_pending_times", None)
        return self

    def observe(self, users, items, timestamps=None):
        """Append events to the users' histories without training: the next ``recommend`` for these users reads
        them (and excludes their items as seen). New users are added; items the model does not know are
        ignored (they have no embedding until ``partial_fit`` trains one). Returns self."""
        self._check_fitted()
        users = as_id_array(users, "users")
        items = as_id_array(items, "items")
        if len(users) != len(items):
            raise ValueError(f"users and items must have the same length, got {len(users)} and {len(items)}")
        self._refuse_without_history("observe would extend empty histories; use recommend(histories=...)")
        timestamps = _check_timestamps(timestamps, len(users))
        order = _time_order(users, timestamps)
        users, items = users[order], items[order]
        known = self._items.index(items) > 0
        users, items = users[known], items[known]
        if timestamps is not None:
            timestamps = timestamps[order][known]
        if len(users):
            new_users = np.unique(users[self._users.index(users) == 0])
            if len(new_users):
                self._grow(new_users, np.zeros(0, items.dtype), None, None)
            self._observe(users, items, self._next_times(users, timestamps))
        return self

    def add_features(self, *, item_features=None, feature_types=None, user_features=None):
        """Add items known only by their features (cold start: recommendable at once, from their features),
        without training; items already known keep their features. Only for a model fit with item_features
        (the sequential model has no user parameters: user_features is refused). Returns self."""
        if user_features is not None:
            raise ValueError("SequentialRecommender has no user features: a user is their history")
        self._check_fitted()
        return super().add_features(item_features=self._new_item_features(item_features, feature_types))

    def recommend(self, users=None, k=10, *, exclude_seen=True, items=None, histories=None):
        """The k best next items: (item ids (n, k), scores (n, k)), best first.

        users: ids (their latest histories, observed events included); or histories: a list of item-id
        sequences, oldest first (sessions, users never seen in training; unknown items are skipped), scored
        exactly as a trained user with that history. exclude_seen: skip the user's (or the history's) items.
        items: rank only these candidates. Padding as in ``Recommender.recommend``.
        """
        return self._recommend_users_or_histories(users, k, exclude_seen, items, histories)

    def _histories_topk(self, histories, k, exclude_seen, candidate_rows):
        if isinstance(histories, np.ndarray) and histories.ndim == 1 and histories.dtype != object:
            raise ValueError("histories must be a list of item-id sequences (one per query), e.g. [[3, 7, 2]]")
        rows = [self._items.index(as_id_array(list(h), f"histories[{q}]")) for q, h in enumerate(histories)]
        rows = [r[r > 0] for r in rows]
        lengths = np.array([len(r) for r in rows], np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
        queries = self._hidden(self._padded(indptr, flat - 1, np.arange(len(rows))))
        return self._search(queries, k, candidate_rows, (indptr, flat) if exclude_seen else None)

    def user_vectors(self, users) -> np.ndarray:
        """float32 (n, embedding_dim): each user's hidden state after their latest event (what ``recommend``
        ranks items by, as inner products with ``item_vectors``)."""
        self._check_fitted()
        self._refuse_without_history("it scores users from their histories; use recommend(histories=...)")
        users = as_id_array(users, "users")
        return self._user_states(self._users.index(users))

    def item_vectors(self, items=None) -> np.ndarray:
        """float32 (n, embedding_dim) item vectors, with their features' embeddings when the model has item
        features (every item in ``item_ids_`` order when items is None; an unknown item gets zeros)."""
        self._check_fitted()
        table = self._items_with_unknown()[1:]
        if items is None:
            return table.copy()
        rows = self._items.index(as_id_array(items, "items"))
        out = table[np.maximum(rows, 1) - 1].copy()
        out[rows == 0] = 0
        return out

    @property
    def item_ids_(self):
        self._check_fitted()
        return self._items.ids.copy()

    def seen_pairs(self):
        self._merge_buffer()
        return super().seen_pairs()

    def __getstate__(self):
        self._merge_buffer()
        return super().__getstate__()

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._has_item_features():
            self._items_with_unknown()  # the composite item table, once (see _items_with_unknown)

    # ------------------------------------------------------------------------------------ hooks
    def _validate_params(self, implicit):
        if not implicit:
            raise ValueError("SequentialRecommender learns from events (implicit feedback); ratings are not used")
        d = check_int(self.embedding_dim, "embedding_dim")
        check_int(self.max_len, "max_len", 1, 4096)
        check_int(self.n_blocks, "n_blocks", 0)
        heads = check_int(self.n_heads, "n_heads")
        if d % heads:
            raise ValueError(f"embedding_dim ({d}) must be divisible by n_heads ({heads})")
        if self.ffn_dim is not None:
            check_int(self.ffn_dim, "ffn_dim")
        check_float(self.dropout, "dropout", 0.0, 1.0, high_open=True)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        check_int(self.negatives, "negatives", 1, 1024)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check_float(self.learning_rate, "learning_rate", 0.0, low_open=True)
        check_int(self.batch_size, "batch_size")
        check_bool(self.verbose, "verbose")
        if not (isinstance(self.precision, str) and self.precision in PRECISIONS):
            raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {self.precision!r}")
        return None

    def _core_precision(self):
        """The core's training precision: "auto" is "bf16" where the CPU multiplies bf16 natively (AVX512-BF16)."""
        if self.precision == "auto":
            return "bf16" if "avx512_bf16" in _core.bf16_kernels() else "float32"
        return self.precision

    def _build(self, user_rows, item_rows, tables, config):
        d, f = int(self.embedding_dim), int(self.ffn_dim or self.embedding_dim)
        rng = self._rng
        n_items = len(self._items)

        def glorot(fan_in, fan_out):
            return rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), (fan_in, fan_out)).astype(np.float32)

        params = {"item_table": self._new_item_rows(n_items),
                  "position_table": rng.normal(0.0, 1.0 / math.sqrt(d), (int(self.max_len), d)).astype(np.float32),
                  "heads": int(self.n_heads), "blocks": [],
                  "final_gamma": np.ones(d, np.float32), "final_beta": np.zeros(d, np.float32)}
        for _ in range(int(self.n_blocks)):
            blk = {}
            for key in _BLOCK_KEYS:
                if key in ("Wq", "Wk", "Wv", "Wo"):
                    blk[key] = glorot(d, d)
                elif key == "W1":
                    blk[key] = glorot(d, f)
                elif key == "W2":
                    blk[key] = glorot(f, d)
                elif key == "b1":
                    blk[key] = np.zeros(f, np.float32)
                else:
                    blk[key] = (np.ones if key.endswith("gamma") else np.zeros)(d, np.float32)
            params["blocks"].append(blk)
        if tables["item"] is not None:
            # Items only in the feature table keep a zero id row, never trained: their vector is their features'.
            trained = np.zeros(n_items, np.uint8)
            trained[np.asarray(item_rows, np.int64) - 1] = 1
            params["item_table"][trained == 0] = 0.0
            if not (tables["item"].row_positions(self._items.ids[trained == 1]) >= 0).any():
                raise ValueError("item_features: none of the items of the events is in the table (is it indexed "
                                 "by item id?)")
            X = self._item_feature_rows(tables["item"], self._items.ids)
            if X.shape[1] == 0:
                raise ValueError("item_features has no columns: give categorical, multi-hot or numeric columns")
            params["feature_table"] = self._new_item_rows(X.shape[1])
            params["item_features"] = (X.indptr.astype(np.int64), X.indices.astype(np.int32),
                                       X.data.astype(np.float32), trained)
        self.params_ = params
        self._state = [_zeros_like(params), _zeros_like(params)]
        self._adam_t = 0
        self._hist = (np.zeros(len(self._users) + 2, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float64))
        self._buffer = ([], [], [])  # observe()d (user entity, item row, time) not yet merged into _hist
        self._drop_caches()

    def _new_item_rows(self, n):
        d = int(self.embedding_dim)
        return self._rng.normal(0.0, 1.0 / math.sqrt(d), (n, d)).astype(np.float32)

    def _has_item_features(self):
        return "feature_table" in getattr(self, "params_", {})

    def _item_feature_rows(self, table, ids):
        """CSR (len(ids), feature rows) of items `ids` in feature table `table` (None: no row), encoded with the
        first fit's vocabularies and scaling (`RecommenderBase._feature_bags` / `_numeric_rows`): one block of
        columns per categorical column (row 0: the unknown value) and multi-hot column (the bag's mean), and
        per numeric column its standardised values, one feature row each."""
        rows = np.full(len(ids), -1, np.int64) if table is None else table.row_positions(ids)
        rows = np.concatenate([[-1], rows])  # _feature_bags reads entity 0 (the unknown item) first
        blocks = [sp.csr_matrix((len(rows), 0), dtype=np.float32)]
        for name, (kind, vocab) in self._vocab_.get("item", {}).items():
            indptr, ids_, weights = self._feature_bags(table, rows, "item", name)
            width = len(vocab) + (kind == "categorical")
            blocks.append(sp.csr_matrix((weights, ids_, indptr), shape=(len(rows), width)))
        for name in self._numeric_stats_.get("item", {}):
            blocks.append(sp.csr_matrix(self._numeric_rows(table, rows, "item", name)))
        X = sp.hstack(blocks, format="csr", dtype=np.float32)[1:]
        X.sort_indices()
        return X

    def _new_item_features(self, item_features, feature_types):
        """partial_fit / add_features' item_features as a FeatureTable (None stays None); refused for a model
        fit without item features (its items have no feature rows to read)."""
        if item_features is None:
            return None
        if hasattr(self, self._fitted_attr) and not self._has_item_features():
            raise ValueError("item_features: this model was fit without item features (fit it with item_features "
                             "to use them)")
        return self._check_table(item_features, "item_features", feature_types)

    def _grow_model(self, user_rows, item_rows, tables, old):
        n_new_items = len(self._items) - old["item"]
        n_new_users = len(self._users) - old["user"]
        if self._has_item_features():
            indptr, ids, weights, trained = self.params_["item_features"]
            trained = np.concatenate([trained, np.zeros(n_new_items, np.uint8)])
            trained[np.asarray(item_rows, np.int64) - 1] = 1  # items of these events are trained from now on
            if n_new_items:
                X = self._item_feature_rows(tables["item"], self._items.ids[old["item"]:])
                indptr = np.concatenate([indptr, indptr[-1] + X.indptr[1:].astype(np.int64)])
                ids = np.concatenate([ids, X.indices.astype(np.int32)])
                weights = np.concatenate([weights, X.data.astype(np.float32)])
            self.params_["item_features"] = (indptr, ids, weights, trained)
        if n_new_items:
            new_rows = self._new_item_rows(n_new_items)
            if self._has_item_features():
                new_rows[self.params_["item_features"][3][old["item"]:] == 0] = 0.0
            table = np.concatenate([self.params_["item_table"], new_rows])
            states = [np.concatenate([s["item_table"], np.zeros((n_new_items, table.shape[1]), np.float32)])
                      for s in self._state]
            self.params_["item_table"] = table
            for s, grown in zip(self._state, states):
                s["item_table"] = grown
        if n_new_users:
            indptr, items, times = self._hist
            self._hist = (np.concatenate([indptr, np.full(n_new_users, indptr[-1], np.int64)]), items, times)
        if n_new_items or len(item_rows):  # new users (observe) change neither the handle nor the item table
            self._drop_caches()

    def _train(self, user_rows, item_rows, y, weight, epochs, validate):
        times = getattr(self, "_pending_times", None)
        if times is None or len(times) != len(user_rows):
            raise RuntimeError("internal: the sequential model's events arrived without their times")
        self._append(user_rows, item_rows - 1, times)
        indptr = self._hist[0]
        trained = np.unique(user_rows)
        trained = trained[indptr[trained + 1] - indptr[trained] >= 2].astype(np.int64)
        if len(trained) == 0:
            return
        self._drop_caches()
        net = _SequenceNet(self, trained)
        fn, metric, higher = validate if validate is not None else (None, None, False)
        if fn is not None:
            score = fn

            def fn():  # the parameters changed since the last epoch
                self._drop_caches()
                return score()
        try:
            run_epochs(self, net, self._handle(), [trained], None, None, len(trained), self._rng, epochs,
                       sampler=net.training, validate=fn, alpha=0.0, learning_rate=float(self.learning_rate),
                       metric=metric, higher_is_better=higher, advice=" or a lower dropout")
        finally:
            self._drop_caches()
        if self._has_item_features():
            self._items_with_unknown()  # the composite item table, once after training

    def _score_pairs(self, user_rows, item_rows):
        users, at = np.unique(user_rows, return_inverse=True)
        z = self._user_states(users)[at.ravel()]
        table = self._items_with_unknown()[1:]
        v = table[np.maximum(item_rows, 1) - 1]
        out = np.einsum("ij,ij->i", z, v, dtype=np.float64)
        out[item_rows == 0] = 0.0
        return out

    def _topk(self, user_rows, k, exclude_seen, candidate_rows):
        queries = self._user_states(user_rows)
        exclude = None
        if exclude_seen:
            seen, lengths = _csr_rows(*self._seen, user_rows)
            exclude = (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), seen.astype(np.int32))
            extra = self._buffered(user_rows)
            if extra is not None:  # observed events not merged yet
                exclude = _union_rows(exclude, extra)
        return self._search(queries, k, candidate_rows, exclude)

    def _item_vectors(self):
        return self._items_with_unknown(), np.arange(1, len(self._items) + 1)

    def _drop_history(self):
        self._merge_buffer()
        self._hist = (np.zeros(len(self._users) + 2, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float64))
        self._buffer = ([], [], [])

    def _forget_model(self, side, keep):
        """Users own their event histories; items their item-table rows (and optimizer state) and their events
        in every history (RecommenderBase hook)."""
        self._merge_buffer()
        indptr, items, times = self._hist
        sizes = np.diff(indptr)
        if side == "user":
            events = np.repeat(keep, sizes)
            self._hist = (np.concatenate([[0], np.cumsum(sizes[keep])]).astype(np.int64), items[events],
                          times[events])
        else:
            events = keep[items + 1]
            owner = np.repeat(np.arange(len(sizes)), sizes)
            row = (np.cumsum(keep[1:]) - 1).astype(np.int32)  # old item row -> new
            counts = np.bincount(owner[events], minlength=len(sizes))
            self._hist = (np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), row[items[events]],
                          times[events])
            self.params_["item_table"] = np.ascontiguousarray(self.params_["item_table"][keep[1:]])
            for state in self._state:
                state["item_table"] = np.ascontiguousarray(state["item_table"][keep[1:]])
            if self._has_item_features():  # their feature bags go; the feature rows are shared
                indptr, ids, weights, trained = self.params_["item_features"]
                indptr, ids, weights = kept_bags((indptr, ids, weights), keep[1:])
                self.params_["item_features"] = (indptr, ids, weights, trained[keep[1:]])
        self._drop_caches()

    def _seen_changed(self):
        pass  # the caches (core handle, item matrix) depend on the parameters only: dropped where they change

    # ------------------------------------------------------------------------------------ internals
    def _drop_caches(self):
        for name in self._caches:
            self.__dict__.pop(name, None)

    def _handle(self):
        h = self.__dict__.get("_handle_cache")
        if h is None or h.precision != self._core_precision():  # precision may be set_params'd between fits
            h = self._handle_cache = _core.SequentialModel(self.params_, True, self._core_precision())
        return h

    def _items_with_unknown(self):
        """The item vectors the top-k engine searches, a zero row (the unknown item) first: built once after
        the parameters change (fit, partial_fit, load), so recommend reads a ready table."""
        m = self.__dict__.get("_item_matrix")
        if m is None:
            table = self.params_["item_table"]
            m = np.empty((table.shape[0] + 1, table.shape[1]), np.float32)
            m[0] = 0.0
            m[1:] = table
            if self._has_item_features():
                _add_item_features(m[1:], self.params_["feature_table"], self.params_["item_features"])
            self._item_matrix = m
        return m

    def _candidates(self, items):
        if items is None:
            return np.arange(1, len(self._items) + 1, dtype=np.int32)
        c = self._items.index(as_id_array(items, "items"))
        return np.unique(c[c > 0]).astype(np.int32)

    def _search(self, queries, k, candidates, exclude):
        """Top-k of item entities `candidates` by inner product with `queries`; `exclude`: CSR (indptr, item
        entities) with one row per query, or None."""
        rows = None
        if exclude is not None:
            rows = np.arange(len(queries), dtype=np.int32)
            exclude = _sorted_rows(*exclude)
        return _core.inner_product_topk(np.ascontiguousarray(queries, np.float32), self._items_with_unknown(), k,
                                        candidates, exclude, rows, self._threads())

    def _latest_events(self, users):
        """Mask of each user's last event (input already in time order), for users with 3 or more events."""
        codes = np.unique(users, return_inverse=True)[1].ravel()
        counts = np.bincount(codes)
        last = np.zeros(len(users), bool)
        last_at = np.full(len(counts), -1)
        last_at[codes] = np.arange(len(users))  # the last write per code wins: its latest event
        last[last_at[counts >= 3]] = True
        return last

    def _next_times(self, users, timestamps):
        """Times of new events: as given, or after every event the model holds (input order)."""
        if timestamps is not None:
            return timestamps
        latest = max([self._hist[2].max(initial=0.0), *self._buffer[2]], default=0.0)
        return latest + 1.0 + np.arange(len(users), dtype=np.float64)

    def _append(self, user_rows, item_rows0, times):
        """Merge events (user entity, item row, time) into the history arrays (per user by time, ties: held
        events first, then input order)."""
        indptr, items, old_times = self._hist
        n_users = len(indptr) - 1
        old_users = np.repeat(np.arange(n_users), np.diff(indptr))
        users = np.concatenate([old_users, np.asarray(user_rows, np.int64)])
        t = np.concatenate([old_times, np.asarray(times, np.float64)])
        order = np.lexsort((np.arange(len(users)), t, users))
        items = np.concatenate([items, np.asarray(item_rows0, np.int32)])[order]
        counts = np.bincount(users, minlength=n_users)
        self._hist = (np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), items, t[order])

    def _observe(self, users, items, times):
        u, i = self._users.index(users), self._items.index(items)
        bu, bi, bt = self._buffer
        bu.extend(u.tolist())
        bi.extend((i - 1).tolist())
        bt.extend(np.asarray(times, np.float64).tolist())
        if len(bu) > max(4096, _MERGE_SHARE * len(self._hist[1])):
            self._merge_buffer()

    def _merge_buffer(self):
        buffer = getattr(self, "_buffer", None)
        if not buffer or not buffer[0]:
            return
        u = np.asarray(buffer[0], np.int64)
        i = np.asarray(buffer[1], np.int32)
        self._buffer = ([], [], [])
        self._append(u, i, np.asarray(buffer[2], np.float64))
        self._seen = _merge_seen(*self._seen, u.astype(np.int32), i + 1, len(self._items) + 1)
        self._add_item_counts(np.bincount(i + 1, minlength=len(self._items) + 1))

    def _buffered(self, user_rows):
        """CSR (one row per user_rows entry) of observed item entities not merged yet, or None."""
        bu = self._buffer[0]
        if not bu:
            return None
        bu = np.asarray(bu, np.int64)
        bi = np.asarray(self._buffer[1], np.int32) + 1
        rows = [bi[bu == u] for u in np.asarray(user_rows)]
        return (np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64),
                np.concatenate(rows).astype(np.int32))

    def _padded(self, indptr, items0, rows):
        """(len(rows), max_len) int32 item rows: each CSR row's latest max_len entries, left-padded with -1."""
        L = int(self.params_["position_table"].shape[0])
        rows = np.asarray(rows, np.int64)
        ends = indptr[rows + 1]
        n = np.minimum(ends - indptr[rows], L)
        q = np.repeat(np.arange(len(rows)), n)
        j = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # position within each kept tail
        out = np.full((len(rows), L), -1, np.int32)
        out[q, L - n[q] + j] = items0[ends[q] - n[q] + j]
        return out

    def _user_states(self, user_rows):
        """Hidden states after each user's latest event (buffered observed events included)."""
        indptr, items, times = self._hist
        seqs = self._padded(indptr, items, user_rows)
        bu = self._buffer[0]
        if bu:
            bu = np.asarray(bu, np.int64)
            L = seqs.shape[1]
            for q, u in enumerate(np.asarray(user_rows)):
                pick = np.flatnonzero(bu == u)
                if len(pick):  # merge the user's stored tail and observed events by time, keep the latest L
                    s, e = indptr[u], indptr[u + 1]
                    t = np.concatenate([times[s:e][-L:], np.asarray(self._buffer[2])[pick]])
                    it = np.concatenate([items[s:e][-L:], np.asarray(self._buffer[1], np.int32)[pick]])
                    seq = it[np.lexsort((np.arange(len(t)), t))][-L:]
                    seqs[q] = -1
                    seqs[q, L - len(seq):] = seq
        return self._hidden(seqs)

    def _hidden(self, seqs):
        if len(seqs) == 0:
            return np.zeros((0, int(self.params_["item_table"].shape[1])), np.float32)
        return self._handle().forward(seqs, True, self._threads(), "auto")


def _zeros_like(params):
    out = {}
    for key, value in params.items():
        if key == "blocks":
            out[key] = [{k: np.zeros_like(v) for k, v in blk.items()} for blk in value]
        elif isinstance(value, np.ndarray):  # not "heads", nor the item features' CSR
            out[key] = np.zeros_like(value)
    return out


def _add_item_features(table, features, csr):
    """table (n_items, d) += each item's weighted feature rows, added in CSR order (the core's order in
    build_composites: the same float32 roundings, so the served vectors are the trained ones bit for bit)."""
    indptr, ids, weights, _ = csr
    counts = np.diff(indptr)
    for j in range(int(counts.max(initial=0))):  # the j-th entry of every item that has one
        items = np.flatnonzero(counts > j)
        at = indptr[items] + j
        table[items] += weights[at][:, None] * features[ids[at]]


def _sorted_rows(indptr, values):
    """The CSR with each row's values sorted and distinct (what the top-k engine's exclusion takes)."""
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    order = np.lexsort((values, rows))
    rows, values = rows[order], values[order]
    keep = np.ones(len(values), bool)
    keep[1:] = (rows[1:] != rows[:-1]) | (values[1:] != values[:-1])
    counts = np.bincount(rows[keep], minlength=len(indptr) - 1)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), values[keep].astype(np.int32)


def _union_rows(a, b):
    """Row-wise concatenation of two CSR (indptr, values) with the same number of rows."""
    (pa, va), (pb, vb) = a, b
    rows = [np.concatenate([va[pa[r]:pa[r + 1]], vb[pb[r]:pb[r + 1]]]) for r in range(len(pa) - 1)]
    return (np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64),
            np.concatenate(rows).astype(np.int32))


class _SequenceNet:
    """What `run_epochs` drives: one epoch of the core over the trained users' sequences, and the
    snapshot / restore of the parameters for early stopping."""

    def __init__(self, est, users):
        self.est = est
        self.users = users
        indptr, items = est._seen
        self.training = {"loss": est.loss, "negatives": int(est.negatives) if est.loss == "bce" else 0,
                         "n_items": len(est._items), "seed": 0, "seen": (indptr, (items - 1).astype(np.int32))}
        if est.loss == "softmax":  # each item's share of the training events: the log-Q correction
            counts = est._seen_counts[1:]
            self.training["item_prob"] = (counts / max(counts.sum(), 1.0)).astype(np.float32)

    def train_epoch(self, handle, keys, y, weight, order, *, batch_size, alpha, learning_rate, momentum, nesterov,
                    beta_1, beta_2, epsilon, sampler, epoch, n_threads, progress):
        est = self.est
        indptr, items, _ = est._hist
        loss_sum, adam_t, rows, diverged, error = handle.train_epoch(
            est._state[0], est._state[1], indptr, items, self.users[order], batch_size, sampler,
            # beta_2 0.98: SASRec's Adam setting (run_epochs passes the MLPs' 0.999)
            float(est.dropout), est.optimizer, learning_rate, beta_1, 0.98, epsilon, est._adam_t, epoch, n_threads,
            "auto", progress)
        est._adam_t = adam_t
        return loss_sum, rows, diverged, error

    def snapshot(self):
        est = self.est
        return copy.deepcopy((est.params_, est._state, est._adam_t))

    def restore(self, snap):
        est = self.est
        params, state, adam_t = copy.deepcopy(snap)
        _copy_into(est.params_, params)
        _copy_into(est._state[0], state[0])
        _copy_into(est._state[1], state[1])
        est._adam_t = adam_t


def _copy_into(dst, src):
    """Copy arrays in place (the core handle holds views of them)."""
    for key, value in src.items():
        if key == "blocks":
            for d, s in zip(dst[key], value):
                _copy_into(d, s)
        elif isinstance(value, np.ndarray):
            dst[key][...] = value
