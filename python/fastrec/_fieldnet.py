"""The parameters of a field model and the calls into `fastrec._core.field_*` (docs/DESIGN.md).

`FieldNet` owns the learned arrays (embedding tables, MLP weights, GMF vector) and their optimizer state;
the *data* side of a call (which rows each key names, the bag and dense tables read through the keys) is
passed per call. `FieldModel` (click-through data) and `Recommender` (users x items) both build on it.
"""

from __future__ import annotations

import numbers
import sys
import time
from dataclasses import dataclass

import numpy as np

from fastrec import _core
from fastrec._base import fit_clock
from fastrec._checks import warn
from fastrec._registry import persistable
from fastrec.features import plain_integers

OPTIMIZERS = ("sgd", "adagrad", "adam")
ACTIVATIONS = ("identity", "logistic", "tanh", "relu")
# Training precisions of the MLP's products (the estimators' ``precision``; docs/DESIGN.md, "bf16 training of
# the field model").
PRECISIONS = ("float32", "bf16", "auto")


def check_precision(precision):
    if not (isinstance(precision, str) and precision in PRECISIONS):
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision


def core_precision(precision):
    """The core's precision: "auto" is "bf16" where the CPU multiplies bf16 natively (AVX512-BF16)."""
    if check_precision(precision) == "auto":
        return "bf16" if "avx512_bf16" in _core.bf16_kernels() else "float32"
    return precision


@persistable
@dataclass
class Field:
    """An embedding table of `vocab` rows x `dim`, read through key column `key`.

    role: "mlp" (pooled vector feeds the MLP), "gmf_u" / "gmf_v" (the two sides of the GMF term), "wide"
        (dim 1: the pooled scalar is added to the logit, the linear part of Wide & Deep).
    dropout: training-time probability of reading bag row 0 (the "unknown" row) instead of the example's own.
    """

    name: str
    vocab: int
    dim: int
    key: int
    role: str = "mlp"
    dropout: float = 0.0
    alpha: float | None = None  # this table's L2 weight (None: the model's alpha)
    source: int | None = None  # index of the field whose bag table this one reads (GMF and wide fields)


@persistable
@dataclass
class DenseBlock:
    """`width` numeric columns read through key column `key`."""

    name: str
    width: int
    key: int


def bags_of_ids(ids: np.ndarray) -> tuple:
    """Bag table with one (id, 1.0) entry per row: a one-id-per-row field."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    return (np.arange(len(ids) + 1, dtype=np.int64), ids, np.ones(len(ids), np.float32))


def bags_of_csr(X, mean: bool, label: str = "X", n_threads: int = 0) -> tuple:
    """Bag table from a CSR matrix (rows = bags, columns = ids, values = weights); mean pooling divides each
    bag's weights by their sum (an empty or zero-sum bag pools to zero). Values that are not finite or beyond
    float32's range raise a ValueError naming `label`."""
    X = X.tocsr()
    indptr = np.asarray(X.indptr, dtype=np.int64)
    nnz = int(indptr[-1])  # scipy lets data and indices run past the last row (spare room): not entries
    data = np.asarray(X.data)[:nnz]
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float64)
    weights, status = _core.bag_weights(indptr, np.require(data, requirements=["C", "A"]), bool(mean), n_threads)
    if status:
        raise ValueError(f"{label} contains NaN or infinity (or a value too large for float32)")
    return (indptr, np.asarray(X.indices[:nnz], dtype=np.int32), weights)


def _unique(a):
    """np.unique(a); int ids by the core's radix sort (NumPy 2's hash-based unique took 1.6 s on the 2 x 10^6
    ids of a 10^6-user interaction set plus its feature table, the core 0.1 s)."""
    if a.dtype.kind != "i" or len(a) == 0:
        return np.unique(a)
    return _core.unique_ids(np.require(a, np.int64, ["C", "A"]))[0].astype(a.dtype, copy=False)


