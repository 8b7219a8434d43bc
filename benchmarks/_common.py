"""What the benchmark scripts and their workers share: launching workers, log capture, tables.

Standard library only: the workers import it in pyDVL's environment too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time


# ------------------------------------------------------------------ running workers
def launch(python, worker, args, env, timeout):
    """Run a worker; returns (record or None, status, seconds, stderr tail).

    The worker prints its record as one ``RESULT <json>`` line. It is
    started through ``sh`` as a grandchild: on Linux a process exec'd
    directly inherits the high-water RSS of the process it was forked from,
    which would put this process's memory into the worker's ``ru_maxrss``.
    A new session lets a timeout kill the whole process group.
    """
    command = ["/bin/sh", "-c", '"$@"; exit $?', "sh", str(python), str(worker), *args]
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, f"timeout ({timeout:.0f} s)", time.perf_counter() - start, stderr[-2000:]
    wall = time.perf_counter() - start
    record = None
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            record = json.loads(line[len("RESULT "):])
    if proc.returncode != 0 or record is None:
        return None, f"failed (exit {proc.returncode})", wall, (stderr or stdout)[-2000:]
    return record, "ok", wall, stderr[-2000:]


def worker_env(lib, threads, omp_wait_policy="PASSIVE", repo_root=None):
    """The environment of a worker of ``lib``: the same thread settings for both libraries."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS", "PYTHONSTARTUP")}
    if lib == "skinfl":
        env["PYTHONPATH"] = str(repo_root)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if omp_wait_policy != "default":
        # Spinning OpenMP threads slow small torch operations down by 10-100x when other jobs
        # share the cores; PASSIVE makes idle threads sleep.
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command_line(argv, repo_root):
    """The command that ran this script, for the results file."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(a) for a in [sys.executable, os.path.relpath(sys.argv[0], repo_root), *args])


def load_note(cores):
    """A warning line when other jobs load the machine, else None."""
    load = os.getloadavg()
    if load[0] > 0.5 * cores:
        return (f"1-minute load average {load[0]:.1f} on {cores} cores: other jobs are running, so timings are "
                "noisy (use --repeat 3, or run on an idle machine).")
    return None


# ------------------------------------------------------------------ inside workers
class LogCollector(logging.Handler):
    """Keeps log records: pyDVL reports iterations and problems through logging."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append((record.levelno, record.name, record.getMessage()))


def summarise_messages(messages, limit=4, width=300):
    """The first ``limit`` distinct messages with their counts; messages differing only in numbers are one."""
    unique = {}
    for message in messages:
        key = re.sub(r"[-+]?\d[\d.e+-]*", "#", message)[:120]
        unique.setdefault(key, [message, 0])[1] += 1
    return [f"{count}x {message[:width]}" for message, count in list(unique.values())[:limit]]


# ------------------------------------------------------------------ tables
def fmt(value, spec=".4f"):
    """``value`` formatted, ``-`` for None, strings as they are."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def markdown_table(header, body, n_left=3):
    """A markdown table, the first ``n_left`` columns left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * n_left + ["---:"] * (len(header) - n_left)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def text_table(header, body, n_left=3):
    """The same as plain text for the terminal."""
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i < n_left else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths)))
              for b in body]
    return "\n".join(lines)
