"""skinfl.metrics.data_cleaning: which points each ranking removes, chunking, a real gain, and errors."""

import joblib
import numpy as np
import pytest
import sklearn
import torch
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.utils import check_random_state
from torch import nn

from skinfl import DirectInfluence, InfluenceEnsemble
from skinfl.metrics import DataCleaningScorer, data_cleaning
from skinfl.metrics._cleaning import _accuracy
from skinfl.retraining import LogisticRegressionRetrainer

N_TRAIN = 40


class RowsModel:
    """A fake model that knows the training rows it was given.

    It classifies test point ``t`` correctly (predicts 0, the label of every
    test point) exactly when training point ``t`` was removed and lies in the
    first half of the training set, so its accuracy depends on which points
    were removed, not only on how many.
    """

    def __init__(self, rows):
        self.rows = rows

    def predict(self, X_test):
        removed = np.setdiff1d(np.arange(N_TRAIN), self.rows)
        predicted = np.ones(len(X_test), dtype=int)
        predicted[removed[removed < N_TRAIN // 2]] = 0
        return predicted


def expected_accuracy(removed):
    removed = np.asarray(removed)
    return np.count_nonzero(removed < N_TRAIN // 2) / N_TRAIN


class RecordingRetrain:
    """``retrain`` that records, in order, the training rows of each call (found by their values)."""

    def __init__(self, X, y):
        self.index = {row.tobytes(): i for i, row in enumerate(np.asarray(X))}
        self.y = np.asarray(y)
        self.trained_on = []

    def __call__(self, X, y):
        rows = np.array([self.index[row.tobytes()] for row in np.asarray(X)])
        np.testing.assert_array_equal(np.asarray(y), self.y[rows])  # the labels travel with their rows
        self.trained_on.append(rows)
        return RowsModel(rows)


@pytest.fixture(scope="module")
def small():
    """A fitted logistic regression on 40 points, 15 validation points, 40 test points (all label 0)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N_TRAIN + 15, 3))
    y = (X @ np.array([1.0, -1.0, 0.5]) + 0.8 * rng.normal(size=len(X)) > 0).astype(np.int64)
    X_train, y_train, X_val, y_val = X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]
    retrain = LogisticRegressionRetrainer(C=1.0)
    estimator = DirectInfluence(retrain(X_train, y_train), loss="bce_with_logits",
                                regularization=retrain.regularization_for(N_TRAIN)).fit(X_train, y_train)
    X_test, y_test = rng.normal(size=(N_TRAIN, 3)), np.zeros(N_TRAIN, dtype=np.int64)
    return estimator, X_train, y_train, X_val, y_val, X_test, y_test


def test_each_ranking_removes_the_expected_points(small):
    estimator, X_train, y_train, X_val, y_val, X_test, y_test = small
    retrain = RecordingRetrain(X_train, y_train)
    fractions = (0.05, 0.1, 0.25)
    result = data_cleaning(estimator, retrain, X_val, y_val, X_test, y_test, fractions=fractions,
                           n_random=3, random_state=7)

    # The orders, computed here directly.
    scores = estimator.influences(X_val, y_val).sum(axis=0)
    with torch.no_grad():
        logits = estimator.model_(torch.as_tensor(X_train))[:, 0]
        losses = nn.functional.binary_cross_entropy_with_logits(
            logits, torch.as_tensor(y_train, dtype=logits.dtype), reduction="none").numpy()
    rng = check_random_state(7)
    permutations = np.stack([rng.permutation(N_TRAIN) for _ in range(3)])
    np.testing.assert_allclose(result.scores, scores, rtol=1e-12)
    np.testing.assert_array_equal(result.removed["influence"], np.argsort(scores))
    assert scores[result.removed["influence"][0]] == scores.min() < 0  # most harmful first
    np.testing.assert_allclose(result.losses, losses, rtol=1e-10)
    np.testing.assert_array_equal(result.removed["loss"], np.argsort(-losses))
    np.testing.assert_array_equal(result.removed["random"], permutations)

    counts = [2, 4, 10]  # round(fraction * 40)
    np.testing.assert_array_equal(result.n_removed, counts)
    expected_orders = [result.removed["influence"], result.removed["loss"], *permutations]
    expected_removed = [order[:count] for order in expected_orders for count in counts]
    assert len(retrain.trained_on) == 1 + len(expected_removed)  # (2 rankings + 3 draws) x 3 fractions + 1
    np.testing.assert_array_equal(retrain.trained_on[0], np.arange(N_TRAIN))  # the baseline, on everything
    for rows, removed in zip(retrain.trained_on[1:], expected_removed):
        np.testing.assert_array_equal(rows, np.setdiff1d(np.arange(N_TRAIN), removed))

    # Accuracies on the test points, their mean over the random draws, and gains.
    assert result.baseline_accuracy == 0.0
    for name in ("influence", "loss"):
        expected = [expected_accuracy(result.removed[name][:count]) for count in counts]
        np.testing.assert_allclose(result.accuracy[name], expected)
        np.testing.assert_allclose(result.gain[name], expected)
    draws = np.array([[expected_accuracy(order[:count]) for count in counts] for order in permutations])
    np.testing.assert_allclose(result.random_accuracies, draws)
    np.testing.assert_allclose(result.accuracy["random"], draws.mean(axis=0))
    np.testing.assert_allclose(result.accuracy_std["random"], draws.std(axis=0, ddof=1))

    again = data_cleaning(estimator, RecordingRetrain(X_train, y_train), X_val, y_val, X_test, y_test,
                          fractions=fractions, rankings=["random"], n_random=3, random_state=7)
    np.testing.assert_array_equal(again.removed["random"], permutations)  # reproducible
    assert set(again.accuracy) == {"random"} and again.scores is None and again.losses is None
    # Without the influence ranking the validation points are not needed.
    by_loss = data_cleaning(estimator, RecordingRetrain(X_train, y_train), None, None, X_test, y_test,
                            fractions=fractions, rankings="loss")
    np.testing.assert_array_equal(by_loss.removed["loss"], result.removed["loss"])


def test_training_data_given_or_fitted_and_precomputed_scores(small):
    estimator, X_train, y_train, X_val, y_val, X_test, y_test = small
    fitted = data_cleaning(estimator, RecordingRetrain(X_train, y_train), X_val, y_val, X_test, y_test,
                           fractions=(0.1,), rankings=("influence", "loss"))
    given = data_cleaning(estimator, RecordingRetrain(X_train, y_train), X_val, y_val, X_test, y_test,
                          X=torch.as_tensor(X_train), y=torch.as_tensor(y_train), fractions=(0.1,),
                          rankings=("influence", "loss"))
    np.testing.assert_allclose(given.scores, fitted.scores, rtol=1e-12)
    np.testing.assert_allclose(given.losses, fitted.losses, rtol=1e-12)
    np.testing.assert_array_equal(given.accuracy["influence"], fitted.accuracy["influence"])

    # Precomputed scores need no estimator; lower is more harmful.
    scores = np.arange(N_TRAIN, dtype=float)[::-1]
    retrain = RecordingRetrain(X_train, y_train)
    result = data_cleaning(None, retrain, X_val, y_val, X_test, y_test, X=X_train, y=y_train, fractions=(0.1,),
                           rankings=("influence",), influence_scores=scores)
    np.testing.assert_array_equal(result.removed["influence"], np.arange(N_TRAIN)[::-1])
    np.testing.assert_array_equal(retrain.trained_on[1], np.arange(N_TRAIN - 4))
    assert result.scores is not scores and result.scores.dtype == np.float64


def test_an_ensemble_ranks_by_its_mean_influence_and_mean_loss(small):
    _, X_train, y_train, X_val, y_val, X_test, y_test = small
    members = []
    for C in (0.5, 2.0):
        retrain = LogisticRegressionRetrainer(C=C)
        members.append(DirectInfluence(retrain(X_train, y_train), loss="bce_with_logits",
                                       regularization=retrain.regularization_for(N_TRAIN)))
    ensemble = InfluenceEnsemble(members, weights=[1.0, 3.0]).fit(X_train, y_train)
    result = data_cleaning(ensemble, RecordingRetrain(X_train, y_train), X_val, y_val, X_test, y_test,
                           fractions=(0.1,), rankings=("influence", "loss"))
    fitted = ensemble.estimators_
    scores = [member.influences(X_val, y_val).sum(axis=0) for member in fitted]
    np.testing.assert_allclose(result.scores, 0.25 * scores[0] + 0.75 * scores[1], rtol=1e-10)
    losses = []
    for member in fitted:
        with torch.no_grad():
            logits = member.model_(torch.as_tensor(X_train))[:, 0]
            losses.append(nn.functional.binary_cross_entropy_with_logits(
                logits, torch.as_tensor(y_train, dtype=logits.dtype), reduction="none").numpy())
    np.testing.assert_allclose(result.losses, 0.25 * losses[0] + 0.75 * losses[1], rtol=1e-10)


def test_validation_rows_in_chunks_give_the_same_scores(small, monkeypatch):
    estimator, X_train, y_train, X_val, y_val, X_test, y_test = small
    calls = []
    influences = estimator.influences

    def counted(X_rows, y_rows, *args, **kwargs):
        calls.append((len(X_rows), kwargs))
        return influences(X_rows, y_rows, *args, **kwargs)

    monkeypatch.setattr(estimator, "influences", counted)
    run = {"fractions": (0.1,), "rankings": ("influence",)}
    whole = data_cleaning(estimator, RecordingRetrain(X_train, y_train), X_val, y_val, X_test, y_test, **run)
    assert [n for n, _ in calls] == [15] and calls[0][1] == {}  # normalize is not passed when None
    calls.clear()
    # 4 rows of 40 float64 influences = 1280 bytes: the validation rows go 4 at a time.
    with sklearn.config_context(working_memory=1300 / 2**20):
        chunked = data_cleaning(estimator, RecordingRetrain(X_train, y_train), X_val, y_val, X_test, y_test, **run)
    assert [n for n, _ in calls] == [4, 4, 4, 3]
    np.testing.assert_allclose(chunked.scores, whole.scores, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(chunked.removed["influence"], whole.removed["influence"])


@pytest.mark.parametrize("normalize", ["relatif", "cosine"])
def test_normalized_scores_are_the_sums_of_normalized_influences(small, normalize):
    estimator, X_train, y_train, X_val, y_val, X_test, y_test = small
    expected = estimator.influences(X_val, y_val, normalize=normalize).sum(axis=0)
    assert not np.allclose(expected, estimator.influences(X_val, y_val).sum(axis=0))
    with sklearn.config_context(working_memory=1300 / 2**20):  # 4 validation rows at a time
        result = data_cleaning(estimator, RecordingRetrain(X_train, y_train), X_val, y_val, X_test, y_test,
                               fractions=(0.1,), rankings=("influence",), normalize=normalize)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(result.removed["influence"], np.argsort(expected, kind="stable"))
    with pytest.raises(ValueError, match="normalize must be None, 'relatif' or 'cosine'"):
        data_cleaning(estimator, RecordingRetrain(X_train, y_train), X_val, y_val, X_test, y_test,
                      fractions=(0.1,), normalize="relative")


def test_normalize_is_passed_to_influences(small, monkeypatch):
    estimator, X_train, y_train, X_val, y_val, X_test, y_test = small
    seen = []

    def influences(X_rows, y_rows, X=None, y=None, **kwargs):
        seen.append(kwargs)
        return np.ones((len(X_rows), N_TRAIN))

    monkeypatch.setattr(estimator, "influences", influences)
    data_cleaning(estimator, RecordingRetrain(X_train, y_train), X_val, y_val, X_test, y_test, fractions=(0.1,),
                  rankings=("influence",), normalize="relatif")
    assert seen == [{"normalize": "relatif"}]


def flipped_problem(seed=0):
    """Two classes in 10 dimensions; 30 of the 200 training labels (15%) moved from class 0 to class 1."""
    rng = np.random.default_rng(seed)
    X, y = make_classification(n_samples=900, n_features=10, n_informative=5, n_redundant=0, class_sep=1.0,
                               random_state=seed)
    X_train, y_train = X[:200], y[:200].copy()
    flipped = rng.choice(np.flatnonzero(y_train == 0), size=30, replace=False)
    y_train[flipped] = 1
    return X_train, y_train, flipped, X[200:400], y[200:400], X[400:], y[400:]


def test_influence_cleaning_beats_random_removal():
    X_train, y_train, flipped, X_val, y_val, X_test, y_test = flipped_problem()
    retrain = LogisticRegressionRetrainer(C=1.0)
    model = retrain(X_train, y_train)  # a torch.nn.Linear with one logit
    estimator = DirectInfluence(model, loss="bce_with_logits",
                                regularization=retrain.regularization_for(len(X_train))).fit(X_train, y_train)
    result = data_cleaning(estimator, retrain, X_val, y_val, X_test, y_test, fractions=(0.1, 0.2),
                           n_random=5, random_state=0)
    # The baseline is the model the estimator explains, measured on the test points.
    assert result.baseline_accuracy == _accuracy(model, X_test, y_test)
    # Removing the most harmful points helps; removing random ones does not help as much.
    assert np.all(result.gain["influence"] > result.gain["random"])
    assert result.gain["influence"][0] > 0.01
    # The points removed first are mostly wrong labels (15% of the training set).
    assert np.isin(result.removed["influence"][:20], flipped).mean() > 0.5
    # Retrainings in parallel give the same accuracies (threads here: worker processes take seconds to start).
    with joblib.parallel_config(backend="threading"):
        parallel = data_cleaning(estimator, retrain, X_val, y_val, X_test, y_test, fractions=(0.1, 0.2),
                                 rankings=("influence",), n_jobs=2)
    assert parallel.baseline_accuracy == result.baseline_accuracy
    np.testing.assert_array_equal(parallel.accuracy["influence"], result.accuracy["influence"])


def test_scorer_is_the_gain_of_the_influence_ranking(small):
    X_train, y_train, _, X_val, y_val, X_test, y_test = flipped_problem()
    retrain = LogisticRegressionRetrainer(C=1.0)
    estimator = DirectInfluence(retrain(X_train, y_train), loss="bce_with_logits",
                                regularization=retrain.regularization_for(len(X_train))).fit(X_train, y_train)
    calls = []

    def counting(X, y):
        calls.append(len(X))
        return retrain(X, y)

    scorer = DataCleaningScorer(counting, X_test, y_test, fraction=0.1)
    score = scorer(estimator, X_val, y_val)
    assert sorted(calls) == [180, 200]
    assert scorer(estimator, X_val, y_val) == score and len(calls) == 3  # the baseline is kept
    result = data_cleaning(estimator, retrain, X_val, y_val, X_test, y_test, fractions=(0.1,),
                           rankings=("influence",))
    assert score == pytest.approx(result.gain["influence"][0])
    assert "X_test=<500 samples>" in repr(scorer)


def test_accuracy_of_each_kind_of_model():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4))
    layer = nn.Linear(4, 3, dtype=torch.float64)
    with torch.no_grad():
        predicted = layer(torch.as_tensor(X)).argmax(dim=1).numpy()
    y = predicted.copy()
    y[:6] = (y[:6] + 1) % 3
    assert _accuracy(layer, X, y) == pytest.approx(24 / 30)
    assert _accuracy(layer, torch.as_tensor(X), torch.as_tensor(y).reshape(-1, 1)) == pytest.approx(24 / 30)
    one_logit = nn.Linear(4, 1, dtype=torch.float64)
    with torch.no_grad():
        positive = (one_logit(torch.as_tensor(X))[:, 0] > 0).long().numpy()
    assert _accuracy(one_logit, X, positive) == 1.0
    assert _accuracy(one_logit, X, 1 - positive) == 0.0
    classifier = LogisticRegression().fit(X, y)
    assert _accuracy(classifier, X, y) == pytest.approx(classifier.score(X, y))
    with pytest.raises(TypeError, match="torch.nn.Module or a model with predict"):
        _accuracy(object(), X, y)
    with pytest.raises(ValueError, match="one class label per sample"):
        _accuracy(layer, X, np.zeros((30, 2)))


def test_errors(small):
    estimator, X_train, y_train, X_val, y_val, X_test, y_test = small
    retrain = RecordingRetrain(X_train, y_train)

    def clean(**kwargs):
        arguments = {"estimator": estimator, "retrain": retrain, "X_val": X_val, "y_val": y_val,
                     "X_test": X_test, "y_test": y_test, "fractions": (0.1,)}
        return data_cleaning(**{**arguments, **kwargs})

    for fraction in (0, 1, -0.1, 1.5, np.nan):
        with pytest.raises(ValueError, match=r"fractions must lie in \(0, 1\)"):
            clean(fractions=(0.1, fraction))
    with pytest.raises(ValueError, match="fractions is empty"):
        clean(fractions=())
    with pytest.raises(ValueError, match="fraction 0.01 removes no point of the 40"):
        clean(fractions=(0.01,))
    with pytest.raises(ValueError, match="Unknown ranking 'gradient'"):
        clean(rankings=("influence", "gradient"))
    with pytest.raises(ValueError, match="must not repeat"):
        clean(rankings=("loss", "loss"))
    with pytest.raises(ValueError, match="X_val and y_val have different numbers of samples: 15 and 14"):
        clean(y_val=y_val[:-1])
    with pytest.raises(ValueError, match="X_test and y_test have different numbers of samples"):
        clean(X_test=X_test[:-1])
    with pytest.raises(ValueError, match="X and y have different numbers of samples"):
        clean(X=X_train, y=y_train[:-1])
    with pytest.raises(ValueError, match="X_val and y_val are both required"):
        clean(y_val=None)
    with pytest.raises(ValueError, match="y is given without X"):
        clean(y=y_train)
    with pytest.raises(TypeError, match="retrain must be a callable"):
        clean(retrain="logistic")
    with pytest.raises(TypeError, match="needs a fitted influence estimator to compute the influence ranking"):
        clean(estimator=None, X=X_train, y=y_train)
    with pytest.raises(TypeError, match="scores skinfl influence estimators"):
        clean(estimator=LogisticRegression())
    with pytest.raises(ValueError, match=r"influence_scores must have shape \(n_train,\) = \(40,\)"):
        clean(influence_scores=np.zeros(39))
    with pytest.raises(ValueError, match="influence_scores contains NaN"):
        clean(influence_scores=np.full(40, np.nan))
    with pytest.raises(ValueError, match="normalize applies to influences computed here"):
        clean(influence_scores=np.zeros(40), normalize="cosine")
    with pytest.raises(ValueError, match="n_random must be a positive integer"):
        clean(n_random=0)
    assert not retrain.trained_on  # every error comes before any retraining
