"""One measurement of ``bench_memory.py``, in a fresh process.

Started by ``bench_memory.py`` with ``PYTHONPATH`` pointing at the skinfl to
measure (a git worktree of the old commit, or the repository root)::

    python _memory_worker.py prepare SPEC_JSON   # data files and trained weights (no skinfl)
    python _memory_worker.py run SPEC_JSON       # one measurement; prints "RESULT {json}"

``SPEC_JSON`` is a JSON object (see ``bench_memory.py``). Nothing heavy is
imported at module level, so that ``bench_memory.py`` can import the
constants without loading torch.

Peak memory of a call: ``gc.collect()`` and ``malloc_trim(0)`` (so that
memory freed by earlier work is given back to the kernel rather than kept
by the allocator, where the call could reuse it unseen), then writing ``5``
to ``/proc/self/clear_refs``, which resets the process's high-water RSS
(``VmHWM``) to its current RSS (``VmRSS``); after the call, ``VmHWM`` minus
that baseline is the most the call added at any moment. Where
``/proc/self/clear_refs`` cannot be written, the lifetime peak
``getrusage(RUSAGE_SELF).ru_maxrss`` is used instead (an upper bound, said so
in the results).
"""

from __future__ import annotations

import ctypes
import gc
import json
import resource
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------ settings
SEED = 0

# Row 1: self-influence of many points with a ~7,500-parameter MLP.
SELF_FEATURES, SELF_HIDDEN, SELF_CLASSES = 64, 100, 10
# Row 2: a training set kept in a numpy.memmap.
MEMMAP_FEATURES, MEMMAP_HIDDEN, MEMMAP_CLASSES = 32, 4, 10
MEMMAP_TRAIN_FOR_MODEL = 20_000  # points the row-2 model is trained on (the first ones of the memmap)
# Rows 3 and 4: digits.
DIGITS_HIDDEN = 32


# -------------------------------------------------------------------- memory
def _status():
    """``VmRSS`` and ``VmHWM`` of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _ru_maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class PeakMeter:
    """Peak RSS added by a stretch of code (see the module docstring)."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = (
                "ru_maxrss (fallback: /proc/self/clear_refs not writable; lifetime peak, an upper bound)"
            )
        self.baseline = None

    @property
    def can_reset(self):
        return self.method.startswith("VmHWM")

    def reset(self):
        """Collect garbage, return freed memory, reset the high-water mark; returns the baseline RSS."""
        gc.collect()
        _malloc_trim()
        if self.can_reset:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        self.baseline = _status()["VmRSS"]
        return self.baseline

    def peak(self, baseline=None):
        """Highest RSS since the last reset, minus ``baseline`` (default: the reset's)."""
        baseline = self.baseline if baseline is None else baseline
        high = _status()["VmHWM"] if self.can_reset else _ru_maxrss()
        return high - baseline


def measure(meter, function, baseline=None):
    """``(result, seconds, peak bytes added)`` of ``function()``."""
    meter.reset()
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    return result, seconds, meter.peak(baseline)


# ---------------------------------------------------------------- data files
def paths(work):
    work = Path(work)
    return {
        "self_X": work / "self_X.npy",
        "self_y": work / "self_y.npy",
        "self_model": work / "self_model.pt",
        "memmap_X": work / "memmap_X.npy",
        "memmap_y": work / "memmap_y.npy",
        "memmap_test_X": work / "memmap_test_X.npy",
        "memmap_test_y": work / "memmap_test_y.npy",
        "memmap_model": work / "memmap_model.pt",
        "digits_model": work / "digits_model.pt",
        "summary": work / "prepared.json",
    }


