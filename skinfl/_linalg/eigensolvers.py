"""Top eigenpairs of a curvature operator: one dispatch over the eigen-solvers.

- ``"lanczos"`` (:func:`skinfl._linalg.lanczos.block_lanczos`): torch, on
  the curvature's device, in the model's dtype; a block of vectors per pass
  over the data.
- ``"arpack"``: ``scipy.sparse.linalg.eigsh`` on the CPU in float64, one
  vector per pass (ARPACK asks for one product at a time).
- ``"cupy"``: ``cupyx.scipy.sparse.linalg.eigsh`` on a CUDA device, one
  vector per pass; needs the ``gpu`` extra.

``"auto"`` is ``"lanczos"``: on a CPU or a GPU it does the same work as the
others with a fraction of the passes over the data, and without moving
vectors between devices. When the Krylov space would be the whole space
(``krylov_dimension >= n_params``), any solver is replaced by the explicit
matrix and ``torch.linalg.eigh`` (``"dense"``): it takes the same
``n_params`` products, in the fewest passes, and is exact.

Eigenvalues are the algebraically largest (``which="LA"``): a Hessian away
from a minimum is indefinite, and its negative eigenvalues are kept only
when ``rank`` reaches into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .lanczos import block_lanczos, default_block_size

EIGEN_SOLVERS = ("auto", "lanczos", "arpack", "cupy")
_INSTALL_CUPY = "pip install skinfl[gpu]"


@dataclass
class Eigenpairs:
    """The top eigenpairs of a curvature and how they were found.

    Attributes
    ----------
    eigenvalues : torch.Tensor of shape (k,), float64
        Largest first.
    eigenvectors : torch.Tensor of shape (n_params, k)
        Orthonormal columns, in the model's dtype, on its device.
    converged : torch.Tensor of bool, shape (k,)
        Whether each pair met the solver's tolerance. ARPACK returns only
        converged pairs, so it may return ``k < rank`` of them.
    n_products : int
        Curvature-vector products computed (a block of ``b`` vectors counts
        ``b``; ``n_params`` for ``"dense"``, which builds the matrix).
    solver : str
        ``"lanczos"``, ``"arpack"``, ``"cupy"`` or ``"dense"``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    converged: torch.Tensor
    n_products: int
    solver: str


def resolve_eigen_solver(eigen_solver):
    """The solver ``"auto"`` stands for: always ``"lanczos"`` (see the module's docstring)."""
    return "lanczos" if eigen_solver == "auto" else eigen_solver


def krylov_dimension_for(rank, krylov_dimension, n_params):
    """The Krylov dimension used: the given one or ``max(2 rank + 1, rank + 20)``, at most ``n_params``.

    Raises a ValueError naming the fix when it leaves no room above ``rank``.
    """
    if krylov_dimension is None:
        return min(n_params, max(2 * rank + 1, rank + 20))
    dimension = min(krylov_dimension, n_params)
    if dimension <= rank and dimension < n_params:
        raise ValueError(
            f"krylov_dimension={krylov_dimension} must exceed rank={rank}: the Krylov space holds the "
            f"{rank} eigenvectors and room to improve them. Use krylov_dimension=None (here "
            f"{min(n_params, max(2 * rank + 1, rank + 20))}) or at least {rank + 1}."
        )
    return dimension


def check_cupy_can_run(device):
    """Raise the error that says what is missing for ``solver="cupy"``, if anything is."""
    if torch.device(device).type != "cuda":
        raise ValueError(
            f"solver='cupy' runs on a CUDA device, and this estimator computes on {device}. Use "
            "solver='lanczos' (the default, on any device), 'arpack' (CPU), or device='cuda'."
        )
    _import_cupy()


def _import_cupy():
    try:
        import cupy
        from cupyx.scipy.sparse.linalg import LinearOperator, eigsh
    except ImportError as error:
        raise ImportError(
            f"solver='cupy' needs CuPy, which could not be imported ({error}). Install it with "
            f"`{_INSTALL_CUPY}` (CuPy for CUDA 12), or use solver='lanczos', which runs on the GPU "
            "in torch."
        ) from error
    return cupy, LinearOperator, eigsh


def top_eigenpairs(curvature, rank, *, eigen_solver, krylov_dimension, tol, max_products, generator):
    """The ``rank`` largest eigenpairs of ``curvature`` (a CurvatureOperator).

    ``eigen_solver`` is resolved (not ``"auto"``); ``krylov_dimension`` is
    the resolved dimension (see :func:`krylov_dimension_for`); ``generator``
    a torch generator on the curvature's device, for the starting vectors.
    ``max_products`` (at least ``krylov_dimension``) bounds the
    curvature-vector products: ``"lanczos"`` stops before a block would
    pass it; ARPACK and CuPy get the restarts it pays for
    (:func:`restarts_for`); ``"dense"`` takes ``n_params`` products.
    """
    if eigen_solver == "cupy":
        check_cupy_can_run(curvature.fmodel.device)
    if krylov_dimension >= curvature.n_params:
        return _dense(curvature, rank)
    solve = {"lanczos": _lanczos, "arpack": _arpack, "cupy": _cupy}[eigen_solver]
    return solve(curvature, rank, krylov_dimension, tol, max_products, generator)


