"""pyDVL's influences for the accuracy benchmarks (started by accuracy.py and loo_logreg.py).

    benchmarks/.venv-pydvl/bin/python benchmarks/_pydvl_accuracy.py JOB.json

``JOB.json`` names the work folder (holding ``data.npz`` and one
``<model>.pt`` state_dict per model, written by accuracy.py) and a list of
tasks. A task fits one pyDVL estimator (``direct`` or ``cg``; or, when the task
has ``settings``, one of bench_solvers.py's methods built as
_solver_worker.py builds them) on one model
and its training data, then computes, for each requested output, either the
influence matrix of a query set (``val`` or ``test``) or the self-influence
of every training point (``self``), at a given regularization; the
estimator is refitted only once, ``with_regularization`` changes it between
outputs. A task with ``"library": "kronfluence"`` runs kronfluence's EK-FAC
instead (_kronfluence.py, installed in the same venv; query sets at one
regularization only). Each output is saved as ``.npy`` in the work folder;
timings and any warnings go to ``<JOB>.result.json``.

This file imports only the standard library, ``_problems`` and (inside
functions) numpy, torch and pyDVL, so that accuracy.py can import
:func:`build_model` from skinfl's environment.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _problems as P  # noqa: E402

# pyDVL's CG stops at ||r|| < max(rtol**2 ||b||, atol**2): rtol=1e-2 asks for
# skinfl's default ||r|| <= 1e-4 ||b||; atol**2 = 1e-20 disables the floor.
PYDVL_CG_RTOL = 1e-2
PYDVL_CG_ATOL = 1e-10
PYDVL_CG_MAX_ITER = 1000
# Self-influence (the diagonal of the training x training matrix) is taken
# from pyDVL's symmetric influences of chunks of this many training points.
SELF_INFLUENCE_CHUNK = 200


def build_model(name):
    """The float64 architecture ``name`` (weights are loaded from the state_dict)."""
    import torch
    from torch import nn

    if name == "logreg":
        model = nn.Linear(64, 10, bias=False)
    elif name in ("mlp", "mlp_noisy"):
        model = P._mlp(hidden=32)
    elif name == "cnn":
        model = P._cnn(channels=(4, 8))
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.to(torch.float64)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}"[:300])


def _warm_up():
    """Small Direct and CG runs first, so that one-time costs (lazy imports, torch's first use of
    forward-mode autodiff) are not in the timings."""
    import torch
    import torch.nn.functional as F
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import CgInfluence, DirectInfluence
    from torch.utils.data import DataLoader, TensorDataset

    model = P._mlp(hidden=4).to(torch.float64).eval()
    X = torch.rand(10, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10)
    loader = DataLoader(TensorDataset(X, y), batch_size=5)
    for estimator in (
        DirectInfluence(model, F.cross_entropy, regularization=1.0),
        CgInfluence(model, F.cross_entropy, regularization=1.0, solve_simultaneously=True),
    ):
        estimator.fit(loader)
        estimator.influences(X[:2], y[:2], X, y, mode=InfluenceMode.Up)
        estimator.influences(X[:2], y[:2], mode=InfluenceMode.Up)


def _run_task(task, work, data):
    if task.get("library") == "kronfluence":
        return _run_kronfluence_task(task, work, data)
    import numpy as np
    import torch
    import torch.nn.functional as F
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import CgInfluence, DirectInfluence
    from torch.utils.data import DataLoader, TensorDataset

    model = build_model(task["model"])
    model.load_state_dict(torch.load(work / f"{task['model']}.pt", map_location="cpu", weights_only=True))
    model.eval()
    X = torch.from_numpy(data["X_train"])
    y = torch.from_numpy(data[task["labels"]])
    batch_size = task["batch_size"]
    if len(X) % batch_size:
        raise ValueError(
            f"batch size {batch_size} must divide n_train={len(X)}: pyDVL's CG averages per-batch mean "
            "Hessians without weights, so an uneven last batch would change the Hessian."
        )
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=False)
    outputs = task["outputs"]
    first = outputs[0]["regularization"]
    if "settings" in task:
        # The solver benchmark's methods (loo_logreg.py): the same constructors as bench_solvers.py.
        estimator = _solver_benchmark_estimator(task, model, first)
    elif task["method"] == "direct":
        estimator = DirectInfluence(model, F.cross_entropy, regularization=first)
    else:
        estimator = CgInfluence(
            model,
            F.cross_entropy,
            regularization=first,
            rtol=PYDVL_CG_RTOL,
            atol=PYDVL_CG_ATOL,
            maxiter=PYDVL_CG_MAX_ITER,
            solve_simultaneously=True,
        )

    collector = _Collect()
    logging.getLogger().addHandler(collector)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            estimator.fit(loader)
            fit_s = time.perf_counter() - start
            records = []
            current = first
            for output in outputs:
                if output["regularization"] != current:
                    current = output["regularization"]
                    estimator = estimator.with_regularization(current)
                start = time.perf_counter()
                if output["query"] == "self":
                    values = []
                    for chunk in range(0, len(X), SELF_INFLUENCE_CHUNK):
                        rows = slice(chunk, chunk + SELF_INFLUENCE_CHUNK)
                        block = estimator.influences(X[rows], y[rows], mode=InfluenceMode.Up)
                        values.append(torch.diagonal(block))
                    result = torch.cat(values)
                else:
                    X_query = torch.from_numpy(data[f"X_{output['query']}"])
                    y_query = torch.from_numpy(data[f"y_{output['query']}"])
                    result = estimator.influences(X_query, y_query, X, y, mode=InfluenceMode.Up)
                seconds = time.perf_counter() - start
                array = result.detach().cpu().numpy().astype(np.float64)
                np.save(work / output["file"], array)
                records.append({**output, "seconds": seconds, "finite": bool(np.isfinite(array).all())})
    finally:
        logging.getLogger().removeHandler(collector)
    messages = [f"{w.category.__name__}: {w.message}"[:300] for w in caught] + collector.messages
    return {
        "name": task["name"],
        "fit_s": fit_s,
        "outputs": records,
        "settings": task.get("settings") or {
            "dataloader_batch_size": batch_size,
            **(
                {
                    "rtol": PYDVL_CG_RTOL,
                    "atol": PYDVL_CG_ATOL,
                    "maxiter": PYDVL_CG_MAX_ITER,
                    "solve_simultaneously": True,
                }
                if task["method"] == "cg"
                else {}
            ),
        },
        "warnings": sorted(set(messages)),
    }


def _run_kronfluence_task(task, work, data):
    """kronfluence's EK-FAC (``task["settings"]``: batch_size, fisher) on one model, after a small warm-up run.

    Its factor and score files go to a temporary folder in the work folder, removed afterwards.
    """
    import shutil
    import tempfile

    import numpy as np
    import torch

    import _kronfluence as K

    model = build_model(task["model"])
    model.load_state_dict(torch.load(work / f"{task['model']}.pt", map_location="cpu", weights_only=True))
    model.eval()
    X = torch.from_numpy(data["X_train"])
    y = torch.from_numpy(data[task["labels"]])
    settings, outputs = task["settings"], task["outputs"]
    if len({o["regularization"] for o in outputs}) != 1 or any(o["query"] == "self" for o in outputs):
        raise ValueError("kronfluence tasks: query sets (val, test) at one regularization only")
    scratch = Path(tempfile.mkdtemp(prefix="kronfluence_", dir=work))
    collector = _Collect()
    logging.getLogger().addHandler(collector)
    try:
        warm_model = P._mlp(hidden=4).to(torch.float64).eval()
        X_warm = torch.rand(10, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        y_warm = torch.arange(10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warm = K.KronfluenceEkfac(warm_model, regularization=1.0, batch_size=5, work_dir=scratch,
                                      fisher=settings["fisher"], name="warmup")
            warm.fit(X_warm, y_warm).influences(X_warm[:2], y_warm[:2])
        estimator = K.KronfluenceEkfac(model, regularization=outputs[0]["regularization"],
                                       batch_size=settings["batch_size"], work_dir=scratch,
                                       fisher=settings["fisher"], name="run")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            estimator.fit(X, y)
            fit_s = time.perf_counter() - start
            records = []
            for output in outputs:
                X_query = torch.from_numpy(data[f"X_{output['query']}"])
                y_query = torch.from_numpy(data[f"y_{output['query']}"])
                start = time.perf_counter()
                array = estimator.influences(X_query, y_query).detach().cpu().numpy().astype(np.float64)
                seconds = time.perf_counter() - start
                np.save(work / output["file"], array)
                records.append({**output, "seconds": seconds, "finite": bool(np.isfinite(array).all())})
    finally:
        logging.getLogger().removeHandler(collector)
        shutil.rmtree(scratch, ignore_errors=True)
    messages = [f"{w.category.__name__}: {w.message}"[:300] for w in caught] + collector.messages
    return {"name": task["name"], "fit_s": fit_s, "outputs": records,
            "settings": {**settings, "kronfluence": estimator.settings()}, "warnings": sorted(set(messages))}


def _solver_benchmark_estimator(task, model, regularization):
    """pyDVL's estimator for a bench_solvers.py method (``task["settings"]``), after a small warm-up run.

    The warm-up (the same method on a tiny model) keeps one-time costs out of the timings, as
    :func:`_warm_up` does for Direct and CG.
    """
    import torch
    from pydvl.influence import InfluenceMode
    from torch.utils.data import DataLoader, TensorDataset

    import _solver_worker as SW

    family, _ = SW.parse_method(task["method"])
    settings = dict(task["settings"], regularization=regularization)
    warm = dict(settings, regularization=1.0)
    for key, value in (("rank", 5), ("krylov_dimension", 20), ("preconditioner_rank", 5), ("max_iter", 5),
                       ("scale", 100.0)):
        if warm.get(key) is not None:
            warm[key] = value
    warm_model = P._mlp(hidden=4).to(torch.float64).eval()
    X = torch.rand(10, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm_estimator = SW._pydvl_estimator(family, warm_model, warm)
        warm_estimator.fit(DataLoader(TensorDataset(X, y), batch_size=5))
        warm_estimator.influences(X[:2], y[:2], X, y, mode=InfluenceMode.Up)
    return SW._pydvl_estimator(family, model, settings)


def main(job_path):
    import numpy as np
    import pydvl
    import torch

    job_path = Path(job_path)
    job = json.loads(job_path.read_text())
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    work = Path(job["work_dir"])
    with np.load(work / "data.npz") as archive:
        data = {key: archive[key] for key in archive.files}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's one-time notices; the tasks record their own warnings
        _warm_up()
    results = []
    for task in job["tasks"]:
        start = time.perf_counter()
        try:
            record = _run_task(task, work, data)
            record["status"] = "ok"
        except Exception as error:  # reported, so that the other tasks still run
            record = {"name": task["name"], "status": f"failed: {type(error).__name__}: {error}"[:500]}
        record["wall_s"] = time.perf_counter() - start
        results.append(record)
        print(f"  pyDVL {task['name']}: {record['status']} ({record['wall_s']:.1f} s)", flush=True)
    versions = {
        "pydvl": pydvl.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    try:
        from importlib.metadata import version

        versions["kronfluence"] = version("kronfluence")
    except ImportError:  # PackageNotFoundError is one
        pass
    result_path = job_path.with_suffix(".result.json")
    result_path.write_text(json.dumps({"versions": versions, "tasks": results}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
