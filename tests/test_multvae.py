"""fastrec.MultVAE / MultDAE: the estimator surface (fit from raw ids, fold-in, recommend, partial_fit,
save / load, CLI, bad input). The core's math is tested against the oracle in test_multvae_core.py."""

import numpy as np
import pytest

import fastrec
from fastrec import MultDAE, MultVAE
from fastrec import reference as ref


def _clicks(n_users=120, n_items=60, n=1500, seed=0):
    rng = np.random.default_rng(seed)
    # two groups of users who like two halves of the catalogue: something to learn
    users = rng.integers(0, n_users, n)
    half = (users % 2) * (n_items // 2)
    items = half + rng.integers(0, n_items // 2, n)
    return users * 10 + 7, items + 1000  # raw ids unlike the entity numbers


SMALL = dict(hidden=(16,), latent=4, epochs=8, batch_size=32, learning_rate=1e-2, random_state=0, n_threads=1)


@pytest.fixture(scope="module", params=[MultVAE, MultDAE])
def fitted(request):
    users, items = _clicks()
    return request.param(early_stopping=False, **{**SMALL, "epochs": 20}).fit(users, items), (users, items)


def test_scores_match_oracle_forward(fitted):
    model, (users, items) = fitted
    user = users[0]
    bag = np.unique(items[users == user])
    cols = np.searchsorted(model.item_ids_, bag).astype(np.int32)
    X = (np.array([0, len(cols)], np.int64), cols, np.ones(len(cols), np.float32), model.n_items_)
    logits = ref.multvae_forward(model.coefs_, model.intercepts_, model.n_encoder_, model.variational, X)[0]
    got = model.predict(np.full(model.n_items_, user), model.item_ids_)
    np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())


def test_fold_in_equals_trained_user(fitted):
    model, (users, items) = fitted
    for user in np.unique(users)[:5]:
        bag = items[users == user].tolist()
        a = model.recommend([user], k=10)
        b = model.recommend(histories=[bag + bag[:1]], k=10)  # repeats count once
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.isin(a[0], bag).any()
    # a new user: an unknown-id bag skipped, the rest scored; recommending the other half is what it learned
    ids, _ = model.recommend(histories=[[1000, 1001, 1002, 1003, 999999]], k=10)
    assert (ids[0] < 1030).mean() >= 0.7


def test_recommend_candidates_and_empty_bag(fitted):
    model, (users, items) = fitted
    ids, scores = model.recommend(histories=[[]], k=5, items=[1000, 1001, 12345])  # an empty bag: no error
    assert ids.shape == (1, 2) and set(ids[0]) == {1000, 1001}  # k capped at the known candidates
    ids, scores = model.recommend(histories=[[1000]], k=5, items=[1000, 1001, 12345])
    assert ids[0][0] == 1001 and ids[0][1] == -1 and scores[0][1] == -np.inf  # the bag's item is excluded
    with pytest.raises(ValueError, match="users or histories"):
        model.recommend()
    with pytest.raises(ValueError, match="not both"):
        model.recommend([users[0]], histories=[[1000]])


def test_similar_items(fitted):
    model, _ = fitted
    ids, sims = model.similar_items(1000, k=5)
    assert 1000 not in ids and len(ids) == 5 and np.all(np.diff(sims) <= 0)


def test_save_load_round_trip(tmp_path, fitted):
    model, (users, _) = fitted
    model.save(tmp_path / "m.fastrec")
    loaded = fastrec.load(tmp_path / "m.fastrec")
    assert type(loaded) is type(model)
    a, b = model.recommend(users[:20], k=7), loaded.recommend(users[:20], k=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    loaded.partial_fit(users[:50], np.full(50, 1000))  # training continues after loading


@pytest.mark.parametrize("cls", [MultVAE, MultDAE])
def test_deterministic_across_threads(cls):
    users, items = _clicks(seed=3)
    models = [cls(**{**SMALL, "n_threads": t, "epochs": 3}).fit(users, items) for t in (1, 2, 3)]
    for m in models[1:]:
        assert {k: v for k, v in m.history_.items() if k != "seconds"} == \
            {k: v for k, v in models[0].history_.items() if k != "seconds"}
        for a, b in zip(models[0].coefs_ + models[0].intercepts_, m.coefs_ + m.intercepts_):
            np.testing.assert_array_equal(a, b)


def test_early_stopping_holds_out_users_and_keeps_best():
    users, items = _clicks(n_users=300, n=4000, seed=4)
    model = MultVAE(**{**SMALL, "epochs": 12}, validation_fraction=0.2, n_iter_no_change=3).fit(users, items)
    val = model.history_["val_ndcg@100"]
    assert model.validation_size_ == 60 and 1 <= len(val) <= 12
    assert val[model.best_epoch_ - 1] == max(val)
    assert max(val) > 0.3  # the two halves are learnable; popularity alone gives about half of that


def test_partial_fit_grows_items_and_continues():
    users, items = _clicks(seed=5)
    model = MultDAE(early_stopping=False, **SMALL).fit(users, items)
    steps, n_items = model.adam_steps_, model.n_items_
    model.partial_fit([5, 5, 99999], [1000, 5555, 6666])
    assert model.n_items_ == n_items + 2 and model.adam_steps_ == steps + 1
    assert model.coefs_[0].shape[0] == n_items + 2 and model.coefs_[-1].shape[1] == n_items + 2
    ids, _ = model.recommend([99999], k=3)
    assert 6666 not in ids
    fresh = MultVAE(**SMALL).partial_fit(users, items)
    assert len(fresh.history_["loss"]) == 1


def test_training_lowers_loss():
    users, items = _clicks(seed=6)
    model = MultVAE(early_stopping=False, **{**SMALL, "epochs": 15}, anneal_steps=0).fit(users, items)
    loss = model.history_["loss"]
    assert loss[-1] < loss[0]


@pytest.mark.parametrize("params, match", [
    ({"hidden": (0,)}, "hidden"), ({"latent": 0}, "latent"), ({"dropout": 1.0}, "dropout"),
    ({"learning_rate": 0.0}, "learning_rate"), ({"beta_max": -1.0}, "beta_max"), ({"anneal_steps": "x"}, "anneal"),
    ({"batch_size": 0}, "batch_size"), ({"validation_metric": "rmse"}, "validation_metric"), ({"l2": -1.0}, "l2"),
])
def test_bad_parameters(params, match):
    users, items = _clicks()
    with pytest.raises((ValueError, TypeError), match=match):
        MultVAE(**{**SMALL, **params}).fit(users, items)


def test_bad_arguments():
    users, items = _clicks()
    with pytest.raises(ValueError, match="implicit feedback"):
        MultVAE(**SMALL).fit(users, items, np.ones(len(users)))
    with pytest.raises(ValueError, match="same length"):
        MultVAE(**SMALL).fit(users, items[:-1])
    with pytest.raises(ValueError, match="not fitted"):
        MultVAE().recommend(users[:1])
    with pytest.raises(ValueError, match="histories must be a list"):
        MultDAE(early_stopping=False, **SMALL).fit(users, items).recommend(histories=np.array([1, 2]))


def test_cli_train(tmp_path, capsys):
    from fastrec import cli

    users, items = _clicks()
    data = tmp_path / "clicks.csv"
    data.write_text("user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in zip(users, items)))
    out = tmp_path / "vae.fastrec"
    args = ["train", str(data), "--model", "multvae", "--encoder", "16", "--latent", "4", "--epochs", "3",
            "--batch-size", "32", "--seed", "0", "--threads", "1", "-o", str(out)]
    assert cli.main(args) == 0
    assert "3 epochs" in capsys.readouterr().out
    model = fastrec.load(out)
    assert isinstance(model, MultVAE) and model.coefs_[0].shape == (60, 16)
    assert cli.main(["train", str(data), "--model", "multdae", "--beta-max", "0.1", "-o", str(out)]) == 1
    assert "--beta-max applies to --model multvae" in capsys.readouterr().err
