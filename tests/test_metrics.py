"""skinfl.metrics: known answers, caching in a grid search, and input errors."""

import joblib
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from torch import nn

from skinfl import CgInfluence, DirectInfluence
from skinfl.metrics import (
    DatamodelTruth,
    LdsScorer,
    LeaveOneOutScorer,
    LeaveOneOutTruth,
    MislabelScorer,
    ReferenceAgreementScorer,
    datamodel_truth,
    leave_one_out_agreement,
    leave_one_out_truth,
    linear_datamodeling_score,

    mislabel_detection,
    query_losses,
    random_subsets,
    reference_agreement,
)
from skinfl.retraining import LogisticRegressionRetrainer

RIDGE = 0.1


def ridge(X, y):
    """Exact minimiser of mean (y - x w)^2 + RIDGE/2 ||w||^2, whose Hessian is 2 X^T X / n + RIDGE I."""
    X, y = np.asarray(X), np.asarray(y).reshape(len(X), -1)
    A = 2 * X.T @ X / len(X) + RIDGE * np.eye(X.shape[1])
    weights = np.linalg.solve(A, 2 * X.T @ y / len(X))
    model = nn.Linear(X.shape[1], 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(weights.T))
    return model


class CountingRetrain:
    """Wraps a retrain function and counts its calls (in this process)."""

    def __init__(self, function):
        self.function = function
        self.calls = 0

    def __call__(self, X, y):
        self.calls += 1
        return self.function(X, y)


@pytest.fixture(scope="module")
def regression():
    rng = np.random.default_rng(0)
    n, d = 80, 4
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    X_query = rng.normal(size=(10, d))
    y_query = X_query @ rng.normal(size=d)
    estimator = DirectInfluence(ridge(X, y), loss="mse", regularization=RIDGE).fit(X, y)
    return estimator, X, y, X_query, y_query


@pytest.fixture(scope="module")
def digits_logistic():
    """L2 logistic regression on 300 digits with C known, and 30 query points."""
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    X_train, y_train, X_query, y_query = X[:300], y[:300], X[1000:1030], y[1000:1030]
    retrain = LogisticRegressionRetrainer(C=0.1)
    model = retrain(X_train, y_train)
    return retrain, model, X_train, y_train, X_query, y_query


def predefined_split(X_train, y_train, X_query, y_query):
    """Fit on the training part, score on the query part: one split."""
    X = np.concatenate([X_train, X_query])
    y = np.concatenate([y_train, y_query])
    folds = np.r_[np.full(len(X_train), -1), np.zeros(len(X_query))]
    return X, y, PredefinedSplit(folds)


# --------------------------------------------------------------- known answers
def test_leave_one_out_on_linear_regression_is_near_exact(regression):
    estimator, X, y, X_query, y_query = regression
    truth = leave_one_out_truth(ridge, X, y, X_query, y_query, loss="mse")
    assert truth.loss_changes.shape == (len(X_query), len(X))
    result = leave_one_out_agreement(estimator.influences(X_query, y_query), truth)
    assert result.pearson > 0.99
    assert result.spearman > 0.99
    # Not only correlated: the first-order prediction has the right scale.
    slope = np.polyfit(result.predicted.ravel(), result.actual.ravel(), 1)[0]
    assert slope == pytest.approx(1.0, abs=0.1)


def test_leave_one_out_scorer_matches_function(regression):
    estimator, X, y, X_query, y_query = regression
    scorer = LeaveOneOutScorer(ridge, metric="spearman")
    truth = leave_one_out_truth(ridge, X, y, X_query, y_query, loss="mse")
    expected = leave_one_out_agreement(estimator.influences(X_query, y_query), truth).spearman
    assert scorer(estimator, X_query, y_query) == pytest.approx(expected, rel=1e-12)


def test_lds_is_one_when_losses_are_linear_in_the_subset():
    rng = np.random.default_rng(1)
    influences = rng.normal(size=(6, 30))
    masks = random_subsets(30, 0.5, 40, random_state=0)
    assert masks.sum(axis=1).tolist() == [15] * 40
    losses = 3.0 - influences @ masks.T  # exactly what the influences predict
    result = linear_datamodeling_score(influences, DatamodelTruth(masks=masks, losses=losses))
    assert result.score == pytest.approx(1.0)
    reversed_sign = linear_datamodeling_score(-influences, DatamodelTruth(masks=masks, losses=losses))
    assert reversed_sign.score == pytest.approx(-1.0)


