"""The C++ core against fastrec.reference (float64), once per available SIMD path.

Tolerance: the core computes in float32 with a different summation order than NumPy, so each value
carries float32 rounding error growing ~ sqrt(K) * 6e-8 over K-term sums; at these sizes that stays
below ~1e-6 relative to the array's largest entry. The issue's bar is 1e-4 (after 5 optimizer steps,
where errors compound); we assert that bar with `rel_err` = max|a - b| / max|b| (the array's scale, so
entries that cancel to ~0 do not blow up the ratio).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from fastrec import _core, reference

TAIL_SIZES = [1, 7, 15, 16, 17, 31, 33, 64, 100, 257]
HIDDEN = ["identity", "logistic", "tanh", "relu"]
OUTPUTS = ["identity", "logistic", "softmax"]
BAR = 1e-4


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    return np.abs(a - b).max(initial=0.0) / scale


def csr_tuple(X):
    return (X.indptr.astype(np.int64), X.indices.astype(np.int32), X.data.astype(np.float32), X.shape[1])


def make_net(rng, sizes, scale=0.5):
    coefs = [(rng.standard_normal((a, b)) * scale / np.sqrt(a)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
    intercepts = [(rng.standard_normal(b) * 0.1).astype(np.float32) for b in sizes[1:]]
    return coefs, intercepts


def as64(arrays):
    return [a.astype(np.float64) for a in arrays]


def make_targets(rng, n, k, out):
    if out == "softmax":
        return np.eye(k, dtype=np.float32)[rng.integers(0, k, n)]
    if out == "logistic":
        return (rng.random((n, k)) < 0.5).astype(np.float32)
    return rng.standard_normal((n, k)).astype(np.float32)


def make_input(rng, n, f, sparse):
    if sparse:
        X = sp.random(n, f, density=0.15, format="csr", random_state=rng, dtype=np.float32)
        X.data = (X.data - 0.5).astype(np.float32)
        return csr_tuple(X), X.astype(np.float64)
    X = rng.standard_normal((n, f)).astype(np.float32)
    return X, X.astype(np.float64)


# ---------------------------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_sgemm_matches_float64_on_tail_shapes(isa, rng, trans_a, trans_b):
    # Every M, N, K around the register tiles (4x8, 6x16, 12x32) and the K block (256).
    for M in TAIL_SIZES:
        for N in TAIL_SIZES:
            K = TAIL_SIZES[(M + N) % len(TAIL_SIZES)]
            a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
            b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
            c = _core.sgemm(a, b, trans_a, trans_b, isa, 0)
            want = reference.sgemm(a.astype(np.float64), b.astype(np.float64), trans_a, trans_b)
            assert c.shape == (M, N) and c.dtype == np.float32
            assert rel_err(c, want) < 1e-5, (M, N, K)


def test_sgemm_large_and_threaded(isa, rng):
    a = rng.standard_normal((300, 600)).astype(np.float32)
    b = rng.standard_normal((600, 130)).astype(np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    c1 = _core.sgemm(a, b, False, False, isa, 1)
    assert rel_err(c1, want) < 1e-5
    for threads in (2, 3):  # rectangles per thread; the sum over K is never split: bitwise identical
        assert _core.sgemm(a, b, False, False, isa, threads).tobytes() == c1.tobytes()


def test_sgemm_empty_k_gives_zeros(isa):
    c = _core.sgemm(np.zeros((3, 0), np.float32), np.zeros((0, 5), np.float32), False, False, isa, 0)
    assert c.shape == (3, 5) and not c.any()


# ----------------------------------------------------------------------------- forward and gradients


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("out", OUTPUTS)
@pytest.mark.parametrize("act", HIDDEN)
def test_forward_and_gradients_match_reference(isa, rng, act, out, sparse):
    sizes = [33, 17, 16, 3] if out != "logistic" else [33, 17, 16, 1]
    coefs, intercepts = make_net(rng, sizes)
    X, X64 = make_input(rng, 31, sizes[0], sparse)
    Y = make_targets(rng, 31, sizes[-1], out)
    got = _core.forward(coefs, intercepts, X, act, out, 0, isa)
    want = reference.forward(as64(coefs), as64(intercepts), X64, act, out)
    assert rel_err(got, want) < BAR

    loss, gw, gb = _core.loss_and_gradients(coefs, intercepts, X, Y, act, out, 0.05, 0, isa)
    rloss, rgw, rgb = reference.loss_and_gradients(as64(coefs), as64(intercepts), X64, Y.astype(np.float64), act,
                                                   out, 0.05)
    assert abs(loss - rloss) / abs(rloss) < BAR
    for g, r in zip(gw + gb, rgw + rgb):
        assert g.shape == r.shape
        assert rel_err(g, r) < BAR


@pytest.mark.parametrize("width", TAIL_SIZES)
def test_layer_widths_hit_every_simd_tail(isa, rng, width):
    sizes = [width, width, (width % 5) + 1]
    coefs, intercepts = make_net(rng, sizes)
    X = rng.standard_normal((width + 2, width)).astype(np.float32)
    Y = make_targets(rng, width + 2, sizes[-1], "identity")
    got = _core.forward(coefs, intercepts, X, "tanh", "identity", 0, isa)
    assert rel_err(got, reference.forward(as64(coefs), as64(intercepts), X.astype(np.float64), "tanh", "identity")) < BAR
    _, gw, gb = _core.loss_and_gradients(coefs, intercepts, X, Y, "tanh", "identity", 0.0, 0, isa)
    _, rgw, rgb = reference.loss_and_gradients(as64(coefs), as64(intercepts), X.astype(np.float64),
                                               Y.astype(np.float64), "tanh", "identity", 0.0)
    for g, r in zip(gw + gb, rgw + rgb):
        assert rel_err(g, r) < BAR


def test_csr_gradient_touches_only_rows_in_batch(rng):
    coefs, intercepts = make_net(rng, [50, 8, 1])
    X = sp.csr_matrix((np.ones(3, np.float32), ([0, 1, 1], [4, 9, 30])), shape=(2, 50))
    _, gw, _ = _core.loss_and_gradients(coefs, intercepts, csr_tuple(X), np.ones((2, 1), np.float32), "relu",
                                        "identity", 0.1, 0)
    touched = np.flatnonzero(np.abs(gw[0]).sum(axis=1))
    assert set(touched) <= {4, 9, 30}
    assert not gw[0][np.setdiff1d(np.arange(50), [4, 9, 30])].any()


def test_log_loss_is_finite_for_huge_logits(isa):
    coefs = [np.array([[1e4], [-1e4]], np.float32)]
    intercepts = [np.zeros(1, np.float32)]
    X = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    Y = np.array([[0.0], [1.0]], np.float32)  # both maximally wrong
    loss, gw, gb = _core.loss_and_gradients(coefs, intercepts, X, Y, "relu", "logistic", 0.0, 0, isa)
    assert np.isfinite(loss) and abs(loss - 1e4) / 1e4 < 1e-6  # softplus(1e4) = 1e4 for each row
    assert all(np.isfinite(g).all() for g in gw + gb)
    coefs3 = [np.array([[1e4, -1e4, 0.0]], np.float32)]
    loss3, _, _ = _core.loss_and_gradients(coefs3, [np.zeros(3, np.float32)], np.ones((1, 1), np.float32),
                                           np.array([[0.0, 1.0, 0.0]], np.float32), "relu", "softmax", 0.0, 0, isa)
    assert abs(loss3 - 2e4) / 2e4 < 1e-6


# ----------------------------------------------------------------------------------------- training


def train_args(solver):
    return dict(solver=solver, learning_rate=0.05 if solver == "sgd" else 0.01, momentum=0.9, beta_1=0.9,
                beta_2=0.999, epsilon=1e-8)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("solver,nesterov", [("sgd", False), ("sgd", True), ("adam", False)])
@pytest.mark.parametrize("act,out", [("relu", "identity"), ("tanh", "softmax"), ("logistic", "logistic"),
                                     ("identity", "identity")])
def test_five_steps_match_reference(isa, rng, sparse, solver, nesterov, act, out):
    sizes = [40, 17, 9, 1 if out == "logistic" else 3]
    coefs, intercepts = make_net(rng, sizes)
    X, X64 = make_input(rng, 50, sizes[0], sparse)
    Y = make_targets(rng, 50, sizes[-1], out)
    order = rng.permutation(50).astype(np.int64)
    n_state2 = 2 * len(coefs) if solver == "adam" else 0
    state1 = [np.zeros_like(p) for p in coefs + intercepts]
    state2 = [np.zeros_like(p) for p in (coefs + intercepts)[:n_state2]]
    r_params = as64(coefs + intercepts)
    r_s1, r_s2 = as64(state1), as64(state2)
    kw = train_args(solver)
    # 50 rows in batches of 10 = five optimizer steps
    loss, t, *_ = _core.train_epoch(coefs, intercepts, state1, state2, X, Y, order, 10, act, out, 0.01, nesterov=nesterov,
                                adam_t=0, n_threads=0, isa=isa, **kw)
    L = len(coefs)
    rloss, rt = reference.train_epoch(r_params[:L], r_params[L:], r_s1, r_s2, X64, Y.astype(np.float64), order, 10, act,
                                      out, 0.01, nesterov=nesterov, adam_t=0, **kw)
    assert t == rt == (5 if solver == "adam" else 0)
    assert abs(loss - rloss) / abs(rloss) < BAR
    for got, want in zip(coefs + intercepts + state1 + state2, r_params + r_s1 + r_s2):
        assert rel_err(got, want) < BAR


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize("out", OUTPUTS)
def test_sample_weight_gradients_and_steps_match_reference(isa, rng, out, sparse):
    """sample_weight: each row's loss and output gradient times its weight, means over the batch's sum of
    weights (loss_and_gradients); in train_epoch per minibatch, a minibatch of zero weights (rows 20-29
    here) skipped without a step."""
    sizes = [40, 17, 9, 1 if out == "logistic" else 3]
    coefs, intercepts = make_net(rng, sizes)
    X, X64 = make_input(rng, 50, sizes[0], sparse)
    Y = make_targets(rng, 50, sizes[-1], out)
    w = rng.uniform(0.0, 3.0, 50).astype(np.float32)
    w[20:30] = 0.0
    loss, gw, gb = _core.loss_and_gradients(coefs, intercepts, X, Y, "tanh", out, 0.05, 0, isa, sample_weight=w)
    rloss, rgw, rgb = reference.loss_and_gradients(as64(coefs), as64(intercepts), X64, Y.astype(np.float64), "tanh",
                                                   out, 0.05, sample_weight=w.astype(np.float64))
    assert abs(loss - rloss) / abs(rloss) < BAR
    for g, r in zip(gw + gb, rgw + rgb):
        assert rel_err(g, r) < BAR
    unweighted = _core.loss_and_gradients(coefs, intercepts, X, Y, "tanh", out, 0.05, 0, isa)[1]
    assert rel_err(gw[0], unweighted[0]) > 1e-2  # the weights change the gradient

    order = np.arange(50, dtype=np.int64)  # batches of 10 in row order: the third has zero weights
    state1 = [np.zeros_like(p) for p in coefs + intercepts]
    state2 = [np.zeros_like(p) for p in coefs + intercepts]
    r_params, r_s1, r_s2 = as64(coefs + intercepts), as64(state1), as64(state2)
    kw = train_args("adam")
    loss, t, *_ = _core.train_epoch(coefs, intercepts, state1, state2, X, Y, order, 10, "relu", out, 0.01,
                                    nesterov=False, adam_t=0, n_threads=0, isa=isa, sample_weight=w, **kw)
    L = len(coefs)
    rloss, rt = reference.train_epoch(r_params[:L], r_params[L:], r_s1, r_s2, X64, Y.astype(np.float64), order, 10,
                                      "relu", out, 0.01, nesterov=False, adam_t=0,
                                      sample_weight=w.astype(np.float64), **kw)
    assert t == rt == 4
    assert abs(loss - rloss) / abs(rloss) < BAR
    for got, want in zip(coefs + intercepts + state1 + state2, r_params + r_s1 + r_s2):
        assert rel_err(got, want) < BAR


def test_sample_weight_is_validated(rng):
    coefs, intercepts = make_net(rng, [4, 3, 1])
    X, Y = np.ones((5, 4), np.float32), np.ones((5, 1), np.float32)
    args = (coefs, intercepts, X, Y, "relu", "identity", 0.0)
    for bad, match in ((np.ones(4, np.float32), "sample_weight must have 5 elements"),
                       (np.array([1, 1, -1, 1, 1], np.float32), "sample_weight must hold finite non-negative"),
                       (np.array([1, 1, np.nan, 1, 1], np.float32), "sample_weight must hold finite non-negative"),
                       (np.zeros(5, np.float32), "the weights sum to zero")):
        with pytest.raises(ValueError, match=match):
            _core.loss_and_gradients(*args, sample_weight=bad)
    with pytest.raises(TypeError, match="sample_weight"):
        _core.loss_and_gradients(*args, sample_weight=np.ones(5))  # float64


def test_lazy_update_leaves_untouched_rows_bit_identical(rng):
    coefs, intercepts = make_net(rng, [1000, 8, 1])
    X = sp.random(20, 1000, density=0.005, format="csr", random_state=1, dtype=np.float32)
    untouched = np.setdiff1d(np.arange(1000), X.indices)
    state1 = [np.full_like(p, 0.5) for p in coefs + intercepts]  # non-zero momentum must not decay lazily
    before, before_v = coefs[0].copy(), state1[0].copy()
    _core.train_epoch(coefs, intercepts, state1, [], csr_tuple(X), np.ones((20, 1), np.float32),
                      np.arange(20, dtype=np.int64), 5, "relu", "identity", 0.1, "sgd", 0.1, 0.9, True, 0.9, 0.999,
                      1e-8, 0)
    assert coefs[0][untouched].tobytes() == before[untouched].tobytes()
    assert state1[0][untouched].tobytes() == before_v[untouched].tobytes()
    assert not np.array_equal(coefs[0][np.unique(X.indices)], before[np.unique(X.indices)])


@pytest.mark.parametrize("batch", [256, 1000])  # 1000: weight gradients summed from 4 chunks of rows
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_training_is_bitwise_identical_for_any_thread_count(rng, sparse, batch):
    # Large enough that every GEMM and sparse kernel really splits over threads.
    sizes = [300, 256, 128, 4]
    coefs0, intercepts0 = make_net(rng, sizes)
    X, _ = make_input(rng, 1024, sizes[0], sparse)
    Y = make_targets(rng, 1024, 4, "softmax")
    order = rng.permutation(1024).astype(np.int64)
    results = []
    for threads in (1, 2, 3):
        coefs, intercepts = [c.copy() for c in coefs0], [b.copy() for b in intercepts0]
        s1 = [np.zeros_like(p) for p in coefs + intercepts]
        s2 = [np.zeros_like(p) for p in coefs + intercepts]
        loss, *_ = _core.train_epoch(coefs, intercepts, s1, s2, X, Y, order, batch, "relu", "softmax", 1e-3, "adam",
                                    1e-3, 0.9, True, 0.9, 0.999, 1e-8, 0, threads)
        results.append((loss, b"".join(p.tobytes() for p in coefs + intercepts + s1 + s2)))
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("sizes,n,out", [([33, 40, 17, 3], 1000, "softmax"), ([40, 300, 200, 1], 1000, "identity"),
                                         ([40, 300, 1], 200, "identity")])
def test_gradients_of_a_large_batch_match_the_reference(isa, rng, sizes, n, out):
    """Over 256 rows the weight gradients are sums of per-chunk products (chunks of 256 rows, the last one
    partial; the sum runs in several blocks of rows for 300 x 200): same values as one product, to float32
    rounding. One-output layers run as matrix-vector products, here over 300 rows (two tasks) with the L2
    term and over 1000 rows with the bias."""
    coefs, intercepts = make_net(rng, sizes)
    X = rng.standard_normal((n, sizes[0])).astype(np.float32)
    Y = make_targets(rng, n, sizes[-1], out)
    loss, gw, gb = _core.loss_and_gradients(coefs, intercepts, X, Y, "tanh", out, 0.1, 0, isa)
    rloss, rgw, rgb = reference.loss_and_gradients(as64(coefs), as64(intercepts), X.astype(np.float64),
                                                   Y.astype(np.float64), "tanh", out, 0.1)
    assert abs(loss - rloss) / abs(rloss) < BAR
    for g, r in zip(gw + gb, rgw + rgb):
        assert rel_err(g, r) < BAR


def test_prediction_of_a_row_does_not_depend_on_its_batch(isa, rng):
    coefs, intercepts = make_net(rng, [70, 40, 3])
    X = rng.standard_normal((200, 70)).astype(np.float32)
    full = _core.forward(coefs, intercepts, X, "relu", "softmax", 0, isa)
    for rows in (slice(0, 1), slice(13, 14), slice(5, 42), slice(199, 200)):
        part = _core.forward(coefs, intercepts, np.ascontiguousarray(X[rows]), "relu", "softmax", 0, isa)
        assert part.tobytes() == full[rows].tobytes()


# ------------------------------------------------------------------------------------- bad input


def test_core_rejects_bad_arrays_with_named_errors(rng):
    coefs, intercepts = make_net(rng, [4, 3, 1])
    X = rng.standard_normal((5, 4)).astype(np.float32)
    with pytest.raises(TypeError, match=r"coefs\[0\] must have dtype float32"):
        _core.forward([coefs[0].astype(np.float64), coefs[1]], intercepts, X, "relu", "identity")
    with pytest.raises(ValueError, match=r"coefs\[0\] must be C-contiguous"):
        _core.forward([np.asfortranarray(coefs[0]), coefs[1]], intercepts, X, "relu", "identity")
    with pytest.raises(ValueError, match=r"coefs\[1\] has 2 rows but the previous layer has 3"):
        _core.forward([coefs[0], np.zeros((2, 1), np.float32)], intercepts, X, "relu", "identity")
    with pytest.raises(ValueError, match=r"intercepts\[0\] must have shape \(3,\)"):
        _core.forward(coefs, [np.zeros(2, np.float32), intercepts[1]], X, "relu", "identity")
    with pytest.raises(ValueError, match="X has 3 features"):
        _core.forward(coefs, intercepts, X[:, :3].copy(), "relu", "identity")
    with pytest.raises(TypeError, match="X must have dtype float32"):
        _core.forward(coefs, intercepts, X.astype(np.float64), "relu", "identity")
    with pytest.raises(ValueError, match="activation must be one of"):
        _core.forward(coefs, intercepts, X, "gelu", "identity")
    with pytest.raises(ValueError, match="isa must be"):
        _core.forward(coefs, intercepts, X, "relu", "identity", 0, "sse9")
    bad = (np.array([0, 1], np.int64), np.array([7], np.int32), np.ones(1, np.float32), 4)
    with pytest.raises(ValueError, match=r"X.indices must lie in \[0, 4\)"):
        _core.forward(coefs, intercepts, bad, "relu", "identity")
    bad = (np.array([0, 2], np.int64), np.array([1], np.int32), np.ones(1, np.float32), 4)
    with pytest.raises(ValueError, match="X.indptr must start at 0 and end at len"):
        _core.forward(coefs, intercepts, bad, "relu", "identity")


def test_train_epoch_rejects_bad_order_state_and_batch(rng):
    coefs, intercepts = make_net(rng, [4, 3, 1])
    X = rng.standard_normal((5, 4)).astype(np.float32)
    Y = np.zeros((5, 1), np.float32)
    s1 = [np.zeros_like(p) for p in coefs + intercepts]
    args = ("relu", "identity", 0.0, "sgd", 0.1, 0.9, True, 0.9, 0.999, 1e-8, 0)
    with pytest.raises(ValueError, match=r"order must hold row numbers in \[0, 5\)"):
        _core.train_epoch(coefs, intercepts, s1, [], X, Y, np.array([0, 5], np.int64), 2, *args)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        _core.train_epoch(coefs, intercepts, s1, [], X, Y, np.arange(5, dtype=np.int64), 0, *args)
    with pytest.raises(ValueError, match=r"state1\[0\] must have shape \(4, 3\)"):
        _core.train_epoch(coefs, intercepts, [np.zeros((3, 3), np.float32)] + s1[1:], [], X, Y,
                          np.arange(5, dtype=np.int64), 2, *args)
    with pytest.raises(ValueError, match=r"Y must have shape \(5, 1\)"):
        _core.train_epoch(coefs, intercepts, s1, [], X, np.zeros((4, 1), np.float32), np.arange(5, dtype=np.int64),
                          2, *args)
    with pytest.raises(ValueError, match="must be writeable"):
        ro = coefs[0].copy()
        ro.flags.writeable = False
        _core.train_epoch([ro, coefs[1]], intercepts, s1, [], X, Y, np.arange(5, dtype=np.int64), 2, *args)


# ------------------------------------------------------------------------------------- configuration


def test_show_config_reports_isas_and_threads():
    cfg = _core.show_config()
    assert cfg["active_isa"] in cfg["available_isas"]
    assert set(cfg["available_isas"]) <= set(cfg["compiled_isas"])
    assert cfg["available_isas"][0] == "scalar" and cfg["max_threads"] >= 1


def test_fastrec_isa_environment_caps_the_auto_choice():
    code = "from fastrec import _core; print(_core.show_config()['active_isa'])"
    env = dict(os.environ, FASTREC_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


# Run in a fresh interpreter: FASTREC_ISA is read once, when fastrec is imported.
_IMPORT_AND_LIST_WARNINGS = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastrec
print(json.dumps([[w.category.__name__, str(w.message), w.filename] for w in caught]))
"""


