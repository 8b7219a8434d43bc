"""Warnings point at the user's call, whichever library frames lie between."""

import warnings

import numpy as np
from sklearn.model_selection import GridSearchCV, KFold
from torch import nn

from skinfl import CgInfluence, DirectInfluence, LissaInfluence
from skinfl.exceptions import CgConvergenceWarning, LissaConvergenceWarning, NotPositiveDefiniteWarning
from skinfl.exceptions import TrainingModeWarning


def recorded(category, call):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    caught = [w for w in record if issubclass(w.category, category)]
    assert caught, f"no {category.__name__} was raised"
    return caught


def test_fit_warning_points_at_fit(classification_problem):
    model, X, y = classification_problem
    with_dropout = nn.Sequential(model, nn.Dropout(0.1)).train()
    caught = recorded(TrainingModeWarning, lambda: DirectInfluence(with_dropout).fit(X, y))
    assert {w.filename for w in caught} == {__file__}


def test_solver_warnings_point_at_the_public_call(classification_problem):
    model, X, y = classification_problem
    cg = CgInfluence(model, regularization=1e-3, max_iter=1, preconditioner=None, random_state=0).fit(X, y)
    for call in (lambda: cg.influences(X[:3], y[:3]), lambda: cg.transform(X[:3], y[:3]),
                 lambda: cg.self_influence(X[:3], y[:3])):
        assert {w.filename for w in recorded(CgConvergenceWarning, call)} == {__file__}
    lissa = LissaInfluence(model, minibatch_size=None, regularization=1e-3, max_iter=3,
                           random_state=0).fit(X, y)
    caught = recorded(LissaConvergenceWarning, lambda: lissa.influences(X[:3], y[:3]))
    assert {w.filename for w in caught} == {__file__}
    untrained = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    caught = recorded(NotPositiveDefiniteWarning,
                      lambda: DirectInfluence(untrained, regularization=0.0, solver="eigh").fit(X, y))
    assert {w.filename for w in caught} == {__file__}


def test_warnings_inside_a_grid_search_point_at_the_search(classification_problem):
    model, X, y = classification_problem
    search = GridSearchCV(CgInfluence(model, max_iter=1, preconditioner=None, random_state=0),
                          {"regularization": [1e-3, 1e-2]}, cv=KFold(2), error_score="raise")
    caught = recorded(CgConvergenceWarning, lambda: search.fit(X.numpy(), y.numpy()))
    assert {w.filename for w in caught} == {__file__}
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
