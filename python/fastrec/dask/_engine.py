"""The engine of fastrec.dask (docs/DESIGN.md "Scale-out on Dask"), shared by every distributed estimator.

- Ids are mapped the same way everywhere: every partition's distinct ids are gathered once (a distributed
  unique) and each worker builds its replica of the model from them and the seed, so the replicas start equal.
- Each replica trains the C++ core on the partitions assigned to it, where they live, with all its threads.
  Every ``sync_every`` batches (or once per epoch) the replicas are combined on the workers: the core marks
  the rows it updates, each replica sends those rows to the replica that owns their shard of the table, the
  owner gives each row its old value plus every replica's change (optimizer state: the mean) and sends the
  combined shard to the others; dense weights are averaged over the replicas that trained. Only touched rows
  travel: the bytes of a round follow the rows touched, not the table sizes. The driver orchestrates and
  collects the model once, at the end (``to_local()``).
- Given the same partitions, workers count, seed and ``sync_every``, the result is the same on every run: a
  replica's partitions depend on their order only, not on where Dask placed them.
- A worker that dies, restarts or stalls during a fit never hangs it: the fit raises ``WorkerLostError`` naming
  the worker, its partitions and the epoch, within seconds of the scheduler noticing (or after ``timeout``
  seconds without a round finishing), and cleans its state from the surviving workers; the client stays usable.

What differs between the estimators (how a model is built from a spec, how a partition becomes training rows,
how the core trains it, what the driver collects besides the parameters) is an `_Adapter`, registered for the
local estimator's class by the module that defines the Dask estimator.
"""

from __future__ import annotations

import sys
import time
import uuid

import numpy as np

try:
    import dask
    import distributed
except ImportError as e:  # fastrec itself works without Dask
    raise ImportError("fastrec.dask needs Dask's distributed scheduler: pip install 'fastrec[dask]'") from e

from fastrec import _core
from fastrec._checks import check_random_state
from fastrec._fieldnet import Float32Normals

__all__ = ["WorkerLostError"]


# The Dask settings of a LocalCluster that fastrec starts itself (the CLI's --workers), docs/DESIGN.md: its
# nannies start the workers without MALLOC_TRIM_THRESHOLD_ (a fixed trim threshold also fixes glibc's mmap
# threshold: a replica trained 9-13% slower with it), and while tasks run no worker profiler (a thread sampling
# stacks every 10 ms) and a 1 s event-loop tick instead of 20 ms: ~1 CPU s per 10 s across a 2-worker cluster
# against 0.2 s without them, time taken from training when the workers fill the cores (benchmarks/DASK.md).
_LEAN_CLUSTER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                        "distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s"}


def _local_cluster(**kwargs):
    """distributed.LocalCluster(**kwargs) with _LEAN_CLUSTER_CONFIG (its nannies pass the config to the workers;
    a MALLOC_TRIM_THRESHOLD_ already in this process's environment still reaches them)."""
    with dask.config.set(_LEAN_CLUSTER_CONFIG):
        return distributed.LocalCluster(**kwargs)


def _worker_addresses(client):
    """The addresses of the workers now in the cluster, asked of the scheduler. Not `client.scheduler_info()`:
    since distributed 2025 the client refreshes that cache every 2 s without the workers (n_workers=0), and a
    refresh landing between a fetch and its read returns a cluster with no workers."""
    return sorted(client.nthreads())


class WorkerLostError(RuntimeError):
    """A Dask worker holding a replica died, restarted or stopped answering during a distributed fit."""


# --------------------------------------------------------------------------------------------- on workers
_REPLICAS: dict = {}  # (job, replica) -> _Replica, in each worker process
_ADAPTERS: dict = {}  # local estimator class -> its _Adapter


class _Adapter:
    """What one kind of estimator does differently on the cluster (subclasses: fastrec.dask._recommenders,
    fastrec.dask._fields). `spec`: what a first fit's replicas are built from (an `_Spec`)."""

    estimator = None
    sampled = True  # the local epoch draws a sampler seed after its permutation (run_epochs): so do the replicas
    caches = ()  # attributes of the local model rebuilt on demand (not sent to the workers for scoring)

    @classmethod
    def register(cls, adapter):
        _ADAPTERS[adapter.estimator] = adapter
        return adapter

    def build(self, spec, tables):
        """The model every replica (and, without drawing the embedding tables when not `tables`, the driver)
        starts a first fit from: the same arrays from the same spec."""
        raise NotImplementedError

    def prepare(self, est, parts):
        """This replica's training rows from its partitions: (keys, y, weight, item counts or None)."""
        raise NotImplementedError

    def add_counts(self, est, counts):
        """Add the item counts of every replica's partitions to the replica's (the driver's) model."""

    def training(self, est):
        """What the core trains the replica with: (training handle, sampler dict (None when not `sampled`), alpha,
        learning_rate). Built once per fit, at the replica's first training: the item counts are in, and nothing
        it reads changes between rounds (the rounds write the tables and dense arrays in place)."""
        raise NotImplementedError

    def ids(self, est):
        """The id arrays that every replica must map alike (the digest)."""
        raise NotImplementedError

    def seen(self, est):
        """The replica's seen pairs (a CSR over the users), or None when the model keeps none."""
        return None

    def finish(self, model, counts, seen):
        """The driver's model after the parameters were collected: item counts, seen pairs, caches."""
        for name in self.caches:
            model.__dict__.pop(name, None)


