"""Influence predicts retraining: removal experiments on an L2 logistic regression.

scikit-learn's LogisticRegression(C) minimises C * sum_i l_i + ||w||^2 / 2, i.e.
n C times the mean loss plus (1 / (2 C n)) ||w||^2: its Hessian is the mean-loss
Hessian plus regularization = 1 / (C n). Removing point j from the sum moves the
optimum by about (1/n) (H + lambda I)^-1 g_j, so the test loss changes by about
influences[test, j] / n.
"""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from conftest import exact_classes, exact_estimator

C = 0.05


def fit_logistic(X, y):
    return LogisticRegression(C=C, fit_intercept=False, tol=1e-12, max_iter=10_000).fit(X, y)


def logistic_loss(clf, x, y):
    margin = (x @ clf.coef_.ravel()) * (2 * y - 1)
    return np.logaddexp(0.0, -margin)


@pytest.fixture(scope="module")
def problem():
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    X = np.hstack([X, np.ones((len(X), 1))])  # an explicit, penalised intercept
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    X, y = X[order], y[order].astype(np.float64)
    X_train, y_train, X_test, y_test = X[:400], y[:400], X[400:], y[400:]
    clf = fit_logistic(X_train, y_train)
    model = torch.nn.Linear(X.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(clf.coef_))
    return model, clf, X_train, y_train, X_test, y_test


@pytest.mark.parametrize("cls", exact_classes())
def test_removal_follows_the_sign_and_size_of_influence(problem, cls):
    model, clf, X_train, y_train, X_test, y_test = problem
    n = len(X_train)
    est = exact_estimator(cls, model, loss="bce_with_logits", regularization=1.0 / (C * n)).fit(X_train, y_train)
    # The test point whose loss is most sensitive to the training data.
    influences = est.influences(X_test, y_test)
    test = int(np.argmax(np.abs(influences).sum(axis=1)))
    row = influences[test]
    base_loss = logistic_loss(clf, X_test[test], y_test[test])

    def loss_without(j):
        keep = np.arange(n) != j
        return logistic_loss(fit_logistic(X_train[keep], y_train[keep]), X_test[test], y_test[test])

    # Removing the most helpful point hurts; removing the most harmful one helps.
    assert loss_without(int(np.argmax(row))) > base_loss
    assert loss_without(int(np.argmin(row))) < base_loss

    # Over a few dozen of the most influential points, prediction tracks reality.
    removed = np.argsort(-np.abs(row))[:40]
    predicted = row[removed] / n
    actual = np.array([loss_without(j) - base_loss for j in removed])
    assert np.corrcoef(predicted, actual)[0, 1] > 0.95
    assert np.all(np.sign(predicted[:10]) == np.sign(actual[:10]))
