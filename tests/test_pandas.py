"""pandas in and out: feature names, set_output, no conversion warnings."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import skinfl
from skinfl import CgInfluence, DirectInfluence

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True, as_frame=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    return model, X, y


def library_warnings(record):
    """Warnings other than torch's own deprecation notices."""
    return [w for w in record if not issubclass(w.category, DeprecationWarning)]


def test_dataframe_and_series_give_no_warning_and_the_numpy_results(iris):
    model, X, y = iris
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        est = DirectInfluence(model, regularization=0.1).fit(X, y)
        got = est.influences(X.iloc[:5], y.iloc[:5])
    assert library_warnings(record) == []
    expected = DirectInfluence(model, regularization=0.1).fit(X.to_numpy(), y.to_numpy()).influences(
        X.to_numpy()[:5], y.to_numpy()[:5])
    np.testing.assert_array_equal(got, expected)


def test_feature_names_in_and_mismatches(iris):
    model, X, y = iris
    est = DirectInfluence(model, regularization=0.1).fit(X, y)
    assert list(est.feature_names_in_) == list(X.columns)
    with pytest.raises(ValueError, match="same order"):
        est.influences(X.iloc[:3, ::-1], y.iloc[:3])
    renamed = X.rename(columns={X.columns[0]: "other"})
    with pytest.raises(ValueError, match="unseen at fit time"):
        est.self_influence(renamed.iloc[:3], y.iloc[:3])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        est.transform(X.to_numpy()[:3], y.to_numpy()[:3])
    caught = [w for w in library_warnings(record) if "feature names" in str(w.message)]
    assert len(caught) == 1 and caught[0].filename == __file__  # scikit-learn's warning, at the user's call
    # Fitting on numpy removes the names again.
    est.fit(X.to_numpy(), y.to_numpy())
    assert not hasattr(est, "feature_names_in_")


def test_feature_names_out_name_each_parameter_entry(iris):
    model, X, y = iris
    est = DirectInfluence(model, regularization=0.1).fit(X, y)
    names = est.get_feature_names_out()
    assert len(names) == est.n_params_ == len(set(names))
    assert names[0] == "0.weight[0,0]" and names[5] == "0.weight[1,1]" and names[12 + 2] == "0.bias[2]"
    # The columns named after the bias hold its entries: (C + lambda I) times the inverse-curvature
    # gradients gives the gradients back, whose bias part autograd gives directly.
    X_np, y_np = X.to_numpy()[:4], y.to_numpy()[:4]
    est_np = DirectInfluence(model, regularization=0.1).fit(X.to_numpy(), y.to_numpy())
    inverse_gradients = est_np.transform(X_np, y_np)
    gradients = (inverse_gradients @ (est_np._curvature().dense().numpy() + 0.1 * np.eye(est_np.n_params_)))
    bias = np.stack([torch.autograd.grad(torch.nn.functional.cross_entropy(
        model(torch.tensor(X_np[i:i + 1])), torch.tensor(y_np[i:i + 1])), model[0].bias)[0].numpy()
        for i in range(4)])
    columns = [position for position, name in enumerate(names) if name.startswith("0.bias")]
    np.testing.assert_allclose(gradients[:, columns], bias, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError):
        est.get_feature_names_out(["a", "b", "c", "d"])


def test_set_output_pandas_for_the_estimator_and_a_pipeline(iris):
    model, X, y = iris
    est = DirectInfluence(model, regularization=0.1).set_output(transform="pandas").fit(X, y)
    frame = est.transform(X.iloc[:3], y.iloc[:3])
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == list(est.get_feature_names_out())
    plain = DirectInfluence(model, regularization=0.1).fit(X, y).transform(X.iloc[:3], y.iloc[:3])
    np.testing.assert_array_equal(frame.to_numpy(), plain)
    pipeline = make_pipeline(StandardScaler(), CgInfluence(model, regularization=0.1, random_state=0))
    pipeline.set_output(transform="pandas").fit(X, y)
    out = pipeline.transform(X.iloc[:3])
    assert isinstance(out, pd.DataFrame) and out.shape == (3, 15) and out.columns[-1] == "0.bias[2]"


def test_feature_names_survive_save_and_load(iris, tmp_path):
    model, X, y = iris
    est = DirectInfluence(model, regularization=0.1).fit(X, y)
    loaded = skinfl.load(skinfl.save(est, tmp_path / "est.skinfl"), model)
    assert list(loaded.feature_names_in_) == list(X.columns)
    with pytest.raises(ValueError, match="same order"):
        loaded.influences(X.iloc[:3, ::-1], y.iloc[:3])
