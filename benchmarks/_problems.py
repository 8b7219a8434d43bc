"""Benchmark problems shared by the speed harness and its workers.

Imported both from skinfl's environment and from pyDVL's virtual environment
(benchmarks/.venv-pydvl), so it depends only on numpy, torch and
scikit-learn, never on skinfl or pyDVL.

Data: scikit-learn's ``load_digits`` scaled to [0, 1] (``X / 16``, float32),
split once with a fixed seed into training and test points. Models are
trained once (Adam, full batch, fixed seed) and their ``state_dict`` cached,
so that every worker, whatever library it runs, loads identical weights.

The accuracy benchmark (accuracy.py) uses only the architectures and the
machine and commit helpers here; its data split and models are its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
WORK_DIR = HERE / ".work"
RESULTS_DIR = HERE / "results"

DATA_SEED = 0
TRAIN_SEED = 0


@dataclass(frozen=True)
class Size:
    """How many training and test points a run uses."""

    name: str
    n_train: int
    n_test: int

    @property
    def work_dir(self) -> Path:
        return WORK_DIR if self.name == "full" else WORK_DIR / self.name


FULL = Size("full", n_train=1400, n_test=100)
QUICK = Size("quick", n_train=200, n_test=10)


@dataclass(frozen=True)
class Problem:
    """A model architecture plus the training recipe that produces its weights."""

    name: str
    description: str
    steps: int
    lr: float
    direct: bool  # whether DirectInfluence (an explicit n_params^2 matrix) is run

    def build(self):
        return _ARCHITECTURES[self.name]()


def _mlp(hidden=32):
    from torch import nn

    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def _cnn(channels=(8, 16)):
    from torch import nn

    first, second = channels
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, first, 3),
        nn.Tanh(),
        nn.Conv2d(first, second, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(second * 4 * 4, 10),
    )


def _wide_mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))


def _tiny_wide():
    from torch import nn

    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


_ARCHITECTURES = {"mlp": _mlp, "cnn": _cnn, "wide_mlp": _wide_mlp, "tiny_wide": _tiny_wide}

PROBLEMS = {
    "mlp": Problem("mlp", "Linear(64,32)-Tanh-Linear(32,10)", steps=500, lr=1e-2, direct=True),
    "cnn": Problem(
        "cnn", "Conv2d(1,8,3)-Tanh-Conv2d(8,16,3)-Tanh-Linear(256,10)", steps=500, lr=1e-2, direct=True
    ),
    "wide_mlp": Problem("wide_mlp", "64-256-256-10 MLP, Tanh", steps=300, lr=1e-3, direct=False),
    # Only in --quick: a small stand-in for wide_mlp (CG only, CG reference).
    "tiny_wide": Problem("tiny_wide", "64-64-64-10 MLP, Tanh", steps=300, lr=3e-3, direct=False),
}

PROBLEMS_BY_SIZE = {"full": ("mlp", "cnn", "wide_mlp"), "quick": ("mlp", "tiny_wide")}


def cpu_count() -> int:
    """Cores this process may run on (what torch.set_num_threads gets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_info(threads, versions) -> dict:
    """CPU, cores, memory and platform of this machine, plus ``versions``."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": cpu_count(),
        "torch_threads": threads,
        "memory": memory,
        "platform": platform.platform(),
        **versions,
    }


def git_state() -> str:
    """Short commit of the repository, flagged when skinfl/ has uncommitted changes."""

    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "skinfl"))
    return f"{commit or 'unknown'}{' (skinfl/ has uncommitted changes)' if dirty else ''}"


# ----------------------------------------------------------------- data
def data_paths(size: Size) -> dict:
    return {key: size.work_dir / f"data_{key}.npy" for key in ("X_train", "y_train", "X_test", "y_test")}


def prepare_data(size: Size) -> dict:
    """Write the fixed split (once) and return the paths of its arrays."""
    paths = data_paths(size)
    if all(path.exists() for path in paths.values()):
        return paths
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.RandomState(DATA_SEED).permutation(len(X))
    n_train, n_test = size.n_train, size.n_test
    if n_train + n_test > len(X):
        raise ValueError(f"{n_train} + {n_test} points requested, digits has {len(X)}.")
    train, test = order[:n_train], order[n_train : n_train + n_test]
    size.work_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"X_train": X[train], "y_train": y[train], "X_test": X[test], "y_test": y[test]}
    for key, array in arrays.items():
        np.save(paths[key], array)
    return paths


def load_data(size: Size) -> dict:
    """The cached split as numpy arrays (call prepare_data first)."""
    return {key: np.load(path) for key, path in data_paths(size).items()}


# ---------------------------------------------------------------- models
def model_path(problem: str, size: Size) -> Path:
    return size.work_dir / f"{problem}_state_dict.pt"


def prepare_model(problem: str, size: Size) -> dict:
    """Train ``problem`` once on the training split and cache its weights.

    Returns a summary (parameter count, final training loss and accuracy,
    test accuracy), also written next to the weights.
    """
    path = model_path(problem, size)
    summary_path = path.with_suffix(".json")
    if path.exists() and summary_path.exists():
        return json.loads(summary_path.read_text())

    import torch
    import torch.nn.functional as F

    spec = PROBLEMS[problem]
    data = load_data(size)
    X = torch.from_numpy(data["X_train"])
    y = torch.from_numpy(data["y_train"])
    torch.manual_seed(TRAIN_SEED)
    model = spec.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    for _ in range(spec.steps):
        optimizer.zero_grad()
        F.cross_entropy(model(X), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(X)
        test_logits = model(torch.from_numpy(data["X_test"]))
        summary = {
            "problem": problem,
            "n_params": sum(p.numel() for p in model.parameters()),
            "train_loss": float(F.cross_entropy(logits, y)),
            "train_accuracy": float((logits.argmax(1) == y).float().mean()),
            "test_accuracy": float(
                (test_logits.argmax(1) == torch.from_numpy(data["y_test"])).float().mean()
            ),
            "adam_steps": spec.steps,
            "adam_lr": spec.lr,
        }
    torch.save(model.state_dict(), path)
    summary["state_dict_sha1"] = fingerprint(path)
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def warmup_model(problem: str):
    """A small untrained model with the layer types of ``problem``, for a cheap warm-up run."""
    import torch

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(TRAIN_SEED)
    model = _cnn(channels=(2, 2)) if problem == "cnn" else _mlp(hidden=4)
    torch.random.set_rng_state(generator_state)
    return model.eval()


def load_model(problem: str, size: Size):
    """The trained model (eval mode), from the cached state_dict."""
    import torch

    model = PROBLEMS[problem].build()
    model.load_state_dict(torch.load(model_path(problem, size), map_location="cpu", weights_only=True))
    model.eval()
    return model


def fingerprint(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]


def matrix_path(problem: str, lib: str, method: str, size: Size) -> Path:
    return size.work_dir / f"{problem}_{lib}_{method}.npy"


# ------------------------------------------------------- hard problems
# The solver benchmark (bench_solvers.py, bench_grid.py) uses models trained
# to a minimum of cross-entropy plus an L2 penalty, so that the Hessian plus
# ``regularization = WEIGHT_DECAY`` is the (positive definite) Hessian of the
# training objective: every solver inverts the same well-posed matrix, and
# plain CG needs hundreds of iterations on it.

WEIGHT_DECAY = 1e-3  # objective: mean cross-entropy + WEIGHT_DECAY / 2 * ||theta||^2
HARD_GRADIENT_TOL = 1e-6  # ||grad objective||_2 (float64) at which training stops
HARD_MAX_ITER = 20000  # LBFGS iterations at most


@dataclass(frozen=True)
class HardSize:
    """Data of the hard problems: standardised digits, and where their files go."""

    name: str
    n_train: int
    n_test: int
    problems: tuple  # what --only may name
    default_problems: tuple  # what runs without --only
    batch_size: int  # both libraries; divides n_train (pyDVL averages per-batch means without weights)
    direct_reference_max_params: int  # larger models get a tight CG reference instead of Direct

    @property
    def work_dir(self) -> Path:
        return WORK_DIR / self.name


# 1397 = 11 x 127: batches of 127 split the training set evenly.
HARD = HardSize(
    "hard", 1397, 100, ("mlp", "cnn", "wide_mlp"), ("mlp", "cnn", "wide_mlp"),
    batch_size=127, direct_reference_max_params=10_000,
)
# --quick: 200 points; tiny_wide (8,970 parameters) stands in for wide_mlp and gets the CG reference;
# the cnn only when named (--only cnn), to keep the smoke test short.
HARD_QUICK = HardSize(
    "hard_quick", 200, 10, ("mlp", "cnn", "tiny_wide"), ("mlp", "tiny_wide"),
    batch_size=100, direct_reference_max_params=5_000,
)
HARD_SIZES = {size.name: size for size in (HARD, HARD_QUICK)}


def prepare_hard_data(size: HardSize) -> dict:
    """Standardised digits split once (fixed seed); the arrays are written once and reused.

    The scaler is fitted on the training points only. Pixels that are constant on
    them stay 0 (scikit-learn leaves their scale at 1).
    """
    paths = data_paths(size)
    if all(path.exists() for path in paths.values()):
        return paths
    from sklearn.datasets import load_digits
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    X, y = digits.data.astype(np.float64), digits.target.astype(np.int64)
    order = np.random.RandomState(DATA_SEED).permutation(len(X))
    if size.n_train + size.n_test > len(X):
        raise ValueError(f"{size.n_train} + {size.n_test} points requested, digits has {len(X)}.")
    train, test = order[: size.n_train], order[size.n_train : size.n_train + size.n_test]
    scaler = StandardScaler().fit(X[train])
    size.work_dir.mkdir(parents=True, exist_ok=True)
    arrays = {
        "X_train": scaler.transform(X[train]).astype(np.float32),
        "y_train": y[train],
        "X_test": scaler.transform(X[test]).astype(np.float32),
        "y_test": y[test],
    }
    for key, array in arrays.items():
        np.save(paths[key], array)
    return paths


def hard_model_path(problem: str, size: HardSize) -> Path:
    return size.work_dir / f"{problem}_state_dict.pt"


def _objective(model, X, y, weight_decay):
    import torch.nn.functional as F

    penalty = sum((p * p).sum() for p in model.parameters())
    return F.cross_entropy(model(X), y) + 0.5 * weight_decay * penalty


def _flat_gradient_norm(model):
    import torch

    return float(torch.sqrt(sum((p.grad * p.grad).sum() for p in model.parameters())))


def _hessian_vector_product(model, X, y, weight_decay):
    """``v -> H v`` on flat float vectors, ``H`` the Hessian of the mean cross-entropy plus the penalty."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, jvp

    params = {name: p.detach() for name, p in model.named_parameters()}
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (X,)), y)

    gradient = grad(loss)

    def hvp(vector):
        parts = {name: t.reshape(shape) for name, t, shape in zip(params, torch.split(vector, sizes), shapes)}
        out = jvp(gradient, (params,), (parts,))[1]
        return torch.cat([t.reshape(-1) for t in out.values()]) + weight_decay * vector

    return hvp, sum(sizes)


