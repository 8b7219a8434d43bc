"""
Influence of training points on scikit-learn models
===================================================

skinfl's estimators take a fitted scikit-learn model as ``model`` directly:
``LogisticRegression``, ``LinearRegression``, ``Ridge``,
``SGDClassifier(loss="log_loss")``, ``MLPClassifier`` and ``MLPRegressor``.
skinfl converts the fitted model into an equivalent torch module (the same
decision function, parameters named after scikit-learn's attributes), takes
the loss it was trained with (``loss="auto"``, the default) and, with
``regularization="auto"``, the L2 penalty of its training objective.

The first part explains a logistic regression on the breast cancer data and
checks its influences against scikit-learn's own retraining without single
training points. The second ranks the training digits of a small
``MLPClassifier`` by self-influence.
"""

# %%
# A logistic regression
# ---------------------
# The features are standardised and the model is fitted to a tight tolerance,
# so that it sits at the minimum of its objective, which is what influence
# functions assume. scikit-learn minimises ``C * sum_i l_i + ||w||^2 / 2``;
# divided by ``C n``, that is the mean loss plus ``||w||^2 / (2 C n)``, so
# ``regularization="auto"`` resolves to ``1 / (C n)``, in
# ``regularization_``.
#
# scikit-learn leaves the intercept unpenalised: ``unpenalized_parameters_``
# names it, and ``DirectInfluence`` (like ``CgInfluence``) leaves it
# unregularized, so that the curvature it inverts is exactly that of
# scikit-learn's objective.

import time

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

import skinfl

start = time.perf_counter()
data = load_breast_cancer()
X = StandardScaler().fit_transform(data.data)
y = data.target  # 0 = malignant, 1 = benign
rng = np.random.default_rng(0)
order = rng.permutation(len(X))
train, test = order[:400], order[400:]
X_train, y_train, X_test, y_test = X[train], y[train], X[test], y[test]
n_train = len(X_train)

C = 0.1
settings = dict(C=C, tol=1e-10, max_iter=10_000)
logreg = LogisticRegression(**settings).fit(X_train, y_train)
print(f"logistic regression, test accuracy {logreg.score(X_test, y_test):.3f}")

estimator = skinfl.DirectInfluence(logreg, regularization="auto").fit(X_train, y_train)
print(f"regularization_ = {estimator.regularization_:.6g}, 1/(C n) = {1 / (C * n_train):.6g}")
print(f"classes_ = {estimator.classes_}, {estimator.n_params_} parameters")
print(f"model_ = {estimator.model_}, parameters {estimator.trainable_parameters_}, "
      f"unpenalized {estimator.unpenalized_parameters_}")

# %%
# Targets are given in the model's own labels (``classes_``), as to
# ``LogisticRegression.score``: skinfl encodes them. A binary model's single
# decision value ``z`` becomes the two logits ``[0, z]``, whose cross-entropy
# is exactly the log-loss scikit-learn minimised.
#
# Most helpful and most harmful training points
# ---------------------------------------------
# ``influences[i, j] = <H^-1 g(test_i), g(train_j)>`` is positive when
# training point ``j`` helps test point ``i``: removing it would raise that
# test loss by about ``influences[i, j] / n``. In a linear model a point can
# help a test point of either label, by pulling the weights its way; a point
# that is harmful to many test points at once (an atypical one, or a
# mislabelled one) is a candidate for a closer look.

names = data.target_names
indices, values = estimator.top_influences(X_test[:3], y_test[:3], k=3, which="both")
for i in range(3):
    probability = logreg.predict_proba(X_test[i:i + 1])[0, y_test[i]]
    print(f"\ntest point {i}: {names[y_test[i]]}, probability of its label {probability:.3f}")
    for kind, columns in (("helpful", slice(0, 3)), ("harmful", slice(3, 6))):
        shown = ", ".join(f"#{j} ({names[y_train[j]]}, {v:+.3g})"
                          for j, v in zip(indices[i, columns], values[i, columns]))
        print(f"  most {kind}: {shown}")

# %%
# Check against retraining
# ------------------------
# We remove 40 training points one at a time, refit ``LogisticRegression``
# with the same ``C`` and tolerance, and record the change of the summed test
# loss. The influences predict it without any refit: removing point ``j``
# changes the loss at test point ``i`` by about ``+influences[i, j] / n``, so
# the summed change is the column sum divided by ``n``.


