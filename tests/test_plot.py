"""`fastrec.plot.learning_curve` draws the model's own history (matplotlib, Agg backend)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fastrec  # noqa: E402
from fastrec.datasets import make_interactions  # noqa: E402
from fastrec.plot import learning_curve  # noqa: E402


def test_learning_curve_draws_history_and_best_epoch(tmp_path):
    d = make_interactions(n_users=100, n_items=80, n_interactions=1500, random_state=0)
    rec = fastrec.Recommender(early_stopping=False, epochs=4, random_state=0, n_threads=1).fit(
        d.users[200:], d.items[200:], d.ratings[200:], validation_data=(d.users[:200], d.items[:200], d.ratings[:200]))
    ax = learning_curve(rec)
    loss_line = ax.get_lines()[0]
    np.testing.assert_array_equal(loss_line.get_ydata(), rec.history_["loss"])
    val_axis = [a for a in ax.figure.axes if a is not ax][0]
    np.testing.assert_array_equal(val_axis.get_lines()[0].get_ydata(), rec.history_["val_rmse"])
    assert any(line.get_label() == f"best epoch ({rec.best_epoch_})" for line in ax.get_lines())
    ax.figure.savefig(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    matplotlib.pyplot.close(ax.figure)


def test_learning_curve_of_mlp_and_unfitted_model():
    X = np.random.default_rng(0).standard_normal((200, 3))
    mlp = fastrec.MLPRegressor((4,), max_iter=5, tol=0, n_iter_no_change=100, random_state=0)
    with pytest.warns(Warning):  # ConvergenceWarning after 5 iterations
        mlp.fit(X, X[:, 0])
    ax = learning_curve(mlp)
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), mlp.loss_curve_)
    matplotlib.pyplot.close(ax.figure)
    with pytest.raises(ValueError, match="not fitted"):
        learning_curve(fastrec.Recommender())
