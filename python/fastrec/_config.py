"""`fastrec.show_config()`: versions, threads and SIMD paths, for bug reports and benchmark tables."""

from __future__ import annotations

import os
import platform
import sys
import warnings

import numpy as np
import scipy

from fastrec import _core


def show_config(file=None) -> dict:
    """Print and return fastrec's build and runtime configuration.

    The "core" entry is `fastrec._core.show_config()` as reported by the compiled module (version, OpenMP,
    thread count, compiled / available / active SIMD paths); it is passed through as is, so new keys of the
    core appear here without a change to this function.
    """
    core = dict(_core.show_config())
    info = {
        "fastrec": getattr(_core, "__version__", core.get("version")),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "core": core,
    }
    out = sys.stdout if file is None else file
    for key, value in info.items():
        if key == "core":
            print("core:", file=out)
            for ck, cv in core.items():
                if isinstance(cv, (list, tuple)):
                    cv = ", ".join(map(str, cv))
                print(f"  {ck}: {cv}", file=out)
        else:
            print(f"{key}: {value}", file=out)
    return info


# The FASTREC_ISA values cpp/isa.cpp acts on: best_isa() caps the automatic choice at a name parse_isa knows,
# and takes "auto" (or an empty value) as no cap. It ignores anything else without a word, so a typo such as
# "avx3" would silently leave the fastest path on: check_isa_environment says so at import instead.
ISA_ENVIRONMENT_VALUES = ("auto", "avx512", "avx2", "scalar")


def check_isa_environment(environ=os.environ) -> None:
    """Warn (UserWarning) when FASTREC_ISA is set to a value the core ignores; called once by ``import fastrec``."""
    value = environ.get("FASTREC_ISA")
    if value is None or value == "" or value in ISA_ENVIRONMENT_VALUES:
        return
    accepted = ", ".join(repr(v) for v in ISA_ENVIRONMENT_VALUES)
    warnings.warn(
        f"FASTREC_ISA={value!r} is not a value fastrec accepts ({accepted}; exact, lower case): it is ignored, "
        f"and the SIMD path is chosen automatically ({_core.show_config()['active_isa']!r}).",
        UserWarning,
        stacklevel=3,  # _config -> fastrec/__init__ -> the importing line (importlib's frames are skipped)
    )
