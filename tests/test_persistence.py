"""Model files (issue 4): `est.save(path)` / `fastrec.load(path, mmap=...)` and pickling.

What is checked: every estimator round-trips bitwise (every array attribute, and predictions), with and
without mmap; pickle too; a save killed mid-write (SIGKILL) leaves the previous file loadable, and the next
save removes the temporary it left (only those of dead savers); the publish is atomic (a process killed at the
first instant the target changes leaves the complete new model); a model mapped with mmap=True keeps its
values when its file is replaced by a save; truncated, corrupt, foreign, future-version and invalid-metadata
files raise `fastrec.ModelFileError`, a flipped data byte with mmap=True too when verify=True; the metadata's
size is bounded at load; loading builds no object outside fastrec's allow-list; an mmap-loaded model shares
the file's pages (the loading process's memory grows by far less than the model); training resumed after
save -> load equals training never interrupted.
"""

import fcntl
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile

import numpy as np
import pytest

import fastrec
from fastrec.datasets import make_interactions


def _state_arrays(obj, prefix="", out=None):
    """Every array reachable from an estimator's attributes, by path (to compare two models bitwise)."""
    out = {} if out is None else out
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _state_arrays(v, f"{prefix}[{i}]", out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _state_arrays(v, f"{prefix}[{k!r}]", out)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("fastrec"):
        for k, v in vars(obj).items():
            if k != "_predictor":
                _state_arrays(v, f"{prefix}.{k}", out)
    return out


def _is_mapped(a):
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return False


def _assert_same_model(a, b):
    arrays_a, arrays_b = _state_arrays(a), _state_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        x, y = arrays_a[key], arrays_b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key  # bitwise, NaN payloads included
    assert a.get_params() == b.get_params()


@pytest.fixture(scope="module")
def data():
    return make_interactions(n_users=200, n_items=150, n_interactions=3000, random_state=0)


def _fitted_models(data):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 6)).astype(np.float32)
    labels = np.array(["no", "yes"])[(X[:, 0] > 0).astype(int)]
    ctr = {"site": rng.integers(0, 9, 300), "x": X[:, :3]}
    return {
        "Recommender": (fastrec.Recommender(epochs=2, wide=True, random_state=0, n_threads=1).fit(
            data.users, data.items, data.ratings, item_features=data.item_features,
            user_features=data.user_features), lambda m: m.predict(data.users[:40], data.items[:40])),
        "Recommender-history": (fastrec.Recommender(epochs=1, user_history=True, item_history=True, random_state=0,
                                                    n_threads=1).fit(data.users, data.items, data.ratings),
                                lambda m: m.predict(data.users[:40], data.items[:40])),
        "Recommender-implicit": (fastrec.Recommender(epochs=1, random_state=0, n_threads=1).fit(
            data.users.astype(str), data.items.astype(str)), lambda m: m.recommend(["1", "2", "x"], k=5)[1]),
        "MLPClassifier": (fastrec.MLPClassifier((8,), max_iter=3, random_state=0).fit(X, labels),
                          lambda m: m.predict_proba(X)),
        "MLPRegressor": (fastrec.MLPRegressor((8,), solver="sgd", max_iter=3, random_state=0).fit(X, X[:, 1]),
                         lambda m: m.predict(X)),
        "FieldModel": (fastrec.FieldModel(epochs=1, random_state=0, n_threads=1).fit(ctr, X[:, 0] > 0),
                       lambda m: m.predict_proba(ctr)),
    }


