"""Scores of an influence matrix against ground truth, on plain arrays.

These functions take influence values from any source (a skinfl estimator or
another library), so that methods can be compared on the same ground truth.
Correlations are taken per query point, across training points or subsets,
and averaged over query points: each query point asks "which training points
matter for me", and a few query points with large gradients should not
dominate the answer.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score
from sklearn.utils import Bunch

from .._validation import to_output
from .._warnings import warn


def _as_array(values, name):
    if hasattr(values, "detach"):
        values = to_output(values, like_torch=False)
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return array


def row_correlations(predicted, actual, method="pearson"):
    """Correlation of ``predicted[i]`` with ``actual[i]`` for every row ``i``.

    Rows where either side is constant have no correlation and give NaN.
    """
    if method == "spearman":
        predicted, actual = stats.rankdata(predicted, axis=1), stats.rankdata(actual, axis=1)
    elif method != "pearson":
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}.")
    predicted = predicted - predicted.mean(axis=1, keepdims=True)
    actual = actual - actual.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(predicted, axis=1) * np.linalg.norm(actual, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (predicted * actual).sum(axis=1) / norms
    values[(norms == 0) | ~np.isfinite(values)] = np.nan
    return values


def _mean_over_queries(per_query, what):
    valid = np.isfinite(per_query)
    if not valid.any():
        raise ValueError(
            f"No query point has a defined {what}: the predicted or actual values are constant for every "
            "query point (for example, retraining did not change any query loss)."
        )
    if not valid.all():
        warn(
            f"{int((~valid).sum())} of {len(per_query)} query points have constant predicted or actual values "
            f"and no {what}; they are left out of the mean.",
            RuntimeWarning,
        )
    return float(per_query[valid].mean())


def _confidence_interval(per_query, confidence):
    valid = per_query[np.isfinite(per_query)]
    if len(valid) < 2:
        return (np.nan, np.nan)
    mean = valid.mean()
    half_width = stats.t.ppf(0.5 + confidence / 2, df=len(valid) - 1) * valid.std(ddof=1) / np.sqrt(len(valid))
    return (float(mean - half_width), float(mean + half_width))


def _check_influences(influences, n_query, n_train):
    influences = _as_array(influences, "influences")
    if influences.shape != (n_query, n_train):
        raise ValueError(
            f"influences must have shape (n_query, n_train) = ({n_query}, {n_train}) to match the ground "
            f"truth, got {influences.shape}."
        )
    return influences


def leave_one_out_agreement(influences, truth):
    """Agreement of predicted and actual leave-one-out changes of query losses.

    Removing training point ``j`` changes the loss at query point ``i`` by
    about ``influences[i, j] / n_train``; this compares that prediction with
    retraining.

    Parameters
    ----------
    influences : array-like of shape (n_query, n_train)
        Influences of every training point on every query loss, skinfl's sign
        convention (positive = helpful).
    truth : LeaveOneOutTruth
        Retrained ground truth (see :class:`LeaveOneOutScorer`).

    Returns
    -------
    result : Bunch
        ``pearson`` and ``spearman`` (means over query points),
        ``pearson_per_query``, ``spearman_per_query``, ``predicted`` and
        ``actual`` (both ``(n_query, n_removed)``).
    """
    n_query = truth.loss_changes.shape[0]
    influences = _check_influences(influences, n_query, truth.n_train)
    predicted = influences[:, truth.removed] / truth.n_train
    actual = truth.loss_changes
    pearson = row_correlations(predicted, actual, "pearson")
    spearman = row_correlations(predicted, actual, "spearman")
    return Bunch(
        pearson=_mean_over_queries(pearson, "Pearson correlation"),
        spearman=_mean_over_queries(spearman, "Spearman correlation"),
        pearson_per_query=pearson,
        spearman_per_query=spearman,
        predicted=predicted,
        actual=actual,
    )


def linear_datamodeling_score(influences, truth, *, confidence=0.95):
    """Linear datamodeling score (LDS) of an influence matrix.

    For each random training subset ``S`` the influences predict the query
    loss of a model trained on ``S`` as ``-sum_{j in S} influences[i, j]``
    (up to a constant: more helpful points kept, lower loss). The LDS is the
    Spearman correlation between predicted and actual losses across subsets,
    averaged over query points.

    Parameters
    ----------
    influences : array-like of shape (n_query, n_train)
        Influences of every training point on every query loss.
    truth : DatamodelTruth
        Retrained ground truth (see :class:`LdsScorer`).
    confidence : float, default=0.95
        Level of the Student-t confidence interval of the mean over query
        points.

    Returns
    -------
    result : Bunch
        ``score`` (the LDS), ``interval`` (low, high), ``per_query``,
        ``predicted`` and ``actual`` (both ``(n_query, n_subsets)``).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    n_query = truth.losses.shape[0]
    influences = _check_influences(influences, n_query, truth.masks.shape[1])
    predicted = -influences @ truth.masks.T.astype(np.float64)
    per_query = row_correlations(predicted, truth.losses, "spearman")
    return Bunch(
        score=_mean_over_queries(per_query, "Spearman correlation"),
        interval=_confidence_interval(per_query, confidence),
        per_query=per_query,
        predicted=predicted,
        actual=truth.losses,
    )


