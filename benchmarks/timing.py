"""Timing and machine-description helpers shared by the standalone benchmark scripts (bench_bar.py,
bench_recsys.py)."""

import datetime
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def machine_info():
    """What a results table needs to be read later: versions, CPU, the core measured, BLAS, environment."""
    import fastrec
    from fastrec import _core

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": sys.version.split()[0],
            "platform": platform.platform(), "numpy": np.__version__, "fastrec": fastrec.__version__,
            "cores": os.cpu_count(), "fastrec_core": dict(_core.show_config())}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
                           platform.processor())
    except OSError:
        info["cpu"] = platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        info["commit"] = commit or None
    except OSError:
        info["commit"] = None
    so = Path(_core.__file__)  # the extension measured (it may be rebuilt between runs)
    info["core_so"] = {"path": str(so), "mtime": datetime.datetime.fromtimestamp(so.stat().st_mtime)
                       .isoformat(timespec="seconds"), "sha256": hashlib.sha256(so.read_bytes()).hexdigest()[:16]}
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "threading_layer",
                                               "num_threads", "filepath")} for d in threadpool_info()]
    except ImportError:
        info["blas"] = None
    info["env"] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                                  "FASTREC_ISA")}
    return info


def fma_peak(threads):
    """Measured FP32 FMA peak {1: GFLOP/s of one core, threads: of `threads` cores together}, from
    fma_peak.cpp compiled with the system's C++ compiler; None without a compiler or a FMA-capable CPU."""
    import shutil
    import tempfile

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        exe = str(Path(tmp) / "fma_peak")
        source = str(Path(__file__).resolve().parent / "fma_peak.cpp")
        if subprocess.run([compiler, "-O2", "-pthread", source, "-o", exe], capture_output=True).returncode:
            return None
        out = subprocess.run([exe, str(threads)], capture_output=True, text=True).stdout.split()
    peak = {int(t): float(g) for isa, t, g in zip(out[0::3], out[1::3], out[2::3]) if isa != "none"}
    return peak or None
