"""The ``fastrec`` command: demo, train, recommend, evaluate, info (``fastrec COMMAND --help``).

Exit codes: 0 success, 1 a data or model error (one line ``fastrec: error: ...`` on stderr, no traceback),
2 a usage error (argparse's), 130 interrupted (Ctrl-C). Only argparse and the csv module are needed; pandas
is used when installed.

Id kinds (a model matches ids by kind: the integer 7 is not the string "7"). ``train`` makes a side's ids
(users, or items) integers when every id cell of that side, in the interactions and in its feature file, is
an integer written plainly (``str(int(cell)) == cell``: no leading zeros, '+', spaces or '_'), else strings;
"007" is therefore a string, so "7" and "007" stay two ids. ``recommend`` and ``evaluate`` type the ids they
read like the model's: against string ids every cell is its text; against integer ids a plainly written
integer is that integer, and any other cell ("u1", "007", "7.0") is no id of the model: it is scored as an
unknown id, and a note on stderr says which.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
import zipfile

import numpy as np

import fastrec
from fastrec._fieldnet import ACTIVATIONS, OPTIMIZERS
from fastrec._recbase import RecommenderBase
from fastrec.features import FeatureTable, _bags_from_cells, _guess_type, as_id_array, plain_integers

__all__ = ["main"]


class DataError(Exception):
    """A mistake in the user's files or options: reported as one line, exit code 1."""


# ----------------------------------------------------------------------------------------------- reading
def _read_table(path: str, sep: str) -> dict:
    """The columns of a CSV or Parquet file: name -> 1-D array (CSV cells stay strings until used)."""
    if path.lower().endswith((".parquet", ".pq")):
        try:
            import pandas as pd
            df = pd.read_parquet(path)
        except ImportError as e:
            raise DataError(f"reading Parquet needs pandas and pyarrow ({e}); install them or use CSV") from None
        return {str(c): df[c].to_numpy() for c in df.columns}
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is not None:  # pandas only for its fast parser: all text, so both paths type the cells alike
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
        return {str(c): df[c].to_numpy(dtype=str) for c in df.columns}
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=sep))
    if not rows:
        raise DataError(f"{path} is empty")
    header = rows[0]
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
    return {name: np.array([row[j] for row in rows[1:]], dtype=str) for j, name in enumerate(header)}


def _column(columns: dict, name: str, path: str, hint: str = "") -> np.ndarray:
    if name not in columns:
        raise DataError(f"column {name!r} is not in {path} (columns: {', '.join(columns)}){hint}")
    return columns[name]


def _check_filled(values: np.ndarray, what: str):
    if values.dtype.kind == "U" and (values == "").any():
        raise DataError(f"{what} has an empty cell (data row {np.argmax(values == '') + 1})")


def _as_ids(values: np.ndarray, what: str | None = None) -> np.ndarray:
    """Ids (or category values) as train gives them to the model: integers when every cell is a plainly
    written integer (plain_integers), else strings; typed columns (Parquet) keep their kind, never floats.
    With `what` (ids, not category values), an empty cell is an error."""
    if values.dtype.kind == "U":
        if what is not None:
            _check_filled(values, what)
        ints, ok = plain_integers(values)
        return ints if ok.all() else values
    if what is not None and values.dtype == object:  # Parquet strings (or a mix, which as_id_array reports)
        return as_id_array(values, what)
    return values


def _ids_not_in(n: int, known: np.ndarray) -> np.ndarray:
    """n distinct int64 values that are not in `known`: the smallest int64s not taken (of n + len(known)
    candidates at most len(known) are taken)."""
    candidates = np.iinfo(np.int64).min + np.arange(n + len(known), dtype=np.int64)
    return candidates[~np.isin(candidates, known)][:n]


def _ids_like_model(values: np.ndarray, model_ids: np.ndarray, what: str) -> np.ndarray:
    """Ids read from a file or the command line, typed like the model's ids (see the module docstring).
    Against integer ids, a cell that is not a plainly written integer is no id of the model: it becomes an
    int64 the model does not know (distinct cells stay distinct, so per-user metrics keep them apart), and a
    note on stderr names it. `model_ids`: the model's ids of that side (seen_pairs' ids)."""
    text = np.asarray(values).astype(str)
    if model_ids.dtype.kind == "U":
        return text
    ids, ok = plain_integers(text)
    if not ok.all():
        bad, inverse = np.unique(text[~ok], return_inverse=True)
        ids[~ok] = _ids_not_in(len(bad), model_ids)[inverse.ravel()]
        examples = ", ".join(map(repr, bad[:3].tolist()))
        print(f"fastrec: note: {(~ok).sum()} of {len(text)} {what} are not integers, which the model's {what} "
              f"are (e.g. {examples}; an integer id is written without leading zeros, '+' or spaces): they are "
              "unknown to the model", file=sys.stderr)
    return ids


def _is_number(cell) -> bool:
    try:
        float(cell)
        return True
    except (TypeError, ValueError):
        return False


def _as_numbers(values: np.ndarray, what: str) -> np.ndarray:
    try:
        return values.astype(np.float64)
    except (TypeError, ValueError):
        bad = next(v for v in values.tolist() if not _is_number(v))
        raise DataError(f"{what} must hold numbers; found {bad!r}") from None


def _is_numeric(values: np.ndarray) -> bool:
    if values.dtype.kind == "U":
        return len(values) > 0 and all(map(_is_number, values.tolist()))
    return values.dtype.kind in "iuf"


