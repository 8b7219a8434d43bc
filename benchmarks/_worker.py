"""One benchmark run in a fresh process (started by bench_speed.py).

    python benchmarks/_worker.py prepare --size SIZE --problems P1,P2
    python benchmarks/_worker.py run --size SIZE --problem P --lib {skinfl,pydvl} --method M [...]

``prepare`` writes the data split and trains/caches the models. ``run``
loads them, times ``fit`` and the (n_test x n_train) influence matrix
separately, saves the matrix, and prints one line ``RESULT {json}`` with the
timings and the peak resident memory of this process
(``getrusage(RUSAGE_SELF).ru_maxrss``). The ``skinfl`` runs need skinfl on
``sys.path``; the ``pydvl`` runs need pyDVL's virtual environment.
"""

from __future__ import annotations

import resource
import sys


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


RSS_START_MB = _maxrss_mb()  # before numpy/torch: the bare interpreter

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import _problems as P  # noqa: E402
from _common import LogCollector, summarise_messages  # noqa: E402

REGULARIZATION = 0.01
SKINFL_BATCH_SIZE = 512
CG_RTOL = 1e-4  # ||r|| <= rtol ||b||
CG_MAX_ITER = 1000
REF_RTOL = 1e-7
REF_MAX_ITER = 5000
# pyDVL's CG stops at ||r|| < max(rtol**2 ||b||, atol**2): rtol=1e-2 asks for
# the same relative tolerance as CG_RTOL; atol**2 = 1e-20 disables the floor.
PYDVL_CG_RTOL = CG_RTOL**0.5
PYDVL_CG_ATOL = 1e-10

METHODS = {"skinfl": ("direct", "cg", "cg_plain", "cg_ref"), "pydvl": ("direct", "cg", "cg_block")}


def _record_skinfl_cg_reports():
    """Wrap skinfl's batched CG so that each solve's report (iterations, convergence) is kept.

    Diagnostics only (one list append per solve); returns None if skinfl's
    internals no longer look as expected.
    """
    try:
        from skinfl._solvers import cg as cg_module

        solver = cg_module.batched_conjugate_gradient
    except (ImportError, AttributeError):
        return None
    reports = []

    def recording(*args, **kwargs):
        solution, report = solver(*args, **kwargs)
        reports.append(report)
        return solution, report

    cg_module.batched_conjugate_gradient = recording
    return reports


def prepare(args):
    size = {"full": P.FULL, "quick": P.QUICK}[args.size]
    P.prepare_data(size)
    import torch

    torch.set_num_threads(args.threads or P.cpu_count())
    summaries = {name: P.prepare_model(name, size) for name in args.problems.split(",")}
    print("RESULT " + json.dumps(summaries), flush=True)


