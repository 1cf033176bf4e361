"""The two-tower core (cpp/two_tower.cpp) against the NumPy oracle (fastrec.reference).

Tolerance: the core runs in float32 and the oracle in float64 on the same float32 parameters; relative
errors of a few 1e-7 are float32 rounding over sums of tens of terms, so 1e-4 (the bar of issue 12) has a wide
margin and still catches any wrong term (which shows up as an error of order 1).
"""

import numpy as np
import pytest

from fastrec import _core
from fastrec import reference as ref
from fastrec._fieldnet import DenseBlock, Field, bags_of_ids
from fastrec._towernet import TowerNet

N_USERS, N_ITEMS = 30, 40


@pytest.fixture
def rs():
    return np.random.RandomState(0)


def side(rng, vocab, extra_vocab, dense_width):
    """The inputs of one side: an id field, a weighted multi-hot field of 2 values per entity, numbers."""
    fields = [Field("id", vocab, 8, 0), Field("tags", extra_vocab, 4, 0)]
    dense = [DenseBlock("num", dense_width, 0)] if dense_width else []
    bags = [bags_of_ids(np.arange(vocab)),
            (np.arange(0, 2 * vocab + 1, 2, dtype=np.int64), rng.randint(0, extra_vocab, 2 * vocab).astype(np.int32),
             rng.rand(2 * vocab).astype(np.float32))]
    tables = [rng.randn(vocab, dense_width).astype(np.float32)] if dense_width else []
    return (fields, dense), (bags, tables)


def make_net(rng, normalize=False, temperature=1.0, optimizer="adam", hidden=(16,)):
    user_inputs, user_data = side(rng, N_USERS, 5, 3)
    item_inputs, item_data = side(rng, N_ITEMS, 7, 0)
    net = TowerNet(user_inputs, item_inputs, hidden, 6, "relu", normalize, temperature, rng, init_scale=0.3)
    net.reset_optimizer(optimizer)
    return net, user_data, item_data


def pairs(rng, n):
    users = rng.randint(0, N_USERS, n).astype(np.int32)
    items = rng.randint(0, N_ITEMS, n).astype(np.int32)
    items[3] = items[7]  # a duplicate item in the batch: an accidental hit for the softmax
    y = (rng.rand(n) * 4).astype(np.float32)
    w = (rng.rand(n) + 0.5).astype(np.float32)
    return users, items, y, w


def negatives_for(rng, loss, k, n, items):
    m = k if loss == "softmax" else 0 if loss == "mse" else n * k
    neg = rng.randint(0, N_ITEMS, m).astype(np.int32)
    if loss == "softmax" and m:
        neg[0] = items[2]  # an extra negative equal to a positive: removed for that row
    return neg


def relative_error(got, expected):
    """Max error over a tower's arrays relative to its largest gradient (some exact gradients are 0: the item
    tower's output bias under the softmax and BPR, whose losses do not change when every item moves alike)."""
    got = [a for group in got for a in group]
    expected = [a for group in expected for a in group]
    scale = max(np.abs(e).max() for e in expected)
    return max(np.abs(g - e).max() for g, e in zip(got, expected)) / scale


# Softmax with normalised vectors subtracts a fixed bound of the logits (exponentials in the GEMM's epilogue)
# unless 2 / temperature + the log-Q range exceeds 60; temperature 0.02 takes the row-maximum path instead.
@pytest.mark.parametrize("normalize,temperature", [(False, 1.0), (True, 0.2), (True, 0.02)])
@pytest.mark.parametrize("loss,k,log_q", [("softmax", 5, True), ("softmax", 0, True), ("softmax", 3, False),
                                          ("bpr", 3, False), ("bce", 2, False), ("mse", 0, False)])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_and_gradients_match_reference(isa, rs, normalize, temperature, loss, k, log_q, weighted):
    net, user_data, item_data = make_net(rs, normalize, temperature)
    handle = net.handle(user_data, item_data)
    n = 12
    users, items, y, w = pairs(rs, n)
    w = w if weighted else None
    q = (rs.rand(N_ITEMS) + 0.1).astype(np.float32)
    training = {"loss": loss, "negatives": k, "item_prob": (q / q.sum()).astype(np.float32) if log_q else None,
                "n_items": N_ITEMS, "seed": 1}
    neg = negatives_for(rs, loss, k, n, items)
    got = handle.loss_and_gradients(users, items, y, w, training, neg, 0.01, 0, isa)
    specs = [ref.float64_copy(t.spec(*data)) for t, data in zip(net.towers, (user_data, item_data))]
    expected = ref.two_tower_loss_and_gradients(specs[0], specs[1], normalize, temperature, users, items, y, w,
                                                training, neg, 0.01)
    assert got[0] == pytest.approx(expected[0], rel=1e-5)
    assert relative_error(got[1], expected[1]) < 1e-4
    assert relative_error(got[2], expected[2]) < 1e-4


