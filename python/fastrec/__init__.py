"""fastrec: neural recommendation models and MLPs trained on CPUs by a C++17/OpenMP core."""

from fastrec._core import __version__, available_isas
from fastrec._config import show_config
from fastrec._persist import ModelFileError, load
from fastrec.fields import FieldModel
from fastrec.mlp import MLPClassifier, MLPRegressor
from fastrec.recommender import Recommender

__all__ = ["FieldModel", "ModelFileError", "load", "MLPClassifier", "MLPRegressor", "Recommender", "available_isas", "show_config", "__version__"]
