"""skinfl: influence functions for trained PyTorch models, as scikit-learn estimators."""

from ._solvers import CgInfluence, DirectInfluence
from .base import BaseInfluence, registered_estimators

__version__ = "0.1.0"

__all__ = ["BaseInfluence", "CgInfluence", "DirectInfluence", "registered_estimators", "__version__"]
