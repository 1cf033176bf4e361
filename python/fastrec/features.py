"""Side-feature tables: the attributes of users or items, keyed by their raw ids.

A :class:`FeatureTable` holds ``n`` rows, one per id, and three kinds of columns, each named (names are
unique across kinds, since each becomes one input field of the model):

- ``categorical``: ``name -> (n,)`` array of values, one per row, ints or strings (an occupation, a
  country). Each distinct value will get an embedding row. Missing values are not allowed: encode them as a
  value of their own (``"unknown"``, ``-1``).
- ``multi_hot``: ``name -> (X, vocabulary)`` with ``X`` a scipy CSR ``(n, len(vocabulary))`` float32
  matrix of weights (a bag of genres or tags per row; an empty row is an empty bag) and ``vocabulary`` a
  ``(len(vocabulary),)`` array of the distinct labels of the columns. A sparse matrix alone is accepted
  too; its vocabulary is then ``arange(n_columns)``.
- ``numeric``: ``name -> (n,)`` or ``(n, c)`` float32 values, finite (a year, an age, a pretrained
  vector). They are stored as given: scaling them is the model's job.

Ids and categorical values are stored as ``int64`` or as a NumPy unicode array; ``bool`` becomes ``int64``;
floats are refused (an id of 3.0 is usually a parsing accident, e.g. a pandas column with missing values).
"""

from __future__ import annotations

import numbers
import sys

import numpy as np
import scipy.sparse as sp

from fastrec._checks import as_array, as_numeric, check_csr, warn
from fastrec._registry import persistable

__all__ = ["FeatureTable", "column_types"]


