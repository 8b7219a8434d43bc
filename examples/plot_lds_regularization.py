"""
Choosing the regularization with the linear datamodeling score
==============================================================

The linear datamodeling score (LDS) asks whether influences predict what a
model trained on a *random subset* of the training data does. The model is
retrained on many random halves of the training set; for each query point,
the LDS is the rank correlation, across subsets, between the query loss each
retrained model actually has and the loss the influences predict for it
(``-sum`` of the influences of the points kept), averaged over query points.

:class:`skinfl.metrics.LdsScorer` computes it as a scikit-learn scorer, so
``GridSearchCV`` can choose ``regularization`` by it. The retrainings depend
only on the data: they are done once and shared by every candidate.
"""

# %%
# Data, model and query points
# ----------------------------
# As in the leave-one-out example, the model is an L2-regularised logistic
# regression on scikit-learn's digits with a known ``C``:
# ``LogisticRegressionRetrainer`` fits scikit-learn's ``LogisticRegression``
# to its optimum and returns it as a ``torch.nn.Linear`` layer, and retrains
# it later on each subset.

import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, PredefinedSplit

from skinfl import DirectInfluence
from skinfl.metrics import LdsScorer, linear_datamodeling_score
from skinfl.retraining import LogisticRegressionRetrainer

start = time.perf_counter()
X, y = load_digits(return_X_y=True)
X = X / 16.0
rng = np.random.default_rng(0)
order = rng.permutation(len(X))
train, query = order[:600], order[600:660]
X_train, y_train, X_query, y_query = X[train], y[train], X[query], y[query]

C = 0.1
alpha = 0.5  # the fraction of the training set in each subset
retrain = LogisticRegressionRetrainer(C=C)
model = retrain(X_train, y_train)
n = len(X_train)
full = retrain.regularization_for(n)
half = retrain.regularization_for(round(alpha * n))
print(f"logistic regression with C={C} on {n} digits: 1/(C n) = {full:.4g}, 1/(C alpha n) = {half:.4g}")

# %%
# The grid search
# ---------------
# A ``PredefinedSplit`` makes one split, the model's training set and then
# the query points: ``GridSearchCV`` fits each candidate on the first and
# scores it on the second. ``refit=False``, since refitting would fit on both.
# The scorer retrains the model on 40 random halves of the training set (the
# same halves for every candidate).

X_all = np.concatenate([X_train, X_query])
y_all = np.concatenate([y_train, y_query])
split = PredefinedSplit(np.r_[np.full(n, -1), np.zeros(len(X_query))])

grid = {"regularization": list(full * np.array([0.1, 0.3, 1.0, 2.0, 3.0, 10.0]))}
scorer = LdsScorer(retrain, alpha=alpha, n_subsets=40, random_state=0)
estimator = DirectInfluence(model, loss="cross_entropy")
search = GridSearchCV(estimator, grid, scoring=scorer, cv=split, refit=False)
search.fit(X_all, y_all)

for regularization, score in zip(grid["regularization"], search.cv_results_["mean_test_score"]):
    mark = ("  <- 1/(C n)" if np.isclose(regularization, full)
            else "  <- 1/(C alpha n)" if np.isclose(regularization, half) else "")
    print(f"regularization {regularization:9.4g}: LDS {score:.4f}{mark}")
selected = search.best_params_["regularization"]
print(f"selected: {selected:.4g}")

# %%
# The LDS peaks at ``1 / (C alpha n)``, not at ``1 / (C n)``, the value that
# the leave-one-out scorer selects. Each retrained model has been fitted on
# ``alpha n`` points, and its training objective, divided by ``C alpha n``,
# is the mean loss plus ``||w||^2 / (2 C alpha n)``: the LDS rewards the
# curvature of the models it compares with. A choice of ``alpha`` is part of
# what the LDS measures.
#
# With its confidence interval
# ----------------------------
# :func:`~skinfl.metrics.linear_datamodeling_score` gives the score of an
# influence matrix with a Student-t interval over the query points. The
# ground truth is the scorer's cached one: no retraining here.

best = DirectInfluence(model, loss="cross_entropy", regularization=selected).fit(X_train, y_train)
truth = scorer.ground_truth(best, X_query, y_query)
result = linear_datamodeling_score(best.influences(X_query, y_query), truth)
low, high = result.interval
print(f"LDS {result.score:.4f} (95% interval {low:.4f} to {high:.4f}) over {truth.masks.shape[0]} subsets "
      f"and {len(X_query)} query points")
print(f"finished in {time.perf_counter() - start:.1f} s")

# %%
# The score across the grid, and for one query point the predicted against
# the actual loss of each retrained model (the figure needs matplotlib).

try:
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

if plt is not None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.semilogx(grid["regularization"], search.cv_results_["mean_test_score"], "o-")
    left.axvline(full, color="gray", linestyle=":", label="1 / (C n)")
    left.axvline(half, color="gray", linestyle="--", label="1 / (C alpha n)")
    left.set_xlabel("regularization")
    left.set_ylabel("LDS")
    left.legend()
    right.scatter(result.predicted[0], result.actual[0], s=12)
    right.set_xlabel("predicted: -sum of the influences of the points kept")
    right.set_ylabel("query loss after retraining on the subset")
    right.set_title("query point 0, one dot per subset")
    fig.tight_layout()
