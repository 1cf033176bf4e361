"""bfloat16 vs float32 GEMM on the Mult-VAE output layer's three products (issue 17's bf16 GEMM, issue 15's floor).

    python benchmarks/bench_bf16_gemm.py [--rounds 7] [--threads 1 2]

Shapes (batch 500, hidden 600, 2 * 10^4 items; cpp/multvae.cpp):
  logits        C (500 x 20000)  = H (500 x 600) W (600 x 20000)          sgemm(trans_a=False, trans_b=False)
  weight grad   C (600 x 20000)  = Hᵀ D, H stored 500 x 600, D 500 x 20000  (trans_a=True)
  input grad    C (500 x 600)    = D Wᵀ, W stored 600 x 20000               (trans_b=True)
Each is 2 x 500 x 600 x 20000 = 12 GFLOP. Implementations, interleaved per round: fastrec's float32 sgemm
(`_core.sgemm`), the bf16 product on the AVX512-BF16 kernel (when the CPU has it) and on the emulated path
(float32 kernels on operands rounded while packing). The call includes allocating C and, for bf16, rounding
and packing the operands. Rates are against the peaks measured in the same run: the FP32 FMA peak
(benchmarks/fma_peak.cpp: 2 flops per lane per FMA) and the bf16 dot-product peak (benchmarks/bf16_peak.cpp:
VDPBF16PS, 2 multiply-adds per float32 lane, 4 flops per lane).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import TIMER, fma_peak, stats  # noqa: E402

from fastrec import _core  # noqa: E402

BATCH, HIDDEN, ITEMS = 500, 600, 20_000


def bf16_peak(threads):
    """Measured VDPBF16PS peak {1: GFLOP/s of one core, threads: of `threads` together} from bf16_peak.cpp, or
    None (no compiler, no avx512_bf16)."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        exe = str(Path(tmp) / "bf16_peak")
        source = str(Path(__file__).resolve().parent / "bf16_peak.cpp")
        if subprocess.run([compiler, "-O2", "-pthread", source, "-o", exe], capture_output=True).returncode:
            return None
        out = subprocess.run([exe, str(threads)], capture_output=True, text=True).stdout.split()
    peak = {int(t): float(g) for isa, t, g in zip(out[0::3], out[1::3], out[2::3]) if isa != "none"}
    return peak or None


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    H = np.tanh(rng.standard_normal((BATCH, HIDDEN))).astype(np.float32)
    W = (rng.standard_normal((HIDDEN, ITEMS)) * 0.02).astype(np.float32)
    D = (rng.standard_normal((BATCH, ITEMS)) * 1e-4).astype(np.float32)
    products = {"logits": (H, W, False, False), "weight grad": (H, D, True, False),
                "input grad": (D, W, False, True)}
    flops = 2.0 * BATCH * HIDDEN * ITEMS
    kernels = _core.bf16_kernels()
    print(f"fastrec {_core.__version__}; bf16 kernels here: {kernels}; shapes: batch {BATCH}, hidden {HIDDEN}, "
          f"{ITEMS:,} items ({flops / 1e9:.0f} GFLOP a product)", flush=True)
    peak = fma_peak(max(args.threads))
    print(f"measured FP32 FMA peak: {peak} GFLOP/s", flush=True)
    peak_bf16 = bf16_peak(max(args.threads))
    print(f"measured bf16 dot-product (VDPBF16PS) peak: {peak_bf16} GFLOP/s", flush=True)
    impls = {"float32 sgemm": lambda a, b, ta, tb, t: _core.sgemm(a, b, ta, tb, "auto", t)}
    for k in reversed(kernels):
        impls[f"bf16 {k}"] = lambda a, b, ta, tb, t, k=k: _core.bf16_gemm(a, b, ta, tb, kernel=k, n_threads=t)
    for t in args.threads:
        print(f"{t} thread(s): median [min-max] of {args.rounds} interleaved rounds")
        for pname, (a, b, ta, tb) in products.items():
            times = {name: [] for name in impls}
            for name, fn in impls.items():  # warm-up: packing buffers, threads
                fn(a, b, ta, tb, t)
            for _ in range(args.rounds):
                for name, fn in impls.items():
                    start = TIMER()
                    fn(a, b, ta, tb, t)
                    times[name].append(TIMER() - start)
            base = stats(times["float32 sgemm"])["median"]
            for name in impls:
                st = stats(times[name])
                rate = flops / st["median"] / 1e9
                frac = f", {100 * rate / peak[t]:.0f}% of the FP32 FMA peak {peak[t]:.0f}" if peak and t in peak else ""
                if name == "bf16 avx512_bf16" and peak_bf16 and t in peak_bf16:
                    frac += f", {100 * rate / peak_bf16[t]:.0f}% of the bf16 peak {peak_bf16[t]:.0f}"
                print(f"  {pname:11s} {name:18s} {1e3 * st['median']:7.1f} ms [{1e3 * st['min']:.1f}-"
                      f"{1e3 * st['max']:.1f}]  {rate:6.1f} GFLOP/s{frac}  speed-up vs float32 "
                      f"{base / st['median']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
