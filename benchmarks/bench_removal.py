"""Removal effects against retraining: first order and one Newton step, points and groups, ensembles, cleaning.

``est.removal_effects(X_test, y_test, X, y, groups=..., order=...)`` predicts
``loss_test(theta_without_G) - loss_test(theta)`` for removing a training
point or a group ``G`` from the sum-form objective

    F(theta) = sum_i l_i(theta) + n * regularization / 2 * ||theta||^2,

the penalty kept with the FULL ``n`` when points are removed. Every ground
truth here retrains that same objective, and the actual effect is the exact
test loss of the retrained model minus that of the fitted one (nothing
linearised):

- Logistic regression: ``LogisticRegressionRetrainer(C)`` (accuracy.py)
  minimises ``C sum_i l_i + ||w||^2 / 2`` with the same ``C`` whatever the
  training set, i.e. ``sum_i l_i + ||w||^2 / (2 C)``. With ``regularization =
  1 / (C n)`` (``regularization_for(n)``, full ``n``) that is ``n
  regularization / 2 = 1 / (2 C)``: the penalty does not shrink when points
  are removed, as the estimator assumes; no rescaling of ``C`` is needed.
  This script solves that objective itself (:class:`SoftmaxRegression`:
  Newton's method in float64 to ``||grad|| <= 1e-9``, from the full solution),
  because scikit-learn drops the weight row of a class that has no training
  point left, which a clustered group of B can do; on the full training sets
  it agrees with ``LogisticRegressionRetrainer(C, solver="newton-cholesky")``
  to rounding (the difference is recorded in A).
- MLP: the objective is written out, ``(sum_{i not in G} l_i + n wd / 2
  ||theta||^2) / n`` with the full ``n``, minimised by full-batch LBFGS in
  float64 from the trained weights to ``||grad|| < 1e-8``.

Sections (``--only A,B,...``):

A. Logistic regression of accuracy.py section A (digits ``X / 16``, 1000
   training / 100 test points, C=0.1, no intercept, 640 parameters), leave
   one out over every training point; and the same at C=1 (a weaker penalty,
   where first order is further from retraining). Per test point, Pearson and
   Spearman across training points of predicted and actual changes, averaged;
   size = least-squares slope through the origin of predicted on actual over
   all pairs. DirectInfluence, ``order="first"`` and ``"newton"``.
B. The C=0.1 model of A, groups of 1%, 5% and 20% of the training points
   (30, 20, 10 of each): random, and clustered (the k nearest training points,
   Euclidean on the inputs, of a randomly drawn anchor point). Pearson over
   (test point, group) pairs and the slope as in A.
C. MLP 64-32-10 tanh on standardised digits (the ``hard`` MLP of
   bench_solvers.py, 1397 training / 100 test points, float64, trained by
   LBFGS on mean cross-entropy + 1e-3 / 2 ||theta||^2, polished here to
   ||grad|| < 1e-8), groups of 5% (20 random, 20 clustered), retrained from the
   trained weights. DirectInfluence with the Hessian and with
   ``second_order="gauss_newton"``, regularization 1e-3 (the weight decay in
   sum form); the Newton step's removed term ``C_G`` is the Gauss-Newton one
   in both.
D. Ensemble LDS on the MLP of accuracy.py section B (X / 16, 1000 training /
   50 validation / 100 test points, Adam 500 full-batch epochs from a seeded
   initialisation, weight decay 1e-3): 5 members (seeds 0-4; seed 0 is
   accuracy.py's model), 100 random halves retrained with each of the 5 seeds
   as accuracy.py retrains (``TorchRetrainer``, the seed's initialisation and
   order). The ground truth of a subset is the mean of its 5 retrained losses
   (the expected loss over training seeds); each member is also scored against
   its own seed's retrainings. The ensemble is ``skinfl.InfluenceEnsemble``
   of the fitted members (the mean of their influences). Regularization
   chosen on the validation points from a grid, for each member and for the
   ensemble.
E. Data cleaning: digits ``X / 16`` split 1000 training / 300 validation /
   497 test points, 10% of the training labels flipped (seeded, each to
   another class), L2 logistic regression at C = 0.1, 1 and 10.
   ``skinfl.metrics.data_cleaning`` ranks the training points by the summed
   influence on the validation loss (raw and RelatIF), by the summed Newton
   removal effect on it (``influence_scores``), by training loss (highest
   first) and at random (10 draws), removes the 5%, 10% and 20% at the top,
   refits (same C) and measures accuracy on the test points; the same
   removals are refitted here for each test point's outcome (the intervals).

Confidence intervals (95%, percentile bootstrap, 2000 resamples): A over test
points; B and C over test points and groups together (both resampled); D over
query points; E over test points for a fixed ranking (paired with the model
without removal for gains), over test points and random draws together for
random removal. Ground truth (retrainings) is cached in
``benchmarks/.work/removal[_quick]/``; ``--reuse-truth`` reads it back.

Results: ``results/removal.{md,json}`` (``_quick``, ``_<sections>``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: the retrainings share the cores
# numpy's BLAS in one thread: the logistic regressions' small products slow down 100x when threads contend
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import joblib  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
import _problems as P  # noqa: E402
import accuracy as A  # noqa: E402

SEED, CONFIDENCE = 0, 0.95
METHODS = ("first", "newton", "newton_exact")  # removal_effects(order=..., test_loss=...)
TARGET_METHODS = ("newton", "newton_exact")
SECTIONS = "ABCDE"
MLP_TOL = 1e-8  # ||grad|| of the MLP objective (sum form / n) at which LBFGS stops
MLP_MAX_ITER = 20_000
NAMES = {"first": "first order", "newton": "Newton", "newton_exact": "Newton, exact test loss"}
KEYWORDS = {"first": {"order": "first"}, "newton": {"order": "newton"},
            "newton_exact": {"order": "newton", "test_loss": "exact"}}


@dataclass(frozen=True)
class Setup:
    name: str
    accuracy: object  # accuracy.py's setup: sections A, B, D
    loo_cs: tuple  # C of the logistic regressions of A
    group_fractions: tuple  # B
    group_counts: tuple
    mlp_set: str  # C: the _problems data set
    mlp_group_fraction: float
    mlp_group_count: int
    mlp_weight_decays: tuple
    n_members: int  # D
    n_subsets: int
    lds_grid: tuple
    clean_split: tuple  # E: train, validation, test
    clean_cs: tuple
    clean_fractions: tuple
    n_random: int
    n_boot: int

    @property
    def work_dir(self):
        return H.WORK_DIR / ("removal" if self.name == "full" else "removal_quick")


FULL = Setup("full", A.FULL, (0.1, 1.0), (0.01, 0.05, 0.2), (30, 20, 10), "hard", 0.05, 20, (1e-3, 1e-2), 5, 100,
             (1e-3, 10**-2.5, 1e-2, 10**-1.5), (1000, 300, 497), (0.1, 1.0, 10.0), (0.05, 0.1, 0.2), 10, 2000)
QUICK = Setup("quick", A.QUICK, (0.1, 1.0), (0.01, 0.05, 0.2), (8, 6, 4), "hard_quick", 0.05, 6, (1e-3, 1e-2), 5, 12,
              (1e-2, 1e-1, 1.0), (300, 100, 200), (1.0, 10.0), (0.05, 0.1, 0.2), 4, 500)


# ------------------------------------------------------------------ statistics
def bootstrap(statistic, n_rows, n_cols=None, n_boot=2000, seed=SEED):
    """Percentile interval of ``statistic(rows, cols)`` over resampled row (and column) indices."""
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(n_boot):
        rows = rng.randint(0, n_rows, n_rows)
        cols = None if n_cols is None else rng.randint(0, n_cols, n_cols)
        values.append(statistic(rows, cols))
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    tail = 100 * (1 - CONFIDENCE) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def estimate(value, interval):
    return {"value": float(value), "interval": interval}


def cell(entry, spec=".4f"):
    """``value [low, high]``."""
    if entry is None:
        return "-"
    low, high = entry["interval"]
    return f"{entry['value']:{spec}} [{low:{spec}}, {high:{spec}}]"


def slope(predicted, actual):
    """Least-squares slope through the origin of predicted on actual: 1 = the right size."""
    return float((predicted * actual).sum() / (actual * actual).sum())


def pooled_scores(predicted, actual, n_boot):
    """Pearson over (test point, group) pairs, the slope over them and the median of the groups' own slopes,
    each resampled over test points and groups together."""
    def pearson(p, a):
        return float(np.corrcoef(p.ravel(), a.ravel())[0, 1])

    def median_slope(p, a):
        return float(np.median((p * a).sum(0) / (a * a).sum(0)))

    def resampled(function):
        return lambda rows, cols: function(predicted[np.ix_(rows, cols)], actual[np.ix_(rows, cols)])

    n_rows, n_cols = actual.shape
    return {name: estimate(function(predicted, actual), bootstrap(resampled(function), n_rows, n_cols, n_boot))
            for name, function in (("pearson", pearson), ("slope", slope), ("median_slope", median_slope))}


def captured(function):
    """``function()`` and the distinct warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function()
    return result, H.summarise(H.warning_messages(caught))