@persistable
class IdIndex:
    """Raw ids (ints or strings) <-> numbers 1..N (0 = unknown): users and items of a Recommender, values of a
    FieldModel's categorical column. Ids added later (partial_fit) get the next numbers, so the numbers of
    known ids never change."""

    def __init__(self, *id_arrays, what="ids"):
        present = [a for a in id_arrays if a is not None and len(a)]
        if len({a.dtype.kind == "U" for a in present}) > 1:
            raise TypeError(f"{what} mix strings and integers between the interactions and the feature table")
        self.ids = _unique(np.concatenate(present)) if present else np.zeros(0, np.int64)
        self.what = what
        self._index_ids()

    @classmethod
    def with_codes(cls, values, what="ids"):
        """(IdIndex of `values`, the entity number of each value): for int ids one sort in the core gives both
        (a quarter of np.unique + searchsorted's time at 409,600 values)."""
        if values.dtype.kind != "i" or len(values) == 0:
            index = cls(values, what=what)
            return index, index.index(values)
        index = cls.__new__(cls)
        # aligned too: arrays unpickled on a Dask worker may sit at any byte offset
        index.ids, codes = _core.unique_ids(np.require(values, np.int64, ["C", "A"]))
        index.what = what
        index._index_ids()
        return index, codes

    def _index_ids(self):
        # Ids in sorted order (as after fit) are searched in place: nothing per id is built, so processes
        # that memory-map one model file share its id arrays too. Otherwise a sorted copy and its order.
        ids = self.ids
        if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
            self._sorted, self._order = ids, None
        else:
            self._order = np.argsort(ids, kind="stable")
            self._sorted = np.asarray(ids)[self._order]

    def add(self, raw):
        """Append the ids of `raw` not known yet (in sorted order). Ids of the other kind are converted where
        exact (as `index` does); one that is not (a string that is no plain integer) is refused."""
        if len(self.ids) and len(raw) and (raw.dtype.kind == "U") != (self.ids.dtype.kind == "U"):
            converted, exact = self._convert(raw)
            if not exact.all():
                raise TypeError(f"{self.what} must be {self._kind(self.ids)} ids like those of the first fit; got "
                                f"{raw[~exact][0].item()!r} among them")
            raw = converted
        new = np.unique(raw[self.index(raw) == 0])
        if len(new):
            self.ids = np.concatenate([self.ids, new]) if len(self.ids) else new
            self._index_ids()

    def __len__(self):
        return len(self.ids)

    def index_one(self, x):
        """Entity number of one raw id of the ids' own kind (0: unknown), or None for another kind (index()
        converts those)."""
        if (type(x) is str) != (self.ids.dtype.kind == "U") or not len(self.ids):
            return None
        p = int(self._sorted.searchsorted(x))
        if p == len(self.ids) or self._sorted[p] != x:
            return 0
        return (p if self._order is None else int(self._order[p])) + 1

    def index(self, raw) -> np.ndarray:
        """Entity number of each raw id (int32), 0 for ids never seen. Ids of the other kind (str for int ids,
        or int for str ids) are converted where that is exact: 12 <-> "12" (not "012", " 12" or "+12")."""
        n = len(self.ids)
        if n == 0 or len(raw) == 0:
            return np.zeros(len(raw), np.int32)
        if (raw.dtype.kind == "U") != (self.ids.dtype.kind == "U"):
            converted, exact = self._convert(raw)
            out = np.where(exact, self.index(converted), 0).astype(np.int32)
            if not exact.all() or not out.any():
                what = ("some of which are not integers" if not exact.all()
                        else "none of which is known after conversion")
                example = (raw[~exact] if not exact.all() else raw)[0].item()
                self._warn_once(f"{self.what} were fit with {self._kind(self.ids)} ids and are queried with "
                                f"{self._kind(raw)} ids, {what} (e.g. {example!r}): those are unknown {self.what}")
            return out
        if len(raw) <= 16:  # a few ids (online predictions): scalar searches beat the array passes
            out = np.zeros(len(raw), np.int32)
            for j, x in enumerate(raw.tolist()):
                p = int(self._sorted.searchsorted(x))
                if p < n and self._sorted[p] == x:
                    out[j] = (p if self._order is None else self._order[p]) + 1
            return out
        pos = self._sorted.searchsorted(raw)
        np.minimum(pos, n - 1, out=pos)
        entity = pos if self._order is None else self._order[pos]
        return np.where(self._sorted[pos] == raw, entity + 1, 0).astype(np.int32)

    @staticmethod
    def _convert(raw):
        """(`raw` as the other kind of id, mask of the ids converted exactly). int -> str always; str -> int only
        for the canonical decimal form ("12", not "012", " 12" or "+12"), so that the conversion is one-to-one."""
        if raw.dtype.kind != "U":
            return raw.astype(str), np.ones(len(raw), bool)
        return plain_integers(raw)

    def _warn_once(self, message):
        """Once per model and kind of mismatch, not per call: a serving loop would repeat it forever."""
        warned = self.__dict__.setdefault("_warned", set())
        key = message.split(" (e.g.")[0]
        if key not in warned:
            warned.add(key)
            warn(message)

    @staticmethod
    def _kind(ids):
        return "string" if ids.dtype.kind == "U" else "integer"

    def __getstate__(self):
        return {"ids": self.ids, "what": self.what}  # the search structures are rebuilt

    def __setstate__(self, state):
        self.ids = state["ids"]
        self.what = state.get("what", "ids")
        self._index_ids()


