"""Top eigenpairs of a symmetric operator: block Lanczos with full reorthogonalisation and thick restarts.

The operator is given by its products with blocks of vectors, as rows:
``matmat(V)`` with ``V`` of shape ``(b, n)`` returns the rows ``A v``. For a
curvature over a data set each call is one pass over the data, whatever the
number of vectors (up to the operator's own block limit), so a block of
``block_size`` vectors per step costs about as much wall time as a single
vector would, and a Krylov space of dimension ``m`` takes ``m / block_size``
passes. Blocks also find eigenvalues of multiplicity up to ``block_size``,
which a single-vector Krylov space cannot hold.

Every new block is orthogonalised against the whole basis, twice (classical
Gram-Schmidt with one refinement), so the basis stays orthonormal to working
precision; at the ranks used for influence (tens to a few hundred vectors)
this costs far less than the products. The projected matrix
``T = V A V^T`` is accumulated from those same coefficients, in float64,
which makes restarting simple: after ``krylov_dimension`` products the
``keep`` best Ritz vectors and the pending block become the new basis (the
thick restart of Wu and Simon, "Thick-restart Lanczos method for large
symmetric eigenvalue problems", 2000), and the iteration goes on from there.

The basis and the products are in the operator's dtype, on its device; only
the small projected problems are in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A direction of the next block whose norm, after orthogonalisation, is below this many units of
# rounding of the operator's scale carries no information: the Krylov space has (numerically) closed
# over an invariant subspace, and a random direction replaces it.
_DEFLATION_ULPS = 100


@dataclass
class LanczosResult:
    """Top eigenpairs found by :func:`block_lanczos`.

    Attributes
    ----------
    eigenvalues : torch.Tensor of shape (k,), float64
        Ritz values, largest first.
    eigenvectors : torch.Tensor of shape (n, k)
        Orthonormal Ritz vectors as columns, in the operator's dtype.
    residuals : torch.Tensor of shape (k,), float64
        Estimated residual norms ``||A u - s u||`` (exact in exact arithmetic,
        from the coupling of the basis to the pending block).
    converged : torch.Tensor of bool, shape (k,)
        ``residuals <= tol * max(|eigenvalues|)``.
    n_iter : int
        Restart cycles run (1 when the first Krylov space was enough).
    n_products : int
        Operator-vector products computed.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    n_iter: int
    n_products: int


def default_block_size(rank, krylov_dimension, n):
    """Vectors per product: enough that a cycle is a few passes, few enough that the Krylov degree grows.

    A block of ``p`` vectors makes a space of dimension ``m`` out of ``m / p``
    passes over the data; larger blocks save passes but give lower-degree
    polynomials for the same number of products, so slower convergence per
    product. A quarter of the room left above ``rank`` keeps the first cycle
    at about eight passes (``m = 2 rank + 1``), and each restart at two to four.
    """
    if krylov_dimension >= n:
        return min(n, 128)
    return max(1, min(128, (krylov_dimension - rank) // 4))


def _orthogonalize_(rows, basis):
    """Remove from ``rows`` (in place) their components along the orthonormal rows of ``basis``.

    Classical Gram-Schmidt twice ("twice is enough"): one pass leaves
    components of the size of rounding times the removed part. Returns the
    total coefficients ``rows_before @ basis.T`` in float64.
    """
    if len(basis) == 0:
        return torch.zeros(len(rows), 0, dtype=torch.float64, device=rows.device)
    coefficients = rows @ basis.T
    rows.sub_(coefficients @ basis)
    correction = rows @ basis.T
    rows.sub_(correction @ basis)
    return coefficients.double() + correction.double()


def orthonormalized(rows):
    """Orthonormal rows spanning ``rows``, each as close to its original as QR makes it (no sign flips)."""
    if not len(rows):
        return rows
    q, r = torch.linalg.qr(rows.T)
    signs = torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).T


def _random_orthonormal_rows(count, basis, generator, dtype):
    """``count`` random unit rows orthogonal to ``basis`` and to each other."""
    n = basis.shape[1]
    rows = torch.randn(count, n, generator=generator, dtype=dtype, device=basis.device)
    _orthogonalize_(rows, basis)
    rows = orthonormalized(rows)
    _orthogonalize_(rows, basis)  # the QR mixes in rounding along basis; take it out again
    return rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)


def _next_block(residual, basis, floor, generator, size):
    """Orthonormal rows spanning the block ``residual`` (orthogonal to ``basis``) and their coupling.

    Returns ``(rows, coupling)`` with ``residual ~ coupling.T @ rows``. The
    singular value decomposition orders directions by their weight: those
    below ``floor`` are rounding, not Krylov directions, and are replaced by
    random rows with no coupling (so that the space still grows), and at
    most ``size`` rows are returned (the room left in the whole space). It
    is taken as a QR decomposition of the tall ``residual.T`` and an SVD of
    its small triangular factor: LAPACK's and cuSOLVER's SVD of a wide block
    is many times slower than that.
    """
    q, r = torch.linalg.qr(residual.T)
    left, values, right = torch.linalg.svd(r)  # residual.T = (q @ left) diag(values) right
    rows = (q @ left[:, :size]).T
    values = values[:size]
    coupling = (values[:, None] * right[:size]).double()
    kept = values > floor
    rows = rows[kept]
    # Rows of a nearly deflated block pick up rounding along the basis; one more pass removes it.
    _orthogonalize_(rows, basis)
    rows = orthonormalized(rows)
    n_missing = size - len(rows)
    if n_missing:
        coupling = torch.cat([coupling[kept], coupling.new_zeros(n_missing, coupling.shape[1])])
        fresh = _random_orthonormal_rows(n_missing, torch.cat([basis, rows]), generator, residual.dtype)
        rows = torch.cat([rows, fresh])
    return rows, coupling