def run(args):
    size = {"full": P.FULL, "quick": P.QUICK}[args.size]
    if args.method not in METHODS[args.lib]:
        raise SystemExit(f"unknown method {args.method!r} for {args.lib}")

    import numpy as np
    import torch

    threads = args.threads or P.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    data = P.load_data(size)
    model = P.load_model(args.problem, size)
    dtype = torch.float32
    if args.method == "cg_ref":  # the reference solve runs in float64
        model = model.double()
        dtype = torch.float64
    X_train = torch.from_numpy(data["X_train"]).to(dtype)
    y_train = torch.from_numpy(data["y_train"])
    X_test = torch.from_numpy(data["X_test"]).to(dtype)
    y_test = torch.from_numpy(data["y_test"])
    n_params = sum(p.numel() for p in model.parameters())

    if args.lib == "skinfl":
        import skinfl

        version = skinfl.__version__
        cg_reports = _record_skinfl_cg_reports()

        def make(model, X, y, X_test, y_test, regularization=REGULARIZATION, max_iter=None):
            if args.method == "direct":
                estimator = skinfl.DirectInfluence(
                    model, loss="cross_entropy", regularization=regularization, batch_size=SKINFL_BATCH_SIZE
                )
            else:
                rtol, iters = (REF_RTOL, REF_MAX_ITER) if args.method == "cg_ref" else (CG_RTOL, CG_MAX_ITER)
                estimator = skinfl.CgInfluence(
                    model,
                    loss="cross_entropy",
                    regularization=regularization,
                    rtol=rtol,
                    max_iter=max_iter or iters,
                    batch_size=SKINFL_BATCH_SIZE,
                )
                params = estimator.get_params()
                if "random_state" in params:  # a randomised preconditioner: make runs repeatable
                    estimator.set_params(random_state=0)
                if args.method == "cg_plain" and "preconditioner" in params:
                    estimator.set_params(preconditioner=None)
            settings = {k: v for k, v in estimator.get_params().items() if k != "model"}
            return (
                (lambda: estimator.fit(X, y)),
                (lambda: estimator.influences(X_test, y_test, X, y)),
                settings,
            )

    else:
        import pydvl
        import torch.nn.functional as F
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import CgInfluence, DirectInfluence
        from torch.utils.data import DataLoader, TensorDataset

        version = pydvl.__version__
        cg_reports = None

        def make(model, X, y, X_test, y_test, regularization=REGULARIZATION, max_iter=None):
            batch_size = min(args.pydvl_batch_size or len(X), len(X))
            if len(X) % batch_size:
                raise SystemExit(
                    f"pyDVL batch size {batch_size} must divide n_train={len(X)}: pyDVL's CG averages "
                    "per-batch mean Hessians without weights, so an uneven last batch changes the Hessian."
                )
            loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=False)
            if args.method == "direct":
                estimator = DirectInfluence(model, F.cross_entropy, regularization=regularization)
                settings = {"regularization": regularization}
            else:
                settings = {
                    "regularization": regularization,
                    "rtol": PYDVL_CG_RTOL,
                    "atol": PYDVL_CG_ATOL,
                    "maxiter": max_iter or CG_MAX_ITER,
                    "solve_simultaneously": args.method == "cg_block",
                }
                estimator = CgInfluence(model, F.cross_entropy, **settings)
            settings["dataloader_batch_size"] = batch_size

            def influences():
                return estimator.influences(X_test, y_test, X, y, mode=InfluenceMode.Up)

            return (lambda: estimator.fit(loader)), influences, settings

    fit, influences, settings = make(model, X_train, y_train, X_test, y_test)
    rss_loaded_mb = _maxrss_mb()  # torch and the library imported, data and model loaded

    # Warm-up: the same library and method on a small model of the same kind and a few points,
    # so that one-time costs (lazy imports, torch's first use of an autograd mode) are not timed.
    warm_model = P.warmup_model(args.problem).to(dtype)
    with warnings.catch_warnings(record=True) as warmup_caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        warm_fit, warm_influences, _ = make(
            warm_model, X_train[:10], y_train[:10], X_test[:2], y_test[:2], regularization=10.0, max_iter=5
        )
        warm_fit()
        warm_influences()
        warmup_s = time.perf_counter() - start
    if cg_reports is not None:
        cg_reports.clear()

    rss_import_mb = _maxrss_mb()  # ... and warmed up: the baseline of the timed work

    collector = LogCollector()
    logging.getLogger().addHandler(collector)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pydvl.influence.torch.operator").setLevel(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        fit()
        fitted = time.perf_counter()
        result = influences()
        done = time.perf_counter()
    peak_mb = _maxrss_mb()

    matrix = result.detach().cpu().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)
    out = P.matrix_path(args.problem, args.lib, args.method, size)
    np.save(out, matrix)

    # CG iteration counts: skinfl keeps a report of its last solve; pyDVL logs them at DEBUG.
    cg_iterations = None
    if args.lib == "skinfl" and args.method != "direct" and cg_reports is not None:
        cg_iterations = {
            "solves": len(cg_reports),
            "iterations": [int(r.n_iter) for r in cg_reports],
            "converged": sum(int(r.converged.sum()) for r in cg_reports),
            "systems": sum(int(r.n_systems) for r in cg_reports),
        }
    elif args.lib == "pydvl" and args.method != "direct":
        counts = [
            int(m.group(1))
            for _, _, msg in collector.records
            if (m := re.search(r"Terminated (?:block )?cg after (\d+) iterations", msg))
        ]
        cg_iterations = {
            "runs": len(counts),
            "iterations_total": sum(counts),
            "iterations_max": max(counts, default=None),
            "iterations_per_run": counts,
        }

    log_messages = [
        f"{logging.getLevelName(level)} {name}: {msg}"
        for level, name, msg in collector.records
        if level >= logging.WARNING
    ]
    warning_messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    record = {
        "problem": args.problem,
        "lib": args.lib,
        "method": args.method,
        "library_version": version,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python": sys.version.split()[0],
        "threads": threads,
        "n_params": n_params,
        "n_train": len(X_train),
        "n_test": len(X_test),
        "dtype": str(dtype).replace("torch.", ""),
        "settings": {
            k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
            for k, v in settings.items()
        },
        "warmup_s": warmup_s,
        "warmup_warnings": summarise_messages(
            [f"{w.category.__name__}: {w.message}" for w in warmup_caught], limit=3
        ),
        "fit_s": fitted - start,
        "influences_s": done - fitted,
        "total_s": done - start,
        "rss_start_mb": RSS_START_MB,
        "rss_loaded_mb": rss_loaded_mb,
        "rss_import_mb": rss_import_mb,
        "peak_mb": peak_mb,
        "matrix": str(out.relative_to(P.REPO_ROOT)),
        "matrix_shape": list(matrix.shape),
        "finite": bool(np.isfinite(matrix).all()),
        "cg": cg_iterations,
        "n_warnings": len(warning_messages),
        "warnings": summarise_messages(warning_messages, limit=3),
        "n_log_warnings": len(log_messages),
        "log_warnings": summarise_messages(log_messages, limit=3),
    }
    print("RESULT " + json.dumps(record), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--size", choices=("full", "quick"), required=True)
    prep.add_argument("--problems", required=True)
    prep.add_argument("--threads", type=int, default=None)
    one = sub.add_parser("run")
    one.add_argument("--size", choices=("full", "quick"), required=True)
    one.add_argument("--problem", choices=sorted(P.PROBLEMS), required=True)
    one.add_argument("--lib", choices=sorted(METHODS), required=True)
    one.add_argument("--method", required=True)
    one.add_argument("--pydvl-batch-size", type=int, default=None)
    one.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    (prepare if args.command == "prepare" else run)(args)


if __name__ == "__main__":
    main()
