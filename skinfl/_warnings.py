"""Warnings that point at the user's line, not at a line inside a library.

A warning raised deep in a solver, or inside scikit-learn's scorer while
``GridSearchCV`` runs it, would otherwise name ``skinfl/base.py`` or
``sklearn/metrics/_scorer.py`` as its location: the user could not tell
which of their calls caused it, and Python's once-per-location filter would
merge warnings from different calls.
"""

from __future__ import annotations

import os
import sys
import warnings

import joblib
import sklearn

# Frames in these packages are skipped: scikit-learn and joblib call skinfl from GridSearchCV,
# Pipeline, scorers and the set_output wrapper.
_LIBRARY_DIRECTORIES = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, sklearn.__file__, joblib.__file__)
)


def warn(message, category=UserWarning):
    """``warnings.warn``, located at the first frame outside skinfl, scikit-learn and joblib."""
    frame = sys._getframe(1)  # our caller, which stacklevel=2 names
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRECTORIES):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