class Float32Normals:
    """`rng` (a RandomState) for initial parameters, with the embedding tables' normal draws made by the core
    in float32 (`_core.fill_normal`: approximately normal, the sum of four uniforms, support +-3.46 scale;
    parallel, the same numbers for any thread count): 30 ms for a 10^6 x 32 table on 2 threads where NumPy's
    ziggurat took 0.3 s, a third of the preparation of a hashed fit. Each call draws its 64-bit seed from a
    NumPy Generator seeded by `rng`."""

    def __init__(self, rng, n_threads=0):
        self._rng = rng
        self._gen = np.random.default_rng(rng.randint(0, 2**31 - 1, size=2))
        self.n_threads = n_threads  # the estimator's (0: all cores); the numbers do not depend on it

    @classmethod
    def of(cls, rng, n_threads=0):
        """`rng` itself when it already is one (fastrec.dask passes its own), else one drawing from it."""
        return rng if isinstance(rng, cls) else cls(rng, n_threads)

    def normal(self, loc, scale, size):
        out = np.empty(size, np.float32)
        _core.fill_normal(out, int(self._gen.integers(0, 2**63)), 0, float(loc), float(scale), self.n_threads)
        return out

    def uniform(self, low, high, size):
        return self._rng.uniform(low, high, size)



