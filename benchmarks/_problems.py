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
