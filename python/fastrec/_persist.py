"""`est.save(path)` / `fastrec.load(path)`: one versioned file per model, safe to load, atomic to write.

The file is a ZIP archive (uncompressed members) that `numpy.load` also reads as an .npz:
- ``fastrec.json``: metadata ``{"format": "fastrec-model", "format_version", "fastrec_version", "class",
  "params", "state"}``. ``state`` is the estimator's attributes (fitted arrays, id mappings, optimizer
  state) as a JSON tree in which arrays are ``{"__array__": n}`` references;
- ``arrays/<n>.npy``: array ``n`` in NumPy's .npy format, its data aligned to 64 bytes in the file so that
  ``load(path, mmap=True)`` maps it straight from the file.

Loading executes nothing from the file: no pickle (``.npy`` members are read with ``allow_pickle=False``),
and the only objects it builds are of the fastrec classes in ``_CLASSES``, by setting their attributes.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile

import numpy as np
import scipy.sparse as sp

FORMAT = "fastrec-model"
FORMAT_VERSION = 1
_META = "fastrec.json"
_ALIGN = 64
_PAD_ID = 0xFA57  # a private ZIP "extra field" id: padding that aligns the member's data


class ModelFileError(ValueError):
    """A model file that cannot be loaded: not a fastrec model, corrupt, truncated, or from a newer fastrec."""


def _classes() -> dict:
    """The classes a model file may name (imported here: they import this module)."""
    from fastrec._fieldnet import DenseBlock, Field, FieldNet, IdIndex
    from fastrec.features import FeatureTable
    from fastrec.fields import FieldModel
    from fastrec.mlp import MLPClassifier, MLPRegressor
    from fastrec.recommender import Recommender

    return {f"{c.__module__}.{c.__qualname__}": c for c in (
        MLPClassifier, MLPRegressor, Recommender, FieldModel, FieldNet, Field, DenseBlock, IdIndex, FeatureTable)}


# ------------------------------------------------------------------------------------------- encoding
class _Encoder:
    def __init__(self, classes):
        self.classes = {c: name for name, c in classes.items()}
        self.arrays: list[np.ndarray] = []
        self._memo: dict[int, int] = {}  # id(array) -> n: an array shared by two attributes is stored once

    def __call__(self, value, where: str):
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float)) and type(value) in (int, float):
            return value
        if isinstance(value, np.generic):
            return {"__scalar__": value.dtype.str, "value": value.item()}
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            # Object arrays (class labels from pandas, say) would need pickle: their items go in the JSON.
            items = value.ravel().tolist()
            if not all(type(v) in (str, int, float, bool) or v is None for v in items):
                raise TypeError(f"cannot save {where}: an object array of other than str, int, float, bool")
            return {"__object_array__": items, "shape": list(value.shape)}
        if isinstance(value, np.ndarray):
            return {"__array__": self._array(value)}
        if isinstance(value, list):
            return [self(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"__tuple__": [self(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            for k in value:
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"cannot save {where}: dict key {k!r} is not a str or int")
            return {"__dict__": [[k, self(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        if sp.issparse(value):
            m = value.tocsr()
            return {"__csr__": [self(m.data, where), self(m.indices, where), self(m.indptr, where)],
                    "shape": list(m.shape)}
        if isinstance(value, np.random.RandomState):
            kind, keys, pos, has_gauss, gauss = value.get_state()
            return {"__random_state__": [kind, self(keys, where), pos, has_gauss, gauss]}
        cls = type(value)
        if cls in self.classes:
            state = value.__getstate__() if hasattr(value, "__getstate__") else vars(value)
            if not isinstance(state, dict):
                state = vars(value)
            return {"__object__": self.classes[cls], "state": self(state, where)}
        raise TypeError(f"cannot save {where}: values of type {cls.__name__} are not supported in model files")

    def _array(self, a: np.ndarray) -> int:
        if id(a) in self._memo:
            return self._memo[id(a)]
        self._memo[id(a)] = len(self.arrays)
        self.arrays.append(a)
        return self._memo[id(a)]


def _plain(value):
    """Hyper-parameters for the metadata's readable "params" entry (repr where JSON has no type)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)


