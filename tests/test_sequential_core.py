"""The sequential model's core (cpp/sequential.cpp, _core.SequentialModel) against the NumPy oracle
(fastrec.reference.sequential_forward / sequential_loss_and_gradients).

Tolerance: the core runs in float32 and the oracle in float64 on the same float32 parameters. Relative errors
of a few 1e-7 are float32 rounding over sums of tens of terms (layer norms, softmaxes, GEMMs over the
batch's rows), so 1e-4 (relative to the largest entry of the array compared) has a wide margin and still
catches any wrong or missing term, which shows up as an error of order 1. One gradient is exactly zero in
exact arithmetic: a key bias shifts every score of a softmax row equally, so bk's gradient is rounding noise
and is compared on the scale of Wk's gradient instead.
"""

import numpy as np
import pytest

from fastrec import _core
from fastrec import reference as ref

N_ITEMS = 25


def make_params(rng, n_items=N_ITEMS, d=16, L=7, heads=2, n_blocks=2, f=24, scale=0.3):
    p = {"item_table": rng.normal(0, scale, (n_items, d)).astype(np.float32),
         "position_table": rng.normal(0, scale, (L, d)).astype(np.float32), "heads": heads, "blocks": [],
         "final_gamma": (1 + rng.normal(0, 0.1, d)).astype(np.float32),
         "final_beta": rng.normal(0, 0.1, d).astype(np.float32)}
    for _ in range(n_blocks):
        blk = {}
        for k in ref.SEQ_BLOCK_KEYS:
            shape = {"W1": (d, f), "b1": (f,), "W2": (f, d)}.get(k, (d, d) if k.startswith("W") else (d,))
            v = rng.normal(0, scale, shape)
            blk[k] = (1 + 0.3 * v if k.endswith("gamma") else v).astype(np.float32)
        p["blocks"].append(blk)
    return p


def arrays(p):
    """(name, array) of every parameter-shaped array of a params / grads dict."""
    out = [(k, p[k]) for k in ("item_table", "position_table", "final_gamma", "final_beta")]
    for b, blk in enumerate(p["blocks"]):
        out += [(f"blocks[{b}].{k}", blk[k]) for k in ref.SEQ_BLOCK_KEYS]
    return out


def copy_params(p):
    out = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    out["blocks"] = [{k: v.copy() for k, v in blk.items()} for blk in p["blocks"]]
    return out


def zeros_state(p):
    s = {k: np.zeros_like(v) for k, v in p.items() if isinstance(v, np.ndarray)}
    s["blocks"] = [{k: np.zeros_like(v) for k, v in blk.items()} for blk in p["blocks"]]
    return s


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_grads_close(g, gr, tol=1e-4):
    for (name, a), (_, b) in zip(arrays(g), arrays(gr)):
        assert a.shape == b.shape, name
        if name.endswith(".bk"):  # exactly zero in exact arithmetic (see the module docstring)
            wk = dict(arrays(gr))[name[:-2] + "Wk"]
            assert np.max(np.abs(a - b)) < tol * np.max(np.abs(wk)), name
        else:
            assert rel_err(a, b) < tol, (name, rel_err(a, b))


def batch(rng, B, L, K, n_items=N_ITEMS, padding=True):
    """Left-padded sequences (some empty, one full), targets at events, K negatives per position."""
    seqs = rng.integers(0, n_items, (B, L)).astype(np.int32)
    if padding:
        for s in range(B):
            seqs[s, :rng.integers(0, L + 1)] = -1
        seqs[0] = rng.integers(0, n_items, L)
        seqs[-1] = -1
    targets = rng.integers(0, n_items, (B, L)).astype(np.int32)
    targets[seqs < 0] = -1
    negatives = rng.integers(0, n_items, (B, L, K)).astype(np.int32)
    return seqs, targets, negatives


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_forward_matches_oracle(heads):
    rng = np.random.default_rng(heads)
    p = make_params(rng, heads=heads)
    m = _core.SequentialModel(p)
    seqs, _, _ = batch(rng, 9, 7, 1)
    seqs[3, -2:] = -1  # trailing padding: the last slot's state is final_beta
    z = m.forward(seqs, False, 1, "auto")
    zr = ref.sequential_forward(ref.float64_copy(p), seqs)
    assert z.shape == (9, 7, 16) and z.dtype == np.float32
    assert rel_err(z, zr) < 1e-4
    last = m.forward(seqs, True, 1, "auto")  # computes the last block for the last rows only: the same bits
    assert last.shape == (9, 16)
    np.testing.assert_array_equal(last, z[:, -1])
    # a padding slot's state is final_beta (its input to the final norm is zero)
    np.testing.assert_array_equal(z[-1], np.broadcast_to(p["final_beta"], (7, 16)))


