"""NystroemInfluence: a randomised Nystroem sketch of the curvature, inverted with the Woodbury identity."""

from __future__ import annotations

from .._docs import shared_docs
from .._linalg.nystroem import nystroem_sketch
from .low_rank import _LowRankInfluence


@shared_docs(
    progress="the sketch's curvature products",
    memory="the sketch",
    random_state="the test matrix ``Omega``",
    unpenalized_parameters="regularized",
)
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
    {model}
    {loss}
    {parameters}
    {regularization}
        ``lambda >= 0`` added as ``lambda * I`` to the curvature, and the
        curvature given to the directions outside the sketch: choose it at
        least about the size of the sketch's smallest eigenvalues
        (``eigenvalues_[-1]``). With ``regularization=0`` the term
        ``(I - U U^T) / lambda`` is dropped and the inverse is
        ``U diag(1 / s) U^T`` (exact only at full rank).
    {second_order}
        Which curvature to sketch. ``"gauss_newton"`` is positive
        semi-definite, which the Nystroem approximation assumes.
    rank : int, default=50
        Columns of the sketch, at most ``n_params``: one pass over the data
        multiplies this many vectors, and the result holds ``rank x
        n_params`` values. A good rank reaches past the eigenvalues that are
        large next to ``regularization``: if ``eigenvalues_[-1]`` is much
        larger than ``regularization``, raise it.
    {batch_size}
    {device}
    {progress}
    {memory}
        ``rank`` is not among them: a candidate with a smaller rank than the
        cached sketch takes its top ``rank`` pairs (the best rank-``rank``
        approximation of the larger sketch, usually better than a fresh
        sketch of that rank), one with a larger rank sketches again and
        replaces the entry. List ``rank`` values in descending order in a
        grid, so that the first candidate computes the largest and a search
        sketches once per training set.
    {random_state}

    Attributes
    ----------
    {fitted_attributes}
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
        parameters=None,
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
        self.parameters = parameters
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