def _import_warnings(isa_value):
    env = dict(os.environ, FASTREC_ISA=isa_value)
    out = subprocess.run([sys.executable, "-c", _IMPORT_AND_LIST_WARNINGS], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("value", ["avx3", "AVX2", " avx2", "sse4"])
def test_an_unknown_fastrec_isa_value_warns_at_import(value):
    """The core ignores a FASTREC_ISA value it does not parse (exact, lower-case names): import says so, naming
    the variable, the value and every accepted value."""
    caught = _import_warnings(value)
    assert len(caught) == 1, caught
    category, message, filename = caught[0]
    assert category == "UserWarning"
    assert "FASTREC_ISA" in message and repr(value) in message
    for accepted in ("auto", "avx512", "avx2", "scalar"):
        assert repr(accepted) in message
    assert filename == "<string>"  # the importing line (here `python -c`), not fastrec's own file


@pytest.mark.parametrize("value", ["", "auto", "scalar", "avx2", "avx512"])
def test_an_accepted_fastrec_isa_value_imports_without_warnings(value):
    assert _import_warnings(value) == []


def test_the_accepted_fastrec_isa_values_are_the_cores_isa_names():
    """_config's list must be what cpp/isa.cpp parses: each listed name is parsed by the core (it may still be
    unavailable on this CPU, a different error), and a name outside the list is refused as unknown."""
    from fastrec._config import ISA_ENVIRONMENT_VALUES

    a = np.ones((2, 2), np.float32)
    for name in ISA_ENVIRONMENT_VALUES:
        try:
            _core.sgemm(a, a, False, False, name, 1)
        except ValueError as exc:
            assert "not available" in str(exc), (name, exc)
    assert set(_core.show_config()["compiled_isas"]) <= set(ISA_ENVIRONMENT_VALUES)
    with pytest.raises(ValueError, match="isa must be"):
        _core.sgemm(a, a, False, False, "avx3", 1)


# ------------------------------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(M=st.integers(0, 70), N=st.integers(0, 70), K=st.integers(0, 300), trans_a=st.booleans(),
       trans_b=st.booleans(), isa=st.sampled_from(_core.available_isas()), threads=st.integers(1, 3))
