"""The Python input pipeline of Recommender and FieldModel against an independent construction of its output.

The oracle tests of test_recommender.py and test_fields.py feed fastrec.reference the inputs the model itself
built (`net_.spec`, `_inputs`), so a wrong id mapping, bag, hash or scaling reaches both sides alike. Here those
inputs are built again, in plain Python and NumPy, from the raw ids, tables and columns and the rules below, and
`predict` is compared with a NumPy forward pass over them:
1. fit a small model whose MLP is one linear layer (hidden_layer_sizes=(): the logit is x . W + b, plus the
   GMF and wide terms), then set every embedding table and weight to random values;
2. construct, for each example, the rows each field reads with their weights, and the numeric inputs;
3. compare `predict` with the forward pass (docs/DESIGN.md, "The field model") over (2), in float64.
The model supplies only its structure: its fields (name, role, key column) and dense blocks, whose order fixes
the layout of the MLP input (DESIGN.md: the "mlp" fields' pooled vectors in order, then the dense blocks).

The rules constructed (Recommender / FieldModel / FeatureTable docstrings, DESIGN.md, recommender.py comments):
- Recommender: users and items are numbered in sorted order of their raw ids; the ids seen in the interactions
  get id rows 1..N in that order, every other id (known only from a feature table, or unknown) reads row 0.
  A categorical feature value reads row 1 + its rank among the column's distinct values in the fit's table,
  row 0 for a value the fit never saw or an entity without a table row. A multi-hot column reads the
  vocabulary's columns (row j = column j of the fit's table), weights divided by their sum (mean pooling);
  labels the fit never saw are left out, an entity without a row has an empty bag. A numeric column is
  standardised with the mean and (population) standard deviation of the fit's table rows (1 where it is 0);
  an entity without a row reads 0. GMF and wide fields read the bags of their source (the ids; the wide
  fields also the categorical / multi-hot values); with gmf_item_features the item GMF vector adds the item's
  feature values. user_history (item_history): the distinct training items of the user (users of the item)
  as id rows, weights 1/sqrt(their number). The prediction adds the first fit's mean rating.
  partial_fit: the ids of its interactions without an id row get the next rows, in the order ids became
  known (sorted within each call); only ids new to the model take features from its tables, encoded and
  scaled as at fit. add_features: the same for ids only in the tables. recommend maps rows back to raw ids.
- FieldModel: a categorical column reads 1 + the value's rank among the distinct training values (0 unseen;
  values new in partial_fit take the next rows, in sorted order); with hash_buckets B, crc32 of the value's
  text mod B, plus 1; a multi-hot column reads its sparse columns with the stored weights, divided by their
  sum for "mean" pooling; a numeric column is standardised with the training mean and population deviation.
  The "mse" prediction adds the mean training target of the fit.
Each prediction check also runs on batches of at most 16 rows, where ids are looked up another way.

Tolerance: the core computes in float32; a prediction sums ~100 products of O(1) values, so it is within
~1e-6 of the float64 pass, and rtol = atol = 1e-5 bounds that; a wrong row, weight or scaling moves a
prediction by ~0.1 or more (random N(0, 1) tables and weights).
"""

import zlib

import numpy as np
import pytest
import scipy.sparse as sp

import fastrec
from fastrec.features import FeatureTable

RTOL = ATOL = 1e-5


# ------------------------------------------------------------------------------------------- shared pieces
def _sorted_numbering(values):
    """Raw value -> 1..N in sorted order of the distinct values (plain Python, independent of fastrec)."""
    return {v: k + 1 for k, v in enumerate(sorted(set(values)))}


def _randomize(net, seed):
    """Every embedding table, MLP weight and GMF weight set to random N(0, 1) values, in place."""
    rng = np.random.default_rng(seed)
    for a in [*net.tables, *net.coefs, *net.intercepts] + ([net.gmf_w] if net.gmf_w is not None else []):
        a[...] = rng.standard_normal(a.shape).astype(np.float32)


def _pool(table, bag):
    """sum_j w_j * table[row_j] over a bag [(row, weight), ...], in float64."""
    out = np.zeros(table.shape[1])
    for row, weight in bag:
        out += weight * table[row].astype(np.float64)
    return out


