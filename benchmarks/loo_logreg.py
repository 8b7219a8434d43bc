"""Leave-one-out agreement of every estimator of skinfl, pyDVL 0.10.0 and kronfluence 1.0.1 on a logistic regression.

The model and ground truth are section A of accuracy.py: L2 logistic
regression (C=0.1, no intercept, 640 parameters, one ``nn.Linear`` without
bias, float64) solved exactly; influences / n against leave-one-out
retraining of every training point (Pearson and Spearman per test point,
averaged). ``--reuse-truth`` reads the truth stored by an earlier run of
this script or of accuracy.py. Estimators: Direct and every method of
bench_solvers.py with its settings at the model's regularization 1/(C n)
(LiSSA: minibatch 100; Arnoldi and Nystroem at ranks 50 and 100).

Results: ``results/loo_logreg.{md,json}`` (``_quick``, ``_skinfl``, ``_no-kronfluence``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _estimators as E  # noqa: E402
import _harness as H  # noqa: E402
import _problems as P  # noqa: E402
import accuracy as A  # noqa: E402

RANKS = (50, 100)
LISSA_MINIBATCH = 100  # divides both setups' n_train (pyDVL takes LiSSA's minibatch from its DataLoader)


def main(argv=None):
    p = H.parser(__doc__, "200 training / 20 test points")
    p.add_argument("--skip-kronfluence", action="store_true", help="no kronfluence runs")
    p.add_argument("--reuse-truth", action="store_true", help="the leave-one-out truth of an earlier run")
    p.add_argument("--n-jobs", type=int, default=2, help="parallel retrainings for the ground truth")
    args = p.parse_args(argv)
    H.check_pydvl(p, args)
    import torch

    from skinfl import metrics
    from skinfl.retraining import LogisticRegressionRetrainer

    setup = A.QUICK if args.quick else A.FULL
    name = args.output or "loo_logreg" + "_quick" * args.quick + (
        "_skinfl" if args.skip_pydvl else "_no-kronfluence" if args.skip_kronfluence else "")
    run = H.Run(args, argv)
    torch.set_num_threads(args.threads)
    work = H.WORK_DIR / ("loo_logreg_quick" if args.quick else "loo_logreg")
    work.mkdir(parents=True, exist_ok=True)
    data = A.make_data(setup)
    np.savez(work / "data.npz", **data)
    X, y, X_test, y_test = data["X_train"], data["y_train"], data["X_test"], data["y_test"]
    retrain = LogisticRegressionRetrainer(C=A.C)
    model = retrain(X, y)
    torch.save(model.state_dict(), work / "logreg.pt")
    regularization = retrain.regularization_for(len(X))
    n_params = sum(p.numel() for p in model.parameters())
    top = P.top_hessian_eigenvalue(model, torch.as_tensor(X), torch.as_tensor(y))
    # The same key as accuracy.py's section A: either script can reuse the other's truth.
    loo, cost = A.ground_truth(setup.work_dir, "loo", ("loo", X, y, X_test, y_test, A.retrainer_key(retrain)),
                               lambda: metrics.leave_one_out_truth(retrain, X, y, X_test, y_test, loss="cross_entropy",
                                                                   n_jobs=args.n_jobs), args.reuse_truth)
    print(f"[{setup.name}] {n_params} parameters, regularization {regularization:.3g}, top Hessian eigenvalue "
          f"{top:.4g}; ground truth: {len(loo.removed) + 1} fits in {cost['seconds']:.1f} s", flush=True)

    methods = ["direct", *(m for m in E.solver_methods(RANKS) if m != "cg_plain")]
    settings = {m: {"regularization": regularization, "batch_size": setup.pydvl_direct_batch} if m == "direct" else
                E.solver_settings(m, n_params=n_params, top_eigenvalue=top, regularization=regularization,
                                  batch_size=LISSA_MINIBATCH if m == "lissa" else setup.pydvl_cg_batch)
                for m in methods}
    spec = {"arch": "logreg", "path": str((work / "logreg.pt").relative_to(H.REPO_ROOT)), "dtype": "float64"}
    libraries = ["skinfl"] + ["pydvl"] * (not args.skip_pydvl) + ["kronfluence"] * (
        not args.skip_pydvl and not args.skip_kronfluence)
    results, matrices, records = {}, {}, []
    for lib in libraries:
        wanted = [m for m in methods
                  if lib != "kronfluence" or (E.family_of(m) == "ekfac" and not E.unavailable(lib, m))]
        tasks = [E.task(m, spec, m, settings[m], [E.output("test", work / f"{lib}_{m}.npy")]) for m in wanted
                 if not E.unavailable(lib, m)]
        record = E.run(lib, work / "data.npz", tasks, args)
        H.say(record, f"{lib} ({len(tasks)} estimators, one worker)")
        records.append(record)
        done = {t["name"]: t for t in record.get("tasks", [])}
        for m in wanted:
            t = done.get(m) or {"status": E.unavailable(lib, m) and "not available" or record["status"],
                                "reason": E.unavailable(lib, m)}
            results[lib, m] = t
            if t["status"] == "ok":
                matrices[lib, m] = np.load(work / f"{lib}_{m}.npy")
                s = metrics.leave_one_out_agreement(matrices[lib, m], loo)
                t.update(pearson=s.pearson, spearman=s.spearman)

    for (lib, m), matrix in matrices.items():
        if ("skinfl", "direct") in matrices:
            results[lib, m]["pearson_vs_skinfl_direct"] = metrics.reference_agreement(
                matrix, matrices["skinfl", "direct"]).pearson
        for other in libraries[1:]:
            if lib == "skinfl" and (other, m) in matrices:
                results[lib, m][f"vs_{other}"] = H.cross(matrix, matrices[other, m])

    def cell(lib, m, key, spec):
        r = results.get((lib, m)) or {}
        if r.get("status") != "ok":
            return r.get("status", "-") if key == "pearson" else "-"
        if key.startswith("vs_"):
            c = r.get(key[:-2])
            return H.fmt(c and c[{"_p": "pearson", "_n": "norm_ratio"}[key[-2:]]], spec)
        return H.fmt(r["total_s"] if key == "seconds" else r.get(key), spec)

    others = libraries[1:]
    names = H.NAMES
    header = (["method"] + [f"{names[lib]} {k}" for k in ("Pearson", "Spearman", "s") for lib in libraries]
              + [f"skinfl vs {names[lib]} Pearson" for lib in others]
              + [f"||skinfl|| / ||{names[lib]}||" for lib in others])
    body = [[m] + [cell(lib, m, k, s) for k, s in (("pearson", ".4f"), ("spearman", ".4f"), ("seconds", ".2f"))
                   for lib in libraries]
            + [cell("skinfl", m, f"vs_{lib}_p", ".6f") for lib in others]
            + [cell("skinfl", m, f"vs_{lib}_n", ".4f") for lib in others] for m in methods]
    notes = [
        f"Logistic regression of accuracy.py section A: C={A.C}, no intercept, {n_params} parameters, solved exactly; "
        f"regularization 1/(C n) = {regularization:.3g}; float64; {setup.n_train} training and {setup.n_test} test "
        f"points; leave-one-out over all training points ({len(loo.removed) + 1} fits).",
        "Pearson / Spearman: per test point, across training points, of influences / n against the actual test-loss "
        "change after retraining without the point; averaged over test points.",
        "Settings (every library): " + "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in s.items())
                                                 for m, s in settings.items()),
        "As in bench_solvers.py (see its notes and the README); pyDVL's EK-FAC with the fixes for float64 models and "
        "Linear layers without bias, kronfluence with the bare Linear in an nn.Sequential, in float64.",
        "Wall times are informative only: each library in one worker, after a warm-up run of each method.",
    ]
    warned = [f"{lib} {m}: {w}" for (lib, m), r in results.items() for w in r.get("warnings", [])]
    warned += [f"{lib} {m}: {r['status']} {r.get('reason') or ''}" for (lib, m), r in results.items()
               if r.get("status") != "ok"]
    run.write(name, f"Leave-one-out agreement on the logistic regression ({setup.name})",
              [(None, None, H.table(header, body, n_left=1))]
              + [("Warnings", None, "\n".join(f"- {w}" for w in warned))] * bool(warned),
              records=records, notes=notes, settings=settings,
              extra={"ground_truth": {"removed": len(loo.removed), **cost}, "top_hessian_eigenvalue": top,
                     "results": {f"{lib} {m}": r for (lib, m), r in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
