"""bfloat16 products (cpp/gemm.h bf16_gemm) against the NumPy oracle (fastrec.reference.bf16_gemm).

Both kernels are tested separately: "avx512_bf16" (VDPBF16PS; skipped, with the reason, on CPUs without
avx512_bf16) and "emulated" (the float32 kernels of every available ISA on operands rounded while packing).

Error bound. The core and the oracle both round every operand to bf16 (RNE) and multiply the rounded values,
whose products are exact in float32 (8-bit significands: 16-bit products); they differ only in the order in
which float32 adds the K products. A float32 sum of K terms p_k in any order is within
gamma_K * sum |p_k| of the exact sum, gamma_K = K u / (1 - K u), u = 2^-24 (Higham, Accuracy and Stability,
(3.5)); so |core - exact| <= gamma_K (|op(Ã)| |op(B̃)|) element-wise (Ã, B̃ the rounded operands) and
|core - oracle| <= 2 gamma_K (|op(Ã)| |op(B̃)|). For the K here (<= 2100) that is <= 1.3e-4 of |Ã||B̃|, far
below bf16's own rounding (2^-9 = 2e-3 per operand), so a kernel that skipped the rounding would fail.
The rounding itself is checked bitwise (products with an identity matrix are exact).
"""

import numpy as np
import pytest

from fastrec import _core
from fastrec import reference as ref

NATIVE = "avx512_bf16" in _core.bf16_kernels()
KERNELS = [
    "emulated",
    pytest.param("avx512_bf16", marks=pytest.mark.skipif(
        not NATIVE, reason="this CPU has no avx512_bf16 (or FASTREC_ISA caps the ISA below avx512): the "
                           "AVX512-BF16 kernel cannot run here")),
]
ISAS = list(_core.available_isas())
U = 2.0 ** -24

# Edge tiles of both kernels (12 x 32 register tiles, kc 256 float32 / K blocks <= 1024 bf16, mc 192, nc 4096;
# the scalar and AVX2 emulated paths 4 x 8 / 6 x 16): sizes around them, K odd and even, single rows and columns.
SHAPES = [(1, 1, 1), (1, 37, 5), (7, 1, 3), (12, 32, 2), (13, 33, 3), (11, 31, 1), (4, 8, 7), (5, 17, 16),
          (25, 65, 513), (37, 70, 1025), (193, 40, 257), (40, 4100, 20), (3, 5, 2100), (14, 34, 2049),
          (120, 200, 600)]


