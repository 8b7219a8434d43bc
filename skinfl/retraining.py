"""Ready-made ``retrain(X, y) -> model`` callables for retraining-based metrics.

The metrics in :mod:`skinfl.metrics` compare predicted influences with what
actually happens when the model is retrained without some training points.
How to retrain is the user's choice; these two helpers cover the common cases:

- :class:`LogisticRegressionRetrainer` solves an L2-regularised logistic
  regression to its exact optimum with scikit-learn and returns it as a torch
  linear layer. Its curvature is known exactly, so it is the test bed where
  influence functions should agree with retraining almost perfectly.
- :class:`TorchRetrainer` is a plain, seeded torch training loop for any
  module: the same initial weights and the same sample order on every call,
  so differences between retrained models come from the data alone.
"""

from __future__ import annotations

import copy
import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from torch import nn

from ._model import LossSpec
from ._validation import Interval, StrOptions, as_model_data, validate_estimator_params

__all__ = ["LogisticRegressionRetrainer", "TorchRetrainer"]


def _as_numpy(data):
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().numpy()
    return np.asarray(data)


class LogisticRegressionRetrainer(BaseEstimator):
    """Retrain an L2-regularised logistic regression to its exact optimum.

    Each call fits :class:`sklearn.linear_model.LogisticRegression` with a
    tight tolerance and returns the solution as a ``torch.nn.Linear`` layer:
    one output (use ``loss="bce_with_logits"``) for two classes, one output
    per class (use ``loss="cross_entropy"``) for more.

    scikit-learn minimises ``C * sum_i l_i + ||w||^2 / 2``, which is ``C n``
    times ``mean_i l_i + ||w||^2 / (2 C n)``. The Hessian of the latter is the
    loss Hessian plus ``I / (C n)``, so influence estimators with
    ``regularization=1 / (C n)`` (see :meth:`regularization_for`) use the exact
    curvature of the training objective.

    Parameters
    ----------
    C : float, default=1.0
        Inverse regularization strength, as in scikit-learn.
    fit_intercept : bool, default=False
        Whether to fit an intercept. scikit-learn does not penalise the
        intercept, while ``regularization`` is added to every parameter, so
        the curvature match is exact only without one.
    solver : {"lbfgs", "newton-cholesky"}, default="lbfgs"
        scikit-learn solver. L-BFGS with the default ``tol`` stops where the
        objective stops decreasing in float64 (gradient about 1e-8, weights
        within about 1e-6), far below the ``1 / n`` scale of leave-one-out
        changes, and is fast with warm starts. ``"newton-cholesky"`` reaches
        the optimum to machine precision at a higher cost per fit.
    tol : float, default=1e-10
        Stopping tolerance of the solver.
    max_iter : int, default=10_000
        Maximum number of solver iterations.
    warm_start : bool, default=True
        Start each fit from the solution of the previous call (in this
        process). A retraining without one point starts next to its optimum,
        which makes it several times faster; the optimum reached is the same.
    dtype : torch.dtype, default=torch.float64
        Floating type of the returned layer.

    See Also
    --------
    TorchRetrainer : A seeded training loop for any torch module.
    skinfl.metrics.LeaveOneOutScorer : Scores influences against this retraining.

    Examples
    --------
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.preprocessing import StandardScaler
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> retrain = LogisticRegressionRetrainer(C=0.1)
    >>> model = retrain(X, y)
    >>> model
    Linear(in_features=30, out_features=1, bias=False)
    >>> float(retrain.regularization_for(len(X)))  # 1 / (C n)
    0.01757...
    """

    _parameter_constraints = {
        "C": [Interval(numbers.Real, 0, None, closed="neither")],
        "fit_intercept": ["boolean"],
        "solver": [StrOptions({"lbfgs", "newton-cholesky"})],
        "tol": [Interval(numbers.Real, 0, None, closed="neither")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "warm_start": ["boolean"],
        "dtype": [torch.dtype],
    }

    def __init__(
        self, C=1.0, *, fit_intercept=False, solver="lbfgs", tol=1e-10, max_iter=10_000, warm_start=True, dtype=torch.float64
    ):
        self.C = C
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.dtype = dtype

    def regularization_for(self, n_samples):
        """The influence ``regularization`` that matches this objective, ``1 / (C n)``.

        Parameters
        ----------
        n_samples : int
            Number of training samples.

        Returns
        -------
        regularization : float
            ``1 / (C * n_samples)``.
        """
        return 1.0 / (self.C * n_samples)

    def __call__(self, X, y):
        """Fit on ``(X, y)`` and return the solution as a linear layer.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Training inputs.
        y : array-like or torch.Tensor of shape (n_samples,) or (n_samples, 1)
            Class labels ``0, ..., n_classes - 1``.

        Returns
        -------
        model : torch.nn.Linear
            The fitted model, in eval mode.
        """
        validate_estimator_params(self)
        X = _as_numpy(X)
        y = _as_numpy(y).reshape(len(X), -1)
        if y.shape[1] != 1:
            raise ValueError(f"y must hold one class label per sample, got shape {y.shape}.")
        y = y[:, 0]
        solver = self._solver_for(X, y)
        solver.fit(X, y)
        # The next call starts from this solution. Set only once the fit is done, so that calls running in
        # other threads start from a finished one.
        self._solver = solver
        classes = solver.classes_
        if not np.array_equal(classes, np.arange(len(classes))):
            raise ValueError(
                f"The labels of this training set are {classes.tolist()}; they must be 0, ..., n_classes - 1 "
                "with every class present (a subset that lost a class cannot be retrained to the same model "
                "shape: use a larger subset)."
            )
        layer = nn.Linear(X.shape[1], solver.coef_.shape[0], bias=self.fit_intercept, dtype=self.dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(solver.coef_))
            if self.fit_intercept:
                layer.bias.copy_(torch.as_tensor(solver.intercept_))
        return layer.eval()

    def _solver_for(self, X, y):
        previous = getattr(self, "_solver", None)
        usable = (
            self.warm_start
            and previous is not None
            and getattr(previous, "coef_", None) is not None
            and previous.coef_.shape[1] == X.shape[1]
            and len(previous.classes_) == len(np.unique(y))
        )
        if not usable:
            previous = None
        solver = LogisticRegression(
            C=self.C,
            fit_intercept=self.fit_intercept,
            solver=self.solver,
            tol=self.tol,
            max_iter=self.max_iter,
            warm_start=self.warm_start,
        )
        if previous is not None:
            solver.coef_ = previous.coef_.copy()
            solver.intercept_ = np.copy(previous.intercept_)
        return solver


_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


class TorchRetrainer(BaseEstimator):
    """Retrain a torch module with a plain, seeded training loop.

    Every call starts from the same weights and visits samples in the same
    order (both fixed by ``random_state``), so two calls on the same data
    return the same model and differences between retrained models are due
    to the data. The global torch random state is left as it was.

    The objective is ``mean_i l_i + weight_decay ||theta||^2 / 2``; its
    curvature is the loss curvature plus ``weight_decay * I``, the natural
    ``regularization`` for influence estimators on models trained this way.

    Parameters
    ----------
    module : torch.nn.Module
        The architecture. It is deep-copied on every call and never changed.
    loss : str, torch.nn.Module or callable, default="cross_entropy"
        Training loss, as for the influence estimators.
    optimizer : {"adam", "sgd"}, default="adam"
        Optimizer.
    learning_rate : float, default=1e-2
        Step size.
    epochs : int, default=100
        Passes over the data.
    batch_size : int or None, default=None
        Mini-batch size; None trains on the full batch.
    weight_decay : float, default=0.0
        L2 penalty coefficient (coupled, as torch's ``weight_decay``).
    init : {"reset", "keep"}, default="reset"
        ``"reset"`` re-initialises every submodule with ``reset_parameters``
        under ``random_state`` (training from scratch); ``"keep"`` starts
        from the weights of ``module`` (fine-tuning).
    random_state : int, default=0
        Seed for the initial weights and the sample order.
    device : str, torch.device or None, default=None
        Device to train on; None uses the module's device.

    See Also
    --------
    LogisticRegressionRetrainer : Exact retraining of an L2 logistic regression.
    skinfl.metrics.LdsScorer : Scores influences against this retraining.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> X = torch.randn(40, 3)
    >>> y = (X[:, 0] > 0).long()
    >>> retrain = TorchRetrainer(nn.Linear(3, 2), epochs=20, random_state=0)
    >>> first, second = retrain(X, y), retrain(X, y)
    >>> bool(torch.equal(first.weight, second.weight))
    True
    """

    _parameter_constraints = {
        "module": [nn.Module],
        "loss": [str, nn.Module, callable],
        "optimizer": [StrOptions(set(_OPTIMIZERS))],
        "learning_rate": [Interval(numbers.Real, 0, None, closed="neither")],
        "epochs": [Interval(numbers.Integral, 0, None, closed="left")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "weight_decay": [Interval(numbers.Real, 0, None, closed="left")],
        "init": [StrOptions({"reset", "keep"})],
        "random_state": [Interval(numbers.Integral, 0, None, closed="left")],
        "device": [str, torch.device, None],
    }

    def __init__(
        self,
        module,
        loss="cross_entropy",
        *,
        optimizer="adam",
        learning_rate=1e-2,
        epochs=100,
        batch_size=None,
        weight_decay=0.0,
        init="reset",
        random_state=0,
        device=None,
    ):
        self.module = module
        self.loss = loss
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.init = init
        self.random_state = random_state
        self.device = device

    def __call__(self, X, y):
        """Train a fresh copy of ``module`` on ``(X, y)``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Training inputs.
        y : array-like or torch.Tensor of shape (n_samples, ...)
            Training targets for ``loss``.

        Returns
        -------
        model : torch.nn.Module
            The trained copy, in eval mode.
        """
        validate_estimator_params(self)
        loss = LossSpec.resolve(self.loss)
        device = torch.device(self.device) if self.device is not None else _module_device(self.module)
        model = copy.deepcopy(self.module).to(device).eval()
        X_t, y_t = as_model_data(model, loss, X, y)  # eval mode: the shape probe draws no random numbers
        # Everything random (initial weights, dropout, sample order) comes from
        # the seed, inside a forked generator that leaves the caller's as it was.
        cuda_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(self.random_state)
            if self.init == "reset":
                for submodule in model.modules():
                    if hasattr(submodule, "reset_parameters"):
                        submodule.reset_parameters()
            self._train(model, loss, X_t, y_t)
        return model.eval()

    def _train(self, model, loss, X, y):
        optimizer = _OPTIMIZERS[self.optimizer](
            model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        n = len(X)
        batch_size = n if self.batch_size is None else min(self.batch_size, n)
        # The sample order is drawn on the training device: no host-to-device copy per epoch.
        order = torch.Generator(device=X.device).manual_seed(self.random_state)
        model.train()
        for _ in range(self.epochs):
            permutation = torch.randperm(n, generator=order, device=X.device) if batch_size < n else None
            for start in range(0, n, batch_size):
                rows = slice(start, start + batch_size) if permutation is None else permutation[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss.per_sample(model(X[rows]), y[rows]).mean().backward()
                optimizer.step()


def _module_device(module):
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")
