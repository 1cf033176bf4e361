"""`fastrec._recbase.RecommenderBase` through a toy family that implements only its hooks.

The toy scores a pair by the inner product of fixed vectors derived from the raw ids (`_vec`), so every
expected value here is computed from the raw interactions and `_vec` alone, never from the base's entity
numbering or seen-pairs CSR: what is checked is the base's id mapping, seen-item exclusion (held-out pairs
included, partial_fit's pairs added), candidate subsets, padding, k capping, clipping, similar_items, growth
(and its rollback), and save / load of a family registered with `persistable`.
"""

import numpy as np
import pytest

import fastrec
from fastrec._checks import NotFittedError
from fastrec._recbase import RecommenderBase
from fastrec._registry import persistable
from fastrec.features import FeatureTable

DIM = 4


def _vec(raw_id, side):
    """The toy's fixed vector of a raw id (int or its decimal string) on one side."""
    return np.random.default_rng([int(raw_id), side == "item"]).normal(size=DIM)


@persistable
class ToyVectors(RecommenderBase):
    """Scores = <user vector, item vector>, both fixed functions of the raw ids; unknown entities: zero.
    Training only records what it was given."""

    _fitted_attr = "item_vectors_"
    _structure_params = ("dim",)

    def __init__(self, dim=DIM, epochs=1, validation_metric="auto", early_stopping=True, validation_fraction=0.1,
                 n_iter_no_change=5, clip_predictions=True, random_state=0, n_threads=None, verbose=False,
                 fail_on=None):
        self.dim = dim
        self.epochs = epochs
        self.validation_metric = validation_metric
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.clip_predictions = clip_predictions
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose
        self.fail_on = fail_on  # an item id whose arrival makes _grow_model fail (to test the rollback)

    def _vectors(self, side, start=0):
        ids = self._entities(side).ids[start:]
        rows = np.array([_vec(x, side) for x in ids.tolist()]).reshape(len(ids), DIM)
        return rows if start else np.vstack([np.zeros((1, DIM)), rows])  # row 0: the unknown entity

    def _validate_params(self, implicit):
        if self.dim != DIM:
            raise ValueError(f"dim must be {DIM}")
        return "config"

    def _build(self, user_rows, item_rows, tables, config):
        assert config == "config"
        self.user_vectors_ = self._vectors("user")
        self.item_vectors_ = self._vectors("item")
        self.trained_ = []

    def _grow_model(self, user_rows, item_rows, tables, old):
        if self.fail_on is not None and self.fail_on in self._items.ids[old["item"]:].tolist():
            raise RuntimeError("growth failed")
        self.user_vectors_ = np.vstack([self.user_vectors_, self._vectors("user", old["user"])])
        self.item_vectors_ = np.vstack([self.item_vectors_, self._vectors("item", old["item"])])

    def _train(self, user_rows, item_rows, y, weight, epochs, validate):
        self.trained_.append((user_rows.copy(), item_rows.copy(), y.copy()))
        for _ in range(epochs):
            self.history_["loss"].append(0.0)
            self.history_["seconds"].append(0.0)
            if validate is not None:
                self.history_.setdefault(f"val_{validate[1]}", []).append(validate[0]())

    def _score_pairs(self, user_rows, item_rows):
        return np.einsum("ij,ij->i", self.user_vectors_[user_rows], self.item_vectors_[item_rows])

    def _topk(self, user_rows, k, exclude_seen, candidate_rows):
        scores = self.user_vectors_[user_rows] @ self.item_vectors_[candidate_rows].T
        if exclude_seen:
            indptr, items = self._seen
            for r, u in enumerate(user_rows):
                scores[r, np.isin(candidate_rows, items[indptr[u]:indptr[u + 1]])] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        rows = candidate_rows[order].astype(np.int32)
        top = np.take_along_axis(scores, order, axis=1)
        rows[np.isneginf(top)] = -1
        return rows, top

    def _item_vectors(self):
        return self.item_vectors_, np.arange(1, len(self._items) + 1)


