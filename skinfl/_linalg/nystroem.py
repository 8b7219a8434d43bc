"""Randomised Nystroem approximation of a curvature operator.

``C ~ U diag(eigenvalues) U^T`` from one block product ``Y = C Omega`` with
an orthonormalised Gaussian test matrix ``Omega`` of ``rank`` columns
(Tropp et al., "Fixed-rank approximation of a positive-semidefinite matrix
from streaming data", 2017, with the stabilising shift of their Algorithm 3).
A Hessian that is not positive semi-definite (a model away from a minimum)
keeps only the non-negative part of the core by default, which is what a
preconditioner needs; ``positive_part=False`` keeps the negative part too,
so that the approximation is ``C Omega (Omega^T C Omega)^+ Omega^T C`` for
any symmetric ``C`` (exact at full rank, where ``Omega`` is orthogonal).

Everything runs on the curvature's device in the model's dtype and holds at
most about two ``rank x n_params`` blocks at a time besides the product
itself. The small ``rank x rank`` problems, and the products that feed them,
are done in float64, column chunk by column chunk, because the Gram matrices
square the spread of the spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Columns of a (rank x n_params) block converted to float64 at a time.
_FLOAT64_COLUMNS = 2**16


@dataclass
class NystroemSketch:
    """``C ~ eigenvectors @ diag(eigenvalues) @ eigenvectors.T``.

    Attributes
    ----------
    eigenvalues : torch.Tensor of shape (rank,)
        In descending order; non-negative unless the sketch was taken with
        ``positive_part=False``.
    eigenvectors : torch.Tensor of shape (n_params, rank)
        Orthonormal columns.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


def _gram(left, right):
    """``left @ right.T`` in float64, accumulated over column chunks of the two row blocks."""
    result = torch.zeros(len(left), len(right), dtype=torch.float64, device=left.device)
    for start in range(0, left.shape[1], _FLOAT64_COLUMNS):
        columns = slice(start, start + _FLOAT64_COLUMNS)
        result += left[:, columns].double() @ right[:, columns].double().T
    return result


def _combine(coefficients, rows, dtype):
    """``coefficients @ rows`` (float64 coefficients, one row block), in float64 per column chunk."""
    result = torch.empty(len(coefficients), rows.shape[1], dtype=dtype, device=rows.device)
    for start in range(0, rows.shape[1], _FLOAT64_COLUMNS):
        columns = slice(start, start + _FLOAT64_COLUMNS)
        result[:, columns] = (coefficients @ rows[:, columns].double()).to(dtype)
    return result


def _kept(values, dtype):
    """Values clearly above rounding, relative to the largest (none of none: a curvature without any)."""
    if not len(values):
        return torch.zeros(0, dtype=torch.bool, device=values.device)
    return values > values.max().clamp(min=0) * torch.finfo(dtype).eps * len(values)


def _nonzero(values, dtype):
    """Values of either sign clearly above rounding, relative to the largest in magnitude."""
    return values.abs() > values.abs().max() * torch.finfo(dtype).eps * len(values)


def nystroem_sketch(curvature, rank, generator, positive_part=True):
    """Rank-``rank`` Nystroem approximation of ``curvature`` (a CurvatureOperator).

    ``generator`` is a ``torch.Generator`` on the curvature's device. With
    ``positive_part`` (the default) directions of negative curvature in the
    core are dropped; without it they are kept, with negative eigenvalues.
    """
    fmodel = curvature.fmodel
    dtype, device = fmodel.dtype, fmodel.device
    rank = min(rank, curvature.n_params)
    gaussian = torch.randn(curvature.n_params, rank, generator=generator, dtype=dtype, device=device)
    test = torch.linalg.qr(gaussian).Q.T.contiguous()  # orthonormal rows: a better-conditioned core
    del gaussian
    sketch = curvature.matmat(test)  # rows C omega_i

    shift = torch.finfo(dtype).eps * float(torch.linalg.matrix_norm(sketch, ord="fro"))
    sketch.add_(test, alpha=shift)  # rows (C + shift I) omega_i
    core = _gram(test, sketch)
    del test
    core_values, core_vectors = torch.linalg.eigh((core + core.T) / 2)
    # Directions at the rounding level of the products (in the model's dtype) are dropped: their inverse
    # square roots would be noise. So are those of negative curvature, with positive_part: they cannot be
    # preconditioned.
    keep = _kept(core_values, dtype) if positive_part else _nonzero(core_values, dtype)
    signs = core_values[keep].sign()
    inverse_root = core_vectors[:, keep] / core_values[keep].abs().sqrt()
    factor = _combine(inverse_root.T, sketch, dtype)  # C_shift ~ factor.T @ diag(signs) @ factor
    del sketch

    squares, vectors = torch.linalg.eigh(_gram(factor, factor))  # factor = W S U^T: W, S^2
    squares, vectors = squares.flip(0), vectors.flip(1)
    keep = _kept(squares, dtype)
    squares, vectors = squares[keep], vectors[:, keep]
    if bool((signs > 0).all()):
        eigenvectors = _combine((vectors / squares.sqrt()).T, factor, dtype).T  # U = factor.T W S^-1
        eigenvalues = torch.clamp(squares - shift, min=0.0)
        return NystroemSketch(eigenvalues=eigenvalues.to(dtype), eigenvectors=eigenvectors)
    # Indefinite core: C_shift ~ U (S W^T D W S) U^T, whose small middle matrix is diagonalised.
    roots = squares.sqrt()
    middle = (vectors * roots).T @ (signs[:, None] * (vectors * roots))
    values, rotation = torch.linalg.eigh((middle + middle.T) / 2)
    values, rotation = values.flip(0), rotation.flip(1)
    eigenvectors = _combine((vectors / roots @ rotation).T, factor, dtype).T
    return NystroemSketch(eigenvalues=(values - shift).to(dtype), eigenvectors=eigenvectors)
