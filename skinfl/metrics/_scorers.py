"""Scorer objects: ``scorer(estimator, X_query, y_query) -> float``, higher is better.

Each can be passed as ``GridSearchCV(..., scoring=scorer)``. The estimator
is fitted on the training part of a split and scored on the query part;
the ground truth (retraining) depends only on the data, so it is computed at
the first call for a split and reused for every other candidate.

The in-memory cache lives in the scorer object, which is enough when the
search runs in one process (``n_jobs=None``). With ``n_jobs > 1`` each worker
gets its own copy of the scorer: pass ``memory`` (a directory or a
``joblib.Memory``) so that workers share the ground truth on disk.
"""

from __future__ import annotations

import dataclasses

import joblib
import numpy as np
import torch
from sklearn.base import clone
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from .._cache import directory_of, stored, token
from .._warnings import warn
from ..base import BaseInfluence
from ..ensemble import InfluenceEnsemble
from ._ground_truth import (
    DatamodelTruth,
    LeaveOneOutTruth,
    datamodel_truth,
    leave_one_out_truth,
    random_subsets,
    retrain_function,
)
from ._scores import (
    flipped_mask,
    leave_one_out_agreement,
    linear_datamodeling_score,
    mislabel_detection,
    reference_agreement,
)


def _check_metric(metric, allowed):
    if metric not in allowed:
        raise ValueError(f"metric must be one of {sorted(allowed)}, got {metric!r}.")


def _fitted_influence_estimator(estimator, scorer):
    if not isinstance(estimator, (BaseInfluence, InfluenceEnsemble)):
        raise TypeError(f"{scorer} scores skinfl influence estimators and InfluenceEnsemble, got "
                        f"{type(estimator).__name__}.")
    check_is_fitted(estimator)
    return estimator


def _data_holder(estimator):
    """The estimator whose training data, size and loss a scorer reads: itself, or an ensemble's first
    member (the members of an ensemble are fitted on the same data, with the same loss)."""
    return estimator._members()[0] if isinstance(estimator, InfluenceEnsemble) else estimator


def _as_numpy(data):
    if hasattr(data, "detach"):
        return data.detach().cpu().numpy()
    return np.asarray(data)


def _fitted_data(estimator):
    """The data the estimator was fitted on, as it keeps them (arrays, tensors, memmaps)."""
    estimator = _data_holder(estimator)
    if estimator._fit_data is None:
        raise ValueError(
            f"This {type(estimator).__name__} was saved without its training data (include_data=False); "
            "scorers need it: fit the estimator again."
        )
    return estimator._fit_data.arrays()


def _training_data(estimator):
    """The data the estimator was fitted on, as numpy arrays (what ``retrain`` receives)."""
    return tuple(_as_numpy(data) for data in _fitted_data(estimator))


# Cached values are tensors and JSON on disk (never pickles): the ground-truth
# types are written field by field and rebuilt from this list only.
_CACHED_TYPES = {cls.__name__: cls for cls in (LeaveOneOutTruth, DatamodelTruth)}


def _encode(value):
    if isinstance(value, np.ndarray):
        return {"array": torch.from_numpy(np.ascontiguousarray(value))}, {"type": "ndarray"}
    tensors, scalars = {}, {}
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if isinstance(item, np.ndarray):
            tensors[field.name] = torch.from_numpy(np.ascontiguousarray(item))
        else:
            scalars[field.name] = item
    return tensors, {"type": type(value).__name__, "scalars": scalars}


def _decode(tensors, metadata):
    if metadata.get("type") == "ndarray":
        return tensors["array"].numpy()
    cls = _CACHED_TYPES.get(metadata.get("type"))
    if cls is None:
        raise ValueError(f"Unknown cached ground-truth type {metadata.get('type')!r}.")
    return cls(**{name: tensor.numpy() for name, tensor in tensors.items()}, **metadata["scalars"])