def top_hessian_eigenvalue(model, X, y, iterations=100, seed=0):
    """Largest eigenvalue of the mean cross-entropy Hessian (no penalty), by power iteration.

    At a minimum the Hessian plus the penalty is positive definite, so the
    largest-magnitude eigenvalue that power iteration finds is the top one.
    Used to choose LiSSA's ``scale``.
    """
    import torch

    hvp, n = _hessian_vector_product(model, X, y, 0.0)
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=generator, dtype=next(model.parameters()).dtype)
    value = 0.0
    for _ in range(iterations):
        v = v / torch.linalg.vector_norm(v)
        w = hvp(v)
        value = float(v @ w)
        v = w
    return value


def conjugate_gradient_check(model, X, y, weight_decay, rtol=1e-6, max_iter=5000, seed=0):
    """Plain CG on ``H x = b`` (``H`` the Hessian of the training objective, ``b`` random), in the model's dtype.

    Returns ``(iterations, direction)``: ``direction`` is None when CG
    converged to ``rtol`` (``H`` is positive definite on the Krylov space of
    a random vector, which in practice means everywhere), else a unit vector
    ``p`` with ``p^T H p <= 0`` (the point is a saddle, not a minimum) or,
    after ``max_iter``, the string "max_iter".
    """
    import torch

    hvp, n = _hessian_vector_product(model, X, y, weight_decay)
    generator = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=generator, dtype=next(model.parameters()).dtype)
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr, target = float(r @ r), rtol * float(torch.linalg.vector_norm(b))
    for iteration in range(1, max_iter + 1):
        Ap = hvp(p)
        curvature = float(p @ Ap)
        if curvature <= 0:
            return iteration, p / torch.linalg.vector_norm(p)
        alpha = rr / curvature
        x += alpha * p
        r -= alpha * Ap
        rr_new = float(r @ r)
        if rr_new**0.5 <= target:
            return iteration, None
        p = r + (rr_new / rr) * p
        rr = rr_new
    return max_iter, "max_iter"