def short(caught, count):
    """The warnings of a prediction in a few words (the full messages are in the JSON)."""
    import re

    out = []
    for message in caught:
        found = re.search(r"Removing (\d+) of the", message)
        if found:
            out.append(f"n A - C_G indefinite for {found.group(1)} of {count}")
        else:
            out.append(message.split(":")[0].split("x ", 1)[-1])
    return "; ".join(out) or "-"


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def as_numpy(values):
    return values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)


# ------------------------------------------------------------------ retraining
class SoftmaxRegression:
    """``retrain(X, y) -> nn.Linear``: the exact minimiser of ``sum_i l_i + ||W||^2 / (2 C)``, every class kept.

    The objective of ``LogisticRegressionRetrainer(C)`` (multinomial, no
    intercept), solved by Newton's method in float64 to ``||grad|| <= tol``.
    Unlike scikit-learn it keeps a weight row for a class that has no training
    point left (removing a clustered group can take a whole digit away): that
    row is still fitted, pushed down by the other points. The first call
    solves from zero and keeps its solution and Hessian factor; every later
    call starts from them, reusing the factor until convergence slows
    (chord Newton), so that a refit without a few points costs a few gradients.
    """

    def __init__(self, C, n_classes=10, tol=1e-9, max_iter=500):
        self.C, self.n_classes, self.tol, self.max_iter = C, n_classes, tol, max_iter
        self.start_ = None

    def key(self):
        return {"solver": "SoftmaxRegression", "C": self.C, "n_classes": self.n_classes, "tol": self.tol}

    def regularization_for(self, n_samples):
        """``1 / (C n)``: the influence regularization of this objective."""
        return 1.0 / (self.C * n_samples)

    def _value(self, X, Y, W):
        Z = X @ W.T
        Z -= Z.max(axis=1, keepdims=True)
        E = np.exp(Z)
        S = E.sum(axis=1, keepdims=True)
        return float((np.log(S[:, 0]) - (Z * Y).sum(1)).sum() + (W * W).sum() / (2 * self.C)), E / S

    def probabilities(self, X, W):
        Z = X @ W.T
        Z -= Z.max(axis=1, keepdims=True)
        E = np.exp(Z)
        return E / E.sum(axis=1, keepdims=True)

    def hessian(self, X, P, penalty=True):
        """The Hessian of ``sum_i l_i`` (plus the penalty's ``I / C``) over the rows of ``X``, ``(k d, k d)``;
        ``P`` their class probabilities. Flattened as ``nn.Linear.weight``, class-major."""
        n, d = X.shape
        k = self.n_classes
        weighted = (P[:, :, None] * X[:, None, :]).reshape(n, k * d)
        H = -weighted.T @ weighted
        for a in range(k):
            H[a * d:(a + 1) * d, a * d:(a + 1) * d] += (X * P[:, a:a + 1]).T @ X
        if penalty:
            H[np.diag_indices_from(H)] += 1.0 / self.C
        return H

    def gradient(self, X, y, W):
        """The gradient of ``sum_i l_i`` over the rows of ``X``, shaped as ``W``."""
        Y = np.zeros((len(X), self.n_classes))
        Y[np.arange(len(X)), np.asarray(y, dtype=int)] = 1.0
        return (self.probabilities(X, W) - Y).T @ X

    def _factor(self, X, P):
        import scipy.linalg

        return scipy.linalg.cho_factor(self.hessian(X, P))

    def solve(self, X, y):
        """``(W, {"gradient_norm", "iterations", "factorizations"})``."""
        import scipy.linalg

        X = np.asarray(X, dtype=np.float64)
        n, d = X.shape
        k = self.n_classes
        Y = np.zeros((n, k))
        Y[np.arange(n), np.asarray(y, dtype=int)] = 1.0
        W, factor = (np.zeros((k, d)), None) if self.start_ is None else self.start_
        value, P = self._value(X, Y, W)
        norms, factorizations, iteration = [], 0, 0
        for iteration in range(self.max_iter):
            G = (P - Y).T @ X + W / self.C
            norms.append(float(np.linalg.norm(G)))
            if norms[-1] <= self.tol:
                break
            if factor is None or (len(norms) > 1 and norms[-1] > 0.25 * norms[-2]):
                factor, factorizations = self._factor(X, P), factorizations + 1
            step = scipy.linalg.cho_solve(factor, G.ravel()).reshape(k, d)
            t = 1.0
            while True:  # backtracking; a rise within rounding of the objective is accepted
                new, new_P = self._value(X, Y, W - t * step)
                if new <= value + 1e-12 * max(1.0, abs(value)) or t < 1e-12:
                    break
                t /= 2
            W, value, P = W - t * step, new, new_P
        if self.start_ is None:
            self.start_ = (W, self._factor(X, P))
        return W, {"gradient_norm": norms[-1], "iterations": iteration, "factorizations": factorizations}

    def __call__(self, X, y):
        import torch

        W, record = self.solve(X, y)
        if record["gradient_norm"] > self.tol:
            raise RuntimeError(f"SoftmaxRegression(C={self.C}) stopped at ||grad|| = {record['gradient_norm']:.1e}")
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(W))
        return layer.eval()


def logreg(C):
    return SoftmaxRegression(C)


