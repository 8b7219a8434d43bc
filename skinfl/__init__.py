"""skinfl: influence functions for trained PyTorch models, as scikit-learn estimators."""

__version__ = "0.2.0.dev0"  # before the imports: modules key caches on it

from ._solvers import *  # noqa: E402,F401,F403  (every estimator, listed once in _solvers/__init__.py)
from ._solvers import __all__ as _ESTIMATORS  # noqa: E402
from ._solvers import InverseHarmonicMeanInfluence  # noqa: E402,F401  (deprecated alias, not in __all__)
from .base import BaseInfluence, registered_estimators  # noqa: E402
from .ensemble import InfluenceEnsemble  # noqa: E402
from ._persistence import load, save  # noqa: E402
from . import display, metrics, retraining  # noqa: E402  (submodules: skinfl.display, .metrics, .retraining)

__all__ = [*_ESTIMATORS, "BaseInfluence", "InfluenceEnsemble", "display", "load", "metrics", "registered_estimators",
           "retraining", "save", "__version__"]