def flipped_mask(flipped, n_train):
    """``flipped`` (indices or a boolean mask) as a boolean mask of length ``n_train``."""
    flipped = np.asarray(flipped)
    if flipped.dtype == bool:
        if flipped.shape != (n_train,):
            raise ValueError(f"A boolean flipped mask must have shape ({n_train},), got {flipped.shape}.")
        return flipped
    if flipped.size and not np.issubdtype(flipped.dtype, np.integer):
        raise ValueError(f"flipped must be integer indices or a boolean mask, got dtype {flipped.dtype}.")
    flipped = flipped.astype(int).ravel()
    if flipped.size and (flipped.min() < 0 or flipped.max() >= n_train):
        raise ValueError(f"flipped indices must lie in [0, {n_train}).")
    mask = np.zeros(n_train, dtype=bool)
    mask[flipped] = True
    return mask


def mislabel_detection(self_influence, flipped, *, top_fraction=0.1):
    """How well self-influence ranks known mislabelled points first.

    Parameters
    ----------
    self_influence : array-like of shape (n_train,)
        Self-influence of each training point (higher = more suspicious).
    flipped : array-like
        Indices of the points whose labels were flipped, or a boolean mask.
    top_fraction : float, default=0.1
        Fraction of the training set inspected, highest self-influence first.

    Returns
    -------
    result : Bunch
        ``roc_auc`` (of self-influence as a detector), ``fraction_found``
        (fraction of flipped points among the inspected ones, over all
        flipped points), ``n_inspected`` and ``random_fraction_found`` (the
        expected fraction for a random inspection order, ``top_fraction``).
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}.")
    scores = _as_array(self_influence, "self_influence").ravel()
    mask = flipped_mask(flipped, len(scores))
    if mask.all() or not mask.any():
        raise ValueError("flipped must mark some but not all training points.")
    n_inspected = max(1, int(round(top_fraction * len(scores))))
    inspected = np.argsort(-scores, kind="stable")[:n_inspected]
    return Bunch(
        roc_auc=float(roc_auc_score(mask, scores)),
        fraction_found=float(mask[inspected].sum() / mask.sum()),
        n_inspected=n_inspected,
        random_fraction_found=n_inspected / len(scores),
    )


def reference_agreement(influences, reference):
    """Correlation of an influence matrix with a reference one, per query point.

    Parameters
    ----------
    influences : array-like of shape (n_query, n_train)
        Influences to judge.
    reference : array-like of shape (n_query, n_train)
        Reference influences (for example from DirectInfluence or a tight CG).

    Returns
    -------
    result : Bunch
        ``pearson`` and ``spearman`` (means over query points),
        ``pearson_per_query``, ``spearman_per_query`` and
        ``max_relative_difference`` (``max |a - b| / max |b|``).
    """
    reference = _as_array(reference, "reference")
    if reference.ndim != 2:
        raise ValueError(f"reference must be a 2-D (n_query, n_train) matrix, got shape {reference.shape}.")
    influences = _check_influences(influences, *reference.shape)
    pearson = row_correlations(influences, reference, "pearson")
    spearman = row_correlations(influences, reference, "spearman")
    scale = np.abs(reference).max()
    return Bunch(
        pearson=_mean_over_queries(pearson, "Pearson correlation"),
        spearman=_mean_over_queries(spearman, "Spearman correlation"),
        pearson_per_query=pearson,
        spearman_per_query=spearman,
        max_relative_difference=float(np.abs(influences - reference).max() / scale) if scale > 0 else np.nan,
    )
