"""Randomised Nystroem approximation of a curvature operator.

``C ~ U diag(eigenvalues) U^T`` from one block product ``Y = C Omega`` with
a Gaussian test matrix ``Omega`` of ``rank`` columns (Tropp et al., "Fixed-rank
approximation of a positive-semidefinite matrix from streaming data", 2017;
the stabilising shift of their Algorithm 3). A Hessian that is not positive
semi-definite (a model away from a minimum) keeps only the non-negative part
of the core, which is what a preconditioner needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NystroemSketch:
    """``C ~ eigenvectors @ diag(eigenvalues) @ eigenvectors.T``.

    Attributes
    ----------
    eigenvalues : torch.Tensor of shape (rank,)
        Non-negative, in descending order.
    eigenvectors : torch.Tensor of shape (n_params, rank)
        Orthonormal columns.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


def nystroem_sketch(curvature, rank, generator):
    """Rank-``rank`` Nystroem approximation of ``curvature`` (a CurvatureOperator)."""
    fmodel = curvature.fmodel
    n_params = curvature.n_params
    rank = min(rank, n_params)
    test_matrix = torch.randn(rank, n_params, generator=generator, dtype=torch.float64)
    test_matrix = torch.linalg.qr(test_matrix.T).Q.T  # orthonormal rows: a better-conditioned core
    sketch = curvature.matmat(test_matrix.to(device=fmodel.device, dtype=fmodel.dtype))
    sketch = sketch.to(torch.float64).cpu()

    shift = torch.finfo(fmodel.dtype).eps * float(torch.linalg.matrix_norm(sketch, ord="fro"))
    shifted = sketch + shift * test_matrix  # rows: (C + shift I) omega_i
    core = test_matrix @ shifted.T
    core = (core + core.T) / 2
    core_values, core_vectors = torch.linalg.eigh(core)
    # Directions of negative curvature are dropped: they cannot be preconditioned.
    keep = core_values > core_values.max() * torch.finfo(torch.float64).eps * rank
    inverse_root = core_vectors[:, keep] / core_values[keep].sqrt()
    factor = shifted.T @ inverse_root  # (n_params, kept): C_shift ~ factor @ factor.T
    left, singular_values, _ = torch.linalg.svd(factor, full_matrices=False)
    eigenvalues = torch.clamp(singular_values**2 - shift, min=0.0)
    return NystroemSketch(
        eigenvalues=eigenvalues.to(device=fmodel.device, dtype=fmodel.dtype),
        eigenvectors=left.to(device=fmodel.device, dtype=fmodel.dtype),
    )