def _split(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def _feature_table(path: str, side: str, id_col: str, args, used: set, interaction_ids: np.ndarray):
    """(FeatureTable, interaction ids) from a feature file: its columns (but the id) as --categorical /
    --multi-hot / --numeric say, else guessed as `fastrec.features.column_types` guesses a DataFrame's. The
    ids of one side are of one kind: integers when both its files' ids are, else strings in both."""
    columns = _read_table(path, args.sep)
    ids = _column(columns, id_col, path, f" (name the id column with --{side}-id-col)")
    ids = _as_ids(ids, f"column {id_col!r} of {path}")
    if (ids.dtype.kind == "U") != (interaction_ids.dtype.kind == "U"):
        ids, interaction_ids = ids.astype(str), interaction_ids.astype(str)  # integers are plainly written
    categorical, multi_hot, numeric = {}, {}, {}
    for name, values in columns.items():
        if name == id_col:
            continue
        used.add(name)
        if name in args.multi_hot:
            label = f"column {name!r} of {path}"
            multi_hot[name] = _bags_from_cells(values.astype(object), args.multi_hot_sep, label)
        elif name in args.categorical:
            categorical[name] = _as_ids(values)
        elif name in args.numeric:
            numeric[name] = _as_numbers(values, f"column {name!r} of {path}")
        else:
            kind = _guessed_type(name, values, path, getattr(args, "verbose", False))
            if kind == "numeric":
                numeric[name] = _as_numbers(values, f"column {name!r} of {path}")
            elif kind == "categorical":
                categorical[name] = _as_ids(values)
            else:
                label = f"column {name!r} of {path}"
                multi_hot[name] = _bags_from_cells(values.astype(object), kind.partition(":")[2], label)
    return FeatureTable(ids, categorical=categorical, multi_hot=multi_hot, numeric=numeric), interaction_ids


def _guessed_type(name: str, values: np.ndarray, path: str, verbose: bool) -> str:
    """The type `fastrec.features` would guess for this column (integers, floats or text, as the cells read),
    said on stderr with the option that would set it when the guess may be wrong (every guess with
    --verbose), as fit's warning does in Python."""
    typed = values
    if values.dtype.kind == "U" and _is_numeric(values):
        ints, plain = plain_integers(values)
        typed = ints if plain.all() else values.astype(np.float64)
    kind, reason, doubtful = _guess_type(typed)
    option = {"numeric": "--numeric", "categorical": "--categorical"}.get(kind, "--multi-hot/--multi-hot-sep")
    if doubtful or verbose:
        print(f"fastrec: {path}: column {name!r} read as {kind} ({reason}){'; check it' if doubtful else ''}; "
              f"{option} sets it", file=sys.stderr)
    return kind


def _interactions(columns: dict, path: str, args):
    """The user and item columns as read (empty cells refused), with their labels for messages."""
    out = []
    for name, option in ((args.user_col, "--user-col"), (args.item_col, "--item-col")):
        values, what = _column(columns, name, path, f" (name it with {option})"), f"column {name!r} of {path}"
        _check_filled(values, what)
        out += [values, what]
    return out


def _load_recommender(path: str):
    """A fitted users x items recommender (a Recommender, TwoTower, SequentialRecommender or EASE) from a model file."""
    model = fastrec.load(path, mmap=True)  # opens in milliseconds whatever the model's size
    if not isinstance(model, RecommenderBase):
        raise DataError(f"{path} holds a {type(model).__name__}, not a recommender (a Recommender, TwoTower, "
                        "SequentialRecommender or EASE)")
    if not model.__sklearn_is_fitted__():
        raise DataError(f"{path} holds a {type(model).__name__} that was never fitted")
    return model


# ----------------------------------------------------------------------------------------------- commands
def _demo(args):
    from fastrec import demo

    if args.save is not None:
        _check_writable(args.save)
    demo.main(save=args.save)


# The models `train --model` builds; an option applies to those that have its parameter.
_MODELS = {"recommender": fastrec.Recommender, "two-tower": fastrec.TwoTower,
           "sequential": fastrec.SequentialRecommender, "ease": fastrec.EASE, "autorec": fastrec.AutoRec,
           "multvae": fastrec.MultVAE, "multdae": fastrec.MultDAE}

# option, model parameter, type, help (the defaults are the models', shown from them)
_HYPER_PARAMETERS = [
    ("--embedding-dim", "embedding_dim", int, "size of the id and side-feature embeddings"),
    ("--hidden", "hidden_layer_sizes", "sizes", "MLP layer sizes, e.g. 64,32 ('' for none); two-tower: each "
     "tower's"),
    ("--output-dim", "output_dim", int, "length of the user and item vectors"),
    ("--activation", "activation", ACTIVATIONS, "MLP activation"),
    ("--loss", "loss", ("auto", "mse", "bce", "bpr", "softmax"), "recommender: mse or bce; two-tower: softmax, "
     "bpr, bce or mse; auto: mse on ratings, else bce (recommender) or softmax (two-tower)"),
    ("--normalize", "normalize", bool, "L2-normalise the user and item vectors (auto, neither given: with --loss "
     "softmax)"),
    ("--temperature", "temperature", "auto", "divides every score (auto: 0.1 with --loss softmax, else 1)"),
    ("--optimizer", "optimizer", OPTIMIZERS, "optimizer"),
    ("--learning-rate", "learning_rate", "auto", "learning rate (auto: by feedback kind and loss, see "
     "help(fastrec.Recommender) / help(fastrec.TwoTower))"),
    ("--alpha", "alpha", "auto", "L2 penalty: recommender: of the MLP (auto: by feedback kind); two-tower: of "
     "the MLPs and the embedding rows a batch touches"),
    ("--embedding-alpha", "embedding_alpha", "auto", "L2 penalty of the embeddings (auto: by feedback kind)"),
    ("--epochs", "epochs", int, "passes over the data (at most, with early stopping)"),
    ("--batch-size", "batch_size", int, "interactions per step"),
    ("--negatives", "negatives", "int-auto", "implicit feedback: items sampled per positive; two-tower "
     "softmax: extra uniform negatives per batch (auto: 0, or 4 for bpr / bce)"),
    ("--negative-sampling", "negative_sampling", ("uniform", "popularity"), "how negatives are drawn"),
    ("--id-dropout", "id_dropout", float, "fraction of examples that train the unknown-id rows"),
    ("--gmf", "gmf", bool, "matrix-factorisation term (--no-gmf: MLP only)"),
    ("--gmf-item-features", "gmf_item_features", bool, "GMF item vector also from the item's feature values"),
    ("--wide", "wide", bool, "linear term: a bias per id and per feature value"),
    ("--user-history", "user_history", bool, "each user also described by its training items (SVD++)"),
    ("--item-history", "item_history", bool, "each item also described by its training users"),
    ("--early-stopping", "early_stopping", bool, "hold out --validation-fraction of the interactions, stop when "
     "--validation-metric has not improved for --n-iter-no-change epochs, keep the best epoch"),
    ("--validation-fraction", "validation_fraction", float, "fraction held out by --early-stopping"),
    ("--n-iter-no-change", "n_iter_no_change", int, "epochs without improvement before early stopping"),
    ("--validation-metric", "validation_metric", str, "rmse or mae (ratings), ndcg@K or hr@K (implicit "
     "feedback: each held-out pair ranked against 99 items its user never touched, or half the items if "
     "fewer); auto: rmse or ndcg@10"),
    ("--clip-predictions", "clip_predictions", bool, "ratings: predictions clipped to the training range"),
    ("--momentum", "momentum", float, "momentum of --optimizer sgd on the MLP"),
    ("--nesterovs-momentum", "nesterovs_momentum", bool, "Nesterov's momentum (--optimizer sgd)"),
    ("--seed", "random_state", int, "random seed (the same seed gives the same model)"),
    ("--threads", "n_threads", int, "threads (the result does not depend on it; default all cores)"),
    ("--max-len", "max_len", int, "sequential: events of a history the model reads (the latest)"),
    ("--n-blocks", "n_blocks", int, "sequential: self-attention blocks"),
    ("--n-heads", "n_heads", int, "sequential: attention heads"),
    ("--dropout", "dropout", float, "sequential: dropout rate; multvae / multdae: input dropout of the bags"),
    ("--ffn-dim", "ffn_dim", int, "sequential: width of each block's feed-forward layer (default: the "
     "embedding dim)"),
    ("--index", "index", ("exact", "hnsw"), "how recommend searches the item vectors (hnsw: approximate, "
     "needs fastrec[ann])"),
    ("--index-options", "index_options", "json", "options of the hnsw index as JSON, e.g. '{\"ef_search\": 128}'"),
    ("--l2", "l2", float, "ease: L2 penalty of the item-item weights (500 is the paper's MovieLens-20M setting: "
     "tune it); autorec: L2 penalty of the rows each batch touches; multvae / multdae: L2 penalty of the "
     "weights (Liang et al.'s lam)"),
    ("--max-memory", "max_memory", "int-auto", "ease: bytes the fit may allocate (auto: what the machine has "
     "available); more is refused before allocating"),
    ("--hidden-units", "hidden", int, "autorec: hidden units of the autoencoder"),
    ("--item-based", "item_based", bool, "autorec: I-AutoRec (encode items' rating vectors); --no-item-based: "
     "U-AutoRec"),
    # Mult-VAE / Mult-DAE
    ("--encoder", "hidden", "sizes", "multvae / multdae: widths of the encoder's hidden layers, e.g. 600 (the "
     "decoder mirrors them)"),
    ("--latent", "latent", int, "multvae / multdae: size of the latent code"),
    ("--beta-max", "beta_max", float, "multvae: cap of the KL weight beta"),
    ("--anneal-steps", "anneal_steps", "int-auto", "multvae: Adam steps over which beta rises by 1 (capped at "
     "--beta-max; auto: beta_max at 80%% of the steps)"),
    ("--precision", "precision", ("float32", "bf16", "auto"), "recommender / multvae / multdae / sequential: "
     "precision of the training products (recommender: the MLP's; multvae / multdae: the output layer's; "
     "sequential: the projections' and feed-forward's) (bf16: bfloat16 inputs, float32 sums and weights; auto: "
     "bf16 where the CPU has AVX512-BF16)"),
    ("--topk", "topk", ("exact", "approximate"), "recommender: how recommend ranks every item (approximate: a "
     "per-user linear proxy over bfloat16 first-layer values picks --topk-candidates of the items, scored "
     "exactly; see benchmarks/TOPK.md for its recall)"),
    ("--topk-candidates", "topk_candidates", float, "recommender with --topk approximate: the fraction of the "
     "items scored exactly"),
    ("--privacy", "privacy", "dpconfig", "recommender: differentially private training, fastrec.DPConfig's parameters "
     "as JSON, e.g. '{\"target_epsilon\": 8, \"delta\": 1e-5}' (needs fastrec[privacy])"),
]


def _float_or_auto(text: str):
    return text if text == "auto" else float(text)


def _int_or_auto(text: str):
    return text if text == "auto" else int(text)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"M\": 32}}'; {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"M\": 32}}'; got {text!r}")
    return value