class _CachingScorer:
    """Shared plumbing: an in-memory cache, an optional joblib.Memory.

    Subclasses name the attribute holding the procedure that computes the
    cached values (``retrain``, ``reference``) in ``_procedure_attribute``.
    """

    _procedure_attribute = "retrain"

    def __init__(self, memory):
        self.memory = memory
        self._cache = {}

    def __getstate__(self):
        # A worker process may not be able to hash the procedure the way this
        # process does (a class defined in a script is rebuilt by value
        # there), so the disk key's procedure token is fixed here, at pickling.
        state = self.__dict__.copy()
        state["_procedure_token"] = token(getattr(self, self._procedure_attribute))
        return state

    def _token_of(self, procedure):
        if "_procedure_token" in self.__dict__ and procedure is getattr(self, self._procedure_attribute):
            return self.__dict__["_procedure_token"]
        return token(procedure)

    def _cached(self, parts, procedure, compute):
        """``compute()`` cached on the data ``parts`` and the ``procedure`` that computes it.

        In memory, the procedure (retrain, reference) is identified by the
        object itself: a retrain that keeps state between calls (a warm
        start, a counter) is still the same procedure. On disk it is
        identified by its parameters or its pickled form (see ``token``).
        """
        data_tokens = [token(part) for part in parts]
        memory_key = joblib.hash([*data_tokens, f"id-{id(procedure)}"])
        if memory_key in self._cache:
            return self._cache[memory_key]
        directory = directory_of(self.memory)
        disk_key = None
        if directory is not None:
            procedure_token = self._token_of(procedure)
            if procedure_token.startswith("id-") or any(t.startswith("id-") for t in data_tokens):
                warn(
                    f"{type(self).__name__}: an argument (typically retrain, or a custom loss) cannot be "
                    "pickled, so its ground truth cannot be stored on disk and shared between processes; "
                    "it is cached in this scorer only. Use a picklable retrain (a module-level function "
                    "or an object).",
                    UserWarning,
                )
            else:
                disk_key = joblib.hash([*data_tokens, procedure_token])
        value = stored(directory if disk_key else None, disk_key, compute, _encode, _decode)
        self._cache[memory_key] = value
        return value

    def __repr__(self):
        shown = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({shown})"


def _require_targets(y, name):
    if y is None:
        raise ValueError(
            f"{name} compares query losses, which need targets: pass y for the query points "
            "(with GridSearchCV, fit the search with y)."
        )


class _RetrainingScorer(_CachingScorer):
    """Scorers whose ground truth comes from ``retrain`` on the estimator's training data."""

    def _retrained_truth(self, estimator, X_query, y_query, settings, compute_from):
        """``compute_from(X, y)`` on the estimator's training data, cached on the data and ``settings``."""
        _require_targets(y_query, type(self).__name__)
        X, y = _training_data(estimator)
        retrain_function(self.retrain)  # fail early on a bad retrain
        # An integer seed draws the same points every time; any other random_state is drawn once per cache entry.
        seed = self.random_state if isinstance(self.random_state, (int, np.integer)) else None
        loss = _data_holder(estimator).loss_
        parts = (type(self).__name__, X, y, X_query, y_query, loss.kind, loss.function, loss.normalizer,
                 loss.takes_probabilities, *settings, seed)
        return self._cached(parts, self.retrain, lambda: compute_from(X, y))


