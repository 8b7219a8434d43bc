"""Accuracy of skinfl's and pyDVL 0.10.0's Direct and CG against retraining.

Data: ``load_digits``, ``X / 16``, split once into 1000 training, 50
validation and 100 test points; float64 models, cross-entropy.

A. Logistic regression (L2, C=0.1) solved exactly: influences / n against
   leave-one-out retraining of every training point (Pearson, Spearman).
B. MLP 64-32-10 Tanh (Adam): linear datamodeling score over 100 random
   half-size subsets, at the regularization where skinfl Direct's
   validation LDS is highest.
C. Agreement with skinfl's Direct (the MLP of B, a small CNN, the model of A).
D. Mislabel detection: 10% of the labels flipped, the MLP trained on them,
   self-influence as the detector (ROC AUC, share found in the top 10%).

The models and the ground truth are computed here (skinfl.retraining,
skinfl.metrics); every influence matrix, in a worker of each library, and is
scored by skinfl.metrics. Results: ``results/accuracy.{md,json}``
(``_quick``, ``_skinfl``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: the retrainings share the cores

import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import joblib  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _estimators as E  # noqa: E402
import _harness as H  # noqa: E402

SEED, C, LEARNING_RATE, WEIGHT_DECAY = 0, 0.1, 1e-2, 1e-3
ALPHA, FLIP_FRACTION, TOP_FRACTION, CONFIDENCE = 0.5, 0.1, 0.1, 0.95
LDS_TOLERANCE = 1e-3  # smaller LDS differences count as ties (CG tolerance); LDS intervals are far wider
METHODS, LIBRARIES = ("direct", "cg"), ("skinfl", "pydvl")
NAMES = {"skinfl": "skinfl", "pydvl": "pyDVL", "direct": "Direct", "cg": "CG"}
ARCHITECTURES = {"logreg": "logreg", "mlp": "mlp", "cnn": "cnn_small", "mlp_noisy": "mlp"}


@dataclass(frozen=True)
class Setup:
    name: str
    n_train: int
    n_val: int
    n_test: int
    epochs: int
    n_subsets: int
    grid: tuple
    pydvl_direct_batch: int  # pyDVL's DataLoader batches divide n_train
    pydvl_cg_batch: int

    @property
    def work_dir(self):
        return H.WORK_DIR / ("accuracy" if self.name == "full" else "accuracy_quick")


FULL = Setup("full", 1000, 50, 100, 500, 100, tuple(float(10.0 ** (k / 2)) for k in range(-6, 1)), 100, 500)
QUICK = Setup("quick", 200, 10, 20, 200, 20, (1e-2, 1e-1, 1.0), 100, 100)


def make_data(setup):
    """The fixed split, and the training labels with a seeded 10% flipped (each to another class)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.RandomState(SEED).permutation(len(X))
    ends = np.cumsum([setup.n_train, setup.n_val, setup.n_test])
    parts = dict(zip(("train", "val", "test"), np.split(order[:ends[-1]], ends[:2])))
    data = {f"{a}_{part}": (X / 16.0 if a == "X" else y.astype(np.int64))[rows]
            for part, rows in parts.items() for a in ("X", "y")}
    rng = np.random.RandomState(SEED + 1)
    flipped = np.sort(rng.choice(setup.n_train, size=int(round(FLIP_FRACTION * setup.n_train)), replace=False))
    noisy = data["y_train"].copy()
    noisy[flipped] = (noisy[flipped] + rng.randint(1, 10, size=len(flipped))) % 10
    return {**data, "y_train_noisy": noisy, "flipped": flipped}


def torch_retrainer(arch, epochs):
    import _problems as P
    from skinfl.retraining import TorchRetrainer

    return TorchRetrainer(P.build(arch).double(), loss="cross_entropy", optimizer="adam", learning_rate=LEARNING_RATE,
                          epochs=epochs, batch_size=None, weight_decay=WEIGHT_DECAY, init="reset", random_state=SEED)


