"""Data sets and models of the benchmarks, trained once and cached in ``benchmarks/.work/<set>/``.

Imported in skinfl's and in pyDVL's environment: numpy, torch and
scikit-learn only. Every data set is ``data.npz`` (``X_train``, ``y_train``,
``X_test``, ``y_test``, ...); every model a ``state_dict`` (``<problem>.pt``)
with its training summary (``<problem>.json``), so every library loads
identical weights.

- ``speed`` (bench_speed.py): ``load_digits``, ``X / 16``, float32, 1400
  training and 100 test points; models trained by full-batch Adam.
- ``hard`` (bench_solvers.py, bench_grid.py, ekfac_seeds.py): standardised
  digits, 1397 training and 100 test points; models trained in float64 to a
  minimum of mean cross-entropy + ``WEIGHT_DECAY / 2 ||theta||^2``
  (:func:`train_to_minimum`), so that the Hessian plus ``regularization =
  WEIGHT_DECAY`` is the positive definite Hessian of the training objective.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
from _harness import REPO_ROOT, WORK_DIR

SEED = 0
WEIGHT_DECAY = 1e-3
GRADIENT_TOL = 1e-6  # ||grad objective||_2 at which training to a minimum stops
MINIMUM_CHECK_RTOL = 1e-6
MAX_ESCAPES = 30


@dataclass(frozen=True)
class DataSet:
    name: str
    standardised: bool
    n_train: int
    n_test: int
    problems: tuple  # what --only may name
    default_problems: tuple
    batch_size: int = 512  # hard sets: both libraries' batch; divides n_train (pyDVL averages batch means unweighted)
    direct_max_params: int = 10_000  # hard sets: above, the reference is CG at rtol 1e-8, not Direct

    @property
    def work_dir(self):
        return WORK_DIR / self.name


# 1397 = 11 x 127: batches of 127 split the training set evenly.
SETS = {s.name: s for s in (
    DataSet("speed", False, 1400, 100, ("mlp", "cnn", "wide_mlp"), ("mlp", "cnn", "wide_mlp")),
    DataSet("speed_quick", False, 200, 10, ("mlp", "tiny_wide"), ("mlp", "tiny_wide")),
    DataSet("hard", True, 1397, 100, ("mlp", "cnn", "wide_mlp"), ("mlp", "cnn", "wide_mlp"), 127, 10_000),
    DataSet("hard_quick", True, 200, 10, ("mlp", "cnn", "tiny_wide"), ("mlp", "tiny_wide"), 100, 5_000),
)}
ADAM = {"mlp": (500, 1e-2), "cnn": (500, 1e-2), "wide_mlp": (300, 1e-3), "tiny_wide": (300, 3e-3)}  # (steps, lr)


def build(arch):
    """A fresh model of architecture ``arch``."""
    from torch import nn

    def mlp(*widths):
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers[:-1])

    def cnn(first, second):
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, first, 3), nn.Tanh(), nn.Conv2d(first, second, 3),
                             nn.Tanh(), nn.Flatten(), nn.Linear(second * 16, 10))

    return {"mlp": lambda: mlp(64, 32, 10), "wide_mlp": lambda: mlp(64, 256, 256, 10),
            "tiny_wide": lambda: mlp(64, 64, 64, 10), "cnn": lambda: cnn(8, 16), "cnn_small": lambda: cnn(4, 8),
            "logreg": lambda: nn.Linear(64, 10, bias=False), "warmup_mlp": lambda: mlp(64, 4, 10),
            "warmup_cnn": lambda: cnn(2, 2)}[arch]()


def warmup_model(arch, dtype):
    """A small untrained model with the layer types of ``arch``, for a cheap warm-up run."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    model = build(arch if arch == "logreg" else "warmup_cnn" if arch.startswith("cnn") else "warmup_mlp")
    torch.random.set_rng_state(state)
    return model.to(dtype).eval()


def load_model(spec):
    """The model of a task's ``{"arch", "path", "dtype"}`` (eval mode)."""
    import torch

    model = build(spec["arch"]).to(getattr(torch, spec.get("dtype", "float32")))
    model.load_state_dict(torch.load(REPO_ROOT / spec["path"], map_location="cpu", weights_only=True))
    return model.eval()


