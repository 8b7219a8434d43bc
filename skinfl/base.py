"""The estimator every influence approximation shares.

A subclass implements two things: ``_fit_curvature(curvature)``, which builds
its approximation of the inverse of ``C + regularization * I`` from a
:class:`~skinfl._curvature.CurvatureOperator` over the fitted data, and
``_solve(gradients)``, which applies that inverse to rows of gradients.
Everything users call (``fit``, ``transform``, ``influences``,
``self_influence``, ``score``, pickling) lives here, once.
"""

from __future__ import annotations

import io
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._curvature import SECOND_ORDER_MODES, CurvatureOperator
from ._gradients import all_gradients, batch_slices, iter_gradients, perturbation_batch
from ._model import (
    BUILTIN_LOSSES,
    FunctionalModel,
    LossSpec,
    evaluation_copy,
    mode_dependent_modules_in_training,
)
from ._validation import (
    Interval,
    StrOptions,
    as_input_tensor,
    as_target_tensor,
    check_same_length,
    returns_torch,
    to_output,
    validate_estimator_params,
)
from .exceptions import TrainingModeWarning

_REGISTRY = {}

# (test factors) x (training samples) pairs per perturbation batch: each pair
# holds a gradient of the input, so this bounds that memory.
_MAX_PERTURBATION_PAIRS = 2**14


def registered_estimators():
    """The influence estimator classes, by name, in definition order."""
    return dict(_REGISTRY)


