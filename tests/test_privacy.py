"""Differentially private training (issue 16): the core's DP-SGD step (cpp/private.h) against the NumPy
oracle that loops over examples (`reference.field_private_step`), the ghost norms against explicit
per-example gradients, Poisson sampling, the accountant against dp-accounting, a membership-style bound,
thread determinism and bad input.

Tolerance: the core computes in float32 (rel. error ~1e-6 at these sizes); the oracle in float64. The bar is
1e-4 of each array's change (lr * gradient), the quantity a wrong clip or noise would move.
"""

import warnings

import numpy as np
import pytest

import fastrec
from fastrec import _core, reference
from fastrec._fieldnet import DenseBlock, Field, FieldNet, bags_of_ids
from fastrec.datasets import make_interactions
from fastrec.privacy import DPConfig, effective_noise, epsilon_spent, noise_for_epsilon, user_units

dp_accounting = pytest.importorskip("dp_accounting")

BAR = 1e-4


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-30)


def multi_hot_bags(rng, rows, vocab):
    """Bags of 1-4 ids, every odd bag repeating its first id (a duplicate row within an example)."""
    counts = rng.integers(1, 5, rows)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ids = rng.integers(0, vocab, int(indptr[-1])).astype(np.int32)
    for q in range(1, rows, 2):
        if counts[q] >= 2:
            ids[indptr[q + 1] - 1] = ids[indptr[q]]
    return indptr, ids, rng.uniform(0.2, 1.5, int(indptr[-1])).astype(np.float32)


def build(seed=0, n_users=7, n_items=9, loss="mse"):
    """A field model with every kind of input: id fields, a multi-hot field with duplicates, the GMF pair
    (sharing the id fields' bags), a wide field, a dense block."""
    rng = np.random.default_rng(seed)
    fields = [Field("u", n_users, 4, 0), Field("i", n_items, 4, 1), Field("tags", 5, 3, 1),
              Field("ug", n_users, 4, 0, role="gmf_u", source=0), Field("ig", n_items, 4, 1, role="gmf_v", source=1),
              Field("iw", n_items, 1, 1, role="wide", source=1)]
    u_bags, i_bags = bags_of_ids(np.arange(n_users)), bags_of_ids(np.arange(n_items))
    bags = [u_bags, i_bags, multi_hot_bags(rng, n_items, 5), u_bags, i_bags, i_bags]
    dense_tables = [rng.standard_normal((n_items, 2)).astype(np.float32)]
    net = FieldNet(fields, [DenseBlock("d", 2, 1)], (6,), "tanh", loss, 2, np.random.RandomState(seed),
                   init_scale=0.5)
    net.tables[5][:] = rng.standard_normal(net.tables[5].shape).astype(np.float32)  # wide rows start nonzero
    net.reset_optimizer("sgd")
    return net, bags, dense_tables


def examples(seed, n, n_users=7, n_items=9):
    rng = np.random.default_rng(seed + 100)
    keys = [rng.integers(0, n_users, n).astype(np.int32), rng.integers(0, n_items, n).astype(np.int32)]
    return keys, rng.normal(0, 2.0, n).astype(np.float32)


GROUPS = [0, 1, 2, 0, 1, 1]


def privacy_dict(sigma, C, *, sparse=False, count_noise=1.0, threshold=0.0, seed=5, q=1.0):
    return {"noise_multiplier": sigma, "max_grad_norm": C, "sampling_rate": q, "sparse": sparse,
            "count_noise": count_noise, "threshold": threshold, "seed": seed, "count_group": GROUPS}


def core_step(net, bags, dense_tables, keys, y, privacy, *, alpha, lr, den, step=0, n_threads=1, negatives=0):
    handle = net.handle(bags, dense_tables, training=True)
    sampler = {"negatives": negatives, "user_key": 0, "item_key": 1, "n_items": net.tables[1].shape[0],
               "cdf": None, "seen": None, "seed": 0}
    _, net.adam_t, rows, diverged, error = handle.train_private(
        net.state1, net.state2, keys, y, None, privacy, alpha, den, "sgd", lr, 0.0, False, 0.9, 0.999, 1e-8,
        net.adam_t, sampler, step, 1, n_threads)
    assert not diverged and error is None
    return rows