def _mlp(n_in, hidden, n_out):
    from torch import nn

    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def _train(model, X, y, epochs, lr, batch_size, weight_decay=0.0, polish=False):
    """Adam on mini-batches (fixed seed), cross-entropy plus an optional L2 penalty, optionally polished
    by full-batch L-BFGS on the same objective; returns the final training loss and accuracy."""
    import torch
    import torch.nn.functional as F

    X, y = torch.as_tensor(X), torch.as_tensor(y)
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=generator)
        for start in range(0, len(X), batch_size):
            rows = order[start : start + batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(X[rows]), y[rows]).backward()
            optimizer.step()
    if polish:
        lbfgs = torch.optim.LBFGS(
            model.parameters(),
            lr=1,
            max_iter=500,
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def objective():
            lbfgs.zero_grad()
            value = F.cross_entropy(model(X), y)
            value = value + weight_decay / 2 * sum((p * p).sum() for p in model.parameters())
            value.backward()
            return value

        lbfgs.step(objective)
    model.eval()
    with torch.no_grad():
        logits = model(X)
        return {
            "train_loss": float(F.cross_entropy(logits, y)),
            "train_accuracy": float((logits.argmax(1) == y).float().mean()),
        }


def digits():
    """``load_digits``: ``X / 16`` in float32, labels int64, in a fixed random order."""
    import numpy as np
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.RandomState(SEED).permutation(len(X))
    return (X[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def prepare(spec):
    """Write the data and train the three models once (skipped where the files exist)."""
    import numpy as np
    import torch
    from sklearn.datasets import make_classification

    torch.set_num_threads(spec["threads"])
    p = paths(spec["work"])
    Path(spec["work"]).mkdir(parents=True, exist_ok=True)
    summary = json.loads(p["summary"].read_text()) if p["summary"].exists() else {}
    n_self, n_memmap, n_memmap_test = spec["n_self"], spec["n_memmap"], spec["n_memmap_test"]

    n_fit = spec["n_self_fit"]
    if (
        summary.get("self", {}).get("n") != n_self
        or summary["self"].get("n_fit") != n_fit
        or not p["self_model"].exists()
    ):
        X, y = make_classification(
            n_samples=n_self,
            n_features=SELF_FEATURES,
            n_informative=32,
            n_redundant=8,
            n_classes=SELF_CLASSES,
            n_clusters_per_class=1,
            class_sep=1.5,
            random_state=SEED,
        )
        X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
        y = y.astype(np.int64)
        np.save(p["self_X"], X)
        np.save(p["self_y"], y)
        # Trained (close to a minimum, with a small L2 penalty) on the points the estimators are fitted
        # on, so that their Hessian plus regularization is positive definite and Direct factorises by
        # Cholesky, as on a well-trained model.
        torch.manual_seed(SEED)
        model = _mlp(SELF_FEATURES, SELF_HIDDEN, SELF_CLASSES)
        info = _train(
            model, X[:n_fit], y[:n_fit], epochs=300, lr=1e-2, batch_size=n_fit, weight_decay=1e-3, polish=True
        )
        with torch.no_grad():
            held = model(torch.from_numpy(X[n_fit:])).argmax(1).numpy()
        torch.save(model.state_dict(), p["self_model"])
        summary["self"] = {
            "n": n_self,
            "n_fit": n_fit,
            "n_params": sum(t.numel() for t in model.parameters()),
            "training": f"on the first {n_fit} points: 300 full-batch Adam steps (lr 1e-2, "
            "weight decay 1e-3), then L-BFGS on the same objective",
            "accuracy_other_points": float((held == y[n_fit:]).mean()) if n_fit < n_self else None,
            **info,
        }

    if summary.get("memmap", {}).get("n") != n_memmap or not p["memmap_model"].exists():
        n_all = n_memmap + n_memmap_test
        # Labels from a fixed random teacher network, so the data need not be built in memory at once.
        rng = np.random.RandomState(SEED)
        teacher = rng.standard_normal((MEMMAP_FEATURES, MEMMAP_CLASSES)).astype(np.float32)
        X_map = np.lib.format.open_memmap(
            p["memmap_X"], mode="w+", dtype=np.float32, shape=(n_memmap, MEMMAP_FEATURES)
        )
        y_map = np.lib.format.open_memmap(p["memmap_y"], mode="w+", dtype=np.int64, shape=(n_memmap,))
        tests_X, tests_y = [], []
        chunk = 100_000
        for start in range(0, n_all, chunk):
            stop = min(start + chunk, n_all)
            x = rng.standard_normal((stop - start, MEMMAP_FEATURES)).astype(np.float32)
            logits = x @ teacher + rng.gumbel(size=(stop - start, MEMMAP_CLASSES)).astype(np.float32)
            labels = logits.argmax(1).astype(np.int64)
            train_stop = min(stop, n_memmap)
            if start < n_memmap:
                X_map[start:train_stop] = x[: train_stop - start]
                y_map[start:train_stop] = labels[: train_stop - start]
            if stop > n_memmap:
                tests_X.append(x[max(0, n_memmap - start) :])
                tests_y.append(labels[max(0, n_memmap - start) :])
        X_map.flush()
        y_map.flush()
        np.save(p["memmap_test_X"], np.concatenate(tests_X))
        np.save(p["memmap_test_y"], np.concatenate(tests_y))
        torch.manual_seed(SEED)
        model = _mlp(MEMMAP_FEATURES, MEMMAP_HIDDEN, MEMMAP_CLASSES)
        n_model = min(MEMMAP_TRAIN_FOR_MODEL, n_memmap)
        info = _train(
            model, np.array(X_map[:n_model]), np.array(y_map[:n_model]), epochs=5, lr=1e-2, batch_size=256
        )
        del X_map, y_map
        torch.save(model.state_dict(), p["memmap_model"])
        summary["memmap"] = {
            "n": n_memmap,
            "n_test": n_memmap_test,
            "n_params": sum(t.numel() for t in model.parameters()),
            "training": f"Adam lr 1e-2, 5 epochs, mini-batches of 256, on the first {n_model} points",
            "file_mb": (p["memmap_X"].stat().st_size + p["memmap_y"].stat().st_size) / 2**20,
            **info,
        }

    if "digits" not in summary or not p["digits_model"].exists():
        X, y = digits()
        torch.manual_seed(SEED)
        model = _mlp(64, DIGITS_HIDDEN, 10)
        info = _train(model, X[:1000], y[:1000], epochs=200, lr=1e-2, batch_size=1000)
        torch.save(model.state_dict(), p["digits_model"])
        summary["digits"] = {
            "n_params": sum(t.numel() for t in model.parameters()),
            "training": "Adam lr 1e-2, 200 full-batch epochs on the first 1000 points",
            **info,
        }
    p["summary"].write_text(json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------- measurements
def _rss_split():
    """Current anonymous and file-backed RSS in bytes (a memmap's pages are file-backed)."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _load_model(path, n_in, hidden, n_out):
    import torch

    model = _mlp(n_in, hidden, n_out)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _accepts(estimator, name):
    return name in estimator.get_params()


def _estimator(spec, model, **params):
    """The estimator of ``spec["estimator"]`` with ``params``.

    ``random_state`` and ``memory`` are set only where the estimator accepts them (``get_params``).
    """
    from skinfl import CgInfluence, DirectInfluence

    cls = {"direct": DirectInfluence, "cg": CgInfluence}[spec["estimator"]]
    optional = {key: params.pop(key) for key in ("random_state", "memory") if key in params}
    estimator = cls(model, **params)
    accepted = {key: value for key, value in optional.items() if _accepts(estimator, key)}
    estimator.set_params(**accepted)
    return estimator, sorted(set(optional) - set(accepted))


class _Warnings:
    """Collects warnings (category and the start of the message), counted."""

    def __init__(self):
        import warnings

        self._catcher = warnings.catch_warnings(record=True)

    def __enter__(self):
        import warnings

        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)

    def summary(self):
        """By category: how many, and the first and last messages."""
        found = {}
        for record in self._records:
            entry = found.setdefault(
                record.category.__name__, {"count": 0, "first": str(record.message)[:400]}
            )
            entry["count"] += 1
            entry["last"] = str(record.message)[:400]
        return found


def run_self_influence(spec, meter):
    """Row 1: peak of ``fit`` on the fit subset, then of ``self_influence`` of all the points."""
    import numpy as np

    p = paths(spec["work"])
    X, y = np.load(p["self_X"])[: spec["n_self"]], np.load(p["self_y"])[: spec["n_self"]]
    model = _load_model(p["self_model"], SELF_FEATURES, SELF_HIDDEN, SELF_CLASSES)
    params = {"regularization": 1e-2, "random_state": 0}
    if spec["estimator"] == "cg":
        params.update(rtol=1e-4, max_iter=spec["cg_max_iter"])
    estimator, dropped = _estimator(spec, model, **params)
    n_fit = spec["n_fit"]
    out = {
        "n_self": len(X),
        "n_fit": n_fit,
        "n_params": sum(t.numel() for t in model.parameters()),
        "params_not_accepted": dropped,
    }
    with _Warnings() as caught:
        _, out["fit_s"], out["fit_peak"] = measure(meter, lambda: estimator.fit(X[:n_fit], y[:n_fit]))
        out["baseline_rss"] = meter.reset()
        values, out["call_s"], out["call_peak"] = measure(meter, lambda: estimator.self_influence(X, y))
    out["rss_split_after_call"] = _rss_split()
    out["solver"] = getattr(estimator, "solver_", None)
    out["result_head"] = [float(v) for v in np.asarray(values)[:3]]
    out["warnings"] = caught.summary()
    return out


def run_memmap(spec, meter):
    """Row 2: fit on the memmap, then the calls; peaks over the RSS after imports and model creation."""
    import numpy as np

    p = paths(spec["work"])
    X = np.load(p["memmap_X"], mmap_mode="r")[: spec["n_memmap"]]
    y = np.load(p["memmap_y"], mmap_mode="r")[: spec["n_memmap"]]
    X_test, y_test = np.load(p["memmap_test_X"]), np.load(p["memmap_test_y"])
    model = _load_model(p["memmap_model"], MEMMAP_FEATURES, MEMMAP_HIDDEN, MEMMAP_CLASSES)
    estimator, dropped = _estimator(
        spec, model, regularization=1e-2, batch_size=spec["batch_size"], random_state=0
    )
    out = {
        "n_train": len(X),
        "n_test": len(X_test),
        "is_memmap": isinstance(X, np.memmap),
        "n_params": sum(t.numel() for t in model.parameters()),
        "params_not_accepted": dropped,
        "calls": {},
    }
    start_rss = meter.reset()  # after imports, data references and model creation
    out["start_rss"] = start_rss
    with _Warnings() as caught:
        _, out["fit_s"], out["fit_peak"] = measure(meter, lambda: estimator.fit(X, y), baseline=start_rss)
        out["rss_after_fit"] = _status()["VmRSS"]
        out["rss_split_after_fit"] = _rss_split()
        for call in spec["calls"]:
            if call == "influences_dense":
                function = lambda: estimator.influences(X_test, y_test)
            elif call == "top_influences":
                if not hasattr(estimator, "top_influences"):
                    out["calls"][call] = {"status": "n/a (not in this version)"}
                    continue
                function = lambda: estimator.top_influences(X_test, y_test, k=10)
            elif call == "influences_out":
                if "out" not in __import__("inspect").signature(estimator.influences).parameters:
                    out["calls"][call] = {"status": "n/a (not in this version)"}
                    continue
                target = Path(spec["work"]) / "influences_out.npy"
                result = np.lib.format.open_memmap(
                    target, mode="w+", dtype=np.float32, shape=(len(X_test), len(X))
                )
                function = lambda result=result: estimator.influences(X_test, y_test, out=result)
            else:
                raise ValueError(call)
            record = {"status": "ok"}
            value, record["call_s"], record["call_peak"] = measure(meter, function)
            record["peak_over_start"] = meter.peak(start_rss)
            record["rss_split_after_call"] = _rss_split()
            if call == "top_influences":
                record["result"] = f"indices {tuple(value[0].shape)}, values {tuple(value[1].shape)}"
            else:
                record["result"] = f"{type(value).__name__} {tuple(value.shape)} {value.dtype}"
            del value
            if call == "influences_out":
                del result, function
                gc.collect()
                target.unlink(missing_ok=True)
            out["calls"][call] = record
    out["warnings"] = caught.summary()
    return out


def _digits_model(spec):
    return _load_model(paths(spec["work"])["digits_model"], 64, DIGITS_HIDDEN, 10)


def _warm_up(spec, model, X, y):
    """A small fit and score, so that one-time costs (lazy imports, first use of torch.func) are not timed."""
    estimator, _ = _estimator(spec, model, regularization=1.0, random_state=0)
    estimator.fit(X[:64], y[:64]).score(X[64:128], y[64:128])


def run_search(spec, meter):
    """Row 3: one candidate (fit + score on the first split, no memory), then the searches."""
    import tempfile

    import numpy as np
    from sklearn.model_selection import GridSearchCV, KFold

    X, y = digits()
    X, y = X[: spec["n_digits"]], y[: spec["n_digits"]]
    model = _digits_model(spec)
    grid = np.logspace(-4, 1, 8)
    cv = KFold(n_splits=3)
    base = {"random_state": 0}
    if spec["estimator"] == "cg":
        base.update(rtol=1e-4, max_iter=spec["cg_max_iter"])
    out = {
        "n_samples": len(X),
        "n_params": sum(t.numel() for t in model.parameters()),
        "grid": grid.tolist(),
        "searches": {},
    }
    with _Warnings() as caught:
        _warm_up(spec, model, X, y)
        train, test = next(cv.split(X))
        out["split_sizes"] = [len(train), len(test)]
        estimator, out["params_not_accepted"] = _estimator(
            spec, model, regularization=spec["candidate_regularization"], **base
        )
        start = time.perf_counter()
        estimator.fit(X[train], y[train])
        middle = time.perf_counter()
        out["candidate_score"] = estimator.score(X[test], y[test])
        end = time.perf_counter()
        out["candidate_fit_s"], out["candidate_score_s"] = middle - start, end - middle
        out["candidate_s"] = end - start
        out["candidate_regularization"] = spec["candidate_regularization"]
        for name in spec["searches"]:
            with tempfile.TemporaryDirectory(dir=spec["work"]) as directory:
                params = dict(base, regularization=1e-2)
                if name == "memory":
                    params["memory"] = directory
                estimator, dropped = _estimator(spec, model, **params)
                if "memory" in dropped:
                    out["searches"][name] = {"status": "n/a (no memory parameter in this version)"}
                    continue
                search = GridSearchCV(
                    estimator, {"regularization": grid}, cv=cv, refit=False, n_jobs=1, error_score="raise"
                )
                with _Warnings() as in_search:
                    start = time.perf_counter()
                    search.fit(X, y)
                    seconds = time.perf_counter() - start
                results = search.cv_results_
                out["searches"][name] = {
                    "status": "ok",
                    "search_s": seconds,
                    "mean_fit_s": results["mean_fit_time"].tolist(),
                    "mean_score_s": results["mean_score_time"].tolist(),
                    "mean_test_score": results["mean_test_score"].tolist(),
                    "best_regularization": float(search.best_params_["regularization"]),
                    "warnings": in_search.summary(),
                }
    out["warnings"] = caught.summary()
    return out


def run_score(spec, meter):
    """Row 4: time (and peak memory) of ``score`` on held-out sets of several sizes."""
    import numpy as np

    X, y = digits()
    n_fit = spec["n_fit"]
    held_out = np.random.RandomState(SEED).permutation(np.arange(n_fit, len(X)))
    model = _digits_model(spec)
    out = {"n_fit": n_fit, "n_held_out_distinct": len(held_out), "sizes": {}}
    with _Warnings() as caught:
        _warm_up(spec, model, X, y)
        estimator, out["params_not_accepted"] = _estimator(spec, model, regularization=1e-2, random_state=0)
        estimator.fit(X[:n_fit], y[:n_fit])
        for size in spec["sizes"]:
            rows = np.resize(held_out, size)  # repeats the held-out points beyond their number
            times, peaks = [], []
            for _ in range(spec["repeats"]):
                value, seconds, peak = measure(meter, lambda rows=rows: estimator.score(X[rows], y[rows]))
                times.append(seconds)
                peaks.append(peak)
            out["sizes"][str(size)] = {
                "score": value,
                "seconds": min(times),
                "all_seconds": times,
                "peak": max(peaks),
            }
    out["warnings"] = caught.summary()
    return out


TASKS = {"self_influence": run_self_influence, "memmap": run_memmap, "search": run_search, "score": run_score}


def _versions():
    import numpy as np
    import sklearn
    import torch

    import skinfl

    return {
        "skinfl_file": skinfl.__file__,
        "skinfl_version": getattr(skinfl, "__version__", "?"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv):
    command, spec = argv[1], json.loads(argv[2])
    if command == "prepare":
        print("RESULT " + json.dumps(prepare(spec)), flush=True)
        return 0
    import torch

    torch.set_num_threads(spec["threads"])
    meter = PeakMeter()
    record = {
        "task": spec["task"],
        "side": spec.get("side"),
        "estimator": spec.get("estimator"),
        "memory_method": meter.method,
    }
    try:
        record.update(_versions())
        record.update(TASKS[spec["task"]](spec, meter))
        record["status"] = "ok"
    except Exception:  # noqa: BLE001  (reported to the harness, which prints it)
        record["status"] = "error"
        record["traceback"] = traceback.format_exc()
    record["ru_maxrss"] = _ru_maxrss()
    print("RESULT " + json.dumps(record, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