def _forward(net, bags, dense):
    """The logit of each example (DESIGN.md) from our bags {field name: [bag per example]} and dense inputs
    {block name: (n, c)}, with the model's fields and parameters; a field we did not construct is a KeyError."""
    n = len(next(iter(bags.values())))
    tables = {f.name: t for f, t in zip(net.fields, net.tables)}
    x_parts = [np.array([_pool(tables[f.name], b) for b in bags[f.name]]) for f in net.fields if f.role == "mlp"]
    x_parts += [np.asarray(dense[b.name], np.float64).reshape(n, -1) for b in net.dense]
    assert len(net.coefs) == 1  # the linear head these tests build
    logit = np.hstack(x_parts) @ net.coefs[0][:, 0].astype(np.float64) + float(net.intercepts[0][0])
    for f in net.fields:
        if f.role == "wide":
            logit += np.array([_pool(tables[f.name], b)[0] for b in bags[f.name]])
    gmf_u = [f.name for f in net.fields if f.role == "gmf_u"]
    if gmf_u:
        gmf_v = [f.name for f in net.fields if f.role == "gmf_v"]
        pu = np.array([_pool(tables[gmf_u[0]], b) for b in bags[gmf_u[0]]])
        pv = np.array([_pool(tables[gmf_v[0]], b) for b in bags[gmf_v[0]]])
        logit += (pu * pv) @ net.gmf_w.astype(np.float64)
    return logit


# ------------------------------------------------------------------------------------------- Recommender
# Raw ids of the two kinds; the string ids sort in another order than the int ids they stand for (so a
# numbering that followed the int order, or first appearance, would be caught).
USERS_INT = {"u1": 30, "u2": -4, "u3": 7, "u4": 1000, "u5": 12, "cold": 55, "new": 56, "unknown": 999}
USERS_STR = {"u1": "a", "u2": "d", "u3": "b10", "u4": "c", "u5": "b9", "cold": "e", "new": "f", "unknown": "zz"}
ITEMS_INT = {"i1": 11, "i2": 2, "i3": 5, "i4": 9, "cold": 40, "new": 41, "unknown": 77}
ITEMS_STR = {"i1": "i1", "i2": "i10", "i3": "i2", "i4": "i3", "cold": "z", "new": "zz1", "unknown": "q"}
# (user, item, rating); (u3, i4) twice: an interaction may repeat, a user's history holds the item once.
INTERACTIONS = [("u1", "i3", 4.0), ("u2", "i4", 1.0), ("u3", "i3", 5.0), ("u1", "i1", 3.0), ("u4", "i2", 2.0),
                ("u3", "i4", 4.0), ("u2", "i1", 5.0), ("u5", "i3", 3.5), ("u3", "i4", 2.0), ("u4", "i4", 4.5)]
# Feature tables: rows in an order of their own; "cold" ids appear only here; u1, u5 and i4 have no row.
USER_ROWS = ["u4", "u3", "cold", "u2"]
USER_JOB = ["eng", "art", "law", "art"]
USER_AGE = [31.0, 22.0, 47.0, 60.0]
ITEM_ROWS = ["i1", "cold", "i2", "i3"]
ITEM_YEAR = [1999, 2005, 1999, 1980]  # integer categories
GENRES = ["drama", "comedy", "action"]  # the vocabulary in column order (not sorted)
ITEM_GENRES = [{"drama": 1.0, "action": 2.0}, {"comedy": 1.0}, {}, {"drama": 0.5, "comedy": 0.5, "action": 1.0}]
ITEM_VEC = [[1.0, 5.0], [2.0, 5.0], [4.0, 5.0], [9.0, 5.0]]  # the second column is constant: deviation 0


def _genre_matrix(bags, vocabulary):
    X = sp.lil_matrix((len(bags), len(vocabulary)), dtype=np.float32)
    for r, bag in enumerate(bags):
        for label, w in bag.items():
            X[r, vocabulary.index(label)] = w
    return X.tocsr()


