"""NystroemInfluence: a randomised Nystroem sketch of the curvature, inverted with the Woodbury identity."""

from __future__ import annotations

from .._linalg.nystroem import nystroem_sketch
from .low_rank import _LowRankInfluence


class NystroemInfluence(_LowRankInfluence):
    """Influence with a randomised Nystroem sketch of the curvature and the Woodbury inverse.

    Multiplies the curvature ``C`` by ``rank`` random orthonormal vectors
    ``Omega`` in one pass over the data and forms the Nystroem approximation

    .. math::

        C \\approx (C\\Omega)(\\Omega^T C \\Omega)^{+}(C\\Omega)^T = U \\operatorname{diag}(s)\\, U^T,

    in the model's dtype on ``device_`` (with the stabilising shift of
    Tropp et al., 2017), then inverts it as :class:`ArnoldiInfluence` does:

    .. math::

        (C + \\lambda I)^{-1} \\approx U \\operatorname{diag}\\Big(\\frac{1}{s + \\lambda}\\Big) U^T
        + \\frac{1}{\\lambda}\\,(I - U U^T).

    The sketch captures the top of a fast-decaying spectrum well and costs
    a single pass over the data with ``rank`` vectors, against some two to
    four products per pair for the converged eigenpairs of
    :class:`ArnoldiInfluence`; per rank it is less accurate. A Hessian that
    is not positive semi-definite keeps the negative eigenvalues its core
    ``Omega^T C Omega`` reveals, with a
    :class:`~skinfl.exceptions.NotPositiveDefiniteWarning` when some
    ``s + lambda`` is not positive; the Nystroem approximation of an
    indefinite matrix is less stable than that of a positive semi-definite
    one, so ``second_order="gauss_newton"`` suits it best away from a
    minimum. Exact at ``rank = n_params``, where ``Omega`` is orthogonal.

    Parameters
    ----------
    model : torch.nn.Module, skorch net or scikit-learn model
        The trained model. It is copied in ``fit`` and evaluated in eval mode;
        influence is taken with respect to its parameters that require gradients.
        A fitted skorch net stands for its ``module_``; a fitted
        ``LogisticRegression``, ``LinearRegression``, ``Ridge``,
        ``SGDClassifier(loss="log_loss")``, ``MLPClassifier`` or
        ``MLPRegressor`` is converted to an equivalent torch module (see
        ``model_`` and :ref:`user-guide-models`).
    loss : {"auto", "cross_entropy", "mse", "bce_with_logits"}, torch.nn loss module or callable, default="auto"
        The training loss. ``"auto"`` is the loss a skorch net or scikit-learn
        model was trained with, and ``"cross_entropy"`` for a torch module. A
        callable takes ``(output, target)`` and returns the scalar mean loss of
        a batch, and must be picklable to save the estimator.
    regularization : float or "auto", default=1e-3
        ``lambda >= 0`` added as ``lambda * I`` to the curvature, and the
        curvature given to the directions outside the sketch: choose it at
        least about the size of the sketch's smallest eigenvalues
        (``eigenvalues_[-1]``). With ``regularization=0`` the term
        ``(I - U U^T) / lambda`` is dropped and the inverse is
        ``U diag(1 / s) U^T`` (exact only at full rank).
        ``"auto"`` takes the model's own penalty (a scikit-learn model's, a
        skorch optimizer's weight decay), resolved in ``regularization_``.
    second_order : {"hessian", "gauss_newton"}, default="hessian"
        Which curvature to sketch. ``"gauss_newton"`` is positive
        semi-definite, which the Nystroem approximation assumes.
    rank : int, default=50
        Columns of the sketch, at most ``n_params``: one pass over the data
        multiplies this many vectors, and the result holds ``rank x
        n_params`` values. A good rank reaches past the eigenvalues that are
        large next to ``regularization``: if ``eigenvalues_[-1]`` is much
        larger than ``regularization``, raise it.
    batch_size : int, default=512
        Samples per batched pass over the data; also the number of
        gradients solved at a time, which bounds the memory of every method.
    device : str or torch.device, default=None
        Where the work runs; None uses the model's device.
    progress : bool, default=False
        Show tqdm progress bars: the sketch's curvature products, and the
        passes over the data for gradients.
    memory : str, joblib.Memory or None, default=None
        Directory (or ``joblib.Memory``) in which to cache the sketch. It
        depends on the model, the data, ``loss``, ``second_order`` and
        ``random_state``, and not on ``regularization`` or ``rank``: a
        candidate with a smaller rank than the cached sketch takes its top
        ``rank`` pairs (the best rank-``rank`` approximation of the larger
        sketch, usually better than a fresh sketch of that rank), one with a
        larger rank sketches again and replaces the entry. List ``rank``
        values in descending order in a grid, so that the first candidate
        computes the largest and a search sketches once per training set.
        Entries are tensors and JSON, never unpickled.
    random_state : int, RandomState instance or None, default=None
        Seeds the test matrix ``Omega`` and the probes of :meth:`score`.

    Attributes
    ----------
    n_params_ : int
        Number of trainable parameters.
    n_samples_fit_ : int
        Number of fitted training samples.
    n_features_in_ : int
        Number of input values per sample.
    input_shape_ : tuple of int
        Per-sample input shape.
    output_shape_ : tuple of int
        Per-sample output shape of the model.
    device_ : torch.device
        Device the estimator computes on.
    model_ : torch.nn.Module
        The evaluation copy of the model (of the converted module for a
        scikit-learn model, of ``module_`` for a skorch net).
    regularization_ : float
        The regularization used: ``regularization``, or the model's own
        penalty when it is ``"auto"``.
    unpenalized_parameters_ : list of str
        With ``regularization="auto"``, the parameters the model's own penalty
        leaves out (a scikit-learn model's intercepts, a skorch parameter
        group without weight decay). This estimator regularizes them too
        (its inverse needs one ``regularization`` for all parameters);
        :class:`DirectInfluence` and :class:`CgInfluence` leave them out.
    classes_ : numpy.ndarray
        Labels of a scikit-learn classifier: targets are given as these
        labels. Only with a scikit-learn classifier as ``model``.
    loss_ : object
        The resolved loss.
    trainable_parameters_ : list of str
        Names of the parameters influence is taken with respect to.
    eigenvalues_ : torch.Tensor of shape ``(rank_,)``
        Eigenvalues of the sketch, largest first, in float64, without
        regularization.
    rank_ : int
        Number of pairs used: ``rank``, less any direction the sketch
        found at the rounding level (a curvature of lower rank).

    See Also
    --------
    ArnoldiInfluence : Converged top eigenpairs: more accurate per rank, more passes over the data.
    CgInfluence : Solves with the full curvature, matrix-free.
    DirectInfluence : The exact inverse, for small models.

    Examples
    --------
    >>> import torch
    >>> from skinfl import NystroemInfluence
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> X, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    >>> est = NystroemInfluence(model, regularization=0.1, rank=10, random_state=0).fit(X, y)
    >>> est.influences(X[:2], y[:2]).shape
    torch.Size([2, 40])
    """

    _factor_parameters = ("random_state",)

    def __init__(
        self,
        model,
        *,
        loss="auto",
        regularization=1e-3,
        second_order="hessian",
        rank=50,
        batch_size=512,
        device=None,
        progress=False,
        memory=None,
        random_state=None,
    ):
        self.model = model
        self.loss = loss
        self.regularization = regularization
        self.second_order = second_order
        self.rank = rank
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.memory = memory
        self.random_state = random_state

    def _low_rank_factors(self, curvature, rank):
        sketch = nystroem_sketch(curvature, rank, self._generator(), positive_part=False)
        return {"eigenvalues": sketch.eigenvalues.double(), "eigenvectors": sketch.eigenvectors}, {}