# ------------------------------------------------------------------------------------------- save
def save(estimator, path) -> None:
    """Write `estimator` to `path` atomically: a temporary file in the same directory, fsync, rename.

    A crash or kill during the write leaves a previous file at `path` untouched.
    """
    from fastrec import __version__

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory; give a file name such as 'model.fastrec'")
    classes = _classes()
    encode = _Encoder(classes)
    if type(estimator) not in encode.classes:
        raise TypeError(f"cannot save a {type(estimator).__name__}: only fastrec estimators")
    state = estimator.__getstate__() if hasattr(estimator, "__getstate__") else dict(vars(estimator))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastrec_version": __version__,
        "class": encode.classes[type(estimator)],
        "params": {k: _plain(v) for k, v in estimator.get_params(deep=False).items()},
        "state": encode(dict(state), "model"),
    }
    meta["arrays"] = [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in encode.arrays]
    text = json.dumps(meta, allow_nan=True).encode()

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save to {path!r}: directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600): give it the mode a plain open() would (or the replaced file's).
        os.fchmod(fd, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                z.writestr(_META, text)
                for n, a in enumerate(encode.arrays):
                    _write_array(z, f, f"arrays/{n}.npy", a)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _write_array(z: zipfile.ZipFile, f, name: str, a: np.ndarray) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    # The local header is 30 bytes + name + extra fields (ours, then the 20-byte ZIP64 one that
    # force_zip64 adds); the .npy header is itself padded to a multiple of 64, so aligning the member's
    # start aligns the array data.
    header = 30 + len(name.encode()) + 4 + 20
    pad = -(f.tell() + header) % _ALIGN
    info.extra = struct.pack("<HH", _PAD_ID, pad) + b"\0" * pad
    with z.open(info, "w", force_zip64=True) as member:
        np.lib.format.write_array(member, a if a.flags.c_contiguous else np.array(a, order="C"), allow_pickle=False)


# ------------------------------------------------------------------------------------------- load
def load(path, *, mmap: bool = False):
    """Read a model written by `save`. mmap=True maps the arrays from the file instead of reading them:
    the model opens in milliseconds whatever its size, and processes that load the same file share one copy
    of it in memory (pages are copy-on-write: training the loaded model never changes the file).
    """
    path = os.fspath(path)
    # One open file for the directory, the headers and the mappings: a save that replaces the file while
    # this load runs cannot mix two models.
    with open(path, "rb") as f:
        try:
            z = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, EOFError, ValueError) as e:
            raise ModelFileError(f"{path!r} is not a fastrec model file, or it is truncated or corrupt ({e})") from e
        with z:
            return _load(z, f, path, mmap)


def _load(z: zipfile.ZipFile, f, path: str, mmap: bool):
    try:
        meta = json.loads(z.read(_META))
    except KeyError:
        raise ModelFileError(f"{path!r} is a ZIP archive but not a fastrec model file (no {_META})") from None
    except (zipfile.BadZipFile, ValueError, EOFError, RecursionError) as e:
        raise ModelFileError(f"{path!r}: the model metadata is corrupt ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path!r} is not a fastrec model file")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path!r} was written by fastrec {meta.get('fastrec_version')} in model format {version}; this "
            f"fastrec reads formats up to {FORMAT_VERSION}: upgrade fastrec to load it")
    try:
        classes = _classes()
        cls = classes[meta["class"]]
        if not hasattr(cls, "get_params"):
            raise ValueError(f"{meta['class']} is not an estimator")
        arrays = [_read_array(z, f, path, n, s, mmap) for n, s in enumerate(meta["arrays"])]
        model = cls.__new__(cls)
        _set_state(model, _decode(meta["state"], arrays, classes))
    except ModelFileError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError, zipfile.BadZipFile,
            EOFError) as e:
        raise ModelFileError(f"{path!r}: the model file is corrupt ({type(e).__name__}: {e})") from e
    return model


def _read_array(z: zipfile.ZipFile, f, path: str, n: int, spec: dict, mmap: bool) -> np.ndarray:
    name = f"arrays/{n}.npy"
    info = z.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:  # save never compresses: refuse (and any deflate bomb)
        raise ModelFileError(f"{path!r}: member {name} is compressed; fastrec model files never are")
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ModelFileError(f"{path!r}: member {name} has a corrupt header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    f.seek(start)
    major, _ = np.lib.format.read_magic(f)
    shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if major == 1
                             else np.lib.format.read_array_header_2_0)(f)
    offset = f.tell()
    if dtype.hasobject:
        raise ModelFileError(f"{path!r}: member {name} holds Python objects")
    # The header's shape must account for the member's size exactly (before anything is allocated from it).
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset - start + nbytes != info.file_size:
        raise ModelFileError(f"{path!r}: member {name} is truncated or its header is corrupt")
    if str(dtype.str) != spec["dtype"] or list(shape) != spec["shape"]:
        raise ModelFileError(f"{path!r}: member {name} is {dtype.str} {shape}, the metadata says "
                             f"{spec['dtype']} {tuple(spec['shape'])}")
    order = "F" if fortran else "C"
    if not mmap:
        data = z.read(name)  # checks the member's CRC-32
        return np.frombuffer(data, dtype, offset=offset - start, count=int(np.prod(shape, dtype=np.int64))).reshape(
            shape, order=order).copy(order=order)
    if nbytes == 0:
        return np.zeros(shape, dtype, order=order)
    mapped = np.memmap(f, dtype=dtype, mode="c", offset=offset, shape=shape, order=order)
    return np.asarray(mapped)  # a plain ndarray over the mapping (np.memmap's per-operation overhead is µs)


def _decode(value, arrays, classes):
    if isinstance(value, list):
        return [_decode(v, arrays, classes) for v in value]
    if not isinstance(value, dict):
        return value
    if "__array__" in value:
        return arrays[value["__array__"]]
    if "__object_array__" in value:
        out = np.empty(len(value["__object_array__"]), dtype=object)
        out[:] = value["__object_array__"]
        return out.reshape(value["shape"])
    if "__tuple__" in value:
        return tuple(_decode(v, arrays, classes) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v, arrays, classes) for k, v in value["__dict__"]}
    if "__scalar__" in value:
        return np.dtype(value["__scalar__"]).type(value["value"])
    if "__csr__" in value:
        data, indices, indptr = (_decode(v, arrays, classes) for v in value["__csr__"])
        return sp.csr_matrix((data, indices, indptr), shape=tuple(value["shape"]))
    if "__random_state__" in value:
        kind, keys, pos, has_gauss, gauss = value["__random_state__"]
        rs = np.random.RandomState()
        rs.set_state((kind, np.array(_decode(keys, arrays, classes)), pos, has_gauss, gauss))
        return rs
    if "__object__" in value:
        cls = classes[value["__object__"]]  # KeyError for any class outside the allow-list
        obj = cls.__new__(cls)
        _set_state(obj, _decode(value["state"], arrays, classes))
        return obj
    raise ValueError(f"unknown entry {sorted(value)[:3]}")


def _set_state(obj, state) -> None:
    if not isinstance(state, dict):
        raise TypeError("object state is not a mapping")
    if getattr(type(obj), "__setstate__", None) is not None:
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)