def _recommender_case(kind, features, **params):
    """A fitted Recommender, and our construction of its inputs (`_Expected`) from the raw data it was given."""
    users_of, items_of = (USERS_INT, ITEMS_INT) if kind == "int" else (USERS_STR, ITEMS_STR)
    user_table = item_table = None
    if features:
        user_table = FeatureTable([users_of[u] for u in USER_ROWS], categorical={"job": USER_JOB},
                                  numeric={"age": USER_AGE})
        item_table = FeatureTable([items_of[i] for i in ITEM_ROWS], categorical={"year": ITEM_YEAR},
                                  multi_hot={"genres": (_genre_matrix(ITEM_GENRES, GENRES), GENRES)},
                                  numeric={"vec": ITEM_VEC})
    rec = fastrec.Recommender(embedding_dim=3, hidden_layer_sizes=(), id_dropout=0.0, epochs=1, batch_size=4,
                              early_stopping=False, clip_predictions=False, random_state=0, **params)
    rec.fit(np.array([users_of[u] for u, _, _ in INTERACTIONS]), np.array([items_of[i] for _, i, _ in INTERACTIONS]),
            np.array([r for _, _, r in INTERACTIONS]), user_features=user_table, item_features=item_table)
    return rec, _Expected(users_of, items_of, features)


