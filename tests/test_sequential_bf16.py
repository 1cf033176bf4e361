"""The sequential model's bfloat16 training products (SequentialModel(precision="bf16"),
SequentialRecommender(precision=)) against the oracle reference.sequential_loss_and_gradients(precision="bf16").

In bf16 every projection and feed-forward product (forward, weight gradient, input gradient) takes operands
rounded to bf16 (8-bit significands: relative rounding error u = 2^-9) and sums in float32; the rest of the
step is float32. Gradients are compared by the relative Frobenius error of each array (||a - b|| / ||b||), the
loss by its relative error.

- core vs the bf16 oracle (float64 sums on the same rounded operands): gradients 5e-3, loss 1e-4. The core
  rounds its float32 values, the oracle its float64 values cast to float32; the two differ by float32
  rounding (~1e-7 relative), which flips the bf16 rounding of an operand lying that close to a rounding
  boundary: that element then differs by one bf16 step (2u = 2^-8 relative) between core and oracle. A few
  dozen flips per step, spread by the later layers, give measured errors of 6e-5 to 2.4e-3 over 12 draws
  (seeds 21-26, dropout 0 and 0.2); 5e-3 is twice the worst. A product left in float32 while the oracle
  rounds it (or the reverse), or a wrong term, moves the gradients by the bf16 rounding itself (next point:
  2e-3 to 0.16), i.e. above this tolerance for most arrays, and the test also requires the bf16 core to sit
  at least 5x nearer the bf16 oracle than the float32 one summed over the weight gradients (measured ~100x).
  Where the core's float32 parts sum in another order (the scalar ISA path, or a Debug build without
  vectorisation: sequential sums carry more float32 rounding), more operands flip: measured up to 1.0e-2 on
  an array whose bf16-vs-float32 distance is 5.9e-2 (ratio 0.17 at most over all arrays). Flips move a subset
  of the operands by the same step the rounding itself takes, so an array may also pass by sitting at least 3x
  nearer the bf16 oracle than the float32 one (per array: error < max(5e-3, error vs float32 / 3)).
- core vs the float32 oracle: gradients 0.3, loss 4e-3. Each rounded product term carries a relative error
  of at most 2u + u^2 ~ 2^-8 (both operands), the loss passes 6 rounded products forward and the gradients
  up to 18 (forward and backward of 2 blocks); the loss, a mean of softplus terms, moves by about the
  forward's relative error (measured <= 6e-4 against a first-order 6 x 2^-8 ~ 0.023 bound on the terms;
  4e-3 is ~7x the measured). A gradient array is a sum over the batch's rows of terms of both signs whose
  magnitudes add up to several times the sum's (measured errors 2e-3 to 0.155 over the 12 draws above):
  18 x 2^-8 ~ 0.07 per unit of cancellation, so 0.3 allows a ~4x cancellation. Not tight (bf16 is not
  float32), but it catches a broken product (an error of order 1).
"""

import importlib.util
import pathlib

import numpy as np
import pytest

import fastrec
from fastrec import _core
from fastrec import reference as ref

# The core tests' helpers (pytest's importlib mode does not put tests/ on sys.path).
_spec = importlib.util.spec_from_file_location("_sequential_core_helpers_bf16",
                                               pathlib.Path(__file__).with_name("test_sequential_core.py"))
_core_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_core_tests)
N_ITEMS, arrays, batch, copy_params = _core_tests.N_ITEMS, _core_tests.arrays, _core_tests.batch, _core_tests.copy_params
histories, make_params, threads_params = _core_tests.histories, _core_tests.make_params, _core_tests.threads_params
training = _core_tests.training

BF16_TOL, BF16_LOSS_TOL = 5e-3, 1e-4
F32_TOL, F32_LOSS_TOL = 0.3, 4e-3
KERNELS = _core.bf16_kernels()