def _escape_saddle(model, X, y, weight_decay, direction):
    """Move the parameters along a direction of negative curvature, to the lowest objective on a grid of steps."""
    import torch

    params = list(model.parameters())
    start = torch.cat([p.detach().reshape(-1) for p in params])

    def assign(flat):
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(flat[offset:offset + p.numel()].reshape(p.shape))
                offset += p.numel()

    def value(flat):
        assign(flat)
        with torch.no_grad():
            return float(_objective(model, X, y, weight_decay))

    candidates = [start + sign * step * direction for step in torch.logspace(-3, 0.5, 15).tolist() for sign in (1, -1)]
    best = min(candidates, key=value)
    assign(best)


def _train_lbfgs(model, X, y, weight_decay, max_iter):
    """Full-batch LBFGS until ||grad|| < HARD_GRADIENT_TOL (or no progress); returns (iterations, ||grad||)."""
    import torch

    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=100,
        history_size=100,
        tolerance_grad=0.0,  # the loop below decides when to stop, on the 2-norm
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        value = _objective(model, X, y, weight_decay)
        value.backward()
        return value

    iterations, gradient_norm, stalled = 0, float("inf"), 0
    while iterations < max_iter:
        before = optimizer.state[optimizer._params[0]].get("n_iter", 0)
        optimizer.step(closure)
        done = optimizer.state[optimizer._params[0]].get("n_iter", 0)
        iterations += max(done - before, 1)
        closure()
        norm = _flat_gradient_norm(model)
        stalled = stalled + 1 if norm >= gradient_norm else 0
        gradient_norm = min(gradient_norm, norm)
        if norm < HARD_GRADIENT_TOL or stalled >= 20:
            break
    closure()
    return iterations, _flat_gradient_norm(model)


