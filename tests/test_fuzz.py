"""Malformed input thrown at every public entry point (issue 4, robustness).

Each property calls the API with one argument drawn from a mix of well-formed and malformed values (wrong
shapes and lengths, 0-d / 3-d / empty arrays, NaN / inf, object arrays, mixed or float ids, huge ints,
complex, bytes, datetimes, nested lists, None, ...), every other argument valid. The call must either
succeed with a sane result or raise ValueError / TypeError whose message names the argument. Any other
exception, or a warning (pytest turns warnings into errors), fails the property; a crash kills the run and a
hang is cut by the faulthandler watchdog below, both visible failures.

Runs are derandomized (the same examples every run); FASTREC_FUZZ_EXAMPLES raises the number of examples
for a longer local hunt.
"""

import faulthandler
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fastrec import FieldModel, MLPClassifier, MLPRegressor, Recommender, datasets, evaluation, metrics
from fastrec._checks import ConvergenceWarning, DataConversionWarning
from fastrec.features import FeatureTable

N_EXAMPLES = int(os.environ.get("FASTREC_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(autouse=True)
def watchdog():
    """A hang is a failure: dump every thread's stack and exit if one test runs for minutes (an example takes
    milliseconds, under the sanitizers tens of them)."""
    faulthandler.dump_traceback_later(60 + 2 * N_EXAMPLES, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def names_re(name):
    return rf"(?<!\w){re.escape(name)}(?!\w)"


def outcome(call, *names):
    """call()'s result, or None when it raised ValueError/TypeError with a message naming one of `names`."""
    with warnings.catch_warnings():
        # Expected on tiny data: max_iter=1, a column-vector y, batch_size larger than the data.
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        warnings.filterwarnings("ignore", category=DataConversionWarning)
        warnings.filterwarnings("ignore", message="Got `batch_size`")
        try:
            return call()
        except (ValueError, TypeError) as exc:
            msg = str(exc)
            named = any(re.search(names_re(n), msg) for n in names)
            assert named, f"{type(exc).__name__}({msg!r}) does not name {names}"
            return None


def finite(a, shape=None):
    a = np.asarray(a)
    assert a.dtype.kind == "f" and np.isfinite(a).all(), a
    if shape is not None:
        assert a.shape == shape, (a.shape, shape)
    return a


# --------------------------------------------------------------------------------------------- strategies

SPECIAL = [None, True, False, np.nan, np.inf, -np.inf, 0.5, 1.0, -1, 0, 2**31, 2**63, 2**70, -2**63, 1e300,
           1 + 2j, "a", "", b"a", np.datetime64("2020-01-01"), np.int64(3), np.float32(2), [], [1], {}, ()]
SCALARS = st.one_of(st.integers(-3, 5), st.sampled_from(SPECIAL), st.floats(), st.text(max_size=2))
NUMBER = st.floats(-5, 5) | st.sampled_from([np.nan, np.inf, -np.inf, 1e39, -1e39])
DTYPES = st.one_of(hnp.boolean_dtypes(), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(),
                   hnp.floating_dtypes(), hnp.complex_number_dtypes(), hnp.datetime64_dtypes(max_period="D"),
                   hnp.byte_string_dtypes(max_len=2), hnp.unicode_string_dtypes(max_len=2))


def object_array(values):
    a = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        a[i] = v
    return a


def shapes_near(shape):
    """`shape` itself (most often), a neighbour of it, or any small shape of 0 to 3 dimensions."""
    near = [shape, shape, (0,) + shape[1:], (shape[0] + 1,) + shape[1:], shape + (1,), (), shape[:1] * 3]
    return st.one_of(st.sampled_from(near), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))


def junk(shape, values=None):
    """Stand-ins for an argument that should be an array of `shape`: arrays of any dtype and a shape near
    it, object arrays, (nested) lists, scalars. `values` = (dtype, elements of such arrays, elements of
    lists) adds arrays of `shape` and lists of its length: mostly well-formed."""
    n = shape[0]
    options = [
        hnp.arrays(DTYPES, shapes_near(shape)),
        st.lists(SCALARS, min_size=n, max_size=n),
        st.lists(SCALARS, max_size=n + 1).map(object_array),
        st.lists(st.lists(SCALARS, max_size=3), min_size=n, max_size=n),
        SCALARS,
    ]
    if values is not None:
        options.append(hnp.arrays(values[0], shape, elements=values[1]))
        options.append(st.lists(values[2], min_size=n, max_size=n))
    return st.one_of(*options)


@st.composite
def sparse(draw, shape):
    """CSR matrices of about `shape`, some with index arrays edited after construction (scipy checks
    them only in its constructor): negative or out-of-range columns, a decreasing or overlong indptr."""
    dense = draw(hnp.arrays(np.float64, shapes_near(shape).filter(lambda s: len(s) == 2), elements=NUMBER))
    A = sp.csr_matrix(dense)
    if A.nnz and draw(st.booleans()):
        A.indices[draw(st.integers(0, A.nnz - 1))] = draw(st.sampled_from([-1, A.shape[1], 2**31 - 1]))
    elif A.shape[0] > 1 and draw(st.booleans()):
        A.indptr[1] = draw(st.sampled_from([-1, A.nnz + 1]))
    return A


NUMBERS = (np.float64, NUMBER, NUMBER)
IDS = (np.int64, st.integers(-1, 14),
       st.integers(0, 14) | st.sampled_from([-1, 2**62, 2**63, 2**64 - 1, 2**70, 1.0, 2.5, np.nan, "a", None, True]))


def params_of(cls, skip=()):
    return sorted(p for p in cls()._get_param_names() if p not in skip)


def draw_hyper_parameter(data, cls, counts, values=None):
    """(name, value): a constructor parameter of cls and a drawn value for it, except that a large valid
    count among `counts` (epochs, max_iter ...) becomes 3: work, not a malformed input."""
    name = data.draw(st.sampled_from(params_of(cls, skip=("verbose",))))
    value = data.draw(values(name) if values else SCALARS, label=name)
    if name in counts and isinstance(value, int) and 3 < value < 2**31:
        value = 3
    return name, value


# --------------------------------------------------------------------------------------------- data

RNG = np.random.RandomState(0)
X6 = RNG.rand(6, 3)
Y6_CLASS = np.array([0, 1, 2, 0, 1, 2])
Y6_REG = X6 @ [1.0, -2.0, 0.5]
USERS = np.array([1, 2, 3, 1, 2, 3, 4])
ITEMS = np.array([10, 11, 12, 11, 12, 13, 10])
RATINGS = np.array([1.0, 2, 3, 4, 5, 3, 2])
SMALL_REC = dict(early_stopping=False, embedding_dim=2, hidden_layer_sizes=(2,), epochs=1, batch_size=4, random_state=0, n_threads=1)
SMALL_MLP = dict(hidden_layer_sizes=(3,), max_iter=1, random_state=0, n_threads=1)
SMALL_FM = dict(embedding_dim=2, hidden_layer_sizes=(2,), epochs=1, batch_size=4, random_state=0, n_threads=1)
FM_X = {"cat": np.array([1, 2, 3, 1, 2, 3]), "tags": sp.csr_matrix(np.eye(6, 4, dtype=np.float32)),
        "num": np.array([0.5, 1.0, 2.0, 3.0, 4.0, 5.0])}
FM_Y = np.array([0, 1, 0, 1, 1, 0])


def item_table():
    return FeatureTable([10, 11, 12, 13, 14], categorical={"kind": ["a", "b", "a", "b", "c"]},
                        multi_hot={"tags": sp.csr_matrix(np.eye(5, 3, dtype=np.float32))},
                        numeric={"year": [1990.0, 2000, 2010, 2020, 1980]})


@pytest.fixture(scope="module")
def fitted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(**SMALL_MLP).fit(X6, Y6_CLASS)
        reg = MLPRegressor(**SMALL_MLP).fit(X6, Y6_REG)
    rec = Recommender(**SMALL_REC).fit(USERS, ITEMS, RATINGS, item_features=item_table())
    implicit = Recommender(**SMALL_REC).fit(USERS.astype(str), ITEMS.astype(str))
    fm = FieldModel(**SMALL_FM).fit(FM_X, FM_Y)
    return {"clf": clf, "reg": reg, "rec": rec, "implicit": implicit, "fm": fm}


# --------------------------------------------------------------------------------------------- MLP

def check_mlp(model, X, diverged_ok=False):
    n = len(X) if not sp.issparse(X) else X.shape[0]
    if diverged_ok and outcome(lambda: model.predict(X), "X") is None:
        return  # finite weights that overflow float32 on X (learning_rate_init=1e19): reported, not NaN
    pred = model.predict(X)
    assert pred.shape[0] == n
    if isinstance(model, MLPClassifier):
        assert np.isin(pred, model.classes_).all()
        P = finite(model.predict_proba(X), (n, len(model.classes_)))
        assert np.allclose(P.sum(axis=1), 1)
    else:
        finite(pred)


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
@FUZZ
@given(X=st.one_of(junk((6, 3), NUMBERS), sparse((6, 3))))
def test_mlp_fit_X(cls, X):
    y = Y6_CLASS if cls is MLPClassifier else Y6_REG
    model = outcome(lambda: cls(**SMALL_MLP).fit(X, y), "X")
    if model is not None:
        check_mlp(model, X)


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
@FUZZ
@given(y=junk((6,), NUMBERS))
def test_mlp_fit_y(cls, y):
    model = outcome(lambda: cls(**SMALL_MLP).fit(X6, y), "y")
    if model is not None:
        check_mlp(model, X6)


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
@FUZZ
@given(data=st.data())
def test_mlp_hyper_parameters(cls, data):
    name, value = draw_hyper_parameter(data, cls, ("max_iter", "n_iter_no_change"))
    y = Y6_CLASS if cls is MLPClassifier else Y6_REG
    params = {**SMALL_MLP, "early_stopping": name == "validation_fraction", name: value}
    model = outcome(lambda: cls(**params).fit(np.tile(X6, (2, 1)), np.tile(y, 2)), name)
    if model is not None:
        check_mlp(model, X6, diverged_ok=True)


@FUZZ
@given(classes=junk((3,), (np.int64, st.integers(0, 3), st.integers(0, 3) | SCALARS)))
def test_mlp_partial_fit_classes(classes):
    model = outcome(lambda: MLPClassifier(**SMALL_MLP).partial_fit(X6, Y6_CLASS, classes=classes), "classes", "y")
    if model is not None:
        check_mlp(model, X6)


@pytest.mark.parametrize("kind", ["clf", "reg"])
@FUZZ
@given(X=st.one_of(junk((4, 3), NUMBERS), sparse((4, 3))))
def test_mlp_predict(fitted, kind, X):
    model = fitted[kind]
    pred = outcome(lambda: model.predict(X), "X")
    if pred is not None:
        check_mlp(model, X)


@pytest.mark.parametrize("kind", ["clf", "reg"])
@FUZZ
@given(data=st.data())
def test_mlp_score(fitted, kind, data):
    model = fitted[kind]
    name = data.draw(st.sampled_from(["y", "sample_weight"]))
    y = Y6_CLASS if kind == "clf" else Y6_REG
    args = {"y": y, "sample_weight": None}
    args[name] = data.draw(junk((6,), NUMBERS), label=name)
    score = outcome(lambda: model.score(X6, **args), name)
    if score is not None:
        assert np.isfinite(score) and (kind == "reg" or 0 <= score <= 1)


# --------------------------------------------------------------------------------------------- Recommender

def check_recommender(model):
    finite(model.predict(USERS, ITEMS), (len(USERS),))
    ids, scores = model.recommend(USERS[:2], k=2)
    assert ids.shape == scores.shape and ids.shape[0] == 2 and 1 <= ids.shape[1] <= 2


@FUZZ
@given(data=st.data())
def test_recommender_fit(data):
    name = data.draw(st.sampled_from(["users", "items", "ratings", "sample_weight"]))
    args = {"users": USERS, "items": ITEMS, "ratings": RATINGS, "sample_weight": None}
    values = IDS if name in ("users", "items") else NUMBERS
    args[name] = data.draw(junk((7,), values), label=name)
    model = outcome(lambda: Recommender(**SMALL_REC).fit(**args), name)
    if model is not None:
        check_recommender(model)


@FUZZ
@given(data=st.data())
def test_recommender_feature_tables(data):
    side = data.draw(st.sampled_from(["user_features", "item_features"]))
    df = pd.DataFrame({"kind": ["a", "b", "a", "b", "c"], "year": [1990.0, 2000, 2010, 2020, 1980]},
                      index=[10, 11, 12, 13, 14] if side == "item_features" else [1, 2, 3, 4, 5])
    tables = [df, item_table(), FeatureTable(["a", "b"], numeric={"x": [1.0, 2.0]}), {"kind": ["a"] * 5}]
    value = data.draw(st.one_of(SCALARS, st.sampled_from(tables), junk((5,))), label=side)
    model = outcome(lambda: Recommender(**SMALL_REC).fit(USERS, ITEMS, RATINGS, **{side: value}), side)
    if model is not None:
        check_recommender(model)


@pytest.mark.parametrize("implicit", [False, True])
@FUZZ
@given(data=st.data())
def test_recommender_hyper_parameters(implicit, data):
    name, value = draw_hyper_parameter(data, Recommender, ("epochs", "negatives"))
    ratings = None if implicit else RATINGS
    model = outcome(lambda: Recommender(**{**SMALL_REC, name: value}).fit(USERS, ITEMS, ratings), name)
    if model is not None:
        check_recommender(model)


# Ids of the other kind than the model's (str vs int) are converted or reported by a warning, tested in
# tests/test_recommender.py; here only "never crash" is checked.
@pytest.mark.filterwarnings("ignore:(users|items) were fit with:UserWarning")
@pytest.mark.parametrize("kind", ["rec", "implicit"])
@FUZZ
@given(data=st.data())
def test_recommender_predict(fitted, kind, data):
    model = fitted[kind]
    name = data.draw(st.sampled_from(["users", "items"]))
    args = {"users": USERS[:4], "items": ITEMS[:4]}
    args[name] = data.draw(junk((4,), IDS), label=name)
    pred = outcome(lambda: model.predict(**args), name)
    if pred is not None:
        finite(pred, (len(args["users"]),))


# Ids of the other kind than the model's (str vs int) are converted or reported by a warning, tested in
# tests/test_recommender.py; here only "never crash" is checked.
@pytest.mark.filterwarnings("ignore:(users|items) were fit with:UserWarning")
@pytest.mark.parametrize("kind", ["rec", "implicit"])
@FUZZ
@given(data=st.data())
def test_recommender_recommend(fitted, kind, data):
    model = fitted[kind]
    name = data.draw(st.sampled_from(["users", "k", "items", "exclude_seen"]))
    args = {"users": USERS[:3], "k": 2, "items": None, "exclude_seen": True}
    if name == "k":
        args["k"] = data.draw(SCALARS | st.integers(-10, 10), label="k")
    elif name == "exclude_seen":
        args["exclude_seen"] = data.draw(SCALARS, label="exclude_seen")
    else:
        args[name] = data.draw(junk((3,), IDS), label=name)
    out = outcome(lambda: model.recommend(args["users"], args["k"], exclude_seen=args["exclude_seen"],
                                          items=args["items"]), name)
    if out is not None:
        ids, scores = out
        assert ids.shape == scores.shape and ids.shape[-1] <= args["k"]
        assert not np.isnan(scores).any() and np.all(scores[..., :-1] >= scores[..., 1:])


# Ids of the other kind than the model's (str vs int) are converted or reported by a warning, tested in
# tests/test_recommender.py; here only "never crash" is checked.
@pytest.mark.filterwarnings("ignore:(users|items) were fit with:UserWarning")
@pytest.mark.parametrize("kind", ["rec", "implicit"])
@FUZZ
@given(data=st.data())
def test_recommender_similar_items(fitted, kind, data):
    model = fitted[kind]
    name = data.draw(st.sampled_from(["items", "k"]))
    args = {"items": ITEMS[:3], "k": 2}
    args[name] = data.draw(SCALARS | st.integers(-10, 10) if name == "k" else junk((3,), IDS), label=name)
    out = outcome(lambda: model.similar_items(args["items"], args["k"]), name)
    if out is not None:
        ids, sims = out
        assert ids.shape == sims.shape and ids.shape[-1] <= args["k"]
        assert np.all(sims[np.isfinite(sims)] <= 1 + 1e-5)


# --------------------------------------------------------------------------------------------- FieldModel

def check_field_model(model, X):
    n = next(v.shape[0] if sp.issparse(v) else len(v) for v in X.values())
    P = finite(model.predict_proba(X), (n, 2))
    assert np.all((P >= 0) & (P <= 1))


@FUZZ
@given(data=st.data())
def test_field_model_fit(data):
    name = data.draw(st.sampled_from(["cat", "tags", "num", "y", "sample_weight", "X"]))
    X, y, w = dict(FM_X), FM_Y, None
    value = data.draw(st.one_of(junk((6,), NUMBERS), junk((6, 2)), sparse((6, 2))), label=name)
    if name == "y":
        y = value
    elif name == "sample_weight":
        w = value
    elif name == "X":
        X = data.draw(st.one_of(SCALARS, st.just({}), st.dictionaries(SCALARS, st.just(FM_X["cat"]), max_size=2),
                                st.just(list(FM_X.values()))), label="X")
    else:
        X[name] = value
    model = outcome(lambda: FieldModel(**SMALL_FM).fit(X, y, sample_weight=w),
                    name if name in ("y", "sample_weight") else "X")
    if model is not None:
        check_field_model(model, X)


@FUZZ
@given(data=st.data())
def test_field_model_hyper_parameters(data):
    options = st.dictionaries(st.sampled_from(["dim", "pooling", "hash_buckets", "x"]), SCALARS | st.just("sum"))
    fields = st.dictionaries(st.sampled_from(["cat", "tags", "x"]), options | SCALARS, max_size=2)
    name, value = draw_hyper_parameter(data, FieldModel, ("epochs",),
                                       lambda name: SCALARS | fields if name == "fields" else SCALARS)
    model = outcome(lambda: FieldModel(**{**SMALL_FM, name: value}).fit(FM_X, FM_Y), name)
    if model is not None:
        check_field_model(model, FM_X)


# Values of the other kind than the fitted ones are converted or reported (tests/test_defaults.py).
@pytest.mark.filterwarnings("ignore:values of X.* were fit with:UserWarning")
@FUZZ
@given(data=st.data())
def test_field_model_predict(fitted, data):
    name = data.draw(st.sampled_from(["cat", "tags", "num"]))
    X = dict(FM_X)
    X[name] = data.draw(st.one_of(junk((6,), NUMBERS), junk((6,), IDS), sparse((6, 4))), label=name)
    P = outcome(lambda: fitted["fm"].predict_proba(X), "X")
    if P is not None:
        check_field_model(fitted["fm"], X)


# --------------------------------------------------------------------------------------------- FeatureTable

@FUZZ
@given(data=st.data())
def test_feature_table(data):
    name = data.draw(st.sampled_from(["ids", "categorical", "multi_hot", "numeric"]))
    args = {"ids": [5, 6, 7, 8], "categorical": {"c": ["x", "y", "x", "z"]},
            "multi_hot": {"m": sp.csr_matrix(np.eye(4, 2))}, "numeric": {"n": [1.0, 2.0, 3.0, 4.0]}}
    value = data.draw(st.one_of(junk((4,), IDS), junk((4,), NUMBERS), junk((4, 2)), sparse((4, 2))), label=name)
    if name != "ids":
        value = data.draw(st.one_of(st.just({"v": value}), st.just(value), st.just({1: [1, 2, 3, 4]}),
                                    st.just({"v": (sp.csr_matrix(np.ones((4, 2))), value)})))
    args[name] = value
    table = outcome(lambda: FeatureTable(args.pop("ids"), **args), name)
    if table is not None:
        assert len(table) == len(table.ids) and (table.row_positions(table.ids) == np.arange(len(table))).all()


@FUZZ
@given(column=junk((4,), NUMBERS), index=junk((4,), IDS))
@pytest.mark.filterwarnings("ignore:df. column types guessed:UserWarning")  # the guesses: tests/test_features.py
def test_feature_table_from_dataframe(column, index):
    try:
        df = pd.DataFrame({"c": list(np.asarray(column, dtype=object).ravel()[:4])}, index=index)
    except Exception:  # noqa: BLE001 -- pandas refused it first (not fastrec's business)
        return
    table = outcome(lambda: FeatureTable.from_dataframe(df), "c", "ids", "column")
    if table is not None:
        assert len(table) == len(df)


# --------------------------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("fn", ["rmse", "mae", "log_loss", "roc_auc"])
@FUZZ
@given(data=st.data())
def test_pointwise_metrics(fn, data):
    second = {"rmse": "y_pred", "mae": "y_pred", "log_loss": "y_prob", "roc_auc": "y_score"}[fn]
    name = data.draw(st.sampled_from(["y_true", second]))
    args = {"y_true": np.array([0, 1, 1, 0]), second: np.array([0.1, 0.8, 0.6, 0.3])}
    args[name] = data.draw(junk((4,), (np.float64, NUMBER | st.sampled_from([0.0, 1.0]), NUMBER)), label=name)
    value = outcome(lambda: getattr(metrics, fn)(*args.values()), name)
    if value is not None:  # rmse and mae of errors beyond float64's range are inf
        assert value >= 0 and (fn in ("rmse", "mae") or np.isfinite(value)) and (fn != "roc_auc" or value <= 1)


@pytest.mark.parametrize("fn", ["hit_rate_at_k", "precision_at_k", "recall_at_k", "ndcg_at_k"])
@FUZZ
@given(data=st.data())
def test_ranking_metrics(fn, data):
    name = data.draw(st.sampled_from(["recommended", "relevant", "k"]))
    args = {"recommended": np.array([[1, 2], [3, -1], [2, 1]]), "relevant": [[1], {3, 4}, []], "k": None}
    if name == "k":
        args["k"] = data.draw(SCALARS, label="k")
    elif name == "relevant":
        args["relevant"] = data.draw(st.one_of(junk((3,), IDS), junk((3, 2), IDS), sparse((3, 5))), label=name)
    else:
        args["recommended"] = data.draw(junk((3, 2), IDS), label=name)
    value = outcome(lambda: getattr(metrics, fn)(**args), name)
    if value is not None:
        assert 0 <= value <= 1


# --------------------------------------------------------------------------------------------- evaluation

@FUZZ
@given(data=st.data())
def test_random_split(data):
    name = data.draw(st.sampled_from(["arrays", "test_size", "random_state"]))
    args = {"arrays": (np.arange(10),), "test_size": 0.2, "random_state": 0}
    args[name] = data.draw(SCALARS | junk((10,)), label=name)
    if name == "arrays":
        if isinstance(args["arrays"], int) and 10 < args["arrays"] < 2**63:
            args["arrays"] = 10  # a valid size: work, not a malformed input
        args["arrays"] = data.draw(st.sampled_from([(args["arrays"],), (args["arrays"], np.arange(10))]))
    out = outcome(lambda: evaluation.random_split(*args["arrays"], test_size=args["test_size"],
                                                  random_state=args["random_state"]), name, "n")
    if out is not None:
        train, test = out
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(train) + len(test)))


