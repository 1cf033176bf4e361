"""`fit_phases_`: where a fit's wall time went, printed with verbose (issue 17)."""

import numpy as np
import pytest

import fastrec
from fastrec._base import fit_clock


def _data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 50, n), rng.integers(0, 80, n), rng.integers(1, 6, n).astype(float)


def test_phases_add_up_and_train_is_the_epochs(capsys):
    users, items, ratings = _data()
    model = fastrec.Recommender(epochs=3, early_stopping=False, random_state=0, verbose=True).fit(users, items, ratings)
    phases = model.fit_phases_
    assert set(phases) == {"prepare", "train", "validate", "finish", "total"}
    assert all(v >= 0 for v in phases.values())
    # train is the sum of the epochs that history_ reports; the parts add up to the wall time measured.
    assert phases["train"] == pytest.approx(sum(model.history_["seconds"]), rel=1e-9)
    assert phases["validate"] == 0.0
    parts = phases["prepare"] + phases["train"] + phases["validate"] + phases["finish"]
    assert parts == pytest.approx(phases["total"], rel=1e-9)
    err = capsys.readouterr().err
    assert "fit: prepare" in err and "total" in err


def test_validation_time_is_its_own_phase():
    users, items, ratings = _data()
    model = fastrec.Recommender(epochs=3, random_state=0).fit(users, items, ratings)  # early stopping: a split
    assert model.fit_phases_["validate"] > 0
    assert len(model.history_["seconds"]) >= 1


def test_partial_fit_and_field_model_report_too(capsys):
    users, items, ratings = _data()
    model = fastrec.Recommender(epochs=1, early_stopping=False, random_state=0).fit(users, items, ratings)
    first = model.fit_phases_
    model.partial_fit(users[:100], items[:100], ratings[:100])
    assert model.fit_phases_ is not first and model.fit_phases_["train"] == pytest.approx(
        model.history_["seconds"][-1], rel=1e-9)
    fm = fastrec.FieldModel(epochs=2, random_state=0, verbose=False)
    fm.fit({"u": users, "x": ratings}, (ratings > 3).astype(int))
    assert fm.fit_phases_["train"] == pytest.approx(sum(fm.history_["seconds"]), rel=1e-9)
    assert capsys.readouterr().err == ""  # not verbose: nothing printed


def test_a_failed_fit_leaves_no_clock_behind():
    model = fastrec.FieldModel(epochs=1)
    with pytest.raises(ValueError):
        model.fit({"u": np.array([1, 2])}, np.array([0, 5]))
    assert not hasattr(model, "fit_phases_") and fit_clock(model) is None
