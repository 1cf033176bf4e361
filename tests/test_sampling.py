"""Negative sampling of `Recommender` on implicit feedback, observed through its own training step.

What is specified (the `negatives` / `negative_sampling` parameters, docs/DESIGN.md "Negative sampling"):
every positive (u, i) of a batch brings `negatives` rows (u, j, label 0); j is drawn uniformly or proportionally
to count_j^0.75 (count_j: the item's training interactions), and a draw that is one of u's training items is
drawn again, at most 64 draws, the 64th being kept whatever it is. "uniform" is uniform over the items with
training interactions, like "popularity" (both give an item without interactions no mass).

So the negative of user u is item j with probability, for p the sampling distribution and m_u = p(seen by u):
    p_j (1 - m_u^64) / (1 - m_u)   for j not seen by u  (accepted at draw 1, 2, ..., 64)
    p_j m_u^63                     for j seen by u      (63 rejections, then kept at draw 64)

How the draws are observed. One training step is made to write them into the user GMF table, exactly:
- every parameter is set to zero, so every row of the batch has logit 0 and d loss / d logit = (sigmoid(0) -
  y) / n = (0.5 - y) / n (docs/DESIGN.md, "bce"; n = rows in the batch, positives and negatives);
- the item GMF table holds one-hot rows (item id row r -> unit vector e_r) and the GMF weights are ones, so the
  gradient of user u's GMF row, component r, is the sum over u's rows in the batch with item row r of
  (0.5 - y) / n: (negatives of (u, r) - positives of (u, r)) / (2n);
- one batch (batch_size >= interactions), plain SGD at learning rate 1, no L2 and no id dropout: the user GMF
  row after the step is minus that gradient. With n a power of two every term is a power of two and every
  sum is exact in float32, so the counts come back as integers (checked: a broken premise shows there).
The row numbers are those of the documented id mapping (ids numbered in sorted order, 1..N; row 0 the unknown
one, also read by ids known only from a feature table); tests/test_pipeline.py checks that mapping.

Statistics: per user group (users with the same training items draw from the same distribution), Pearson's
chi-square of the drawn counts against the distribution above, cells with an expected count under 5 merged;
the groups' statistics and degrees of freedom add up (independent draws). Significance 0.001 with a fixed seed:
a correct sampler fails for one seed in a thousand, and this seed is fixed. Each test also shows it has power:
the same counts reject the nearest wrong hypotheses (exponents 0.5 and 1, uniform vs popularity) at p < 1e-9.
"""

import functools

import numpy as np
import pytest
from scipy import stats

import fastrec
from fastrec.features import FeatureTable

N_ITEMS = 20  # items 0..19 with interactions; item 20 is known only from the item feature table
NEGATIVES = 7  # 1 + 7 = 8 rows per positive: n = 4096 * 8 = 2^15 rows in the batch
ALPHA = 1e-3  # significance of the goodness-of-fit tests
# Group g: GROUP_SIZES[g] users, each interacting once with items 0..g. Item j's count is then the number of
# users in groups j..19 (from 15 to 394: count^0.75 spans a factor 12); group 19 has seen every item, group 18
# all but the rarest, so the 64-draw cap shows in the upper groups (from group 14 for popularity sampling, 17
# for uniform) and never in the lower ones. Sum of sizes x (g + 1) = 4096 interactions, a power of two as the
# exact observation needs.
GROUP_SIZES = np.array([20, 20, 20, 19] + [20] * 15 + [15])


def _interactions():
    users, items, group_of_user = [], [], []
    for g, size in enumerate(GROUP_SIZES):
        for _ in range(size):
            u = len(group_of_user)
            group_of_user.append(g)
            users += [u] * (g + 1)
            items += list(range(g + 1))
    return np.array(users), np.array(items), np.array(group_of_user)


@functools.lru_cache(maxsize=None)
def _drawn_negatives(negative_sampling):
    """(counts (n_users, N_ITEMS + 1) of the negatives each user drew, item id row 0 first, then items 0..19 at
    rows 1..20; the users' raw ids are 0..n_users-1 (rows 1..n_users))."""
    users, items, _ = _interactions()
    assert len(users) == 4096
    cold = FeatureTable([N_ITEMS], numeric={"x": [1.0]})  # an item with features but no interaction
    rec = fastrec.Recommender(embedding_dim=N_ITEMS + 1, hidden_layer_sizes=(), gmf=True, id_dropout=0.0,
                              optimizer="sgd", learning_rate=1e-9, alpha=0.0, epochs=1, batch_size=len(users),
                              negatives=NEGATIVES, negative_sampling=negative_sampling, early_stopping=False,
                              random_state=0)
    rec.fit(users, items, item_features=cold)
    net = rec.net_
    names = [f.name for f in net.fields]
    for array in [*net.tables, *net.coefs, *net.intercepts]:
        array[...] = 0.0
    item_gmf = net.tables[names.index("item_gmf")]
    assert item_gmf.shape == (N_ITEMS + 1, N_ITEMS + 1)  # id rows 0..20: the unknown row, then the 20 items
    item_gmf[...] = np.eye(N_ITEMS + 1, dtype=np.float32)
    net.gmf_w[...] = 1.0
    # partial_fit on the same interactions: one more epoch (one batch); the seen items stay the same and every
    # count doubles, which leaves both sampling distributions as they were.
    rec.set_params(learning_rate=1.0)
    rec.partial_fit(users, items)

    n_rows = len(users) * (1 + NEGATIVES)
    user_gmf = net.tables[names.index("user_gmf")].astype(np.float64)  # rows 0 (unknown), 1..n_users
    positives = np.zeros_like(user_gmf)
    np.add.at(positives, (users + 1, items + 1), 1.0)
    counts = positives - 2.0 * n_rows * user_gmf
    assert np.array_equal(counts, np.round(counts)), "the observation is not exact: is every logit still 0?"
    assert counts[0].sum() == 0  # no row of the batch reads the unknown user
    assert counts.sum() == len(users) * NEGATIVES and counts.min() >= 0
    return counts[1:].astype(np.int64)