def model_spec(set_name, problem, dtype="float32"):
    return {"arch": problem, "path": str((SETS[set_name].work_dir / f"{problem}.pt").relative_to(REPO_ROOT)),
            "dtype": dtype}


def data_path(set_name):
    return SETS[set_name].work_dir / "data.npz"


def fingerprint(path):
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def summary(set_name, problem):
    return json.loads((SETS[set_name].work_dir / f"{problem}.json").read_text())


def prepare(spec):
    """Worker entry: write the data set and train its models (once); returns their summaries."""
    import torch

    size = SETS[spec["set"]]
    size.work_dir.mkdir(parents=True, exist_ok=True)
    if not data_path(size.name).exists():
        from sklearn.datasets import load_digits
        from sklearn.preprocessing import StandardScaler

        X, y = load_digits(return_X_y=True)
        y = y.astype(np.int64)
        order = np.random.RandomState(SEED).permutation(len(X))
        train, test = order[:size.n_train], order[size.n_train:size.n_train + size.n_test]
        scale = StandardScaler().fit(X[train]).transform if size.standardised else (lambda x: x / 16.0)
        np.savez(data_path(size.name), X_train=scale(X[train]).astype(np.float32), y_train=y[train],
                 X_test=scale(X[test]).astype(np.float32), y_test=y[test])
    torch.set_num_threads(1)  # training is many small operations: one thread is fastest on a shared machine
    models = {}
    for problem in spec["problems"]:
        path = size.work_dir / f"{problem}.pt"
        if not (path.exists() and path.with_suffix(".json").exists()):
            train = train_to_minimum if size.standardised else train_adam
            record = train(problem, dict(np.load(data_path(size.name))), path)
            record.update(problem=problem, state_dict_sha1=fingerprint(path))
            path.with_suffix(".json").write_text(json.dumps(record, indent=1))
        models[problem] = summary(size.name, problem)
    return {"models": models}


def _accuracies(model, data, dtype):
    import torch

    with torch.no_grad():
        return {f"{part}_accuracy": float((model(torch.as_tensor(data[f"X_{part}"], dtype=dtype)).argmax(1)
                                           == torch.as_tensor(data[f"y_{part}"])).double().mean())
                for part in ("train", "test")}


def train_adam(problem, data, path):
    import torch
    import torch.nn.functional as F

    steps, lr = ADAM[problem]
    X, y = torch.from_numpy(data["X_train"]), torch.from_numpy(data["y_train"])
    torch.manual_seed(SEED)
    model = build(problem)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(X), y).backward()
        optimizer.step()
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        loss = float(F.cross_entropy(model(X), y))
    return {"n_params": sum(p.numel() for p in model.parameters()), "train_loss": loss, "adam_steps": steps,
            "adam_lr": lr, **_accuracies(model.eval(), data, torch.float32)}


# ---------------------------------------------------------------- hard models
def _objective(model, X, y):
    import torch.nn.functional as F

    return F.cross_entropy(model(X), y) + 0.5 * WEIGHT_DECAY * sum((p * p).sum() for p in model.parameters())


def _gradient_norm(model):
    return float(sum((p.grad * p.grad).sum() for p in model.parameters()) ** 0.5)