def query_losses_without(retrain, X, y, removed, X_query, y_query):
    """Query losses (cross-entropy) of ``retrain`` on the training set without the rows ``removed``."""
    from skinfl.metrics import query_losses

    keep = np.setdiff1d(np.arange(len(X)), removed)
    return query_losses(retrain(X[keep], y[keep]), "cross_entropy", X_query, y_query)


def correct_without(retrain, X, y, removed, X_test, y_test):
    """Whether each test point is classified right by ``retrain`` on the training set without ``removed``."""
    import torch

    keep = np.setdiff1d(np.arange(len(X)), removed)
    model = retrain(X[keep], y[keep])
    with torch.no_grad():
        return model(torch.as_tensor(X_test)).argmax(1).numpy() == y_test


def minimise(model, X, y, keep, n, weight_decay, tol=MLP_TOL, max_iter=MLP_MAX_ITER):
    """Full-batch LBFGS on ``(sum_{i in keep} l_i + n wd / 2 ||theta||^2) / n`` until ``||grad|| < tol``.

    ``n`` is the full training set's size: the penalty of the objective the
    influence estimator assumes. LBFGS restarts (fresh history) whenever its
    line search stops short. Returns ``{"gradient_norm", "iterations", "restarts"}``.
    """
    import torch
    import torch.nn.functional as F

    X_keep, y_keep = X[keep], y[keep]
    params = list(model.parameters())

    def objective():
        penalty = sum((p * p).sum() for p in params)
        return (F.cross_entropy(model(X_keep), y_keep, reduction="sum") + 0.5 * n * weight_decay * penalty) / n

    iterations, restarts, norm, optimizer = 0, 0, float("inf"), None
    while iterations < max_iter:
        if optimizer is None:
            optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=25, history_size=50, tolerance_grad=0.0,
                                          tolerance_change=0.0, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            value = objective()
            value.backward()
            return value

        before = optimizer.state[params[0]].get("n_iter", 0)
        optimizer.step(closure)
        done = optimizer.state[params[0]]["n_iter"] - before
        iterations += max(done, 1)
        closure()
        norm = float(sum((p.grad * p.grad).sum() for p in params) ** 0.5)
        if norm < tol:
            break
        if done < 25:
            restarts, optimizer = restarts + 1, None
    model.zero_grad(set_to_none=True)
    return {"gradient_norm": norm, "iterations": iterations, "restarts": restarts}


def mlp_losses_without(model, X, y, removed, weight_decay, X_query, y_query):
    """Warm-started retraining of a copy of ``model`` without ``removed``: query losses and the LBFGS record."""
    import copy

    import torch

    from skinfl.metrics import query_losses

    torch.set_num_threads(1)  # two retrainings share the two cores
    model = copy.deepcopy(model).train()
    keep = np.setdiff1d(np.arange(len(X)), removed)
    start = time.perf_counter()
    record = minimise(model, X, y, keep, len(X), weight_decay)
    record["seconds"] = time.perf_counter() - start
    return query_losses(model.eval(), "cross_entropy", X_query, y_query), record


def accuracy_of(model, X, y):
    import torch

    with torch.no_grad():
        return float((model(torch.as_tensor(X)).argmax(1) == torch.as_tensor(y)).double().mean())


def draw_groups(X, size, count, kind, rng):
    """``count`` groups of ``size`` training rows: random, or the nearest neighbours of a random anchor."""
    if kind == "random":
        return [np.sort(rng.choice(len(X), size, replace=False)) for _ in range(count)]
    from sklearn.neighbors import NearestNeighbors

    neighbours = NearestNeighbors(n_neighbors=size).fit(X)
    anchors = rng.choice(len(X), count, replace=False)
    return [np.sort(row) for row in neighbours.kneighbors(X[anchors], return_distance=False)]


def newton_step_losses(retrain, W, H_full, X, y, groups, X_test, y_test):
    """Diagnostic for the logistic regression: the test losses at ``theta + delta_G``, the parameters after one
    Newton step of the objective without each group, ``delta_G = (n A - H_G)^-1 g_G`` (exact Hessians)."""
    import torch

    from skinfl.metrics import query_losses

    out = []
    for g in groups:
        H_G = retrain.hessian(X[g], retrain.probabilities(X[g], W), penalty=False)
        step = np.linalg.solve(H_full - H_G, retrain.gradient(X[g], y[g], W).ravel()).reshape(W.shape)
        model = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(W + step))
        out.append(query_losses(model, "cross_entropy", X_test, y_test))
    return np.stack(out, axis=1)


def group_effects(estimator, X_test, y_test, X, y, groups, method):
    """Predicted effects of removing each of ``groups`` (which may overlap): ``(n_test, n_groups)``."""
    rows = np.concatenate(groups)
    labels = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    return estimator.removal_effects(X_test, y_test, X[rows], y[rows], groups=labels, **KEYWORDS[method])


# ------------------------------------------------------------------ sections
def section_a(setup, args, work):
    from skinfl import DirectInfluence, metrics
    from skinfl.metrics._scores import row_correlations
    from skinfl.retraining import LogisticRegressionRetrainer

    data = A.make_data(setup.accuracy)
    X, y, X_test, y_test = data["X_train"], data["y_train"], data["X_test"], data["y_test"]
    n = len(X)
    results, rows, costs, models, checks = {}, [], [], {}, {}
    for C in setup.loo_cs:
        retrain = logreg(C)
        model = retrain(X, y)
        models[C] = model
        regularization = retrain.regularization_for(n)
        reference = LogisticRegressionRetrainer(C=C, solver="newton-cholesky")(X, y).weight.detach()
        check = float((model.weight.detach() - reference).abs().max() / reference.abs().max())
        checks[C] = check
        truth, cost = A.ground_truth(work, f"loo-C{C:g}", ("loo", X, y, X_test, y_test, retrain.key()),
                                     lambda: metrics.leave_one_out_truth(retrain, X, y, X_test, y_test,
                                                                         loss="cross_entropy", n_jobs=args.n_jobs),
                                     args.reuse_truth)
        costs.append((f"A, C={C:g}", f"leave-one-out, {n + 1} logistic regressions", cost))
        actual = truth.loss_changes
        estimator = DirectInfluence(model, loss="cross_entropy", regularization=regularization).fit(X, y)
        mean_actual = float(np.abs(actual).mean())
        for order in METHODS:
            (predicted, caught), seconds = timed(lambda: captured(
                lambda: as_numpy(estimator.removal_effects(X_test, y_test, **KEYWORDS[order]))))
            predicted = predicted[:, truth.removed]
            pearson, spearman = row_correlations(predicted, actual), row_correlations(predicted, actual, "spearman")
            products, squares = (predicted * actual).sum(1), (actual * actual).sum(1)
            entry = {
                "pearson": estimate(pearson.mean(), bootstrap(lambda r, _: pearson[r].mean(), len(pearson),
                                                              n_boot=setup.n_boot)),
                "spearman": estimate(spearman.mean(), bootstrap(lambda r, _: spearman[r].mean(), len(spearman),
                                                                n_boot=setup.n_boot)),
                "slope": estimate(products.sum() / squares.sum(),
                                  bootstrap(lambda r, _: products[r].sum() / squares[r].sum(), len(products),
                                            n_boot=setup.n_boot)),
                "max_abs_error_over_max_actual": float(np.abs(predicted - actual).max() / np.abs(actual).max()),
                "seconds": seconds, "warnings": caught, "regularization": regularization,
                "mean_abs_actual": mean_actual, "weights_vs_scikit_learn": check}
            results[f"C={C:g}", order] = entry
            rows.append([f"{C:g}" + " (accuracy.py)" * (C == A.C), f"{regularization:.3g}", NAMES[order],
                         cell(entry["pearson"]), cell(entry["spearman"]), cell(entry["slope"], ".3f"),
                         f"{entry['max_abs_error_over_max_actual']:.3f}", f"{seconds:.2f}"])
    table = H.table(["C", "regularization", "order", "Pearson [95% CI]", "Spearman [95% CI]",
                     "slope pred~actual [95% CI]", "max abs error / max abs actual", "s"], rows, 3)
    text = (f"L2 logistic regression, no intercept, {setup.accuracy.n_train} training and {setup.accuracy.n_test} "
            f"test points (accuracy.py's split), each training point removed in turn ({setup.accuracy.n_train + 1} "
            "exact refits per C). Pearson and Spearman: per test point across training points, averaged; CI by "
            "bootstrap over test points. Slope: least squares through the origin of predicted on actual effects "
            "over all (test point, training point) pairs, resampled over test points (1 = the right size). Newton, exact "
            "test loss: removal_effects(order='newton', test_loss='exact'), the test losses evaluated at the "
            "parameters after the Newton step instead of linearised. The model is "
            "SoftmaxRegression's exact solution (max |W - W_scikit-learn| / max |W_scikit-learn| against "
            "LogisticRegressionRetrainer(newton-cholesky): "
            + ", ".join(f"{checks[C]:.1e} at C={C:g}" for C in setup.loo_cs) + ").")
    targets = []
    for C in setup.loo_cs:
        first = results[f"C={C:g}", "first"]["pearson"]["value"]
        for method in TARGET_METHODS:
            value = results[f"C={C:g}", method]["pearson"]["value"]
            targets.append((f"A, C={C:g}: {NAMES[method]} LOO Pearson >= 0.997 ({value:.4f}; first order "
                            f"{first:.4f})", value >= 0.997))
    return {"sections": [("A. Logistic regression: leave one out, every training point", text, table)],
            "results": {f"{k[0]} {k[1]}": v for k, v in results.items()}, "costs": costs, "targets": targets,
            "models": models, "data": data}