class LeaveOneOutScorer(_RetrainingScorer):
    """Leave-one-out agreement of influences with retraining, as a scorer.

    The estimator, fitted on ``n`` training points, predicts that removing
    training point ``j`` changes the loss at query point ``i`` by
    ``influences[i, j] / n``. The model is retrained on all points and
    without each removed point, and the scorer returns the correlation
    between predicted and actual changes across removed points, averaged
    over query points (see :func:`leave_one_out_agreement`).

    Parameters
    ----------
    retrain : callable or estimator
        ``retrain(X, y) -> torch.nn.Module`` returns a model trained on
        ``(X, y)`` (numpy arrays, as the estimator was fitted), with the same
        architecture as the estimator's model; or an object with ``fit``
        (cloned and fitted; the model is the fitted object or its
        ``module_``). See :mod:`skinfl.retraining` for ready-made ones.
        The baseline is ``retrain`` on all points, not the estimator's model,
        so that both sides of each difference come from the same procedure.
    n_removals : int or None, default=None
        Number of training points removed (one at a time), drawn at random;
        None removes every training point.
    metric : {"pearson", "spearman"}, default="pearson"
        Correlation returned.
    random_state : int, RandomState instance or None, default=None
        Draws the removed points when ``n_removals`` is set. The draw is made
        once per training set and reused for every candidate.
    n_jobs : int or None, default=None
        Retrainings run in parallel with joblib.
    memory : str, joblib.Memory or None, default=None
        Also store the ground truth here, to share it between processes
        (``GridSearchCV(n_jobs > 1)``) and sessions. Entries are arrays and
        JSON, never unpickled.

    See Also
    --------
    leave_one_out_agreement : The score on arrays.
    LdsScorer : Agreement with retraining on random subsets.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfl import DirectInfluence
    >>> from skinfl.metrics import LeaveOneOutScorer
    >>> from skinfl.retraining import LogisticRegressionRetrainer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> X_train, y_train, X_query, y_query = X[:200], y[:200], X[500:520], y[500:520]
    >>> retrain = LogisticRegressionRetrainer(C=0.1)
    >>> model = retrain(X_train, y_train)
    >>> estimator = DirectInfluence(model, loss="bce_with_logits",
    ...                             regularization=retrain.regularization_for(200))
    >>> scorer = LeaveOneOutScorer(retrain, n_removals=20, random_state=0)
    >>> score = scorer(estimator.fit(X_train, y_train), X_query, y_query)
    >>> bool(score > 0.95)
    True
    """

    def __init__(self, retrain, *, n_removals=None, metric="pearson", random_state=None, n_jobs=None, memory=None):
        super().__init__(memory)
        self.retrain = retrain
        self.n_removals = n_removals
        self.metric = metric
        self.random_state = random_state
        self.n_jobs = n_jobs

    def ground_truth(self, estimator, X_query, y_query):
        """The retrained ground truth for this estimator's training set (cached).

        Parameters
        ----------
        estimator : BaseInfluence or InfluenceEnsemble
            A fitted influence estimator (or an ensemble of them); its training data are used.
        X_query, y_query : array-like or torch.Tensor
            Query points.

        Returns
        -------
        truth : LeaveOneOutTruth
            Removed indices, baseline query losses and their changes.
        """
        n_train = _data_holder(estimator).n_samples_fit_
        if self.n_removals is not None and not 0 < self.n_removals <= n_train:
            raise ValueError(f"n_removals={self.n_removals} must be in [1, {n_train}] (the training set size).")

        def compute_from(X, y):
            removed = None
            if self.n_removals is not None:
                rng = check_random_state(self.random_state)
                removed = np.sort(rng.choice(len(X), size=self.n_removals, replace=False))
            return leave_one_out_truth(
                self.retrain, X, y, X_query, y_query, loss=_data_holder(estimator).loss_, removed=removed,
                n_jobs=self.n_jobs
            )

        return self._retrained_truth(estimator, X_query, y_query, (self.n_removals,), compute_from)

    def __call__(self, estimator, X, y):
        """Score a fitted estimator on query points ``(X, y)``.

        Parameters
        ----------
        estimator : BaseInfluence or InfluenceEnsemble
            A fitted influence estimator, or an ensemble of them.
        X, y : array-like or torch.Tensor
            Query points.

        Returns
        -------
        score : float
            The mean correlation over query points (higher is better).
        """
        _check_metric(self.metric, {"pearson", "spearman"})
        estimator = _fitted_influence_estimator(estimator, type(self).__name__)
        truth = self.ground_truth(estimator, X, y)
        result = leave_one_out_agreement(estimator.influences(X, y), truth)
        return result[self.metric]