@FUZZ
@given(data=st.data())
def test_leave_last_out(data):
    name = data.draw(st.sampled_from(["users", "timestamps", "random_state"]))
    args = {"users": USERS, "timestamps": np.arange(7), "random_state": 0}
    args[name] = data.draw(SCALARS if name == "random_state" else junk((7,), IDS), label=name)
    out = outcome(lambda: evaluation.leave_last_out(**args), name)
    if out is not None:
        train, test = out
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(train) + len(test)))


@FUZZ
@given(data=st.data())
def test_sampled_ranking(fitted, data):
    name = data.draw(st.sampled_from(["test_users", "test_items", "seen_users", "seen_items", "n_negatives", "k",
                                      "items"]))
    args = {"test_users": [1, 2], "test_items": [13, 14], "seen_users": USERS, "seen_items": ITEMS,
            "n_negatives": 2, "k": 2, "items": None, "random_state": 0}
    n = 2 if name.startswith("test") else 7
    args[name] = data.draw(SCALARS if name in ("n_negatives", "k") else junk((n,), IDS), label=name)
    # Too few items left to sample from names n_negatives, whichever argument made them few.
    out = outcome(lambda: evaluation.sampled_ranking(fitted["rec"], args.pop("test_users"), args.pop("test_items"),
                                                     **args), name, "n_negatives")
    if out is not None:
        assert all(0 <= v <= 1 for key, v in out.items() if key != "n")