def same_on_any_thread_count(m, seqs, targets, negatives, seed):
    """The loss and gradients of one step (dropout 0.2) on 1 thread, after checking 2 and 3 give the same bits."""
    l1, g1 = m.loss_and_gradients(seqs, targets, negatives, 0.2, seed, 1, "auto")
    for n in (2, 3):
        ln, gn = m.loss_and_gradients(seqs, targets, negatives, 0.2, seed, n, "auto")
        assert ln == l1
        for (name, a), (_, b) in zip(arrays(gn), arrays(g1)):
            np.testing.assert_array_equal(a, b, err_msg=name)
    return l1, g1


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


def grad_errors(g, gr):
    """name -> relative Frobenius error of each gradient array (bk left out: its exact value is 0, see
    test_sequential_core, and the float32 tests bound it)."""
    out = {}
    for (name, a), (_, b) in zip(arrays(g), arrays(gr)):
        if not name.endswith(".bk"):
            out[name] = float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_bf16_step_matches_bf16_oracle(kernel, dropout):
    rng = np.random.default_rng(21)
    p = make_params(rng, d=32, L=12, heads=2, f=48)
    seqs, targets, negatives = batch(rng, 24, 12, 2)
    m = _core.SequentialModel(p, precision="bf16", bf16_kernel=kernel)
    assert m.precision == "bf16"
    loss, g = m.loss_and_gradients(seqs, targets, negatives, dropout, 5, 1, "auto")
    p64 = ref.float64_copy(p)
    want, gr = ref.sequential_loss_and_gradients(p64, seqs, targets, negatives, dropout, 5, precision="bf16")
    want32, gr32 = ref.sequential_loss_and_gradients(p64, seqs, targets, negatives, dropout, 5)
    assert abs(loss - want) <= BF16_LOSS_TOL * abs(want)
    assert abs(loss - want32) <= F32_LOSS_TOL * abs(want32)
    e16, e32 = grad_errors(g, gr), grad_errors(g, gr32)
    for name in e16:
        assert e16[name] < max(BF16_TOL, e32[name] / 3), (name, e16[name], e32[name])
    assert max(e32.values()) < F32_TOL, max(e32.items(), key=lambda kv: kv[1])
    # the rounding happens: the weight gradients sit much nearer the bf16 oracle than the float32 one
    w = [n for n in e16 if n.split(".")[-1] in ("Wq", "Wo", "W1", "W2")]
    assert sum(e16[n] for n in w) < 0.2 * sum(e32[n] for n in w)
    # float32 precision (the default) is unchanged: the float32 oracle at float32's tolerance
    l32, g32 = _core.SequentialModel(p).loss_and_gradients(seqs, targets, negatives, dropout, 5, 1, "auto")
    _core_tests.assert_grads_close(g32, gr32)


def test_bf16_native_and_emulated_agree():
    if "avx512_bf16" not in KERNELS:
        pytest.skip("no AVX512-BF16 here")
    rng = np.random.default_rng(22)
    p = make_params(rng, d=32, L=12, heads=2, f=48)
    seqs, targets, negatives = batch(rng, 24, 12, 2)
    out = [_core.SequentialModel(p, precision="bf16", bf16_kernel=k).loss_and_gradients(
        seqs, targets, negatives, 0.2, 5, 1, "auto") for k in ("emulated", "avx512_bf16")]
    # the same rounded operands, float32 sums in another order: float32 rounding apart, plus the bf16 rounding
    # flips that causes downstream (as core vs oracle: the bf16 oracle's tolerances)
    assert abs(out[0][0] - out[1][0]) <= BF16_LOSS_TOL * abs(out[1][0])
    assert max(grad_errors(out[0][1], out[1][1]).values()) < BF16_TOL


