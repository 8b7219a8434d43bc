"""The benchmarks' harness: one worker protocol and one results format.

Host side (the scripts): :func:`launch` runs one measurement in a fresh
process, ``python benchmarks/_harness.py`` with the JSON spec on stdin, and
returns its record. skinfl's runs use this interpreter with the repository on
``PYTHONPATH``; pyDVL's and kronfluence's use pyDVL's virtual environment
(``--pydvl-python``, default ``benchmarks/.venv-pydvl/bin/python``). The
worker calls ``spec["entry"]`` (``"module:function"`` of ``benchmarks/``) and
prints one line ``RESULT {json}``: the function's record plus the status,
the peak resident memory of the process, versions and warnings. Every
record has ``status``: ``ok``, ``not available``, ``not supported``,
``failed (exit N)`` or ``timeout (N s)``. :func:`write_results` writes
``results/<name>.json`` and ``results/<name>.md`` (the same tables) with the
command, date, machine, versions and commit.

Standard library only at module level: pyDVL's environment imports it too.
"""

from __future__ import annotations

import resource


def maxrss_mb() -> float:
    """The high-water resident memory of this process (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


RSS_START_MB = maxrss_mb()  # a bare interpreter

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
WORK_DIR = HERE / ".work"
RESULTS_DIR = HERE / "results"
PYDVL_PYTHON = HERE / ".venv-pydvl" / "bin" / "python"
NAMES = {"skinfl": "skinfl", "pydvl": "pyDVL", "kronfluence": "kronfluence"}
OK = ("ok", "not available", "not supported", "skipped")  # statuses that are not failures


class NotAvailable(Exception):
    """The library has no such method (status "not available")."""


class NotSupported(Exception):
    """The library refuses this model (status "not supported")."""


# ------------------------------------------------------------------ host side
def parser(doc, quick="small sizes: checks that the script runs"):
    """An argument parser with the options every script shares."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick + " (writes <name>_quick.*)")
    p.add_argument("--skip-pydvl", action="store_true", help="skinfl only (kronfluence runs in pyDVL's venv too)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every worker (default 2)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker (default 3600)")
    p.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "default"), default="PASSIVE",
                   help="OMP_WAIT_POLICY of the workers (PASSIVE: idle threads sleep, robust to other jobs)")
    p.add_argument("--pydvl-python", default=str(PYDVL_PYTHON), help="interpreter of pyDVL's venv")
    p.add_argument("--output", help="results basename (default from the options)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the results go (default benchmarks/results)")
    return p


def check_pydvl(p, args):
    if not args.skip_pydvl and not Path(args.pydvl_python).exists():
        p.error(f"{args.pydvl_python} not found: run `bash benchmarks/setup_pydvl_env.sh` or pass --skip-pydvl")


def launch(spec, lib="skinfl", args=None, timeout=None):
    """Run ``spec["entry"]`` in a fresh process with ``lib``'s interpreter; returns its record.

    Started through ``sh`` as a grandchild: a process exec'd directly inherits
    the high-water RSS of the process it was forked from. A new session lets a
    timeout kill the whole process group.
    """
    threads = getattr(args, "threads", 2)
    python = sys.executable if lib == "skinfl" else getattr(args, "pydvl_python", PYDVL_PYTHON)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS", "PYTHONSTARTUP")}
    if lib == "skinfl":
        env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    policy = getattr(args, "omp_wait_policy", "PASSIVE")
    if policy != "default":  # spinning OpenMP threads slow small torch operations 10-100x on a shared machine
        env["OMP_WAIT_POLICY"] = policy
    timeout = timeout or getattr(args, "timeout", 3600.0)
    spec = {**spec, "lib": lib, "threads": threads}
    command = ["/bin/sh", "-c", '"$@"; exit $?', "sh", str(python), str(HERE / "_harness.py")]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(json.dumps(spec), timeout=timeout)
        status = None if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status = f"timeout ({timeout:.0f} s)"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    record = json.loads(lines[-1][len("RESULT "):]) if lines and status is None else {}
    if status or not lines:
        record.update(status=status or "failed (no result)", error=(stderr or stdout)[-2000:])
    record.update(lib=lib, wall_s=time.perf_counter() - start)
    return record