def check_against_oracle(sigma, C, *, sparse, noise_on, count_noise=1.0, threshold=0.0, n=12, alpha=0.01):
    net, bags, dense_tables = build()
    keys, y = examples(0, n)
    spec = net.spec(bags, dense_tables, training=True)
    lr, den, seed, step = 0.5, 9.0, 5, 0

    def noise(stream, idx):
        if not noise_on:
            return np.zeros(len(idx))
        return _core.dp_normal(seed, step, int(stream), np.asarray(idx, np.uint64))

    out, norms, selected = reference.field_private_step(
        spec, keys, y, None, max_grad_norm=C, noise_multiplier=sigma, denominator=den, alpha=alpha,
        learning_rate=lr, noise=noise, sparse=sparse, count_noise=count_noise, threshold=threshold,
        count_group=GROUPS)
    before = reference.float64_copy(spec)
    privacy = privacy_dict(sigma, C, sparse=sparse, count_noise=count_noise if noise_on else 1e-30,
                           threshold=threshold, seed=seed)
    core_step(net, bags, dense_tables, keys, y, privacy, alpha=alpha, lr=lr, den=den)
    pairs = [(net.coefs[l], out["coefs"][l], before["coefs"][l]) for l in range(len(net.coefs))]
    pairs += [(net.intercepts[l], out["intercepts"][l], before["intercepts"][l]) for l in range(len(net.coefs))]
    pairs += [(net.gmf_w, out["gmf_w"], before["gmf"]["w"])]
    pairs += [(net.tables[i], out["tables"][i], before["fields"][i]["table"]) for i in range(len(net.tables))]
    for k, (got, want, old) in enumerate(pairs):
        assert rel_err(got - old, want - old) < BAR, k
    return norms, selected


@pytest.mark.parametrize("sparse", [False, True])
def test_step_matches_oracle_zero_noise(sparse):
    # C small enough that most examples are clipped, large enough that some are not.
    norms, selected = check_against_oracle(0.0, 1.5, sparse=sparse, noise_on=False, threshold=0.6)
    assert (norms > 1.5).any() and (norms < 1.5).any(), norms
    if sparse:  # the threshold leaves some touched rows out
        assert any(0 < len(s) < 9 for s in selected)


@pytest.mark.parametrize("sparse", [False, True])
def test_step_matches_oracle_with_the_core_noise(sparse):
    check_against_oracle(0.7, 1.5, sparse=sparse, noise_on=True, count_noise=0.8, threshold=1.0)


def test_example_norms_against_explicit_gradients():
    net, bags, dense_tables = build(seed=3, loss="bce")
    keys, y = examples(3, 10)
    y = (y > 0).astype(np.float32)
    spec64 = reference.float64_copy(net.spec(bags, dense_tables, training=True))
    want = []
    for r in range(10):
        _, tg, gg, cg, ig = reference.field_loss_and_gradients(spec64, [k[r:r + 1] for k in keys], y[r:r + 1], None,
                                                               0.0)
        want.append(np.sqrt(sum((a ** 2).sum() for a in tg + cg + ig + [gg])))
    handle = net.handle(bags, dense_tables, training=True)
    sampler = {"negatives": 0, "user_key": 0, "item_key": 1, "n_items": 9, "cdf": None, "seen": None, "seed": 0}
    got = handle.example_norms(keys, y, None, np.arange(10, dtype=np.int64), sampler, privacy_dict(1.0, 1.0), 0)
    assert rel_err(got, want) < BAR


def test_negatives_are_drawn_and_clipped_per_row():
    # With negatives each row is clipped to C / (1 + negatives): the norms hook reports them unclipped.
    net, bags, dense_tables = build(seed=4, loss="bce")
    keys, y = examples(4, 6)
    y = np.ones(6, np.float32)
    handle = net.handle(bags, dense_tables, training=True)
    sampler = {"negatives": 2, "user_key": 0, "item_key": 1, "n_items": 9, "cdf": None, "seen": None, "seed": 0}
    norms = handle.example_norms(keys, y, None, np.arange(6, dtype=np.int64), sampler, privacy_dict(1.0, 1.0), 0)
    assert norms.shape == (18,) and (norms > 0).all()


