"""One module per approximation of the inverse curvature."""

from .cg import CgInfluence
from .direct import DirectInfluence

__all__ = ["CgInfluence", "DirectInfluence"]