def best_of(repeat, run):
    """``run()`` up to ``repeat`` times (fresh processes): the fastest record, with the largest peak memory."""
    records = []
    for _ in range(max(repeat, 1)):
        records.append(run())
        if records[-1].get("status") != "ok":
            return records[-1]
    best = dict(min(records, key=lambda r: r["total_s"]))
    best.update(peak_mb=max(r["peak_mb"] for r in records), all_total_s=[r["total_s"] for r in records])
    best["work_mb"] = best["peak_mb"] - best["rss_warm_mb"]
    return best


def say(record, label):
    """One progress line for a record; the error tail of a failed one."""
    line = f"  {label:40s} {record.get('status', '?')}"
    if record.get("status") == "ok" and "total_s" in record:
        line += f"  {record['total_s']:8.2f} s  peak {record['peak_mb']:5.0f} MB"
    elif record.get("reason"):
        line += ": " + record["reason"][:200]
    print(line, flush=True)
    for message in record.get("warnings", []) + record.get("log_warnings", []):
        print(f"      warning: {message[:200]}", flush=True)
    if record.get("error"):
        print("      " + record["error"].strip().replace("\n", "\n      ")[-1500:], flush=True)


# ---------------------------------------------------------------- worker side
class _LogCollector(logging.Handler):
    """Keeps log records: pyDVL reports iterations (DEBUG) and problems (WARNING) through logging."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append((record.levelno, record.name, record.getMessage()))


LOG = _LogCollector()


def summarise(messages, limit=4, width=300):
    """The first ``limit`` distinct messages with their counts; messages differing only in numbers are one."""
    unique = {}
    for message in messages:
        unique.setdefault(re.sub(r"[-+]?\d[\d.e+-]*", "#", message)[:120], [message, 0])[1] += 1
    return [f"{count}x {message[:width]}" for message, count in list(unique.values())[:limit]]


def warning_messages(caught):
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def log_warnings(records):
    return [f"{logging.getLevelName(level)} {name}: {message}" for level, name, message in records
            if level >= logging.WARNING]


def versions(lib):
    """Versions of the library, torch, numpy and Python in this process."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for package in ("torch", "numpy", "scikit-learn", {"pydvl": "pyDVL"}.get(lib, lib)):
        try:
            out[package.lower()] = version(package)
        except PackageNotFoundError:
            pass
    if lib == "skinfl":
        import skinfl

        out["skinfl"] = skinfl.__version__  # the checkout on PYTHONPATH, not an installed copy
    return out


def _worker():
    spec = json.loads(sys.stdin.read())
    logging.getLogger().addHandler(LOG)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pydvl").setLevel(logging.DEBUG)  # iteration counts are logged at DEBUG
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)  # pyDVL's sketches and LiSSA's minibatches, kronfluence's targets: the global generator
    module, function = spec["entry"].split(":")
    record = {"entry": spec["entry"], "threads": spec["threads"], "rss_start_mb": RSS_START_MB}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            record.update(getattr(importlib.import_module(module), function)(spec) or {})
            record.setdefault("status", "ok")
        except (NotAvailable, NotSupported) as error:
            record.update(status="not available" if isinstance(error, NotAvailable) else "not supported",
                          reason=str(error))
    record.update(peak_mb=maxrss_mb(), versions=versions(spec["lib"]),
                  warnings=summarise(warning_messages(caught)), log_warnings=summarise(log_warnings(LOG.records)))
    if "rss_warm_mb" in record:
        record["work_mb"] = record["peak_mb"] - record["rss_warm_mb"]
    print("RESULT " + json.dumps(record, default=_json_default), flush=True)


def _json_default(value):
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return value.tolist()
    return str(value)