def test_poisson_sampling_rate():
    n, q = 20000, 0.03
    sizes = [len(_core.dp_poisson_sample(1, t, n, q)) for t in range(200)]
    # mean of 200 Binomial(n, q) sizes: std of the mean sqrt(n q (1 - q) / 200) = 1.7
    assert abs(np.mean(sizes) - n * q) < 6 * np.sqrt(n * q * (1 - q) / 200)
    assert np.std(sizes) == pytest.approx(np.sqrt(n * q * (1 - q)), rel=0.2)
    counts = np.zeros(n)
    for t in range(200):
        rows = _core.dp_poisson_sample(1, t, n, q)
        assert (np.diff(rows) > 0).all() and rows.min() >= 0 and rows.max() < n
        counts[rows] += 1
    # each example's inclusion frequency is q: the first and second half agree, no position is favoured
    assert abs(counts[: n // 2].mean() - counts[n // 2:].mean()) < 0.2
    assert len(_core.dp_poisson_sample(1, 0, 10, 1.0)) == 10 and len(_core.dp_poisson_sample(1, 0, 10, 0.0)) == 0


def test_binomial_draws():
    draws = np.array([_core.dp_binomial(10**7, 3e-6, s) for s in range(400)])
    assert abs(draws.mean() - 30) < 6 * np.sqrt(30 / 400)
    assert draws.var() == pytest.approx(30, rel=0.3)
    big = np.array([_core.dp_binomial(10**6, 0.01, s) for s in range(100)])
    assert abs(big.mean() - 10**4) < 6 * np.sqrt(10**4 / 100)


def test_normal_stream_is_standard_normal_and_keyed():
    z = _core.dp_normal(3, 7, 11, np.arange(100000, dtype=np.uint64))
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert not np.array_equal(z[:100], _core.dp_normal(3, 8, 11, np.arange(100, dtype=np.uint64)))
    assert np.array_equal(z[50:60], _core.dp_normal(3, 7, 11, np.arange(50, 60, dtype=np.uint64)))


def test_sparse_false_positives_on_a_large_table():
    # 10^6 rows, no example: every selected row is a false positive; their number is Binomial(V, p).
    from math import erfc, sqrt
    V, tau, s1 = 10**6, 3.0, 1.0
    p = 0.5 * erfc(tau / (s1 * sqrt(2)))
    net = FieldNet([Field("u", 2, 2, 0), Field("i", V, 2, 1)], [], (2,), "relu", "mse", 2,
                   np.random.RandomState(0), init_scale=0.0)
    net.reset_optimizer("sgd")
    bags = [bags_of_ids(np.arange(2)), bags_of_ids(np.arange(V))]
    keys = [np.zeros(1, np.int32), np.zeros(1, np.int32)]
    handle = net.handle(bags, [], training=True)
    privacy = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sampling_rate": 1e-9, "sparse": True,
               "count_noise": s1, "threshold": tau, "seed": 1}
    changed = []
    for step in range(5):
        before = net.tables[1].copy()
        handle.train_private(net.state1, net.state2, keys, np.zeros(1, np.float32), None, privacy, 0.0, 1.0, "sgd",
                             1.0, 0.0, False, 0.9, 0.999, 1e-8, 0, None, step, 1, 1)
        changed.append(int((net.tables[1] != before).any(axis=1).sum()))
    mean = V * p
    assert abs(np.mean(changed) - mean) < 6 * np.sqrt(mean / 5), changed


def test_epsilon_equals_dp_accounting():
    from dp_accounting import rdp
    q, sigma, steps, delta = 0.01, 1.1, 700, 1e-5
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    assert epsilon_spent([(q, sigma, None, 0, steps)], delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    # the sparse mechanism: the composed event (gradient + 2 count vectors) equals the effective Gaussian
    acc = rdp.RdpAccountant()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma)] +
                                             [dp_accounting.GaussianDpEvent(2.5)] * 2)), steps))
    assert epsilon_spent([(q, sigma, 2.5, 2, steps)], delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-6)
    assert effective_noise(1.0, 2.0, 4) == pytest.approx(0.5 ** 0.5)