def describe(model, data, labels="y_train"):
    import torch
    import torch.nn.functional as F

    out = {"n_params": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        for part, y in (("train", data[labels]), ("val", data["y_val"]), ("test", data["y_test"])):
            logits, target = model(torch.as_tensor(data[f"X_{part}"])), torch.as_tensor(y)
            out[f"{part}_loss"] = float(F.cross_entropy(logits, target))
            out[f"{part}_accuracy"] = float((logits.argmax(1) == target).double().mean())
    return out


def ground_truth(work_dir, tag, key, compute, reuse):
    """``compute()`` timed and stored under .work/; read back instead with ``reuse``."""
    path = work_dir / "truth" / f"{tag}-{joblib.hash(key)}.joblib"
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


def settings(lib, method, regularization, setup):
    """skinfl: its defaults (CG rtol 1e-4, Nystroem preconditioner of rank 100). pyDVL: block CG at the same
    tolerance (it stops at ||r|| < max(rtol^2 ||b||, atol^2)), without preconditioner."""
    if lib == "skinfl":
        return {"regularization": regularization}
    if method == "direct":
        return {"regularization": regularization, "batch_size": setup.pydvl_direct_batch}
    return {"regularization": regularization, "rtol": 1e-4, "max_iter": 1000, "block": True,
            "batch_size": setup.pydvl_cg_batch}


def model_spec(setup, key):
    return {"arch": ARCHITECTURES[key], "path": str((setup.work_dir / f"{key}.pt").relative_to(H.REPO_ROOT)),
            "dtype": "float64"}


def outputs_of(record, work_dir):
    """task name -> (task record, {(query, regularization): matrix})."""
    out = {}
    for task in record.get("tasks", []):
        matrices = {(o["query"], o.get("regularization", task["settings"]["regularization"])):
                    np.load(H.REPO_ROOT / o["file"]) for o in task.get("outputs", [])}
        out[task["name"]] = (task, matrices)
    return out


def main(argv=None):
    p = H.parser(__doc__, "200 training / 10 validation / 20 test points, 20 subsets")
    p.add_argument("--reuse-truth", action="store_true", help="read the ground truth stored by an earlier run")
    p.add_argument("--n-jobs", type=int, default=2, help="parallel retrainings for the ground truth")
    args = p.parse_args(argv)
    H.check_pydvl(p, args)
    import torch

    from skinfl import metrics
    from skinfl.metrics import DatamodelTruth
    from skinfl.retraining import LogisticRegressionRetrainer

    setup = QUICK if args.quick else FULL
    name = args.output or "accuracy" + "_quick" * args.quick + "_skinfl" * args.skip_pydvl
    run = H.Run(args, argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    work = setup.work_dir
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(setup)
    np.savez(work / "data.npz", **data)
    X, y, X_test, y_test = data["X_train"], data["y_train"], data["X_test"], data["y_test"]
    n_val = setup.n_val

    print(f"[{setup.name}] training the models and the ground truth", flush=True)
    retrain_lr = LogisticRegressionRetrainer(C=C)
    models = {"logreg": retrain_lr(X, y)}
    lr_regularization = retrain_lr.regularization_for(len(X))
    loo, loo_cost = ground_truth(
        work, "loo", ("loo", X, y, X_test, y_test, retrainer_key(retrain_lr)),
        lambda: metrics.leave_one_out_truth(retrain_lr, X, y, X_test, y_test, loss="cross_entropy",
                                            n_jobs=args.n_jobs), args.reuse_truth)
    retrain_mlp = torch_retrainer("mlp", setup.epochs)
    models["mlp"] = retrain_mlp(X, y)
    masks = metrics.random_subsets(len(X), ALPHA, setup.n_subsets, random_state=SEED)
    X_query, y_query = np.concatenate([data["X_val"], X_test]), np.concatenate([data["y_val"], y_test])
    lds_truth, lds_cost = ground_truth(
        work, "lds", ("lds", X, y, X_query, y_query, masks, retrainer_key(retrain_mlp)),
        lambda: metrics.datamodel_truth(retrain_mlp, X, y, X_query, y_query, loss="cross_entropy", masks=masks,
                                        n_jobs=args.n_jobs), args.reuse_truth)
    truth = {"val": DatamodelTruth(masks=lds_truth.masks, losses=lds_truth.losses[:n_val]),
             "test": DatamodelTruth(masks=lds_truth.masks, losses=lds_truth.losses[n_val:])}
    models["cnn"] = torch_retrainer("cnn_small", setup.epochs)(X, y)
    models["mlp_noisy"] = retrain_mlp(X, data["y_train_noisy"])
    for key, model in models.items():
        torch.save(model.state_dict(), work / f"{key}.pt")

    def lds(matrix, query="test"):
        scores = metrics.linear_datamodeling_score(matrix, truth[query], confidence=CONFIDENCE)
        return {"lds": scores.score, "interval": list(scores.interval)}

    def task(lib, key, method, regularization, queries, grid=None):
        files = [E.output(q, work / f"{lib}_{key}_{method}_{q}_{r:.4g}.npy", regularization=r)
                 for r in (grid or [regularization]) for q in queries]
        return E.task(f"{key}/{method}" + ("" if grid else f"/{regularization:.4g}"), model_spec(setup, key), method,
                      settings(lib, method, regularization, setup), files,
                      labels="y_train_noisy" if key == "mlp_noisy" else "y_train")

    # B's sweep selects the regularization of B, C and D: skinfl Direct's validation LDS.
    print("skinfl: the regularization sweep of Direct on the MLP", flush=True)
    sweep_record = E.run("skinfl", work / "data.npz", [task("skinfl", "mlp", "direct", r, ("val", "test"))
                                                       for r in setup.grid], args)
    if sweep_record["status"] != "ok":
        sys.exit(f"skinfl sweep: {sweep_record['status']}\n{sweep_record.get('error', '')}")
    sweep_runs = outputs_of(sweep_record, work)
    sweep = []
    for r in setup.grid:
        t, m = sweep_runs[f"mlp/direct/{r:.4g}"]
        sweep.append({"regularization": r, "skinfl": {
            "val": lds(m["val", r], "val")["lds"], "test": lds(m["test", r])["lds"],
            "solver": t["fitted"].get("solver_", "-"), "warnings": t["warnings"],
            "indefinite": any("NotPositiveDefinite" in w for w in t["warnings"])}})
    selected = max(sweep, key=lambda g: g["skinfl"]["val"])["regularization"]
    print(f"  selected regularization {selected:.3g}", flush=True)

    def tasks(lib):
        out = [task(lib, "logreg", m, lr_regularization, ["test"]) for m in METHODS]
        if lib == "pydvl":  # Direct fitted once; with_regularization for the sweep
            out.append(task(lib, "mlp", "direct", setup.grid[0], ("val", "test"), grid=setup.grid))
        out.append(task(lib, "mlp", "cg", selected, ["test"]))
        out += [task(lib, "cnn", m, selected, ["test"]) for m in METHODS]
        return out + [task(lib, "mlp_noisy", m, selected, ["self"]) for m in METHODS]

    records = [sweep_record]
    runs = {"skinfl": {**sweep_runs}}
    for lib in LIBRARIES[:1 + (not args.skip_pydvl)]:
        print(f"{lib}: every other matrix (one worker)", flush=True)
        record = E.run(lib, work / "data.npz", tasks(lib), args)
        H.say(record, lib)
        records.append(record)
        runs.setdefault(lib, {}).update(outputs_of(record, work))

    results = {"A": {}, "B": {}, "C": {}, "D": {}}
    matrices = {}  # (model, lib, method) -> test influences, for C

    def entry(section, lib, method, name, query, r, scores):
        t, m = runs[lib].get(name, (None, None))
        if not t or t.get("status") != "ok":
            return None
        matrix = m[query, r]
        seconds = next(o["seconds"] for o in t["outputs"] if o["query"] == query
                       and o.get("regularization", r) == r)
        results[section].setdefault(lib, {})[method] = {**scores(matrix), "fit_s": t["fit_s"], "influences_s": seconds,
                                                        "warnings": t["warnings"]}
        return matrix

    for lib in LIBRARIES:
        if lib not in runs:
            continue
        for method in METHODS:
            def loo_scores(matrix):
                s = metrics.leave_one_out_agreement(matrix, loo)
                return {"pearson": s.pearson, "spearman": s.spearman}

            def mislabel(matrix):
                s = metrics.mislabel_detection(matrix, data["flipped"], top_fraction=TOP_FRACTION)
                return {"roc_auc": s.roc_auc, "fraction_found": s.fraction_found}

            mlp_name = f"mlp/{method}" + ("" if lib == "pydvl" and method == "direct" else f"/{selected:.4g}")
            matrices["logreg", lib, method] = entry("A", lib, method, f"logreg/{method}/{lr_regularization:.4g}",
                                                    "test", lr_regularization, loo_scores)
            matrices["mlp", lib, method] = entry("B", lib, method, mlp_name, "test", selected, lds)
            matrices["cnn", lib, method] = entry("C", lib, method, f"cnn/{method}/{selected:.4g}", "test", selected,
                                                 lambda m: {})
            entry("D", lib, method, f"mlp_noisy/{method}/{selected:.4g}", "self", selected, mislabel)
    if "pydvl" in runs and "mlp/direct" in runs["pydvl"] and runs["pydvl"]["mlp/direct"][0]["status"] == "ok":
        m = runs["pydvl"]["mlp/direct"][1]
        for g in sweep:
            g["pydvl"] = {q: lds(m[q, g["regularization"]], q)["lds"] for q in ("val", "test")}
        best = max(sweep, key=lambda g: g["pydvl"]["val"])["regularization"]
        results["B"]["pydvl_own_selection"] = {"regularization": best, **lds(m["test", best])}
    agreement = {}
    for (problem, lib, method), matrix in matrices.items():
        reference = matrices.get((problem, "skinfl", "direct"))
        if matrix is not None and reference is not None and (lib, method) != ("skinfl", "direct"):
            s = metrics.reference_agreement(matrix, reference)
            agreement.setdefault(problem, {}).setdefault(lib, {})[method] = {
                "pearson": s.pearson, "spearman": s.spearman, "max_relative_difference": s.max_relative_difference}
    training_loss = metrics.query_losses(models["mlp_noisy"], "cross_entropy", X, data["y_train_noisy"])
    baseline = metrics.mislabel_detection(training_loss, data["flipped"], top_fraction=TOP_FRACTION)

    # ------------------------------------------------------------------ tables
    def get(section, lib, method, key, spec=".4f"):
        return H.fmt((results[section].get(lib, {}).get(method) or {}).get(key), spec)

    def interval(e):
        return "-" if not e else f"{e['lds']:.3f} [{e['interval'][0]:.3f}, {e['interval'][1]:.3f}]"

    libs = [lib for lib in LIBRARIES if lib in runs]
    table_a = H.table(["method"] + [f"{NAMES[lib]} {k}" for k in ("Pearson", "Spearman") for lib in libs],
                      [[NAMES[m]] + [get("A", lib, m, k) for k in ("pearson", "spearman") for lib in libs]
                       for m in METHODS], 1)
    rows = [[NAMES[m], f"{selected:.3g}"] + [interval(results["B"].get(lib, {}).get(m)) for lib in libs]
            for m in METHODS]
    own = results["B"].get("pydvl_own_selection")
    if own:
        rows.append(["Direct, each library's best validation regularization", f"{selected:.3g} / "
                     f"{own['regularization']:.3g}", interval(results["B"]["skinfl"]["direct"]), interval(own)])
    table_b = H.table(["method", "regularization"] + [f"{NAMES[lib]} LDS [95% CI]" for lib in libs], rows, 2)
    table_sweep = H.table(
        ["regularization", "skinfl Direct val LDS", "skinfl Direct test LDS", "pyDVL Direct val LDS",
         "pyDVL Direct test LDS", "skinfl Direct solver"],
        [[f"{g['regularization']:.3g}" + " (selected)" * (g["regularization"] == selected)]
         + [H.fmt(g.get(lib, {}).get(q), ".3f") for lib in LIBRARIES for q in ("val", "test")]
         + [g["skinfl"]["solver"] + " (indefinite: warned)" * g["skinfl"]["indefinite"]] for g in sweep], 1)
    table_c = H.table(
        ["model", "method"] + [f"{NAMES[lib]} {k}" for k in ("Pearson", "Spearman", "max rel diff") for lib in libs],
        [[{"mlp": "MLP", "cnn": "CNN", "logreg": "logistic regression"}[problem], NAMES[m]]
         + ["(reference)" if (lib, m) == ("skinfl", "direct") else
            H.fmt(agreement.get(problem, {}).get(lib, {}).get(m, {}).get(k), spec)
            for k, spec in (("pearson", ".6f"), ("spearman", ".6f"), ("max_relative_difference", ".2e"))
            for lib in libs]
         for problem in ("mlp", "cnn", "logreg") for m in METHODS], 2)
    rows = [[NAMES[m]] + [get("D", lib, m, k, ".3f") for k in ("roc_auc", "fraction_found") for lib in libs]
            for m in METHODS]
    rows += [[f"baseline: {label}", f"{auc:.3f}"] + [""] * (len(libs) - 1) + [f"{found:.3f}"] + [""] * (len(libs) - 1)
             for label, auc, found in (("training loss", baseline.roc_auc, baseline.fraction_found),
                                       ("random order", 0.5, baseline.random_fraction_found))]
    table_d = H.table(["self-influence"] + [f"{NAMES[lib]} ROC AUC" for lib in libs]
                      + [f"{NAMES[lib]} found in top {TOP_FRACTION:.0%}" for lib in libs], rows, 1)
    table_times = H.table(
        ["", "model", "method"] + [f"{NAMES[lib]} {k} s" for lib in libs for k in ("fit", "influences")],
        [[s, label, NAMES[m]] + [get(s, lib, m, k, ".2f") for lib in libs for k in ("fit_s", "influences_s")]
         for s, label in (("A", "logistic regression"), ("B", "MLP"), ("C", "CNN"),
                          ("D", "MLP, noisy labels (self-influence)")) for m in METHODS], 3)
    table_cost = H.table(["ground truth", "model", "retrainings", "seconds"],
                         [["leave-one-out", "logistic regression", len(loo.removed) + 1,
                           f"{loo_cost['seconds']:.1f}" + " (reused)" * loo_cost["reused"]],
                          [f"LDS, {setup.n_subsets} subsets of {ALPHA:.0%}", "MLP", setup.n_subsets,
                           f"{lds_cost['seconds']:.1f}" + " (reused)" * lds_cost["reused"]]], 2)
    described = {key: describe(m, data, "y_train_noisy" if key == "mlp_noisy" else "y_train")
                 for key, m in models.items()}
    targets = [(f"logistic regression LOO Pearson of skinfl {NAMES[m]} >= 0.99",
                (results["A"].get("skinfl", {}).get(m) or {}).get("pearson", 0) >= 0.99) for m in METHODS]
    for m in METHODS:
        mine, theirs = results["B"].get("skinfl", {}).get(m), results["B"].get("pydvl", {}).get(m)
        if mine and theirs:
            d = mine["lds"] - theirs["lds"]
            targets.append((f"MLP test LDS of skinfl {NAMES[m]} not below pyDVL {NAMES[m]}'s (difference {d:+.4f}; "
                            f"differences under {LDS_TOLERANCE} count as equal)", d >= -LDS_TOLERANCE))
    sections = [
        ("A. Logistic regression: leave-one-out agreement (test queries)",
         f"L2-regularised logistic regression (C={C}, no intercept, {described['logreg']['n_params']} parameters) "
         f"solved to its optimum; regularization 1/(C n) = {lr_regularization:.3g}. Mean over the {setup.n_test} test "
         f"points of the correlation, across all {len(loo.removed)} training points, between influences / n and the "
         "loss change after retraining without the point.", table_a),
        ("B. MLP: linear datamodeling score (test queries)",
         f"MLP 64-32-10, Tanh ({described['mlp']['n_params']} parameters), Adam lr {LEARNING_RATE}, {setup.epochs} "
         f"full-batch epochs, weight decay {WEIGHT_DECAY}. LDS over {setup.n_subsets} random subsets of {ALPHA:.0%} of "
         f"the training points; regularization chosen by skinfl Direct's LDS on the {n_val} validation points.",
         table_b),
        ("B'. Regularization sweep (LDS of Direct on the validation and test points)", None, table_sweep),
        ("C. Agreement with skinfl Direct (test queries, no retraining)",
         f"Influence matrices ({setup.n_test} test x {setup.n_train} training points) against skinfl Direct's: mean "
         f"per-test-point Pearson and Spearman, max|A - R| / max|R|. MLP of B and CNN Conv(1,4,3)-Tanh-Conv(4,8,3)-"
         f"Tanh-Linear(128,10) ({described['cnn']['n_params']} parameters, trained like the MLP) at regularization "
         f"{selected:.3g}; logistic regression of A at {lr_regularization:.3g}.", table_c),
        ("D. Mislabel detection (self-influence on the noisy training set)",
         f"{len(data['flipped'])} of {setup.n_train} training labels flipped to another class; the MLP trained on them "
         f"(train accuracy on the noisy labels {described['mlp_noisy']['train_accuracy']:.3f}); regularization "
         f"{selected:.3g}. ROC AUC of self-influence as a detector of flipped points, and the share of flipped "
         f"points among the {TOP_FRACTION:.0%} highest self-influences.", table_d),
        ("Wall times (seconds)", None, table_times), ("Ground-truth cost", None, table_cost),
        ("Targets", None, "\n".join(f"- {'met' if ok else '**not met**'}: {label}" for label, ok in targets)),
    ]
    indefinite = [f"{g['regularization']:.3g}" for g in sweep if g["skinfl"]["indefinite"]]
    notes = [
        "Sign convention (both libraries): positive influence = helpful; removing training point j changes the "
        "loss at query point i by about influences[i, j] / n.",
        "skinfl: DirectInfluence and CgInfluence with the Hessian and their other defaults (CG rtol=1e-4, Nystroem "
        "preconditioner of rank 100, random_state=0).",
        f"pyDVL: DirectInfluence (DataLoader batch {setup.pydvl_direct_batch}; fitted once for the sweep, "
        f"with_regularization changes it) and CgInfluence(solve_simultaneously=True, rtol=1e-2, atol=1e-10, "
        f"maxiter=1000) (batch {setup.pydvl_cg_batch}): the same relative 1e-4 as skinfl. pyDVL 0.10.0 has no "
        "self-influence: the diagonal of its symmetric influences on chunks of 200 training points.",
        "Wall times are informative only: each library runs in a worker, after a warm-up run of each method.",
        "The LDS ground truth is computed once for the validation and test points together; LDS and its Student-t "
        "95% interval are over query points.",
    ] + [f"The MLP's Hessian is indefinite (Adam does not reach an exact minimum): at regularization "
         f"{', '.join(indefinite)} skinfl Direct warns and falls back to an eigendecomposition."] * bool(indefinite)
    print("\n".join(f"target {'met' if ok else 'NOT met'}: {label}" for label, ok in targets))
    run.write(name, f"Accuracy benchmark ({setup.name}: {setup.n_train} training / {n_val} validation / "
              f"{setup.n_test} test points)", sections, records=records, notes=notes,
              settings={"setup": asdict(setup), "C": C, "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
                        "alpha": ALPHA, "selected_regularization": selected,
                        "logreg_regularization": lr_regularization},
              extra={"results": results, "sweep": sweep, "agreement": agreement, "models": described,
                     "targets": [{"target": label, "met": ok} for label, ok in targets]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
