"""Data-parallel training and cluster scoring of fastrec recommenders on Dask (docs/DESIGN.md "Scale-out on Dask").

Install with ``pip install 'fastrec[dask]'``. ``DaskRecommender`` takes dask arrays / Series partitioned by rows:

- Ids are mapped the same way everywhere: every partition's distinct ids are gathered once (a distributed
  unique) and each worker builds its replica of the model from them and the seed, so the replicas start equal.
- Each replica trains the C++ core on the partitions assigned to it, where they live, with all its threads.
  Every ``sync_every`` batches (or once per epoch) the replicas are combined: dense weights averaged over the
  replicas that trained in the round, and each embedding row (with its optimizer state) averaged over the
  replicas that changed it. Only those rows travel: the bytes of a round follow the rows touched, not the
  table sizes. The driver keeps the combined model, which ``to_local()`` returns.
- Given the same partitions, workers count, seed and ``sync_every``, the result is the same on every run: a
  replica's partitions depend on their order only, not on where Dask placed them.
- A worker that dies, restarts or stalls during a fit never hangs it: the fit raises ``WorkerLostError`` naming
  the worker, its partitions and the epoch, within seconds of the scheduler noticing (or after ``timeout``
  seconds without a round finishing), and cleans its state from the surviving workers; the client stays usable.
"""

from __future__ import annotations

import time
import uuid

import numpy as np

try:
    import dask
    import distributed
except ImportError as e:  # fastrec itself works without Dask
    raise ImportError("fastrec.dask needs Dask's distributed scheduler: pip install 'fastrec[dask]'") from e

from fastrec._checks import check_random_state
from fastrec._recbase import _merge_seen
from fastrec.recommender import Recommender

__all__ = ["DaskRecommender", "WorkerLostError"]


class WorkerLostError(RuntimeError):
    """A Dask worker holding a replica died, restarted or stopped answering during a distributed fit."""


# --------------------------------------------------------------------------------------------- on workers
_REPLICAS: dict = {}  # (job, replica) -> _Replica, in each worker process


class _Replica:
    """A worker's copy of the model and its rows."""

    def __init__(self, est, user_rows, item_rows, y, weight, seed):
        self.est, self.keys, self.y, self.weight = est, [user_rows, item_rows], y, weight
        self.n = len(y)
        self.order, self.pos, self.epoch_seed = None, 0, 0
        # Replica 0 continues the model's own stream (so one worker reproduces a local fit); others their own.
        self.rng = est._rng if seed is None else np.random.RandomState(seed)


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
    return np.unique(users), np.unique(items), stats, len(users)


def _build(spec):
    """The model every replica and the driver start from: the same arrays from the same ids and seed."""
    params, seed, users, items, rating_stats, user_features, item_features, feature_types = spec
    est = Recommender(**params).set_params(random_state=seed)
    config = est._validate_params(rating_stats is None)
    est._check_base_params()
    user_features, item_features = est._new_tables(user_features, item_features, feature_types)
    est._rng = check_random_state(seed)
    est._new_model(users, items, rating_stats, user_features, item_features, config)
    return est


def _start(job, replica, source, seed, *parts):
    """Replica `replica`: the model built from `source` (a spec: first fit) or a copy of it (a fitted model:
    partial_fit), with these partitions' rows and seen pairs. Returns their item counts and the digest."""
    import copy

    est = _build(source) if isinstance(source, tuple) else copy.deepcopy(source)
    users = np.concatenate([p[0] for p in parts])
    items = np.concatenate([p[1] for p in parts])
    ratings = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    weight = None if parts[0][3] is None else np.concatenate([p[3] for p in parts]).astype(np.float32)
    u, i = est._users.index(users), est._items.index(items)
    n_i = len(est._items) + 1
    est._seen = _merge_seen(*est._seen, u, i, n_i)
    y = np.ones(len(u), np.float32) if est.implicit_ else (ratings - est.rating_mean_).astype(np.float32)
    _REPLICAS[(job, replica)] = _Replica(est, u, i, y, weight, seed)
    return np.bincount(i, minlength=n_i).astype(np.float64), _vocabulary_digest(est)


