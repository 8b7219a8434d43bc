"""A sweep over ``regularization`` with and without DirectInfluence's curvature cache.

Usage::

    python benchmarks/bench_regularization_sweep.py

On 1000 digits (``X / 16``, float64) an MLP 64-32-10 and a CNN
Conv(1,4,3)-Tanh-Conv(4,8,3)-Tanh-Linear(128,10) are trained with
:class:`skinfl.retraining.TorchRetrainer`; then, for seven values of
``regularization`` (1e-3 to 1 in half-decades), ``DirectInfluence`` is fitted
and scores 100 query points, once without ``memory`` and once with a fresh
cache directory. Writes ``benchmarks/results/regularization_sweep.{json,md}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import _problems as P  # noqa: E402
from skinfl import DirectInfluence  # noqa: E402
from skinfl.retraining import TorchRetrainer  # noqa: E402

GRID = tuple(float(10.0 ** (k / 2)) for k in range(-6, 1))
N_TRAIN, N_QUERY = 1000, 100


def sweep(model, X, y, X_query, y_query, memory):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the smallest value is indefinite on these models: warned, expected
        for regularization in GRID:
            DirectInfluence(model, regularization=regularization, memory=memory).fit(X, y).influences(X_query, y_query)
    return time.perf_counter() - start


def main():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    X, y, X_query, y_query = X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:N_TRAIN + N_QUERY], y[N_TRAIN:N_TRAIN + N_QUERY]
    architectures = {"mlp": P._mlp(32), "cnn": P._cnn(channels=(4, 8))}
    rows = []
    for name, architecture in architectures.items():
        model = TorchRetrainer(architecture.double(), epochs=200, weight_decay=1e-3, random_state=0)(X, y)
        n_params = sum(p.numel() for p in model.parameters())
        without = sweep(model, X, y, X_query, y_query, memory=None)
        with tempfile.TemporaryDirectory() as directory:
            cached = sweep(model, X, y, X_query, y_query, memory=directory)
        rows.append({"model": name, "n_params": n_params, "n_values": len(GRID),
                     "without_memory_s": without, "with_memory_s": cached, "speedup": without / cached})
        print(f"{name}: {n_params} parameters, {len(GRID)} values: {without:.1f} s without memory, "
              f"{cached:.1f} s with memory ({without / cached:.1f}x)", flush=True)

    versions = {"torch": torch.__version__, "numpy": np.__version__}
    record = {"machine": P.machine_info(torch.get_num_threads(), versions), "git": P.git_state(),
              "grid": GRID, "rows": rows}
    P.RESULTS_DIR.mkdir(exist_ok=True)
    (P.RESULTS_DIR / "regularization_sweep.json").write_text(json.dumps(record, indent=2, default=str))
    lines = ["| model | params | values | without memory s | with memory s | speedup |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['n_params']:,} | {r['n_values']} | {r['without_memory_s']:.1f} | "
              f"{r['with_memory_s']:.1f} | {r['speedup']:.1f}x |" for r in rows]
    (P.RESULTS_DIR / "regularization_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