def _expected(user, seen_items, item_ids, k):
    """Independently: the k best of item_ids for one raw user by <_vec(user), _vec(item)>, seen ones skipped,
    padded with -1 / -inf."""
    pool = [i for i in dict.fromkeys(item_ids) if i not in seen_items]
    scored = sorted(((float(_vec(user, "user") @ _vec(i, "item")), i) for i in pool), key=lambda t: -t[0])[:k]
    ids = [i for _, i in scored] + [-1] * (k - len(scored))
    return np.array(ids), np.array([s for s, _ in scored] + [-np.inf] * (k - len(scored)))


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    users = rng.integers(10, 40, 400)
    items = rng.integers(100, 160, 400)
    return users, items


def _seen_of(users, items):
    seen = {}
    for u, i in zip(users.tolist(), items.tolist()):
        seen.setdefault(u, set()).add(i)
    return seen


def test_recommend_excludes_every_interaction_including_held_out(data):
    users, items = data
    model = ToyVectors(epochs=3).fit(users, items)  # early stopping holds some pairs out
    assert model.validation_size_ > 0
    trained_pairs = sum(len(u) for u, _, _ in model.trained_)
    assert trained_pairs == len(users) - model.validation_size_
    assert len(model.history_["val_ndcg@10"]) == 3
    seen = _seen_of(users, items)
    known_items = sorted(set(items.tolist()))
    query = np.array(sorted(seen))
    ids, scores = model.recommend(query, k=7)
    for r, u in enumerate(query.tolist()):
        want_ids, want_scores = _expected(u, seen[u], known_items, 7)
        np.testing.assert_array_equal(ids[r], want_ids)
        np.testing.assert_allclose(scores[r], want_scores, rtol=1e-12)
    got = set(zip(*(a.tolist() for a in model.seen_pairs())))
    assert got == set(zip(users.tolist(), items.tolist()))
    # exclude_seen=False ranks every item
    ids, _ = model.recommend(query[:3], k=5, exclude_seen=False)
    for r, u in enumerate(query[:3].tolist()):
        np.testing.assert_array_equal(ids[r], _expected(u, set(), known_items, 5)[0])


def test_candidates_padding_and_k_cap(data):
    users, items = data
    model = ToyVectors(early_stopping=False).fit(users, items)
    seen = _seen_of(users, items)
    u = int(users[0])
    mine = sorted(seen[u])
    others = [i for i in range(100, 160) if i not in seen[u] and i in set(items.tolist())][:2]
    # candidates: two unseen, all of the user's seen ones, an unknown id and a duplicate
    cands = np.array(others + mine + [999, others[0]])
    ids, scores = model.recommend(u, k=5, items=cands)  # one user: 1-D results
    want_ids, want_scores = _expected(u, seen[u], others, 5)
    np.testing.assert_array_equal(ids, want_ids)  # two left, then padding
    np.testing.assert_allclose(scores, want_scores, rtol=1e-12)
    assert ids.shape == (5,) and (ids[2:] == -1).all() and np.isneginf(scores[2:]).all()
    # k is capped at the number of known candidates
    ids, _ = model.recommend([u], k=50, items=cands, exclude_seen=False)
    assert ids.shape == (1, len(others) + len(mine))
    np.testing.assert_array_equal(ids[0], _expected(u, set(), others + mine, 50)[0][:ids.shape[1]])


def test_string_ids_pad_with_empty_string(data):
    users, items = data
    model = ToyVectors(early_stopping=False).fit(users.astype(str), items.astype(str))
    u = str(users[0])
    seen = _seen_of(users, items)[int(u)]
    ids, scores = model.recommend([u], k=4, items=[str(i) for i in seen])
    assert (ids == "").all() and np.isneginf(scores).all()
    # int queries of string ids are converted where exact
    ids_int, _ = model.recommend([int(u)], k=3)
    ids_str, _ = model.recommend([u], k=3)
    np.testing.assert_array_equal(ids_int, ids_str)