def _vocabulary_digest(est):
    """A fingerprint of the id mapping and the initial parameters: equal on every replica and the driver."""
    import hashlib

    h = hashlib.sha256()
    for a in (est._users.ids, est._items.ids, *est.net_._arrays()):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _replica(job, replica):
    try:
        return _REPLICAS[(job, replica)]
    except KeyError:
        raise WorkerLostError(f"replica {replica} of this fit is not on this worker any more (it restarted)") from None


def _counts(job, replica, counts):
    """The item counts of every partition: the negative sampler draws from the whole data's popularity."""
    est = _replica(job, replica).est
    est._seen_counts = counts
    est._update_counts()


def _tables(net):
    return [(net.tables[i], net.table_state1[i], net.table_state2[i]) for i in range(len(net.tables))]


def _dense(net):
    return [a for a in net.coefs + net.intercepts + net.state1 + net.state2 +
            [net.gmf_w, net.gmf_state1, net.gmf_state2] if a is not None]


def _apply(net, update):
    """Write a combined round into a model: rows of the tables (and their state), dense arrays, Adam's step."""
    if update is None:
        return
    for (table, s1, s2), (rows, values, v1, v2) in zip(_tables(net), update["tables"]):
        table[rows] = values
        if s1 is not None:
            s1[rows] = v1
        if s2 is not None:
            s2[rows] = v2
    for dst, src in zip(_dense(net), update["dense"]):
        np.copyto(dst, src)
    net.adam_t = update["adam_t"]


def _round(job, replica, update, epoch, n_rows):
    """Apply the last combined round, then train the next n_rows rows of this replica's epoch `epoch` (a new
    permutation when the last one is done). Returns what changed: the rows of each table that moved, dense
    arrays, loss sum and rows trained."""
    rep = _replica(job, replica)
    est, net = rep.est, rep.est.net_
    _apply(net, update)
    if rep.order is None or rep.epoch != epoch:
        if rep.order is not None and rep.pos < rep.n:
            raise RuntimeError(f"replica {replica} starts epoch {epoch} before finishing the last one")
        rep.order = rep.rng.permutation(rep.n).astype(np.int64)
        rep.epoch_seed = int(rep.rng.randint(0, 2**31 - 1))
        rep.epoch, rep.pos, rep.slice = epoch, 0, 0
    if rep.pos >= rep.n:
        return None
    before = [t.copy() for t, _, _ in _tables(net)]
    part = rep.order[rep.pos:rep.pos + n_rows]
    sampler = est._sampler(negatives=est.negatives if est.implicit_ else 0, seed=0)
    # Slice 0 of an epoch draws exactly what a local epoch draws; later slices from their own streams.
    sampler["seed"] = (rep.epoch_seed + 1_000_003 * rep.slice) % (2**31 - 1)
    handle = net.handle(est._bags, est._dense_tables, training=True)
    loss_sum, rows, diverged, error = net.train_epoch(
        handle, rep.keys, rep.y, rep.weight, part, batch_size=int(est.batch_size),
        alpha=est._setting("alpha", est.loss_), learning_rate=est._setting("learning_rate", est.loss_),
        momentum=float(est.momentum), nesterov=bool(est.nesterovs_momentum), beta_1=0.9, beta_2=0.999,
        epsilon=1e-8, sampler=sampler, epoch=epoch, n_threads=est._threads())
    if error is not None:
        raise error
    if diverged:
        raise ValueError(f"training diverged on replica {replica} in epoch {epoch + 1}: a batch's loss became NaN "
                         "or infinite. Try a lower learning_rate.")
    rep.pos += len(part)
    rep.slice += 1
    tables = []
    for (t, s1, s2), old in zip(_tables(net), before):
        moved = np.flatnonzero((t != old).reshape(len(t), -1).any(axis=1))
        tables.append((moved, t[moved], None if s1 is None else s1[moved], None if s2 is None else s2[moved]))
    return {"tables": tables, "dense": [a.copy() for a in _dense(net)], "adam_t": net.adam_t,
            "loss": float(loss_sum), "rows": int(rows), "left": rep.n - rep.pos}


def _seen_pairs(job, replica):
    """The replica's seen pairs (entity numbers), and its random stream's state (replica 0's continues the
    model's)."""
    rep = _replica(job, replica)
    indptr, items = rep.est._seen
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int32), np.diff(indptr)), items, rep.rng.get_state()