class _Expected:
    """What the pipeline must feed the model, kept by name ("u1", "i3", ... of USERS_* / ITEMS_*) from the raw
    data above; tests that add ids or features update it by the documented rules."""

    def __init__(self, users_of, items_of, features):
        self.users_of, self.items_of = users_of, items_of
        # Id rows: the interactions' ids numbered in sorted order of their raw ids; any other id reads row 0.
        by_raw = _sorted_numbering(users_of[u] for u, _, _ in INTERACTIONS)
        self.user_row = {u: by_raw[users_of[u]] for u, _, _ in INTERACTIONS}
        by_raw = _sorted_numbering(items_of[i] for _, i, _ in INTERACTIONS)
        self.item_row = {i: by_raw[items_of[i]] for _, i, _ in INTERACTIONS}
        self.history = {}  # user -> its distinct training items
        for u, i, _ in INTERACTIONS:
            self.history.setdefault(u, set()).add(i)
        self.ratings = [r for _, _, r in INTERACTIONS]
        self.features = features
        self.gmf_item_features = False
        # Features by name (absent: no table row), and the fit's vocabularies and scaling.
        self.user_features = dict(zip(USER_ROWS, zip(USER_JOB, USER_AGE))) if features else {}
        self.item_features = dict(zip(ITEM_ROWS, zip(ITEM_YEAR, ITEM_GENRES, ITEM_VEC))) if features else {}
        self.job_code, self.year_code = _sorted_numbering(USER_JOB), _sorted_numbering(ITEM_YEAR)
        self.age_mean, self.age_std = np.mean(USER_AGE), np.std(USER_AGE)
        vec = np.array(ITEM_VEC)
        self.vec_mean, self.vec_std = vec.mean(axis=0), np.where(vec.std(axis=0) > 0, vec.std(axis=0), 1.0)

    def inputs(self, query_users, query_items):
        """Every field's bags and every dense block for the pairs (query_users[r], query_items[r])."""
        user_id = [[(self.user_row.get(u, 0), 1.0)] for u in query_users]
        item_id = [[(self.item_row.get(i, 0), 1.0)] for i in query_items]
        bags = {"user_id": user_id, "item_id": item_id, "user_gmf": user_id, "item_gmf": item_id}
        bags["user_history"] = [[(self.item_row[i], 1.0 / np.sqrt(len(self.history[u]))) for i in self.history[u]]
                                if u in self.history else [] for u in query_users]
        users_of_item = {}  # item -> its distinct training users
        for u, items in self.history.items():
            for i in items:
                users_of_item.setdefault(i, set()).add(u)
        bags["item_history"] = [[(self.user_row[u], 1.0 / np.sqrt(len(users_of_item[i]))) for u in users_of_item[i]]
                                if i in users_of_item else [] for i in query_items]
        dense = {}
        if self.features:
            users = [self.user_features.get(u) for u in query_users]
            items = [self.item_features.get(i) for i in query_items]
            bags["user:job"] = [[(self.job_code.get(f[0], 0) if f else 0, 1.0)] for f in users]
            dense["user:age"] = np.array([[(f[1] - self.age_mean) / self.age_std if f else 0.0] for f in users])
            bags["item:year"] = [[(self.year_code.get(f[0], 0) if f else 0, 1.0)] for f in items]
            bags["item:genres"] = []
            for f in items:
                known = {g: w for g, w in (f[1] if f else {}).items() if g in GENRES}
                bags["item:genres"].append([(GENRES.index(g), w / sum(known.values())) for g, w in known.items()])
            dense["item:vec"] = np.array([(np.array(f[2]) - self.vec_mean) / self.vec_std if f else np.zeros(2)
                                          for f in items])
        if self.gmf_item_features:  # rows [year values (+ the unknown one) | genres | item id rows]
            n_years = len(self.year_code) + 1
            n_features = n_years + len(GENRES)
            bags["item_gmf"] = [year + [(n_years + g, w) for g, w in genres] + [(n_features + r, w) for r, w in ids]
                                for year, genres, ids in zip(bags["item:year"], bags["item:genres"], item_id)]
        for name in list(bags):  # wide fields read the bags of the field they belong to
            bags[f"{name}:wide"] = bags[name]
        return bags, dense

    def check(self, rec, user_names, item_names):
        """predict over every (user, item) pair of these names against the forward pass over our inputs."""
        qu = [u for u in user_names for _ in item_names]
        qi = [i for _ in user_names for i in item_names]
        bags, dense = self.inputs(qu, qi)
        expected = _forward(rec.net_, bags, dense) + np.mean(self.ratings)
        users, items = np.array([self.users_of[u] for u in qu]), np.array([self.items_of[i] for i in qi])
        np.testing.assert_allclose(rec.predict(users, items), expected, rtol=RTOL, atol=ATOL)
        # One pair at a time too: ids are looked up another way in batches of at most 16 (online predictions).
        one = [rec.predict(users[r:r + 1], items[r:r + 1])[0] for r in range(len(qu))]
        np.testing.assert_allclose(one, expected, rtol=RTOL, atol=ATOL)

    def check_recommend(self, rec, user_names, item_names):
        """recommend over all items (item_names: every item the model knows) maps entities back to the raw ids:
        each item once, with the score of our forward pass; exclude_seen drops exactly the user's training
        items (its history)."""
        for u in user_names:
            ids, scores = rec.recommend(self.users_of[u], k=len(item_names), exclude_seen=False)
            bags, dense = self.inputs([u] * len(item_names), item_names)
            want = dict(zip([self.items_of[i] for i in item_names],
                            _forward(rec.net_, bags, dense) + np.mean(self.ratings)))
            assert sorted(ids.tolist()) == sorted(want)
            np.testing.assert_allclose(scores, [want[i] for i in ids.tolist()], rtol=RTOL, atol=ATOL)
            ids, scores = rec.recommend(self.users_of[u], k=len(item_names), exclude_seen=True)
            unseen = {self.items_of[i] for i in item_names} - {self.items_of[i] for i in self.history.get(u, ())}
            assert set(ids[np.isfinite(scores)].tolist()) == unseen  # the rest is padding (score -inf)


def _one_row_tables(expected, user=None, item=None):
    """FeatureTables of one user (name, job, age) and one item (name, year, genre bag, vec), raw ids."""
    user_table = item_table = None
    if user is not None:
        name, job, age = user
        user_table = FeatureTable([expected.users_of[name]], categorical={"job": [job]}, numeric={"age": [age]})
    if item is not None:
        name, year, genres, vec = item
        labels = sorted(genres)
        item_table = FeatureTable([expected.items_of[name]], categorical={"year": [year]},
                                  multi_hot={"genres": (_genre_matrix([genres], labels), labels)},
                                  numeric={"vec": [vec]})
    return user_table, item_table


TRAINED_USERS = ["u1", "u2", "u3", "u4", "u5"]
TRAINED_ITEMS = ["i1", "i2", "i3", "i4"]


