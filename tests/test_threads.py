"""fastrec's threads seen from outside: threadpoolctl, fork, and many Python threads on one model.

- threadpoolctl finds the OpenMP runtime that fastrec's extension is linked to, and
  `threadpool_limits(1)` stops fastrec from starting worker threads (counted in /proc/self/task);
- a process forked after fastrec ran a parallel region can still predict (GNU libgomp alone would hang
  in the child) and gets the parent's results bit for bit;
- predict / recommend called from 8 Python threads at once on one fitted model return exactly the
  serial results (the GIL is released in the core, so these calls really overlap).
"""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastrec
from fastrec import _core
from fastrec._checks import ConvergenceWarning
from fastrec.datasets import make_interactions

threadpoolctl = pytest.importorskip("threadpoolctl")

needs_openmp = pytest.mark.skipif(not _core.show_config()["openmp"], reason="core built without OpenMP")
needs_linux = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")

# 1024 rows x 64 inputs x 256 hidden units = 2^24 multiply-adds in the first layer: 16 times the core's
# threshold for a second thread (cpp/gemm.cpp, 2^20 per thread), so n_threads=2 really runs an OpenMP team.
N_ROWS, N_FEATURES, N_HIDDEN = 1024, 64, 256


def _mlp(n_threads):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N_ROWS, N_FEATURES)).astype(np.float32)
    y = X[:, 0] - 2 * X[:, 1]
    model = fastrec.MLPRegressor(hidden_layer_sizes=(N_HIDDEN,), batch_size=N_ROWS, max_iter=2,
                                 random_state=0, n_threads=n_threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 2 epochs: only the threads matter here
        model.fit(X, y)
    return model, X


def _linked_libraries(path):
    """Real paths of the shared libraries that `path` loads, as the dynamic loader resolves them."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    return {os.path.realpath(line.split("=>")[1].split("(")[0].strip())
            for line in out.splitlines() if "=> /" in line}


@needs_openmp
@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_threadpoolctl_finds_fastrecs_openmp():
    linked = _linked_libraries(_core.__file__)
    openmp = {os.path.realpath(info["filepath"]) for info in threadpoolctl.threadpool_info()
              if info["internal_api"] == "openmp"}
    assert openmp & linked, f"threadpoolctl sees {openmp}, fastrec's _core loads {linked}"


@needs_openmp
def test_threadpool_limits_sets_the_core_thread_count():
    # max_threads is omp_get_max_threads() at call time: what n_threads=None resolves to.
    with threadpoolctl.threadpool_limits(2, user_api="openmp"):  # a known start, also on a 1-core machine
        assert _core.show_config()["max_threads"] == 2
        with threadpoolctl.threadpool_limits(1):
            assert _core.show_config()["max_threads"] == 1
        assert _core.show_config()["max_threads"] == 2


# Counts the OS threads a fresh process gains while fastrec predicts with n_threads=None, first under
# threadpool_limits(1), then allowed 2 OpenMP threads (which shows that the count does see a new worker).
_COUNT_NEW_THREADS = """
import os, threadpoolctl
from test_threads import _mlp
model, X = _mlp(n_threads=1)
model.n_threads = None
def new_threads():
    before = len(os.listdir("/proc/self/task"))
    model.predict(X)
    return len(os.listdir("/proc/self/task")) - before
with threadpoolctl.threadpool_limits(1):
    limited = new_threads()
with threadpoolctl.threadpool_limits(2, user_api="openmp"):
    print(limited, new_threads())
"""


@needs_openmp
@needs_linux
def test_threadpool_limits_one_starts_no_worker_threads():
    path = [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]  # keep the caller's (tools/sanitize.sh)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    out = subprocess.run([sys.executable, "-c", _COUNT_NEW_THREADS], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    limited, allowed = map(int, out.stdout.split())
    assert limited == 0 and allowed >= 1, (limited, allowed)


def _fork(child):
    """Runs child() in a forked process; returns its exit code, or None if it hung for 60 s (then killed)."""
    with warnings.catch_warnings():
        # Python >= 3.12 warns about forking a process with threads (OpenMP's and BLAS's): that is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            code = 0 if child() else 1
        except BaseException:
            code = 2
        os._exit(code)  # never return into pytest from the child
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


@needs_linux
def test_forked_child_predicts_after_parent_used_threads():
    model, X = _mlp(n_threads=2)  # fit and predict both run 2-thread OpenMP teams in this process
    expected = model.predict(X)
    code = _fork(lambda: np.array_equal(model.predict(X), expected))
    assert code is not None, "the forked child hung in predict"
    assert code == 0, f"the forked child exited with {code} (1: different predictions, 2: an exception)"
    assert np.array_equal(model.predict(X), expected)  # the parent still runs its threads


def _recommender():
    # Many items so that building the top-k cache (n_items x 64 first-layer outputs) takes long enough for
    # concurrent first calls to overlap it.
    d = make_interactions(n_users=200, n_items=30000, n_interactions=20000, implicit=True, random_state=0)
    rec = fastrec.Recommender(early_stopping=False, embedding_dim=16, hidden_layer_sizes=(64, 16), epochs=1, random_state=0, n_threads=1)
    return rec.fit(d.users, d.items), d


def _run_concurrently(calls, rounds, n_workers=8):
    """Each call from n_workers threads at once (released together by a barrier), `rounds` times each."""
    barrier = threading.Barrier(n_workers)

    def worker(call):
        barrier.wait()
        return [call() for _ in range(rounds)]

    with ThreadPoolExecutor(n_workers) as pool:
        return [r for results in pool.map(worker, [calls[i % len(calls)] for i in range(n_workers)])
                for r in results]


def test_concurrent_mlp_predict_is_exact():
    model, X = _mlp(n_threads=2)
    expected = model.predict(X)
    for got in _run_concurrently([lambda: model.predict(X)], rounds=5):
        assert np.array_equal(got, expected)


def test_concurrent_recommender_predict_and_recommend_are_exact():
    rec, d = _recommender()
    users = np.unique(d.users)[:5]
    serial = pickle.loads(pickle.dumps(rec))  # its own core handle and top-k cache
    pairs = d.users[:2000], d.items[:2000]
    expected_predict = serial.predict(*pairs)
    expected_items, expected_scores = serial.recommend(users, k=10)
    rec.n_threads = serial.n_threads = 2
    for _ in range(20):
        # A new handle whose top-k cache is not built yet, shared by all threads: the first recommend calls
        # race to build it. (_predictor is the model's lazily built handle, see Recommender._handle.) Before
        # the cache had a mutex, about 1 round in 40 returned a wrong top-k.
        rec._predictor = None
        rec._handle()
        results = _run_concurrently([lambda: ("recommend", rec.recommend(users, k=10))] * 3
                                    + [lambda: ("predict", rec.predict(*pairs))], rounds=1)
        for kind, got in results:
            if kind == "predict":
                assert np.array_equal(got, expected_predict)
            else:
                assert np.array_equal(got[0], expected_items) and np.array_equal(got[1], expected_scores)


def test_a_second_concurrent_fit_is_refused_while_predict_runs():
    d = make_interactions(n_users=500, n_items=300, n_interactions=20_000, random_state=0)
    rec = fastrec.Recommender(early_stopping=False, epochs=2, random_state=0, n_threads=1).fit(d.users, d.items, d.ratings)
    training = threading.Event()
    outcome = []

    def long_fit():  # 40 epochs of partial_fit, each retried should the main thread's call hold the model
        done = 0
        while done < 40:
            try:
                training.set()
                rec.partial_fit(d.users, d.items, d.ratings)
                done += 1
            except RuntimeError:
                time.sleep(0.001)
        outcome.append("done")

    worker = threading.Thread(target=long_fit)
    worker.start()
    training.wait()
    time.sleep(0.2)
    refused = []
    predictions = 0
    while worker.is_alive():
        if not refused:
            try:
                rec.partial_fit(d.users[:100], d.items[:100], d.ratings[:100])
            except RuntimeError as e:
                refused.append(str(e))
        assert np.isfinite(rec.predict(d.users[:50], d.items[:50])).all()  # predict is fine meanwhile
        predictions += 1
    assert predictions > 10
    worker.join()
    assert refused and "another thread" in refused[0]
    assert outcome == ["done"]
