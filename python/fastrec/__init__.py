"""fastrec: neural recommendation models and MLPs trained on CPUs by a C++17/OpenMP core."""

from fastrec._core import __version__, available_isas
from fastrec._config import check_isa_environment as _check_isa_environment
from fastrec._config import show_config
from fastrec._persist import ModelFileError, load
from fastrec.autorec import AutoRec
from fastrec.ease import EASE
from fastrec.fields import FieldModel
from fastrec.mlp import MLPClassifier, MLPRegressor
from fastrec.multvae import MultDAE, MultVAE
from fastrec.privacy import DPConfig
from fastrec.recommender import Recommender
from fastrec.sequential import SequentialRecommender
from fastrec.two_tower import TwoTower
from fastrec.two_stage import TwoStage

_check_isa_environment()  # a mistyped FASTREC_ISA would otherwise be ignored silently by the core

__all__ = ["AutoRec", "DPConfig", "EASE", "FieldModel", "ModelFileError", "load", "MLPClassifier", "MLPRegressor",
           "MultDAE", "MultVAE", "Recommender", "SequentialRecommender", "TwoTower", "TwoStage", "available_isas", "show_config",
           "__version__"]
