"""The field model's core (fastrec._core.field_*) against fastrec.reference (float64), once per SIMD path,
plus the properties the oracle cannot check: lazy updates, negative sampling, top-k, determinism, bad input.

Tolerance: the core computes in float32 with its own summation order; every value carries float32 rounding
(~6e-8 per operation, growing ~ sqrt(K) over K-term sums), well under 1e-6 of the array's scale at these
sizes.  The bar is the issue's 1e-4 with `rel_err` = max|a - b| / max|b| (the array's scale, so entries that
cancel to ~0 do not blow up the ratio), also after 5 optimizer steps where errors compound.  Because a
table's scale hides a wrong *update* (lr * G is much smaller than the table), training also compares the
change of every parameter array against the oracle's change: see `assert_update_matches`.
"""

import numpy as np
import pytest

from fastrec import _core, reference

BAR = 1e-4
F32_EPS = float(np.finfo(np.float32).eps)  # 2^-23


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    return np.abs(a - b).max(initial=0.0) / scale


def float_arrays(spec):
    """Every parameter/state array of a spec, in a fixed order, with a name (for messages)."""
    out = [(f"coefs[{i}]", a) for i, a in enumerate(spec["coefs"])]
    out += [(f"intercepts[{i}]", a) for i, a in enumerate(spec["intercepts"])]
    out += [(f"state1[{i}]", a) for i, a in enumerate(spec["state1"])]
    out += [(f"state2[{i}]", a) for i, a in enumerate(spec["state2"])]
    for i, f in enumerate(spec["fields"]):
        out.append((f"fields[{i}].table", f["table"]))
        for s in ("state1", "state2"):
            if f.get(s) is not None:
                out.append((f"fields[{i}].{s}", f[s]))
    if spec.get("gmf") is not None:
        for s in ("w", "state1", "state2"):
            if spec["gmf"].get(s) is not None:
                out.append((f"gmf.{s}", spec["gmf"][s]))
    return out


def spec_bytes(spec):
    return b"".join(a.tobytes() for _, a in float_arrays(spec))


# ------------------------------------------------------------------------------------------ model builders


def one_hot_bags(rows):
    """Bag q = [(q, 1.0)]: a one-id-per-row field."""
    return (np.arange(rows + 1, dtype=np.int64), np.arange(rows, dtype=np.int32), np.ones(rows, np.float32))


def multi_hot_bags(rng, rows, vocab, max_len=4):
    """Bags of 0..max_len (id, weight) pairs: every 4th bag empty, every odd bag with >= 2 entries repeats its
    first id at its end (a duplicate id within a bag), ids drawn with replacement from a small vocabulary
    (duplicates across the batch), weights of both signs."""
    counts = rng.integers(1, max_len + 1, rows)
    counts[::4] = 0
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ids = rng.integers(0, vocab, int(indptr[-1])).astype(np.int32)
    for q in range(1, rows, 2):
        if counts[q] >= 2:
            ids[indptr[q + 1] - 1] = ids[indptr[q]]
    weights = rng.uniform(-1.0, 1.5, int(indptr[-1])).astype(np.float32)
    return indptr, ids, weights


def table(rng, vocab, dim, scale=0.5):
    return (rng.standard_normal((vocab, dim)) * scale).astype(np.float32)