def test_sgemm_any_shape(M, N, K, trans_a, trans_b, isa, threads):
    check_sgemm(M, N, K, trans_a, trans_b, isa, threads)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("M,K", [(1, 1), (7, 17), (300, 5), (600, 300), (3000, 800)])
def test_sgemm_one_column(M, K, trans_a, trans_b, isa):
    """N = 1 (an MLP's output layer) runs as a matrix-vector product, split over threads by rows."""
    for threads in (1, 3):
        check_sgemm(M, 1, K, trans_a, trans_b, isa, threads)


def check_sgemm(M, N, K, trans_a, trans_b, isa, threads):
    rng = np.random.default_rng(M * 10007 + N * 101 + K)
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    c = _core.sgemm(a, b, trans_a, trans_b, isa, threads)
    A, B = (a.T if trans_a else a).astype(np.float64), (b.T if trans_b else b).astype(np.float64)
    assert c.shape == (M, N)
    # Float32 accumulation in any order errs by at most K * 2^-24 * (|A| @ |B|) per element (the classic
    # dot-product bound); relative to the result itself it is unbounded where terms cancel. A wrong element
    # (a missed or doubled term) is off by about one |a||b| term, far above this.
    bound = max(K, 1) * 2.0**-24 * (np.abs(A) @ np.abs(B)) + 1e-30
    assert (np.abs(c - A @ B) <= bound).all()