def test_losses(model):
    probabilities = model.predict_proba(X_test)
    return -np.log(probabilities[np.arange(len(y_test)), y_test])


def leave_one_out_pearson(model, influences, removed, **params):
    """Pearson correlation of predicted and actual changes of the summed test loss."""
    baseline = test_losses(model).sum()
    actual = []
    for j in removed:
        keep = np.delete(np.arange(n_train), j)
        refit = LogisticRegression(**params).fit(X_train[keep], y_train[keep])
        actual.append(test_losses(refit).sum() - baseline)
    predicted = influences[:, removed].sum(axis=0) / n_train
    return np.corrcoef(predicted, actual)[0, 1], predicted, np.array(actual)


removed = np.sort(rng.choice(n_train, size=40, replace=False))
influences = estimator.influences(X_test, y_test)  # (n_test, n_train)
pearson, predicted, actual = leave_one_out_pearson(logreg, influences, removed, **settings)
print(f"\nleave-one-out Pearson: {pearson:.4f} over {len(removed)} removals")
largest = np.argmax(np.abs(actual))
print(f"largest change: removing #{removed[largest]} changes the test loss by {actual[largest]:+.4f} "
      f"(predicted {predicted[largest]:+.4f})")

# %%
# The other estimators regularize every parameter, the intercept included
# (their inverse is built on one ``regularization``). Here the intercept's
# curvature is small against ``1 / (C n)``, and that shows:

estimator_b = skinfl.ArnoldiInfluence(logreg, regularization="auto", rank=estimator.n_params_).fit(X_train, y_train)
pearson_b, _, _ = leave_one_out_pearson(logreg, estimator_b.influences(X_test, y_test), removed, **settings)
print(f"with the intercept regularized (ArnoldiInfluence at full rank): leave-one-out Pearson {pearson_b:.4f}")

# %%
# A small neural network: MLPClassifier
# -------------------------------------
# An ``MLPClassifier`` is converted layer by layer (parameters ``coefs_0``,
# ``intercepts_0``, ...). Its objective is the mean log-loss plus
# ``alpha ||W||^2 / (2 n)``, so ``regularization="auto"`` resolves to
# ``alpha / n``. L-BFGS stops near, not at, a minimum of a non-convex
# objective, where the Hessian may have a few negative eigenvalues that
# such a small regularization does not cover; the Gauss-Newton matrix is
# positive semi-definite, so conjugate gradient always applies to it.

X_digits, y_digits = load_digits(return_X_y=True)
X_digits, y_digits = X_digits[:600] / 16.0, y_digits[:600]
alpha = 1.0
mlp = MLPClassifier(hidden_layer_sizes=(16,), activation="tanh", alpha=alpha, solver="lbfgs", max_iter=500,
                    random_state=0).fit(X_digits, y_digits)
print(f"\nMLPClassifier on {len(X_digits)} digits, training accuracy {mlp.score(X_digits, y_digits):.3f}")

cg = skinfl.CgInfluence(mlp, regularization="auto", second_order="gauss_newton", random_state=0)
cg.fit(X_digits, y_digits)
print(f"MLP regularization_ = {cg.regularization_:.6g}, alpha/n = {alpha / len(X_digits):.6g}, "
      f"{cg.n_params_} parameters")

# %%
# Self-influence ``<H^-1 g_j, g_j>`` is large for the training points the
# model depends on most, often atypical or mislabelled ones: good candidates
# for a look.

self_influence = cg.self_influence(X_digits, y_digits)
predicted_digits = mlp.predict(X_digits)
print("the 5 training digits with the largest self-influence:")
for j in np.argsort(self_influence)[::-1][:5]:
    print(f"  #{j:<4d} label {y_digits[j]}, predicted {predicted_digits[j]}, "
          f"self-influence {self_influence[j]:.1f}")
print(f"median self-influence: {np.median(self_influence):.3g}")
print(f"finished in {time.perf_counter() - start:.1f} s")

# %%
# The five digits, drawn with their labels (the figure needs matplotlib).

try:
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

if plt is not None:
    fig, axes = plt.subplots(1, 5, figsize=(8, 2))
    for ax, j in zip(axes, np.argsort(self_influence)[::-1][:5]):
        ax.imshow(X_digits[j].reshape(8, 8), cmap="gray_r")
        ax.set_title(f"#{j}: label {y_digits[j]}")
        ax.axis("off")
    fig.tight_layout()
