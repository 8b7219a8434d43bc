"""Speed, memory and accuracy of skinfl against pyDVL 0.10.0 on three digits models.

Usage::

    /work/venv/bin/python benchmarks/bench_speed.py [--quick] [--only PROBLEM[,PROBLEM]] [--skip-pydvl]

Problems (scikit-learn ``load_digits``, 1400 training and 100 test points,
cross-entropy, trained once and cached under ``benchmarks/.work/``):

* ``mlp``      Linear(64,32)-Tanh-Linear(32,10)                      (2,410 parameters)
* ``cnn``      Conv2d(1,8,3)-Tanh-Conv2d(8,16,3)-Tanh-Linear(256,10) (3,818 parameters)
* ``wide_mlp`` 64-256-256-10 with Tanh                               (85,002 parameters)

Every (problem, library, method) runs in its own process, so the peak
resident memory reported is that run's alone. Each run times ``fit`` and the
(test x training) influence matrix separately. Accuracy is measured against
skinfl's DirectInfluence (mlp, cnn) or a float64 skinfl CgInfluence with
rtol=1e-7 (wide_mlp, computed once and cached).

Results: a table on stdout, ``benchmarks/results/<name>.json`` and
``benchmarks/results/<name>.md`` where ``<name>`` is ``speed`` for the full run,
with ``_quick`` / ``_<problems>`` / ``_skinfl`` appended for partial runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _problems as P  # noqa: E402
from _common import fmt, worker_env  # noqa: E402
from _common import launch as launch_worker  # noqa: E402  (launch is a local name here)
import _worker as W  # noqa: E402  (constants only; it imports nothing heavy at module level)

WORKER = Path(__file__).resolve().parent / "_worker.py"
DEFAULT_PYDVL_PYTHON = P.HERE / ".venv-pydvl" / "bin" / "python"


# ------------------------------------------------------------------ running
def _plan(problems, skip_pydvl):
    runs = []
    for problem in problems:
        direct = P.PROBLEMS[problem].direct
        runs += [
            (problem, "skinfl", m) for m in (("direct", "cg", "cg_plain") if direct else ("cg", "cg_plain"))
        ]
        if not skip_pydvl:
            runs += [
                (problem, "pydvl", m)
                for m in (("direct", "cg", "cg_block") if direct else ("cg", "cg_block"))
            ]
    return runs


# ----------------------------------------------------------------- accuracy
def _compare(matrix, reference):
    a = np.asarray(matrix, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        return {"max_rel_diff": None, "pearson": None, "note": f"shape {a.shape} != reference {r.shape}"}
    if not np.isfinite(a).all():
        return {"max_rel_diff": float("nan"), "pearson": float("nan"), "note": "non-finite values"}
    return {
        "max_rel_diff": float(np.abs(a - r).max() / np.abs(r).max()),
        "pearson": float(np.corrcoef(a.ravel(), r.ravel())[0, 1]),
    }


# ------------------------------------------------------------------- output
COLUMNS = (
    ("problem", "problem", "s"),
    ("params", "n_params", ","),
    ("library", "lib", "s"),
    ("method", "method", "s"),
    ("fit s", "fit_s", ".2f"),
    ("influences s", "influences_s", ".2f"),
    ("total s", "total_s", ".2f"),
    ("skinfl speedup", "speedup", ".1fx"),
    ("peak MB", "peak_mb", ".0f"),
    ("+MB", "work_mb", ".0f"),
    ("max rel diff", "max_rel_diff", ".2e"),
    ("pearson", "pearson", ".6f"),
    ("status", "status", "s"),
)


def _cells(row):
    cells = []
    for _, key, spec in COLUMNS:
        value = row.get(key)
        if spec == ".1fx":
            cells.append("-" if value is None else f"{value:.1f}x")
        elif key == "max_rel_diff" and row.get("is_reference"):
            cells.append("(reference)")
        elif key == "pearson" and row.get("is_reference"):
            cells.append("(reference)")
        else:
            cells.append(fmt(value, spec))
    return cells


def _text_table(rows):
    header = [name for name, _, _ in COLUMNS]
    body = [_cells(row) for row in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths)))
        for b in body
    ]
    return "\n".join(lines)


def _markdown_table(rows):
    header = [name for name, _, _ in COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="280 training / 20 test points, mlp and a small wide model: checks the harness (~2 min)",
    )
    parser.add_argument("--only", help="comma-separated problems to run (default: all of the size)")
    parser.add_argument("--skip-pydvl", action="store_true", help="run skinfl only")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per worker (default 1200)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each configuration this many times (fresh process each) and keep the fastest",
    )
    parser.add_argument(
        "--pydvl-batch-size",
        type=int,
        default=None,
        help="pyDVL's DataLoader batch size for CG; must divide n_train, since pyDVL's CG averages "
        "per-batch mean Hessians without weights (default n_train / 2)",
    )
    parser.add_argument(
        "--pydvl-direct-batch-size",
        type=int,
        default=None,
        help="pyDVL's DataLoader batch size for DirectInfluence, whose torch.func.hessian needs "
        "about 30 MB per sample of a batch for the cnn (default: the largest divisor of n_train <= 100)",
    )
    parser.add_argument(
        "--omp-wait-policy",
        choices=("PASSIVE", "ACTIVE", "default"),
        default="PASSIVE",
        help="OMP_WAIT_POLICY of every worker (default PASSIVE: robust to other jobs on the machine; "
        "'default' leaves the variable as it is)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in every worker (default: the cores this process may use)",
    )
    parser.add_argument(
        "--skinfl-python", default=sys.executable, help="interpreter with skinfl's dependencies"
    )
    parser.add_argument(
        "--pydvl-python",
        default=str(DEFAULT_PYDVL_PYTHON),
        help="interpreter of pyDVL's venv (bash benchmarks/setup_pydvl_env.sh)",
    )
    parser.add_argument(
        "--output", help="results basename in benchmarks/results/ (default derived from the options)"
    )
    args = parser.parse_args(argv)

    size = P.QUICK if args.quick else P.FULL
    available = P.PROBLEMS_BY_SIZE[size.name]
    problems = list(available)
    if args.only:
        problems = [p.strip() for p in args.only.split(",") if p.strip()]
        unknown = [p for p in problems if p not in available]
        if unknown:
            parser.error(f"--only: {unknown} not among the {size.name} problems {list(available)}")
    if not args.skip_pydvl and not Path(args.pydvl_python).exists():
        parser.error(
            f"{args.pydvl_python} not found: run `bash benchmarks/setup_pydvl_env.sh` or pass --skip-pydvl"
        )
    pydvl_batch = args.pydvl_batch_size or size.n_train // 2
    pydvl_direct_batch = args.pydvl_direct_batch_size or max(
        d for d in range(1, 101) if size.n_train % d == 0
    )
    for option, value in (
        ("--pydvl-batch-size", pydvl_batch),
        ("--pydvl-direct-batch-size", pydvl_direct_batch),
    ):
        if value < 1 or size.n_train % value:
            parser.error(f"{option} {value} does not divide n_train={size.n_train}")
    name = args.output or "speed" + ("_quick" if args.quick else "") + (
        "_" + "-".join(problems) if args.only else ""
    ) + ("_skinfl" if args.skip_pydvl else "")
    command = " ".join(
        shlex.quote(a)
        for a in [
            sys.executable,
            os.path.relpath(__file__, P.REPO_ROOT),
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    threads = args.threads or P.cpu_count()
    started = _dt.datetime.now().astimezone()
    load_before = os.getloadavg()
    busy = load_before[0] > 0.5 * P.cpu_count()
    if busy:
        print(
            f"WARNING: 1-minute load average {load_before[0]:.1f} on {P.cpu_count()} cores: other jobs are "
            "running, so the timings will be noisy (multi-threaded BLAS/LAPACK calls suffer most; "
            "consider --threads 1 or --repeat 3).",
            flush=True,
        )
    print(
        f"[{size.name}] {size.n_train} train / {size.n_test} test points, problems {problems}, "
        f"{threads} threads, pyDVL DataLoader batch {pydvl_batch} (CG), {pydvl_direct_batch} (Direct)",
        flush=True,
    )

    # 1. data + models (once, cached), in a worker so that this process stays small.
    record, status, wall, err = launch_worker(
        args.skinfl_python,
        WORKER,
        ["prepare", "--size", size.name, "--threads", str(threads), "--problems", ",".join(problems)],
        worker_env("skinfl", threads, args.omp_wait_policy, P.REPO_ROOT),
        args.timeout,
    )
    if record is None:
        sys.exit(f"preparing data/models {status}:\n{err}")
    models = record
    for problem, summary in models.items():
        print(
            f"  {problem}: {summary['n_params']:,} params, train loss {summary['train_loss']:.4f}, "
            f"train acc {summary['train_accuracy']:.3f}, test acc {summary['test_accuracy']:.3f}",
            flush=True,
        )

    def launch(problem, lib, method):
        worker_args = ["run", "--size", size.name, "--problem", problem, "--lib", lib, "--method", method]
        if lib == "pydvl":
            worker_args += [
                "--pydvl-batch-size",
                str(pydvl_direct_batch if method == "direct" else pydvl_batch),
            ]
        worker_args += ["--threads", str(threads)]
        python = args.pydvl_python if lib == "pydvl" else args.skinfl_python
        env = worker_env(lib, threads, args.omp_wait_policy, P.REPO_ROOT)
        return launch_worker(python, WORKER, worker_args, env, args.timeout)

    # 2. references that are not a benchmark row: float64 CG (rtol=1e-7) for the CG-only problems.
    references = {}
    for problem in problems:
        if P.PROBLEMS[problem].direct:
            references[problem] = {
                "lib": "skinfl",
                "method": "direct",
                "path": P.matrix_path(problem, "skinfl", "direct", size),
            }
            continue
        path = P.matrix_path(problem, "skinfl", "cg_ref", size)
        meta_path = path.with_suffix(".json")
        fingerprint = P.fingerprint(P.model_path(problem, size))
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if not (path.exists() and meta.get("state_dict_sha1") == fingerprint):
            print(
                f"  computing the {problem} reference (skinfl CG, float64, rtol={W.REF_RTOL:g}) ...",
                flush=True,
            )
            record, status, wall, err = launch(problem, "skinfl", "cg_ref")
            if record is None:
                print(f"    reference {status}:\n{err}", flush=True)
                meta = {"status": status}
            else:
                meta = {**record, "state_dict_sha1": fingerprint}
                meta_path.write_text(json.dumps(meta, indent=2))
                print(f"    done in {record['total_s']:.1f} s ({record['cg']})", flush=True)
        references[problem] = {"lib": "skinfl", "method": "cg_ref", "path": path, "run": meta}

    # 3. benchmark runs, each in a fresh process.
    rows = []
    for problem, lib, method in _plan(problems, args.skip_pydvl):
        attempts = []
        for _ in range(args.repeat):
            record, status, wall, err = launch(problem, lib, method)
            attempts.append((record, status, wall, err))
            if record is None:
                break
        good = [a for a in attempts if a[0] is not None]
        if good:
            record, status, wall, err = min(good, key=lambda a: a[0]["total_s"])
            row = dict(record)
            row["peak_mb"] = max(a[0]["peak_mb"] for a in good)
            row["work_mb"] = row["peak_mb"] - row["rss_import_mb"]
            row["all_total_s"] = [a[0]["total_s"] for a in good]
        else:
            record, status, wall, err = attempts[-1]
            row = {
                "problem": problem,
                "lib": lib,
                "method": method,
                "n_params": models[problem]["n_params"],
                "stderr_tail": err,
            }
        row["status"] = status
        row["worker_wall_s"] = wall
        rows.append(row)
        line = f"  {problem:9s} {lib:6s} {method:9s} {status:8s}" + (
            f" fit {row['fit_s']:8.2f} s  influences {row['influences_s']:8.2f} s  "
            f"peak {row['peak_mb']:6.0f} MB"
            if "fit_s" in row
            else ""
        )
        print(line, flush=True)
        if row.get("n_warnings") or row.get("n_log_warnings"):
            for message in row.get("warnings", []) + row.get("log_warnings", []):
                print(f"      warning: {message[:200]}", flush=True)
        if status != "ok":
            print("      " + err.strip().replace("\n", "\n      ")[-1500:], flush=True)

    # 4. accuracy and speedups.
    for row in rows:
        ref = references[row["problem"]]
        row["reference"] = f"{ref['lib']} {ref['method']}"
        row["is_reference"] = (row["lib"], row["method"]) == (ref["lib"], ref["method"])
        if row["status"] == "ok" and ref["path"].exists() and not row["is_reference"]:
            row.update(_compare(np.load(P.REPO_ROOT / row["matrix"]), np.load(ref["path"])))
        elif row["is_reference"]:
            row.update({"max_rel_diff": 0.0, "pearson": 1.0})
        skinfl_method = {"direct": "direct", "cg": "cg", "cg_block": "cg", "cg_plain": "cg"}[row["method"]]
        if row["lib"] == "pydvl" and row["status"] == "ok":
            mine = next(
                (
                    r
                    for r in rows
                    if r["problem"] == row["problem"]
                    and r["lib"] == "skinfl"
                    and r["method"] == skinfl_method
                    and r["status"] == "ok"
                ),
                None,
            )
            if mine is not None:
                row["speedup"] = row["total_s"] / mine["total_s"]
                row["speedup_vs"] = f"skinfl {skinfl_method}"

    versions = {}
    for lib in ("skinfl", "pydvl"):
        first = next((r for r in rows if r["lib"] == lib and r["status"] == "ok"), None)
        if first:
            versions[f"{lib}_version"] = first["library_version"]
            versions[f"{lib}_env_torch"] = first["torch_version"]
            versions[f"{lib}_env_numpy"] = first["numpy_version"]
            versions["python"] = first["python"]
    machine = P.machine_info(threads, versions)
    machine["load_average_1_5_15min"] = {
        "start": [round(x, 2) for x in load_before],
        "end": [round(x, 2) for x in os.getloadavg()],
    }
    rss_start = [r["rss_start_mb"] for r in rows if "rss_start_mb" in r]

    table = _text_table(rows)
    print()
    print(table)
    notes = [
        "speedup = pyDVL total / skinfl total for the same problem and method (pyDVL cg and cg_block are "
        "compared with skinfl cg, i.e. CgInfluence with its default preconditioner); > 1 means skinfl is "
        "faster. "
        "skinfl cg_plain is CgInfluence with preconditioner=None, like pyDVL's CG.",
        "max rel diff = max|A - R| / max|R|, pearson = correlation of all entries with the reference R: "
        "skinfl direct for problems with a Direct row, else skinfl CG in float64 with rtol=1e-7 (cached).",
        "peak MB = ru_maxrss of the worker process; +MB = peak MB minus its ru_maxrss just before the timed "
        "work (torch and the library imported, data and model loaded, a small warm-up run done). A bare "
        f"interpreter (before numpy/torch) is {min(rss_start, default=0):.0f}-"
        f"{max(rss_start, default=0):.0f} MB.",
        "Timings exclude process start, imports and a warm-up run of the same library and method on a small "
        "model (one-time costs: lazy imports, torch's first use of forward-mode AD, ...).",
        f"Settings: regularization={W.REGULARIZATION}, skinfl batch_size={W.SKINFL_BATCH_SIZE}, "
        f"CG rtol={W.CG_RTOL:g} "
        f"(pyDVL rtol={W.PYDVL_CG_RTOL:g}, atol={W.PYDVL_CG_ATOL:g}: same ||r|| <= {W.CG_RTOL:g} ||b||), "
        f"max_iter={W.CG_MAX_ITER}, pyDVL DataLoader batch {pydvl_batch} for CG and {pydvl_direct_batch} "
        f"for Direct, {threads} torch threads, OMP_WAIT_POLICY={args.omp_wait_policy}.",
    ]
    for note in notes:
        print("  " + note)

    P.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = P.RESULTS_DIR / f"{name}.json"
    md_path = P.RESULTS_DIR / f"{name}.md"
    payload = {
        "command": command,
        "date": started.isoformat(timespec="seconds"),
        "size": {"name": size.name, "n_train": size.n_train, "n_test": size.n_test},
        "skinfl_commit": P.git_state(),
        "machine": machine,
        "settings": {
            "regularization": W.REGULARIZATION,
            "skinfl_batch_size": W.SKINFL_BATCH_SIZE,
            "cg_rtol": W.CG_RTOL,
            "cg_max_iter": W.CG_MAX_ITER,
            "pydvl_cg_rtol": W.PYDVL_CG_RTOL,
            "pydvl_cg_atol": W.PYDVL_CG_ATOL,
            "pydvl_dataloader_batch_size": pydvl_batch,
            "pydvl_direct_dataloader_batch_size": pydvl_direct_batch,
            "threads": threads,
            "omp_wait_policy": args.omp_wait_policy,
            "reference_rtol": W.REF_RTOL,
            "timeout_s": args.timeout,
            "repeat": args.repeat,
        },
        "models": models,
        "references": {
            p: {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()}
            for p, r in references.items()
        },
        "rows": rows,
        "notes": notes,
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")

    md = [
        f"# Speed benchmark ({size.name}: {size.n_train} training / {size.n_test} test points)",
        "",
        f"- Command: `{command}`",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores ({threads} torch threads per worker), "
        f"{machine['memory']} RAM, {machine['platform']}; 1-min load average "
        f"{load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        f"- skinfl {versions.get('skinfl_version', '?')} (commit {P.git_state()}), "
        f"torch {versions.get('skinfl_env_torch', '?')}, numpy {versions.get('skinfl_env_numpy', '?')}",
    ]
    if "pydvl_version" in versions:
        md.append(
            f"- pyDVL {versions['pydvl_version']} (own venv): torch {versions['pydvl_env_torch']}, "
            f"numpy {versions['pydvl_env_numpy']}"
        )
    md.append(f"- Python {versions.get('python', platform.python_version())}")
    if busy:
        md.append(
            f"- **The machine was busy** (load average {load_before[0]:.1f} on {P.cpu_count()} cores at "
            "start): timings are noisy."
        )
    md += ["", _markdown_table(rows), ""]
    md += [f"- {note}" for note in notes]
    odd = [
        f"{r['problem']} {r['lib']} {r['method']}: {m}"
        for r in rows
        for m in r.get("warnings", []) + r.get("log_warnings", [])
    ]
    if odd:
        md += ["", "Warnings raised during the runs:", ""] + [f"- {m[:300]}" for m in odd]
    md_path.write_text("\n".join(md) + "\n")
    print(f"\nwrote {json_path.relative_to(P.REPO_ROOT)} and {md_path.relative_to(P.REPO_ROOT)}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