def section_b(setup, args, work, a_state=None):
    from skinfl import DirectInfluence

    data = a_state["data"] if a_state else A.make_data(setup.accuracy)
    X, y, X_test, y_test = data["X_train"], data["y_train"], data["X_test"], data["y_test"]
    n = len(X)
    retrain = logreg(A.C)
    model = a_state["models"][A.C] if a_state and A.C in a_state["models"] else retrain(X, y)
    from skinfl.metrics import query_losses

    base = query_losses(model, "cross_entropy", X_test, y_test)
    estimator = DirectInfluence(model, loss="cross_entropy", regularization=retrain.regularization_for(n)).fit(X, y)
    W = model.weight.detach().numpy()
    H_full = retrain.hessian(X, retrain.probabilities(X, W))  # n A: the curvature of the sum-form objective
    rng = np.random.RandomState(SEED + 2)
    results, rows, costs, retrain_s, check = {}, [], [], 0.0, 0.0
    for fraction, count in zip(setup.group_fractions, setup.group_counts):
        size = max(1, int(round(fraction * n)))
        for kind in ("random", "clustered"):
            groups = draw_groups(X, size, count, kind, rng)
            retrain(X, y)  # the warm start of every refit: the full solution

            def compute():
                losses = joblib.Parallel(n_jobs=args.n_jobs)(
                    joblib.delayed(query_losses_without)(retrain, X, y, g, X_test, y_test) for g in groups)
                return np.stack(losses, axis=1)

            losses, cost = A.ground_truth(work, f"groups-{kind}-{size}",
                                          ("groups", X, y, X_test, y_test, groups, retrain.key()),
                                          compute, args.reuse_truth)
            retrain_s += cost["seconds"]
            actual = losses - base[:, None]
            # An independent check of test_loss='exact': the Newton step from the exact Hessians, computed here.
            stepped = newton_step_losses(retrain, W, H_full, X, y, groups, X_test, y_test) - base[:, None]
            for order in METHODS:
                (predicted, caught), seconds = timed(lambda: captured(
                    lambda: as_numpy(group_effects(estimator, X_test, y_test, X, y, groups, order))))
                entry = {**pooled_scores(predicted, actual, setup.n_boot), "seconds": seconds, "warnings": caught,
                         "size": size, "count": count, "mean_abs_actual": float(np.abs(actual).mean())}
                if order == "newton_exact":
                    entry["max_abs_difference_to_own_newton_step"] = float(np.abs(predicted - stepped).max())
                    check = max(check, entry["max_abs_difference_to_own_newton_step"] / np.abs(stepped).max())
                results[kind, size, order] = entry
                rows.append([kind, f"{fraction:.0%} ({size})", str(count), NAMES[order], cell(entry["pearson"]),
                             cell(entry["slope"], ".3f"), cell(entry["median_slope"], ".3f"),
                             f"{entry['mean_abs_actual']:.2e}",
                             f"{seconds:.1f}", short(caught, count)])
    costs.append(("B", f"{sum(setup.group_counts) * 2} logistic regressions without a group", {
        "seconds": retrain_s, "reused": args.reuse_truth}))
    table = H.table(["groups", "size", "count", "order", "Pearson over (test, group) pairs [95% CI]",
                     "slope pred~actual [95% CI]", "median per-group slope [95% CI]", "mean abs actual", "s",
                     "warnings"], rows, 4)
    text = (f"The C={A.C} logistic regression of A. Random groups, and clustered groups (the k nearest training "
            "points, Euclidean on the inputs, of a random anchor point: at 20% such a group takes most of one or two "
            "digits). Slope: least squares through the origin of predicted on actual effects over all (test point, "
            "group) pairs (1 = the right size); per-group slope: the same over one group's test points, its median "
            "over groups (robust to a few groups with large effects). CIs: bootstrap over test points and groups "
            "together. Newton, exact test loss: test_loss='exact', the test losses at the parameters after the Newton "
            "step; its gap to Newton is the linearisation of the test loss, its gap to the refit the one step short "
            "of the refit's minimum (it agrees with the same step computed here from the explicit Hessians to "
            f"{check:.1e} of the largest effect).")
    targets = []
    for (kind, size, order), entry in results.items():
        if order in TARGET_METHODS:
            first = results[kind, size, "first"]["slope"]["value"]
            value = entry["slope"]["value"]
            targets.append((f"B, {kind} groups of {size}: {NAMES[order]} slope within 10% of 1 ({value:.3f}; first "
                            f"order {first:.3f})", abs(value - 1) <= 0.1))
    return {"sections": [("B. Logistic regression: groups", text, table)],
            "results": {f"{k[0]} {k[1]} {k[2]}": v for k, v in results.items()}, "costs": costs,
            "targets": targets}