def _delayed_parts(x, name, local):
    """The partitions of a dask array / Series as delayed objects (None stays None); `local`: where local data
    goes instead."""
    if x is None:
        return None
    if not hasattr(x, "to_delayed"):
        raise TypeError(f"{name} must be a dask array or dask Series (got {type(x).__name__}); local arrays go "
                        f"to {local}")
    d = x.to_delayed()
    return list(np.ravel(d)) if isinstance(d, np.ndarray) else list(d)


class _Spec:
    """A first fit's spec for `estimator`'s adapter: `fields` are what its `build` reads (params, seed, ...)."""

    def __init__(self, estimator, *fields):
        self.estimator, self.fields = estimator, fields


def _adapter(source):
    """The adapter of a spec or a fitted model."""
    return _ADAPTERS[source.estimator if isinstance(source, _Spec) else type(source)]


def _nets(net):
    """The FieldNets of a model's net_ (a TowerNet holds two)."""
    return net.towers if hasattr(net, "towers") else [net]


class _Replica:
    """A worker's copy of the model and its rows, and the shard of every table it combines (rows
    [bounds[j][replica], bounds[j][replica + 1]) of table j)."""

    def __init__(self, est, adapter, keys, y, weight, seed, replica, n_replicas, whole):
        self.est, self.adapter, self.keys, self.y, self.weight = est, adapter, keys, y, weight
        self.n = len(y)
        self.order, self.pos, self.epoch_seed = None, 0, 0
        self.training = None  # the adapter's training(), at this replica's first round that trains
        # Replica 0 continues the model's own stream (so one worker reproduces a local fit); others their own.
        self.rng = est._rng if seed is None else np.random.RandomState(seed)
        self.replica, self.n_replicas = replica, n_replicas
        for net in _nets(est.net_):
            net.track_touched()  # the core marks the rows it updates: a round ships those, never whole tables
        tables = [t[0] for t in _tables(est.net_)]
        self.bounds = [[len(t) * s // n_replicas for s in range(n_replicas + 1)] for t in tables]
        lo_hi = [(b[replica], b[replica + 1]) for b in self.bounds]
        # The shard's values as of the last combine (the "old" of old + sum of changes; optimizer state is
        # averaged, it needs no old); one replica needs none.
        self.shadow = None if n_replicas == 1 else [t[lo:hi].copy() for t, (lo, hi) in zip(tables, lo_hi)]
        # Shard rows combined during the fit: what the driver collects at the end (every row when `whole`: the
        # driver built its copy without drawing the tables).
        self.changed = [(np.ones if whole else np.zeros)(hi - lo, np.uint8) for lo, hi in lo_hi]


def _distinct(a):
    """np.unique(a), for int ids by the core's radix sort (NumPy 2's hash-based unique took 1.9 s of the driver's
    time on 8 partitions' distinct ids of 10^6 users)."""
    if a.dtype.kind != "i" or len(a) == 0:
        return np.unique(a)
    return _core.unique_ids(np.require(a, np.int64, ["C", "A"]))[0]


class _ZeroTables(Float32Normals):
    """The driver's draws for its copy of the model: embedding tables of zeros (calloc'd: no time and no
    memory until written; the shards' owners send every row at the end), everything else drawn from the same
    stream as on the replicas (the table draws come from a Generator seeded once either way)."""

    def normal(self, loc, scale, size):
        return np.zeros(size, np.float32)

    def __getattr__(self, name):  # randint etc.: the RandomState's
        if name == "_rng":
            raise AttributeError(name)
        return getattr(self._rng, name)


def _build(spec, tables=True):
    """The model every replica and the driver start from: the same arrays from the same ids and seed (the
    embedding tables zeros when not `tables`: the driver's copy, which competes with the replicas' builds for
    the cores and gets every row from them at the end)."""
    return _adapter(spec).build(spec, tables)


def _draws(seed, tables):
    """(the RandomState of `seed`, what the model's parameters are drawn from: it, or zero tables)."""
    rng = check_random_state(seed)
    return rng, (rng if tables else _ZeroTables(rng))


def _start(job, replica, n_replicas, source, seed, *parts):
    """Replica `replica`: the model built from `source` (a spec: first fit) or a copy of it (a fitted model:
    partial_fit), with these partitions' rows (and seen pairs). Returns their item counts (None for a model
    without items) and the digest."""
    import copy

    adapter = _adapter(source)
    whole = not hasattr(source, "net_")  # a first fit: the driver's tables are zeros, it collects every row
    est = adapter.build(source, True) if whole else copy.deepcopy(source)
    keys, y, weight, counts = adapter.prepare(est, parts)
    _REPLICAS[(job, replica)] = _Replica(est, adapter, keys, y, weight, seed, replica, n_replicas, whole)
    return counts, (_digest(est, False), _digest(est, True))


def _digest(est, tables):
    """A fingerprint of the id mapping, the table shapes and the initial parameters (the embedding tables' values
    only if `tables`: the driver's first-fit copy has zeros there; 4,096 rows of each, evenly spaced: a table
    drawn differently differs in every row, and hashing whole tables took 0.3 s of each replica's build).
    Optimizer state is left out: zeros on a first fit, a copy of the model's on partial_fit."""
    import hashlib

    nets = _nets(est.net_)
    all_tables = [t for net in nets for t in net.tables]
    h = hashlib.sha256(repr([t.shape for t in all_tables]).encode())
    for a in (*_adapter(est).ids(est), *(a for net in nets for a in net.coefs + net.intercepts),
              *(net.gmf_w for net in nets if net.gmf_w is not None),
              *(t[::max(1, len(t) // 4096)] for t in (all_tables if tables else ()))):
        buf = np.ascontiguousarray(a)
        h.update(buf.tobytes() if buf.dtype.hasobject else memoryview(buf).cast("B"))  # no copy of the ids
    return h.hexdigest()


def _replica(job, replica):
    try:
        return _REPLICAS[(job, replica)]
    except KeyError:
        raise WorkerLostError(f"replica {replica} of this fit is not on this worker any more (it restarted)") from None


def _counts(job, replica, counts):
    """The item counts of every partition: the negative sampler draws from the whole data's popularity."""
    rep = _replica(job, replica)
    rep.adapter.add_counts(rep.est, counts)


def _tables(net):
    """(values, state1, state2) of every embedding table of the model's net (a two-tower's: the user tower's,
    then the item tower's)."""
    return [(n.tables[i], n.table_state1[i], n.table_state2[i]) for n in _nets(net) for i in range(len(n.tables))]


def _marks(net):
    return [m for n in _nets(net) for m in n.touched_marks]


def _dense(net):
    return [a for n in _nets(net) for a in n.coefs + n.intercepts + n.state1 + n.state2 +
            [n.gmf_w, n.gmf_state1, n.gmf_state2] if a is not None]


def _dense_mean(results):
    """Dense arrays of a round: the mean over the replicas that trained (one replica: its arrays as they are,
    bitwise a local fit), and Adam's step: the largest. `results`: each replica's (dense arrays, adam_t) or
    None. Every replica and the driver compute it from the same inputs in the same order: the same bits."""
    results = [r for r in results if r is not None]
    if not results:
        return None
    if len(results) == 1:
        return results[0]
    dense = [np.mean([r[0][j] for r in results], axis=0, dtype=np.float64).astype(np.float32)
             for j in range(len(results[0][0]))]
    return dense, max(r[1] for r in results)


def _write_rows(arrays, rows, combined):
    for dst, src in zip(arrays, combined[1:]):
        if dst is not None:
            dst[rows] = src


def _round(job, replica, combined, dense, epoch, n_rows):
    """Apply the last round (the other replicas' combined shards, this one's was written by its combine, and
    the mean of the dense arrays), then train the next n_rows rows of this replica's epoch `epoch` (a new
    permutation when the last one is done). Returns None when its epoch is done, else the rows it touched
    split by the shard that combines them (row ids, values, optimizer-state rows), its dense arrays, and
    the round's figures (only the bytes received when its epoch is done)."""
    rep = _replica(job, replica)
    est, net = rep.est, rep.est.net_
    received = 0
    for s, shard in enumerate(combined or ()):
        if s != replica and shard is not None:
            for arrays, rows in zip(_tables(net), shard):
                _write_rows(arrays, rows[0], rows)
                received += sum(a.nbytes for a in rows if a is not None)
    mean = _dense_mean(dense or ())
    if mean is not None:
        for dst, src in zip(_dense(net), mean[0]):
            np.copyto(dst, src)
        net.adam_t = mean[1]
    if rep.order is None or rep.epoch != epoch:
        if rep.order is not None and rep.pos < rep.n:
            raise RuntimeError(f"replica {replica} starts epoch {epoch} before finishing the last one")
        rep.order = rep.rng.permutation(rep.n).astype(np.int64)
        rep.epoch_seed = int(rep.rng.randint(0, 2**31 - 1)) if rep.adapter.sampled else 0
        rep.epoch, rep.pos, rep.slice = epoch, 0, 0
    if rep.pos >= rep.n:  # this replica's epoch is done: it sits the round out
        return {"pieces": [None] * rep.n_replicas, "dense": None, "stats": {"received_bytes": received}}
    part = rep.order[rep.pos:rep.pos + n_rows]
    if rep.training is None:
        rep.training = rep.adapter.training(est)
    handle, sampler, alpha, learning_rate = rep.training
    # Slice 0 of an epoch draws exactly what a local epoch draws; later slices from their own streams.
    if sampler is not None:
        sampler["seed"] = (rep.epoch_seed + 1_000_003 * rep.slice) % (2**31 - 1)
    started = time.perf_counter()
    loss_sum, rows, diverged, error = net.train_epoch(
        handle, rep.keys, rep.y, rep.weight, part, batch_size=int(est.batch_size), alpha=alpha,
        learning_rate=learning_rate, momentum=float(est.momentum), nesterov=bool(est.nesterovs_momentum),
        beta_1=0.9, beta_2=0.999, epsilon=1e-8, sampler=sampler, epoch=epoch, n_threads=est._threads())
    if error is not None:
        raise error
    if diverged:
        raise ValueError(f"training diverged on replica {replica} in epoch {epoch + 1}: a batch's loss became NaN "
                         "or infinite. Try a lower learning_rate.")
    trained = time.perf_counter() - started
    rep.pos += len(part)
    rep.slice += 1
    # The rows the core marked, cut by shard (marks cleared for the next round): O(rows touched) to copy. The
    # piece of this replica's own shard is the row ids only: its combine reads their values in place.
    pieces = [[] for _ in range(rep.n_replicas)]
    nbytes = [0] * rep.n_replicas
    for arrays, marks, bounds in zip(_tables(net), _marks(net), rep.bounds):
        touched = np.flatnonzero(marks)
        marks[touched] = 0
        cuts = np.searchsorted(touched, bounds)
        row_bytes = 4 + sum(a.strides[0] for a in arrays if a is not None)
        for s in range(rep.n_replicas):
            ids = touched[cuts[s]:cuts[s + 1]].astype(np.int32)
            pieces[s].append((ids, *(None if a is None or s == replica else a[ids] for a in arrays)))
            nbytes[s] += len(ids) * row_bytes
    return {"pieces": pieces, "dense": ([a.copy() for a in _dense(net)], net.adam_t),
            "stats": {"loss": float(loss_sum), "rows": int(rows), "left": rep.n - rep.pos, "train_s": trained,
                      "touched_bytes": sum(nbytes), "sent_bytes": sum(nbytes) - nbytes[replica],
                      "received_bytes": received}}


def _pick(result, what, shard=None):
    """One part of a round's result, as its own Dask key, so that each goes only where it is needed."""
    if result is None:
        return None
    return result[what] if shard is None else result[what][shard]


def _combine(job, shard, *pieces, last=False):
    """On the replica that owns `shard`: combine the replicas' pieces of it (each replica's touched rows of
    the shard, or None; this replica's own piece is its row ids, their values are in its tables) and write the
    result into this replica's tables. A row gets its old value plus every replica's change (one replica's
    change: that replica's value exactly), its optimizer state the mean of the states of the replicas that
    touched it. Returns the combined rows, for the other replicas (None when there are none, or when `last`: the
    fit's last round, after which only the driver reads the shard, from the tables).

    Summing row changes keeps a popular item learning as fast as on one machine (averaging them divided its
    progress by the replicas: MovieLens-100k test RMSE gap to a local fit +0.0076 summed, benchmarks/DASK.md);
    summing the dense weights' changes too overshot at coarse rounds (+0.042 at one round per epoch).

    In place: a row of the shard holds this replica's value where it touched the row and the old value
    elsewhere, so each other replica's change is added to it in turn (in float64, rounded to float32 after
    each; replica order)."""
    rep = _replica(job, shard)
    got = [(r, p) for r, p in enumerate(pieces) if p is not None]
    if not got:
        return None
    out = []
    for j, arrays in enumerate(_tables(rep.est.net_)):
        lo, hi = rep.bounds[j][shard], rep.bounds[j][shard + 1]
        parts = [(r, p[j]) for r, p in got if len(p[j][0])]
        others = [(r, p) for r, p in parts if r != shard]
        if not others:  # nothing but this replica's own rows: in place already
            ids = parts[0][1][0] if parts else np.zeros(0, np.int32)
            rep.changed[j][ids - lo] = 1
            out.append(None if rep.n_replicas == 1 or last else (ids, *(None if a is None else a[ids] for a in arrays)))
            continue
        if len(parts) == 1:  # one other replica's rows: its values and state exactly
            combined = parts[0][1]
            _write_rows(arrays, combined[0], combined)
        else:
            count = np.zeros(hi - lo, np.int32)
            for _, p in parts:
                count[p[0] - lo] += 1
            union = (np.flatnonzero(count) + lo).astype(np.int32)
            base = rep.shadow[j]
            for _, p in others:  # each change added in float64 (a row only one replica changed: its value exactly)
                rows = p[0]
                total = np.add(arrays[0][rows], p[1], dtype=np.float64)
                total -= base[rows - lo]
                arrays[0][rows] = total
            if len(parts) == 2:  # this replica's and one other's: the mean in place, one pass per state
                p = others[0][1]
                rows = p[0]
                only = np.flatnonzero(count[rows - lo] == 1)  # rows this replica did not touch: the other's state
                for k in (1, 2):
                    if arrays[k] is not None:
                        # (a + b) / 2 in float32, as the general rule's sum and division
                        mean = arrays[k][rows]
                        mean += p[k + 1]
                        mean *= np.float32(0.5)
                        mean[only] = p[k + 1][only]
                        arrays[k][rows] = mean
                combined = (union, *(None if a is None or last else a[union] for a in arrays))
            else:
                local = union - lo
                at = np.empty(hi - lo, np.int64)  # read only at the union's rows
                at[local] = np.arange(len(local))
                states = []
                n = count[local].astype(np.float32)
                for k in (1, 2):
                    if arrays[k] is None:
                        states.append(None)
                        continue
                    # float32: a mean of optimizer states needs no more (float64 doubled the combine's time)
                    total = np.zeros((len(union),) + arrays[k].shape[1:], np.float32)
                    for r, p in parts:
                        total[at[p[0] - lo]] += arrays[k][p[0]] if r == shard else p[k + 1]
                    total /= n.reshape(-1, *[1] * (total.ndim - 1))
                    states.append(total)
                combined = (union, arrays[0][union], *states)
                _write_rows(arrays[1:], union, combined[1:])  # the states (the values are in place)
        rep.changed[j][combined[0] - lo] = 1
        if last:  # nothing reads the shadow or the combined rows again: no copies of them
            continue
        rep.shadow[j][combined[0] - lo] = combined[1]
        out.append(combined)
    return None if last else out


def _nbytes(obj):
    if obj is None:
        return 0
    return sum(a.nbytes for t in obj for a in t if isinstance(a, np.ndarray))


def _changed_rows(job, shard, after):
    """The owner's rows of its shard that any round changed (all of them on a first fit), as combined (for the
    driver's model). `after`: the last combine of the shard, so that this runs after it."""
    rep = _replica(job, shard)
    out = []
    for j, arrays in enumerate(_tables(rep.est.net_)):
        lo, hi = rep.bounds[j][shard], rep.bounds[j][shard + 1]
        ids = np.flatnonzero(rep.changed[j])
        if len(ids) == hi - lo:  # the whole shard: views (sent as they are, written as slices)
            out.append((slice(lo, hi), *(None if a is None else a[lo:hi] for a in arrays)))
        else:
            ids = (ids + lo).astype(np.int32)
            out.append((ids, *(None if a is None else a[ids] for a in arrays)))
    return out


def _seen_pairs(job, replica):
    """The replica's seen items (a CSR over every user; None for a model without): fixed from its start,
    collected while it trains."""
    rep = _replica(job, replica)
    return rep.adapter.seen(rep.est)


def _rng_state(job, replica, after):
    """The replica's random stream's state (replica 0's continues the model's) after its last round (`after`)."""
    return _replica(job, replica).rng.get_state()


def _union_seen(csrs, n_items):
    """The union of seen-items CSRs over the same users (each sorted by user, then item, without duplicates):
    their sorted keys merged (a stable sort of sorted runs is a merge: 0.1 s for 10^7 pairs where merging the
    replicas' pairs one by one took seconds), duplicates dropped."""
    n_rows = len(csrs[0][0]) - 1
    kept = [c for c in csrs if len(c[1])]
    if len(kept) == 1 and kept[0][0].dtype == csrs[0][0].dtype:
        return kept[0]
    keys = np.concatenate([np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr)) * n_items + indices
                           for indptr, indices in csrs])
    keys = np.sort(keys, kind="stable")
    if len(keys):
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    counts = np.bincount(keys // n_items, minlength=n_rows)
    return (np.concatenate([[0], np.cumsum(counts)]).astype(csrs[0][0].dtype, copy=False),
            (keys % n_items).astype(np.int32))


def _drop(job):
    for key in [k for k in _REPLICAS if k[0] == job]:
        del _REPLICAS[key]


def _scoring_copy(model):
    """The model as the workers score with it: without its optimizer state (two thirds of an Adam model's bytes,
    sent to every worker for nothing). The arrays are shared, not copied."""
    import copy

    out = copy.copy(model)
    for name in _adapter(model).caches:
        out.__dict__.pop(name, None)
    out.net_ = copy.copy(model.net_)
    if hasattr(out.net_, "towers"):
        out.net_.towers = [copy.copy(t) for t in out.net_.towers]
    for net in _nets(out.net_):
        net.optimizer = None  # the core reads no state when scoring; a copy that cannot train
        net.state1 = net.state2 = []
        net.table_state1 = net.table_state2 = [None] * len(net.tables)
        net.gmf_state1 = net.gmf_state2 = None
        net.__dict__.pop("touched_marks", None)
    return out


# --------------------------------------------------------------------------------------------- the driver
def _direct(call, *args, **kwargs):
    """client.gather / client.scatter straight between the client and the workers (through the scheduler, the
    default, the 858 MB model of benchmarks/DASK.md took 4-6 s to collect on a LocalCluster, 0.8 s direct),
    unless the client was made with direct_to_workers=False; through the scheduler when the workers cannot be
    reached from the client."""
    if call.__self__.direct_to_workers is False:
        return call(*args, **kwargs)
    try:
        return call(*args, direct=True, **kwargs)
    except OSError:  # no route to the workers (distributed's connection errors are OSErrors)
        return call(*args, direct=False, **kwargs)


class _DaskEstimator:
    """What every Dask estimator shares: parameters, the fit's job (its tasks and failures), the rounds, the
    bounded waits, wrapping and scoring a local model. Subclasses set `_local` (the local estimator class)."""

    _local = None

    def __init__(self, *, client=None, sync_every=None, timeout=600.0, **params):
        self._check_local(params)
        self.client, self.sync_every, self.timeout, self.params = client, sync_every, timeout, dict(params)

    def _check_local(self, params):
        self._local(**params)  # unknown parameter names raise TypeError here, not on a worker
        if params.get("privacy") is not None:
            raise ValueError(f"{type(self).__name__} does not train with privacy= (differentially private "
                             "training is not distributed): fit a local model instead")

    def get_params(self, deep=True):
        return {"client": self.client, "sync_every": self.sync_every, "timeout": self.timeout, **self.params}

    def set_params(self, **params):
        for name in ("client", "sync_every", "timeout"):
            if name in params:
                setattr(self, name, params.pop(name))
        self._check_local({**self.params, **params})
        self.params.update(params)
        return self

    def _client(self):
        if self.client is not None:
            return self.client
        try:
            return distributed.default_client()
        except ValueError:
            raise ValueError("no Dask client: pass client=distributed.Client(...) or create one first") from None

    def _seed(self):
        """The seed every replica draws the initial arrays from (random_state, or one drawn from it)."""
        seed = self.params.get("random_state")
        if not isinstance(seed, (int, np.integer)):
            seed = int(check_random_state(seed).randint(0, 2**31 - 1))
        return int(seed)

    # ------------------------------------------------------------------------------------------------ fit
    def _fit(self, data, first, epochs=None):
        """fit (`first`) or partial_fit on `data` (the fit's arguments): the partitions and what the driver reads
        of each (`_read(client, data)`: futures of both), then a first fit's spec from those figures
        (`_spec_fields(stats, data)`: its fields after params and seed) or a copy of the fitted model grown with
        them (`_grow_copy(model, stats, data)`; the fitted model is kept if it fails), trained `epochs` epochs (None:
        the model's)."""

        def body(client, job, futures):
            parts, stats = self._read(client, data)
            futures += parts
            stats = self._gather(client, stats, "reading the partitions", [])
            self._marks.append(time.perf_counter())
            if first:
                fields = self._spec_fields(stats, data)
                source = _Spec(self._local, self.params, self._seed(), *fields)  # the same initial arrays everywhere
                seed = source.fields[1]
                # The driver's copy, built while the workers build theirs, without drawing its tables.
                model = lambda: _build(source, tables=False)  # noqa: E731
            else:
                import copy

                model = copy.deepcopy(self.model_)
                self._grow_copy(model, stats, data)
                source, seed = model, int(model._rng.get_state()[1][0])  # not a draw: replica 0 continues the stream
            self._train(client, job, futures, model, parts, source, seed, epochs)

        return self._fit_job(body)

    def _fit_job(self, body):
        """body(client, job, futures): read the partitions (then mark the time), build the model's source and
        `_train`. Cancels the job's tasks and frees its replicas whatever happens; a failure while a replica's
        worker is gone is a WorkerLostError."""
        if self.sync_every is not None and (isinstance(self.sync_every, bool) or not isinstance(self.sync_every, int)
                                            or self.sync_every < 1):
            raise ValueError(f"sync_every must be None (once per epoch) or a positive int, got {self.sync_every!r}")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        client = self._client()
        job = uuid.uuid4().hex
        futures = []
        start = time.perf_counter()
        self._marks = [start]
        try:
            body(client, job, futures)
        except WorkerLostError:
            raise
        except Exception as e:  # e.g. a send to a worker that just died: say so if that is what happened
            lost = [w for w, _ in self.__dict__.get("_workers", []) if w not in _worker_addresses(client)]
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
        # Where the fit's time went: reading (partitions and the distributed unique), building (replicas and
        # the driver's copy), training (the epochs' rounds, combining included), collecting (the model to the
        # driver).
        marks = self.__dict__.pop("_marks")
        self.phase_seconds_ = dict(zip(("reading", "building", "training", "collecting"), np.diff(marks).tolist()))
        return self

    def _train(self, client, job, futures, model, parts, source, seed, epochs):
        """Replicas from `source` on the workers, `epochs` epochs of rounds (None: the model's), then the changed
        rows and the seen pairs into `model` (a callable building it when it is the first fit: the driver builds
        its copy while the workers build theirs)."""
        workers = self._workers = self._placement(client, parts)
        n_rep = len(workers)
        shared = self._share(client, source, workers, "building the replicas")
        futures.append(shared)

        def pinned(r, fn, *args, **kwargs):  # a task on replica r's worker, named after the step (dashboard)
            f = client.submit(fn, *args, **kwargs, workers=[workers[r][0]], allow_other_workers=False, pure=False,
                              key=f"fastrec-{fn.__name__.strip('_')}-{uuid.uuid4().hex}")
            futures.append(f)
            return f

        started = [pinned(r, _start, job, r, n_rep, shared, None if r == 0 else int(seed) + 7919 * r,
                          *[parts[p] for p in ps]) for r, (w, ps) in enumerate(workers)]
        whole = callable(model)  # a first fit: the driver's tables are zeros until it collects every row
        if whole:
            model = model()
        built = self._gather(client, started, "building the replicas", workers)
        # Never train replicas that disagree on a row: the same digest everywhere, the driver's (without the
        # tables it did not draw) equal to theirs.
        if len({d for _, d in built}) != 1 or {d[int(not whole)] for _, d in built} != {_digest(model, not whole)}:
            raise RuntimeError("the workers built different id mappings or initial parameters (fastrec or NumPy "
                               "versions differ between the workers and the client?)")
        counts = None
        if built[0][0] is not None:  # item counts: the negative sampler draws from the whole data's popularity
            counts = sum(c for c, _ in built)
            self._gather(client, [pinned(r, _counts, job, r, counts) for r in range(n_rep)],
                         "building the replicas", workers)
        seen = [pinned(r, _seen_pairs, job, r) for r in range(n_rep)]  # ready now: collected after the training
        epochs = int(model.epochs) if epochs is None else epochs
        self._marks.append(time.perf_counter())
        rows_per_round = (1 << 62) if self.sync_every is None else self.sync_every * int(model.batch_size)
        # A round: each replica trains and cuts its touched rows by shard; replica s combines shard s from
        # every replica's piece (Dask moves the pieces worker to worker); the next round's task of each
        # replica takes every combined shard and dense result. The driver only sees each round's figures.
        combined, dense, last_dense = None, None, None
        round_bytes, round_stats = [], []
        first_epoch = len(model.history_["loss"])
        for epoch in range(first_epoch, first_epoch + epochs):
            epoch_start = time.perf_counter()
            loss, rows, left = 0.0, 0, True
            # Once per epoch, the last epoch's round is the fit's last: its combine leaves the rows in the owners'
            # tables for the driver to collect and copies nothing for the other replicas.
            final_round = self.sync_every is None and epoch == first_epoch + epochs - 1
            while left:
                results = [pinned(r, _round, job, r, combined, dense, epoch, rows_per_round) for r in range(n_rep)]
                stats = [pinned(r, _pick, results[r], "stats") for r in range(n_rep)]
                dense = [pinned(r, _pick, results[r], "dense") for r in range(n_rep)]
                combined = [pinned(s, _combine, job, s, *[pinned(r, _pick, results[r], "pieces", s)
                                                          for r in range(n_rep)], last=final_round)
                            for s in range(n_rep)]
                # Only the figures come back: the combine runs while the driver submits the next round.
                got = self._gather(client, stats, f"epoch {epoch + 1}", workers)
                keep = {id(f) for f in combined + dense + seen + [shared]}  # the rest is done: let Dask release it
                futures[:] = [f for f in futures if id(f) in keep]
                if round_bytes:  # the last round's combined shards, as the replicas received them
                    round_bytes[-1] += sum(g["received_bytes"] for g in got)
                figures = [g for g in got if "rows" in g]
                if not figures:
                    break
                last_dense = dense
                left = any(f["left"] > 0 for f in figures)
                if left and final_round:  # one round is the whole epoch: cannot happen
                    raise RuntimeError("a round of a whole epoch left rows untrained")
                loss += sum(f["loss"] for f in figures)
                rows += sum(f["rows"] for f in figures)
                # Each replica's pieces for the other shards (and, added by the next round, each combined shard to
                # the other replicas).
                round_bytes.append(sum(f["sent_bytes"] for f in figures))
                round_stats.append({"epoch": epoch, "rows": sum(f["rows"] for f in figures),
                                    "train_s": max(f["train_s"] for f in figures),
                                    "touched_bytes": sum(f["touched_bytes"] for f in figures)})
                if model.verbose:  # per-round progress on the client
                    seconds = time.perf_counter() - epoch_start
                    print(f"{type(self).__name__}: epoch {epoch + 1}, round {len(round_stats)}: {rows:,} rows, "
                          f"{rows / max(seconds, 1e-9):,.0f} rows/s, loss {loss / max(rows, 1):.5g}, "
                          f"{round_bytes[-1] / 1e6:,.1f} MB sent", file=sys.stderr, flush=True)
            model.history_["loss"].append(loss / max(rows, 1))
            model.history_["seconds"].append(time.perf_counter() - epoch_start)
        # The driver's model: every row any round changed (every row on a first fit), from the shard's owner,
        # and the last dense mean.
        self._marks.append(time.perf_counter())
        finals = [pinned(s, _changed_rows, job, s, combined[s]) for s in range(n_rep)]
        rng = pinned(0, _rng_state, job, 0, results[0])
        # The seen pairs' union on a helper thread (NumPy's sorts release the GIL) while the last combine runs
        # and the rows arrive.
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            # Each replica's seen pairs hold the model's (a copy of it, or none on a first fit) and its own.
            csrs = self._gather(client, seen, "collecting the seen items", workers)
            union = None if csrs[0] is None else pool.submit(_union_seen, csrs, len(counts))
            got = self._gather(client, finals + [rng] + (last_dense or []), "collecting the model", workers)
            finals, state, last = got[:n_rep], got[n_rep], got[n_rep + 1:]
            net = model.net_
            for shard in finals:
                for arrays, rows in zip(_tables(net), shard):
                    _write_rows(arrays, rows[0], rows)
            mean = _dense_mean(last)
            if mean is not None:
                for dst, src in zip(_dense(net), mean[0]):
                    np.copyto(dst, src)
                net.adam_t = mean[1]
            union = None if union is None else union.result()
        finally:
            pool.shutdown(wait=False)
        model._rng.set_state(state)
        _adapter(model).finish(model, counts, union)
        self._marks.append(time.perf_counter())
        self.model_ = model
        self.replica_workers_ = [w for w, _ in workers]
        self.replica_partitions_ = [p for _, p in workers]
        self.round_bytes_ = round_bytes
        self.round_stats_ = round_stats
        self.final_bytes_ = sum(_nbytes(f) for f in finals)

    def _placement(self, client, parts):
        """Replicas: contiguous runs of partitions (one per worker, at most one per partition), each placed on
        the worker already holding most of its partitions."""
        workers = _worker_addresses(client)
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
        return self._bounded(client, lambda: _direct(client.scatter, [obj], workers=[w for w, _ in workers],
                                                     broadcast=True, hash=False)[0], what, workers,
                             time.monotonic() + float(self.timeout))

    def _check(self, client, workers, what, deadline):
        alive = set(_worker_addresses(client))
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
        while True:  # first until every task has finished (its status only: no data moves)
            pending = [f for f in futures if not f.done()]
            if not pending:
                break
            try:
                distributed.wait(pending, timeout=0.5)
            except (distributed.TimeoutError, TimeoutError):
                self._check(client, workers, what, deadline)
        try:
            for f in futures:
                if f.status != "finished":
                    f.result(timeout=10)  # raises the task's error (or the cancellation)
            # Then the results: a big one takes longer than a 0.5 s step to fetch (and a fetch cut short by a
            # timeout is not resumed), so it runs on a helper thread waited for in bounded steps.
            return self._bounded(client, lambda: _direct(client.gather, futures), what, workers, deadline)
        except Exception as exc:
            if type(exc).__name__ in ("KilledWorker", "CancelledError", "FutureCancelledError"):
                raise WorkerLostError(f"a worker died while {what}: {exc}") from exc
            raise

    def _bounded(self, client, call, what, workers, deadline):
        """call() on a helper thread (a Dask call to a worker that just died can block), waited for in 0.5 s
        steps, checking the workers and the deadline between them."""
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            running = pool.submit(call)
            while True:
                try:
                    return running.result(timeout=0.5)
                except concurrent.futures.TimeoutError:
                    self._check(client, workers, what, deadline)
        finally:
            pool.shutdown(wait=False)

    # ---------------------------------------------------------------------------------------- scoring
    def to_local(self):
        """The trained model as an ordinary local estimator (what `_local` names)."""
        if not hasattr(self, "model_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit first")
        return self.model_

    @classmethod
    def from_local(cls, model, *, client=None):
        """Wrap a fitted local model (of the class this one distributes) to score on the cluster."""
        if not isinstance(model, cls._local) or not hasattr(model, "net_"):
            raise ValueError(f"from_local needs a fitted fastrec.{cls._local.__name__}")
        params = model.get_params()
        params.pop("privacy", None)  # a privately trained model scores like any other
        out = cls(client=client, **params)
        out.model_ = model
        return out

    def _model_future(self, client):
        self.to_local()  # an unfitted estimator says so, whatever scores
        cached = self.__dict__.get("_scattered")
        if cached is None or cached[0] is not self.model_ or cached[1] is not client:
            copy = _scoring_copy(self.model_)
            cached = self._scattered = (self.model_, client,
                                        _direct(client.scatter, [copy], broadcast=True, hash=False)[0])
        return cached[2]