@settings(max_examples=40, deadline=None)
@given(n_rows=st.integers(1, 40), n_cols=st.integers(1, 5000), nnz_per_row=st.integers(0, 6),
       width=st.sampled_from([1, 7, 16, 33, 64, 65]))
def test_csr_forward_any_pattern(n_rows, n_cols, nnz_per_row, width):
    """Duplicate column ids within a row, empty rows and explicit zeros all behave like scipy's product."""
    rng = np.random.default_rng(n_rows * 31 + n_cols + width)
    counts = rng.integers(0, nnz_per_row + 1, n_rows)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = rng.integers(0, n_cols, indptr[-1]).astype(np.int32)
    data = rng.standard_normal(indptr[-1]).astype(np.float32)
    data[::5] = 0.0
    coefs = [rng.standard_normal((n_cols, width)).astype(np.float32)]
    intercepts = [rng.standard_normal(width).astype(np.float32)]
    got = _core.forward(coefs, intercepts, (indptr, indices, data, n_cols), "identity", "identity")
    X = sp.csr_matrix((data.astype(np.float64), indices, indptr), shape=(n_rows, n_cols))
    want = X @ coefs[0].astype(np.float64) + intercepts[0]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5 * (1 + np.abs(want).max()))


@settings(max_examples=30, deadline=None)
@given(n_rows=st.integers(1, 300), nnz_per_row=st.integers(0, 12),
       n_cols=st.sampled_from([1, 2, 7, 300, 5000, 70_000, 2**21 + 3]), alpha=st.sampled_from([0.0, 0.1]))