@pytest.mark.parametrize("kind", ["int", "str"])
def test_recommender_ids_read_their_rows_and_unknown_ids_row_0(kind):
    """Id, GMF and wide fields: each trained id its row in sorted order, an unknown id row 0."""
    rec, expected = _recommender_case(kind, features=False, gmf=True, wide=True)
    _randomize(rec.net_, seed=1)
    expected.check(rec, TRAINED_USERS + ["unknown"], TRAINED_ITEMS + ["unknown"])


@pytest.mark.parametrize("kind", ["int", "str"])
def test_recommender_feature_tables_become_the_documented_bags_and_scaled_columns(kind):
    """Categorical, multi-hot and numeric columns of both sides, ids known only from a feature table (the
    "cold" user and item: id row 0 plus their own features), ids without a table row, unknown ids."""
    rec, expected = _recommender_case(kind, features=True, gmf=True, wide=True)
    _randomize(rec.net_, seed=2)
    expected.check(rec, TRAINED_USERS + ["cold", "unknown"], TRAINED_ITEMS + ["cold", "unknown"])
    expected.check_recommend(rec, TRAINED_USERS + ["cold", "unknown"], TRAINED_ITEMS + ["cold"])


@pytest.mark.parametrize("kind", ["int", "str"])
def test_recommender_unseen_feature_values_after_add_features(kind):
    """A user and an item added by add_features: an unseen job and year read row 0, the unseen genre is left
    out of the mean, the numeric columns are scaled with the fit's statistics."""
    rec, expected = _recommender_case(kind, features=True, gmf=True, wide=True)
    new_user, new_item = ("new", "chef", 40.0), ("new", 2020, {"horror": 1.0, "drama": 3.0}, [3.0, 6.0])
    user_table, item_table = _one_row_tables(expected, new_user, new_item)
    rec.add_features(user_features=user_table)
    rec.add_features(item_features=item_table)
    expected.user_features["new"] = new_user[1:]
    expected.item_features["new"] = new_item[1:]
    _randomize(rec.net_, seed=3)
    expected.check(rec, TRAINED_USERS + ["cold", "new", "unknown"], TRAINED_ITEMS + ["cold", "new", "unknown"])


@pytest.mark.parametrize("kind", ["int", "str"])
def test_recommender_history_bags(kind):
    """user_history / item_history: each user's distinct training items (a repeated interaction counts once),
    each item's distinct training users, weights 1/sqrt(their number); an unknown id's bag is empty."""
    rec, expected = _recommender_case(kind, features=False, gmf=False, user_history=True, item_history=True)
    _randomize(rec.net_, seed=4)
    expected.check(rec, TRAINED_USERS + ["unknown"], TRAINED_ITEMS + ["unknown"])


@pytest.mark.parametrize("kind", ["int", "str"])
def test_recommender_gmf_item_features_bags(kind):
    """gmf_item_features: the item's GMF vector sums its id row and its categorical / multi-hot feature values
    (weights as in their own fields), from one table laid out as recommender.py's _item_feature_bags says:
    [values of each item feature field, in field order | item id rows]."""
    rec, expected = _recommender_case(kind, features=True, gmf=True, gmf_item_features=True)
    expected.gmf_item_features = True
    item_gmf = rec.net_.tables[[f.name for f in rec.net_.fields].index("item_gmf")]
    assert item_gmf.shape[0] == len(set(ITEM_YEAR)) + 1 + len(GENRES) + len(TRAINED_ITEMS) + 1
    _randomize(rec.net_, seed=7)
    expected.check(rec, TRAINED_USERS + ["cold", "unknown"], TRAINED_ITEMS + ["cold", "unknown"])