def _popularity(exponent):
    _, items, _ = _interactions()
    return np.bincount(items, minlength=N_ITEMS).astype(np.float64) ** exponent


def _expected(p):
    """(groups, N_ITEMS) probabilities of drawing each item as a negative of a user of each group (see the module
    docstring), for sampling distribution p over the items."""
    p = p / p.sum()
    out = np.zeros((len(GROUP_SIZES), N_ITEMS))
    for g in range(len(GROUP_SIZES)):
        seen = np.arange(N_ITEMS) <= g
        m = p[seen].sum()
        accept = (1.0 - m**64) / (1.0 - m) if m < 1.0 else 0.0
        out[g] = np.where(seen, p * m**63, p * accept)
    assert np.allclose(out.sum(axis=1), 1.0)
    return out


def _group_counts(counts):
    _, _, group_of_user = _interactions()
    return np.stack([counts[group_of_user == g, 1:].sum(axis=0) for g in range(len(GROUP_SIZES))])


def _chi_square(observed, probabilities):
    """Pearson's statistic and degrees of freedom summed over the groups (rows); each group's cells with an
    expected count under 5 are merged into one, itself merged into the smallest other cell if still under 5."""
    statistic, dof = 0.0, 0
    for o, p in zip(observed, probabilities):
        e = o.sum() * p
        small = e < 5
        o_cells, e_cells = list(o[~small]), list(e[~small])
        if small.any():
            o_small, e_small = o[small].sum(), e[small].sum()
            if e_small >= 5:
                o_cells.append(o_small)
                e_cells.append(e_small)
            else:
                k = int(np.argmin(e_cells))
                o_cells[k] += o_small
                e_cells[k] += e_small
        o_cells, e_cells = np.array(o_cells, float), np.array(e_cells)
        statistic += float(((o_cells - e_cells) ** 2 / e_cells).sum())
        dof += len(o_cells) - 1
    return statistic, dof


def _p_value(observed, probabilities):
    statistic, dof = _chi_square(observed, probabilities)
    return stats.chi2.sf(statistic, dof)


def test_the_observation_counts_every_negative_once():
    """The probe itself: each user drew exactly negatives x (its positives) items."""
    counts = _drawn_negatives("popularity")
    users, _, _ = _interactions()
    np.testing.assert_array_equal(counts.sum(axis=1), NEGATIVES * np.bincount(users))


def test_popularity_negatives_follow_count_to_the_power_0_75():
    observed = _group_counts(_drawn_negatives("popularity"))
    assert _p_value(observed, _expected(_popularity(0.75))) > ALPHA
    for wrong in (0.5, 1.0):  # the test tells these apart from 0.75
        assert _p_value(observed, _expected(_popularity(wrong))) < 1e-9


def test_uniform_negatives_are_uniform_over_the_items_with_interactions():
    observed = _group_counts(_drawn_negatives("uniform"))
    assert _p_value(observed, _expected(np.ones(N_ITEMS))) > ALPHA
    assert _p_value(observed, _expected(_popularity(0.75))) < 1e-9


@pytest.mark.parametrize("negative_sampling", ["uniform", "popularity"])
def test_items_without_interactions_are_never_negatives(negative_sampling):
    """Id row 0 is read by the unknown item and by item 20, known only from the feature table: neither is ever
    drawn (neither has training interactions, so neither has sampling mass)."""
    assert _drawn_negatives(negative_sampling)[:, 0].sum() == 0


@pytest.mark.parametrize("negative_sampling", ["uniform", "popularity"])
def test_seen_items_are_excluded_up_to_the_64_draw_cap(negative_sampling):
    """What the sampler really does with a user's own items (the class docstring's "never" holds only while
    64 draws almost surely find an unseen item):
    - users whose items hold so little sampling mass m that m^63 < 1e-9 never get one of them;
    - users who have seen every item get only their own items, as the 64th draw;
    - in between, a negative is one of the user's items with probability m^63 (binomial test, ALPHA)."""
    counts = _drawn_negatives(negative_sampling)
    observed = _group_counts(counts)
    p = _popularity(0.75) if negative_sampling == "popularity" else np.ones(N_ITEMS)
    p = p / p.sum()
    seen_mass = np.cumsum(p)  # group g has seen items 0..g
    seen_drawn = np.array([observed[g, :g + 1].sum() for g in range(len(GROUP_SIZES))])
    total = observed.sum(axis=1)
    never = seen_mass**63 < 1e-9
    assert never[:10].all()  # the low groups are in this regime, in both modes
    assert seen_drawn[never].sum() == 0
    assert seen_drawn[-1] == total[-1] > 0  # group 19 has seen everything
    capped = ~never & (seen_mass < 1.0)
    assert capped.sum() >= 2
    for g in np.flatnonzero(capped):
        assert stats.binomtest(int(seen_drawn[g]), int(total[g]), seen_mass[g] ** 63).pvalue > ALPHA, g