@FUZZ
@given(data=st.data())
def test_full_ranking(fitted, data):
    name = data.draw(st.sampled_from(["test_users", "test_items", "k"]))
    args = {"test_users": [1, 2, 3], "test_items": [13, 14, 10], "k": 2}
    args[name] = data.draw(SCALARS if name == "k" else junk((3,), IDS), label=name)
    out = outcome(lambda: evaluation.full_ranking(fitted["rec"], **args), name)
    if out is not None:
        assert all(0 <= v <= 1 for key, v in out.items() if key != "n_users")


# --------------------------------------------------------------------------------------------- datasets

@FUZZ
@given(data=st.data())
def test_make_interactions(data):
    name = data.draw(st.sampled_from(["n_users", "n_items", "n_interactions", "n_factors", "n_genres", "noise",
                                      "preference_strength", "random_state", "implicit"]))
    args = {"n_users": 4, "n_items": 5, "n_interactions": 10, "random_state": 0}
    args[name] = data.draw(SCALARS, label=name)
    if isinstance(args[name], int) and args[name] > 10 and name.startswith("n_"):
        args[name] = 10  # a valid size: work, not a malformed input
    out = outcome(lambda: datasets.make_interactions(**args), name)
    if out is not None:
        assert len(out.users) == len(out.items) == len(out.timestamps)
        assert out.ratings is None or np.isfinite(out.ratings).all()


