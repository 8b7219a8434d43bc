"""Curvature products on random mini-batches of the training data.

A stochastic solver replaces the curvature ``C = 1/n sum_i C_i`` by
``C_B = 1/m sum_{i in B} C_i`` on a mini-batch ``B`` of ``m`` samples drawn
anew for each product. The samples are drawn uniformly *with replacement*,
independently from one draw to the next: each ``C_B`` is then an unbiased
estimate of ``C`` and independent of everything before it, the setting in
which LiSSA's estimate of the inverse is unbiased (Agarwal, Bullins and
Hazan, 2017). Drawing is O(m), whatever the size of the data.

The indices are drawn on the generator's device and read on the host,
where the data are; a CPU generator gives the same mini-batches whatever
device the products run on. The rows of a mini-batch are sorted, so that
data kept on disk (a memmap) are read in order.
"""

from __future__ import annotations

import numpy as np
import torch



class MinibatchCurvature:
    """Products with the curvature of random mini-batches of ``curvature``'s data.

    Parameters
    ----------
    curvature : CurvatureOperator
        The curvature over all samples; its model, data, mode and batch
        size are those of the mini-batch products.
    size : int or None
        Samples per mini-batch. None, or at least the number of samples,
        means every sample: the products are then those of ``curvature``
        itself, and deterministic.
    generator : torch.Generator
        Draws the mini-batches.
    """

    def __init__(self, curvature, size, generator):
        self.curvature = curvature
        self.size = size
        self.generator = generator

    @property
    def stochastic(self):
        """Whether products are on proper random subsets (False: on all samples)."""
        return self.size is not None and self.size < self.curvature.n_samples

    def draw(self):
        """Sorted row indices of the next mini-batch (a numpy array); None when products use every sample."""
        if not self.stochastic:
            return None
        rows = torch.randint(self.curvature.n_samples, (self.size,), generator=self.generator,
                             device=self.generator.device)
        return np.sort(rows.cpu().numpy())

    def operator(self, rows):
        """The curvature operator over rows ``rows`` of the data (every sample for None)."""
        if rows is None:
            return self.curvature
        return self.curvature.on_rows(rows)

    def matmat(self, vectors):
        """Rows ``C_B v`` on a newly drawn mini-batch ``B`` for the rows ``v`` of ``vectors``."""
        return self.operator(self.draw()).matmat(vectors)
