"""What a new user meets first (issue 11): early stopping on an automatic validation split, clipped ratings,
a callable validation score, side-feature column types (given or guessed and reported), query ids of the
other kind than the training ids."""

import warnings

import numpy as np
import pytest

import fastrec
from fastrec.datasets import make_interactions

pd = pytest.importorskip("pandas")

SMALL = dict(embedding_dim=8, hidden_layer_sizes=(8,), batch_size=64, random_state=0, n_threads=1)


@pytest.fixture(scope="module")
def data():
    return make_interactions(n_users=150, n_items=80, n_interactions=3000, random_state=3)


def pairs(users, items):
    return set(zip(np.asarray(users).tolist(), np.asarray(items).tolist()))


# ------------------------------------------------------------------------------------ early stopping
def test_default_fit_holds_out_a_validation_split_and_stops(data):
    rec = fastrec.Recommender(epochs=40, learning_rate=0.02, **SMALL).fit(data.users, data.items, data.ratings)
    n = len(data.users)
    # 10% held out, give or take 4 binomial standard deviations (minus the few pairs returned to training)
    assert abs(rec.validation_size_ - 0.1 * n) < 4 * np.sqrt(n * 0.1 * 0.9)
    curve = rec.history_["val_rmse"]
    assert len(curve) == len(rec.history_["loss"]) < 40  # a learning rate this large overfits: it stopped
    assert rec.best_epoch_ == int(np.argmin(curve)) + 1
    assert len(curve) == rec.best_epoch_ + rec.n_iter_no_change
    # The held-out pairs count as seen (recommend excludes them) although they were not trained on.
    assert pairs(*rec.seen_pairs()) == pairs(data.users, data.items)
    # The mean rating is the training part's, not all ratings' (the held-out ratings are not trained on).
    assert rec.rating_mean_ != pytest.approx(float(np.mean(data.ratings)), abs=1e-9)


def test_validation_split_never_holds_out_an_id_s_only_interaction():
    # Every user and item of the first 40 pairs occurs once: none of those may be held out, or its id
    # row would never train; with 40 such pairs and a 50% fraction, a plain random split would hold out ~20.
    users = np.concatenate([np.arange(1000, 1040), np.repeat(np.arange(20), 20)])
    items = np.concatenate([np.arange(5000, 5040), np.tile(np.arange(20), 20)])
    ratings = np.random.default_rng(0).integers(1, 6, len(users)).astype(float)
    rec = fastrec.Recommender(epochs=3, validation_fraction=0.5, **SMALL).fit(users, items, ratings)
    assert rec.validation_size_ > 100
    user_rows = rec._bags[0][1][rec._users.index(np.arange(1000, 1040))]
    item_rows = rec._bags[1][1][rec._items.index(np.arange(5000, 5040))]
    assert np.all(user_rows > 0) and np.all(item_rows > 0)  # each has an id row of its own: it was trained


def test_early_stopping_off_trains_every_interaction_for_every_epoch(data):
    rec = fastrec.Recommender(epochs=3, early_stopping=False, **SMALL).fit(data.users, data.items, data.ratings)
    assert len(rec.history_["loss"]) == 3 and "val_rmse" not in rec.history_
    assert not hasattr(rec, "validation_size_")
    # float32 ratings averaged in float64: equal to 1e-6
    assert rec.rating_mean_ == pytest.approx(float(np.mean(data.ratings, dtype=np.float64)), rel=1e-6)


def test_implicit_default_validation_is_a_ranking_metric(data):
    # 80 items: each validation pair is ranked against 40 (half the items), not 99
    rec = fastrec.Recommender(epochs=2, **SMALL).fit(data.users, data.items)
    assert len(rec.history_["val_ndcg@10"]) == 2 and all(0 <= v <= 1 for v in rec.history_["val_ndcg@10"])
    # every user has touched every item: nothing can be ranked, so nothing is held out, never an error
    users, items = np.repeat(np.arange(30), 9), np.tile(np.arange(9), 30)
    rec = fastrec.Recommender(epochs=7, **SMALL).fit(users, items)
    assert "val_ndcg@10" not in rec.history_ and len(rec.history_["loss"]) == 7


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, "0.1"])
def test_validation_fraction_is_checked(data, bad):
    with pytest.raises((ValueError, TypeError), match="validation_fraction"):
        fastrec.Recommender(validation_fraction=bad, **SMALL).fit(data.users, data.items, data.ratings)