def test_noise_for_epsilon_meets_the_target():
    sigma = noise_for_epsilon(2.0, 1e-5, 0.02, 500)
    assert epsilon_spent([(0.02, sigma, None, 0, 500)], 1e-5) <= 2.0
    assert epsilon_spent([(0.02, sigma * 0.99, None, 0, 500)], 1e-5) > 2.0


def recommender_data(implicit=False):
    return make_interactions(n_users=60, n_items=40, n_interactions=1500, implicit=implicit, random_state=0)


def private(**kw):
    args = dict(embedding_dim=8, hidden_layer_sizes=(8,), epochs=2, batch_size=100, early_stopping=False,
                random_state=0, n_threads=1)
    args.update(kw)
    return fastrec.Recommender(**args)


def test_recommender_reports_privacy_spent_and_refuses_past_the_budget():
    d = recommender_data()
    m = private(privacy=DPConfig(target_epsilon=3.0, delta=1e-5)).fit(d.users, d.items, d.ratings)
    eps, delta = m.privacy_spent_
    assert delta == 1e-5 and 2.5 < eps <= 3.0
    with pytest.raises(ValueError, match="budget"):
        m.partial_fit(d.users, d.items, d.ratings)
    m = private(privacy=DPConfig(noise_multiplier=1.0, delta=1e-5)).fit(d.users, d.items, d.ratings)
    first = m.privacy_spent_[0]
    m.partial_fit(d.users[:300], d.items[:300], d.ratings[:300])
    assert m.privacy_spent_[0] > first
    run = m._privacy_run
    assert m.privacy_spent_[0] == pytest.approx(epsilon_spent([tuple(s) for s in run.segments], 1e-5))


def test_recommender_deterministic_across_threads_and_implicit():
    d = recommender_data(implicit=True)
    preds = []
    for threads in (1, 2, 3):
        m = private(privacy=DPConfig(noise_multiplier=0.8), n_threads=threads, negatives=2).fit(d.users, d.items)
        preds.append(m.predict(d.users[:50], d.items[:50]))
    assert np.array_equal(preds[0], preds[1]) and np.array_equal(preds[0], preds[2])


def test_delta_default_and_warning():
    d = recommender_data()
    m = private(privacy=DPConfig(noise_multiplier=1.0)).fit(d.users, d.items, d.ratings)
    assert m.privacy_spent_[1] == pytest.approx(1 / len(d.users))
    with pytest.warns(UserWarning, match="delta"):
        private(privacy=DPConfig(noise_multiplier=1.0, delta=0.1)).fit(d.users, d.items, d.ratings)


def test_membership_bound():
    # Zero noise, fixed seed, with and without one example: each step moves the parameters by at most
    # lr * C / denominator more (plain SGD, no L2), so after T steps by at most T * lr * C / denominator.
    net0, bags, dense_tables = build(seed=6)
    keys, y = examples(6, 12)
    C, lr, den, steps = 0.5, 0.3, 6.0, 4
    privacy = privacy_dict(0.0, C, seed=9, q=1.0)
    net1 = build(seed=6)[0]
    for t in range(steps):
        core_step(net0, bags, dense_tables, keys, y, privacy, alpha=0.0, lr=lr, den=den, step=t)
        core_step(net1, bags, dense_tables, [k[:-1] for k in keys], y[:-1], privacy, alpha=0.0, lr=lr, den=den, step=t)
    params0 = np.concatenate([a.ravel() for a in net0.coefs + net0.intercepts + net0.tables + [net0.gmf_w]])
    params1 = np.concatenate([a.ravel() for a in net1.coefs + net1.intercepts + net1.tables + [net1.gmf_w]])
    diff = np.linalg.norm(params0 - params1)
    assert 0 < diff
    # one step's bound holds exactly; over several steps the gradients of the shared examples differ too, so
    # the first step is checked on its own
    net0, net1 = build(seed=6)[0], build(seed=6)[0]
    core_step(net0, bags, dense_tables, keys, y, privacy, alpha=0.0, lr=lr, den=den)
    core_step(net1, bags, dense_tables, [k[:-1] for k in keys], y[:-1], privacy, alpha=0.0, lr=lr, den=den)
    params0 = np.concatenate([a.ravel() for a in net0.coefs + net0.intercepts + net0.tables + [net0.gmf_w]])
    params1 = np.concatenate([a.ravel() for a in net1.coefs + net1.intercepts + net1.tables + [net1.gmf_w]])
    assert np.linalg.norm(params0 - params1) <= lr * C / den * (1 + 1e-5)


