"""The lock that lets one process compute a cache entry while the others wait (skinfl._filelock)."""

import subprocess
import sys
import threading
import time

import pytest

import skinfl._filelock
from skinfl._filelock import locked


def waiter(path):
    """A thread that takes the lock on ``path`` and leaves it at once; its event is set once it has."""
    done = threading.Event()

    def take():
        with locked(path):
            done.set()

    threading.Thread(target=take, daemon=True).start()
    return done


def test_a_holder_excludes_others_until_it_leaves(tmp_path):
    path = tmp_path / "entry.lock"
    events = []

    def hold():
        with locked(path):
            events.append("first in")
            time.sleep(0.3)
            events.append("first out")

    first = threading.Thread(target=hold)
    first.start()
    time.sleep(0.1)
    with locked(path):
        events.append("second in")
    first.join()
    assert events == ["first in", "first out", "second in"]
    assert not path.exists()  # removed when released


def test_many_threads_take_turns(tmp_path):
    path = tmp_path / "folder" / "entry.lock"  # the folder is made
    inside, most = [0], [0]

    def work():
        for _ in range(20):
            with locked(path):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.001)
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
    assert not path.exists()


def test_released_when_the_block_raises(tmp_path):
    path = tmp_path / "entry.lock"
    with pytest.raises(ZeroDivisionError), locked(path):
        raise ZeroDivisionError
    assert waiter(path).wait(5)


def test_a_killed_holder_blocks_no_one(tmp_path):
    path = tmp_path / "entry.lock"
    # A process that takes the lock and would keep it for a minute; killed, it never leaves the block.
    script = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('filelock', {skinfl._filelock.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"with module.locked({str(path)!r}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waiting = waiter(path)
        assert not waiting.wait(0.3)
    finally:
        holder.kill()
        holder.wait()
    assert waiting.wait(5)  # the lock went with its holder (its file stayed, and is removed by the next)
    deadline = time.monotonic() + 5
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not path.exists()
    assert waiter(path).wait(5)


def test_without_locks_the_block_runs_unlocked(tmp_path, monkeypatch):
    """A file system that takes no locks (or a folder that cannot be written): the block runs."""

    def refuse(path):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(skinfl._filelock, "_acquire", refuse)
    ran = []
    with locked(tmp_path / "entry.lock"):
        ran.append(True)
    assert ran == [True]