class LdsScorer(_RetrainingScorer):
    """Linear datamodeling score (LDS) as a scorer.

    The model is retrained on ``n_subsets`` random subsets of the training
    set, each holding a fraction ``alpha`` of it. For each query point the
    scorer takes the Spearman correlation, across subsets, between the
    actual query loss and the loss the influences predict
    (``-sum_{j in subset} influences[i, j]``), and averages over query points
    (see :func:`linear_datamodeling_score`, which also gives the interval).

    Parameters
    ----------
    retrain : callable or estimator
        See :class:`LeaveOneOutScorer`.
    alpha : float, default=0.5
        Fraction of the training set in each subset.
    n_subsets : int, default=50
        Number of subsets (one retraining each).
    random_state : int, RandomState instance or None, default=None
        Draws the subsets (once per training set, reused for every candidate).
    n_jobs : int or None, default=None
        Retrainings run in parallel with joblib.
    memory : str, joblib.Memory or None, default=None
        Also store the ground truth here (see :class:`LeaveOneOutScorer`).

    See Also
    --------
    linear_datamodeling_score : The score on arrays, with its confidence interval.
    LeaveOneOutScorer : Agreement with single removals.

    Examples
    --------
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfl import DirectInfluence
    >>> from skinfl.metrics import LdsScorer
    >>> from skinfl.retraining import LogisticRegressionRetrainer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> retrain = LogisticRegressionRetrainer(C=0.1)
    >>> estimator = DirectInfluence(retrain(X[:200], y[:200]), loss="bce_with_logits",
    ...                             regularization=retrain.regularization_for(200)).fit(X[:200], y[:200])
    >>> score = LdsScorer(retrain, n_subsets=20, random_state=0)(estimator, X[500:520], y[500:520])
    >>> bool(score > 0.8)
    True
    """

    def __init__(self, retrain, *, alpha=0.5, n_subsets=50, random_state=None, n_jobs=None, memory=None):
        super().__init__(memory)
        self.retrain = retrain
        self.alpha = alpha
        self.n_subsets = n_subsets
        self.random_state = random_state
        self.n_jobs = n_jobs

    def ground_truth(self, estimator, X_query, y_query):
        """The retrained ground truth for this estimator's training set (cached).

        Parameters
        ----------
        estimator : BaseInfluence or InfluenceEnsemble
            A fitted influence estimator (or an ensemble of them); its training data are used.
        X_query, y_query : array-like or torch.Tensor
            Query points.

        Returns
        -------
        truth : DatamodelTruth
            The subsets and the query losses of each retrained model.
        """
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}.")
        if int(self.n_subsets) < 3:
            raise ValueError(f"n_subsets must be at least 3 for a rank correlation, got {self.n_subsets}.")

        def compute_from(X, y):
            masks = random_subsets(len(X), self.alpha, int(self.n_subsets), self.random_state)
            return datamodel_truth(self.retrain, X, y, X_query, y_query, loss=_data_holder(estimator).loss_,
                                   masks=masks, n_jobs=self.n_jobs)

        return self._retrained_truth(estimator, X_query, y_query, (self.alpha, self.n_subsets), compute_from)

    def __call__(self, estimator, X, y):
        """Score a fitted estimator on query points ``(X, y)``.

        Parameters
        ----------
        estimator : BaseInfluence or InfluenceEnsemble
            A fitted influence estimator, or an ensemble of them.
        X, y : array-like or torch.Tensor
            Query points.

        Returns
        -------
        score : float
            The LDS (higher is better).
        """
        estimator = _fitted_influence_estimator(estimator, type(self).__name__)
        truth = self.ground_truth(estimator, X, y)
        return linear_datamodeling_score(estimator.influences(X, y), truth).score


class MislabelScorer:
    """Mislabel detection by self-influence, as a scorer.

    Ranks the estimator's training points by self-influence and scores how
    well the known flipped labels come first. The query points passed by the
    search are not used: the score is about the training set.

    Parameters
    ----------
    flipped : array-like
        Indices, into the data the estimator is fitted on, of the points whose
        labels were flipped, or a boolean mask over those data. With a
        predefined split, these are positions within the training part.
    metric : {"roc_auc", "fraction_found"}, default="roc_auc"
        ``"roc_auc"``: area under the ROC curve of self-influence as a
        detector. ``"fraction_found"``: fraction of flipped points among the
        ``top_fraction`` highest self-influences.
    top_fraction : float, default=0.1
        Fraction inspected for ``"fraction_found"``.

    See Also
    --------
    mislabel_detection : The score on arrays.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfl import DirectInfluence
    >>> from skinfl.metrics import MislabelScorer
    >>> from skinfl.retraining import LogisticRegressionRetrainer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X, y = StandardScaler().fit_transform(X)[:200], y[:200].copy()
    >>> flipped = np.arange(0, 200, 20)
    >>> y[flipped] = 1 - y[flipped]
    >>> retrain = LogisticRegressionRetrainer(C=0.1)
    >>> estimator = DirectInfluence(retrain(X, y), loss="bce_with_logits",
    ...                             regularization=retrain.regularization_for(200)).fit(X, y)
    >>> bool(MislabelScorer(flipped)(estimator) > 0.9)
    True
    """

    def __init__(self, flipped, *, metric="roc_auc", top_fraction=0.1):
        self.flipped = flipped
        self.metric = metric
        self.top_fraction = top_fraction

    def __call__(self, estimator, X=None, y=None):
        """Score a fitted estimator; ``X`` and ``y`` are ignored.

        Parameters
        ----------
        estimator : BaseInfluence or InfluenceEnsemble
            A fitted influence estimator, or an ensemble of them.
        X, y : object, default=None
            Ignored (accepted for the scorer signature).

        Returns
        -------
        score : float
            ROC AUC or fraction found (higher is better).
        """
        _check_metric(self.metric, {"roc_auc", "fraction_found"})
        estimator = _fitted_influence_estimator(estimator, type(self).__name__)
        mask = flipped_mask(self.flipped, _data_holder(estimator).n_samples_fit_)
        values = _as_numpy(estimator.self_influence(*_fitted_data(estimator)))
        return mislabel_detection(values, mask, top_fraction=self.top_fraction)[self.metric]

    def __repr__(self):
        return f"MislabelScorer(flipped=<{int(np.asarray(self.flipped).size)} entries>, metric={self.metric!r}, top_fraction={self.top_fraction})"