FIELD = st.sampled_from(["1", "2", "3", "10", "4.5", "-1", "0", "nan", "inf", "1e30", "99999999999999999999", "x",
                         "", " ", "M", "Toy Story (1995)", "Action", "Action|Comedy", "g1 g2", "\u00e9", "\t", "::"])
FILES = {"u.data": {"u.data": "\t", "u.item": "|", "u.user": "|", "u.genre": "|"},
         "ratings.dat": {"ratings.dat": "::", "movies.dat": "::", "users.dat": "::"},
         "ratings.csv": {"ratings.csv": ",", "movies.csv": ","},
         "ml.inter": {"ml.inter": "\t", "ml.item": "\t", "ml.user": "\t"}}
HEADERS = {"ratings.csv": "userId,movieId,rating,timestamp", "movies.csv": "movieId,title,genres",
           "ml.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float",
           "ml.item": "item_id:token\trelease_year:token\tgenre:token_seq",
           "ml.user": "user_id:token\tage:token\tgender:token\toccupation:token"}


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(sorted(FILES)))
def test_load_movielens_files(tmp_path_factory, data, fmt):
    """Garbled files: a ValueError naming the file (UnicodeDecodeError is one) or consistent Interactions."""
    directory = tmp_path_factory.mktemp("ml")
    for name, sep in FILES[fmt].items():
        line = st.lists(FIELD, min_size=1, max_size=6).map(sep.join)
        lines = data.draw(st.lists(line, max_size=4), label=name)
        if name in HEADERS:
            lines = [data.draw(st.sampled_from([HEADERS[name], HEADERS[name].replace("\t", " "), ""]))] + lines
        (directory / name).write_text("\n".join(lines), encoding=data.draw(st.sampled_from(["utf-8", "latin-1"])))
    out = outcome(lambda: datasets.load_movielens(directory), *FILES[fmt])
    if out is not None:
        assert len(out.users) == len(out.items) > 0
        assert out.ratings is None or np.isfinite(out.ratings).all()