def section_c(setup, args, work):
    import torch

    from skinfl import DirectInfluence
    from skinfl.metrics import query_losses

    P.prepare({"set": setup.mlp_set, "problems": ["mlp"]})
    data = dict(np.load(P.data_path(setup.mlp_set)))
    X = torch.from_numpy(data["X_train"]).double()
    y = torch.from_numpy(data["y_train"])
    X_test, y_test = torch.from_numpy(data["X_test"]).double(), torch.from_numpy(data["y_test"])
    n = len(X)
    trained = P.load_model(P.model_spec(setup.mlp_set, "mlp", "float64"))
    source = P.SETS[setup.mlp_set].work_dir / "mlp.pt"
    size = max(1, int(round(setup.mlp_group_fraction * n)))
    rng = np.random.RandomState(SEED + 3)
    groups_of = {kind: draw_groups(data["X_train"], size, setup.mlp_group_count, kind, rng)
                 for kind in ("random", "clustered")}
    results, rows, costs, records, texts, targets, extra = {}, [], [], {}, [], [], {}
    for weight_decay in setup.mlp_weight_decays:
        def minimum():
            model = P.load_model(P.model_spec(setup.mlp_set, "mlp", "float64")).train()
            record = minimise(model, X, y, np.arange(n), n, weight_decay)
            return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "record": record}

        fitted, fit_cost = A.ground_truth(work, f"mlp-minimum-wd{weight_decay:g}",
                                          ("minimum", P.fingerprint(source), MLP_TOL, weight_decay), minimum,
                                          args.reuse_truth)
        costs.append(("C", f"weight decay {weight_decay:g}: LBFGS from the trained MLP to the minimum "
                           f"({fitted['record']['iterations']} iterations)", fit_cost))
        model = P.build("mlp").double()
        model.load_state_dict(fitted["state"])
        model.eval()
        base = query_losses(model, "cross_entropy", X_test, y_test)
        change = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(),
                                                                 trained.state_dict().values()))
        estimators, smallest = {}, {}
        for second_order in ("hessian", "gauss_newton"):
            (estimator, caught), seconds = timed(lambda: captured(lambda: DirectInfluence(
                model, loss="cross_entropy", regularization=weight_decay, second_order=second_order,
                solver="eigh").fit(X, y)))
            estimators[second_order] = estimator
            smallest[second_order] = float(estimator.eigenvalues_.min()) + weight_decay
        retrain_s = 0.0
        for kind, groups in groups_of.items():
            def compute():
                out = joblib.Parallel(n_jobs=args.n_jobs)(
                    joblib.delayed(mlp_losses_without)(model, X, y, g, weight_decay, X_test, y_test) for g in groups)
                return {"losses": np.stack([o[0] for o in out], axis=1), "records": [o[1] for o in out]}

            truth, cost = A.ground_truth(work, f"mlp-groups-wd{weight_decay:g}-{kind}-{size}",
                                         ("mlp-groups", P.fingerprint(source), MLP_TOL, groups, weight_decay),
                                         compute, args.reuse_truth)
            retrain_s += cost["seconds"]
            records[weight_decay, kind] = truth["records"]
            actual = truth["losses"] - base[:, None]
            for second_order, estimator in estimators.items():
                for order in METHODS:
                    (predicted, caught), seconds = timed(lambda: captured(
                        lambda: as_numpy(group_effects(estimator, X_test, y_test, X, y, groups, order))))
                    entry = {**pooled_scores(predicted, actual, setup.n_boot), "seconds": seconds,
                             "warnings": caught, "mean_abs_actual": float(np.abs(actual).mean())}
                    results[weight_decay, kind, second_order, order] = entry
                    rows.append([f"{weight_decay:g}", kind, second_order.replace("_", "-"), NAMES[order],
                                 cell(entry["pearson"]), cell(entry["slope"], ".3f"),
                                 cell(entry["median_slope"], ".3f"), f"{seconds:.1f}", short(caught, len(groups))])
                first = results[weight_decay, kind, second_order, "first"]["slope"]["value"]
                for method in TARGET_METHODS:
                    value = results[weight_decay, kind, second_order, method]["slope"]["value"]
                    targets.append((f"C, weight decay {weight_decay:g}, {kind} groups, {second_order}: {NAMES[method]} "
                                    f"slope within 10% of 1 ({value:.3f}; first order {first:.3f})",
                                    abs(value - 1) <= 0.1))
        costs.append(("C", f"weight decay {weight_decay:g}: {2 * setup.mlp_group_count} warm-started MLP "
                           "retrainings", {"seconds": retrain_s, "reused": args.reuse_truth}))
        done = [r for kind in groups_of for r in records[weight_decay, kind]]
        norms = [r["gradient_norm"] for r in done]
        texts.append(
            f"weight decay {weight_decay:g}: minimum at ||grad|| = {fitted['record']['gradient_norm']:.1e} (largest "
            f"parameter change from the trained MLP {change:.2g}; train accuracy "
            f"{accuracy_of(model, X, y):.3f}, test {accuracy_of(model, X_test, y_test):.3f}), "
            f"smallest eigenvalue of Hessian + regularization {smallest['hessian']:.2e}, of Gauss-Newton + "
            f"regularization {smallest['gauss_newton']:.2e}; retrainings reached ||grad|| < {MLP_TOL:g} in "
            f"{sum(g < MLP_TOL for g in norms)} of {len(norms)} ({min(r['iterations'] for r in done)}-"
            f"{max(r['iterations'] for r in done)} iterations, {min(r['seconds'] for r in done):.0f}-"
            f"{max(r['seconds'] for r in done):.0f} s each)")
        extra[f"wd={weight_decay:g}"] = {"minimum": fitted["record"], "smallest_eigenvalue": smallest,
                                         "retrainings": {kind: records[weight_decay, kind] for kind in groups_of}}
    table = H.table(["weight decay", "groups", "curvature A", "order", "Pearson over (test, group) pairs [95% CI]",
                     "slope pred~actual [95% CI]", "median per-group slope [95% CI]", "s", "warnings"], rows, 4)
    text = (f"MLP 64-32-10 tanh ({sum(p.numel() for p in trained.parameters())} parameters, float64) on standardised "
            f"digits, {n} training and {len(X_test)} test points: bench_solvers.py's model (trained at weight decay "
            f"{P.WEIGHT_DECAY:g}), taken by LBFGS from its weights to the minimum of cross-entropy + weight decay / 2 "
            f"||theta||^2 for each weight decay. {setup.mlp_group_count} random and {setup.mlp_group_count} clustered "
            f"groups of {size} points ({setup.mlp_group_fraction:.0%}), the same for both; each group removed and the "
            "model retrained from its fitted weights by LBFGS on the same sum-form objective (penalty with the full "
            "n). DirectInfluence at regularization = weight decay with the Hessian or the Gauss-Newton matrix as the "
            "curvature A; the Newton step removes the group's Gauss-Newton term C_G in both. Slopes and CIs as in B. "
            + "; ".join(texts) + ".")
    return {"sections": [("C. MLP on digits: groups of 5%", text, table)],
            "results": {" ".join(f"{part:g}" if isinstance(part, float) else part for part in k): v
                        for k, v in results.items()},
            "costs": costs, "targets": targets, "extra": extra}