class ReferenceAgreementScorer(_CachingScorer):
    """Agreement with a reference influence estimator, without retraining.

    The reference (for example ``DirectInfluence`` or a tightly converged
    ``CgInfluence``) is cloned, fitted on the scored estimator's training
    data and evaluated on the query points once per split; the scorer
    returns the correlation of the two influence matrices per query point,
    averaged (see :func:`reference_agreement`).

    Parameters
    ----------
    reference : BaseInfluence
        The reference estimator (fitted or not: it is cloned and refitted on
        the same training data).
    metric : {"pearson", "spearman"}, default="pearson"
        Correlation returned.
    memory : str, joblib.Memory or None, default=None
        Also store the reference influences here (see
        :class:`LeaveOneOutScorer`).

    See Also
    --------
    reference_agreement : The score on arrays.

    Examples
    --------
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skinfl import CgInfluence, DirectInfluence
    >>> from skinfl.metrics import ReferenceAgreementScorer
    >>> from skinfl.retraining import LogisticRegressionRetrainer
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> model = LogisticRegressionRetrainer(C=0.1)(X[:200], y[:200])
    >>> scorer = ReferenceAgreementScorer(DirectInfluence(model, loss="bce_with_logits", regularization=0.005))
    >>> estimator = CgInfluence(model, loss="bce_with_logits", regularization=0.005, random_state=0)
    >>> bool(scorer(estimator.fit(X[:200], y[:200]), X[500:520], y[500:520]) > 0.99)
    True
    """

    _procedure_attribute = "reference"

    def __init__(self, reference, *, metric="pearson", memory=None):
        super().__init__(memory)
        self.reference = reference
        self.metric = metric

    def reference_influences(self, estimator, X_query, y_query):
        """The reference influence matrix for this training set and these query points (cached).

        Parameters
        ----------
        estimator : BaseInfluence or InfluenceEnsemble
            A fitted influence estimator (or an ensemble of them); its training data are used.
        X_query, y_query : array-like or torch.Tensor
            Query points.

        Returns
        -------
        influences : ndarray of shape (n_query, n_train)
            The reference estimator's influences.
        """
        if not isinstance(self.reference, BaseInfluence):
            raise TypeError(f"reference must be a skinfl influence estimator, got {type(self.reference).__name__}.")
        X, y = _fitted_data(estimator)

        def compute():
            fitted = clone(self.reference).fit(X, y)
            values = fitted.influences(X_query, y_query)
            return values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)

        return self._cached(("reference", X, y, X_query, y_query), self.reference, compute)

    def __call__(self, estimator, X, y=None):
        """Score a fitted estimator on query points ``(X, y)``.

        Parameters
        ----------
        estimator : BaseInfluence or InfluenceEnsemble
            A fitted influence estimator, or an ensemble of them.
        X, y : array-like or torch.Tensor
            Query points; ``y=None`` compares influences on the prediction
            measurement.

        Returns
        -------
        score : float
            The mean correlation over query points (higher is better).
        """
        _check_metric(self.metric, {"pearson", "spearman"})
        estimator = _fitted_influence_estimator(estimator, type(self).__name__)
        reference = self.reference_influences(estimator, X, y)
        return reference_agreement(estimator.influences(X, y), reference)[self.metric]