@FUZZ
@given(data=st.data())
def test_interactions(data):
    name = data.draw(st.sampled_from(["users", "items", "ratings", "timestamps"]))
    args = {"users": USERS, "items": ITEMS, "ratings": RATINGS, "timestamps": np.arange(7)}
    args[name] = data.draw(junk((7,), IDS if name in ("users", "items") else NUMBERS), label=name)
    out = outcome(lambda: datasets.Interactions(**args), name)
    if out is not None:
        for values in (out.items, out.ratings, out.timestamps):  # ratings or timestamps None: not known
            assert values is None or len(values) == len(out.users)
        assert out.ratings is None or np.isfinite(out.ratings).all()


@FUZZ
@given(path=SCALARS)
def test_load_movielens_path(path):
    try:
        outcome(lambda: datasets.load_movielens(path), "path")
    except FileNotFoundError as exc:  # a path that is not there: the OSError callers expect
        assert str(Path(path)) in str(exc)


# --------------------------------------------------------------------------------------------- messages

def raises_naming(name, call, exc=(ValueError, TypeError)):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        with pytest.raises(exc, match=names_re(name)):
            call()


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
@pytest.mark.parametrize("name, X, y", [
    ("X", None, Y6_REG), ("X", np.zeros((0, 3)), []), ("X", np.zeros((6, 0)), Y6_REG), ("X", X6[0], Y6_REG),
    ("X", np.full((6, 3), np.nan), Y6_REG), ("X", X6.astype(complex), Y6_REG), ("X", X6[:, :, None], Y6_REG),
    ("X", np.array([["a"] * 3] * 6, dtype=object), Y6_REG), ("X", X6.astype("datetime64[D]"), Y6_REG),
    ("y", X6, None), ("y", X6, Y6_REG[:5]), ("y", X6, np.zeros((6, 1, 1))), ("y", X6, np.array(3)),
])
def test_mlp_fit_messages(cls, name, X, y):
    if cls is MLPClassifier and name == "y" and y is not None and np.ndim(y) == 1:
        y = Y6_CLASS[: len(y)]
    raises_naming(name, lambda: cls(**SMALL_MLP).fit(X, y))