def test_forward_is_float32_whatever_the_training_precision():
    rng = np.random.default_rng(23)
    p = make_params(rng)
    seqs, _, _ = batch(rng, 10, 7, 1)
    np.testing.assert_array_equal(_core.SequentialModel(p, precision="bf16").forward(seqs, False, 1, "auto"),
                                  _core.SequentialModel(p).forward(seqs, False, 1, "auto"))


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_bitwise_across_thread_counts(kernel):
    rng = np.random.default_rng(24)
    p = threads_params(rng)
    m = _core.SequentialModel(p, precision="bf16", bf16_kernel=kernel)
    seqs, targets, negatives = batch(rng, 192, 20, 2, n_items=200)
    same_on_any_thread_count(m, seqs, targets, negatives, 9)
    # a training epoch too (BatchThreads never changes the bits)
    indptr, items, seen = histories(rng, 40, 200, lengths=(3, 9, 20, 25))
    order = np.arange(40, dtype=np.int64)
    tr = training(seen, n_items=200)
    finals = []
    for n in (1, 2, 3):
        q = copy_params(p)
        mq = _core.SequentialModel(q, True, precision="bf16", bf16_kernel=kernel)
        out = mq.train_epoch(None, None, indptr, items, order, 16, tr, 0.2, "sgd", 0.05, 0.9, 0.999, 1e-8, 0, 0, n,
                             "auto")
        finals.append((out[0], q))
    for loss_sum, q in finals[1:]:
        assert loss_sum == finals[0][0]
        for (name, a), (_, b) in zip(arrays(q), arrays(finals[0][1])):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_bf16_sgd_epoch_matches_oracle():
    """An SGD epoch in bf16: each step the bf16 oracle's gradient times the learning rate (the tolerance of
    the first test on the change)."""
    rng = np.random.default_rng(25)
    p = make_params(rng)
    p0 = copy_params(p)
    m = _core.SequentialModel(p, True, precision="bf16")
    indptr, items, seen = histories(rng, 10, N_ITEMS)
    order = np.arange(10, dtype=np.int64)
    tr = training(seen)
    lr = 0.05
    m.train_epoch(None, None, indptr, items, order, 6, tr, 0.2, "sgd", lr, 0.9, 0.999, 1e-8, 0, 0, 1, "auto")
    pr = ref.float64_copy(p0)
    for seqs, targets, negatives, stream in m.epoch_batches(indptr, items, order, 6, tr, 0):
        _, g = ref.sequential_loss_and_gradients(pr, seqs, targets, negatives, 0.2, stream, precision="bf16")
        for (name, a), (_, b) in zip(arrays(pr), arrays(g)):
            a -= lr * b
    for (name, a), (_, b), (_, c) in zip(arrays(p), arrays(pr), arrays(p0)):
        change, want = a.astype(np.float64) - c, b - c
        if np.max(np.abs(want)) > 0:
            # two steps, the second on parameters the first moved (float32 vs float64): the bf16 tolerance
            err = np.linalg.norm(change - want) / np.linalg.norm(want)
            assert err < 2 * BF16_TOL, (name, err)


def test_bad_precision_is_refused():
    p = make_params(np.random.default_rng(26))
    with pytest.raises(ValueError, match="precision"):
        _core.SequentialModel(p, precision="fp16")
    with pytest.raises(ValueError, match="bf16_kernel"):
        _core.SequentialModel(p, precision="bf16", bf16_kernel="amx")
    with pytest.raises(ValueError, match="precision"):
        ref.sequential_loss_and_gradients(p, *batch(np.random.default_rng(0), 3, 7, 1), precision="half")
    with pytest.raises(ValueError, match="precision"):
        fastrec.SequentialRecommender(precision="half").fit([1, 1, 2, 2], [1, 2, 1, 3])


# ---- the estimator ----

def events(seed=0, n_users=60, n_items=40, per_user=12):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    return users, items