@pytest.mark.parametrize("kind", ["int", "str"])
def test_recommender_partial_fit_adds_rows_and_features_of_new_ids_only(kind):
    """partial_fit with a new user and item, the ids known only from the fit's feature tables, and tables
    that also list known ids with other values: the ids of these interactions without an id row get the next
    rows (those known before first, in sorted order, then the new ones in sorted order: entity order); only
    the new ids take features from the new tables (encoded and scaled as at fit); histories grow."""
    rec, expected = _recommender_case(kind, features=True, gmf=True, wide=True, user_history=True)
    added = [("new", "cold", 3.0), ("cold", "new", 4.0), ("u1", "new", 2.5), ("new", "i2", 5.0)]
    users_of, items_of = expected.users_of, expected.items_of
    new_user, new_item = ("new", "chef", 40.0), ("new", 2020, {"comedy": 2.0, "horror": 1.0}, [3.0, 6.0])
    user_table, item_table = _one_row_tables(expected, new_user, new_item)
    # The same tables also give u1 (no row at fit) and i1 (a row at fit) features: known ids keep theirs.
    other_user, other_item = _one_row_tables(expected, ("u1", "law", 99.0), ("i1", 1980, {"comedy": 1.0}, [0.0, 0.0]))
    user_table = FeatureTable(np.concatenate([user_table.ids, other_user.ids]),
                              categorical={"job": np.concatenate([user_table.categorical["job"],
                                                                  other_user.categorical["job"]])},
                              numeric={"age": np.concatenate([user_table.numeric["age"], other_user.numeric["age"]])})
    labels = ["comedy", "horror"]
    item_table = FeatureTable(np.concatenate([item_table.ids, other_item.ids]),
                              categorical={"year": [2020, 1980]},
                              multi_hot={"genres": (_genre_matrix([new_item[2], {"comedy": 1.0}], labels), labels)},
                              numeric={"vec": [new_item[3], [0.0, 0.0]]})
    rec.partial_fit(np.array([users_of[u] for u, _, _ in added]), np.array([items_of[i] for _, i, _ in added]),
                    np.array([r for _, _, r in added]), user_features=user_table, item_features=item_table)

    for rows in (expected.user_row, expected.item_row):  # "cold" was known before "new": it comes first
        rows["cold"], rows["new"] = max(rows.values()) + 1, max(rows.values()) + 2
    expected.user_features["new"] = new_user[1:]
    expected.item_features["new"] = new_item[1:]
    for u, i, r in added:
        expected.history.setdefault(u, set()).add(i)
    # expected.ratings stays the fit's: rating_mean_ is the offset the model was first trained around.
    _randomize(rec.net_, seed=6)
    expected.check(rec, TRAINED_USERS + ["cold", "new", "unknown"], TRAINED_ITEMS + ["cold", "new", "unknown"])
    expected.check_recommend(rec, TRAINED_USERS + ["cold", "new", "unknown"], TRAINED_ITEMS + ["cold", "new"])


# ------------------------------------------------------------------------------------------- FieldModel
def _fieldmodel_columns(rng, n, city_values, user_values):
    tags = sp.random(n, 5, density=0.4, format="csr", random_state=rng, dtype=np.float32)
    tags.data = (tags.data * 3 + 0.5).astype(np.float32)
    return {
        "user": rng.choice(np.array(user_values), n),  # strings
        "city": rng.choice(np.array(city_values), n),  # ints, hashed
        "level": rng.choice(np.array([3, -1, 20]), n),  # ints
        "tags": tags,  # mean pooling (the default)
        "tags_sum": tags.copy(),  # sum pooling
        "price": rng.normal(50.0, 10.0, n),
        "vec": np.column_stack([rng.normal(0.0, 2.0, n), np.full(n, 7.0)]),  # a constant column: deviation 0
    }


BUCKETS = 7


def _fieldmodel_inputs(train, X):
    """Our construction of every field's bags and every dense block of X, from the raw training columns."""
    bags, dense = {}, {}
    for name in ("user", "level"):
        code = _sorted_numbering(train[name].tolist())
        bags[name] = [[(code.get(v, 0), 1.0)] for v in X[name].tolist()]
    bags["city"] = [[(zlib.crc32(str(v).encode()) % BUCKETS + 1, 1.0)] for v in X["city"].tolist()]
    for name, mean in (("tags", True), ("tags_sum", False)):
        M = X[name].tocsr()
        out = []
        for r in range(M.shape[0]):
            cols = M.indices[M.indptr[r]:M.indptr[r + 1]].tolist()
            w = M.data[M.indptr[r]:M.indptr[r + 1]].astype(np.float64)
            if mean and len(w):
                w = w / w.sum()
            out.append(list(zip(cols, w.tolist())))
        bags[name] = out
    for name in ("price", "vec"):
        t = np.asarray(train[name], np.float64).reshape(len(train[name]), -1)
        std = t.std(axis=0)
        dense[name] = (np.asarray(X[name], np.float64).reshape(len(X[name]), -1) - t.mean(axis=0)) / np.where(
            std > 0, std, 1.0)
    return bags, dense


