"""The scikit-learn estimator protocol without scikit-learn at run time.

scikit-learn is only a test dependency, so the estimators cannot subclass `sklearn.base.BaseEstimator`.
scikit-learn's own machinery (clone, get_tags, is_classifier, check_is_fitted, Pipeline, GridSearchCV)
relies only on what this base provides: `get_params`/`set_params` derived from the `__init__` signature,
`__sklearn_tags__` (imported lazily: only scikit-learn calls it) and `__sklearn_is_fitted__`.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import time
import weakref

_fitting = weakref.WeakSet()  # estimators whose fit / partial_fit is running
_clocks = weakref.WeakKeyDictionary()  # estimator -> FitClock of its running fit (kept out of its __dict__: saved)
_fitting_lock = threading.Lock()


def exclusive_fit(method):
    """Decorator of fit / partial_fit: a second call on the same estimator while one runs (another Python
    thread) raises RuntimeError instead of racing on the parameters. predict may run concurrently."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _fitting_lock:
            if self in _fitting:
                raise RuntimeError(f"this {type(self).__name__} is being trained by another thread; wait for that "
                                   "fit to end, or train a copy (sklearn.base.clone)")
            _fitting.add(self)
        clock = _clocks[self] = FitClock()
        try:
            result = method(self, *args, **kwargs)
            self.fit_phases_ = clock.phases()
            if getattr(self, "verbose", False):
                print(f"{method.__name__}: " + ", ".join(f"{k} {v:.3f} s" for k, v in self.fit_phases_.items()),
                      file=sys.stderr, flush=True)
            return result
        finally:
            _clocks.pop(self, None)
            with _fitting_lock:
                _fitting.discard(self)

    return wrapper


def fit_clock(est):
    """The FitClock of est's running fit / partial_fit (None outside one): training loops report to it."""
    return _clocks.get(est)


class FitClock:
    """Where a fit's wall time goes (`fit_phases_`): "prepare" (from the call to the first epoch: checks, id
    mapping, inputs, initial parameters), "train" (the epochs), "validate" (scoring after epochs), "finish"
    (the rest) and "total". Families whose training loop does not report its epochs give "total" only."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first_epoch = None
        self.train = self.validate = 0.0

    def epoch_started(self):
        if self.first_epoch is None:
            self.first_epoch = time.perf_counter()

    def phases(self) -> dict:
        total = time.perf_counter() - self.start
        if self.first_epoch is None:
            return {"total": total}
        prepare = self.first_epoch - self.start
        return {"prepare": prepare, "train": self.train, "validate": self.validate,
                "finish": max(total - prepare - self.train - self.validate, 0.0), "total": total}


class BaseEstimator:
    """get_params/set_params/__repr__ like scikit-learn's BaseEstimator; fitted state ends with '_'."""

    # "classifier" or "regressor": drives __sklearn_tags__ and is what sklearn's is_classifier reads.
    _estimator_kind: str | None = None

    @classmethod
    def _get_param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return sorted(
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )

    def get_params(self, deep: bool = True) -> dict:
        out = {}
        for name in self._get_param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{name}__{k}", v) for k, v in value.get_params().items())
            out[name] = value
        return out

    def set_params(self, **params):
        """Set parameters; they are validated at fit time, as in scikit-learn."""
        valid = self._get_param_names()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(
                    f"Invalid parameter {key!r} for estimator {type(self).__name__}. "
                    f"Valid parameters are: {valid!r}."
                )
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        # Like scikit-learn's print_changed_only=True: show only parameters that differ from the defaults.
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()
        }
        changed = []
        for name in self._get_param_names():
            value = getattr(self, name, None)
            default = defaults.get(name, inspect.Parameter.empty)
            if value is default or (type(value) is type(default) and repr(value) == repr(default)):
                continue
            changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    def save(self, path) -> None:
        """Write the model to one file (docs/DESIGN.md, "Model files"): atomic, versioned, loadable with `fastrec.load`.

        Everything needed to predict and to resume training (id mappings, optimizer state) is kept.
        """
        from fastrec._persist import save

        exclusive_fit(save)(self, path)  # not while a fit changes the arrays being written

    def __setstate__(self, state):
        """Unpickling and `fastrec.load`: a model saved before one of today's parameters existed gets that
        parameter's default, so that get_params, save and clone keep working on it."""
        self.__dict__.update(state)
        for name, p in inspect.signature(type(self).__init__).parameters.items():
            if name != "self" and p.default is not inspect.Parameter.empty and name not in self.__dict__:
                setattr(self, name, p.default)

    def _threads(self) -> int:
        """n_threads as the core takes it (0: all cores)."""
        return 0 if self.n_threads is None else int(self.n_threads)

    def __sklearn_is_fitted__(self) -> bool:
        return any(k.endswith("_") and not k.startswith("__") for k in vars(self))

    def __sklearn_tags__(self):
        # Only scikit-learn calls this, so scikit-learn is importable here.
        from sklearn.utils import ClassifierTags, InputTags, RegressorTags, Tags, TargetTags

        tags = Tags(
            estimator_type=self._estimator_kind,
            target_tags=TargetTags(required=True),
            input_tags=InputTags(sparse=True),
        )
        if self._estimator_kind == "classifier":
            tags.classifier_tags = ClassifierTags()
        elif self._estimator_kind == "regressor":
            tags.regressor_tags = RegressorTags()
        return self._more_sklearn_tags(tags)

    def _more_sklearn_tags(self, tags):
        return tags