def _dp_config(text: str):
    """--privacy's JSON object as a fastrec.DPConfig."""
    from fastrec.privacy import DPConfig

    try:
        return DPConfig(**_json_object(text))
    except TypeError as e:
        raise argparse.ArgumentTypeError(f"not a DPConfig: {e}") from None


def _model_params(name: str) -> dict:
    """The parameters (and defaults) of the model `train --model name` builds."""
    return _MODELS[name]().get_params()


def _default_text(param: str) -> str:
    """' (default: ...)' for an option's help: the default of each model that has the parameter, told apart
    where they differ, and which models the option applies to when not all."""
    def shown(value):
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    defaults = {name: _model_params(name)[param] for name in _MODELS if param in _model_params(name)}
    values = {shown(v) for v in defaults.values() if v is not None}
    only = f"--model {next(iter(defaults))} only" if len(defaults) < len(_MODELS) else ""
    if not values:
        return f" ({only})" if only else ""
    if len(values) == 1:
        text = f"default: {values.pop()}"
    else:
        text = "default: " + ", ".join(f"{shown(v)} ({name})" for name, v in defaults.items())
    return f" ({only}; {text})" if only else f" ({text})"


def _sizes(text: str) -> tuple:
    try:
        return tuple(int(t) for t in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,32; got {text!r}") from None


def _check_writable(path: str):
    """Fail before training rather than after it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DataError(f"cannot write {path}: no directory {folder}")


def _recommender(args) -> RecommenderBase:
    """The model that train's --model and options describe (options not given: the model's defaults). An
    option of another model is refused rather than ignored: the user meant it to change something."""
    name = getattr(args, "model", "recommender")
    accepted = _model_params(name)
    given = {p: getattr(args, p) for _, p, *_ in _HYPER_PARAMETERS if getattr(args, p) is not None}
    foreign = [option for option, p, *_ in _HYPER_PARAMETERS if p in given and p not in accepted]
    if foreign:
        foreign_params = {p for option, p, *_ in _HYPER_PARAMETERS if option in foreign}
        others = " or ".join(f"--model {m}" for m in _MODELS
                             if m != name and foreign_params & set(_model_params(m)))
        raise DataError(f"{', '.join(foreign)} {'applies' if len(foreign) == 1 else 'apply'} to {others}, not to "
                        f"--model {name}")
    return _MODELS[name](verbose=args.verbose, **given)


def _option_error(error: Exception) -> Exception:
    """A parameter check's error ("epochs must be ...") named by its option too ("--epochs: epochs must ...")."""
    text = str(error)
    for option, param, *_ in _HYPER_PARAMETERS:
        if text.startswith((f"{param} ", f"{param}=")):
            return DataError(f"{option}: {text}")
    return error


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' * (n != 1)}"