def operands(M, N, K, trans_a, trans_b, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    return a, b


def check_against_oracle(c, a, b, trans_a, trans_b):
    K = a.shape[0] if trans_a else a.shape[1]
    A = ref.bf16_round(a).astype(np.float64)
    B = ref.bf16_round(b).astype(np.float64)
    A, B = (A.T if trans_a else A), (B.T if trans_b else B)
    gamma = K * U / (1 - K * U)
    scale = np.abs(A) @ np.abs(B)
    exact = A @ B
    assert c.dtype == np.float32 and c.shape == exact.shape
    assert np.all(np.abs(c - exact) <= gamma * scale)
    oracle = ref.bf16_gemm(a, b, trans_a, trans_b)
    assert np.all(np.abs(c - oracle) <= 2 * gamma * scale)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(kernel, trans_a, trans_b, shape):
    a, b = operands(*shape, trans_a, trans_b)
    c = _core.bf16_gemm(a, b, trans_a, trans_b, kernel=kernel)
    check_against_oracle(c, a, b, trans_a, trans_b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
def test_emulated_on_every_isa(isa, trans_a, trans_b):
    for shape in [(1, 1, 1), (13, 33, 3), (37, 70, 1025), (5, 17, 16)]:
        a, b = operands(*shape, trans_a, trans_b, seed=3)
        c = _core.bf16_gemm(a, b, trans_a, trans_b, kernel="emulated", isa=isa)
        check_against_oracle(c, a, b, trans_a, trans_b)


@pytest.mark.parametrize("kernel", KERNELS)
def test_mult_vae_output_layer_shapes(kernel):
    """The three products of the Mult-VAE output layer at a reduced item count (batch 500, hidden 600)."""
    rng = np.random.default_rng(5)
    H = np.tanh(rng.standard_normal((500, 600))).astype(np.float32)
    W = (rng.standard_normal((600, 1500)) * 0.05).astype(np.float32)
    D = (rng.standard_normal((500, 1500)) * 1e-4).astype(np.float32)
    for a, b, ta, tb in [(H, W, False, False), (H, D, True, False), (D, W, False, True)]:
        check_against_oracle(_core.bf16_gemm(a, b, ta, tb, kernel=kernel), a, b, ta, tb)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_rounding_is_round_to_nearest_even(kernel, trans_a, trans_b):
    """C = A I and C = I B are exact (one non-zero product per element), so they show the rounding itself:
    bitwise the oracle's, ties to even; a row holding inf or NaN gives NaN (inf x 0)."""
    ulp = 2.0 ** -7  # bf16's spacing in [1, 2)
    ties = np.array([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2.0 ** -20, -(1 + ulp / 2), 0.0, -0.0, 1e-30,
                     65504.0, 1.00390625, 3.3e38, -2.5e-38, 123456.789, 1 - 2.0 ** -24, 2.0 ** 100, 0.1], np.float32)
    special = np.array([3.4e38, -3.4e38, np.inf, -np.inf, np.nan], np.float32)  # overflow to inf, NaN kept
    rng = np.random.default_rng(7)
    rest = (rng.standard_normal(85) * 10.0 ** rng.integers(-5, 5, 85)).astype(np.float32)
    x = np.concatenate([ties, special, rest[:10], rest[10:]]).astype(np.float32).reshape(7, 15)  # M 7, K 15 (odd)
    want = ref.bf16_round(x)
    np.testing.assert_array_equal(want[0, :4], np.array([1.0, 1 + 2 * ulp, 1 + ulp, -1.0], np.float32))
    assert np.isinf(want[1, :4]).all() and np.isnan(want[1, 4])
    finite = np.isfinite(want).all(axis=1)
    assert finite.sum() == 6
    eye = np.eye(15, dtype=np.float32)
    a = x.T.copy() if trans_a else x
    got = _core.bf16_gemm(a, eye, trans_a, trans_b, kernel=kernel)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan(got[~finite]).all()
    b = x.copy() if trans_b else x.T.copy()  # C = I op(B) with op(B) = xᵀ (15 x 7)
    got = _core.bf16_gemm(eye, b, False, trans_b, kernel=kernel)
    np.testing.assert_array_equal(got[:, finite], want.T[:, finite])
    assert np.isnan(got[:, ~finite]).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_rounded_inputs_give_the_same_bits(kernel):
    """Rounding happens once, while packing: operands already in bf16 give the same bits."""
    a, b = operands(70, 90, 300, False, True, seed=11)
    c = _core.bf16_gemm(a, b, False, True, kernel=kernel)
    np.testing.assert_array_equal(c, _core.bf16_gemm(ref.bf16_round(a), ref.bf16_round(b), False, True,
                                                     kernel=kernel))
    assert not np.array_equal(c, _core.sgemm(a, b, False, True))  # the float32 product differs


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
def test_bitwise_across_threads(kernel, trans_a, trans_b):
    a, b = operands(301, 455, 777, trans_a, trans_b, seed=4)
    base = _core.bf16_gemm(a, b, trans_a, trans_b, kernel=kernel, n_threads=1)
    for n in (2, 3, 0):
        np.testing.assert_array_equal(_core.bf16_gemm(a, b, trans_a, trans_b, kernel=kernel, n_threads=n), base)


def test_zero_k_and_empty():
    a = np.zeros((3, 0), np.float32)
    b = np.zeros((0, 4), np.float32)
    np.testing.assert_array_equal(_core.bf16_gemm(a, b), np.zeros((3, 4), np.float32))
    assert _core.bf16_gemm(np.zeros((0, 5), np.float32), np.ones((5, 2), np.float32)).shape == (0, 2)


def test_bad_arguments():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="columns"):
        _core.bf16_gemm(a, np.ones((5, 2), np.float32))
    with pytest.raises(ValueError, match="kernel"):
        _core.bf16_gemm(a, np.ones((4, 2), np.float32), kernel="amx")
    if not NATIVE:
        with pytest.raises(ValueError, match="avx512_bf16"):
            _core.bf16_gemm(a, np.ones((4, 2), np.float32), kernel="avx512_bf16")
    assert _core.show_config()["bf16_kernel"] == ("avx512_bf16" if NATIVE else "emulated")


def test_oracle_rounding_against_float_arithmetic():
    """The oracle's integer rounding against an independent one: the nearest of the two bf16 neighbours
    (truncation and truncation + 1 ulp) by float64 distance, ties to the even one."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal(20000) * 10.0 ** rng.integers(-30, 30, 20000)).astype(np.float32)
    bits = x.view(np.uint32)
    down = (bits & 0xFFFF0000).view(np.float32).astype(np.float64)
    up = ((bits & 0xFFFF0000) + 0x10000).astype(np.uint32).view(np.float32).astype(np.float64)
    xd = x.astype(np.float64)
    d_down, d_up = np.abs(xd - down), np.abs(up - xd)
    even_down = ((bits >> 16) & 1) == 0
    want = np.where(d_down < d_up, down, np.where(d_up < d_down, up, np.where(even_down, down, up)))
    np.testing.assert_array_equal(ref.bf16_round(x).astype(np.float64), want)


def test_an_explicit_isa_below_avx512_gets_the_emulated_kernel():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((37, 70), dtype=np.float32), rng.standard_normal((70, 45), dtype=np.float32)
    for isa in [i for i in _core.available_isas() if i != "avx512"]:
        emulated = _core.bf16_gemm(a, b, kernel="emulated", isa=isa)
        # "auto" must not run the AVX-512 kernel when the caller capped the ISA (the same bits as emulated)
        np.testing.assert_array_equal(_core.bf16_gemm(a, b, kernel="auto", isa=isa), emulated)
        with pytest.raises(ValueError, match="avx512_bf16"):
            _core.bf16_gemm(a, b, kernel="avx512_bf16", isa=isa)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trans_a, M, N, K, parts", [
    # the packed-panel path (bf16_gemm; reached through bf16_gemm_rows with a transposed A)
    (True, 300, 64, 256, ("bias", "relu")), (True, 37, 70, 1025, ("mul",)),
    (True, 25, 33, 40, ("addend", "bias", "relu", "mul")), (True, 12, 32, 2, ("bias",)), (True, 13, 17, 7, ("addend",)),
    # the rows path (row-major A read in place: the sequential model's and layer_gemm's products)
    (False, 5391, 192, 64, ("bias",)), (False, 1000, 64, 64, ("addend", "bias")), (False, 300, 48, 32, ("bias", "relu")),
    (False, 29, 40, 7, ("mul",)), (False, 200, 17, 1100, ("addend", "bias", "relu", "mul"))])
def test_epilogue_bits(kernel, trans_a, M, N, K, parts):
    """The epilogues (residual addend, bias, ReLU, ReLU derivative mask), applied in the micro-kernel's registers
    on the packed and on the rows path, give the bits of the same float32 operations in the same order after
    the product: (C + addend) + bias, max(., 0), times (mul > 0). NumPy does them here, in float32, on the
    product without epilogue; full and edge tiles, K over one block; exact equality on any thread count."""
    rng = np.random.default_rng(M + N + K + len(parts))
    a = rng.standard_normal((K, M) if trans_a else (M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    kw = {}
    if "addend" in parts:
        kw["addend"] = rng.standard_normal((M, N), dtype=np.float32)
    if "bias" in parts:
        kw["bias"] = rng.standard_normal(N, dtype=np.float32)
    if "relu" in parts:
        kw["relu"] = True
    if "mul" in parts:
        kw["mul"] = np.maximum(rng.standard_normal((M, N), dtype=np.float32), 0)
    want = _core.bf16_gemm(a, b, trans_a, False, kernel=kernel, n_threads=1)
    if "addend" in kw:
        want = want + kw["addend"]
    if "bias" in kw:
        want = want + kw["bias"]
    if "relu" in kw:
        want = np.where(want > 0, want, np.float32(0))
    if "mul" in kw:
        want = want * (kw["mul"] > 0).astype(np.float32)
    assert want.dtype == np.float32
    for n in (1, 2, 3):
        np.testing.assert_array_equal(_core.bf16_gemm_rows(a, b, trans_a, False, kernel=kernel, n_threads=n, **kw),
                                      want)


@pytest.mark.parametrize("kernel", KERNELS)
def test_denormals_round_as_normal_floats(kernel):
    """Denormal operands round by the same rule (ties to even) on every packing and conversion path, 32 values
    at a time included (the native kernel's VCVTNE2PS2BF16 flushes denormals to zero: such vectors must take
    the integer rounding): a denormal just under the smallest normal float rounds up to it. C = x I and
    C = I xᵀ are exact; where the rounded value is itself denormal, the native VDPBF16PS may flush its product
    to zero, so those elements are checked to be the rounded value or zero."""
    rng = np.random.default_rng(5)
    bits = np.array([0x007FC000, 0x807FFFFF, 0x007F8001, 0x007F8000, 0x00000001, 0x00400000, 0x80012345],
                    np.uint32)
    x = rng.standard_normal((5, 70)).astype(np.float32)
    x[:, 3:3 + len(bits)] = bits.view(np.float32)
    x[2, 40:40 + len(bits)] = bits.view(np.float32)  # in the second 32 of a row too
    want = ref.bf16_round(x)
    assert want[0, 3] == np.finfo(np.float32).tiny and want[0, 4] == -np.finfo(np.float32).tiny
    denormal = (want != 0) & (np.abs(want) < np.finfo(np.float32).tiny)

    def check(got):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got[~denormal], want[~denormal])
        assert np.all((got[denormal] == want[denormal]) | (got[denormal] == 0))

    eye = np.eye(70, dtype=np.float32)
    eye5 = np.eye(5, dtype=np.float32)
    check(_core.bf16_gemm(x, eye, kernel=kernel))                        # A row-major
    check(_core.bf16_gemm(x.T.copy(), eye, True, False, kernel=kernel))  # A k-major
    check(_core.bf16_gemm_rows(x, eye, kernel=kernel))                   # A converted by rows
    check(_core.bf16_gemm(eye5, x, kernel=kernel))                       # B k-major
    check(_core.bf16_gemm(eye5, x.T.copy(), False, True, kernel=kernel))  # B by rows