@pytest.fixture(scope="module")
def models(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of the 3-epoch MLPs
        return _fitted_models(data)


@pytest.mark.parametrize("name", ["Recommender", "Recommender-history", "Recommender-implicit", "MLPClassifier",
                                  "MLPRegressor", "FieldModel"])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(models, name, mmap, tmp_path):
    model, predict = models[name]
    path = tmp_path / "model.fastrec"
    model.save(path)
    loaded = fastrec.load(path, mmap=mmap)
    assert type(loaded) is type(model)
    _assert_same_model(model, loaded)
    np.testing.assert_array_equal(predict(loaded), predict(model))
    if mmap:
        mapped = [a for a in _state_arrays(loaded).values() if _is_mapped(a)]
        assert sum(a.nbytes for a in mapped) > 0.9 * sum(a.nbytes for a in _state_arrays(model).values())
        # Data aligned in the file, so the core reads the mapped arrays in place.
        assert all(a.ctypes.data % 64 == 0 for a in mapped)


@pytest.mark.parametrize("name", ["Recommender", "Recommender-history", "MLPClassifier", "FieldModel"])
def test_pickle_round_trip(models, name):
    model, predict = models[name]
    loaded = pickle.loads(pickle.dumps(model))
    _assert_same_model(model, loaded)
    np.testing.assert_array_equal(predict(loaded), predict(model))


def test_file_is_a_documented_npz(models, tmp_path):
    model, _ = models["MLPRegressor"]
    path = tmp_path / "m.fastrec"
    model.save(path)
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read("fastrec.json"))
    assert meta["format"] == "fastrec-model" and meta["format_version"] == 1
    assert meta["fastrec_version"] == fastrec.__version__
    assert meta["class"] == "fastrec.mlp.MLPRegressor"
    assert meta["params"]["hidden_layer_sizes"] == [8] and meta["params"]["solver"] == "sgd"
    with np.load(path, allow_pickle=False) as npz:  # plain NumPy reads the arrays
        shapes = sorted(npz[k].shape for k in npz.files if k.startswith("arrays/"))
    assert sorted(tuple(s["shape"]) for s in meta["arrays"]) == shapes


def test_resume_after_save_equals_uninterrupted(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 5)).astype(np.float32)
    y = X @ rng.standard_normal(5)
    a = fastrec.MLPRegressor((16,), random_state=0, n_threads=1)
    b = fastrec.MLPRegressor((16,), random_state=0, n_threads=1)
    for _ in range(2):
        a.partial_fit(X, y)
        b.partial_fit(X, y)
    b.save(tmp_path / "b.fastrec")
    b = fastrec.load(tmp_path / "b.fastrec", mmap=True)
    for _ in range(2):
        a.partial_fit(X, y)
        b.partial_fit(X, y)
    _assert_same_model(a, b)


def test_save_replaces_atomically_and_leaves_no_temporary(models, tmp_path):
    path = tmp_path / "m.fastrec"
    models["MLPRegressor"][0].save(path)
    models["FieldModel"][0].save(path)
    assert type(fastrec.load(path)) is fastrec.FieldModel
    assert os.listdir(tmp_path) == ["m.fastrec"]