def test_forward_zero_blocks_and_long_batches():
    rng = np.random.default_rng(1)
    p = make_params(rng, n_blocks=0)
    seqs, _, _ = batch(rng, 5, 7, 1)
    assert rel_err(_core.SequentialModel(p).forward(seqs), ref.sequential_forward(ref.float64_copy(p), seqs)) < 1e-4
    # more sequences than one forward chunk (8192 slots): the same rows whatever the chunk
    p = make_params(rng, n_blocks=1)
    m = _core.SequentialModel(p)
    seqs, _, _ = batch(rng, 2000, 7, 1)
    full = m.forward(seqs, False, 1, "auto")
    np.testing.assert_array_equal(full[1500:1510], m.forward(seqs[1500:1510], False, 1, "auto"))
    np.testing.assert_array_equal(m.forward(seqs, True, 1, "auto"), full[:, -1])
    assert m.forward(seqs[:0]).shape == (0, 7, 16)


@pytest.mark.parametrize("dropout,K,heads", [(0.0, 1, 1), (0.0, 3, 2), (0.3, 2, 2), (0.5, 1, 4), (0.0, 0, 2)])
def test_loss_and_gradients_match_oracle(dropout, K, heads):
    rng = np.random.default_rng(int(10 * dropout) + K + heads)
    # few items: duplicates within a sequence, across the batch and between inputs, targets and negatives
    p = make_params(rng, n_items=11, heads=heads)
    seqs, targets, negatives = batch(rng, 8, 7, K, n_items=11)
    targets[2, -1] = -1  # a position without a target
    m = _core.SequentialModel(p)
    loss, g = m.loss_and_gradients(seqs, targets, negatives, dropout, 12345, 1, "auto")
    loss_r, gr = ref.sequential_loss_and_gradients(ref.float64_copy(p), seqs, targets, negatives, dropout, 12345)
    assert abs(loss - loss_r) < 1e-5 * abs(loss_r)
    assert_grads_close(g, gr)
    # the dropout masks are the oracle's: another stream gives another loss
    if dropout:
        other = m.loss_and_gradients(seqs, targets, negatives, dropout, 54321, 1, "auto")[0]
        assert abs(other - loss) > 1e-3


@pytest.mark.parametrize("isa", _core.available_isas())
@pytest.mark.parametrize("d,heads", [(64, 1), (48, 2)])
def test_long_sequences_match_oracle_for_every_isa(isa, d, heads):
    """The fused attention kernels at the benchmark's shapes: 50 slots (several 16-column groups and 4-row
    tiles, every length from 0 to 50), head width 64 (read in place) and 24 (through zero-padded tiles), on
    every compiled ISA; last_only gives the full pass's bits."""
    rng = np.random.default_rng(d + heads)
    p = make_params(rng, n_items=40, d=d, L=50, heads=heads, f=32, scale=0.2)
    seqs, targets, negatives = batch(rng, 12, 50, 1, n_items=40)
    for s in range(1, 11):  # lengths around the tile edges
        seqs[s, :50 - (4 * s + (s % 3))] = -1
    targets[seqs < 0] = -1
    m = _core.SequentialModel(p)
    z = m.forward(seqs, False, 1, isa)
    assert rel_err(z, ref.sequential_forward(ref.float64_copy(p), seqs)) < 1e-4
    np.testing.assert_array_equal(m.forward(seqs, True, 1, isa), z[:, -1])
    loss, g = m.loss_and_gradients(seqs, targets, negatives, 0.2, 99, 1, isa)
    loss_r, gr = ref.sequential_loss_and_gradients(ref.float64_copy(p), seqs, targets, negatives, 0.2, 99)
    assert abs(loss - loss_r) < 1e-5 * abs(loss_r)
    assert_grads_close(g, gr)


