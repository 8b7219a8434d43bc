"""An exclusive lock on a file, between processes and threads, for one computation per cache key.

Processes sharing a cache folder (the workers of a parallel search) would otherwise compute the same entry
at once; with :func:`locked`, the first computes and stores it while the others wait, then read it.

The lock is the operating system's on an open lock file (``flock`` on POSIX, ``msvcrt.locking`` on
Windows): it is held by the open file, so it goes when its holder leaves the ``with`` block, raises, or is
killed, and a lock file left by a killed process blocks no one. Lock files are removed when released.
Where the file system takes no locks (some network and user-space file systems), or the lock file cannot be
made, the block runs without the lock: the computation may then run in several processes at once, as
without it. Nothing here imports torch or the rest of skinfl.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

# Seconds between tries where a lock can only be polled for (Windows).
_POLL_SECONDS = 0.05


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock on the lock file ``path`` (created if missing, with its folder) for the
    ``with`` block.

    Waits as long as another process or thread holds it.
    """
    path = os.fspath(path)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        descriptor = _acquire(path)
    except OSError:  # no locks on this file system, or no right to make the file: unlocked
        descriptor = None
    try:
        yield
    finally:
        if descriptor is not None:
            _release(path, descriptor)


if fcntl is not None:

    def _acquire(path):
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                # The holder before us may have removed the file after we opened it; a lock on a removed
                # file excludes no one who opens the path now: try again on the file the path names.
                held, named = os.fstat(descriptor), os.stat(path)
            except FileNotFoundError:
                os.close(descriptor)
                continue
            except BaseException:
                os.close(descriptor)
                raise
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                return descriptor
            os.close(descriptor)

    def _release(path, descriptor):
        with contextlib.suppress(OSError):
            os.unlink(path)  # while locked: whoever waits on this file finds it gone and tries again
        os.close(descriptor)  # releases the lock

else:

    def _acquire(path):
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
                    return descriptor
                except OSError as error:  # held by another (its blocking mode gives up after 10 s): poll
                    if error.errno not in (errno.EACCES, errno.EDEADLK):
                        raise
                    time.sleep(_POLL_SECONDS)
        except BaseException:
            os.close(descriptor)
            raise

    def _release(path, descriptor):
        try:
            msvcrt.locking(descriptor, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(descriptor)
        with contextlib.suppress(OSError):
            # Windows removes no file that another process holds open: this succeeds only when no one waits.
            os.unlink(path)