def test_save_killed_mid_write_keeps_previous_file(models, tmp_path):
    model, predict = models["MLPRegressor"]
    path = tmp_path / "m.fastrec"
    model.save(path)
    # A child overwrites the file with a large model (~400 MB) and is killed while it writes.
    child = textwrap.dedent(f"""
        import numpy as np, fastrec
        m = fastrec.MLPRegressor((8,), max_iter=1).fit(np.zeros((4, 2)), np.zeros(4))
        m.coefs_[0] = np.ones((100_000_000, 1), np.float32)
        m.save({str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 60
        while not any(f.endswith(".tmp") and os.path.getsize(tmp_path / f) > 1 << 20 for f in os.listdir(tmp_path)):
            assert proc.poll() is None, "the child finished before it could be killed"
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    loaded = fastrec.load(path)
    np.testing.assert_array_equal(predict(loaded), predict(model))
    # The killed save's temporary is left, named with its PID; the next save removes it (the PID is dead).
    left = [f for f in os.listdir(tmp_path) if f != "m.fastrec"]
    assert len(left) == 1 and re.fullmatch(rf"\.m\.fastrec\.{proc.pid}\.[0-9a-f]{{8}}\.tmp", left[0]), left
    model.save(path)
    assert os.listdir(tmp_path) == ["m.fastrec"]


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = b""
    elif how == "garbage":
        data = bytearray(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif how == "flipped array byte":
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("arrays/0.npy")
        data[info.header_offset + 200] ^= 0xFF  # inside the array data: the CRC-32 no longer matches
    elif how == "flipped metadata byte":  # a key of the readable "params": the JSON stays valid, only the CRC-32 tells
        at = data.index(b'"solver"')
        data[at + 1] ^= 0x20
    else:  # in fastrec.json's local header and central directory entry
        central = data.index(b"PK\x01\x02")  # fastrec.json is the first member
        if how == "metadata compression method unknown":
            data[8:10] = data[central + 10: central + 12] = (99).to_bytes(2, "little")
        elif how == "metadata encrypted":
            data[6] |= 1
            data[central + 8] |= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "flipped array byte", "flipped metadata byte",
                                 "metadata compression method unknown", "metadata encrypted"])
def test_damaged_file_raises_model_file_error(models, how, tmp_path):
    path = tmp_path / "m.fastrec"
    models["MLPRegressor"][0].save(path)
    _corrupt(path, how)
    with pytest.raises(fastrec.ModelFileError, match="m.fastrec"):
        fastrec.load(path)
    with pytest.raises(fastrec.ModelFileError, match="m.fastrec"):
        fastrec.load(path, mmap=True, verify=True)
    if how != "flipped array byte":  # without verify, mmap does not read the data, so it cannot check its CRC
        with pytest.raises(fastrec.ModelFileError, match="m.fastrec"):
            fastrec.load(path, mmap=True)


def _member_data(path, name):
    """(offset, size) in the file of a stored ZIP member's bytes, from its local header."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_verify_catches_a_flipped_data_byte_with_mmap(models, tmp_path):
    model, predict = models["Recommender"]
    path = tmp_path / "m.fastrec"
    model.save(path)
    intact = fastrec.load(path, mmap=True, verify=True)  # an intact file loads, its arrays still mapped
    np.testing.assert_array_equal(predict(intact), predict(model))
    assert all(_is_mapped(a) for a in _state_arrays(intact).values() if a.nbytes > 4096)
    del intact
    with zipfile.ZipFile(path) as z:
        largest = max((i for i in z.infolist() if i.filename.startswith("arrays/")), key=lambda i: i.file_size)
    offset, size = _member_data(path, largest.filename)
    with open(path, "r+b") as f:  # the last byte of the array's data: headers and sizes stay valid
        f.seek(offset + size - 1)
        byte = f.read(1)
        f.seek(offset + size - 1)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(fastrec.ModelFileError, match=re.escape(largest.filename) + ".*CRC-32"):
        fastrec.load(path, mmap=True, verify=True)
    with pytest.raises(fastrec.ModelFileError, match=re.escape(largest.filename)):
        fastrec.load(path)
    with pytest.raises(TypeError, match="verify"):
        fastrec.load(path, mmap=True, verify="yes")


def _rewrite_meta(path, edit):
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    meta = json.loads(members["fastrec.json"])
    edit(meta)
    members["fastrec.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


def test_future_version_and_foreign_files(models, tmp_path):
    path = tmp_path / "m.fastrec"
    models["MLPRegressor"][0].save(path)
    _rewrite_meta(path, lambda m: m.update(format_version=99, fastrec_version="9.0"))
    with pytest.raises(fastrec.ModelFileError, match="upgrade fastrec"):
        fastrec.load(path)
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(fastrec.ModelFileError, match="not a fastrec model"):
        fastrec.load(tmp_path / "plain.npz")
    with pytest.raises(FileNotFoundError):
        fastrec.load(tmp_path / "missing.fastrec")
    with pytest.raises(ValueError, match="directory"):
        models["MLPRegressor"][0].save(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models["MLPRegressor"][0].save(tmp_path / "no" / "m.fastrec")


@pytest.mark.parametrize("version", ["2", True, 1.0, None, 0, -3, [1]])
def test_invalid_format_version_is_reported_as_corrupt(models, tmp_path, version):
    # Only an int above ours means "newer fastrec"; anything else is damaged metadata, not a reason to upgrade.
    path = tmp_path / "m.fastrec"
    models["MLPRegressor"][0].save(path)
    _rewrite_meta(path, lambda m: m.update(format_version=version))
    with pytest.raises(fastrec.ModelFileError, match="metadata is invalid: format_version") as info:
        fastrec.load(path)
    assert "upgrade" not in str(info.value)


def _deflated_whitespace_meta(path, n_bytes, declared=None):
    """Replace the file's fastrec.json by `n_bytes` of deflated whitespace (a few KB per MB on disk), and if
    `declared` is given, patch its ZIP headers to declare that uncompressed size instead (a lying header)."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist() if n != "fastrec.json"}
    info = zipfile.ZipInfo("fastrec.json")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w") as z:
        with z.open(info, "w") as m:  # streamed: the test itself stays small
            for _ in range(n_bytes >> 20):
                m.write(b" " * (1 << 20))
        for n, b in members.items():
            z.writestr(n, b)
    if declared is not None:
        data = bytearray(path.read_bytes())
        local, central = 0, data.index(b"PK\x01\x02")  # fastrec.json is the first member
        assert data[local + 30: local + 42] == b"fastrec.json" and data[central + 46: central + 58] == b"fastrec.json"
        data[local + 22: local + 26] = declared.to_bytes(4, "little")
        data[central + 24: central + 28] = declared.to_bytes(4, "little")
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("declared", [None, 1000])
def test_metadata_size_is_bounded(models, tmp_path, declared):
    import tracemalloc

    path = tmp_path / "m.fastrec"
    models["MLPRegressor"][0].save(path)
    _deflated_whitespace_meta(path, 64 << 20, declared)
    assert os.path.getsize(path) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(fastrec.ModelFileError, match="metadata"):
            fastrec.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak  # reading the 64 MB would take 64 MB and more


def test_load_builds_only_allowed_classes(models, tmp_path):
    path = tmp_path / "m.fastrec"
    models["MLPRegressor"][0].save(path)
    _rewrite_meta(path, lambda m: m.update({"class": "subprocess.Popen"}))
    with pytest.raises(fastrec.ModelFileError):
        fastrec.load(path)
    models["MLPRegressor"][0].save(path)
    _rewrite_meta(path, lambda m: m["state"]["__dict__"].append(["x", {"__object__": "os.system", "state": {}}]))
    with pytest.raises(fastrec.ModelFileError):
        fastrec.load(path)
    # An object array hidden in an .npy member would need pickle: refused.
    models["MLPRegressor"][0].save(path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([print], dtype=object), allow_pickle=True)
    members["arrays/0.npy"] = buf.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(fastrec.ModelFileError):
        fastrec.load(path)


def test_mmap_load_shares_the_file(tmp_path):
    # A model with ~150 MB of arrays; a fresh process that loads it with mmap=True and predicts must grow by
    # far less than that, and one loading it without mmap by about that (the control). What is measured is
    # the process's private (anonymous) resident memory, RssAnon: pages of the file mapped by several
    # processes are the page cache's single copy, which is the point of mmap.
    n_items, dim = 100_000, 64
    rng = np.random.default_rng(0)
    users = rng.integers(0, 500, n_items)
    rec = fastrec.Recommender(embedding_dim=dim, hidden_layer_sizes=(8,), epochs=1, random_state=0, n_threads=1)
    rec.fit(users, np.arange(n_items))
    path = tmp_path / "big.fastrec"
    rec.save(path)
    size = os.path.getsize(path)
    assert size > 80e6
    probe = textwrap.dedent(f"""
        import sys, fastrec, numpy as np
        def rss():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon"))
        before = rss()
        m = fastrec.load({str(path)!r}, mmap=sys.argv[1] == "1")
        m.predict([1, 2, 3], [4, 5, 6])
        print(rss() - before)
    """)
    growth = {mm: int(subprocess.run([sys.executable, "-c", probe, mm], check=True, capture_output=True,
                                     text=True).stdout) for mm in ("1", "0")}
    assert growth["0"] > 0.8 * size, growth  # the control: a full read costs the model's size
    assert growth["1"] < 0.05 * size, growth


def test_edge_arrays_round_trip(models, tmp_path):
    model = fastrec.MLPRegressor((4,), max_iter=1)
    model.extra_ = {
        "zero_d": np.array(3.5),
        "empty": np.zeros((0, 3), np.float32),
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "big_endian": np.arange(5, dtype=">i4"),
        "text": np.array(["a", "bé", ""]),
        "nan": np.array([np.nan, np.inf, -np.inf]),
        "scalar": np.float32(2.5),
        "object": np.array(["x", 3], dtype=object),
    }
    path = tmp_path / "edge.fastrec"
    model.save(path)
    for mmap in (False, True):
        extra = fastrec.load(path, mmap=mmap).extra_
        for key, want in model.extra_.items():
            got = extra[key]
            assert np.asarray(got).shape == np.asarray(want).shape, key
            assert np.asarray(got).dtype == np.asarray(want).dtype, key
            np.testing.assert_array_equal(got, want)


def test_saved_file_is_readable_like_any_new_file(models, tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        path = tmp_path / "m.fastrec"
        models["MLPRegressor"][0].save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # mkstemp alone would leave 0600
        os.chmod(path, 0o640)
        models["MLPRegressor"][0].save(path)  # replacing a file keeps its mode
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        os.umask(old)


def test_crafted_members_are_refused(models, tmp_path):
    path = tmp_path / "m.fastrec"
    models["MLPRegressor"][0].save(path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    # A header claiming a huge shape: refused from the sizes, before anything is allocated.
    header_end = members["arrays/0.npy"].index(b"\n") + 1
    huge = members["arrays/0.npy"][:header_end].replace(b"'shape': (", b"'shape': (10000000000, ")
    for name, data, compress in (("arrays/0.npy", huge + members["arrays/0.npy"][header_end:], zipfile.ZIP_STORED),
                                 ("arrays/0.npy", members["arrays/0.npy"], zipfile.ZIP_DEFLATED)):
        with zipfile.ZipFile(path, "w") as z:
            for n, b in members.items():
                z.writestr(n, data if n == name else b, compress_type=compress if n == name else zipfile.ZIP_STORED)
        for mmap in (False, True):
            with pytest.raises(fastrec.ModelFileError):
                fastrec.load(path, mmap=mmap)
    # A file naming a non-estimator class at the top level.
    models["MLPRegressor"][0].save(path)
    _rewrite_meta(path, lambda m: m.update({"class": "fastrec._fieldnet.IdIndex"}))
    with pytest.raises(fastrec.ModelFileError, match="not an estimator"):
        fastrec.load(path)


def test_crafted_seen_index_cannot_crash_recommend(models, tmp_path):
    # The seen-items index is read by the core with raw offsets: a file with a bad one gets a ValueError.
    model, _ = models["Recommender-implicit"]
    path = tmp_path / "m.fastrec"
    model.save(path)
    loaded = fastrec.load(path)
    indptr = loaded._seen[0].copy()
    indptr[3] = 1 << 40
    loaded._seen = (indptr, loaded._seen[1])
    with pytest.raises(ValueError, match="seen"):
        loaded.recommend(["1"], k=3)


def test_history_stays_one_list_after_load(models, tmp_path):
    model, _ = models["Recommender"]
    path = tmp_path / "m.fastrec"
    model.save(path)
    loaded = fastrec.load(path)
    assert loaded.loss_curve_ is loaded.history_["loss"]


def test_save_refuses_metadata_that_load_would_refuse(tmp_path):
    # The items of object arrays go into fastrec.json: 17 MB of them is over the bound load applies.
    model = fastrec.MLPRegressor((4,), max_iter=1)
    model.extra_ = np.array(["x" * 1000] * 17_000, dtype=object)
    with pytest.raises(ValueError, match="metadata"):
        model.save(tmp_path / "m.fastrec")
    assert os.listdir(tmp_path) == []


def _dead_pid():
    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                         text=True).stdout
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return int(pid)
    pytest.skip(f"PID {pid} was reused at once")


def test_save_removes_stale_temporaries_of_dead_savers_only(models, tmp_path):
    dead = _dead_pid()
    # A live process standing for a concurrent saver (its PID is what a save checks), and one that holds the
    # lock of a file named with a dead PID: a saver in another PID namespace sharing the directory.
    stale = tmp_path / f".m.fastrec.{dead}.0123abcd.tmp"
    locked = tmp_path / f".m.fastrec.{dead}.89abcdef.tmp"
    holder_code = textwrap.dedent("""
        import fcntl, sys
        f = open(sys.argv[1], "ab")
        fcntl.flock(f, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.read()
    """)
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(locked)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        live = tmp_path / f".m.fastrec.{holder.pid}.0123abcd.tmp"
        kept = [
            live,
            locked,
            tmp_path / ".m.fastrec.k3j_x9a2.tmp",                 # the naming of fastrec <= 0.x (no PID): not ours
            tmp_path / f".other.fastrec.{dead}.0123abcd.tmp",     # another target's
            tmp_path / f".m.fastrec.{dead}.0123abcd.tmp.keep",    # not exactly our form
            tmp_path / f"m.fastrec.{dead}.0123abcd.tmp",
            tmp_path / f".m.fastrec.{dead}.0123ABCD.tmp",
        ]
        for p in [stale, *kept]:
            p.write_bytes(b"partial")
        models["MLPRegressor"][0].save(tmp_path / "m.fastrec")
        assert not stale.exists()
        assert [p.name for p in kept if not p.exists()] == []
        holder.stdin.close()  # the holder exits, releasing its lock: the file is now stale
        holder.wait(timeout=30)
        models["MLPRegressor"][0].save(tmp_path / "m.fastrec")
        assert not locked.exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_mmap_model_keeps_its_values_when_a_save_replaces_its_file(data, models, tmp_path):
    # The documented contract: files are replaced by rename (save does it), so a model mapped from the old
    # file keeps reading the old inode. Run in a child, where a save that wrote the file in place and
    # truncated it (SIGBUS) fails this test instead of killing pytest.
    old, predict = models["Recommender"]
    new = fastrec.Recommender(epochs=2, wide=True, random_state=1, n_threads=1).fit(
        data.users, data.items, data.ratings, item_features=data.item_features, user_features=data.user_features)
    assert not np.array_equal(predict(new), predict(old))  # so that a changed file would show
    path, new_path = tmp_path / "m.fastrec", tmp_path / "new.fastrec"
    old.save(path)
    new.save(new_path)
    np.save(tmp_path / "query.npy", np.stack([data.users[:40], data.items[:40]]))
    child = textwrap.dedent("""
        import sys, numpy as np, fastrec
        path, new_path, query, out = sys.argv[1:]
        users, items = np.load(query)
        mapped = fastrec.load(path, mmap=True)
        before = mapped.predict(users, items)
        fastrec.load(new_path).save(path)
        after = mapped.predict(users, items)
        np.save(out, np.stack([before, after, fastrec.load(path).predict(users, items)]))
    """)
    subprocess.run([sys.executable, "-c", child, str(path), str(new_path), str(tmp_path / "query.npy"),
                    str(tmp_path / "out.npy")], check=True)
    before, after, replaced = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(before, predict(old))
    np.testing.assert_array_equal(after, predict(old))
    np.testing.assert_array_equal(replaced, predict(new))


_PUBLISH_FAULT = textwrap.dedent("""
    # Save the model of `source` to `path` and die (os._exit) at the injected fault:
    # "before": at the first audit event that names `path` other than a read-only open (an open for writing,
    #   a rename or replace onto it ("os.rename"), "os.remove", "shutil.copyfile", "os.truncate" ...);
    # "changed": at the first audit or profile event (every call and return of a Python or C function) at
    #   which `path` is no longer the file it was: right after the publish when the publish is one rename,
    #   at an incomplete file for any publish in several steps (truncate, copy, remove then rename ...).
    import os, sys, fastrec
    path, source, when = sys.argv[1:]
    model = fastrec.load(source)
    target = os.path.abspath(path)
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def names_target(event, args):
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(a)) == target:
                return not (event == "open" and isinstance(args[2], int) and not args[2] & WRITE)
        return False

    def identity():
        try:
            st = os.stat(target)  # not an audited call: no recursion
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    if when == "before":
        sys.addaudithook(lambda event, args: names_target(event, args) and os._exit(1))
    else:
        start = identity()
        def check(*_):
            if identity() != start:
                os._exit(1)
        sys.addaudithook(check)
        sys.setprofile(check)
    model.save(path)
    sys.setprofile(None)
    os._exit(2)  # the fault was never injected
""")


@pytest.mark.parametrize("when", ["before", "changed"])
def test_save_publishes_atomically(models, tmp_path, when):
    old, predict = models["MLPRegressor"]
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, 6)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of the 3-epoch MLP
        new = fastrec.MLPRegressor((8,), max_iter=3, random_state=1).fit(X, X[:, 2])
    assert not np.array_equal(predict(new), predict(old))
    path, source = tmp_path / "m.fastrec", tmp_path / "new.fastrec"
    old.save(path)
    new.save(source)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _PUBLISH_FAULT, str(path), str(source), when],
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr  # died at the fault
    loaded = fastrec.load(path)  # before the publish: the previous model, complete; after it: the new one
    np.testing.assert_array_equal(predict(loaded), predict(old if when == "before" else new))
