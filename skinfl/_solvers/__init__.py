"""One module per approximation of the inverse curvature.

Each module defines one estimator class, which registers itself when it is
defined (``BaseInfluence.__init_subclass__``); the tests check it as its
entry in ``tests/registry.py`` says. A new solver is a module, its class, one
import line here (``skinfl`` exports what ``__all__`` lists) and that entry.
"""

from .arnoldi import ArnoldiInfluence
from .cg import CgInfluence
from .datainf import DataInfInfluence, InverseHarmonicMeanInfluence  # noqa: F401  (a deprecated alias)
from .direct import DirectInfluence
from .ekfac import EkfacInfluence
from .lissa import LissaInfluence
from .nystroem import NystroemInfluence

__all__ = ["ArnoldiInfluence", "CgInfluence", "DataInfInfluence", "DirectInfluence", "EkfacInfluence",
           "LissaInfluence", "NystroemInfluence"]
