"""Work for the processes that tests/test_cache.py starts: importable by name in a spawned process.

Each worker fits an estimator with a shared ``memory`` folder, counting its factor computations in a log
file (one line each) and making them slow, so that the workers' fits overlap.
"""

import os
import time

import numpy as np
import torch
from conftest import registry_estimator

import skinfl

_START = None


def start(barrier):
    """Initializer of a worker: one torch thread, and the barrier at which the workers' fits start."""
    global _START
    _START = barrier
    torch.set_num_threads(1)


def fit_with_memory(name, model, X, y, directory, log, delay):
    """Fit ``name`` with ``memory=directory`` once every worker is ready; the fitted estimator's influences
    and self-influences of the first five points."""
    _count_computations(skinfl.registered_estimators()[name], log, delay)
    _START.wait(timeout=120)
    est = registry_estimator(name, model, memory=directory).fit(X, y)
    return np.concatenate([est.influences(X[:5], y[:5]), est.self_influence(X[:5], y[:5])[:, None]], axis=1)


def _count_computations(cls, log, delay):
    """Make ``cls._compute_factors`` write a line to ``log``, then wait ``delay`` seconds, then compute."""
    original = cls.__dict__.get("_uncounted_compute_factors", cls._compute_factors)

    def counting(self, curvature):
        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")
        time.sleep(delay)
        return original(self, curvature)

    cls._uncounted_compute_factors = original
    cls._compute_factors = counting
