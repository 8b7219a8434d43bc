"""
Influence functions for a skorch classifier
===========================================

A fitted `skorch <https://skorch.readthedocs.io>`_ net can be passed as the
``model`` of any skinfl estimator. skinfl differentiates the net's fitted
module (``net.module_``), with the loss that the net's ``get_loss`` computes
(``loss="auto"``, the default), and ``regularization="auto"`` takes the
weight decay of the net's optimizer.

Here a ``NeuralNetClassifier`` is trained on scikit-learn's digits, with 5%
of the training labels replaced by wrong ones, and the training points are
ranked by self-influence. skorch is an optional dependency of skinfl
(``pip install "skinfl[skorch]"``).
"""

# %%
# Data with a few wrong labels
# ----------------------------
# skorch wants float32 inputs and int64 class indices. A fixed 5% of the
# training labels are moved to another class, and we remember which ones.

import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from skorch import NeuralNetClassifier

import skinfl

start = time.perf_counter()
SEED = 0
rng = np.random.default_rng(SEED)
torch.manual_seed(SEED)

X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32)
X_train, X_test, y_train_clean, y_test = train_test_split(X, y.astype(np.int64), test_size=0.5,
                                                          random_state=SEED, stratify=y)
n_train = len(X_train)
flipped = np.zeros(n_train, dtype=bool)
flipped[rng.choice(n_train, size=round(0.05 * n_train), replace=False)] = True
y_train = y_train_clean.copy()
y_train[flipped] = (y_train[flipped] + rng.integers(1, 10, size=flipped.sum())) % 10
print(f"{n_train} training digits, {flipped.sum()} of them with a wrong label")

# %%
# Train a NeuralNetClassifier
# ---------------------------
# skorch's default criterion for a classifier is ``NLLLoss``, with a module
# that outputs probabilities (it ends with a softmax). The optimizer has a
# weight decay, which adds ``weight_decay * theta`` to every gradient: the
# gradient of the L2 penalty ``weight_decay / 2 * ||theta||^2``.

weight_decay = 1e-3
net = NeuralNetClassifier(
    torch.nn.Sequential(
        torch.nn.Linear(64, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 10),
        torch.nn.Softmax(dim=-1),
    ),
    optimizer=torch.optim.Adam,
    optimizer__weight_decay=weight_decay,
    lr=1e-2,
    max_epochs=15,
    batch_size=64,
    train_split=None,
    verbose=0,
)
net.fit(X_train, y_train)
print(f"trained for {len(net.history)} epochs, final training loss {net.history[-1, 'train_loss']:.4f}")
print(f"training accuracy (given labels): {(net.predict(X_train) == y_train).mean():.3f}")
print(f"test accuracy:                    {(net.predict(X_test) == y_test).mean():.3f}")

# %%
# Pass the net itself
# -------------------
# skinfl computes the loss exactly as the net's ``get_loss`` does: the
# logarithm of the module's probabilities (plus the machine epsilon), then
# ``NLLLoss``. ``regularization="auto"`` reads the optimizer's weight decay.
#
# Adam stops close to, not at, a minimum, where the Hessian can have a few
# negative eigenvalues; the Gauss-Newton matrix is positive semi-definite,
# so conjugate gradient always applies. Influences are computed on a copy of
# the module in eval mode: the net is left as it is.

estimator = skinfl.CgInfluence(net, regularization="auto", second_order="gauss_newton", random_state=SEED)
estimator.fit(X_train, y_train)
print(f"\nregularization_ = {estimator.regularization_:g} (the optimizer's weight decay is {weight_decay:g})")
print(f"{estimator.n_params_} parameters, the net's module is {type(estimator.model_).__name__}")

# %%
# Self-influence ranks the training points
# ----------------------------------------
# Points that the network can only fit by relying on the point itself, as a
# wrong label must be, have a large self-influence ``<H^-1 g_j, g_j>``. We
# look at the 10% of the training points with the largest values.

self_influence = estimator.self_influence(X_train, y_train)
order = np.argsort(self_influence)[::-1]
print("\nthe 5 training points with the largest self-influence:")
for j in order[:5]:
    note = f"wrong, truly {y_train_clean[j]}" if flipped[j] else "correct"
    print(f"  #{j:<5d} label {y_train[j]} ({note}), predicted {net.predict(X_train[j:j + 1])[0]}, "
          f"self-influence {self_influence[j]:.1f}")

n_inspect = round(0.1 * n_train)
found = int(flipped[order[:n_inspect]].sum())
print(f"\n{found} of {flipped.sum()} wrong labels are among the {n_inspect} points with the largest "
      f"self-influence (random inspection: about {0.1 * flipped.sum():.1f})")
print(f"finished in {time.perf_counter() - start:.1f} s")

# %%
# The images of the most self-influential points (the figure needs
# matplotlib).

try:
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

if plt is not None:
    fig, axes = plt.subplots(1, 6, figsize=(9, 2))
    for ax, j in zip(axes, order[:6]):
        ax.imshow(X_train[j].reshape(8, 8), cmap="gray_r")
        ax.set_title(f"label {y_train[j]}" + (" (wrong)" if flipped[j] else ""), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
