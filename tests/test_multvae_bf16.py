"""Mult-VAE / Mult-DAE training with the output layer's products in bfloat16 (precision="bf16").

Both bf16 kernels separately ("avx512_bf16" skipped, with the reason, on CPUs without it; "emulated" always).

Tolerances.
- Against the oracle that rounds the same operands (reference.multvae_loss_and_gradients(precision="bf16"),
  float64 otherwise): the core rounds its float32 h, W and dLoss/dlogits, the oracle the float64 ones rounded to
  float32; the two agree except where a value sits within float32 noise of a bf16 rounding boundary, where they
  round one bf16 ulp (2^-8 relative) apart: a rare term of a sum off by 2^-8 of itself. Allowed: 1e-3 of each
  array's largest entry (measured <= 1.4e-4), loss 1e-5 relative.
- Against the float32 oracle (no rounding): each of the three products takes two operands each within 2^-9
  relative of the float32 ones, so it is within ~2^-8 (|A||B|) of the float32 product; the gradients below the
  output layer inherit that through its input gradient. Allowed: 2e-2 of each array's largest entry (5 x 2^-8;
  measured <= 4.6e-3 on these shapes) and the loss within 1e-4 relative (measured <= 2e-5).
"""

import numpy as np
import pytest

import fastrec
from fastrec import _core
from fastrec import reference as ref



