"""scikit-learn citizenship: checks, clone, search, pipelines, persistence."""

import io
import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from conftest import exact_params
from registry import check_of

from skinfl import CgInfluence, DirectInfluence, InfluenceEnsemble, registered_estimators
from skinfl.exceptions import NotFittedError

# Checks that cannot apply to an estimator of a fixed, pre-trained model.
EXPECTED_FAILED_CHECKS = {
    "check_estimators_dtypes": (
        "integer X is passed to the model unchanged (token ids for embedding layers); "
        "a model with a floating first layer rejects it with an error that says to cast X"
    ),
    # fit_transform(X, y) is fit(X, y).transform(X, y): the inverse-curvature gradients of the training loss at
    # the given targets (what a Pipeline fitting on labelled data needs). scikit-learn's checks compare it with
    # transform(X), which without targets takes the prediction measurement instead; scikit-learn's own
    # TargetEncoder, whose fit_transform also uses y, is exempt from them for the same reason.
    "check_transformer_general": "fit_transform(X, y) uses y, as transform(X, y) does; transform(X) does not",
    "check_transformer_data_not_an_array": "fit_transform(X, y) uses y, as transform(X, y) does; transform(X) does not",
    "check_transformer_n_iter": (
        "CgInfluence's max_iter bounds the solves of transform/influences, which set n_iter_; fit solves "
        "nothing, so n_iter_ is 0 after fit"
    ),
}


class SeededLazyLinear(torch.nn.LazyLinear):
    """A LazyLinear that takes the same weights whenever a fit materialises it.

    The checks stand for a trained model of any input width, whose weights do
    not change between fits; random weights at each fit would make every
    result that depends on them (the residuals in the training gradients)
    differ between fits.
    """

    def reset_parameters(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            super().reset_parameters()


def lazy_linear_estimators():
    """Estimators on a lazily sized linear model, so any input width the checks use works."""
    for cls in registered_estimators().values():
        # A rank of 1 fits whatever width the checks give the lazy layer.
        rank = {} if check_of(cls).full_rank is None else {check_of(cls).full_rank: 1}
        yield cls(SeededLazyLinear(1, dtype=torch.float64), loss="mse", regularization=0.1, **rank)


def _iterates_in_transform_only(estimator):
    """Whether ``max_iter`` bounds iterations that ``fit`` does not run (``n_iter_`` is 0 after fit)."""
    if "max_iter" not in estimator.get_params():
        return False
    rng = np.random.default_rng(0)
    fitted = clone(estimator).fit(rng.normal(size=(8, 3)), rng.normal(size=8))
    return fitted.n_iter_ == 0


def expected_failed_checks(estimator):
    return {
        name: reason
        for name, reason in EXPECTED_FAILED_CHECKS.items()
        if name != "check_transformer_n_iter" or _iterates_in_transform_only(estimator)
    }


@parametrize_with_checks(list(lazy_linear_estimators()), expected_failed_checks=expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        check(estimator)


def lazy_linear_ensemble():
    """An ensemble of two members on lazily sized linear models, one exact and one iterative."""
    return InfluenceEnsemble([DirectInfluence(SeededLazyLinear(1, dtype=torch.float64), loss="mse", regularization=0.1),
                              CgInfluence(SeededLazyLinear(1, dtype=torch.float64), loss="mse", regularization=0.3)],
                             weights=[1, 2])


@parametrize_with_checks([lazy_linear_ensemble()], expected_failed_checks=lambda estimator: {
    "check_estimators_dtypes": EXPECTED_FAILED_CHECKS["check_estimators_dtypes"]})
def test_sklearn_compatible_ensemble(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        check(estimator)


def test_registry_lists_every_estimator():
    import skinfl

    assert {"DirectInfluence", "CgInfluence"} <= set(registered_estimators())
    for name, cls in registered_estimators().items():  # every registered estimator is public
        assert getattr(skinfl, name) is cls and name in skinfl.__all__
    for cls in registered_estimators().values():  # each has a registry entry, whose configurations are valid
        check = check_of(cls)
        assert set(check.params) | set(check.quick_params or {}) <= set(cls(None).get_params()), cls
        assert set(cls._factor_parameters) <= set(cls(None).get_params()), cls


@pytest.mark.parametrize("name", list(registered_estimators()))
def test_fit_transform_is_fit_then_transform_with_the_targets(classification_problem, name):
    # scikit-learn's TransformerMixin.fit_transform would drop y and transform the prediction measurement.
    from conftest import registry_estimator

    model, X, y = classification_problem
    y = (y + 1) % 3  # labels the model does not predict: the loss and the measurement then differ
    est = registry_estimator(name, model)
    expected = clone(est).fit(X, y).transform(X, y)
    torch.testing.assert_close(est.fit_transform(X, y), expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(expected, clone(est).fit(X, y).transform(X))


def test_score_equals_its_formula_on_least_squares():
    """score = -mean_v ||C_val u_v - g_v||^2 / ||g_v||^2, u_v = (C_fit + lambda I)^-1 g_v, in closed form.

    For least squares with torch's mean squared error, C = 2 X^T X / n and g = 2 (x^T w - y) x.
    Fewer than 100 held-out points: every one is a probe.
    """
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 5))
    y = X @ rng.normal(size=(5, 1)) + 0.5 * rng.normal(size=(120, 1))
    w = np.linalg.lstsq(X[:80], y[:80], rcond=None)[0]
    model = torch.nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w.T))
    X_fit, X_val, y_val = X[:80], X[80:], y[80:]
    for regularization in (1e-3, 0.3, 30.0):
        system = 2 * X_fit.T @ X_fit / len(X_fit) + regularization * np.eye(5)
        C_val = 2 * X_val.T @ X_val / len(X_val)
        G = 2 * (X_val @ w - y_val) * X_val
        U = np.linalg.solve(system, G.T).T
        expected = -np.mean(((U @ C_val - G) ** 2).sum(axis=1) / (G**2).sum(axis=1))
        for cls in registered_estimators().values():
            if not check_of(cls).inverts_curvature:
                continue  # its own closed form is checked in its test module
            est = cls(model, loss="mse", regularization=regularization, random_state=0,
                      **exact_params(cls, model)).fit(X_fit, y[:80])
            assert est.score(X_val, y_val) == pytest.approx(expected, rel=1e-8), cls