def test_csr_gradients_any_pattern(n_rows, nnz_per_row, n_cols, alpha):
    """The touched-row gradient over any id range and batch size: the grouping of entries by column sorts in
    passes of 4- to 11-bit digits (the width follows the entry count, up to ~3600 entries here; the passes
    stop at the largest id, none for one column), and alpha = 0 skips reading W."""
    rng = np.random.default_rng(n_rows * 131 + nnz_per_row * 7 + n_cols)
    counts = rng.integers(0, nnz_per_row + 1, n_rows)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = rng.integers(0, n_cols, indptr[-1]).astype(np.int32)
    if indptr[-1]:
        indices[0] = n_cols - 1  # the largest id sets the number of passes
    data = rng.standard_normal(indptr[-1]).astype(np.float32)
    coefs, intercepts = make_net(rng, [n_cols, 2, 1])
    Y = make_targets(rng, n_rows, 1, "identity")
    X64 = sp.csr_matrix((data.astype(np.float64), indices, indptr), shape=(n_rows, n_cols))
    loss, gw, gb = _core.loss_and_gradients(coefs, intercepts, (indptr, indices, data, n_cols), Y, "tanh",
                                            "identity", alpha, 0)
    rloss, rgw, rgb = reference.loss_and_gradients(as64(coefs), as64(intercepts), X64, Y.astype(np.float64), "tanh",
                                                   "identity", alpha)
    assert abs(loss - rloss) <= BAR * abs(rloss) + 1e-12
    # The first layer's touched rows, what this test is about: each element sums the few entries of one column.
    # The later layers' gradients are means over up to 300 rows of terms of either sign; where those cancel, a
    # float32 sum's error relative to the result has no bound (the other tests pin them on fixed data).
    assert rel_err(gw[0], rgw[0]) < BAR


