"""Warnings and errors raised by skinfl estimators."""

from sklearn.exceptions import ConvergenceWarning, NotFittedError

__all__ = [
    "CgConvergenceWarning", "LissaConvergenceWarning", "NotFittedError", "NotPositiveDefiniteWarning",
    "TrainingModeWarning",
]


class CgConvergenceWarning(ConvergenceWarning):
    """Some conjugate-gradient systems stopped before reaching the tolerance.

    The message says how many, the worst relative residual, and what to
    change (``max_iter``, ``regularization``, ``preconditioner``).
    """


class NotPositiveDefiniteWarning(UserWarning):
    """The curvature plus regularization is not positive definite.

    Happens with ``second_order="hessian"`` when the model is not at a
    minimum of the training loss. Influences are then not those of a
    minimiser; raise ``regularization`` above the most negative eigenvalue
    or use ``second_order="gauss_newton"``.
    """


class TrainingModeWarning(UserWarning):
    """The model was given in training mode and has dropout or batch norm.

    skinfl evaluates a private copy in eval mode (dropout off, batch norm with
    its running statistics), as influence functions describe the trained
    model; the user's model is left as it is. Call ``model.eval()`` first to
    make that explicit and silence the warning.
    """


class LissaConvergenceWarning(ConvergenceWarning):
    """Some LiSSA recursions reached ``max_iter`` before their iterates settled.

    The message says how many, the largest remaining change per iteration
    relative to the iterate, and what to change (``max_iter``, ``rtol``,
    ``minibatch_size``, ``regularization``).
    """