@persistable
class FieldNet:
    """Learned arrays of a field model: embedding tables, MLP, optional GMF vector.

    The MLP ends in one output (loss "mse" or "bce") or, for a tower of a two-tower model (loss "tower"), in
    `output_dim` outputs with the identity activation.
    """

    def __init__(self, fields, dense, hidden_layer_sizes, activation, loss, n_keys, rng, init_scale=0.05,
                 output_dim=1):
        self.fields = list(fields)
        self.dense = list(dense)
        self.activation = activation
        self.loss = loss
        self.n_keys = n_keys
        offset, self.offsets = 0, []
        for f in self.fields:
            self.offsets.append(offset if f.role == "mlp" else -1)
            offset += f.dim if f.role == "mlp" else 0
        self.dense_offsets = []
        for b in self.dense:
            self.dense_offsets.append(offset)
            offset += b.width
        self.width = offset
        if self.width == 0:
            raise ValueError("the model has no input: give at least one field or dense column")
        for f in self.fields:
            if f.role == "wide" and f.dim != 1:
                raise ValueError(f"wide field {f.name!r} must have dim 1")
        # Wide weights start at 0 (no bias before training); embeddings small and random.
        draws = Float32Normals.of(rng)
        self.tables = [np.zeros((f.vocab, 1), np.float32) if f.role == "wide" else
                       draws.normal(0.0, init_scale, (f.vocab, f.dim)) for f in self.fields]
        # The MLP: scikit-learn's Glorot-uniform initialisation.
        sizes = [self.width, *hidden_layer_sizes, output_dim]
        factor = 2.0 if activation == "logistic" else 6.0
        self.coefs, self.intercepts = [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = np.sqrt(factor / (fan_in + fan_out))
            self.coefs.append(rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32))
            self.intercepts.append(rng.uniform(-bound, bound, fan_out).astype(np.float32))
        gmf = [i for i, f in enumerate(self.fields) if f.role == "gmf_u"], [
            i for i, f in enumerate(self.fields) if f.role == "gmf_v"]
        self.gmf_fields = (gmf[0][0], gmf[1][0]) if gmf[0] and gmf[1] else None
        self.gmf_w = None
        if self.gmf_fields:
            # Start as a plain dot product of the two GMF embeddings (NeuMF's GMF with unit weights).
            self.gmf_w = np.ones(self.fields[self.gmf_fields[0]].dim, np.float32)
        self.optimizer = None
        self.adam_t = 0

    # --------------------------------------------------------------------------------- optimizer state
    def reset_optimizer(self, optimizer: str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        params = self.coefs + self.intercepts
        self.state1 = [np.zeros_like(p) for p in params]
        self.state2 = [np.zeros_like(p) for p in params] if optimizer == "adam" else []
        # np.zeros, not zeros_like: calloc'd pages are zeroed by the OS when first touched, so a table's state
        # costs nothing before training and only the rows training touches ever take memory (zeros_like
        # writes every byte: 0.5 s of fit's preparation for the tables of 10^6 items).
        self.table_state1 = [
            None if optimizer == "sgd" else np.zeros(t.shape[0] if optimizer == "adagrad" else t.shape, np.float32)
            for t in self.tables
        ]
        self.table_state2 = [np.zeros(t.shape, np.float32) if optimizer == "adam" else None for t in self.tables]
        self.gmf_state1 = None if self.gmf_w is None else np.zeros_like(self.gmf_w)
        self.gmf_state2 = None if self.gmf_w is None or optimizer != "adam" else np.zeros_like(self.gmf_w)
        self.optimizer = optimizer
        self.adam_t = 0

    # --------------------------------------------------------------------------------- the core's spec
    def spec(self, bags, dense_tables, *, training=False) -> dict:
        """The dict `_core.field_*` reads. bags[i]: bag table of field i; dense_tables[b]: (rows, width)."""
        fields = []
        for i, f in enumerate(self.fields):
            entry = {"table": self.tables[i], "bags": bags[i], "key": f.key, "offset": self.offsets[i],
                     "dropout": f.dropout if training else 0.0, "wide": f.role == "wide", "alpha": f.alpha}
            if self.optimizer is not None:
                entry["state_kind"] = {"sgd": "none", "adagrad": "row", "adam": "full"}[self.optimizer]
                entry["state1"], entry["state2"] = self.table_state1[i], self.table_state2[i]
            marks = self.__dict__.get("touched_marks")  # fastrec.dask: the core marks the rows it updates
            if training and marks is not None:
                entry["touched"] = marks[i]
            fields.append(entry)
        dense = [{"table": t, "key": b.key, "offset": o} for t, b, o in zip(dense_tables, self.dense,
                                                                           self.dense_offsets)]
        gmf = None
        if self.gmf_fields:
            gmf = {"field_u": self.gmf_fields[0], "field_v": self.gmf_fields[1], "w": self.gmf_w}
            if self.optimizer is not None:
                gmf["state1"], gmf["state2"] = self.gmf_state1, self.gmf_state2
        return {"n_keys": self.n_keys, "width": self.width, "loss": self.loss, "activation": self.activation,
                "coefs": self.coefs, "intercepts": self.intercepts,
                "state1": getattr(self, "state1", []), "state2": getattr(self, "state2", []),
                "fields": fields, "dense": dense, "gmf": gmf}

    # --------------------------------------------------------------------------------- calls
    def handle(self, bags, dense_tables, *, training=False, precision="float32"):
        """A validated core object over the current arrays; rebuild it after the arrays are replaced.
        precision: the MLP's products in training ("float32" or "bf16", see `core_precision`)."""
        spec = self.spec(bags, dense_tables, training=training)
        spec["precision"] = precision
        return _core.FieldHandle(spec, training)

    def train_epoch(self, handle, keys, y, weight, order, *, batch_size, alpha, learning_rate, momentum, nesterov,
                    beta_1, beta_2, epsilon, sampler, epoch, n_threads, progress=None):
        """One epoch in the core: (loss_sum, rows, diverged, exception raised by Ctrl-C or progress, or None)."""
        loss_sum, self.adam_t, rows, diverged, error = handle.train_epoch(
            self.state1, self.state2, keys, y, weight, order, batch_size, alpha, self.optimizer, learning_rate,
            momentum, nesterov, beta_1, beta_2, epsilon, self.adam_t, sampler, epoch, n_threads, "auto", progress)
        return loss_sum, rows, diverged, error

    def track_touched(self, on=True):
        """Training handles built after this mark, in `touched_marks[i]` (uint8, one per row of table i), every
        row of table i that an update wrote; the marks are never cleared by the core (zero them to reset).
        Used by fastrec.dask to ship only the rows a round touched."""
        self.touched_marks = [np.zeros(len(t), np.uint8) for t in self.tables] if on else None

    def _arrays(self):
        """Every learned array and its optimizer state (the in-place targets of training)."""
        out = self.tables + self.coefs + self.intercepts + self.state1 + self.state2
        out += [a for a in self.table_state1 + self.table_state2 if a is not None]
        out += [a for a in (self.gmf_w, self.gmf_state1, self.gmf_state2) if a is not None]
        return out

    def snapshot(self):
        return [a.copy() for a in self._arrays()], self.adam_t

    def restore(self, snapshot):
        """Back to a snapshot, in place (handles over these arrays stay valid)."""
        arrays, self.adam_t = snapshot
        for dst, src in zip(self._arrays(), arrays):
            np.copyto(dst, src)

    def grow(self, i, vocab, rng, init_scale=0.05):
        """Table i (and its optimizer state) grows to `vocab` rows; new rows are initialised as in __init__."""
        f, table = self.fields[i], self.tables[i]
        extra = vocab - table.shape[0]
        if extra <= 0:
            return
        draws = Float32Normals.of(rng)
        new = np.zeros((extra, 1), np.float32) if f.role == "wide" else draws.normal(
            0.0, init_scale, (extra, f.dim)).astype(np.float32)
        self.tables[i] = np.concatenate([table, new])
        for states in (self.table_state1, self.table_state2):
            if states[i] is not None:
                states[i] = np.concatenate([states[i], np.zeros((extra, *states[i].shape[1:]), np.float32)])
        f.vocab = vocab


# ------------------------------------------------------------------------------------------- training loop
def _loss_curve(est):
    """Mean training loss per epoch: ``history_["loss"]``."""
    if not hasattr(est, "history_"):
        raise AttributeError("loss_curve_ exists after fit")
    return est.history_["loss"]


loss_curve_from_history = property(_loss_curve)  # the loss_curve_ of estimators trained by run_epochs


class _Progress:
    """verbose output of one epoch: a tqdm bar where tqdm is installed, else one line on stderr at its end."""

    def __init__(self, verbose, epoch, epochs, total):
        self.bar = None
        self.verbose = verbose
        self.label = f"epoch {epoch + 1}/{epochs}"
        if verbose:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=self.label, unit="ex", leave=True)
        self.done = 0

    def __call__(self, done):  # called by the core about every 50 ms with the positives done so far
        self.bar.update(done - self.done)
        self.done = done

    def close(self, summary: dict, examples_per_s: float):
        text = ", ".join(f"{k} {v:.5g}" for k, v in summary.items())
        if self.bar is not None:
            self.bar.update(self.bar.total - self.done)
            self.bar.set_postfix_str(f"{text}, {examples_per_s:,.0f} examples/s")
            self.bar.close()
        elif self.verbose:
            print(f"{self.label}: {text}, {examples_per_s:,.0f} examples/s", file=sys.stderr, flush=True)