def _check_fieldmodel(model, X, expected):
    np.testing.assert_allclose(model.predict(X), expected, rtol=RTOL, atol=ATOL)
    # Rows a few at a time too: values are looked up another way in batches of at most 16.
    for start in range(0, len(expected), 5):
        part = {name: column[start:start + 5] for name, column in X.items()}
        np.testing.assert_allclose(model.predict(part), expected[start:start + 5], rtol=RTOL, atol=ATOL)


def test_fieldmodel_columns_become_the_documented_bags_hashes_and_scaled_columns():
    """Categorical (string and int) columns with unseen values at predict, a hashed column (unseen values hash
    too), mean- and sum-pooled multi-hot columns, numeric columns scaled with the training statistics."""
    rng = np.random.default_rng(0)
    train = _fieldmodel_columns(rng, 60, [101, 202, 303, 404, -5], ["ann", "bob", "cy", "Dee"])
    y = rng.normal(3.0, 1.0, 60)
    model = fastrec.FieldModel(fields={"city": {"hash_buckets": BUCKETS}, "tags_sum": {"pooling": "sum"},
                                       "user": {"dim": 2}, "tags": {"dim": 4}},
                               embedding_dim=3, hidden_layer_sizes=(), loss="mse", epochs=1, random_state=0)
    model.fit(train, y)
    assert [t.shape for t in model.net_.tables] == [(5, 2), (BUCKETS + 1, 3), (4, 3), (5, 4), (5, 3)]
    _randomize(model.net_, seed=5)
    # New rows: some values never seen in training (user "eve", level 99, cities 999 and 7), some seen.
    X = _fieldmodel_columns(rng, 40, [101, 999, 7, -5], ["ann", "eve", "Dee"])
    X["level"][:5] = 99
    bags, dense = _fieldmodel_inputs(train, X)
    expected = _forward(model.net_, bags, dense) + y.mean()
    _check_fieldmodel(model, X, expected)


def test_fieldmodel_partial_fit_gives_new_values_the_next_rows():
    """partial_fit: categorical values never seen get the next rows (in sorted order), the known ones keep
    theirs; hashed columns keep their buckets; numeric columns keep the fit's scaling."""
    rng = np.random.default_rng(1)
    train = _fieldmodel_columns(rng, 50, [101, 202, 303], ["ann", "bob", "cy"])
    y = rng.normal(3.0, 1.0, 50)
    model = fastrec.FieldModel(fields={"city": {"hash_buckets": BUCKETS}, "tags_sum": {"pooling": "sum"}},
                               embedding_dim=3, hidden_layer_sizes=(), loss="mse", epochs=1, random_state=0)
    model.fit(train, y)
    more = _fieldmodel_columns(rng, 30, [101, 505], ["zed", "bob", "al"])  # "al" and "zed" are new
    more["level"][:3] = 42
    model.partial_fit(more, rng.normal(3.0, 1.0, 30))
    _randomize(model.net_, seed=8)
    X = _fieldmodel_columns(rng, 40, [101, 505, 9], ["ann", "zed", "al", "eve"])
    X["level"][:4] = [42, 3, 99, 20]
    bags, dense = _fieldmodel_inputs(train, X)
    for name, new_values in (("user", ["al", "zed"]), ("level", [42])):
        code = _sorted_numbering(train[name].tolist())
        code.update({v: len(code) + 1 + k for k, v in enumerate(new_values)})
        bags[name] = [[(code.get(v, 0), 1.0)] for v in X[name].tolist()]
    expected = _forward(model.net_, bags, dense) + y.mean()  # the targets' offset stays the fit's
    _check_fieldmodel(model, X, expected)
