import numpy as np
import pytest

from fastrec import _core

ISAS = _core.available_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Every kernel test runs once per SIMD path this CPU supports, scalar included."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="module")
def threads_client():
    """A Dask client of 3 single-threaded workers in this process, shared by a test module."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=3, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        yield client


@pytest.fixture
def kill_a_replica_mid_fit():
    """Checks that a Dask fit whose replica's worker dies ends with WorkerLostError within its timeout and leaves
    the client usable: `check(make, fit)` builds the estimator with `make(client)` on a fresh 2-process cluster
    and runs `fit(estimator)` while the second replica's worker exits. The kill waits until the fit has placed
    its replicas: at a fixed time it could land before that on a loaded machine (CI), and the nanny's restart
    then left a healthy cluster to fit on."""
    import os
    import threading
    import time

    from distributed import Client, LocalCluster

    from fastrec.dask import WorkerLostError

    def check(make, fit):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            est = make(client)

            def kill():
                deadline = time.monotonic() + 60
                while "_workers" not in est.__dict__ and time.monotonic() < deadline:
                    time.sleep(0.05)
                victim = est.__dict__.get("_workers", [(None, None)])[-1][0]
                time.sleep(1.0)
                try:
                    client.run(os._exit, 1, workers=[victim])
                except Exception:  # the worker dies before answering
                    pass

            killer = threading.Thread(target=kill)
            killer.start()
            start = time.monotonic()
            with pytest.raises(WorkerLostError, match="left the cluster|died|restarted|no answer"):
                fit(est)
            killer.join()
            assert time.monotonic() - start < 90
            assert client.submit(lambda x: x + 1, 1).result(timeout=60) == 2

    return check