def as_id_array(values, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 or unicode array; TypeError for floats, mixed or other types."""
    if hasattr(values, "to_numpy"):  # pandas Series / Index, without importing pandas
        values = values.to_numpy()
    a = as_array(values, name)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {a.shape}")
    if a.size == 0:  # np.asarray([]) is float64
        return np.zeros(0, np.int64)
    if a.dtype == bool:
        return a.astype(np.int64)
    if a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds integers beyond the int64 range")
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64, copy=False)
    if a.dtype.kind == "U":
        # numpy turns [1, "a"] into ["1", "a"]: refuse the mix as the object branch below does.
        if not isinstance(values, np.ndarray) and not all(isinstance(v, str) for v in values):
            raise TypeError(f"{name} must hold only ints or only strings; found a mix")
        return a
    if a.dtype == object:
        if all(isinstance(v, str) for v in a):
            return a.astype(str)
        if all(isinstance(v, numbers.Integral) for v in a):
            try:
                return a.astype(np.int64)
            except OverflowError:
                raise ValueError(f"{name} holds integers beyond the int64 range") from None
        if any(v is None or (isinstance(v, float) and v != v) for v in a):
            raise ValueError(f"{name} has missing values (None/NaN); fill them with a value of their own")
        kinds = sorted({type(v).__name__ for v in a})
        raise TypeError(f"{name} must hold only ints or only strings; found {kinds}")
    if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
        raise ValueError(f"{name} has missing values (NaN); fill them with a value of their own")
    raise TypeError(f"{name} must hold ints or strings; got dtype {a.dtype}")


@persistable
class FeatureTable:
    """Categorical, multi-hot and numeric attributes of ``n`` users or items, keyed by their raw ids.

    Parameters
    ----------
    ids : (n,) array of int or str
        The raw id of each row, unique.
    categorical : dict name -> (n,) array of int or str, optional
    multi_hot : dict name -> (CSR (n, v) weights, (v,) vocabulary) or a sparse (n, v) matrix, optional
    numeric : dict name -> (n,) or (n, c) array of float, optional

    See the module docstring for the meaning of each kind. Inputs are validated and converted (CSR float32
    with sorted indices and summed duplicates; numeric float32 C-contiguous); a ``ValueError`` or
    ``TypeError`` names the offending argument.
    """

    def __init__(self, ids, *, categorical=None, multi_hot=None, numeric=None):
        self.ids = as_id_array(ids, "ids")
        n = self.ids.shape[0]
        uniq, counts = np.unique(self.ids, return_counts=True)
        if uniq.size != n:
            raise ValueError(f"ids must be unique; {uniq[counts > 1][:5].tolist()} repeat")
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids[self._order]

        seen_names: set = set()

        def check_name(name, kind):
            if not isinstance(name, str):
                raise TypeError(f"{kind} column names must be strings; got {name!r}")
            if name in seen_names:
                raise ValueError(f"column name {name!r} is used twice")
            seen_names.add(name)

        self.categorical: dict = {}
        for name, values in _as_dict(categorical, "categorical").items():
            check_name(name, "categorical")
            v = as_id_array(values, f"categorical[{name!r}]")
            if v.shape[0] != n:
                raise ValueError(f"categorical[{name!r}] has {v.shape[0]} values for {n} ids")
            self.categorical[name] = v

        self.multi_hot: dict = {}
        for name, value in _as_dict(multi_hot, "multi_hot").items():
            check_name(name, "multi_hot")
            self.multi_hot[name] = _check_multi_hot(value, n, f"multi_hot[{name!r}]")

        self.numeric: dict = {}
        for name, values in _as_dict(numeric, "numeric").items():
            check_name(name, "numeric")
            label = f"numeric[{name!r}]"
            if hasattr(values, "to_numpy"):
                values = values.to_numpy()
            a = as_array(values, label)
            if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or a.dtype.kind == "c":
                raise TypeError(f"{label} must hold real numbers; got dtype {a.dtype}")
            if a.ndim not in (1, 2) or a.shape[0] != n or (a.ndim == 2 and a.shape[1] == 0):
                raise ValueError(f"{label} must have shape ({n},) or ({n}, c) with c >= 1; got {a.shape}")
            with np.errstate(over="ignore"):  # beyond float32's range: inf, reported below
                a = np.ascontiguousarray(a, dtype=np.float32)
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{label} contains NaN or infinity (or a value too large for float32)")
            self.numeric[name] = a

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def columns(self) -> list:
        """Column names: categorical, then multi-hot, then numeric, each in insertion order."""
        return [*self.categorical, *self.multi_hot, *self.numeric]

    def __repr__(self) -> str:
        parts = [f"{k}:categorical" for k in self.categorical]
        parts += [f"{k}:multi_hot[{len(v[1])}]" for k, v in self.multi_hot.items()]
        parts += [f"{k}:numeric{tuple(v.shape[1:]) or ''}" for k, v in self.numeric.items()]
        return f"FeatureTable({len(self)} rows; {', '.join(parts) or 'no columns'})"

    def row_positions(self, ids) -> np.ndarray:
        """Row of each of ``ids`` (m,) in this table as an int64 ``(m,)`` array; -1 for unknown ids.

        Ids of another type than the table's (str vs int) are unknown, never an error.
        """
        q = as_id_array(ids, "ids")
        out = np.full(q.shape[0], -1, dtype=np.int64)
        if len(self) == 0 or q.size == 0 or (q.dtype.kind == "U") != (self.ids.dtype.kind == "U"):
            return out
        pos = np.searchsorted(self._sorted_ids, q)
        pos = np.minimum(pos, len(self) - 1)
        found = self._sorted_ids[pos] == q
        out[found] = self._order[pos[found]]
        return out

    @classmethod
    def from_dataframe(cls, df, categorical=None, multi_hot=None, numeric=None, *, sep="|"):
        """Build a table from a pandas DataFrame indexed by id (pandas is not imported by fastrec).

        ``categorical``, ``multi_hot`` and ``numeric`` are lists of column names. A multi-hot cell is a
        list/tuple/set/array of labels (weight 1 each; a repeated label adds up), a dict label -> weight,
        a string of labels joined by ``sep`` (``multi_hot`` may also be a dict column -> separator), or
        None/NaN/"" for an empty bag. The vocabulary is the sorted distinct labels.

        With none of the three given, every column's kind is guessed (see `column_types`); a guess that
        may be wrong is reported by a warning.
        """
        if not (hasattr(df, "columns") and hasattr(df, "index") and hasattr(df, "__getitem__")):
            raise TypeError(f"df must be a pandas DataFrame indexed by id; got {type(df).__name__}")
        if categorical is None and multi_hot is None and numeric is None:
            categorical, multi_hot, numeric = split_types(column_types(df, label="df"))
        seps = dict(multi_hot) if isinstance(multi_hot, dict) else {c: sep for c in (multi_hot or [])}
        for col in [*(categorical or []), *seps, *(numeric or [])]:
            if col not in df.columns:
                raise ValueError(f"column {col!r} is not in df (columns: {list(df.columns)})")
        return cls(
            df.index,
            categorical={str(c): df[c] for c in categorical or []},
            multi_hot={str(c): _bags_from_cells(df[c].to_numpy(dtype=object), s, f"column {c!r}")
                       for c, s in seps.items()},
            numeric={str(c): df[c].to_numpy() for c in numeric or []},
        )


_KINDS = ("categorical", "numeric", "multi_hot")
# An integer column with at most this many distinct values is guessed to be a coded category (gender 0/1,
# an age or year bucket, an occupation code) rather than a quantity.
_FEW_INTEGERS = 16
# Separators tried, in order, when a string column may hold delimited lists of labels.
_SEPARATORS = ("|", ";", ",", " ")


def _check_type(name, kind, label):
    if not isinstance(kind, str) or not (kind in _KINDS or (kind.startswith("multi_hot:") and len(kind) > 10)):
        raise ValueError(f"{label}: the type of column {name!r} must be 'categorical', 'numeric', 'multi_hot' or "
                         f"'multi_hot:SEP' (labels joined by SEP); got {kind!r}")
    return "multi_hot:|" if kind == "multi_hot" else kind


def _guess_type(values) -> tuple:
    """(type, reason, doubtful) of one column: what its cells suggest, and whether the guess may well be
    wrong (then it is reported by a warning)."""
    dtype_kind = getattr(values.dtype, "kind", "O")
    first = next((v for v in values if v is not None and not (isinstance(v, float) and v != v)), None)
    if isinstance(first, (list, tuple, set, frozenset, dict, np.ndarray)):
        return "multi_hot:|", "cells are collections of labels", False
    if dtype_kind == "f":
        return "numeric", "floating-point numbers", False
    if dtype_kind in "iu":  # numpy or pandas nullable integers
        distinct = len(np.unique(np.asarray(values)))
        if distinct <= _FEW_INTEGERS and 4 * distinct <= len(values):  # each value repeats (not a tiny table)
            return "categorical", f"integers with only {distinct} distinct values: a coded category?", True
        return "numeric", f"integers with {distinct} distinct values", False
    cells = [v for v in values if isinstance(v, str) and v != ""]
    distinct = set(cells)
    for sep in _SEPARATORS:
        with_sep = [c for c in distinct if sep in c.strip(sep)]
        if len(distinct) < 2 or len(with_sep) < 0.2 * len(distinct):
            continue
        labels = {t for c in distinct for t in c.split(sep) if t != ""}
        # Delimited lists reuse fewer labels than they have combinations; free text (titles, city names) has
        # more words than distinct values.
        if len(labels) < len(distinct):
            return (f"multi_hot:{sep}", f"strings of {len(labels)} labels joined by {sep!r} in "
                    f"{len(distinct)} combinations", True)
    if cells and len(distinct) > 0.5 * len(values) and len(values) > 20:
        return "categorical", f"{len(distinct)} distinct values in {len(values)} rows: nearly one per row", True
    return "categorical", "labels" if not cells else f"strings, {len(distinct)} distinct", False


def column_types(df, types=None, *, label="df", verbose=False) -> dict:
    """The type of every column of DataFrame `df`: column name -> "categorical", "numeric" or
    "multi_hot:SEP". Columns named in `types` get the type given there ("multi_hot" means SEP "|"); the
    others are guessed from their cells:

    - cells that are lists, tuples, sets or dicts -> multi-hot; floating-point numbers -> numeric;
    - integers -> numeric, but categorical when there are at most 16 distinct values, each repeated four
      times on average (a coded category such as gender 0/1 or an age bucket);
    - strings -> categorical, but multi-hot when they look like delimited lists of labels (one of "|", ";",
      ",", " " in at least 20% of the distinct values, and fewer distinct labels than distinct values: genres,
      not titles).

    Guesses that may be wrong (the coded-category and delimited-list rules, and strings with nearly one
    value per row) are reported by one UserWarning that lists every guessed column; ``verbose`` prints every
    guess to stderr.
    """
    types = _as_dict(types, "feature_types")
    out, guessed, doubtful = {}, [], False
    for col in df.columns:
        if col in types:
            out[col] = _check_type(col, types[col], "feature_types")
            continue
        kind, reason, doubt = _guess_type(df[col])
        out[col] = kind
        guessed.append(f"  {col!r}: {kind} ({reason}){'  <- check' if doubt else ''}")
        doubtful |= doubt
    if guessed and (doubtful or verbose):
        text = (f"{label}: column types guessed from their values (pass feature_types={{column: type}} to set "
                "them):\n" + "\n".join(guessed))
        if doubtful:
            warn(text, UserWarning)
        else:
            print(text, file=sys.stderr, flush=True)
    return out


def split_types(types: dict) -> tuple:
    """A `column_types` result as `FeatureTable.from_dataframe`'s arguments: (categorical columns, multi-hot
    column -> separator, numeric columns)."""
    return ([c for c, t in types.items() if t == "categorical"],
            {c: t.partition(":")[2] for c, t in types.items() if t.startswith("multi_hot:")},
            [c for c, t in types.items() if t == "numeric"])


def plain_integers(text: np.ndarray):
    """(values, ok): each cell of a text array as an int64 (0 where it is none) and whether it is an integer
    written plainly, as str(int) writes it, within int64. Only such cells convert, so the conversion is exact
    both ways: "007", "+7", " 7" and "1_000" are not integers here (int() would accept them all)."""
    try:
        values = text.astype(np.int64)  # the fast path: every cell parses (perhaps not plainly written)
        return values, values.astype(str) == text
    except (ValueError, OverflowError):
        pass
    values, ok = np.zeros(len(text), np.int64), np.zeros(len(text), bool)
    for j, cell in enumerate(text.tolist()):
        try:
            value = int(cell)
        except ValueError:
            continue
        if str(value) == cell and -2**63 <= value < 2**63:
            values[j], ok[j] = value, True
    return values, ok


def _as_dict(value, name: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of column name -> values; got {type(value).__name__}")
    return value


def _check_multi_hot(value, n: int, label: str):
    if sp.issparse(value):
        matrix, vocab = value, np.arange(value.shape[1])
    elif isinstance(value, tuple) and len(value) == 2 and sp.issparse(value[0]):
        matrix, vocab = value
    else:
        raise TypeError(f"{label} must be (sparse (n, v) matrix, (v,) vocabulary) or a sparse matrix")
    vocab = as_id_array(vocab, f"{label} vocabulary")
    if matrix.shape != (n, vocab.shape[0]):
        raise ValueError(f"{label} matrix must have shape ({n}, {vocab.shape[0]}) = (ids, vocabulary); "
                         f"got {matrix.shape}")
    if np.unique(vocab).size != vocab.size:
        raise ValueError(f"{label} vocabulary has repeated labels")
    matrix = check_csr(matrix, label)
    data = as_numeric(np.asarray(matrix.data), label)
    with np.errstate(over="ignore"):  # beyond float32's range: inf, reported below
        matrix = sp.csr_matrix((data.astype(np.float32), matrix.indices, matrix.indptr), shape=matrix.shape, copy=True)
    matrix.sum_duplicates()  # also sorts the indices
    if not np.all(np.isfinite(matrix.data)):
        raise ValueError(f"{label} weights contain NaN or infinity")
    return matrix, vocab


def _bags_from_cells(cells: np.ndarray, sep: str, label: str):
    """(CSR float32 (n, v), (v,) sorted vocabulary) from one multi-hot cell per row."""
    labels, weights, lengths = [], [], []
    for cell in cells:
        if isinstance(cell, str):
            items = [t for t in cell.split(sep) if t != ""]
            w = [1.0] * len(items)
        elif isinstance(cell, dict):
            items, w = list(cell.keys()), [float(x) for x in cell.values()]
        elif cell is None or (isinstance(cell, float) and cell != cell):
            items, w = [], []
        elif isinstance(cell, (list, tuple, set, frozenset, np.ndarray)):
            items = list(cell)
            w = [1.0] * len(items)
        else:
            raise TypeError(f"{label}: a multi-hot cell must be a list, a set, a dict, a string or None; "
                            f"got {type(cell).__name__}")
        labels.extend(items)
        weights.extend(w)
        lengths.append(len(items))
    flat = as_id_array(np.array(labels, dtype=object), f"{label} labels") if labels else np.zeros(0, np.int64)
    vocab, codes = np.unique(flat, return_inverse=True)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    matrix = sp.csr_matrix((np.asarray(weights, dtype=np.float32), codes.ravel(), indptr),
                           shape=(len(cells), vocab.size))
    matrix.sum_duplicates()
    return matrix, vocab