def test_predict_adds_the_mean_and_clips(data):
    users, items = data
    ratings = np.random.default_rng(0).uniform(1, 5, len(users))
    model = ToyVectors(early_stopping=False).fit(users, items, ratings)
    known_u, known_i = sorted(set(users.tolist())), sorted(set(items.tolist()))
    grid = np.array([[_vec(a, "user") @ _vec(b, "item") for b in known_i] for a in known_u])
    hi, lo = np.unravel_index(grid.argmax(), grid.shape), np.unravel_index(grid.argmin(), grid.shape)
    # the pairs of highest and lowest score (clipped), two more, and unknown user 5 (score 0)
    u = np.array([known_u[hi[0]], known_u[lo[0]], 10, 11, 5])
    i = np.array([known_i[hi[1]], known_i[lo[1]], 100, 101, 100])
    raw = np.array([_vec(a, "user") @ _vec(b, "item") if a in known_u else 0.0 for a, b in zip(u, i)])
    want = np.clip(raw + ratings.mean(), ratings.min(), ratings.max())
    assert want[0] == ratings.max() and want[1] == ratings.min()
    np.testing.assert_allclose(model.predict(u, i), want, rtol=1e-12)
    np.testing.assert_allclose(model.trained_[0][2], ratings - ratings.mean(), rtol=1e-6)
    model.set_params(clip_predictions=False)
    np.testing.assert_allclose(model.predict(u, i), raw + ratings.mean(), rtol=1e-12)


def test_similar_items_by_cosine(data):
    users, items = data
    model = ToyVectors(early_stopping=False).fit(users, items)
    known = sorted(set(items.tolist()))
    query = [known[0], known[7], 12345]  # the last one is unknown: the zero vector, all similarities 0
    ids, sims = model.similar_items(query, k=4)
    for r, q in enumerate(query[:2]):
        v = _vec(q, "item")
        scored = sorted(((float(v @ _vec(j, "item") / np.linalg.norm(v) / np.linalg.norm(_vec(j, "item"))), j)
                         for j in known if j != q), key=lambda t: -t[0])[:4]
        np.testing.assert_array_equal(ids[r], [j for _, j in scored])
        np.testing.assert_allclose(sims[r], [s for s, _ in scored], rtol=1e-10)
    assert (sims[2] == 0).all()


def test_growth_save_load_and_rollback(data, tmp_path):
    users, items = data
    model = ToyVectors(early_stopping=False).fit(users, items)
    path = tmp_path / "toy.fastrec"
    model.save(path)
    loaded = fastrec.load(path)
    assert type(loaded) is ToyVectors
    np.testing.assert_array_equal(loaded.recommend([10, 20], k=6)[0], model.recommend([10, 20], k=6)[0])

    # partial_fit: a new user and a new item join the entities and the seen pairs
    new_u, new_i = np.array([10, 77, 77]), np.array([500, 100, 500])
    loaded.partial_fit(new_u, new_i)
    assert loaded.n_users_ == model.n_users_ + 1 and loaded.n_items_ == model.n_items_ + 1
    all_u, all_i = np.concatenate([users, new_u]), np.concatenate([items, new_i])
    seen = _seen_of(all_u, all_i)
    pool = sorted(set(all_i.tolist()))
    for u in (10, 77):
        np.testing.assert_array_equal(loaded.recommend(u, k=8)[0], _expected(u, seen[u], pool, 8)[0])
    assert set(zip(*(a.tolist() for a in loaded.seen_pairs()))) == set(zip(all_u.tolist(), all_i.tolist()))

    # add_features: items known only from a feature table become candidates
    table = FeatureTable(np.array([600, 100]), numeric={"x": np.array([1.0, 2.0])})
    loaded.add_features(item_features=table)
    assert loaded.n_items_ == model.n_items_ + 2
    ids, _ = loaded.recommend(77, k=3, items=[600, 500])  # k capped at 2 candidates
    np.testing.assert_array_equal(ids, _expected(77, seen[77], [600, 500], 2)[0])

    # a growth that fails leaves the entities and seen pairs as they were
    loaded.set_params(fail_on=700)
    before = (loaded._users.ids.copy(), loaded._items.ids.copy(), loaded._seen[0].copy(), loaded._seen[1].copy())
    with pytest.raises(RuntimeError, match="growth failed"):
        loaded.partial_fit(np.array([88]), np.array([700]))
    after = (loaded._users.ids, loaded._items.ids, loaded._seen[0], loaded._seen[1])
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert len(loaded._seen_counts) == len(loaded._items) + 1
    np.testing.assert_array_equal(loaded.recommend(77, k=8)[0], _expected(77, seen[77], pool + [600], 8)[0])


def test_partial_fit_refuses_the_other_feedback_kind(data):
    users, items = data
    model = ToyVectors(early_stopping=False).fit(users, items)
    with pytest.raises(ValueError, match="implicit feedback"):
        model.partial_fit(users[:3], items[:3], np.ones(3))
    with pytest.raises(NotFittedError):
        ToyVectors().recommend([1])
