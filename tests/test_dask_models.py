"""fastrec.dask's DaskFieldModel and DaskTwoTower on distributed.LocalCluster: one worker with one round per epoch
reproduces a local fit bitwise (fit and partial_fit); the combine of 3 replicas equals a NumPy computation of it;
2-3 workers learn, save, load and serve; values on one partition only are learned; a killed worker ends the fit
with WorkerLostError within the timeout; bad arguments are named."""


import numpy as np
import pytest

pytest.importorskip("distributed")
pd = pytest.importorskip("pandas")
da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")

import fastrec  # noqa: E402
from fastrec import reference as ref  # noqa: E402
from fastrec.dask import DaskFieldModel, DaskRecommender, DaskTwoTower  # noqa: E402

FIELD = dict(epochs=4, random_state=0, n_threads=1, embedding_dim=8, hidden_layer_sizes=(16,), batch_size=64)
TOWER = dict(epochs=4, early_stopping=False, random_state=0, n_threads=1, embedding_dim=8, hidden_layer_sizes=(16,),
             output_dim=8, batch_size=128)


def table(n=4000, seed=0, users=300, ads=150):
    """Click logs: categorical user (int) and ad (string) ids, a numeric column; the label: the majority of three
    signs (of the user, the ad and x)."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    a = rng.integers(0, ads, n)
    x = rng.normal(2.0, 3.0, n)
    y = ((u % 7 >= 3).astype(int) + (a % 5 >= 2) + (x > 2) >= 2).astype(np.float64)  # the majority of three
    return pd.DataFrame({"user": u, "ad": np.array([f"a{v}" for v in a]), "x": x}), y


def interactions(n=6000, users=300, items=200, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    i = (u * 7 + rng.integers(0, 40, n)) % items
    return u, i, (1 + (i % 5)).astype(np.float64)


def frame(df, parts):
    return dd.from_pandas(df, npartitions=parts, sort=False)


def chunked(x, parts):
    return da.from_array(x, chunks=-(-len(x) // parts))


def same_list(xs, ys):
    return len(xs) == len(ys) and all(np.array_equal(x, y) for x, y in zip(xs, ys))


def same_arrays(a, b):
    return same_list(a.net_._arrays(), b.net_._arrays())


def tower_arrays(m):
    return m.net_.arrays()


# ----------------------------------------------------------------------------------------------- FieldModel
@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_field_model_on_one_worker_equals_a_local_fit_bitwise(threads_client, loss):
    # bce with the ad column hashed; mse with sample weights (its offset is their weighted mean).
    df, y = table()
    params, weight = {**FIELD, "loss": loss}, None
    if loss == "mse":
        y = y * 3.0 + df["x"].to_numpy()
        weight = np.random.default_rng(5).uniform(0.5, 2.0, len(y))
    else:
        params["fields"] = {"ad": {"hash_buckets": 64}}
    got = DaskFieldModel(client=threads_client, **params).fit(
        frame(df, 1), chunked(y, 1), None if weight is None else chunked(weight, 1)).to_local()
    local = fastrec.FieldModel(**params).fit(dict(df), y, weight)
    assert got.columns_ == local.columns_
    assert same_arrays(got, local)
    assert got.history_["loss"] == local.history_["loss"]
    assert got._y_offset == local._y_offset
    np.testing.assert_array_equal(got.predict(dict(df[:50])), local.predict(dict(df[:50])))


def test_field_model_partial_fit_with_new_values_on_one_worker_equals_local(threads_client):
    df, y = table()
    df2, y2 = table(n=1500, seed=1, users=400, ads=180)  # users 300-399 and ads a150-a179 are new
    dm = DaskFieldModel(client=threads_client, **FIELD).fit(frame(df, 1), chunked(y, 1))
    dm.partial_fit(frame(df2, 1), chunked(y2, 1))
    local = fastrec.FieldModel(**FIELD).fit(dict(df), y).partial_fit(dict(df2), y2)
    assert same_arrays(dm.to_local(), local)
    assert dm.to_local().history_["loss"] == local.history_["loss"]
    np.testing.assert_array_equal(dm.to_local()._vocab_["ad"].ids, local._vocab_["ad"].ids)


def test_field_model_on_three_workers_learns_pools_the_scaling_and_serves(threads_client, tmp_path):
    df, y = table(n=9000)
    dm = DaskFieldModel(client=threads_client, sync_every=10, **{**FIELD, "epochs": 8}).fit(frame(df, 3), chunked(y, 3))
    assert len(set(dm.replica_workers_)) == 3
    model = dm.to_local()
    # Scaling over all partitions: the whole column's mean and population std (float64 pooled: 1e-12).
    mean, std = model._scale_["x"]
    np.testing.assert_allclose(mean, [df["x"].mean()], rtol=1e-12)
    np.testing.assert_allclose(std, [df["x"].std(ddof=0)], rtol=1e-12)
    # Learned: the label follows the columns; accuracy well above the majority class (0.60; a local fit: 0.99).
    acc = (model.predict(dict(df)) == y).mean()
    assert acc > 0.75, acc
    model.save(tmp_path / "f.fastrec")
    loaded = fastrec.load(tmp_path / "f.fastrec")
    np.testing.assert_array_equal(loaded.predict_proba(dict(df[:100])), model.predict_proba(dict(df[:100])))
    # Scoring on the cluster: the local model's numbers.
    np.testing.assert_array_equal(dm.predict_proba(frame(df[:300], 3)).compute(), model.predict_proba(dict(df[:300])))
    np.testing.assert_array_equal(dm.predict(frame(df[:300], 3)).compute(), model.predict(dict(df[:300])))
    wrapped = DaskFieldModel.from_local(loaded, client=threads_client)
    np.testing.assert_array_equal(wrapped.predict(frame(df[:300], 2)).compute(), model.predict(dict(df[:300])))


def test_field_model_pools_the_targets_mean_and_the_scaling_over_partitions(threads_client):
    df, y = table(n=3000)
    y = y * 3.0 + df["x"].to_numpy()
    weight = np.random.default_rng(5).uniform(0.5, 2.0, len(y))
    model = DaskFieldModel(client=threads_client, loss="mse", **{**FIELD, "epochs": 1}).fit(
        frame(df, 3), chunked(y, 3), chunked(weight, 3)).to_local()
    # Pooled in float64 from each partition's figures: equal to the whole data's within 1e-12 (relative).
    np.testing.assert_allclose(model._y_offset, np.average(y, weights=weight.astype(np.float32)), rtol=1e-12)
    np.testing.assert_allclose(model._scale_["x"][0], [df["x"].mean()], rtol=1e-12)
    np.testing.assert_allclose(model._scale_["x"][1], [df["x"].std(ddof=0)], rtol=1e-12)


def test_field_model_trains_around_an_empty_partition(threads_client):
    df, y = table(n=2000)
    X = dd.concat([frame(df[:1000], 1), frame(df[:0], 1), frame(df[1000:], 1)])
    dm = DaskFieldModel(client=threads_client, **{**FIELD, "epochs": 2}).fit(X, da.from_array(y, chunks=((1000, 0, 1000),)))
    assert len(dm.to_local().history_["loss"]) == 2
    assert np.isfinite(dm.to_local().predict_proba(dict(df))).all()


def test_field_model_values_on_one_partition_only_are_learned(threads_client):
    df, y = table(n=6000)
    df = df.copy()
    df.loc[5000:, "ad"] = [f"late{v % 7}" for v in range(1000)]  # only in the last partition
    dm = DaskFieldModel(client=threads_client, **FIELD).fit(frame(df, 3), chunked(y, 3))
    model = dm.to_local()
    assert {f"late{v}" for v in range(7)} <= set(model._vocab_["ad"].ids.tolist())
    from fastrec.dask._engine import _build, _Spec

    spec = _Spec(fastrec.FieldModel, FIELD, 0, model.columns_, {n: v.ids for n, v in model._vocab_.items()},
                 model._scale_, 0.0)
    start = _build(spec)
    j = [f.name for f in model.net_.fields].index("ad")
    rows = model._vocab_["ad"].index(np.array([f"late{v}" for v in range(7)]))
    assert (rows > 0).all()
    assert not np.allclose(model.net_.tables[j][rows], start.net_.tables[j][rows])


# ----------------------------------------------------------------------------------------------- TwoTower
@pytest.mark.parametrize("implicit", [False, True])
def test_two_tower_on_one_worker_equals_a_local_fit_bitwise(threads_client, implicit):
    u, i, r = interactions()
    ratings = None if implicit else r
    got = DaskTwoTower(client=threads_client, **TOWER).fit(chunked(u, 1), chunked(i, 1),
                                                   None if implicit else chunked(r, 1)).to_local()
    local = fastrec.TwoTower(**TOWER).fit(u, i, ratings)
    assert same_list(tower_arrays(got), tower_arrays(local))
    assert got.history_["loss"] == local.history_["loss"]
    np.testing.assert_array_equal(got.recommend(u[:20], 5)[0], local.recommend(u[:20], 5)[0])


def test_two_tower_partial_fit_on_one_worker_equals_local(threads_client):
    u, i, r = interactions()
    u2, i2, _ = interactions(n=2000, users=400, items=260, seed=1)
    dm = DaskTwoTower(client=threads_client, **TOWER).fit(chunked(u, 1), chunked(i, 1))
    dm.partial_fit(chunked(u2, 1), chunked(i2, 1))
    local = fastrec.TwoTower(**TOWER).fit(u, i).partial_fit(u2, i2)
    assert same_list(tower_arrays(dm.to_local()), tower_arrays(local))
    assert dm.to_local().history_["loss"] == local.history_["loss"]


def test_two_tower_on_three_workers_learns_saves_and_recommends_like_local(threads_client, tmp_path):
    u, i, r = interactions(n=9000)
    dm = DaskTwoTower(client=threads_client, sync_every=5, **{**TOWER, "epochs": 8}).fit(chunked(u, 3), chunked(i, 3),
                                                                                 chunked(r, 3))
    model = dm.to_local()
    rmse = np.sqrt(np.mean((model.predict(u, i) - r) ** 2))
    assert rmse < 0.9 * np.std(r)
    assert len(set(zip(*model.seen_pairs()))) == len(set(zip(u.tolist(), i.tolist())))
    model.save(tmp_path / "t.fastrec")
    loaded = fastrec.load(tmp_path / "t.fastrec")
    users = np.unique(u)[:60]
    got = dm.recommend(chunked(users, 3), k=5).compute()
    ids, scores = loaded.recommend(users, 5)
    np.testing.assert_array_equal(got["item"].to_numpy(), ids.ravel())
    np.testing.assert_array_equal(got["score"].to_numpy(), scores.ravel())
    np.testing.assert_array_equal(dm.predict(chunked(u[:200], 2), chunked(i[:200], 2)).compute(),
                                  loaded.predict(u[:200], i[:200]))


def test_two_tower_items_on_one_partition_only_are_learned(threads_client):
    u, i, _ = interactions()
    i = i.copy()
    i[-500:] = 10_000 + np.arange(500) % 7  # items only in the last partition
    model = DaskTwoTower(client=threads_client, sync_every=5, **TOWER).fit(chunked(u, 3), chunked(i, 3)).to_local()
    assert set(range(10_000, 10_007)) <= set(model._items.ids.tolist())
    from fastrec.dask._engine import _build, _Spec

    start = _build(_Spec(fastrec.TwoTower, TOWER, 0, np.unique(u), np.unique(i), None, None, None, None))
    rows = model._bags["item"][0][1][model._items.index(np.arange(10_000, 10_007))]  # their id rows
    assert (rows > 0).all()
    item_ids = model.net_.towers[1].tables[0]
    assert not np.allclose(item_ids[rows], start.net_.towers[1].tables[0][rows])


def test_the_combine_of_three_two_tower_replicas_equals_numpy():
    # Three replicas trained in this process by the workers' functions; the expected rows from NumPy on their
    # tables before the combine: the start value plus each touching replica's change, the optimizer state the
    # mean over the replicas that touched the row (both towers' tables: the engine's flat list).
    from fastrec.dask._engine import _REPLICAS, _Spec, _combine, _counts, _drop, _round, _start, _tables
    from fastrec.dask._recommenders import _part

    u, i, _ = interactions(n=6000)
    params = {**TOWER, "epochs": 1}
    spec = _Spec(fastrec.TwoTower, params, 0, np.unique(u), np.unique(i), None, None, None, None)
    thirds = [slice(0, 2000), slice(2000, 4000), slice(4000, None)]
    try:
        counts = 0
        for rep, sl in enumerate(thirds):
            c, _ = _start("t3", rep, 3, spec, None if rep == 0 else 7919 * rep, _part(u[sl], i[sl], None, None))
            counts = counts + c
        for rep in range(3):
            _counts("t3", rep, counts)
        start = [t[0].copy() for t in _tables(_REPLICAS[("t3", 0)].est.net_)]
        results = [_round("t3", rep, None, None, 0, 1 << 62) for rep in range(3)]
        nets = [_REPLICAS[("t3", rep)].est.net_ for rep in range(3)]
        after = [[tuple(a.copy() for a in t) for t in _tables(n)] for n in nets]
        for shard in range(3):
            _combine("t3", shard, *[res["pieces"][shard] for res in results])
        checked = 0
        for j, table in enumerate(start):
            touched = [np.zeros(len(table), bool) for _ in range(3)]
            for rep in range(3):
                for shard in range(3):
                    touched[rep][results[rep]["pieces"][shard][j][0]] = True
            value, *state, n = ref.combine_replicas(table, [a[j] for a in after], touched)
            bounds = _REPLICAS[("t3", 0)].bounds[j]
            for shard in range(3):
                rows = np.arange(bounds[shard], bounds[shard + 1])
                rows = rows[n[rows] > 0]
                own = _tables(nets[shard])[j]
                # float64 sums in another order than the test's, rounded to float32: within a float32 step.
                np.testing.assert_allclose(own[0][rows], value[rows], rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(own[1][rows], state[0][rows], rtol=1e-6, atol=1e-9)
                np.testing.assert_allclose(own[2][rows], state[1][rows], rtol=1e-6, atol=1e-12)
                checked += int((n[rows] == 3).sum())
        assert checked > 50  # rows all three replicas touched: the general rule was exercised
    finally:
        _drop("t3")


# ----------------------------------------------------------------------------------------------- failures
def test_a_worker_killed_mid_field_fit_raises_within_the_timeout_and_the_client_survives(kill_a_replica_mid_fit):
    df, y = table(n=40_000)
    # Bounded even if the kill missed (the test then fails): ~160 rounds per epoch.
    kill_a_replica_mid_fit(
        lambda client: DaskFieldModel(client=client, sync_every=2, timeout=60, **{**FIELD, "epochs": 30}),
        lambda dm: dm.fit(frame(df, 2), chunked(y, 2)))


def test_bad_arguments_name_what_is_wrong(threads_client):
    df, y = table(n=200)
    with pytest.raises(TypeError, match="dask DataFrame"):
        DaskFieldModel(client=threads_client, **FIELD).fit(dict(df), chunked(y, 2))
    with pytest.raises(ValueError, match="partitions"):
        DaskFieldModel(client=threads_client, **FIELD).fit(frame(df, 2), chunked(y, 3))
    with pytest.raises(ValueError, match="0/1"):
        DaskFieldModel(client=threads_client, **FIELD).fit(frame(df, 2), chunked(y + 2, 2))
    with pytest.raises(ValueError, match="sync_every"):
        DaskFieldModel(client=threads_client, sync_every=0, **FIELD).fit(frame(df, 2), chunked(y, 2))
    with pytest.raises(TypeError):
        DaskTwoTower(client=threads_client, no_such_parameter=1)
    with pytest.raises(ValueError, match="not fitted"):
        DaskFieldModel(client=threads_client).to_local()
    with pytest.raises(ValueError, match="not fitted"):  # scoring an unfitted model says so too
        DaskTwoTower(client=threads_client).predict(chunked(np.arange(4), 2), chunked(np.arange(4), 2))
    with pytest.raises(ValueError, match="from_local needs a fitted fastrec.TwoTower"):
        DaskTwoTower.from_local(fastrec.Recommender(), client=threads_client)
    from fastrec import DPConfig

    with pytest.raises(ValueError, match="privacy"):
        DaskRecommender(client=threads_client, privacy=DPConfig(target_epsilon=4.0, delta=1e-5))
    with pytest.raises(ValueError, match="privacy"):
        DaskRecommender(client=threads_client).set_params(privacy=DPConfig(target_epsilon=4.0, delta=1e-5))


def test_missing_labels_empty_data_and_other_columns_are_refused_and_leave_the_model(threads_client):
    df, y = table(n=400)
    with pytest.raises(TypeError, match="y is required"):
        DaskFieldModel(client=threads_client, **FIELD).fit(frame(df, 2), None)
    with pytest.raises(ValueError, match="X is empty"):
        DaskFieldModel(client=threads_client, **FIELD).fit(frame(df.iloc[:0], 1), chunked(y[:0], 1))
    dm = DaskFieldModel(client=threads_client, **{**FIELD, "epochs": 1, "loss": "mse"}).fit(frame(df, 2),
                                                                                           chunked(y, 2))
    with pytest.raises(ValueError, match="predict_proba needs loss='bce'"):
        dm.predict_proba(frame(df, 2))
    before = dm.to_local().predict(dict(df))
    with pytest.raises(ValueError, match="the model was fitted on"):
        dm.partial_fit(frame(df.drop(columns=["x"]), 2), chunked(y, 2))
    np.testing.assert_array_equal(dm.to_local().predict(dict(df)), before)


def test_verbose_prints_a_line_per_round(threads_client, capsys):
    df, y = table(n=1000)
    DaskFieldModel(client=threads_client, sync_every=4, verbose=True, **{**FIELD, "epochs": 1}).fit(frame(df, 2), chunked(y, 2))
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("DaskFieldModel: epoch 1, round")]
    assert len(lines) >= 2 and all("rows/s" in l and "loss" in l for l in lines)
