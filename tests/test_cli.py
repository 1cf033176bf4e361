"""The `fastrec` command (fastrec.cli), run in-process through `cli.main` except for one console-script test.

What is checked: `train` on CSV (and Parquet) gives the model an in-process fit with the same parameters and
seed gives, bitwise, with and without pandas; `recommend` writes k rows per user that are the model's own
top-k (seen items excluded unless --include-seen), as CSV and JSON; `evaluate` prints what fastrec.metrics /
fastrec.evaluation compute directly; `info` shows the class and parameters; user mistakes exit with 1 and
one line on stderr, usage errors with 2. `train --model two-tower` gives the TwoTower of an in-process fit and
refuses options of the other model; `recommend --all-users` writes every user's top-k to Parquet.
"""

import csv
import io
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fastrec
from fastrec import cli, evaluation, metrics
from fastrec.datasets import make_interactions

# Two fixed epochs: these tests check the plumbing; early stopping is tested on its own below.
PARAMS = dict(embedding_dim=8, hidden_layer_sizes=(16,), epochs=2, early_stopping=False, random_state=0,
              n_threads=1)
OPTIONS = ["--embedding-dim", "8", "--hidden", "16", "--epochs", "2", "--no-early-stopping", "--seed", "0",
           "--threads", "1"]


def write_csv(path, columns: dict):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*(np.asarray(v).tolist() for v in columns.values())))
    return path


@pytest.fixture(scope="module")
def data():
    d = make_interactions(n_users=60, n_items=100, n_interactions=600, random_state=0)
    train, test = evaluation.leave_last_out(d.users, d.timestamps, random_state=0)
    return d.subset(train), d.subset(test)


@pytest.fixture(scope="module")
def files(tmp_path_factory, data):
    train, test = data
    folder = tmp_path_factory.mktemp("cli")
    genres, vocabulary = train.item_features.multi_hot["genres"]
    return {
        "train": write_csv(folder / "train.csv", {"user_id": train.users, "item_id": train.items,
                                                  "rating": train.ratings}),
        "test": write_csv(folder / "test.csv", {"user_id": test.users, "item_id": test.items,
                                                "rating": test.ratings}),
        "items": write_csv(folder / "items.csv", {
            "item_id": train.item_features.ids,
            "genres": ["|".join(vocabulary[row.indices]) for row in genres],
            "year": train.item_features.numeric["year"]}),
    }


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def models(tmp_path_factory, files):
    """Explicit and implicit models trained by the command line."""
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for kind, extra in (("explicit", ["--rating-col", "rating"]), ("implicit", [])):
        paths[kind] = folder / f"{kind}.fastrec"
        args = ["train", files["train"], "-o", paths[kind], "--item-features", files["items"], "--multi-hot",
                "genres", *OPTIONS, *extra]
        assert cli.main([str(a) for a in args]) == 0
    return paths


def fit_in_process(train, explicit):
    return fastrec.Recommender(**PARAMS).fit(train.users, train.items, train.ratings if explicit else None,
                                             item_features=train.item_features)


@pytest.mark.parametrize("kind", ["explicit", "implicit"])
def test_train_gives_the_model_of_an_in_process_fit(data, models, kind):
    train, test = data
    loaded = fastrec.load(models[kind])
    expected = fit_in_process(train, kind == "explicit")
    assert loaded.implicit_ == (kind == "implicit")
    assert loaded.get_params() == expected.get_params()
    for users, items in ((train.users, train.items), (test.users, test.items)):
        np.testing.assert_array_equal(loaded.predict(users, items), expected.predict(users, items))


