"""fastrec.FieldModel: the click-through-rate API over named columns."""

import numpy as np
import pytest
import scipy.sparse as sp

import fastrec
from fastrec import reference
from fastrec.metrics import roc_auc


def planted(n, seed=0):
    """Labels driven by a numeric column and by one tag (both learnable), ids that carry no signal."""
    rng = np.random.default_rng(seed)
    tags = sp.random(n, 20, density=0.1, format="csr", random_state=seed, dtype=np.float32)
    dense = rng.standard_normal((n, 2))
    logit = 2.5 * dense[:, 0] + 3.0 * (tags[:, 3].toarray().ravel() > 0) - 0.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    X = {"user": rng.integers(0, 50, n), "city": rng.choice(["a", "b", "c"], n), "tags": tags, "num": dense}
    return X, y


def take(X, rows):
    return {k: v[rows] for k, v in X.items()}


def test_learns_the_planted_signal():
    X, y = planted(6000)
    model = fastrec.FieldModel(epochs=4, random_state=0, n_threads=1).fit(take(X, slice(0, 5000)), y[:5000])
    auc = roc_auc(y[5000:], model.predict_proba(take(X, slice(5000, None)))[:, 1])
    # The Bayes AUC of this planting is ~0.87; a model that ignored the signal would sit at 0.5.
    assert auc > 0.8
    assert model.loss_curve_[-1] < model.loss_curve_[0]


def test_predictions_equal_the_numpy_oracle():
    X, y = planted(400, seed=1)
    model = fastrec.FieldModel(epochs=1, random_state=0, n_threads=1,
                               fields={"user": {"dim": 7, "hash_buckets": 13}}).fit(X, y)
    Xq = take(X, slice(0, 50))
    Xq["city"] = np.array(["zzz"] + list(Xq["city"][1:]))  # an unseen value: the unknown row
    _, _, bags, dense = model._inputs(Xq, fit=False)
    spec = model.net_.spec(bags, dense)
    spec64 = {**spec, "coefs": [c.astype(np.float64) for c in spec["coefs"]],
              "intercepts": [b.astype(np.float64) for b in spec["intercepts"]],
              "fields": [{**f, "table": f["table"].astype(np.float64)} for f in spec["fields"]],
              "dense": [{**d, "table": d["table"].astype(np.float64)} for d in spec["dense"]]}
    want = reference.field_predict(spec64, [np.arange(50, dtype=np.int32)])
    got = model.predict_proba(Xq)[:, 1]
    # float32 core vs float64 oracle on a 3-layer network: ~1e-7 relative observed; 1e-5 leaves headroom.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_mse_loss_predicts_values_around_the_target_mean():
    X, _ = planted(500, seed=2)
    y = 100.0 + X["num"][:, 0]
    model = fastrec.FieldModel(loss="mse", epochs=3, random_state=0, n_threads=1).fit(X, y)
    pred = model.predict(X)
    assert abs(pred.mean() - 100.0) < 0.5 and np.corrcoef(pred, y)[0, 1] > 0.5


@pytest.mark.parametrize("X_change, error, match", [
    (lambda X: {**X, "num": X["num"][:10]}, ValueError, "has 10 rows"),
    (lambda X: {**X, "num": np.full_like(X["num"], np.nan)}, ValueError, "NaN or infinity"),
    (lambda X: {}, TypeError, "non-empty dict"),
    (lambda X: {**X, "user": X["user"].astype(float)}, ValueError, "was categorical"),
])
def test_bad_input_names_the_problem(X_change, error, match):
    X, y = planted(100, seed=3)
    model = fastrec.FieldModel(epochs=1, random_state=0, n_threads=1).fit(X, y)
    with pytest.raises((ValueError, TypeError), match=match):
        model.predict_proba(X_change(X))


def test_bad_targets_and_options():
    X, y = planted(100, seed=4)
    with pytest.raises(ValueError, match="0/1 labels"):
        fastrec.FieldModel(epochs=1).fit(X, y * 2)
    with pytest.raises(ValueError, match="hash_buckets"):
        fastrec.FieldModel(epochs=1, fields={"user": {"hash_buckets": 0}}).fit(X, y)
    with pytest.raises(ValueError, match="unknown options"):
        fastrec.FieldModel(epochs=1, fields={"user": {"dims": 3}}).fit(X, y)
    with pytest.raises(ValueError, match="not fitted"):
        fastrec.FieldModel().predict_proba(X)
