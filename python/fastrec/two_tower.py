"""`fastrec.TwoTower`: a retrieval model that learns one vector per user and per item (docs/DESIGN.md).

Each side is a tower: the id embedding and the side's feature embeddings (categorical, multi-hot, numeric,
the same fields as the `Recommender`) through its own MLP, ending in an ``output_dim`` vector, optionally L2
normalised. A pair scores ``<u, v> / temperature``, so recommending is a maximum-inner-product search over
the item vectors: exact (``_core.inner_product_topk``, memory-bound) or approximate (``index="hnsw"``, the
``fastrec[ann]`` extra). Users and items are entities of `RecommenderBase`; every tower reads its side
through key column 0.
"""

from __future__ import annotations

import numbers

import numpy as np

from fastrec import _core
from fastrec._checks import check_bool, check_float, check_int
from fastrec._fieldnet import ACTIVATIONS, OPTIMIZERS, Field, bags_of_ids, run_epochs
from fastrec._recbase import SIDES, RecommenderBase, grown_id_rows, id_rows, kept_bags, zero_rows
from fastrec._registry import persistable
from fastrec._towernet import TowerNet, vectors
from fastrec.features import as_id_array

__all__ = ["TwoTower"]

LOSSES = ("auto", "softmax", "bpr", "bce", "mse")
INDEXES = ("exact", "hnsw")
# "auto" values by loss. Softmax's were checked on a validation split cut from MovieLens-100k's training data
# against a random search of 12 configurations (benchmarks/two_tower_quality.py): NDCG@10 0.418 against the
# best 0.422, within the spread of the search (0.409-0.422).
_AUTO = {"softmax": {"negatives": 0, "normalize": True, "temperature": 0.1, "learning_rate": 2e-3},
         "bpr": {"negatives": 4, "normalize": False, "temperature": 1.0, "learning_rate": 2e-3},
         "bce": {"negatives": 4, "normalize": False, "temperature": 1.0, "learning_rate": 2e-3},
         "mse": {"negatives": 0, "normalize": False, "temperature": 1.0, "learning_rate": 1e-3}}
_STRUCTURE = ("embedding_dim", "hidden_layer_sizes", "output_dim", "activation", "normalize", "temperature",
              "loss", "optimizer", "id_dropout")


def _is_auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


