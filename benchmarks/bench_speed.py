"""Speed, peak memory and accuracy of skinfl's and pyDVL 0.10.0's Direct and CG on three digits models.

Problems (``_problems`` set ``speed``: ``load_digits``, ``X / 16``, 1400
training and 100 test points, models trained by Adam): ``mlp`` (2,410
parameters), ``cnn`` (3,818) and ``wide_mlp`` (85,002, CG only); ``--quick``:
200 / 10 points, ``mlp`` and ``tiny_wide`` (8,970). Every (problem, library,
method) runs in a fresh process that times ``fit`` and the test x training
influence matrix. Reference: skinfl's Direct, or (CG-only problems) a
float64 skinfl CG at rtol 1e-7, cached.

Results: ``results/speed.{md,json}`` (``_quick``, ``_<problems>``, ``_skinfl`` for partial runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _estimators as E  # noqa: E402
import _harness as H  # noqa: E402
import _problems as P  # noqa: E402
import bench_solvers as S  # noqa: E402

REGULARIZATION = 0.01
CG = {"regularization": REGULARIZATION, "rtol": 1e-4, "max_iter": 1000}


def settings(lib, method, n_train, pydvl_batch, pydvl_direct_batch):
    """skinfl: batches of 512, CG with its default Nystroem preconditioner (cg) or none (cg_plain, as pyDVL's CG).

    pyDVL: its CG in its default mode (one run per right-hand side, ``cg``) and block mode (``cg_block``);
    its Direct builds the Hessian per batch with torch.func.hessian (about 30 MB per sample on the CNN).
    """
    if lib == "skinfl":
        return {"direct": {"regularization": REGULARIZATION, "batch_size": 512},
                "cg": {**CG, "batch_size": 512, "preconditioner": "nystroem", "preconditioner_rank": 100},
                "cg_plain": {**CG, "batch_size": 512, "preconditioner": None},
                "cg_ref": {**CG, "batch_size": 512, "rtol": 1e-7, "max_iter": 5000}}[method]
    if method == "direct":
        return {"regularization": REGULARIZATION, "batch_size": pydvl_direct_batch}
    return {**CG, "batch_size": pydvl_batch, "preconditioner": None, "block": method == "cg_block"}


def main(argv=None):
    p = H.parser(__doc__, "200 training / 10 test points, mlp and tiny_wide")
    p.add_argument("--only", help="comma-separated problems (default: all of the size)")
    p.add_argument("--repeat", type=int, default=1, help="fresh processes per run; the fastest is kept")
    p.add_argument("--pydvl-batch-size", type=int, help="pyDVL's CG DataLoader batch (default n_train / 2)")
    p.add_argument("--pydvl-direct-batch-size", type=int, help="pyDVL's Direct batch (default: largest divisor <= 100)")
    args = p.parse_args(argv)
    H.check_pydvl(p, args)
    size = P.SETS["speed_quick" if args.quick else "speed"]
    problems = args.only.split(",") if args.only else list(size.problems)
    if set(problems) - set(size.problems):
        p.error(f"--only: {problems} not among {size.problems}")
    batch = args.pydvl_batch_size or size.n_train // 2
    direct_batch = args.pydvl_direct_batch_size or max(d for d in range(1, 101) if size.n_train % d == 0)
    name = args.output or "speed" + "_quick" * args.quick + ("_" + "-".join(problems) if args.only else "") + (
        "_skinfl" if args.skip_pydvl else "")
    run = H.Run(args, argv)

    prepared = H.launch({"entry": "_problems:prepare", "set": size.name, "problems": problems}, "skinfl", args)
    if prepared["status"] != "ok":
        sys.exit(f"preparing data and models: {prepared['status']}\n{prepared.get('error', '')}")
    models = prepared["models"]

    def measure(problem, lib, method, dtype="float32"):
        s = settings(lib, method, size.n_train, batch, direct_batch)
        path = size.work_dir / f"{problem}_{lib}_{method}.npy"
        task = E.task(method, P.model_spec(size.name, problem, dtype), method, s, [E.output("test", path)])
        record = H.best_of(args.repeat, lambda: E.run(lib, P.data_path(size.name), [task], args))
        H.say(record, f"{problem} {lib} {method}")
        return {**record, "problem": problem, "method": method, "n_params": models[problem]["n_params"],
                "matrix": path}

    references, rows = {}, []
    for problem in problems:
        direct = problem in ("mlp", "cnn")
        path = size.work_dir / f"{problem}_skinfl_{'direct' if direct else 'cg_ref'}.npy"
        if not direct:  # computed once per model
            S.cached(path, models[problem]["state_dict_sha1"], lambda: measure(problem, "skinfl", "cg_ref", "float64"))
        references[problem] = path
        for lib in ("skinfl",) + ("pydvl",) * (not args.skip_pydvl):
            methods = {"skinfl": ("direct", "cg", "cg_plain"), "pydvl": ("direct", "cg", "cg_block")}[lib]
            rows += [measure(problem, lib, m) for m in methods if direct or m != "direct"]

    for row in rows:
        row["is_reference"] = row["matrix"] == references[row["problem"]]
        if row["status"] == "ok" and not row["is_reference"] and references[row["problem"]].exists():
            row.update(H.agreement(np.load(row["matrix"]), np.load(references[row["problem"]])))
        mine = next((r for r in rows if r["problem"] == row["problem"] and r["lib"] == "skinfl" and r["status"] == "ok"
                     and r["method"] == {"cg_block": "cg"}.get(row["method"], row["method"])), None)
        if row["lib"] == "pydvl" and row["status"] == "ok" and mine:
            row["speedup"] = row["total_s"] / mine["total_s"]

    def cells(r):
        ok, ref = r["status"] == "ok", "(reference)" if r["is_reference"] else None
        return [r["problem"], f"{r['n_params']:,}", r["lib"], r["method"]] + [
            H.fmt(r.get(k) if ok else None, ".2f") for k in ("fit_s", "influences_s", "total_s")] + [
            H.fmt(r.get("speedup"), ".1f") + "x" * ("speedup" in r), H.fmt(r.get("peak_mb"), ".0f"),
            H.fmt(r.get("work_mb"), ".0f"), ref or H.fmt(r.get("max_rel_diff"), ".2e"),
            ref or H.fmt(r.get("pearson"), ".6f"), r["status"]]

    header = ["problem", "params", "library", "method", "fit s", "influences s", "total s", "skinfl speedup", "peak MB",
              "+MB", "max rel diff", "pearson", "status"]
    notes = [
        "skinfl speedup = pyDVL total / skinfl total for the same problem and method (pyDVL cg and cg_block against "
        "skinfl cg); > 1 means skinfl is faster. skinfl cg: CgInfluence with its default Nystroem preconditioner "
        "(rank 100, random_state=0); cg_plain: preconditioner=None, as pyDVL's CG.",
        "max rel diff = max|A - R| / max|R|, pearson = correlation of all entries with the reference R: skinfl direct, "
        "or for CG-only problems skinfl CG in float64 at rtol 1e-7 (cached).",
        "peak MB = ru_maxrss of the worker process; +MB = peak minus its ru_maxrss once torch, the library, data and "
        "model are loaded and a warm-up run of the same method on a small model is done. Timings exclude process "
        "start, imports and the warm-up.",
        f"regularization={REGULARIZATION}; skinfl batch_size=512; CG rtol=1e-4 (pyDVL rtol=1e-2, atol=1e-10: pyDVL "
        f"stops at ||r|| < max(rtol^2 ||b||, atol^2)), max_iter=1000; pyDVL DataLoader batch {batch} for CG (it "
        f"averages batch means unweighted, so the batch divides n_train) and {direct_batch} for Direct; "
        f"{args.threads} torch threads, OMP_WAIT_POLICY={args.omp_wait_policy}.",
    ]
    for row in rows:
        row["matrix"] = str(Path(row["matrix"]).relative_to(H.REPO_ROOT))
    run.write(name, f"Speed benchmark ({size.name}: {size.n_train} training / {size.n_test} test points)",
              [(None, None, H.table(header, [cells(r) for r in rows], n_left=4))], records=rows, notes=notes,
              settings={"models": models, "pydvl_batch": batch, "pydvl_direct_batch": direct_batch})
    return 0 if all(r["status"] in H.OK for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
