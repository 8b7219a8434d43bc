"""Ground truth by retraining: what query losses actually do without some points.

Ground truth depends on the training data, the query data, the loss and the
retraining procedure, never on the influence estimator being judged. It is
therefore computed once and reused: the scorers key it on all of these (see
``skinfl._cache``) so that a grid search scoring ten candidates retrains once
per split.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import joblib
import numpy as np
import torch
from sklearn.base import clone
from sklearn.utils import check_random_state
from torch import nn

from .._data import encoded_labels
from .._gradients import batch_slices
from .._model import LossSpec
from .._model_source import loss_on_device, model_source
from .._sklearn_models import is_sklearn_model
from .._skorch_nets import is_skorch_net
from .._validation import as_model_data, check_same_length

# Query losses of a retrained model are evaluated in chunks of this many samples.
_EVALUATION_CHUNK = 1024


@dataclass
class LeaveOneOutTruth:
    """Actual effect of removing single training points.

    Parameters
    ----------
    removed : ndarray of shape (n_removed,)
        Indices of the removed training points.
    n_train : int
        Size of the full training set.
    base_losses : ndarray of shape (n_query,)
        Query losses of the model retrained on all training points.
    loss_changes : ndarray of shape (n_query, n_removed)
        Query loss after retraining without ``removed[k]`` minus
        ``base_losses``.
    """

    removed: np.ndarray
    n_train: int
    base_losses: np.ndarray
    loss_changes: np.ndarray


@dataclass
class DatamodelTruth:
    """Query losses of models retrained on random training subsets.

    Parameters
    ----------
    masks : ndarray of bool, shape (n_subsets, n_train)
        ``masks[s, j]`` is True when training point ``j`` is in subset ``s``.
    losses : ndarray of shape (n_query, n_subsets)
        Query losses of the model retrained on each subset.
    """

    masks: np.ndarray
    losses: np.ndarray


def retrain_function(retrain):
    """``retrain`` as a function ``(X, y) -> model``.

    A callable is used as it is. An object with ``fit`` is cloned and fitted
    on every call; the model is the fitted object itself when it is a torch
    module, a skorch net or a scikit-learn model, else its ``module_``
    attribute.
    """
    if hasattr(retrain, "fit"):
        return _FitRetrain(retrain)
    if callable(retrain):
        return retrain
    raise TypeError(
        f"retrain must be a callable (X, y) -> torch.nn.Module or an object with fit(X, y), "
        f"got {type(retrain).__name__}."
    )


class _FitRetrain:
    def __init__(self, estimator):
        self.estimator = estimator

    def __call__(self, X, y):
        try:
            fresh = clone(self.estimator)
        except TypeError:
            fresh = copy.deepcopy(self.estimator)
        fitted = fresh.fit(X, y)
        fitted = fresh if fitted is None else fitted
        if isinstance(fitted, nn.Module) or is_skorch_net(fitted) or is_sklearn_model(fitted):
            return fitted  # skinfl takes skorch nets and scikit-learn models as they are
        module = getattr(fitted, "module_", None)
        if isinstance(module, nn.Module):
            return module
        raise TypeError(
            f"{type(self.estimator).__name__}.fit did not give a torch.nn.Module (neither the fitted "
            "object nor its module_ attribute is one); pass retrain as a callable (X, y) -> module instead."
        )


def query_losses(model, loss, X_query, y_query):
    """Per-sample losses of a (retrained) model at the query points.

    Parameters
    ----------
    model : torch.nn.Module, skorch net or scikit-learn model
        The model, evaluated in eval mode without gradients (a scikit-learn
        model through its converted module).
    loss : str, torch.nn.Module, callable or LossSpec
        The loss, as for the influence estimators (``"auto"``: the model's
        own), or an estimator's resolved ``loss_``.
    X_query, y_query : array-like or torch.Tensor
        Query points; a scikit-learn classifier's in its own labels.

    Returns
    -------
    losses : ndarray of shape (n_query,)
        Float64 losses.
    """
    if not (isinstance(model, nn.Module) or is_skorch_net(model) or is_sklearn_model(model)):
        raise TypeError(f"retrain must return a torch.nn.Module, a skorch net or a scikit-learn model, got "
                        f"{type(model).__name__}.")
    source = model_source(model, "auto" if isinstance(loss, LossSpec) else loss)
    model = source.module.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    spec = loss_on_device(loss if isinstance(loss, LossSpec) else source.loss, device)
    if source.classes is not None:
        y_query = encoded_labels(y_query, source.classes, "y_query")
    X_t, y_t = as_model_data(model, spec, X_query, y_query, ("X_query", "y_query"))
    values = []
    with torch.no_grad():
        for start in range(0, len(X_t), _EVALUATION_CHUNK):
            rows = slice(start, start + _EVALUATION_CHUNK)
            values.append(spec.per_sample(model(X_t[rows]), y_t[rows]))
    return torch.cat(values).double().cpu().numpy()


def training_losses(estimator, X, y):
    """Each training point's loss under a fitted estimator's model (the ranking influence is compared with).

    Streamed through the estimator's data source in ``batch_size`` rows, as
    the training set may be large; :func:`query_losses` converts its whole
    input at once, which suits query points only.
    """
    data = estimator._check_data(X, y)
    fmodel = estimator._functional_model()
    losses = np.empty(len(data))
    with torch.no_grad():
        for rows in batch_slices(len(data), estimator.batch_size):
            x, target = data.batch(rows)
            losses[rows] = fmodel.per_sample_objective(fmodel.params, x, target).double().cpu().numpy()
    return losses


def _row_indexable(data):
    """``data`` as something indexed by rows with an integer array: a tensor or a numpy array.

    (A pandas DataFrame indexed with ``[rows]`` would select columns.)
    """
    if isinstance(data, torch.Tensor):
        return data
    if hasattr(data, "to_numpy"):
        return data.to_numpy()
    return np.asarray(data)


def _training_set(retrain, X, y):
    X, y = _row_indexable(X), _row_indexable(y)
    check_same_length(X, y)
    return retrain_function(retrain), X, y


def _losses_after_retraining(retrain, loss, X, y, rows, X_query, y_query):
    keep = torch.as_tensor(rows) if isinstance(X, torch.Tensor) else rows
    model = retrain(X[keep], y[keep])
    return query_losses(model, loss, X_query, y_query)


def _parallel(n_jobs):
    return joblib.Parallel(n_jobs=n_jobs, prefer="processes")


def leave_one_out_truth(retrain, X, y, X_query, y_query, *, loss, removed=None, n_jobs=None):
    """Retrain without each point of ``removed`` and record the query-loss changes.

    Parameters
    ----------
    retrain : callable or estimator
        ``retrain(X, y) -> torch.nn.Module``, or an object with ``fit``
        (see :class:`skinfl.metrics.LeaveOneOutScorer`).
    X, y : array-like or torch.Tensor
        The full training set.
    X_query, y_query : array-like or torch.Tensor
        Query points whose losses are tracked.
    loss : str, torch.nn.Module or callable
        The loss, as for the influence estimators.
    removed : array-like of int or None, default=None
        Training points to remove one at a time; None removes each in turn.
    n_jobs : int or None, default=None
        Retrainings run in parallel with joblib.

    Returns
    -------
    truth : LeaveOneOutTruth
        Removed indices, baseline query losses and their changes.
    """
    retrain, X, y = _training_set(retrain, X, y)
    n_train = len(X)
    removed = np.arange(n_train) if removed is None else np.asarray(removed, dtype=int)
    if removed.ndim != 1 or (removed.size and (removed.min() < 0 or removed.max() >= n_train)):
        raise ValueError(f"removed must be a 1-D array of indices in [0, {n_train}).")
    everything = np.arange(n_train)
    base = query_losses(retrain(X, y), loss, X_query, y_query)
    after = _parallel(n_jobs)(
        joblib.delayed(_losses_after_retraining)(
            retrain, loss, X, y, np.delete(everything, j), X_query, y_query
        )
        for j in removed
    )
    changes = np.stack(after, axis=1) - base[:, None] if after else np.empty((len(base), 0))
    return LeaveOneOutTruth(removed=removed, n_train=n_train, base_losses=base, loss_changes=changes)


def random_subsets(n_train, alpha, n_subsets, random_state):
    """Boolean masks of random training subsets of equal size.

    Parameters
    ----------
    n_train : int
        Size of the training set.
    alpha : float
        Fraction of it in each subset (``round(alpha * n_train)`` points).
    n_subsets : int
        Number of subsets.
    random_state : int, RandomState instance or None
        Seed of the draw.

    Returns
    -------
    masks : ndarray of bool, shape (n_subsets, n_train)
        ``masks[s, j]`` is True when point ``j`` is in subset ``s``.
    """
    rng = check_random_state(random_state)
    size = int(round(alpha * n_train))
    if not 0 < size <= n_train:
        raise ValueError(f"alpha={alpha} gives subsets of {size} of the {n_train} training points; it must give at least one.")
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for row in masks:
        row[rng.choice(n_train, size=size, replace=False)] = True
    return masks


def datamodel_truth(retrain, X, y, X_query, y_query, *, loss, masks, n_jobs=None):
    """Retrain on each subset in ``masks`` and record the query losses.

    Parameters
    ----------
    retrain : callable or estimator
        See :func:`leave_one_out_truth`.
    X, y : array-like or torch.Tensor
        The full training set.
    X_query, y_query : array-like or torch.Tensor
        Query points whose losses are tracked.
    loss : str, torch.nn.Module or callable
        The loss, as for the influence estimators.
    masks : ndarray of bool, shape (n_subsets, n_train)
        The subsets (see :func:`random_subsets`).
    n_jobs : int or None, default=None
        Retrainings run in parallel with joblib.

    Returns
    -------
    truth : DatamodelTruth
        The masks and the query losses of each retrained model.
    """
    retrain, X, y = _training_set(retrain, X, y)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != len(X):
        raise ValueError(f"masks must have shape (n_subsets, {len(X)}), got {masks.shape}.")
    losses = _parallel(n_jobs)(
        joblib.delayed(_losses_after_retraining)(retrain, loss, X, y, np.flatnonzero(mask), X_query, y_query)
        for mask in masks
    )
    return DatamodelTruth(masks=masks, losses=np.stack(losses, axis=1))
