"""Where results go: a host or device array filled block by block, and running top-k.

``influences`` never builds its matrix in one piece: it computes blocks of
(test rows) x (training columns) and writes each into the result, which is
a numpy array on the host (numpy in), a tensor on the device (torch in), or
whatever the caller passed as ``out`` (a ``numpy.memmap`` on disk, say).
``top_influences`` keeps only the ``k`` best values per row while the
training data streams past.
"""

from __future__ import annotations

import numpy as np
import torch

# Default of influences(max_result_bytes=...): results above this need out= or an explicit limit.
DEFAULT_MAX_RESULT_BYTES = 2 * 2**30


def _format_bytes(n_bytes):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes} bytes"


def allocate(shape, dtype, like_torch, device, out=None, max_bytes=DEFAULT_MAX_RESULT_BYTES, what="influences"):
    """The array a result is written into: ``out`` if given (checked), else a new one.

    A new result larger than ``max_bytes`` is refused with an error that
    names the ways out; ``max_bytes=None`` lifts the limit.
    """
    shape = tuple(int(s) for s in shape)
    if out is not None:
        if tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, but {what} has shape {shape}.")
        if isinstance(out, np.ndarray) and not out.flags.writeable:
            raise ValueError("out is read-only; open the memmap with mode='w+' or 'r+'.")
        if not isinstance(out, (np.ndarray, torch.Tensor)) and not _is_writable_array(out):
            raise TypeError("out must be a numpy array (a memmap, say), a torch tensor or an array on disk that "
                            f"takes row blocks (a zarr array), got {type(out).__name__}.")
        return out
    n_bytes = int(np.prod(shape, dtype=np.int64)) * torch.tensor([], dtype=dtype).element_size()
    if max_bytes is not None and n_bytes > max_bytes:
        raise ValueError(
            f"{what} would allocate a result of shape {shape} ({_format_bytes(n_bytes)}), above "
            f"max_result_bytes={max_bytes:,}. Pass out= an array to write it into, for example "
            "numpy.lib.format.open_memmap(path, mode='w+', dtype='float32', shape=...) to stream it to "
            "disk; use top_influences(..., k=...) for the k largest values per test point without the "
            "matrix; or raise max_result_bytes (None lifts the limit) if the memory is there."
        )
    if like_torch:
        return torch.empty(shape, dtype=dtype, device=device)
    return np.empty(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype)


def _is_writable_array(value):
    """Whether ``value`` is an array outside numpy and torch that blocks can be written into (zarr, h5py)."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__setitem__")


def write(result, index, block):
    """``result[index] = block`` across host and device, casting to the result's dtype."""
    if isinstance(result, torch.Tensor):
        result[index] = block.to(device=result.device, dtype=result.dtype)
    else:
        result[index] = block.detach().cpu().numpy()


class RunningTopK:
    """The ``k`` largest (or smallest) values per row, and their column indices, over column blocks."""

    def __init__(self, k, largest):
        self.k = k
        self.largest = largest
        self.values = None
        self.indices = None

    def update(self, block, first_column):
        """Merge ``block`` (rows x columns) whose columns start at ``first_column``."""
        columns = torch.arange(first_column, first_column + block.shape[1], device=block.device)
        columns = columns.expand(block.shape[0], -1)
        if self.values is not None:
            block = torch.cat([self.values, block], dim=1)
            columns = torch.cat([self.indices, columns], dim=1)
        top = torch.topk(block, min(self.k, block.shape[1]), dim=1, largest=self.largest, sorted=True)
        self.values, self.indices = top.values, torch.gather(columns, 1, top.indices)