@pytest.mark.parametrize("config, match", [
    (dict(), "noise_multiplier or target_epsilon"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, max_grad_norm=0.0), "max_grad_norm"),
    (dict(noise_multiplier=1.0, delta=1.5), "delta"),
    (dict(noise_multiplier=1.0, unit="household"), "unit"),
    (dict(noise_multiplier=1.0, unit="user", max_examples_per_user=0), "max_examples_per_user"),
    (dict(noise_multiplier=1.0, embedding_mechanism="other"), "embedding_mechanism"),
    (dict(target_epsilon=0.0), "target_epsilon"),
])
def test_bad_config(config, match):
    d = recommender_data()
    with pytest.raises(ValueError, match=match):
        private(privacy=DPConfig(**config)).fit(d.users, d.items, d.ratings)


def test_bad_estimator_settings():
    d = recommender_data()
    cfg = DPConfig(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="user_history"):
        private(privacy=cfg, user_history=True).fit(d.users, d.items, d.ratings)
    with pytest.raises(ValueError, match="negative_sampling"):
        private(privacy=cfg, negative_sampling="popularity").fit(d.users, d.items)
    with pytest.raises(TypeError, match="privacy"):
        private(privacy={"noise_multiplier": 1.0}).fit(d.users, d.items, d.ratings)
    net, bags, dense_tables = build()
    keys, y = examples(0, 5)
    with pytest.raises(ValueError, match="sampling_rate"):
        core_step(net, bags, dense_tables, keys, y, privacy_dict(1.0, 1.0, q=0.0), alpha=0.0, lr=0.1, den=1.0)
    bad = privacy_dict(1.0, 1.0)
    bad["count_group"] = [0, 0, 2, 0, 1, 1]
    with pytest.raises(ValueError, match="count group"):
        core_step(net, bags, dense_tables, keys, y, bad, alpha=0.0, lr=0.1, den=1.0)


def test_private_model_saves_and_loads(tmp_path):
    d = recommender_data()
    m = private(privacy=DPConfig(noise_multiplier=1.0)).fit(d.users, d.items, d.ratings)
    m.save(tmp_path / "m.fastrec")
    m2 = fastrec.load(tmp_path / "m.fastrec")
    assert m2.privacy_spent_ == m.privacy_spent_
    m2.partial_fit(d.users[:200], d.items[:200], d.ratings[:200])
    assert m2.privacy_spent_[0] > m.privacy_spent_[0]


# ------------------------------------------------------------------------------- the privacy unit "user"
def user_privacy(privacy, keys, cap, seed=5, step=0):
    """The privacy dict with the unit "user" over keys[0] (at most cap examples per user), and the units the
    core's step `step` trains on (q = 1: every user, capped), as lists of example indices for the oracle."""
    indptr, rows = user_units(keys[0])
    privacy = dict(privacy, unit_indptr=indptr, unit_rows=rows, unit_cap=cap)
    sample, start = _core.dp_unit_sample(seed, step, privacy["sampling_rate"], indptr, rows, cap)
    return privacy, [list(sample[start[k]:start[k + 1]]) for k in range(len(start) - 1)]


def test_user_units_group_examples_by_user():
    indptr, rows = user_units(np.array([3, 1, 3, 0, 1, 3], np.int32))
    assert indptr.tolist() == [0, 1, 3, 6] and rows.tolist() == [3, 1, 4, 0, 2, 5]


