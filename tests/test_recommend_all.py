"""`RecommenderBase.recommend_all`: every user's top-k written to Parquet in chunks.

What is checked: the file holds exactly `recommend`'s rows (padding dropped) for both families, with and
without seen items, over candidate subsets and with string ids; the chunk size changes the row groups, never
the rows; a failure or Ctrl-C midway leaves an existing file untouched and no temporary file behind; a missing
pyarrow is one clear ImportError; bad arguments are refused naming them; progress is shown only when verbose.
"""

import os
import sys

import numpy as np
import pytest

import fastrec
from fastrec._checks import NotFittedError
from fastrec.datasets import make_interactions

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

FAMILIES = {"recommender": fastrec.Recommender, "two_tower": fastrec.TwoTower}
TINY = dict(embedding_dim=8, hidden_layer_sizes=(16,), epochs=2, early_stopping=False, random_state=0,
            n_threads=1)


@pytest.fixture(scope="module")
def data():
    return make_interactions(n_users=200, n_items=100, n_interactions=3000, implicit=True, random_state=0)


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request, data):
    return FAMILIES[request.param](**TINY).fit(data.users, data.items)


@pytest.fixture(scope="module")
def string_model(data):
    users = np.array([f"u{u}" for u in data.users])
    items = np.array([f"i{i}" for i in data.items])
    return fastrec.TwoTower(**TINY).fit(users, items)


def read(path) -> dict:
    table = pq.read_table(path)
    assert table.column_names == ["user", "rank", "item", "score"]
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def expected(model, users, k=10, **kwargs) -> dict:
    """recommend's answer in the file's long format: one row per (user, item), padding (score -inf) dropped."""
    ids, scores = model.recommend(users, k, **kwargs)
    keep = scores != -np.inf
    return {"user": np.repeat(users, keep.sum(axis=1)),
            "rank": np.broadcast_to(np.arange(1, ids.shape[1] + 1), ids.shape)[keep],
            "item": ids[keep], "score": scores[keep]}


def assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_the_file_is_recommend_for_every_user(tmp_path, model, exclude_seen):
    path = tmp_path / "recs.parquet"
    rows = model.recommend_all(path, k=10, exclude_seen=exclude_seen, chunk_size=64)
    got = read(path)
    want = expected(model, model._users.ids, 10, exclude_seen=exclude_seen)  # one call, in the model's order
    assert_same(got, want)
    assert rows == len(got["user"])
    assert np.unique(got["user"]).size == (model.n_users_ if not exclude_seen else np.unique(want["user"]).size)
    schema = pq.read_schema(path)
    assert [str(t) for t in schema.types] == ["int64", "int32", "int64", "double"]


def test_padding_rows_are_dropped(tmp_path, model, data):
    # k = 60 of 100 items with seen items excluded: users with more than 40 seen items get fewer rows, and the
    # two users who saw every item get none.
    path = tmp_path / "recs.parquet"
    model.recommend_all(path, k=60, chunk_size=50)
    got = read(path)
    assert_same(got, expected(model, model._users.ids, 60))
    assert np.isfinite(got["score"]).all()
    users, per_user = np.unique(got["user"], return_counts=True)
    seen = np.bincount(np.unique(data.users * 1000 + data.items) // 1000, minlength=model.n_users_)
    np.testing.assert_array_equal(per_user, np.minimum(60, 100 - seen[users]))
    assert model.n_users_ - len(users) == (seen == 100).sum() >= 1  # those users have no rows at all
    starts = np.flatnonzero(np.r_[True, got["user"][1:] != got["user"][:-1]])
    np.testing.assert_array_equal(got["rank"], np.arange(len(got["rank"])) - np.repeat(starts, per_user) + 1)


def test_the_chunk_size_changes_the_row_groups_never_the_rows(tmp_path, model):
    first = None
    for chunk in (1, 7, 64, 199, 200, 10_000, None):
        path = tmp_path / f"recs_{chunk}.parquet"
        model.recommend_all(path, k=5, chunk_size=chunk)
        got = read(path)
        if first is None:
            first = got
        assert_same(got, first)
        n_groups = pq.ParquetFile(path).num_row_groups
        # the default for 100 candidates is the largest chunk (8192 users): one row group here
        assert n_groups == -(-model.n_users_ // (chunk or 8192))


def test_candidate_subsets_and_given_users(tmp_path, model, data):
    path = tmp_path / "recs.parquet"
    items = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5000])  # repeats and an unknown item: as recommend reads them
    users = np.array([17, 3, 123456, 3, 0])  # given order, a repeat and an unknown user kept
    rows = model.recommend_all(path, k=4, users=users, items=items, chunk_size=2)
    assert_same(read(path), expected(model, users, 4, items=items))
    assert rows == len(read(path)["user"])

    model.recommend_all(path, k=3, users=17)  # one id
    assert_same(read(path), expected(model, np.array([17]), 3))

    assert model.recommend_all(path, users=[]) == 0  # a valid, empty file typed like the model's ids
    assert pq.read_table(path).num_rows == 0 and str(pq.read_schema(path).field("user").type) == "int64"
    assert model.recommend_all(path, items=[5000]) == 0  # no known candidate: no rows