def section_d(setup, args, work):
    import torch

    from skinfl import DirectInfluence, InfluenceEnsemble, metrics
    from skinfl.metrics import DatamodelTruth

    acc = setup.accuracy
    data = A.make_data(acc)
    X, y = data["X_train"], data["y_train"]
    X_query = np.concatenate([data["X_val"], data["X_test"]])
    y_query = np.concatenate([data["y_val"], data["y_test"]])
    n_val = acc.n_val
    seeds = list(range(setup.n_members))
    masks = metrics.random_subsets(len(X), A.ALPHA, setup.n_subsets, random_state=SEED)
    members, losses, retrain_s = [], [], 0.0
    for seed in seeds:
        retrain = A.torch_retrainer("mlp", acc.epochs).set_params(random_state=seed)
        members.append(retrain(X, y))
        truth, cost = A.ground_truth(work, f"lds-seed{seed}",
                                     ("lds", X, y, X_query, y_query, masks, A.retrainer_key(retrain)),
                                     lambda: metrics.datamodel_truth(retrain, X, y, X_query, y_query,
                                                                     loss="cross_entropy", masks=masks,
                                                                     n_jobs=args.n_jobs), args.reuse_truth)
        losses.append(truth.losses)
        retrain_s += cost["seconds"]
    losses = np.stack(losses)  # (seed, query, subset)

    def truth_of(values, part):
        rows = slice(0, n_val) if part == "val" else slice(n_val, None)
        return DatamodelTruth(masks=masks, losses=values[rows])

    averaged = losses.mean(axis=0)
    cache = work / "factors"
    matrices, fit_warnings, influence_s, ensemble_check = {}, {}, 0.0, 0.0
    for regularization in setup.lds_grid:
        fitted = []
        for seed, member in zip(seeds, members):
            def influences():
                estimator = DirectInfluence(member, loss="cross_entropy", regularization=regularization,
                                            memory=str(cache)).fit(X, y)
                return estimator, as_numpy(estimator.influences(X_query, y_query))

            ((estimator, matrices[seed, regularization]), caught), seconds = timed(lambda: captured(influences))
            fitted.append(estimator)
            influence_s += seconds
            if caught:
                fit_warnings[f"seed {seed}, regularization {regularization:.3g}"] = caught
        # The members are fitted already: the ensemble calls them as they are.
        ensemble = InfluenceEnsemble(fitted)
        matrices["ensemble", regularization] = as_numpy(ensemble.influences(X_query, y_query))
        mean = np.mean([matrices[s, regularization] for s in seeds], axis=0)
        ensemble_check = max(ensemble_check, float(np.abs(matrices["ensemble", regularization] - mean).max()
                                                   / np.abs(mean).max()))
        del fitted, ensemble

    def lds(matrix, truth_losses, part):
        return metrics.linear_datamodeling_score(matrix[slice(0, n_val) if part == "val" else slice(n_val, None)],
                                                 truth_of(truth_losses, part))

    def scored(key, truth_losses):
        """The test LDS at the regularization with the best validation LDS."""
        sweep = {r: lds(matrices[key, r], truth_losses, "val").score for r in setup.lds_grid}
        best = max(sweep, key=sweep.get)
        test = lds(matrices[key, best], truth_losses, "test")
        per_query = test.per_query
        return {"regularization": best, "validation_sweep": sweep, "per_query": per_query,
                "lds": estimate(np.nanmean(per_query), bootstrap(lambda r, _: np.nanmean(per_query[r]),
                                                                 len(per_query), n_boot=setup.n_boot))}

    results = {seed: scored(seed, averaged) for seed in seeds}
    results["ensemble"] = scored("ensemble", averaged)
    own = {seed: scored(seed, losses[seed]) for seed in seeds}
    best_seed = max(seeds, key=lambda s: results[s]["lds"]["value"])
    # How different the members are, and how much the retrained losses depend on the seed.
    from itertools import combinations

    from skinfl.metrics._scores import row_correlations

    shared = results["ensemble"]["regularization"]
    pairs = list(combinations(seeds, 2))
    member_agreement = float(np.mean([np.nanmean(row_correlations(matrices[a, shared][n_val:],
                                                                  matrices[b, shared][n_val:]))
                                      for a, b in pairs]))
    seed_agreement = float(np.mean([np.nanmean(row_correlations(losses[a][n_val:], losses[b][n_val:], "spearman"))
                                    for a, b in pairs]))
    to_average = float(np.mean([np.nanmean(row_correlations(losses[a][n_val:], averaged[n_val:], "spearman"))
                                for a in seeds]))
    difference = results["ensemble"]["per_query"] - results[best_seed]["per_query"]
    gain = estimate(np.nanmean(difference), bootstrap(lambda r, _: np.nanmean(difference[r]), len(difference),
                                                      n_boot=setup.n_boot))
    rows = [[f"member, seed {s}" + " (accuracy.py's model)" * (s == SEED), f"{results[s]['regularization']:.3g}",
             cell(results[s]["lds"], ".3f"), f"{own[s]['regularization']:.3g}", cell(own[s]["lds"], ".3f")]
            for s in seeds]
    rows.append([f"InfluenceEnsemble of the {len(seeds)} members", f"{results['ensemble']['regularization']:.3g}",
                 cell(results["ensemble"]["lds"], ".3f"), "", ""])
    rows.append([f"ensemble - best member (seed {best_seed}), paired", "", cell(gain, "+.3f"), "", ""])
    table = H.table(["influences", "regularization", "test LDS vs seed-averaged truth [95% CI]",
                     "regularization (own seed)", "test LDS vs own seed's retrainings [95% CI]"], rows, 2)
    accuracy = [A.describe(m, data)["test_accuracy"] for m in members]
    text = (f"MLP 64-32-10 tanh of accuracy.py section B ({acc.n_train} training points, X / 16, Adam lr "
            f"{A.LEARNING_RATE}, {acc.epochs} full-batch epochs, weight decay {A.WEIGHT_DECAY}, float64), "
            f"{len(seeds)} members trained from seeds {seeds[0]}-{seeds[-1]} (test accuracy "
            f"{min(accuracy):.3f}-{max(accuracy):.3f}). Ground truth: {setup.n_subsets} random subsets of "
            f"{A.ALPHA:.0%}, each retrained with every seed ({setup.n_subsets * len(seeds)} retrainings); the "
            "seed-averaged truth of a subset is the mean of its retrained losses over the seeds, the expected loss "
            "over training seeds. DirectInfluence (Hessian) on each member; the ensemble is skinfl.InfluenceEnsemble "
            "of the 5 fitted members at one regularization, the mean of their influences (max relative difference "
            f"to the mean of the members' matrices {ensemble_check:.1e}). Regularization from the grid "
            f"{', '.join(f'{r:.3g}' for r in setup.lds_grid)} by validation LDS ({n_val} points), separately for "
            f"each row and truth. LDS on the {acc.n_test} test points; CI by bootstrap over test points. How far apart "
            f"the seeds are (test points, means over the {len(pairs)} pairs of seeds): Pearson between two members' "
            f"influences {member_agreement:.3f} (at {shared:.3g}); Spearman across subsets between two seeds' "
            f"retrained losses {seed_agreement:.3f}, between one seed's and the seed-averaged losses {to_average:.3f} "
            "(the LDS of a perfect single-seed datamodel).")
    targets = [(f"D: ensemble LDS above the best member's by >= 0.05 (ensemble {results['ensemble']['lds']['value']:.3f}"
                f", best member {results[best_seed]['lds']['value']:.3f}, difference {gain['value']:+.3f})",
                gain["value"] >= 0.05)]
    for entry in (*results.values(), *own.values()):
        entry.pop("per_query")
    return {"sections": [("D. Ensemble LDS on the MLP", text, table)],
            "results": {"seed_averaged_truth": {str(k): v for k, v in results.items()},
                        "own_seed_truth": {str(k): v for k, v in own.items()}, "ensemble_minus_best": gain,
                        "best_member": best_seed, "fit_warnings": fit_warnings,
                        "member_influence_pearson": member_agreement, "seed_loss_spearman": seed_agreement,
                        "seed_to_average_loss_spearman": to_average, "influence_seconds": influence_s,
                        "test_accuracy": accuracy},
            "costs": [("D", f"{setup.n_subsets * len(seeds)} MLP retrainings on random halves", {
                "seconds": retrain_s, "reused": args.reuse_truth})],
            "targets": targets}