@pytest.mark.parametrize("bad", [np.zeros((2, 3), np.int64), np.array([0.5, 1.5])])
def test_user_units_refuse_what_is_not_user_numbers(bad):
    with pytest.raises(ValueError, match="user_rows"):
        user_units(bad)


@pytest.mark.parametrize("indptr", [[0, 5, 2], [0, 2, 1, 2]])
def test_unit_sample_refuses_a_decreasing_indptr(indptr):
    # a decreasing indptr would make the core read rows past the array's end
    with pytest.raises(ValueError, match="indptr"):
        _core.dp_unit_sample(seed=0, step=0, q=1.0, unit_indptr=np.array(indptr, np.int64),
                             unit_rows=np.arange(2, dtype=np.int64), cap=8)


def test_unit_sample_rate_and_cap():
    # 2000 users with 1..9 examples each; rate 0.1, cap 4
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 10, 2000)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = rng.permutation(int(indptr[-1])).astype(np.int64)
    owner = np.repeat(np.arange(2000), counts)[np.argsort(rows)]  # owner[example] = its user
    sampled = np.zeros(2000)
    for step in range(100):
        sample, start = _core.dp_unit_sample(3, step, 0.1, indptr, rows, 4)
        for k in range(len(start) - 1):
            ex = sample[start[k]:start[k + 1]]
            users = np.unique(owner[ex])
            assert len(users) == 1 and len(np.unique(ex)) == len(ex)  # one user's, distinct
            u = users[0]
            assert len(ex) == min(4, counts[u])  # capped, and all of them below the cap
            sampled[u] += 1
    # each user's inclusion frequency is q: mean over 2000 users of Binomial(100, 0.1) / 100, std 6.7e-4
    assert abs(sampled.mean() / 100 - 0.1) < 6 * np.sqrt(0.1 * 0.9 / 100 / 2000)
    # a user with more than the cap gets different examples on different steps
    big = int(np.argmax(counts))
    chosen = set()
    for step in range(50):
        sample, start = _core.dp_unit_sample(3, step, 1.0, indptr, rows, 4)
        chosen.add(tuple(sample[start[big]:start[big + 1]]))
    assert len(chosen) > 1


@pytest.mark.parametrize("sparse", [False, True])
def test_user_unit_step_matches_oracle(sparse):
    # 20 examples of 7 users, at most 2 per user: each user's summed gradient clipped as one (the oracle sums
    # the per-example gradients of each user's examples, as the core chose them, and clips the sum)
    net, bags, dense_tables = build(seed=1)
    keys, y = examples(1, 20)
    spec = net.spec(bags, dense_tables, training=True)
    lr, den, seed, step, C, sigma = 0.5, 9.0, 5, 0, 6.0, 0.7
    privacy, units = user_privacy(privacy_dict(sigma, C, sparse=sparse, count_noise=0.8, threshold=1.0, seed=seed),
                                  keys, cap=2, seed=seed)
    assert max(len(u) for u in units) == 2 and sum(map(len, units)) < 20  # some users were capped

    def noise(stream, idx):
        return _core.dp_normal(seed, step, int(stream), np.asarray(idx, np.uint64))

    out, norms, selected = reference.field_private_step(
        spec, keys, y, None, max_grad_norm=C, noise_multiplier=sigma, denominator=den, alpha=0.01,
        learning_rate=lr, noise=noise, sparse=sparse, count_noise=0.8, threshold=1.0, count_group=GROUPS,
        units=units)
    assert (norms > C).any() and (norms < C).any(), norms
    before = reference.float64_copy(spec)
    core_step(net, bags, dense_tables, keys, y, privacy, alpha=0.01, lr=lr, den=den)
    pairs = [(net.coefs[l], out["coefs"][l], before["coefs"][l]) for l in range(len(net.coefs))]
    pairs += [(net.intercepts[l], out["intercepts"][l], before["intercepts"][l]) for l in range(len(net.coefs))]
    pairs += [(net.gmf_w, out["gmf_w"], before["gmf"]["w"])]
    pairs += [(net.tables[i], out["tables"][i], before["fields"][i]["table"]) for i in range(len(net.tables))]
    for k, (got, want, old) in enumerate(pairs):
        assert rel_err(got - old, want - old) < BAR, k


