"""Handing freed memory back to the operating system between chunks of work.

Iterative solvers allocate and free large temporaries of the same few sizes
thousands of times. glibc's allocator keeps freed blocks in its heap (its
threshold for returning large blocks to the system rises with the sizes it
has seen), so a process's resident memory can grow with the number of
chunks although the memory in use stays flat: measured on CG's
``self_influence`` of 20,000 points, 0.9 GB resident for 0.23 GB in use.
``malloc_trim`` returns the free blocks; it is called between chunks, where
nothing large is alive. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


def release_freed_memory():
    """Return the allocator's free blocks to the system (glibc); a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