HARD_MAX_ESCAPES = 30  # saddle escapes at most, each followed by more LBFGS
MINIMUM_CHECK_RTOL = 1e-6


def prepare_hard_model(problem: str, size: HardSize) -> dict:
    """Train ``problem`` to a minimum of cross-entropy + L2 (float64, full-batch LBFGS); cache it.

    LBFGS can stop at a saddle point (a vanishing gradient, but the Hessian of
    the objective indefinite). So after it stops, plain CG on the objective's
    Hessian (float64, a random right-hand side, to rtol 1e-6) checks the
    point: if it meets negative curvature, the parameters move along that
    direction to a lower objective and LBFGS resumes, until CG converges.

    Returns a summary (parameters, objective, gradient norm, accuracies,
    iterations, escapes, the CG check, the top Hessian eigenvalue), also
    written next to the weights. The weights are saved in float64; loading
    them into a float32 model rounds them.
    """
    path = hard_model_path(problem, size)
    summary_path = path.with_suffix(".json")
    previous = json.loads(summary_path.read_text()) if path.exists() and summary_path.exists() else None
    if previous is not None and "minimum_check" in previous:
        return previous

    import time

    import torch
    import torch.nn.functional as F

    data = load_data(size)
    X = torch.from_numpy(data["X_train"]).double()
    y = torch.from_numpy(data["y_train"])
    torch.manual_seed(TRAIN_SEED)
    model = _ARCHITECTURES[problem]().double()
    start = time.perf_counter()
    if previous is None:
        iterations, _ = _train_lbfgs(model, X, y, WEIGHT_DECAY, HARD_MAX_ITER)
    else:  # trained before the check existed: check (and continue from) those weights
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        iterations = previous["lbfgs_iterations"]
    escapes = []
    while True:
        check_start = time.perf_counter()
        cg_iterations, direction = conjugate_gradient_check(model, X, y, WEIGHT_DECAY, rtol=MINIMUM_CHECK_RTOL)
        check = {"cg_iterations": cg_iterations, "rtol": MINIMUM_CHECK_RTOL, "seconds": time.perf_counter() - check_start,
                 "result": "converged" if direction is None else (
                     "max_iter" if isinstance(direction, str) else "negative curvature")}
        if direction is None or isinstance(direction, str) or len(escapes) >= HARD_MAX_ESCAPES:
            break
        _escape_saddle(model, X, y, WEIGHT_DECAY, direction)
        more, norm = _train_lbfgs(model, X, y, WEIGHT_DECAY, HARD_MAX_ITER)
        iterations += more
        escapes.append({"found_after_cg_iterations": cg_iterations, "lbfgs_iterations": more, "gradient_norm": norm})
    seconds = time.perf_counter() - start + (previous or {}).get("training_s", 0.0)
    model.eval()
    model.zero_grad()
    _objective(model, X, y, WEIGHT_DECAY).backward()
    with torch.no_grad():
        logits = model(X)
        test_logits = model(torch.from_numpy(data["X_test"]).double())
        summary = {
            "problem": problem,
            "n_params": sum(p.numel() for p in model.parameters()),
            "n_train": len(X),
            "objective": float(_objective(model, X, y, WEIGHT_DECAY)),
            "train_loss": float(F.cross_entropy(logits, y)),
            "gradient_norm": _flat_gradient_norm(model),
            "gradient_tol": HARD_GRADIENT_TOL,
            "weight_decay": WEIGHT_DECAY,
            "lbfgs_iterations": iterations,
            "saddle_escapes": escapes,
            "minimum_check": check,
            "training_s": seconds,
            "train_accuracy": float((logits.argmax(1) == y).double().mean()),
            "test_accuracy": float(
                (test_logits.argmax(1) == torch.from_numpy(data["y_test"])).double().mean()
            ),
        }
    summary["top_hessian_eigenvalue"] = top_hessian_eigenvalue(model, X, y)
    if previous is None or escapes:  # else the weights on disk are these (and keep their fingerprint)
        torch.save(model.state_dict(), path)
    summary["state_dict_sha1"] = fingerprint(path)
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def load_hard_model(problem: str, size: HardSize, dtype=None):
    """The trained model (eval mode) in ``dtype`` (default float32)."""
    import torch

    model = _ARCHITECTURES[problem]().to(dtype or torch.float32)
    state = torch.load(hard_model_path(problem, size), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
