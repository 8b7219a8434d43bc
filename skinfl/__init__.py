"""skinfl: influence functions for trained PyTorch models, as scikit-learn estimators."""

from ._solvers import CgInfluence, DirectInfluence
from .base import BaseInfluence, registered_estimators
from . import metrics, retraining  # noqa: E402  (submodules: skinfl.metrics, skinfl.retraining)

__version__ = "0.1.0"

__all__ = ["BaseInfluence", "CgInfluence", "DirectInfluence", "metrics", "registered_estimators", "retraining", "__version__"]