def test_csr_gradients_with_ids_above_2_to_the_24(rng):
    """3600 entries (11-bit digits) over ids up to 2^24 + 4: three radix passes, the top digit at bit 18."""
    n_cols, n_rows = 2**24 + 5, 300
    indptr = np.arange(0, 12 * n_rows + 1, 12, dtype=np.int64)
    indices = rng.integers(0, n_cols, 12 * n_rows).astype(np.int32)
    indices[:40] = n_cols - 1 - rng.integers(0, 3, 40)  # repeated ids at the top of the range
    indices[40:46] = [7, 7 + 2**22, 7, 2**23 + 9, 9, 2**23 + 9]  # equal low bits: only the top digit parts them
    data = rng.standard_normal(12 * n_rows).astype(np.float32)
    coefs, intercepts = make_net(rng, [n_cols, 1, 1])
    Y = make_targets(rng, n_rows, 1, "identity")
    X64 = sp.csr_matrix((data.astype(np.float64), indices, indptr), shape=(n_rows, n_cols))
    _, gw, _ = _core.loss_and_gradients(coefs, intercepts, (indptr, indices, data, n_cols), Y, "tanh", "identity",
                                        0.1, 0)
    _, rgw, _ = reference.loss_and_gradients(as64(coefs), as64(intercepts), X64, Y.astype(np.float64), "tanh",
                                             "identity", 0.1)
    touched = np.unique(indices)
    assert rel_err(gw[0][touched], rgw[0][touched]) < BAR
    assert not np.delete(gw[0], touched, axis=0).any()