def test_string_ids(tmp_path, string_model):
    path = tmp_path / "recs.parquet"
    string_model.recommend_all(path, k=7, chunk_size=33)
    got = read(path)
    assert_same({name: got[name].astype(str) if name in ("user", "item") else got[name] for name in got},
                expected(string_model, string_model._users.ids, 7))
    assert [str(t) for t in pq.read_schema(path).types] == ["string", "int32", "string", "double"]
    string_model.recommend_all(path, k=2, users=["u5", "nobody"])
    assert read(path)["user"].tolist() == ["u5", "u5", "nobody", "nobody"]
    string_model.recommend_all(path, users=[])
    assert str(pq.read_schema(path).field("user").type) == "string"


def test_a_mmapped_model_writes_the_same_file(tmp_path, model):
    model.save(tmp_path / "m.fastrec")
    loaded = fastrec.load(tmp_path / "m.fastrec", mmap=True)
    model.recommend_all(tmp_path / "a.parquet", chunk_size=50)
    loaded.recommend_all(tmp_path / "b.parquet", chunk_size=50)
    assert_same(read(tmp_path / "b.parquet"), read(tmp_path / "a.parquet"))


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failure_midway_leaves_an_existing_file_untouched(tmp_path, monkeypatch, model, error):
    path = tmp_path / "recs.parquet"
    path.write_bytes(b"yesterday's recommendations")
    calls = []
    write_table = pq.ParquetWriter.write_table

    def failing(self, table, *args, **kwargs):
        calls.append(len(table))
        if len(calls) == 3:  # after two row groups were written to the temporary file
            raise error
        return write_table(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)
    with pytest.raises(type(error)):
        model.recommend_all(path, chunk_size=20)
    assert len(calls) == 3
    assert path.read_bytes() == b"yesterday's recommendations"
    assert leftovers(tmp_path) == []
    calls.clear()
    with pytest.raises(type(error)):
        model.recommend_all(tmp_path / "new.parquet", chunk_size=20)
    assert not (tmp_path / "new.parquet").exists() and leftovers(tmp_path) == []

    monkeypatch.undo()  # a later success replaces the file
    model.recommend_all(path)
    assert_same(read(path), expected(model, model._users.ids))
    assert leftovers(tmp_path) == []


def test_the_file_gets_the_permissions_of_a_plain_open(tmp_path, model):
    old = os.umask(0o022)
    try:
        model.recommend_all(tmp_path / "recs.parquet")
    finally:
        os.umask(old)
    assert (tmp_path / "recs.parquet").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_without_pyarrow_one_clear_import_error(tmp_path, monkeypatch, model):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install 'fastrec\[parquet\]'"):
        model.recommend_all(tmp_path / "recs.parquet")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_named(tmp_path, model):
    path = tmp_path / "recs.parquet"
    with pytest.raises(ValueError, match="k must be"):
        model.recommend_all(path, k=0)
    with pytest.raises(ValueError, match="chunk_size must be"):
        model.recommend_all(path, chunk_size=0)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        model.recommend_all(3)
    with pytest.raises(ValueError, match="exclude_seen must be a bool"):
        model.recommend_all(path, exclude_seen="no")
    with pytest.raises(TypeError, match="users"):
        model.recommend_all(path, users=[1.5, 2.5])
    with pytest.raises(FileNotFoundError, match="no directory"):
        model.recommend_all(tmp_path / "missing" / "recs.parquet")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        model.recommend_all(tmp_path)
    with pytest.raises(NotFittedError):
        type(model)().recommend_all(path)
    assert list(tmp_path.iterdir()) == []


def test_progress_only_when_verbose(tmp_path, monkeypatch, capsys, model):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the fallback without tqdm: a line on stderr at the end
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    path = tmp_path / "recs.parquet"
    rows = model.recommend_all(path, verbose=True)
    err = capsys.readouterr().err
    assert f"recommend_all: {model.n_users_:,} users, {rows:,} rows to {path}" in err
    model.recommend_all(path)  # the model's verbose (False)
    model.recommend_all(path, verbose=False)
    assert capsys.readouterr().err == ""