# The helpers of test_multvae_core.py / test_multvae.py (test modules are not importable from each other here).
def make_net(n_items=37, hidden=(9,), latent=5, variational=True, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    enc = [n_items, *hidden, 2 * latent if variational else latent]
    dec = [latent, *hidden[::-1], n_items]
    dims = list(zip(enc[:-1], enc[1:])) + list(zip(dec[:-1], dec[1:]))
    coefs = [(rng.standard_normal(d) * scale).astype(np.float32) for d in dims]
    intercepts = [(rng.standard_normal(d[1]) * 0.1).astype(np.float32) for d in dims]
    return coefs, intercepts, len(enc) - 1


def make_bags(n_rows, n_items, seed=1, empty=()):
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_rows):
        k = 0 if r in empty else int(rng.integers(1, min(12, n_items)))
        rows.append(np.sort(rng.choice(n_items, k, replace=False)).astype(np.int32))
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int32)
    data = rng.integers(1, 3, len(indices)).astype(np.float32)
    return indptr, indices, data, n_items


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _clicks(n_users=120, n_items=60, n=1500, seed=0):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    half = (users % 2) * (n_items // 2)
    items = half + rng.integers(0, n_items // 2, n)
    return users * 10 + 7, items + 1000


SMALL = dict(hidden=(16,), latent=4, epochs=8, batch_size=32, learning_rate=1e-2, random_state=0, n_threads=1)

NATIVE = "avx512_bf16" in _core.bf16_kernels()
KERNELS = [
    "emulated",
    pytest.param("avx512_bf16", marks=pytest.mark.skipif(
        not NATIVE, reason="this CPU has no avx512_bf16 (or FASTREC_ISA caps the ISA below avx512): the "
                           "AVX512-BF16 kernel cannot run here")),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("variational", [True, False])
@pytest.mark.parametrize("n_items,hidden,rows", [(37, (9,), 23), (300, (40,), 64), (1500, (64,), 100)])
def test_loss_and_gradients_against_oracles(kernel, variational, n_items, hidden, rows):
    coefs, intercepts, ne = make_net(n_items=n_items, hidden=hidden, variational=variational)
    X = make_bags(rows, n_items, empty=(4,))
    rng = np.random.default_rng(2)
    scale = np.where(rng.random(len(X[1])) < 0.5, 2.0, 0.0).astype(np.float32)
    eps = rng.standard_normal((rows, 5)).astype(np.float32)
    got = _core.autoencoder_loss_and_gradients(coefs, intercepts, ne, variational, X, scale, eps, 0.3, 0.01, 2,
                                               "auto", "bf16", kernel)
    bf16 = ref.multvae_loss_and_gradients(coefs, intercepts, ne, variational, X, scale, eps, 0.3, 0.01,
                                          precision="bf16")
    f32 = ref.multvae_loss_and_gradients(coefs, intercepts, ne, variational, X, scale, eps, 0.3, 0.01)
    assert abs(got[0] - bf16[0]) <= 1e-5 * abs(bf16[0])
    assert abs(got[0] - f32[0]) <= 1e-4 * abs(f32[0])
    for g, w_bf16, w_f32 in zip(got[3] + got[4], bf16[3] + bf16[4], f32[3] + f32[4]):
        assert rel_err(g, w_bf16) < 1e-3
        assert rel_err(g, w_f32) < 2e-2
    # the rounding happened: the output layer's weight gradient is not the float32 one
    assert rel_err(got[3][-1], f32[3][-1]) > 1e-5


def train(variational, n_threads, precision, kernel="auto", epochs=2):
    coefs, intercepts, ne = make_net(n_items=300, hidden=(20,), latent=8, variational=variational)
    X = make_bags(700, 300, seed=5, empty=(3, 50))
    s1 = [np.zeros_like(a) for a in coefs + intercepts]
    s2 = [np.zeros_like(a) for a in coefs + intercepts]
    t, losses = 0, []
    for e in range(epochs):
        order = np.random.default_rng(e).permutation(700).astype(np.int64)
        loss_sum, t, rows, diverged = _core.autoencoder_train_epoch(
            coefs, intercepts, ne, variational, s1, s2, t, 1e-2, X, order, 128, 0.5, 0.2, 5, 0.001, 9, n_threads,
            "auto", precision, kernel)
        assert not diverged and rows == 700
        losses.append(loss_sum / rows)
    return coefs + intercepts + s1 + s2, losses


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("variational", [True, False])
def test_training_bitwise_across_threads(kernel, variational):
    base, losses = train(variational, 1, "bf16", kernel)
    assert losses[-1] < losses[0]
    for n in (2, 3):
        other, other_losses = train(variational, n, "bf16", kernel)
        assert other_losses == losses
        for a, b in zip(base, other):
            np.testing.assert_array_equal(a, b)
    # close to float32 training, yet not it (the first epoch's mean loss within 0.1%: bf16 products)
    f32, f32_losses = train(variational, 1, "float32")
    assert abs(losses[0] - f32_losses[0]) <= 1e-3 * abs(f32_losses[0])
    assert not all(np.array_equal(a, b) for a, b in zip(base, f32))


@pytest.mark.parametrize("cls", [fastrec.MultVAE, fastrec.MultDAE])
def test_estimator_precision(tmp_path, cls):
    users, items = _clicks(seed=3)
    models = [cls(**{**SMALL, "n_threads": t, "epochs": 3, "precision": "bf16"}).fit(users, items) for t in (1, 2)]
    assert models[0].history_["loss"] == models[1].history_["loss"]
    for a, b in zip(models[0].coefs_ + models[0].intercepts_, models[1].coefs_ + models[1].intercepts_):
        np.testing.assert_array_equal(a, b)
    f32 = cls(**{**SMALL, "epochs": 3, "precision": "float32"}).fit(users, items)
    assert f32.history_["loss"] != models[0].history_["loss"]
    np.testing.assert_allclose(models[0].history_["loss"], f32.history_["loss"], rtol=1e-2)
    # "auto" is bf16 where the CPU has AVX512-BF16, else float32
    auto = cls(**{**SMALL, "epochs": 3}).fit(users, items)  # the default
    assert auto.precision == "auto"
    want = models[0] if NATIVE else f32
    assert auto.history_["loss"] == want.history_["loss"]
    # saved and loaded with the model; training continues in bf16
    models[0].save(tmp_path / "m.fastrec")
    loaded = fastrec.load(tmp_path / "m.fastrec")
    assert loaded.precision == "bf16"
    np.testing.assert_array_equal(loaded.recommend(users[:9], k=5)[0], models[0].recommend(users[:9], k=5)[0])
    models[0].partial_fit(users[:50], items[:50])
    loaded.partial_fit(users[:50], items[:50])
    for a, b in zip(models[0].coefs_, loaded.coefs_):
        np.testing.assert_array_equal(a, b)


def test_scoring_stays_float32():
    users, items = _clicks(seed=4)
    model = fastrec.MultVAE(**{**SMALL, "epochs": 2, "precision": "bf16"}).fit(users, items)
    X = model._matrix()
    logits = _core.autoencoder_forward(model.coefs_, model.intercepts_, model.n_encoder_, True, X, 1, "auto")
    want = ref.multvae_forward(model.coefs_, model.intercepts_, model.n_encoder_, True, X)
    assert rel_err(logits, want) < 1e-4  # float32 vs float64 (test_multvae_core's tolerance)


@pytest.mark.parametrize("bad", ["bfloat16", "fp16", 16, None])
def test_bad_precision(bad):
    users, items = _clicks()
    with pytest.raises(ValueError, match="precision"):
        fastrec.MultVAE(**{**SMALL, "precision": bad}).fit(users, items)
    coefs, intercepts, ne = make_net()
    X = make_bags(4, 37)
    with pytest.raises(ValueError, match="precision"):
        _core.autoencoder_loss_and_gradients(coefs, intercepts, ne, True, X, None, None, 0.2, 0.0, 1, "auto", "f16")
    with pytest.raises(ValueError, match="kernel"):
        _core.autoencoder_loss_and_gradients(coefs, intercepts, ne, True, X, None, None, 0.2, 0.0, 1, "auto", "bf16",
                                             "amx")