# ------------------------------------------------------------------------------------ callable validation
def test_callable_validation_drives_early_stopping_and_the_best_epoch_is_kept(data):
    scores = [0.1, 0.5, 0.9, 0.3, 0.2, 0.8, 0.1, 0.0, 0.0]  # best at epoch 3, then 3 epochs without improvement
    probe_u, probe_i = data.users[:50], data.items[:50]
    seen = {}

    def score(model, epoch):
        seen[epoch] = model.predict(probe_u, probe_i)
        return scores[epoch - 1]

    rec = fastrec.Recommender(epochs=9, n_iter_no_change=3, **SMALL)
    rec.fit(data.users, data.items, data.ratings, validation_data=score)
    assert rec.history_["val_score"] == scores[:6]
    assert rec.best_epoch_ == 3 and sorted(seen) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(rec.predict(probe_u, probe_i), seen[3])
    assert not np.array_equal(seen[3], seen[6])  # the restore is visible


def test_ctrl_c_keeps_the_best_epoch(data):
    probe_u, probe_i = data.users[:50], data.items[:50]
    seen = {}

    def score(model, epoch):
        if epoch == 4:
            model.predict(probe_u[:1], probe_i[:1])  # one pair: builds the pair scorer (weight copies) of epoch 4
            raise KeyboardInterrupt  # as Ctrl-C would, during the fourth epoch's validation
        seen[epoch] = model.predict(probe_u, probe_i)
        return [0.2, 0.9, 0.5][epoch - 1]

    rec = fastrec.Recommender(epochs=9, **SMALL)
    with pytest.raises(KeyboardInterrupt):
        rec.fit(data.users, data.items, data.ratings, validation_data=score)
    assert rec.best_epoch_ == 2
    np.testing.assert_array_equal(rec.predict(probe_u, probe_i), seen[2])
    np.testing.assert_array_equal(rec.predict(probe_u[:1], probe_i[:1]), seen[2][:1])  # the one-pair path too
    assert not np.array_equal(seen[3], seen[2])  # the interrupted model had moved on: the restore is visible


def test_field_model_takes_a_callable_validation_score():
    rng = np.random.default_rng(0)
    X = {"a": rng.integers(0, 20, 500), "b": rng.integers(0, 7, 500)}
    y = (X["a"] % 2).astype(float)
    calls = []
    model = fastrec.FieldModel(epochs=5, n_iter_no_change=2, random_state=0, n_threads=1)
    model.fit(X, y, validation_data=lambda m, epoch: calls.append(epoch) or -float(epoch))
    assert calls == [1, 2, 3] and model.history_["val_score"] == [-1.0, -2.0, -3.0] and model.best_epoch_ == 1


# ------------------------------------------------------------------------------------ clipping
def test_predictions_are_clipped_to_the_training_range(data):
    rec = fastrec.Recommender(epochs=3, learning_rate=0.05, **SMALL).fit(data.users, data.items, data.ratings)
    assert rec.rating_range_ == (float(data.ratings.min()), float(data.ratings.max()))
    users, items = np.repeat(np.arange(150), 80), np.tile(np.arange(80), 150)
    clipped = rec.predict(users, items)
    top_ids, top_scores = rec.recommend(np.arange(150), k=80)  # k = every item: padding with -inf
    rec.set_params(clip_predictions=False)
    raw = rec.predict(users, items)
    raw_ids, raw_scores = rec.recommend(np.arange(150), k=80)
    assert ((raw < 1) | (raw > 5)).any(), "no prediction outside [1, 5]: the test cannot tell"
    np.testing.assert_array_equal(clipped, np.clip(raw, 1, 5))
    np.testing.assert_array_equal(top_ids, raw_ids)  # clipping changes scores, never the order
    padding = np.isneginf(raw_scores)
    assert padding.any()
    np.testing.assert_array_equal(np.isneginf(top_scores), padding)
    np.testing.assert_array_equal(top_scores[~padding], np.clip(raw_scores[~padding], 1, 5))