@pytest.mark.parametrize("name, value", [("hidden_layer_sizes", 0), ("hidden_layer_sizes", [3, -1]), ("alpha", -1.0),
                                         ("alpha", np.nan), ("max_iter", 0), ("batch_size", 0), ("batch_size", 2.5),
                                         ("learning_rate_init", 0.0), ("n_threads", 0), ("n_threads", 2**40),
                                         ("random_state", "seed"), ("activation", "gelu"), ("momentum", 2.0),
                                         ("tol", np.inf), ("max_iter", 2**70)])
def test_mlp_hyper_parameter_messages(name, value):
    raises_naming(name, lambda: MLPRegressor(**{**SMALL_MLP, name: value}).fit(X6, Y6_REG))


def test_mlp_other_messages(fitted):
    raises_naming("X", lambda: fitted["reg"].predict(np.ones((2, 4))))
    raises_naming("y", lambda: fitted["reg"].score(X6, None))
    raises_naming("y", lambda: fitted["reg"].score(X6, np.full(6, np.nan)))
    raises_naming("sample_weight", lambda: fitted["reg"].score(X6, Y6_REG, sample_weight=np.full(6, np.inf)))
    raises_naming("sample_weight", lambda: fitted["clf"].score(X6, Y6_CLASS, sample_weight=[1, 2]))
    raises_naming("classes", lambda: MLPClassifier(**SMALL_MLP).partial_fit(X6, Y6_CLASS, classes=[]))


