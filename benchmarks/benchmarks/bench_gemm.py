"""GEMM on the products of a training step of a 512-256-128-64 MLP on a 1024-sample batch.

fastrec's own engine (``fastrec._core.sgemm``, run-time ISA dispatch) vs NumPy's ``matmul`` (its BLAS), with
1 and 2 threads (fastrec: n_threads; NumPy: threadpoolctl). Time* reports seconds per product,
Track* GFLOP/s (median of timed repeats after a warm-up). Products (see common.gemm_products):
XW (forward X.W), XtdZ (weight gradient X^T.dZ), dZWt (input gradient dZ.W^T).
"""

import statistics

from .common import TIMER, gemm_operands, gemm_products, numpy_product

PRODUCTS = list(gemm_products())
IMPLS = ["fastrec", "numpy"]
THREADS = [1, 2]


def _runner(impl, name, n_threads):
    a, b, ta, tb, flops = gemm_operands(name)
    if impl == "fastrec":
        from fastrec import _core

        def run():
            _core.sgemm(a, b, ta, tb, "auto", n_threads)
    else:
        def run():
            numpy_product(a, b, ta, tb)
    return run, flops


class _GemmBase:
    params = [IMPLS, PRODUCTS, THREADS]
    param_names = ["impl", "product", "n_threads"]
    timer = TIMER

    def setup(self, impl, name, n_threads):
        from threadpoolctl import threadpool_limits

        # Limits NumPy's BLAS (and OpenMP pools) for the whole benchmark; fastrec takes n_threads directly.
        self._limits = threadpool_limits(limits=n_threads)
        self.run, self.flops = _runner(impl, name, n_threads)
        self.run()  # warm-up: page in operands, spin up thread pools

    def teardown(self, impl, name, n_threads):
        self._limits.restore_original_limits()


class TimeGemm(_GemmBase):
    def time_gemm(self, impl, name, n_threads):
        self.run()


class TrackGemmGflops(_GemmBase):
    unit = "GFLOP/s"

    def track_gflops(self, impl, name, n_threads):
        times = []
        for _ in range(15):
            t0 = TIMER()
            self.run()
            times.append(TIMER() - t0)
        return self.flops / statistics.median(times) / 1e9