class BaseInfluence(TransformerMixin, BaseEstimator):
    """Base class of the influence estimators; not used directly.

    Subclasses document the shared parameters; see :class:`CgInfluence`.
    """

    _parameter_constraints = {
        "model": [nn.Module],
        "loss": [StrOptions(set(BUILTIN_LOSSES)), callable],
        "regularization": [Interval(Real, 0, None, closed="left")],
        "second_order": [StrOptions(set(SECOND_ORDER_MODES))],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device, None],
        "progress": ["boolean"],
    }

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            _REGISTRY[cls.__name__] = cls

    # ------------------------------------------------------------------ hooks
    def _fit_curvature(self, curvature):  # pragma: no cover - abstract
        raise NotImplementedError

    def _solve(self, gradients):  # pragma: no cover - abstract
        raise NotImplementedError

    # -------------------------------------------------------------- fitting
    def fit(self, X, y=None):
        """Build the inverse-curvature approximation on training data.

        The model is not trained: it is taken as trained on data like
        ``(X, y)``. The data are kept so that :meth:`influences` can score
        every fitted point.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Training inputs, as the model takes them.
        y : array-like or torch.Tensor of shape (n_samples, ...)
            Training targets for ``loss``. Required.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        validate_estimator_params(self)
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None: "
                "the curvature is that of the training loss, which needs targets."
            )
        device = self._resolve_device()
        trainable = [name for name, p in self.model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(
                "The model has no trainable parameters (none has requires_grad=True); "
                "influence is taken with respect to trainable parameters."
            )
        in_training = mode_dependent_modules_in_training(self.model)
        if in_training:
            warnings.warn(
                f"The model is in training mode and its modules {in_training[:3]} behave differently "
                "in eval mode; influences are computed on a copy in eval mode (dropout off, batch norm "
                "with running statistics), and your model is left unchanged. Call model.eval() "
                "before fitting to silence this warning.",
                TrainingModeWarning,
                stacklevel=2,
            )
        loss = LossSpec.resolve(self.loss)
        X_t = as_input_tensor(X, _model_dtype(self.model), device)
        module = _evaluation_copy_for(self.model, device, X_t)
        fmodel = FunctionalModel(module, loss, trainable)
        output_shape = _probe_output_shape(fmodel, X_t)
        y_t = as_target_tensor(y, loss, output_shape, fmodel.dtype, device)
        check_same_length(X_t, y_t)

        self.model_ = fmodel.module
        self.loss_ = loss
        self.trainable_parameters_ = trainable
        self.device_ = device
        self.n_params_ = fmodel.n_params
        self.n_samples_fit_ = len(X_t)
        self.input_shape_ = tuple(X_t.shape[1:])
        self.n_features_in_ = int(np.prod(self.input_shape_, dtype=int))
        self.output_shape_ = tuple(output_shape)
        self._fit_X = X_t
        self._fit_y = y_t
        self._fit_curvature(self._curvature_over(X_t, y_t))
        return self

    # ------------------------------------------------------------ inference
    def transform(self, X, y=None):
        """Influence factors ``(C + regularization I)^-1 grad l(x, y)``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Inputs.
        y : array-like or torch.Tensor of shape (n_samples, ...), default=None
            Targets. If None, the gradient is that of the model's prediction
            measurement: the negative log-probability of the predicted class
            for classification losses, the sum of the outputs for ``"mse"``.

        Returns
        -------
        factors : ndarray or torch.Tensor of shape (n_samples, n_params)
            A torch tensor on ``device_`` if ``X`` is one, else a numpy array.
        """
        X_t, y_t = self._check_data(X, y)
        factors = self._solve(self._gradients(X_t, y_t))
        return to_output(factors, returns_torch(X))

    def influences(self, X_test, y_test=None, X=None, y=None, mode="up"):
        """Influence of training points on the loss at test points.

        ``influences[i, j] = <(C + regularization I)^-1 g(test_i), g(train_j)>``
        with ``g`` the loss gradients. Positive means helpful: up-weighting
        training point ``j`` lowers the loss at test point ``i``; removing it
        changes that loss by about ``influences[i, j] / n_samples_fit_``.

        Parameters
        ----------
        X_test : array-like or torch.Tensor of shape (n_test, ...)
            Test inputs.
        y_test : array-like or torch.Tensor of shape (n_test, ...), default=None
            Test targets; None uses the prediction measurement (see
            :meth:`transform`).
        X, y : array-like or torch.Tensor, default=None
            Training points to score. None scores the data given to ``fit``.
        mode : {"up", "perturbation"}, default="up"
            ``"up"``: up-weighting influence, shape ``(n_test, n_train)``.
            ``"perturbation"``: ``<(C + regularization I)^-1 g(test_i),
            grad_x grad_theta l(x_j, y_j)>``, the sensitivity to perturbing the
            input of training point ``j``, shape ``(n_test, n_train, *x_shape)``.

        Returns
        -------
        influences : ndarray or torch.Tensor
            A torch tensor on ``device_`` if ``X_test`` is one, else a numpy array.
        """
        if mode not in ("up", "perturbation"):
            raise ValueError(f"mode must be 'up' or 'perturbation', got {mode!r}.")
        X_test_t, y_test_t = self._check_data(X_test, y_test, names=("X_test", "y_test"))
        if X is None:
            if y is not None:
                raise ValueError("y was given without X; pass both, or neither to score the fitted data.")
            X_t, y_t = self._fit_X, self._fit_y
        else:
            X_t, y_t = self._check_data(X, y, names=("X", "y"))

        if mode == "up":
            result = self._up_influences(X_test_t, y_test_t, X_t, y_t)
        else:
            result = self._perturbation_influences(X_test_t, y_test_t, X_t, y_t)
        return to_output(result, returns_torch(X_test))

    def self_influence(self, X, y=None):
        """Self-influence ``<(C + regularization I)^-1 g_i, g_i>`` of each sample.

        Large values mark points the model depends on most, often
        mislabelled or atypical ones.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Inputs.
        y : array-like or torch.Tensor of shape (n_samples, ...), default=None
            Targets; None uses the prediction measurement (see :meth:`transform`).

        Returns
        -------
        self_influence : ndarray or torch.Tensor of shape (n_samples,)
            A torch tensor on ``device_`` if ``X`` is one, else a numpy array.
        """
        X_t, y_t = self._check_data(X, y)
        gradients = self._gradients(X_t, y_t)
        values = (self._solve(gradients) * gradients).sum(dim=1)
        return to_output(values, returns_torch(X))

    def score(self, X, y):
        r"""Held-out curvature residual of the inverse (higher is better, at most 0).

        The estimator approximates ``(C_fit + lambda I)^-1`` with ``C_fit`` the
        curvature of the fitted data. Influence needs the inverse of the
        curvature of the *population*, so the inverse is checked against the
        curvature ``C_val`` of held-out data ``(X, y)``, computed here with no
        regularization, on the held-out gradients ``g_v`` themselves:

        .. math::

            \mathrm{score} = -\frac{1}{m}\sum_{v=1}^{m}
            \frac{\lVert C_{\mathrm{val}}\, u_v - g_v \rVert^2}{\lVert g_v \rVert^2},
            \qquad u_v = (C_{\mathrm{fit}} + \lambda I)^{-1} g_v .

        A perfect inverse gives 0. It is not degenerate in ``lambda``: as
        ``lambda -> infinity``, ``u_v -> 0`` and the score tends to -1 (nothing
        explained); as ``lambda -> 0``, directions that the fitted data barely
        constrain are amplified by ``1 / eigenvalue`` and, where held-out
        curvature disagrees, the score falls far below -1. No retraining is
        involved. Samples with a zero gradient are skipped. For scores against
        retraining ground truth, see ``skinfl.metrics``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Held-out inputs.
        y : array-like or torch.Tensor of shape (n_samples, ...)
            Held-out targets. Required.

        Returns
        -------
        score : float
            Minus the mean relative residual; 0 is a perfect inverse.
        """
        if y is None:
            raise ValueError("score needs targets y: it compares against the curvature of the held-out loss.")
        X_t, y_t = self._check_data(X, y)
        gradients = self._gradients(X_t, y_t)
        norms = (gradients * gradients).sum(dim=1)
        keep = norms > torch.finfo(gradients.dtype).tiny
        if not bool(keep.any()):
            warnings.warn("Every held-out sample has a zero gradient; the score is undefined (nan).", stacklevel=2)
            return float("nan")
        factors = self._solve(gradients[keep])
        residuals = self._curvature_over(X_t, y_t).matmat(factors) - gradients[keep]
        return float(-((residuals * residuals).sum(dim=1) / norms[keep]).mean())

    # ------------------------------------------------------------- plumbing
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.allow_nan = False
        tags.non_deterministic = False
        return tags

    def _resolve_device(self):
        if self.device is not None:
            device = torch.device(self.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(
                    f"device={self.device!r} but CUDA is not available on this machine; "
                    "use device='cpu' or device=None (the model's device)."
                )
            return device
        parameters = list(self.model.parameters())
        if not parameters:
            raise ValueError("The model has no parameters, so influence functions are undefined for it.")
        for tensor in parameters:
            if not isinstance(tensor, nn.parameter.UninitializedParameter):
                return tensor.device
        return torch.device("cpu")  # only lazy parameters: they materialise on the default device

    def _functional_model(self):
        return FunctionalModel(self.model_, self.loss_, self.trainable_parameters_)

    def _curvature_over(self, X, y):
        return CurvatureOperator(
            self._functional_model(), X, y, self.second_order, self.batch_size, self.progress
        )

    def _gradients(self, X, y):
        return all_gradients(self._functional_model(), X, y, self.batch_size, self.progress)

    def _check_data(self, X, y, names=("X", "y")):
        check_is_fitted(self)
        fmodel_dtype = _model_dtype(self.model_)
        X_t = as_input_tensor(X, fmodel_dtype, self.device_, names[0])
        if tuple(X_t.shape[1:]) != self.input_shape_:
            if X_t.ndim == 2 and len(self.input_shape_) == 1:
                raise ValueError(
                    f"{names[0]} has {X_t.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.input_shape_[0]} features as input."
                )
            raise ValueError(
                f"{names[0]} has per-sample shape {tuple(X_t.shape[1:])}, but {type(self).__name__} "
                f"was fitted on inputs of per-sample shape {self.input_shape_}."
            )
        if y is None:
            return X_t, None
        y_t = as_target_tensor(y, self.loss_, self.output_shape_, fmodel_dtype, self.device_, names[1])
        check_same_length(X_t, y_t, names)
        return X_t, y_t

    def _up_influences(self, X_test, y_test, X, y):
        fmodel = self._functional_model()
        result = torch.empty(len(X_test), len(X), dtype=fmodel.dtype, device=self.device_)
        # <A^-1 a, b> = <a, A^-1 b> for symmetric A: invert on the smaller side.
        if len(X_test) <= len(X):
            factors = self._solve(self._gradients(X_test, y_test))
            for batch, gradients in iter_gradients(fmodel, X, y, self.batch_size, self.progress):
                result[:, batch] = factors @ gradients.T
        else:
            factors = self._solve(self._gradients(X, y))
            for batch, gradients in iter_gradients(fmodel, X_test, y_test, self.batch_size, self.progress):
                result[batch] = gradients @ factors.T
        return result

    def _perturbation_influences(self, X_test, y_test, X, y):
        if not X.is_floating_point():
            raise ValueError("mode='perturbation' differentiates with respect to the inputs, which must be floating point.")
        fmodel = self._functional_model()
        factors = self._solve(self._gradients(X_test, y_test))
        result = torch.empty(len(X_test), *X.shape, dtype=fmodel.dtype, device=self.device_)
        batch_size = max(1, min(self.batch_size, _MAX_PERTURBATION_PAIRS // len(X_test)))
        with torch.no_grad():
            for batch in batch_slices(len(X), batch_size):
                y_batch = None if y is None else y[batch]
                result[:, batch] = perturbation_batch(fmodel, factors, X[batch], y_batch)
        return result

    # -------------------------------------------------------------- pickling
    def __getstate__(self):
        # torch.save keeps tensors (and modules) device-tagged; loading them
        # with a map_location lets an estimator fitted on a GPU load anywhere.
        state = super().__getstate__()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        device = state.get("device_")
        return {"torch_state": buffer.getvalue(), "device": None if device is None else str(device)}

    def __setstate__(self, packed):
        saved = packed.get("device")
        target = _available_device(saved)
        if target is None:  # unfitted: only the user's model holds tensors
            target_map = None if torch.cuda.is_available() else "cpu"
        else:
            target_map = target
        state = torch.load(io.BytesIO(packed["torch_state"]), map_location=target_map, weights_only=False)
        if saved is not None:
            if torch.device(saved) != target:
                warnings.warn(
                    f"This estimator was fitted on {saved}, which is not available here; "
                    f"it was loaded on {target}.",
                    UserWarning,
                    stacklevel=2,
                )
            state["device_"] = target
        super().__setstate__(state)


def _available_device(saved):
    if saved is None:
        return None
    device = torch.device(saved)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return torch.device("cpu")
    return device


def _model_dtype(model):
    for parameter in model.parameters():  # lazy (uninitialised) parameters know their dtype too
        return parameter.dtype
    return torch.get_default_dtype()


def _inputs_do_not_fit(X, error):
    """The error for a model that cannot be evaluated on ``X[:1]``."""
    hint = (
        " X holds integers, which are passed to the model as they are (as token ids for an "
        "embedding layer would be); cast X to float for a model that takes real values."
        if not X.is_floating_point()
        else ""
    )
    return ValueError(
        f"The model could not be evaluated on X[:1] of shape {tuple(X[:1].shape)} "
        f"({type(error).__name__}: {error}). Check that X has the input shape the "
        f"model was trained on (for example the number of features).{hint}"
    )


def _evaluation_copy_for(model, device, X):
    try:
        return evaluation_copy(model, device, example=X[:1])
    except Exception as error:  # materialising lazy modules runs the model
        raise _inputs_do_not_fit(X, error) from error


def _probe_output_shape(fmodel, X):
    """Per-sample output shape of the model, with a clear error if X does not fit it."""
    try:
        with torch.no_grad():
            output = fmodel.output(fmodel.params, X[:1])
    except Exception as error:  # any failure here means the inputs do not fit the model
        raise _inputs_do_not_fit(X, error) from error
    if not isinstance(output, torch.Tensor) or output.ndim == 0 or output.shape[0] != 1:
        raise ValueError(
            "The model must return one output tensor with samples on the first axis; "
            f"on a batch of one sample it returned {type(output).__name__} "
            f"of shape {tuple(getattr(output, 'shape', ()))}."
        )
    return output.shape[1:]
