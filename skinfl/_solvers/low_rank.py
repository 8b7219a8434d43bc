"""What the low-rank estimators share: eigenpairs as factors, a rank cut, and the Woodbury inverse.

A low-rank estimator approximates the curvature by ``C ~ U diag(s) U^T``
with ``U`` of ``rank`` orthonormal columns (eigenvectors, or those of a
sketch) and inverts it with the Woodbury identity, keeping the discarded
spectrum at zero rather than dropping it:

    (U diag(s) U^T + lambda I)^-1 = U diag(1 / (s + lambda)) U^T + (I - U U^T) / lambda.

``U`` and ``s`` do not depend on ``regularization``: they are the factors,
cached with ``memory=``. Nor do they depend on ``rank`` in the cache key:
the top ``r`` pairs of rank-``R`` factors are a rank-``r`` approximation of
the curvature (the best rank-``r`` approximation of the rank-``R`` one), so
a candidate with a smaller rank slices the cached pairs, and one with a
larger rank computes them again at its rank and replaces the entry. A
search that lists ranks in descending order computes the factors once per
training set.
"""

from __future__ import annotations

from numbers import Integral

import torch

from .._validation import Interval
from .._warnings import warn
from ..base import BaseInfluence
from ..exceptions import NotPositiveDefiniteWarning


class _LowRankInfluence(BaseInfluence):
    """Base of ArnoldiInfluence and NystroemInfluence (not registered: its name starts with "_").

    A subclass implements ``_low_rank_factors(curvature, rank) -> (tensors,
    metadata)`` with the tensors ``eigenvalues`` (float64, largest first) and
    ``eigenvectors`` (``(n_params, k)``, ``k <= rank``), and may override
    ``_describe_factors()`` to set its own fitted attributes from
    ``self._factors`` and ``self._factor_metadata``.
    """

    _parameter_constraints = {
        **BaseInfluence._parameter_constraints,
        "rank": [Interval(Integral, 1, None, closed="left")],
    }

    def _low_rank_factors(self, curvature, rank):  # pragma: no cover - abstract
        raise NotImplementedError

    def _describe_factors(self):
        """Set the subclass's fitted attributes from the factors of ``rank_`` pairs."""

    def _check_rank(self, n_params):
        if self.rank > n_params:
            raise ValueError(
                f"rank={self.rank} exceeds the {n_params} parameters of this model; use DirectInfluence "
                f"or rank <= {n_params}."
            )

    # ------------------------------------------------------------------ hooks
    def _compute_factors(self, curvature):
        self._check_rank(curvature.n_params)
        tensors, metadata = self._low_rank_factors(curvature, self.rank)
        return tensors, {**metadata, "rank": int(self.rank)}

    def _build_inverse(self):
        self._check_rank(self.n_params_)
        if self.rank > self._factor_metadata["rank"]:
            # Cached factors of a smaller rank: computed again at this rank, and they replace the
            # cache entry, so that it serves every rank up to this one from now on.
            tensors, metadata = self._computed_factors()
            self._factor_metadata = metadata
            self._add_factors(tensors)
        eigenvalues = self._factors["eigenvalues"][:self.rank]
        self._eigenvectors = self._factors["eigenvectors"][:, :self.rank]
        self.eigenvalues_ = eigenvalues
        self.rank_ = len(eigenvalues)
        self._weights, self._residual_weight = self._woodbury_weights(eigenvalues)
        self._describe_factors()

    def _woodbury_weights(self, eigenvalues):
        """``(w, c)`` with ``(C_r + lambda I)^-1 g = U diag(w) U^T g + c g``.

        ``w = 1 / (s + lambda) - 1 / lambda`` and ``c = 1 / lambda``: the
        residual ``(I - U U^T) g / lambda`` folded in. With ``lambda = 0``
        the residual has no finite weight and is dropped (``w = 1 / s``,
        ``c = 0``): the pseudo-inverse of ``C_r``, exact at full rank for a
        positive definite curvature. Values ``s + lambda`` at the rounding
        level of the spectrum are treated as zero (their direction is not
        inverted).
        """
        regularization = float(self.regularization_)
        shifted = eigenvalues + regularization
        scale = max(float(eigenvalues.abs().max()) if len(eigenvalues) else 0.0, regularization)
        floor = len(eigenvalues) * torch.finfo(self._dtype()).eps * scale
        singular = shifted.abs() <= floor
        inverse = torch.where(singular, torch.zeros_like(shifted), 1.0 / torch.where(singular, 1.0, shifted))
        self._warn_about_spectrum(shifted, singular)
        if regularization > 0:
            return (inverse - 1.0 / regularization).to(self._dtype()), 1.0 / regularization
        return inverse.to(self._dtype()), 0.0

    def _warn_about_spectrum(self, shifted, singular):
        regularization = float(self.regularization_)
        # With regularization > 0, s + lambda vanishes only for a negative eigenvalue.
        negative = (shifted < 0) & ~singular | (singular & (regularization > 0))
        if bool(negative.any()):
            smallest = float(shifted.min())
            warn(
                f"{int(negative.sum())} of the {len(shifted)} eigenvalues kept plus regularization are not "
                f"positive (smallest {smallest:.3g}): the {self.second_order} is indefinite (the model is "
                "not at a minimum of the training loss), so influences invert an indefinite matrix. Use "
                f"regularization > {-(smallest - regularization):.3g}, or second_order='gauss_newton' "
                "(always positive semi-definite).",
                NotPositiveDefiniteWarning,
            )
        if regularization == 0 and bool(singular.any()):
            warn(
                f"{int(singular.sum())} of the {len(shifted)} eigenvalues kept are zero to rounding, and "
                "regularization=0 gives them no finite inverse: their directions are left out (a "
                "pseudo-inverse). The curvature has fewer significant directions than rank: lower rank, or "
                "use regularization > 0.",
                NotPositiveDefiniteWarning,
            )

    def _apply_inverse(self, gradients):
        coordinates = gradients @ self._eigenvectors
        solution = (coordinates * self._weights) @ self._eigenvectors.T
        if self._residual_weight:
            solution.add_(gradients, alpha=self._residual_weight)
        return solution
