"""fastrec.features.FeatureTable, fastrec.datasets.make_interactions and load_movielens (on tiny files)."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from fastrec.datasets import Interactions, load_movielens, make_interactions
from fastrec.evaluation import leave_last_out, random_split, sampled_ranking
from fastrec.features import FeatureTable

# --- FeatureTable -------------------------------------------------------------------------------------------


def test_feature_table_basics_and_row_positions():
    bags = sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 0], [0, 1, 0]], dtype=np.float64))
    t = FeatureTable(
        np.array([30, 10, 20]),
        categorical={"country": ["fr", "de", "fr"]},
        multi_hot={"tags": (bags, np.array(["a", "b", "c"])), "plain": sp.csr_matrix((3, 4))},
        numeric={"age": [31, 42, 25], "vec": np.ones((3, 2))},
    )
    assert len(t) == 3 and t.columns == ["country", "tags", "plain", "age", "vec"]
    np.testing.assert_array_equal(t.row_positions([10, 99, 30, 20, 10]), [1, -1, 0, 2, 1])
    np.testing.assert_array_equal(t.row_positions(["10"]), [-1])  # other id type: unknown, not an error
    assert t.numeric["age"].dtype == np.float32 and t.numeric["vec"].shape == (3, 2)
    X, vocab = t.multi_hot["tags"]
    assert X.format == "csr" and X.dtype == np.float32
    np.testing.assert_array_equal(X.toarray(), [[1, 0, 2], [0, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(t.multi_hot["plain"][1], np.arange(4))
    assert t.categorical["country"].tolist() == ["fr", "de", "fr"]
    s = FeatureTable(["x", "y"])
    np.testing.assert_array_equal(s.row_positions(["y", "z", "x"]), [1, -1, 0])
    np.testing.assert_array_equal(s.row_positions([1]), [-1])


def test_feature_table_sums_duplicate_csr_entries():
    dup = sp.csr_matrix((np.array([1.0, 2.0, 5.0]), np.array([1, 1, 0]), np.array([0, 2, 3])), shape=(2, 2))
    t = FeatureTable([1, 2], multi_hot={"m": dup})
    np.testing.assert_array_equal(t.multi_hot["m"][0].toarray(), [[0, 3], [5, 0]])
    assert t.multi_hot["m"][0].has_sorted_indices


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"ids": [1, 1, 2]}, ValueError, "ids must be unique"),
        ({"ids": [1.5, 2.5]}, TypeError, "ids must hold ints or strings"),
        ({"ids": [[1, 2]]}, ValueError, "ids must be 1-D"),
        ({"ids": [1, 2], "categorical": {"c": [1]}}, ValueError, "categorical\\['c'\\] has 1 values for 2"),
        ({"ids": [1, 2], "categorical": {"c": [1.0, 2.0]}}, TypeError, "categorical\\['c'\\]"),
        ({"ids": [1, 2], "categorical": {"c": ["a", None]}}, ValueError, "missing values"),
        ({"ids": [1, 2], "numeric": {"x": [1.0, np.nan]}}, ValueError, "numeric\\['x'\\] contains NaN"),
        ({"ids": [1, 2], "numeric": {"x": [1.0, 2.0, 3.0]}}, ValueError, "numeric\\['x'\\] must have shape"),
        ({"ids": [1, 2], "numeric": {"x": ["a", "b"]}}, TypeError, "numeric\\['x'\\] must hold real"),
        ({"ids": [1, 2], "multi_hot": {"m": sp.csr_matrix((3, 2))}}, ValueError, "must have shape \\(2, 2\\)"),
        ({"ids": [1, 2], "multi_hot": {"m": (sp.csr_matrix((2, 2)), ["a", "a"])}}, ValueError, "repeated"),
        ({"ids": [1, 2], "multi_hot": {"m": np.zeros((2, 2))}}, TypeError, "multi_hot\\['m'\\] must be"),
        ({"ids": [1, 2], "categorical": {"x": [1, 2]}, "numeric": {"x": [1, 2]}}, ValueError, "used twice"),
        ({"ids": [1, 2], "numeric": [1, 2]}, TypeError, "numeric must be a dict"),
    ],
)
def test_feature_table_validation(kwargs, exc, match):
    ids = kwargs.pop("ids")
    with pytest.raises(exc, match=match):
        FeatureTable(ids, **kwargs)


def test_feature_table_from_dataframe():
    df = pd.DataFrame(
        {
            "genres": ["Drama|Comedy", "", None, "Comedy|Comedy"],
            "tags": [["x"], [], ["y", "x"], ("z",)],
            "weighted": [{"p": 0.5}, {}, {"q": 2.0, "p": 1.0}, None],
            "year": [1995, 2001, 1980, 1999],
            "score": [0.5, 1.5, 2.5, 3.5],
            "kind": pd.Categorical(["a", "b", "a", "c"]),
        },
        index=pd.Index(["m1", "m2", "m3", "m4"], name="movie"),
    )
    t = FeatureTable.from_dataframe(df, categorical=["kind"], multi_hot=["genres", "tags", "weighted"],
                                    numeric=["year", "score"])
    np.testing.assert_array_equal(t.ids, ["m1", "m2", "m3", "m4"])
    X, vocab = t.multi_hot["genres"]
    assert vocab.tolist() == ["Comedy", "Drama"]
    np.testing.assert_array_equal(X.toarray(), [[1, 1], [0, 0], [0, 0], [2, 0]])  # repeats add up
    X, vocab = t.multi_hot["tags"]
    assert vocab.tolist() == ["x", "y", "z"]
    np.testing.assert_array_equal(X.toarray(), [[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 1]])
    X, vocab = t.multi_hot["weighted"]
    np.testing.assert_array_equal(X.toarray(), [[0.5, 0], [0, 0], [1, 2], [0, 0]])
    assert t.categorical["kind"].tolist() == ["a", "b", "a", "c"]
    np.testing.assert_array_equal(t.numeric["year"], np.float32([1995, 2001, 1980, 1999]))
    # another separator, per column
    t2 = FeatureTable.from_dataframe(pd.DataFrame({"g": ["a,b|c", "b"]}, index=[5, 6]), multi_hot={"g": ","})
    assert t2.multi_hot["g"][1].tolist() == ["a", "b", "b|c"]
    np.testing.assert_array_equal(t2.multi_hot["g"][0].toarray(), [[1, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(t2.ids, [5, 6])
    # inferred kinds: lists -> multi-hot, numbers -> numeric, the rest categorical
    t3 = FeatureTable.from_dataframe(df[["tags", "year", "score", "kind"]])
    assert list(t3.multi_hot) == ["tags"] and list(t3.numeric) == ["year", "score"]
    assert list(t3.categorical) == ["kind"]
    with pytest.raises(ValueError, match="column 'nope' is not in df"):
        FeatureTable.from_dataframe(df, numeric=["nope"])
    with pytest.raises(TypeError, match="df must be a pandas DataFrame"):
        FeatureTable.from_dataframe(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="missing values"):
        FeatureTable.from_dataframe(pd.DataFrame({"c": ["a", None]}, index=[1, 2]), categorical=["c"])


# --- make_interactions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True])
def test_make_interactions_shapes(implicit):
    d = make_interactions(50, 30, 600, implicit=implicit, random_state=0)
    assert isinstance(d, Interactions) and len(d) == 600
    assert np.unique(d.users * 30 + d.items).size == 600  # distinct pairs
    assert np.unique(d.users).size == 50  # every user has at least one event
    assert d.users.min() >= 0 and d.users.max() < 50 and d.items.max() < 30
    assert d.timestamps.dtype == np.int64
    for u in range(50):  # a user's events never share a timestamp
        t = d.timestamps[d.users == u]
        assert np.unique(t).size == t.size
    if implicit:
        assert d.ratings is None
    else:
        assert d.ratings.dtype == np.float32 and set(np.unique(d.ratings)) <= {1, 2, 3, 4, 5}
    assert len(d.item_features) == 30 and len(d.user_features) == 50
    genres, vocab = d.item_features.multi_hot["genres"]
    assert genres.shape == (30, 8) and np.all(genres.getnnz(axis=1) >= 1)
    same = make_interactions(50, 30, 600, implicit=implicit, random_state=0)
    np.testing.assert_array_equal(d.items, same.items)
    np.testing.assert_array_equal(d.timestamps, same.timestamps)
    assert not np.array_equal(d.items, make_interactions(50, 30, 600, implicit=implicit, random_state=1).items)


def test_make_interactions_caps_users_at_n_items():
    d = make_interactions(5, 4, 20, random_state=0)  # every pair
    assert np.unique(d.users * 4 + d.items).size == 20
    with pytest.raises(ValueError, match="n_interactions must be between"):
        make_interactions(5, 4, 21)
    with pytest.raises(ValueError, match="n_users must be an int >= 1"):
        make_interactions(0, 4, 2)


def test_explicit_structure_beats_bias_baseline():
    """Matrix factorisation (numpy ALS) on the residuals of a bias model must beat the bias model."""
    n_users, n_items = 300, 200
    d = make_interactions(n_users, n_items, 15000, random_state=0)
    train, test = random_split(len(d), random_state=0)
    u, i, r = d.users, d.items, d.ratings.astype(np.float64)
    mu, bu, bi = r[train].mean(), np.zeros(n_users), np.zeros(n_items)
    for _ in range(10):
        bu = np.bincount(u[train], r[train] - mu - bi[i[train]], n_users) / (
            np.bincount(u[train], minlength=n_users) + 5)
        bi = np.bincount(i[train], r[train] - mu - bu[u[train]], n_items) / (
            np.bincount(i[train], minlength=n_items) + 5)
    base = mu + bu[u] + bi[i]
    res = r - base
    rng = np.random.default_rng(0)
    P, Q = rng.normal(0, 0.1, (n_users, 8)), rng.normal(0, 0.1, (n_items, 8))
    for _ in range(10):
        for A, B, a, b in ((P, Q, u, i), (Q, P, i, u)):
            for x in range(A.shape[0]):
                m = train[a[train] == x]
                A[x] = np.linalg.solve(B[b[m]].T @ B[b[m]] + 5 * np.eye(8), B[b[m]].T @ res[m])
    rmse_bias = np.sqrt(np.mean((base[test] - r[test]) ** 2))
    rmse_mf = np.sqrt(np.mean((base[test] + np.sum(P[u[test]] * Q[i[test]], axis=1) - r[test]) ** 2))
    assert rmse_mf < rmse_bias - 0.05, (rmse_mf, rmse_bias)


def test_implicit_structure_beats_popularity_and_features_are_informative():
    n_users, n_items = 300, 500
    d = make_interactions(n_users, n_items, 8000, implicit=True, random_state=0)
    train, test = leave_last_out(d.users, d.timestamps, random_state=0)
    X = sp.csr_matrix((np.ones(train.size), (d.users[train], d.items[train])), shape=(n_users, n_items))
    pop = np.asarray(X.sum(axis=0)).ravel()
    S = (X.T @ X).toarray()
    np.fill_diagonal(S, 0)
    S /= np.sqrt(np.outer(pop, pop)) + 1e-9
    user_scores = X @ S  # item-kNN with cosine similarity

    class Pop:
        def predict(self, users, items):
            return pop[items]

    class ItemKNN:
        def predict(self, users, items):
            return np.asarray(user_scores[users, items]).ravel()

    kw = dict(seen_users=d.users[train], seen_items=d.items[train], random_state=0)
    hr_pop = sampled_ranking(Pop(), d.users[test], d.items[test], **kw)["hr@10"]
    hr_knn = sampled_ranking(ItemKNN(), d.users[test], d.items[test], **kw)["hr@10"]
    assert hr_knn > hr_pop + 0.2, (hr_knn, hr_pop)
    # a user's segment names the genre of many more of its items than that genre's base rate
    genres, vocab = d.item_features.multi_hot["genres"]
    seg = np.searchsorted(vocab, d.user_features.categorical["segment"])[d.users]
    share = np.asarray(genres[d.items].toarray())[np.arange(len(d)), seg].mean()
    base_rate = np.asarray(genres.mean(axis=0)).ravel()[seg].mean()
    assert share > 1.5 * base_rate, (share, base_rate)


# --- load_movielens on tiny files in each format -----------------------------------------------------------


def write(path: Path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))


def check_common(d, users, items, ratings, timestamps):
    np.testing.assert_array_equal(d.users, users)
    np.testing.assert_array_equal(d.items, items)
    np.testing.assert_array_equal(d.ratings, np.float32(ratings))
    np.testing.assert_array_equal(d.timestamps, timestamps)
    assert d.users.dtype == np.int64 and d.ratings.dtype == np.float32 and d.timestamps.dtype == np.int64


def genres_of(table, item):
    X, vocab = table.multi_hot["genres"]
    row = X[table.row_positions([item])[0]]
    return sorted(vocab[row.indices].tolist())


def test_load_100k(tmp_path):
    write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t1\t1.5\t878887116\n")
    flags = ["0"] * 19
    toy = flags.copy()
    toy[3] = toy[4] = toy[5] = "1"  # Animation, Children's, Comedy
    unknown = flags.copy()
    unknown[0] = "1"
    write(tmp_path / "u.item",
          f"1|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(toy)}\n"
          f"242|Kolya (1996)|24-Jan-1997||http://y|{'|'.join(flags)}\n"
          f"267|unknown||||{'|'.join(unknown)}\n"
          f"302|L.A. Confidential (1997)|01-Jan-1997||http://z|{'|'.join(flags)}\n"
          "\n", "latin-1")
    write(tmp_path / "u.user", "22|25|M|writer|40206\n186|39|F|executive|00000\n196|49|M|writer|55105\n")
    for path in (tmp_path, tmp_path / "u.data", str(tmp_path)):
        d = load_movielens(path)
        check_common(d, [196, 186, 22], [242, 302, 1], [3, 3, 1.5], [881250949, 891717742, 878887116])
    it = d.item_features
    assert genres_of(it, 1) == ["Animation", "Children's", "Comedy"]
    assert genres_of(it, 242) == [] and genres_of(it, 267) == ["unknown"]
    years = it.numeric["year"][it.row_positions([1, 242, 267, 302])]
    np.testing.assert_array_equal(years, [1995, 1997, 1997, 1997])  # missing -> median of 1995, 1997, 1997
    assert it.multi_hot["genres"][1].size == 19
    ut = d.user_features
    pos = ut.row_positions([186])[0]
    assert ut.categorical["gender"][pos] == "F" and ut.categorical["occupation"][pos] == "executive"
    assert ut.numeric["age"][pos] == 39


def test_load_100k_ratings_only_and_u_genre(tmp_path):
    write(tmp_path / "u.data", "1\t2\t4\t100\n")
    d = load_movielens(tmp_path)
    assert d.item_features is None and d.user_features is None and len(d) == 1
    write(tmp_path / "u.genre", "b|1\na|0\n\n")
    write(tmp_path / "u.item", "2|X (2000)|01-Jan-2000||u|0|1\n")
    assert genres_of(load_movielens(tmp_path).item_features, 2) == ["b"]


def test_load_1m(tmp_path):
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n")
    write(tmp_path / "movies.dat",
          "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
          "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
          "29::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Adventure|Sci-Fi\n",
          "latin-1")
    write(tmp_path / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    d = load_movielens(tmp_path / "ratings.dat")
    check_common(d, [1, 2], [1193, 661], [5, 3], [978300760, 978302109])
    it = d.item_features
    assert genres_of(it, 661) == ["Animation", "Children's", "Musical"]
    np.testing.assert_array_equal(it.numeric["year"][it.row_positions([1193, 661, 29])], [1975, 1996, 1995])
    ut = d.user_features
    p = ut.row_positions([2])[0]
    assert ut.categorical["gender"][p] == "M" and ut.categorical["occupation"][p] == 16
    assert ut.numeric["age"][p] == 56


def test_load_latest(tmp_path):
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,0.5,964981247\n")
    write(tmp_path / "movies.csv",
          "movieId,title,genres\n"
          "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
          '3,"American President, The (1995) ",Comedy|Drama|Romance\n'
          "5,Some Documentary,(no genres listed)\n")
    d = load_movielens(tmp_path)
    check_common(d, [1, 1], [1, 3], [4.0, 0.5], [964982703, 964981247])
    it = d.item_features
    assert genres_of(it, 3) == ["Comedy", "Drama", "Romance"] and genres_of(it, 5) == []
    np.testing.assert_array_equal(it.numeric["year"][it.row_positions([1, 3, 5])], [1995, 1995, 1995])
    assert d.user_features is None


def test_load_recbole(tmp_path):
    write(tmp_path / "ml-100k.inter",
          "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n"
          "186\t302\t3\t891717742\n")
    write(tmp_path / "ml-100k.item",
          "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
          "242\tKolya\t1996\tComedy\n302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
          "267\tunkonwn\tunkonwn\tunknown\n")
    write(tmp_path / "ml-100k.user",
          "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
          "196\t49\tM\twriter\t55105\n186\t39\tF\texecutive\t00000\n")
    d = load_movielens(tmp_path / "ml-100k.inter")
    check_common(d, [196, 186], [242, 302], [3, 3], [881250949, 891717742])
    it = d.item_features
    assert genres_of(it, 302) == ["Crime", "Film-Noir", "Mystery", "Thriller"]
    np.testing.assert_array_equal(it.numeric["year"][it.row_positions([242, 302, 267])], [1996, 1997, 1996.5])
    ut = d.user_features
    assert ut.categorical["occupation"][ut.row_positions([186])[0]] == "executive"
    np.testing.assert_array_equal(ut.numeric["age"][ut.row_positions([196, 186])], [49, 39])


def test_load_recbole_genre_column_and_string_tokens(tmp_path):
    write(tmp_path / "x.inter", "user_id:token\titem_id:token\nu1\ti9\n")
    write(tmp_path / "x.item", "item_id:token\tgenre:token_seq\ni9\tAction Drama\n")
    d = load_movielens(tmp_path)
    assert d.users.tolist() == ["u1"] and d.ratings is None and d.timestamps is None
    assert genres_of(d.item_features, "i9") == ["Action", "Drama"]


def test_load_movielens_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a directory holding u.data"):
        load_movielens(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no MovieLens ratings file .*u.data.*ratings.dat.*.inter"):
        load_movielens(tmp_path)
    write(tmp_path / "other.txt", "x")
    with pytest.raises(ValueError, match="not a MovieLens ratings file"):
        load_movielens(tmp_path / "other.txt")
    write(tmp_path / "u.data", "1\t2\tthree\t4\n")
    with pytest.raises(ValueError, match="cannot parse u.data"):
        load_movielens(tmp_path)


@pytest.mark.skipif("FASTREC_ML100K" not in os.environ,
                    reason="set FASTREC_ML100K to a MovieLens-100k directory (never committed)")
def test_real_movielens_100k():
    d = load_movielens(os.environ["FASTREC_ML100K"])
    assert len(d) == 100_000 and np.unique(d.users).size == 943 and np.unique(d.items).size == 1682