def test_train_without_pandas_and_from_parquet(tmp_path, capsys, monkeypatch, data, files):
    train, _ = data
    expected = fit_in_process(train, explicit=True).predict(train.users, train.items)
    args = ["--rating-col", "rating", "--item-features", files["items"], "--multi-hot", "genres", *OPTIONS]
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    parquet = tmp_path / "train.parquet"
    pd.read_csv(files["train"]).to_parquet(parquet)
    assert run(capsys, "train", parquet, "-o", tmp_path / "p.fastrec", *args)[0] == 0
    np.testing.assert_array_equal(fastrec.load(tmp_path / "p.fastrec").predict(train.users, train.items), expected)

    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` now fails: the csv module reads
    code, out, err = run(capsys, "train", files["train"], "-o", tmp_path / "c.fastrec", *args)
    assert (code, err) == (0, "") and "saved" in out
    np.testing.assert_array_equal(fastrec.load(tmp_path / "c.fastrec").predict(train.users, train.items), expected)
    code, _, err = run(capsys, "train", parquet, "-o", tmp_path / "x.fastrec")
    assert code == 1 and "Parquet needs pandas and pyarrow" in err


def parse_recommendations(text, fmt):
    if fmt == "json":
        return [(r["user"], r["rank"], r["item"], r["score"]) for r in json.loads(text)]
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["user", "rank", "item", "score"]
    return [(int(u), int(r), int(i), float(s)) for u, r, i, s in rows[1:]]


@pytest.mark.parametrize("fmt", ["csv", "json"])
@pytest.mark.parametrize("include_seen", [False, True])
def test_recommend_prints_the_models_top_k(capsys, data, models, fmt, include_seen):
    train, _ = data
    # 20 users x 5 items: with ~10% of the catalogue seen per user, some seen item is among them with
    # --include-seen unless the model ranks seen items last (0.9^100 by chance).
    users, k = [3, 0, 7, *range(8, 25)], 5
    args = ["recommend", models["implicit"], "--users", ",".join(map(str, users)), "--k", k, "--format", fmt]
    code, out, err = run(capsys, *args, *(["--include-seen"] if include_seen else []))
    assert (code, err) == (0, "")
    rows = parse_recommendations(out, fmt)
    ids, scores = fastrec.load(models["implicit"]).recommend(users, k=k, exclude_seen=not include_seen)
    expected = [(u, r + 1, ids[j, r], scores[j, r]) for j, u in enumerate(users) for r in range(k)]
    assert rows == expected
    seen = set(zip(train.users.tolist(), train.items.tolist()))
    assert any((u, i) in seen for u, _, i, _ in rows) == include_seen


def test_recommend_from_a_users_file_to_a_file(tmp_path, capsys, data, files, models):
    train, _ = data
    out_path = tmp_path / "top.json"
    code, out, err = run(capsys, "recommend", models["explicit"], "--users-file", files["test"], "--k", 3,
                         "--format", "json", "-o", out_path)
    assert (code, out, err) == (0, "", "")
    rows = json.loads(out_path.read_text())
    with open(files["test"]) as f:
        test_users = list(dict.fromkeys(int(r["user_id"]) for r in csv.DictReader(f)))
    ids, _ = fastrec.load(models["explicit"]).recommend(test_users, k=3)
    assert [(r["user"], r["item"]) for r in rows] == [
        (u, i) for u, row in zip(test_users, ids.tolist()) for i in row if i != -1]

    plain = tmp_path / "users.txt"
    plain.write_text("5\n2\n\n5\n1234\n")  # a repeated user once; an unknown one gets a note
    code, out, err = run(capsys, "recommend", models["explicit"], "--users-file", plain, "--k", 2)
    assert code == 0 and "1 of 3 users are unknown" in err
    assert [row[0] for row in csv.reader(io.StringIO(out))][1:] == ["5", "5", "2", "2", "1234", "1234"]

    code, out, _ = run(capsys, "recommend", models["explicit"], "--users", "5", "--k", 1000)
    model = fastrec.load(models["explicit"])
    assert code == 0 and len(out.splitlines()) == 1 + model.n_items_ - (train.users == 5).sum()  # no padding


def test_evaluate_explicit_matches_metrics(capsys, data, models, files):
    _, test = data
    code, out, err = run(capsys, "evaluate", models["explicit"], files["test"], "--format", "json")
    assert (code, err) == (0, "")
    predicted = fastrec.load(models["explicit"]).predict(test.users, test.items)
    assert json.loads(out) == {"rmse": metrics.rmse(test.ratings, predicted),
                               "mae": metrics.mae(test.ratings, predicted), "n": len(test)}
    code, out, _ = run(capsys, "evaluate", models["explicit"], files["test"])
    assert code == 0 and out.split() == ["rmse", f"{metrics.rmse(test.ratings, predicted):.4f}",
                                         "mae", f"{metrics.mae(test.ratings, predicted):.4f}", "n", str(len(test))]


def test_evaluate_implicit_matches_evaluation(capsys, data, models, files):
    train, test = data
    model = fastrec.load(models["implicit"])
    code, out, err = run(capsys, "evaluate", models["implicit"], files["test"], "--k", 5, "--format", "json")
    assert (code, err) == (0, "")
    assert json.loads(out) == evaluation.full_ranking(model, test.users, test.items, k=5)
    code, out, err = run(capsys, "evaluate", models["implicit"], files["test"], "--protocol", "sampled",
                         "--negatives", 9, "--seed", 3, "--format", "json")
    assert (code, err) == (0, "")
    assert json.loads(out) == evaluation.sampled_ranking(model, test.users, test.items, seen_users=train.users,
                                                         seen_items=train.items, n_negatives=9, k=10,
                                                         random_state=3)


def test_info(capsys, models):
    code, out, err = run(capsys, "info", models["explicit"])
    assert (code, err) == (0, "")
    assert "class: fastrec.recommender.Recommender" in out and "feedback: explicit" in out
    assert "embedding_dim: 8" in out and "hidden_layer_sizes: [16]" in out and "core:" in out
    code, out, _ = run(capsys, "info", models["implicit"], "--format", "json")
    info = json.loads(out)
    model = fastrec.load(models["implicit"])
    assert info["model"]["params"] == json.loads(json.dumps(model.get_params()))
    assert (info["model"]["n_users"], info["model"]["n_items"]) == (model.n_users_, model.n_items_)
    assert info["model"]["parameters"] > model.n_items_ * 8 and "active_isa" in info["config"]["core"]
    code, out, _ = run(capsys, "info")
    assert code == 0 and "core:" in out and "class:" not in out


def test_user_mistakes_exit_1_with_one_line(tmp_path, capsys, files, models):
    corrupt = tmp_path / "corrupt.fastrec"
    corrupt.write_bytes(models["explicit"].read_bytes()[:1000])
    holes = tmp_path / "holes.csv"
    holes.write_text("user_id,item_id\n1,2\n3,\n")
    cases = [
        (["train", tmp_path / "missing.csv", "-o", tmp_path / "m"], "missing.csv: No such file"),
        (["train", files["train"], "-o", tmp_path / "m", "--item-col", "movie"], "column 'movie' is not in"),
        (["train", files["train"], "-o", tmp_path / "m", "--rating-col", "item_id", "--epochs", "0"],
         "epochs must be an integer >= 1"),
        (["train", files["train"], "-o", tmp_path / "m", "--numeric", "year"], "--numeric names 'year'"),
        (["train", holes, "-o", tmp_path / "m"], "column 'item_id' of"),
        (["train", files["train"], "-o", tmp_path / "no" / "m"], "cannot write"),
        (["recommend", corrupt, "--users", "1"], "not a fastrec model file, or it is truncated or corrupt"),
        (["info", corrupt], "corrupt"),
        (["evaluate", models["implicit"], tmp_path / "missing.csv"], "missing.csv: No such file"),
    ]
    for args, message in cases:
        code, out, err = run(capsys, *args)
        assert code == 1, args
        assert err.startswith("fastrec: error: ") and err.count("\n") == 1 and message in err, err
        assert "Traceback" not in err


def test_usage_errors_exit_2(capsys, models):
    assert run(capsys, "recommend", models["explicit"])[0] == 2  # neither --users nor --users-file
    code, _, err = run(capsys, "train", "x.csv", "-o", "m", "--hidden", "64,x")
    assert code == 2 and "comma-separated integers" in err
    assert run(capsys)[0] == 2
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "example" in out


def test_console_script():
    script = Path(sys.executable).parent / "fastrec"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "recommend" in result.stdout and result.stderr == ""


def test_ids_are_typed_like_the_model(capsys, tmp_path):
    # A model trained on string ids, some of which look like numbers: "--users 7" must mean the string "7".
    users = np.array(["7", "8", "x"] * 20)
    items = np.array([f"i{j % 9}" for j in range(60)])
    path = write_csv(tmp_path / "s.csv", {"user_id": users, "item_id": items})
    model_path = tmp_path / "s.fastrec"
    assert run(capsys, "train", str(path), "-o", str(model_path), *OPTIONS)[0] == 0
    code, out, err = run(capsys, "recommend", str(model_path), "--users", "7,x", "--k", "3")
    assert code == 0 and "unknown" not in err
    model = fastrec.load(model_path)
    want, _ = model.recommend(np.array(["7", "x"]), k=3)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["item"] for r in rows] == want.ravel().tolist()


# ------------------------------------------------------------------------------ options of every parameter
def test_every_recommender_parameter_has_a_train_option():
    # Generic, so that a parameter added to Recommender without an option fails here: every parameter is the
    # destination of a `train` option (verbose: --verbose, random_state: --seed, n_threads: --threads) ...
    args = cli._parser().parse_args(["train", "data.csv", "-o", "m.fastrec"])
    defaults = fastrec.Recommender().get_params()
    assert [p for p in defaults if p not in vars(args)] == []
    # ... options not given leave the Recommender's defaults ...
    assert cli._recommender(args).get_params() == defaults
    # ... and whatever an option holds reaches the model (a distinct marker per parameter comes back).
    markers = {p: object() for p in defaults}
    for p, marker in markers.items():
        setattr(args, p, marker)
    built = cli._recommender(args).get_params()
    assert [p for p, marker in markers.items() if built[p] is not marker] == []


def test_the_training_control_options_parse():
    args = cli._parser().parse_args([
        "train", "data.csv", "-o", "m", "--no-early-stopping", "--validation-fraction", "0.2", "--n-iter-no-change",
        "5", "--validation-metric", "mae", "--momentum", "0.5", "--no-nesterovs-momentum", "--no-clip-predictions",
        "--verbose"])
    params = cli._recommender(args).get_params()
    assert {p: params[p] for p in ("early_stopping", "validation_fraction", "n_iter_no_change", "validation_metric",
                                   "momentum", "nesterovs_momentum", "clip_predictions", "verbose")} == {
        "early_stopping": False, "validation_fraction": 0.2, "n_iter_no_change": 5, "validation_metric": "mae",
        "momentum": 0.5, "nesterovs_momentum": False, "clip_predictions": False, "verbose": True}


def test_bad_parameter_values_name_the_option(tmp_path, capsys, files):
    for option, value, message in (("--validation-fraction", "1.5", "validation_fraction must be"),
                                   ("--momentum", "-1", "momentum must be"),
                                   ("--epochs", "0", "epochs must be")):
        code, _, err = run(capsys, "train", files["train"], "-o", tmp_path / "m", "--rating-col", "rating",
                           option, value)
        assert code == 1 and err.startswith(f"fastrec: error: {option}: {message}"), err
        assert not (tmp_path / "m").exists()


def test_train_reports_the_epochs_run_and_the_best_one(tmp_path, capsys, files):
    path = tmp_path / "m.fastrec"
    base = ["train", files["train"], "-o", path, "--rating-col", "rating", "--embedding-dim", "8", "--hidden", "16",
            "--seed", "0", "--threads", "1"]
    code, out, err = run(capsys, *base, "--epochs", "200", "--n-iter-no-change", "1")
    assert (code, err) == (0, "")
    model = fastrec.load(path)
    history, best = model.history_, model.best_epoch_
    assert 1 <= best < len(history["loss"]) < 200  # early stopping ran (seeded: this run stops early)
    assert (f"{len(history['loss'])} epochs, best epoch {best} (val_rmse {history['val_rmse'][best - 1]:.4f})"
            in out), out
    assert f"{model.validation_size_:,} of them held out for validation" in out

    code, out, _ = run(capsys, *base, "--epochs", "3", "--no-early-stopping")
    assert code == 0 and ", 3 epochs, final loss" in out and "best" not in out and "held out" not in out
    assert len(fastrec.load(path).history_["loss"]) == 3


# ------------------------------------------------------------------------------ Ctrl-C
@pytest.mark.parametrize("early_stopping", [False, True])
def test_ctrl_c_saves_the_model_trained_so_far(tmp_path, early_stopping):
    d = make_interactions(n_users=400, n_items=300, n_interactions=20000, random_state=1)
    data = write_csv(tmp_path / "ratings.csv", {"user_id": d.users, "item_id": d.items, "rating": d.ratings})
    path = tmp_path / "m.fastrec"
    # Far more epochs than can run before the signal, and no stopping rule that could end training first.
    stopping = ["--n-iter-no-change", "1000000"] if early_stopping else ["--no-early-stopping"]
    command = [sys.executable, "-m", "fastrec", "train", str(data), "-o", str(path), "--rating-col", "rating",
               "--epochs", "1000000", "--verbose", "--threads", "1", *stopping]
    chunks = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:  # closes the pipes
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(65536), b"")))
        reader.start()
        try:
            # "epoch 2/" is printed once epoch 1 has completed: as epoch 1's summary line is "epoch 1/...",
            # this is epoch 2's (or, with tqdm, the start of epoch 2's progress bar).
            deadline = time.monotonic() + 120
            while b"epoch 2/" not in b"".join(chunks):
                assert proc.poll() is None and time.monotonic() < deadline, b"".join(chunks).decode()
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)  # stdout holds a line or two at most: no pipe fills up
            out = proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
            reader.join()
    err = b"".join(chunks).decode()
    assert proc.returncode == 130, err
    assert b"saved" not in out  # the normal end did not happen
    model = fastrec.load(path)
    epochs = len(model.history_["loss"])
    assert epochs >= 1 and f"training interrupted after {epochs} epoch" in err and f"to {path}" in err, err
    if early_stopping:
        assert f"saved the model of its best epoch so far, epoch {model.best_epoch_} (val_rmse " in err, err
    else:
        assert "saved the model as it stood" in err
    assert np.isfinite(model.predict(d.users, d.items)).all()


def test_ctrl_c_before_an_epoch_completed_saves_nothing(tmp_path, capsys, monkeypatch, files):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(fastrec.Recommender, "fit", interrupted)
    code, out, err = run(capsys, "train", files["train"], "-o", tmp_path / "m.fastrec", *OPTIONS)
    assert code == 130 and out == "" and "before its first epoch completed; nothing was saved" in err
    assert not (tmp_path / "m.fastrec").exists()


# ------------------------------------------------------------------------------ id kinds
N_ITEMS = 12


def interactions_with_holes(users, items):
    """Each user interacts with all items but 3 (user j misses items j, j + 3, j + 6): recommending k=12 with
    seen items excluded returns exactly those 3 for a user the model recognises, and all 12 for an unknown
    one, whatever the model learned."""
    pairs = [(u, i) for j, u in enumerate(users) for n, i in enumerate(items) if n not in (j, j + 3, j + 6)]
    missed = {u: {items[j], items[j + 3], items[j + 6]} for j, u in enumerate(users)}
    return pairs, missed


def recommended(out):
    rows = json.loads(out)
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user"], set()).add(r["item"])
    return by_user


@pytest.mark.parametrize("kind", ["int", "str"])
def test_ids_round_trip_between_train_and_recommend(tmp_path, capsys, kind):
    users = [3, 10, 11, 25] if kind == "int" else ["u3", "u10", "u11", "x"]
    items = list(range(100, 100 + N_ITEMS)) if kind == "int" else [f"i{n}" for n in range(N_ITEMS)]
    pairs, missed = interactions_with_holes(users, items)
    data = write_csv(tmp_path / "clicks.csv", {"user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs]})
    model_path = tmp_path / "m.fastrec"
    assert run(capsys, "train", data, "-o", model_path, *OPTIONS)[0] == 0
    assert fastrec.load(model_path).seen_pairs()[0].dtype.kind == ("i" if kind == "int" else "U")

    plain = tmp_path / "users.txt"
    plain.write_text(f"{users[2]}\n{users[0]}\n")
    for how in (["--users", f"{users[0]},{users[2]}"], ["--users-file", plain], ["--users-file", data]):
        code, out, err = run(capsys, "recommend", model_path, *how, "--k", N_ITEMS, "--format", "json")
        assert (code, err) == (0, "")
        got = recommended(out)
        assert got and all(got[u] == missed[u] for u in got)  # typed like the model: JSON ints or strings
        assert set(got) == ({users[0], users[2]} if how[0] != "--users-file" or how[1] == plain else set(users))


def test_ids_that_are_no_id_of_an_integer_model_are_unknown_and_said_so(tmp_path, capsys):
    users, items = [1, 2, 7], list(range(N_ITEMS))
    pairs, missed = interactions_with_holes(users, items)
    data = write_csv(tmp_path / "clicks.csv", {"user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs]})
    model_path = tmp_path / "m.fastrec"
    assert run(capsys, "train", data, "-o", model_path, *OPTIONS)[0] == 0

    # Not a whole batch treated as unknown: 1 and 7 are recognised, "u9" and "007" are unknown and named.
    code, out, err = run(capsys, "recommend", model_path, "--users", "1,u9,007,7", "--k", N_ITEMS, "--format", "json")
    assert code == 0
    assert "2 of 4 users are not integers" in err and "'007'" in err and "'u9'" in err
    assert "2 of 4 users are unknown to the model" in err
    assert recommended(out) == {1: missed[1], 7: missed[7], "u9": set(items), "007": set(items)}

    # evaluate: the same rule for users and items, each unreadable id its own unknown id.
    test = write_csv(tmp_path / "test.csv", {"user_id": ["1", "u9", "2", "007"], "item_id": ["1", "2", "i3", "4"]})
    code, out, err = run(capsys, "evaluate", model_path, test, "--k", 3, "--format", "json")
    assert code == 0 and "2 of 4 users are not integers" in err and "1 of 4 items are not integers" in err
    model = fastrec.load(model_path)
    unknown_users, unknown_item = [-1, -2], -1  # ids the model does not know
    expected = evaluation.full_ranking(model, np.array([1, unknown_users[0], 2, unknown_users[1]]),
                                       np.array([1, 2, unknown_item, 4]), k=3)
    assert json.loads(out) == expected and expected["n_users"] == 4


def test_train_types_each_sides_ids_over_all_its_files(tmp_path, capsys):
    # "7" and "007" are two users (a leading zero makes the column strings, rather than merging them into 7);
    # an item feature file with a non-integer id makes the integer-looking item ids of the interactions
    # strings too, rather than failing on a mix of kinds.
    data = write_csv(tmp_path / "clicks.csv", {"user_id": ["7", "007", "7", "8"], "item_id": ["1", "2", "3", "1"]})
    features = write_csv(tmp_path / "items.csv", {"item_id": ["1", "2", "3", "new"], "year": [1990, 1991, 1992, 1993]})
    model_path = tmp_path / "m.fastrec"
    code, _, err = run(capsys, "train", data, "-o", model_path, "--item-features", features, *OPTIONS)
    assert (code, err) == (0, "")
    model = fastrec.load(model_path)
    seen_users, seen_items = model.seen_pairs()
    assert sorted(set(seen_users.tolist())) == ["007", "7", "8"]
    assert seen_items.dtype.kind == "U" and model.n_items_ == 4
    code, out, err = run(capsys, "recommend", model_path, "--users", "007", "--k", 5, "--format", "json")
    assert (code, err) == (0, "") and recommended(out) == {"007": {"1", "3", "new"}}


def test_unnamed_feature_columns_are_guessed_as_in_python_and_doubtful_guesses_said(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n_items = 60
    genres = np.array(["Action", "Comedy", "Drama", "Horror"])
    items = {"item_id": np.arange(n_items),
             "bucket": rng.integers(0, 3, n_items),                       # a coded category
             "genres": ["|".join(rng.choice(genres, 2, replace=False)) for _ in range(n_items)],
             "price": rng.random(n_items).round(3)}
    write_csv(tmp_path / "items.csv", items)
    write_csv(tmp_path / "clicks.csv", {"user_id": np.repeat(np.arange(30), 10),
                                        "item_id": rng.integers(0, n_items, 300)})
    out = tmp_path / "m.fastrec"
    code, _, err = run(capsys, "train", tmp_path / "clicks.csv", "--item-features", tmp_path / "items.csv",
                       "--epochs", 1, "--seed", 0, "-o", out)
    assert code == 0
    assert "column 'bucket' read as categorical (integers with only 3 distinct values" in err
    assert "column 'genres' read as multi_hot:| (strings of 4 labels" in err
    assert "'price'" not in err  # a sure guess is not reported without --verbose
    model = fastrec.load(out)
    assert {name: kind for name, (kind, _) in model._vocab_["item"].items()} == {"bucket": "categorical",
                                                                                "genres": "multi_hot"}
    assert set(model._numeric_stats_["item"]) == {"price"}
    code, _, err = run(capsys, "train", tmp_path / "clicks.csv", "--item-features", tmp_path / "items.csv",
                       "--categorical", "bucket", "--multi-hot", "genres", "--epochs", 1, "-o", out)
    assert code == 0 and err == ""  # named columns: nothing guessed, nothing said


# ------------------------------------------------------------------------------ two-tower and --all-users
TWO_TOWER_PARAMS = dict(embedding_dim=8, hidden_layer_sizes=(16,), output_dim=8, epochs=2, early_stopping=False,
                        random_state=0, n_threads=1)
TWO_TOWER_OPTIONS = [*OPTIONS, "--output-dim", "8"]


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    """Implicit feedback of 200 users (two of whom saw every item) and a TwoTower trained on it by the CLI."""
    d = make_interactions(n_users=200, n_items=100, n_interactions=3000, implicit=True, random_state=0)
    folder = tmp_path_factory.mktemp("two_tower")
    path = write_csv(folder / "clicks.csv", {"user_id": d.users, "item_id": d.items})
    model = folder / "tt.fastrec"
    assert cli.main(["train", str(path), "--model", "two-tower", "-o", str(model), *TWO_TOWER_OPTIONS]) == 0
    return d, path, model


def test_train_two_tower_gives_the_model_of_an_in_process_fit(clicks):
    d, _, path = clicks
    loaded = fastrec.load(path)
    expected = fastrec.TwoTower(**TWO_TOWER_PARAMS).fit(d.users, d.items)
    assert type(loaded) is fastrec.TwoTower and loaded.get_params() == expected.get_params()
    np.testing.assert_array_equal(loaded.predict(d.users, d.items), expected.predict(d.users, d.items))


def test_recommend_all_users_to_parquet(tmp_path, capsys, clicks):
    pq = pytest.importorskip("pyarrow.parquet")
    d, _, model_path = clicks
    model = fastrec.load(model_path)
    out = tmp_path / "recs.parquet"
    for include_seen in (False, True):
        code, stdout, err = run(capsys, "recommend", model_path, "--all-users", "-o", out, "-k", 5,
                                "--chunk-size", 64, *(["--include-seen"] if include_seen else []))
        assert (code, err) == (0, "")
        table = pq.read_table(out)
        assert table.column_names == ["user", "rank", "item", "score"]
        ids, scores = model.recommend(model._users.ids, k=5, exclude_seen=not include_seen)
        kept = scores != -np.inf  # two users saw every item: without --include-seen they have no rows
        assert table.num_rows == kept.sum() == (200 * 5 if include_seen else 198 * 5)
        assert stdout.startswith(f"wrote {table.num_rows:,} recommendations for 200 users to {out}, ")
        np.testing.assert_array_equal(table["user"].to_numpy(), np.repeat(model._users.ids, kept.sum(axis=1)))
        np.testing.assert_array_equal(table["item"].to_numpy(), ids[kept])
        np.testing.assert_array_equal(table["score"].to_numpy(), scores[kept])
        assert pq.ParquetFile(out).num_row_groups == 4  # 200 users in chunks of 64

    # the existing recommend keeps working on a TwoTower, for explicit users
    code, stdout, _ = run(capsys, "recommend", model_path, "--users", "3,0", "-k", 2)
    ids, _ = model.recommend([3, 0], k=2)
    assert code == 0 and [r[2] for r in parse_recommendations(stdout, "csv")] == ids.ravel().tolist()
    code, stdout, _ = run(capsys, "info", model_path)
    assert code == 0 and "TwoTower" in stdout and "inputs: user_id, item_id" in stdout


def test_recommend_all_users_mistakes(tmp_path, capsys, monkeypatch, clicks):
    _, data, model_path = clicks
    out = tmp_path / "recs.parquet"
    cases = [
        (["--all-users"], "name it with -o"),
        (["--all-users", "-o", "-"], "name it with -o"),
        (["--all-users", "-o", out, "--format", "csv"], "--format applies to --users"),
        (["--all-users", "-o", tmp_path / "no" / "recs.parquet"], "cannot write"),
        (["--all-users", "-o", out, "-k", 0], "k must be"),
        (["--users", "1", "--chunk-size", 10], "--chunk-size applies to --all-users only"),
        (["--users", "1", "--progress"], "--progress applies to --all-users only"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, "recommend", model_path, *args)
        assert code == 1 and err.startswith("fastrec: error: ") and message in err, (args, err)
    assert run(capsys, "recommend", model_path, "--all-users", "--users", "1", "-o", out)[0] == 2  # exclusive
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, _, err = run(capsys, "recommend", model_path, "--all-users", "-o", out)
    assert code == 1 and "pip install 'fastrec[parquet]'" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_options_of_another_model_are_refused(tmp_path, capsys, clicks):
    _, data, _ = clicks
    for model, options, message in (
            ("two-tower", ["--gmf", "--wide"], "--gmf, --wide apply to --model recommender, not to --model two-tower"),
            ("two-tower", ["--embedding-alpha", "0.1"], "--embedding-alpha applies to --model recommender"),
            ("recommender", ["--output-dim", "8"], "--output-dim applies to --model two-tower, not to --model"),
            ("recommender", ["--no-normalize"], "--normalize applies to --model two-tower")):
        code, _, err = run(capsys, "train", data, "--model", model, "-o", tmp_path / "m", *options)
        assert code == 1 and err.startswith(f"fastrec: error: {message}"), err
    # a value one model accepts and the other does not is named by its option
    code, _, err = run(capsys, "train", data, "-o", tmp_path / "m", "--loss", "softmax")
    assert code == 1 and err.startswith("fastrec: error: --loss: loss must be one of")
    code, _, err = run(capsys, "train", data, "--model", "two-tower", "-o", tmp_path / "m", "--alpha", "auto")
    assert code == 1 and err.startswith("fastrec: error: --alpha: alpha must be")
    assert not (tmp_path / "m").exists()


def test_every_two_tower_parameter_has_a_train_option():
    # As for the Recommender: every parameter has an option, defaults stay the model's, values reach it.
    args = cli._parser().parse_args(["train", "data.csv", "-o", "m.fastrec", "--model", "two-tower"])
    defaults = fastrec.TwoTower().get_params()
    assert [p for p in defaults if p not in vars(args)] == []
    assert cli._recommender(args).get_params() == defaults
    markers = {p: object() for p in defaults}
    for p, marker in markers.items():
        setattr(args, p, marker)
    built = cli._recommender(args).get_params()
    assert [p for p, marker in markers.items() if built[p] is not marker] == []
    args = cli._parser().parse_args(["train", "d.csv", "-o", "m", "--model", "two-tower", "--negatives", "auto",
                                     "--temperature", "0.05", "--no-normalize", "--index-options", '{"M": 16}'])
    params = cli._recommender(args).get_params()
    assert (params["negatives"], params["temperature"], params["normalize"], params["index_options"]) == (
        "auto", 0.05, False, {"M": 16})


# ------------------------------------------------------------------------------ sequential
SEQ_PARAMS = dict(embedding_dim=8, max_len=6, epochs=2, early_stopping=False, random_state=0, n_threads=1)
SEQ_OPTIONS = ["--embedding-dim", "8", "--max-len", "6", "--epochs", "2", "--no-early-stopping", "--seed", "0",
               "--threads", "1"]


def test_train_sequential_orders_events_by_the_time_column(tmp_path, capsys):
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 400)
    items = rng.integers(0, 50, 400)
    ts = rng.permutation(400) * 10
    data = write_csv(tmp_path / "events.csv", {"user_id": users, "item_id": items, "ts": ts})
    out = tmp_path / "seq.fastrec"
    code, stdout, err = run(capsys, "train", data, "--model", "sequential", "--time-col", "ts", "-o", out,
                            *SEQ_OPTIONS)
    assert (code, err) == (0, ""), err
    loaded = fastrec.load(out)
    expected = fastrec.SequentialRecommender(**SEQ_PARAMS).fit(users, items, ts)
    assert type(loaded) is fastrec.SequentialRecommender and loaded.get_params() == expected.get_params()
    for a, b in zip(loaded.recommend([0, 1, 2], k=5), expected.recommend([0, 1, 2], k=5)):
        np.testing.assert_array_equal(a, b)
    code, stdout, _ = run(capsys, "recommend", out, "--users", "0", "-k", 3)
    assert code == 0 and [r[2] for r in parse_recommendations(stdout, "csv")] == expected.recommend(
        [0], k=3)[0].ravel().tolist()
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "SequentialRecommender" in stdout
    for options, message in ((["--rating-col", "ts"], "--rating-col, --weight-col and --user-features do not apply"),
                             (["--time-col", "nope"], "nope")):
        code, _, err = run(capsys, "train", data, "--model", "sequential", "-o", tmp_path / "m", *options)
        assert code == 1 and message in err, err
    code, _, err = run(capsys, "train", data, "-o", tmp_path / "m", "--time-col", "ts")
    assert code == 1 and "--time-col applies to --model sequential" in err


def test_train_sequential_with_item_features(tmp_path, capsys):
    """--item-features reaches SequentialRecommender.fit: the saved model equals one fit in Python on the same
    table, and items only in the feature file are recommendable."""
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, 400)
    items = rng.integers(0, 40, 400)
    ts = rng.permutation(400)
    data = write_csv(tmp_path / "events.csv", {"user_id": users, "item_id": items, "ts": ts})
    genres = ["|".join(rng.choice(["A", "B", "C"], 2, replace=False)) for _ in range(45)]
    features = write_csv(tmp_path / "items.csv", {"item_id": np.arange(45), "genres": genres})
    out = tmp_path / "seq.fastrec"
    code, _, err = run(capsys, "train", data, "--model", "sequential", "--time-col", "ts", "--item-features",
                       features, "--multi-hot", "genres", "-o", out, *SEQ_OPTIONS)
    assert (code, err) == (0, ""), err
    loaded = fastrec.load(out)
    table = pd.DataFrame({"genres": genres}, index=np.arange(45))
    expected = fastrec.SequentialRecommender(**SEQ_PARAMS).fit(users, items, ts, item_features=table,
                                                               feature_types={"genres": "multi_hot"})
    np.testing.assert_array_equal(loaded.item_vectors(), expected.item_vectors())
    assert set(range(40, 45)) <= set(loaded.item_ids_.tolist())
    code, _, err = run(capsys, "train", data, "--model", "sequential", "--user-features", features,
                       "--user-id-col", "item_id", "--multi-hot", "genres", "-o", tmp_path / "m")
    assert code == 1 and "--user-features do not apply" in err, err


def test_every_sequential_parameter_has_a_train_option():
    args = cli._parser().parse_args(["train", "data.csv", "-o", "m.fastrec", "--model", "sequential"])
    defaults = fastrec.SequentialRecommender().get_params()
    assert [p for p in defaults if p not in vars(args)] == []
    assert cli._recommender(args).get_params() == defaults


def test_privacy_option_builds_a_dp_config():
    pytest.importorskip("dp_accounting")
    args = cli._parser().parse_args(["train", "d.csv", "-o", "m", "--privacy",
                                     '{"target_epsilon": 8, "delta": 1e-5, "max_grad_norm": 0.5}'])
    config = cli._recommender(args).privacy
    assert isinstance(config, fastrec.DPConfig)
    assert (config.target_epsilon, config.delta, config.max_grad_norm) == (8, 1e-5, 0.5)
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["train", "d.csv", "-o", "m", "--privacy", '{"eps": 8}'])


@pytest.mark.parametrize("model, cls", [("multvae", fastrec.MultVAE), ("multdae", fastrec.MultDAE),
                                        ("autorec", fastrec.AutoRec), ("ease", fastrec.EASE)])
def test_every_autoencoder_parameter_has_a_train_option(model, cls):
    args = cli._parser().parse_args(["train", "data.csv", "-o", "m.fastrec", "--model", model])
    defaults = cls().get_params()
    assert [p for p in defaults if p not in vars(args)] == []
    assert cli._recommender(args).get_params() == defaults
    if model == "multvae":
        args = cli._parser().parse_args(["train", "d.csv", "-o", "m", "--model", model, "--precision", "bf16"])
        assert cli._recommender(args).precision == "bf16"
