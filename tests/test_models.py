"""scikit-learn models and skorch nets as ``model``: exact conversions, the trained loss and penalty."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr
from sklearn.base import clone
from sklearn.datasets import make_classification, make_regression
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge, SGDClassifier
from sklearn.model_selection import GridSearchCV
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.svm import SVC
from torch import nn

import skinfl
from skinfl import CgInfluence, DirectInfluence
from skinfl.exceptions import TrainingModeWarning

ACTIVATIONS = ["identity", "logistic", "tanh", "relu"]


def classification(n_classes=2, n=80, n_features=5, seed=0):
    X, y = make_classification(n, n_features, n_informative=4, n_redundant=0, n_classes=n_classes,
                               n_clusters_per_class=1, random_state=seed)
    return X, y


def regression(n_targets=1, n=60, n_features=4, seed=0):
    X, y = make_regression(n, n_features, n_targets=n_targets, noise=5.0, random_state=seed)
    return X, y / 50.0


def outputs(est, X):
    with torch.no_grad():
        return est.model_(torch.as_tensor(X)).numpy()


def stationarity(est, X, y, penalised):
    """``(gradient of the mean training loss, regularization_ * theta)`` on the penalised parameters."""
    module, loss = est.model_, est.loss_
    params = dict(module.named_parameters())
    for parameter in params.values():
        parameter.requires_grad_(True)
    targets = est._fit_data.batch(slice(None))[1]
    mean_loss = loss.per_sample(module(torch.as_tensor(X)), targets).mean()
    grads = torch.autograd.grad(mean_loss, [params[name] for name in penalised])
    gradient = torch.cat([g.reshape(-1) for g in grads]).numpy()
    weights = torch.cat([params[name].detach().reshape(-1) for name in penalised]).numpy()
    return gradient, est.regularization_ * weights


# --------------------------------------------------------- scikit-learn models
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_logistic_regression_is_converted_exactly_with_its_penalty(n_classes, fit_intercept):
    X, y = classification(n_classes)
    labels = np.array(["ant", "bee", "cat"])[y]  # any labels: encoded with classes_
    model = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000, fit_intercept=fit_intercept).fit(X, labels)
    est = DirectInfluence(model, regularization="auto").fit(X, labels)

    np.testing.assert_allclose(torch.softmax(torch.as_tensor(outputs(est, X)), 1).numpy(),
                               model.predict_proba(X), rtol=1e-12, atol=1e-14)
    assert est.regularization_ == pytest.approx(1 / (0.5 * len(X)))
    np.testing.assert_array_equal(est.classes_, model.classes_)
    assert est.loss_.kind == "cross_entropy"
    assert est.n_params_ == model.coef_.size + (model.intercept_.size if fit_intercept else 0)
    assert est.get_feature_names_out()[0] == "coef[0,0]"
    # At the optimum the loss gradient balances the penalty: this fixes regularization_'s scale.
    gradient, penalty = stationarity(est, X, labels, ["coef"])
    np.testing.assert_allclose(gradient, -penalty, atol=1e-7)


@pytest.mark.parametrize("estimator", [DirectInfluence, CgInfluence])
@pytest.mark.parametrize("data", ["noisy", "separable"])
def test_logistic_regression_leave_one_out_against_scikit_learn_retraining(estimator, data):
    if data == "noisy":
        X, y = make_classification(320, 6, n_informative=4, n_redundant=0, flip_y=0.05, class_sep=0.7,
                                   random_state=3)
        n_test = 20
    else:  # few samples, nearly separable: the intercept's curvature is small, its penalty would show
        X, y = classification(2, n=120, n_features=6, seed=3)
        n_test = 10
    X_test, y_test, X, y = X[:n_test], y[:n_test], X[n_test:], y[n_test:]
    settings = dict(C=1.0, tol=1e-12, max_iter=10_000)
    model = LogisticRegression(**settings).fit(X, y)
    est = estimator(model, regularization="auto").fit(X, y)
    assert est.unpenalized_parameters_ == ["intercept"]  # as in scikit-learn's objective
    # d(total test loss) when point j is removed is about +influence_j / n.
    predicted = est.influences(X_test, y_test).sum(axis=0) / len(X)

    def test_loss(fitted):
        probabilities = fitted.predict_proba(X_test)[np.arange(len(y_test)), y_test]
        return -np.log(probabilities).sum()

    removed = np.arange(0, len(X), 3)
    actual = [test_loss(LogisticRegression(**settings).fit(np.delete(X, j, 0), np.delete(y, j))) - test_loss(model)
              for j in removed]
    assert pearsonr(predicted[removed], actual)[0] >= 0.99


def test_unpenalized_intercept_is_exactly_the_models_objective():
    # The curvature DirectInfluence inverts is the Hessian of scikit-learn's objective / (C n).
    X, y = classification(2)
    model = LogisticRegression(C=0.3, tol=1e-12, max_iter=10_000).fit(X, y)
    est = DirectInfluence(model, regularization="auto").fit(X, y)
    p = model.predict_proba(X)[:, 1]
    design = np.hstack([X, np.ones((len(X), 1))])
    hessian = (design * (p * (1 - p))[:, None]).T @ design / len(X)
    hessian[:-1, :-1] += np.eye(X.shape[1]) / (0.3 * len(X))
    gradients = (p - y)[:, None] * design  # d loss / d(coef, intercept) with logits [0, z]
    np.testing.assert_allclose(est.transform(X[:5], y[:5]), np.linalg.solve(hessian, gradients[:5].T).T,
                               rtol=1e-8, atol=1e-10)
    # The eigendecomposition inverts the same matrix; its eigenvalues_ are those of that Hessian less
    # regularization_ (the penalty of the coefficients, 1 / (C n)).
    eigh = DirectInfluence(model, regularization="auto", solver="eigh").fit(X, y)
    assert eigh.solver_ == "eigh" and eigh.regularization_ == pytest.approx(1 / (0.3 * len(X)))
    np.testing.assert_allclose(eigh.transform(X[:5], y[:5]), np.linalg.solve(hessian, gradients[:5].T).T,
                               rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(eigh.eigenvalues_, np.linalg.eigvalsh(hessian)[::-1] - eigh.regularization_,
                               rtol=1e-9, atol=1e-12)
    # A number leaves every parameter regularized; the other estimators do so even with "auto".
    assert DirectInfluence(model, regularization=0.01).fit(X, y).unpenalized_parameters_ == []

@pytest.mark.parametrize("n_targets", [1, 3])
@pytest.mark.parametrize("kind", ["linear", "ridge"])
def test_linear_regression_and_ridge(kind, n_targets):
    X, y = regression(n_targets)
    model = (LinearRegression() if kind == "linear" else Ridge(alpha=2.0)).fit(X, y)
    est = DirectInfluence(model, regularization="auto").fit(X, y)
    np.testing.assert_allclose(outputs(est, X), model.predict(X), rtol=1e-12, atol=1e-12)
    assert est.loss_.kind == "mse"
    expected = 0.0 if kind == "linear" else 2 * 2.0 / (len(X) * n_targets)
    assert est.regularization_ == pytest.approx(expected)
    gradient, penalty = stationarity(est, X, y, ["coef"])
    np.testing.assert_allclose(gradient, -penalty, atol=1e-10)


def test_sgd_classifier_with_log_loss():
    X, y = classification(2)
    model = SGDClassifier(loss="log_loss", alpha=1e-2, random_state=0).fit(X, y)
    est = DirectInfluence(model, regularization="auto").fit(X, y)
    np.testing.assert_allclose(torch.softmax(torch.as_tensor(outputs(est, X)), 1).numpy(),
                               model.predict_proba(X), rtol=1e-12, atol=1e-14)
    assert est.regularization_ == pytest.approx(1e-2)  # mean(loss) + alpha ||w||^2 / 2


# Identity activations make the intercepts redundant and dead ReLU units leave theirs without curvature:
# with intercepts unpenalized, as scikit-learn trains them, the curvature is singular and says so.
@pytest.mark.filterwarnings("ignore::skinfl.exceptions.NotPositiveDefiniteWarning")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_mlp_classifier_every_activation(activation, task):
    X, y = classification(2 if task == "binary" else 3)
    if task == "multilabel":
        y = np.stack([y == 0, y == 1, (y == 2) | (y == 0)], axis=1).astype(int)
    model = MLPClassifier((6,), activation=activation, alpha=1e-2, solver="lbfgs", tol=1e-12, max_iter=3000,
                          random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a convergence warning does not matter for the conversion
        model.fit(X, y)
    est = DirectInfluence(model, regularization="auto", second_order="gauss_newton").fit(X, y)
    logits = torch.as_tensor(outputs(est, X))
    probabilities = torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, 1)
    np.testing.assert_allclose(probabilities.numpy(), model.predict_proba(X), rtol=1e-10, atol=1e-12)
    n_labels = 3 if task == "multilabel" else 1
    assert est.regularization_ == pytest.approx(1e-2 / (len(X) * n_labels))
    assert est.loss_.kind == ("bce_with_logits" if task == "multilabel" else "cross_entropy")
    assert est.n_params_ == sum(c.size for c in model.coefs_) + sum(b.size for b in model.intercepts_)


def test_mlp_classifier_penalty_scale_at_the_optimum():
    X, y = classification(3)
    model = MLPClassifier((4,), activation="tanh", alpha=0.5, solver="lbfgs", tol=1e-14, max_iter=20_000,
                          random_state=0).fit(X, y)
    est = DirectInfluence(model, regularization="auto", second_order="gauss_newton").fit(X, y)
    gradient, penalty = stationarity(est, X, y, ["coefs_0", "coefs_1"])
    # lbfgs stops short of the optimum, by far less than a wrong scale (a factor of 2) would show.
    np.testing.assert_allclose(gradient, -penalty, atol=0.01 * np.abs(penalty).max())


# Identity activations make the intercepts redundant and dead ReLU units leave theirs without curvature:
# with intercepts unpenalized, as scikit-learn trains them, the curvature is singular and says so.
@pytest.mark.filterwarnings("ignore::skinfl.exceptions.NotPositiveDefiniteWarning")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n_targets", [1, 2])
def test_mlp_regressor_every_activation(activation, n_targets):
    X, y = regression(n_targets)
    model = MLPRegressor(hidden_layer_sizes=(5,), activation=activation, alpha=0.3, solver="lbfgs", tol=1e-14, max_iter=20_000,
                         random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X, y)
    est = DirectInfluence(model, regularization="auto", second_order="gauss_newton").fit(X, y)
    np.testing.assert_allclose(outputs(est, X), model.predict(X), rtol=1e-10, atol=1e-12)
    assert est.regularization_ == pytest.approx(2 * 0.3 / (len(X) * n_targets))
    # Smooth activations and one target: lbfgs reaches the optimum tightly. (With several targets
    # scikit-learn's reported loss and its gradient disagree by the factor t, and its line search
    # stops early.)
    if activation in ("tanh", "identity") and n_targets == 1:
        gradient, penalty = stationarity(est, X, y, ["coefs_0", "coefs_1"])
        np.testing.assert_allclose(gradient, -penalty, atol=0.01 * np.abs(penalty).max())


def test_converted_model_in_search_persistence_and_clone(tmp_path):
    X, y = classification(2)
    model = LogisticRegression(tol=1e-10, max_iter=1000).fit(X, y)
    est = CgInfluence(model, regularization="auto").fit(X, y)
    expected = est.influences(X[:3], y[:3])
    loaded = skinfl.load(skinfl.save(est, tmp_path / "est.skinfl"), model)
    np.testing.assert_array_equal(loaded.influences(X[:3], y[:3]), expected)
    assert loaded.regularization_ == est.regularization_ and loaded.model is model
    # A clone keeps the fitted model (scikit-learn would clone it unfitted).
    assert clone(est).model.coef_ is not None and clone(est).fit(X, y).regularization_ == est.regularization_
    search = GridSearchCV(CgInfluence(model), {"regularization": ["auto", 1e-1]}, cv=2).fit(X, y)
    # Each candidate resolves on its own training fold: "auto" is 1 / (C n_fold), a number stays itself.
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    best = search.best_estimator_
    expected = 1 / (model.C * len(X)) if search.best_params_["regularization"] == "auto" else 1e-1
    assert best.regularization_ == pytest.approx(expected)


def test_unsupported_and_mismatched_models_are_clear_errors():
    X, y = classification(2)
    with pytest.raises(TypeError, match="SVC is not supported.*LogisticRegression"):
        DirectInfluence(SVC().fit(X, y)).fit(X, y)
    with pytest.raises(NotFittedError):
        DirectInfluence(LogisticRegression()).fit(X, y)
    model = LogisticRegression().fit(X, y)
    with pytest.raises(ValueError, match="trained with loss 'cross_entropy'.*loss='auto'"):
        DirectInfluence(model, loss="mse").fit(X, y)
    with pytest.raises(ValueError, match=r"labels \[7\] that the model was not trained on"):
        DirectInfluence(model).fit(X, np.where(y == 1, 7, 0))
    with pytest.raises(ValueError, match="class_weight"):
        DirectInfluence(LogisticRegression(class_weight="balanced").fit(X, y)).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saga stops early: the penalty is what matters
        l1 = LogisticRegression(l1_ratio=1.0, solver="saga", max_iter=50).fit(X, y)
    with pytest.raises(ValueError, match="regularization='auto'.*L1"):
        DirectInfluence(l1, regularization="auto").fit(X, y)
    with pytest.raises(ValueError, match="one-versus-rest"):
        DirectInfluence(SGDClassifier(loss="log_loss").fit(X, np.arange(len(y)) % 3)).fit(X, y)
    with pytest.raises(ValueError, match="regularization='auto'.*torch.nn.Module"):
        DirectInfluence(nn.Linear(5, 2).double(), regularization="auto").fit(X, y)


def test_nll_loss_on_log_probabilities_equals_cross_entropy_on_logits():
    torch.manual_seed(0)
    X, y = classification(3)
    logits = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    log_probabilities = nn.Sequential(logits, nn.LogSoftmax(dim=1))
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    # The exact Hessian does not depend on where the model ends and the loss begins.
    reference = DirectInfluence(logits, loss=nn.CrossEntropyLoss(weight=weight), regularization=1.0).fit(X, y)
    est = DirectInfluence(log_probabilities, loss=nn.NLLLoss(weight=weight), regularization=1.0).fit(X, y)
    assert est.loss_.kind == "nll" and est.loss_.normalizer == pytest.approx(reference.loss_.normalizer)
    np.testing.assert_allclose(est.influences(X[:4], y[:4]), reference.influences(X[:4], y[:4]), rtol=1e-9)


# ----------------------------------------------------------------- skorch nets
skorch = pytest.importorskip("skorch")


def _probabilities_module():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3), nn.Softmax(dim=-1)).double()


class _ExplicitNll:
    """skorch's NeuralNetClassifier loss, written out: NLLLoss of log(p + eps)."""

    def __call__(self, output, target):
        return F.nll_loss(torch.log(output + torch.finfo(output.dtype).eps), target)


