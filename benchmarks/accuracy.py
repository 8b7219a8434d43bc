"""Accuracy of skinfl's influence estimators against retraining, next to pyDVL 0.10.0.

Usage::

    python benchmarks/accuracy.py [--quick] [--skip-pydvl] [--reuse-truth]

Data: scikit-learn's ``load_digits``, ``X / 16``, split once with a fixed seed
into 1000 training points, 50 validation and 100 test query points (disjoint).
Every model is float64; the loss is cross-entropy.

A. Logistic regression (L2, C=0.1) solved to its optimum: influences against
   leave-one-out retraining of every training point (Pearson, Spearman).
B. MLP 64-32-10 with Tanh, trained with Adam: linear datamodeling score (LDS)
   over random half-size training subsets. The regularization is chosen by
   the LDS of skinfl's DirectInfluence on the validation points; the LDS is
   reported on the test points.
C. Agreement with skinfl's DirectInfluence, no retraining: the MLP of B, a
   small CNN and the logistic regression of A.
D. Mislabel detection: 10% of the training labels flipped, the MLP trained on
   them, self-influence as the detector (ROC AUC, share found in the top 10%).

pyDVL needs ``numpy<2`` and runs in its own virtual environment
(benchmarks/.venv-pydvl, see setup_pydvl_env.sh), in one subprocess
(_pydvl_accuracy.py) fed through files in benchmarks/.work/accuracy/. Both
libraries are scored on the same ground truth.

Results: a table on stdout, ``benchmarks/results/accuracy.json`` and
``benchmarks/results/accuracy.md``; ``--quick`` (a small smoke run, about a
minute) and ``--skip-pydvl`` append ``_quick`` / ``_skinfl`` to the names.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning, which
# matters when joblib's retraining workers share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import joblib  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _problems as P  # noqa: E402
from _common import fmt  # noqa: E402
import _pydvl_accuracy as W  # noqa: E402  (build_model, pyDVL's CG settings; nothing heavy at import)

WORKER = HERE / "_pydvl_accuracy.py"
DEFAULT_PYDVL_PYTHON = HERE / ".venv-pydvl" / "bin" / "python"

SEED = 0
LOSS = "cross_entropy"
C = 0.1  # logistic regression; influence regularization 1 / (C n)
LEARNING_RATE = 1e-2  # MLP and CNN: Adam, full batch
WEIGHT_DECAY = 1e-3
ALPHA = 0.5  # LDS subsets hold this fraction of the training points
FLIP_FRACTION = 0.1
TOP_FRACTION = 0.1
CONFIDENCE = 0.95
LDS_TOLERANCE = 1e-3  # smaller LDS differences count as ties (CG tolerance); LDS intervals are far wider
METHODS = ("direct", "cg")
LIBRARIES = ("skinfl", "pydvl")
NAMES = {"skinfl": "skinfl", "pydvl": "pyDVL", "direct": "Direct", "cg": "CG",
         "mlp": "MLP", "cnn": "CNN", "logreg": "logistic regression"}


@dataclass(frozen=True)
class Setup:
    """Sizes of a run."""

    name: str
    n_train: int
    n_val: int
    n_test: int
    epochs: int
    n_subsets: int
    grid: tuple
    pydvl_direct_batch: int  # pyDVL DataLoader batch sizes; both divide n_train
    pydvl_cg_batch: int

    @property
    def work_dir(self) -> Path:
        base = P.WORK_DIR / "accuracy"
        return base if self.name == "full" else base / self.name


HALF_DECADES = tuple(float(10.0 ** (k / 2)) for k in range(-6, 1))  # 1e-3, 3.2e-3, ..., 1
FULL = Setup("full", 1000, 50, 100, epochs=500, n_subsets=100, grid=HALF_DECADES,
             pydvl_direct_batch=100, pydvl_cg_batch=500)
QUICK = Setup("quick", 200, 10, 20, epochs=200, n_subsets=20, grid=(1e-2, 1e-1, 1.0),
              pydvl_direct_batch=100, pydvl_cg_batch=100)


# --------------------------------------------------------------------- data
def make_data(setup):
    """The fixed split, and a copy of the training labels with a seeded 10% flipped."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = digits.data / 16.0
    y = digits.target.astype(np.int64)
    order = np.random.RandomState(SEED).permutation(len(X))
    ends = np.cumsum([setup.n_train, setup.n_val, setup.n_test])
    train, val, test = np.split(order[: ends[-1]], ends[:2])
    data = {
        "X_train": X[train], "y_train": y[train],
        "X_val": X[val], "y_val": y[val],
        "X_test": X[test], "y_test": y[test],
    }
    rng = np.random.RandomState(SEED + 1)
    flipped = np.sort(rng.choice(setup.n_train, size=int(round(FLIP_FRACTION * setup.n_train)), replace=False))
    noisy = data["y_train"].copy()
    noisy[flipped] = (noisy[flipped] + rng.randint(1, 10, size=len(flipped))) % 10  # always another class
    data["y_train_noisy"] = noisy
    data["flipped"] = flipped
    return data