@pytest.mark.parametrize("dropout,with_log_q", [(0.0, False), (0.3, True)])
def test_softmax_loss_and_gradients_match_oracle(dropout, with_log_q):
    """negatives None: the sampled softmax over the batch's distinct targets (repeated targets included)."""
    rng = np.random.default_rng(20 + int(with_log_q))
    p = make_params(rng, n_items=11, heads=2)
    seqs, targets, _ = batch(rng, 8, 7, 1, n_items=11)
    targets[1, 2] = 4  # a target at a padding slot
    seqs[1, :3] = -1
    log_q = rng.normal(0, 1, 11).astype(np.float32) if with_log_q else None
    m = _core.SequentialModel(p)
    loss, g = m.loss_and_gradients(seqs, targets, None, dropout, 77, 1, "auto", log_q)
    loss_r, gr = ref.sequential_loss_and_gradients(ref.float64_copy(p), seqs, targets, None, dropout, 77,
                                                   log_q=None if log_q is None else log_q.astype(np.float64))
    assert abs(loss - loss_r) < 1e-5 * abs(loss_r)
    assert_grads_close(g, gr)


def test_softmax_epoch_matches_oracle():
    """training["loss"] = "softmax": no negatives drawn, log_q[c] = log(N item_prob[c]) for the batch's N
    target positions; plain SGD steps against the oracle on the hook's batches (tolerance as the BCE epoch)."""
    rng = np.random.default_rng(23)
    p = make_params(rng)
    p0 = copy_params(p)
    m = _core.SequentialModel(p, True)
    indptr, items, seen = histories(rng, 10, N_ITEMS)
    order = np.arange(10, dtype=np.int64)
    prob = rng.dirichlet(np.ones(N_ITEMS)).astype(np.float32)
    tr = {**training(seen), "loss": "softmax", "item_prob": prob}
    lr = 0.05
    out = m.train_epoch(None, None, indptr, items, order, 6, tr, 0.1, "sgd", lr, 0.9, 0.999, 1e-8, 0, 0, 1, "auto")
    pr = ref.float64_copy(p0)
    want_rows = 0
    for seqs, targets, negatives, stream in m.epoch_batches(indptr, items, order, 6, tr, 0):
        assert negatives.shape[2] == 0
        n = int((targets >= 0).sum())
        want_rows += n
        log_q = np.log(n * prob.astype(np.float64))
        _, g = ref.sequential_loss_and_gradients(pr, seqs, targets, None, 0.1, stream, log_q=log_q)
        for (_, a), (_, ga) in zip(arrays(pr), arrays(g)):
            a -= lr * ga
    assert out[2] == want_rows and not out[3]
    for (name, a), (_, a0), (_, b) in zip(arrays(p), arrays(p0), arrays(pr)):
        change, want = a.astype(np.float64) - a0, b - a0
        assert np.max(np.abs(change - want)) <= 1e-3 * max(np.max(np.abs(want)), 1e-6), name


def test_target_at_a_padding_slot_matches_oracle():
    """The contract allows a target where the input is padding: z is final_beta there."""
    rng = np.random.default_rng(5)
    p = make_params(rng)
    seqs, targets, negatives = batch(rng, 4, 7, 2)
    seqs[1, :4] = -1
    targets[1, 2] = 3
    m = _core.SequentialModel(p)
    loss, g = m.loss_and_gradients(seqs, targets, negatives, 0.0, 0, 1, "auto")
    loss_r, gr = ref.sequential_loss_and_gradients(ref.float64_copy(p), seqs, targets, negatives)
    assert abs(loss - loss_r) < 1e-5 * abs(loss_r)
    assert_grads_close(g, gr)


def test_no_targets_gives_zero_loss_and_gradients():
    rng = np.random.default_rng(6)
    p = make_params(rng)
    seqs, targets, negatives = batch(rng, 3, 7, 1)
    loss, g = _core.SequentialModel(p).loss_and_gradients(seqs, np.full_like(targets, -1), negatives)
    assert loss == 0.0
    for name, a in arrays(g):
        assert not a.any(), name


