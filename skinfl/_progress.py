"""Optional tqdm progress bars."""

from tqdm.auto import tqdm


def progress_bar(iterable, enabled, desc, total=None):
    """``iterable`` wrapped in a tqdm bar when ``enabled``, else unchanged."""
    if not enabled:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)
