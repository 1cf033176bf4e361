"""`fastrec.MultVAE` and `fastrec.MultDAE`: the autoencoders of Liang et al., "Variational Autoencoders for
Collaborative Filtering" (WWW 2018), for implicit feedback.

A user is their bag of items x (a row of the users x items interaction matrix). The bag, L2-normalised and
(when training) dropped out, goes through an encoder MLP (tanh) to a latent code and back through a decoder MLP
(tanh) to one logit per item; training maximises the multinomial log-likelihood ``sum_j x_j log softmax(logits)_j``
of the bag. Mult-VAE's encoder gives a Gaussian (mean, log-variance), samples the code with the
reparameterisation trick and adds ``beta * KL(q(z|x) || N(0, I))``, beta annealed from 0 to ``beta_max``;
Mult-DAE's code is deterministic (denoising by input dropout, L2 on the weights). The core (cpp/multvae.*) runs
the first layer as a CSR product, the output layer as a dense GEMM with a fused log-softmax, and Adam.

The models have no user parameters: a user is scored from their bag, so a user never seen in training is scored
from theirs (``recommend(histories=...)``) exactly as a trained user with the same bag. Items are entities
1..n_items: column e - 1 of the logits is item entity e.
"""

from __future__ import annotations

import time

import numpy as np

from fastrec import _core
from fastrec._base import exclusive_fit
from fastrec._checks import check_bool, check_float, check_int
from fastrec._fieldnet import _Progress
from fastrec._recbase import RecommenderBase
from fastrec._registry import persistable
from fastrec.ease import EASE

__all__ = ["MultDAE", "MultVAE"]

# Batches per core call inside an epoch: progress and Ctrl-C are handled between calls.
_BATCHES_PER_CALL = 16
# Training users' items folded in / held out of each validation user (Liang et al.'s 80/20 split).
_VALIDATION_TEST_FRACTION = 0.2
# Training precisions of the output layer's products (see the classes' ``precision``).
_PRECISIONS = ("float32", "bf16", "auto")


