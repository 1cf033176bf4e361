"""Interaction data: a synthetic generator with planted structure, and a MovieLens reader.

Nothing here downloads anything. MovieLens may not be redistributed; get it from GroupLens, or take
MovieLens-100k from the ``recbole==1.2.1`` wheel (``recbole/dataset_example/ml-100k/``).
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.sparse as sp

from fastrec._checks import INT_MAX, as_array, as_numeric, check_bool, check_float
from fastrec.evaluation import check_generator
from fastrec.features import FeatureTable, as_id_array

__all__ = ["Interactions", "load_movielens", "make_interactions"]


@dataclass
class Interactions:
    """An interaction log of ``n`` (user, item) events.

    users, items : (n,) raw ids (int64 or str)
    ratings : (n,) float32, or None for implicit feedback
    timestamps : (n,) int64 (seconds since the epoch), or None
    user_features, item_features : :class:`~fastrec.features.FeatureTable` keyed by user / item id, or None
    """

    users: np.ndarray
    items: np.ndarray
    ratings: Optional[np.ndarray] = None
    timestamps: Optional[np.ndarray] = None
    user_features: Optional[FeatureTable] = None
    item_features: Optional[FeatureTable] = None

    def __post_init__(self):
        self.users = as_id_array(self.users, "users")
        self.items = as_id_array(self.items, "items")
        n = self.users.shape[0]
        if self.items.shape[0] != n:
            raise ValueError(f"users and items have different lengths: {n} and {self.items.shape[0]}")
        if self.ratings is not None:
            r = as_numeric(as_array(self.ratings, "ratings"), "ratings")
            if r.shape != (n,) or not np.all(np.isfinite(r)) or np.any(np.abs(r) > np.finfo(np.float32).max):
                raise ValueError(f"ratings must be ({n},) finite numbers (float32); got shape {r.shape}")
            self.ratings = r.astype(np.float32)
        if self.timestamps is not None:
            t = as_numeric(as_array(self.timestamps, "timestamps"), "timestamps")
            if t.shape != (n,):
                raise ValueError(f"timestamps must have shape ({n},); got {t.shape}")
            if t.dtype.kind == "f" and not np.all(np.abs(t) < 2**63):  # NaN fails too
                raise ValueError("timestamps must be finite and fit int64")
            self.timestamps = t.astype(np.int64)
        for name in ("user_features", "item_features"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), FeatureTable):
                raise TypeError(f"{name} must be a FeatureTable or None")

    def __len__(self) -> int:
        return self.users.shape[0]

    def subset(self, index) -> "Interactions":
        """The events at ``index`` (e.g. a split's train_idx), sharing the feature tables."""
        return Interactions(self.users[index], self.items[index],
                            None if self.ratings is None else self.ratings[index],
                            None if self.timestamps is None else self.timestamps[index],
                            self.user_features, self.item_features)


# ---------------------------------------------------------------------------------------------------------
# synthetic data


def make_interactions(n_users=1000, n_items=500, n_interactions=20000, *, implicit=False, n_factors=8,
                      n_genres=8, noise=0.5, preference_strength=3.0, random_state=None) -> Interactions:
    """Synthetic interactions with planted latent structure and informative side features.

    What is planted (all draws from ``random_state``):

    - user factors ``P`` (n_users, n_factors) and item factors ``Q`` (n_items, n_factors), i.i.d. normal
      with variance ``1 / sqrt(n_factors)`` so the affinity ``a_ui = P_u . Q_i`` has std about 1;
      user biases ``b_u ~ N(0, 0.3^2)``, item biases ``b_i ~ N(0, 0.4^2)``, item popularity logits
      ``pop_i ~ N(0, 1)``.
    - Which items a user interacts with: user activity is log-normal; each user gets at least one event and
      ``n_interactions`` in total (at most ``n_items`` per user, pairs are distinct); a user's items are
      drawn without replacement with probability ``softmax_i(pop_i + preference_strength * a_ui)``.
      Popularity alone therefore predicts choices partly; the user factors predict them much better.
    - Ratings (explicit only): ``clip(round(c + b_u + b_i + a_ui + N(0, noise^2)), 1, 5)`` with the
      offset ``c`` making the mean before noise and rounding 3.5 (users pick items they like, so ``a_ui``
      of the chosen pairs is positive on average). A bias-only model misses the ``a_ui`` term.
    - Timestamps: each user starts at a random time in 2000-2001 and its events follow in random order, one
      to 1000 minutes apart; there is no drift, so a user's last event is a fresh draw from its preferences.
    - Item features: multi-hot ``"genres"`` (vocabulary ``"g0".."g{n_genres-1}"``): with ``n_genres``
      random unit directions ``G``, item i has genre g when ``Q_i . G_g`` is its largest such value or above
      ``0.3 * ||Q_i||``; numeric ``"year"`` (float32) ``1995 + 8 * (0.7 z(b_i) + 0.7 N(0, 1))`` rounded,
      z the standardised bias, so newer items tend to be better rated.
    - User features: categorical ``"segment"``: ``"g{argmax_g P_u . G_g}"``, the genre the user likes most.

    Ids are ints ``0..n_users-1`` and ``0..n_items-1``. Returns :class:`Interactions` with ``ratings=None``
    when ``implicit``.
    """
    for name, v in (("n_users", n_users), ("n_items", n_items), ("n_interactions", n_interactions),
                    ("n_factors", n_factors), ("n_genres", n_genres)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= v <= INT_MAX:
            raise ValueError(f"{name} must be an int >= 1 and <= {INT_MAX}; got {v!r}")
    check_bool(implicit, "implicit")
    check_float(noise, "noise")
    check_float(preference_strength, "preference_strength", -np.inf)
    if not n_users <= n_interactions <= n_users * n_items:
        raise ValueError(f"n_interactions must be between n_users ({n_users}) and n_users * n_items "
                         f"({n_users * n_items}); got {n_interactions}")
    rng = check_generator(random_state)
    d = n_factors
    scale = 1.0 / d ** 0.25
    P = rng.normal(0, scale, (n_users, d))
    Q = rng.normal(0, scale, (n_items, d))
    b_user = rng.normal(0, 0.3, n_users)
    b_item = rng.normal(0, 0.4, n_items)
    pop = rng.normal(0, 1.0, n_items)

    # events per user: 1 + a multinomial share of the rest by log-normal activity, capped at n_items
    activity = rng.lognormal(0, 1.0, n_users)
    counts = 1 + rng.multinomial(n_interactions - n_users, activity / activity.sum())
    while True:
        over = np.maximum(counts - n_items, 0)
        if not over.any():
            break
        counts -= over
        room = (counts < n_items) * activity
        counts += rng.multinomial(over.sum(), room / room.sum())

    # without-replacement softmax draws: the top-c_u of logits + Gumbel noise (Gumbel-top-k trick)
    users, items = [], []
    block = max(1, 2**22 // n_items)
    for start in range(0, n_users, block):
        stop = min(start + block, n_users)
        logits = pop + preference_strength * (P[start:stop] @ Q.T)
        keys = logits + rng.gumbel(size=logits.shape)
        ranked = np.argsort(-keys, axis=1)
        for u in range(start, stop):
            users.append(np.full(counts[u], u, dtype=np.int64))
            items.append(ranked[u - start, : counts[u]])
    users = np.concatenate(users)
    items = np.concatenate(items).astype(np.int64)

    ratings = None
    if not implicit:
        raw = b_user[users] + b_item[items] + np.sum(P[users] * Q[items], axis=1)
        raw += 3.5 - raw.mean() + rng.normal(0, noise, users.size)
        ratings = np.clip(np.round(raw), 1, 5).astype(np.float32)

    # timestamps: the Gumbel order is the preference order, so shuffle each user's events in time
    start_time = 946684800 + rng.integers(0, 2 * 365 * 86400, n_users)  # 2000-01-01 + up to 2 years
    gaps = rng.integers(60, 60_000, users.size)
    # users is sorted, so user u owns the slots first_slot[u] .. first_slot[u] + counts[u] - 1; give its
    # events those slots in random order, and slot s the time start + sum of the user's gaps up to s
    slot = np.empty(users.size, dtype=np.int64)
    slot[np.lexsort((rng.random(users.size), users))] = np.arange(users.size)
    first_slot = np.concatenate([[0], np.cumsum(counts)[:-1]])
    gap_sum = np.cumsum(gaps)
    timestamps = start_time[users] + gap_sum[slot] - gap_sum[first_slot[users]]

    G = rng.normal(size=(n_genres, d))
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    affinity = Q @ G.T
    has = (affinity >= affinity.max(axis=1, keepdims=True)) | (
        affinity > 0.3 * np.linalg.norm(Q, axis=1, keepdims=True))
    genres = sp.csr_matrix(has.astype(np.float32))
    vocab = np.array([f"g{g}" for g in range(n_genres)])
    z = (b_item - b_item.mean()) / b_item.std()
    year = np.round(1995 + 8 * (0.7 * z + 0.7 * rng.normal(size=n_items))).astype(np.float32)
    item_features = FeatureTable(np.arange(n_items), multi_hot={"genres": (genres, vocab)},
                                 numeric={"year": year})
    segment = vocab[np.argmax(P @ G.T, axis=1)]
    user_features = FeatureTable(np.arange(n_users), categorical={"segment": segment})
    return Interactions(users, items, ratings, timestamps, user_features, item_features)


# ---------------------------------------------------------------------------------------------------------
# MovieLens

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
                 "Sci-Fi", "Thriller", "War", "Western"]

_EXPECTED = ("u.data (MovieLens 100k, with u.item and u.user), ratings.dat (MovieLens 1M/10M, with "
             "movies.dat and users.dat), ratings.csv (MovieLens latest, with movies.csv) or <name>.inter "
             "(RecBole atomic files, with <name>.item and <name>.user)")


def load_movielens(path) -> Interactions:
    """Read MovieLens from ``path``, a directory or one of its ratings files; never downloads anything.

    Formats, recognised by the ratings file found:

    - **100k** (``u.data``: ``user\\titem\\trating\\ttimestamp``; ``u.item``: ``|``-separated, latin-1,
      release date ``01-Jan-1995`` and 19 genre flags named by ``u.genre`` when present; ``u.user``:
      ``id|age|gender|occupation|zip``);
    - **1M / 10M** (``ratings.dat``, ``movies.dat`` ``id::Title (1995)::A|B``, ``users.dat``
      ``id::gender::age::occupation::zip``; ``::``-separated, latin-1);
    - **latest / latest-small** (``ratings.csv`` ``userId,movieId,rating,timestamp``; ``movies.csv``
      ``movieId,title,genres`` with quoted titles, UTF-8; no user file);
    - **RecBole atomic files** (``<name>.inter`` with a typed header such as ``user_id:token
      item_id:token rating:float timestamp:float``; ``<name>.item`` with ``release_year:token`` and a
      ``genre:token_seq`` or ``class:token_seq`` column of space-separated genres; ``<name>.user`` with
      ``age``, ``gender``, ``occupation``).

    Item features (when the movie file is there): multi-hot ``"genres"`` and numeric ``"year"`` (the
    release year; a missing or unparsable year gets the median year). User features (when the user file is
    there): numeric ``"age"`` (years in 100k, the age-bucket code 1/18/25/... in 1M) and categorical
    ``"gender"`` and ``"occupation"``; zip codes and titles are not kept. Ratings are float32, timestamps
    int64. Ids are ints (RecBole tokens that are all digits become ints too, so both 100k sources agree).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = Path(path)
    try:
        exists = path.exists()
    except (OSError, ValueError) as exc:  # e.g. an embedded NUL character
        raise ValueError(f"path {str(path)!r} cannot be used: {exc}") from None
    if not exists:
        raise FileNotFoundError(f"{path} does not exist; expected a directory holding {_EXPECTED}")
    if path.is_dir():
        directory = path
        candidates = [p for p in (path / "u.data", path / "ratings.dat", path / "ratings.csv") if p.is_file()]
        candidates += sorted(path.glob("*.inter"))
        if not candidates:
            raise FileNotFoundError(f"no MovieLens ratings file in {path}; expected {_EXPECTED}")
        ratings_file = candidates[0]
    else:
        directory, ratings_file = path.parent, path
    name = ratings_file.name
    if name == "u.data":
        return _load_100k(directory)
    if name == "ratings.dat":
        return _load_1m(directory)
    if name == "ratings.csv":
        return _load_latest(directory)
    if name.endswith(".inter"):
        return _load_recbole(directory, name[: -len(".inter")])
    raise ValueError(f"{path} is not a MovieLens ratings file; expected {_EXPECTED}")


@contextmanager
def _parsing(label: str):
    """Errors from a malformed file (a bad number, a missing field, a repeated id) become a ValueError that
    names the file."""
    try:
        yield
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(("cannot parse", label)):  # names it already
            raise
        raise ValueError(f"cannot parse {label}: {exc!s}") from None


def _numbers(values, label: str, integer: bool) -> np.ndarray:
    """float64 values of a column read as text: finite, within float32's range, whole numbers if integer."""
    a = np.asarray(values, dtype=np.float64)  # ValueError on a token that is not a number
    ok = np.isfinite(a) & (np.abs(a) <= np.finfo(np.float32).max)
    if integer:
        ok &= (a == np.round(a)) & (np.abs(a) < 2**63)
    if not ok.all():
        kind = "integers" if integer else "finite numbers"
        raise ValueError(f"{label} must hold {kind}; got {a[~ok][0]!r}")
    return a


def _numeric_ratings(text: str, sep: str, label: str, skip_header: bool):
    """(users, items, ratings, timestamps) from numeric ``user sep item sep rating sep timestamp`` lines."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            data = np.loadtxt(io.StringIO(text), delimiter=sep, skiprows=int(skip_header), ndmin=2,
                              comments=None, dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"cannot parse {label}: {exc}") from exc
    if data.size == 0:
        raise ValueError(f"cannot parse {label}: it holds no ratings")
    if data.shape[1] < 4:
        raise ValueError(f"{label} must have 4 columns (user, item, rating, timestamp); got {data.shape[1]}")
    ids = _numbers(data[:, [0, 1, 3]], f"{label} user, item and timestamp columns", integer=True)
    ratings = _numbers(data[:, 2], f"{label} ratings", integer=False)
    ids = ids.astype(np.int64)
    return ids[:, 0].copy(), ids[:, 1].copy(), ratings.astype(np.float32), ids[:, 2].copy()


def _read(path: Path, encoding: str) -> str:
    try:
        with open(path, encoding=encoding, newline="") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot parse {path.name}: it is not {encoding} text ({exc})") from None


def _fill_years(years: np.ndarray) -> np.ndarray:
    """float32 years with NaN replaced by the median known year (1995 if none is known)."""
    known = years[~np.isnan(years)]
    fill = np.median(known) if known.size else 1995.0
    return np.where(np.isnan(years), fill, years).astype(np.float32)


def _bags(ids, genre_lists, vocab=None):
    """FeatureTable columns from per-row genre lists (multi-hot "genres")."""
    if vocab is None:
        vocab = np.array(sorted({g for gs in genre_lists for g in gs}), dtype=str)
    index = {g: j for j, g in enumerate(vocab)}
    indptr = np.concatenate([[0], np.cumsum([len(gs) for gs in genre_lists])])
    indices = np.array([index[g] for gs in genre_lists for g in gs], dtype=np.int64)
    matrix = sp.csr_matrix((np.ones(indices.size, np.float32), indices, indptr), shape=(len(ids), len(vocab)))
    return matrix, np.asarray(vocab, dtype=str)


_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


def _year_from_title(title: str) -> float:
    m = _YEAR_IN_TITLE.search(title.strip())
    return float(m.group(1)) if m else np.nan


def _load_100k(directory: Path) -> Interactions:
    users, items, ratings, ts = _numeric_ratings(_read(directory / "u.data", "latin-1"), "\t", "u.data", False)
    item_features = user_features = None
    if (directory / "u.item").is_file():
        genre_names = list(ML100K_GENRES)
        if (directory / "u.genre").is_file():
            with _parsing("u.genre"):
                pairs = [line.split("|") for line in _read(directory / "u.genre", "latin-1").splitlines() if line]
                genre_names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
        with _parsing("u.item"):
            ids, years, bags = [], [], []
            for line in _read(directory / "u.item", "latin-1").splitlines():
                if not line.strip():
                    continue
                f = line.split("|")
                if len(f) != 5 + len(genre_names):
                    raise ValueError(f"u.item: expected {5 + len(genre_names)} '|'-separated fields; got {line!r}")
                ids.append(int(f[0]))
                m = re.search(r"(\d{4})\s*$", f[2])
                years.append(float(m.group(1)) if m else np.nan)
                bags.append([g for g, flag in zip(genre_names, f[5:]) if flag.strip() == "1"])
            item_features = FeatureTable(ids, multi_hot={"genres": _bags(ids, bags, genre_names)},
                                         numeric={"year": _fill_years(np.array(years))})
    if (directory / "u.user").is_file():
        with _parsing("u.user"):
            rows = [line.split("|") for line in _read(directory / "u.user", "latin-1").splitlines() if line.strip()]
            user_features = _user_table(rows, "u.user")
    with _parsing("u.data"):
        return Interactions(users, items, ratings, ts, user_features, item_features)


def _user_table(rows, label):
    """FeatureTable from rows ``[id, age, gender, occupation, ...]`` (strings)."""
    if any(len(r) < 4 for r in rows):
        raise ValueError(f"{label}: expected id, age, gender, occupation (and zip) per line")
    ids = [int(r[0]) for r in rows]
    occupation = [r[3] for r in rows]
    if all(o.isdigit() for o in occupation):
        occupation = [int(o) for o in occupation]
    return FeatureTable(ids, categorical={"gender": [r[2] for r in rows], "occupation": occupation},
                        numeric={"age": _numbers([r[1] for r in rows], f"{label} ages", integer=False)})


def _load_1m(directory: Path) -> Interactions:
    text = _read(directory / "ratings.dat", "latin-1").replace("::", "\t")
    users, items, ratings, ts = _numeric_ratings(text, "\t", "ratings.dat", False)
    item_features = user_features = None
    if (directory / "movies.dat").is_file():
        with _parsing("movies.dat"):
            ids, years, bags = [], [], []
            for line in _read(directory / "movies.dat", "latin-1").splitlines():
                if not line.strip():
                    continue
                f = line.split("::")
                if len(f) != 3:
                    raise ValueError(f"movies.dat: expected id::title::genres; got {line!r}")
                ids.append(int(f[0]))
                years.append(_year_from_title(f[1]))
                bags.append(_split_genres(f[2]))
            item_features = FeatureTable(ids, multi_hot={"genres": _bags(ids, bags)},
                                         numeric={"year": _fill_years(np.array(years))})
    if (directory / "users.dat").is_file():
        with _parsing("users.dat"):
            rows = [line.split("::") for line in _read(directory / "users.dat", "latin-1").splitlines()
                    if line.strip()]
            if any(len(r) < 4 for r in rows):
                raise ValueError("users.dat: expected id::gender::age::occupation::zip per line")
            # reorder to the id, age, gender, occupation of u.user
            user_features = _user_table([[r[0], r[2], r[1], r[3]] for r in rows], "users.dat")
    with _parsing("ratings.dat"):
        return Interactions(users, items, ratings, ts, user_features, item_features)


def _split_genres(field: str):
    field = field.strip()
    return [] if field in ("", "(no genres listed)") else field.split("|")


def _load_latest(directory: Path) -> Interactions:
    users, items, ratings, ts = _numeric_ratings(_read(directory / "ratings.csv", "utf-8"), ",",
                                                 "ratings.csv", True)
    item_features = None
    if (directory / "movies.csv").is_file():
        with _parsing("movies.csv"):
            reader = csv.reader(io.StringIO(_read(directory / "movies.csv", "utf-8")))
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:3]] != ["movieId", "title", "genres"]:
                raise ValueError(f"movies.csv: expected the header movieId,title,genres; got {header}")
            ids, years, bags = [], [], []
            for row in reader:
                if not row:
                    continue
                ids.append(int(row[0]))
                years.append(_year_from_title(row[1]))
                bags.append(_split_genres(row[2]))
            item_features = FeatureTable(ids, multi_hot={"genres": _bags(ids, bags)},
                                         numeric={"year": _fill_years(np.array(years))})
    with _parsing("ratings.csv"):
        return Interactions(users, items, ratings, ts, None, item_features)


def _read_atomic(path: Path):
    """RecBole atomic file -> dict field name -> list of str (the ':type' suffix dropped)."""
    lines = _read(path, "utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path.name} is empty")
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    columns = {h: [] for h in header}
    for line in lines[1:]:
        if not line:
            continue
        f = line.split("\t")
        if len(f) != len(header):
            raise ValueError(f"{path.name}: expected {len(header)} tab-separated fields; got {line!r}")
        for h, v in zip(header, f):
            columns[h].append(v)
    return columns


def _token_ids(values, label):
    a = np.array(values, dtype=str)
    if a.size and np.char.isdigit(a).all():
        return a.astype(np.int64)
    return as_id_array(a, label)


def _load_recbole(directory: Path, name: str) -> Interactions:
    with _parsing(f"{name}.inter"):
        inter = _read_atomic(directory / f"{name}.inter")
        for required in ("user_id", "item_id"):
            if required not in inter:
                raise ValueError(f"{name}.inter has no {required} column; columns: {list(inter)}")
        if not inter["user_id"]:
            raise ValueError(f"{name}.inter holds no interactions")  # as the other formats
        users = _token_ids(inter["user_id"], "user_id")
        items = _token_ids(inter["item_id"], "item_id")
        ratings = _numbers(inter["rating"], "ratings", integer=False).astype(np.float32) if "rating" in inter else None
        ts = _numbers(inter["timestamp"], "timestamps", integer=True).astype(np.int64) if "timestamp" in inter else None
    item_features = user_features = None
    if (directory / f"{name}.item").is_file():
        with _parsing(f"{name}.item"):
            cols = _read_atomic(directory / f"{name}.item")
            ids = _token_ids(cols["item_id"], "item_id")
            multi_hot, numeric = {}, {}
            genre_col = next((c for c in ("genre", "genres", "class") if c in cols), None)
            if genre_col is not None:
                multi_hot["genres"] = _bags(ids, [v.split() for v in cols[genre_col]])
            if "release_year" in cols:
                years = np.array([float(v) if v.strip().isdigit() else np.nan for v in cols["release_year"]])
                numeric["year"] = _fill_years(years)
            item_features = FeatureTable(ids, multi_hot=multi_hot, numeric=numeric)
    if (directory / f"{name}.user").is_file():
        with _parsing(f"{name}.user"):
            cols = _read_atomic(directory / f"{name}.user")
            ids = _token_ids(cols["user_id"], "user_id")
            categorical = {c: _token_ids(cols[c], c) for c in ("gender", "occupation") if c in cols}
            numeric = {"age": _numbers(cols["age"], "age", integer=False)} if "age" in cols else {}
            user_features = FeatureTable(ids, categorical=categorical, numeric=numeric)
    with _parsing(f"{name}.inter"):
        return Interactions(users, items, ratings, ts, user_features, item_features)