def _best_epoch(model) -> str | None:
    """'epoch B (val_rmse 0.9123)' when fit scored a validation metric, else None."""
    history, best = model.history_, getattr(model, "best_epoch_", None)
    metric = next((key for key in history if key.startswith("val_")), None)
    if metric is None or best is None:
        return None
    return f"epoch {best} ({metric} {history[metric][best - 1]:.4f})"


def _save_interrupted(model, path: str) -> int:
    """Ctrl-C during fit: keep what the completed epochs learned, if any."""
    done = len(getattr(model, "history_", {}).get("loss", []))
    if done == 0:
        print("fastrec: training interrupted before its first epoch completed; nothing was saved", file=sys.stderr)
        return 130
    model.save(path)
    best = _best_epoch(model)
    kept = f"of its best epoch so far, {best}," if best else "as it stood"
    print(f"fastrec: training interrupted after {_epochs(done)}; saved the model {kept} to {path}", file=sys.stderr)
    return 130


def _train(args):
    start = time.perf_counter()
    _check_writable(args.output)
    columns = _read_table(args.data, args.sep)
    users, user_what, items, item_what = _interactions(columns, args.data, args)
    users, items = _as_ids(users, user_what), _as_ids(items, item_what)
    ratings = weight = None
    if args.rating_col is not None:
        ratings = _as_numbers(_column(columns, args.rating_col, args.data), f"column {args.rating_col!r}")
    if args.weight_col is not None:
        weight = _as_numbers(_column(columns, args.weight_col, args.data), f"column {args.weight_col!r}")
    kinds = {"--categorical": args.categorical, "--multi-hot": args.multi_hot, "--numeric": args.numeric}
    used: set = set()
    tables = {}
    if args.user_features is not None:
        tables["user"], users = _feature_table(args.user_features, "user", args.user_id_col or args.user_col,
                                               args, used, users)
    if args.item_features is not None:
        tables["item"], items = _feature_table(args.item_features, "item", args.item_id_col or args.item_col,
                                               args, used, items)
    for option, names in kinds.items():
        missing = [n for n in names if n not in used]
        if missing:
            raise DataError(f"{option} names {', '.join(map(repr, missing))}, not a column of a feature file "
                            "(--user-features / --item-features)")

    model = _recommender(args)
    sequential = isinstance(model, fastrec.SequentialRecommender)
    if sequential and (ratings is not None or weight is not None or "user" in tables):
        raise DataError("--model sequential learns from events: --rating-col, --weight-col and --user-features do "
                        "not apply (give --time-col to order each user's events; --item-features does)")
    ease = isinstance(model, fastrec.EASE)
    bags = ease or isinstance(model, (fastrec.MultVAE, fastrec.MultDAE))  # models of users' item bags
    if bags and (ratings is not None or weight is not None or tables):
        raise DataError(f"--model {args.model} learns from implicit feedback (one row per user and item it interacted "
                        "with): --rating-col, --weight-col and feature files do not apply (keep the positive "
                        "rows of a ratings file first)")
    autorec = isinstance(model, fastrec.AutoRec)
    if autorec and (ratings is None or weight is not None or tables):
        raise DataError("--model autorec learns from explicit ratings: give --rating-col; --weight-col and feature "
                        "files do not apply")
    if not sequential and args.time_col is not None:
        raise DataError("--time-col applies to --model sequential")
    if args.scheduler is not None or args.workers is not None:
        return _train_dask(args, model, users, items, ratings, weight, tables, start)
    try:
        if bags:
            model.fit(users, items)
        elif autorec:
            model.fit(users, items, ratings)
        elif sequential:
            times = None
            if args.time_col is not None:
                times = _as_numbers(_column(columns, args.time_col, args.data), f"column {args.time_col!r}")
            model.fit(users, items, times, item_features=tables.get("item"))
        else:
            model.fit(users, items, ratings, user_features=tables.get("user"), item_features=tables.get("item"),
                      sample_weight=weight)
    except KeyboardInterrupt:
        return _save_interrupted(model, args.output)
    except (ValueError, TypeError) as e:
        raise _option_error(e) from None
    model.save(args.output)
    feedback = "implicit feedback" if ratings is None else f"ratings from {args.rating_col!r}"
    held_out = getattr(model, "validation_size_", None)
    held_out = f", {held_out:,} of them held out for validation" if held_out else ""
    best = _best_epoch(model)
    best = f", best {best}" if best else ""
    steps = "closed form" if ease else _epochs(len(model.history_['loss']))
    print(f"trained on {len(users):,} interactions ({feedback}{held_out}), {model.n_users_:,} users x "
          f"{model.n_items_:,} items, {steps}{best}, final loss "
          f"{model.loss_curve_[-1]:.4f}, {time.perf_counter() - start:.1f} s")
    print(f"saved {args.output}")


