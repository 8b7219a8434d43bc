"""
Choosing the regularization by how well influences predict retraining
=====================================================================

The ``regularization`` of an influence estimator is usually set by hand.
Here it is chosen by ``GridSearchCV`` with a scorer from
:mod:`skinfl.metrics` that retrains the model without single training points
and checks how well the influences predicted the change of the query losses.

The model is an L2-regularised logistic regression on scikit-learn's digits,
with a known ``C``. Its training objective has the curvature of the loss plus
``1 / (C n)`` times the identity, so the right answer is known, and the search
should find it. The ground truth (one retraining per removed point) is
computed once and shared by every candidate of the grid.
"""

# %%
# Data, model and query points
# ----------------------------
# ``LogisticRegressionRetrainer`` fits scikit-learn's ``LogisticRegression``
# to its optimum and returns it as a ``torch.nn.Linear`` layer; the same
# callable retrains it later without single points.

import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, PredefinedSplit

from skinfl import DirectInfluence
from skinfl.metrics import LeaveOneOutScorer, leave_one_out_agreement
from skinfl.retraining import LogisticRegressionRetrainer

start = time.perf_counter()
X, y = load_digits(return_X_y=True)
X = X / 16.0
rng = np.random.default_rng(0)
order = rng.permutation(len(X))
train, query = order[:600], order[600:660]
X_train, y_train, X_query, y_query = X[train], y[train], X[query], y[query]

C = 0.1
retrain = LogisticRegressionRetrainer(C=C)
model = retrain(X_train, y_train)
true_regularization = retrain.regularization_for(len(X_train))
print(f"logistic regression with C={C} on {len(X_train)} digits: regularization 1/(C n) = {true_regularization:.3g}")

# %%
# A grid search on a predefined split
# -----------------------------------
# ``GridSearchCV`` fits on the training part of a split and scores on the
# rest, which here are the query points. A ``PredefinedSplit`` makes that one
# split: the model's training set, then the query points. ``refit=False``
# because refitting would fit on training and query points together.

X_all = np.concatenate([X_train, X_query])
y_all = np.concatenate([y_train, y_query])
split = PredefinedSplit(np.r_[np.full(len(X_train), -1), np.zeros(len(X_query))])

grid = {"regularization": list(true_regularization * np.array([0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0]))}
scorer = LeaveOneOutScorer(retrain, n_removals=100, random_state=0)
search = GridSearchCV(DirectInfluence(model), grid, scoring=scorer, cv=split, refit=False)
search.fit(X_all, y_all)

for regularization, score in zip(grid["regularization"], search.cv_results_["mean_test_score"]):
    mark = "  <- 1/(C n)" if regularization == true_regularization else ""
    print(f"regularization {regularization:9.3g}: leave-one-out Pearson {score:.4f}{mark}")
print(f"selected: {search.best_params_['regularization']:.3g}")

# %%
# Predicted against actual changes
# --------------------------------
# With the selected regularization, the influence of a training point divided
# by ``n`` predicts the change of a query loss when that point is removed.
# The ground truth is the scorer's cached one: no retraining here.

best = DirectInfluence(model, **search.best_params_).fit(X_train, y_train)
truth = scorer.ground_truth(best, X_query, y_query)
result = leave_one_out_agreement(best.influences(X_query, y_query), truth)
print(f"leave-one-out Pearson {result.pearson:.4f}, Spearman {result.spearman:.4f} "
      f"over {truth.loss_changes.shape[1]} removals and {len(X_query)} query points")
print(f"finished in {time.perf_counter() - start:.1f} s")

# %%
# The score across the grid peaks at ``1 / (C n)``, and the predictions lie on
# the diagonal. (The figure needs matplotlib, installed with the ``docs``
# extra.)

try:
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

if plt is not None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.semilogx(grid["regularization"], search.cv_results_["mean_test_score"], "o-")
    left.axvline(true_regularization, color="gray", linestyle="--", label="1 / (C n)")
    left.set_xlabel("regularization")
    left.set_ylabel("leave-one-out Pearson")
    left.legend()
    right.scatter(result.predicted.ravel(), result.actual.ravel(), s=2, alpha=0.4)
    right.set_xlabel("predicted change of query loss")
    right.set_ylabel("actual change after retraining")
    fig.tight_layout()