def test_user_unit_membership_bound():
    # Zero noise, all users, no cap reached: removing ALL of one user's examples moves one step's parameters
    # by at most lr * C / denominator (the user's summed gradient is clipped to C).
    net0, bags, dense_tables = build(seed=7)
    keys, y = examples(7, 16)
    C, lr, den = 0.5, 0.3, 6.0
    gone = keys[0] == keys[0][0]
    assert gone.sum() >= 2  # the removed user has several examples
    privacy0, _ = user_privacy(privacy_dict(0.0, C, seed=9), keys, cap=16, seed=9)
    rest = [k[~gone] for k in keys]
    privacy1, _ = user_privacy(privacy_dict(0.0, C, seed=9), rest, cap=16, seed=9)
    net1 = build(seed=7)[0]
    core_step(net0, bags, dense_tables, keys, y, privacy0, alpha=0.0, lr=lr, den=den)
    core_step(net1, bags, dense_tables, rest, y[~gone], privacy1, alpha=0.0, lr=lr, den=den)
    params0 = np.concatenate([a.ravel() for a in net0.coefs + net0.intercepts + net0.tables + [net0.gmf_w]])
    params1 = np.concatenate([a.ravel() for a in net1.coefs + net1.intercepts + net1.tables + [net1.gmf_w]])
    assert 0 < np.linalg.norm(params0 - params1) <= lr * C / den * (1 + 1e-5)


def test_recommender_user_unit():
    d = recommender_data(implicit=True)
    cfg = DPConfig(noise_multiplier=1.0, unit="user", max_examples_per_user=4)
    preds = []
    for threads in (1, 2):
        m = private(privacy=cfg, n_threads=threads, negatives=2).fit(d.users, d.items)
        preds.append(m.predict(d.users[:50], d.items[:50]))
        # delta defaults to 1 / (number of users); epsilon counts users sampled at q = batch / capped examples
        n_users = len(np.unique(d.users))
        capped = np.minimum(np.bincount(np.unique(d.users, return_inverse=True)[1]), 4).sum()
        q = 100 / capped
        steps = 2 * max(1, round(1 / q))
        assert m.privacy_spent_[1] == pytest.approx(1 / n_users)
        assert m.privacy_spent_[0] == pytest.approx(epsilon_spent([(q, 1.0, 2.0, 2, steps)], 1 / n_users))
    assert np.array_equal(preds[0], preds[1])


def test_privacy_with_the_default_early_stopping_trains_every_epoch_on_everything():
    # early_stopping=True (the default) under privacy: nothing held out, all epochs run, nothing refused
    d = recommender_data()
    m = private(privacy=DPConfig(noise_multiplier=1.0), early_stopping=True, epochs=3).fit(d.users, d.items,
                                                                                           d.ratings)
    assert len(m.history_["loss"]) == 3 and not hasattr(m, "validation_size_")
    assert not any(k.startswith("val_") for k in m.history_)
    steps = 3 * round(len(d.users) / 100)  # q = 100 / n over all n interactions: none held out
    assert m._privacy_run.steps == steps


@pytest.mark.parametrize("unit", ["example", "user"])
def test_core_steps_bitwise_identical_across_threads(unit):
    # 400 examples at q = 0.5: batches of several 64-row blocks, every input kind, both mechanisms' paths
    # (sparse here: counts, false positives, selected rows), two steps with noise
    results = []
    for threads in (1, 2, 3):
        net, bags, dense_tables = build(seed=2, n_users=30, n_items=40)
        keys, y = examples(2, 400, n_users=30, n_items=40)
        privacy = privacy_dict(0.9, 1.0, sparse=True, count_noise=0.5, threshold=0.8, q=0.5)
        if unit == "user":
            privacy = user_privacy(privacy, keys, cap=3)[0]
        for step in range(2):
            core_step(net, bags, dense_tables, keys, y, privacy, alpha=0.01, lr=0.1, den=200.0, step=step,
                      n_threads=threads, negatives=1)
        results.append([a.copy() for a in net.coefs + net.intercepts + net.tables + [net.gmf_w]])
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))
