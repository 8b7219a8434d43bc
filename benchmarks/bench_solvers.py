"""Inverse-curvature solvers of skinfl against pyDVL 0.10.0's (and kronfluence 1.0.1's EK-FAC) on hard digits models.

Usage::

    /work/venv/bin/python benchmarks/bench_solvers.py [--quick] [--only TOKEN[,TOKEN...]] [--skip-pydvl]
                                                      [--skip-kronfluence]

Problems (standardised ``load_digits``, 1397 training and 100 test points;
models trained to a minimum of cross-entropy + 1e-3/2 ||theta||^2 with
full-batch LBFGS, cached under ``benchmarks/.work/hard/``):

* ``mlp``      64-32-10, Tanh                                          (2,410 parameters)
* ``cnn``      Conv2d(1,8,3)-Tanh-Conv2d(8,16,3)-Tanh-Linear(256,10)   (3,818 parameters)
* ``wide_mlp`` 64-256-256-10, Tanh                                     (85,002 parameters)

Methods, with the same settings on both sides (``regularization=1e-3``, the
training penalty): ``cg`` (block CG, Nystroem preconditioner of rank 100),
``cg_plain`` (block CG, no preconditioner), ``cg_ekfac`` (block CG, EK-FAC
preconditioner; skinfl only), ``arnoldi<rank>``, ``nystroem<rank>`` (ranks 50
and 100), ``lissa``, ``datainf``, ``ekfac`` (EK-FAC of the true Fisher, one
target drawn per point; also kronfluence's, run in pyDVL's venv; pyDVL's
supports nn.Linear only), ``ekfac_exact`` (skinfl's exact expectation over
the predictive distribution, which neither peer has) and ``ekfac_empirical`` (the same with the
training labels: skinfl and kronfluence, a deterministic check that both
compute the same thing).

Every (problem, library, method) runs in a fresh process (_solver_worker.py),
which times ``fit`` and the 100 x 1397 influence matrix and reports its peak
resident memory. Agreement is measured against a float64 reference (skinfl's
DirectInfluence up to 10,000 parameters, else CgInfluence with rtol=1e-8),
computed once per model and cached: of the Gauss-Newton matrix for the methods
that approximate it (EK-FAC, DataInf), of the Hessian for the others. A method a library does not have (yet) is
reported as "not available", pyDVL's EK-FAC on the CNN as "not supported".

Results: a table on stdout and ``benchmarks/results/solvers.{md,json}``
(``solvers_quick`` with ``--quick``; ``--only`` and ``--skip-pydvl`` add
suffixes so that partial runs never overwrite the full one).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _problems as P  # noqa: E402
from _common import (  # noqa: E402
    command_line, fmt, launch, load_note, markdown_table, text_table, worker_env,
)
import _solver_worker as W  # noqa: E402  (constants and settings; nothing heavy at import)

WORKER = HERE / "_solver_worker.py"
DEFAULT_PYDVL_PYTHON = HERE / ".venv-pydvl" / "bin" / "python"
LIBRARIES = ("skinfl", "pydvl", "kronfluence")
OTHERS = {"pydvl": "pyDVL", "kronfluence": "kronfluence"}  # compared with skinfl, with their display names


# ----------------------------------------------------------------- accuracy
def agreement(matrix, reference):
    """Pearson over all entries, mean per-test-row Spearman and Pearson, max|A - R| / max|R|."""
    from scipy import stats

    a = np.asarray(matrix, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        return {"note": f"shape {a.shape} != reference {r.shape}"}
    if not np.isfinite(a).all():
        return {"note": "non-finite values", "pearson": float("nan"), "spearman_rows": float("nan")}

    def rows(x, y):
        x = x - x.mean(axis=1, keepdims=True)
        y = y - y.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = (x * y).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        return float(np.nanmean(values))

    return {
        "pearson": float(np.corrcoef(a.ravel(), r.ravel())[0, 1]),
        "spearman_rows": rows(stats.rankdata(a, axis=1), stats.rankdata(r, axis=1)),
        "pearson_rows": rows(a, r),
        "max_rel_diff": float(np.abs(a - r).max() / np.abs(r).max()),
    }


# ------------------------------------------------------------------- output
def minimum(summary):
    """The training summary's check of the minimum: float64 CG on the objective's Hessian."""
    check = summary.get("minimum_check") or {}
    return f"{check.get('result', '-')} in {check.get('cg_iterations', '-')}"


def _iterations(run):
    it = (run or {}).get("iterations")
    if not it:
        return "-"
    if "n_iter_" in it:
        return str(it["n_iter_"])
    values = it.get("cg") or it.get("lissa") or []
    return "+".join(str(v) for v in values[:3]) + ("+..." if len(values) > 3 else "")


def _versus(mine, theirs):
    """Time ratio (theirs / mine) and a direct comparison of the two matrices, when both ran."""
    if mine.get("status") != "ok" or theirs.get("status") != "ok":
        return None, None
    ratio = theirs["total_s"] / mine["total_s"]
    a, b = (np.load(P.REPO_ROOT / run["matrix"]).astype(np.float64) for run in (mine, theirs))
    cross = None
    if a.shape == b.shape and np.isfinite(a).all() and np.isfinite(b).all():
        cross = {"pearson": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
                 "norm_ratio": float(np.linalg.norm(a) / np.linalg.norm(b))}
    return ratio, cross


def comparison_rows(runs, problems, methods):
    rows = []
    for problem in problems:
        for method in methods:
            row = {lib: runs.get((problem, lib, method)) or {} for lib in LIBRARIES}
            if not any(row.values()):
                continue
            row.update(problem=problem, method=method, ratio={}, cross={},
                       n_params=next((row[lib]["n_params"] for lib in LIBRARIES if row[lib].get("n_params")), None))
            for lib in OTHERS:
                row["ratio"][lib], row["cross"][lib] = _versus(row["skinfl"], row[lib])
            rows.append(row)
    return rows


def table_libraries(rows):
    """The libraries that get columns: kronfluence only when it ran (it has EK-FAC only)."""
    return [lib for lib in LIBRARIES if lib != "kronfluence" or any(row["kronfluence"] for row in rows)]


def header(libraries):
    names = {"skinfl": "skinfl", **OTHERS}
    others = [lib for lib in libraries if lib != "skinfl"]
    return (["problem", "params", "method"] + [f"{names[lib]} s" for lib in libraries]
            + [f"{names[lib]}/skinfl" for lib in others] + [f"{names[lib]} MB" for lib in libraries]
            + [f"{names[lib]} Pearson" for lib in libraries] + [f"{names[lib]} Spearman" for lib in libraries]
            + ["iterations skinfl / pyDVL"] + [f"skinfl vs {names[lib]}: Pearson, norm ratio" for lib in others])


def _cells(row, libraries):
    others = [lib for lib in libraries if lib != "skinfl"]

    def side(lib, key, spec):
        run = row[lib]
        if not run:
            return "-"
        if run.get("status") != "ok":
            return run.get("status", "-")
        return fmt(run.get(key), spec)

    def memory(lib):
        run = row[lib]
        if not run or run.get("status") != "ok":
            return "-"
        return f"{run['peak_mb']:.0f} (+{run['work_mb']:.0f})"

    def versus(lib):
        cross = row["cross"][lib]
        return "-" if cross is None else f"{cross['pearson']:.6f}, {cross['norm_ratio']:.3f}"

    return (
        [row["problem"], fmt(row["n_params"], ","), row["method"]]
        + [side(lib, "total_s", ".2f") for lib in libraries]
        + ["-" if row["ratio"][lib] is None else f"{row['ratio'][lib]:.2f}x" for lib in others]
        + [memory(lib) for lib in libraries]
        + [side(lib, "pearson", ".6f") for lib in libraries]
        + [side(lib, "spearman_rows", ".4f") for lib in libraries]
        + [f"{_iterations(row['skinfl'])} / {_iterations(row['pydvl'])}"]
        + [versus(lib) for lib in others]
    )


def detail_rows(runs):
    body = []
    for (problem, lib, method), run in runs.items():
        ok = run.get("status") == "ok"
        body.append([
            problem, lib, method,
            fmt(run.get("fit_s"), ".2f") if ok else "-", fmt(run.get("influences_s"), ".2f") if ok else "-",
            fmt(run.get("warmup_s"), ".2f") if ok else "-",
            fmt(run.get("max_rel_diff"), ".2e") if ok else "-", fmt(run.get("pearson_rows"), ".5f") if ok else "-",
            ", ".join(f"{k}={v}" for k, v in (run.get("fitted") or {}).items()
                      if k not in ("n_params_", "n_samples_fit_")) or "-",
            "; ".join(run.get("warnings", []) + run.get("log_warnings", []))[:200] or "-",
            run.get("status", "-") if ok else f"{run.get('status')}: {run.get('reason', '')}"[:160],
        ])
    return ["problem", "library", "method", "fit s", "influences s", "warm-up s", "max rel diff",
            "row Pearson", "fitted attributes", "warnings", "status"], body


# --------------------------------------------------------------------- main
def parse_only(only, problems, methods, default_problems):
    if not only:
        return list(default_problems), list(methods)
    tokens = [t.strip() for t in only.split(",") if t.strip()]
    unknown = [t for t in tokens if t not in problems and t not in methods]
    if unknown:
        raise SystemExit(f"--only: {unknown} are neither problems {list(problems)} nor methods {list(methods)}")
    chosen_problems = [p for p in problems if p in tokens] or list(default_problems)
    chosen_methods = [m for m in methods if m in tokens] or list(methods)
    return chosen_problems, chosen_methods


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="200 training / 10 test points, small models, rank 50, LiSSA 100 steps: a smoke test")
    parser.add_argument("--only", help="comma-separated problems and/or methods, e.g. mlp,cg or wide_mlp")
    parser.add_argument("--ranks", default=None, help="Arnoldi/Nystroem ranks (default 50,100; --quick 50)")
    parser.add_argument("--skip-pydvl", action="store_true", help="run skinfl only (kronfluence runs in pyDVL's venv)")
    parser.add_argument("--skip-kronfluence", action="store_true", help="no kronfluence runs (EK-FAC rows)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker (default 3600)")
    parser.add_argument("--reference-timeout", type=float, default=10800.0,
                        help="seconds for computing a reference (once per model; default 10800)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="fresh processes per configuration; the fastest is kept (peak memory: the largest)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every worker (default 2)")
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "default"), default="PASSIVE")
    parser.add_argument("--lissa-max-iter", type=int, default=None, help="LiSSA steps (default 1000; --quick 100)")
    parser.add_argument("--pydvl-arnoldi-projected", action="store_true",
                        help="pyDVL Arnoldi with use_woodbury=False (its default): V (D + lambda)^-1 V^T only")
    parser.add_argument("--skinfl-cg-method", default=None,
                        help="CgInfluence(solver=...) for the cg rows (method=... before skinfl 0.2), where "
                             "the parameter exists (default: its default)")
    parser.add_argument("--skinfl-python", default=sys.executable, help="interpreter with skinfl's dependencies")
    parser.add_argument("--pydvl-python", default=str(DEFAULT_PYDVL_PYTHON),
                        help="interpreter of pyDVL's venv (bash benchmarks/setup_pydvl_env.sh)")
    parser.add_argument("--output", help="results basename in benchmarks/results/ (default from the options)")
    args = parser.parse_args(argv)

    size = P.HARD_QUICK if args.quick else P.HARD
    ranks = [int(r) for r in (args.ranks or ("50" if args.quick else "50,100")).split(",")]
    lissa_max_iter = args.lissa_max_iter or (100 if args.quick else W.LISSA_MAX_ITER)
    problems, methods = parse_only(args.only, size.problems, W.method_names(ranks), size.default_problems)
    if not args.skip_pydvl and not Path(args.pydvl_python).exists():
        parser.error(f"{args.pydvl_python} not found: run `bash benchmarks/setup_pydvl_env.sh` or pass --skip-pydvl")
    name = args.output or "solvers" + ("_quick" if args.quick else "") + (
        "_" + "-".join(t.strip() for t in args.only.split(",")) if args.only else "") + (
        "_skinfl" if args.skip_pydvl else "_no-kronfluence" if args.skip_kronfluence else "")
    skipped = {"pydvl": args.skip_pydvl, "kronfluence": args.skip_pydvl or args.skip_kronfluence}
    command = command_line(argv, P.REPO_ROOT)
    started = _dt.datetime.now().astimezone()
    load_before = os.getloadavg()
    busy = load_note(P.cpu_count())
    if busy:
        print("WARNING: " + busy, flush=True)
    print(f"[{size.name}] {size.n_train} train / {size.n_test} test points, problems {problems}, methods {methods}, "
          f"{args.threads} threads, batch {size.batch_size}", flush=True)
    t0 = time.perf_counter()

    def skinfl_worker(*worker_args, timeout=args.timeout):
        return launch(args.skinfl_python, WORKER, [*worker_args, "--size", size.name, "--threads", str(args.threads)],
                      worker_env("skinfl", args.threads, args.omp_wait_policy, P.REPO_ROOT), timeout)

    # 1. data and models (trained once, cached).
    record, status, _, err = skinfl_worker("prepare", "--problems", ",".join(problems), timeout=args.reference_timeout)
    if record is None:
        sys.exit(f"preparing data/models {status}:\n{err}")
    models = record
    for problem, s in models.items():
        print(f"  {problem}: {s['n_params']:,} params, objective {s['objective']:.5f}, ||grad|| {s['gradient_norm']:.1e} "
              f"after {s['lbfgs_iterations']} LBFGS iterations ({s['training_s']:.0f} s), train acc "
              f"{s['train_accuracy']:.3f}, test acc {s['test_accuracy']:.3f}, top Hessian eigenvalue "
              f"{s['top_hessian_eigenvalue']:.4g}, {len(s.get('saddle_escapes', []))} saddle escapes, minimum "
              f"check: float64 CG {minimum(s)} iterations", flush=True)

    # 2. how hard each problem is: plain CG iterations (cached per model).
    hardness = {}
    for problem in problems:
        path = W.hardness_path(problem, size)
        cached = json.loads(path.read_text()) if path.exists() else {}
        if cached.get("state_dict_sha1") != models[problem]["state_dict_sha1"]:
            print(f"  {problem}: counting plain CG iterations ({W.HARDNESS_RHS} test gradients) ...", flush=True)
            cached, status, _, err = skinfl_worker("hardness", "--problem", problem)
            if cached is None:
                print(f"    {status}:\n{err}", flush=True)
                cached = {"status": status}
        hardness[problem] = cached
        if "iterations" in cached:
            print(f"  {problem}: plain CG needs {cached['iterations']} iterations at rtol {W.CG_RTOL:g} "
                  f"({cached.get('converged', '?')}/{cached.get('systems')} converged, {cached['seconds']:.0f} s)",
                  flush=True)

    # 3. references (float64, cached per model): the Hessian's for the solvers, the Gauss-Newton
    # matrix's for the methods that approximate it (EK-FAC, DataInf), where those are asked.
    curvatures = sorted({W.curvature_of(method) for method in methods}, key=W.CURVATURES.index)
    references = {}
    for problem in problems:
        for curvature in curvatures:
            path = W.reference_path(problem, size, curvature)
            meta_path = path.with_suffix(".json")
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            if not (path.exists() and meta.get("state_dict_sha1") == models[problem]["state_dict_sha1"]):
                print(f"  {problem}: computing the {curvature} reference ...", flush=True)
                meta, status, _, err = skinfl_worker("reference", "--problem", problem, "--curvature", curvature,
                                                     timeout=args.reference_timeout)
                if meta is None:
                    print(f"    reference {status}:\n{err}", flush=True)
                    meta = {"status": status}
                else:
                    print(f"    {meta['estimator']} in {meta['seconds']:.1f} s", flush=True)
            references[problem, curvature] = meta

    # 4. the runs, one fresh process each.
    runs = {}
    for problem in problems:
        for method in methods:
            curvature = W.curvature_of(method)
            reference = (np.load(W.reference_path(problem, size, curvature))
                         if "estimator" in references[problem, curvature] else None)
            for lib in LIBRARIES:
                if skipped.get(lib) or (lib == "kronfluence" and W.unavailable(lib, method)):
                    continue
                reason = W.unavailable(lib, method)
                if reason:  # no process needed to say so
                    runs[problem, lib, method] = {"problem": problem, "lib": lib, "method": method,
                                                  "status": "not available", "reason": reason}
                    print(f"  {problem:9s} {lib:11s} {method:15s} not available: {reason}", flush=True)
                    continue
                worker_args = ["run", "--problem", problem, "--lib", lib, "--method", method,
                               "--size", size.name, "--threads", str(args.threads),
                               "--lissa-max-iter", str(lissa_max_iter)]
                if args.pydvl_arnoldi_projected:
                    worker_args.append("--pydvl-arnoldi-projected")
                if args.skinfl_cg_method:
                    worker_args += ["--skinfl-cg-method", args.skinfl_cg_method]
                python = args.skinfl_python if lib == "skinfl" else args.pydvl_python  # kronfluence: pyDVL's venv
                attempts = []
                for _ in range(args.repeat):
                    rec, status, wall, err = launch(python, WORKER, worker_args,
                                                    worker_env(lib, args.threads, args.omp_wait_policy, P.REPO_ROOT), args.timeout)
                    attempts.append((rec, status, wall, err))
                    if rec is None or rec.get("status") != "ok":
                        break
                good = [a[0] for a in attempts if a[0] is not None and a[0].get("status") == "ok"]
                if good:
                    run = dict(min(good, key=lambda r: r["total_s"]))
                    run["peak_mb"] = max(r["peak_mb"] for r in good)
                    run["work_mb"] = run["peak_mb"] - run["rss_import_mb"]
                    run["all_total_s"] = [r["total_s"] for r in good]
                    if reference is not None:
                        run.update(agreement(np.load(P.REPO_ROOT / run["matrix"]), reference))
                else:
                    rec, status, wall, err = attempts[-1]
                    run = rec if rec is not None else {"problem": problem, "lib": lib, "method": method,
                                                       "status": status, "stderr_tail": err}
                run["worker_wall_s"] = attempts[-1][2]
                runs[problem, lib, method] = run
                line = f"  {problem:9s} {lib:11s} {method:15s} {run.get('status', '?'):13s}"
                if run.get("status") == "ok":
                    line += (f" fit {run['fit_s']:8.2f} s  influences {run['influences_s']:8.2f} s  "
                             f"peak {run['peak_mb']:6.0f} MB  Pearson {fmt(run.get('pearson'), '.5f')}  "
                             f"iterations {_iterations(run)}")
                elif run.get("reason"):
                    line += " " + run["reason"]
                print(line, flush=True)
                for message in run.get("warnings", []) + run.get("log_warnings", []):
                    print(f"      warning: {message[:200]}", flush=True)
                if run.get("stderr_tail"):
                    print("      " + run["stderr_tail"].strip().replace("\n", "\n      ")[-1500:], flush=True)

    # 5. tables and files.
    rows = comparison_rows(runs, problems, methods)
    libraries = table_libraries(rows)
    body = [_cells(row, libraries) for row in rows]
    print()
    print(text_table(header(libraries), body))
    versions = {}
    for lib in LIBRARIES:
        first = next((r for (_, l, _), r in runs.items() if l == lib and r.get("status") == "ok"), None)
        if first:
            versions.update({f"{lib}_version": first["library_version"], f"{lib}_env_torch": first["torch_version"],
                             f"{lib}_env_numpy": first["numpy_version"], "python": first["python"]})
    machine = P.machine_info(args.threads, versions)
    machine["load_average_1_5_15min"] = {"start": [round(x, 2) for x in load_before],
                                         "end": [round(x, 2) for x in os.getloadavg()]}
    settings = {p: {m: W.matched_settings(m, size, models[p], lissa_max_iter=lissa_max_iter,
                                          pydvl_arnoldi_woodbury=not args.pydvl_arnoldi_projected)
                    for m in methods} for p in problems}
    lissa_scales = {p: W.lissa_scale(models[p]["top_hessian_eigenvalue"], W.REGULARIZATION) for p in problems}
    notes = notes_for(size, args, lissa_scales, references)
    total_s = time.perf_counter() - t0

    P.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path, md_path = P.RESULTS_DIR / f"{name}.json", P.RESULTS_DIR / f"{name}.md"
    payload = {
        "command": command, "date": started.isoformat(timespec="seconds"), "total_s": total_s,
        "size": {"name": size.name, "n_train": size.n_train, "n_test": size.n_test, "batch_size": size.batch_size},
        "skinfl_commit": P.git_state(), "machine": machine, "settings": settings, "lissa_scale": lissa_scales,
        "models": models, "plain_cg": hardness, "references": {f"{p} {c}": r for (p, c), r in references.items()},
        "runs": list(runs.values()),
        "comparison": [{"problem": r["problem"], "method": r["method"],
                        **{f"{OTHERS[lib]}_over_skinfl_time": r["ratio"][lib] for lib in OTHERS},
                        **{f"skinfl_vs_{lib}": r["cross"][lib] for lib in OTHERS}} for r in rows],
        "notes": notes,
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")

    hard_body = [[p, f"{models[p]['n_params']:,}", f"{models[p]['objective']:.5f}", f"{models[p]['gradient_norm']:.1e}",
                  str(len(models[p].get("saddle_escapes", []))), minimum(models[p]),
                  f"{models[p]['top_hessian_eigenvalue']:.4g}", str(hardness[p].get("iterations", "-")),
                  f"{hardness[p].get('converged', '-')}/{hardness[p].get('systems', '-')}",
                  "; ".join(f"{c}: {r.get('estimator', r.get('status', '-'))}"
                            for (q, c), r in references.items() if q == p)] for p in problems]
    md = [
        f"# Solver benchmark ({size.name}: {size.n_train} training / {size.n_test} test points)",
        "",
        f"- Command: `{command}` ({total_s / 60:.1f} minutes)",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores ({args.threads} torch threads per worker), "
        f"{machine['memory']} RAM; 1-min load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        f"- skinfl {versions.get('skinfl_version', '?')} (commit {P.git_state()}), torch "
        f"{versions.get('skinfl_env_torch', '?')}; pyDVL {versions.get('pydvl_version', '-')} (own venv, torch "
        f"{versions.get('pydvl_env_torch', '-')}, numpy {versions.get('pydvl_env_numpy', '-')})"
        + (f"; kronfluence {versions['kronfluence_version']} (in pyDVL's venv)" if "kronfluence_version" in versions
           else ""),
    ]
    if busy:
        md.append(f"- **{busy}**")
    md += ["", "## Problems", "",
           markdown_table(["problem", "params", "objective", "||grad|| at the end of training", "saddle escapes",
                           f"float64 CG check of the minimum (rtol {P.MINIMUM_CHECK_RTOL:g})", "top Hessian eigenvalue",
                           f"plain CG iterations (rtol {W.CG_RTOL:g}, first {W.HARDNESS_RHS} test points)",
                           "converged", "reference"], hard_body, n_left=2),
           "", "## Time, memory, agreement with the reference", "",
           markdown_table(header(libraries), body), "", "## Each run", ""]
    detail_header, details = detail_rows(runs)
    md += [markdown_table(detail_header, details), "", "## Notes", ""] + [f"- {n}" for n in notes]
    md_path.write_text("\n".join(md) + "\n")
    print("\n".join(f"  {n}" for n in notes))
    print(f"\nwrote {json_path.relative_to(P.REPO_ROOT)} and {md_path.relative_to(P.REPO_ROOT)} "
          f"({total_s / 60:.1f} minutes)")
    return 0 if all(r.get("status") in ("ok", "not available", "not supported") for r in runs.values()) else 1


def notes_for(size, args, lissa_scales, references):
    refs = ", ".join(f"{p} {c}: {r.get('estimator', r.get('status'))}" for (p, c), r in references.items())
    return [
        "Time = fit + influences of every test point against every training point, in a fresh process after a "
        "small warm-up run of the same library and method (imports, first use of torch.func are not timed). "
        "pyDVL/skinfl > 1 means skinfl is faster.",
        "MB = peak resident memory of the worker (ru_maxrss); (+N) = what the timed work added to the "
        "high-water mark reached after imports, data, model and warm-up.",
        f"Agreement: Pearson over all {size.n_test} x {size.n_train} entries, and Spearman per test point "
        f"(across training points) averaged over test points, against a float64 reference ({refs}; Direct up "
        f"to {size.direct_reference_max_params:,} parameters, else CgInfluence rtol={W.REFERENCE_CG_RTOL:g}): "
        f"the inverse Gauss-Newton matrix for {', '.join(W.GAUSS_NEWTON_FAMILIES)}, which approximate it, the "
        "inverse Hessian for the others.",
        f"Both libraries: float32, regularization={W.REGULARIZATION:g} (the training penalty, so the model is "
        f"at a minimum of the objective whose Hessian is inverted), batch {size.batch_size} (skinfl batch_size; "
        "pyDVL DataLoader batch, which must divide n_train: pyDVL averages per-batch mean Hessians without "
        "weights), torch threads "
        f"{args.threads}, OMP_WAIT_POLICY={args.omp_wait_policy}.",
        f"cg / cg_plain: block CG on both sides (pyDVL solve_simultaneously=True), max_iter={W.CG_MAX_ITER}, "
        f"skinfl rtol={W.CG_RTOL:g}, atol=0; pyDVL stops at ||r|| < max(rtol^2 ||b||, atol^2), so it gets "
        f"rtol={W.CG_RTOL ** 0.5:g}, atol={W.PYDVL_CG_ATOL:g}. cg: Nystroem preconditioner of rank "
        f"{W.CG_PRECONDITIONER_RANK} on both sides (pyDVL: NystroemPreconditioner, in a subclass whose _fit "
        "returns self: pyDVL 0.10.0's returns None, and CgInfluence then silently runs without it); cg_plain: "
        "none. "
        "skinfl's CgInfluence(solver=...) is left at its default"
        + (f" ({args.skinfl_cg_method} asked)" if args.skinfl_cg_method else "") + ".",
        f"arnoldi<r>: rank r, krylov_dimension min(n_params, max(2r + 1, 20)) (pyDVL's default, given to both), "
        f"tol={W.ARNOLDI_TOL:g}; pyDVL use_woodbury="
        + ("False (its default: V (D + lambda)^-1 V^T b only)" if args.pydvl_arnoldi_projected else
           "True, i.e. (V D V^T + lambda I)^-1, the regularised low-rank inverse skinfl computes")
        + "; skinfl's solver is left at its default (recorded under fitted attributes).",
        "nystroem<r>: rank r on both sides (pyDVL NystroemSketchInfluence).",
        f"lissa: scale {lissa_scales} (3 x (top Hessian eigenvalue + regularization), rounded up), "
        f"dampen={W.LISSA_DAMPEN}, max_iter as in settings, minibatch {size.batch_size}, rtol={W.LISSA_RTOL:g} "
        "so that neither library stops early (pyDVL's criterion is max_i |step_i / h_i|, skinfl's its own): both "
        "run max_iter steps. pyDVL's LiSSA takes its minibatch size from the DataLoader. skinfl's defaults "
        "(minibatch_size=128, rtol='auto', which is 0 with mini-batches: max_iter steps) are not used.",
        "datainf: skinfl DataInfInfluence(second_order='gauss_newton'); pyDVL "
        "InverseHarmonicMeanInfluence(block_structure=BlockMode.LAYER_WISE) (its default is one block over all "
        "parameters; DataInf inverts per layer).",
        "Iterations: skinfl's n_iter_ where the estimator has it (CG: of the influences call; Arnoldi: its "
        "eigensolver's); pyDVL's from its DEBUG log (block CG and LiSSA iterations).",
        f"ekfac: skinfl EkfacInfluence(fisher='true', n_target_draws={W.EKFAC_N_TARGET_DRAWS}, "
        "correct_eigenvalues=True, random_state=0) (Kronecker blocks for Linear and Conv2d); pyDVL "
        "EkfacInfluence(update_diagonal=True, hessian_regularization=regularization) (Linear only: 'not supported' "
        "on the CNN; its Fisher comes from one backward pass of sum_c sqrt(p_c) log p_c per batch, not from drawn "
        "targets); kronfluence Analyzer with FactorArguments(strategy='ekfac') (true Fisher, one drawn target per "
        "point), ScoreArguments(damping_factor=regularization), summed cross-entropy as train loss and measurement "
        "(its eigenvalues are means over samples, so the damping is not rescaled; see _kronfluence.py), pairwise "
        "scores of every test point against every training point, factor and score files in a temporary folder "
        "under .work/ (their I/O is timed). The three draw their targets from different generators: their "
        "matrices differ by sampling noise.",
        "ekfac_exact: skinfl EkfacInfluence(fisher='true', n_target_draws=None): the exact expectation over the "
        "predictive distribution (one backward pass per class instead of a drawn target); neither peer has it.",
        "ekfac_empirical: the same with the training labels (skinfl fisher='empirical', kronfluence "
        "use_empirical_fisher=True): no sampling, so skinfl and kronfluence should agree to float32 rounding.",
        "cg_ekfac: skinfl CgInfluence(preconditioner='ekfac') with the cg settings; pyDVL has no EK-FAC "
        "preconditioner.",
    ]


if __name__ == "__main__":
    sys.exit(main())
