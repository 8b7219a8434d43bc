"""EK-FAC's agreement with the exact Gauss-Newton influences over several seeds: skinfl against kronfluence.

Usage::

    /work/venv/bin/python benchmarks/ekfac_seeds.py [--seeds 8] [--problems mlp,cnn,wide_mlp]

With the true Fisher and one target drawn per training point, an EK-FAC
influence matrix depends on the draws: one run of each library (as in
``bench_solvers.py``) compares two samples of noisy estimators. This script
fits both libraries' EK-FAC with ``--seeds`` different seeds on the hard
problems of ``bench_solvers.py`` (which trains the models and computes the
Gauss-Newton references: run it first with ``--only ekfac``) and reports the
mean and standard deviation of the Pearson correlation with the reference,
next to skinfl's exact expectation (``n_target_draws=None``, deterministic).
kronfluence runs in pyDVL's venv (``bash benchmarks/setup_pydvl_env.sh``):
this script calls itself there with ``--lib kronfluence``.

Results: a table on stdout and ``benchmarks/results/ekfac_seeds.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _problems as P  # noqa: E402
from _common import command_line, markdown_table  # noqa: E402

REGULARIZATION = 1e-3  # the training penalty, as in bench_solvers.py
PYDVL_PYTHON = HERE / ".venv-pydvl" / "bin" / "python"


def _data():
    import torch

    size = P.HARD
    arrays = [np.load(size.work_dir / f"data_{name}.npy") for name in ("X_train", "y_train", "X_test", "y_test")]
    return (torch.tensor(arrays[0], dtype=torch.float32), torch.tensor(arrays[1]),
            torch.tensor(arrays[2], dtype=torch.float32), torch.tensor(arrays[3]))


def pearson_by_seed(lib, problem, seeds, n_target_draws=1):
    """Pearson correlation with the Gauss-Newton reference of each seed's influence matrix."""
    import torch

    torch.set_num_threads(2)
    X, y, X_test, y_test = _data()
    model = P.load_hard_model(problem, P.HARD)
    reference = np.load(P.HARD.work_dir / f"{problem}_reference_gauss_newton.npy").ravel()
    values = []
    for seed in range(seeds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if lib == "skinfl":
                import skinfl

                estimator = skinfl.EkfacInfluence(model, loss="cross_entropy", regularization=REGULARIZATION,
                                                  batch_size=P.HARD.batch_size, n_target_draws=n_target_draws,
                                                  random_state=seed)
                matrix = estimator.fit(X, y).influences(X_test, y_test)
            else:
                import _kronfluence as K

                torch.manual_seed(seed)  # kronfluence draws its targets from torch's global generator
                with tempfile.TemporaryDirectory(dir=P.HARD.work_dir) as work_dir:  # its factor and score files
                    estimator = K.KronfluenceEkfac(model, regularization=REGULARIZATION,
                                                   batch_size=P.HARD.batch_size, work_dir=work_dir, name=f"seed{seed}")
                    matrix = estimator.fit(X, y).influences(X_test, y_test)
        values.append(float(np.corrcoef(matrix.numpy().ravel(), reference)[0, 1]))
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--problems", default="mlp,cnn,wide_mlp")
    parser.add_argument("--lib", choices=("skinfl", "kronfluence"), help=argparse.SUPPRESS)  # one library, as JSON
    args = parser.parse_args(argv)
    problems = args.problems.split(",")
    missing = [p for p in problems if not (P.HARD.work_dir / f"{p}_reference_gauss_newton.npy").exists()]
    if missing:
        sys.exit(f"no Gauss-Newton reference for {missing}: run `python benchmarks/bench_solvers.py --only "
                 f"{','.join(missing)},ekfac` first")
    if args.lib:
        print(json.dumps({p: pearson_by_seed(args.lib, p, args.seeds) for p in problems}))
        return 0

    results = {"skinfl": {p: pearson_by_seed("skinfl", p, args.seeds) for p in problems},
               "skinfl_exact": {p: pearson_by_seed("skinfl", p, 1, n_target_draws=None) for p in problems}}
    completed = subprocess.run([str(PYDVL_PYTHON), __file__, "--lib", "kronfluence", "--seeds", str(args.seeds),
                                "--problems", args.problems], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.exit(f"kronfluence failed:\n{completed.stderr[-3000:]}")
    results["kronfluence"] = json.loads(completed.stdout.strip().splitlines()[-1])

    header = ["problem", "skinfl, 1 draw: mean (sd)", "kronfluence, 1 draw: mean (sd)",
              "skinfl exact expectation", "skinfl per seed", "kronfluence per seed"]
    body = []
    for p in problems:
        a, b = np.array(results["skinfl"][p]), np.array(results["kronfluence"][p])
        body.append([p, f"{a.mean():.3f} ({a.std():.3f})", f"{b.mean():.3f} ({b.std():.3f})",
                     f"{results['skinfl_exact'][p][0]:.3f}", " ".join(f"{v:.3f}" for v in a),
                     " ".join(f"{v:.3f}" for v in b)])
    table = markdown_table(header, body, n_left=1)
    print(table)
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    md = ["# EK-FAC over seeds: Pearson correlation with the exact Gauss-Newton influences", "",
          f"- Command: `{command_line(argv, P.REPO_ROOT)}`", f"- Date: {started}; skinfl commit {P.git_state()}",
          f"- {args.seeds} seeds per library; true Fisher, one drawn target per training point, eigenvalues "
          f"corrected, regularization {REGULARIZATION:g}, float32, batches of {P.HARD.batch_size}; the reference "
          "is bench_solvers.py's float64 Gauss-Newton one (100 x 1397 influences). The exact expectation "
          "(n_target_draws=None, skinfl's default for 10 classes) draws nothing: one value.", "", table, ""]
    out = P.RESULTS_DIR / "ekfac_seeds"
    out.with_suffix(".md").write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps({"seeds": args.seeds, "date": started, "results": results},
                                                   indent=2) + "\n")
    print(f"wrote {out.with_suffix('.md').relative_to(P.REPO_ROOT)} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
