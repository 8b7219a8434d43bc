"""ArnoldiInfluence: the top eigenpairs of the curvature, inverted with the Woodbury identity."""

from __future__ import annotations

from numbers import Integral, Real

from sklearn.exceptions import ConvergenceWarning

from .._deprecation import DEPRECATED
from .._docs import shared_docs
from .._linalg.eigensolvers import (
    EIGEN_SOLVERS,
    krylov_dimension_for,
    resolve_eigen_solver,
    top_eigenpairs,
)
from .._validation import Hidden, Interval, StrOptions
from .._warnings import warn
from .low_rank import _LowRankInfluence


# The default budget of max_iter=None, in products per basis vector: the 100 restart cycles that max_iter
# counted before skinfl 0.2 took up to about 36 (Lanczos) to 50-70 (ARPACK) times krylov_dimension.
_PRODUCTS_PER_KRYLOV_DIMENSION = 50


@shared_docs(
    progress="the eigen-solve's curvature products",
    memory="the eigenpairs",
    random_state="the starting vectors of the Krylov method",
    max_iter=("curvature-vector products of the eigen-solve in ``fit``", "one vector multiplied by the "
              "curvature (a block of ``b`` vectors counts ``b``)"),
    unpenalized_parameters="regularized",
)
class ArnoldiInfluence(_LowRankInfluence):
    """Influence with the top eigenpairs of the curvature and the Woodbury inverse.

    Finds the ``rank`` largest eigenvalues ``s`` of the curvature ``C`` and
    their eigenvectors ``U`` with a restarted Krylov method (block Lanczos,
    the symmetric form of Arnoldi's iteration), from batched curvature
    products, and inverts

    .. math::

        (C + \\lambda I)^{-1} \\approx U \\operatorname{diag}\\Big(\\frac{1}{s + \\lambda}\\Big) U^T
        + \\frac{1}{\\lambda}\\,(I - U U^T),

    so the discarded spectrum is taken as zero, not dropped: gradients keep
    their component outside the top eigenspace, weighted ``1 / lambda``. The
    approximation is exact at ``rank = n_params`` and, for any rank, in the
    directions of the top eigenvalues, the ones that dominate ill-conditioned
    curvature. Memory is ``rank x n_params`` for the eigenvectors plus the
    Krylov basis during ``fit``; inference costs two products with ``U``
    per gradient, no pass over the training data.

    Parameters
    ----------
    {model}
    {loss}
    {parameters}
    {regularization}
        ``lambda >= 0`` added as ``lambda * I`` to the curvature. It is also
        the curvature the discarded directions are given, so it should be
        about the size of the eigenvalues beyond ``rank`` or larger (see
        ``eigenvalues_``). With ``regularization=0`` the term
        ``(I - U U^T) / lambda`` has no finite value and is dropped: the
        inverse is then ``U diag(1 / s) U^T``, blind to gradients outside the
        top eigenspace unless ``rank = n_params`` (where it is the exact
        inverse of a positive definite curvature).
    {second_order}
        Which curvature to decompose. The Hessian of a model away from a
        minimum is indefinite: the largest (algebraic) eigenvalues are kept,
        so negative ones appear only when ``rank`` reaches them, and a
        :class:`~skinfl.exceptions.NotPositiveDefiniteWarning` is raised when
        some ``s + lambda`` is not positive.
    rank : int, default=50
        Number of eigenpairs, at most ``n_params``. More pairs make the
        inverse accurate in more directions, at a cost of about two to four
        curvature products per pair. A good rank reaches the eigenvalues
        that are not large next to ``regularization``: after fitting, if
        ``eigenvalues_[-1]`` is still much larger than ``regularization``,
        a larger rank changes the influences; if it is well below it, a
        smaller rank would do.
    solver : {"auto", "lanczos", "arpack", "cupy"}, default="auto"
        ``"lanczos"``: block Lanczos in torch on ``device_`` in the model's
        dtype, with full reorthogonalisation and thick restarts; each pass
        over the data multiplies a block of vectors. ``"arpack"``:
        ``scipy.sparse.linalg.eigsh`` (implicitly restarted Lanczos) on the
        CPU in float64, one vector per pass over the data. ``"cupy"``:
        CuPy's ``eigsh`` on a CUDA device, one vector per pass; it needs
        ``pip install skinfl[gpu]``. ``"auto"`` is ``"lanczos"``: the same
        work in a fraction of the passes, on any device. When the Krylov
        space is the whole space (``krylov_dimension`` reaching
        ``n_params``, as at full rank), every solver gives way to the
        explicit matrix and a dense eigendecomposition: the same number of
        products, exact.
    krylov_dimension : int, default=None
        Basis vectors (curvature products) per restart cycle, more than
        ``rank``. None: ``max(2 * rank + 1, rank + 20)``, at most
        ``n_params``. Larger values converge in fewer cycles and hold more
        memory (``krylov_dimension x n_params``).
    tol : float, default=1e-5
        A pair has converged when its residual ``||C u - s u||`` is at most
        ``tol`` times the largest eigenvalue in magnitude (``"lanczos"``),
        or ``tol`` times its own eigenvalue (ARPACK's criterion, used by
        ``"arpack"`` and ``"cupy"``). The products of a float32 model are
        accurate to about ``1e-6`` relatively; lower values need float64.
    {max_iter}
        At least ``krylov_dimension_``, the products of the first Krylov
        space; None: ``50 * krylov_dimension_``, about the budget of the 100
        restart cycles that ``max_iter`` counted before skinfl 0.2.
        ``"lanczos"`` stops before a block of products would pass it;
        ``"arpack"`` and ``"cupy"`` are given the restarts that fit in it,
        ``(max_iter - krylov_dimension_ - 1) // (krylov_dimension_ - rank)``
        (ARPACK's ``maxiter``: each restart multiplies ``krylov_dimension_ -
        rank`` vectors), and at least one, which passes a budget below
        ``2 * krylov_dimension_ - rank + 1``; ``"dense"`` takes ``n_params``
        products. Pairs that have not converged by then are used as they
        are, with a :class:`~sklearn.exceptions.ConvergenceWarning`.
    {batch_size}
    {device}
    {progress}
    {memory}
        ``rank`` is not among them: a candidate with a smaller rank than the
        cached pairs takes their top ``rank`` (a rank-``rank`` approximation
        as good as a fresh one, to ``tol``), one with a larger rank computes
        them again and replaces the entry. List ``rank`` values in descending
        order in a grid, so that the first candidate computes the largest
        and a search computes the eigenpairs once per training set.
    {random_state}
        Converged eigenpairs agree to ``tol`` whatever the seed; fix it for
        bitwise reproducibility.
    eigen_solver : {"auto", "lanczos", "arpack", "cupy"}, default="deprecated"
        Former name of ``solver``.

        .. deprecated:: 0.2
           ``eigen_solver`` was renamed ``solver`` in 0.2 and will be removed
           in 0.4.

    Attributes
    ----------
    {fitted_attributes}
    eigenvalues_ : torch.Tensor of shape ``(rank_,)``
        The eigenvalues kept, largest first, in float64, without
        regularization.
    rank_ : int
        Number of eigenpairs used: ``rank``, or fewer when ARPACK returned
        fewer converged pairs.
    solver_ : {"lanczos", "arpack", "cupy", "dense"}
        The method that computed the eigenpairs; ``"dense"`` when the Krylov
        space was the whole space.
    krylov_dimension_ : int
        The Krylov dimension used.
    n_iter_ : int
        Curvature-vector products of the eigen-solve, the quantity
        ``max_iter`` bounds (``n_params`` for ``"dense"``); set by ``fit``,
        whose only iterations these are.
    converged_ : bool
        Whether all ``rank`` pairs met ``tol``.

    See Also
    --------
    NystroemInfluence : A randomised low-rank sketch: one pass over the data, less accurate per rank.
    CgInfluence : Solves with the full curvature, matrix-free.
    DirectInfluence : The exact inverse, for small models.

    Notes
    -----
    Choosing ``rank`` and ``regularization``: the inverse is exact in the
    span of the ``rank`` eigenvectors and treats every other direction as
    curvature 0, i.e. weight ``1 / lambda``. Directions whose true
    eigenvalue ``s`` is small next to ``lambda`` lose little
    (``1 / (s + lambda)`` is close to ``1 / lambda``), so ``rank`` should
    reach the eigenvalues that are not small next to ``lambda``: after a
    fit, compare ``eigenvalues_[-1]`` with ``regularization``. A grid over
    both is cheap with ``memory`` (one eigendecomposition per training set
    when ranks are listed in descending order).

    ``"lanczos"`` multiplies blocks of ``max(1, (krylov_dimension - rank)
    // 4)`` vectors (a quarter of the room above ``rank``: about eight
    passes over the data for the first cycle, two to four per restart),
    reorthogonalises every block against the whole basis, and restarts by
    keeping about ``rank + (krylov_dimension - rank) / 2`` Ritz vectors
    (thick restart). A block method finds an eigenvalue at most as many
    times as there are vectors in a block, plus what rounding and restarts
    add: an eigenvalue of higher multiplicity may be found fewer times. The
    usual case, exact zero eigenvalues from symmetries of the model (the
    logits of a cross-entropy loss are defined up to a shift), costs
    nothing: the residual term weighs those directions ``1 / lambda``, as an
    eigenvalue 0 would be.

    Examples
    --------
    >>> import torch
    >>> from skinfl import ArnoldiInfluence
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> X, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    >>> est = ArnoldiInfluence(model, regularization=0.1, rank=5, random_state=0).fit(X, y)
    >>> est.eigenvalues_.shape
    torch.Size([5])
    >>> est.influences(X[:2], y[:2]).shape
    torch.Size([2, 40])
    """

    _parameter_constraints = {
        **_LowRankInfluence._parameter_constraints,
        "solver": [StrOptions(set(EIGEN_SOLVERS))],
        "eigen_solver": [StrOptions(set(EIGEN_SOLVERS)), Hidden(StrOptions({DEPRECATED}))],
        "krylov_dimension": [Interval(Integral, 2, None, closed="left"), None],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left"), None],
    }
    _factor_parameters = ("solver", "krylov_dimension", "tol", "max_iter", "random_state")
    _renamed_parameters = {"eigen_solver": "solver"}
    _renamed_attributes = {"eigen_solver_": "solver_"}

    def __init__(
        self,
        model,
        *,
        loss="auto",
        parameters=None,
        regularization=1e-3,
        second_order="hessian",
        rank=50,
        solver="auto",
        krylov_dimension=None,
        tol=1e-5,
        max_iter=None,
        batch_size=512,
        device=None,
        progress=False,
        memory=None,
        random_state=None,
        eigen_solver=DEPRECATED,
    ):
        self.model = model
        self.loss = loss
        self.parameters = parameters
        self.regularization = regularization
        self.second_order = second_order
        self.rank = rank
        self.solver = solver
        self.krylov_dimension = krylov_dimension
        self.tol = tol
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.memory = memory
        self.random_state = random_state
        self.eigen_solver = eigen_solver

    def _low_rank_factors(self, curvature, rank):
        solver = resolve_eigen_solver(self._parameter("solver"))
        dimension = krylov_dimension_for(rank, self.krylov_dimension, curvature.n_params)
        pairs = top_eigenpairs(curvature, rank, eigen_solver=solver, krylov_dimension=dimension, tol=self.tol,
                               max_products=self._max_products(dimension), generator=self._generator())
        tensors = {"eigenvalues": pairs.eigenvalues, "eigenvectors": pairs.eigenvectors,
                   "converged": pairs.converged}
        return tensors, {"solver": pairs.solver, "krylov_dimension": dimension, "n_iter": pairs.n_products}

    def _max_products(self, krylov_dimension):
        """The budget of curvature-vector products: ``max_iter``, or its default for ``krylov_dimension``."""
        if self.max_iter is None:
            return _PRODUCTS_PER_KRYLOV_DIMENSION * krylov_dimension
        if self.max_iter < krylov_dimension:
            raise ValueError(
                f"max_iter={self.max_iter} curvature products cannot fill the first Krylov space, of "
                f"krylov_dimension={krylov_dimension}: use max_iter >= {krylov_dimension}, or max_iter=None "
                f"({_PRODUCTS_PER_KRYLOV_DIMENSION * krylov_dimension} here). max_iter counts "
                "curvature-vector products since skinfl 0.2, not restart cycles."
            )
        return self.max_iter

    def _describe_factors(self):
        metadata = self._factor_metadata
        # Files saved by skinfl < 0.2 name it "eigen_solver".
        self.solver_ = metadata["solver"] if "solver" in metadata else metadata["eigen_solver"]
        self.krylov_dimension_ = metadata["krylov_dimension"]
        self.n_iter_ = metadata["n_iter"]
        converged = self._factors["converged"][:self.rank]
        n_unconverged = self.rank - int(converged.sum())
        self.converged_ = n_unconverged == 0
        if n_unconverged:
            what = ("were not returned (ARPACK returns converged pairs only)" if self.rank_ < self.rank
                    else "are used as they are")
            warn(
                f"{n_unconverged} of the {self.rank} eigenpairs did not converge to tol={self.tol} within "
                f"{self.n_iter_} curvature-vector products (max_iter={self.max_iter}), and {what}. To "
                f"converge: raise max_iter, raise krylov_dimension (now {self.krylov_dimension_}), or raise "
                "tol.",
                ConvergenceWarning,
            )