@persistable
class TwoTower(RecommenderBase):
    """Two-tower retrieval model trained on (user, item[, rating]) interactions, with optional side features.

    The score of a pair is the inner product of the user's and the item's vectors (divided by
    ``temperature``); ``recommend`` finds the best items by exact or approximate inner-product search, fast
    enough to rank a catalogue of millions per user, and ``user_vectors`` / ``item_vectors`` give the vectors
    to any other search engine.

    Parameters
    ----------
    output_dim : int, default=64
        Length of the user and item vectors.
    embedding_dim : int, default=64
        Dimension of the id embedding and of each categorical / multi-hot side-feature embedding.
    hidden_layer_sizes : tuple of int, default=(128,)
        Each tower's MLP between its embeddings and its output (identity activation on the output).
    activation : {"relu", "tanh", "logistic", "identity"}, default="relu"
    loss : {"auto", "softmax", "bpr", "bce", "mse"}, default="auto"
        "softmax": sampled softmax over the batch's items (in-batch negatives) with the log-Q correction of
        their sampling frequency (Yi et al., RecSys 2019), plus ``negatives`` uniform items per batch (mixed
        negative sampling); a negative equal to a row's positive (an accidental hit) is removed. "bpr" and
        "bce": ``negatives`` sampled items per positive, as the ``Recommender``. "mse": explicit ratings.
        "auto": "softmax" on implicit feedback, "mse" on ratings.
    negatives : int or "auto", default="auto"
        "softmax": extra uniform negatives per batch ("auto": 0, in-batch only); "bpr" / "bce": negatives per
        positive ("auto": 4).
    normalize : bool or "auto", default="auto"
        L2-normalise both vectors (scores become cosines / temperature). "auto": True for "softmax".
    temperature : float or "auto", default="auto"
        Divides every score. "auto": 0.1 for "softmax" (with normalised vectors), 1 otherwise.
    optimizer : {"adam", "adagrad", "sgd"}, default="adam"
        Lazy Adam, row-wise Adagrad or SGD on the embedding rows of each batch (a step costs the same whatever
        the vocabulary size); Adam, Adagrad or SGD (with ``momentum``) on the MLPs.
    learning_rate : float or "auto", default="auto"
    alpha : float, default=1e-4
        L2 penalty on the MLP weights and on the embedding rows a batch touches.
    epochs : int, default=50
        The most epochs a fit runs (early stopping usually ends it sooner).
    batch_size : int, default=1024
        Positives per step; with "softmax" each row's negatives are the batch's other items, so larger
        batches give more negatives.
    id_dropout : float, default=0.05
        Fraction of training examples whose tower reads the learned "unknown" id row instead of their own:
        what users and items never seen in training (or known only by their features) use.
    index : {"exact", "hnsw"}, default="exact"
        How ``recommend`` searches the item vectors. "exact": a scan of every item vector, bound by memory
        bandwidth. "hnsw": an approximate HNSW graph (the ``fastrec[ann]`` extra, faiss-cpu), built at the end
        of fit / partial_fit / add_features and saved with the model: about 0.2 ms per user at recall
        about 0.96 on clustered vectors (benchmarks/ANN.md). ``recommend(items=...)`` always searches exactly.
    index_options : dict or None
        Options of ``fastrec.ann.ApproximateIndex`` (M, ef_construction, ef_search).
    momentum, nesterovs_momentum, validation_metric, early_stopping, validation_fraction, n_iter_no_change,
    clip_predictions, random_state, n_threads, verbose
        As in ``fastrec.Recommender``.

    Attributes
    ----------
    n_users_, n_items_, history_, loss_curve_, best_epoch_, rating_mean_, rating_range_, validation_size_
        As in ``fastrec.Recommender``.
    loss_ : str
        The loss trained ("auto" resolved).
    """

    _fitted_attr = "net_"
    _structure_params = _STRUCTURE
    _caches = ("_handle_cache", "_item_matrix", "_ann")

    def __init__(self, output_dim=64, embedding_dim=64, hidden_layer_sizes=(128,), activation="relu", loss="auto",
                 negatives="auto", normalize="auto", temperature="auto", optimizer="adam", learning_rate="auto",
                 alpha=1e-4, epochs=50, batch_size=1024, id_dropout=0.05, index="exact", index_options=None,
                 momentum=0.9, nesterovs_momentum=True, validation_metric="auto", early_stopping=True,
                 validation_fraction=0.1, n_iter_no_change=5, clip_predictions=True, random_state=None,
                 n_threads=None, verbose=False):
        self.output_dim = output_dim
        self.embedding_dim = embedding_dim
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.loss = loss
        self.negatives = negatives
        self.normalize = normalize
        self.temperature = temperature
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.alpha = alpha
        self.epochs = epochs
        self.batch_size = batch_size
        self.id_dropout = id_dropout
        self.index = index
        self.index_options = index_options
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

    # ------------------------------------------------------------------------------------ parameters
    def _validate_params(self, implicit: bool):
        check_int(self.output_dim, "output_dim")
        check_int(self.embedding_dim, "embedding_dim")
        hidden = self.hidden_layer_sizes
        if isinstance(hidden, numbers.Integral):
            hidden = (hidden,)
        if isinstance(hidden, str) or not hasattr(hidden, "__iter__"):
            raise ValueError(f"hidden_layer_sizes must be an int or a sequence of ints, got {hidden!r}")
        hidden = tuple(hidden)
        for h in hidden:
            check_int(h, "hidden_layer_sizes entries")
        for name, options in (("activation", ACTIVATIONS), ("loss", LOSSES), ("optimizer", OPTIMIZERS),
                              ("index", INDEXES)):
            if not (isinstance(getattr(self, name), str) and getattr(self, name) in options):
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")
        loss = self.loss if self.loss != "auto" else ("softmax" if implicit else "mse")
        if implicit and loss == "mse":
            raise ValueError("loss='mse' needs ratings; implicit feedback (ratings=None) trains with 'softmax', "
                             "'bpr' or 'bce'")
        if not implicit and loss != "mse":
            raise ValueError(f"loss={loss!r} is for implicit feedback (ratings=None); ratings train with 'mse'")
        if not _is_auto(self.negatives):
            check_int(self.negatives, "negatives", minimum=0)
            if loss in ("bpr", "bce") and self.negatives < 1:
                raise ValueError(f"negatives must be >= 1 with loss={loss!r}, got {self.negatives}")
        if not _is_auto(self.normalize):
            check_bool(self.normalize, "normalize")
        if not _is_auto(self.temperature):
            check_float(self.temperature, "temperature", low_open=True)
        if not _is_auto(self.learning_rate):
            check_float(self.learning_rate, "learning_rate", low_open=True)
        check_float(self.alpha, "alpha")
        check_float(self.momentum, "momentum", 0.0, 1.0, high_open=False)
        check_bool(self.nesterovs_momentum, "nesterovs_momentum")
        check_int(self.batch_size, "batch_size")
        dropout = self.id_dropout
        if not (isinstance(dropout, numbers.Real) and 0 <= dropout < 1 and np.float32(dropout) < 1):
            raise ValueError(f"id_dropout must lie in [0, 1), got {self.id_dropout!r}")
        if self.index_options is not None and not isinstance(self.index_options, dict):
            raise TypeError(f"index_options must be a dict or None, got {type(self.index_options).__name__}")
        if self.index == "hnsw":
            from fastrec.ann import _faiss

            _faiss()  # fail before training when the extra is missing
        return hidden, loss

    def _setting(self, name):
        """Parameter `name` with "auto" resolved for the loss trained."""
        value = getattr(self, name)
        return _AUTO[self.loss_][name] if _is_auto(value) else value

    # ------------------------------------------------------------------------------------ model (hooks)
    def _build(self, user_rows, item_rows, tables, config):
        hidden, loss = config
        self.loss_ = loss
        d, dropout = self.embedding_dim, float(self.id_dropout)
        self._bags, self._dense_tables, inputs = {}, {}, []
        for side, rows in zip(SIDES, (user_rows, item_rows)):
            n_entities = len(self._entities(side)) + 1
            id_row, vocab = id_rows(rows, n_entities)
            fields, dense, bags, dense_tables = self._feature_inputs(tables[side], side, 0, d)
            fields = [Field(f"{side}_id", vocab, d, 0, dropout=dropout), *fields]
            self._bags[side] = [bags_of_ids(id_row), *bags]
            self._dense_tables[side] = dense_tables
            inputs.append((fields, dense))
        self.net_ = TowerNet(inputs[0], inputs[1], hidden, self.output_dim, self.activation,
                             bool(self._setting("normalize")), float(self._setting("temperature")), self._rng)
        for tower in self.net_.towers:
            for f in tower.fields:
                f.alpha = float(self.alpha)
        self.net_.reset_optimizer(self.optimizer)

    def _grow_model(self, user_rows, item_rows, tables, old):
        saved = ({s: list(b) for s, b in self._bags.items()}, {s: list(t) for s, t in self._dense_tables.items()},
                 [(f.vocab, t.tables[i], t.table_state1[i], t.table_state2[i])
                  for t in self.net_.towers for i, f in enumerate(t.fields)])
        try:
            for side, rows, tower in zip(SIDES, (user_rows, item_rows), self.net_.towers):
                bags = self._bags[side]
                id_row, vocab = grown_id_rows(bags[0][1], rows, len(self._entities(side)) + 1, tower.fields[0].vocab)
                bags[0] = bags_of_ids(id_row)
                tower.grow(0, vocab, self._rng)
                for i in range(1, len(bags)):
                    bags[i] = self._grown_feature_bags(bags[i], tower.fields[i].name, tables, old)
                dense = self._dense_tables[side]
                for b, block in enumerate(tower.dense):
                    dense[b] = self._grown_numeric_rows(dense[b], block.name, tables, old)
        except BaseException:
            self._bags, self._dense_tables, fields = saved
            fields = iter(fields)
            for t in self.net_.towers:
                for i, f in enumerate(t.fields):
                    f.vocab, t.tables[i], t.table_state1[i], t.table_state2[i] = next(fields)
            raise
        self._drop_caches()

    def _forget_model(self, side, keep):
        """Zero the forgotten entities' id rows of that side's tower, compact its bags and dense tables
        (RecommenderBase hook); the item vectors and the index are rebuilt on first use."""
        tower = self.net_.towers[SIDES.index(side)]
        bags = self._bags[side]
        owned = np.unique(bags[0][1][~keep])
        owned = owned[owned > 0]
        zero_rows([tower.tables[0], tower.table_state1[0], tower.table_state2[0]], owned)
        self._bags[side] = [kept_bags(b, keep) for b in bags]
        self._dense_tables[side] = [np.ascontiguousarray(t[keep]) for t in self._dense_tables[side]]
        self._drop_caches()

    def _seen_changed(self):
        self._drop_caches()
        self.index_ = None  # rebuilt after training, or on first use after add_features

    def _train(self, user_rows, item_rows, y, weight, epochs, validate):
        handle = self.net_.handle(self._side_data("user"), self._side_data("item"), training=True)
        self._drop_caches()
        fn, metric, higher = validate if validate is not None else (None, None, False)
        if fn is not None:
            score = fn

            def fn():  # the parameters changed since the last epoch: no cached vectors
                self._drop_caches()
                return score()
        try:
            run_epochs(self, self.net_, handle, [user_rows, item_rows], y, weight, len(y), self._rng, epochs,
                       sampler=self._training(), validate=fn, alpha=float(self.alpha),
                       learning_rate=float(self._setting("learning_rate")), metric=metric, higher_is_better=higher,
                       advice=", a higher temperature or a smaller alpha")
        finally:
            self._drop_caches()
        if self.index == "hnsw":  # only after a completed fit: an interrupted one builds it on first use
            self._build_index()

    def _score_pairs(self, user_rows, item_rows):
        scale = 1.0 / self.net_.temperature
        if len(user_rows) <= 64:  # online scoring: no dedup pass
            u, v = self._vectors("user", user_rows, scale), self._vectors("item", item_rows)
        else:  # each distinct entity through its tower once (ranking protocols repeat them 100 times)
            users, u_at = np.unique(user_rows, return_inverse=True)
            items, i_at = np.unique(item_rows, return_inverse=True)
            u, v = self._vectors("user", users, scale), self._vectors("item", items)
            u_at, i_at = u_at.ravel(), i_at.ravel()
            if len(users) * len(items) <= 4 * len(user_rows):  # few distinct pairs: one GEMM, then a gather
                return (u @ v.T)[u_at, i_at].astype(np.float64)
            u, v = u[u_at], v[i_at]
        return np.einsum("ij,ij->i", u, v, dtype=np.float64)

    def _topk(self, user_rows, k, exclude_seen, candidate_rows):
        queries = self._vectors("user", user_rows, 1.0 / self.net_.temperature)
        n_items = len(self._items)
        if self.index == "hnsw" and len(candidate_rows) == n_items:
            exclude = None
            if exclude_seen:
                indptr, items = self._seen
                starts, ends = indptr[user_rows], indptr[user_rows + 1]
                lengths = ends - starts
                at = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + \
                    np.arange(lengths.sum())
                exclude = (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                           (items[at] - 1).astype(np.int32))  # index row = item entity - 1
            rows, scores = self._index().search(queries, k, exclude=exclude, n_threads=self.n_threads)
            return np.where(rows >= 0, rows + 1, -1).astype(np.int32), scores
        return _core.inner_product_topk(queries, self._item_vectors_all(), k, candidate_rows,
                                        self._seen if exclude_seen else None, user_rows if exclude_seen else None,
                                        self._threads())

    def _item_vectors(self):
        return self._item_vectors_all(), np.arange(1, len(self._items) + 1)

    # ------------------------------------------------------------------------------------ vectors
    def user_vectors(self, users) -> np.ndarray:
        """float32 (n, output_dim) vectors of these users (normalised when ``normalize``); an unknown user gets
        the vector of the learned unknown id (and of its features, when it was in a feature table)."""
        self._check_fitted()
        return self._vectors("user", self._users.index(as_id_array(users, "users")))

    def item_vectors(self, items=None) -> np.ndarray:
        """float32 (n, output_dim) vectors of these items (every known item, in ``item_ids_`` order, when
        None). A pair's score is ``user_vectors(u) @ item_vectors(i) / temperature`` (``predict`` adds the
        mean rating for ratings)."""
        self._check_fitted()
        if items is None:
            return self._item_vectors_all()[1:].copy()
        return self._vectors("item", self._items.index(as_id_array(items, "items")))

    @property
    def item_ids_(self) -> np.ndarray:
        """The raw ids of the known items, in the order of ``item_vectors()``."""
        self._check_fitted()
        return self._items.ids

    def _side_data(self, side):
        return self._bags[side], self._dense_tables[side]

    def _handle(self):
        if getattr(self, "_handle_cache", None) is None:
            self._handle_cache = self.net_.handle(self._side_data("user"), self._side_data("item"))
        return self._handle_cache

    def _vectors(self, side, rows, scale=1.0):
        return vectors(self._handle(), side == "user", rows, scale, self._threads())

    def _item_vectors_all(self):
        """Vectors of every item entity 0..n_items (row 0: the unknown item), cached until the model changes."""
        if getattr(self, "_item_matrix", None) is None:
            self._item_matrix = self._vectors("item", np.arange(len(self._items) + 1, dtype=np.int32))
        return self._item_matrix

    def _drop_caches(self):
        self._handle_cache = self._item_matrix = self._ann = None

    def _build_index(self):
        """The HNSW graph over the item vectors (index rows = item entities - 1), kept as bytes in index_."""
        from fastrec.ann import ApproximateIndex

        built = ApproximateIndex(self._item_vectors_all()[1:], **(self.index_options or {}),
                                 n_threads=self.n_threads)
        self.index_ = built.to_bytes()
        self._ann = built

    def _index(self):
        if getattr(self, "_ann", None) is None:
            if getattr(self, "index_", None) is None:
                self._build_index()
            else:
                from fastrec.ann import ApproximateIndex

                self._ann = ApproximateIndex.from_bytes(self.index_)
        return self._ann

    def _training(self):
        """The core's training dict: the loss, negatives, the log-Q sampling probabilities (each item's share of
        the training interactions: in-batch negatives are drawn as the positives are) and the sampler of
        bpr / bce negatives (uniform over the items trained on, rejecting each user's seen items)."""
        counts = self._seen_counts
        training = {"loss": self.loss_, "negatives": int(self._setting("negatives")), "n_items": len(counts),
                    "seed": 0, "seen": self._seen}
        if self.loss_ == "softmax":
            training["item_prob"] = (counts / max(counts.sum(), 1.0)).astype(np.float32)
        else:
            training["cdf"] = np.cumsum((counts > 0).astype(np.float64))
        return training