def test_skorch_classifier_default_loss_is_the_nets_get_loss():
    torch.manual_seed(0)
    X, y = classification(3)
    net = skorch.NeuralNetClassifier(_probabilities_module, max_epochs=5, lr=0.1, optimizer__weight_decay=1e-3,
                                     train_split=None, verbose=0).fit(X, y)
    net.module_.train()  # skorch predicts in eval mode whatever mode its module was left in
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingModeWarning)
        est = DirectInfluence(net, regularization="auto", second_order="gauss_newton").fit(X, y)
    assert est.regularization_ == pytest.approx(1e-3) and est.unpenalized_parameters_ == []
    net.module_.eval()
    reference = DirectInfluence(net.module_, loss=_ExplicitNll(), regularization=1e-3,
                                second_order="gauss_newton").fit(X, y)
    np.testing.assert_allclose(est.influences(X[:5], y[:5]), reference.influences(X[:5], y[:5]), rtol=1e-10)
    # The get_loss of the net itself, on a batch, is the mean of skinfl's per-sample losses.
    inputs, targets = torch.as_tensor(X[:7]), torch.as_tensor(y[:7])
    with torch.no_grad():
        output = net.module_(inputs)
        expected = net.get_loss(output, targets)
        assert float(est.loss_.per_sample(output, targets).mean()) == pytest.approx(float(expected), rel=1e-12)


