"""`est.save(path)` / `fastrec.load(path)`: one versioned file per model, safe to load, atomic to write.

The file is a ZIP archive (uncompressed members) that `numpy.load` also reads as an .npz:
- ``fastrec.json``: metadata ``{"format": "fastrec-model", "format_version", "fastrec_version", "class",
  "params", "state"}``. ``state`` is the estimator's attributes (fitted arrays, id mappings, optimizer
  state) as a JSON tree in which arrays are ``{"__array__": n}`` references;
- ``arrays/<n>.npy``: array ``n`` in NumPy's .npy format, its data aligned to 64 bytes in the file so that
  ``load(path, mmap=True)`` maps it straight from the file.

Loading executes nothing from the file: no pickle (``.npy`` members are read with ``allow_pickle=False``),
and the only objects it builds are of the fastrec classes in ``_classes()``, by setting their attributes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import struct
import zipfile
import zlib

import numpy as np
import scipy.sparse as sp

FORMAT = "fastrec-model"
FORMAT_VERSION = 1
_META = "fastrec.json"
_ALIGN = 64
_PAD_ID = 0xFA57  # a private ZIP "extra field" id: padding that aligns the member's data
# The metadata holds the attribute tree, hyper-parameters and the items of object arrays; the arrays (ids
# included) are members of their own. Measured: 6 KB for a Recommender with 10^5 string user and item ids,
# 11 KB with side features and histories, 15 KB for an MLPClassifier with 1000 object class labels (~13 bytes
# a label). 16 MiB is over 1000 times that (a million object labels) and bounds what a crafted file can make
# load allocate (json.loads of 16 MiB builds at most a few hundred MB of Python objects). save refuses to
# write more, so every file it writes loads.
_META_LIMIT = 16 << 20


class ModelFileError(ValueError):
    """A model file that cannot be loaded: not a fastrec model, corrupt, truncated, or from a newer fastrec."""


def _classes() -> dict:
    """The classes a model file may name: those registered with `fastrec._registry.persistable`."""
    from fastrec._registry import classes

    return classes()


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
    """Write `estimator` to `path` atomically: a temporary file `.<name>.<pid>.<random>.tmp` in the same
    directory, fsync, rename onto `path`.

    A crash or kill during the write leaves a previous file at `path` untouched (and a process that has it
    mapped keeps it), and leaves the temporary behind: the next save to `path` removes it.
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
    if len(text) > _META_LIMIT:
        raise ValueError(f"cannot save this {type(estimator).__name__}: its metadata ({_META}) would be {len(text)} "
                         f"bytes, more than the {_META_LIMIT} that load accepts; the items of object arrays are "
                         "stored there: convert them to str or numeric arrays")

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save to {path!r}: directory {directory!r} does not exist")
    base = os.path.basename(path)
    _remove_stale_temporaries(directory, base)  # first: a killed save may have left gigabytes
    fd, tmp = _create_temporary(directory, base)
    try:
        try:  # a replaced file keeps its mode (a new one has the mode a plain open() gives)
            os.fchmod(fd, os.stat(path).st_mode & 0o777)
        except FileNotFoundError:
            pass
        with os.fdopen(fd, "wb") as f:
            try:  # held until the rename: tells _remove_stale_temporaries of other PID namespaces to keep out
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:  # a file system without locks: the PID in the name still protects the file
                pass
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                z.writestr(_META, text)
                for n, a in enumerate(encode.arrays):
                    _write_array(z, f, f"arrays/{n}.npy", a)
            f.flush()
            os.fsync(f.fileno())
            # The publish: one rename, so that `path` always names either the previous file or this complete
            # one, and a process that maps the previous file keeps its inode (never write `path` in place).
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


def _create_temporary(directory: str, base: str) -> tuple[int, str]:
    # `.<target name>.<our PID>.<8 hex digits>.tmp`: the PID is what lets a later save tell a file left by a
    # killed saver from one still being written (_remove_stale_temporaries matches exactly this form).
    while True:
        tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:  # mode 0o666 less the umask, as a plain open() gives
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:  # another save drew the same 32 random bits
            continue


def _remove_stale_temporaries(directory: str, base: str) -> None:
    """Remove the temporaries of saves to `base` whose process no longer runs (killed mid-save).

    Only names of exactly our form for this target are considered. A file is kept if its PID runs (a live
    concurrent save: another thread of this process included; a PID reused since is kept too, harmlessly),
    or if its writer holds its lock (a saver in another PID namespace sharing the directory, whose PID means
    nothing here). Errors are ignored: cleaning up is best effort and must not fail the save.
    """
    pattern = re.compile(rf"\.{re.escape(base)}\.([0-9]+)\.[0-9a-f]{{8}}\.tmp")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _pid_runs(int(match.group(1))):
            continue
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(os.path.join(directory, name))
        except OSError:  # locked by a live writer, no lock support, or removed by a concurrent cleaner
            pass
        finally:
            os.close(fd)


