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
