"""The Mult-VAE / Mult-DAE core (cpp/multvae.*) against the float64 NumPy oracle (fastrec.reference), the oracle
against finite differences, the training noise against its reference, and determinism across thread counts.

Tolerance: float32 core vs float64 oracle, relative error < 1e-4 of each array's largest entry (the sums here
run over at most a few hundred terms of O(1) values: float32 rounding gives ~1e-6)."""

import numpy as np
import pytest

from fastrec import _core
from fastrec import reference as ref

ISAS = [isa for isa in ("scalar", "avx2", "avx512") if isa in _core.available_isas()] \
    if hasattr(_core, "available_isas") else ["auto"]


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
    data = rng.integers(1, 3, len(indices)).astype(np.float32)  # counts, not only ones
    return indptr, indices, data, n_items


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("variational", [True, False])
@pytest.mark.parametrize("isa", ISAS)
def test_core_matches_oracle(variational, isa):
    coefs, intercepts, ne = make_net(variational=variational)
    X = make_bags(23, 37, empty=(4,))
    rng = np.random.default_rng(2)
    scale = np.where(rng.random(len(X[1])) < 0.5, 2.0, 0.0).astype(np.float32)
    eps = rng.standard_normal((23, 5)).astype(np.float32)
    got = _core.autoencoder_loss_and_gradients(coefs, intercepts, ne, variational, X, scale, eps, 0.3, 0.01, 2, isa)
    want = ref.multvae_loss_and_gradients(coefs, intercepts, ne, variational, X, scale, eps, 0.3, 0.01)
    for g, w in zip(got[:3], want[:3]):
        assert abs(g - w) <= 1e-4 * max(abs(w), 1e-3)
    for gl, wl in zip(got[3] + got[4], want[3] + want[4]):
        assert rel_err(gl, wl) < 1e-4
    logits = _core.autoencoder_forward(coefs, intercepts, ne, variational, X, 2, isa)
    assert rel_err(logits, ref.multvae_forward(coefs, intercepts, ne, variational, X)) < 1e-4


