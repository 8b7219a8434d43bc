"""Every inverse-curvature solver of skinfl, pyDVL 0.10.0 and kronfluence 1.0.1 (EK-FAC) on hard digits models.

Problems (``_problems`` set ``hard``: standardised digits, 1397 training and
100 test points; models trained in float64 to a minimum of cross-entropy +
1e-3/2 ||theta||^2, checked by CG): ``mlp`` (2,410 parameters), ``cnn``
(3,818), ``wide_mlp`` (85,002). ``--quick``: 200 / 10 points, ``mlp`` and
``tiny_wide`` (``--only cnn`` adds the CNN). Methods, with the same settings
for every library (``_estimators.solver_settings``, regularization 1e-3 =
the training penalty): cg, cg_plain, cg_ekfac, arnoldi<rank>,
nystroem<rank>, lissa, datainf, ekfac, ekfac_exact, ekfac_empirical.
Agreement is against a float64 reference computed once per model (Direct up
to 10,000 parameters, else CG at rtol 1e-8): of the Gauss-Newton matrix for
DataInf and EK-FAC, of the Hessian for the others.

Results: ``results/solvers.{md,json}``; ``--quick``, ``--only``,
``--skip-pydvl`` and ``--skip-kronfluence`` add ``_quick``, ``_<tokens>``,
``_skinfl`` and ``_no-kronfluence``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _estimators as E  # noqa: E402
import _harness as H  # noqa: E402
import _problems as P  # noqa: E402

REGULARIZATION = P.WEIGHT_DECAY
LIBRARIES = ("skinfl", "pydvl", "kronfluence")
HARDNESS_SYSTEMS = 5


def prepare(size, problems, args, timeout=None):
    """The data and the trained models (cached); their summaries."""
    record = H.launch({"entry": "_problems:prepare", "set": size.name, "problems": problems}, "skinfl", args, timeout)
    if record["status"] != "ok":
        sys.exit(f"preparing data and models: {record['status']}\n{record.get('error', '')}")
    return record["models"]


def cached(path, sha1, compute):
    """``compute()``'s record, cached next to ``path`` for the model with fingerprint ``sha1``."""
    meta = path.with_suffix(".json")
    if meta.exists() and json.loads(meta.read_text()).get("sha1") == sha1 and path.exists():
        return json.loads(meta.read_text())
    record = {**compute(), "sha1": sha1}
    if record["status"] == "ok":
        meta.write_text(json.dumps(record, indent=1, default=str))
    return record


def reference(size, problem, curvature, summary, args, timeout=None):
    """The float64 reference influences of ``curvature`` (``<problem>_reference[_gauss_newton].npy``)."""
    path = size.work_dir / f"{problem}_reference{'' if curvature == 'hessian' else '_' + curvature}.npy"
    direct = summary["n_params"] <= size.direct_max_params
    settings = {"regularization": REGULARIZATION, "batch_size": 512, "second_order": curvature}
    if not direct:
        settings.update(rtol=1e-8, max_iter=10000)
    task = E.task("reference", P.model_spec(size.name, problem, "float64"), "direct" if direct else "cg", settings,
                  [E.output("test", path)])
    print(f"  {problem}: the {curvature} reference ...", flush=True)
    record = cached(path, summary["state_dict_sha1"],
                    lambda: E.run("skinfl", P.data_path(size.name), [task], args, timeout))
    record.update(path=path, estimator="DirectInfluence" if direct else "CgInfluence(rtol=1e-8)")
    return record


def hardness(size, problem, summary, args):
    """Plain CG (no preconditioner, independent systems) at rtol 1e-4 on the first test gradients."""
    path = size.work_dir / f"{problem}_plain_cg.npy"
    settings = {"regularization": REGULARIZATION, "batch_size": size.batch_size, "rtol": 1e-4, "max_iter": 5000,
                "preconditioner": None, "cg_method": "independent"}
    task = E.task("plain CG", P.model_spec(size.name, problem), "cg_plain", settings,
                  [E.output("test", path, rows=HARDNESS_SYSTEMS)])
    record = cached(path, summary["state_dict_sha1"], lambda: E.run("skinfl", P.data_path(size.name), [task], args))
    residuals = (record.get("fitted") or {}).get("relative_residuals_", [])
    record.update(iterations=(record.get("fitted") or {}).get("n_iter_"), converged=sum(r <= 1e-4 for r in residuals))
    print(f"  {problem}: plain CG {record['iterations']} iterations ({record['converged']}/{HARDNESS_SYSTEMS} "
          "converged)", flush=True)
    return record


