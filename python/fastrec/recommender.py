"""`fastrec.Recommender`: a neural recommender (NCF / NeuMF family with side features) over users x items.

Users and items are *entities* numbered 1..N (0 = unknown) from the raw ids seen in the interactions and in
the side-feature tables (`fastrec._recbase.RecommenderBase` owns them, the seen pairs, the feature tables and
the user-facing fit / predict / recommend). Key column 0 names the user entity, key column 1 the item entity;
every input field of the underlying field model (`fastrec._fieldnet.FieldNet`, docs/DESIGN.md) is read
through one of them: the user / item id embeddings, one embedding per categorical or multi-hot side-feature
column, the numeric columns as dense blocks, optionally the GMF pair of id embeddings, and optionally history
fields (SVD++'s implicit feedback: the bag of items of each user, of users of each item). An entity known only
from a feature table (a cold item) reads the "unknown" id row and its own features; the unknown rows are
trained by id dropout (a small fraction of training examples read them instead of their own id).
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp

from fastrec import _core, _recbase
from fastrec._checks import check_bool, check_float, check_int
from fastrec._fieldnet import (ACTIVATIONS, OPTIMIZERS, Field, FieldNet, Float32Normals, bags_of_csr, bags_of_ids,
                               check_precision, core_precision, run_epochs)
from fastrec._recbase import RecommenderBase, grown_id_rows, id_rows, kept_bags, zero_rows
from fastrec._registry import persistable

__all__ = ["Recommender"]

_merge_seen = _recbase._merge_seen  # moved to _recbase; still importable from here

USER, ITEM = 0, 1  # key columns
# What "auto" means for these parameters, by loss: chosen by benchmarks/choose_defaults.py on validation
# splits of MovieLens-100k and three synthetic sets (benchmarks/QUALITY.md, "Defaults"). Ratings (mse) gain
# most from the SVD++ history fields (MovieLens-100k validation RMSE 0.924 -> 0.907) and want a smaller step;
# implicit feedback (bce) gains nothing from them there (HR@10 0.685 both ways) at 4-8x the epoch time.
_AUTO = {"mse": {"alpha": 0.1, "learning_rate": 5e-4, "embedding_alpha": 0.01, "user_history": True,
                 "item_history": True},
         "bce": {"alpha": 0.3, "learning_rate": 4e-3, "embedding_alpha": 0.03, "user_history": False,
                 "item_history": False}}
# History fields: name -> (key column, the id field whose rows the bag lists).
_HISTORY = {"user_history": (USER, "item_id"), "item_history": (ITEM, "user_id")}
# What a fit builds the model from; partial_fit refuses to continue after set_params changed one of them.
_STRUCTURE = ("embedding_dim", "hidden_layer_sizes", "activation", "loss", "gmf", "gmf_item_features", "wide",
              "user_history", "item_history", "optimizer", "id_dropout")


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


def _is_auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


@persistable
class Recommender(RecommenderBase):
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
        With ``privacy``, nothing is held out either: every epoch trains on all the interactions (an epoch
        chosen on held-out interactions would be outside the guarantee).
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
    privacy : fastrec.DPConfig or None
        Train with differential privacy (DP-SGD, fastrec.privacy; docs/DESIGN.md "Differential privacy"):
        ``privacy_spent_`` is (epsilon, delta) after fit and each partial_fit. History bags ("auto": off) and
        popularity negatives are refused, ``early_stopping`` holds nothing out; ``validation_data`` of your
        own is scored but is outside the guarantee.
    precision : {"float32", "bf16", "auto"}, default="auto"
        Precision of the MLP's training products, as `fastrec.FieldModel`'s: "bf16" rounds their operands to
        bfloat16 and sums in float32 (weights, embeddings, gradients and optimizer state stay float32); "auto"
        (the default) is "bf16" where the CPU has AVX512-BF16, else "float32". Scores are computed in float32
        either way.
    topk : {"exact", "approximate"}, default="exact"
        How ``recommend`` ranks every item. "exact": the model's score of every item. "approximate": per user,
        a linear surrogate of the MLP above its first layer, fitted by least squares on a fixed sample of
        4,096 items scored exactly, scores every item over a bfloat16 copy of the cached first layer (plus the
        exact GMF and wide terms); the best ``topk_candidates`` of the items are then scored exactly and the
        best k of those returned, with their exact scores. 5-6x faster on 10^6 items; the recall@10 against
        the exact top-10 measured 0.995-1.0 (benchmarks/TOPK.md). ``recommend(items=...)`` over a subset of
        the items always ranks exactly. Results are the same for any ``n_threads``.
    topk_candidates : float, default=0.02
        With ``topk="approximate"``: the fraction of the items (at least k) scored exactly in the second
        stage. More costs more time and misses fewer of the exact top k.

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

    _fitted_attr = "net_"
    _structure_params = _STRUCTURE
    _caches = ("_predictor", "_fast")  # prediction handles: views over this object's arrays

    def __init__(self, embedding_dim=64, hidden_layer_sizes=(128, 64), activation="relu", loss="auto", gmf=True,
                 gmf_item_features=False, wide=True, user_history="auto", item_history="auto",
                 optimizer="adam", learning_rate="auto", alpha="auto", embedding_alpha="auto", epochs=50,
                 batch_size=256, negatives=4,
                 negative_sampling="uniform", id_dropout=0.05, momentum=0.9, nesterovs_momentum=True,
                 validation_metric="auto", early_stopping=True, validation_fraction=0.1, n_iter_no_change=5,
                 clip_predictions=True, random_state=None, n_threads=None, verbose=False, privacy=None,
                 precision="auto", topk="exact", topk_candidates=0.02):
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
        self.privacy = privacy
        self.precision = precision
        self.topk = topk
        self.topk_candidates = topk_candidates


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
        check_int(self.batch_size, "batch_size")
        check_int(self.negatives, "negatives", minimum=0)
        # The core reads id_dropout as a float32, where 0.99999999 is 1.
        dropout = self.id_dropout
        if not (isinstance(dropout, numbers.Real) and 0 <= dropout < 1 and np.float32(dropout) < 1):
            raise ValueError(f"id_dropout must lie in [0, 1), got {self.id_dropout!r}")
        loss = self.loss if self.loss != "auto" else ("bce" if implicit else "mse")
        if implicit and loss == "mse":
            raise ValueError("loss='mse' needs ratings; implicit feedback (ratings=None) trains with 'bce'")
        if self.privacy is not None:
            self._check_privacy()
        check_precision(self.precision)
        self._topk_fraction()
        return hidden, loss

    def _topk_fraction(self):
        """The core's approx_fraction for ranking every item: 0 (exact) or topk_candidates."""
        if not (isinstance(self.topk, str) and self.topk in ("exact", "approximate")):
            raise ValueError(f"topk must be one of ('exact', 'approximate'), got {self.topk!r}")
        fraction = check_float(self.topk_candidates, "topk_candidates", 0.0, 1.0, low_open=True, high_open=False)
        return fraction if self.topk == "approximate" else 0.0

    def _check_privacy(self):
        """What private training (fastrec.privacy) cannot protect is refused, naming the parameter."""
        from fastrec.privacy import DPConfig

        if not isinstance(self.privacy, DPConfig):
            raise TypeError(f"privacy must be a fastrec.DPConfig or None, got {type(self.privacy).__name__}")
        self.privacy.check()
        for name in _HISTORY:  # a history bag holds the user's other interactions: one example reaches many
            if getattr(self, name) is True:
                raise ValueError(f"{name}=True cannot be trained privately (each history bag holds other "
                                 "interactions): set it to False or 'auto'")
        if self.negative_sampling != "uniform":
            raise ValueError("negative_sampling='popularity' draws from the interaction counts: private training "
                             "needs negative_sampling='uniform'")

    def _fit_new(self, *args, auto_validation=False, **kwargs):
        # Under privacy, early_stopping holds nothing out (the epoch it would pick depends on held-out
        # interactions, outside the guarantee): every epoch trains, on all the interactions. validation_data
        # passed by the caller still works and is outside the guarantee (docs/DESIGN.md).
        if self.privacy is not None:
            auto_validation = False
        return super()._fit_new(*args, auto_validation=auto_validation, **kwargs)

    def _setting(self, name, loss):
        """Parameter `name` with "auto" resolved for this loss (_AUTO)."""
        value = getattr(self, name)
        if name in _HISTORY and _is_auto(value) and getattr(self, "privacy", None) is not None:
            return False  # history bags are not trained privately (_check_privacy)
        return _AUTO[loss][name] if _is_auto(value) else value


    # ------------------------------------------------------------------------------------ model (hooks)
    def _build(self, user_rows, item_rows, tables, config):
        """Fields, parameters and optimizer state for a first fit (RecommenderBase hook)."""
        hidden, loss = config
        rng = self._rng
        n_u, n_i = len(self._users) + 1, len(self._items) + 1
        # Id rows: entities seen in interactions get one each, in entity order (others read row 0, unknown).
        user_id_row, n_user_ids = id_rows(user_rows, n_u)
        item_id_row, n_item_ids = id_rows(item_rows, n_i)

        d = self.embedding_dim
        dropout = float(self.id_dropout)
        fields = [Field("user_id", n_user_ids, d, USER, dropout=dropout),
                  Field("item_id", n_item_ids, d, ITEM, dropout=dropout)]
        bags = [bags_of_ids(user_id_row), bags_of_ids(item_id_row)]
        dense, dense_tables = [], []
        for side, key in (("user", USER), ("item", ITEM)):
            f, b, bg, dt = self._feature_inputs(tables[side], side, key, d)
            fields += f
            dense += b
            bags += bg
            dense_tables += dt
        if self.gmf:
            fields.append(Field("user_gmf", n_user_ids, d, USER, role="gmf_u", dropout=dropout, source=0))
            bags.append(bags[0])
            item_bags, n_features = _item_feature_bags(fields, bags) if self.gmf_item_features else (None, 0)
            if n_features:
                # Its own bags over [feature values | id rows]; never dropped (a dropped example would read entity
                # 0's bag, losing its features too): the features are what cold items read here.
                fields.append(Field("item_gmf", n_features + n_item_ids, d, ITEM, role="gmf_v"))
                bags.append(item_bags)
            else:
                fields.append(Field("item_gmf", n_item_ids, d, ITEM, role="gmf_v", dropout=dropout, source=1))
                bags.append(bags[1])
        if self.wide:  # a bias per id and per categorical / multi-hot feature value, on the same bags
            embedded = [(i, f, b) for i, (f, b) in enumerate(zip(fields, bags)) if f.role == "mlp"]
            for i, f, b in embedded:
                fields.append(Field(f"{f.name}:wide", f.vocab, 1, f.key, role="wide", dropout=f.dropout, source=i))
                bags.append(b)
        for name, (key, source) in _HISTORY.items():  # their bags are built from the seen pairs (_seen_changed)
            if self._setting(name, loss):
                fields.append(Field(name, fields[[f.name for f in fields].index(source)].vocab, d, key,
                                    dropout=dropout))
                bags.append(None)
        embedding_alpha = self._setting("embedding_alpha", loss)
        if embedding_alpha is not None:
            for f in fields:
                f.alpha = float(embedding_alpha)
        self._bags, self._dense_tables = bags, dense_tables
        draws = Float32Normals.of(rng, self._threads())
        self.net_ = FieldNet(fields, dense, hidden, self.activation, loss, 2, draws)
        for i, f in enumerate(fields):
            if f.role == "gmf_v" and f.source is None:
                # The unknown item's id part (never trained: the field is never dropped) adds nothing.
                self.net_.tables[i][f.vocab - n_item_ids] = 0.0
        self.net_.reset_optimizer(self.optimizer)
        self.loss_ = loss
        self._privacy_run = None
        if self.privacy is not None:
            from fastrec.privacy import PrivateRun

            self._privacy_run = PrivateRun(self.privacy, seed=int(rng.randint(0, 2**31 - 1)))

    def _grow_model(self, user_rows, item_rows, tables, old):
        """Grow the tables, bags and dense tables to the entities added (RecommenderBase hook); on any error
        the model is left as it was."""
        net = self.net_
        saved = (list(self._bags), list(self._dense_tables), [f.vocab for f in net.fields], list(net.tables),
                 list(net.table_state1), list(net.table_state2))
        try:
            self._grow_fields(user_rows, item_rows, tables, old)
        except BaseException:
            (self._bags, self._dense_tables, vocabs, net.tables, net.table_state1, net.table_state2) = saved
            for f, vocab in zip(net.fields, vocabs):
                f.vocab = vocab
            raise
        self._predictor = None

    def _grow_fields(self, user_rows, item_rows, tables, old):
        # Id rows (fields USER and ITEM are the user and item id fields): the entities of these interactions
        # without one yet (new ones, or ones known only by features) get the next rows.
        new_ids = {USER: grown_id_rows(self._bags[USER][1], user_rows, len(self._users) + 1,
                                       self.net_.fields[USER].vocab),
                   ITEM: grown_id_rows(self._bags[ITEM][1], item_rows, len(self._items) + 1,
                                       self.net_.fields[ITEM].vocab)}
        grown = {}  # source field -> its grown bag table (GMF and wide fields read their source's bags)
        for i, f in enumerate(self.net_.fields):
            if f.name in _HISTORY:  # one row per id row of the other side; bags rebuilt from the seen pairs
                self.net_.grow(i, new_ids[USER if _HISTORY[f.name][1] == "user_id" else ITEM][1], self._rng)
                continue
            if f.role == "gmf_v" and f.source is None:  # gmf_item_features: the grown id and feature bags
                self._bags[i], n_features = _item_feature_bags(self.net_.fields[:i], self._bags[:i])
                self.net_.grow(i, n_features + new_ids[ITEM][1], self._rng)
                continue
            source = i if f.source is None else f.source
            if source not in grown:
                if source in new_ids:
                    grown[source] = bags_of_ids(new_ids[source][0])
                else:
                    grown[source] = self._grown_feature_bags(self._bags[source], self.net_.fields[source].name,
                                                             tables, old)
            self._bags[i] = grown[source]
            if source in new_ids:
                self.net_.grow(i, new_ids[source][1], self._rng)
        for b, block in enumerate(self.net_.dense):
            self._dense_tables[b] = self._grown_numeric_rows(self._dense_tables[b], block.name, tables, old)

    def _history_in_parameters(self):
        names = [f.name for f in self.net_.fields if f.name in _HISTORY]
        if names:
            return (f"this model reads each user's (item's) interactions through {' and '.join(names)}; fit with "
                    f"{'=False, '.join(names)}=False to save it without them")
        return None

    def _forget_model(self, side, keep):
        """Zero the id rows of the forgotten entities in every table read through that side's id rows (id,
        GMF, wide, the other side's history field), compact that side's bags and dense tables (RecommenderBase
        hook). History bags are rebuilt from the seen pairs by _seen_changed."""
        net, key = self.net_, USER if side == "user" else ITEM
        id_row = self._bags[key][1]
        owned = np.unique(id_row[~keep])
        owned = owned[owned > 0]
        names = [f.name for f in net.fields]
        for i, f in enumerate(net.fields):
            source = _HISTORY[f.name][1] if f.name in _HISTORY else (names[f.source] if f.source is not None
                                                                       else f.name)
            if source == names[key]:
                rows = owned
            elif f.role == "gmf_v" and key == ITEM:  # gmf_item_features: [feature values | id rows]
                rows = owned + (f.vocab - net.fields[key].vocab)
            else:
                continue
            zero_rows([net.tables[i], net.table_state1[i], net.table_state2[i]], rows)
        for i, f in enumerate(net.fields):
            if f.key == key and self._bags[i] is not None:
                self._bags[i] = kept_bags(self._bags[i], keep)
        for b, block in enumerate(net.dense):
            if block.key == key:
                self._dense_tables[b] = np.ascontiguousarray(self._dense_tables[b][keep])
        self._predictor = None

    def _seen_changed(self):
        """The negative-sampling distribution over item entities and the history fields' bags follow the seen
        pairs (RecommenderBase hook)."""
        counts = self._seen_counts
        popularity = counts ** 0.75 if self.negative_sampling == "popularity" else (counts > 0).astype(np.float64)
        self._cdf = np.cumsum(popularity)
        self._history_bags()

    def _train(self, user_rows, item_rows, y, weight, epochs, validate):
        """`epochs` epochs of the field model over the interactions (RecommenderBase hook)."""
        handle = self.net_.handle(self._bags, self._dense_tables, training=True,
                                  precision=core_precision(self.precision))
        sampler = self._sampler(negatives=self.negatives if self.implicit_ else 0, seed=0)
        self._predictor = None  # also what makes an interrupted fit predict with the new parameters
        fn, metric, higher = validate if validate is not None else (None, None, False)
        if fn is not None:
            score = fn

            def fn():  # a prediction handle built in an earlier epoch holds that epoch's MLP: build a new one
                self._predictor = None
                return score()
        run = getattr(self, "_privacy_run", None)
        if run is not None:  # DP-SGD (fastrec.privacy): uniform negatives, never from the seen lists
            from fastrec.privacy import count_groups, private_epoch_runner, user_units

            sampler = dict(sampler, cdf=None, seen=None)
            units = user_units(user_rows) if run.config.unit == "user" else None
            plan = run.plan(len(y), int(self.batch_size), epochs, count_groups(self.net_.fields)[1],
                            sampler["negatives"], units)
            self._private_train_epoch = private_epoch_runner(self, run, plan, units)
        try:
            run_epochs(self, self.net_, handle, [user_rows, item_rows], y, weight, len(y), self._rng, epochs,
                       sampler=sampler, validate=fn, alpha=self._setting("alpha", self.loss_),
                       learning_rate=self._setting("learning_rate", self.loss_), metric=metric,
                       higher_is_better=higher,
                       advice=", a moderate alpha or embedding_alpha (too strong a penalty diverges too), or scaled "
                              "ratings and numeric features")
        finally:  # also after an interrupted fit, whose best epoch is restored in place: the pair scorer holds
            # copies of the weights, so it must be rebuilt
            self.__dict__.pop("_private_train_epoch", None)
            self._predictor = None

    def _score_pairs(self, user_rows, item_rows):
        return self._handle().predict([user_rows, item_rows], self._threads())

    def _topk(self, user_rows, k, exclude_seen, candidate_rows):
        # Approximate only over every item: a candidate list the caller gave (recommend's items=) ranks exactly.
        fraction = self._topk_fraction() if len(candidate_rows) == len(self._items) else 0.0
        return self._handle().topk(self._sampler(negatives=0, seed=0), user_rows, candidate_rows, k, exclude_seen,
                                   self._threads(), "auto", fraction)

    def _item_vectors(self):
        """The item id embeddings of every item entity; candidates: the items with an id row of their own."""
        rows = self._bags[ITEM][1]  # entity -> id row of the item id table (0: none of its own)
        return self.net_.tables[ITEM][rows], np.flatnonzero(rows > 0)

    # ------------------------------------------------------------------------------------ model internals
    def _history_bags(self):
        """Bags of the history fields from the seen pairs (user entities x item entities): each user's items
        (each item's users) as rows of the item (user) id table, weights 1/sqrt(bag size) as in SVD++. The
        pairs held out for early stopping never enter them (a validation item in its user's bag would leak)."""
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

    def _pair_scorer(self):
        """The single-pair path of predict for int ids (core.PairScorer over the current handle and ids)."""
        if self._users.ids.dtype.kind != "i" or self._items.ids.dtype.kind != "i":
            return None
        handle = self._handle()
        cached = self.__dict__.get("_fast")  # (handle, predict_lists, score_ints, scorer)
        if cached is None or cached[0] is not handle:
            bounds = getattr(self, "rating_range_", None)
            low, high = bounds if bounds is not None and self.clip_predictions else (-np.inf, np.inf)
            def aligned(a):  # arrays unpickled on a Dask worker may sit at any byte offset
                return None if a is None else np.require(a, np.int64, ["C", "A"])

            scorer = _core.PairScorer(handle, aligned(self._users._sorted), aligned(self._users._order),
                                      aligned(self._items._sorted), aligned(self._items._order),
                                      float(self.rating_mean_), float(low), float(high))
            # predict's and serving_handle's first try: the scorer's C calls, valid while handle is _predictor
            self._fast = cached = (handle, *scorer.fast_calls(), scorer)
        return cached[3]

    def _handle(self):
        """The prediction handle, built on first use after fit (and after unpickling)."""
        if getattr(self, "_predictor", None) is None:
            self._predictor = self.net_.handle(self._bags, self._dense_tables)
        return self._predictor

    def _sampler(self, negatives, seed):
        return {"negatives": int(negatives), "user_key": USER, "item_key": ITEM, "n_items": len(self._items) + 1,
                "cdf": self._cdf, "seen": self._seen, "seed": int(seed)}