# ------------------------------------------------------------------- results
def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    info = {"cpu": platform.processor() or "unknown", "cores": cpu_count(), "memory": None,
            "platform": platform.platform(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    for path, key, field in (("/proc/cpuinfo", "model name", "cpu"), ("/proc/meminfo", "MemTotal", "memory")):
        try:
            line = next(line for line in Path(path).read_text().splitlines() if line.startswith(key))
        except (OSError, StopIteration):
            continue
        value = line.split(":", 1)[1].strip()
        info[field] = f"{int(value.split()[0]) / 1024**2:.1f} GiB" if field == "memory" else value
    return info


def git_state() -> str:
    """Short commit of the repository, flagged when skinfl/ has uncommitted changes."""

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = " (skinfl/ has uncommitted changes)" if git("status", "--porcelain", "--", "skinfl") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


class Run:
    """What a script records about itself: its command, start, machine load; writes its results."""

    def __init__(self, args, argv=None):
        self.results_dir = Path(getattr(args, "results_dir", RESULTS_DIR))
        script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT)
        self.command = " ".join(shlex.quote(a) for a in ["python", script, *(sys.argv[1:] if argv is None else argv)])
        self.started = datetime.datetime.now().astimezone()
        self.t0 = time.perf_counter()
        self.load = os.getloadavg()[0]
        self.busy = self.load > 0.5 * cpu_count()
        if self.busy:
            print(f"WARNING: 1-minute load average {self.load:.1f} on {cpu_count()} cores: timings will be noisy.",
                  flush=True)

    def write(self, name, title, sections, *, records=(), notes=(), settings=None, extra=None):
        """``results/<name>.json`` and ``.md``: ``sections`` are (heading or None, text, markdown table)."""
        total_s = time.perf_counter() - self.t0
        machine = machine_info()
        found = {}
        for record in records:
            if record.get("status") == "ok" and record.get("versions"):
                found.setdefault(record.get("lib", "skinfl"), record["versions"])
        commit = git_state()
        libraries = "; ".join(
            f"{NAMES[lib]} {v.get(lib, '?')}" + (f" (commit {commit})" if lib == "skinfl" else " (pyDVL's venv)")
            + f": torch {v.get('torch', '?')}, numpy {v.get('numpy', '?')}" for lib, v in found.items())
        md = [f"# {title}", "", f"- Command: `{self.command}` ({total_s / 60:.1f} minutes)",
              f"- Date: {self.started.strftime('%Y-%m-%d %H:%M %Z')}; skinfl commit {commit}",
              f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']} RAM; 1-min load average "
              f"{self.load:.1f} at start, {machine['load_average'][0]:.1f} at end"]
        if libraries:
            md.append(f"- {libraries}; Python {next(iter(found.values()))['python']}")
        if self.busy:
            md.append("- **The machine was busy: timings are noisy.**")
        for heading, text, table in sections:
            md += [""] + ([f"## {heading}", ""] if heading else []) + ([text, ""] if text else []) + [table]
        if notes:
            md += ["", "## Notes", ""] + [f"- {note}" for note in notes]
        payload = {"name": name, "title": title, "command": self.command,
                   "date": self.started.isoformat("T", "seconds"), "total_s": total_s, "commit": commit,
                   "machine": machine, "versions": found, "settings": settings,
                   "tables": {h or title: t for h, _, t in sections}, "notes": list(notes),
                   "records": list(records), **(extra or {})}
        self.results_dir.mkdir(parents=True, exist_ok=True)
        (self.results_dir / f"{name}.json").write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
        (self.results_dir / f"{name}.md").write_text("\n".join(md) + "\n")
        print("\n".join(f"\n{h or title}\n\n{t}" for h, _, t in sections))
        print(f"\nwrote {self.results_dir / name}.json and .md ({total_s / 60:.1f} minutes)")


def fmt(value, spec=".4f"):
    """``value`` formatted, ``-`` for None, strings as they are."""
    return "-" if value is None else value if isinstance(value, str) else format(value, spec)


def table(header, body, n_left=3):
    """A markdown table, the first ``n_left`` columns left-aligned and the others right-aligned."""
    align = ["---"] * n_left + ["---:"] * (len(header) - n_left)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in body])


def agreement(matrix, reference):
    """Pearson over all entries, mean per-row Spearman and Pearson, max|A - R| / max|R|."""
    import numpy as np
    from scipy import stats

    a, r = (np.asarray(m, dtype=np.float64) for m in (matrix, reference))
    if a.shape != r.shape or not np.isfinite(a).all():
        return {"note": f"shape {a.shape} (reference {r.shape}) or non-finite values"}

    def rows(x, y):
        x, y = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.nanmean((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))))

    return {"pearson": float(np.corrcoef(a.ravel(), r.ravel())[0, 1]),
            "spearman_rows": rows(stats.rankdata(a, axis=1), stats.rankdata(r, axis=1)), "pearson_rows": rows(a, r),
            "max_rel_diff": float(np.abs(a - r).max() / np.abs(r).max())}


def cross(a, b):
    """Two libraries' matrices compared directly: Pearson and the ratio of their norms."""
    import numpy as np

    a, b = (np.asarray(m, dtype=np.float64) for m in (a, b))
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    return {"pearson": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
            "norm_ratio": float(np.linalg.norm(a) / np.linalg.norm(b))}


if __name__ == "__main__":  # the worker: through the module, whose LOG and exceptions the entries share
    sys.path.insert(0, str(HERE))
    importlib.import_module("_harness")._worker()
