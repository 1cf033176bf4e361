"""Field model training with the MLP's products in bfloat16 (spec["precision"] = "bf16", FieldModel(precision=)).

Both bf16 kernels separately ("avx512_bf16" skipped, with the reason, on CPUs without it; "emulated" always).

Tolerances.
- Against the oracle that rounds the same operands (reference.field_loss_and_gradients(precision="bf16"),
  float64 otherwise): the core rounds its float32 activations, deltas and weights, the oracle the float64 ones
  rounded to float32; they agree except where a value sits within float32 noise of a bf16 rounding boundary
  (the two then round one bf16 ulp, 2^-8 relative, apart: a rare term of a sum off by 2^-8 of itself), plus
  float32 sums (K 2^-24 relative to |A||B|). Allowed: 1e-5 of each array's largest entry (measured <= 1.4e-6),
  loss 1e-6 relative (measured <= 2e-8).
- Against the float32 oracle (no rounding): each rounded operand is within u = 2^-9 of its float32 value
  (round to nearest, 8-bit significand), so each product is within 2u |A||B| of the float32 one and the
  loss, a sum of positive terms, moves by about 2u per rounded product in its path: 4 products (2 rounded
  layers, forward and through the loss) x 2^-8 ~ 1.6e-2 relative bounds it; measured <= 5.8e-4, allowed 2e-3.
  The gradients sum signed terms (|A||B| / |AB| is large) and a ReLU whose input is within rounding of 0
  switches: no useful elementwise bound follows from u, so they are compared normwise, ||g - g32|| / ||g32||
  <= 0.2 (measured <= 0.10 on these shapes: 0.2 ~ 50 x 2^-8 of cancellation allowed), and the check that bf16
  really rounds (next to a float32 core that matches to 1e-4).
"""

import pickle

import numpy as np
import pytest

import fastrec
from fastrec import _core
from fastrec import reference as ref

KERNELS = ["emulated", "avx512_bf16"]
TOL_BF16_ORACLE = 1e-5
TOL_F32_ORACLE = 0.2  # normwise


def need(kernel):
    if kernel not in _core.bf16_kernels():
        pytest.skip(f"{kernel}: not available on this CPU / build ({_core.bf16_kernels()})")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-30)