def torch_retrainer(architecture, epochs):
    from skinfl.retraining import TorchRetrainer

    return TorchRetrainer(
        W.build_model(architecture), loss=LOSS, optimizer="adam", learning_rate=LEARNING_RATE,
        epochs=epochs, batch_size=None, weight_decay=WEIGHT_DECAY, init="reset", random_state=SEED,
    )


def describe(model, data, labels="y_train"):
    """Parameter count, losses and accuracies of a trained model."""
    import torch
    import torch.nn.functional as F

    summary = {"n_params": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        for part, (X, y) in {
            "train": (data["X_train"], data[labels]),
            "val": (data["X_val"], data["y_val"]),
            "test": (data["X_test"], data["y_test"]),
        }.items():
            logits = model(torch.as_tensor(X))
            target = torch.as_tensor(y)
            summary[f"{part}_loss"] = float(F.cross_entropy(logits, target))
            summary[f"{part}_accuracy"] = float((logits.argmax(1) == target).double().mean())
    return summary


def ground_truth(setup, tag, key, compute, reuse):
    """``compute()`` timed, stored under .work/; read back instead with ``reuse``."""
    path = setup.work_dir / "truth" / f"{tag}-{joblib.hash(key)}.joblib"
    if reuse and path.exists():
        stored = joblib.load(path)
        return stored["truth"], {"seconds": stored["seconds"], "reused": True}
    start = time.perf_counter()
    truth = compute()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump({"truth": truth, "seconds": seconds}, path)
    return truth, {"seconds": seconds, "reused": False}


def retrainer_key(retrainer):
    return {name: repr(value) for name, value in retrainer.get_params(deep=False).items()}


# ------------------------------------------------------------------ skinfl
def _messages(caught):
    return sorted({f"{w.category.__name__}: {w.message}"[:400] for w in caught})


def run_skinfl(method, model, regularization, X, y, queries=None, self_influence=False):
    """Fit one skinfl estimator; influences for each query set and optionally self-influence."""
    import skinfl

    if method == "direct":
        estimator = skinfl.DirectInfluence(model, loss=LOSS, regularization=regularization)
    else:
        estimator = skinfl.CgInfluence(model, loss=LOSS, regularization=regularization, random_state=0)
    values, seconds = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        estimator.fit(X, y)
        fit_s = time.perf_counter() - start
        for name, (X_query, y_query) in (queries or {}).items():
            start = time.perf_counter()
            values[name] = estimator.influences(X_query, y_query)
            seconds[name] = time.perf_counter() - start
        if self_influence:
            start = time.perf_counter()
            values["self"] = estimator.self_influence(X, y)
            seconds["self"] = time.perf_counter() - start
    return {
        "values": values,
        "fit_s": fit_s,
        "seconds": seconds,
        "solver": getattr(estimator, "solver_", None),
        "warnings": _messages(caught),
    }


def warm_up():
    """Small Direct and CG runs first, so that one-time costs (lazy imports, the first use of
    torch's autograd paths) are not in the timings."""
    model = P._mlp(hidden=4).double()
    rng = np.random.RandomState(SEED)
    X, y = rng.rand(10, 64), np.arange(10)
    for method in METHODS:
        run_skinfl(method, model, 1.0, X, y, {"test": (X[:2], y[:2])}, self_influence=True)


# ------------------------------------------------------------------- pyDVL
def pydvl_tasks(setup, logreg_regularization, grid, selected):
    def task(model, method, outputs, labels="y_train"):
        return {
            "name": f"{model}/{method}",
            "model": model,
            "method": method,
            "labels": labels,
            "batch_size": setup.pydvl_direct_batch if method == "direct" else setup.pydvl_cg_batch,
            "outputs": [
                {"query": query, "regularization": r, "file": f"pydvl_{model}_{method}_{query}_{r:.4g}.npy"}
                for query, r in outputs
            ],
        }

    return [
        task("logreg", "direct", [("test", logreg_regularization)]),
        task("logreg", "cg", [("test", logreg_regularization)]),
        # Direct: fitted once, the regularization changed in place for the sweep.
        task("mlp", "direct", [(query, r) for r in grid for query in ("val", "test")]),
        task("mlp", "cg", [("test", selected)]),
        task("cnn", "direct", [("test", selected)]),
        task("cnn", "cg", [("test", selected)]),
        task("mlp_noisy", "direct", [("self", selected)], labels="y_train_noisy"),
        task("mlp_noisy", "cg", [("self", selected)], labels="y_train_noisy"),
    ]


def run_pydvl(setup, tasks, python, threads, timeout):
    """Run the pyDVL worker; returns its result with the matrices loaded, or None."""
    job_path = setup.work_dir / "pydvl_job.json"
    result_path = job_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps({"work_dir": str(setup.work_dir), "threads": threads, "tasks": tasks}, indent=2))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    try:
        completed = subprocess.run([str(python), str(WORKER), str(job_path)], env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  pyDVL worker killed after {timeout:.0f} s", flush=True)
        return None
    if completed.returncode != 0 or not result_path.exists():
        print(f"  pyDVL worker failed (exit {completed.returncode})", flush=True)
        return None
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - start
    for task in result["tasks"]:
        for output in task.get("outputs", []):
            output["values"] = np.load(setup.work_dir / output["file"])
    return result


def pydvl_output(result, name, query, regularization):
    """(task record, output record) of one pyDVL output, or (None, None)."""
    if result is None:
        return None, None
    task = next((t for t in result["tasks"] if t["name"] == name), None)
    if task is None or task["status"] != "ok":
        return task, None
    output = next(
        (o for o in task["outputs"] if o["query"] == query and np.isclose(o["regularization"], regularization)),
        None,
    )
    return task, output


# ------------------------------------------------------------------- report
def _with_interval(entry):
    if not entry or entry.get("lds") is None:
        return "-"
    low, high = entry["interval"]
    return f"{entry['lds']:.3f} [{low:.3f}, {high:.3f}]"


def _table(header, rows, align):
    """A markdown table; ``align`` holds one "l" or "r" per column."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _entry(results, section, lib, method):
    return results[section]["estimators"].get(lib, {}).get(method)


def tables(results):
    """The result tables, as markdown."""
    out = {}
    out["A"] = _table(
        ["method", "skinfl Pearson", "pyDVL Pearson", "skinfl Spearman", "pyDVL Spearman"],
        [
            [NAMES[m]]
            + [fmt((_entry(results, "A", lib, m) or {}).get(k)) for k in ("pearson", "spearman") for lib in LIBRARIES]
            for m in METHODS
        ],
        "lrrrr",
    )
    b = results["B"]
    rows = [
        [NAMES[m], fmt(b["selected_regularization"], ".3g")]
        + [_with_interval(_entry(results, "B", lib, m)) for lib in LIBRARIES]
        for m in METHODS
    ]
    own = b.get("pydvl_direct_own_selection")
    if own:
        rows.append(
            ["Direct, each library's best validation regularization",
             f"{b['selected_regularization']:.3g} / {own['regularization']:.3g}",
             _with_interval(_entry(results, "B", "skinfl", "direct")), _with_interval(own)]
        )
    out["B"] = _table(
        ["method", "regularization", "skinfl LDS [95% CI]", "pyDVL LDS [95% CI]"], rows, "llrr"
    )
    out["B_sweep"] = _table(
        ["regularization", "skinfl Direct val LDS", "skinfl Direct test LDS", "pyDVL Direct val LDS",
         "pyDVL Direct test LDS", "skinfl Direct solver"],
        [
            [fmt(g["regularization"], ".3g") + (" (selected)" if g["regularization"] == b["selected_regularization"] else ""),
             fmt(g["skinfl"]["val"], ".3f"), fmt(g["skinfl"]["test"], ".3f"),
             fmt(g.get("pydvl", {}).get("val"), ".3f"), fmt(g.get("pydvl", {}).get("test"), ".3f"),
             g["skinfl"]["solver"] + (" (indefinite: warned)" if g["skinfl"]["indefinite"] else "")]
            for g in b["sweep"]
        ],
        "lrrrrl",
    )
    rows = []
    for problem in ("mlp", "cnn", "logreg"):
        for m in METHODS:
            cells = [NAMES[problem], NAMES[m]]
            for key, spec in (("pearson", ".6f"), ("spearman", ".6f"), ("max_relative_difference", ".2e")):
                for lib in LIBRARIES:
                    entry = results["C"]["agreement"][problem].get(lib, {}).get(m)
                    if lib == "skinfl" and m == "direct":
                        cells.append("(reference)")
                    else:
                        cells.append(fmt((entry or {}).get(key), spec))
            rows.append(cells)
    out["C"] = _table(
        ["model", "method", "skinfl Pearson", "pyDVL Pearson", "skinfl Spearman", "pyDVL Spearman",
         "skinfl max rel diff", "pyDVL max rel diff"],
        rows,
        "llrrrrrr",
    )
    d = results["D"]
    rows = [
        [NAMES[m]]
        + [fmt((_entry(results, "D", lib, m) or {}).get(k), ".3f") for k in ("roc_auc", "fraction_found") for lib in LIBRARIES]
        for m in METHODS
    ]
    for name, base in d["baselines"].items():
        rows.append([f"baseline: {name}", fmt(base["roc_auc"], ".3f"), "", fmt(base["fraction_found"], ".3f"), ""])
    out["D"] = _table(
        ["self-influence", "skinfl ROC AUC", "pyDVL ROC AUC", f"skinfl found in top {TOP_FRACTION:.0%}",
         f"pyDVL found in top {TOP_FRACTION:.0%}"],
        rows,
        "lrrrr",
    )
    rows = []
    for label, section, problem in (("A", "A", "logistic regression"), ("B", "B", "MLP"), ("C", "C", "CNN"),
                                    ("D", "D", "MLP, noisy labels (self-influence)")):
        for m in METHODS:
            cells = [label, problem, NAMES[m]]
            for lib in LIBRARIES:
                entry = results[section]["estimators"].get(lib, {}).get(m)
                cells += [fmt((entry or {}).get("fit_s"), ".2f"), fmt((entry or {}).get("influences_s"), ".2f")]
            rows.append(cells)
    out["times"] = _table(
        ["", "model", "method", "skinfl fit s", "skinfl influences s", "pyDVL fit s", "pyDVL influences s"],
        rows,
        "lllrrrr",
    )
    out["cost"] = _table(
        ["ground truth", "model", "retrainings", "seconds"],
        [[g["kind"], g["model"], g["retrainings"], f"{g['seconds']:.1f}" + (" (reused)" if g["reused"] else "")]
         for g in (results["A"]["ground_truth"], results["B"]["ground_truth"])],
        "llrr",
    )
    return out


def targets(results):
    checks = []
    for m in METHODS:
        entry = _entry(results, "A", "skinfl", m)
        checks.append((f"logistic regression LOO Pearson of skinfl {NAMES[m]} >= 0.99",
                       entry is not None and entry["pearson"] >= 0.99))
    for m in METHODS:
        mine, theirs = _entry(results, "B", "skinfl", m), _entry(results, "B", "pydvl", m)
        if mine and theirs:
            difference = mine["lds"] - theirs["lds"]
            checks.append((f"MLP test LDS of skinfl {NAMES[m]} not below pyDVL {NAMES[m]}'s (difference "
                           f"{difference:+.4f}; differences under {LDS_TOLERANCE} count as equal)",
                           difference >= -LDS_TOLERANCE))
    return checks


# --------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of about a minute")
    parser.add_argument("--skip-pydvl", action="store_true", help="run skinfl only")
    parser.add_argument("--reuse-truth", action="store_true",
                        help="read the ground truth stored by an earlier run with the same settings "
                             "(benchmarks/.work/accuracy/) instead of retraining")
    parser.add_argument("--n-jobs", type=int, default=2, help="parallel retrainings for the ground truth (default 2)")
    parser.add_argument("--pydvl-python", default=str(DEFAULT_PYDVL_PYTHON),
                        help="interpreter of pyDVL's venv (bash benchmarks/setup_pydvl_env.sh)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to the pyDVL worker")
    args = parser.parse_args(argv)
    if not args.skip_pydvl and not Path(args.pydvl_python).exists():
        parser.error(f"{args.pydvl_python} not found: run `bash benchmarks/setup_pydvl_env.sh` or pass --skip-pydvl")

    import sklearn
    import torch

    import skinfl
    from skinfl import metrics
    from skinfl.metrics import DatamodelTruth
    from skinfl.retraining import LogisticRegressionRetrainer

    setup = QUICK if args.quick else FULL
    threads = P.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    started = _dt.datetime.now().astimezone()
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    name = "accuracy" + ("_quick" if args.quick else "") + ("_skinfl" if args.skip_pydvl else "")
    command = " ".join(shlex.quote(a) for a in [sys.executable, os.path.relpath(__file__, P.REPO_ROOT),
                                                *(sys.argv[1:] if argv is None else argv)])
    print(f"[{setup.name}] {setup.n_train} train / {setup.n_val} validation / {setup.n_test} test points, "
          f"{threads} torch threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}", flush=True)

    warm_up()
    work = setup.work_dir
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(setup)
    np.savez(work / "data.npz", **data)
    X, y = data["X_train"], data["y_train"]
    X_val, y_val, X_test, y_test = data["X_val"], data["y_val"], data["X_test"], data["y_test"]
    test = {"test": (X_test, y_test)}
    results = {"A": {"estimators": {"skinfl": {}}}, "B": {"estimators": {"skinfl": {}}}, "C": {}, "D": {"estimators": {"skinfl": {}}}}
    models = {}
    matrices = {}  # (problem, lib, method) -> test influence matrix, for section C

    def record(section, lib, method, scores, run, output="test"):
        seconds = run["fit_s"] + run["seconds"][output]
        results[section]["estimators"].setdefault(lib, {})[method] = {
            **scores, "fit_s": run["fit_s"], "influences_s": run["seconds"][output], "seconds": seconds,
            "warnings": run["warnings"],
        }

    # ---------------------------------------------------------------- A
    print("A. logistic regression: leave-one-out", flush=True)
    retrain_lr = LogisticRegressionRetrainer(C=C)
    models["logreg"] = retrain_lr(X, y)
    lr_regularization = retrain_lr.regularization_for(len(X))
    loo, cost = ground_truth(
        setup, "loo", ("loo", X, y, X_test, y_test, retrainer_key(retrain_lr)),
        lambda: metrics.leave_one_out_truth(retrain_lr, X, y, X_test, y_test, loss=LOSS, n_jobs=args.n_jobs),
        args.reuse_truth,
    )
    results["A"].update(
        C=C, regularization=lr_regularization, model=describe(models["logreg"], data),
        ground_truth={"kind": "leave-one-out", "model": "logistic regression", "retrainings": len(loo.removed) + 1,
                      "removed": len(loo.removed), **cost},
    )
    print(f"  ground truth: {len(loo.removed) + 1} retrainings in {cost['seconds']:.1f} s"
          + (" (reused)" if cost["reused"] else ""), flush=True)
    for method in METHODS:
        run = run_skinfl(method, models["logreg"], lr_regularization, X, y, test)
        matrices["logreg", "skinfl", method] = run["values"]["test"]
        scores = metrics.leave_one_out_agreement(run["values"]["test"], loo)
        record("A", "skinfl", method, {"pearson": scores.pearson, "spearman": scores.spearman}, run)
        print(f"  skinfl {method}: Pearson {scores.pearson:.4f}, Spearman {scores.spearman:.4f}", flush=True)

    # ---------------------------------------------------------------- B
    print("B. MLP: linear datamodeling score", flush=True)
    retrain_mlp = torch_retrainer("mlp", setup.epochs)
    models["mlp"] = retrain_mlp(X, y)
    masks = metrics.random_subsets(len(X), ALPHA, setup.n_subsets, random_state=SEED)
    X_query, y_query = np.concatenate([X_val, X_test]), np.concatenate([y_val, y_test])
    lds_truth, cost = ground_truth(
        setup, "lds", ("lds", X, y, X_query, y_query, masks, retrainer_key(retrain_mlp)),
        lambda: metrics.datamodel_truth(retrain_mlp, X, y, X_query, y_query, loss=LOSS, masks=masks, n_jobs=args.n_jobs),
        args.reuse_truth,
    )
    n_val = len(X_val)
    truth_val = DatamodelTruth(masks=lds_truth.masks, losses=lds_truth.losses[:n_val])
    truth_test = DatamodelTruth(masks=lds_truth.masks, losses=lds_truth.losses[n_val:])
    results["B"].update(
        model=describe(models["mlp"], data), epochs=setup.epochs, learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY, alpha=ALPHA, n_subsets=setup.n_subsets,
        ground_truth={"kind": f"LDS, {setup.n_subsets} subsets of {ALPHA:.0%}", "model": "MLP",
                      "retrainings": setup.n_subsets, **cost},
    )
    print(f"  ground truth: {setup.n_subsets} retrainings in {cost['seconds']:.1f} s"
          + (" (reused)" if cost["reused"] else ""), flush=True)

    def lds(matrix, truth):
        scores = metrics.linear_datamodeling_score(matrix, truth, confidence=CONFIDENCE)
        return {"lds": scores.score, "interval": list(scores.interval)}

    sweep, direct_runs = [], {}
    for r in setup.grid:
        run = run_skinfl("direct", models["mlp"], r, X, y, {"val": (X_val, y_val), "test": (X_test, y_test)})
        direct_runs[r] = run
        indefinite = any("NotPositiveDefinite" in w for w in run["warnings"])
        entry = {"regularization": r, "skinfl": {
            "val": lds(run["values"]["val"], truth_val)["lds"], "test": lds(run["values"]["test"], truth_test)["lds"],
            "solver": run["solver"], "indefinite": indefinite, "warnings": run["warnings"]}}
        sweep.append(entry)
        print(f"  skinfl direct regularization {r:.3g}: validation LDS {entry['skinfl']['val']:.4f}, "
              f"test LDS {entry['skinfl']['test']:.4f}, {run['solver']}" + (" (indefinite)" if indefinite else ""),
              flush=True)
    selected = max(sweep, key=lambda g: g["skinfl"]["val"])["regularization"]
    results["B"].update(selected_regularization=selected, sweep=sweep)
    print(f"  selected regularization {selected:.3g}", flush=True)
    run = direct_runs[selected]
    matrices["mlp", "skinfl", "direct"] = run["values"]["test"]
    record("B", "skinfl", "direct", lds(run["values"]["test"], truth_test), run)
    run = run_skinfl("cg", models["mlp"], selected, X, y, test)
    matrices["mlp", "skinfl", "cg"] = run["values"]["test"]
    record("B", "skinfl", "cg", lds(run["values"]["test"], truth_test), run)
    for method in METHODS:
        entry = _entry(results, "B", "skinfl", method)
        print(f"  skinfl {method}: test LDS {_with_interval(entry)}", flush=True)

    # ---------------------------------------------------------------- C
    print("C. agreement with skinfl Direct: CNN", flush=True)
    retrain_cnn = torch_retrainer("cnn", setup.epochs)
    models["cnn"] = retrain_cnn(X, y)
    results["C"]["regularization"] = selected
    results["C"]["cnn_model"] = describe(models["cnn"], data)
    results["C"]["estimators"] = {"skinfl": {}}  # the CNN's runs (times, warnings); scores in "agreement"
    for method in METHODS:
        run = run_skinfl(method, models["cnn"], selected, X, y, test)
        matrices["cnn", "skinfl", method] = run["values"]["test"]
        record("C", "skinfl", method, {}, run)

    # ---------------------------------------------------------------- D
    print("D. mislabel detection", flush=True)
    y_noisy, flipped = data["y_train_noisy"], data["flipped"]
    models["mlp_noisy"] = retrain_mlp(X, y_noisy)
    results["D"].update(
        n_flipped=len(flipped), flip_fraction=FLIP_FRACTION, top_fraction=TOP_FRACTION, regularization=selected,
        model=describe(models["mlp_noisy"], data, labels="y_train_noisy"),
    )
    for method in METHODS:
        run = run_skinfl(method, models["mlp_noisy"], selected, X, y_noisy, self_influence=True)
        scores = metrics.mislabel_detection(run["values"]["self"], flipped, top_fraction=TOP_FRACTION)
        record("D", "skinfl", method, {"roc_auc": scores.roc_auc, "fraction_found": scores.fraction_found}, run, "self")
        print(f"  skinfl {method}: ROC AUC {scores.roc_auc:.3f}, found {scores.fraction_found:.3f}", flush=True)
    training_loss = metrics.query_losses(models["mlp_noisy"], LOSS, X, y_noisy)
    scores = metrics.mislabel_detection(training_loss, flipped, top_fraction=TOP_FRACTION)
    results["D"]["baselines"] = {
        "training loss": {"roc_auc": scores.roc_auc, "fraction_found": scores.fraction_found},
        "random order": {"roc_auc": 0.5, "fraction_found": scores.random_fraction_found},
    }

    for key, model in models.items():
        torch.save(model.state_dict(), work / f"{key}.pt")

    # ------------------------------------------------------------ pyDVL
    pydvl = None
    if not args.skip_pydvl:
        print("pyDVL (own venv, one subprocess)", flush=True)
        pydvl = run_pydvl(setup, pydvl_tasks(setup, lr_regularization, setup.grid, selected),
                          args.pydvl_python, threads, args.timeout)

    def pydvl_run(name, query, r):
        task, output = pydvl_output(pydvl, name, query, r)
        if output is None:
            return None
        return {"fit_s": task["fit_s"], "seconds": {query: output["seconds"]}, "warnings": task["warnings"],
                "values": output["values"]}

    if pydvl is not None:
        for method in METHODS:
            run = pydvl_run(f"logreg/{method}", "test", lr_regularization)
            if run:
                matrices["logreg", "pydvl", method] = run["values"]
                scores = metrics.leave_one_out_agreement(run["values"], loo)
                record("A", "pydvl", method, {"pearson": scores.pearson, "spearman": scores.spearman}, run)
        best = None
        for entry in sweep:
            r = entry["regularization"]
            val, test_run = pydvl_run("mlp/direct", "val", r), pydvl_run("mlp/direct", "test", r)
            if val and test_run:
                entry["pydvl"] = {"val": lds(val["values"], truth_val)["lds"],
                                  "test": lds(test_run["values"], truth_test)["lds"]}
                if best is None or entry["pydvl"]["val"] > best[0]:
                    best = (entry["pydvl"]["val"], r, test_run)
        for method in METHODS:
            run = pydvl_run(f"mlp/{method}", "test", selected)
            if run:
                matrices["mlp", "pydvl", method] = run["values"]
                record("B", "pydvl", method, lds(run["values"], truth_test), run)
        if best is not None:
            results["B"]["pydvl_direct_own_selection"] = {"regularization": best[1],
                                                          **lds(best[2]["values"], truth_test)}
        for method in METHODS:
            run = pydvl_run(f"cnn/{method}", "test", selected)
            if run:
                matrices["cnn", "pydvl", method] = run["values"]
                record("C", "pydvl", method, {}, run)
            run = pydvl_run(f"mlp_noisy/{method}", "self", selected)
            if run:
                scores = metrics.mislabel_detection(run["values"], flipped, top_fraction=TOP_FRACTION)
                record("D", "pydvl", method, {"roc_auc": scores.roc_auc, "fraction_found": scores.fraction_found},
                       run, "self")
        results["pydvl_worker"] = {
            "versions": pydvl["versions"], "wall_s": pydvl["wall_s"],
            "tasks": [  # without the matrices
                {**t, "outputs": [{k: v for k, v in o.items() if k != "values"} for o in t.get("outputs", [])]}
                for t in pydvl["tasks"]
            ],
        }

    for problem in ("mlp", "cnn", "logreg"):
        reference = matrices[problem, "skinfl", "direct"]
        agreement = results["C"].setdefault("agreement", {})[problem] = {}
        for (p, lib, method), matrix in matrices.items():
            if p == problem and not (lib == "skinfl" and method == "direct"):
                scores = metrics.reference_agreement(matrix, reference)
                agreement.setdefault(lib, {})[method] = {
                    "pearson": scores.pearson, "spearman": scores.spearman,
                    "max_relative_difference": scores.max_relative_difference}

    # ----------------------------------------------------------- output
    total_s = time.perf_counter() - t0
    versions = {"skinfl_version": skinfl.__version__, "torch": torch.__version__, "numpy": np.__version__,
                "scikit_learn": sklearn.__version__, "python": sys.version.split()[0]}
    if pydvl is not None:
        versions.update({f"pydvl_env_{k}": v for k, v in pydvl["versions"].items()})
    machine = P.machine_info(threads, versions)
    machine["load_average_1_5_15min"] = {"start": [round(x, 2) for x in load_before],
                                         "end": [round(x, 2) for x in os.getloadavg()]}
    checks = targets(results)
    rendered = tables(results)
    settings = {
        "setup": asdict(setup), "seed": SEED, "loss": LOSS, "logistic_C": C, "learning_rate": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY, "alpha": ALPHA, "flip_fraction": FLIP_FRACTION, "top_fraction": TOP_FRACTION,
        "confidence": CONFIDENCE, "n_jobs": args.n_jobs, "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "skinfl": "DirectInfluence(regularization=r) and CgInfluence(regularization=r, random_state=0), other "
                  "parameters at their defaults (Hessian, CG rtol=1e-4, Nystroem preconditioner of rank 100)",
        "pydvl": {"cg_rtol": W.PYDVL_CG_RTOL, "cg_atol": W.PYDVL_CG_ATOL, "cg_maxiter": W.PYDVL_CG_MAX_ITER,
                  "solve_simultaneously": True, "direct_batch_size": setup.pydvl_direct_batch,
                  "cg_batch_size": setup.pydvl_cg_batch, "self_influence_chunk": W.SELF_INFLUENCE_CHUNK},
    }
    notes = notes_for(setup, results, pydvl is not None)

    sections = [
        ("A. Logistic regression: leave-one-out agreement (test queries)",
         f"L2-regularised logistic regression (C={C}, no intercept, {results['A']['model']['n_params']} parameters) "
         f"solved to its optimum; regularization 1/(C n) = {lr_regularization:.3g}. Mean over the "
         f"{setup.n_test} test points of the correlation, across all {results['A']['ground_truth']['removed']} "
         "training points, between influences / n and the loss change after retraining without the point.",
         rendered["A"]),
        ("B. MLP: linear datamodeling score (test queries)",
         f"MLP 64-32-10, Tanh ({results['B']['model']['n_params']} parameters), Adam lr {LEARNING_RATE}, "
         f"{setup.epochs} full-batch epochs, weight decay {WEIGHT_DECAY}. LDS over {setup.n_subsets} random "
         f"subsets of {ALPHA:.0%} of the training points; regularization chosen by skinfl Direct's LDS on the "
         f"{setup.n_val} validation points.",
         rendered["B"]),
        ("B'. Regularization sweep (LDS of Direct on the validation and test points)", "", rendered["B_sweep"]),
        ("C. Agreement with skinfl Direct (test queries, no retraining)",
         f"Influence matrices ({setup.n_test} test x {setup.n_train} training points) compared with skinfl "
         f"DirectInfluence's: mean per-test-point Pearson and Spearman, max|A - R| / max|R|. MLP of B and CNN "
         f"Conv(1,4,3)-Tanh-Conv(4,8,3)-Tanh-Linear(128,10) ({results['C']['cnn_model']['n_params']} parameters, "
         f"trained like the MLP) at regularization {selected:.3g}; logistic regression of A at {lr_regularization:.3g}.",
         rendered["C"]),
        ("D. Mislabel detection (self-influence on the noisy training set)",
         f"{len(flipped)} of {setup.n_train} training labels flipped to another class; the MLP trained on them "
         f"(train accuracy on the noisy labels {results['D']['model']['train_accuracy']:.3f}); "
         f"regularization {selected:.3g}. ROC AUC of self-influence as a detector of flipped points, and the "
         f"share of flipped points among the {TOP_FRACTION:.0%} highest self-influences.",
         rendered["D"]),
        ("Wall times (seconds)", "", rendered["times"]),
        ("Ground-truth cost", "", rendered["cost"]),
    ]

    print()
    for title, text, table in sections:
        print(f"{title}\n\n{table}\n")
    for label, ok in checks:
        print(f"target {'met' if ok else 'NOT met'}: {label}")
    print(f"\ntotal {total_s:.0f} s")

    P.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path, md_path = P.RESULTS_DIR / f"{name}.json", P.RESULTS_DIR / f"{name}.md"
    payload = {
        "command": command, "date": started.isoformat(timespec="seconds"), "total_s": total_s,
        "skinfl_commit": P.git_state(), "machine": machine, "settings": settings,
        "targets": [{"target": label, "met": ok} for label, ok in checks],
        "results": results, "notes": notes,
    }
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")

    md = [
        f"# Accuracy benchmark ({setup.name}: {setup.n_train} training / {setup.n_val} validation / "
        f"{setup.n_test} test points)",
        "",
        f"- Command: `{command}` ({total_s / 60:.1f} minutes)",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']} RAM; 1-min load average "
        f"{load_before[0]:.1f} at start",
        f"- skinfl {skinfl.__version__} (commit {P.git_state()}), torch {torch.__version__}, numpy {np.__version__}, "
        f"scikit-learn {sklearn.__version__}",
    ]
    if pydvl is not None:
        v = pydvl["versions"]
        md.append(f"- pyDVL {v['pydvl']} (own venv): torch {v['torch']}, numpy {v['numpy']}")
    md.append("")
    for title, text, table in sections:
        md += [f"## {title}", ""] + ([text, ""] if text else []) + [table, ""]
    md += ["## Targets", ""] + [f"- {'met' if ok else '**not met**'}: {label}" for label, ok in checks]
    md += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    md_path.write_text("\n".join(md) + "\n")
    print(f"wrote {json_path.relative_to(P.REPO_ROOT)} and {md_path.relative_to(P.REPO_ROOT)}")
    return 0


def notes_for(setup, results, with_pydvl):
    notes = [
        "Sign convention (both libraries): positive influence = helpful; removing training point j changes "
        "the loss at query point i by about influences[i, j] / n.",
        "skinfl: DirectInfluence and CgInfluence with the Hessian (the default) and their other defaults "
        "(CG rtol=1e-4, Nystroem preconditioner of rank 100, random_state=0).",
        "Wall times are informative only: skinfl runs in the harness process, pyDVL in a subprocess, both "
        "after a small warm-up run and with the same number of torch threads; other jobs may share the machine "
        "(load average above). pyDVL's CgInfluence does its work lazily, in influences.",
        "The LDS ground truth is computed once for the validation and test points together; LDS and its "
        "Student-t 95% interval are over query points.",
    ]
    if with_pydvl:
        notes += [
            f"pyDVL: DirectInfluence (DataLoader batch {setup.pydvl_direct_batch}) and CgInfluence with "
            f"solve_simultaneously=True (block CG), rtol={W.PYDVL_CG_RTOL:g}, atol={W.PYDVL_CG_ATOL:g}, "
            f"maxiter={W.PYDVL_CG_MAX_ITER}: pyDVL stops at ||r|| < max(rtol^2 ||b||, atol^2), the same relative "
            f"1e-4 as skinfl. Its CG averages per-batch mean Hessians without weights, so its DataLoader batch "
            f"({setup.pydvl_cg_batch}) divides n_train.",
            "pyDVL 0.10.0 has no self-influence method: its self-influence is the diagonal of its symmetric "
            f"influences (influences(X, y) without training data) on chunks of {W.SELF_INFLUENCE_CHUNK} training "
            "points, which is the diagonal of influences(X_train, y_train, X_train, y_train).",
            "pyDVL's DirectInfluence is fitted once for the sweep; with_regularization changes its regularization.",
        ]
    indefinite = [g["regularization"] for g in results["B"]["sweep"] if g["skinfl"]["indefinite"]]
    if indefinite:
        notes.append(
            "The MLP's Hessian is indefinite (Adam does not reach an exact minimum): at regularization "
            + ", ".join(f"{r:.3g}" for r in indefinite)
            + " the Hessian plus regularization is not positive definite, skinfl Direct warns "
            "(NotPositiveDefiniteWarning) and falls back from Cholesky to an eigendecomposition."
        )
    warned = []
    for section in ("A", "B", "C", "D"):
        for lib, methods in results[section]["estimators"].items():
            for method, entry in methods.items():
                for message in entry.get("warnings", []):
                    warned.append(f"{section} {NAMES[lib]} {NAMES[method]}: {message}")
    notes += [f"Warning raised: {w}" for w in warned]
    return notes


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
