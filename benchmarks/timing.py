"""Timing helpers shared by the standalone benchmark scripts (bench_bar.py, bench_recsys.py)."""

import statistics
import time

import numpy as np

TIMER = time.perf_counter  # wall clock: the implementations are multithreaded


def settle(seconds):
    """Pause before a timed call: OpenBLAS / OpenMP workers of the previous library spin for ~0.1-0.2 s."""
    if seconds > 0:
        time.sleep(seconds)


def stats(samples):
    """Median, min, max, quartiles and count of a list of timings."""
    s = sorted(samples)
    q = np.percentile(s, [25, 75]) if len(s) > 1 else [s[0], s[0]]
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": float(q[0]), "q3": float(q[1]),
            "n": len(s)}


def fmt_time(sec):
    if sec >= 1:
        return f"{sec:.2f} s"
    if sec >= 1e-3:
        return f"{sec * 1e3:.3g} ms"
    return f"{sec * 1e6:.3g} µs"


def fmt_t(st):
    """'median [min – max]' of a stats() dict of times."""
    return f"{fmt_time(st['median'])} [{fmt_time(st['min'])} – {fmt_time(st['max'])}]"