def cleaning_data(setup):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.RandomState(SEED).permutation(len(X))
    ends = np.cumsum(setup.clean_split)
    train, val, test = np.split(order[:ends[-1]], ends[:2])
    X, y = X / 16.0, y.astype(np.int64)
    rng = np.random.RandomState(SEED + 1)
    n_train = len(train)
    flipped = np.sort(rng.choice(n_train, size=int(round(A.FLIP_FRACTION * n_train)), replace=False))
    noisy = y[train].copy()
    noisy[flipped] = (noisy[flipped] + rng.randint(1, 10, size=len(flipped))) % 10
    return {"X_train": X[train], "y_train": noisy, "y_clean": y[train], "flipped": flipped, "X_val": X[val],
            "y_val": y[val], "X_test": X[test], "y_test": y[test]}


def section_e(setup, args, work):
    from skinfl import DirectInfluence, metrics

    data = cleaning_data(setup)
    X, y, X_val, y_val = data["X_train"], data["y_train"], data["X_val"], data["y_val"]
    X_test, y_test = data["X_test"], data["y_test"]
    n, flipped = len(X), data["flipped"]
    sections, results, targets, retrain_s = [], {}, [], 0.0
    rankings_names = {"influence": "influence on validation loss", "relatif": "influence, RelatIF",
                      "newton": "Newton removal effect on validation loss", "loss": "training loss (highest first)"}
    for C in setup.clean_cs:
        retrain = logreg(C)
        model = retrain(X, y)  # also the warm start of every refit
        estimator = DirectInfluence(model, loss="cross_entropy", regularization=retrain.regularization_for(n)).fit(X, y)
        newton_scores = as_numpy(estimator.removal_effects(X_val, y_val, order="newton")).sum(0)
        common = {"X": X, "y": y, "fractions": setup.clean_fractions, "n_jobs": args.n_jobs}

        def clean():
            return {"main": metrics.data_cleaning(estimator, retrain, X_val, y_val, X_test, y_test, **common,
                                                  n_random=setup.n_random, random_state=SEED + 4),
                    "relatif": metrics.data_cleaning(estimator, retrain, X_val, y_val, X_test, y_test, **common,
                                                     rankings=("influence",), normalize="relatif"),
                    "newton": metrics.data_cleaning(estimator, retrain, X_val, y_val, X_test, y_test, **common,
                                                    rankings=("influence",), influence_scores=newton_scores)}

        runs, cost = A.ground_truth(work, f"cleaning-C{C:g}", ("data_cleaning", X, y, X_val, y_val, X_test, y_test,
                                                                retrain.key(), setup.clean_fractions, setup.n_random,
                                                                newton_scores), clean, args.reuse_truth)
        retrain_s += cost["seconds"]
        orders = {"influence": runs["main"].removed["influence"], "relatif": runs["relatif"].removed["influence"],
                  "newton": runs["newton"].removed["influence"], "loss": runs["main"].removed["loss"]}
        counts = dict(zip(setup.clean_fractions, runs["main"].n_removed))
        removals = {("none", 0.0, 0): np.array([], dtype=int), ("oracle", A.FLIP_FRACTION, 0): flipped}
        for fraction, count in counts.items():
            for name, order in orders.items():
                removals[name, fraction, 0] = np.sort(order[:count])
            for draw, order in enumerate(runs["main"].removed["random"]):
                removals["random", fraction, draw] = np.sort(order[:count])
        keys = list(removals)

        # data_cleaning gives accuracies; the intervals need each test point's outcome: the same removals again.
        def compute():
            return joblib.Parallel(n_jobs=args.n_jobs)(
                joblib.delayed(correct_without)(retrain, X, y, removals[key], X_test, y_test) for key in keys)

        correct, cost = A.ground_truth(work, f"cleaning-points-C{C:g}", ("cleaning", X, y, X_test, y_test,
                                                                          [removals[k] for k in keys],
                                                                          retrain.key()), compute, args.reuse_truth)
        retrain_s += cost["seconds"]
        correct = {key: np.asarray(c, dtype=float) for key, c in zip(keys, correct)}
        base = correct["none", 0.0, 0]
        n_test = len(base)
        reported = {("none", 0.0): runs["main"].baseline_accuracy}
        for column, fraction in enumerate(setup.clean_fractions):
            for name, run_name, ranking in (("influence", "main", "influence"), ("loss", "main", "loss"),
                                            ("relatif", "relatif", "influence"), ("newton", "newton", "influence"),
                                            ("random", "main", "random")):
                reported[name, fraction] = runs[run_name].accuracy[ranking][column]
        mismatch = max(abs(value - np.mean([correct[k].mean() for k in correct if k[:2] == key]))
                       for key, value in reported.items())

        def fixed(key):
            c = correct[key]
            return {"accuracy": estimate(c.mean(), bootstrap(lambda r, _: c[r].mean(), n_test, n_boot=setup.n_boot)),
                    "gain": estimate(c.mean() - base.mean(), bootstrap(lambda r, _: c[r].mean() - base[r].mean(),
                                                                       n_test, n_boot=setup.n_boot)),
                    "flipped_removed": float(np.isin(removals[key], flipped).mean()) if len(removals[key]) else None}

        def random(fraction):
            draws = np.stack([correct["random", fraction, d] for d in range(setup.n_random)])
            return {"accuracy": estimate(draws.mean(), bootstrap(lambda r, c: draws[np.ix_(c, r)].mean(), n_test,
                                                                 setup.n_random, setup.n_boot)),
                    "gain": estimate(draws.mean() - base.mean(), bootstrap(
                        lambda r, c: draws[np.ix_(c, r)].mean() - base[r].mean(), n_test, setup.n_random,
                        setup.n_boot)),
                    "flipped_removed": float(np.mean([np.isin(removals["random", fraction, d], flipped).mean()
                                                      for d in range(setup.n_random)]))}

        entries = {("none", 0.0): fixed(("none", 0.0, 0)), ("oracle", A.FLIP_FRACTION): fixed(
            ("oracle", A.FLIP_FRACTION, 0))}
        for fraction in setup.clean_fractions:
            for name in orders:
                entries[name, fraction] = fixed((name, fraction, 0))
            entries["random", fraction] = random(fraction)
        differences = {}
        for fraction in setup.clean_fractions:
            a, b = correct["influence", fraction, 0], correct["loss", fraction, 0]
            differences[fraction] = estimate(a.mean() - b.mean(), bootstrap(lambda r, _: a[r].mean() - b[r].mean(),
                                                                            n_test, n_boot=setup.n_boot))
        results[f"C={C:g}"] = {"entries": {f"{k[0]} {k[1]:g}": v for k, v in entries.items()},
                               "influence_minus_loss": {f"{k:g}": v for k, v in differences.items()},
                               "regularization": retrain.regularization_for(n),
                               "data_cleaning_accuracy_mismatch": mismatch}

        def row(label, key):
            e = entries[key]
            share = "-" if e["flipped_removed"] is None else f"{e['flipped_removed']:.2f}"
            return [label, "-" if key[0] == "none" else f"{key[1]:.0%}", cell(e["accuracy"], ".3f"),
                    "" if key[0] == "none" else cell(e["gain"], "+.3f"), share]

        clean = correct_without(retrain, X, data["y_clean"], np.array([], dtype=int), X_test, y_test).mean()
        body = [row("no removal", ("none", 0.0)), row("oracle: the flipped points", ("oracle", A.FLIP_FRACTION))]
        for fraction in setup.clean_fractions:
            body += [row(rankings_names[name], (name, fraction)) for name in orders]
            body.append(row(f"random ({setup.n_random} draws)", ("random", fraction)))
            body.append([f"influence - training loss (paired)", f"{fraction:.0%}", cell(differences[fraction], "+.3f"),
                         "", ""])
        table = H.table(["ranking", "removed", "test accuracy [95% CI]", "gain over no removal [95% CI]",
                         "share flipped among removed"], body, 2)
        text = (f"C={C:g} (regularization {retrain.regularization_for(n):.3g}); test accuracy trained on the clean "
                f"labels {clean:.3f}, on the noisy ones {base.mean():.3f}. Largest difference between "
                f"data_cleaning's accuracies and the refits here: {mismatch:.1e}.")
        sections.append((f"E. Data cleaning, C={C:g}", text, table))
        ahead = all(differences[f]["value"] > 0 for f in setup.clean_fractions)
        targets.append((f"E, C={C:g}: removal by influence ahead of removal by training loss at every fraction ("
                        + ", ".join(f"{f:.0%}: {differences[f]['value']:+.3f}" for f in setup.clean_fractions) + ")",
                        ahead))
    intro = (f"Digits X / 16 split {setup.clean_split[0]} training / {setup.clean_split[1]} validation / "
             f"{setup.clean_split[2]} test points; {len(flipped)} training labels ({A.FLIP_FRACTION:.0%}) flipped to "
             "another class. L2 logistic regression (no intercept) on the noisy labels. skinfl.metrics.data_cleaning "
             "ranks the training points, removes the first 5%, 10%, 20% and refits with the same C: influence summed "
             "over the validation points (raw, and normalize='relatif'), most harmful first; Newton: the summed "
             "removal_effects(X_val, y_val, order='newton') passed as influence_scores; training loss, highest first; "
             f"{setup.n_random} random orders. The same removals are refitted here for each test point's outcome. "
             "CIs: bootstrap over test points (paired with no removal for the gain, with the loss ranking for the "
             "difference); random removal over test points and draws together.")
    sections[0] = (sections[0][0], intro + "\n\n" + sections[0][1], sections[0][2])
    return {"sections": sections, "results": results, "targets": targets,
            "costs": [("E", "data_cleaning's logistic regressions after removal, and the same refitted for each test "
                            "point's outcome", {"seconds": retrain_s, "reused": args.reuse_truth})]}


