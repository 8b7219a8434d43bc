"""Fitted scikit-learn models as equivalent torch modules, with the loss and penalty they were trained with.

Each converted module computes exactly the model's decision function, in
the dtype of its coefficients, with parameters named and shaped as
scikit-learn's attributes (``coef``, ``intercept``, ``coefs_0``, ...), so
that a column of ``transform``'s output names the coefficient it belongs to.
Classifiers output logits: a binary model's single decision value ``z``
becomes the two logits ``[0, z]``, whose softmax is ``predict_proba`` and
whose cross-entropy is the binary log-loss the model was trained with.

Penalties are expressed in skinfl's convention: the curvature is that of
the mean training loss plus ``regularization / 2 * ||theta||**2``. Each
``penalty(n_samples)`` below rescales the model's own objective to it.
scikit-learn leaves intercepts unpenalised (except liblinear, which
penalises its synthetic intercept feature like any weight): each
conversion names them in ``unpenalized``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

_ACTIVATIONS = {
    "identity": lambda h: h,
    "logistic": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
}


class LinearDecision(nn.Module):
    """``x @ coef.T + intercept``, as scikit-learn's linear models compute it.

    Parameters
    ----------
    coef : numpy.ndarray of shape (n_outputs, n_features) or (n_features,)
        The fitted ``coef_``; a 1-D ``coef`` gives 1-D outputs (one target).
    intercept : numpy.ndarray or None
        The fitted ``intercept_``; None without intercept.
    binary_logits : bool
        Output the two logits ``[0, z]`` of a binary classifier.
    """

    def __init__(self, coef, intercept, binary_logits=False):
        super().__init__()
        coef = np.asarray(coef)
        self.flat = coef.ndim == 1
        self.binary_logits = binary_logits
        self.coef = nn.Parameter(torch.as_tensor(np.atleast_2d(coef).copy()))
        if intercept is None:
            self.intercept = None
        else:
            self.intercept = nn.Parameter(torch.as_tensor(np.atleast_1d(intercept).astype(coef.dtype)))

    def forward(self, x):
        output = x @ self.coef.T
        if self.intercept is not None:
            output = output + self.intercept
        if self.binary_logits:
            return torch.cat([torch.zeros_like(output), output], dim=1)
        return output[:, 0] if self.flat else output


class PerceptronDecision(nn.Module):
    """A fitted ``MLPClassifier`` or ``MLPRegressor`` up to its output activation.

    Layer ``i`` computes ``h @ coefs_i + intercepts_i`` (scikit-learn's
    layout, ``coefs_i`` of shape ``(n_in, n_out)``), followed by the hidden
    ``activation`` on every layer but the last.
    """

    def __init__(self, coefs, intercepts, activation, binary_logits=False, flat=False):
        super().__init__()
        self.activation = activation
        self.binary_logits = binary_logits
        self.flat = flat
        self.n_layers = len(coefs)
        for index, (coef, intercept) in enumerate(zip(coefs, intercepts)):
            self.register_parameter(f"coefs_{index}", nn.Parameter(torch.as_tensor(np.array(coef))))
            self.register_parameter(f"intercepts_{index}", nn.Parameter(torch.as_tensor(np.array(intercept))))

    def forward(self, x):
        activation = _ACTIVATIONS[self.activation]
        hidden = x
        for index in range(self.n_layers):
            hidden = hidden @ getattr(self, f"coefs_{index}") + getattr(self, f"intercepts_{index}")
            if index < self.n_layers - 1:
                hidden = activation(hidden)
        if self.binary_logits:
            return torch.cat([torch.zeros_like(hidden), hidden], dim=1)
        return hidden[:, 0] if self.flat else hidden


@dataclass
class Conversion:
    """A converted model: the module, its training loss and penalty, and the label encoding.

    Attributes
    ----------
    module : torch.nn.Module
    loss : str
        The built-in loss the model was trained with.
    penalty : callable
        ``penalty(n_samples)``: the model's penalty as skinfl's
        ``regularization``; raises ``ValueError`` for a penalty that is not
        a squared L2 norm.
    classes : numpy.ndarray or None
        The model's ``classes_``: targets are these labels, encoded to their
        index. None for regressors and multilabel classifiers.
    unpenalized : tuple of str
        Parameters the model's penalty leaves out (its intercepts).
    """

    module: nn.Module
    loss: str
    penalty: object
    classes: np.ndarray | None = None
    unpenalized: tuple = ()


SUPPORTED = ("LogisticRegression", "LinearRegression", "Ridge", "SGDClassifier", "MLPClassifier", "MLPRegressor")


def is_sklearn_model(model):
    """A scikit-learn estimator (supported or not): its class comes from scikit-learn."""
    return type(model).__module__.split(".")[0] == "sklearn" and hasattr(model, "fit")


def convert(model):
    """The :class:`Conversion` of a fitted scikit-learn model of a supported type."""
    name = type(model).__name__
    converter = _CONVERTERS.get(name)
    if converter is None:
        raise TypeError(
            f"model={name} is not supported. skinfl takes a trained torch.nn.Module, a fitted skorch net, or "
            f"one of these fitted scikit-learn models: {', '.join(SUPPORTED)}. For another model, write "
            "its decision function as a torch.nn.Module with the fitted parameters."
        )
    check_is_fitted(model)
    return converter(model)


def _fixed_penalty(value):
    return lambda n_samples: value


def _unsupported_penalty(message):
    def penalty(n_samples):
        raise ValueError(f"regularization='auto' cannot take this model's penalty: {message} "
                         "Pass regularization as a number.")
    return penalty


def _check_no_class_weight(model):
    if getattr(model, "class_weight", None) is not None:
        raise ValueError(
            f"{type(model).__name__}(class_weight={model.class_weight!r}) was trained with a class-weighted "
            "loss, which skinfl does not rebuild from a scikit-learn model. Refit it without class_weight, "
            "or convert it yourself and pass loss=torch.nn.CrossEntropyLoss(weight=...)."
        )


def _logistic_penalty(model):
    penalty = model.penalty
    if penalty == "deprecated":  # scikit-learn >= 1.8 derives it from l1_ratio and C
        l1_ratio = 0.0 if model.l1_ratio is None else model.l1_ratio
        penalty = "l2" if l1_ratio == 0 else ("l1" if l1_ratio == 1 else "elasticnet")
    if penalty is None or penalty == "none" or np.isinf(model.C):
        return _fixed_penalty(0.0)
    if penalty != "l2":
        return _unsupported_penalty(f"LogisticRegression's {penalty} penalty has no curvature for its L1 part.")
    # C * sum(losses) + ||w||^2 / 2, divided by C * n: the mean loss plus ||w||^2 / (2 C n).
    return lambda n_samples: 1.0 / (model.C * n_samples)


def _convert_logistic_regression(model):
    _check_no_class_weight(model)
    if getattr(model, "multi_class", "auto") == "ovr" and len(model.classes_) > 2:
        raise ValueError("LogisticRegression(multi_class='ovr') is a set of binary models, not one softmax "
                         "model; refit it with the default multinomial loss.")
    binary = len(model.classes_) == 2
    intercept = model.intercept_ if model.fit_intercept else None
    module = LinearDecision(model.coef_, intercept, binary_logits=binary)
    # liblinear penalises its intercept, a weight of a constant feature intercept_scaling: with the
    # default scaling 1, exactly like the coefficients.
    unpenalized = () if model.solver == "liblinear" else _linear_unpenalized(model)
    return Conversion(module, "cross_entropy", _logistic_penalty(model), np.asarray(model.classes_), unpenalized)


def _convert_sgd_classifier(model):
    _check_no_class_weight(model)
    if model.loss != "log_loss":
        raise ValueError(f"SGDClassifier(loss={model.loss!r}) is not supported: only loss='log_loss' is a "
                         "likelihood skinfl can differentiate twice.")
    if len(model.classes_) != 2:
        raise ValueError("A multiclass SGDClassifier is a set of one-versus-rest binary models, not one "
                         "softmax model; use LogisticRegression, or a binary SGDClassifier.")
    l1_part = {"l2": 0.0, "l1": 1.0, "elasticnet": model.l1_ratio}.get(model.penalty, 0.0)
    if model.penalty is None:
        penalty = _fixed_penalty(0.0)
    elif l1_part > 0:
        penalty = _unsupported_penalty(f"SGDClassifier's {model.penalty} penalty has no curvature for its L1 part.")
    else:
        # mean(losses) + alpha * ||w||^2 / 2.
        penalty = _fixed_penalty(float(model.alpha))
    intercept = model.intercept_ if model.fit_intercept else None
    module = LinearDecision(model.coef_, intercept, binary_logits=True)
    return Conversion(module, "cross_entropy", penalty, np.asarray(model.classes_), _linear_unpenalized(model))


def _linear_unpenalized(model):
    return ("intercept",) if model.fit_intercept else ()


def _perceptron_unpenalized(model):
    return tuple(f"intercepts_{index}" for index in range(len(model.intercepts_)))


def _n_targets(coef):
    return 1 if np.ndim(coef) == 1 else np.shape(coef)[0]


def _convert_linear_regression(model):
    intercept = model.intercept_ if model.fit_intercept else None
    return Conversion(LinearDecision(model.coef_, intercept), "mse", _fixed_penalty(0.0),
                      unpenalized=_linear_unpenalized(model))


def _convert_ridge(model):
    alpha = np.unique(np.atleast_1d(model.alpha))
    if len(alpha) > 1:
        penalty = _unsupported_penalty("this Ridge has a different alpha for each target.")
    else:
        n_targets = _n_targets(model.coef_)
        # ||Y - X W||^2 + alpha ||W||^2 over n samples and t targets; skinfl's "mse" is the
        # mean over both, so the objective divided by n t is mse + (2 alpha / (n t)) ||W||^2 / 2.
        penalty = lambda n_samples: 2.0 * float(alpha[0]) / (n_samples * n_targets)  # noqa: E731
    intercept = model.intercept_ if model.fit_intercept else None
    return Conversion(LinearDecision(model.coef_, intercept), "mse", penalty, unpenalized=_linear_unpenalized(model))


def _convert_mlp_classifier(model):
    # softmax: multiclass; logistic: binary with one output, multilabel with one per label.
    multilabel = model.out_activation_ == "logistic" and model.n_outputs_ > 1
    binary = model.out_activation_ == "logistic" and not multilabel
    module = PerceptronDecision(model.coefs_, model.intercepts_, model.activation, binary_logits=binary)
    if multilabel:
        # Binary log-loss summed over the k labels, averaged over samples: k times skinfl's
        # bce_with_logits mean, so alpha ||W||^2 / (2 n) becomes alpha / (n k).
        n_labels = model.n_outputs_
        return Conversion(module, "bce_with_logits", lambda n_samples: model.alpha / (n_samples * n_labels),
                          unpenalized=_perceptron_unpenalized(model))
    # mean(log-loss) + alpha ||W||^2 / (2 n).
    return Conversion(module, "cross_entropy", lambda n_samples: model.alpha / n_samples, np.asarray(model.classes_),
                      _perceptron_unpenalized(model))


def _convert_mlp_regressor(model):
    n_targets = model.n_outputs_
    module = PerceptronDecision(model.coefs_, model.intercepts_, model.activation, flat=n_targets == 1)
    # The gradient scikit-learn follows is that of sum_t (y_t - f_t)^2 / 2 averaged over samples, plus
    # alpha ||W||^2 / (2 n) (its reported loss averages over the t targets instead, but the optimum is
    # where the gradient vanishes). That is t / 2 times skinfl's "mse" (a mean over targets too) plus
    # the penalty, so regularization = 2 alpha / (n t).
    return Conversion(module, "mse", lambda n_samples: 2.0 * model.alpha / (n_samples * n_targets),
                      unpenalized=_perceptron_unpenalized(model))


_CONVERTERS = {
    "LogisticRegression": _convert_logistic_regression,
    "LinearRegression": _convert_linear_regression,
    "Ridge": _convert_ridge,
    "SGDClassifier": _convert_sgd_classifier,
    "MLPClassifier": _convert_mlp_classifier,
    "MLPRegressor": _convert_mlp_regressor,
}