def callable_score(est, fn):
    """The validation function of a callable `validation_data`: fn(model, epoch from 1) -> a real number,
    higher is better; anything else is refused naming validation_data."""
    def score():
        value = fn(est, len(est.history_["loss"]))
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
            raise TypeError(f"validation_data (a callable) must return a real number, higher is better; it "
                            f"returned {value!r}")
        return float(value)
    return score


def record_structure(est, names):
    """Remember the parameters a fit built the model from (``partial_fit`` continues that model)."""
    est._structure_ = {name: getattr(est, name) for name in names}


def check_structure(est):
    """Refuse ``partial_fit`` after ``set_params`` changed a parameter the fitted model was built from: it
    would be silently ignored. Models saved before this check existed have no record and are not checked."""
    def plain(v):
        return tuple(plain(x) for x in v) if isinstance(v, (list, tuple)) else v

    fitted = getattr(est, "_structure_", None) or {}
    changed = [name for name, value in fitted.items() if plain(getattr(est, name)) != plain(value)]
    if changed:
        what = ", ".join(f"{name}={fitted[name]!r} (now {getattr(est, name)!r})" for name in changed)
        raise ValueError(f"partial_fit continues the fitted model, built with {what}: call fit to build a new "
                         "model with the new value, or set it back")


def run_epochs(est, net, handle, keys, y, weight, n, rng, epochs, *, sampler=None, validate=None, metric=None,
               higher_is_better=False, advice="", alpha=None, learning_rate=None):
    """The epochs of `est.fit` / `est.partial_fit` for a FieldNet-based estimator.

    Reads est.batch_size, alpha and learning_rate (unless given: the values an "auto" resolved to),
    momentum, nesterovs_momentum, n_iter_no_change, verbose and n_threads. Appends to est.history_ ("loss",
    "seconds" and, with `validate` (a function returning the validation metric of the current parameters),
    "val_<metric>"). With validation and n_iter_no_change, training stops after that many epochs without
    improvement and the parameters of the best epoch are restored (est.best_epoch_ counts from 1).

    A batch whose loss is NaN or infinite stops training before it is applied, with a ValueError saying what
    to try (`advice`, after a lower learning_rate): the parameters keep their last finite-loss state. Ctrl-C
    stops at a batch boundary and KeyboardInterrupt propagates; the model stays consistent and usable, its
    history listing the epochs completed, and with validation and n_iter_no_change it holds the best epoch's
    parameters (those of the interrupted epoch when it never completed one).
    """
    state = {"best": None}
    try:
        _run_epochs(est, net, handle, keys, y, weight, n, rng, epochs, state, sampler=sampler, validate=validate,
                    metric=metric, higher_is_better=higher_is_better, advice=advice,
                    alpha=float(est.alpha if alpha is None else alpha),
                    learning_rate=float(est.learning_rate if learning_rate is None else learning_rate))
    except KeyboardInterrupt:
        if state["best"] is not None:
            net.restore(state["best"])
        raise