def parse_only(only, problems, methods, default_problems):
    tokens = [t for t in (only or "").split(",") if t]
    unknown = [t for t in tokens if t not in problems and t not in methods]
    if unknown:
        raise SystemExit(f"--only: {unknown} are neither problems {list(problems)} nor methods {list(methods)}")
    return ([p for p in problems if p in tokens] or list(default_problems),
            [m for m in methods if m in tokens] or list(methods))


def iterations(run):
    it = run.get("iterations") or {}
    if "n_iter_" in it:
        return str(it["n_iter_"])
    values = it.get("cg") or it.get("lissa") or []
    return "+".join(map(str, values[:3])) + "+..." * (len(values) > 3) or "-"


def main(argv=None):
    p = H.parser(__doc__, "200 training / 10 test points, small models, rank 50, LiSSA 100 steps")
    p.add_argument("--only", help="comma-separated problems and/or methods, e.g. mlp,cg or wide_mlp")
    p.add_argument("--ranks", help="Arnoldi and Nystroem ranks (default 50,100; --quick 50)")
    p.add_argument("--skip-kronfluence", action="store_true", help="no kronfluence runs")
    p.add_argument("--repeat", type=int, default=1, help="fresh processes per run; the fastest is kept")
    p.add_argument("--reference-timeout", type=float, default=10800.0, help="seconds to train a model or compute a "
                   "reference (once per model)")
    p.add_argument("--lissa-max-iter", type=int, help="LiSSA steps (default 1000; --quick 100)")
    p.add_argument("--pydvl-arnoldi-projected", action="store_true",
                   help="pyDVL Arnoldi with its default use_woodbury=False: V (D + lambda)^-1 V^T only")
    p.add_argument("--skinfl-cg-method", help="CgInfluence's method for the CG rows (default: its default)")
    args = p.parse_args(argv)
    H.check_pydvl(p, args)
    size = P.SETS["hard_quick" if args.quick else "hard"]
    ranks = [int(r) for r in (args.ranks or ("50" if args.quick else "50,100")).split(",")]
    lissa_max_iter = args.lissa_max_iter or (100 if args.quick else 1000)
    problems, methods = parse_only(args.only, size.problems, E.solver_methods(ranks), size.default_problems)
    name = args.output or "solvers" + "_quick" * args.quick + ("_" + args.only.replace(",", "-") if args.only else "") \
        + ("_skinfl" if args.skip_pydvl else "_no-kronfluence" if args.skip_kronfluence else "")
    skipped = {"pydvl": args.skip_pydvl, "kronfluence": args.skip_pydvl or args.skip_kronfluence}
    run = H.Run(args, argv)

    models = prepare(size, problems, args, args.reference_timeout)
    hard = {problem: hardness(size, problem, models[problem], args) for problem in problems}
    curvatures = dict.fromkeys(E.curvature_of(m) for m in methods)
    references = {(problem, c): reference(size, problem, c, models[problem], args, args.reference_timeout)
                  for problem in problems for c in curvatures}
    settings = {(problem, method): E.solver_settings(
        method, n_params=models[problem]["n_params"], top_eigenvalue=models[problem]["top_hessian_eigenvalue"],
        regularization=REGULARIZATION, batch_size=size.batch_size, lissa_max_iter=lissa_max_iter,
        arnoldi_projected=args.pydvl_arnoldi_projected, cg_method=args.skinfl_cg_method)
        for problem in problems for method in methods}

    runs = {}
    for problem in problems:
        for method in methods:
            ref = references[problem, E.curvature_of(method)]
            for lib in LIBRARIES:
                reason = E.unavailable(lib, method)
                if skipped.get(lib) or (lib == "kronfluence" and reason):
                    continue
                path = size.work_dir / f"{problem}_{lib}_{method}.npy"
                if reason:  # no process needed to say so
                    record = {"status": "not available", "reason": reason}
                else:
                    task = E.task(method, P.model_spec(size.name, problem), method, settings[problem, method],
                                  [E.output("test", path)])
                    record = H.best_of(args.repeat, lambda: E.run(lib, P.data_path(size.name), [task], args))
                    if record["status"] == "ok":
                        record["matrix"] = path
                    if record["status"] == "ok" and ref["status"] == "ok":
                        record.update(H.agreement(np.load(path), np.load(ref["path"])))
                H.say(record, f"{problem} {lib} {method}")
                runs[problem, lib, method] = {**record, "problem": problem, "lib": lib, "method": method}

    rows = []
    for problem in problems:
        for method in methods:
            row = {lib: runs.get((problem, lib, method), {}) for lib in LIBRARIES}
            mine = row["skinfl"]
            row.update(problem=problem, method=method, ratio={}, cross={})
            for lib in LIBRARIES[1:]:
                both = mine.get("status") == "ok" and row[lib].get("status") == "ok"
                row["ratio"][lib] = row[lib]["total_s"] / mine["total_s"] if both else None
                row["cross"][lib] = H.cross(np.load(mine["matrix"]), np.load(row[lib]["matrix"])) if both else None
            rows.append(row)
    libraries = [lib for lib in LIBRARIES if lib != "kronfluence" or any(row["kronfluence"] for row in rows)]
    others = libraries[1:]
    names = H.NAMES

    def side(run, key, spec):
        return H.fmt(run.get(key), spec) if run.get("status") == "ok" else run.get("status", "-")

    def cells(row):
        return ([row["problem"], f"{models[row['problem']]['n_params']:,}", row["method"]]
                + [side(row[lib], "total_s", ".2f") for lib in libraries]
                + [H.fmt(row["ratio"][lib], ".2f") + "x" * (row["ratio"][lib] is not None) for lib in others]
                + [f"{row[lib]['peak_mb']:.0f} (+{row[lib]['work_mb']:.0f})" if row[lib].get("status") == "ok" else "-"
                   for lib in libraries]
                + [side(row[lib], "pearson", ".6f") for lib in libraries]
                + [side(row[lib], "spearman_rows", ".4f") for lib in libraries]
                + [f"{iterations(row['skinfl'])} / {iterations(row['pydvl'])}"]
                + [H.fmt(c and f"{c['pearson']:.6f}, {c['norm_ratio']:.3f}")
                   for c in (row["cross"][lib] for lib in others)])

    header = (["problem", "params", "method"] + [f"{names[lib]} s" for lib in libraries]
              + [f"{names[lib]}/skinfl" for lib in others] + [f"{names[lib]} MB" for lib in libraries]
              + [f"{names[lib]} Pearson" for lib in libraries] + [f"{names[lib]} Spearman" for lib in libraries]
              + ["iterations skinfl / pyDVL"] + [f"skinfl vs {names[lib]}: Pearson, norm ratio" for lib in others])
    problems_table = H.table(
        ["problem", "params", "objective", "||grad|| at the end of training", "saddle escapes",
         f"float64 CG check of the minimum (rtol {P.MINIMUM_CHECK_RTOL:g})", "top Hessian eigenvalue",
         f"plain CG iterations (rtol 1e-4, first {HARDNESS_SYSTEMS} test points)", "converged", "reference"],
        [[q, f"{m['n_params']:,}", f"{m['objective']:.5f}", f"{m['gradient_norm']:.1e}", len(m["saddle_escapes"]),
          f"{m['minimum_check']['result']} in {m['minimum_check']['cg_iterations']}",
          f"{m['top_hessian_eigenvalue']:.4g}", H.fmt(hard[q]["iterations"], "d"),
          f"{hard[q]['converged']}/{HARDNESS_SYSTEMS}",
          "; ".join(f"{c}: {r['estimator'] if r['status'] == 'ok' else r['status']}"
                    for (q2, c), r in references.items() if q2 == q)] for q, m in models.items()], n_left=2)
    each = H.table(["problem", "library", "method", "fit s", "influences s", "warm-up s", "max rel diff",
                    "row Pearson", "fitted attributes", "warnings", "status"],
                   [[q, lib, m] + [side(r, k, s) for k, s in (("fit_s", ".2f"), ("influences_s", ".2f"),
                                                                  ("warmup_s", ".2f"), ("max_rel_diff", ".2e"),
                                                                  ("pearson_rows", ".5f"))]
                    + [", ".join(f"{k}={v}" for k, v in (r.get("fitted") or {}).items()
                                 if k != "relative_residuals_") or "-",
                       "; ".join(r.get("warnings", []) + r.get("log_warnings", []))[:200] or "-",
                       r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"[:160]]
                    for (q, lib, m), r in runs.items()])
    lissa = {q: settings[q, "lissa"]["scale"] for q in problems if (q, "lissa") in settings}
    notes = [
        "Time = fit + influences of every test point against every training point, in a fresh process after a "
        "warm-up run of the same method on a small model. pyDVL/skinfl > 1 means skinfl is faster. MB = peak "
        "resident memory of the worker (ru_maxrss); (+N) = what the timed work added.",
        f"Agreement with the float64 reference: Pearson over all entries, Spearman per test point (averaged); the "
        f"Gauss-Newton reference for {', '.join(E.GAUSS_NEWTON)}, the Hessian's for the others.",
        f"All libraries: float32, regularization={REGULARIZATION:g} (the training penalty), batch {size.batch_size} "
        f"(pyDVL's DataLoader batch divides n_train: it averages batch means unweighted), {args.threads} torch "
        f"threads, OMP_WAIT_POLICY={args.omp_wait_policy}.",
        "cg / cg_plain: block CG (pyDVL solve_simultaneously=True), max_iter 1000, skinfl rtol=1e-4, atol=0, pyDVL "
        "rtol=1e-2, atol=1e-10 (it stops at ||r|| < max(rtol^2 ||b||, atol^2)); cg: Nystroem preconditioner of rank "
        "100 (pyDVL's in a subclass whose _fit returns self, as 0.10.0's does not); cg_plain: none; cg_ekfac: "
        "skinfl's EK-FAC preconditioner. skinfl's CG method is "
        + (args.skinfl_cg_method or "its default") + " (see the fitted attributes).",
        "arnoldi<r>: krylov_dimension min(n_params, max(2r + 1, 20)), tol 1e-6, pyDVL use_woodbury="
        + ("False (its default: not the regularised inverse)" if args.pydvl_arnoldi_projected else "True") +
        "; nystroem<r>: pyDVL NystroemSketchInfluence; datainf: per layer (pyDVL BlockMode.LAYER_WISE, its batch "
        f"averaging corrected); lissa: scale {lissa} (3 x (top eigenvalue + regularization), rounded up), "
        "dampen 0, rtol 1e-10 so that both run every step, minibatches of the batch size.",
        "ekfac: true Fisher, one drawn target per point, eigenvalues corrected (skinfl random_state=0; kronfluence "
        "FactorArguments(strategy='ekfac'), damping_factor = regularization, summed losses; pyDVL "
        "update_diagonal=True, Linear layers only, its Fisher from one backward pass of sum_c sqrt(p_c) log p_c "
        "per batch): the three draw different targets. ekfac_exact: skinfl's exact expectation "
        "(n_target_draws=None); ekfac_empirical: training labels, no sampling (skinfl and kronfluence should agree "
        "to rounding).",
    ]
    for r in runs.values():
        r.pop("matrix", None)
    for r in references.values():
        r["path"] = str(Path(r["path"]).relative_to(H.REPO_ROOT))
    run.write(name, f"Solver benchmark ({size.name}: {size.n_train} training / {size.n_test} test points)",
              [("Problems", None, problems_table), ("Time, memory, agreement with the reference", None,
                                                    H.table(header, [cells(r) for r in rows])),
               ("Each run", None, each)], records=list(runs.values()), notes=notes,
              settings={f"{q} {m}": s for (q, m), s in settings.items()},
              extra={"models": models, "plain_cg": hard,
                     "references": {f"{q} {c}": r for (q, c), r in references.items()}})
    return 0 if all(r["status"] in H.OK for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