def hessian_vector_product(model, X, y, weight_decay):
    """``v -> H v`` on flat vectors, ``H`` the Hessian of the mean cross-entropy plus ``weight_decay * I``."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, jvp

    params = {name: p.detach() for name, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]
    gradient = grad(lambda p: F.cross_entropy(functional_call(model, p, (X,)), y))

    def hvp(v):
        parts = {n: t.reshape(p.shape) for (n, p), t in zip(params.items(), torch.split(v, sizes))}
        return torch.cat([t.reshape(-1) for t in jvp(gradient, (params,), (parts,))[1].values()]) + weight_decay * v

    return hvp, sum(sizes)


def top_hessian_eigenvalue(model, X, y, iterations=100):
    """The largest eigenvalue of the mean cross-entropy Hessian, by power iteration (LiSSA's scale)."""
    import torch

    hvp, n = hessian_vector_product(model, X, y, 0.0)
    v = torch.randn(n, generator=torch.Generator().manual_seed(SEED), dtype=next(model.parameters()).dtype)
    value = 0.0
    for _ in range(iterations):
        v = v / torch.linalg.vector_norm(v)
        w = hvp(v)
        value, v = float(v @ w), w
    return value


def minimum_check(model, X, y, rtol=MINIMUM_CHECK_RTOL, max_iter=5000):
    """Plain CG on ``H x = b`` (the objective's Hessian, ``b`` random): ``(iterations, direction)``.

    ``direction`` is None when CG converged, a unit vector with ``p^T H p <= 0``
    when it met negative curvature (a saddle point), or "max_iter".
    """
    import torch

    hvp, n = hessian_vector_product(model, X, y, WEIGHT_DECAY)
    b = torch.randn(n, generator=torch.Generator().manual_seed(SEED), dtype=next(model.parameters()).dtype)
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()
    rr, target = float(r @ r), rtol * float(torch.linalg.vector_norm(b))
    for iteration in range(1, max_iter + 1):
        Ap = hvp(p)
        curvature = float(p @ Ap)
        if curvature <= 0:
            return iteration, p / torch.linalg.vector_norm(p)
        x += rr / curvature * p
        r -= rr / curvature * Ap
        rr, previous = float(r @ r), rr
        if rr**0.5 <= target:
            return iteration, None
        p = r + rr / previous * p
    return max_iter, "max_iter"


def _lbfgs(model, X, y, max_iter=20000):
    """Full-batch LBFGS until ||grad|| < GRADIENT_TOL or no progress in 20 rounds; returns the iterations."""
    import torch

    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=100, history_size=100, tolerance_grad=0.0,
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = _objective(model, X, y)
        value.backward()
        return value

    iterations, best, stalled = 0, float("inf"), 0
    while iterations < max_iter and stalled < 20:
        before = optimizer.state[optimizer._params[0]].get("n_iter", 0)
        optimizer.step(closure)
        iterations += max(optimizer.state[optimizer._params[0]].get("n_iter", 0) - before, 1)
        closure()
        norm = _gradient_norm(model)
        stalled = stalled + 1 if norm >= best else 0
        best = min(best, norm)
        if norm < GRADIENT_TOL:
            break
    return iterations


def train_to_minimum(problem, data, path):
    """Train in float64 to a minimum of the objective: LBFGS, then a CG check of the Hessian.

    LBFGS can stop at a saddle point; if CG meets negative curvature, the
    parameters move along that direction (to the lowest objective on a grid
    of steps) and LBFGS resumes, at most MAX_ESCAPES times. Saved in float64.
    """
    import torch
    import torch.nn.functional as F

    X, y = torch.from_numpy(data["X_train"]).double(), torch.from_numpy(data["y_train"])
    torch.manual_seed(SEED)
    model = build(problem).double()
    params = list(model.parameters())
    start = time.perf_counter()
    iterations, escapes = _lbfgs(model, X, y), []
    while True:
        cg_iterations, direction = minimum_check(model, X, y)
        if direction is None or isinstance(direction, str) or len(escapes) >= MAX_ESCAPES:
            break
        flat = torch.cat([p.detach().reshape(-1) for p in params])

        def assign(vector):
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(vector, params)
                return float(_objective(model, X, y))

        steps = [flat + sign * step * direction for step in torch.logspace(-3, 0.5, 15).tolist() for sign in (1, -1)]
        assign(min(steps, key=assign))
        more = _lbfgs(model, X, y)
        iterations += more
        escapes.append({"found_after_cg_iterations": cg_iterations, "lbfgs_iterations": more})
    model.eval().zero_grad()
    objective = _objective(model, X, y)
    objective.backward()
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(X), y))
    return {"n_params": sum(p.numel() for p in params), "objective": float(objective), "train_loss": train_loss,
            "gradient_norm": _gradient_norm(model), "weight_decay": WEIGHT_DECAY, "lbfgs_iterations": iterations,
            "saddle_escapes": escapes, "training_s": time.perf_counter() - start,
            "minimum_check": {"cg_iterations": cg_iterations, "rtol": MINIMUM_CHECK_RTOL, "result": (
                "converged" if direction is None else "max_iter" if isinstance(direction, str)
                else "negative curvature")},
            "top_hessian_eigenvalue": top_hessian_eigenvalue(model, X, y), **_accuracies(model, data, torch.float64)}