def norm_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def model(n=300, hidden=(40, 24), seed=0, loss="bce", optimizer="sgd"):
    """Two keys (23 users, 41 items): user and item id fields, a multi-hot item field, a dense item block; an
    MLP of `hidden` ReLU units and one output. n = 300 rows: two 256-row chunks of the core's backward."""
    rng = np.random.default_rng(seed)
    U, I = 23, 41

    def ids(v):
        return np.arange(v + 1, dtype=np.int64), np.arange(v, dtype=np.int32), np.ones(v, np.float32)

    counts = rng.integers(0, 4, I)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    multi = (indptr, rng.integers(0, 19, int(indptr[-1])).astype(np.int32),
             rng.uniform(0.2, 1.0, int(indptr[-1])).astype(np.float32))
    tables = [(rng.standard_normal((U, 16)) * 0.5).astype(np.float32),
              (rng.standard_normal((I, 33)) * 0.5).astype(np.float32),
              (rng.standard_normal((19, 7)) * 0.5).astype(np.float32)]
    fields, offset = [], 0
    for E, bags, key in zip(tables, (ids(U), ids(I), multi), (0, 1, 1)):
        fields.append({"table": E, "bags": bags, "key": key, "offset": offset, "state_kind": "none",
                       "state1": None, "state2": None})
        offset += E.shape[1]
    dense = [{"table": rng.standard_normal((I, 5)).astype(np.float32), "key": 1, "offset": offset}]
    width = offset + 5
    sizes = [width, *hidden, 1]
    coefs = [(rng.standard_normal((a, b)) * 1.2 / np.sqrt(a)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
    intercepts = [(rng.standard_normal(b) * 0.1).astype(np.float32) for b in sizes[1:]]
    params = coefs + intercepts
    spec = {"n_keys": 2, "width": width, "loss": loss, "activation": "relu", "coefs": coefs,
            "intercepts": intercepts, "state1": [np.zeros_like(p) for p in params],
            "state2": [np.zeros_like(p) for p in params] if optimizer == "adam" else [],
            "fields": fields, "dense": dense, "gmf": None}
    if optimizer == "adam":
        for f in fields:
            f["state_kind"] = "full"
            f["state1"], f["state2"] = np.zeros_like(f["table"]), np.full_like(f["table"], 1e-4)
    keys = [rng.integers(0, U, n).astype(np.int32), rng.integers(0, I, n).astype(np.int32)]
    y = (rng.random(n) < 0.4).astype(np.float32) if loss == "bce" else rng.standard_normal(n).astype(np.float32)
    return spec, keys, y


def with_precision(spec, precision, kernel="auto"):
    return dict(spec, precision=precision, bf16_kernel=kernel)


def arrays(spec):
    out = list(spec["coefs"]) + list(spec["intercepts"]) + list(spec["state1"]) + list(spec["state2"])
    for f in spec["fields"]:
        out += [f["table"]] + [f[s] for s in ("state1", "state2") if f.get(s) is not None]
    return out


def copy_spec(spec):
    return dict(spec, coefs=[c.copy() for c in spec["coefs"]], intercepts=[b.copy() for b in spec["intercepts"]],
                state1=[s.copy() for s in spec["state1"]], state2=[s.copy() for s in spec["state2"]],
                fields=[{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in f.items()}
                        for f in spec["fields"]])


# ------------------------------------------------------------------------------------ one step against the oracles
@pytest.mark.parametrize("n", [60, 300])
@pytest.mark.parametrize("loss", ["bce", "mse"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_loss_and_gradients_match_the_bf16_and_float32_oracles(kernel, loss, n):
    need(kernel)
    spec, keys, y = model(n=n, loss=loss)
    got = _core.field_loss_and_gradients(with_precision(spec, "bf16", kernel), keys, y, None, 0.01, 0)
    f32 = _core.field_loss_and_gradients(spec, keys, y, None, 0.01, 0)
    want16 = ref.field_loss_and_gradients(ref.float64_copy(spec), keys, y.astype(np.float64), None, 0.01,
                                          precision="bf16")
    want32 = ref.field_loss_and_gradients(ref.float64_copy(spec), keys, y.astype(np.float64), None, 0.01)
    assert abs(got[0] - want16[0]) <= 1e-6 * abs(want16[0])
    assert abs(got[0] - want32[0]) <= 2e-3 * abs(want32[0])
    pairs = [("table", g, w16, w32) for g, w16, w32 in zip(got[1], want16[1], want32[1])]
    pairs += [(f"coef{l}", g, w16, w32) for l, (g, w16, w32) in enumerate(zip(got[3], want16[3], want32[3]))]
    pairs += [(f"intercept{l}", g, w16, w32) for l, (g, w16, w32) in enumerate(zip(got[4], want16[4], want32[4]))]
    for name, g, w16, w32 in pairs:
        assert rel_err(g, w16) <= TOL_BF16_ORACLE, (name, rel_err(g, w16))
        assert norm_err(g, w32) <= TOL_F32_ORACLE, (name, norm_err(g, w32))
    # bf16 really rounds (the float32 core matches the float32 oracle far more closely than the bf16 one does)
    worst32 = max(rel_err(g, w32) for g, w32 in zip(f32[3], want32[3]))
    worst16 = max(rel_err(g, w32) for g, w32 in zip(got[3][:-1], want32[3][:-1]))
    assert worst32 < 1e-4 < 1e-3 < worst16


@pytest.mark.parametrize("kernel", KERNELS)
def test_training_steps_match_the_bf16_oracle(kernel):
    # Five plain-SGD steps of 60 rows: the core's epoch against the oracle's steps (loss_and_gradients, then
    # p -= lr g on every parameter; embedding rows under "sgd" are plain SGD too).
    need(kernel)
    spec, keys, y = model(n=300)
    order = np.arange(300, dtype=np.int64)
    got = copy_spec(spec)
    _core.field_train_epoch(with_precision(got, "bf16", kernel), keys, y, None, order, 60, 0.0, "sgd", 0.1, 0.0,
                            False, 0.9, 0.999, 1e-8, 0, None, 0, 0)
    want = ref.float64_copy(spec)
    for s in range(0, 300, 60):
        rows = order[s:s + 60]
        _, tg, _, gw, gb = ref.field_loss_and_gradients(want, [k[rows] for k in keys], y[rows].astype(np.float64),
                                                         None, 0.0, precision="bf16")
        for p, g in zip(want["coefs"] + want["intercepts"] + [f["table"] for f in want["fields"]], gw + gb + tg):
            p -= 0.1 * g
    for g, w in zip(got["coefs"] + got["intercepts"], want["coefs"] + want["intercepts"]):
        assert rel_err(g, w) <= TOL_BF16_ORACLE


# ------------------------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_training_is_bitwise_identical_for_any_thread_count(kernel):
    need(kernel)
    rng = np.random.default_rng(3)
    spec0, _, _ = model(n=10, hidden=(128, 64), optimizer="adam")
    keys = [rng.integers(0, 23, 2048).astype(np.int32), rng.integers(0, 41, 2048).astype(np.int32)]
    y = (rng.random(2048) < 0.5).astype(np.float32)
    order = rng.permutation(2048).astype(np.int64)
    results = []
    for threads in (1, 2, 3, 8):
        spec = with_precision(copy_spec(spec0), "bf16", kernel)
        loss, t, rows, *_ = _core.field_train_epoch(spec, keys, y, None, order, 1024, 1e-3, "adam", 1e-3, 0.9, True,
                                                    0.9, 0.999, 1e-8, 0, None, 0, threads)
        results.append((loss, t, rows, b"".join(a.tobytes() for a in arrays(spec))))
    assert results[0] == results[1] == results[2] == results[3]


def test_predictions_stay_float32():
    # precision applies to training handles only: a fitted bf16 model predicts with the float32 products.
    spec, keys, _ = model(n=60)
    want = ref.field_predict(ref.float64_copy(spec), keys)
    assert rel_err(_core.field_predict(spec, keys, 0), want) < 1e-5


# ------------------------------------------------------------------------------------ the estimators
def data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    X = {"user": rng.integers(0, 50, n), "item": rng.integers(0, 80, n),
         "x": rng.standard_normal((n, 3)).astype(np.float32)}
    y = ((X["user"] % 3 == X["item"] % 3) ^ (rng.random(n) < 0.1)).astype(np.float32)
    return X, y


def test_field_model_precision_bf16_learns_like_float32():
    X, y = data()
    kw = dict(hidden_layer_sizes=(64, 32), epochs=5, random_state=0, n_threads=2)
    m16 = fastrec.FieldModel(precision="bf16", **kw).fit(X, y)
    m32 = fastrec.FieldModel(precision="float32", **kw).fit(X, y)
    assert m16.history_["loss"] != m32.history_["loss"]  # the products did change
    assert abs(m16.history_["loss"][-1] - m32.history_["loss"][-1]) < 0.01
    p16, p32 = m16.predict_proba(X)[:, 1], m32.predict_proba(X)[:, 1]
    assert np.abs(p16 - p32).max() < 0.05


def test_precision_is_checked_and_auto_resolves():
    X, y = data(200)
    with pytest.raises(ValueError, match="precision"):
        fastrec.FieldModel(precision="float16").fit(X, y)
    with pytest.raises(ValueError, match="precision"):
        fastrec.Recommender(precision="bfloat").fit([0, 1], [0, 1])
    from fastrec._fieldnet import core_precision
    assert core_precision("auto") == ("bf16" if "avx512_bf16" in _core.bf16_kernels() else "float32")


def test_save_load_keeps_precision_and_training_continues_identically(tmp_path):
    X, y = data()
    m = fastrec.FieldModel(precision="bf16", hidden_layer_sizes=(32,), epochs=2, random_state=0, n_threads=1).fit(X, y)
    path = tmp_path / "m.fastrec"
    m.save(path)
    loaded = fastrec.load(path)
    assert loaded.get_params()["precision"] == "bf16"
    clone = pickle.loads(pickle.dumps(m))
    assert clone.precision == "bf16"
    m.partial_fit(X, y)
    loaded.partial_fit(X, y)
    assert m.history_["loss"][-1] == loaded.history_["loss"][-1]
    assert np.array_equal(m.predict_proba(X), loaded.predict_proba(X))


def test_recommender_precision_bf16_trains():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 40, 2000), rng.integers(0, 60, 2000)
    ratings = ((users + items) % 5 + 1).astype(np.float32)
    kw = dict(embedding_dim=16, hidden_layer_sizes=(32, 16), epochs=3, random_state=0, n_threads=1,
              early_stopping=False)
    r16 = fastrec.Recommender(precision="bf16", **kw).fit(users, items, ratings)
    r32 = fastrec.Recommender(precision="float32", **kw).fit(users, items, ratings)
    assert r16.history_["loss"] != r32.history_["loss"]
    assert abs(r16.history_["loss"][-1] - r32.history_["loss"][-1]) < 0.02 * r32.history_["loss"][-1]
