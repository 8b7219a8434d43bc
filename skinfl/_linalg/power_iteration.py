"""The extreme eigenvalues of a symmetric operator from a few block power iterations.

A block of ``block`` orthonormal vectors is multiplied by the operator
``n_iter`` times (re-orthonormalised after each product), and the operator
is then projected on the block (Rayleigh-Ritz). The largest Ritz value
``theta`` is never above the largest eigenvalue; its residual
``r = ||C x - theta x||`` bounds the distance to the nearest eigenvalue, so
``theta + r`` is an estimate from above whenever that nearest eigenvalue is
the largest one, which the block's head start on the top of the spectrum
makes the rule. A block of several vectors converges in far fewer products
than one vector when the top eigenvalues are close (a block product costs
little more than a single one: see :class:`~skinfl._curvature.CurvatureOperator`).

Power iteration finds the eigenvalues of largest magnitude, so the bottom of
the spectrum comes from a second run on ``u I - C``, with ``u`` the estimate
from above of the largest eigenvalue: its eigenvalues ``u - lambda_i`` are
non-negative and its largest is ``u - lambda_min``. The Ritz value of that
run gives an estimate of ``lambda_min`` from above (never below it). When
negative eigenvalues dominate the first run (a Hessian away from a minimum),
the top of the spectrum is looked for again on ``C - theta_min I``, whose
largest-magnitude eigenvalue is then ``lambda_max - theta_min``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lanczos import orthonormalized

# Products of the block. The Ritz value's error shrinks like (lambda_{b+1} / lambda_1)^(2 n_iter):
# 20 products of 4 vectors put it below a percent on the curvatures measured (MLPs, small CNNs),
# and a residual bound covers the rest.
POWER_ITERATIONS = 20
POWER_BLOCK = 4


@dataclass
class SpectrumEstimate:
    """What a few power iterations tell about a symmetric operator's spectrum.

    Attributes
    ----------
    largest : float
        Estimate from above of the largest (algebraic) eigenvalue: the
        largest Ritz value plus its residual norm.
    largest_ritz : float
        The largest Ritz value, never above the largest eigenvalue.
    smallest : float
        Estimate of the smallest (algebraic) eigenvalue, never below it (a
        Ritz value); negative only when the operator has a negative
        eigenvalue at least that large in magnitude.
    """

    largest: float
    largest_ritz: float
    smallest: float


def _ritz(matmat, start, n_iter):
    """Ritz values and residual norms (ascending) after ``n_iter`` products of the block ``start``."""
    block = orthonormalized(start)
    for step in range(n_iter):
        products = matmat(block)
        if step < n_iter - 1:
            block = orthonormalized(products)
    projected = (block.double() @ products.double().T)
    values, vectors = torch.linalg.eigh((projected + projected.T) / 2)
    ritz_vectors = vectors.T @ block.double()
    residuals = vectors.T @ products.double() - values[:, None] * ritz_vectors
    return values, torch.linalg.vector_norm(residuals, dim=1)


def extreme_eigenvalues(matmat, n, *, generator, dtype, device, n_iter=POWER_ITERATIONS, block=POWER_BLOCK):
    """Estimate the largest eigenvalue (from above) and the smallest of the symmetric operator ``matmat``.

    Three runs at most of ``n_iter`` products of ``block`` vectors: the
    operator, ``C - theta_min I`` when negative eigenvalues lead the first
    run, and ``u I - C`` for the bottom of the spectrum.

    Parameters
    ----------
    matmat : callable
        ``(k, n) -> (k, n)`` rows ``C v``.
    n : int
        Dimension.
    generator : torch.Generator
        Draws the Gaussian start blocks (on its own device, then moved).
    dtype, device
        Of the vectors given to ``matmat``.
    n_iter : int
        Products per run.
    block : int
        Vectors per product (capped at ``n``).

    Returns
    -------
    SpectrumEstimate
    """
    block = max(1, min(block, n))

    def start():
        return torch.randn(block, n, generator=generator, dtype=dtype, device=generator.device).to(device)

    values, residuals = _ritz(matmat, start(), n_iter)
    smallest = float(values[0])
    top = int(torch.argmax(values))
    largest_ritz, residual = float(values[top]), float(residuals[top])
    if smallest < 0 and -smallest > 0.5 * max(largest_ritz, 0.0):
        # Negative eigenvalues lead the block: look at the top of the shifted, non-negative spectrum.
        shift = smallest

        def shifted(vectors):
            return matmat(vectors) - shift * vectors

        values, residuals = _ritz(shifted, start(), n_iter)
        top = int(torch.argmax(values))
        if float(values[top]) + shift > largest_ritz:
            largest_ritz, residual = float(values[top]) + shift, float(residuals[top])
    largest = largest_ritz + residual

    def reflected(vectors):
        return largest * vectors - matmat(vectors)

    values, _ = _ritz(reflected, start(), n_iter)
    smallest = min(smallest, largest - float(values.max()))
    return SpectrumEstimate(largest=largest, largest_ritz=largest_ritz, smallest=smallest)