@pytest.mark.parametrize("name, args", [
    ("users", dict(users=[1.5] * 7)), ("users", dict(users=[1, "a"] * 3 + [1])), ("users", dict(users=[])),
    ("users", dict(users=np.ones((7, 2), int))), ("items", dict(items=ITEMS[:3])), ("items", dict(items=[None] * 7)),
    ("items", dict(items=[2**70] * 7)), ("ratings", dict(ratings=np.full(7, np.nan))),
    ("ratings", dict(ratings=["a"] * 7)),
    ("ratings", dict(ratings=RATINGS[:2])), ("sample_weight", dict(sample_weight=-RATINGS)),
    ("sample_weight", dict(sample_weight=RATINGS.astype(complex))), ("item_features", dict(item_features=[1, 2])),
    ("embedding_dim", dict(embedding_dim=0)), ("negatives", dict(negatives=-1)), ("negatives", dict(negatives=2**40)),
    ("learning_rate", dict(learning_rate=np.nan)), ("id_dropout", dict(id_dropout=1.0)), ("epochs", dict(epochs=2.0)),
    ("n_threads", dict(n_threads=2**40)), ("hidden_layer_sizes", dict(hidden_layer_sizes="a")),
])
def test_recommender_fit_messages(name, args):
    args = {"users": USERS, "items": ITEMS, "ratings": RATINGS, **args}
    params = {k: args.pop(k) for k in list(args) if k in Recommender()._get_param_names()}
    raises_naming(name, lambda: Recommender(**{**SMALL_REC, **params}).fit(**args))


def test_recommender_other_messages(fitted):
    rec = fitted["rec"]
    raises_naming("users", lambda: rec.predict([1, 2], [10]))
    raises_naming("items", lambda: rec.predict([1, 2], [1.5, 2.5]))
    raises_naming("users", lambda: rec.recommend(np.ones((2, 2), int)))
    raises_naming("k", lambda: rec.recommend([1], k=0))
    raises_naming("k", lambda: rec.recommend([1], k=2.0))
    raises_naming("items", lambda: rec.recommend([1], items=[[10]]))
    raises_naming("exclude_seen", lambda: rec.recommend([1], exclude_seen="no"))
    raises_naming("items", lambda: rec.similar_items([None]))
    raises_naming("k", lambda: rec.similar_items([10], k=-1))


