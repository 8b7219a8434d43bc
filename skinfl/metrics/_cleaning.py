"""Data cleaning: remove the training points most harmful to a validation loss, retrain, measure accuracy.

This is the use that pays for influence functions: rank the training points
by how much they raise the loss on held-out validation data, drop the worst,
retrain, and see whether the model gets better. The ranking is compared
with two baselines that cost nothing to compute, the training loss of each
point and a random order, on a third set of points, the test set: the
validation set chose which points to remove, so the accuracy on it would
overstate what cleaning achieves.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import joblib
import numpy as np
import torch
from sklearn import get_config
from sklearn.utils import Bunch, check_random_state
from torch import nn

from .._model import output_tensor
from .._validation import check_same_length, input_chunk_to_tensor
from ..ensemble import InfluenceEnsemble
from ._ground_truth import _EVALUATION_CHUNK, _parallel, _row_indexable, retrain_function, training_losses
from ._scorers import _as_numpy, _CachingScorer, _fitted_data, _fitted_influence_estimator, _training_data

RANKINGS = ("influence", "loss", "random")

# Bytes of one influence value as the blocks are sized: float64, the widest type an estimator computes in.
_ITEMSIZE = 8


def _n_rows(data):
    if isinstance(data, Mapping):
        return _n_rows(next(iter(data.values())))
    shape = getattr(data, "shape", None)
    return int(shape[0]) if shape is not None else len(data)


def _row_slice(data, rows):
    """Rows ``rows`` (a slice) of inputs or targets, in their own type (a DataFrame stays one)."""
    if isinstance(data, Mapping):
        return {key: _row_slice(value, rows) for key, value in data.items()}
    if hasattr(data, "iloc"):
        return data.iloc[rows]
    return data[rows]


def _check_rankings(rankings):
    rankings = (rankings,) if isinstance(rankings, str) else tuple(rankings)
    unknown = [name for name in rankings if name not in RANKINGS]
    if unknown:
        raise ValueError(f"Unknown ranking {unknown[0]!r}; rankings must be among {list(RANKINGS)}.")
    if not rankings:
        raise ValueError(f"rankings is empty; give one or more of {list(RANKINGS)}.")
    if len(set(rankings)) != len(rankings):
        raise ValueError(f"rankings must not repeat a name, got {list(rankings)}.")
    return rankings


def _removal_counts(fractions, n_train):
    """The number of training points each fraction removes, ``round(fraction * n_train)``."""
    values = np.asarray(fractions, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("fractions is empty; give one or more fractions of the training set in (0, 1).")
    outside = values[~((values > 0) & (values < 1))]
    if outside.size:
        raise ValueError(f"fractions must lie in (0, 1) (strictly), got {outside[0]!r}.")
    counts = np.rint(values * n_train).astype(int)  # half to even, as round()
    if counts.min() == 0:
        fraction = values[counts.argmin()]
        raise ValueError(
            f"fraction {fraction:g} removes no point of the {n_train} training points "
            f"(round({fraction:g} * {n_train}) = 0); use fractions of at least {0.5 / n_train:.3g}."
        )
    if counts.max() >= n_train:
        raise ValueError(f"fraction {values[counts.argmax()]:g} removes all {n_train} training points.")
    return values, counts


def _check_pair(X, y, names, what):
    if X is None or y is None:
        raise ValueError(f"{names[0]} and {names[1]} are both required: {what}.")
    check_same_length(X, y, names)


def _validation_influence(estimator, X_val, y_val, X=None, y=None, *, normalize=None):
    """Influence of each training point summed over validation points, computed in blocks of rows.

    ``scores[j] = sum_i influences(X_val, y_val, X, y)[i, j]``: positive
    when training point ``j`` lowers the validation loss as a whole, negative
    when it raises it. Validation rows are taken as many at a time as keep
    one block of influences within scikit-learn's ``working_memory``.

    Parameters
    ----------
    estimator : BaseInfluence
        A fitted influence estimator.
    X_val, y_val : array-like or torch.Tensor
        Validation points and their targets.
    X, y : array-like or torch.Tensor, default=None
        Training points to score; None scores the data given to ``fit``.
    normalize : {None, "relatif", "cosine"}, default=None
        Passed to ``estimator.influences`` when not None.

    Returns
    -------
    scores : ndarray of shape (n_train,)
        Float64 sums over the validation points.
    """
    n_train = estimator.n_samples_fit_ if X is None else _n_rows(X)
    n_val = _n_rows(X_val)
    rows_per_block = max(1, int(get_config()["working_memory"] * 2**20 // (n_train * _ITEMSIZE)))
    keywords = {} if normalize is None else {"normalize": normalize}
    scores = np.zeros(n_train)
    for start in range(0, n_val, rows_per_block):
        rows = slice(start, min(start + rows_per_block, n_val))
        block = estimator.influences(_row_slice(X_val, rows), _row_slice(y_val, rows), X, y, **keywords)
        scores += np.asarray(_as_numpy(block), dtype=np.float64).sum(axis=0)
    return scores


def _training_losses(estimator, X, y):
    """Training losses under the estimator's model; for an ensemble, the weighted mean over its members'."""
    if isinstance(estimator, InfluenceEnsemble):
        return sum(weight * training_losses(member, X, y)
                   for weight, member in zip(estimator.weights_, estimator._members()))
    return training_losses(estimator, X, y)


def _torch_predictions(model, X):
    """Predicted classes of a torch module: the argmax over its outputs, or a positive single logit."""
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
    device = parameter.device if parameter is not None else torch.device("cpu")
    model = model.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, _n_rows(X), _EVALUATION_CHUNK):
            batch = _row_slice(X, slice(start, start + _EVALUATION_CHUNK))
            if isinstance(batch, Mapping):
                output = model(**{key: input_chunk_to_tensor(value, dtype, f"X_test[{key!r}]").to(device)
                                  for key, value in batch.items()})
            else:
                output = model(input_chunk_to_tensor(batch, dtype, "X_test").to(device))
            output = output_tensor(output)
            output = output.reshape(len(output), -1) if output.ndim == 1 else output
            if output.ndim != 2:
                raise ValueError(
                    f"Accuracy needs one score per class for each sample (an output of shape (n, n_classes), "
                    f"or (n, 1) for one logit); the retrained model outputs shape {tuple(output.shape)}."
                )
            predicted = output.argmax(dim=1) if output.shape[1] > 1 else (output[:, 0] > 0).long()
            predictions.append(predicted.cpu())
    return torch.cat(predictions).numpy()


def _accuracy(model, X, y):
    """Fraction of the points ``(X, y)`` that ``model`` classifies correctly.

    A torch module predicts the argmax of its output over classes, or class 1
    where a single logit is positive; anything else (a scikit-learn model, a
    skorch net) predicts with its ``predict``.
    """
    y = _as_numpy(y)
    y = y.reshape(len(y), -1)
    if y.shape[1] != 1:
        raise ValueError(f"y_test must hold one class label per sample, got shape {y.shape}.")
    if isinstance(model, nn.Module):
        predicted = _torch_predictions(model, X)
    elif hasattr(model, "predict"):
        predicted = _as_numpy(model.predict(X))
    else:
        raise TypeError(
            f"retrain must return a torch.nn.Module or a model with predict, got {type(model).__name__}."
        )
    return float(np.mean(predicted.reshape(len(y)) == y[:, 0]))


def _accuracy_after_retraining(retrain, X, y, rows, X_test, y_test):
    keep = torch.as_tensor(rows, device=X.device) if isinstance(X, torch.Tensor) else rows
    return _accuracy(retrain(X[keep], y[keep]), X_test, y_test)


def _retained_rows(n_train, removed):
    keep = np.ones(n_train, dtype=bool)
    keep[removed] = False
    return np.flatnonzero(keep)


def data_cleaning(
    estimator,
    retrain,
    X_val,
    y_val,
    X_test,
    y_test,
    *,
    X=None,
    y=None,
    fractions=(0.01, 0.02, 0.05, 0.1, 0.2),
    rankings=RANKINGS,
    normalize=None,
    n_random=5,
    random_state=None,
    n_jobs=None,
    influence_scores=None,
):
    """Held-out accuracy after removing the training points most harmful to a validation loss.

    Each ranking orders the training points most harmful first; for each
    fraction, the first ``round(fraction * n_train)`` points of the order are
    removed, the model is retrained on the rest with ``retrain``, and its
    accuracy is measured on ``(X_test, y_test)``. The rankings:

    - ``"influence"``: the influence of each training point summed over the
      validation points, ``sum_i influences(X_val, y_val)[i, j]``, most
      negative first (the points whose removal lowers the validation loss
      most). The sum is taken over blocks of validation rows, each within
      scikit-learn's ``working_memory``.
    - ``"loss"``: the training loss of each point under the estimator's
      model (an ensemble's: the weighted mean of its members'), highest
      first: the usual baseline, which needs no influence.
    - ``"random"``: ``n_random`` random orders; their accuracies are averaged.

    The test set must be separate from the validation set: the validation
    set chose the points removed, so accuracy on it would overstate the gain
    (removing points that hurt a set of points helps that set by
    construction, even when nothing generalises).

    Cost: ``len(fractions) * n_orders + 1`` retrainings, where ``n_orders``
    counts each ranking once and ``"random"`` ``n_random`` times (the ``+ 1``
    is the baseline on all training points).

    Parameters
    ----------
    estimator : BaseInfluence, InfluenceEnsemble or None
        A fitted influence estimator, whose model is the one trained on the
        training set. It may be None when ``influence_scores``, ``X`` and
        ``y`` are given and ``"loss"`` is not among ``rankings``.
    retrain : callable or estimator
        ``retrain(X, y) -> model`` returns a model trained on ``(X, y)``: a
        torch module (its prediction is the argmax of its outputs, or class 1
        where a single logit is positive), or a model with ``predict`` (a
        scikit-learn model, a skorch net); or an object with ``fit`` (see
        :class:`LeaveOneOutScorer`). See :mod:`skinfl.retraining` for
        ready-made ones.
    X_val, y_val : array-like or torch.Tensor
        Validation points, whose summed loss ranks the training points
        (unused, and may be None, without the ``"influence"`` ranking or
        with ``influence_scores``).
    X_test, y_test : array-like or torch.Tensor
        Test points, on which accuracy is measured; ``y_test`` holds one
        class label per sample.
    X, y : array-like or torch.Tensor, default=None
        The training set; None uses the data the estimator was fitted on.
    fractions : sequence of float, default=(0.01, 0.02, 0.05, 0.1, 0.2)
        Fractions of the training set to remove, each in (0, 1).
    rankings : sequence of {"influence", "loss", "random"}, default=("influence", "loss", "random")
        The orders compared.
    normalize : {None, "relatif", "cosine"}, default=None
        Normalization of the influences summed for the ``"influence"``
        ranking, passed to ``estimator.influences`` when not None.
        ``"relatif"`` solves every training point once per block of
        validation rows: a larger ``working_memory`` takes fewer blocks.
    n_random : int, default=5
        Number of random orders.
    random_state : int, RandomState instance or None, default=None
        Draws the random orders.
    n_jobs : int or None, default=None
        Retrainings run in parallel with joblib.
    influence_scores : array-like of shape (n_train,), default=None
        Scores of the training points to use for the ``"influence"`` ranking
        instead of computing them (lower is more harmful), for example to
        compare several estimators' scores without recomputing them.

    Returns
    -------
    result : Bunch
        ``fractions`` and ``n_removed`` (the number of points each removes);
        ``baseline_accuracy``, after retraining on all training points;
        ``accuracy`` and ``gain`` (accuracy minus the baseline), dicts from
        ranking name to an array over fractions (for ``"random"``, the mean
        over the draws); ``accuracy_std``, ``{"random": ...}``, the standard
        deviation over the draws (NaN for one draw), and
        ``random_accuracies`` of shape ``(n_random, n_fractions)``;
        ``removed``, dicts from ranking name to the order (training indices,
        most harmful first; for ``"random"``, shape ``(n_random, n_train)``);
        ``scores``, the summed influences (or ``influence_scores``), and
        ``losses``, the training losses, each None when not used.

    See Also
    --------
    DataCleaningScorer : The gain of the influence ranking at one fraction, as a scorer.
    mislabel_detection : Ranks the training set against known wrong labels instead.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import make_classification
    >>> from skinfl import DirectInfluence
    >>> from skinfl.metrics import data_cleaning
    >>> from skinfl.retraining import LogisticRegressionRetrainer
    >>> X, y = make_classification(n_samples=600, n_features=10, random_state=0)
    >>> y[:40] = 1 - y[:40]  # wrong labels in the training part
    >>> retrain = LogisticRegressionRetrainer(C=1.0)
    >>> estimator = DirectInfluence(retrain(X[:200], y[:200]), loss="bce_with_logits",
    ...                             regularization=retrain.regularization_for(200)).fit(X[:200], y[:200])
    >>> result = data_cleaning(estimator, retrain, X[200:400], y[200:400], X[400:], y[400:],
    ...                        fractions=(0.1, 0.2), random_state=0)
    >>> result.accuracy["influence"].shape
    (2,)
    >>> sorted(result.removed)
    ['influence', 'loss', 'random']
    """
    rankings = _check_rankings(rankings)
    retrain = retrain_function(retrain)
    if "random" in rankings and not (isinstance(n_random, numbers.Integral) and n_random >= 1):
        raise ValueError(f"n_random must be a positive integer, got {n_random!r}.")
    if influence_scores is not None and normalize is not None:
        raise ValueError("normalize applies to influences computed here; with influence_scores given, "
                         "normalize them before passing them.")
    computes_influence = "influence" in rankings and influence_scores is None
    if estimator is not None or X is None or computes_influence or "loss" in rankings:
        if estimator is None:
            needed = "to compute the influence ranking" if computes_influence else (
                "for the loss ranking" if "loss" in rankings else "for its training data (or pass X and y)")
            raise TypeError(f"data_cleaning needs a fitted influence estimator {needed}, got None.")
        estimator = _fitted_influence_estimator(estimator, "data_cleaning")
    if computes_influence:
        _check_pair(X_val, y_val, ("X_val", "y_val"), "the influence ranking sums validation losses")
    _check_pair(X_test, y_test, ("X_test", "y_test"), "accuracy is measured on labelled test points")
    if X is None:
        if y is not None:
            raise ValueError("y is given without X; pass both, or neither to use the estimator's training data.")
        X_train, y_train = _training_data(estimator)
    else:
        _check_pair(X, y, ("X", "y"), "they are the training set")
        X_train, y_train = _row_indexable(X), _row_indexable(y)
    n_train = len(X_train)
    fractions, counts = _removal_counts(fractions, n_train)

    scores = None
    if influence_scores is not None:
        scores = np.array(_as_numpy(influence_scores), dtype=np.float64)  # a copy: the result owns it
        if scores.shape != (n_train,):
            raise ValueError(f"influence_scores must have shape (n_train,) = ({n_train},), got {scores.shape}.")
        if not np.all(np.isfinite(scores)):
            raise ValueError("influence_scores contains NaN or infinite values.")
    elif computes_influence:
        scores = _validation_influence(estimator, X_val, y_val, X, y, normalize=normalize)

    orders, losses = {}, None
    for name in rankings:
        if name == "influence":
            orders[name] = np.argsort(scores, kind="stable")
        elif name == "loss":
            losses = _training_losses(estimator, *(_fitted_data(estimator) if X is None else (X, y)))
            orders[name] = np.argsort(-losses, kind="stable")
        else:
            rng = check_random_state(random_state)
            orders[name] = np.stack([rng.permutation(n_train) for _ in range(n_random)])

    jobs, keys = [np.arange(n_train)], []
    for name in rankings:
        for draw, order in enumerate(np.atleast_2d(orders[name])):
            for column, count in enumerate(counts):
                jobs.append(_retained_rows(n_train, order[:count]))
                keys.append((name, draw, column))
    accuracies = _parallel(n_jobs)(
        joblib.delayed(_accuracy_after_retraining)(retrain, X_train, y_train, rows, X_test, y_test) for rows in jobs
    )
    baseline = accuracies[0]
    table = {name: np.empty((np.atleast_2d(orders[name]).shape[0], len(counts))) for name in rankings}
    for (name, draw, column), value in zip(keys, accuracies[1:]):
        table[name][draw, column] = value

    accuracy = {name: table[name].mean(axis=0) for name in rankings}
    accuracy_std, random_accuracies = {}, None
    if "random" in rankings:
        random_accuracies = table["random"]
        accuracy_std["random"] = (random_accuracies.std(axis=0, ddof=1) if n_random > 1
                                  else np.full(len(counts), np.nan))
    return Bunch(
        fractions=fractions,
        n_removed=counts,
        baseline_accuracy=baseline,
        accuracy=accuracy,
        accuracy_std=accuracy_std,
        random_accuracies=random_accuracies,
        gain={name: values - baseline for name, values in accuracy.items()},
        removed=orders,
        scores=scores,
        losses=losses,
    )


class DataCleaningScorer(_CachingScorer):
    """Gain in test accuracy from removing the training points most harmful to the query loss.

    The training points are ranked by their influence summed over the query
    points (the validation set a search passes), the ``fraction`` most
    harmful are removed, the model is retrained without them, and the score
    is its accuracy on ``(X_test, y_test)`` minus that of the model
    retrained on all training points (see :func:`data_cleaning`). The
    baseline depends only on the data and ``retrain``: it is computed once
    per training set and reused for every candidate.

    A search that selects by this score selects on the test set: report the
    chosen setting's gain on a further set of points.

    Parameters
    ----------
    retrain : callable or estimator
        ``retrain(X, y) -> model`` (see :func:`data_cleaning`).
    X_test : array-like or torch.Tensor
        Test inputs, on which accuracy is measured.
    y_test : array-like or torch.Tensor
        Their class labels.
    fraction : float, default=0.1
        Fraction of the training set removed, in (0, 1).
    normalize : {None, "relatif", "cosine"}, default=None
        Normalization of the influences summed for the ranking (see
        :func:`data_cleaning`).
    memory : str, joblib.Memory or None, default=None
        Also store the baseline accuracy here (see :class:`LeaveOneOutScorer`).

    See Also
    --------
    data_cleaning : Several fractions, with the training loss and random orders for comparison.

    Examples
    --------
    >>> from sklearn.datasets import make_classification
    >>> from skinfl import DirectInfluence
    >>> from skinfl.metrics import DataCleaningScorer
    >>> from skinfl.retraining import LogisticRegressionRetrainer
    >>> X, y = make_classification(n_samples=600, n_features=10, random_state=0)
    >>> y[:40] = 1 - y[:40]
    >>> retrain = LogisticRegressionRetrainer(C=1.0)
    >>> estimator = DirectInfluence(retrain(X[:200], y[:200]), loss="bce_with_logits",
    ...                             regularization=retrain.regularization_for(200)).fit(X[:200], y[:200])
    >>> scorer = DataCleaningScorer(retrain, X[400:], y[400:], fraction=0.1)
    >>> gain = scorer(estimator, X[200:400], y[200:400])
    >>> bool(-1 <= gain <= 1)
    True
    """

    def __init__(self, retrain, X_test, y_test, *, fraction=0.1, normalize=None, memory=None):
        super().__init__(memory)
        self.retrain = retrain
        self.X_test = X_test
        self.y_test = y_test
        self.fraction = fraction
        self.normalize = normalize

    def baseline_accuracy(self, estimator):
        """Test accuracy of the model retrained on all of the estimator's training data (cached).

        Parameters
        ----------
        estimator : BaseInfluence
            A fitted influence estimator; its training data are used.

        Returns
        -------
        accuracy : float
            The fraction of test points classified correctly.
        """
        estimator = _fitted_influence_estimator(estimator, type(self).__name__)
        retrain = retrain_function(self.retrain)
        X, y = _training_data(estimator)
        parts = (type(self).__name__, X, y, self.X_test, self.y_test)
        value = self._cached(parts, self.retrain,
                             lambda: np.array([_accuracy(retrain(X, y), self.X_test, self.y_test)]))
        return float(value[0])

    def __call__(self, estimator, X, y):
        """Score a fitted estimator, ranking its training points on the query points ``(X, y)``.

        Parameters
        ----------
        estimator : BaseInfluence
            A fitted influence estimator.
        X, y : array-like or torch.Tensor
            Query (validation) points.

        Returns
        -------
        score : float
            Test accuracy after cleaning minus the baseline's (higher is better).
        """
        estimator = _fitted_influence_estimator(estimator, type(self).__name__)
        retrain = retrain_function(self.retrain)
        _check_pair(X, y, ("X", "y"), "the ranking sums the query points' losses")
        _check_pair(self.X_test, self.y_test, ("X_test", "y_test"), "accuracy is measured on labelled test points")
        X_train, y_train = _training_data(estimator)
        _, (count,) = _removal_counts((self.fraction,), len(X_train))
        scores = _validation_influence(estimator, X, y, normalize=self.normalize)
        rows = _retained_rows(len(X_train), np.argsort(scores, kind="stable")[:count])
        cleaned = _accuracy_after_retraining(retrain, X_train, y_train, rows, self.X_test, self.y_test)
        return cleaned - self.baseline_accuracy(estimator)

    def __repr__(self):
        return (f"DataCleaningScorer(retrain={self.retrain!r}, X_test=<{_n_rows(self.X_test)} samples>, "
                f"fraction={self.fraction}, normalize={self.normalize!r})")
