"""
Saving and loading a fitted influence estimator
===============================================

Fitting an influence estimator can be the expensive part: an explicit
curvature matrix and its factorization, an eigendecomposition, a sketch.
:func:`skinfl.save` writes a fitted estimator to one file, as tensors and
JSON only (in the safetensors layout); :func:`skinfl.load` reads it back into
a copy of a model you pass, and runs no code from the file, so a file from
anywhere is safe to load. ``joblib`` works too, but it is pickle: load only
files you trust.
"""

# %%
# A fitted estimator
# ------------------
# A small network trained on scikit-learn's digits, and a
# :class:`~skinfl.DirectInfluence` fitted on its training data: it builds the
# Gauss-Newton matrix of the training loss and factorises it.

import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import skinfl

start = time.perf_counter()
torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)

model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
inputs, targets = torch.as_tensor(X_train), torch.as_tensor(y_train)
for step in range(300):
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()

estimator = skinfl.DirectInfluence(model, loss="cross_entropy", regularization=1e-3,
                                   second_order="gauss_newton").fit(X_train, y_train)
influences = estimator.influences(X_test[:5], y_test[:5])
print(f"DirectInfluence on {estimator.n_samples_fit_} digits, {estimator.n_params_} parameters; "
      f"influences of shape {influences.shape}")

folder = tempfile.TemporaryDirectory()
directory = Path(folder.name)


def size(path):
    return f"{path.stat().st_size / 1e6:.2f} MB"


def message(error):
    """The first line of an error's message, without the temporary folder."""
    return str(error).replace(f"{directory}/", "").splitlines()[0]


# %%
# Save and load safely
# --------------------
# The file holds the estimator's parameters, its fitted factors (here the
# factorised matrix), the model's weights and the training data. The model's
# code, its architecture, is not in the file: ``load`` takes a model of the
# same architecture (its weights do not matter) and loads the saved weights
# into a copy of it. The loaded estimator gives identical influences.

path = skinfl.save(estimator, directory / "digits.skinfl")
print(f"\nskinfl.save: {path.name}, {size(path)}")

architecture = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
loaded = skinfl.load(path, architecture)  # the weights come from the file
same = np.array_equal(loaded.influences(X_test[:5], y_test[:5]), influences)
print(f"loaded {type(loaded).__name__}, regularization {loaded.regularization_:g}; "
      f"identical influences: {same}")

# %%
# The file is checked: a model of another architecture is refused, and so is
# a file changed after it was written (it carries its SHA-256 digest). Both
# errors are ``ValueError``.

wrong = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
try:
    skinfl.load(path, wrong)
except ValueError as error:
    print(f"another architecture: {type(error).__name__}: {message(error)[:100]}...")

tampered = directory / "tampered.skinfl"
content = bytearray(path.read_bytes())
content[-100] ^= 1  # one bit of the tensor data
tampered.write_bytes(bytes(content))
try:
    skinfl.load(tampered, architecture)
except ValueError as error:
    print(f"a modified file: {type(error).__name__}: {message(error)}")

# %%
# Without the training data
# -------------------------
# ``include_data=False`` leaves the training data out: the file holds the
# parameters, the weights and the factors only, which is useful when the data
# are large or may not be shared. The loaded estimator then needs the
# training points to score, ``influences(X_test, y_test, X, y)``. (An
# estimator that solves with curvature products over the training data,
# :class:`~skinfl.CgInfluence`, needs them saved.)

light = skinfl.save(estimator, directory / "digits-no-data.skinfl", include_data=False)
print(f"\ninclude_data=False: {size(light)} (with the data: {size(path)}; "
      f"the training inputs alone are {X_train.nbytes / 1e6:.2f} MB)")
loaded_light = skinfl.load(light, architecture)
try:
    loaded_light.influences(X_test[:5], y_test[:5])
except ValueError as error:
    print(f"influences without X, y: {message(error)}")
same_light = np.array_equal(loaded_light.influences(X_test[:5], y_test[:5], X_train, y_train), influences)
print(f"influences(X_test, y_test, X_train, y_train) identical: {same_light}")

# %%
# joblib, for trusted files
# -------------------------
# ``joblib.dump`` and ``joblib.load`` round-trip a fitted estimator too,
# model included, so no model needs to be passed. But joblib is pickle: a
# pickle can run any code when it is loaded, so load only files you made or
# trust. An estimator fitted on a GPU loads on a machine without one either
# way.

joblib_path = directory / "digits.joblib"
joblib.dump(estimator, joblib_path)
from_joblib = joblib.load(joblib_path)
same_joblib = np.array_equal(from_joblib.influences(X_test[:5], y_test[:5]), influences)
print(f"\njoblib: {size(joblib_path)}; identical influences: {same_joblib}")

folder.cleanup()
print(f"finished in {time.perf_counter() - start:.1f} s")
