"""InfluenceEnsemble: the weighted mean of its members' results, streamed, as a scikit-learn composite.

Three small networks of one architecture, trained from different seeds on
the same data, are the members (exact DirectInfluence and a tightly
converged CgInfluence). Every result of the ensemble is checked against the
weighted mean of the members' own results, computed here with numpy.
"""

import inspect
import math
import pickle
import warnings

import joblib
import numpy as np
import pytest
import sklearn
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.utils.validation import check_is_fitted
from torch import nn

import skinfl
import skinfl.ensemble
from skinfl import CgInfluence, DirectInfluence, InfluenceEnsemble
from skinfl.exceptions import CgConvergenceWarning
from skinfl.metrics import LdsScorer, ReferenceAgreementScorer, linear_datamodeling_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_TRAIN, N_TEST = 40, 9
CUSTOM_WEIGHTS = [1.0, 3.0, 0.5]


def architecture(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def trained(X, y, seed, steps=60):
    """A network trained briefly (Adam) from ``seed``, in eval mode."""
    model = architecture(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def problem():
    generator = torch.Generator().manual_seed(3)
    X = torch.randn(N_TRAIN + N_TEST, 4, generator=generator, dtype=torch.float64)
    y = (X[:, 0] + X[:, 1] ** 2 > 1).long() + (X[:, 2] > 0.5).long()
    X_train, y_train = X[:N_TRAIN], y[:N_TRAIN]
    models = [trained(X_train, y_train, seed) for seed in (0, 1, 2)]
    return models, X_train.numpy(), y_train.numpy(), X[N_TRAIN:].numpy(), y[N_TRAIN:].numpy()


def members_of(models, regularization=0.1):
    """Exact members on the Gauss-Newton curvature: positive definite, although the models were trained briefly."""
    return [DirectInfluence(models[0], regularization=regularization, second_order="gauss_newton"),
            CgInfluence(models[1], regularization=regularization, second_order="gauss_newton", rtol=1e-13,
                        max_iter=500, random_state=0),
            DirectInfluence(models[2], regularization=regularization, second_order="gauss_newton")]


@pytest.fixture(scope="module")
def fitted(problem):
    """``weights -> fitted ensemble`` (cached)."""
    models, X, y, _, _ = problem
    cache = {}

    def make(weights=None):
        key = None if weights is None else tuple(weights)
        if key not in cache:
            cache[key] = InfluenceEnsemble(members_of(models), weights=weights).fit(X, y)
        return cache[key]

    return make


def weighted(ensemble, values):
    weights = np.asarray(ensemble.weights_)
    return sum(w * np.asarray(v) for w, v in zip(weights, values))


def member_influences(ensemble, X_test, y_test, **kwargs):
    return [member.influences(X_test, y_test, **kwargs) for member in ensemble.estimators_]


def top_k(matrix, k, largest):
    order = np.argsort(-matrix if largest else matrix, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(matrix, order, axis=1)


def counting(monkeypatch, member, method="influences"):
    """Record the number of test rows of each call of ``member.method``."""
    calls = []
    original = getattr(member, method)

    def wrapper(X_test, *args, **kwargs):
        calls.append(len(X_test))
        return original(X_test, *args, **kwargs)

    monkeypatch.setattr(member, method, wrapper)
    return calls


# ------------------------------------------------------------------ the weighted mean
@pytest.mark.parametrize("weights", [None, CUSTOM_WEIGHTS], ids=["uniform", "custom"])
def test_influences_are_the_weighted_mean_of_the_members(fitted, problem, weights):
    _, _, _, X_test, y_test = problem
    ensemble = fitted(weights)
    expected_weights = np.full(3, 1 / 3) if weights is None else np.asarray(weights) / sum(weights)
    np.testing.assert_allclose(ensemble.weights_, expected_weights, rtol=1e-15)
    members = member_influences(ensemble, X_test, y_test)
    result = ensemble.influences(X_test, y_test)
    assert isinstance(result, np.ndarray) and result.shape == (N_TEST, N_TRAIN) and result.dtype == np.float64
    np.testing.assert_allclose(result, weighted(ensemble, members), rtol=1e-10, atol=1e-14)
    # The members' models differ, so the mean is none of them.
    assert all(not np.allclose(result, member, rtol=1e-3) for member in members)
    # Against other training points, and on the prediction measurement (y_test=None).
    X, y = problem[1][:25], problem[2][:25]
    np.testing.assert_allclose(ensemble.influences(X_test, None, X, y),
                               weighted(ensemble, member_influences(ensemble, X_test, None, X=X, y=y)),
                               rtol=1e-10, atol=1e-14)


def test_the_members_are_fitted_clones(problem, fitted):
    models, X, y, X_test, y_test = problem
    ensemble = fitted()
    for given, member, model in zip(ensemble.estimators, ensemble.estimators_, models):
        assert member is not given and member.model is not model
        assert not hasattr(given, "n_samples_fit_")  # the given members stay unfitted
        alone = clone(given).fit(X, y)
        np.testing.assert_allclose(member.influences(X_test, y_test), alone.influences(X_test, y_test),
                                   rtol=1e-10, atol=1e-14)
    assert ensemble.n_samples_fit_ == N_TRAIN and ensemble.n_features_in_ == 4


@pytest.mark.parametrize("weights", [None, CUSTOM_WEIGHTS], ids=["uniform", "custom"])
def test_self_influence_is_the_weighted_mean(fitted, problem, weights):
    _, X, y, _, _ = problem
    ensemble = fitted(weights)
    expected = weighted(ensemble, [member.self_influence(X, y) for member in ensemble.estimators_])
    result = ensemble.self_influence(X, y)
    assert isinstance(result, np.ndarray) and result.shape == (N_TRAIN,)
    np.testing.assert_allclose(result, expected, rtol=1e-10)


def test_score_is_the_weighted_mean(fitted, problem):
    _, _, _, X_test, y_test = problem
    ensemble = fitted(CUSTOM_WEIGHTS)
    expected = weighted(ensemble, [member.score(X_test, y_test) for member in ensemble.estimators_])
    assert ensemble.score(X_test, y_test) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("which", ["helpful", "harmful", "both"])
def test_top_influences_rank_the_mean_matrix(fitted, problem, which):
    _, _, _, X_test, y_test = problem
    ensemble = fitted(CUSTOM_WEIGHTS)
    mean = weighted(ensemble, member_influences(ensemble, X_test, y_test))
    k = 4
    orders = {"helpful": [True], "harmful": [False], "both": [True, False]}[which]
    tops = [top_k(mean, k, largest) for largest in orders]
    indices, values = ensemble.top_influences(X_test, y_test, k=k, which=which)
    assert indices.dtype == np.int64 and indices.shape == values.shape == (N_TEST, k * len(orders))
    np.testing.assert_array_equal(indices, np.concatenate([top[0] for top in tops], axis=1))
    np.testing.assert_allclose(values, np.concatenate([top[1] for top in tops], axis=1), rtol=1e-10, atol=1e-14)
    # Not a merge of the members' own rankings: some test point ranks differently from every member.
    member_tops = [top_k(np.asarray(m), k, orders[0])[0] for m in member_influences(ensemble, X_test, y_test)]
    assert any(not np.array_equal(indices[:, :k], member_top) for member_top in member_tops)


# ------------------------------------------------------------------ streaming
def test_chunks_of_test_rows_give_the_same_results(fitted, problem, monkeypatch):
    _, _, _, X_test, y_test = problem
    ensemble = fitted(CUSTOM_WEIGHTS)
    whole = ensemble.influences(X_test, y_test)
    top_whole = ensemble.top_influences(X_test, y_test, k=3, which="both")
    calls = counting(monkeypatch, ensemble.estimators_[0])
    rows = 2
    with sklearn.config_context(working_memory=rows * N_TRAIN * 8 / 2**20):
        chunked = ensemble.influences(X_test, y_test)
        assert calls == [2, 2, 2, 2, 1]  # one call per chunk, no member's whole matrix
        calls.clear()
        top_chunked = ensemble.top_influences(X_test, y_test, k=3, which="both")
        assert calls == [2, 2, 2, 2, 1]
    # Equal to rounding: a member's solve of fewer right-hand sides rounds differently (CG's block solve
    # converges to 1e-13 from other Krylov spaces).
    np.testing.assert_allclose(chunked, whole, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(top_chunked[0], top_whole[0])
    np.testing.assert_allclose(top_chunked[1], top_whole[1], rtol=1e-10, atol=1e-12)


def test_a_member_warns_once_per_call_not_once_per_chunk(problem):
    models, X, y, X_test, y_test = problem
    members = [CgInfluence(models[1], regularization=0.1, second_order="gauss_newton", max_iter=1, rtol=1e-14,
                           preconditioner=None),
               DirectInfluence(models[0], regularization=0.1, second_order="gauss_newton")]
    ensemble = InfluenceEnsemble(members).fit(X, y)
    with sklearn.config_context(working_memory=2 * N_TRAIN * 8 / 2**20), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ensemble.influences(X_test, y_test)
    not_converged = [warning for warning in caught if issubclass(warning.category, CgConvergenceWarning)]
    assert len(not_converged) == 1 and "9 systems" in str(not_converged[0].message)  # all five chunks' solves
    assert not_converged[0].filename == __file__  # located at the user's line
    assert ensemble.estimators_[0].n_iter_ == 1


def test_out_memmap_is_written_chunk_by_chunk(fitted, problem, tmp_path):
    _, _, _, X_test, y_test = problem
    ensemble = fitted(CUSTOM_WEIGHTS)
    expected = ensemble.influences(X_test, y_test)
    out = np.lib.format.open_memmap(tmp_path / "influences.npy", mode="w+", dtype="float32", shape=(N_TEST, N_TRAIN))
    with sklearn.config_context(working_memory=3 * N_TRAIN * 8 / 2**20):
        result = ensemble.influences(X_test, y_test, out=out)
    assert result is out
    np.testing.assert_allclose(np.load(tmp_path / "influences.npy"), expected.astype(np.float32), rtol=1e-6)
    with pytest.raises(ValueError, match="out has shape"):
        ensemble.influences(X_test, y_test, out=np.empty((N_TEST, N_TRAIN + 1)))


def test_a_result_above_max_result_bytes_is_refused_before_any_work(fitted, problem, monkeypatch):
    _, _, _, X_test, y_test = problem
    ensemble = fitted()
    calls = counting(monkeypatch, ensemble.estimators_[0])
    with pytest.raises(ValueError, match="max_result_bytes"):
        ensemble.influences(X_test, y_test, max_result_bytes=100)
    assert calls == []


def test_torch_in_torch_out(fitted, problem):
    _, _, _, X_test, y_test = problem
    ensemble = fitted(CUSTOM_WEIGHTS)
    X_t, y_t = torch.from_numpy(X_test), torch.from_numpy(y_test)
    result = ensemble.influences(X_t, y_t)
    assert isinstance(result, torch.Tensor) and result.dtype == torch.float64
    np.testing.assert_allclose(result.numpy(), ensemble.influences(X_test, y_test), rtol=1e-10, atol=1e-12)
    values = ensemble.self_influence(X_t, y_t)
    assert isinstance(values, torch.Tensor)
    np.testing.assert_allclose(values.numpy(), ensemble.self_influence(X_test, y_test), rtol=1e-12)
    indices, top = ensemble.top_influences(X_t, y_t, k=2)
    assert isinstance(indices, torch.Tensor) and indices.dtype == torch.int64 and isinstance(top, torch.Tensor)
    np.testing.assert_array_equal(indices.numpy(), ensemble.top_influences(X_test, y_test, k=2)[0])


def test_pandas_test_data_are_cut_by_position(fitted, problem):
    pd = pytest.importorskip("pandas")
    _, _, _, X_test, y_test = problem
    ensemble = fitted()
    frame = pd.DataFrame(X_test, index=np.arange(100, 100 + N_TEST))  # labels that are not positions
    series = pd.Series(y_test, index=frame.index)
    with sklearn.config_context(working_memory=2 * N_TRAIN * 8 / 2**20):
        result = ensemble.influences(frame, series)
    np.testing.assert_allclose(result, ensemble.influences(X_test, y_test), rtol=1e-10, atol=1e-12)


class KeywordModel(nn.Module):
    """A network called as ``model(x=...)``: keyword inputs, skorch's convention."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def test_dict_test_data_are_cut_key_by_key(problem):
    models, X, y, X_test, y_test = problem
    keyword_members = [DirectInfluence(KeywordModel(model), regularization=0.1) for model in models[:2]]
    plain_members = [DirectInfluence(model, regularization=0.1) for model in models[:2]]
    keyword = InfluenceEnsemble(keyword_members).fit({"x": X}, y)
    plain = InfluenceEnsemble(plain_members).fit(X, y)
    with sklearn.config_context(working_memory=2 * N_TRAIN * 8 / 2**20):
        result = keyword.influences({"x": X_test}, y_test)
    np.testing.assert_allclose(result, plain.influences(X_test, y_test), rtol=1e-10, atol=1e-12)


def test_dask_in_lazy_dask_out(fitted, problem, tmp_path):
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    _, X, y, X_test, y_test = problem
    ensemble = fitted(CUSTOM_WEIGHTS)
    X_d, y_d = da.from_array(X_test, chunks=4), da.from_array(y_test, chunks=4)
    with dask.config.set(scheduler="sync"):
        lazy = ensemble.influences(X_d, y_d)
        assert isinstance(lazy, da.Array) and lazy.shape == (N_TEST, N_TRAIN)
        np.testing.assert_allclose(lazy.compute(), ensemble.influences(X_test, y_test), rtol=1e-10, atol=1e-14)
        values = ensemble.self_influence(da.from_array(X, chunks=16), da.from_array(y, chunks=16))
        assert isinstance(values, da.Array)
        np.testing.assert_allclose(values.compute(), ensemble.self_influence(X, y), rtol=1e-10)
        indices, top = ensemble.top_influences(X_d, y_d, k=3, which="both")
        assert isinstance(indices, da.Array) and isinstance(top, da.Array)
        eager = ensemble.top_influences(X_test, y_test, k=3, which="both")
        np.testing.assert_array_equal(indices.compute(), eager[0])
        np.testing.assert_allclose(top.compute(), eager[1], rtol=1e-10, atol=1e-14)
        out = np.zeros((N_TEST, N_TRAIN))
        assert ensemble.influences(X_d, y_d, out=out) is out
        np.testing.assert_allclose(out, ensemble.influences(X_test, y_test), rtol=1e-10, atol=1e-14)


def test_fit_in_threads_equals_a_serial_fit(problem, fitted):
    models, X, y, X_test, y_test = problem
    threaded = InfluenceEnsemble(members_of(models), n_jobs=2).fit(X, y)
    np.testing.assert_allclose(threaded.influences(X_test, y_test), fitted().influences(X_test, y_test),
                               rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ fitted members, errors
def test_fitted_members_are_used_without_fit(problem, fitted):
    models, X, y, X_test, y_test = problem
    members = [member.fit(X, y) for member in members_of(models)]
    ensemble = InfluenceEnsemble(members, weights=CUSTOM_WEIGHTS)
    check_is_fitted(ensemble)
    assert not hasattr(ensemble, "estimators_")
    expected = weighted(fitted(CUSTOM_WEIGHTS), [m.influences(X_test, y_test) for m in members])
    np.testing.assert_allclose(ensemble.influences(X_test, y_test), expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ensemble.self_influence(X_test, y_test),
                               fitted(CUSTOM_WEIGHTS).self_influence(X_test, y_test), rtol=1e-10)


def test_unfitted_members_without_fit_raise_not_fitted(problem):
    models, X, y, X_test, y_test = problem
    members = members_of(models)
    members[0].fit(X, y)  # one fitted member is not enough
    ensemble = InfluenceEnsemble(members)
    with pytest.raises(NotFittedError):
        check_is_fitted(ensemble)
    for call in (lambda: ensemble.influences(X_test, y_test), lambda: ensemble.self_influence(X_test, y_test),
                 lambda: ensemble.top_influences(X_test, y_test), lambda: ensemble.score(X_test, y_test)):
        with pytest.raises(NotFittedError, match="call fit"):
            call()


def test_members_fitted_on_different_data_sizes_are_refused(problem):
    models, X, y, X_test, y_test = problem
    members = [DirectInfluence(models[0], regularization=0.1).fit(X, y),
               DirectInfluence(models[1], regularization=0.1).fit(X[:30], y[:30])]
    with pytest.raises(ValueError, match=r"different numbers of training points \(\[40, 30\]\)"):
        InfluenceEnsemble(members).influences(X_test, y_test)


@pytest.mark.parametrize("estimators, weights, error, match", [
    ([], None, ValueError, "estimators is empty"),
    ("members", None, (TypeError, ValueError), "estimators"),
    ("not skinfl", None, TypeError, r"estimators\[1\] is a LogisticRegression"),
    ("three", [1.0, 2.0], ValueError, "weights has 2 entries"),
    ("three", [1.0, -1.0, 1.0], ValueError, "non-negative"),
    ("three", [0.0, 0.0, 0.0], ValueError, "all zero"),
    ("three", [1.0, np.nan, 1.0], ValueError, "finite"),
], ids=["empty", "not-a-list", "not-skinfl", "weights-length", "negative", "all-zero", "nan"])
def test_invalid_parameters_are_refused_at_fit(problem, estimators, weights, error, match):
    from sklearn.linear_model import LogisticRegression

    models, X, y, _, _ = problem
    if estimators == "not skinfl":
        estimators = [DirectInfluence(models[0]), LogisticRegression()]
    elif estimators == "three":
        estimators = members_of(models)
    with pytest.raises(error, match=match):
        InfluenceEnsemble(estimators, weights=weights).fit(X, y)


# ------------------------------------------------------------------ scikit-learn citizenship
def test_nested_get_params_and_set_params(problem):
    models = problem[0]
    ensemble = InfluenceEnsemble(members_of(models), weights=[1, 1, 1])
    params = ensemble.get_params()
    assert params["estimators__0__regularization"] == 0.1
    assert params["estimators__1__rtol"] == 1e-13
    assert params["estimators__2"] is ensemble.estimators[2]
    assert set(ensemble.get_params(deep=False)) == {"estimators", "weights", "n_jobs"}
    ensemble.set_params(estimators__0__regularization=0.5, estimators__1__max_iter=7, n_jobs=2, weights=None)
    assert ensemble.estimators[0].regularization == 0.5 and ensemble.estimators[1].max_iter == 7
    assert ensemble.n_jobs == 2 and ensemble.weights is None
    replacement = DirectInfluence(models[1], regularization=0.2)
    ensemble.set_params(estimators__1=replacement, estimators__1__regularization=0.3)
    assert ensemble.estimators[1] is replacement and replacement.regularization == 0.3
    with pytest.raises(ValueError, match="Invalid parameter 'estimators__3__regularization'"):
        ensemble.set_params(estimators__3__regularization=1.0)
    with pytest.raises(ValueError, match="Invalid parameter"):
        ensemble.set_params(regularization=1.0)


def test_clone_copies_members_and_their_models(problem):
    models = problem[0]
    ensemble = InfluenceEnsemble(members_of(models), weights=CUSTOM_WEIGHTS, n_jobs=1)
    copied = clone(ensemble)
    assert copied.weights == CUSTOM_WEIGHTS and copied.n_jobs == 1
    for original, member in zip(ensemble.estimators, copied.estimators):
        assert type(member) is type(original) and member is not original and member.model is not original.model
        assert member.get_params(deep=False).keys() == original.get_params(deep=False).keys()
        torch.testing.assert_close(list(member.model.parameters()), list(original.model.parameters()))


def test_grid_search_over_a_member_parameter(problem):
    models, X, y, _, _ = problem
    candidates = [1e-3, 10.0]
    cv = KFold(2, shuffle=True, random_state=0)
    search = GridSearchCV(InfluenceEnsemble(members_of(models)), {"estimators__0__regularization": candidates},
                          cv=cv).fit(X, y)
    assert [p["estimators__0__regularization"] for p in search.cv_results_["params"]] == candidates
    # The scores are those of the ensemble refitted with each value, recomputed here.
    expected = []
    for value in candidates:
        scores = []
        for train, test in cv.split(X):
            ensemble = InfluenceEnsemble(members_of(models)).set_params(estimators__0__regularization=value)
            scores.append(ensemble.fit(X[train], y[train]).score(X[test], y[test]))
        expected.append(np.mean(scores))
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], expected, rtol=1e-8)
    assert expected[0] != expected[1]
    assert search.best_params_ == {"estimators__0__regularization": candidates[int(np.argmax(expected))]}
    assert search.best_estimator_.estimators_[0].regularization_ == search.best_params_["estimators__0__regularization"]


def test_grid_search_with_a_reference_scorer(problem):
    models, X, y, _, _ = problem
    # The reference is the first model's exact influences: the candidate that puts all weight on that model,
    # with the reference's regularization, agrees with it exactly.
    scorer = ReferenceAgreementScorer(DirectInfluence(models[0], regularization=0.1, second_order="gauss_newton"))
    grid = {"weights": [[1, 1, 1], [1, 0, 0]], "estimators__0__regularization": [0.1, 10.0]}
    search = GridSearchCV(InfluenceEnsemble(members_of(models)), grid, scoring=scorer, cv=2).fit(X, y)
    assert search.best_params_ == {"weights": [1, 0, 0], "estimators__0__regularization": 0.1}
    assert search.best_score_ == pytest.approx(1.0, abs=1e-9)


def retrain(X, y):
    return trained(torch.as_tensor(X), torch.as_tensor(y), seed=0, steps=20)


def test_lds_scorer_takes_an_ensemble(fitted, problem):
    _, _, _, X_test, y_test = problem
    ensemble = fitted()
    scorer = LdsScorer(retrain, n_subsets=4, random_state=0)
    truth = scorer.ground_truth(ensemble, X_test, y_test)
    expected = linear_datamodeling_score(ensemble.influences(X_test, y_test), truth).score
    assert scorer(ensemble, X_test, y_test) == pytest.approx(expected, rel=1e-12)


def test_no_transform():
    assert not hasattr(InfluenceEnsemble, "transform")
    for name in ("estimators", "weights", "n_jobs"):
        assert f"{name} :" in inspect.getdoc(InfluenceEnsemble)


# ------------------------------------------------------------------ persistence
def refuse_to_unpickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("skinfl.load unpickled or torch.load-ed something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (joblib, "load"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(module, name, refuse)


def test_save_load_round_trip(fitted, problem, tmp_path, monkeypatch):
    _, _, _, X_test, y_test = problem
    ensemble = fitted(CUSTOM_WEIGHTS)
    path = skinfl.save(ensemble, tmp_path / "ensemble.skinfl")
    names = skinfl._tensorfile.TensorFile(path).names()
    assert names.count("data.X") == 1 and not any(name.endswith(".data.X") for name in names)  # saved once
    refuse_to_unpickle(monkeypatch)
    loaded = skinfl.load(path, [architecture(seed) for seed in (7, 8, 9)])  # the weights come from the file
    monkeypatch.undo()
    assert isinstance(loaded, InfluenceEnsemble) and loaded.weights == CUSTOM_WEIGHTS
    np.testing.assert_array_equal(loaded.weights_, ensemble.weights_)
    assert [type(m) for m in loaded.estimators_] == [type(m) for m in ensemble.estimators_]
    np.testing.assert_array_equal(loaded.influences(X_test, y_test), ensemble.influences(X_test, y_test))
    np.testing.assert_array_equal(loaded.self_influence(X_test, y_test), ensemble.self_influence(X_test, y_test))
    # One module serves as the architecture of every member.
    np.testing.assert_array_equal(skinfl.load(path, architecture()).influences(X_test, y_test),
                                  ensemble.influences(X_test, y_test))
    with pytest.raises(ValueError, match="3 members, and 2 models"):
        skinfl.load(path, [architecture(), architecture()])


def test_save_load_fitted_members_and_data_kept_apart(problem, tmp_path):
    models, X, y, X_test, y_test = problem
    members = [DirectInfluence(models[0], regularization=0.1).fit(X, y),
               DirectInfluence(models[1], regularization=0.1).fit(X.copy(), y.copy())]
    ensemble = InfluenceEnsemble(members)
    path = skinfl.save(ensemble, tmp_path / "ensemble.skinfl")
    names = skinfl._tensorfile.TensorFile(path).names()
    assert {"members.0.data.X", "members.1.data.X"} <= set(names)
    loaded = skinfl.load(path, models[:2])
    assert not hasattr(loaded, "estimators_")
    np.testing.assert_array_equal(loaded.influences(X_test, y_test), ensemble.influences(X_test, y_test))
    single = skinfl.save(members[0], tmp_path / "single.skinfl")
    with pytest.raises(ValueError, match="not an InfluenceEnsemble"):
        skinfl.load(single, models[:2])


# ------------------------------------------------------------------ beyond first order
def working_memory_for(rows=None, columns=None, n_columns=N_TRAIN):
    """A ``working_memory`` (MiB) that holds ``rows`` rows of float64 results, or ``columns`` columns."""
    return (rows * n_columns if rows is not None else columns * N_TEST) * 8 / 2**20


def ensemble_chunks_of(monkeypatch, columns):
    """Chunks of ``columns`` training points (or groups) in the ensemble only: the members keep the default
    ``working_memory``, under which their Newton steps are solved by Woodbury (not by conjugate gradient, as
    they are when their rows do not fit in it)."""
    monkeypatch.setattr(skinfl.ensemble, "_working_memory_bytes", lambda: columns * N_TEST * 8)


@pytest.mark.parametrize("order", ["first", "newton"])
@pytest.mark.parametrize("with_groups", [False, True], ids=["points", "groups"])
def test_removal_effects_are_the_weighted_mean(fitted, problem, monkeypatch, order, with_groups):
    _, _, _, X_test, y_test = problem
    ensemble = fitted(CUSTOM_WEIGHTS)
    groups = (np.arange(N_TRAIN) * 5) % 7 + 10 if with_groups else None  # interleaved labels 10 to 16
    n_columns = 7 if with_groups else N_TRAIN
    expected = weighted(ensemble, [member.removal_effects(X_test, y_test, groups=groups, order=order)
                                   for member in ensemble.estimators_])
    calls = counting(monkeypatch, ensemble.estimators_[0], "removal_effects")
    if order == "first":
        with sklearn.config_context(working_memory=working_memory_for(rows=3, n_columns=n_columns)):
            result = ensemble.removal_effects(X_test, y_test, groups=groups, order=order)
    else:
        ensemble_chunks_of(monkeypatch, columns=2 if with_groups else 8)
        result = ensemble.removal_effects(X_test, y_test, groups=groups, order=order)
    assert result.shape == (N_TEST, n_columns)
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12)
    if order == "first":  # chunks of test points
        assert calls == [3, 3, 3]
    else:  # chunks of training points (or groups), every test point in each: each step is solved once
        assert calls == [N_TEST] * (4 if with_groups else 5)


def test_newton_removal_of_groups_of_other_training_points(fitted, problem, monkeypatch):
    _, X, y, X_test, y_test = problem
    ensemble = fitted(CUSTOM_WEIGHTS)
    X_other, y_other, groups = X[5:30], y[5:30], np.array(list("abcde") * 5)
    expected = weighted(ensemble, [member.removal_effects(X_test, y_test, X_other, y_other, groups=groups,
                                                          order="newton") for member in ensemble.estimators_])
    ensemble_chunks_of(monkeypatch, columns=2)
    result = ensemble.removal_effects(X_test, y_test, X_other, y_other, groups=groups, order="newton")
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12)
    assert result.shape == (N_TEST, 5)


def test_relatif_influences_are_the_weighted_mean(fitted, problem, monkeypatch):
    _, _, _, X_test, y_test = problem
    ensemble = fitted(CUSTOM_WEIGHTS)
    expected = weighted(ensemble, member_influences(ensemble, X_test, y_test, normalize="relatif"))
    calls = counting(monkeypatch, ensemble.estimators_[0])
    with sklearn.config_context(working_memory=working_memory_for(columns=16)):
        result = ensemble.influences(X_test, y_test, normalize="relatif")
        # RelatIF solves every training point it scores: chunks of training points, so each is solved once.
        assert calls == [N_TEST] * 3
        calls.clear()
        indices, values = ensemble.top_influences(X_test, y_test, k=3, which="both", normalize="relatif")
        assert calls == [N_TEST] * 3
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12)
    assert not np.allclose(result, ensemble.influences(X_test, y_test))
    tops = [top_k(expected, 3, largest) for largest in (True, False)]
    np.testing.assert_array_equal(indices, np.concatenate([top[0] for top in tops], axis=1))
    np.testing.assert_allclose(values, np.concatenate([top[1] for top in tops], axis=1), rtol=1e-9, atol=1e-12)


def test_chunks_of_training_points_keep_the_fitted_feature_names(problem, monkeypatch):
    pd = pytest.importorskip("pandas")
    models, X, y, X_test, y_test = problem
    columns = ["a", "b", "c", "d"]
    frame, test_frame = pd.DataFrame(X, columns=columns), pd.DataFrame(X_test, columns=columns)
    on_frames = InfluenceEnsemble([DirectInfluence(model, regularization=0.1) for model in models[:2]]).fit(frame, y)
    on_arrays = InfluenceEnsemble([DirectInfluence(model, regularization=0.1) for model in models[:2]]).fit(X, y)
    ensemble_chunks_of(monkeypatch, columns=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "X does not have valid feature names"
        result = on_frames.removal_effects(test_frame, y_test, order="newton")
    np.testing.assert_allclose(result, on_arrays.removal_effects(X_test, y_test, order="newton"),
                               rtol=1e-10, atol=1e-13)


def test_chunk_count_matches_working_memory():
    """The chunks of the tests above: ``working_memory`` in MiB over a row of float64 influences."""
    from skinfl.ensemble import _chunks

    with sklearn.config_context(working_memory=2 * N_TRAIN * 8 / 2**20):
        chunks = list(_chunks(N_TEST, N_TRAIN, torch.float64))
    assert len(chunks) == math.ceil(N_TEST / 2) and chunks[-1] == slice(8, 9)