def test_softmax_over_many_gemm_tiles_matches_reference(isa, rs):
    """150 candidates: several of the GEMM's column tiles (row sums kept per tile), a ragged last one, and
    accidental hits in most of them (40 items)."""
    net, user_data, item_data = make_net(rs, True, 0.2)
    handle = net.handle(user_data, item_data)
    users, items, y, w = pairs(rs, 150)
    q = (rs.rand(N_ITEMS) + 0.1).astype(np.float32)
    training = {"loss": "softmax", "negatives": 0, "item_prob": (q / q.sum()).astype(np.float32),
                "n_items": N_ITEMS, "seed": 1}
    none = np.zeros(0, np.int32)
    got = handle.loss_and_gradients(users, items, y, w, training, none, 0.01, 0, isa)
    specs = [ref.float64_copy(t.spec(*data)) for t, data in zip(net.towers, (user_data, item_data))]
    expected = ref.two_tower_loss_and_gradients(specs[0], specs[1], True, 0.2, users, items, y, w, training, none,
                                                0.01)
    assert got[0] == pytest.approx(expected[0], rel=1e-5)
    assert relative_error(got[1], expected[1]) < 1e-4
    assert relative_error(got[2], expected[2]) < 1e-4


def test_accidental_hits_are_removed_and_log_q_changes_the_softmax(rs):
    net, user_data, item_data = make_net(rs)
    handle = net.handle(user_data, item_data)
    base = {"loss": "softmax", "negatives": 0, "item_prob": None, "n_items": N_ITEMS, "seed": 0}
    none = np.zeros(0, np.int32)
    # Every row holds the same item: every other column is an accidental hit, so each row's softmax has
    # only its own column and the loss is 0 (log(8) if the hits stayed in).
    same = np.full(8, 5, np.int32)
    assert handle.loss_and_gradients(rs.randint(0, N_USERS, 8).astype(np.int32), same, None, None, base, none,
                                     0.0)[0] == pytest.approx(0.0, abs=1e-6)
    # The log-Q term shifts each column by its own log-probability, which changes the loss.
    users, items, y, _ = pairs(rs, 12)
    q = np.full(N_ITEMS, 1.0 / N_ITEMS, np.float32)
    q[items[0]] = 0.5
    plain = handle.loss_and_gradients(users, items, y, None, base, none, 0.0)[0]
    corrected = handle.loss_and_gradients(users, items, y, None, {**base, "item_prob": q}, none, 0.0)[0]
    assert abs(plain - corrected) > 1e-3


@pytest.mark.parametrize("normalize", [False, True])
def test_vectors_match_reference(isa, rs, normalize):
    net, user_data, item_data = make_net(rs, normalize, 0.5)
    handle = net.handle(user_data, item_data)
    keys = rs.randint(0, N_ITEMS, 2500).astype(np.int32)  # more than one chunk of 2048
    got = handle.vectors(False, keys, 2.0, 0, isa)
    specs = [ref.float64_copy(t.spec(*data)) for t, data in zip(net.towers, (user_data, item_data))]
    expected = ref.two_tower_vectors(*specs, normalize, 0.5, False, keys, 2.0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 2.0, rtol=1e-5)


def train(rng_seed, n_threads, loss, optimizer="adam", batch_size=64):
    rng = np.random.RandomState(rng_seed)
    net, user_data, item_data = make_net(rng, normalize=True, temperature=0.3, optimizer=optimizer)
    handle = net.handle(user_data, item_data, training=True)
    n = 1000
    users, items, y, w = pairs(rng, n)
    seen = np.zeros(N_USERS + 1, np.int64), np.zeros(0, np.int32)
    training = {"loss": loss, "negatives": 4 if loss != "mse" else 0, "item_prob": None, "n_items": N_ITEMS,
                "seed": 7, "seen": seen}
    losses = []
    for epoch in range(2):
        order = np.random.RandomState(epoch).permutation(n).astype(np.int64)
        loss_sum, rows, diverged, error = net.train_epoch(
            handle, [users, items], y, w, order, batch_size=batch_size, alpha=1e-3, learning_rate=0.01,
            momentum=0.9, nesterov=True, beta_1=0.9, beta_2=0.999, epsilon=1e-8, sampler=training, epoch=epoch,
            n_threads=n_threads)
        assert not diverged and error is None and rows == n
        losses.append(loss_sum / rows)
    return net, losses