def test_estimator_precision_trains_and_survives_save_load(tmp_path):
    users, items = events()
    kw = dict(embedding_dim=16, max_len=8, epochs=3, early_stopping=False, random_state=0, n_threads=1)
    f32 = fastrec.SequentialRecommender(precision="float32", **kw).fit(users, items)
    b16 = fastrec.SequentialRecommender(precision="bf16", **kw).fit(users, items)
    assert b16.get_params()["precision"] == "bf16"
    # bf16 products change the trained weights, a little (same draws, same data)
    w16, w32 = b16.params_["blocks"][0]["W1"], f32.params_["blocks"][0]["W1"]
    assert not np.array_equal(w16, w32)
    assert np.max(np.abs(w16 - w32)) < 0.1 * np.max(np.abs(w32))
    b16.save(tmp_path / "m.fastrec")
    loaded = fastrec.load(tmp_path / "m.fastrec")
    assert loaded.precision == "bf16"
    np.testing.assert_array_equal(loaded.recommend([0, 1], k=5)[0], b16.recommend([0, 1], k=5)[0])
    # training goes on in bf16 after load: the same step as the saved model's
    loaded.partial_fit(users[:24], items[:24])
    b16.partial_fit(users[:24], items[:24])
    np.testing.assert_array_equal(loaded.params_["blocks"][0]["W1"], b16.params_["blocks"][0]["W1"])
    assert fastrec.SequentialRecommender().precision == "auto"  # the default
    auto = fastrec.SequentialRecommender(precision="auto", **kw)
    want = "bf16" if "avx512_bf16" in KERNELS else "float32"
    assert auto._core_precision() == want


def test_cli_precision_option_reaches_the_sequential_model():
    from fastrec import cli
    args = cli._parser().parse_args(["train", "d.csv", "-o", "m", "--model", "sequential", "--precision", "bf16"])
    assert cli._recommender(args).precision == "bf16"
    args = cli._parser().parse_args(["train", "d.csv", "-o", "m", "--model", "sequential"])
    assert cli._recommender(args).get_params() == fastrec.SequentialRecommender().get_params()


@pytest.mark.skipif("avx512_bf16" not in KERNELS, reason="no AVX512-BF16 here")
@pytest.mark.parametrize("M, N, K, trans_b", [(5391, 192, 64, False), (1000, 64, 192, True), (13, 40, 7, False),
                                              (1, 33, 65, True), (200, 17, 1100, False), (25, 3, 2, True)])
def test_rows_path_gives_bf16_gemm_bits(M, N, K, trans_b):
    """bf16_gemm_rows (the model's products: row-major A converted in place of packed panels) is bf16_gemm
    bit for bit, on any thread count (odd K, partial tiles, K over one block included)."""
    rng = np.random.default_rng(M + N + K)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((N, K) if trans_b else (K, N), dtype=np.float32)
    want = _core.bf16_gemm(a, b, False, trans_b, kernel="avx512_bf16", n_threads=1)
    np.testing.assert_allclose(want, ref.bf16_gemm(a, b, False, trans_b), rtol=1e-4, atol=1e-4 * np.sqrt(K))
    for n in (1, 2, 3):
        np.testing.assert_array_equal(_core.bf16_gemm_rows(a, b, False, trans_b, kernel="avx512_bf16", n_threads=n),
                                      want)


@pytest.mark.skipif("avx512_bf16" not in KERNELS, reason="no AVX512-BF16 here")
@pytest.mark.parametrize("M, N, K", [(5391, 64, 64), (29, 40, 7), (300, 17, 48)])
def test_dropout_residual_bits(M, N, K):
    """The model's dropout residual fused in the rows kernel (x += (a b + bias) * mask, C never written) gives
    the bits of the two steps it replaces: the product with its bias, then x + t * mask in float32 (NumPy,
    no fused multiply-add); any thread count. K over one block is refused (x would take partial sums)."""
    rng = np.random.default_rng(M + N + K)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    bias = rng.standard_normal(N, dtype=np.float32)
    x = rng.standard_normal((M, N), dtype=np.float32)
    drop = np.where(rng.random((M, N)) < 0.2, 0, 1.25).astype(np.float32)
    t = _core.bf16_gemm_rows(a, b, kernel="avx512_bf16", n_threads=1, bias=bias)
    want = x + t * drop
    for n in (1, 2, 3):
        got = _core.bf16_gemm_rows(a, b, kernel="avx512_bf16", n_threads=n, bias=bias, residual=x, drop=drop)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="one block"):
        _core.bf16_gemm_rows(np.ones((3, 1100), np.float32), np.ones((1100, 4), np.float32), kernel="avx512_bf16",
                             residual=np.ones((3, 4), np.float32), drop=np.ones((3, 4), np.float32))