def test_causal_masking_is_bitwise():
    """Changing a later item (or padding it) leaves every earlier output bitwise unchanged."""
    rng = np.random.default_rng(7)
    p = make_params(rng, L=9, heads=2)
    m = _core.SequentialModel(p)
    seqs, _, _ = batch(rng, 6, 9, 1, padding=False)
    z = m.forward(seqs, False, 1, "auto")
    for t in (3, 6):
        changed = seqs.copy()
        changed[:, t] = (changed[:, t] + 5) % N_ITEMS
        changed[1, t:] = -1
        z2 = m.forward(changed, False, 1, "auto")
        np.testing.assert_array_equal(z2[:, :t], z[:, :t])
        assert not np.array_equal(z2[:, t], z[:, t])


def threads_params(rng):
    # enough rows (~1900 events) and width for the row passes and GEMMs to split over threads
    return make_params(rng, n_items=200, d=32, L=20, heads=2, f=64)


def test_deterministic_across_thread_counts():
    rng = np.random.default_rng(8)
    p = threads_params(rng)
    m = _core.SequentialModel(p)
    seqs, targets, negatives = batch(rng, 192, 20, 2, n_items=200)
    z1 = m.forward(seqs, False, 1, "auto")
    np.testing.assert_array_equal(m.forward(seqs, True, 1, "auto"), z1[:, -1])
    l1, g1 = m.loss_and_gradients(seqs, targets, negatives, 0.2, 9, 1, "auto")
    for n in (2, 3):
        np.testing.assert_array_equal(m.forward(seqs, False, n, "auto"), z1)
        np.testing.assert_array_equal(m.forward(seqs, True, n, "auto"), z1[:, -1])
        ln, gn = m.loss_and_gradients(seqs, targets, negatives, 0.2, 9, n, "auto")
        assert ln == l1
        for (name, a), (_, b) in zip(arrays(gn), arrays(g1)):
            np.testing.assert_array_equal(a, b, err_msg=name)


# ---- training ----

