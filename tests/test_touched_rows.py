"""The core's touched-row marks (FieldNet.track_touched, used by fastrec.dask to ship only the rows a round
touched): every row whose value or optimizer state changed is marked, nothing outside the rows the batches
read is marked, and marking changes nothing in training (bitwise)."""

import numpy as np
import pandas as pd
import pytest

import fastrec

PARAMS = dict(epochs=1, early_stopping=False, random_state=0, n_threads=1, embedding_dim=8, hidden_layer_sizes=(16,))


def fitted(implicit, optimizer):
    rng = np.random.default_rng(0)
    u = rng.integers(0, 300, 4000)
    i = (u * 7 + rng.integers(0, 40, 4000)) % 200
    r = None if implicit else (1 + (i % 5)).astype(np.float64)
    users = pd.DataFrame({"region": rng.integers(0, 5, 300).astype(str)}, index=pd.Index(np.arange(300)))
    items = pd.DataFrame({"category": rng.integers(0, 9, 200).astype(str)}, index=pd.Index(np.arange(200)))
    est = fastrec.Recommender(optimizer=optimizer, **PARAMS).fit(u, i, r, user_features=users, item_features=items)
    return est, est._users.index(u), est._items.index(i), r


def train_slice(est, keys, y, order):
    """One pass of the core over keys[order] as fastrec.dask's rounds run it."""
    net = est.net_
    sampler = est._sampler(negatives=est.negatives if est.implicit_ else 0, seed=0)
    handle = net.handle(est._bags, est._dense_tables, training=True)
    _, _, diverged, error = net.train_epoch(
        handle, keys, y, None, order, batch_size=int(est.batch_size), alpha=est._setting("alpha", est.loss_),
        learning_rate=est._setting("learning_rate", est.loss_), momentum=float(est.momentum),
        nesterov=bool(est.nesterovs_momentum), beta_1=0.9, beta_2=0.999, epsilon=1e-8, sampler=sampler, epoch=1,
        n_threads=1)
    assert error is None and not diverged


def table_arrays(net, j):
    return [a for a in (net.tables[j], net.table_state1[j], net.table_state2[j]) if a is not None]


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "sgd"])
def test_marked_rows_cover_every_changed_row_and_only_rows_the_batches_read(implicit, optimizer):
    est, u, i, r = fitted(implicit, optimizer)
    y = np.ones(len(u), np.float32) if implicit else (r - est.rating_mean_).astype(np.float32)
    keys = [u.astype(np.int32), i.astype(np.int32)]
    order = np.flatnonzero(u % 3 == 0).astype(np.int64)  # a third of the users (and their items) only
    net = est.net_
    before = [[a.copy() for a in table_arrays(net, j)] for j in range(len(net.tables))]
    net.track_touched()
    train_slice(est, keys, y, order)
    fields = [f.key for f in net.fields]
    for j, marks in enumerate(net.touched_marks):
        assert marks.dtype == np.uint8 and marks.shape == (len(net.tables[j]),)
        changed = np.zeros(len(marks), bool)
        for now, then in zip(table_arrays(net, j), before[j]):
            changed |= (now != then).reshape(len(marks), -1).any(axis=1)
        marked = marks.astype(bool)
        assert changed.any(), f"table {j} did not learn: the test checks nothing"
        assert not (changed & ~marked).any(), f"table {j}: a changed row is not marked"
        # Rows the batches could read: the bags of the slice's keys (implicit: of every item, as negatives),
        # and row 0 (id dropout's "unknown" row).
        indptr, ids, _ = est._bags[j]
        key_rows = np.unique(keys[fields[j]][order]) if not (implicit and fields[j] == 1) else np.arange(
            len(indptr) - 1)
        readable = np.zeros(len(marks), bool)
        readable[np.concatenate([ids[indptr[q]:indptr[q + 1]] for q in key_rows] + [[0]])] = True
        assert not (marked & ~readable).any(), f"table {j}: a row no batch read is marked"
    # User rows outside the slice: never marked.
    other_users = np.setdiff1d(u, u[order])
    assert not net.touched_marks[0][est._bags[0][1][other_users]].any()


@pytest.mark.parametrize("implicit", [False, True])
def test_marking_touched_rows_leaves_training_bitwise_the_same(implicit):
    runs = []
    for track in (False, True):
        est, u, i, r = fitted(implicit, "adam")
        y = np.ones(len(u), np.float32) if implicit else (r - est.rating_mean_).astype(np.float32)
        if track:
            est.net_.track_touched()
        train_slice(est, [u.astype(np.int32), i.astype(np.int32)], y, np.arange(len(u), dtype=np.int64))
        runs.append(est.net_._arrays())
    assert all(np.array_equal(a, b) for a, b in zip(*runs))


def test_marks_must_match_the_table():
    est, *_ = fitted(False, "adam")
    est.net_.track_touched()
    est.net_.touched_marks[0] = np.zeros(3, np.uint8)
    with pytest.raises(ValueError, match="touched"):
        est.net_.handle(est._bags, est._dense_tables, training=True)
    est.net_.touched_marks[0] = np.zeros(len(est.net_.tables[0]), np.int32)
    with pytest.raises(TypeError, match="touched"):
        est.net_.handle(est._bags, est._dense_tables, training=True)
