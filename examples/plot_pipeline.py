"""
Influence estimators in a scikit-learn pipeline
===============================================

A model is usually trained on preprocessed data. An influence estimator can
then be the last step of a :class:`~sklearn.pipeline.Pipeline`, after the
same preprocessing: the pipeline scales the raw inputs before they reach the
model. This example shows what works through the pipeline (``fit``,
``transform``, ``score``, ``GridSearchCV``, ``set_output``) and how to reach
the last step for what needs targets (``influences``, ``top_influences``).
"""

# %%
# A network trained on standardised data
# --------------------------------------
# The breast cancer data have 30 features on very different scales. A
# ``StandardScaler`` is fitted on the training data, and a small torch
# network is trained on its output, with a weight decay.

import time

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import skinfl

start = time.perf_counter()
torch.manual_seed(0)
data = load_breast_cancer()
X_train, X_test, y_train, y_test = train_test_split(data.data, data.target, test_size=0.25, random_state=0,
                                                    stratify=data.target)
scaler = StandardScaler().fit(X_train)

model = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
inputs = torch.as_tensor(scaler.transform(X_train), dtype=torch.float32)
targets = torch.as_tensor(y_train)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
for step in range(300):
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()
with torch.no_grad():
    test_inputs = torch.as_tensor(scaler.transform(X_test), dtype=torch.float32)
    accuracy = (model(test_inputs).argmax(dim=1).numpy() == y_test).mean()
print(f"{len(X_train)} training points, final training loss {loss.item():.4f}, test accuracy {accuracy:.3f}")

# %%
# The pipeline
# ------------
# The model was trained on *this* scaler's output, so the pipeline must not
# refit it: :class:`~sklearn.frozen.FrozenEstimator` keeps it as fitted
# (``fit`` does nothing), also inside the cross-validation of a grid search
# below, where a plain ``StandardScaler()`` would be refitted on each fold and
# feed the model slightly different inputs than it was trained on. The
# influence estimator does not train the model either: its ``fit`` builds
# the curvature on the scaled training data.
#
# Adam stops near, not at, a minimum, where the Hessian may have a few
# negative eigenvalues; the Gauss-Newton matrix is positive semi-definite.

pipe = make_pipeline(
    FrozenEstimator(scaler),
    skinfl.CgInfluence(model, loss="cross_entropy", regularization=1e-3, second_order="gauss_newton",
                       random_state=0),
)
print("steps:", [name for name, _ in pipe.steps])
pipe.fit(X_train, y_train)
estimator = pipe[-1]
print(f"the influence step was fitted on {estimator.n_samples_fit_} points, {estimator.n_params_} parameters")

# %%
# ``transform`` through the pipeline
# ----------------------------------
# ``Pipeline.transform`` passes only ``X``. Without targets, the
# inverse-curvature gradients ``(C + lambda I)^-1 g`` are those of the model's *prediction
# measurement*: the gradient of the negative log-probability of the class the
# model predicts, rather than of the loss at a true label.

inverse_gradients = pipe.transform(X_test[:3])
print(f"\npipe.transform(X_test[:3]): {type(inverse_gradients).__name__} of shape {inverse_gradients.shape}")

# %%
# Influences need targets
# -----------------------
# ``influences`` and ``top_influences`` take the test targets, which a
# pipeline cannot pass on: call the last step directly, on inputs put through
# the steps before it (``pipe[:-1]``). The training points are those given to
# ``pipe.fit``, already scaled.

scaled_test = pipe[:-1].transform(X_test)
influences = estimator.influences(scaled_test[:3], y_test[:3])
print(f"influences of the {influences.shape[1]} training points on 3 test points: shape {influences.shape}")
indices, values = estimator.top_influences(scaled_test[:3], y_test[:3], k=3, which="both")
names = data.target_names
for i in range(3):
    helpful = ", ".join(f"#{j} ({names[y_train[j]]})" for j in indices[i, :3])
    harmful = ", ".join(f"#{j} ({names[y_train[j]]})" for j in indices[i, 3:])
    print(f"test point {i} ({names[y_test[i]]}): most helpful {helpful}; most harmful {harmful}")

# %%
# Choosing the regularization with GridSearchCV
# ---------------------------------------------
# The parameters of a pipeline's step are named ``<step>__<parameter>``;
# ``make_pipeline`` names the step after its class in lower case,
# ``cginfluence``. Without ``scoring``, ``GridSearchCV`` uses
# ``pipe.score``, which scales the held-out fold and calls the estimator's
# own :meth:`~skinfl.CgInfluence.score`: a retraining-free check of how well
# the inverse curvature of the fitted folds inverts the curvature of the
# held-out fold (at most 0, higher is better; see its documentation).

search = GridSearchCV(pipe, {"cginfluence__regularization": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]}, cv=3)
search.fit(X_train, y_train)
print("\nregularization   mean score (3 folds)")
for value, score in zip(search.cv_results_["param_cginfluence__regularization"],
                        search.cv_results_["mean_test_score"]):
    print(f"{value:>14g}   {score:10.4f}")
best = search.best_params_["cginfluence__regularization"]
print(f"selected regularization: {best:g}")
print(f"refitted pipeline: {search.best_estimator_[-1].regularization_:g}, "
      f"held-out score {search.best_estimator_.score(X_test, y_test):.4f}")

# %%
# Data frames with ``set_output``
# -------------------------------
# With ``set_output(transform="pandas")`` every step returns a data frame.
# The influence step's columns are named by ``get_feature_names_out``: one
# per entry of the model's parameters, ``"0.weight[i,j]"`` and so on. Set the
# output before ``fit``, so that the influence step is fitted on the same
# kind of input (a data frame with named columns) that it gets afterwards.
# The scaler is fitted again on the training data as a data frame, so that
# it knows the column names too: it learns the same means and scales.
# (pandas is needed here.)

try:
    import pandas as pd
except ImportError:
    pd = None

if pd is not None:
    frame_train = pd.DataFrame(X_train, columns=data.feature_names)
    frame_test = pd.DataFrame(X_test, columns=data.feature_names)
    frame_scaler = StandardScaler().fit(frame_train)
    framed = make_pipeline(
        FrozenEstimator(frame_scaler),
        skinfl.CgInfluence(model, loss="cross_entropy", regularization=best, second_order="gauss_newton",
                           random_state=0),
    ).set_output(transform="pandas")
    framed.fit(frame_train, y_train)
    table = framed.transform(frame_test[:3])
    print(f"\nset_output(transform='pandas'): {type(table).__name__} of shape {table.shape}")
    print("first columns:", list(table.columns[:3]), "... last:", table.columns[-1])
    same_names = bool(np.all(table.columns == framed.get_feature_names_out()))
    print("columns == get_feature_names_out():", same_names)
    # The parameter entries with the largest inverse-curvature gradient for the first test point:
    print(table.iloc[0].abs().sort_values(ascending=False).head(5).to_string())
print(f"finished in {time.perf_counter() - start:.1f} s")
