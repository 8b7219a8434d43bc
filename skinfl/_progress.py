"""Optional tqdm progress bars.

Every long step shows one when the estimator's ``progress`` is True: passes
over the data (gradients, curvature matrices, sketches), iterative solves
(conjugate gradient, LiSSA) and eigen-solves, with what tells how far they
are (the worst residual, the iteration). Code that reports progress takes a
bar and calls ``update`` and ``note`` on it; with ``progress=False`` it gets
:data:`NO_PROGRESS`, whose methods do nothing, so the loops are the same.
"""

from __future__ import annotations

from contextlib import contextmanager

from tqdm.auto import tqdm


def progress_bar(iterable, enabled, desc, total=None):
    """``iterable`` wrapped in a tqdm bar when ``enabled``, else unchanged."""
    if not enabled:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


class _NoProgress:
    """A bar that shows nothing."""

    enabled = False

    def update(self, n=1):
        pass

    def note(self, text):
        pass


NO_PROGRESS = _NoProgress()


class _Progress:
    """A tqdm bar that steps with ``update`` and shows ``note``'s text after the count."""

    enabled = True

    def __init__(self, bar):
        self._bar = bar

    def update(self, n=1):
        self._bar.update(n)

    def note(self, text):
        self._bar.set_postfix_str(text)  # redrawn now: notes come at most once per iteration


@contextmanager
def progress(enabled, desc, total=None, unit="it"):
    """A bar for a loop whose steps the code counts itself (:data:`NO_PROGRESS` unless ``enabled``)."""
    if not enabled:
        yield NO_PROGRESS
        return
    bar = tqdm(desc=desc, total=total, unit=unit, leave=False)
    try:
        yield _Progress(bar)
    finally:
        bar.close()
