"""Retraining-based and reference-based evaluation of influence estimators.

Functions score influence values (from any source) against ground truth;
scorer objects wrap them for ``GridSearchCV(..., scoring=scorer)`` and cache
the ground truth, which depends on the data and not on the estimator.

Ground truth:

- :func:`leave_one_out_truth` and :func:`datamodel_truth` retrain a model
  without single points or on random subsets, with a user ``retrain``
  callable (see :mod:`skinfl.retraining` for ready-made ones).

Scores on arrays:

- :func:`leave_one_out_agreement`, :func:`linear_datamodeling_score`,
  :func:`mislabel_detection`, :func:`reference_agreement`.

Scorers ``scorer(estimator, X_query, y_query) -> float``:

- :class:`LeaveOneOutScorer`, :class:`LdsScorer`, :class:`MislabelScorer`,
  :class:`ReferenceAgreementScorer`, :class:`DataCleaningScorer`.

Data cleaning, the use influence is for:

- :func:`data_cleaning` removes the training points most harmful to a
  validation loss (by influence, by training loss, at random), retrains,
  and measures accuracy on separate test points.
"""

from ._cleaning import DataCleaningScorer, data_cleaning
from ._ground_truth import (
    DatamodelTruth,
    LeaveOneOutTruth,
    datamodel_truth,
    leave_one_out_truth,
    query_losses,
    random_subsets,
)
from ._scorers import LdsScorer, LeaveOneOutScorer, MislabelScorer, ReferenceAgreementScorer
from ._scores import (
    leave_one_out_agreement,
    linear_datamodeling_score,
    mislabel_detection,
    reference_agreement,
)

__all__ = [
    "DataCleaningScorer",
    "DatamodelTruth",
    "LdsScorer",
    "LeaveOneOutScorer",
    "LeaveOneOutTruth",
    "MislabelScorer",
    "ReferenceAgreementScorer",
    "data_cleaning",
    "datamodel_truth",
    "leave_one_out_agreement",
    "leave_one_out_truth",
    "linear_datamodeling_score",
    "mislabel_detection",
    "query_losses",
    "random_subsets",
    "reference_agreement",
]
