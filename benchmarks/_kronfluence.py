"""kronfluence 1.0.1's EK-FAC influences behind the ``fit`` / ``influences`` calls of the other estimators.

Used by _solver_worker.py (``--lib kronfluence``) and _pydvl_accuracy.py
(tasks with ``"library": "kronfluence"``), in pyDVL's virtual environment,
where setup_pydvl_env.sh installs kronfluence (without torchvision). It
imports kronfluence at module level: import it only there, inside functions.

Conventions, read from kronfluence 1.0.1's source, and what this wrapper does
so that its influence matrix is the one skinfl and pyDVL compute,
``<(F + lambda I)^-1 grad l(test_i), grad l(train_j)>`` with ``F`` the
(EK-FAC approximation of the) Fisher of the *mean* training loss:

- Its ``Task.compute_train_loss`` must return the loss *summed* over the
  batch: kronfluence takes per-sample gradients from the backward hooks of
  the batch's loss (one backward pass per batch), so a mean would scale
  every per-sample gradient by ``1 / batch``. ``compute_measurement`` (the
  test side) is the summed cross-entropy too: one gradient per test point.
- The covariance factors ``A`` and ``G`` are sums divided by the number of
  rows they saw (samples, times output positions for a convolution); for
  EK-FAC only their eigenvectors are used. The eigenvalues ("Lambda") are
  refitted as ``sum_i (Q_G^T g_i Q_A)**2`` over the per-sample gradients
  ``g_i`` and divided by the number of samples: the mean, i.e. the diagonal
  of the Fisher of the mean loss in the Kronecker eigenbasis.
- ``ScoreArguments.damping_factor`` is added to those eigenvalues as it is
  (``Lambda / n + damping``), so with the summed loss above it is the same
  ``lambda`` as skinfl's ``regularization`` and pyDVL's
  ``hessian_regularization``: no rescaling. (With a mean loss it would have
  to be divided by the batch size squared, and the scores rescaled.)
- Pairwise scores are ``g_test^T (EK-FAC + damping)^-1 g_train``: the same
  sign as skinfl's ``influences`` (``mode="up"``).
- ``fisher="true"`` (kronfluence's default ``use_empirical_fisher=False``)
  calls ``compute_train_loss(sample=True)`` for the factors and eigenvalues:
  one target per point drawn from the model's predictive distribution, from
  torch's global generator (the workers seed it). ``"empirical"`` uses the
  training labels.
- Only ``nn.Linear`` and ``nn.Conv2d`` modules are tracked (every parameter
  of the benchmark models); ``prepare_model`` wraps them in place and
  freezes the parameters, so the wrapper works on a copy. A model that is
  itself a bare ``nn.Linear`` (the logistic regression) has no parent to
  wrap it in, so it is put in an ``nn.Sequential`` first (the same function).
- Factors and scores are written to ``work_dir`` (safetensors files) and the
  scores read back from there: that is kronfluence's only way, and it is
  part of the timed work. Eigendecompositions run in float64 (its default);
  covariances, per-sample gradients, eigenvalues and scores in the model's
  dtype (kronfluence's defaults are float32, whatever the model's dtype).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.utils.data import TensorDataset

FACTORS_NAME = "ekfac"
SCORES_NAME = "pairwise"


class ClassificationTask(Task):
    """Cross-entropy, summed over the batch (see the module docstring)."""

    def compute_train_loss(self, batch, model, sample=False):
        inputs, targets = batch
        logits = model(inputs)
        if sample:  # the true Fisher: targets drawn from the model's predictive distribution
            with torch.no_grad():
                targets = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).squeeze(-1)
        return F.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets, reduction="sum")


class KronfluenceEkfac:
    """kronfluence's Analyzer with ``FactorArguments(strategy="ekfac")``, as ``fit`` / ``influences``."""

    def __init__(self, model, *, regularization, batch_size, work_dir, fisher="true", name="run"):
        self.model = model
        self.regularization = regularization
        self.batch_size = batch_size
        self.work_dir = Path(work_dir)
        self.fisher = fisher
        self.name = name

    def fit(self, X, y):
        model = copy.deepcopy(self.model)
        if not list(model.children()):
            model = nn.Sequential(model)  # prepare_model replaces modules inside a parent
        task = ClassificationTask()
        self.model_ = prepare_model(model, task)
        self.analyzer_ = Analyzer(analysis_name=self.name, model=self.model_, task=task, cpu=True,
                                  disable_tqdm=True, output_dir=str(self.work_dir), disable_model_save=True)
        dtype = next(self.model.parameters()).dtype
        self.factor_args_ = FactorArguments(
            strategy="ekfac", use_empirical_fisher=self.fisher == "empirical",
            covariance_max_examples=None, lambda_max_examples=None,  # every training point
            activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype,
            lambda_dtype=dtype,
        )
        self._train = TensorDataset(X, y)
        self.analyzer_.fit_all_factors(FACTORS_NAME, dataset=self._train, per_device_batch_size=self.batch_size,
                                       factor_args=self.factor_args_, overwrite_output_dir=True)
        return self

    def influences(self, X_test, y_test):
        """The (n_test, n_train) matrix of pairwise scores."""
        dtype = next(self.model.parameters()).dtype
        self.score_args_ = ScoreArguments(damping_factor=self.regularization, per_sample_gradient_dtype=dtype,
                                          precondition_dtype=dtype, score_dtype=dtype)
        self.analyzer_.compute_pairwise_scores(
            scores_name=SCORES_NAME, factors_name=FACTORS_NAME, query_dataset=TensorDataset(X_test, y_test),
            train_dataset=self._train, per_device_query_batch_size=min(self.batch_size, len(X_test)),
            per_device_train_batch_size=self.batch_size, score_args=self.score_args_, overwrite_output_dir=True,
        )
        return self.analyzer_.load_pairwise_scores(SCORES_NAME)["all_modules"]

    def settings(self):
        """What kronfluence was given, for the results files."""
        return {"strategy": "ekfac", "use_empirical_fisher": self.fisher == "empirical",
                "damping_factor": self.regularization, "per_device_batch_size": self.batch_size,
                "covariance_max_examples": None, "lambda_max_examples": None,
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", "")
                + " (covariances, per-sample gradients, eigenvalues, scores; eigendecomposition float64)",
                "loss": "cross_entropy, reduction='sum' (train loss and measurement)"}
