"""Leave-one-out agreement of every influence estimator on accuracy.py's logistic regression.

Usage::

    /work/venv/bin/python benchmarks/loo_logreg.py [--quick] [--skip-pydvl] [--skip-kronfluence] [--reuse-truth]

The model and ground truth are section A of accuracy.py: L2 logistic
regression (C=0.1, no intercept, 640 parameters) on ``load_digits``
(``X / 16``, 1000 training and 100 test points, float64), solved to its
optimum; influences against leave-one-out retraining of every training point
(1001 fits), scored by ``skinfl.metrics.leave_one_out_agreement`` (Pearson and
Spearman of influences / n against the actual test-loss changes, per test
point, averaged). ``--reuse-truth`` reads the ground truth stored by an
earlier run of this script or of accuracy.py.

Estimators, each library with the same settings (those of bench_solvers.py,
at the model's regularization 1 / (C n) = 0.01): Direct, CG (block, Nystroem
preconditioner of rank 100, rtol 1e-4), CG with the EK-FAC preconditioner
(skinfl only), Arnoldi and Nystroem at ranks 50 and 100, LiSSA (scale from
the top Hessian eigenvalue, 1000 steps of minibatch 100), DataInf (per
layer), EK-FAC of the true Fisher (one target drawn per point; skinfl, pyDVL
and kronfluence 1.0.1), with its exact expectation (skinfl only) and of the
empirical Fisher (skinfl and kronfluence).
The model is one ``nn.Linear`` without bias: one Kronecker block. A method a
library does not have (yet) is reported as "not available". pyDVL and
kronfluence run in pyDVL's virtual environment, in one subprocess
(_pydvl_accuracy.py).

Results: ``benchmarks/results/loo_logreg.{md,json}`` (``_quick`` /
``_skinfl`` / ``_no-kronfluence`` appended for partial runs).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _problems as P  # noqa: E402
import _solver_worker as W  # noqa: E402
import accuracy as A  # noqa: E402

RANKS = (50, 100)
LISSA_MINIBATCH = 100  # divides both setups' n_train (pyDVL takes LiSSA's minibatch from its DataLoader)
THREADS = 2
OTHERS = {"pydvl": "pyDVL", "kronfluence": "kronfluence"}  # run in pyDVL's venv, compared with skinfl


def methods():
    return ["direct", "cg", "cg_ekfac", *(f"arnoldi{r}" for r in RANKS), *(f"nystroem{r}" for r in RANKS), "lissa",
            "datainf", "ekfac", "ekfac_exact", "ekfac_empirical"]


def unavailable(lib, method):
    """Why ``lib`` (pyDVL or kronfluence) has no ``method``, or None."""
    if method == "direct":
        return "kronfluence has no direct inverse" if lib == "kronfluence" else None
    return W.unavailable(lib, method)


def settings_for(method, n_params, top_eigenvalue, regularization, setup):
    if method == "direct":
        return {"regularization": regularization, "batch_size": setup.pydvl_direct_batch, "loss": "cross_entropy"}
    family, _ = W.parse_method(method)
    batch = LISSA_MINIBATCH if family == "lissa" else setup.pydvl_cg_batch
    return W.method_settings(method, n_params=n_params, top_eigenvalue=top_eigenvalue,
                             regularization=regularization, batch_size=batch)


def run_skinfl(method, model, settings, X, y, X_test, y_test):
    import skinfl

    if method == "direct":
        estimator, dropped = skinfl.DirectInfluence(model, loss="cross_entropy",
                                                    regularization=settings["regularization"]), []
    else:
        family, _ = W.parse_method(method)
        try:
            estimator, dropped = W._skinfl_estimator(skinfl, family, model, settings)
        except W.NotAvailable as error:
            return {"status": "not available", "reason": str(error)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        estimator.fit(X, y)
        middle = time.perf_counter()
        values = estimator.influences(X_test, y_test)
        end = time.perf_counter()
    return {"status": "ok", "values": np.asarray(values), "fit_s": middle - start, "influences_s": end - middle,
            "dropped_settings": dropped, "fitted": W._fitted_attributes(estimator),
            "warnings": sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})}


def warm_up(model_factory):
    """Each skinfl method once on a tiny problem: lazy imports and torch's first autograd uses are not timed."""
    rng = np.random.RandomState(0)
    X, y = rng.rand(20, 64), np.arange(20) % 10
    model = model_factory()
    for method in methods():
        settings = settings_for(method, 640, 1.0, 1.0, A.QUICK)
        for key, value in (("rank", 5), ("krylov_dimension", 20), ("preconditioner_rank", 5), ("max_iter", 5),
                           ("scale", 100.0), ("batch_size", 10), ("minibatch_size", 10)):
            if settings.get(key) is not None:
                settings[key] = value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_skinfl(method, model, settings, X, y, X[:2], y[:2])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 training / 20 test points (about a minute)")
    parser.add_argument("--skip-pydvl", action="store_true", help="skinfl only (kronfluence runs in pyDVL's venv)")
    parser.add_argument("--skip-kronfluence", action="store_true", help="no kronfluence tasks")
    parser.add_argument("--reuse-truth", action="store_true",
                        help="read the leave-one-out truth stored by an earlier run (this script or accuracy.py)")
    parser.add_argument("--n-jobs", type=int, default=2, help="parallel retrainings for the ground truth")
    parser.add_argument("--pydvl-python", default=str(A.DEFAULT_PYDVL_PYTHON))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to the pyDVL worker")
    args = parser.parse_args(argv)
    if not args.skip_pydvl and not Path(args.pydvl_python).exists():
        parser.error(f"{args.pydvl_python} not found: run `bash benchmarks/setup_pydvl_env.sh` or pass --skip-pydvl")

    import torch

    import skinfl
    from skinfl import metrics
    from skinfl.retraining import LogisticRegressionRetrainer

    torch.set_num_threads(THREADS)
    setup = A.QUICK if args.quick else A.FULL
    name = "loo_logreg" + ("_quick" if args.quick else "") + (
        "_skinfl" if args.skip_pydvl else "_no-kronfluence" if args.skip_kronfluence else "")
    skipped = {"pydvl": args.skip_pydvl, "kronfluence": args.skip_pydvl or args.skip_kronfluence}
    command = " ".join(shlex.quote(a) for a in [sys.executable, os.path.relpath(__file__, P.REPO_ROOT),
                                                *(sys.argv[1:] if argv is None else argv)])
    started = _dt.datetime.now().astimezone()
    t0 = time.perf_counter()
    work = P.WORK_DIR / "loo_logreg" / ("quick" if args.quick else "")
    work.mkdir(parents=True, exist_ok=True)
    data = A.make_data(setup)
    np.savez(work / "data.npz", **data)
    X, y, X_test, y_test = data["X_train"], data["y_train"], data["X_test"], data["y_test"]

    retrain = LogisticRegressionRetrainer(C=A.C)
    model = retrain(X, y)
    regularization = retrain.regularization_for(len(X))
    n_params = sum(p.numel() for p in model.parameters())
    top = P.top_hessian_eigenvalue(model, torch.as_tensor(X), torch.as_tensor(y))
    print(f"[{setup.name}] logistic regression C={A.C}: {n_params} parameters, regularization "
          f"{regularization:.3g}, top Hessian eigenvalue {top:.4g}", flush=True)
    # The same key as accuracy.py's section A: either script can reuse the other's truth.
    loo, cost = A.ground_truth(
        setup, "loo", ("loo", X, y, X_test, y_test, A.retrainer_key(retrain)),
        lambda: metrics.leave_one_out_truth(retrain, X, y, X_test, y_test, loss=A.LOSS, n_jobs=args.n_jobs),
        args.reuse_truth,
    )
    print(f"  ground truth: {len(loo.removed) + 1} retrainings in {cost['seconds']:.1f} s"
          + (" (reused)" if cost["reused"] else ""), flush=True)

    warm_up(lambda: P._mlp(hidden=4).double())
    settings = {m: settings_for(m, n_params, top, regularization, setup) for m in methods()}
    results = {"skinfl": {}, "pydvl": {}, "kronfluence": {}}
    matrices = {}
    for method in methods():
        run = run_skinfl(method, model, settings[method], X, y, X_test, y_test)
        if run["status"] == "ok":
            matrices["skinfl", method] = run.pop("values")
            scores = metrics.leave_one_out_agreement(matrices["skinfl", method], loo)
            run.update(pearson=scores.pearson, spearman=scores.spearman)
            print(f"  skinfl {method:11s} Pearson {scores.pearson:.4f}  Spearman {scores.spearman:.4f}  "
                  f"({run['fit_s'] + run['influences_s']:.2f} s)", flush=True)
        else:
            print(f"  skinfl {method:11s} {run['status']}: {run['reason']}", flush=True)
        results["skinfl"][method] = run

    pydvl_versions = None
    if not args.skip_pydvl:
        torch.save(model.state_dict(), work / "logreg.pt")
        tasks = {}  # (library, method) -> task; pyDVL and kronfluence share one subprocess
        for lib in OTHERS:
            for method in methods():
                if skipped[lib]:
                    continue
                if unavailable(lib, method):
                    if lib == "pydvl":  # kronfluence, which has EK-FAC only, gets no entry: "-" in the table
                        results[lib][method] = {"status": "not available", "reason": unavailable(lib, method)}
                    continue
                prefix = "pydvl" if lib == "pydvl" else "kronfluence"
                task = {"name": f"logreg/{method}" if lib == "pydvl" else f"logreg/{lib}/{method}", "model": "logreg",
                        "method": method, "labels": "y_train", "batch_size": settings[method]["batch_size"],
                        "outputs": [{"query": "test", "regularization": regularization,
                                     "file": f"{prefix}_logreg_{method}.npy"}]}
                if method != "direct":
                    task["settings"] = settings[method]
                if lib == "kronfluence":
                    task["library"] = "kronfluence"
                tasks[lib, method] = task
        print("pyDVL and kronfluence (pyDVL's venv, one subprocess)", flush=True)
        pydvl = A.run_pydvl(SimpleNamespace(work_dir=work), list(tasks.values()), args.pydvl_python, THREADS,
                            args.timeout)
        if pydvl is not None:
            pydvl_versions = pydvl["versions"]
            for (lib, method), sent in tasks.items():
                task, output = A.pydvl_output(pydvl, sent["name"], "test", regularization)
                if output is None:
                    results[lib][method] = {"status": (task or {}).get("status", "missing")}
                    continue
                matrices[lib, method] = output["values"]
                scores = metrics.leave_one_out_agreement(output["values"], loo)
                results[lib][method] = {"status": "ok", "pearson": scores.pearson, "spearman": scores.spearman,
                                        "fit_s": task["fit_s"], "influences_s": output["seconds"],
                                        "warnings": task["warnings"]}
                if lib == "kronfluence":
                    results[lib][method]["settings"] = task["settings"].get("kronfluence")

    direct = matrices.get(("skinfl", "direct"))
    for (lib, method), matrix in matrices.items():
        if direct is not None:
            agreement = metrics.reference_agreement(matrix, direct)
            results[lib][method]["pearson_vs_skinfl_direct"] = agreement.pearson
        for other_lib in OTHERS:
            if lib == "skinfl" and (other_lib, method) in matrices:
                other = matrices[other_lib, method]
                results[lib][method].update({
                    f"pearson_vs_{other_lib}": float(np.corrcoef(matrix.ravel(), other.ravel())[0, 1]),
                    f"norm_ratio_vs_{other_lib}": float(np.linalg.norm(matrix) / np.linalg.norm(other)),
                })

    def cell(lib, method, key, spec):
        entry = results[lib].get(method) or {}
        if entry.get("status") != "ok":
            return entry.get("status", "-").split(":")[0] if key == "pearson" else "-"
        value = entry.get(key)
        if key == "seconds":
            value = entry["fit_s"] + entry["influences_s"]
        return "-" if value is None else format(value, spec)

    # kronfluence's columns only when it ran (it has EK-FAC only).
    libraries = ["skinfl", "pydvl"] + (["kronfluence"] if results["kronfluence"] else [])
    others = libraries[1:]
    names = {"skinfl": "skinfl", **OTHERS}
    header = (["method"] + [f"{names[lib]} Pearson" for lib in libraries]
              + [f"{names[lib]} Spearman" for lib in libraries] + [f"{names[lib]} s" for lib in libraries]
              + [f"skinfl vs {names[lib]} Pearson" for lib in others]
              + [f"||skinfl|| / ||{names[lib]}||" for lib in others])
    body = [[m] + [cell(lib, m, "pearson", ".4f") for lib in libraries]
            + [cell(lib, m, "spearman", ".4f") for lib in libraries]
            + [cell(lib, m, "seconds", ".2f") for lib in libraries]
            + [cell("skinfl", m, f"pearson_vs_{lib}", ".6f") for lib in others]
            + [cell("skinfl", m, f"norm_ratio_vs_{lib}", ".4f") for lib in others]
            for m in methods()]
    from _common import markdown_table, text_table

    print()
    print(text_table(header, body, n_left=1))
    total_s = time.perf_counter() - t0
    notes = [
        f"Logistic regression of accuracy.py section A: C={A.C}, no intercept, {n_params} parameters, solved "
        f"exactly; regularization 1/(C n) = {regularization:.3g}; float64; {setup.n_train} training and "
        f"{setup.n_test} test points; leave-one-out over all training points ({len(loo.removed) + 1} fits).",
        "Pearson / Spearman: per test point, across training points, of influences / n against the actual "
        "test-loss change after retraining without the point; averaged over test points.",
        "Settings (every library): " + "; ".join(
            f"{m}: " + ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("loss",)) for m, s in settings.items()),
        "pyDVL CG: solve_simultaneously=True, rtol=sqrt(1e-4), atol=1e-10 (it stops at ||r|| < max(rtol^2 ||b||, "
        "atol^2)); Arnoldi use_woodbury=True; DataInf BlockMode.LAYER_WISE; LiSSA minibatch = its DataLoader batch.",
        "ekfac: skinfl EkfacInfluence(fisher='true', n_target_draws=1, correct_eigenvalues=True, random_state=0); "
        "pyDVL EkfacInfluence(update_diagonal=True, hessian_regularization=regularization), its Fisher from one "
        "backward pass of sum_c sqrt(p_c) log p_c per batch, with two fixes (_solver_worker._fixed_ekfac_influence: "
        "factors in the model's dtype, float64 here, instead of torch's default float32; a Linear layer without "
        "bias read as its (out, in) weight, pyDVL 0.10.0 shifts it by taking the last out_features entries as "
        "a bias); kronfluence 1.0.1 Analyzer, FactorArguments(strategy='ekfac'), "
        "ScoreArguments(damping_factor=regularization), summed cross-entropy, float64 (_kronfluence.py), the "
        "bare Linear put in an nn.Sequential (prepare_model wraps modules inside a parent). ekfac_empirical: "
        "training labels instead of drawn targets (skinfl fisher='empirical', kronfluence "
        "use_empirical_fisher=True): no sampling, so the two should agree to rounding. cg_ekfac: skinfl "
        "CgInfluence(preconditioner='ekfac') with the cg settings.",
        f"Wall times are informative only: skinfl runs in this process, pyDVL and kronfluence in a subprocess, "
        f"each after a small warm-up; {THREADS} torch threads.",
    ]
    payload = {"command": command, "date": started.isoformat(timespec="seconds"), "total_s": total_s,
               "skinfl_version": skinfl.__version__, "skinfl_commit": P.git_state(), "pydvl": pydvl_versions,
               "machine": P.machine_info(THREADS, {}), "ground_truth": {"removed": len(loo.removed), **cost},
               "top_hessian_eigenvalue": top, "regularization": regularization, "settings": settings,
               "results": results, "notes": notes}
    P.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (P.RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2, default=A._json_default) + "\n")
    md = [f"# Leave-one-out agreement on the logistic regression ({setup.name})", "",
          f"- Command: `{command}` ({total_s / 60:.1f} minutes)",
          f"- Date: {started.strftime('%Y-%m-%d %H:%M %Z')}; skinfl {skinfl.__version__} (commit {P.git_state()})"
          + (f"; pyDVL {pydvl_versions['pydvl']} (torch {pydvl_versions['torch']}, numpy {pydvl_versions['numpy']})"
             if pydvl_versions else "")
          + (f"; kronfluence {pydvl_versions['kronfluence']} (pyDVL's venv)"
             if pydvl_versions and "kronfluence" in pydvl_versions and results["kronfluence"] else ""),
          "", markdown_table(header, body, n_left=1), "", "## Notes", ""] + [f"- {n}" for n in notes]
    warned = [f"{lib} {m}: {w}" for lib in results for m, r in results[lib].items() for w in r.get("warnings", [])]
    warned += [f"{lib} {m}: {r['status']} {r.get('reason', '')}" for lib in results for m, r in results[lib].items()
               if r.get("status") != "ok"]
    if warned:
        md += ["", "Warnings:", ""] + [f"- {w}" for w in warned]
    (P.RESULTS_DIR / f"{name}.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote benchmarks/results/{name}.json and .md ({total_s / 60:.1f} minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