class _Autoencoder(RecommenderBase):
    """What Mult-VAE and Mult-DAE share: everything but their defaults and ``variational``."""

    _fitted_attr = "coefs_"
    _scores_from_history = True  # a user is their bag
    _structure_params = ("hidden", "latent")
    variational = True

    # The bag-scoring machinery is EASE's (any model that scores a bag as one row of logits reuses it): users'
    # bags from the seen pairs, histories as bags, top-k over chunks of score rows, pair scores.
    _bags = EASE._bags
    _user_bags = EASE._user_bags
    _bag_topk = EASE._bag_topk
    _histories_topk = EASE._histories_topk
    _candidates = EASE._candidates
    _score_pairs = EASE._score_pairs
    _topk = EASE._topk
    similar_items = RecommenderBase.similar_items

    # ------------------------------------------------------------------------------------ public API
    @exclusive_fit
    def fit(self, users, items, ratings=None, *, validation_data=None):
        """Train on the interactions (users[i], items[i]) (raw ids; repeats count once: bags are binary).

        ratings must be None (keep the positive interactions first, e.g. ratings >= 4 as Liang et al. do).
        With ``early_stopping`` and no validation_data, ``validation_fraction`` of the users are held out of
        training as Liang et al. hold out users: 80% of each one's items are folded in, the model ranks the whole
        catalogue for them, and ``validation_metric`` (NDCG@100) is computed on the other 20% after every epoch;
        the best epoch's parameters are kept (``best_epoch_``), and training stops after ``n_iter_no_change``
        epochs without improvement. validation_data: as ``Recommender.fit`` (pairs ranked against sampled
        negatives, or a callable ``score(model, epoch)``).
        """
        self._refuse_ratings(ratings)
        users, items, _, _ = self._check_interactions(users, items, None, None)
        # Not the base's auto-validation (pairs against sampled negatives): _train holds out users instead.
        self._fit_new(users, items, None, None, None, None, self.epochs, validation_data)
        return self

    def partial_fit(self, users, items, ratings=None):
        """One more epoch over the bags of the users of these interactions (their items so far, these included),
        continuing from the current parameters, Adam state and annealing. New users and items are added (new
        items get fresh first-layer rows and output columns). On an unfitted model it is ``fit`` with one epoch."""
        self._refuse_ratings(ratings)
        return super().partial_fit(users, items)

    def recommend(self, users=None, k=10, *, exclude_seen=True, items=None, histories=None):
        """The k best items: (item ids (n, k), scores (n, k)), best first, scores the logits.

        users: ids, each scored from their bag (their training items; an unknown user has an empty bag); or
        histories: a list of bags of item ids (users never seen in training, sessions; unknown items are skipped,
        repeats count once), each scored exactly as a trained user with that bag. exclude_seen: skip the user's
        (the bag's) items. items: rank only these candidates. Padding as in ``Recommender.recommend``.
        """
        return self._recommend_users_or_histories(users, k, exclude_seen, items, histories)

    @property
    def item_ids_(self) -> np.ndarray:
        """The raw ids of the known items, in the order of the logits' columns."""
        self._check_fitted()
        return self._items.ids

    # ------------------------------------------------------------------------------------ hooks
    def _validate_params(self, implicit):
        if not implicit:
            self._refuse_ratings(True)
        hidden = self.hidden
        if isinstance(hidden, (int, np.integer)):
            hidden = (hidden,)
        if not isinstance(hidden, (tuple, list)):
            raise TypeError(f"hidden must be a tuple of layer widths, got {type(self.hidden).__name__}")
        for h in hidden:
            check_int(h, "hidden")
        check_int(self.latent, "latent")
        check_float(self.dropout, "dropout", 0.0, 1.0, high_open=True)
        check_float(self.learning_rate, "learning_rate", 0.0, low_open=True)
        check_float(self.l2, "l2", 0.0)
        check_int(self.batch_size, "batch_size")
        if self.variational:
            check_float(self.beta_max, "beta_max", 0.0)
            if not (isinstance(self.anneal_steps, str) and self.anneal_steps == "auto"):
                check_int(self.anneal_steps, "anneal_steps", 0)
        metric = self.validation_metric
        kind, _, kk = str(metric).partition("@")
        if metric != "auto" and not (kind in ("ndcg", "recall") and kk.isdigit() and int(kk) > 0):
            raise ValueError(f"validation_metric must be 'auto', 'ndcg@K' or 'recall@K', got {metric!r}")
        check_bool(self.verbose, "verbose")
        if not (isinstance(self.precision, str) and self.precision in _PRECISIONS):
            raise ValueError(f"precision must be one of {', '.join(map(repr, _PRECISIONS))}, got {self.precision!r}")
        return tuple(int(h) for h in hidden)

    def _core_precision(self):
        """The core's precision: "auto" is "bf16" where the CPU multiplies bf16 natively (AVX512-BF16)."""
        if self.precision == "auto":
            return "bf16" if "avx512_bf16" in _core.bf16_kernels() else "float32"
        return self.precision

    def _build(self, user_rows, item_rows, tables, config):
        n_items, latent = len(self._items), int(self.latent)
        encoder = [n_items, *config, 2 * latent if self.variational else latent]
        decoder = [latent, *config[::-1], n_items]
        shapes = list(zip(encoder[:-1], encoder[1:])) + list(zip(decoder[:-1], decoder[1:]))
        rng = self._rng
        # Liang et al.'s initialisation: Glorot uniform weights, biases N(0, 0.001^2).
        self.coefs_ = [self._glorot(rng, fan_in, fan_out, (fan_in, fan_out)) for fan_in, fan_out in shapes]
        self.intercepts_ = [(rng.standard_normal(fan_out) * 1e-3).astype(np.float32) for _, fan_out in shapes]
        self.n_encoder_ = len(encoder) - 1
        self._moments = [[np.zeros_like(a) for a in self.coefs_ + self.intercepts_] for _ in range(2)]
        self.adam_steps_ = 0
        self._noise_seed = int(rng.randint(0, 2**31 - 1))
        self.anneal_steps_ = None  # fixed by the first _train ("auto" needs the step count)

    @staticmethod
    def _glorot(rng, fan_in, fan_out, shape):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape).astype(np.float32)

    def _grow_model(self, user_rows, item_rows, tables, old):
        n, n_old = len(self._items), old["item"]
        if n == n_old:
            return
        L = len(self.coefs_)
        first, last = self.coefs_[0], self.coefs_[-1]
        # New items: first-layer rows and output columns drawn as the first fit drew them (Glorot bounds of the
        # built shapes), output bias 0; Adam moments 0.
        new_rows = self._glorot(self._rng, n_old, first.shape[1], (n - n_old, first.shape[1]))
        new_cols = self._glorot(self._rng, last.shape[0], n_old, (last.shape[0], n - n_old))
        grown = [np.concatenate([first, new_rows]), *self.coefs_[1:-1], np.concatenate([last, new_cols], axis=1)]
        grown_b = [*self.intercepts_[:-1], np.concatenate([self.intercepts_[-1], np.zeros(n - n_old, np.float32)])]
        moments = []
        for m in self._moments:
            m = list(m)
            m[0] = np.concatenate([m[0], np.zeros((n - n_old, m[0].shape[1]), np.float32)])
            m[L - 1] = np.concatenate([m[L - 1], np.zeros((m[L - 1].shape[0], n - n_old), np.float32)], axis=1)
            m[2 * L - 1] = np.concatenate([m[2 * L - 1], np.zeros(n - n_old, np.float32)])
            moments.append(m)
        self.coefs_, self.intercepts_, self._moments = grown, grown_b, moments

    def _forget_model(self, side, keep):
        """Users own only their bags (the seen pairs: the base drops them); an item its first-layer row, its
        output column and bias, and their Adam moments (RecommenderBase hook)."""
        if side == "user":
            return
        rows, L = keep[1:], len(self.coefs_)
        self.coefs_[0] = np.ascontiguousarray(self.coefs_[0][rows])
        self.coefs_[-1] = np.ascontiguousarray(self.coefs_[-1][:, rows])
        self.intercepts_[-1] = np.ascontiguousarray(self.intercepts_[-1][rows])
        for m in self._moments:
            m[0] = np.ascontiguousarray(m[0][rows])
            m[L - 1] = np.ascontiguousarray(m[L - 1][:, rows])
            m[2 * L - 1] = np.ascontiguousarray(m[2 * L - 1][rows])

    def _train(self, user_rows, item_rows, y, weight, epochs, validate):
        X = self._matrix()
        users = np.unique(user_rows).astype(np.int64)
        metric = None
        if validate is not None:
            score, name, _ = validate
            metric = f"val_{name}"
        elif self.early_stopping and epochs > 1:
            users, score, name = self._validation_users(users, X)
            metric = None if score is None else f"val_{name}"
        if self.anneal_steps_ is None:
            steps = epochs * -(-len(users) // int(self.batch_size))
            # "auto": beta reaches beta_max after 80% of the first fit's steps (the paper's MovieLens-20M run
            # reaches it after ~85%: 200,000 anneal steps, cap 0.2, 234 batches x 200 epochs).
            self.anneal_steps_ = (int(0.8 * steps / max(float(self.beta_max), 1e-12))
                                  if self.anneal_steps == "auto" else int(self.anneal_steps))
        history = self.history_
        if metric is not None:
            history.setdefault(metric, [])
        patience = self.n_iter_no_change if metric is not None else None
        best, best_params, waited = None, None, 0
        try:
            for epoch in range(epochs):
                start = time.perf_counter()
                order = self._rng.permutation(users).astype(np.int64)
                loss = self._epoch(X, order, epoch, epochs)
                history["loss"].append(loss)
                history["seconds"].append(time.perf_counter() - start)
                line = f"epoch {epoch + 1}/{epochs}: loss {loss:.5g}"
                if metric is not None:
                    value = float(score())
                    history[metric].append(value)
                    line += f", {metric} {value:.5g}"
                    if not np.isnan(value) and (best is None or value > best):
                        best, waited, best_params = value, 0, self._snapshot()
                        self.best_epoch_ = len(history["loss"])
                    else:
                        waited += 1
                if self.verbose:
                    print(line + f" ({history['seconds'][-1]:.2f} s)", flush=True)
                if patience is not None and waited >= patience:
                    break
        finally:  # also on Ctrl-C: the best epoch's parameters
            if best_params is not None and waited > 0:
                self._restore(best_params)

    def _item_vectors(self):
        """Each item's output-layer column (its weights over the last decoder layer): items that the decoder
        scores alike from every code have close vectors."""
        last = self.coefs_[-1]
        vectors = np.zeros((last.shape[1] + 1, last.shape[0]), np.float32)
        vectors[1:] = last.T
        return vectors, np.arange(1, last.shape[1] + 1, dtype=np.int32)

    # ------------------------------------------------------------------------------------ internals
    def _refuse_ratings(self, ratings):
        if ratings is not None:
            raise ValueError(f"{type(self).__name__} learns from implicit feedback (which items each user "
                             "interacted with); ratings must be None: keep the positive interactions first "
                             "(e.g. ratings >= 4)")

    def _matrix(self):
        """The users' bags as the core's CSR tuple: row = user entity, column = item entity - 1, values 1."""
        indptr, items = self._seen
        return indptr, (items - 1).astype(np.int32), np.ones(len(items), np.float32), len(self._items)

    def _scores(self, bags):
        """float32 (n_bags, n_items) logits of the bags (CSR of item entities): no dropout, z = mu."""
        indptr, items = bags
        X = (np.asarray(indptr, np.int64), (items - 1).astype(np.int32), np.ones(len(items), np.float32),
             len(self._items))
        return _core.autoencoder_forward(self.coefs_, self.intercepts_, self.n_encoder_, self.variational, X,
                                         self._threads(), "auto")

    def _epoch(self, X, order, epoch, epochs):
        """One epoch of Adam steps over the users `order` (entity rows of X); returns the mean loss."""
        batch = int(self.batch_size)
        progress = _Progress(self.verbose, epoch, epochs, len(order)) if self.verbose else None
        loss_sum = rows = 0.0
        step = batch * _BATCHES_PER_CALL
        for s in range(0, len(order), step):
            part = order[s:s + step]
            loss, self.adam_steps_, n, diverged = _core.autoencoder_train_epoch(
                self.coefs_, self.intercepts_, self.n_encoder_, self.variational, self._moments[0],
                self._moments[1], self.adam_steps_, float(self.learning_rate), X, part, batch,
                float(self.dropout), float(self.beta_max) if self.variational else 0.0, self.anneal_steps_,
                float(self.l2), self._noise_seed, self._threads(), "auto", self._core_precision())
            loss_sum, rows = loss_sum + loss, rows + n
            if diverged:
                raise ValueError(f"training diverged in epoch {epoch + 1}: a batch's loss became NaN or infinite, "
                                 "so training stopped before applying it. Try a lower learning_rate.")
            if progress is not None and progress.bar is not None:
                progress(s + len(part))
        if progress is not None and progress.bar is not None:
            progress.bar.close()
        return loss_sum / max(rows, 1)

    def _validation_users(self, users, X):
        """(training users, score(), metric name): `validation_fraction` of the users with at least 5 items held
        out, their items split 80/20 into fold-in and targets (Liang et al.'s protocol), scored by
        heldout_users_ranking over the whole catalogue. (users, None, None) when none qualifies."""
        from fastrec.evaluation import heldout_users_ranking

        indptr, items = self._seen
        counts = indptr[users + 1] - indptr[users]
        eligible = users[counts >= 5]
        n_val = int(round(float(self.validation_fraction) * len(users)))
        if n_val < 1 or len(eligible) <= n_val:
            return users, None, None
        val = np.sort(self._rng.choice(eligible, n_val, replace=False))
        fold_u, fold_i, test_u, test_i = [], [], [], []
        for u in val:
            bag = items[indptr[u]:indptr[u + 1]]
            held = np.zeros(len(bag), bool)
            held[self._rng.choice(len(bag), int(_VALIDATION_TEST_FRACTION * len(bag)), replace=False)] = True
            fold_u.append(np.full((~held).sum(), u))
            fold_i.append(bag[~held])
            test_u.append(np.full(held.sum(), u))
            test_i.append(bag[held])
        user_ids, item_ids = self._users.ids, self._items.ids
        fu, fi = user_ids[np.concatenate(fold_u) - 1], item_ids[np.concatenate(fold_i) - 1]
        tu, ti = user_ids[np.concatenate(test_u) - 1], item_ids[np.concatenate(test_i) - 1]
        name = "ndcg@100" if self.validation_metric == "auto" else str(self.validation_metric)
        k = int(name.partition("@")[2])
        self.validation_size_ = int(n_val)

        def score():
            return heldout_users_ranking(self, fu, fi, tu, ti, k=(k,), fold_in="histories")[name]

        return np.setdiff1d(users, val), score, name

    def _snapshot(self):
        return ([a.copy() for a in self.coefs_], [a.copy() for a in self.intercepts_],
                [[a.copy() for a in m] for m in self._moments], self.adam_steps_)

    def _restore(self, saved):
        self.coefs_, self.intercepts_, self._moments, self.adam_steps_ = saved


@persistable
class MultVAE(_Autoencoder):
    """Mult-VAE (Liang et al., WWW 2018): a variational autoencoder of users' item bags with a multinomial
    likelihood, for implicit feedback.

    Fit it on (user, item) interactions. Each user's bag, L2-normalised and dropped out, is encoded by an MLP
    (``hidden`` tanh layers) into a Gaussian (mean, log-variance) over a ``latent``-dimensional code; a code is
    sampled (reparameterisation trick), decoded by the mirrored MLP into one logit per item, and the bag's
    multinomial log-likelihood minus ``beta`` times the KL divergence to N(0, I) is maximised, beta rising
    linearly from 0 to ``beta_max`` (KL annealing). Scoring uses the mean code (no sampling, no dropout). A user
    never seen in training is scored from their bag: ``recommend(histories=[[item, ...], ...])``.

    Cost: an epoch costs about 6 x users x (hidden[-1] x n_items) flops in the output layer (forward, and
    two products backward) plus the bags' nonzeros x hidden[0] in the first; memory holds 4 copies (weights,
    two Adam moments, a gradient) of the two n_items x hidden layers. Scoring a user costs one pass of the MLP
    (hidden[-1] x n_items multiply-adds). Benchmarks: benchmarks/AUTOENCODERS.md.

    Parameters
    ----------
    hidden : tuple of int, default=(600,)
        Widths of the encoder's hidden layers (the decoder mirrors them). The paper: (600,).
    latent : int, default=200
        The code's dimension.
    dropout : float, default=0.5
        Input dropout rate of the bags' entries when training (the paper: keep probability 0.5).
    beta_max : float, default=0.2
        The KL weight's cap (the paper: 0.2).
    anneal_steps : int or "auto", default="auto"
        beta = min(beta_max, step / anneal_steps) over Adam steps (the paper: 200,000 on MovieLens-20M). "auto":
        beta reaches beta_max after 80% of the first fit's steps. 0: beta_max from the start.
    epochs : int, default=200
    learning_rate : float, default=1e-3
        Adam's step size.
    batch_size : int, default=500
        Users per step.
    l2 : float, default=0.0
        L2 penalty: ``l2 * sum ||W||^2`` over the weight matrices (the paper's lam: 0 for the VAE). The first
        layer's rows are regularised, like they are updated, only in steps whose batch has the item.
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the users (Liang et al.'s protocol, see ``fit``), keep the best
        epoch by ``validation_metric``.
    validation_fraction : float, default=0.1
    validation_metric : "auto", "ndcg@K" or "recall@K", default="auto"
        "auto": NDCG@100 (the paper's).
    n_iter_no_change : int or None, default=20
        Stop after this many epochs without improvement of the validation metric (None: run every epoch, still
        keeping the best).
    random_state : int, RandomState or None
        Seeds the initialisation, the validation split, the user order and the noise. Results do not depend on
        n_threads.
    n_threads : int or None, default=None
        None: all cores.
    verbose : bool, default=False
    precision : "float32", "bf16" or "auto", default="auto"
        Arithmetic of the output layer's three training products (logits, their weight gradient, their input
        gradient: most of an epoch's flops). "bf16": operands rounded to bfloat16, products summed in float32,
        weights, Adam state and everything else float32; on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and
        later) about 1.5-2x faster products (1.7-1.8x per fit), elsewhere emulated (slower than float32).
        "auto" (the default): "bf16" where AVX512-BF16 is available, else "float32": on MovieLens-100k both
        precisions chose the same settings and scored NDCG@100 within 0.0003 of each other, so the default takes
        the speed where the CPU has it (a model's bits already depend on the CPU's SIMD kernels). Scoring
        (recommend, predict, validation) is float32 always. Benchmarks and quality: benchmarks/AUTOENCODERS.md.

    Attributes
    ----------
    coefs_, intercepts_ : lists of float32 arrays
        Encoder then decoder layers; ``coefs_[0]`` (n_items, hidden[0]) is read by bag, ``coefs_[-1]`` (hidden[0],
        n_items) gives the logits. The VAE's last encoder layer gives [mean | log-variance].
    n_encoder_ : int
    history_ : dict
        "loss" (mean training loss per epoch), "seconds", and "val_ndcg@100" when validating.
    best_epoch_ : int
    n_users_, n_items_

    Notes
    -----
    Adam on the first layer is lazy: only the rows of the items present in a batch's (dropped-out) bags take a
    step, moments included; dense Adam would also move the other rows by their decaying moments. The other
    layers follow dense Adam.
    """

    variational = True

    def __init__(self, hidden=(600,), latent=200, dropout=0.5, beta_max=0.2, anneal_steps="auto", epochs=200,
                 learning_rate=1e-3, batch_size=500, l2=0.0, early_stopping=True, validation_fraction=0.1,
                 validation_metric="auto", n_iter_no_change=20, random_state=None, n_threads=None, verbose=False,
                 precision="auto"):
        self.hidden = hidden
        self.latent = latent
        self.dropout = dropout
        self.beta_max = beta_max
        self.anneal_steps = anneal_steps
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.l2 = l2
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.validation_metric = validation_metric
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose
        self.precision = precision

    clip_predictions = False


@persistable
class MultDAE(_Autoencoder):
    """Mult-DAE (Liang et al., WWW 2018): a denoising autoencoder of users' item bags with a multinomial
    likelihood, for implicit feedback.

    As `MultVAE` without the variational part: the encoder's last layer (tanh) is the code itself, the input
    dropout is the noise, and an L2 penalty ``l2`` (the paper's lam = 0.01) regularises the weights. Parameters
    (``precision`` included), attributes, cost and fold-in as `MultVAE` (no beta_max / anneal_steps).
    """

    variational = False
    beta_max = 0.0
    anneal_steps = 0

    def __init__(self, hidden=(600,), latent=200, dropout=0.5, epochs=200, learning_rate=1e-3, batch_size=500,
                 l2=0.01, early_stopping=True, validation_fraction=0.1, validation_metric="auto", n_iter_no_change=20,
                 random_state=None, n_threads=None, verbose=False, precision="auto"):
        self.hidden = hidden
        self.latent = latent
        self.dropout = dropout
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.l2 = l2
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.validation_metric = validation_metric
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose
        self.precision = precision

    clip_predictions = False
