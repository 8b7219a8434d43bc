"""Explicit float64 references for models with keyword inputs, token targets and a chosen parameter subset.

Independent of skinfl's code paths: the per-sample loss is written out by
each test, Hessians and Jacobians come from classic autograd
(``torch.autograd.functional``, double backward: torch.func's second
derivatives are wrong through ``LayerNorm`` in torch 2.13), gradients from a
loop over samples.
"""

from collections.abc import Mapping

import torch
from torch.func import functional_call


def logits_of(output):
    return output["logits"] if isinstance(output, Mapping) else output


def rows(X, index):
    if isinstance(X, Mapping):
        return {key: value[index] for key, value in X.items()}
    return X[index]


def n_samples(X):
    return len(next(iter(X.values()))) if isinstance(X, Mapping) else len(X)


class Reference:
    """A model as a function of the parameters ``names`` (the others held fixed).

    ``per_sample_loss(logits, y)`` returns the ``(n,)`` per-sample losses.
    """

    def __init__(self, model, per_sample_loss, names=None):
        self.model = model
        named = dict(model.named_parameters())
        self.names = list(named) if names is None else list(names)
        self.shapes = [named[name].shape for name in self.names]
        self.flat = torch.cat([named[name].detach().reshape(-1) for name in self.names])
        self.per_sample_loss = per_sample_loss

    def _params(self, flat):
        params, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = shape.numel()
            params[name] = flat[start:start + size].reshape(shape)
            start += size
        return params

    def output(self, flat, X):
        params = self._params(flat)
        if isinstance(X, Mapping):
            return logits_of(functional_call(self.model, params, (), dict(X)))
        return logits_of(functional_call(self.model, params, (X,)))

    def losses(self, flat, X, y):
        return self.per_sample_loss(self.output(flat, X), y)

    def hessian(self, X, y):
        return torch.autograd.functional.hessian(lambda flat: self.losses(flat, X, y).mean(), self.flat)

    def gauss_newton(self, X, y):
        total = 0.0
        for i in range(n_samples(X)):
            x_i, y_i = rows(X, slice(i, i + 1)), y[i:i + 1]
            output = self.output(self.flat, x_i).detach()
            J = torch.autograd.functional.jacobian(lambda flat: self.output(flat, x_i).reshape(-1), self.flat)
            H = torch.autograd.functional.hessian(
                lambda o: self.per_sample_loss(o.reshape(output.shape), y_i).sum(), output.reshape(-1))
            total = total + J.T @ H @ J
        return total / n_samples(X)

    def gradients(self, X, y):
        return torch.stack([
            torch.autograd.functional.jacobian(
                lambda flat: self.losses(flat, rows(X, slice(i, i + 1)), y[i:i + 1]).sum(), self.flat)
            for i in range(n_samples(X))
        ])

    def inverse(self, X, y, regularization, second_order="gauss_newton"):
        curvature = self.hessian(X, y) if second_order == "hessian" else self.gauss_newton(X, y)
        return torch.linalg.inv(curvature + regularization * torch.eye(len(curvature), dtype=curvature.dtype))

    def influences(self, X, y, X_test, y_test, regularization, second_order="gauss_newton"):
        inverse = self.inverse(X, y, regularization, second_order)
        return self.gradients(X_test, y_test) @ inverse @ self.gradients(X, y).T


def token_cross_entropy(shift=0, ignore_index=-100):
    """The sum over positions of each sample's cross-entropy, classes last, ``shift`` for next-token loss."""

    def per_sample(logits, y):
        if shift:
            logits, y = logits[:, :-shift], y[:, shift:]
        n, positions, n_classes = logits.shape
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, n_classes), y.reshape(-1),
                                                   reduction="none", ignore_index=ignore_index)
        return losses.reshape(n, positions).sum(dim=1)

    return per_sample
