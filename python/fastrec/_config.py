"""`fastrec.show_config()`: versions, threads and SIMD paths, for bug reports and benchmark tables."""

from __future__ import annotations

import platform
import sys

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