def test_field_model_messages(fitted):
    raises_naming("X", lambda: FieldModel(**SMALL_FM).fit([1, 2], FM_Y))
    raises_naming("X", lambda: FieldModel(**SMALL_FM).fit({**FM_X, "cat": FM_X["cat"][:3]}, FM_Y))
    raises_naming("X", lambda: FieldModel(**SMALL_FM).fit({**FM_X, "num": np.full(6, np.inf)}, FM_Y))
    raises_naming("X", lambda: FieldModel(**SMALL_FM).fit({**FM_X, "cat": np.ones(6, complex)}, FM_Y))
    raises_naming("y", lambda: FieldModel(**SMALL_FM).fit(FM_X, FM_Y + 2))
    raises_naming("y", lambda: FieldModel(**SMALL_FM).fit(FM_X, ["a"] * 6))
    raises_naming("sample_weight", lambda: FieldModel(**SMALL_FM).fit(FM_X, FM_Y, sample_weight=np.zeros(6)))
    raises_naming("fields", lambda: FieldModel(**{**SMALL_FM, "fields": [1]}).fit(FM_X, FM_Y))
    raises_naming("fields", lambda: FieldModel(**{**SMALL_FM, "fields": {"cat": {"dim": 0}}}).fit(FM_X, FM_Y))
    raises_naming("epochs", lambda: FieldModel(**{**SMALL_FM, "epochs": 0}).fit(FM_X, FM_Y))
    raises_naming("n_threads", lambda: FieldModel(**{**SMALL_FM, "n_threads": np.inf}).fit(FM_X, FM_Y))
    raises_naming("X", lambda: fitted["fm"].predict({"cat": FM_X["cat"]}))
    raises_naming("X", lambda: fitted["fm"].predict({**FM_X, "tags": sp.csr_matrix(np.ones((6, 5)))}))


def test_feature_table_messages():
    raises_naming("ids", lambda: FeatureTable([1, 1]))
    raises_naming("ids", lambda: FeatureTable([1.5, 2.5]))
    raises_naming("ids", lambda: FeatureTable([2**70, 1]))
    raises_naming("categorical", lambda: FeatureTable([1, 2], categorical={"c": [1]}))
    raises_naming("numeric", lambda: FeatureTable([1, 2], numeric={"n": [1.0, np.nan]}))
    raises_naming("numeric", lambda: FeatureTable([1, 2], numeric={"n": ["a", "b"]}))
    raises_naming("multi_hot", lambda: FeatureTable([1, 2], multi_hot={"m": [1, 2]}))
    raises_naming("multi_hot", lambda: FeatureTable([1, 2], multi_hot={"m": sp.csr_matrix(np.ones((3, 2)))}))
    broken = sp.csr_matrix(np.ones((2, 2)))
    broken.indices[0] = -1
    raises_naming("multi_hot", lambda: FeatureTable([1, 2], multi_hot={"m": broken}))
    raises_naming("df", lambda: FeatureTable.from_dataframe([[1, 2]]))


def test_metric_messages():
    raises_naming("y_pred", lambda: metrics.rmse([1, 2], [1, 2, 3]))
    raises_naming("y_true", lambda: metrics.mae([[1, 2]], [1, 2]))
    raises_naming("y_prob", lambda: metrics.log_loss([0, 1], [0.5, 1 + 1j]))
    raises_naming("y_true", lambda: metrics.roc_auc([0, 2], [0.1, 0.2]))
    raises_naming("recommended", lambda: metrics.ndcg_at_k([1, 2], [[1]]))
    raises_naming("relevant", lambda: metrics.recall_at_k([[1, 2]], [[1], [2]]))
    raises_naming("k", lambda: metrics.precision_at_k([[1, 2]], [[1]], k=0))


def test_evaluation_and_dataset_messages(fitted):
    raises_naming("test_size", lambda: evaluation.random_split(10, test_size=1.5))
    raises_naming("random_state", lambda: evaluation.random_split(10, random_state="x"))
    raises_naming("timestamps", lambda: evaluation.leave_last_out([1, 2], [1.0]))
    raises_naming("n_negatives", lambda: evaluation.sampled_ranking(fitted["rec"], [1], [10], seen_users=[],
                                                                    seen_items=[], n_negatives=0))
    raises_naming("k", lambda: evaluation.full_ranking(fitted["rec"], [1], [10], k=0))
    raises_naming("n_users", lambda: datasets.make_interactions(n_users=0))
    raises_naming("noise", lambda: datasets.make_interactions(10, 10, 20, noise=np.nan))
    raises_naming("path", lambda: datasets.load_movielens(None))
    raises_naming("ratings", lambda: datasets.Interactions([1, 2], [3, 4], ratings=["a", "b"]))
    raises_naming("timestamps", lambda: datasets.Interactions([1, 2], [3, 4], timestamps=[np.nan, 1.0]))