def test_lds_on_linear_regression_and_its_interval(regression):
    estimator, X, y, X_query, y_query = regression
    masks = random_subsets(len(X), 0.9, 50, random_state=0)
    truth = datamodel_truth(ridge, X, y, X_query, y_query, loss="mse", masks=masks)
    result = linear_datamodeling_score(estimator.influences(X_query, y_query), truth)
    assert result.score > 0.95  # removing 10% keeps the linear prediction accurate
    per_query = result.per_query
    # scipy's own Student-t interval of a mean, from the standard error of the mean.
    expected = stats.t.interval(0.95, len(per_query) - 1, loc=per_query.mean(), scale=stats.sem(per_query))
    assert result.interval == pytest.approx(expected, rel=1e-12)
    assert linear_datamodeling_score(estimator.influences(X_query, y_query), truth, confidence=0.5).interval == (
        pytest.approx(stats.t.interval(0.5, len(per_query) - 1, loc=per_query.mean(), scale=stats.sem(per_query)))
    )
    assert result.interval[0] < result.score < result.interval[1]
    # A random influence matrix scores near 0, well below.
    noise = np.random.default_rng(0).normal(size=(len(X_query), len(X)))
    assert abs(linear_datamodeling_score(noise, truth).score) < 0.2  # about 4 standard errors of 10 rank correlations


def test_lds_scorer_matches_function(regression):
    estimator, X, y, X_query, y_query = regression
    scorer = LdsScorer(ridge, alpha=0.8, n_subsets=20, random_state=3)
    masks = random_subsets(len(X), 0.8, 20, random_state=3)
    truth = datamodel_truth(ridge, X, y, X_query, y_query, loss="mse", masks=masks)
    expected = linear_datamodeling_score(estimator.influences(X_query, y_query), truth).score
    assert scorer(estimator, X_query, y_query) == pytest.approx(expected, rel=1e-12)


def test_mislabel_detection_known_rankings():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    perfect = mislabel_detection(scores, [0, 1], top_fraction=0.2)
    assert perfect.roc_auc == 1.0 and perfect.fraction_found == 1.0 and perfect.n_inspected == 2
    worst = mislabel_detection(scores, [8, 9], top_fraction=0.2)
    assert worst.roc_auc == 0.0 and worst.fraction_found == 0.0
    half = mislabel_detection(scores, np.arange(10) % 2 == 0, top_fraction=0.4)
    assert half.fraction_found == pytest.approx(2 / 5)
    assert half.roc_auc == pytest.approx(15 / 25)  # pairs (flipped, clean) ranked right


def test_reference_agreement_known_answers():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4, 20))
    same = reference_agreement(2.0 * reference + 1.0, reference)
    assert same.pearson == pytest.approx(1.0) and same.spearman == pytest.approx(1.0)
    opposite = reference_agreement(-reference, reference)
    assert opposite.pearson == pytest.approx(-1.0)
    assert reference_agreement(reference, reference).max_relative_difference == 0.0


def test_constant_rows_are_left_out_with_a_warning():
    influences = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    with pytest.warns(RuntimeWarning, match="1 of 2 query points"):
        result = reference_agreement(influences, np.array([[1.0, 2.0, 4.0], [0.0, 1.0, 2.0]]))
    assert np.isnan(result.pearson_per_query[1])
    assert result.pearson == pytest.approx(result.pearson_per_query[0])


def test_reference_agreement_scorer_fits_reference_once(classification_problem):
    model, X, y = classification_problem
    reference = DirectInfluence(model, regularization=0.1)
    scorer = ReferenceAgreementScorer(reference)
    fits = []
    original_fit = DirectInfluence.fit

    def counting_fit(self, *args, **kwargs):
        fits.append(1)
        return original_fit(self, *args, **kwargs)

    DirectInfluence.fit = counting_fit
    try:
        scores = [
            scorer(CgInfluence(model, regularization=0.1, rtol=rtol).fit(X[:40], y[:40]), X[40:], y[40:])
            for rtol in (1e-2, 1e-6, 1e-10)
        ]
    finally:
        DirectInfluence.fit = original_fit
    assert len(fits) == 1
    assert scores[2] == pytest.approx(1.0, abs=1e-9)
    assert min(scores) > 0.99


def test_mislabel_scorer_uses_the_fitted_training_set(classification_problem):
    model, X, y = classification_problem
    # Labels the model does not predict: their self-influence with the (wrong) labels is large, while the
    # prediction measurement (no labels) would see confident, correct predictions.
    flipped = np.arange(0, 60, 10)
    noisy = y.clone()
    noisy[flipped] = (noisy[flipped] + 1) % 3
    estimator = DirectInfluence(model, regularization=0.1).fit(X, noisy)
    values = estimator.self_influence(X.numpy(), noisy.numpy())
    expected = mislabel_detection(values, flipped)
    assert MislabelScorer(flipped)(estimator) == pytest.approx(expected["roc_auc"], rel=1e-12)
    assert expected["roc_auc"] > 0.9
    without_labels = mislabel_detection(estimator.self_influence(X.numpy()), flipped)
    assert without_labels["roc_auc"] < expected["roc_auc"] - 0.2
    top = np.argsort(-values)[:6]
    assert MislabelScorer(top)(estimator) == pytest.approx(1.0)
    assert MislabelScorer(top, metric="fraction_found", top_fraction=0.1)(estimator) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 60\)"):
        MislabelScorer([75])(estimator)