def _pid_runs(pid: int) -> bool:
    if pid <= 0:  # never written by save (and os.kill would signal a process group)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: it runs, as another user; otherwise cannot tell: keep the file
        return True
    return True


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
def load(path, *, mmap: bool = False, verify: bool = False):
    """Read a model written by `save`; a file that is not one, or is damaged, raises ModelFileError.

    mmap=True maps the arrays from the file instead of reading them: the model opens in milliseconds whatever
    its size, and processes that load the same file share one copy of it in memory (pages are copy-on-write:
    training the loaded model never changes the file). The contract that comes with it: replace a mapped
    file by renaming a new file onto its path, as `save` does (the loaded model keeps the old file, which
    the system frees when the last mapping goes), never by overwriting it in place (`cp`, `open(path, "wb")`):
    a mapped file changed in place changes the loaded model's values (silently), and one truncated in place
    kills the process that reads it with SIGBUS. Both are how mmap works, not something a load can prevent.

    verify: check every array's CRC-32 at load. Without mmap the arrays are read, and their CRC-32s checked,
    always; with mmap=True the default (False) checks only headers and sizes, so a damaged byte in an
    array's data goes unnoticed, and verify=True reads the whole file once to check it (as long as a load
    without mmap takes, but the arrays stay mapped and shared).
    """
    for name, flag in (("mmap", mmap), ("verify", verify)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, not {flag!r}")
    path = os.fspath(path)
    # One open file for the directory, the headers and the mappings: a save that replaces the file while
    # this load runs cannot mix two models.
    with open(path, "rb") as f:
        try:
            z = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, EOFError, ValueError) as e:
            raise ModelFileError(f"{path!r} is not a fastrec model file, or it is truncated or corrupt ({e})") from e
        with z:
            return _load(z, f, path, mmap, verify)


def _read_meta(z: zipfile.ZipFile, path: str) -> bytes:
    try:
        info = z.getinfo(_META)
    except KeyError:
        raise ModelFileError(f"{path!r} is a ZIP archive but not a fastrec model file (no {_META})") from None
    if info.file_size > _META_LIMIT:
        raise ModelFileError(f"{path!r}: the model metadata ({_META}) is {info.file_size} bytes, over the limit "
                             f"of {_META_LIMIT}: the file is corrupt or crafted")
    with z.open(info) as member:
        # A sized read: read() without a size (z.read) inflates all the compressed data it is given before
        # cutting it to the declared size, so a header that lies costs the whole bomb (148 MB for 64 MB of
        # whitespace declared as 1000 bytes); read(n) inflates at most about n.
        text = member.read(info.file_size + 1)
    if len(text) > info.file_size:
        raise ModelFileError(f"{path!r}: the model metadata ({_META}) holds more than the {info.file_size} bytes "
                             "its header declares: the file is corrupt or crafted")
    return text


def _load(z: zipfile.ZipFile, f, path: str, mmap: bool, verify: bool):
    try:
        meta = json.loads(_read_meta(z, path))
    except ModelFileError:
        raise
    # RuntimeError: also zipfile's for an encrypted member or an unknown compression method (NotImplementedError)
    except (zipfile.BadZipFile, ValueError, EOFError, RuntimeError) as e:
        raise ModelFileError(f"{path!r}: the model metadata is corrupt ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path!r} is not a fastrec model file")
    version = meta.get("format_version")
    if type(version) is not int or version < 1:  # bool is an int subclass: True is not a version either
        raise ModelFileError(f"{path!r}: the model metadata is invalid: format_version is {version!r}, not a "
                             "positive integer (the file is corrupt)")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path!r} was written by fastrec {meta.get('fastrec_version')} in model format {version}; this "
            f"fastrec reads formats up to {FORMAT_VERSION}: upgrade fastrec to load it")
    try:
        classes = _classes()
        cls = classes[meta["class"]]
        if not hasattr(cls, "get_params"):
            raise ValueError(f"{meta['class']} is not an estimator")
        arrays = [_read_array(z, f, path, n, s, mmap, verify) for n, s in enumerate(meta["arrays"])]
        model = cls.__new__(cls)
        _set_state(model, _decode(meta["state"], arrays, classes))
    except ModelFileError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError, zipfile.BadZipFile,
            EOFError) as e:
        raise ModelFileError(f"{path!r}: the model file is corrupt ({type(e).__name__}: {e})") from e
    return model


def _read_array(z: zipfile.ZipFile, f, path: str, n: int, spec: dict, mmap: bool, verify: bool) -> np.ndarray:
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
    if verify:  # (without mmap, z.read has just checked it)
        _check_crc(f, start, info, path)
    if nbytes == 0:
        return np.zeros(shape, dtype, order=order)
    mapped = np.memmap(f, dtype=dtype, mode="c", offset=offset, shape=shape, order=order)
    return np.asarray(mapped)  # a plain ndarray over the mapping (np.memmap's per-operation overhead is µs)


def _check_crc(f, start: int, info: zipfile.ZipInfo, path: str) -> None:
    """The CRC-32 of a stored member's bytes (.npy header and data) against its ZIP entry, read in chunks (the
    data is in the page cache afterwards, where the mapping will find it)."""
    f.seek(start)
    crc, left = 0, info.file_size
    while left:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            raise ModelFileError(f"{path!r}: member {info.filename} is truncated")
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    if crc != info.CRC:
        raise ModelFileError(f"{path!r}: member {info.filename} is damaged: its CRC-32 is {crc:08x}, the file "
                             f"says {info.CRC:08x}")


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