def block_lanczos(matmat, n, rank, *, krylov_dimension, block_size, tol, max_products, generator, dtype,
                  device):
    """The ``rank`` algebraically largest eigenpairs of a symmetric ``n x n`` operator.

    Parameters
    ----------
    matmat : callable
        ``matmat(V)``, ``V`` of shape ``(b, n)``: the rows ``A v``.
    n : int
        Size of the operator.
    rank : int
        Eigenpairs wanted, ``1 <= rank <= krylov_dimension``.
    krylov_dimension : int
        Basis vectors (products) per restart cycle, ``rank < krylov_dimension <= n``,
        or ``n`` (then the first cycle spans the whole space).
    block_size : int
        Vectors per product.
    tol : float
        A pair has converged when its residual norm is at most ``tol`` times
        the largest Ritz value in magnitude (an estimate of ``||A||``).
    max_products : int
        Operator-vector products at most (a block of ``b`` vectors counts
        ``b``), at least ``krylov_dimension``; a block that would pass it is
        not multiplied, and pairs that have not converged by then are
        returned with ``converged`` False.
    generator : torch.Generator
        For the starting block and replacement directions, on ``device``.
    dtype, device
        Of the basis and the products.

    Returns
    -------
    result : LanczosResult
    """
    m = min(krylov_dimension, n)
    if not 1 <= rank <= m or (rank == m and m < n):
        raise ValueError(f"Need 1 <= rank < krylov_dimension (or krylov_dimension = n), got rank={rank}, "
                         f"krylov_dimension={m}, n={n}.")
    if max_products < m:
        raise ValueError(f"Need max_products >= krylov_dimension, got {max_products} < {m}.")
    block_size = max(1, min(block_size, n))
    # A cycle multiplies blocks until it holds at least m products (at most m - 1 + block_size), and ends
    # with one more block pending.
    capacity = min(m + 2 * block_size, n)
    basis = torch.empty(capacity, n, dtype=dtype, device=device)
    projected = torch.zeros(capacity, capacity, dtype=torch.float64, device=device)
    basis[:block_size] = _random_orthonormal_rows(block_size, basis[:0], generator, dtype)
    filled, multiplied = block_size, 0
    scale = 0.0  # lower bound on ||A||: the largest product norm or Ritz value seen
    n_products = 0
    eps = torch.finfo(dtype).eps
    cycle = 0
    while True:
        cycle += 1
        # A block that would pass the budget is not multiplied; with at least m products, the first
        # cycle still holds more than m - block_size of them (more than rank for blocks of at most
        # (m - rank) / 4 vectors, as default_block_size makes them).
        while multiplied < m and multiplied < filled and n_products + filled - multiplied <= max_products:
            block = slice(multiplied, filled)
            products = matmat(basis[block])
            n_products += filled - multiplied
            scale = max(scale, float(torch.linalg.vector_norm(products, dim=1).max()))
            coefficients = _orthogonalize_(products, basis[:filled])
            square = coefficients[:, block]
            coefficients[:, block] = (square + square.T) / 2  # symmetric up to rounding of the products
            projected[block, :filled] = coefficients
            projected[:filled, block] = coefficients.T
            multiplied = filled
            size = min(filled - block.start, n - filled)
            if size:
                floor = _DEFLATION_ULPS * eps * scale
                rows, coupling = _next_block(products, basis[:filled], floor, generator, size)
                pending = slice(filled, filled + len(rows))
                basis[pending] = rows
                projected[pending, block] = coupling
                projected[block, pending] = coupling.T
                filled = pending.stop
            del products

        values, vectors = torch.linalg.eigh(projected[:multiplied, :multiplied])
        values, vectors = values.flip(0), vectors.flip(1)
        scale = max(scale, float(values.abs().max()))
        # The pending block's coupling to the basis gives each Ritz pair's residual: A V^T s - theta V^T s
        # lies in the span of the pending block, with coordinates coupling @ s.
        residuals = torch.linalg.vector_norm(projected[multiplied:filled, :multiplied] @ vectors, dim=0)
        converged = residuals <= tol * scale
        out_of_budget = n_products + filled - multiplied > max_products  # the pending block does not fit
        if bool(converged[:rank].all()) or multiplied == n or out_of_budget:
            break

        keep = max(rank, min(m - block_size, rank + (m - rank) // 2))
        kept = vectors[:, :keep]
        ritz_rows = kept.T.to(dtype) @ basis[:multiplied]
        pending_rows = basis[multiplied:filled].clone()
        coupling = projected[multiplied:filled, :multiplied] @ kept
        basis[:keep] = ritz_rows
        basis[keep:keep + len(pending_rows)] = pending_rows
        del ritz_rows, pending_rows
        projected.zero_()
        projected[:keep, :keep] = torch.diag(values[:keep])
        pending = slice(keep, keep + coupling.shape[0])
        projected[pending, :keep] = coupling
        projected[:keep, pending] = coupling.T
        multiplied, filled = keep, pending.stop

    top = vectors[:, :rank]
    eigenvectors = (top.T.to(dtype) @ basis[:multiplied]).T
    return LanczosResult(values[:rank], eigenvectors, residuals[:rank], converged[:rank], cycle, n_products)