def _run_epochs(est, net, handle, keys, y, weight, n, rng, epochs, state, *, sampler, validate, metric,
                higher_is_better, advice, alpha, learning_rate):
    history = est.history_
    val_key = f"val_{metric}" if validate is not None else None
    if val_key:
        history.setdefault(val_key, [])
    patience = getattr(est, "n_iter_no_change", None) if validate is not None else None
    best, waited = None, 0
    n_threads = est._threads()
    clock = fit_clock(est)
    for epoch in range(epochs):
        if clock is not None:
            clock.epoch_started()
        start = time.perf_counter()
        order = rng.permutation(n).astype(np.int64)
        if sampler is not None:
            sampler["seed"] = int(rng.randint(0, 2**31 - 1))
        progress = _Progress(est.verbose, epoch, epochs, n)
        # A private fit trains through fastrec.privacy's epoch instead (DP-SGD steps).
        train_epoch = getattr(est, "_private_train_epoch", None) or net.train_epoch
        loss_sum, rows, diverged, error = train_epoch(
            handle, keys, y, weight, order, batch_size=int(est.batch_size), alpha=alpha,
            learning_rate=learning_rate, momentum=float(est.momentum),
            nesterov=bool(est.nesterovs_momentum), beta_1=0.9, beta_2=0.999, epsilon=1e-8, sampler=sampler,
            epoch=len(history["loss"]), n_threads=n_threads, progress=progress if progress.bar is not None else None)
        if (error is not None or diverged) and progress.bar is not None:
            progress.bar.close()
        if error is not None:
            raise error
        if diverged:
            raise ValueError(
                f"training diverged in epoch {epoch + 1}: a batch's loss became NaN or infinite, so training "
                "stopped before applying it (the parameters are those of the last finite step). Try a lower "
                f"learning_rate{advice}.")
        seconds = time.perf_counter() - start
        history["loss"].append(loss_sum / max(rows, 1))
        history["seconds"].append(seconds)
        summary = {"loss": history["loss"][-1]}
        if clock is not None:
            clock.train += seconds
        if val_key:
            started = time.perf_counter()
            score = float(validate())
            if clock is not None:
                clock.validate += time.perf_counter() - started
            history[val_key].append(score)
            summary[val_key] = score
            # A NaN score never counts as an improvement (nor becomes the best to beat).
            improved = not np.isnan(score) and (best is None or (score > best if higher_is_better else score < best))
            if improved:
                best, waited = score, 0
                if patience is not None:
                    state["best"] = net.snapshot()
                est.best_epoch_ = len(history["loss"])  # after the snapshot: a Ctrl-C in it keeps the old pair
            else:
                waited += 1
        progress.close(summary, rows / max(seconds, 1e-9))
        if patience is not None and waited >= patience:
            if est.verbose:
                print(f"{val_key} did not improve for {patience} epochs: stopping, keeping epoch "
                      f"{est.best_epoch_}", file=sys.stderr, flush=True)
            break
    if state["best"] is not None and waited > 0:
        net.restore(state["best"])