# ---- the weight-gradient kernel (sequential.h seq_bf16_weight_gradient): C = xᵀ dy over a batch's rows ----
# Shapes: the model's (5,800 rows, 64 x 64 and 64 x 192), K over one 1024-row block (1100: two blocks of 550;
# 2049: three), odd K (a last pair with a zero half), M not a multiple of the 6-row tile, N not a multiple of 16
# and over one 64-column tile, and single rows / columns.
WG_SHAPES = [(5800, 64, 192), (5391, 64, 64), (1100, 64, 192), (2049, 7, 130), (7, 13, 40), (1, 1, 1), (3, 100, 3),
             (2100, 5, 17)]


def _wg_operands(K, M, N):
    rng = np.random.default_rng(K + 7 * M + 13 * N)
    return rng.standard_normal((K, M), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32)


@pytest.mark.parametrize("K, M, N", WG_SHAPES)
def test_weight_gradient_against_a_rounded_numpy_product(K, M, N):
    """Against NumPy on the same bf16-rounded operands (ref.bf16_round, tested bitwise in test_bf16.py), summed
    in float64: each bf16 product is exact in float32, so only the float32 sums round, each addition by at most
    2^-24 relative; over K terms (pairs, then K blocks added: fewer additions than K) the error is at most
    K 2^-24 sum_k |x_ki dy_kj|, the bound asserted per element. The column sums (the bias gradient) against
    NumPy's float32 sum in row order, exactly: the same float32 chain."""
    x, dy = _wg_operands(K, M, N)
    want = ref.bf16_round(x).astype(np.float64).T @ ref.bf16_round(dy).astype(np.float64)
    bound = K * 2.0 ** -24 * (np.abs(ref.bf16_round(x)).astype(np.float64).T @ np.abs(ref.bf16_round(dy)))
    sums = np.zeros(N, np.float32)
    for row in dy:
        sums += row
    for kernel in KERNELS:
        got, got_sums = _core._seq_bf16_weight_gradient(x, dy, kernel=kernel)
        assert got.shape == (M, N) and got.dtype == np.float32
        assert np.all(np.abs(got - want) <= bound), kernel
        np.testing.assert_array_equal(got_sums, sums, err_msg=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("K, M, N", WG_SHAPES)
def test_weight_gradient_gives_bf16_gemm_bits(kernel, K, M, N):
    """The model's weight gradients went through bf16_gemm(trans_a) before this kernel; it keeps its bits
    exactly (the same K blocks and pair sums), on 1-3 threads."""
    x, dy = _wg_operands(K, M, N)
    want = _core.bf16_gemm(x, dy, True, False, kernel=kernel, n_threads=1)
    for n in (1, 2, 3):
        np.testing.assert_array_equal(_core._seq_bf16_weight_gradient(x, dy, kernel=kernel, n_threads=n)[0], want,
                                      err_msg=f"{n} threads")


@pytest.mark.skipif("avx512_bf16" not in KERNELS, reason="no AVX512-BF16 here")
def test_weight_gradient_special_values_round_as_bf16_round():
    """The kernel converts with VCVTNE2PS2BF16, which reads denormal floats as zero where ref.bf16_round rounds
    them (0x007FFFC0 rounds up to the smallest normal bf16); a vector holding one takes the exact rounding.
    NaN, inf, denormals, values that round to inf, and signed zeros all give bf16_gemm's bits (NaN where it
    has NaN)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((41, 19), dtype=np.float32)
    dy = rng.standard_normal((41, 37), dtype=np.float32)
    x.view(np.uint32)[3, :] = 0x007FFFC0
    x[5, 4], x[6, 7], x[7, 1], x[8, 2] = 5e-39, -1e-40, np.float32(3.4e38), -0.0
    dy[3, :] = 2.0 ** 100  # the smallest normal times this: a normal product, so a lost rounding would show
    dy[10, 3], dy[11, 4], dy[12, 5] = np.nan, np.inf, -3e-39
    want = _core.bf16_gemm(x, dy, True, False, kernel="avx512_bf16", n_threads=1)
    got, _ = _core._seq_bf16_weight_gradient(x, dy, kernel="avx512_bf16")
    assert np.any(want[:, :] != 0) and np.any(np.isnan(want))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.skipif("avx512_bf16" not in KERNELS, reason="no AVX512-BF16 here")
def test_model_step_with_the_native_kernels():
    """The model's bf16 gradients of the projection and feed-forward weights are this kernel's: the native
    and emulated training steps round the same operands, so the native bias gradients (column sums, float32
    either way) agree with the emulated ones to float32 rounding of the upstream sums, and the two kernels'
    weight gradients stay within the bf16 oracle's tolerance of each other; every array bitwise equal across
    thread counts with the native kernel."""
    rng = np.random.default_rng(31)
    p = make_params(rng, d=64, L=50, heads=1, f=64)
    seqs, targets, negatives = batch(rng, 64, 50, 1)
    m = _core.SequentialModel(p, precision="bf16", bf16_kernel="avx512_bf16")
    l1, g1 = same_on_any_thread_count(m, seqs, targets, negatives, 3)
    le, ge = _core.SequentialModel(p, precision="bf16", bf16_kernel="emulated").loss_and_gradients(
        seqs, targets, negatives, 0.2, 3, 1, "auto")
    assert abs(le - l1) <= BF16_LOSS_TOL * abs(le)
    assert max(grad_errors(g1, ge).values()) < BF16_TOL


_AVX2_STEP = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from fastrec import _core
import test_sequential_core as t
rng = np.random.default_rng(32)
p = t.make_params(rng, d=32, L=20, heads=2, f=48)
seqs, targets, negatives = t.batch(rng, 48, 20, 2)
loss, g = _core.SequentialModel(p, precision="bf16").loss_and_gradients(seqs, targets, negatives, 0.2, 4, 2, "auto")
np.savez({out!r}, loss=np.float64(loss), **{{name: a for name, a in t.arrays(g)}})
"""


def test_fastrec_isa_avx2_trains_with_the_emulated_kernel(tmp_path):
    """Under FASTREC_ISA=avx2 (no AVX-512, so no bf16 kernel) "bf16" trains with the emulated kernel: the
    weight gradients take bf16_gemm's emulated path, and the step equals, bit for bit, the emulated kernel
    asked for explicitly on the avx2 kernels in this process."""
    import os
    import subprocess
    import sys

    out = tmp_path / "avx2.npz"
    code = _AVX2_STEP.format(tests=str(pathlib.Path(__file__).parent), out=str(out))
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FASTREC_ISA="avx2"), check=True)
    got = np.load(out)
    rng = np.random.default_rng(32)
    p = make_params(rng, d=32, L=20, heads=2, f=48)
    seqs, targets, negatives = batch(rng, 48, 20, 2)
    loss, g = _core.SequentialModel(p, precision="bf16", bf16_kernel="emulated").loss_and_gradients(
        seqs, targets, negatives, 0.2, 4, 2, "avx2")
    assert float(got["loss"]) == loss
    for name, a in arrays(g):
        np.testing.assert_array_equal(got[name], a, err_msg=name)
