"""CPU time a LocalCluster spends on itself while its workers run tasks (benchmarks/DASK.md, session 13).

    python benchmarks/dask_cluster_cpu.py [--seconds 10] [--workers 2]

Starts a LocalCluster of --workers processes x 1 thread with Dask's default settings, then with those of the
cluster fastrec's CLI starts (fastrec.dask._LEAN_CLUSTER_CONFIG), and in each runs one task per worker that
sleeps --seconds (time.sleep releases the GIL, as the core's training does): the CPU seconds that the driver
(scheduler, nannies, client) and each worker process used meanwhile are what a cluster takes from training
when its workers fill the cores.
"""

import argparse
import time


def cluster_cpu(workers, seconds, config):
    import dask
    import psutil
    from distributed import Client, LocalCluster

    with dask.config.set(config):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          memory_limit=None) as cluster, Client(cluster) as client:
            time.sleep(2)  # let start-up settle
            procs = [psutil.Process()] + psutil.Process().children(recursive=True)
            before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
            client.gather([client.submit(time.sleep, seconds, pure=False, workers=[w])
                           for w in client.nthreads()])
            return {p.pid: sum(p.cpu_times()[:2]) - before[p.pid] for p in procs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from fastrec.dask import _LEAN_CLUSTER_CONFIG

    for name, config in (("Dask's defaults", {}), ("fastrec's CLI cluster", _LEAN_CLUSTER_CONFIG)):
        cpu = cluster_cpu(args.workers, args.seconds, config)
        print(f"{name}: {sum(cpu.values()):.2f} CPU s in {args.seconds:.0f} s of tasks "
              f"({100 * sum(cpu.values()) / args.seconds:.1f}% of a core; per process: "
              f"{', '.join(f'{v:.2f}' for v in cpu.values() if v > 0)})", flush=True)


if __name__ == "__main__":
    main()
