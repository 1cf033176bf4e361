"""`fastrec.AutoRec`: the autoencoder of Sedhain et al. ("AutoRec: Autoencoders Meet Collaborative Filtering",
WWW 2015) for explicit ratings, trained by the core with a masked output (cpp/autorec.h, DESIGN.md "AutoRec").

I-AutoRec (``item_based=True``, the default) reads each item's vector of user ratings and reconstructs it; the
predicted rating of (user u, item i) is the reconstruction of item i's vector read at u. U-AutoRec swaps the
roles. Below, "rows" are the side whose vectors are encoded (items for I-AutoRec) and "columns" the other side.

Rows are entities 1..n of that side; ``_ratings`` is the CSR (rows 0..n, row 0 empty) of the training ratings,
columns = column entity - 1. The inputs are the raw ratings (as in the paper: an unobserved entry reads 0, which
no rating on a 1-5 scale is); the targets are the ratings minus ``rating_mean_``, so the decoder starts at the
mean.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from fastrec import _core
from fastrec._checks import check_bool, check_float, check_int
from fastrec._fieldnet import run_epochs
from fastrec._recbase import RecommenderBase
from fastrec._registry import persistable

__all__ = ["AutoRec"]

ACTIVATIONS = {"sigmoid": "logistic", "logistic": "logistic", "identity": "identity", "tanh": "tanh", "relu": "relu"}
OPTIMIZERS = ("adam", "sgd")
_STRUCTURE = ("hidden", "activation", "item_based", "optimizer")


@persistable
class AutoRec(RecommenderBase):
    """AutoRec (Sedhain et al., WWW 2015): an autoencoder over sparse rating vectors, for explicit ratings.

    I-AutoRec (the default) encodes each item's vector of user ratings into ``hidden`` units,
    ``h = act(r W_enc + b_enc)``, and decodes it, ``r_hat[u] = h . W_dec[u] + b_dec[u]``. The squared error is
    taken only at the observed ratings and computed only there: a step costs O(ratings in the batch x hidden),
    never O(users x hidden) per row. A rating for (user, item) is the reconstruction of the item's vector at the
    user. U-AutoRec (``item_based=False``) encodes users' vectors of item ratings instead (the paper found
    I-AutoRec better: an item has more ratings to read than a user).

    Parameters
    ----------
    hidden : int, default=500
        Hidden units (the paper's k = 500).
    activation : {"sigmoid", "identity", "tanh", "relu"}, default="sigmoid"
        The encoder's activation (the decoder is linear, the paper's best combination).
    item_based : bool, default=True
        I-AutoRec (True) or U-AutoRec (False).
    l2 : float, default=5.0
        L2 penalty on the weights of the columns each batch touches, per step (DESIGN.md "AutoRec": a batch of B
        rows adds ``l2 / 2B`` times the squared norms of its columns' encoder and decoder rows). Chosen on
        MovieLens-100k validation data (benchmarks/AUTOENCODERS.md).
    optimizer : {"adam", "sgd"}, default="adam"
        Lazy Adam (the rows a batch touches; the bias correction counts every step) or plain SGD.
    learning_rate : float, default=3e-4
    batch_size : int, default=64
        Rows (items for I-AutoRec) per step.
    epochs : int, default=200
        Epochs of ``fit``; early stopping usually ends it sooner.
    validation_metric : {"auto", "rmse", "mae"}, default="auto" (rmse)
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the ratings, score ``validation_metric`` on them after every epoch
        and, with ``n_iter_no_change``, keep the best epoch's parameters. The held-out ratings are not inputs of
        the model (neither during nor after fit).
    validation_fraction : float, default=0.1
    n_iter_no_change : int or None, default=10
    clip_predictions : bool, default=True
        Clip predicted ratings to the training range.
    random_state : int, RandomState or None, default=None
    n_threads : int or None, default=None
        Threads of the core (None: all cores). Results are the same for any value.
    verbose : bool, default=False

    Cold start
    ----------
    A row entity without training ratings (an item never rated, for I-AutoRec) is an empty input vector: its
    prediction is the decoder's output for the code ``act(b_enc)``. A column entity the model never trained
    (a user unknown to I-AutoRec) has no decoder row: its predictions are the training mean ``rating_mean_``.

    Attributes
    ----------
    params_ : [W_enc (n_cols, hidden), b_enc (hidden,), W_dec (n_cols, hidden), b_dec (n_cols,)] float32
        Columns in the order of the column side's entities (``user_ids_`` for I-AutoRec).
    history_ : {"loss", "seconds", "val_rmse"...} per epoch.
    n_users_, n_items_, rating_mean_, rating_range_, best_epoch_
    """

    _fitted_attr = "params_"
    _structure_params = _STRUCTURE
    _caches = ("_codes_cache",)

    # run_epochs reads these; AutoRec's optimizers are plain SGD or Adam.
    momentum = 0.0
    nesterovs_momentum = False

    def __init__(self, hidden=500, activation="sigmoid", item_based=True, l2=5.0, optimizer="adam",
                 learning_rate=3e-4, batch_size=64, epochs=200, validation_metric="auto", early_stopping=True,
                 validation_fraction=0.1, n_iter_no_change=10, clip_predictions=True, random_state=None,
                 n_threads=None, verbose=False):
        self.hidden = hidden
        self.activation = activation
        self.item_based = item_based
        self.l2 = l2
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.validation_metric = validation_metric
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.clip_predictions = clip_predictions
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose

    # ------------------------------------------------------------------------------------ public API
    def fit(self, users, items, ratings=None, *, validation_data=None):
        """Train on ratings (users[i], items[i], ratings[i]) (raw ids). validation_data: (users, items, ratings)
        or a callable ``score(model, epoch)``, scored after every epoch (see ``early_stopping``)."""
        self._refuse_implicit(ratings)
        return super().fit(users, items, ratings, validation_data=validation_data)

    def partial_fit(self, users, items, ratings=None):
        """Add these ratings (new users and items included; a pair rated again keeps the new rating) and train
        one epoch over the rows they touch (each with all its ratings). On an unfitted model it is ``fit`` with
        one epoch."""
        self._refuse_implicit(ratings)
        return super().partial_fit(users, items, ratings)

    def similar_items(self, items, k=10):
        """The k items with the closest (cosine) vectors: for I-AutoRec the items' codes (their rating vectors
        encoded), for U-AutoRec their decoder rows. (ids, similarities)."""
        return super().similar_items(items, k)

    @property
    def user_ids_(self) -> np.ndarray:
        """The raw ids of the known users, in entity order (the rows of ``params_`` for I-AutoRec)."""
        self._check_fitted()
        return self._users.ids

    @property
    def item_ids_(self) -> np.ndarray:
        """The raw ids of the known items, in entity order (the rows of ``params_`` for U-AutoRec)."""
        self._check_fitted()
        return self._items.ids

    # ------------------------------------------------------------------------------------ hooks
    def _validate_params(self, implicit):
        self._refuse_implicit(None if implicit else True)
        check_int(self.hidden, "hidden", 1, 1 << 16)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        check_bool(self.item_based, "item_based")
        check_float(self.l2, "l2", 0.0)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check_float(self.learning_rate, "learning_rate", 0.0, low_open=True)
        check_int(self.batch_size, "batch_size")
        check_bool(self.verbose, "verbose")
        if self.validation_metric not in ("auto", "rmse", "mae"):
            raise ValueError(f"validation_metric must be 'auto', 'rmse' or 'mae', got {self.validation_metric!r}")
        return None

    def _sides(self):
        """(row side, column side) entity indexes."""
        return (self._items, self._users) if self.item_based else (self._users, self._items)

    def _pairs(self, user_rows, item_rows):
        """(row entities, column entities) of (user, item) entity pairs."""
        return (item_rows, user_rows) if self.item_based else (user_rows, item_rows)

    def _build(self, user_rows, item_rows, tables, config):
        rows, cols = self._sides()
        h = int(self.hidden)
        self.params_ = [self._encoder_rows(len(cols)), np.zeros(h, np.float32), self._decoder_rows(len(cols)),
                        np.zeros(len(cols), np.float32)]
        # np.zeros, not zeros_like: calloc'd pages, zeroed by the OS when a batch first touches their rows
        self._state = [[np.zeros(p.shape, np.float32) for p in self.params_] for _ in range(2)]
        self._adam_t = 0
        self._ratings = (np.zeros(len(rows) + 2, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
        self._drop_caches()

    # Glorot-uniform rows (fan-in + fan-out = columns + hidden for both tables), drawn in float32 by a NumPy
    # Generator seeded from the model's RandomState: 10^5 x 500 rows take ~0.1 s (float64 RandomState draws and
    # a cast took ~1 s).
    def _uniform_rows(self, n):
        n_cols, h = len(self._sides()[1]), int(self.hidden)
        bound = np.float32(math.sqrt(6.0 / (n_cols + h)))
        gen = np.random.default_rng(self._rng.randint(0, 2**31 - 1, size=2))
        rows = gen.random((n, h), dtype=np.float32)
        rows *= 2 * bound
        rows -= bound
        return rows

    _encoder_rows = _decoder_rows = _uniform_rows

    def _grow_model(self, user_rows, item_rows, tables, old):
        rows, cols = self._sides()
        row_side, col_side = ("item", "user") if self.item_based else ("user", "item")
        new_cols = len(cols) - old[col_side]
        if new_cols:
            W_enc, b_enc, W_dec, b_dec = self.params_
            grown = [np.concatenate([W_enc, self._encoder_rows(new_cols)]), b_enc,
                     np.concatenate([W_dec, self._decoder_rows(new_cols)]),
                     np.concatenate([b_dec, np.zeros(new_cols, np.float32)])]
            self._state = [[np.concatenate([s, np.zeros((len(g) - len(s),) + s.shape[1:], np.float32)])
                            for s, g in zip(state, grown)] for state in self._state]
            self.params_ = grown
        new_rows = len(rows) - old[row_side]
        if new_rows:
            indptr, cols_, values = self._ratings
            self._ratings = (np.concatenate([indptr, np.full(new_rows, indptr[-1], np.int64)]), cols_, values)
        self._drop_caches()

    def _history_in_parameters(self):
        return "AutoRec encodes each row from its stored ratings (every prediction reads them)"

    def _forget_model(self, side, keep):
        """A row entity owns its stored ratings; a column entity its encoder and decoder rows, its decoder bias
        (and their optimizer state) and its ratings in every row (RecommenderBase hook)."""
        row_side = "item" if self.item_based else "user"
        indptr, cols, values = self._ratings
        sizes = np.diff(indptr)
        if side == row_side:
            kept = np.repeat(keep, sizes)
            self._ratings = (np.concatenate([[0], np.cumsum(sizes[keep])]).astype(np.int64), cols[kept],
                             values[kept])
        else:
            kept = keep[cols + 1]
            owner = np.repeat(np.arange(len(sizes)), sizes)
            number = (np.cumsum(keep[1:]) - 1).astype(np.int32)  # old column -> new
            counts = np.bincount(owner[kept], minlength=len(sizes))
            self._ratings = (np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), number[cols[kept]],
                             values[kept])
            per_column = (0, 2, 3)  # W_enc, W_dec, b_dec rows; b_enc is shared
            for i in per_column:
                self.params_[i] = np.ascontiguousarray(self.params_[i][keep[1:]])
                for state in self._state:
                    state[i] = np.ascontiguousarray(state[i][keep[1:]])
        self._drop_caches()

    def _train(self, user_rows, item_rows, y, weight, epochs, validate):
        if weight is not None:
            raise ValueError("AutoRec does not take sample_weight")
        rows, cols = self._pairs(user_rows, item_rows)
        self._merge_ratings(rows, cols - 1, y + np.float32(self.rating_mean_))
        trained = np.unique(rows)
        indptr = self._ratings[0]
        trained = trained[indptr[trained + 1] > indptr[trained]].astype(np.int64)
        if len(trained) == 0:
            return
        net = _AutoRecNet(self, trained)
        fn, metric, higher = validate if validate is not None else (None, None, False)
        if fn is not None:
            score = fn

            def fn():  # the parameters changed since the last epoch
                self._drop_caches()
                return score()
        try:
            run_epochs(self, net, None, None, None, None, len(trained), self._rng, epochs, validate=fn,
                       metric=metric, higher_is_better=higher, alpha=float(self.l2),
                       learning_rate=float(self.learning_rate), advice=" or a smaller l2")
        finally:
            self._drop_caches()

    def _score_pairs(self, user_rows, item_rows):
        rows, cols = self._pairs(np.asarray(user_rows, np.int64), np.asarray(item_rows, np.int64))
        out = np.zeros(len(rows), np.float64)
        known = np.flatnonzero(cols > 0)  # an unknown column has no decoder row: the mean (0 here)
        if len(known) == 0:
            return out
        order = known[np.argsort(rows[known], kind="stable")]
        query_rows, counts = np.unique(rows[order], return_counts=True)
        q_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        X = self._input_rows(query_rows)
        out[order] = _core.autorec_predict(self.params_, X, q_indptr, (cols[order] - 1).astype(np.int32),
                                           self._act(), self._threads())
        return out

    def _topk(self, user_rows, k, exclude_seen, candidate_rows):
        user_rows = np.asarray(user_rows, np.int64)
        if self.item_based:  # queries: the users' decoder rows (and bias); items: their codes (and 1)
            W_dec, b_dec = self.params_[2], self.params_[3]
            queries = np.zeros((len(user_rows), W_dec.shape[1] + 1), np.float32)
            known = user_rows > 0
            queries[known, :-1] = W_dec[user_rows[known] - 1]
            queries[known, -1] = b_dec[user_rows[known] - 1]
            items = self._codes()
        else:  # queries: the users' codes (and 1); items: their decoder rows (and bias)
            H = _core.autorec_hidden(self.params_, self._input_rows(user_rows), self._act(), self._threads())
            queries = np.concatenate([H, np.ones((len(H), 1), np.float32)], axis=1)
            items = self._decoder_items()
        exclude = rows = None
        if exclude_seen:
            exclude, rows = self._seen, user_rows.astype(np.int32)
        return _core.inner_product_topk(np.ascontiguousarray(queries), items, k, candidate_rows, exclude, rows,
                                        self._threads())

    def _item_vectors(self):
        n_items = len(self._items)
        if self.item_based:
            return self._codes()[:, :-1], np.arange(1, n_items + 1)
        return self._decoder_items()[:, :-1], np.arange(1, n_items + 1)

    def _seen_changed(self):
        self._drop_caches()

    # ------------------------------------------------------------------------------------ internals
    @staticmethod
    def _refuse_implicit(ratings):
        if ratings is None:
            raise ValueError("AutoRec learns from explicit ratings: give ratings (for implicit feedback use "
                             "fastrec.EASE or fastrec.Recommender)")

    def _act(self):
        return ACTIVATIONS[self.activation]

    def _drop_caches(self):
        for name in self._caches:
            self.__dict__.pop(name, None)

    def _merge_ratings(self, rows, cols, values):
        """Add (row entity, column, rating) triples to ``_ratings``; a pair already there takes the new rating
        (the last one given wins among repeats)."""
        indptr, old_cols, old_values = self._ratings
        n_cols = len(self._sides()[1])
        old_rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        keys = np.concatenate([old_rows * n_cols + old_cols, rows.astype(np.int64) * n_cols + cols])
        vals = np.concatenate([old_values, values.astype(np.float32)])
        # the last occurrence of each key (a stable sort keeps repeats in input order). Not np.unique: NumPy 2's
        # hash-based unique is several times slower on these wide-range keys (_recbase._merge_seen).
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        last = np.concatenate([sorted_keys[1:] != sorted_keys[:-1], [True]]) if len(keys) else np.zeros(0, bool)
        keys_r, vals = sorted_keys[last], vals[order[last]]
        counts = np.bincount(keys_r // n_cols, minlength=len(indptr) - 1)
        self._ratings = (np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                         (keys_r % n_cols).astype(np.int32), vals.astype(np.float32))

    def _input_rows(self, rows):
        """The CSR input tuple of these row entities (their training ratings)."""
        indptr, cols, values = self._ratings
        rows = np.asarray(rows, np.int64)
        starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
        out_indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        at = np.repeat(starts - out_indptr[:-1], lengths) + np.arange(out_indptr[-1])
        return out_indptr, cols[at], values[at], len(self.params_[3])

    def _codes(self):
        """[H, 1] of every row entity (row 0: the unknown row, zeros), float32 (n_rows + 1, hidden + 1)."""
        c = self.__dict__.get("_codes_cache")
        if c is None:
            n = len(self._sides()[0])
            H = _core.autorec_hidden(self.params_, self._input_rows(np.arange(1, n + 1)), self._act(),
                                     self._threads())
            c = np.zeros((n + 1, H.shape[1] + 1), np.float32)
            c[1:, :-1] = H
            c[1:, -1] = 1.0
            self._codes_cache = c
        return c

    def _decoder_items(self):
        W_dec, b_dec = self.params_[2], self.params_[3]
        out = np.zeros((len(W_dec) + 1, W_dec.shape[1] + 1), np.float32)
        out[1:, :-1] = W_dec
        out[1:, -1] = b_dec
        return out


class _AutoRecNet:
    """What `run_epochs` drives: one epoch of the core over the trained rows, and snapshot / restore of the
    parameters for early stopping."""

    def __init__(self, est, trained):
        self.est = est
        self.trained = trained
        indptr, cols, values = est._ratings
        self.X = (indptr, cols, values, len(est.params_[3]))
        self.t = (values - np.float32(est.rating_mean_)).astype(np.float32)

    def train_epoch(self, handle, keys, y, weight, order, *, batch_size, alpha, learning_rate, momentum, nesterov,
                    beta_1, beta_2, epsilon, sampler, epoch, n_threads, progress):
        est = self.est
        loss_sum, adam_t, rows, diverged, error = _core.autorec_train_epoch(
            est.params_, est._state[0], est._state[1], self.X, self.t, self.trained[order], batch_size, alpha,
            est._act(), est.optimizer, learning_rate, beta_1, beta_2, epsilon, est._adam_t, n_threads, "auto",
            progress)
        est._adam_t = adam_t
        return loss_sum, rows, diverged, error

    def snapshot(self):
        est = self.est
        return copy.deepcopy((est.params_, est._state, est._adam_t))

    def restore(self, snap):
        est = self.est
        params, state, adam_t = copy.deepcopy(snap)
        for dst, src in zip(est.params_ + est._state[0] + est._state[1], params + state[0] + state[1]):
            dst[...] = src
        est._adam_t = adam_t
