"""The sequential model's oracle (fastrec.reference) against finite differences and known values."""

import numpy as np
import pytest

from fastrec import reference as R


def _params(rng, n_items=7, d=8, L=5, blocks=2, heads=2, f=12):
    p = {"item_table": rng.normal(0, .5, (n_items, d)), "position_table": rng.normal(0, .5, (L, d)), "heads": heads,
         "blocks": [], "final_gamma": 1 + .1 * rng.normal(size=d), "final_beta": .1 * rng.normal(size=d)}
    for _ in range(blocks):
        blk = {}
        for k in R.SEQ_BLOCK_KEYS:
            shape = {"W1": (d, f), "b1": (f,), "W2": (f, d)}.get(k, (d, d) if k.startswith("W") else (d,))
            blk[k] = rng.normal(0, .4, shape) + (1.0 if "gamma" in k else 0.0)
        p["blocks"].append(blk)
    return p


SEQS = np.array([[-1, -1, 2, 3, 1], [0, 4, 5, 6, 2], [-1, -1, -1, -1, 3]])
TARGETS = np.array([[-1, -1, 3, 1, 5], [4, 5, 6, 2, 0], [-1, -1, -1, -1, 6]])


def _entries(p):
    for name in ("item_table", "position_table", "final_gamma", "final_beta"):
        yield name, None
    for b in range(len(p["blocks"])):
        for k in R.SEQ_BLOCK_KEYS:
            yield k, b


@pytest.mark.parametrize("objective", ["bce", "softmax", "softmax-logq"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_match_finite_differences(objective, dropout):
    # float64 central differences with step 1e-6: truncation and rounding errors ~1e-9 relative; the
    # analytic gradient must agree to 1e-5 of the largest entry (it agrees to ~1e-7 when correct).
    rng = np.random.default_rng(0)
    p = _params(rng)
    neg = rng.integers(0, 7, (3, 5, 2)) if objective == "bce" else None
    log_q = rng.normal(size=7) if objective == "softmax-logq" else None

    def loss():
        return R.sequential_loss_and_gradients(p, SEQS, TARGETS, neg, dropout=dropout, stream=123, log_q=log_q)[0]

    _, grads = R.sequential_loss_and_gradients(p, SEQS, TARGETS, neg, dropout=dropout, stream=123, log_q=log_q)
    for name, b in _entries(p):
        arr = p[name] if b is None else p["blocks"][b][name]
        g = grads[name] if b is None else grads["blocks"][b][name]
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + 1e-6
            hi = loss()
            arr[idx] = old - 1e-6
            lo = loss()
            arr[idx] = old
            num[idx] = (hi - lo) / 2e-6
        scale = max(np.abs(num).max(), 1e-3)
        assert np.abs(num - g).max() <= 1e-5 * scale, (name, b)


def test_causal_and_padding():
    rng = np.random.default_rng(1)
    p = _params(rng)
    z = R.sequential_forward(p, SEQS)
    later = SEQS.copy()
    later[1, 4] = 5  # change the last event: no earlier position may see it
    z2 = R.sequential_forward(p, later)
    np.testing.assert_array_equal(z[:, :4], z2[:, :4])
    assert np.abs(z[1, 4] - z2[1, 4]).max() > 1e-3
    # a padded history equals the same events with more padding in front (positions count from the end)
    short = np.array([[-1, -1, -1, 2, 3]])
    z3 = R.sequential_forward(p, short)
    z4 = R.sequential_forward(p, np.array([[-1, -1, 0, 2, 3]]))
    assert np.abs(z3[0, 4] - z4[0, 4]).max() > 1e-3  # an extra event changes the latest state


def test_splitmix64_known_values_and_dropout_rate():
    # splitmix64 seeded 0 (Vigna's reference implementation): first outputs.
    out = R.splitmix64_outputs(np.uint64(0), 2)
    assert [int(x) for x in out] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    scale = R.dropout_scale(5, 0, (1000, 64), 0.25)
    assert set(np.unique(scale)) == {0.0, np.float32(1 / 0.75)}
    assert abs((scale == 0).mean() - 0.25) < 0.01  # 64,000 draws: standard error 0.0017
    assert not np.array_equal(scale, R.dropout_scale(5, 1, (1000, 64), 0.25))  # sites draw independently
    np.testing.assert_array_equal(R.dropout_scale(5, 0, (1000, 64), 0.0), 1.0)