# ------------------------------------------------------------------ train --scheduler / --workers (fastrec[dask])
def _add_dask_options(p):
    g = p.add_argument_group("distributed training (fastrec[dask]; --model recommender or two-tower)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="train on this Dask cluster (e.g. tcp://10.0.0.5:8786) "
                       "with fastrec.dask (DaskRecommender, DaskTwoTower): one replica per worker, combined every "
                       "--sync-every batches")
    where.add_argument("--workers", type=int, metavar="N", help="the same on a local Dask cluster of N worker processes "
                       "(--threads threads each)")
    g.add_argument("--sync-every", type=int, metavar="N", help="combine the replicas every N batches (default: once "
                   "per epoch)")
    g.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="give up when a round has not "
                   "finished in this time, or sooner when a worker leaves the cluster (default: %(default)s)")


def _train_dask(args, model, users, items, ratings, weight, tables, start):
    """The job of `fastrec train` on a Dask cluster: the file is read here, split into one partition per worker and
    trained by fastrec.dask's DaskRecommender or DaskTwoTower; the model file is a plain Recommender's or TwoTower's,
    as after a local train. Early stopping and validation are not used on the cluster (the epochs given are
    trained)."""
    if type(model) not in (fastrec.Recommender, fastrec.TwoTower):
        raise DataError(f"--scheduler / --workers train --model recommender or two-tower (fastrec.dask), not --model "
                        f"{args.model}")
    if args.workers is not None and args.workers < 1:
        raise DataError(f"--workers must be at least 1, got {args.workers}")
    try:
        import dask.array as da
        from distributed import Client

        from fastrec.dask import DaskRecommender, DaskTwoTower, WorkerLostError, _local_cluster, _worker_addresses
    except ImportError:
        raise DataError("--scheduler / --workers need Dask: pip install 'fastrec[dask]'") from None
    params = {**model.get_params(), "early_stopping": False}
    with contextlib.ExitStack() as stack:
        if args.scheduler is not None:
            client = stack.enter_context(Client(args.scheduler, timeout="30s"))
        else:
            cluster = stack.enter_context(_local_cluster(n_workers=args.workers, threads_per_worker=model._threads(),
                                                         processes=True, dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        parts = max(1, len(_worker_addresses(client)))
        chunk = max(1, -(-len(users) // parts))

        def column(x):
            return None if x is None else da.from_array(x, chunks=chunk)

        try:
            estimator = DaskRecommender if type(model) is fastrec.Recommender else DaskTwoTower
            dm = estimator(client=client, sync_every=args.sync_every, timeout=args.timeout, **params).fit(
                column(users), column(items), column(ratings), sample_weight=column(weight),
                user_features=tables.get("user"), item_features=tables.get("item"))
        except WorkerLostError as e:
            raise DataError(str(e)) from None
        except (ValueError, TypeError) as e:
            raise _option_error(e) from None
        n_workers = len(dm.replica_workers_)
    model = dm.to_local()
    model.save(args.output)
    feedback = "implicit feedback" if ratings is None else f"ratings from {args.rating_col!r}"
    print(f"trained on {len(users):,} interactions ({feedback}) on {n_workers} Dask worker{'s' * (n_workers != 1)}, "
          f"{model.n_users_:,} users x {model.n_items_:,} items, {_epochs(len(model.history_['loss']))}, final loss "
          f"{model.loss_curve_[-1]:.4f}, {time.perf_counter() - start:.1f} s")
    print(f"saved {args.output}")


def _read_users(args, model):
    """(users typed like the model's ids, users as given for the output), each user once, in the order given."""
    if args.users is not None:
        users = np.array(_split(args.users), dtype=str)
    else:
        with open(args.users_file, newline="") as f:
            first = f.readline().rstrip("\r\n")
        if args.user_col in first.split(args.sep):  # a table with a header, e.g. a test set
            users = _column(_read_table(args.users_file, args.sep), args.user_col, args.users_file)
        else:
            with open(args.users_file) as f:
                users = np.array([line.strip() for line in f if line.strip()], dtype=str)
    text = np.asarray(users).astype(str)
    _, first_seen = np.unique(text, return_index=True)
    text = text[np.sort(first_seen)]  # each user once, in the order given
    if len(text) == 0:
        raise DataError("no users given")
    trained = model.seen_pairs()[0]
    users = _ids_like_model(text, trained, "users")
    # What the output names each user by: the model's id, or the text given where it is none (a note said so).
    shown = [u if t == str(u) else t for u, t in zip(users.tolist(), text.tolist())]
    unknown = np.flatnonzero(~np.isin(users, trained))
    if len(unknown):
        print(f"fastrec: note: {len(unknown)} of {len(users)} users are unknown to the model (e.g. "
              f"{shown[unknown[0]]!r}); they get what a new user would", file=sys.stderr)
    return users, shown


def _recommend(args):
    if args.all_users:
        return _recommend_all(args)
    for option, value in (("--chunk-size", args.chunk_size), ("--progress", args.progress)):
        if value is not None:
            raise DataError(f"{option} applies to --all-users only")
    model = _load_recommender(args.model)
    users, shown = _read_users(args, model)
    ids, scores = model.recommend(users, k=args.k, exclude_seen=not args.include_seen)
    rows = [(user, rank + 1, item, score)
            for user, row_ids, row_scores in zip(shown, ids.tolist(), scores.tolist())
            for rank, (item, score) in enumerate(zip(row_ids, row_scores))
            if score != -np.inf]  # padding: fewer than k candidates left for that user
    with _output(args.output) as out:
        if args.format == "json":
            records = (json.dumps(dict(zip(("user", "rank", "item", "score"), r))) for r in rows)
            out.write("[\n" + ",\n".join(records) + "\n]\n")  # one record a line
        else:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(("user", "rank", "item", "score"))
            writer.writerows(rows)


def _recommend_all(args):
    """--all-users: RecommenderBase.recommend_all to the Parquet file -o, and one line saying what it wrote."""
    if args.output in (None, "-"):
        raise DataError("--all-users writes a Parquet file: name it with -o, e.g. -o recs.parquet")
    if args.format is not None:
        raise DataError("--all-users writes Parquet; --format applies to --users / --users-file")
    start = time.perf_counter()
    _check_writable(args.output)
    model = _load_recommender(args.model)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        rows = model.recommend_all(args.output, k=args.k, exclude_seen=not args.include_seen,
                                   chunk_size=args.chunk_size, verbose=progress)
    except ImportError as e:  # pyarrow missing: one line saying what to install, as for other user mistakes
        raise DataError(str(e)) from None
    print(f"wrote {rows:,} recommendations for {model.n_users_:,} users to {args.output}, "
          f"{time.perf_counter() - start:.1f} s")


@contextlib.contextmanager
def _output(path):
    """A file opened for writing, or stdout (left open) for None / '-'."""
    if path in (None, "-"):
        yield sys.stdout
    else:
        with open(path, "w", newline="") as f:
            yield f


def _evaluate(args):
    from fastrec import evaluation, metrics

    model = _load_recommender(args.model)
    columns = _read_table(args.data, args.sep)
    users, _, items, _ = _interactions(columns, args.data, args)
    trained_users, trained_items = model.seen_pairs()
    users = _ids_like_model(users, trained_users, "users")
    items = _ids_like_model(items, trained_items, "items")
    if not model.implicit_:
        name = args.rating_col or "rating"
        hint = "; the model predicts ratings: name their column with --rating-col"
        ratings = _as_numbers(_column(columns, name, args.data, hint), f"column {name!r}")
        predicted = model.predict(users, items)
        result = {"rmse": metrics.rmse(ratings, predicted), "mae": metrics.mae(ratings, predicted),
                  "n": len(users)}
    elif args.protocol == "full":
        result = evaluation.full_ranking(model, users, items, k=args.k)
    else:
        seen_users, seen_items = model.seen_pairs()
        result = evaluation.sampled_ranking(model, users, items, seen_users=seen_users, seen_items=seen_items,
                                            n_negatives=args.negatives, k=args.k, random_state=args.seed)
    if args.format == "json":
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:<14} {value}" if isinstance(value, int) else f"{name:<14} {value:.4f}")


def _arrays(tree) -> list:
    """The arrays of nested dicts and lists."""
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in _arrays(v)]
    if isinstance(tree, list):
        return [a for v in tree for a in _arrays(v)]
    return [tree] if isinstance(tree, np.ndarray) else []


def _model_summary(path: str) -> dict:
    model = fastrec.load(path, mmap=True)  # validates the whole file without reading the arrays
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read("fastrec.json"))
    summary = {"file": path, "bytes": os.path.getsize(path), "class": meta["class"],
               "fastrec_version": meta["fastrec_version"], "format_version": meta["format_version"]}
    if hasattr(model, "implicit_"):
        summary["feedback"] = "implicit" if model.implicit_ else "explicit"
    for attr in ("n_users_", "n_items_"):
        if hasattr(model, attr):
            summary[attr.strip("_")] = int(getattr(model, attr))
    net = getattr(model, "net_", None)
    if net is not None:
        nets = getattr(net, "towers", [net])  # a TwoTower's net is a FieldNet per side
        summary["inputs"] = [f.name for n in nets for f in n.fields] + [d.name for n in nets for d in n.dense]
        weights = [w for n in nets for w in (*n.tables, *n.coefs, *n.intercepts, getattr(n, "gmf_w", None))]
    elif isinstance(getattr(model, "params_", None), dict):  # a SequentialRecommender's arrays
        weights = _arrays(model.params_)
    elif isinstance(getattr(model, "params_", None), list):  # AutoRec's [W_enc, b_enc, W_dec, b_dec]
        weights = model.params_
    elif isinstance(getattr(model, "weights_", None), np.ndarray):  # EASE's item-item matrix
        weights = [model.weights_]
    else:
        weights = [*getattr(model, "coefs_", []), *getattr(model, "intercepts_", [])]
    summary["parameters"] = int(sum(w.size for w in weights if w is not None))
    summary["params"] = meta["params"]
    return summary


def _info(args):
    summary = _model_summary(args.model) if args.model else None
    if args.format == "json":
        config = fastrec.show_config(file=io.StringIO())
        print(json.dumps({"model": summary, "config": config}, indent=1))
        return
    if summary is not None:
        print(f"model file: {summary['file']} ({summary['bytes'] / 2**20:.2f} MiB)")
        for key, value in summary.items():
            if key not in ("file", "bytes", "params"):
                value = ", ".join(value) if isinstance(value, list) else value
                print(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
        print("params:")
        for key, value in summary["params"].items():
            print(f"  {key}: {value}")
        print()
    fastrec.show_config()


# ----------------------------------------------------------------------------------------------- parser
def _separator(text: str) -> str:
    text = {"\\t": "\t", "tab": "\t"}.get(text, text)
    if len(text) != 1:
        raise argparse.ArgumentTypeError(f"the separator must be one character (or \\t); got {text!r}")
    return text


def _add_columns(p, rating_help: str):
    g = p.add_argument_group("columns")
    g.add_argument("--user-col", default="user_id", metavar="NAME", help="user id column (default: %(default)s)")
    g.add_argument("--item-col", default="item_id", metavar="NAME", help="item id column (default: %(default)s)")
    g.add_argument("--rating-col", metavar="NAME", help=rating_help)
    g.add_argument("--sep", type=_separator, default=",", help="CSV delimiter, one character or \\t "
                   "(default: ',')")
    return g


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastrec", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train, use and inspect fastrec recommenders from the command line.",
        epilog="Data files are CSV with a header row (read by pandas when it is installed, else by Python's csv\n"
               "module) or Parquet (.parquet, .pq; needs pandas and pyarrow). Ids are integers when every\n"
               "cell of the column is a plainly written integer (no leading zeros, '+' or spaces), else strings;\n"
               "recommend and evaluate read ids as the model's kind (integer or string): a cell that cannot be\n"
               "one (e.g. 'u1' or '007' against integer ids) is an unknown id, and a note on stderr says so.\n\n"
               "examples:\n"
               "  fastrec demo --save demo.fastrec\n"
               "  fastrec train ratings.csv --rating-col rating -o model.fastrec\n"
               "  fastrec recommend model.fastrec --users 1,2,3 --k 5\n"
               "  fastrec recommend model.fastrec --all-users -o recs.parquet\n"
               "  fastrec evaluate model.fastrec test.csv --rating-col rating\n"
               "  fastrec info model.fastrec\n\n"
               "Exit status: 0 success, 1 a data or model error, 2 a usage error.")
    parser.add_argument("--version", action="version", version=f"fastrec {fastrec.__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    def command(name, run, help, epilog):
        p = commands.add_parser(name, help=help, description=help, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(run=run)
        return p

    p = command("demo", _demo, "train a recommender on generated data and show what it does",
                "example:\n  fastrec demo --save demo.fastrec && fastrec recommend demo.fastrec --users 0,1")
    p.add_argument("--save", metavar="PATH", help="write the trained model to PATH")

    p = command("train", _train, "train a recommender on interactions and save it",
                "Without --rating-col every row is a positive interaction (implicit feedback; negatives are\n"
                "sampled). Feature files have one row per user or item; their columns are numeric when every\n"
                "cell is a number and categorical otherwise, unless --categorical / --multi-hot / --numeric\n"
                "say otherwise.\n\n"
                "With --early-stopping (the default) --validation-fraction of the interactions is held out,\n"
                "--validation-metric is scored after every epoch, training stops once it has not improved for\n"
                "--n-iter-no-change epochs, and the best epoch is kept; --epochs is then a maximum. Ctrl-C stops\n"
                "training and saves the model (the best epoch so far with --early-stopping) if an epoch has\n"
                "completed; the exit status is then 130.\n\n"
                "examples:\n"
                "  fastrec train ratings.csv --rating-col rating --seed 0 -o model.fastrec\n"
                "  fastrec train ratings.csv --rating-col rating --no-early-stopping --epochs 20 -o model.fastrec\n"
                "  fastrec train clicks.parquet --item-features items.csv --multi-hot genres \\\n"
                "      --hidden 128,64 --negatives 8 -o model.fastrec\n"
                "  fastrec train clicks.csv --model two-tower --output-dim 32 -o retrieval.fastrec\n"
                "  fastrec train events.csv --model sequential --time-col ts -o next.fastrec\n"
                "  fastrec train clicks.csv --model ease --l2 200 -o ease.fastrec\n"
                "  fastrec train ratings.csv --rating-col rating --model autorec -o autorec.fastrec")
    p.add_argument("data", metavar="DATA", help="interactions: CSV or Parquet, one row per (user, item)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write")
    p.add_argument("--model", choices=tuple(_MODELS), default="recommender",
                   help="recommender: fastrec.Recommender (an MLP over the user's and item's embeddings, the "
                   "ranking model); two-tower: fastrec.TwoTower (a vector per user and per item, scored by inner "
                   "product: the retrieval model); sequential: fastrec.SequentialRecommender (self-attention over "
                   "each user's ordered events: what they do next); ease: fastrec.EASE (a closed-form item-item linear "
                   "autoencoder, implicit feedback; memory in the square of the item count); autorec: fastrec.AutoRec "
                   "(I-AutoRec: each item's rating vector encoded and reconstructed; explicit ratings); multvae / "
                   "multdae: fastrec.MultVAE / MultDAE (Liang et al.'s variational / denoising autoencoders of users' "
                   "item bags, implicit feedback). Default: %(default)s")
    g = _add_columns(p, "rating column (explicit feedback); without it, implicit feedback")
    g.add_argument("--weight-col", metavar="NAME", help="per-interaction weight column (optional)")
    g.add_argument("--time-col", metavar="NAME", help="--model sequential: event time column (numbers); each "
                   "user's events are ordered by it, ties by row order (without it: row order)")
    g = p.add_argument_group("side features")
    g.add_argument("--user-features", metavar="FILE", help="user attributes, one row per user")
    g.add_argument("--item-features", metavar="FILE", help="item attributes, one row per item")
    g.add_argument("--user-id-col", metavar="NAME", help="id column of --user-features (default: --user-col)")
    g.add_argument("--item-id-col", metavar="NAME", help="id column of --item-features (default: --item-col)")
    g.add_argument("--categorical", type=_split, default=[], metavar="COLS", help="categorical columns, e.g. city,os")
    g.add_argument("--multi-hot", type=_split, default=[], metavar="COLS",
                   help="columns holding a set of labels per row, e.g. 'Comedy|Drama'")
    g.add_argument("--multi-hot-sep", default="|", metavar="SEP", help="label separator (default: %(default)s)")
    g.add_argument("--numeric", type=_split, default=[], metavar="COLS", help="numeric columns")
    g = p.add_argument_group("hyper-parameters (defaults: the --model's; an option of another model is refused)")
    for option, param, kind, text in _HYPER_PARAMETERS:
        text += _default_text(param)
        if kind is bool:
            g.add_argument(option, dest=param, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(kind, tuple):
            g.add_argument(option, dest=param, choices=kind, help=text)
        elif kind == "sizes":
            g.add_argument(option, dest=param, type=_sizes, metavar="SIZES", help=text)
        elif kind == "auto":
            g.add_argument(option, dest=param, type=_float_or_auto, metavar="X|auto", help=text)
        elif kind == "int-auto":
            g.add_argument(option, dest=param, type=_int_or_auto, metavar="N|auto", help=text)
        elif kind == "json":
            g.add_argument(option, dest=param, type=_json_object, metavar="JSON", help=text)
        elif kind == "dpconfig":
            g.add_argument(option, dest=param, type=_dp_config, metavar="JSON", help=text)
        else:
            metavar = {int: "N", float: "X", str: "NAME"}[kind]
            g.add_argument(option, dest=param, type=kind, metavar=metavar, help=text)
    g.add_argument("--verbose", action="store_true", help="print the loss (and validation score) of every epoch")
    _add_dask_options(p)

    p = command("recommend", _recommend, "top-k items for users, as CSV, JSON or Parquet (user, rank, item, score)",
                "Items a user interacted with in training are left out unless --include-seen. A user with fewer\n"
                "than k items left gets fewer rows. Users unknown to the model get what a new user would (a note\n"
                "on stderr counts them); against integer user ids, an id not written as one ('u1', '007') is unknown.\n\n"
                "--all-users writes every user the model knows to a Parquet file (-o; needs pyarrow), in chunks\n"
                "of --chunk-size users (one Parquet row group each), so memory does not grow with the number of\n"
                "users; the file appears only once complete (an existing one is replaced then, never left half\n"
                "written). The model may be any recommender (--model of fastrec train).\n\n"
                "examples:\n"
                "  fastrec recommend model.fastrec --users 1,2,3 --k 5\n"
                "  fastrec recommend model.fastrec --users-file test.csv --format json -o top10.json\n"
                "  fastrec recommend model.fastrec --all-users -o recs.parquet")
    p.add_argument("model", metavar="MODEL", help="model file written by 'fastrec train' or model.save")
    users = p.add_mutually_exclusive_group(required=True)
    users.add_argument("--users", metavar="IDS", help="comma-separated user ids")
    users.add_argument("--users-file", metavar="FILE",
                       help="one user id per line, or a CSV with a header that has the --user-col column")
    users.add_argument("--all-users", action="store_true",
                       help="every user the model knows, written to the Parquet file -o")
    p.add_argument("--user-col", default="user_id", metavar="NAME", help="see --users-file (default: %(default)s)")
    p.add_argument("--sep", type=_separator, default=",", help="CSV delimiter of --users-file (default: ',')")
    p.add_argument("-k", "--k", type=int, default=10, help="items per user (default: %(default)s)")
    p.add_argument("--include-seen", action="store_true", help="also recommend items seen in training")
    p.add_argument("--format", choices=("csv", "json"), help="output format of --users / --users-file (default: "
                   "csv); --all-users writes Parquet")
    p.add_argument("-o", "--output", metavar="OUT", help="output file (default: stdout; --all-users: required)")
    p.add_argument("--chunk-size", type=int, metavar="N", help="--all-users: users per chunk and row group "
                   "(default: 1024 to 8192, fewer for larger catalogues; see help(fastrec.Recommender.recommend_all))")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="--all-users: show progress on stderr (default: when stderr is a terminal)")

    p = command("evaluate", _evaluate, "measure a model on held-out interactions",
                "A model trained on ratings gets rmse and mae. An implicit-feedback model gets ranking metrics:\n"
                "--protocol full ranks every item (items seen in training excluded): precision, recall,\n"
                "ndcg and hr at k; --protocol sampled ranks each test item against --negatives items the user\n"
                "never touched (the NCF protocol): hr and ndcg at k.\n\n"
                "examples:\n"
                "  fastrec evaluate model.fastrec test.csv --rating-col stars\n"
                "  fastrec evaluate model.fastrec test.parquet --protocol sampled --k 10 --format json")
    p.add_argument("model", metavar="MODEL", help="model file")
    p.add_argument("data", metavar="TEST_DATA", help="held-out interactions: CSV or Parquet")
    _add_columns(p, "rating column, for models trained on ratings (default: rating)")
    p.add_argument("--protocol", choices=("full", "sampled"), default="full",
                   help="implicit models: ranking protocol (default: %(default)s)")
    p.add_argument("-k", "--k", type=int, default=10, help="cut-off of the ranking metrics (default: %(default)s)")
    p.add_argument("--negatives", type=int, default=99, help="--protocol sampled: negatives per test item "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="--protocol sampled: seed of the negatives "
                   "(default: %(default)s)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")

    p = command("info", _info, "summarise a model file, and show fastrec's build and CPU configuration",
                "The summary reads the file's metadata and maps its arrays without reading them.\n\n"
                "examples:\n  fastrec info model.fastrec\n  fastrec info --format json")
    p.add_argument("model", nargs="?", metavar="MODEL", help="model file (optional)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    return parser


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())  # one line, whatever the exception's text


def main(argv=None) -> int:
    """Run ``fastrec ARGS`` (argv: the arguments, default sys.argv[1:]); returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed what to say
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.run(args) or 0  # train returns 130 when Ctrl-C stopped it (and says what it saved)
    except KeyboardInterrupt:
        print("fastrec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fastrec recommend ... | head`: the reader left; stay quiet at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (DataError, ValueError, TypeError, OSError) as e:  # includes fastrec.ModelFileError
        print(f"fastrec: error: {_message(e)}", file=sys.stderr)
        return 1