def _drop(job):
    for key in [k for k in _REPLICAS if k[0] == job]:
        del _REPLICAS[key]


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
def _combine(deltas, net):
    """Rows: each changed row gets its old value plus every replica's change to it (a row one replica changed
    keeps that replica's value), its optimizer state the mean of theirs; dense arrays: their mean over the
    replicas that trained; Adam's step: the largest. `net`: the model before the round.

    Summing row changes keeps a popular item learning as fast as on one machine (averaging them divided its
    progress by the replicas: MovieLens-100k test RMSE gap to a local fit +0.0076 summed, benchmarks/DASK.md);
    summing the dense weights' changes too overshot at coarse rounds (+0.042 at one round per epoch)."""
    tables = []
    for (old, _, _), parts in zip(_tables(net), zip(*(d["tables"] for d in deltas))):
        rows = np.concatenate([p[0] for p in parts])
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        starts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]])) if len(rows) else rows
        count = np.diff(np.append(starts, len(rows)))
        combined = [rows[starts]]
        for j in (1, 2, 3):
            if parts[0][j] is None:
                combined.append(None)
            elif (count == 1).all():  # rows changed by one replica only: its values as they are
                combined.append(np.concatenate([p[j] for p in parts])[order])
            else:
                values = np.concatenate([p[j] for p in parts])[order]
                if j == 1:  # the row's old value plus every replica's change
                    base = old[rows[starts]].astype(np.float64)
                    changes = values - np.repeat(base, count, axis=0)
                    combined.append((base + np.add.reduceat(changes, starts, axis=0)).astype(np.float32))
                    continue
                total = np.add.reduceat(values, starts, axis=0, dtype=np.float64)
                combined.append((total / count.reshape(-1, *[1] * (values.ndim - 1))).astype(np.float32))
        tables.append(tuple(combined))
    if len(deltas) == 1:  # one replica: its arrays as they are (bitwise a local fit)
        dense = deltas[0]["dense"]
    else:
        dense = [np.mean([d["dense"][j] for d in deltas], axis=0, dtype=np.float64).astype(np.float32)
                 for j in range(len(deltas[0]["dense"]))]
    return {"tables": tables, "dense": dense, "adam_t": max(d["adam_t"] for d in deltas)}


def _update_bytes(update):
    arrays = [a for t in update["tables"] for a in t if a is not None] + update["dense"]
    return sum(a.nbytes for a in arrays)


def _partitions(client, users, items, ratings, weight):
    """Futures of the partitions, each (users, items, ratings, weight) as NumPy arrays."""
    def delayed_parts(x, name):
        if x is None:
            return None
        if hasattr(x, "to_delayed"):
            d = x.to_delayed()
            return list(np.ravel(d)) if isinstance(d, np.ndarray) else list(d)
        raise TypeError(f"{name} must be a dask array or dask Series (got {type(x).__name__}); local arrays go "
                        "to fastrec.Recommender.fit")
    cols = [delayed_parts(x, n) for x, n in ((users, "users"), (items, "items"), (ratings, "ratings"),
                                               (weight, "sample_weight"))]
    n = len(cols[0])
    for c, name in zip(cols[1:], ("items", "ratings", "sample_weight")):
        if c is not None and len(c) != n:
            raise ValueError(f"users has {n} partitions but {name} has {len(c)}: partition them alike")
    part = dask.delayed(_part, pure=True)
    return client.compute([part(*(None if c is None else c[p] for c in cols)) for p in range(n)])