def histories(rng, n_users, n_items, lengths=(0, 1, 2, 5, 12, 20)):
    """Time-ordered CSR histories (distinct items per user) and the seen lists (sorted)."""
    rows = [rng.choice(n_items, size=min(lengths[u % len(lengths)], n_items), replace=False) for u in range(n_users)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    items = np.concatenate(rows).astype(np.int32)
    seen = np.concatenate([np.sort(r) for r in rows]).astype(np.int32)
    return indptr, items, (indptr.copy(), seen)


def training(seen, negatives=2, n_items=N_ITEMS, seed=3):
    return {"negatives": negatives, "n_items": n_items, "seed": seed, "seen": seen}


def test_epoch_batches_build_histories_and_sample_unseen_negatives():
    rng = np.random.default_rng(9)
    L = 7
    p = make_params(rng, L=L)
    m = _core.SequentialModel(p, True)
    indptr, items, seen = histories(rng, 18, N_ITEMS)
    order = rng.permutation(18).astype(np.int64)
    tr = training(seen, negatives=3)
    batches = m.epoch_batches(indptr, items, order, 5, tr, 0)
    assert [len(b[0]) for b in batches] == [5, 5, 5, 3]
    users = order.reshape(-1).tolist()
    drawn = []
    for bi, (seqs, targets, negatives, stream) in enumerate(batches):
        assert seqs.shape[1] == L and negatives.shape[2] == 3
        for i, u in enumerate(users[5 * bi:5 * bi + len(seqs)]):
            h = items[indptr[u]:indptr[u + 1]][-(L + 1):]
            want_s = np.full(L, -1)
            want_t = np.full(L, -1)
            if len(h) >= 2:
                want_s[L - len(h) + 1:] = h[:-1]
                want_t[L - len(h) + 1:] = h[1:]
            np.testing.assert_array_equal(seqs[i], want_s)
            np.testing.assert_array_equal(targets[i], want_t)
            neg = negatives[i][targets[i] >= 0]
            assert (negatives[i][targets[i] < 0] == -1).all()
            assert ((neg >= 0) & (neg < N_ITEMS)).all()
            assert not np.isin(neg, items[indptr[u]:indptr[u + 1]]).any()  # never a seen item
            drawn.append(neg.ravel())
    drawn = np.concatenate(drawn)
    assert len(np.unique(drawn)) > N_ITEMS // 2  # spread over the items, not a few
    assert len({b[3] for b in batches}) == len(batches)  # a dropout stream per batch
    again = m.epoch_batches(indptr, items, order, 5, tr, 0)
    other = m.epoch_batches(indptr, items, order, 5, tr, 1)
    for a, b, c in zip(batches, again, other):
        np.testing.assert_array_equal(a[2], b[2])
        assert a[3] == b[3]
    assert any(not np.array_equal(a[2], c[2]) for a, c in zip(batches, other))


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_sgd_epoch_matches_oracle(dropout):
    """Two batches of plain SGD: each step is the oracle's gradient (on the batches the hook returns, with
    their dropout streams) times the learning rate. Compared on the parameter change, whose float32
    rounding (of p + change) is ~1e-7 |p|: 1e-3 of the change's scale."""
    rng = np.random.default_rng(10)
    p = make_params(rng)
    p0 = copy_params(p)
    m = _core.SequentialModel(p, True)
    indptr, items, seen = histories(rng, 10, N_ITEMS)
    order = np.arange(10, dtype=np.int64)
    tr = training(seen)
    lr = 0.05
    loss_sum, adam_t, rows, diverged, error = m.train_epoch(None, None, indptr, items, order, 6, tr, dropout, "sgd",
                                                            lr, 0.9, 0.999, 1e-8, 0, 0, 1, "auto")
    assert (adam_t, diverged, error) == (0, False, None)
    pr = ref.float64_copy(p0)
    want_sum, want_rows = 0.0, 0
    for seqs, targets, negatives, stream in m.epoch_batches(indptr, items, order, 6, tr, 0):
        loss, g = ref.sequential_loss_and_gradients(pr, seqs, targets, negatives, dropout, stream)
        n = int((targets >= 0).sum())
        want_sum += loss * n
        want_rows += n
        for (_, a), (_, ga) in zip(arrays(pr), arrays(g)):
            a -= lr * ga
    assert rows == want_rows
    assert abs(loss_sum - want_sum) < 1e-5 * want_sum
    for (name, a), (_, a0), (_, b) in zip(arrays(p), arrays(p0), arrays(pr)):
        change, want = a.astype(np.float64) - a0, b - a0
        assert np.max(np.abs(change - want)) <= 1e-3 * max(np.max(np.abs(want)), 1e-6), name


def test_adam_steps_are_core_gradients_plus_reference_adam():
    """Adam on dense arrays, lazy Adam on the touched item rows, one step counter: each step (a one-batch
    train_epoch) equals reference.adam_update applied to the core's own gradients (checked against the oracle
    above) of the batch the hook returns, to float32 rounding of the update (1e-6 of the parameters' scale: the
    kernel may fuse multiply-adds). The reference copy is re-synchronised after each step: a gradient that is
    rounding noise (bk's, see the module docstring) would otherwise get a different O(lr) Adam step from the
    next step's slightly different parameters. Untouched item rows and their moments stay bitwise unchanged."""
    rng = np.random.default_rng(11)
    n_items = 60
    p = make_params(rng, n_items=n_items)
    p_start = copy_params(p)
    m = _core.SequentialModel(p, True)
    s1, s2 = zeros_state(p), zeros_state(p)
    indptr, items, seen = histories(rng, 8, n_items, lengths=(3, 6, 1, 9))
    order = np.array([5, 1, 3, 0, 7, 2, 6, 4], np.int64)
    tr = training(seen, n_items=n_items)
    lr, b1, b2, eps = 0.01, 0.9, 0.98, 1e-8
    touched = np.zeros(n_items, bool)
    t = 7
    for epoch, users in enumerate((order[:4], order[4:])):
        p_ref, r1, r2 = copy_params(p), copy_params(s1), copy_params(s2)
        out = m.train_epoch(s1, s2, indptr, items, users, 4, tr, 0.1, "adam", lr, b1, b2, eps, t, epoch, 1, "auto")
        assert out[1] == t + 1 and not out[3]
        t += 1
        [(seqs, targets, negatives, stream)] = m.epoch_batches(indptr, items, users, 4, tr, epoch)
        _, g = _core.SequentialModel(p_ref).loss_and_gradients(seqs, targets, negatives, 0.1, stream, 1, "auto")
        rows = np.unique(np.concatenate([seqs[seqs >= 0], targets[targets >= 0], negatives[targets >= 0].ravel()]))
        touched[rows] = True
        for (name, a), (_, ga), (_, m1), (_, m2) in zip(arrays(p_ref), arrays(g), arrays(r1), arrays(r2)):
            if name == "item_table":
                pa, pm, ps = a[rows], m1[rows], m2[rows]
                ref.adam_update(pa, ga[rows], pm, ps, t, lr, b1, b2, eps)
                a[rows], m1[rows], m2[rows] = pa, pm, ps
            else:
                ref.adam_update(a, ga, m1, m2, t, lr, b1, b2, eps)
        for (name, a), (_, b) in zip(arrays(p), arrays(p_ref)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, np.max(np.abs(b))), err_msg=name)
        for (name, a), (_, b) in zip(arrays(s1) + arrays(s2), arrays(r1) + arrays(r2)):
            # a moment's rounding is relative to its terms, not to its value (fused vs separate multiply-adds)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.max(np.abs(b)), err_msg=name)
    assert not touched.all()
    np.testing.assert_array_equal(p["item_table"][~touched], p_start["item_table"][~touched])
    assert not s1["item_table"][~touched].any() and not s2["item_table"][~touched].any()


