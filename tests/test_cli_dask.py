"""fastrec train --workers N / --scheduler ADDRESS: the same job on a Dask cluster (fastrec.dask)."""

import importlib.util
import pathlib

import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("dask.array")
from distributed import LocalCluster  # noqa: E402

import fastrec  # noqa: E402
from fastrec.datasets import make_interactions  # noqa: E402

# The local CLI tests' options, runner and CSV writer (pytest's importlib mode does not put tests/ on sys.path).
_spec = importlib.util.spec_from_file_location("_cli_test_helpers", pathlib.Path(__file__).with_name("test_cli.py"))
_cli_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cli_tests)
OPTIONS, run, write_csv = _cli_tests.OPTIONS, _cli_tests.run, _cli_tests.write_csv


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    d = make_interactions(n_users=80, n_items=120, n_interactions=1500, random_state=0)
    path = tmp_path_factory.mktemp("cli_dask") / "train.csv"
    write_csv(path, {"user_id": d.users, "item_id": d.items, "rating": d.ratings})
    return path, d


def same_list(xs, ys):
    return len(xs) == len(ys) and all(np.array_equal(x, y) for x, y in zip(xs, ys))


def same_arrays(a, b):
    return same_list(a.net_._arrays(), b.net_._arrays())


def test_one_local_worker_trains_the_model_of_a_local_train(tmp_path, capsys, train_file):
    # One worker, one round per epoch: fastrec.dask's replica is a local fit bit for bit (tests/test_dask.py).
    path, d = train_file
    code, out, err = run(capsys, "train", path, "-o", tmp_path / "d.fastrec", "--rating-col", "rating", *OPTIONS,
                         "--workers", "1")
    assert code == 0, err
    assert "on 1 Dask worker," in out
    code, _, err = run(capsys, "train", path, "-o", tmp_path / "l.fastrec", "--rating-col", "rating", *OPTIONS)
    assert code == 0, err
    distributed, local = fastrec.load(tmp_path / "d.fastrec"), fastrec.load(tmp_path / "l.fastrec")
    assert type(distributed) is fastrec.Recommender
    assert same_arrays(distributed, local)
    np.testing.assert_array_equal(distributed.recommend(d.users[:10], 5)[0], local.recommend(d.users[:10], 5)[0])


def test_a_scheduler_address_trains_on_its_workers(tmp_path, capsys, train_file):
    path, d = train_file
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address=":0") as cluster:
        code, out, err = run(capsys, "train", path, "-o", tmp_path / "m.fastrec", *OPTIONS, "--scheduler",
                             cluster.scheduler_address, "--sync-every", "3")
    assert code == 0, err
    assert "on 2 Dask workers," in out and "implicit feedback" in out
    model = fastrec.load(tmp_path / "m.fastrec")
    assert model.implicit_ and model.n_users_ == len(np.unique(d.users))
    assert len(model.history_["loss"]) == 2
    ids, _ = model.recommend(d.users[:5], 5)
    assert ids.shape == (5, 5)


def test_a_two_tower_trains_on_one_local_worker_like_a_local_train(tmp_path, capsys, train_file):
    path, d = train_file
    opts = ["--model", "two-tower", *OPTIONS, "--output-dim", "8"]
    code, out, err = run(capsys, "train", path, "-o", tmp_path / "d.fastrec", *opts, "--workers", "1")
    assert code == 0, err
    assert "on 1 Dask worker," in out
    code, _, err = run(capsys, "train", path, "-o", tmp_path / "l.fastrec", *opts)
    assert code == 0, err
    distributed, local = fastrec.load(tmp_path / "d.fastrec"), fastrec.load(tmp_path / "l.fastrec")
    assert type(distributed) is fastrec.TwoTower
    assert same_list(distributed.net_.arrays(), local.net_.arrays())


@pytest.mark.parametrize("args, message", [
    (["--model", "ease", "--workers", "2"], "--model recommender or two-tower"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_distributed_options_refuse_what_they_cannot_do(tmp_path, capsys, train_file, args, message):
    path, _ = train_file
    code, _, err = run(capsys, "train", path, "-o", tmp_path / "x.fastrec", *args)
    assert code == 1 and message in err
    assert not (tmp_path / "x.fastrec").exists()


def test_workers_and_scheduler_exclude_each_other(tmp_path, capsys, train_file):
    path, _ = train_file
    code, _, err = run(capsys, "train", path, "-o", tmp_path / "x.fastrec", "--workers", "2", "--scheduler",
                       "tcp://127.0.0.1:1")
    assert code == 2 and "not allowed with" in err