def test_csr_gradients_with_duplicate_ids_and_empty_rows(isa, rng):
    # Row 0 names column 3 twice, row 1 is empty, row 2 repeats a column of row 0.
    indptr = np.array([0, 3, 3, 5], np.int64)
    indices = np.array([3, 3, 9, 9, 0], np.int32)
    data = np.array([1.0, 2.0, -1.0, 0.5, 1.5], np.float32)
    coefs, intercepts = make_net(rng, [12, 16, 2])
    Y = make_targets(rng, 3, 2, "identity")
    X = (indptr, indices, data, 12)
    X64 = sp.csr_matrix((data.astype(np.float64), indices, indptr), shape=(3, 12))
    loss, gw, gb = _core.loss_and_gradients(coefs, intercepts, X, Y, "tanh", "identity", 0.1, 0, isa)
    rloss, rgw, rgb = reference.loss_and_gradients(as64(coefs), as64(intercepts), X64, Y.astype(np.float64), "tanh",
                                                   "identity", 0.1)
    assert abs(loss - rloss) / abs(rloss) < BAR
    for g, r in zip(gw + gb, rgw + rgb):
        assert rel_err(g, r) < BAR
    assert set(np.flatnonzero(np.abs(gw[0]).sum(axis=1))) == {0, 3, 9}