def test_train_epoch_deterministic_across_thread_counts():
    rng = np.random.default_rng(12)
    p0 = threads_params(rng)
    indptr, items, seen = histories(rng, 150, 200, lengths=(25, 3, 40, 30))
    order = rng.permutation(150).astype(np.int64)
    results = []
    for n in (1, 2, 3):
        p = copy_params(p0)
        s1, s2 = zeros_state(p), zeros_state(p)
        m = _core.SequentialModel(p, True)
        out = m.train_epoch(s1, s2, indptr, items, order, 50, training(seen, n_items=200), 0.2, "adam", 1e-3, 0.9,
                            0.98, 1e-8, 0, 3, n, "auto")
        results.append((out[:4], p, s1, s2))
    for out, p, s1, s2 in results[1:]:
        assert out == results[0][0]
        for d, d0 in zip((p, s1, s2), results[0][1:]):
            for (name, a), (_, b) in zip(arrays(d), arrays(d0)):
                np.testing.assert_array_equal(a, b, err_msg=name)


def test_training_learns_a_planted_sequence():
    """Every user walks the items in a fixed cycle from a random start: after training, the model's state after
    a history ranks the next item of the cycle first among the items the user has not seen."""
    rng = np.random.default_rng(13)
    n_items, L, n_users = 30, 8, 200
    cycle = rng.permutation(n_items)
    nxt = np.empty(n_items, np.int64)
    nxt[cycle] = np.roll(cycle, -1)
    rows = []
    for u in range(n_users):
        start = rng.integers(n_items)
        pos = np.flatnonzero(cycle == start)[0]
        rows.append(cycle[(pos + np.arange(rng.integers(4, 12))) % n_items])
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    items = np.concatenate(rows).astype(np.int32)
    seen = (indptr, np.concatenate([np.sort(r) for r in rows]).astype(np.int32))
    p = make_params(rng, n_items=n_items, d=16, L=L, heads=1, n_blocks=1, f=32, scale=0.1)
    s1, s2 = zeros_state(p), zeros_state(p)
    m = _core.SequentialModel(p, True)
    tr = training(seen, negatives=2, n_items=n_items)
    t, losses = 0, []
    for epoch in range(40):
        order = rng.permutation(n_users).astype(np.int64)
        loss_sum, t, rows_, diverged, _ = m.train_epoch(s1, s2, indptr, items, order, 32, tr, 0.1, "adam", 0.01, 0.9,
                                                        0.98, 1e-8, t, epoch, 1, "auto")
        assert not diverged
        losses.append(loss_sum / rows_)
    assert losses[-1] < 0.5 * losses[0]
    seqs = np.full((n_users, L), -1, np.int32)
    for u, r in enumerate(rows):
        seqs[u, L - min(len(r), L):] = r[-L:]
    scores = m.forward(seqs, True, 1, "auto") @ p["item_table"].T
    for u, r in enumerate(rows):  # seen items excluded, as the recommender does (they are never negatives)
        scores[u, r] = -np.inf
    top = np.argmax(scores, axis=1)
    last = np.array([r[-1] for r in rows])
    assert np.mean(top == nxt[last]) > 0.8


