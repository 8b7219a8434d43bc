"""GridSearchCV over ``regularization`` with the factor cache: does a search cost about one fit?

Usage::

    /work/venv/bin/python benchmarks/bench_grid.py [--quick] [--problem mlp] [--estimators arnoldi,nystroem,cg,direct]
                                                    [--scoring score,reference]

The factors of ``ArnoldiInfluence`` (eigenpairs) and ``NystroemInfluence``
(the sketch) do not depend on ``regularization``: with ``memory=`` a search
over it computes them once per training fold, and each further candidate
only rebuilds the cheap inverse. For each estimator and scoring, a fresh
process times

- one candidate: ``fit`` on the first training fold and its score on the
  held-out fold, without a cache;
- ``GridSearchCV(estimator, {"regularization": np.logspace(-4, 1, 8)},
  cv=KFold(3), refit=False)`` with ``memory=`` a fresh temporary directory;

and reports ``ratio = (search time / 3 folds) / one candidate`` (target
<= 1.5: eight candidates per fold cost at most 1.5 single fits). The data
are the hard problems' training points (bench_solvers.py; 1397 standardised
digits) and model (default ``mlp``, 2,410 parameters, trained to a minimum of
cross-entropy + 1e-3/2 ||theta||^2).

Scorings: ``score`` is the estimator's own ``score`` (held-out curvature
residual, ``random_state=0``); ``reference`` is
``skinfl.metrics.ReferenceAgreementScorer`` with ``DirectInfluence`` at the
training penalty (1e-3) as the reference (a ``CgInfluence`` with rtol=1e-6
above 10,000 parameters). The reference influences of each fold are
computed before the timed part (the scorer caches them), so the timings
are those of the searched estimator. ``CgInfluence`` (its preconditioner is
cached; the solves depend on ``regularization``) and ``DirectInfluence``
(the curvature matrix is cached) run for context. An estimator skinfl does
not have (yet) is reported as "not available".

Results: ``benchmarks/results/grid.{md,json}`` (``grid_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _problems as P  # noqa: E402

GRID = (-4, 1, 8)  # np.logspace(*GRID)
N_SPLITS = 3
RANK = 50
TARGET_RATIO = 1.5
CANDIDATE_REGULARIZATION = P.WEIGHT_DECAY
ESTIMATORS = {
    "arnoldi": ("ArnoldiInfluence", {"rank": RANK}),
    "nystroem": ("NystroemInfluence", {"rank": RANK}),
    "cg": ("CgInfluence", {"rtol": 1e-4, "max_iter": 1000}),
    "direct": ("DirectInfluence", {}),
}
DIRECT_MAX_PARAMS = 10_000


# ------------------------------------------------------------------- worker
def _estimator(skinfl, kind, model, rank, **params):
    name, defaults = ESTIMATORS[kind]
    cls = getattr(skinfl, name, None)
    if cls is None:
        return None, f"skinfl {skinfl.__version__} has no {name}"
    settings = {"loss": "cross_entropy", **defaults, **params}
    if "rank" in settings:
        settings["rank"] = rank
    estimator = cls(model)
    accepted = estimator.get_params(deep=False)
    missing = sorted(k for k in settings if k not in accepted)
    if missing:
        return None, f"skinfl {name} has no parameter {', '.join(missing)}"
    if "random_state" in accepted:
        settings["random_state"] = 0  # the same Nystroem test matrix / score probes for every candidate
    return estimator.set_params(**settings), None


def _warnings(caught):
    return sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})


def worker(spec):
    import tempfile
    import warnings

    import numpy as np
    import torch
    from sklearn.model_selection import GridSearchCV, KFold

    import skinfl
    from skinfl.metrics import ReferenceAgreementScorer

    torch.set_num_threads(spec["threads"])
    size = P.HARD_SIZES[spec["size"]]
    data = P.load_data(size)
    X, y = data["X_train"], data["y_train"]
    model = P.load_hard_model(spec["problem"], size)
    n_params = sum(p.numel() for p in model.parameters())
    out = {"estimator": spec["estimator"], "scoring": spec["scoring"], "n_samples": len(X), "n_params": n_params,
           "grid": np.logspace(*GRID).tolist(), "skinfl_version": skinfl.__version__}
    estimator, reason = _estimator(skinfl, spec["estimator"], model, spec["rank"],
                                   regularization=CANDIDATE_REGULARIZATION)
    if estimator is None:
        return {**out, "status": "not available", "reason": reason}
    if spec["estimator"] == "direct" and n_params > DIRECT_MAX_PARAMS:
        return {**out, "status": "skipped", "reason": f"{n_params:,} parameters: no explicit Hessian"}
    cv = KFold(n_splits=N_SPLITS)
    splits = list(cv.split(X))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scoring = None
        if spec["scoring"] == "reference":
            if n_params <= DIRECT_MAX_PARAMS:
                reference = skinfl.DirectInfluence(model, loss="cross_entropy", regularization=P.WEIGHT_DECAY)
            else:
                reference = skinfl.CgInfluence(model, loss="cross_entropy", regularization=P.WEIGHT_DECAY,
                                               rtol=1e-6, random_state=0)
            scoring = ReferenceAgreementScorer(reference)
            # The scorer caches the reference per (training fold, query fold): fill it before timing.
            start = time.perf_counter()
            for train, test in splits:
                # Any estimator fitted on the fold will do: the cache is keyed on its data. CG without a
                # preconditioner does no work in fit.
                holder = skinfl.CgInfluence(model, loss="cross_entropy", preconditioner=None)
                scoring.reference_influences(holder.fit(X[train], y[train]), X[test], y[test])
            out["reference_s"] = time.perf_counter() - start
            out["reference"] = type(reference).__name__

        def score(est, X_query, y_query):
            return est.score(X_query, y_query) if scoring is None else scoring(est, X_query, y_query)

        # Warm-up: lazy imports and torch's first use of its autograd paths.
        warm, _ = _estimator(skinfl, spec["estimator"], model, min(spec["rank"], 5), regularization=1.0)
        warm.fit(X[:64], y[:64])
        if scoring is None:
            warm.score(X[64:96], y[64:96])

        train, test = splits[0]
        start = time.perf_counter()
        estimator.fit(X[train], y[train])
        middle = time.perf_counter()
        out["candidate_score"] = score(estimator, X[test], y[test])
        end = time.perf_counter()
        out.update(candidate_fit_s=middle - start, candidate_score_s=end - middle, candidate_s=end - start,
                   candidate_regularization=CANDIDATE_REGULARIZATION, fitted={
                       k: v for k, v in vars(estimator).items()
                       if k.endswith("_") and not k.startswith("_") and isinstance(v, (int, float, str, bool))})

        with tempfile.TemporaryDirectory(dir=size.work_dir) as directory:
            searched, _ = _estimator(skinfl, spec["estimator"], model, spec["rank"], regularization=1e-2,
                                     memory=directory)
            if searched is None:
                return {**out, "status": "not available", "reason": "no memory parameter"}
            search = GridSearchCV(searched, {"regularization": np.logspace(*GRID)}, cv=cv, refit=False,
                                  n_jobs=1, error_score="raise", scoring=scoring)
            start = time.perf_counter()
            search.fit(X, y)
            out["search_s"] = time.perf_counter() - start
        results = search.cv_results_
        out.update(
            status="ok",
            mean_fit_s=results["mean_fit_time"].tolist(),
            mean_score_s=results["mean_score_time"].tolist(),
            mean_test_score=results["mean_test_score"].tolist(),
            best_regularization=float(search.best_params_["regularization"]),
            ratio=(out["search_s"] / N_SPLITS) / out["candidate_s"],
            fit_ratio=float(results["mean_fit_time"].sum()) / out["candidate_fit_s"],
        )
    out["warnings"] = _warnings(caught)
    return out


# ------------------------------------------------------------------ harness
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 training points (bench_solvers --quick's data)")
    parser.add_argument("--problem", default="mlp", help="mlp (default), cnn or wide_mlp (tiny_wide with --quick)")
    parser.add_argument("--estimators", default="arnoldi,nystroem,cg,direct")
    parser.add_argument("--scoring", default="score,reference", help="score and/or reference (default both)")
    parser.add_argument("--rank", type=int, default=None, help=f"Arnoldi/Nystroem rank (default {RANK}; --quick 20)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker)), default=str), flush=True)
        return 0

    from _common import command_line, launch, load_note, markdown_table, text_table, worker_env

    size = P.HARD_QUICK if args.quick else P.HARD
    if args.problem not in size.problems:
        parser.error(f"--problem {args.problem!r} not among {size.problems}")
    rank = args.rank or (20 if args.quick else RANK)
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    scorings = [s.strip() for s in args.scoring.split(",") if s.strip()]
    for kind in estimators:
        if kind not in ESTIMATORS:
            parser.error(f"--estimators: {kind!r} not in {sorted(ESTIMATORS)}")
    for kind in scorings:
        if kind not in ("score", "reference"):
            parser.error(f"--scoring: {kind!r} not in ['score', 'reference']")
    name = args.output or "grid" + ("_quick" if args.quick else "") + (
        f"_{args.problem}" if args.problem != "mlp" else "")
    command = command_line(argv, P.REPO_ROOT)
    started = _dt.datetime.now().astimezone()
    busy = load_note(P.cpu_count())
    if busy:
        print("WARNING: " + busy, flush=True)
    t0 = time.perf_counter()
    env = worker_env("skinfl", args.threads, repo_root=P.REPO_ROOT)

    # Data and the trained model, as bench_solvers.py makes them (cached).
    record, status, _, err = launch(sys.executable, HERE / "_solver_worker.py",
                                    ["prepare", "--size", size.name, "--problems", args.problem], env, args.timeout)
    if record is None:
        sys.exit(f"preparing data/model {status}:\n{err}")
    model_summary = record[args.problem]
    print(f"[{size.name}] {args.problem}: {model_summary['n_params']:,} parameters, {size.n_train} points, "
          f"KFold({N_SPLITS}), regularization grid np.logspace{GRID}, rank {rank}", flush=True)

    rows = []
    for scoring in scorings:
        for kind in estimators:
            spec = {"size": size.name, "problem": args.problem, "estimator": kind, "scoring": scoring,
                    "rank": rank, "threads": args.threads}
            rec, status, wall, err = launch(sys.executable, Path(__file__).resolve(),
                                            ["--worker", json.dumps(spec)], env, args.timeout)
            if rec is None:
                rec = {"estimator": kind, "scoring": scoring, "status": status, "stderr_tail": err}
            rec["worker_wall_s"] = wall
            rows.append(rec)
            line = f"  {kind:9s} {scoring:9s} {rec['status']}"
            if rec["status"] == "ok":
                line += (f": one candidate {rec['candidate_s']:.2f} s (fit {rec['candidate_fit_s']:.2f}), search "
                         f"{rec['search_s']:.2f} s, ratio {rec['ratio']:.2f}, best regularization "
                         f"{rec['best_regularization']:.3g}")
            elif rec.get("reason"):
                line += f": {rec['reason']}"
            print(line, flush=True)
            if rec.get("stderr_tail"):
                print("      " + rec["stderr_tail"].strip().replace("\n", "\n      ")[-1500:], flush=True)

    header = ["estimator", "scoring", "one candidate s (fit + score)", "search s", "(search / 3) / candidate",
              f"<= {TARGET_RATIO}", "sum of mean fit times / candidate fit", "best regularization", "status"]

    def cells(r):
        ok = r.get("status") == "ok"
        return [
            r["estimator"], r["scoring"],
            f"{r['candidate_s']:.2f} ({r['candidate_fit_s']:.2f} + {r['candidate_score_s']:.2f})" if ok else "-",
            f"{r['search_s']:.2f}" if ok else "-",
            f"{r['ratio']:.2f}" if ok else "-",
            ("yes" if r["ratio"] <= TARGET_RATIO else "no") if ok else "-",
            f"{r['fit_ratio']:.2f}" if ok else "-",
            f"{r['best_regularization']:.3g}" if ok else "-",
            r["status"] if ok else f"{r['status']}: {r.get('reason', '')}",
        ]

    body = [cells(r) for r in rows]
    print()
    print(text_table(header, body, n_left=2))
    total_s = time.perf_counter() - t0
    notes = [
        f"Data: the {size.n_train} training points of bench_solvers.py's {size.name} problems (standardised "
        f"digits), model {args.problem} ({model_summary['n_params']:,} parameters) trained to a minimum of "
        f"cross-entropy + {P.WEIGHT_DECAY:g}/2 ||theta||^2; float32; {args.threads} torch threads.",
        f"GridSearchCV(estimator, {{'regularization': np.logspace{GRID}}}, cv=KFold({N_SPLITS}), refit=False, "
        "n_jobs=1), the estimator with memory= a fresh temporary directory and random_state=0; Arnoldi and "
        f"Nystroem rank {rank}, CG rtol=1e-4 max_iter=1000 (its default preconditioner), other parameters at "
        "their defaults.",
        f"One candidate: fit on the first training fold and score on its held-out fold, regularization="
        f"{CANDIDATE_REGULARIZATION:g}, no cache. Ratio = (search time / {N_SPLITS}) / one candidate; with the "
        f"cache, each fold should cost about one candidate (target <= {TARGET_RATIO}). 'sum of mean fit times' "
        "adds the eight candidates' fit times (averaged over folds) and divides by the candidate's fit: the "
        "fits alone, without the scores.",
        "score: the estimator's own score (held-out curvature residual on up to 100 probes); reference: "
        "ReferenceAgreementScorer(DirectInfluence(regularization=1e-3)) (mean per-query Pearson), whose "
        "reference influences are computed before the timed part (reference_s in the JSON).",
        "CG and Direct are context: CG's solves depend on regularization and are redone for every candidate; "
        "Direct caches the curvature matrix and refactorises it per candidate.",
    ]
    P.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "date": started.isoformat(timespec="seconds"), "total_s": total_s,
               "skinfl_commit": P.git_state(), "machine": P.machine_info(args.threads, {}),
               "load_average_start": busy, "model": model_summary, "rows": rows, "notes": notes}
    (P.RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = [f"# GridSearchCV over regularization with the factor cache ({size.name}, {args.problem})", "",
          f"- Command: `{command}` ({total_s / 60:.1f} minutes)",
          f"- Date: {started.strftime('%Y-%m-%d %H:%M %Z')}; skinfl commit {P.git_state()}",
          f"- Machine: {P.machine_info(args.threads, {})['cpu']}, {P.cpu_count()} cores; 1-min load average "
          f"{os.getloadavg()[0]:.1f} at end"]
    if busy:
        md.append(f"- **{busy}**")
    md += ["", markdown_table(header, body, n_left=2), "", "## Notes", ""] + [f"- {n}" for n in notes]
    (P.RESULTS_DIR / f"{name}.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote benchmarks/results/{name}.json and .md ({total_s / 60:.1f} minutes)")
    return 0 if all(r["status"] in ("ok", "not available", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