@pytest.mark.parametrize("loss", ["softmax", "bpr", "bce", "mse"])
def test_training_lowers_the_loss_and_is_the_same_for_any_thread_count(loss):
    base, losses = train(0, 1, loss, batch_size=300)  # 300: more than one 256-row chunk per batch
    assert losses[1] < losses[0]
    for threads in (2, 4):
        other, _ = train(0, threads, loss, batch_size=300)
        for a, b in zip(base.arrays(), other.arrays()):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_one_step_updates_only_touched_rows_and_sgd_follows_the_oracle(rs, optimizer):
    """One batch: embedding rows outside the batch are not written (sparse updates); under "sgd" with momentum
    0 every parameter moves by exactly -learning_rate times the oracle's gradient."""
    net, user_data, item_data = make_net(rs, optimizer=optimizer)
    handle = net.handle(user_data, item_data, training=True)
    n = 16
    users, items, y, _ = pairs(rs, n)
    specs = [ref.float64_copy(t.spec(*data)) for t, data in zip(net.towers, (user_data, item_data))]
    training = {"loss": "mse", "negatives": 0, "item_prob": None, "n_items": N_ITEMS, "seed": 0}
    _, gu, gi = ref.two_tower_loss_and_gradients(*specs, False, 1.0, users, items, y, None, training, [], 0.01)
    net.train_epoch(handle, [users, items], y, None, np.arange(n, dtype=np.int64), batch_size=n, alpha=0.01,
                    learning_rate=0.05, momentum=0.0, nesterov=False, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                    sampler=training, epoch=0, n_threads=0)
    for tower, grads, spec in zip(net.towers, (gu, gi), specs):
        for f, (table, g, old) in enumerate(zip(tower.tables, grads[0], spec["fields"])):
            untouched = np.abs(g).sum(axis=1) == 0
            assert not untouched.all() and (f > 0 or untouched.any())  # 16 pairs touch few of the 30-40 ids
            np.testing.assert_array_equal(table[untouched], old["table"][untouched].astype(np.float32))
            assert not np.array_equal(table[~untouched], old["table"][~untouched].astype(np.float32))
            if optimizer == "sgd":
                np.testing.assert_allclose(table, old["table"] - 0.05 * g, rtol=1e-4, atol=1e-6)
        if optimizer == "sgd":
            for W, g, old in zip(tower.coefs, grads[1], spec["coefs"]):
                np.testing.assert_allclose(W, old - 0.05 * g, rtol=1e-4, atol=1e-6)


def test_bad_input_is_refused(rs):
    net, user_data, item_data = make_net(rs)
    handle = net.handle(user_data, item_data)
    users, items, y, _ = pairs(rs, 8)
    training = {"loss": "softmax", "negatives": 0, "item_prob": None, "n_items": N_ITEMS, "seed": 0}
    none = np.zeros(0, np.int32)
    with pytest.raises(ValueError, match="loss must be"):
        handle.loss_and_gradients(users, items, y, None, {**training, "loss": "hinge"}, none, 0.0)
    with pytest.raises(ValueError, match="key column 0"):
        handle.loss_and_gradients(users, items + N_ITEMS, y, None, training, none, 0.0)
    with pytest.raises(ValueError, match="same length"):
        handle.loss_and_gradients(users[:3], items, y, None, training, none, 0.0)
    with pytest.raises(ValueError, match="negatives must hold"):
        handle.loss_and_gradients(users, items, y, None, training, np.zeros(2, np.int32), 0.0)
    with pytest.raises(ValueError, match="item_prob"):
        handle.loss_and_gradients(users, items, y, None, {**training, "item_prob": np.full(N_ITEMS, 2, np.float32)},
                                  none, 0.0)
    with pytest.raises(ValueError, match="prediction only"):
        net.train_epoch(handle, [users, items], y, None, np.arange(8, dtype=np.int64), batch_size=4, alpha=0.0,
                        learning_rate=0.1, momentum=0.0, nesterov=False, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                        sampler=training, epoch=0, n_threads=0)
    with pytest.raises(ValueError, match="temperature"):
        net.temperature = 0.0
        net.handle(user_data, item_data)