# ---- errors ----

def test_bad_params_raise_value_errors():
    rng = np.random.default_rng(14)
    p = make_params(rng)
    q = copy_params(p)
    q["blocks"][1]["W2"] = q["blocks"][1]["W2"][:, :5].copy()
    with pytest.raises(ValueError, match=r"\['blocks'\]\[1\]\['W2'\]"):
        _core.SequentialModel(q)
    q = copy_params(p)
    q["heads"] = 3
    with pytest.raises(ValueError, match="heads"):
        _core.SequentialModel(q)
    q = copy_params(p)
    del q["final_beta"]
    with pytest.raises(ValueError, match="final_beta"):
        _core.SequentialModel(q)
    q = copy_params(p)
    q["position_table"] = np.asfortranarray(np.zeros((7, 16), np.float32)[:, :8].repeat(2, 1))
    with pytest.raises(ValueError, match="position_table"):
        _core.SequentialModel(q)
    q = copy_params(p)
    q["blocks"][0]["bq"] = q["blocks"][0]["bq"].astype(np.float64)
    with pytest.raises(TypeError, match="bq"):
        _core.SequentialModel(q)


def test_bad_inputs_raise_value_errors():
    rng = np.random.default_rng(15)
    p = make_params(rng)
    m = _core.SequentialModel(p, True)
    seqs, targets, negatives = batch(rng, 3, 7, 2)
    bad = seqs.copy()
    bad[0, 3] = N_ITEMS
    with pytest.raises(ValueError, match="seqs"):
        m.forward(bad)
    with pytest.raises(ValueError, match="seqs"):
        m.forward(seqs[:, :5].copy())
    bad = negatives.copy()
    bad[0, -1, 1] = -1
    with pytest.raises(ValueError, match="negatives"):
        m.loss_and_gradients(seqs, targets, bad)
    with pytest.raises(ValueError, match="negatives"):
        m.loss_and_gradients(seqs, targets, negatives[:2].copy())
    with pytest.raises(ValueError, match="dropout"):
        m.loss_and_gradients(seqs, targets, negatives, 1.0)
    indptr, items, seen = histories(rng, 6, N_ITEMS)
    order = np.arange(6, dtype=np.int64)
    s1, s2 = zeros_state(p), zeros_state(p)
    args = dict(state1=s1, state2=s2, indptr=indptr, items=items, order=order, batch_size=4, training=training(seen),
                dropout=0.0, solver="adam", learning_rate=1e-3, beta_1=0.9, beta_2=0.98, epsilon=1e-8, adam_t=0,
                epoch=0)
    for key, value, match in [("order", np.array([0, 6], np.int64), "order"),
                              ("items", np.full_like(items, N_ITEMS), "items"),
                              ("indptr", indptr[::-1].copy(), "indptr"),
                              ("solver", "adagrad", "solver"),
                              ("batch_size", 0, "batch_size"),
                              ("training", training(seen, n_items=N_ITEMS + 1), "n_items"),
                              ("training", training((seen[0][:3], seen[1]), n_items=N_ITEMS), "seen")]:
        with pytest.raises(ValueError, match=match):
            m.train_epoch(**{**args, key: value})
    s_bad = zeros_state(p)
    s_bad["blocks"][0]["W1"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"state2\['blocks'\]\[0\]\['W1'\]"):
        m.train_epoch(**{**args, "state2": s_bad})
    with pytest.raises(ValueError, match="prediction only"):
        _core.SequentialModel(p, False).train_epoch(**args)
    # nothing was trained by the failed calls
    np.testing.assert_array_equal(p["item_table"], make_params(np.random.default_rng(15))["item_table"])
