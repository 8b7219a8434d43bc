"""Peak memory and time of skinfl before and after the streaming rewrite.

Usage::

    cd benchmarks && /work/venv/bin/python bench_memory.py            # full run
    cd benchmarks && /work/venv/bin/python bench_memory.py --quick    # smaller sizes, a smoke test

Every measurement runs in a fresh Python process (``_memory_worker.py``),
"today" with ``PYTHONPATH`` on a git worktree of commit ``4f7ab31`` (before
the rewrite, created in ``benchmarks/.work/`` on first use) and "after" with
``PYTHONPATH`` on the repository root (the working tree, uncommitted changes
included). Each worker reports the ``skinfl.__file__`` it imported; a worker
that imported the wrong copy is an error.

Sections (same data, model and seeds on both sides):

1. ``self_influence`` of 20,000 points with a 7,510-parameter MLP, Direct and
   CG: peak RSS added by ``fit`` and, separately, by ``self_influence``.
2. A training set of 500,000 points in a ``numpy.memmap``: peak RSS of the
   worker over its RSS after imports and model creation, during ``fit`` plus
   ``top_influences(k=10)`` or ``influences(out=memmap)`` (after), or the
   dense ``influences`` (today, which has neither).
3. ``GridSearchCV`` over eight values of ``regularization``: its time
   against the time of one candidate.
4. ``score`` on 500, 1,000 and 2,000 held-out points: time per call.

Writes ``results/memory.{json,md}`` (``--quick``: ``results/memory_quick.*``).
See ``README.md`` for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _problems as P  # numpy only

OLD_COMMIT = "4f7ab31"
WORKTREE = P.WORK_DIR / f"skinfl-{OLD_COMMIT}"
WORKER = P.HERE / "_memory_worker.py"
MB = 1e6  # tables are in MB = 10**6 bytes

SIZES = {
    "full": {
        "work": P.WORK_DIR / "memory",
        "n_self": 20_000,
        "n_self_fit": 512,
        "n_memmap": 500_000,
        "n_memmap_test": 200,
        "memmap_batch_size": 4096,
        "n_digits": 1797,
        "cg_search_max_iter": 100,
        "score_fit": 1000,
        "score_sizes": [500, 1000, 2000],
        "score_repeats": 2,
    },
    "quick": {
        "work": P.WORK_DIR / "memory" / "quick",
        "n_self": 2_000,
        "n_self_fit": 256,
        "n_memmap": 50_000,
        "n_memmap_test": 200,
        "memmap_batch_size": 4096,
        "n_digits": 450,
        "cg_search_max_iter": 100,
        "score_fit": 1000,
        "score_sizes": [100, 200, 400],
        "score_repeats": 1,
    },
}

# Targets of the rewrite, checked on the "after" side.
TARGET_SELF_INFLUENCE = 0.5e9  # bytes added by self_influence
TARGET_MEMMAP = 1e9  # bytes over the worker's RSS after imports and model creation, fit + call
TARGET_SEARCH_RATIO = 1.5  # (search time / folds) / (one candidate's fit + score)
TARGET_SCORE_RATIO = 4.0  # time(largest) / time(smallest) for a 4x larger held-out set


# ------------------------------------------------------------------ setup
def git(*args, cwd=P.REPO_ROOT):
    result = subprocess.run(["git", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def ensure_worktree():
    """The worktree of the old commit, created once (``git worktree add``); its full commit hash."""
    commit = git("rev-parse", "--verify", f"{OLD_COMMIT}^{{commit}}")
    if not (WORKTREE / "skinfl" / "__init__.py").exists():
        WORKTREE.parent.mkdir(parents=True, exist_ok=True)
        print(f"creating the worktree of {OLD_COMMIT} in {WORKTREE}", flush=True)
        git("worktree", "add", "--detach", str(WORKTREE), commit)
    head = git("rev-parse", "HEAD", cwd=WORKTREE)
    if head != commit:
        raise RuntimeError(
            f"{WORKTREE} is at {head}, not {OLD_COMMIT} ({commit}); remove it "
            f"(git worktree remove {WORKTREE}) and run again."
        )
    changed = git("status", "--porcelain", "--", "skinfl", cwd=WORKTREE)
    if changed:
        raise RuntimeError(f"{WORKTREE}/skinfl has local changes:\n{changed}")
    return commit


def sides(old_commit):
    head = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--", "skinfl").splitlines()
    return {
        "today": {
            "pythonpath": str(WORKTREE),
            "commit": old_commit,
            "description": f"commit {old_commit[:7]} (git worktree {WORKTREE.relative_to(P.REPO_ROOT)})",
        },
        "after": {
            "pythonpath": str(P.REPO_ROOT),
            "commit": head,
            "uncommitted_skinfl_changes": changed,
            "description": f"working tree at {head[:7]}"
            + (f" with {len(changed)} uncommitted change(s) in skinfl/" if changed else ""),
        },
    }


def worker_env(pythonpath, threads, mmap_threshold=None):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONWARNINGS", "PYTHONSTARTUP") and not k.startswith("MALLOC_")
    }
    if mmap_threshold is not None:
        # Diagnostic: glibc serves every allocation above this from mmap and returns it on free, so RSS
        # follows the memory in use instead of including freed memory that the heap keeps.
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    env["PYTHONPATH"] = pythonpath
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # idle OpenMP threads sleep: the machine is shared
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(python, command, spec, env, timeout):
    """Run the worker; returns its record (with ``status`` ok, error, failed or timeout) and the wall time.

    The worker is started through ``sh`` as a grandchild, so that its
    ``ru_maxrss`` does not inherit this process's high-water mark (a process
    started by exec keeps the peak of the one it was forked from).
    """
    argv = [
        "/bin/sh",
        "-c",
        '"$@"; exit $?',
        "sh",
        str(python),
        str(WORKER),
        command,
        json.dumps(spec, default=str),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=P.HERE,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return {
            "status": "timeout",
            "traceback": f"timeout after {timeout:.0f} s\n{stderr[-3000:]}",
        }, time.perf_counter() - start
    wall = time.perf_counter() - start
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :]), wall
    return {"status": "failed", "traceback": f"exit {proc.returncode}\n{(stderr or stdout)[-3000:]}"}, wall


# ------------------------------------------------------------------- jobs
def jobs_of(size, threads):
    """The measurements: (section, side, spec); sections 1-2 measure memory, 3-4 time."""
    common = {"threads": threads, "work": str(size["work"])}
    # Longest first: sections 1-2 run two at a time.
    jobs = []
    for side in ("today", "after"):
        jobs.append(
            (
                1,
                side,
                {
                    **common,
                    "task": "self_influence",
                    "estimator": "cg",
                    "n_self": size["n_self"],
                    "n_fit": size["n_self_fit"],
                    "cg_max_iter": 1000,
                },
            )
        )
    memmap = {
        **common,
        "task": "memmap",
        "estimator": "direct",
        "n_memmap": size["n_memmap"],
        "batch_size": size["memmap_batch_size"],
    }
    jobs.append((2, "today", {**memmap, "calls": ["influences_dense", "top_influences", "influences_out"]}))
    jobs.append((2, "after", {**memmap, "calls": ["top_influences", "influences_out", "influences_dense"]}))
    for side in ("today", "after"):
        jobs.append(
            (
                1,
                side,
                {
                    **common,
                    "task": "self_influence",
                    "estimator": "direct",
                    "n_self": size["n_self"],
                    "n_fit": size["n_self_fit"],
                },
            )
        )
    search = {
        **common,
        "task": "search",
        "n_digits": size["n_digits"],
        "candidate_regularization": 1e-2,
        "cg_max_iter": size["cg_search_max_iter"],
    }
    for side in ("today", "after"):
        jobs.append((3, side, {**search, "estimator": "direct", "searches": ["memory"]}))
    for side in ("today", "after"):
        jobs.append((3, side, {**search, "estimator": "cg", "searches": ["memory", "none"]}))
    for side in ("today", "after"):
        jobs.append(
            (
                4,
                side,
                {
                    **common,
                    "task": "score",
                    "estimator": "direct",
                    "n_fit": size["score_fit"],
                    "sizes": size["score_sizes"],
                    "repeats": size["score_repeats"],
                },
            )
        )
    return jobs


def run_jobs(jobs, side_info, python, threads, timeout, parallel, mmap_threshold=None):
    """Sections 1-2 ``parallel`` at a time (memory is per process), then 3-4 one at a time (timings)."""

    def one(job):
        section, side, spec = job
        spec = {**spec, "side": side}
        env = worker_env(side_info[side]["pythonpath"], threads, mmap_threshold)
        record, wall = launch(python, "run", spec, env, timeout)
        record.update(section=section, side=side, spec=spec, worker_wall_s=wall)
        expected = Path(side_info[side]["pythonpath"]) / "skinfl" / "__init__.py"
        if record.get("status") == "ok" and Path(record.get("skinfl_file", "")) != expected:
            record["status"] = "error"
            record["traceback"] = f"imported {record.get('skinfl_file')}, expected {expected}"
        label = f"[{section}] {side:5s} {spec['task']}/{spec['estimator']}"
        print(f"  {label}: {record['status']} in {wall:.0f} s", flush=True)
        if record["status"] != "ok":
            print("    " + record.get("traceback", "").strip().replace("\n", "\n    "), flush=True)
        return record

    memory_jobs = [job for job in jobs if job[0] <= 2]
    timing_jobs = [job for job in jobs if job[0] > 2]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        records = list(pool.map(one, memory_jobs))
    records += [one(job) for job in timing_jobs]
    return records


# ----------------------------------------------------------------- tables
def mb(value):
    return "–" if value is None else f"{value / MB:,.0f}"


def seconds(value):
    return "–" if value is None else (f"{value:.2f}" if value < 10 else f"{value:.1f}")


def verdict(ok):
    return "meets target" if ok else "**misses target**"


def find(records, section, side, estimator=None):
    for record in records:
        if (
            record["section"] == section
            and record["side"] == side
            and (estimator is None or record["spec"]["estimator"] == estimator)
        ):
            return record
    return None


def warning_notes(label, record):
    """One line per warning category a worker (or one of its searches) raised."""
    lines = []
    for category, entry in record.get("warnings", {}).items():
        lines.append(f'{label}: {entry["count"]} x {category}, first: "{entry["first"]}"')
    return lines


def failed(record):
    return record is None or record.get("status") != "ok"


def table(header, rows):
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def section_self_influence(records, size):
    rows, notes = [], []
    for estimator, name in (("direct", "DirectInfluence"), ("cg", "CgInfluence")):
        for side in ("today", "after"):
            r = find(records, 1, side, estimator)
            if failed(r):
                rows.append([name, side] + [f"{r['status'] if r else 'missing'} (see below)"] + ["–"] * 6)
                continue
            target = "–"
            if side == "after":
                target = f"< {mb(TARGET_SELF_INFLUENCE)}: {verdict(r['call_peak'] < TARGET_SELF_INFLUENCE)}"
            rows.append(
                [
                    name,
                    side,
                    mb(r["fit_peak"]),
                    mb(r["call_peak"]),
                    mb(r["baseline_rss"]),
                    seconds(r["fit_s"]),
                    seconds(r["call_s"]),
                    mb(r["ru_maxrss"]),
                    target,
                ]
            )
            notes += warning_notes(f"{name} {side}, fit and self_influence", r)
    first = next((r for r in records if r["section"] == 1 and not failed(r)), None)
    n_params = first["n_params"] if first else "?"
    intro = (
        f"`self_influence(X, y)` of {size['n_self']:,} points (64 features, 10 classes) with an MLP "
        f"64-100-10 Tanh ({n_params:,} parameters, float32), `regularization=1e-2`; CG with its default "
        f"preconditioner, `rtol=1e-4`, `random_state=0`. Both estimators are fitted on the first "
        f"{size['n_self_fit']} of the points (the model is trained on them, so that the Hessian plus "
        "regularization is positive definite): what both calls hold depends on the parameters and on the "
        "points scored, not on the points fitted, while fitting on all of them would multiply the time of "
        f"Direct's fit and of CG's self_influence by {size['n_self'] / size['n_self_fit']:.0f}. "
        "Memory in MB (10^6 bytes)."
    )
    header = [
        "estimator",
        "side",
        "fit peak +MB",
        "self_influence peak +MB",
        "RSS before self_influence MB",
        "fit s",
        "self_influence s",
        "process peak (ru_maxrss) MB",
        "target (after)",
    ]
    return intro, table(header, rows), notes


def section_memmap(records, size):
    rows, notes = [], []
    names = {
        "influences_dense": "`influences(X_test, y_test)` (dense result in memory)",
        "top_influences": "`top_influences(X_test, y_test, k=10)`",
        "influences_out": "`influences(X_test, y_test, out=<memmap>)`",
    }
    order = {
        "today": ["influences_dense", "top_influences", "influences_out"],
        "after": ["top_influences", "influences_out", "influences_dense"],
    }
    for side in ("today", "after"):
        r = find(records, 2, side)
        if failed(r):
            rows.append([side, "all", f"{r['status'] if r else 'missing'} (see below)"] + ["–"] * 7)
            continue
        for call in order[side]:
            c = r["calls"].get(call, {"status": "not run"})
            if c["status"] != "ok":
                rows.append([side, names[call], c["status"]] + ["–"] * 7)
                continue
            whole = max(r["fit_peak"], c["peak_over_start"])
            target = "–"
            if side == "after" and call != "influences_dense":
                target = f"< {mb(TARGET_MEMMAP)}: {verdict(whole < TARGET_MEMMAP)}"
            split = c["rss_split_after_call"]
            rows.append(
                [
                    side,
                    names[call],
                    mb(whole),
                    mb(r["fit_peak"]),
                    mb(c["peak_over_start"]),
                    f"{mb(split.get('RssAnon'))} / {mb(split.get('RssFile'))}",
                    seconds(r["fit_s"]),
                    seconds(c["call_s"]),
                    c["result"],
                    target,
                ]
            )
        notes += warning_notes(f"memmap {side}", r)
    first = next((r for r in records if r["section"] == 2 and not failed(r)), None)
    n_params = first["n_params"] if first else "?"
    intro = (
        f"`DirectInfluence(regularization=1e-2, batch_size={size['memmap_batch_size']})` fitted on "
        f"{size['n_memmap']:,} training points (32 features, float32, labels 0-9) held in a `numpy.memmap` "
        f"(read-only `.npy` on disk), MLP 32-4-10 Tanh ({n_params} parameters: few, so that the Hessian over "
        "all the points takes about a minute); "
        f"{size['n_memmap_test']} test points. One worker per side: the fit, then the calls in the order "
        "shown. Peaks are over the worker's RSS after imports, data references and model creation "
        "(`fit` included: the \"fit + call\" column is the larger of the fit's peak and the call's). "
        "RSS counts the pages of the memmaps that the process has touched (file-backed, `RssFile`): "
        f"the training memmaps ({size['n_memmap'] * (32 * 4 + 8) / MB:.0f} MB) once read, and the pages "
        "of an `out=` memmap written to."
    )
    header = [
        "side",
        "call",
        "fit + call peak +MB",
        "fit peak +MB",
        "call peak +MB (over start)",
        "RSS anon / file after call MB",
        "fit s",
        "call s",
        "result",
        "target (after)",
    ]
    return intro, table(header, rows), notes


def section_search(records, size):
    notes = []
    rows = []
    for side in ("today", "after"):
        r = find(records, 3, side, "direct")
        if failed(r):
            rows.append([side, f"{r['status'] if r else 'missing'} (see below)"] + ["–"] * 6)
            continue
        s = r["searches"]["memory"]
        per_fold = s["search_s"] / 3
        ratio = per_fold / r["candidate_s"]
        target = (
            f"≤ {TARGET_SEARCH_RATIO}: {verdict(ratio <= TARGET_SEARCH_RATIO)}" if side == "after" else "–"
        )
        rows.append(
            [
                side,
                seconds(r["candidate_fit_s"]),
                seconds(r["candidate_score_s"]),
                seconds(r["candidate_s"]),
                seconds(s["search_s"]),
                seconds(per_fold),
                f"{ratio:.2f}",
                target,
            ]
        )
        notes += warning_notes(f"search Direct {side}, warm-up and one candidate", r)
    direct = table(
        [
            "side",
            "one candidate: fit s",
            "score s",
            "fit + score s",
            "search with memory s",
            "search / 3 folds s",
            "ratio (per fold / candidate)",
            "target (after)",
        ],
        rows,
    )
    rows = []
    for side in ("today", "after"):
        r = find(records, 3, side, "cg")
        if failed(r):
            rows.append([side, f"{r['status'] if r else 'missing'} (see below)"] + ["–"] * 5)
            continue
        with_memory, without = r["searches"]["memory"], r["searches"]["none"]

        def cell(s):
            return seconds(s["search_s"]) if s["status"] == "ok" else s["status"]

        saving = "–"
        if with_memory["status"] == "ok" and without["status"] == "ok":
            saving = (
                f"{without['search_s'] - with_memory['search_s']:.1f} s "
                f"({1 - with_memory['search_s'] / without['search_s']:.0%})"
            )
        best = without if without["status"] == "ok" else with_memory
        ratio = best["search_s"] / 3 / r["candidate_s"]
        rows.append(
            [
                side,
                seconds(r["candidate_s"]),
                cell(with_memory),
                cell(without),
                saving,
                f"{ratio:.2f}",
                f"{best['best_regularization']:.3g}",
            ]
        )
        notes += warning_notes(f"search CG {side}, warm-up and one candidate", r)
    cg = table(
        [
            "side",
            "one candidate fit + score s",
            "search with memory s",
            "search without memory s",
            "saved by memory",
            "ratio (without memory, per fold / candidate)",
            "best regularization",
        ],
        rows,
    )
    rows = []
    grid = None
    for estimator, label in (("direct", "Direct"), ("cg", "CG")):
        for side in ("today", "after"):
            r = find(records, 3, side, estimator)
            if failed(r):
                continue
            grid = r["grid"]
            for name, s in r["searches"].items():
                if s["status"] != "ok":
                    continue
                cells = [seconds(f + c) for f, c in zip(s["mean_fit_s"], s["mean_score_s"])]
                rows.append([f"{label} {side}, {'with' if name == 'memory' else 'without'} memory"] + cells)
                notes.extend(
                    warning_notes(
                        f"search {label} {side} {'with' if name == 'memory' else 'without'} memory", s
                    )
                )
    per_candidate = table(["search"] + [f"{value:.2g}" for value in grid], rows) if grid else ""
    first = next((r for r in records if r["section"] == 3 and not failed(r)), None)
    split = first["split_sizes"] if first else ["?", "?"]
    intro = (
        f"`GridSearchCV(estimator, {{'regularization': np.logspace(-4, 1, 8)}}, cv=KFold(3), refit=False, "
        f"n_jobs=1)` on {size['n_digits']} digits (`X / 16`, float32; folds of {split[0]} training and "
        f"{split[1]} held-out points), MLP 64-32-10 Tanh (2,410 parameters) trained on the first 1,000 "
        "digits; scored by the estimator's own `score`. `random_state=0` where the estimator accepts it "
        "(today's DirectInfluence does not), `memory=` a fresh temporary directory where it accepts it "
        "(today's CgInfluence does not). One candidate: `fit` on the first fold's training points and "
        "`score` on its held-out points, `regularization=1e-2`, without memory, timed in the same "
        "worker before the search (after a small warm-up). Ratio: (search time / 3 folds) / "
        "(one candidate's fit + score): with a cache, each fold should cost about one candidate. "
        f"CG: `rtol=1e-4`, `max_iter={size['cg_search_max_iter']}`."
    )
    return intro, direct, cg, per_candidate, notes


def section_score(records, size):
    rows, notes = [], []
    sizes = [str(s) for s in size["score_sizes"]]
    for side in ("today", "after"):
        r = find(records, 4, side)
        if failed(r):
            rows.append([side, f"{r['status'] if r else 'missing'} (see below)"] + ["–"] * (len(sizes) + 2))
            continue
        times = [r["sizes"][s]["seconds"] for s in sizes]
        ratio = times[-1] / times[0]
        target = (
            f"≤ {TARGET_SCORE_RATIO:g}: {verdict(ratio <= TARGET_SCORE_RATIO)}" if side == "after" else "–"
        )
        rows.append(
            [side] + [seconds(t) for t in times] + [f"{ratio:.1f}", mb(r["sizes"][sizes[-1]]["peak"]), target]
        )
        notes += warning_notes(f"score {side}", r)
    header = (
        ["side"]
        + [f"score({s} points) s" for s in sizes]
        + [f"ratio {sizes[-1]}/{sizes[0]}", f"peak +MB at {sizes[-1]}", "target (after)"]
    )
    intro = (
        f"`DirectInfluence(regularization=1e-2)` (`random_state=0` after) with the digits MLP, fitted on "
        f"the first {size['score_fit']} digits; `score` on held-out sets of {', '.join(sizes)} points "
        f"(drawn from the other {1797 - size['score_fit']} digits, repeated beyond their number). Best of "
        f"{size['score_repeats']} call(s) each, after a warm-up. A linear score grows "
        f"{int(sizes[-1]) // int(sizes[0])}x from the smallest to the largest set, a quadratic one "
        f"{(int(sizes[-1]) // int(sizes[0])) ** 2}x."
    )
    return intro, table(header, rows), notes


def errors(records):
    lines = []
    for r in records:
        if failed(r) or any(
            c.get("status") not in ("ok",) and not c.get("status", "").startswith("n/a")
            for c in r.get("calls", {}).values()
        ):
            lines.append(
                f"### [{r['section']}] {r['side']} {r['spec']['task']}/{r['spec']['estimator']}: "
                f"{r['status']}\n\n```\n{r.get('traceback', '').strip()}\n```"
            )
    return lines


# ------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of a minute or two")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the workers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        choices=(1, 2),
        help="workers at a time for the memory sections 1-2 (default 2); 3-4 run one at a time",
    )
    parser.add_argument("--only", default="1,2,3,4", help="sections to run, comma-separated (default all)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per worker (default 1200)")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="diagnostic: run the workers with MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 65536), so that "
        "glibc returns freed blocks at once and peaks show the memory in use rather than "
        "what the allocator keeps (slower); results get a _mmap suffix",
    )
    args = parser.parse_args()

    size_name = "quick" if args.quick else "full"
    size = SIZES[size_name]
    sections = {int(s) for s in args.only.split(",")}
    started = time.perf_counter()
    old_commit = ensure_worktree()
    side_info = sides(old_commit)
    for side, info in side_info.items():
        print(f"{side}: {info['description']}  (PYTHONPATH={info['pythonpath']})", flush=True)

    print("preparing data and models (cached in benchmarks/.work/memory/)", flush=True)
    prepared, _ = launch(
        args.python,
        "prepare",
        {
            "threads": args.threads,
            "work": str(size["work"]),
            "n_self": size["n_self"],
            "n_self_fit": size["n_self_fit"],
            "n_memmap": size["n_memmap"],
            "n_memmap_test": size["n_memmap_test"],
        },
        worker_env(str(P.REPO_ROOT), args.threads),
        args.timeout,
    )
    if "traceback" in prepared:
        sys.exit("preparation failed:\n" + prepared["traceback"])

    jobs = [job for job in jobs_of(size, args.threads) if job[0] in sections]
    print(f"running {len(jobs)} workers", flush=True)
    records = run_jobs(
        jobs, side_info, args.python, args.threads, args.timeout, args.jobs, args.malloc_mmap_threshold
    )
    total = time.perf_counter() - started

    versions = next(({k: r[k] for k in ("torch", "numpy", "sklearn")} for r in records if r.get("torch")), {})
    machine = P.machine_info(args.threads, versions)
    with open("/proc/loadavg") as handle:
        machine["load_average_at_end"] = handle.read().split()[:3]
    method = next((r["memory_method"] for r in records if r.get("memory_method")), "?")
    skinfl_files = {
        side: sorted({r.get("skinfl_file", "?") for r in records if r["side"] == side}) for side in side_info
    }
    command = "cd benchmarks && /work/venv/bin/python bench_memory.py" + (" --quick" if args.quick else "")
    if sections != {1, 2, 3, 4}:
        command += f" --only {args.only}"
    if args.malloc_mmap_threshold is not None:
        command += f" --malloc-mmap-threshold {args.malloc_mmap_threshold}"
    if args.jobs != 2:
        command += f" --jobs {args.jobs}"

    header = f"# Memory and time before and after the streaming rewrite{' (quick)' if args.quick else ''}"
    today_line = (
        f"- today: {side_info['today']['description']}, skinfl imported from "
        f"`{', '.join(skinfl_files['today'])}`"
    )
    after_line = (
        f"- after: {side_info['after']['description']}, skinfl imported from "
        f"`{', '.join(skinfl_files['after'])}`"
    )
    machine_line = (
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}, torch "
        f"{versions.get('torch', '?')} ({args.threads} threads per worker), "
        f"numpy {versions.get('numpy', '?')}, scikit-learn {versions.get('sklearn', '?')}; "
        f"load average at the end {' '.join(machine['load_average_at_end'])}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}"
    )
    memory_line = (
        f"- peak memory: {method}; every measurement in a fresh process, after `gc.collect()` and "
        "`malloc_trim(0)`"
    )
    if args.malloc_mmap_threshold is not None:
        memory_line += (
            f"; workers run with `MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}` "
            "(a diagnostic: peaks of memory in use, times slower)"
        )
    schedule_line = (
        f"- sections 1-2 ran {args.jobs} worker(s) at a time (their times are informative only), "
        f"sections 3-4 one at a time; the whole run took {total / 60:.1f} min"
    )
    parts = [
        header,
        "",
        f"Reproduce: `{command}`",
        "",
        today_line,
        after_line,
        machine_line,
        memory_line,
        schedule_line,
        "",
    ]
    notes = []
    if 1 in sections:
        intro, body, extra = section_self_influence(records, size)
        parts += ["## 1. self_influence", "", intro, "", body, ""]
        notes += extra
    if 2 in sections:
        intro, body, extra = section_memmap(records, size)
        parts += ["## 2. Training set in a numpy.memmap", "", intro, "", body, ""]
        notes += extra
    if 3 in sections:
        intro, direct, cg, per_candidate, extra = section_search(records, size)
        direct_intro = (
            "DirectInfluence (today's `memory=` caches the curvature matrix too, but today's `score` "
            "is quadratic in the held-out points: it solves and multiplies with all of them):"
        )
        cg_intro = "CgInfluence (`memory=` caches the preconditioner's sketch; today's has no `memory`):"
        candidates_intro = (
            "Mean fit + score seconds of each candidate (a fold's first candidate builds what "
            "`memory` caches; regularization in the header):"
        )
        parts += [
            "## 3. GridSearchCV over regularization",
            "",
            intro,
            "",
            direct_intro,
            "",
            direct,
            "",
            cg_intro,
            "",
            cg,
            "",
            candidates_intro,
            "",
            per_candidate,
            "",
        ]
        notes += extra
    if 4 in sections:
        intro, body, extra = section_score(records, size)
        parts += ["## 4. score on larger held-out sets", "", intro, "", body, ""]
        notes += extra
    if notes:
        parts += ["## Warnings raised in the workers", ""] + [f"- {note}" for note in notes] + [""]
    failures = errors(records)
    if failures:
        parts += ["## Failures", ""] + failures + [""]
    markdown = "\n".join(parts)
    print("\n" + markdown)

    name = "memory_quick" if args.quick else "memory"
    if sections != {1, 2, 3, 4}:
        name += "_" + "".join(str(s) for s in sorted(sections))
    if args.malloc_mmap_threshold is not None:
        name += "_mmap"
    P.RESULTS_DIR.mkdir(exist_ok=True)
    (P.RESULTS_DIR / f"{name}.md").write_text(markdown)
    record = {
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "sides": side_info,
        "skinfl_files": skinfl_files,
        "memory_method": method,
        "sizes": {k: str(v) if isinstance(v, Path) else v for k, v in size.items()},
        "prepared": prepared,
        "targets": {
            "self_influence_bytes": TARGET_SELF_INFLUENCE,
            "memmap_bytes": TARGET_MEMMAP,
            "search_ratio": TARGET_SEARCH_RATIO,
            "score_ratio": TARGET_SCORE_RATIO,
        },
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "jobs": args.jobs,
        "total_s": total,
        "records": records,
    }
    (P.RESULTS_DIR / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote results/{name}.md and results/{name}.json", flush=True)


if __name__ == "__main__":
    main()
