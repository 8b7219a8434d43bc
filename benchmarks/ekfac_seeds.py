"""EK-FAC's agreement with the exact Gauss-Newton influences over several seeds: skinfl against kronfluence.

With the true Fisher and one target drawn per training point (what
kronfluence and pyDVL do), an EK-FAC influence matrix is random: one run of
each library, as in bench_solvers.py, compares two draws. This script fits
skinfl's and kronfluence's EK-FAC (bench_solvers.py's ``ekfac`` settings)
with ``--seeds`` seeds on the hard problems and reports the mean and
standard deviation of the Pearson correlation with bench_solvers.py's
float64 Gauss-Newton reference (computed here if missing), next to skinfl's
exact expectation (``n_target_draws=None``), which draws nothing.

Results: ``results/ekfac_seeds.{md,json}`` (``_quick``: 200 points, mlp and tiny_wide, 2 seeds).
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


def main(argv=None):
    p = H.parser(__doc__, "200 training / 10 test points, mlp and tiny_wide, 2 seeds")
    p.add_argument("--seeds", type=int, help="seeds per library (default 8; --quick 2)")
    p.add_argument("--problems", help="default mlp,cnn,wide_mlp (--quick: mlp,tiny_wide)")
    args = p.parse_args(argv)
    H.check_pydvl(p, args)
    size = P.SETS["hard_quick" if args.quick else "hard"]
    seeds = args.seeds or (2 if args.quick else 8)
    problems = args.problems.split(",") if args.problems else list(size.default_problems)
    name = args.output or "ekfac_seeds" + "_quick" * args.quick + "_skinfl" * args.skip_pydvl
    run = H.Run(args, argv)
    models = S.prepare(size, problems, args)
    references = {q: S.reference(size, q, "gauss_newton", models[q], args) for q in problems}
    work = size.work_dir / "seeds"
    work.mkdir(exist_ok=True)

    def tasks(lib):
        out = []
        for q in problems:
            s = E.solver_settings("ekfac", n_params=models[q]["n_params"], top_eigenvalue=0.0,
                                  regularization=S.REGULARIZATION, batch_size=size.batch_size)
            for seed in range(seeds):
                out.append(E.task(f"{q} ekfac {seed}", P.model_spec(size.name, q), "ekfac", {**s, "random_state": seed},
                                  [E.output("test", work / f"{lib}_{q}_ekfac_{seed}.npy")], seed=seed))
            if lib == "skinfl":
                out.append(E.task(f"{q} ekfac_exact 0", P.model_spec(size.name, q), "ekfac_exact",
                                  {**s, "n_target_draws": None},
                                  [E.output("test", work / f"{lib}_{q}_ekfac_exact.npy")]))
        return out

    pearson, records = {}, []
    for lib in ("skinfl",) + ("kronfluence",) * (not args.skip_pydvl):
        record = E.run(lib, P.data_path(size.name), tasks(lib), args)
        H.say(record, f"{lib} ({len(tasks(lib))} fits, one worker)")
        records.append(record)
        for t in record.get("tasks", []):
            if t["status"] == "ok":
                q, method, _ = t["name"].split()
                matrix = np.load(H.REPO_ROOT / t["outputs"][0]["file"])
                reference = np.load(references[q]["path"])
                value = float(np.corrcoef(matrix.ravel(), reference.ravel())[0, 1])
                pearson.setdefault((lib, q, method), []).append(value)

    def spread(key):
        v = np.array(pearson.get(key, []))
        return f"{v.mean():.3f} ({v.std():.3f})" if len(v) else "-"

    header = ["problem", "skinfl, 1 draw: mean (sd)", "kronfluence, 1 draw: mean (sd)", "skinfl exact expectation",
              "skinfl per seed", "kronfluence per seed"]
    body = [[q, spread(("skinfl", q, "ekfac")), spread(("kronfluence", q, "ekfac")),
             H.fmt((pearson.get(("skinfl", q, "ekfac_exact")) or [None])[0], ".3f")]
            + [" ".join(f"{v:.3f}" for v in pearson.get((lib, q, "ekfac"), [])) or "-"
               for lib in ("skinfl", "kronfluence")]
            for q in problems]
    text = (f"{seeds} seeds per library; true Fisher, one drawn target per training point, eigenvalues corrected, "
            f"regularization {S.REGULARIZATION:g}, float32, batches of {size.batch_size}; the reference is "
            f"bench_solvers.py's float64 Gauss-Newton one ({size.n_test} x {size.n_train} influences). The exact "
            "expectation (n_target_draws=None, skinfl's default for 10 classes) draws nothing: one value.")
    run.write(name, "EK-FAC over seeds: Pearson correlation with the exact Gauss-Newton influences",
              [(None, text, H.table(header, body, n_left=1))], records=records,
              extra={"pearson": {" ".join(k): v for k, v in pearson.items()}, "seeds": seeds})
    return 0 if all(r["status"] in H.OK for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