def test_oracle_finite_differences():
    coefs, intercepts, ne = make_net(n_items=11, hidden=(4,), latent=3)
    coefs = [c.astype(np.float64) for c in coefs]
    intercepts = [b.astype(np.float64) for b in intercepts]
    X = make_bags(6, 11)
    rng = np.random.default_rng(3)
    scale = np.where(rng.random(len(X[1])) < 0.7, 1 / 0.7, 0.0)
    eps = rng.standard_normal((6, 3))
    args = (ne, True, X, scale, eps, 0.4, 0.05)
    _, _, _, gw, gb = ref.multvae_loss_and_gradients(coefs, intercepts, *args)
    h = 1e-6
    for params, grads in ((coefs, gw), (intercepts, gb)):
        for p, g in zip(params, grads):
            for idx in list(np.ndindex(p.shape))[:: max(1, p.size // 15)]:
                if params is coefs and p is coefs[0] and g[idx] == 0.0:
                    continue  # an untouched first-layer row: lazily regularised, no gradient by definition
                old = p[idx]
                p[idx] = old + h
                up = ref.multvae_loss_and_gradients(coefs, intercepts, *args)[0]
                p[idx] = old - h
                down = ref.multvae_loss_and_gradients(coefs, intercepts, *args)[0]
                p[idx] = old
                assert abs((up - down) / (2 * h) - g[idx]) < 1e-6 + 1e-5 * abs(g[idx])


def test_empty_bag_has_only_kl():
    coefs, intercepts, ne = make_net()
    X = (np.array([0, 0], np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), 37)
    eps = np.ones((1, 5), np.float32)
    loss, nll, kl, gw, gb = _core.autoencoder_loss_and_gradients(coefs, intercepts, ne, True, X, None, eps, 0.5, 0.0)
    want = ref.multvae_loss_and_gradients(coefs, intercepts, ne, True, X, None, eps, 0.5, 0.0)
    assert nll == 0.0 and kl > 0 and abs(loss - 0.5 * kl) < 1e-6 * loss
    assert not gw[0].any() and not gw[-1].any()  # no input, no likelihood
    assert rel_err(gw[1], want[3][1]) < 1e-4  # the KL's gradient reaches the encoder


def test_noise_matches_reference():
    X = make_bags(9, 37)
    rows = np.array([5, 0, 17, 3, 8, 100, 2, 9, 11], np.int64)
    scale, eps = _core.autoencoder_noise(X, rows, 7, 0.5, 1234, 42)
    want_scale, want_eps = ref.multvae_noise(X[0], rows, 7, 0.5, 1234, 42)
    np.testing.assert_array_equal(scale, want_scale)
    np.testing.assert_allclose(eps, want_eps, rtol=1e-6, atol=1e-6)
    assert set(np.unique(scale)) <= {0.0, 2.0}
    big = _core.autoencoder_noise((np.array([0, 0], np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), 3),
                                  np.array([0], np.int64), 20000, 0.5, 7, 0)[1]
    assert abs(big.mean()) < 0.05 and abs(big.std() - 1) < 0.05


def train(variational, n_threads, epochs=2):
    coefs, intercepts, ne = make_net(n_items=300, hidden=(20,), latent=8, variational=variational)
    X = make_bags(700, 300, seed=5, empty=(3, 50))
    s1 = [np.zeros_like(a) for a in coefs + intercepts]
    s2 = [np.zeros_like(a) for a in coefs + intercepts]
    t, losses = 0, []
    for e in range(epochs):
        order = np.random.default_rng(e).permutation(700).astype(np.int64)
        loss_sum, t, rows, diverged = _core.autoencoder_train_epoch(
            coefs, intercepts, ne, variational, s1, s2, t, 1e-2, X, order, 128, 0.5, 0.2, 5, 0.001, 9, n_threads)
        assert not diverged and rows == 700
        losses.append(loss_sum / rows)
    return coefs + intercepts + s1 + s2, losses


@pytest.mark.parametrize("variational", [True, False])
def test_training_bitwise_across_threads(variational):
    base, losses = train(variational, 1)
    assert losses[-1] < losses[0]
    for n in (2, 3):
        other, other_losses = train(variational, n)
        assert other_losses == losses
        for a, b in zip(base, other):
            np.testing.assert_array_equal(a, b)


def test_one_step_equals_oracle_adam_on_touched_rows():
    coefs, intercepts, ne = make_net(n_items=40, hidden=(6,), latent=3)
    X = make_bags(10, 40, seed=8)
    before = [a.copy() for a in coefs + intercepts]
    s1 = [np.zeros_like(a) for a in coefs + intercepts]
    s2 = [np.zeros_like(a) for a in coefs + intercepts]
    order = np.arange(10, dtype=np.int64)
    _core.autoencoder_train_epoch(coefs, intercepts, ne, True, s1, s2, 0, 1e-3, X, order, 10, 0.5, 0.2, 0, 0.0, 4, 1)
    scale, eps = _core.autoencoder_noise(X, order, 3, 0.5, 4, 0)
    _, _, _, gw, gb = ref.multvae_loss_and_gradients(before[:len(coefs)], before[len(coefs):], ne, True, X, scale,
                                                     eps, 0.2, 0.0)
    # Adam's first step moves each parameter by lr * g / (|g| + eps'): lr * sign(g) where g is not tiny.
    for new, old, g in zip(coefs + intercepts, before, gw + gb):
        step = new.astype(np.float64) - old
        big = np.abs(g) > 1e-4
        np.testing.assert_allclose(step[big], -1e-3 * np.sign(g[big]), rtol=1e-2)
        assert not step[g == 0].any()  # untouched first-layer rows are not moved


def test_bad_inputs():
    coefs, intercepts, ne = make_net()
    X = make_bags(4, 37)
    with pytest.raises(ValueError, match="columns|coefs"):
        _core.autoencoder_forward(coefs, intercepts, ne, True, X[:3] + (36,))
    with pytest.raises(ValueError, match="indices"):
        bad = X[1].copy()
        bad[0] = 99
        _core.autoencoder_forward(coefs, intercepts, ne, True, (X[0], bad, X[2], 37))
    with pytest.raises(ValueError, match="encoder|fan_in|mean"):
        _core.autoencoder_forward(coefs, intercepts, 1, True, X)
    with pytest.raises(TypeError, match="dtype"):
        _core.autoencoder_forward([coefs[0].astype(np.float64)] + coefs[1:], intercepts, ne, True, X)
    with pytest.raises(ValueError, match="eps"):
        _core.autoencoder_loss_and_gradients(coefs, intercepts, ne, True, X, None, np.zeros((3, 5), np.float32),
                                             0.2, 0.0)
    s = [np.zeros_like(a) for a in coefs + intercepts]
    with pytest.raises(ValueError, match="order"):
        _core.autoencoder_train_epoch(coefs, intercepts, ne, True, s, [a.copy() for a in s], 0, 1e-3, X,
                                      np.array([0, 9], np.int64), 2, 0.5, 0.2, 0, 0.0, 0)
    with pytest.raises(ValueError, match="dropout"):
        _core.autoencoder_train_epoch(coefs, intercepts, ne, True, s, [a.copy() for a in s], 0, 1e-3, X,
                                      np.array([0, 1], np.int64), 2, 1.0, 0.2, 0, 0.0, 0)
