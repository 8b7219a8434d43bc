"""GridSearchCV over ``regularization`` with the factor cache (``memory=``): does a search cost about one fit?

For Arnoldi and Nystroem (rank 50), with CG and Direct for context, each in a
fresh process: one candidate (fit on the first training fold, score on its
held-out fold, ``regularization=1e-3``, no cache), then
``GridSearchCV(estimator, {"regularization": np.logspace(-4, 1, 8)},
cv=KFold(3), refit=False)`` with ``memory=`` a fresh temporary directory.
Ratio = (search time / 3) / one candidate, target <= 1.5. Scorings: the
estimator's own ``score`` and ``ReferenceAgreementScorer(DirectInfluence)``
(its reference influences computed before the timed part). Data: the hard
problems of bench_solvers.py (default ``mlp``); skinfl only.

Results: ``results/grid.{md,json}`` (``grid_quick``, ``grid_<problem>``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _estimators as E  # noqa: E402
import _harness as H  # noqa: E402
import _problems as P  # noqa: E402

GRID = (-4, 1, 8)  # np.logspace(*GRID)
N_SPLITS, RANK, TARGET_RATIO = 3, 50, 1.5
SETTINGS = {"arnoldi": {"rank": RANK}, "nystroem": {"rank": RANK}, "cg": {"rtol": 1e-4, "max_iter": 1000}, "direct": {}}


def measure(spec):
    """Worker entry: one candidate and the search, for one estimator and scoring."""
    import tempfile

    import numpy as np
    from sklearn.model_selection import GridSearchCV, KFold

    from skinfl.metrics import ReferenceAgreementScorer

    size, kind = P.SETS[spec["set"]], spec["estimator"]
    data = np.load(P.data_path(size.name))
    X, y = data["X_train"], data["y_train"]
    model = P.load_model(P.model_spec(size.name, spec["problem"]))
    n_params = sum(p.numel() for p in model.parameters())
    if kind == "direct" and n_params > size.direct_max_params:
        return {"status": "skipped", "reason": f"{n_params:,} parameters: no explicit Hessian"}
    settings = {**SETTINGS[kind], **({"rank": spec["rank"]} if "rank" in SETTINGS[kind] else {})}

    def make(**more):
        return E.skinfl_estimator(kind, model, {**settings, **more})

    cv = KFold(n_splits=N_SPLITS)
    splits = list(cv.split(X))
    out, scoring = {}, None
    if spec["scoring"] == "reference":
        direct = n_params <= size.direct_max_params
        reference = E.skinfl_estimator("direct" if direct else "cg", model, {"regularization": P.WEIGHT_DECAY,
                                                                              **({} if direct else {"rtol": 1e-6})})
        scoring = ReferenceAgreementScorer(reference)
        start = time.perf_counter()
        for train, test in splits:  # fill the scorer's cache (keyed on the fold's data) before timing
            holder = E.skinfl_estimator("cg", model, {"preconditioner": None}).fit(X[train], y[train])
            scoring.reference_influences(holder, X[test], y[test])
        out.update(reference_s=time.perf_counter() - start, reference=type(reference).__name__)

    def score(est, X_query, y_query):
        return est.score(X_query, y_query) if scoring is None else scoring(est, X_query, y_query)

    warm = E.skinfl_estimator(kind, model, {**settings, "regularization": 1.0,
                                            **({"rank": min(spec["rank"], 5)} if "rank" in settings else {})})
    warm.fit(X[:64], y[:64])
    if scoring is None:
        warm.score(X[64:96], y[64:96])
    rss_warm_mb = H.maxrss_mb()
    train, test = splits[0]
    estimator = make(regularization=P.WEIGHT_DECAY)
    start = time.perf_counter()
    estimator.fit(X[train], y[train])
    middle = time.perf_counter()
    out["candidate_score"] = score(estimator, X[test], y[test])
    end = time.perf_counter()
    out.update(candidate_fit_s=middle - start, candidate_score_s=end - middle, candidate_s=end - start,
               fitted=E.fitted_attributes(estimator))
    with tempfile.TemporaryDirectory(dir=size.work_dir) as directory:
        search = GridSearchCV(make(regularization=1e-2, memory=directory), {"regularization": np.logspace(*GRID)},
                              cv=cv, refit=False, n_jobs=1, error_score="raise", scoring=scoring)
        start = time.perf_counter()
        search.fit(X, y)
        out["search_s"] = time.perf_counter() - start
    results = search.cv_results_
    return {**out, "n_params": n_params, "rss_warm_mb": rss_warm_mb, "mean_fit_s": results["mean_fit_time"].tolist(),
            "mean_score_s": results["mean_score_time"].tolist(), "mean_test_score": results["mean_test_score"].tolist(),
            "best_regularization": float(search.best_params_["regularization"]),
            "ratio": (out["search_s"] / N_SPLITS) / out["candidate_s"],
            "fit_ratio": float(results["mean_fit_time"].sum()) / out["candidate_fit_s"]}


def main(argv=None):
    p = H.parser(__doc__, "200 training points (bench_solvers --quick's data), rank 20")
    p.add_argument("--problem", default="mlp", help="mlp (default), cnn or wide_mlp (tiny_wide with --quick)")
    p.add_argument("--estimators", default="arnoldi,nystroem,cg,direct")
    p.add_argument("--scoring", default="score,reference", help="score and/or reference (default both)")
    p.add_argument("--rank", type=int, help=f"Arnoldi and Nystroem rank (default {RANK}; --quick 20)")
    args = p.parse_args(argv)
    size = P.SETS["hard_quick" if args.quick else "hard"]
    rank = args.rank or (20 if args.quick else RANK)
    estimators, scorings = args.estimators.split(","), args.scoring.split(",")
    if args.problem not in size.problems or set(estimators) - set(SETTINGS) or set(scorings) - {"score", "reference"}:
        p.error(f"--problem among {size.problems}, --estimators among {list(SETTINGS)}, --scoring score,reference")
    name = args.output or "grid" + "_quick" * args.quick + ("" if args.problem == "mlp" else f"_{args.problem}")
    run = H.Run(args, argv)
    import bench_solvers

    model = bench_solvers.prepare(size, [args.problem], args)[args.problem]
    rows = []
    for scoring in scorings:
        for kind in estimators:
            spec = {"entry": "bench_grid:measure", "set": size.name, "problem": args.problem, "estimator": kind,
                    "scoring": scoring, "rank": rank}
            record = {**H.launch(spec, "skinfl", args), "estimator": kind, "scoring": scoring}
            H.say(record, f"{kind} {scoring}")
            rows.append(record)

    def cells(r):
        if r["status"] != "ok":
            return [r["estimator"], r["scoring"]] + ["-"] * 6 + [f"{r['status']}: {r.get('reason', '')}"]
        return [r["estimator"], r["scoring"],
                f"{r['candidate_s']:.2f} ({r['candidate_fit_s']:.2f} + {r['candidate_score_s']:.2f})",
                f"{r['search_s']:.2f}", f"{r['ratio']:.2f}", "yes" if r["ratio"] <= TARGET_RATIO else "no",
                f"{r['fit_ratio']:.2f}", f"{r['best_regularization']:.3g}", "ok"]

    header = ["estimator", "scoring", "one candidate s (fit + score)", "search s", "(search / 3) / candidate",
              f"<= {TARGET_RATIO}", "sum of mean fit times / candidate fit", "best regularization", "status"]
    notes = [
        f"Data: the {size.n_train} training points of bench_solvers.py's {size.name} problems, model {args.problem} "
        f"({model['n_params']:,} parameters) trained to a minimum of cross-entropy + {P.WEIGHT_DECAY:g}/2 "
        f"||theta||^2; float32; {args.threads} torch threads.",
        f"GridSearchCV(estimator, {{'regularization': np.logspace{GRID}}}, cv=KFold({N_SPLITS}), refit=False, "
        f"n_jobs=1), memory= a fresh temporary directory, random_state=0; Arnoldi and Nystroem rank {rank}, CG "
        "rtol=1e-4 max_iter=1000 (its default preconditioner), other parameters at their defaults.",
        f"One candidate: fit on the first training fold and score on its held-out fold, regularization="
        f"{P.WEIGHT_DECAY:g}, no cache. With the cache each fold should cost about one candidate (target <= "
        f"{TARGET_RATIO}). 'sum of mean fit times': the eight candidates' fit times (averaged over folds) over the "
        "candidate's fit.",
        "score: the estimator's own score (held-out curvature residual); reference: ReferenceAgreementScorer("
        f"DirectInfluence(regularization={P.WEIGHT_DECAY:g})) (mean per-query Pearson), whose reference influences "
        "are computed before the timed part (reference_s in the JSON).",
        "CG and Direct are context: CG's solves depend on regularization and are redone for every candidate; Direct "
        "caches the curvature matrix and refactorises it per candidate.",
    ]
    run.write(name, f"GridSearchCV over regularization with the factor cache ({size.name}, {args.problem})",
              [(None, None, H.table(header, [cells(r) for r in rows], n_left=2))], records=rows, notes=notes,
              settings={"grid": GRID, "rank": rank, "model": model})
    return 0 if all(r["status"] in H.OK for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
