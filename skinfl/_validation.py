"""Input checks and conversions shared by every estimator.

scikit-learn's declarative parameter constraints are private API; they are
imported here and nowhere else, so a scikit-learn release that moves them
breaks one import, not every estimator.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.utils._param_validation import (  # noqa: F401  (re-exported)
    HasMethods,
    Hidden,
    Interval,
    StrOptions,
)

__all__ = [
    "HasMethods", "Hidden", "Interval", "StrOptions", "as_input_tensor", "as_target_tensor",
    "check_input_shape",
    "input_chunk_to_tensor", "returns_torch", "to_output",
]


def returns_torch(data):
    """Whether results for ``data`` are returned as torch tensors (for a dict of inputs: all of them are)."""
    if isinstance(data, dict):
        return all(isinstance(value, torch.Tensor) for value in data.values())
    return isinstance(data, torch.Tensor)


def to_output(result, like_torch):
    """``result`` as a torch tensor (``like_torch``) or a numpy array."""
    if like_torch:
        return result
    return result.detach().cpu().numpy()


def _as_tensor(data, name):
    if isinstance(data, torch.Tensor):
        if data.layout != torch.strided:
            raise TypeError(f"Sparse tensors are not supported for {name}; convert with {name}.to_dense().")
        return data.detach()
    if hasattr(data, "toarray") or hasattr(data, "tocsr"):  # scipy.sparse
        raise TypeError(f"Sparse data is not supported for {name}; convert it with {name}.toarray().")
    if hasattr(data, "to_numpy"):  # pandas
        data = data.to_numpy()
    array = np.asarray(data)
    if array.dtype == object:
        # Numbers stored as objects convert; anything else raises numpy's TypeError.
        array = array.astype(np.float64)
    if array.dtype.kind in "USV":
        raise ValueError(
            f"{name} must hold numbers, got an array of dtype {array.dtype}"
            + (" (encode string labels with sklearn.preprocessing.LabelEncoder)" if name == "y" else "")
            + "."
        )
    if array.dtype.kind == "c":
        raise ValueError(f"Complex data not supported: {name} is complex, influence functions need real-valued data.")
    if not array.flags.writeable:  # read-only memmaps and pandas values: torch wants writable memory
        return torch.tensor(array)
    return torch.as_tensor(np.ascontiguousarray(array))


def check_input_shape(shape, name="X"):
    """Check the shape of a whole input data set: samples on axis 0, something per sample."""
    if len(shape) < 2:
        raise ValueError(
            f"Expected 2D array or more for {name}, got {len(shape)}D with shape {tuple(shape)}: "
            f"samples go on the first axis. Reshape your data either using {name}.reshape(-1, 1) if it "
            f"has a single feature or {name}.reshape(1, -1) if it contains a single sample."
        )
    if shape[0] == 0:
        raise ValueError(
            f"Found array with 0 sample(s) (shape={tuple(shape)}) while a minimum of 1 is required: {name} is empty."
        )
    if int(np.prod(shape[1:], dtype=np.int64)) == 0:
        raise ValueError(
            f"Found array with 0 feature(s) (shape={tuple(shape)}) while a minimum of 1 is required: "
            f"{name} has no input values per sample."
        )


def check_keyword_input_shapes(shapes, name="X"):
    """Check a dict of keyword inputs: each with samples on axis 0, all with the same number of samples."""
    for key, shape in shapes.items():
        if len(shape) < 1:
            raise ValueError(f"{name}[{key!r}] is a scalar; every input needs one entry per sample on its first axis.")
    lengths = {key: shape[0] for key, shape in shapes.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{key!r}: {tuple(shape)}" for key, shape in shapes.items())
        raise ValueError(
            f"The inputs of {name} must share their first axis (one row per sample), but they have "
            f"{sorted(set(lengths.values()))} rows: shapes {{{described}}}."
        )
    if not next(iter(lengths.values())):
        raise ValueError(f"Found array with 0 sample(s) while a minimum of 1 is required: {name} is empty.")


def input_chunk_to_tensor(chunk, dtype, name="X"):
    """Rows of model inputs as a tensor: finite, floating values cast to the model's ``dtype``.

    Integer inputs (token ids, say) keep their integer type; the tensor stays
    where the rows were (host for arrays, the tensor's device for tensors).
    """
    tensor = _as_tensor(chunk, name)
    if tensor.dtype == torch.bool:
        tensor = tensor.to(dtype)
    if tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"Input {name} contains NaN or infinity; remove or impute those samples "
                "before computing influences."
            )
        tensor = tensor.to(dtype)
    return tensor


def as_input_tensor(X, dtype, device, name="X"):
    """Check and convert a whole set of model inputs (see :func:`input_chunk_to_tensor`)."""
    if X is None:
        raise ValueError(f"{name} is None; pass the model inputs as an array or tensor.")
    tensor = _as_tensor(X, name)
    check_input_shape(tuple(tensor.shape), name)
    return input_chunk_to_tensor(tensor, dtype, name).to(device)


def check_same_length(X, y, names=("X", "y")):
    if y is not None and len(X) != len(y):
        raise ValueError(
            f"{names[0]} and {names[1]} have different numbers of samples: {len(X)} and {len(y)}."
        )


def _reshape_to_outputs(target, output_shape, name, loss_kind):
    """Give regression/binary targets the per-sample shape of the model output.

    Without this, an output of shape (n, 1) against targets of shape (n,)
    would broadcast to (n, n) inside the loss: silently wrong.
    """
    expected = (target.shape[0], *output_shape)
    if tuple(target.shape) == expected:
        return target
    if target[0].numel() == int(np.prod(output_shape, dtype=int)):
        return target.reshape(expected)
    raise ValueError(
        f"{name} has shape {tuple(target.shape)} but the model outputs shape "
        f"{expected} per batch; for loss='{loss_kind}' the targets must match the "
        "model's outputs sample by sample."
    )


def as_target_tensor(y, loss, output_shape, dtype, device=None, name="y"):
    """Check and convert targets for ``loss`` given the model's output shape.

    ``device=None`` leaves the tensor where the targets were.
    """
    tensor = _as_tensor(y, name)
    if tensor.ndim == 0:
        raise ValueError(f"{name} is a scalar; pass one target per sample.")
    if tensor.shape[0] == 0:
        raise ValueError(f"Found array with 0 sample(s) while a minimum of 1 is required: {name} is empty.")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"Input {name} contains NaN or infinity; every target must be finite.")

    if loss.sequence:
        return _position_labels(tensor, loss, output_shape, name, device)
    if loss.takes_class_indices:
        return _class_labels(tensor, output_shape, name, device)
    if loss.kind in ("mse", "bce_with_logits"):
        tensor = _reshape_to_outputs(tensor.to(dtype), output_shape, name, loss.kind)
        if loss.kind == "bce_with_logits" and bool(((tensor < 0) | (tensor > 1)).any()):
            raise ValueError(
                f"{name} must lie in [0, 1] for loss='bce_with_logits' (probabilities or 0/1 labels); "
                f"got values from {tensor.min().item():g} to {tensor.max().item():g}."
            )
        return _moved(tensor, device)
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return _moved(tensor, device)


def _moved(tensor, device):
    return tensor if device is None else tensor.to(device)


def _integer_labels(tensor, name, loss_name):
    if tensor.is_floating_point() and not bool((tensor == tensor.round()).all()):
        raise ValueError(
            f"{name} must hold integer class indices for loss={loss_name!r}, got non-integer values; "
            "for regression targets use loss='mse'."
        )
    return tensor.to(torch.long)


def _position_labels(tensor, loss, output_shape, name, device):
    """Targets of a loss over positions: one class index per position, ``ignore_index`` allowed."""
    positions, n_classes = tuple(output_shape[:-1]), output_shape[-1]
    if tuple(tensor.shape[1:]) != positions:
        what = "sequence length" if len(positions) == 1 else "positions"
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}, but the model outputs shape (n, {', '.join(map(str, output_shape))}) "
            f"per batch: for loss={loss.name!r} {name} needs one class index per position, shape "
            f"(n, {', '.join(map(str, positions))}); check the {what} of {name} against the inputs'."
        )
    labels = _integer_labels(tensor, name, loss.name)
    counted = labels[labels != loss.ignore_index]
    if counted.numel():
        low, high = int(counted.min()), int(counted.max())
        if low < 0 or high >= n_classes:
            raise ValueError(
                f"{name} holds class indices from {low} to {high}, but the model has {n_classes} outputs per "
                f"position, so they must lie in 0..{n_classes - 1} (or be {loss.ignore_index}, ignored)."
            )
    return _moved(labels, device)


def _class_labels(tensor, output_shape, name, device):
    if tensor.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array of class indices for loss='cross_entropy', "
            f"got shape {tuple(tensor.shape)}."
        )
    if tensor.is_floating_point():
        if not bool((tensor == tensor.round()).all()):
            raise ValueError(
                f"{name} must hold integer class indices for loss='cross_entropy', got "
                "non-integer values; for regression targets use loss='mse'."
            )
    labels = tensor.to(torch.long)
    n_classes = output_shape[0] if len(output_shape) else 1
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_classes:
        raise ValueError(
            f"{name} holds class labels from {low} to {high}, but the model has {n_classes} "
            f"outputs, so labels must lie in 0..{n_classes - 1}. Encode labels with "
            "sklearn.preprocessing.LabelEncoder, or check that this is the model trained on them."
        )
    return _moved(labels, device)


def as_model_data(model, loss, X, y, names=("X", "y")):
    """``(X, y)`` checked and converted for ``model`` and ``loss`` (a LossSpec).

    Inputs take the model's floating type, targets the form ``loss`` needs
    for the model's output shape; both go to the model's device.
    """
    parameter = next(model.parameters())
    X_t = as_input_tensor(X, parameter.dtype, parameter.device, names[0])
    with torch.no_grad():
        output_shape = tuple(model(X_t[:1]).shape[1:])
    y_t = as_target_tensor(y, loss, output_shape, parameter.dtype, parameter.device, names[1])
    check_same_length(X_t, y_t, names)
    return X_t, y_t


def validate_estimator_params(estimator):
    """Check ``estimator.get_params()`` against its ``_parameter_constraints``."""
    from sklearn.utils._param_validation import validate_parameter_constraints

    validate_parameter_constraints(
        estimator._parameter_constraints,
        estimator.get_params(deep=False),
        caller_name=type(estimator).__name__,
    )