# ----------------------------------------------------- grid search and caching
def test_grid_search_retrains_once_per_split_not_per_candidate(digits_logistic):
    retrain, model, X_train, y_train, X_query, y_query = digits_logistic
    X, y, split = predefined_split(X_train, y_train, X_query, y_query)
    counting = CountingRetrain(retrain)
    grid = {"regularization": list(np.logspace(-4, 0, 10))}

    loo = LeaveOneOutScorer(counting, n_removals=8, random_state=0)
    search = GridSearchCV(DirectInfluence(model), grid, scoring=loo, cv=split, refit=False).fit(X, y)
    assert len(search.cv_results_["params"]) == 10
    assert counting.calls == 8 + 1  # the full model once, then one per removed point

    counting.calls = 0
    lds = LdsScorer(counting, alpha=0.5, n_subsets=5, random_state=0)
    GridSearchCV(DirectInfluence(model), grid, scoring=lds, cv=split, refit=False).fit(X, y)
    assert counting.calls == 5


def test_grid_search_with_the_leave_one_out_scorer_selects_the_true_regularization(digits_logistic):
    retrain, model, X_train, y_train, X_query, y_query = digits_logistic
    true_regularization = retrain.regularization_for(len(X_train))  # 1 / (C n)
    grid = {"regularization": [true_regularization * factor for factor in (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)]}
    X, y, split = predefined_split(X_train, y_train, X_query, y_query)
    scorer = LeaveOneOutScorer(retrain, n_removals=40, random_state=0)
    search = GridSearchCV(DirectInfluence(model), grid, scoring=scorer, cv=split, refit=False).fit(X, y)
    assert search.best_params_["regularization"] == true_regularization
    assert search.best_score_ > 0.99


RIDGE_CALLS = []


def counted_ridge(X, y):
    """A module-level function (so it pickles by name) that counts its calls."""
    RIDGE_CALLS.append(1)
    return ridge(X, y)


def test_memory_shares_ground_truth_between_scorers(tmp_path, regression):
    estimator, X, y, X_query, y_query = regression
    RIDGE_CALLS.clear()
    counting = counted_ridge
    first = LeaveOneOutScorer(counting, n_removals=5, random_state=0, memory=str(tmp_path))
    score = first(estimator, X_query, y_query)
    assert len(RIDGE_CALLS) == 6
    second = LeaveOneOutScorer(counting, n_removals=5, random_state=0, memory=str(tmp_path))
    assert second(estimator, X_query, y_query) == score
    assert len(RIDGE_CALLS) == 6  # read back from disk, no retraining
    other_query = LeaveOneOutScorer(counting, n_removals=5, random_state=0, memory=str(tmp_path))
    other_query(estimator, X_query[:5], y_query[:5])
    assert len(RIDGE_CALLS) == 12  # different query points: new ground truth


def _ridge_logging_calls(X, y, log):
    with open(log, "a") as handle:
        handle.write("call\n")
    return ridge(X, y)


class LoggingRidge:
    """A picklable retrain that records each call in a file (seen across processes)."""

    def __init__(self, log):
        self.log = log

    def __call__(self, X, y):
        return _ridge_logging_calls(X, y, self.log)


def test_parallel_grid_search_with_memory_retrains_once(tmp_path, regression):
    estimator, X, y, X_query, y_query = regression
    log = tmp_path / "calls.txt"
    X_all, y_all, split = predefined_split(X, y, X_query, y_query)
    scorer = LeaveOneOutScorer(LoggingRidge(str(log)), n_removals=4, random_state=0, memory=joblib.Memory(tmp_path / "cache", verbose=0))
    # Fill the cache first, then let two worker processes read it.
    scorer(estimator, X_query, y_query)
    calls_before = len(log.read_text().splitlines())
    grid = {"regularization": [0.01, 0.1, 1.0]}
    search = GridSearchCV(DirectInfluence(estimator.model, loss="mse"), grid, scoring=scorer, cv=split, refit=False, n_jobs=2)
    search.fit(X_all, y_all)
    assert calls_before == 5
    assert len(log.read_text().splitlines()) == calls_before
    serial = [scorer(DirectInfluence(estimator.model, loss="mse", regularization=r).fit(X, y), X_query, y_query)
              for r in grid["regularization"]]
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], serial, rtol=1e-12)