def test_set_params_clip_predictions_reaches_the_one_pair_paths(data):
    """The one-pair scorer clips in the core with the bounds it was built with: after set_params changes
    clip_predictions, predict of one pair, of a few pairs and the serving handle all follow, as the batch path
    does. Fails if a scorer built before the change is kept."""
    rec = fastrec.Recommender(epochs=3, learning_rate=0.05, **SMALL).fit(data.users, data.items, data.ratings)
    users, items = np.repeat(np.arange(150), 80), np.tile(np.arange(80), 150)
    handle = rec.serving_handle()
    rec.set_params(clip_predictions=False)
    raw = rec.predict(users, items)  # the batch path
    rec.set_params(clip_predictions=True)
    outside = np.flatnonzero((raw < 1) | (raw > 5))[:4]
    assert len(outside) == 4, "too few predictions outside [1, 5]: the test cannot tell"
    u, i = users[outside], items[outside]
    for clip, want in ((True, np.clip(raw[outside], 1, 5)), (False, raw[outside]), (True, np.clip(raw[outside], 1, 5))):
        rec.set_params(clip_predictions=clip)
        np.testing.assert_array_equal([rec.predict([int(a)], [int(b)])[0] for a, b in zip(u, i)], want)
        np.testing.assert_array_equal([handle(int(a), int(b)) for a, b in zip(u, i)], want)
        np.testing.assert_array_equal(rec.predict(u, i), want)  # 4 pairs: row by row in the core


def test_partial_fit_widens_the_clipping_range(data):
    rec = fastrec.Recommender(epochs=1, **SMALL).fit(data.users, data.items, np.clip(data.ratings, 2, 4))
    assert rec.rating_range_ == (2.0, 4.0)
    rec.partial_fit(data.users[:10], data.items[:10], np.full(10, 5.0))
    assert rec.rating_range_ == (2.0, 5.0)


# ------------------------------------------------------------------------------------ feature types
def item_frame(n=80):
    rng = np.random.default_rng(1)
    genres = np.array(["Action", "Comedy", "Drama", "Horror", "Romance"])
    return pd.DataFrame({
        "bucket": rng.integers(0, 4, n),                                     # coded category
        "genres": [" ".join(rng.choice(genres, 2, replace=False)) for _ in range(n)],  # space-separated
        "tags": ["|".join(rng.choice(genres, 2, replace=False)) for _ in range(n)],    # pipe-separated
        "year": rng.integers(1950, 2020, n),                                 # a quantity
        "price": rng.random(n),
    }, index=np.arange(n))