@pytest.fixture(scope="module")
def digits_problem():
    """A small MLP trained on scaled digits (float32, like users' models)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:400], y[:400]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    scaled = torch.tensor(StandardScaler().fit_transform(X), dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(scaled), torch.tensor(y)).backward()
        optimizer.step()
    return model, X.astype(np.float32), y


def test_clone_and_params(digits_problem):
    model, X, y = digits_problem
    est = CgInfluence(model, regularization=0.1, rtol=1e-5, preconditioner="jacobi")
    params = est.get_params()
    assert params["regularization"] == 0.1 and params["preconditioner"] == "jacobi"
    copy = clone(est)
    assert copy.model is not model  # the model is deep-copied with the estimator
    assert copy.get_params()["rtol"] == 1e-5
    assert copy.set_params(regularization=2.0) is copy and copy.regularization == 2.0
    assert est.regularization == 0.1


def test_unfitted_use_raises_not_fitted(digits_problem):
    model, X, y = digits_problem
    for method in ("transform", "self_influence", "influences"):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            getattr(DirectInfluence(model), method)(X[:2], y[:2])


@pytest.mark.parametrize("n_jobs", [None, 2])
def test_grid_search_over_regularization(digits_problem, n_jobs):
    model, X, y = digits_problem
    pipe = make_pipeline(StandardScaler(), DirectInfluence(model))
    grid = {"directinfluence__regularization": [1e-4, 1e-2, 1.0, 100.0]}
    pipe.set_params(directinfluence__random_state=0)
    search = GridSearchCV(pipe, grid, cv=3, n_jobs=n_jobs).fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores)) and np.all(scores <= 0)
    # The score is not degenerate: neither the smallest nor the largest value wins.
    assert search.best_params_["directinfluence__regularization"] in (1e-2, 1.0)
    assert search.best_estimator_[-1].n_samples_fit_ == len(X)


def test_grid_search_is_the_same_serial_and_parallel(digits_problem):
    model, X, y = digits_problem
    grid = {"regularization": [1e-2, 1.0]}
    est = CgInfluence(model, rtol=1e-6, random_state=0)
    scaled = StandardScaler().fit_transform(X)
    serial = GridSearchCV(est, grid, cv=2).fit(scaled, y).cv_results_["mean_test_score"]
    parallel = GridSearchCV(est, grid, cv=2, n_jobs=2).fit(scaled, y).cv_results_["mean_test_score"]
    np.testing.assert_allclose(serial, parallel, rtol=1e-5)


def test_pipeline_with_preprocessing(digits_problem):
    model, X, y = digits_problem
    scaler = StandardScaler().fit(X)
    pipe = make_pipeline(StandardScaler(), DirectInfluence(model, regularization=0.1)).fit(X, y)
    direct = DirectInfluence(model, regularization=0.1).fit(scaler.transform(X), y)
    # As a transformer, the pipeline gives the measurement's inverse-curvature gradients (no labels in
    # transform).
    np.testing.assert_allclose(pipe.transform(X[:5]), direct.transform(scaler.transform(X[:5])), rtol=1e-5)
    np.testing.assert_allclose(pipe.score(X[:50], y[:50]), direct.score(scaler.transform(X[:50]), y[:50]), rtol=1e-5)
    assert pipe.transform(X[:5]).shape == (5, direct.n_params_)


def test_numpy_in_numpy_out_torch_in_torch_out(digits_problem):
    model, X, y = digits_problem
    scaled = StandardScaler().fit_transform(X).astype(np.float32)
    est = DirectInfluence(model, regularization=0.1).fit(scaled, y)
    as_numpy = est.influences(scaled[:3], y[:3])
    as_torch = est.influences(torch.tensor(scaled[:3]), torch.tensor(y[:3]))
    assert isinstance(as_numpy, np.ndarray) and isinstance(as_torch, torch.Tensor)
    assert as_torch.device == est.device_
    np.testing.assert_allclose(as_numpy, as_torch.numpy())
    assert isinstance(est.self_influence(scaled[:3], y[:3]), np.ndarray)
    assert isinstance(est.transform(torch.tensor(scaled[:3])), torch.Tensor)
    # Lists and other indexables along axis 0 work as numpy does.
    np.testing.assert_allclose(est.influences(scaled[:3].tolist(), y[:3].tolist()), as_numpy)


def test_unfitted_estimator_pickles(digits_problem):
    model, X, y = digits_problem
    buffer = io.BytesIO()
    joblib.dump(DirectInfluence(model, regularization=0.3), buffer)
    buffer.seek(0)
    assert joblib.load(buffer).regularization == 0.3