def test_skorch_regressor_and_binary_classifier_use_their_criterion():
    torch.manual_seed(0)
    X, y = regression(1, n_features=5)
    y = y.reshape(-1, 1)
    make = lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()  # noqa: E731
    net = skorch.NeuralNetRegressor(make, max_epochs=3, lr=0.05, train_split=None, verbose=0).fit(X, y)
    est = DirectInfluence(net, second_order="gauss_newton").fit(X, y)
    reference = DirectInfluence(net.module_, loss="mse", second_order="gauss_newton").fit(X, y)
    np.testing.assert_allclose(est.influences(X[:4], y[:4]), reference.influences(X[:4], y[:4]), rtol=1e-10)

    Xc, yc = classification(2)
    yc = yc.astype(np.float64)
    binary = skorch.NeuralNetBinaryClassifier(make, max_epochs=3, lr=0.05, train_split=None, verbose=0).fit(Xc, yc)
    est = DirectInfluence(binary, second_order="gauss_newton").fit(Xc, yc)
    reference = DirectInfluence(binary.module_, loss="bce_with_logits", second_order="gauss_newton").fit(Xc, yc)
    assert est.loss_.kind == "bce_with_logits"
    np.testing.assert_allclose(est.influences(Xc[:4], yc[:4]), reference.influences(Xc[:4], yc[:4]), rtol=1e-10)


def test_skorch_weight_decay_errors():
    X, y = classification(3)
    net = skorch.NeuralNetClassifier(_probabilities_module, max_epochs=1, train_split=None, verbose=0)
    with pytest.raises(ValueError, match="not initialized"):
        DirectInfluence(net).fit(X, y)
    net.fit(X, y)
    net.optimizer_.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "weight_decay": 0.1})
    net.optimizer_.param_groups[0]["weight_decay"] = 0.01
    with pytest.raises(ValueError, match="weight decays"):
        DirectInfluence(net, regularization="auto").fit(X, y)