# ------------------------------------------------------------------- errors
def test_errors_name_the_problem(regression):
    estimator, X, y, X_query, y_query = regression
    with pytest.raises(ValueError, match="need targets"):
        LeaveOneOutScorer(ridge)(estimator, X_query, None)
    with pytest.raises(ValueError, match="metric must be one of"):
        LeaveOneOutScorer(ridge, metric="kendall")(estimator, X_query, y_query)
    with pytest.raises(TypeError, match="scores skinfl influence estimators"):
        LeaveOneOutScorer(ridge)(object(), X_query, y_query)
    with pytest.raises(ValueError, match=r"n_removals=500 must be in \[1, 80\]"):
        LeaveOneOutScorer(ridge, n_removals=500)(estimator, X_query, y_query)
    with pytest.raises(TypeError, match="retrain must return a torch.nn.Module"):
        LeaveOneOutScorer(lambda X, y: "not a model", n_removals=1)(estimator, X_query, y_query)
    with pytest.raises(TypeError, match="retrain must be a callable"):
        LeaveOneOutScorer(42)(estimator, X_query, y_query)
    with pytest.raises(ValueError, match="alpha must be in"):
        LdsScorer(ridge, alpha=1.5)(estimator, X_query, y_query)
    with pytest.raises(ValueError, match="n_subsets must be at least 3"):
        LdsScorer(ridge, n_subsets=2)(estimator, X_query, y_query)
    truth = leave_one_out_truth(ridge, X, y, X_query, y_query, loss="mse", removed=[0, 1])
    with pytest.raises(ValueError, match=r"must have shape \(n_query, n_train\) = \(10, 80\)"):
        leave_one_out_agreement(np.zeros((10, 79)), truth)
    with pytest.raises(ValueError, match="NaN"):
        leave_one_out_agreement(np.full((10, 80), np.nan), truth)
    with pytest.raises(ValueError, match="removed must be a 1-D array of indices"):
        leave_one_out_truth(ridge, X, y, X_query, y_query, loss="mse", removed=[80])
    with pytest.raises(ValueError, match="some but not all"):
        mislabel_detection(np.arange(4.0), [])
    with pytest.raises(ValueError, match="top_fraction"):
        mislabel_detection(np.arange(4.0), [1], top_fraction=0.0)


def test_unpicklable_retrain_with_memory_warns_and_still_caches(tmp_path, regression):
    estimator, X, y, X_query, y_query = regression
    calls = []

    def retrain(X, y):  # a closure: cannot be pickled by reference
        calls.append(1)
        return ridge(X, y)

    scorer = LeaveOneOutScorer(lambda X, y: retrain(X, y), n_removals=2, random_state=0, memory=str(tmp_path))
    with pytest.warns(UserWarning, match="cannot be pickled"):
        first = scorer(estimator, X_query, y_query)
    assert scorer(estimator, X_query, y_query) == first  # the scorer's own cache still works
    assert len(calls) == 3


class FitWithModule:
    """An estimator-like retrain in skorch's style: fit(X, y), then module_."""

    def __init__(self, regularization=RIDGE):
        self.regularization = regularization

    def get_params(self, deep=True):
        return {"regularization": self.regularization}

    def set_params(self, **params):
        self.regularization = params.get("regularization", self.regularization)
        return self

    def fit(self, X, y):
        self.module_ = ridge(X, y)
        return self


def test_retrain_may_be_an_estimator_with_fit(regression):
    estimator, X, y, X_query, y_query = regression
    by_function = LeaveOneOutScorer(ridge, n_removals=6, random_state=1)(estimator, X_query, y_query)
    by_fit = LeaveOneOutScorer(FitWithModule(), n_removals=6, random_state=1)(estimator, X_query, y_query)
    assert by_fit == pytest.approx(by_function, rel=1e-12)


def test_query_losses_match_torch(classification_problem):
    model, X, y = classification_problem
    expected = torch.nn.functional.cross_entropy(model(X), y, reduction="none").detach().numpy()
    np.testing.assert_allclose(query_losses(model, "cross_entropy", X.numpy(), y.numpy()), expected, rtol=1e-12)


def test_truth_containers_hold_what_they_say(regression):
    _, X, y, X_query, y_query = regression
    truth = leave_one_out_truth(ridge, X, y, X_query, y_query, loss="mse", removed=[3, 7])
    assert isinstance(truth, LeaveOneOutTruth) and truth.n_train == 80
    without_3 = ridge(np.delete(X, 3, axis=0), np.delete(y, 3))
    expected = query_losses(without_3, "mse", X_query, y_query) - truth.base_losses
    np.testing.assert_allclose(truth.loss_changes[:, 0], expected, rtol=1e-12)
