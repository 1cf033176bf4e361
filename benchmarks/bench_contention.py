"""Training time with 1, all, and automatic (n_threads=None) threads while other processes keep the cores busy.

    python benchmarks/bench_contention.py [--busy 2] [--rounds 3]

Starts `--busy` processes that spin on the CPU (what another job on a shared machine does), then times one
epoch of a Recommender on implicit feedback (150k interactions, 4 negatives each: 750k examples) with
n_threads=1, n_threads=<all cores> and n_threads=None, round-robin, and prints the median [min - max] of each;
then the same with no busy process. Every parallel region waits for its slowest thread, so with the cores
busy a fixed "all cores" can be far slower than one thread; n_threads=None measures probe batches and picks
the faster (cpp/parallel.h, BatchThreads). The results of training are identical in every case.
"""

import argparse
import multiprocessing as mp
import os
import statistics
import time

import fastrec
from fastrec.datasets import make_interactions


def spin(stop):
    while not stop.is_set():
        sum(range(10_000))


def epoch_seconds(data, n_threads):
    rec = fastrec.Recommender(epochs=1, negatives=4, random_state=0, n_threads=n_threads)
    start = time.perf_counter()
    rec.fit(data.users, data.items)
    return time.perf_counter() - start


def run(data, rounds, cores):
    times = {1: [], cores: [], None: []}
    for r in range(rounds):
        for n_threads in list(times)[r % 3:] + list(times)[:r % 3]:
            times[n_threads].append(epoch_seconds(data, n_threads))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="spinning processes (default 2)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    data = make_interactions(n_users=3000, n_items=1500, n_interactions=150_000, implicit=True, random_state=0)
    epoch_seconds(data, 1)  # warm-up
    stop = mp.Event()
    busy = [mp.Process(target=spin, args=(stop,)) for _ in range(args.busy)]
    for p in busy:
        p.start()
    try:
        loaded = run(data, args.rounds, cores)
    finally:
        stop.set()
        for p in busy:
            p.join()
    quiet = run(data, args.rounds, cores)
    print(f"one epoch (750k examples), {cores} cores, {args.rounds} rounds, median [min - max] seconds")
    for label, times in ((f"{args.busy} busy processes", loaded), ("no busy process", quiet)):
        cells = ", ".join(f"n_threads={k}: {statistics.median(v):.2f} [{min(v):.2f} - {max(v):.2f}]"
                          for k, v in times.items())
        print(f"  {label}: {cells}")


if __name__ == "__main__":
    main()