def test_feature_types_given_explicitly_are_used_and_nothing_is_guessed(data):
    df = item_frame()
    types = {"bucket": "categorical", "genres": "multi_hot: ", "tags": "multi_hot", "year": "numeric",
             "price": "numeric"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no guess to report
        rec = fastrec.Recommender(epochs=1, **SMALL).fit(data.users, data.items, data.ratings, item_features=df,
                                                          feature_types=types)
    assert dict(rec._column_types_["item_features"]) == {**types, "tags": "multi_hot:|"}
    kinds = {name: kind for name, (kind, _) in rec._vocab_["item"].items()}
    assert kinds == {"bucket": "categorical", "genres": "multi_hot", "tags": "multi_hot"}
    assert sorted(rec._vocab_["item"]["genres"][1].tolist()) == ["Action", "Comedy", "Drama", "Horror", "Romance"]
    assert set(rec._numeric_stats_["item"]) == {"year", "price"}


def test_feature_types_guessed_are_reported(data):
    with pytest.warns(UserWarning, match="column types guessed") as record:
        rec = fastrec.Recommender(epochs=1, **SMALL).fit(data.users, data.items, data.ratings,
                                                          item_features=item_frame())
    text = str(record[0].message)
    for line in ("'bucket': categorical (integers with only 4 distinct values",
                 "'genres': multi_hot: ", "'tags': multi_hot:|", "'year': numeric", "'price': numeric"):
        assert line in text, (line, text)
    assert dict(rec._column_types_["item_features"]) == {
        "bucket": "categorical", "genres": "multi_hot: ", "tags": "multi_hot:|", "year": "numeric", "price": "numeric"}
    assert record[0].filename == __file__  # the warning names the caller's line, not fastrec's


def test_partial_fit_reads_new_feature_rows_with_the_first_fit_s_types(data):
    df = item_frame(100)
    types = {"bucket": "numeric", "genres": "multi_hot: ", "tags": "categorical", "year": "numeric",
             "price": "numeric"}
    rec = fastrec.Recommender(epochs=1, **SMALL).fit(data.users, data.items, data.ratings,
                                                      item_features=df.iloc[:80], feature_types=types)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the types are known: nothing guessed
        rec.partial_fit(np.array([0, 1]), np.array([85, 90]), np.array([3.0, 4.0]), item_features=df.iloc[80:])
    assert dict(rec._column_types_["item_features"]) == types


@pytest.mark.parametrize("types, match", [({"nope": "numeric"}, "not a column"),
                                          ({"year": "ordinal"}, "'categorical', 'numeric', 'multi_hot'"),
                                          ({"year": "multi_hot:"}, "'multi_hot:SEP'"),
                                          (["year"], "feature_types must be a dict")])
def test_bad_feature_types_are_refused(data, types, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastrec.Recommender(epochs=1, **SMALL).fit(data.users, data.items, data.ratings, item_features=item_frame(),
                                                    feature_types=types)


# ------------------------------------------------------------------------------------ id kinds
def test_int_model_converts_exact_integer_strings(data):
    rec = fastrec.Recommender(epochs=2, early_stopping=False, **SMALL).fit(data.users, data.items, data.ratings)
    u, i = data.users[:20], data.items[:20]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every string converts exactly: no warning
        np.testing.assert_array_equal(rec.predict(u.astype(str), i.astype(str)), rec.predict(u, i))
        ids_s, scores_s = rec.recommend(u[:3].astype(str), k=5)
    ids, scores = rec.recommend(u[:3], k=5)
    np.testing.assert_array_equal(ids_s, ids)  # the same user, so its seen items are excluded as well
    np.testing.assert_array_equal(scores_s, scores)
    seen = pairs(*rec.seen_pairs())
    assert not any((int(user), int(item)) in seen for user, row in zip(u[:3], ids_s) for item in row)
    # "007" is not how 7 is written: unknown, and said so once per model
    with pytest.warns(UserWarning, match="queried with string ids, some of which are not integers"):
        p = rec.predict(["007"], ["1"])
    assert p[0] == rec.predict([10**9], [1])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec.predict(["x"], ["1"])  # the same mismatch again: not repeated


def test_string_model_converts_integer_queries(data):
    su, si = data.users.astype(str), data.items.astype(str)
    rec = fastrec.Recommender(epochs=2, early_stopping=False, **SMALL).fit(su, si, data.ratings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(rec.predict(data.users[:20], data.items[:20]), rec.predict(su[:20], si[:20]))
        np.testing.assert_array_equal(rec.recommend(data.users[:2], k=5)[0], rec.recommend(su[:2], k=5)[0])
    other = fastrec.Recommender(epochs=1, early_stopping=False, **SMALL).fit(
        np.char.add("u", su), si, data.ratings)
    with pytest.warns(UserWarning, match="fit with string ids and are queried with integer ids, none of which"):
        other.predict([1, 2], ["1", "2"])


def test_implicit_split_with_repeated_interactions_ranks_and_stops():
    # Click logs repeat pairs: each user clicks 40 of 200 items three times. Distinct items count, so every
    # user has 160 untouched items and the validation ranking works (repeats once made nothing rankable).
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 120)
    items = np.concatenate([np.tile(rng.choice(200, 40, replace=False), 3) for _ in range(200)])
    rec = fastrec.Recommender(epochs=3, **SMALL).fit(users, items)
    assert rec.validation_size_ > 1000
    assert np.isfinite(rec.history_["val_ndcg@10"]).all()


def test_held_out_pairs_stay_out_of_the_history_bags(data):
    rec = fastrec.Recommender(epochs=2, user_history=True, **SMALL).fit(data.users, data.items, data.ratings)
    hist = [f.name for f in rec.net_.fields].index("user_history")
    indptr, rows, _ = rec._bags[hist]
    item_row = rec._bags[1][1]  # item entity -> its id row, what the bags list
    held_u, held_i = rec._held_out
    assert len(held_u) > 100
    for u, i in zip(held_u.tolist(), held_i.tolist()):
        assert item_row[i] not in rows[indptr[u]:indptr[u + 1]].tolist()
    # and the training pairs are in: the bags are not simply empty
    train_u, train_i = rec.seen_pairs()
    assert indptr[-1] == len(train_u) - len(held_u)
    # once partial_fit trains a held-out pair, it joins its user's bag
    u, i = int(held_u[0]), int(held_i[0])
    rec.partial_fit(rec._users.ids[[u - 1]], rec._items.ids[[i - 1]], np.array([4.0]))
    indptr, rows, _ = rec._bags[hist]
    assert item_row[i] in rows[indptr[u]:indptr[u + 1]].tolist() and len(rec._held_out[0]) == len(held_u) - 1


def test_implicit_validation_data_of_the_other_id_kind(data):
    val = np.arange(len(data.users)) % 10 == 0
    scores = []
    for kind in (int, str):  # the string pairs are converted to the model's int ids: the same scores
        rec = fastrec.Recommender(epochs=2, **SMALL)
        rec.fit(data.users[~val], data.items[~val],
                validation_data=(data.users[val].astype(kind), data.items[val].astype(kind)))
        scores.append(rec.history_["val_ndcg@10"])
    assert np.isfinite(scores[0]).all() and scores[0] == scores[1]


@pytest.mark.parametrize("returned", [None, "0.5", np.array([0.1, 0.2]), True])
def test_a_callable_validation_score_must_return_a_number(data, returned):
    rec = fastrec.Recommender(epochs=3, **SMALL)
    with pytest.raises(TypeError, match="validation_data .*must return a real number"):
        rec.fit(data.users, data.items, data.ratings, validation_data=lambda model, epoch: returned)


def test_a_model_pickled_before_the_new_parameters_existed_gets_their_defaults(data, tmp_path):
    import pickle

    rec = fastrec.Recommender(epochs=1, **SMALL).fit(data.users, data.items, data.ratings)
    for name in ("early_stopping", "validation_fraction", "clip_predictions", "rating_range_"):
        delattr(rec, name)  # as a model written by an older fastrec
    old = pickle.loads(pickle.dumps(rec))
    assert old.early_stopping is True and old.validation_fraction == 0.1 and old.clip_predictions is True
    old.save(tmp_path / "m.fastrec")  # get_params works again
    again = fastrec.load(tmp_path / "m.fastrec")
    np.testing.assert_array_equal(again.predict(data.users, data.items), rec.predict(data.users, data.items))
    again.partial_fit(data.users[:5], data.items[:5], data.ratings[:5])


def test_column_names_that_are_not_strings_survive_save_and_load(data, tmp_path):
    df = item_frame().rename(columns={"price": 1.5, "year": 7})
    rec = fastrec.Recommender(epochs=1, **SMALL).fit(
        data.users, data.items, data.ratings, item_features=df,
        feature_types={"bucket": "categorical", "genres": "multi_hot: ", "tags": "multi_hot", 7: "numeric",
                       1.5: "numeric"})
    rec.save(tmp_path / "m.fastrec")
    loaded = fastrec.load(tmp_path / "m.fastrec")
    extra = item_frame(100).rename(columns={"price": 1.5, "year": 7}).iloc[80:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stored types apply: nothing guessed
        loaded.add_features(item_features=extra)
    assert loaded.n_items_ == rec.n_items_ + 20


def test_field_model_value_kinds_are_converted_or_reported():
    rng = np.random.default_rng(0)
    X = {"a": rng.integers(0, 20, 300), "b": rng.integers(0, 7, 300)}
    y = (X["a"] % 2).astype(float)
    model = fastrec.FieldModel(epochs=2, random_state=0, n_threads=1).fit(X, y)
    query = {"a": X["a"][:10], "b": X["b"][:10]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain integer strings convert exactly: no warning
        np.testing.assert_array_equal(model.predict_proba({k: v.astype(str) for k, v in query.items()}),
                                      model.predict_proba(query))
    with pytest.warns(UserWarning, match=r"values of X\['a'\] were fit with integer ids .* not integers"):
        model.predict_proba({"a": np.array(["x"] * 10), "b": query["b"]})


def test_implicit_validation_scores_are_sampled_ranking_of_the_rankable_pairs():
    # The candidates are drawn once per fit and ranked after every epoch: the last epoch's score must be
    # exactly what fastrec.evaluation.sampled_ranking gives the final model on the pairs that can be ranked.
    from fastrec.evaluation import sampled_ranking

    d = make_interactions(n_users=400, n_items=300, n_interactions=12000, implicit=True, random_state=1)
    val = np.arange(len(d.users)) % 10 == 0
    rec = fastrec.Recommender(epochs=3, n_iter_no_change=None, **SMALL)
    rec.fit(d.users[~val], d.items[~val], validation_data=(d.users[val], d.items[val]))
    su, si = rec.seen_pairs()
    touched = {(u, i) for u, i in zip(np.concatenate([su, d.users[val]]).tolist(),
                                      np.concatenate([si, d.items[val]]).tolist())}
    n_items = len(np.union1d(si, d.items[val]))
    per_user = np.bincount([u for u, _ in touched], minlength=400)
    keep = n_items - per_user[d.users[val]] >= 99  # users with 99 untouched items (300 items: 99 negatives)
    assert 0 < keep.sum() < val.sum()  # some pairs are left out: the rule is exercised
    expected = sampled_ranking(rec, d.users[val][keep], d.items[val][keep], seen_users=su, seen_items=si,
                               n_negatives=99, k=10, random_state=0)["ndcg@10"]
    assert rec.history_["val_ndcg@10"][-1] == expected
