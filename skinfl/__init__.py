"""skinfl: influence functions for trained PyTorch models, as scikit-learn estimators."""

__version__ = "0.1.0"  # before the imports: modules key caches on it

from ._solvers import CgInfluence, DirectInfluence  # noqa: E402
from .base import BaseInfluence, registered_estimators  # noqa: E402
from ._persistence import load, save  # noqa: E402
from . import metrics, retraining  # noqa: E402  (submodules: skinfl.metrics, skinfl.retraining)

__all__ = [
    "BaseInfluence", "CgInfluence", "DirectInfluence", "load", "metrics", "registered_estimators", "retraining",
    "save", "__version__",
]
