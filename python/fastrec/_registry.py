"""The classes a model file may name, registered where they are defined.

`fastrec._persist` looks names up here instead of importing every estimator, so a new model family registers
itself with `@persistable` and touches no central list (and no import cycle forms between the estimators and
persistence). Only registered classes can be instantiated by `fastrec.load`.
"""

from __future__ import annotations

import importlib

_CLASSES: dict = {}


def persistable(cls):
    """Class decorator: `cls` may be saved and loaded, under the name "module.QualifiedName"."""
    _CLASSES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def classes() -> dict:
    """Name -> class of every registered class. Importing the package registers all of fastrec's own (its
    __init__ imports every estimator module)."""
    importlib.import_module("fastrec")  # registers fastrec's own classes (a no-op once imported)

    return dict(_CLASSES)