def make_spec(rng, fields, dense, gmf, loss, activation, hidden, n_keys, optimizer="sgd"):
    """A spec from field tuples (table, bags, key, feeds_mlp) and dense tuples (table, key); gmf is None or
    (field_u, field_v) naming two fields with feeds_mlp False.  Offsets: fields first, then dense blocks."""
    offset = 0
    spec_fields = []
    for E, bags, key, feeds_mlp in fields:
        f = {"table": E, "bags": bags, "key": key, "offset": offset if feeds_mlp else -1}
        offset += E.shape[1] if feeds_mlp else 0
        spec_fields.append(f)
    spec_dense = []
    for T, key in dense:
        spec_dense.append({"table": T, "key": key, "offset": offset})
        offset += T.shape[1]
    sizes = [offset, *hidden, 1]
    coefs = [(rng.standard_normal((a, b)) * 0.8 / np.sqrt(a)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
    intercepts = [(rng.standard_normal(b) * 0.1).astype(np.float32) for b in sizes[1:]]
    spec = {"n_keys": n_keys, "width": offset, "loss": loss, "activation": activation, "coefs": coefs,
            "intercepts": intercepts, "state1": [], "state2": [], "fields": spec_fields, "dense": spec_dense,
            "gmf": None}
    if gmf is not None:
        d = fields[gmf[0]][0].shape[1]
        spec["gmf"] = {"field_u": gmf[0], "field_v": gmf[1], "w": (rng.standard_normal(d) * 0.5).astype(np.float32)}
    set_state(spec, optimizer)
    return spec


def set_state(spec, optimizer):
    """Optimizer state for every parameter.  Adagrad accumulators start at 0.1 (TF's initial_accumulator_value)
    and Adam's second moments at 1e-4: with zero state the first step is lr * sign(G), which turns a gradient
    entry that is ~0 up to float32 rounding into a full +-lr step of random sign, so the comparison with the
    oracle would test rounding noise; a positive start keeps the step a smooth function of G."""
    params = spec["coefs"] + spec["intercepts"]
    s1_init = {"sgd": 0.0, "adagrad": 0.1, "adam": 0.0}[optimizer]
    spec["state1"] = [np.full_like(p, s1_init) for p in params]
    spec["state2"] = [np.full_like(p, 1e-4) for p in params] if optimizer == "adam" else []
    for f in spec["fields"]:
        V, d = f["table"].shape
        f["state_kind"] = {"sgd": "none", "adagrad": "row", "adam": "full"}[optimizer]
        f["state1"] = {"sgd": None, "adagrad": np.full(V, 0.1, np.float32),
                       "adam": np.zeros((V, d), np.float32)}[optimizer]
        f["state2"] = np.full((V, d), 1e-4, np.float32) if optimizer == "adam" else None
    if spec["gmf"] is not None:
        w = spec["gmf"]["w"]
        spec["gmf"]["state1"] = np.full_like(w, s1_init)
        spec["gmf"]["state2"] = np.full_like(w, 1e-4) if optimizer == "adam" else None


def two_key_model(rng, gmf, loss, activation="relu", optimizer="sgd", n=60):
    """Recommender layout: key 0 = user (23 users), key 1 = item (41 items); user and item id fields, multi-hot
    user and item fields of dims 1, 7, 16, 33, 64, a dense block per key; GMF over separate user/item tables."""
    U, I = 23, 41
    fields = [
        (table(rng, U, 16), one_hot_bags(U), 0, True),
        (table(rng, 37, 7), multi_hot_bags(rng, U, 37), 0, True),
        (table(rng, I, 33), one_hot_bags(I), 1, True),
        (table(rng, 11, 1), multi_hot_bags(rng, I, 11), 1, True),
        (table(rng, 29, 64, 0.2), multi_hot_bags(rng, I, 29, 6), 1, True),
    ]
    if gmf:
        fields += [(table(rng, U, 8), one_hot_bags(U), 0, False), (table(rng, I, 8), one_hot_bags(I), 1, False)]
    dense = [(rng.standard_normal((I, 5)).astype(np.float32), 1), (rng.standard_normal((U, 3)).astype(np.float32), 0)]
    spec = make_spec(rng, fields, dense, (5, 6) if gmf else None, loss, activation, (17, 9), 2, optimizer)
    keys = [rng.integers(0, U, n).astype(np.int32), rng.integers(0, I, n).astype(np.int32)]
    return spec, keys


def ctr_model(rng, gmf, loss, activation="tanh", optimizer="sgd", n=50):
    """Click-through layout: one key column arange(n); every field is a multi-hot bag table with one bag per
    example (dims 1, 7, 16, 33, 64; the dim-16 field has a 9-id vocabulary, so ids repeat across the batch)."""
    fields = [
        (table(rng, 13, 1), multi_hot_bags(rng, n, 13), 0, True),
        (table(rng, 20, 7), multi_hot_bags(rng, n, 20), 0, True),
        (table(rng, 9, 16), multi_hot_bags(rng, n, 9, 5), 0, True),
        (table(rng, 40, 33), multi_hot_bags(rng, n, 40), 0, True),
        (table(rng, 30, 64, 0.2), multi_hot_bags(rng, n, 30), 0, True),
    ]
    if gmf:
        fields += [(table(rng, 15, 7), multi_hot_bags(rng, n, 15), 0, False),
                   (table(rng, 12, 7), multi_hot_bags(rng, n, 12), 0, False)]
    dense = [(rng.standard_normal((n, 4)).astype(np.float32), 0)]
    spec = make_spec(rng, fields, dense, (5, 6) if gmf else None, loss, activation, (16, 7), 1, optimizer)
    return spec, [np.arange(n, dtype=np.int32)]


def targets(rng, n, loss):
    if loss == "bce":
        return (rng.random(n) < 0.4).astype(np.float32)
    return rng.standard_normal(n).astype(np.float32)


def dense_first_model(rng, gmf, loss, **kw):
    """two_key_model with the dense blocks in the first MLP input columns and the fields after them (the
    input gradient then runs up to the last field's end, over the dense columns too)."""
    spec, keys = two_key_model(rng, gmf, loss, **kw)
    shift = sum(d["table"].shape[1] for d in spec["dense"])
    start = 0
    for d in spec["dense"]:
        d["offset"], start = start, start + d["table"].shape[1]
    for f in spec["fields"]:
        if f["offset"] >= 0:
            f["offset"] += shift
    return spec, keys


LAYOUTS = {"two_key": two_key_model, "ctr": ctr_model, "dense_first": dense_first_model}


# --------------------------------------------------------------------------- predict, loss and gradients


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("loss", ["mse", "bce"])
@pytest.mark.parametrize("gmf", [False, True], ids=["mlp", "gmf"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_predict_loss_and_gradients_match_reference(isa, rng, layout, gmf, loss, weighted):
    spec, keys = LAYOUTS[layout](rng, gmf, loss)
    n = len(keys[0])
    y = targets(rng, n, loss)
    w = rng.uniform(0.2, 2.0, n).astype(np.float32) if weighted else None
    ref = reference.float64_copy(spec)

    got = _core.field_predict(spec, keys, 0, isa)
    want = reference.field_predict(ref, keys)
    assert got.shape == (n,) and got.dtype == np.float32
    assert rel_err(got, want) < BAR

    out = _core.field_loss_and_gradients(spec, keys, y, w, 0.05, 0, isa)
    w64 = None if w is None else w.astype(np.float64)
    rout = reference.field_loss_and_gradients(ref, keys, y.astype(np.float64), w64, 0.05)
    loss_v, tg, gg, gw, gb = out
    rloss, rtg, rgg, rgw, rgb = rout
    assert abs(loss_v - rloss) / abs(rloss) < BAR
    assert len(tg) == len(rtg) == len(spec["fields"])
    for i, (g, r) in enumerate(zip(tg, rtg)):
        assert g.shape == r.shape, i
        assert rel_err(g, r) < BAR, f"table_grads[{i}]"
        # zero exactly outside the touched rows, non-zero on them (alpha > 0 makes every touched row non-zero)
        assert np.array_equal(np.abs(g).sum(axis=1) > 0, np.abs(r).sum(axis=1) > 0), f"touched rows of field {i}"
    if gmf:
        assert rel_err(gg, rgg) < BAR
    else:
        assert gg is None and rgg is None
    for i, (g, r) in enumerate(zip(gw + gb, rgw + rgb)):
        assert g.shape == r.shape
        assert rel_err(g, r) < BAR, f"MLP gradient {i}"


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_loss_and_gradients_of_several_chunks_match_reference(isa, rng, loss):
    """Over 256 rows the MLP runs in row blocks of whole 256-row chunks, each block's forward pass, loss and
    backward pass on one thread; the loss, the GMF weights' gradient and the MLP's are per-chunk sums added
    in chunk order (here 3 chunks, the last one partial, with a wide field and sample weights): the same
    values as whole-batch sums to float32 rounding, and bitwise the same for 1, 2 and 3 threads."""
    n = 700
    spec, keys = two_key_model(rng, True, loss, n=n)
    spec["fields"].append({"table": table(rng, 13, 1), "bags": multi_hot_bags(rng, 41, 13), "key": 1, "offset": -1,
                           "wide": True})
    sizes = [spec["width"], 128, 64, 1]  # wide enough for one block per thread (row_blocks)
    spec["coefs"] = [(rng.standard_normal((a, b)) * 0.8 / np.sqrt(a)).astype(np.float32)
                     for a, b in zip(sizes, sizes[1:])]
    spec["intercepts"] = [(rng.standard_normal(b) * 0.1).astype(np.float32) for b in sizes[1:]]
    y = targets(rng, n, loss)
    w = rng.uniform(0.2, 2.0, n).astype(np.float32)
    rloss, rtg, rgg, rgw, rgb = reference.field_loss_and_gradients(reference.float64_copy(spec), keys,
                                                                    y.astype(np.float64), w.astype(np.float64), 0.05)
    results = []
    for threads in (1, 2, 3):
        loss_v, tg, gg, gw, gb = _core.field_loss_and_gradients(spec, keys, y, w, 0.05, threads, isa)
        assert abs(loss_v - rloss) / abs(rloss) < BAR
        for g, r in zip(tg + [gg] + gw + gb, rtg + [rgg] + rgw + rgb):
            assert rel_err(g, r) < BAR
        results.append((loss_v, b"".join(g.tobytes() for g in tg + [gg] + gw + gb)))
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("bags", ["identity", "mapped", "weighted"])
def test_id_fields_of_every_bag_shape_match_reference(isa, rng, bags):
    """An id field (one entry per bag) is gathered without reading its bag table when the entries have weight
    1 (and without reading its ids when bag q holds id q): a permuted mapping of bags to ids and a weight of
    2 take the other paths; all three match the oracle in gradients and in a training step."""
    spec, keys = two_key_model(rng, False, "bce", n=40)
    U = spec["fields"][0]["table"].shape[0]
    indptr, ids, weights = one_hot_bags(U)
    if bags != "identity":
        ids = rng.permutation(U).astype(np.int32)
    if bags == "weighted":
        weights = np.full(U, 2.0, np.float32)
    spec["fields"][0]["bags"] = (indptr, ids, weights)
    y = targets(rng, 40, "bce")
    out = _core.field_loss_and_gradients(spec, keys, y, None, 0.05, 0, isa)
    rout = reference.field_loss_and_gradients(reference.float64_copy(spec), keys, y.astype(np.float64), None, 0.05)
    assert abs(out[0] - rout[0]) / abs(rout[0]) < BAR
    for g, r in zip(out[1] + out[3] + out[4], rout[1] + rout[3] + rout[4]):
        assert rel_err(g, r) < BAR
    ref = reference.float64_copy(spec)
    args = (np.arange(40, dtype=np.int64), 40, 0.0, "sgd", 0.1, 0.0, False, 0.9, 0.999, 1e-8, 0, None, 0)
    _core.field_train_epoch(spec, keys, y, None, *args, 1, isa)
    reference.field_train_epoch(ref, keys, y.astype(np.float64), None, *args)
    assert rel_err(spec["fields"][0]["table"], ref["fields"][0]["table"]) < BAR


def test_id_field_dropout_reads_bag_zero_on_every_gather_path(rng):
    """With id dropout, a dropped example reads bag 0: the same model trained through the identity path, the
    mapped path (bag q holds id perm[q], table rows permuted to match) and the general path (an extra empty
    bag that no key reads) ends bitwise the same."""
    spec0, keys = two_key_model(rng, False, "bce", n=300)
    spec0["fields"][0]["dropout"] = 0.5
    U = spec0["fields"][0]["table"].shape[0]
    y = targets(rng, 300, "bce")
    perm = rng.permutation(U).astype(np.int32)
    perm[perm == 0], perm[0] = perm[0], 0  # bag 0 (the unknown row) keeps id 0: what a dropped example reads
    results = []
    for path in ("identity", "mapped", "general"):
        spec = copy_spec(spec0)
        f = spec["fields"][0]
        if path == "mapped":
            f["bags"] = (np.arange(U + 1, dtype=np.int64), perm, np.ones(U, np.float32))
            table = np.empty_like(f["table"])
            table[perm] = f["table"]
            f["table"] = table
        if path == "general":
            f["bags"] = (np.append(np.arange(U + 1), U).astype(np.int64), np.arange(U, dtype=np.int32),
                         np.ones(U, np.float32))
        _core.field_train_epoch(spec, keys, y, None, np.arange(300, dtype=np.int64), 100, 0.0, "sgd", 0.1, 0.0, False,
                                0.9, 0.999, 1e-8, 0, None, 3, 2)
        table = spec["fields"][0]["table"][perm] if path == "mapped" else spec["fields"][0]["table"]
        results.append(table.tobytes() + b"".join(c.tobytes() for c in spec["coefs"]))
    assert results[0] == results[1] == results[2]
    spec = copy_spec(spec0)
    spec["fields"][0]["dropout"] = 0.0
    _core.field_train_epoch(spec, keys, y, None, np.arange(300, dtype=np.int64), 100, 0.0, "sgd", 0.1, 0.0, False,
                            0.9, 0.999, 1e-8, 0, None, 3, 2)
    assert spec["fields"][0]["table"].tobytes() != results[0][:spec0["fields"][0]["table"].nbytes]  # it dropped


def test_reference_gradients_match_finite_differences():
    """The oracle itself: central differences of its loss (float64) against its gradients, on a small model
    with every ingredient (GMF, bags with duplicates and empty bags, a dense block, weights, bce, L2)."""
    rng = np.random.default_rng(7)
    spec, keys = two_key_model(rng, True, "bce", activation="tanh", n=12)
    spec = reference.float64_copy(spec)
    y = (rng.random(12) < 0.5).astype(np.float64)
    w = rng.uniform(0.5, 2.0, 12)
    alpha, h = 0.3, 1e-6
    _, tg, gg, gw, gb = reference.field_loss_and_gradients(spec, keys, y, w, alpha)

    def loss_at():
        return reference.field_loss_and_gradients(spec, keys, y, w, alpha)[0]

    checks = [(spec["coefs"][0], gw[0]), (spec["coefs"][-1], gw[-1]), (spec["intercepts"][0], gb[0]),
              (spec["gmf"]["w"], gg)] + [(f["table"], g) for f, g in zip(spec["fields"], tg)]
    for P, G in checks:
        flat_p, flat_g = P.reshape(-1), G.reshape(-1)
        # the largest gradient entries plus a few random ones (touched rows; untouched rows have G == 0 and
        # their loss is independent of them, except for the L2 term which counts touched rows only)
        picks = np.unique(np.concatenate([np.argsort(-np.abs(flat_g))[:4], rng.integers(0, flat_p.size, 4)]))
        for j in picks:
            old = flat_p[j]
            flat_p[j] = old + h
            up = loss_at()
            flat_p[j] = old - h
            down = loss_at()
            flat_p[j] = old
            assert abs((up - down) / (2 * h) - flat_g[j]) < 1e-6 + 1e-5 * abs(flat_g[j])


# ------------------------------------------------------------------------------------------ training

OPTIMIZERS = {
    "sgd": dict(optimizer="sgd", learning_rate=0.1, momentum=0.0, nesterov=False),
    "momentum": dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, nesterov=False),
    "nesterov": dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, nesterov=True),
    "adagrad": dict(optimizer="adagrad", learning_rate=0.05, momentum=0.0, nesterov=False),
    "adam": dict(optimizer="adam", learning_rate=0.01, momentum=0.0, nesterov=False),
}
COMMON = dict(beta_1=0.9, beta_2=0.999, epsilon=1e-8)


def assert_update_matches(name, before, got, want, steps):
    """A trained array against the oracle's: its values (rel_err < BAR) and its change from `before`.

    The core stores p + delta in float32, which rounds by up to half an ulp of |p| per step, so the change
    it reports carries an absolute error of about steps * eps32 * max|p| on top of the relative error of the
    update itself; the change must agree within BAR of its scale plus that rounding allowance.
    """
    before, got, want = (np.asarray(a, np.float64) for a in (before, got, want))
    assert rel_err(got, want) < BAR, name
    d_got, d_want = got - before, want - before
    allowance = BAR * np.abs(d_want).max(initial=0.0) + 2 * steps * F32_EPS * np.abs(want).max(initial=0.0)
    assert np.abs(d_got - d_want).max(initial=0.0) <= allowance, name


@pytest.mark.parametrize("loss", ["mse", "bce"])
@pytest.mark.parametrize("gmf", [False, True], ids=["mlp", "gmf"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_five_steps_match_reference(isa, rng, opt, layout, gmf, loss):
    kw = OPTIMIZERS[opt]
    spec, keys = LAYOUTS[layout](rng, gmf, loss, optimizer=kw["optimizer"])
    n = len(keys[0])
    y = targets(rng, n, loss)
    w = rng.uniform(0.2, 2.0, n).astype(np.float32)
    order = rng.permutation(n).astype(np.int64)
    batch = -(-n // 5)  # five optimizer steps, the last one shorter
    ref = reference.float64_copy(spec)
    before = [a.copy() for _, a in float_arrays(spec)]
    got = _core.field_train_epoch(spec, keys, y, w, order, batch, 0.01, adam_t=3, sampler=None, epoch=0,
                                  n_threads=0, isa=isa, **kw, **COMMON)
    want = reference.field_train_epoch(ref, keys, y.astype(np.float64), w.astype(np.float64), order, batch, 0.01,
                                       adam_t=3, sampler=None, epoch=0, **kw, **COMMON)
    assert got[1] == want[1] == (8 if opt == "adam" else 3)
    assert got[2] == want[2] == n
    assert abs(got[0] - want[0]) / abs(want[0]) < BAR
    names = [name for name, _ in float_arrays(spec)]
    assert names == [name for name, _ in float_arrays(ref)]
    for name, b, (_, g), (_, r) in zip(names, before, float_arrays(spec), float_arrays(ref)):
        assert g.dtype == np.float32 and g.shape == r.shape, name
        assert_update_matches(name, b, g, r, steps=5)


@pytest.mark.parametrize("opt", ["sgd", "adagrad", "adam"])
def test_untouched_rows_and_their_state_stay_bit_identical(rng, opt):
    kw = OPTIMIZERS[opt]
    V = 500
    # Two fields over a large vocabulary; the batch names a handful of its ids.
    bags_a = multi_hot_bags(rng, 40, V, 3)
    bags_b = one_hot_bags(V)
    fields = [(table(rng, V, 16), bags_a, 0, True), (table(rng, V, 8), bags_b, 1, True)]
    spec = make_spec(rng, fields, [], None, "bce", "relu", (8,), 2, kw["optimizer"])
    # Non-zero state everywhere, so that a lazy row's state visibly changes if it is decayed or rewritten.
    for f in spec["fields"]:
        for s in ("state1", "state2"):
            if f[s] is not None:
                f[s][...] = rng.uniform(0.1, 0.5, f[s].shape).astype(np.float32)
    keys = [rng.integers(0, 40, 30).astype(np.int32), rng.integers(0, 25, 30).astype(np.int32)]
    y = (rng.random(30) < 0.5).astype(np.float32)
    before = [{s: f[s].copy() for s in ("table", "state1", "state2") if f[s] is not None} for f in spec["fields"]]
    _core.field_train_epoch(spec, keys, y, None, np.arange(30, dtype=np.int64), 7, 0.01, adam_t=0, sampler=None,
                            epoch=0, **kw, **COMMON)
    touched = [np.unique(bags_a[1][np.concatenate([np.arange(bags_a[0][q], bags_a[0][q + 1]) for q in keys[0]])]),
               np.unique(keys[1])]
    for f, b, rows in zip(spec["fields"], before, touched):
        untouched = np.setdiff1d(np.arange(V), rows)
        assert len(untouched) > V // 2
        for s, old in b.items():
            assert f[s][untouched].tobytes() == old[untouched].tobytes(), s
            changed = f[s][rows] != old[rows]
            assert (changed.any(axis=-1) if changed.ndim == 2 else changed).all(), s  # and every touched row moved


# ----------------------------------------------------------------------------------- negative sampling

N_ITEMS = 6


def sampling_model(rng):
    """Users x items one-hot fields (6 users, 6 items), tanh MLP: every touched item row gets a non-zero
    gradient (alpha > 0 adds alpha * E / n), so the rows that change name exactly the items trained on."""
    fields = [(table(rng, N_ITEMS, 4), one_hot_bags(N_ITEMS), 0, True),
              (table(rng, N_ITEMS, 4), one_hot_bags(N_ITEMS), 1, True)]
    return make_spec(rng, fields, [], None, "bce", "tanh", (4,), 2, "sgd")


def items_trained_on(spec, user, item, sampler, epoch=0):
    """Train one positive (user, item) with sampled negatives (plain SGD); return the set of item rows that
    changed and the number of rows the core says it trained on."""
    before = spec["fields"][1]["table"].copy()
    keys = [np.array([user], np.int32), np.array([item], np.int32)]
    _, _, rows, *_ = _core.field_train_epoch(spec, keys, np.ones(1, np.float32), None, np.zeros(1, np.int64), 1, 0.01,
                                         "sgd", 0.1, 0.0, False, 0.9, 0.999, 1e-8, 0, sampler, epoch)
    changed = np.flatnonzero((spec["fields"][1]["table"] != before).any(axis=1))
    return set(changed.tolist()), rows


def seen_all_but_one():
    """User u has seen every item except (u + 2) % 6 (lists sorted per user, as the contract requires)."""
    lists = [sorted(set(range(N_ITEMS)) - {(u + 2) % N_ITEMS}) for u in range(N_ITEMS)]
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    return indptr, np.concatenate(lists).astype(np.int32)


def test_negatives_never_a_seen_item(rng):
    spec = sampling_model(rng)
    seen = seen_all_but_one()
    for u in range(N_ITEMS):
        sampler = {"negatives": 5, "user_key": 0, "item_key": 1, "n_items": N_ITEMS, "cdf": None, "seen": seen,
                   "seed": 11 + u}
        changed, rows = items_trained_on(spec, u, u, sampler)
        # 5 negatives: each is the unseen item unless 64 uniform draws all hit the 5 seen ones (p = (5/6)^64 ~ 1e-5)
        assert rows == 6
        assert changed == {u, (u + 2) % N_ITEMS}


def test_uniform_negatives_without_seen_spread_over_items(rng):
    # The check above is not vacuous: without `seen`, 30 uniform draws over 6 items reach other items.
    spec = sampling_model(rng)
    sampler = {"negatives": 30, "user_key": 0, "item_key": 1, "n_items": N_ITEMS, "cdf": None, "seen": None, "seed": 3}
    changed, rows = items_trained_on(spec, 0, 0, sampler)
    assert rows == 31 and len(changed) >= 4


def test_popularity_cdf_samples_only_where_the_mass_is(rng):
    spec = sampling_model(rng)
    m = 4
    cdf = np.where(np.arange(N_ITEMS) >= m, 1.0, 0.0)  # cumulative: all mass on item 4
    for seen in (None, seen_all_but_one()):
        # user 2's only unseen item is 4
        sampler = {"negatives": 8, "user_key": 0, "item_key": 1, "n_items": N_ITEMS, "cdf": cdf, "seen": seen,
                   "seed": 5}
        changed, _ = items_trained_on(spec, 2, 0, sampler)
        assert changed == {0, m}
    # When every draw is a seen item, the documented cap applies: 64 rejections, then the last draw is kept.
    sampler = {"negatives": 2, "user_key": 0, "item_key": 1, "n_items": N_ITEMS, "cdf": cdf, "seen": seen_all_but_one(),
               "seed": 5}
    changed, _ = items_trained_on(spec, 0, 1, sampler)  # user 0 has seen item 4 (its unseen item is 2)
    assert changed == {1, m}


def test_negatives_depend_on_seed_and_epoch_only(rng):
    spec0 = sampling_model(rng)
    base = {"negatives": 3, "user_key": 0, "item_key": 1, "n_items": N_ITEMS, "cdf": None, "seen": None, "seed": 9}
    results = []
    for seed, epoch in ((9, 0), (9, 0), (9, 1), (10, 0)):
        spec = copy_spec(spec0)
        keys = [np.arange(N_ITEMS, dtype=np.int32), np.arange(N_ITEMS, dtype=np.int32)]
        _core.field_train_epoch(spec, keys, np.ones(N_ITEMS, np.float32), None, np.arange(N_ITEMS, dtype=np.int64), 2,
                                0.0, "sgd", 0.1, 0.0, False, 0.9, 0.999, 1e-8, 0, dict(base, seed=seed), epoch)
        results.append(spec_bytes(spec))
    assert results[0] == results[1]
    assert results[0] != results[2] and results[0] != results[3]


def test_reference_train_epoch_refuses_negatives(rng):
    spec = reference.float64_copy(sampling_model(rng))
    sampler = {"negatives": 1, "user_key": 0, "item_key": 1, "n_items": N_ITEMS, "cdf": None, "seen": None, "seed": 0}
    with pytest.raises(NotImplementedError):
        reference.field_train_epoch(spec, [np.zeros(1, np.int32)] * 2, np.ones(1), None, np.zeros(1, np.int64), 1,
                                    0.0, "sgd", 0.1, 0.0, False, 0.9, 0.999, 1e-8, 0, sampler, 0)


# ------------------------------------------------------------------------------------------------ top-k


def topk_model(rng, gmf):
    """The two-key model with mse loss (scores are logits: no sigmoid saturation can create ties in the
    brute force that the core breaks by logit) and items 3 and 7 identical in every item-keyed table, so
    they tie exactly and the tie must go to item 3."""
    spec, _ = two_key_model(rng, gmf, "mse")
    for f in spec["fields"]:
        if f["key"] == 1:
            indptr, ids, w = f["bags"]
            if len(ids) == len(indptr) - 1 and np.array_equal(ids, np.arange(len(ids))):  # one-hot: copy the row
                f["table"][7] = f["table"][3]
            else:  # multi-hot: give bag 7 the contents of bag 3
                bags = [(ids[indptr[q]:indptr[q + 1]], w[indptr[q]:indptr[q + 1]]) for q in range(len(indptr) - 1)]
                bags[7] = bags[3]
                indptr = np.concatenate([[0], np.cumsum([len(b[0]) for b in bags])]).astype(np.int64)
                f["bags"] = (indptr, np.concatenate([b[0] for b in bags]).astype(np.int32),
                             np.concatenate([b[1] for b in bags]).astype(np.float32))
    for blk in spec["dense"]:
        if blk["key"] == 1:
            blk["table"][7] = blk["table"][3]
    return spec


def brute_force_topk(spec, users, candidates, k, seen, n_items):
    items = np.full((len(users), k), -1, np.int32)
    scores = np.full((len(users), k), -np.inf, np.float32)
    for row, u in enumerate(users):
        c = np.arange(n_items) if candidates is None else np.sort(candidates)
        if seen is not None:
            c = np.setdiff1d(c, seen[1][seen[0][u]:seen[0][u + 1]])
        if len(c) == 0:
            continue
        s = _core.field_predict(spec, [np.full(len(c), u, np.int32), c.astype(np.int32)])
        best = np.argsort(-s, kind="stable")[:k]  # ties keep increasing item order
        items[row, :len(best)], scores[row, :len(best)] = c[best], s[best]
    return items, scores


@pytest.mark.parametrize("gmf", [False, True], ids=["mlp", "gmf"])
def test_topk_equals_brute_force(isa, rng, gmf):
    spec = topk_model(rng, gmf)
    n_items = 41
    lists = [np.sort(rng.choice(n_items, rng.integers(0, 12), replace=False)) for _ in range(23)]
    lists[5] = np.arange(n_items)  # user 5 has seen everything: all padding when seen items are excluded
    lists[6] = np.array([3])       # user 6 has seen 3 but not its twin 7
    seen = (np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64),
            np.concatenate(lists).astype(np.int32))
    sampler = {"negatives": 0, "user_key": 0, "item_key": 1, "n_items": n_items, "cdf": None, "seen": seen, "seed": 0}
    users = np.array([0, 4, 5, 6, 22, 4], np.int32)  # a repeated user too
    subset = np.array([30, 3, 7, 12, 0, 40], np.int32)  # unsorted candidate subset holding the tied twins
    for candidates, k in ((None, 5), (None, n_items + 3), (subset, 4), (subset, 9)):
        for exclude in (False, True):
            items, scores = _core.field_topk(spec, sampler, users, candidates, k, exclude, 0, isa)
            want_items, want_scores = brute_force_topk(spec, users, candidates, k, seen if exclude else None, n_items)
            assert items.dtype == np.int32 and items.shape == (len(users), k)
            assert np.array_equal(items, want_items), (k, exclude, candidates is None)
            pad = want_items < 0
            assert np.isneginf(scores[pad]).all()
            # Same ranking; the scores come from a different code path than field_predict (the contract allows
            # splitting the first layer), so they agree to float32 rounding of the MLP's sums, not bitwise.
            assert np.allclose(scores[~pad], want_scores[~pad], rtol=1e-5, atol=1e-6)
            if candidates is None or 3 in candidates:
                for row, u in enumerate(users):  # the twins: 3 before 7 whenever both are ranked
                    r = list(items[row])
                    if 3 in r and 7 in r:
                        assert r.index(3) < r.index(7)
    # the tie really happens somewhere, so the check above is not vacuous
    items, _ = _core.field_topk(spec, sampler, users, None, n_items, False, 0, isa)
    assert all(list(r).index(3) + 1 == list(r).index(7) for r in items)


@pytest.mark.parametrize("activation,hidden", [("relu", (40, 33)), ("tanh", (17,)), ("logistic", (9, 5)),
                                               ("relu", ())], ids=["relu", "tanh", "logistic", "one-layer"])
def test_topk_over_many_item_panels_equals_brute_force(isa, rng, activation, hidden):
    """A catalogue of several thousand items: top-k runs them in panels of MR items, in work chunks of 256
    panels (3072 items at AVX-512) with the rows of later panels prefetched; none of that may change which
    items win. Hidden widths 40 and 33 leave partial NR-column tiles; the one-layer MLP has no tail at all."""
    U, I = 4, 7001
    fields = [(table(rng, U, 8), one_hot_bags(U), 0, True), (table(rng, I, 16), one_hot_bags(I), 1, True)]
    spec = make_spec(rng, fields, [(rng.standard_normal((I, 3)).astype(np.float32), 1)], None, "mse", activation,
                     hidden, 2)
    sampler = {"negatives": 0, "user_key": 0, "item_key": 1, "n_items": I, "cdf": None, "seen": None, "seed": 0}
    candidates = rng.choice(I, 5000, replace=False).astype(np.int32)
    for users in (np.array([2], np.int32), np.arange(U, dtype=np.int32)):  # split over items / over users
        for cand in (None, candidates):
            want_items, want_scores = brute_force_topk(spec, users, cand, 7, None, I)
            for threads in (1, 2, 3):
                items, scores = _core.field_topk(spec, sampler, users, cand, 7, False, threads, isa)
                assert np.array_equal(items, want_items), (threads, cand is None, len(users))
                # float32 rounding of a different summation of the first layer (see the test above)
                assert np.allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_reference_topk_matches_core_on_a_float64_spec(rng):
    spec = topk_model(rng, True)
    sampler = {"negatives": 0, "user_key": 0, "item_key": 1, "n_items": 41, "cdf": None, "seen": None, "seed": 0}
    users = np.arange(23, dtype=np.int32)
    items, scores = _core.field_topk(spec, sampler, users, None, 6, False)
    r_items, r_scores = reference.field_topk(reference.float64_copy(spec), sampler, users, None, 6, False)
    assert np.array_equal(items, r_items)
    assert rel_err(scores, r_scores) < BAR


# ------------------------------------------------------------------------------------------ determinism


def big_model(rng):
    """Large enough that every kernel splits over threads: batch 512, dims 64, MLP 128-64, five fields (spread
    over the threads, one field per thread at a time)."""
    U, I = 300, 500
    fields = [(table(rng, U, 64), one_hot_bags(U), 0, True), (table(rng, I, 64), one_hot_bags(I), 1, True),
              (table(rng, 200, 64, 0.2), multi_hot_bags(rng, I, 200, 8), 1, True),
              (table(rng, U, 64), one_hot_bags(U), 0, False), (table(rng, I, 64), one_hot_bags(I), 1, False)]
    dense = [(rng.standard_normal((I, 8)).astype(np.float32), 1)]
    spec = make_spec(rng, fields, dense, (3, 4), "bce", "relu", (128, 64), 2, "adam")
    for f in spec["fields"][:3]:  # training reads row 0 instead for 10% of examples, a draw per field and row
        f["dropout"] = 0.1
    keys = [rng.integers(0, U, 2048).astype(np.int32), rng.integers(0, I, 2048).astype(np.int32)]
    return spec, keys


def copy_spec(spec):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in spec.items()} | {
        "coefs": [c.copy() for c in spec["coefs"]], "intercepts": [b.copy() for b in spec["intercepts"]],
        "state1": [s.copy() for s in spec["state1"]], "state2": [s.copy() for s in spec["state2"]],
        "fields": [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in f.items()} for f in spec["fields"]],
        "gmf": None if spec["gmf"] is None else {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                                 for k, v in spec["gmf"].items()}}


@pytest.mark.parametrize("negatives", [0, 2])
def test_training_is_bitwise_identical_for_any_thread_count(rng, negatives):
    spec0, keys = big_model(rng)
    y = (rng.random(2048) < 0.5).astype(np.float32)
    order = rng.permutation(2048).astype(np.int64)
    sampler = None
    if negatives:
        popularity = np.bincount(keys[1], minlength=500) ** 0.75
        sampler = {"negatives": negatives, "user_key": 0, "item_key": 1, "n_items": 500,
                   "cdf": np.cumsum(popularity).astype(np.float64), "seed": 1,
                   "seen": (np.zeros(301, np.int64), np.zeros(0, np.int32))}
    results = []
    for threads in (1, 2, 3, 8):  # 8 > 5 fields: one field after another, each split over the threads
        spec = copy_spec(spec0)
        loss, t, rows, *_ = _core.field_train_epoch(spec, keys, y, None, order, 512, 1e-3, "adam", 1e-3, 0.9, True, 0.9,
                                                0.999, 1e-8, 0, sampler, 2, threads)
        pred = _core.field_predict(spec, keys, threads)
        results.append((loss, t, rows, spec_bytes(spec), pred.tobytes()))
    assert results[0][2] == 2048 * (1 + negatives)
    assert results[0] == results[1] == results[2] == results[3]


def test_prediction_of_a_row_does_not_depend_on_its_batch(isa, rng):
    spec, keys = big_model(rng)
    full = _core.field_predict(spec, keys, 0, isa)
    for rows in (slice(0, 1), slice(13, 14), slice(5, 600), slice(2047, 2048)):
        part = _core.field_predict(spec, [np.ascontiguousarray(k[rows]) for k in keys], 0, isa)
        assert part.tobytes() == full[rows].tobytes()


# -------------------------------------------------------------------------------------------- bad input


def small(rng, optimizer="sgd"):
    spec, keys = two_key_model(rng, True, "bce", optimizer=optimizer, n=10)
    return spec, keys, np.ones(10, np.float32)


def train(spec, keys, y, optimizer="sgd"):
    return _core.field_train_epoch(spec, keys, y, None, np.arange(len(y), dtype=np.int64), 4, 0.0, optimizer, 0.1,
                                   0.9, False, 0.9, 0.999, 1e-8, 0, None, 0)


def test_bad_keys_and_bags_raise_value_error_naming_them(rng):
    spec, keys, y = small(rng)
    bad = [keys[0].copy(), keys[1]]
    bad[0][3] = 23  # 23 users
    with pytest.raises(ValueError, match=r"key column 0 must hold values in \[0, 23\)"):
        _core.field_predict(spec, bad)
    bad = [keys[0], keys[1].copy()]
    bad[1][0] = -1
    with pytest.raises(ValueError, match=r"key column 1 must hold values in \[0, 41\)"):
        _core.field_loss_and_gradients(spec, bad, y, None, 0.0)
    indptr, ids, w = spec["fields"][1]["bags"]
    ids = ids.copy()
    ids[-1] = 37  # vocabulary of 37
    spec["fields"][1]["bags"] = (indptr, ids, w)
    with pytest.raises(ValueError, match=r"field 1: bag ids must lie in \[0, 37\)"):
        _core.field_predict(spec, keys)
    spec["fields"][1]["bags"] = (indptr, ids % 37, w)
    with pytest.raises(ValueError, match="keys must hold 2 columns"):
        _core.field_predict(spec, keys[:1])
    with pytest.raises(TypeError, match=r"keys\[0\] must have dtype int32"):
        _core.field_predict(spec, [keys[0].astype(np.int64), keys[1]])


def test_bad_arrays_raise_naming_them(rng):
    spec, keys, y = small(rng)
    good = spec["fields"][2]["table"]
    spec["fields"][2]["table"] = good.astype(np.float64)
    with pytest.raises(TypeError, match=r"fields\[2\]\.table must have dtype float32"):
        _core.field_predict(spec, keys)
    spec["fields"][2]["table"] = good
    spec["width"] += 1
    with pytest.raises(ValueError, match=r"coefs\[0\] has \d+ rows but the fields and dense blocks give \d+ input"):
        _core.field_predict(spec, keys)
    spec["width"] -= 1
    with pytest.raises(ValueError, match=r"y must have 10 elements"):
        _core.field_loss_and_gradients(spec, keys, y[:9], None, 0.0)
    ro = spec["fields"][0]["table"]
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"fields\[0\]\.table must be writeable"):
        train(spec, keys, y)
    assert _core.field_predict(spec, keys).shape == (10,)  # a read-only model can still predict


def test_fields_sharing_memory_cannot_train(rng):
    """Training updates fields in parallel, so two fields writing overlapping memory would race: refused,
    naming them. Predicting only reads, and may share."""
    spec, keys, y = small(rng, "adam")
    a, b = spec["fields"][0], spec["fields"][1]
    for name in ("table", "state2"):
        saved = a["table"], b[name]
        # one buffer holding field 0's table and then field 1's array, the two overlapping by 5 floats
        buf = np.zeros(a["table"].size + b[name].size - 5, np.float32)
        a["table"] = buf[:a["table"].size].reshape(a["table"].shape)
        b[name] = buf[a["table"].size - 5:].reshape(b[name].shape)
        with pytest.raises(ValueError, match=r"fields\[0\] and fields\[1\] share memory"):
            train(spec, keys, y, "adam")
        assert _core.field_predict(spec, keys).shape == (10,)
        a["table"], b[name] = saved
    assert train(spec, keys, y, "adam")[2] == 10  # separate arrays train


def test_fields_or_layers_sharing_memory_with_the_mlp_cannot_train(rng):
    """The fields' row updates run beside the MLP's gradient sums, and those of different layers beside each
    other: a table that overlaps an MLP array, or two layers' arrays that overlap, are refused."""
    spec, keys, y = small(rng)
    W = spec["coefs"][0]
    saved = spec["fields"][0]["table"]
    spec["fields"][0]["table"] = W.reshape(-1)[:saved.size].reshape(saved.shape)
    with pytest.raises(ValueError, match=r"fields\[0\] shares memory with the MLP"):
        train(spec, keys, y)
    spec["fields"][0]["table"] = saved
    b = spec["intercepts"][1]
    spec["intercepts"][1] = spec["intercepts"][0][:b.size]  # a view into layer 0's bias
    with pytest.raises(ValueError, match="coefs and intercepts share memory"):
        train(spec, keys, y)
    spec["intercepts"][1] = b
    assert train(spec, keys, y)[2] == 10


def test_overlapping_input_columns_raise(rng):
    """Each field and dense block writes its own MLP input columns (fields from different threads)."""
    spec, keys, y = small(rng)
    spec["fields"][1]["offset"] = spec["fields"][0]["offset"] + 1
    with pytest.raises(ValueError, match=r"MLP input columns \[0, 16\) and \[1, 8\) overlap"):
        _core.field_predict(spec, keys)


def test_k_below_one_raises(rng):
    spec, _, _ = small(rng)
    sampler = {"negatives": 0, "user_key": 0, "item_key": 1, "n_items": 41, "cdf": None, "seen": None, "seed": 0}
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        _core.field_topk(spec, sampler, np.arange(3, dtype=np.int32), None, 0, False)


@pytest.mark.parametrize("optimizer", ["adagrad", "adam"])
def test_missing_state_raises(rng, optimizer):
    spec, keys, y = small(rng, optimizer)
    f = spec["fields"][1]
    s2 = f["state2"]
    if optimizer == "adam":
        f["state2"] = None
        with pytest.raises(ValueError, match="every field needs state2 for 'adam'"):
            train(spec, keys, y, optimizer)
        f["state2"] = s2
    f["state1"] = None
    with pytest.raises(ValueError, match=f"every field needs state1 of .* for optimizer '{optimizer}'"):
        train(spec, keys, y, optimizer)
    spec2, _, _ = small(rng, optimizer)
    spec2["gmf"]["state1"] = None
    with pytest.raises(ValueError, match="gmf needs state1"):
        train(spec2, keys, y, optimizer)
    spec3, _, _ = small(rng, optimizer)
    spec3["state1"] = spec3["state1"][:-1]
    with pytest.raises(ValueError, match=r"state1 must hold \d+ arrays"):
        train(spec3, keys, y, optimizer)
    spec4, _, _ = small(rng, optimizer)
    spec4["fields"][0]["state1"] = spec4["fields"][0]["state1"][:-1].copy()
    with pytest.raises(ValueError, match=r"fields\[0\]\.state1 must have \d+ elements"):
        train(spec4, keys, y, optimizer)


# ------------------------------------------------------------------ specs the core must refuse
# Each once crashed or misbehaved (found by these tests); the binding now rejects them with a ValueError.

import subprocess  # noqa: E402
import sys  # noqa: E402

TINY = """
import numpy as np
from fastrec import _core
def one_hot(rows):
    return (np.arange(rows + 1, dtype=np.int64), np.arange(rows, dtype=np.int32), np.ones(rows, np.float32))
rng = np.random.default_rng(0)
def spec_of(fields, dense=(), gmf=None):
    w = sum(f["table"].shape[1] for f in fields if f["offset"] >= 0) + sum(d["table"].shape[1] for d in dense)
    return {"n_keys": 2, "width": w, "loss": "mse", "activation": "tanh",
            "coefs": [rng.standard_normal((w, 4)).astype(np.float32), rng.standard_normal((4, 1)).astype(np.float32)],
            "intercepts": [np.zeros(4, np.float32), np.zeros(1, np.float32)], "state1": [], "state2": [],
            "fields": list(fields), "dense": list(dense), "gmf": gmf}
def field(V, d, key, offset):
    return {"table": rng.standard_normal((V, d)).astype(np.float32), "bags": one_hot(V), "key": key, "offset": offset}
keys = [np.arange(5, dtype=np.int32), np.arange(5, dtype=np.int32)]
"""


def run_isolated(body):
    """Runs TINY + body in a fresh interpreter (the current core may crash on these specs); returns
    (returncode, output)."""
    out = subprocess.run([sys.executable, "-c", TINY + body], capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout + out.stderr


def test_gmf_only_field_without_gmf_is_rejected():
    rc, out = run_isolated("""
try:
    _core.field_loss_and_gradients(spec_of([field(5, 3, 0, 0), field(5, 3, 1, -1)]), keys, np.ones(5, np.float32),
                                   None, 0.1)
    print("ACCEPTED")
except ValueError as e:
    print("ValueError:", e)
""")
    assert rc == 0 and "ValueError" in out, out


def test_topk_rejects_key_columns_out_of_range():
    rc, out = run_isolated("""
sampler = {"negatives": 0, "user_key": 0, "item_key": 7, "n_items": 5, "cdf": None, "seen": None, "seed": 0}
try:
    _core.field_topk(spec_of([field(5, 3, 0, 0), field(5, 2, 1, 3)]), sampler, np.array([0], np.int32), None, 3, False)
    print("ACCEPTED")
except ValueError as e:
    print("ValueError:", e)
""")
    assert rc == 0 and "ValueError" in out, out


def test_unused_gmf_style_field_gets_only_its_l2_gradient(rng):
    fields = [(table(rng, 5, 3), one_hot_bags(5), 0, True), (table(rng, 5, 3), one_hot_bags(5), 0, False),
              (table(rng, 5, 3), one_hot_bags(5), 1, False), (table(rng, 5, 3), one_hot_bags(5), 1, False)]
    spec = make_spec(rng, fields, [], (1, 2), "mse", "tanh", (4,), 2)
    keys = [np.arange(5, dtype=np.int32)] * 2
    y = np.ones(5, np.float32)
    try:
        got = _core.field_loss_and_gradients(spec, keys, y, None, 0.0)
    except ValueError:
        return  # rejecting the spec is fine too
    want = reference.field_loss_and_gradients(reference.float64_copy(spec), keys, y.astype(np.float64), None, 0.0)
    assert rel_err(got[1][3], want[1][3]) < BAR  # alpha = 0: the unused field's gradient is exactly 0


def test_gmf_of_a_field_with_itself_is_rejected_or_right(rng):
    fields = [(table(rng, 5, 3), one_hot_bags(5), 0, True), (table(rng, 5, 3), one_hot_bags(5), 0, False)]
    spec = make_spec(rng, fields, [], (1, 1), "mse", "tanh", (4,), 1)
    keys = [np.arange(5, dtype=np.int32)]
    try:
        got = _core.field_predict(spec, keys)
    except ValueError:
        return
    assert rel_err(got, reference.field_predict(reference.float64_copy(spec), keys)) < BAR


@pytest.mark.parametrize("entry", ["topk", "negatives"])
def test_item_keyed_dense_block_shorter_than_n_items_is_rejected(rng, entry):
    buffer = np.zeros((10, 2), np.float32)  # the dense table is its first 4 rows: reads past them stay in here
    fields = [(table(rng, 8, 3), one_hot_bags(8), 0, True), (table(rng, 8, 3), one_hot_bags(8), 1, True)]
    spec = make_spec(rng, fields, [(buffer[:4], 1)], None, "mse", "tanh", (4,), 2)
    sampler = {"negatives": 2, "user_key": 0, "item_key": 1, "n_items": 8, "cdf": None, "seen": None, "seed": 0}
    with pytest.raises(ValueError):
        if entry == "topk":
            _core.field_topk(spec, sampler, np.array([0], np.int32), None, 3, False)
        else:
            keys = [np.zeros(2, np.int32), np.array([0, 3], np.int32)]
            _core.field_train_epoch(spec, keys, np.ones(2, np.float32), None, np.arange(2, dtype=np.int64), 2, 0.0,
                                    "sgd", 0.1, 0.0, False, 0.9, 0.999, 1e-8, 0, sampler, 0)


def test_state_kind_must_fit_the_optimizer(rng):
    fields = [(table(rng, 4, 3), one_hot_bags(4), 0, True)]
    spec = make_spec(rng, fields, [], None, "mse", "tanh", (4,), 1, "adam")
    buffer = np.zeros(12, np.float32)  # state1 is its first 4 floats: writes past them stay in here
    spec["fields"][0].update(state_kind="row", state1=buffer[:4])
    with pytest.raises(ValueError):
        _core.field_train_epoch(spec, [np.arange(4, dtype=np.int32)], np.ones(4, np.float32), None,
                                np.arange(4, dtype=np.int64), 4, 0.0, "adam", 0.1, 0.9, False, 0.9, 0.999, 1e-8, 0,
                                None, 0)