class DaskRecommender:
    """A `fastrec.Recommender` trained data-parallel on a Dask cluster (module docstring; docs/DESIGN.md).

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
        Any `fastrec.Recommender` parameter. The fit trains ``epochs`` epochs: early stopping and validation
        data are not used on the cluster (evaluate ``to_local()`` instead).
    """

    def __init__(self, *, client=None, sync_every=None, timeout=600.0, **params):
        Recommender(**params)  # unknown parameter names raise TypeError here, not on a worker
        self.client, self.sync_every, self.timeout, self.params = client, sync_every, timeout, dict(params)

    def get_params(self, deep=True):
        return {"client": self.client, "sync_every": self.sync_every, "timeout": self.timeout, **self.params}

    def set_params(self, **params):
        for name in ("client", "sync_every", "timeout"):
            if name in params:
                setattr(self, name, params.pop(name))
        Recommender(**{**self.params, **params})
        self.params.update(params)
        return self

    def _client(self):
        if self.client is not None:
            return self.client
        try:
            return distributed.default_client()
        except ValueError:
            raise ValueError("no Dask client: pass client=distributed.Client(...) or create one first") from None

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self, users, items, ratings=None, *, sample_weight=None, user_features=None, item_features=None,
            feature_types=None):
        """Train on dask collections (users, items[, ratings, sample_weight]) partitioned alike by rows.

        Feature tables are local (a FeatureTable or pandas DataFrame indexed by id): each worker gets a copy.
        Returns self; ``to_local()`` is the trained `fastrec.Recommender`.
        """
        return self._run(users, items, ratings, sample_weight, user_features, item_features, feature_types, True)

    def partial_fit(self, users, items, ratings=None, *, sample_weight=None, user_features=None, item_features=None,
                    feature_types=None):
        """One more epoch over these dask collections, continuing from the current model (as
        `Recommender.partial_fit`: new ids are added, the interactions join the seen items). Each worker starts
        from a copy of the model (sent once); on an unfitted model it is ``fit`` with one epoch."""
        first = not hasattr(self, "model_")
        return self._run(users, items, ratings, sample_weight, user_features, item_features, feature_types, first,
                         epochs=1)

    def _run(self, users, items, ratings, weight, user_features, item_features, feature_types, first, epochs=None):
        if self.sync_every is not None and (isinstance(self.sync_every, bool) or not isinstance(self.sync_every, int)
                                            or self.sync_every < 1):
            raise ValueError(f"sync_every must be None (once per epoch) or a positive int, got {self.sync_every!r}")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        client = self._client()
        job = uuid.uuid4().hex
        futures = []
        start = time.perf_counter()
        try:
            parts = _partitions(client, users, items, ratings, weight)
            futures += parts
            stats = self._gather(client, client.map(_part_stats, parts, pure=False), "reading the partitions", [])
            if sum(s[3] for s in stats) == 0:
                raise ValueError("users is empty: nothing to train on")
            if len({s[0].dtype.kind == "U" for s in stats if len(s[0])}) > 1:
                raise TypeError("users mix strings and integers across partitions")
            new_users = np.unique(np.concatenate([s[0] for s in stats]))
            new_items = np.unique(np.concatenate([s[1] for s in stats]))
            if first:
                rating_stats = None
                if ratings is not None:
                    wr, w = sum(s[2][0] for s in stats), sum(s[2][1] for s in stats)
                    rating_stats = (wr / w, min(s[2][2] for s in stats), max(s[2][3] for s in stats))
                seed = self.params.get("random_state")
                if not isinstance(seed, (int, np.integer)):  # every replica must draw the same initial arrays
                    seed = int(check_random_state(seed).randint(0, 2**31 - 1))
                source = (self.params, int(seed), new_users, new_items, rating_stats, user_features, item_features,
                          feature_types)
                model = _build(source)  # the driver's copy: every combined round is written into it
            else:
                # A copy, grown like Recommender.partial_fit grows: the fitted model is kept if this fails.
                import copy

                model = copy.deepcopy(self.model_)
                if (ratings is None) != model.implicit_:
                    raise ValueError("partial_fit needs the kind of feedback (ratings or implicit) of the first fit")
                model._validate_params(ratings is None)
                model._grow(new_users, new_items, model._check_table(user_features, "user_features", feature_types),
                            model._check_table(item_features, "item_features", feature_types))
                source, seed = model, int(model._rng.get_state()[1][0])  # not a draw: replica 0 continues the stream
            self._train(client, job, futures, model, parts, source, seed,
                        int(model.epochs) if epochs is None else epochs)
        except WorkerLostError:
            raise
        except Exception as e:  # e.g. a send to a worker that just died: say so if that is what happened
            lost = [w for w, _ in self.__dict__.get("_workers", []) if w not in client.scheduler_info()["workers"]]
            if lost:
                raise WorkerLostError(f"worker {lost[0]} left the cluster during the fit ({type(e).__name__}: {e}); "
                                      "nothing was kept. Fit again (the cluster is usable).") from e
            raise
        finally:
            self.__dict__.pop("_workers", None)
            client.cancel(futures)
            try:
                client.run(_drop, job)
            except Exception:  # a dead worker has nothing left to drop
                pass
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def _train(self, client, job, futures, model, parts, source, seed, epochs):
        """Replicas from `source` on the workers, `epochs` epochs of rounds, then the seen pairs into `model`."""
        workers = self._workers = self._placement(client, parts)
        shared = self._share(client, source, workers, "building the replicas")
        futures.append(shared)
        started = [client.submit(_start, job, r, shared, None if r == 0 else int(seed) + 7919 * r,
                                 *[parts[p] for p in ps], workers=[w], allow_other_workers=False, pure=False)
                   for r, (w, ps) in enumerate(workers)]
        futures += started
        built = self._gather(client, started, "building the replicas", workers)
        if {d for _, d in built} != {_vocabulary_digest(model)}:  # never train replicas that disagree on a row
            raise RuntimeError("the workers built different id mappings or initial parameters (fastrec or NumPy "
                               "versions differ between the workers and the client?)")
        counts = model._seen_counts + sum(c for c, _ in built)
        done = [client.submit(_counts, job, r, counts, workers=[w], allow_other_workers=False, pure=False)
                for r, (w, _) in enumerate(workers)]
        futures += done
        self._gather(client, done, "building the replicas", workers)
        rows_per_round = (1 << 62) if self.sync_every is None else self.sync_every * int(model.batch_size)
        update, round_bytes = None, []
        for epoch in range(len(model.history_["loss"]), len(model.history_["loss"]) + epochs):
            epoch_start = time.perf_counter()
            loss, rows, left = 0.0, 0, True
            while left:
                shared = None if update is None else self._share(client, update, workers, f"epoch {epoch + 1}")
                calls = [client.submit(_round, job, r, shared, epoch, rows_per_round, workers=[w],
                                       allow_other_workers=False, pure=False) for r, (w, _) in enumerate(workers)]
                futures += calls
                deltas = [d for d in self._gather(client, calls, f"epoch {epoch + 1}", workers) if d is not None]
                futures[:] = [f for f in futures if all(f is not c for c in calls)]
                left = any(d["left"] > 0 for d in deltas)
                if not deltas:
                    break
                loss += sum(d["loss"] for d in deltas)
                rows += sum(d["rows"] for d in deltas)
                update = _combine(deltas, model.net_)
                round_bytes.append(sum(_update_bytes(d) for d in deltas) + len(workers) * _update_bytes(update))
                _apply(model.net_, update)
            model.history_["loss"].append(loss / max(rows, 1))
            model.history_["seconds"].append(time.perf_counter() - epoch_start)
        pairs = self._gather(client, [client.submit(_seen_pairs, job, r, workers=[w], allow_other_workers=False,
                                                    pure=False) for r, (w, _) in enumerate(workers)],
                             "collecting the seen items", workers)
        n_i = len(model._items) + 1
        for u, i, _ in pairs:
            model._seen = _merge_seen(*model._seen, u, i, n_i)
        model._rng.set_state(pairs[0][2])
        model._seen_counts = counts
        model._update_counts()
        model._predictor = None
        self.model_ = model
        self.replica_workers_ = [w for w, _ in workers]
        self.replica_partitions_ = [p for _, p in workers]
        self.round_bytes_ = round_bytes

    def _placement(self, client, parts):
        """Replicas: contiguous runs of partitions (one per worker, at most one per partition), each placed on
        the worker already holding most of its partitions."""
        workers = sorted(client.scheduler_info()["workers"])
        if not workers:
            raise ValueError("the Dask cluster has no workers")
        n = min(len(workers), len(parts))
        runs = [list(range(len(parts) * r // n, len(parts) * (r + 1) // n)) for r in range(n)]
        who = client.who_has(parts)
        free, out = list(workers), []
        for run in runs:
            held = {w: sum(w in who.get(parts[p].key, ()) for p in run) for w in free}
            best = max(free, key=lambda w: (held[w], -free.index(w)))
            free.remove(best)
            out.append((best, run))
        return out

    def _share(self, client, obj, workers, what):
        """A future of `obj` copied to every replica's worker. A broadcast to a worker that just died can block
        forever inside Dask, so it runs on a helper thread that is waited for in bounded steps, checking the
        workers between them."""
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            call = pool.submit(client.scatter, [obj], workers=[w for w, _ in workers], broadcast=True, hash=False)
            deadline = time.monotonic() + float(self.timeout)
            while True:
                try:
                    return call.result(timeout=0.5)[0]
                except concurrent.futures.TimeoutError:
                    self._check(client, workers, what, deadline)
        finally:
            pool.shutdown(wait=False)

    def _check(self, client, workers, what, deadline):
        alive = set(client.scheduler_info()["workers"])
        for r, (w, ps) in enumerate(workers):
            if w not in alive:
                raise WorkerLostError(
                    f"worker {w} (replica {r}, partitions {ps}) left the cluster while {what}: its replica's "
                    "training since the last round is lost. Fit again (the cluster is usable).")
        if time.monotonic() > deadline:
            raise WorkerLostError(f"no answer within timeout={self.timeout:g} s while {what} (a worker may be "
                                  "paused for memory or stuck); nothing was kept")

    def _gather(self, client, futures, what, workers):
        """Results of `futures`, or WorkerLostError when a replica's worker leaves or nothing finishes within
        timeout; never waits forever (each wait is bounded, and the worker list is checked between waits)."""
        deadline = time.monotonic() + float(self.timeout)

        out = []
        for f in futures:
            while True:
                try:
                    out.append(f.result(timeout=0.5))  # fetching a result from a dead worker must not block
                    break
                except (distributed.TimeoutError, TimeoutError):
                    self._check(client, workers, what, deadline)
                except Exception as exc:
                    if type(exc).__name__ in ("KilledWorker", "CancelledError", "FutureCancelledError"):
                        raise WorkerLostError(f"a worker died while {what}: {exc}") from exc
                    raise
        return out

    # ---------------------------------------------------------------------------------------- scoring
    def to_local(self):
        """The trained model as an ordinary `fastrec.Recommender`."""
        if not hasattr(self, "model_"):
            raise ValueError("this DaskRecommender is not fitted yet: call fit first")
        return self.model_

    @classmethod
    def from_local(cls, model, *, client=None):
        """Wrap a fitted local `Recommender` to score on the cluster."""
        if not isinstance(model, Recommender) or not hasattr(model, "net_"):
            raise ValueError("from_local needs a fitted fastrec.Recommender")
        out = cls(client=client, **model.get_params())
        out.model_ = model
        return out

    def _model_future(self, client):
        cached = self.__dict__.get("_scattered")
        if cached is None or cached[0] is not self.model_ or cached[1] is not client:
            cached = self._scattered = (self.model_, client, client.scatter([self.model_], broadcast=True, hash=False)[0])
        return cached[2]

    def recommend(self, users, k=10, *, exclude_seen=True, items=None):
        """Top-k items of each user of a dask array / Series, as a dask DataFrame (user, rank, item, score):
        what ``to_local().recommend`` returns, one row per (user, rank); write it with ``to_parquet``."""
        import dask.dataframe as dd
        import pandas as pd

        model = self.to_local()
        client = self._client()
        m = self._model_future(client)
        if not hasattr(users, "to_delayed"):
            raise TypeError(f"users must be a dask array or Series, got {type(users).__name__}")
        d = users.to_delayed()
        parts = client.compute(list(np.ravel(d)) if isinstance(d, np.ndarray) else list(d))
        calls = [client.submit(_recommend_part, m, p, k, exclude_seen, items, pure=False) for p in parts]
        kind = model._items.ids.dtype
        meta = pd.DataFrame({"user": np.zeros(0, np.asarray(model._users.ids).dtype), "rank": np.zeros(0, np.int64),
                             "item": np.zeros(0, kind), "score": np.zeros(0, np.float64)})
        return dd.from_delayed(calls, meta=meta, verify_meta=False)

    def predict(self, users, items):
        """Scores of the pairs of two dask arrays / Series partitioned alike, as a dask array."""
        import dask.array as da

        client = self._client()
        m = self._model_future(client)
        cols = []
        for x, name in ((users, "users"), (items, "items")):
            if not hasattr(x, "to_delayed"):
                raise TypeError(f"{name} must be a dask array or Series, got {type(x).__name__}")
            d = x.to_delayed()
            cols.append(client.compute(list(np.ravel(d)) if isinstance(d, np.ndarray) else list(d)))
        if len(cols[0]) != len(cols[1]):
            raise ValueError(f"users has {len(cols[0])} partitions but items has {len(cols[1])}")
        blocks = [da.from_delayed(dask.delayed(client.submit(_predict_part, m, u, i, pure=False)), shape=(np.nan,),
                                  dtype=np.float64) for u, i in zip(*cols)]
        return da.concatenate(blocks)