RUNNERS = {"A": section_a, "B": section_b, "C": section_c, "D": section_d, "E": section_e}


def main(argv=None):
    p = H.parser(__doc__, "small sizes (200 training points for A, B, D; fewer groups, subsets and draws)")
    p.add_argument("--only", default=SECTIONS, help="sections to run, e.g. A,B or AB (default: all)")
    p.add_argument("--reuse-truth", action="store_true", help="read the ground truth stored by an earlier run")
    p.add_argument("--n-jobs", type=int, default=2, help="parallel retrainings for the ground truth")
    args = p.parse_args(argv)
    only = sorted(set(args.only.upper().replace(",", "").replace(" ", "")))
    unknown = [s for s in only if s not in SECTIONS]
    if unknown or not only:
        p.error(f"--only takes letters of {SECTIONS}, got {args.only!r}")
    import torch

    setup = QUICK if args.quick else FULL
    name = args.output or "removal" + "_quick" * args.quick + ("_" + "".join(only)) * (only != list(SECTIONS))
    run = H.Run(args, argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    work = setup.work_dir
    work.mkdir(parents=True, exist_ok=True)
    sections, results, costs, targets, extra, runtimes = [], {}, [], [], {}, {}
    state = None
    for letter in only:
        print(f"[{setup.name}] section {letter}", flush=True)
        start = time.perf_counter()
        out = RUNNERS[letter](setup, args, work, state) if letter == "B" else RUNNERS[letter](setup, args, work)
        if letter == "A":
            state = out
        runtimes[letter] = time.perf_counter() - start
        print(f"  {runtimes[letter]:.0f} s", flush=True)
        sections += out["sections"]
        results[letter] = out["results"]
        costs += out["costs"]
        targets += out["targets"]
        if out.get("extra"):
            extra[letter] = out["extra"]
    cost_rows = [[section, what, f"{c['seconds']:.0f}" + " (reused)" * bool(c.get("reused"))]
                 for section, what, c in costs]
    time_rows = [[letter, f"{runtimes[letter]:.0f}"] for letter in only]
    sections += [("Targets", None, "\n".join(f"- {'met' if ok else '**not met**'}: {label}" for label, ok in targets)),
                 ("Ground-truth cost (seconds, 2 parallel retrainings)", None,
                  H.table(["section", "retrainings", "seconds"], cost_rows, 2)),
                 ("Section wall times (seconds, ground truth included unless reused)", None,
                  H.table(["section", "seconds"], time_rows, 1))]
    notes = [
        "Sign: removal_effects > 0 means the test loss goes up when the points are removed (they helped).",
        "Every estimator is skinfl's DirectInfluence (exact curvature, float64); first order = influences / n "
        "summed over the group; Newton = one Newton step of the objective without the group from the fitted "
        "parameters (Woodbury from the fitted inverse; conjugate gradient for groups above 4,096 rows).",
        "Retraining keeps the penalty n * regularization / 2 * ||theta||^2 with the full n (LogisticRegressionRetrainer "
        "with a fixed C does; the MLP objective is written out), the objective removal_effects assumes.",
        "Seconds are informative only: in this process, 2 torch threads, on a shared machine.",
    ]
    record = {"status": "ok", "lib": "skinfl", "versions": H.versions("skinfl")}
    run.write(name, f"Removal effects against retraining ({setup.name})", sections, records=[record], notes=notes,
              settings={"setup": {k: v for k, v in asdict(setup).items() if k != "accuracy"},
                        "accuracy_setup": asdict(setup.accuracy), "sections": only, "mlp_tol": MLP_TOL},
              extra={"results": results, "runtimes_s": runtimes, "details": extra,
                     "targets": [{"target": label, "met": ok} for label, ok in targets]})
    print("\n".join(f"target {'met' if ok else 'NOT met'}: {label}" for label, ok in targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