def restarts_for(max_products, rank, krylov_dimension):
    """ARPACK's (and CuPy's) ``maxiter`` for a budget of products: the most restarts that fit, at least one.

    ARPACK fills the Krylov space (``krylov_dimension`` products, and one
    more for the start), then each of its ``maxiter`` iterations multiplies
    ``krylov_dimension - rank`` vectors (measured with SciPy's ``eigsh``:
    ``ncv=14, k=6`` takes 23, 31 and 39 products for ``maxiter`` 1, 2 and 3;
    fewer once pairs converge). Below ``2 * krylov_dimension - rank + 1``
    products, its one iteration passes the budget.
    """
    return max(1, (max_products - krylov_dimension - 1) // max(1, krylov_dimension - rank))


def _dense(curvature, rank):
    """From the explicit matrix: exact, and as many products as a Krylov space of full dimension."""
    values, vectors = torch.linalg.eigh(curvature.dense(torch.float64))
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    converged = torch.ones(len(values), dtype=torch.bool, device=values.device)
    return Eigenpairs(values, vectors.to(curvature.fmodel.dtype), converged, curvature.n_params, "dense")


def _lanczos(curvature, rank, krylov_dimension, tol, max_products, generator):
    fmodel = curvature.fmodel
    result = block_lanczos(
        curvature.matmat, curvature.n_params, rank, krylov_dimension=krylov_dimension,
        block_size=default_block_size(rank, krylov_dimension, curvature.n_params), tol=tol,
        max_products=max_products, generator=generator, dtype=fmodel.dtype, device=fmodel.device,
    )
    return Eigenpairs(result.eigenvalues, result.eigenvectors, result.converged, result.n_products, "lanczos")


def _arpack(curvature, rank, krylov_dimension, tol, max_products, generator):
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

    fmodel = curvature.fmodel
    dtype, device, n = fmodel.dtype, fmodel.device, curvature.n_params
    counted = [0]

    def products(columns):  # float64 (n, k) on the host -> the same, through the model's dtype and device
        rows = torch.as_tensor(np.ascontiguousarray(np.asarray(columns).T), device=device).to(dtype)
        counted[0] += len(rows)
        return curvature.matmat(rows).double().cpu().numpy().T

    operator = LinearOperator((n, n), matvec=lambda v: products(v.reshape(n, 1))[:, 0], matmat=products,
                              dtype=np.float64)
    start = torch.randn(n, generator=generator, dtype=dtype, device=device).double().cpu().numpy()
    try:
        values, vectors = eigsh(operator, k=rank, which="LA", ncv=krylov_dimension, tol=tol,
                                maxiter=restarts_for(max_products, rank, krylov_dimension), v0=start)
    except ArpackNoConvergence as error:  # the pairs that did converge
        values, vectors = error.eigenvalues, error.eigenvectors
    except ArpackError as error:
        raise RuntimeError(
            f"ARPACK failed on the rank={rank} problem with krylov_dimension={krylov_dimension} ({error}). "
            "Raise krylov_dimension (more room above rank), or use solver='lanczos'."
        ) from error
    order = np.argsort(values)[::-1]
    values = torch.as_tensor(values[order].copy(), dtype=torch.float64, device=device)
    vectors = torch.as_tensor(vectors[:, order].copy(), device=device).to(dtype)
    converged = torch.ones(len(values), dtype=torch.bool, device=device)
    return Eigenpairs(values, vectors, converged, counted[0], "arpack")


def _cupy(curvature, rank, krylov_dimension, tol, max_products, generator):  # pragma: no cover - needs CUDA
    cupy, LinearOperator, eigsh = _import_cupy()
    fmodel = curvature.fmodel
    dtype, device, n = fmodel.dtype, fmodel.device, curvature.n_params
    # CuPy's eigsh works in float32 or float64; half-precision models are solved in float32.
    solve_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    numpy_dtype = np.float64 if solve_dtype == torch.float64 else np.float32

    counted = [0]

    def matvec(vector):
        counted[0] += 1
        rows = torch.from_dlpack(cupy.ascontiguousarray(vector).reshape(1, n)).to(dtype)
        return cupy.from_dlpack(curvature.matmat(rows).to(solve_dtype).reshape(n).contiguous())

    start = torch.randn(n, generator=generator, dtype=solve_dtype, device=device)
    with cupy.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
        operator = LinearOperator((n, n), matvec=matvec, dtype=numpy_dtype)
        # The budget less the rank products that measure the residuals below.
        maxiter = restarts_for(max_products - rank, rank, krylov_dimension)
        values, vectors = eigsh(operator, k=rank, which="LA", ncv=krylov_dimension, maxiter=maxiter, tol=tol,
                                v0=cupy.from_dlpack(start))
        values = torch.from_dlpack(cupy.ascontiguousarray(values)).to(torch.float64)
        vectors = torch.from_dlpack(cupy.ascontiguousarray(vectors)).to(dtype)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    # CuPy does not report convergence: the residuals are measured, with one product per pair.
    residuals = torch.linalg.vector_norm(curvature.matmat(vectors.T.contiguous()).double()
                                         - values[:, None] * vectors.T.double(), dim=1)
    converged = residuals <= tol * values.abs().max().clamp(min=torch.finfo(torch.float64).tiny)
    return Eigenpairs(values, vectors, converged, counted[0] + len(values), "cupy")
