"""DataInfInfluence: DataInf's closed-form inverse, block by block; InverseHarmonicMeanInfluence, its
former name, as a deprecated alias."""

from __future__ import annotations

import functools
from numbers import Real

import torch

from .._docs import shared_docs
from .._gradients import iter_gradients
from .._layers import module_blocks, whole_model_block
from .._validation import Interval, StrOptions
from .._warnings import warn
from ..base import BaseInfluence

_BLOCK_STRUCTURES = ("layer", "parameter", "full")


def parameter_blocks(fmodel, block_structure):
    """The blocks of ``block_structure`` over the trainable parameters of ``fmodel``."""
    if block_structure == "full":
        return [whole_model_block(fmodel.module, fmodel.layout)]
    blocks = module_blocks(fmodel.module, fmodel.layout)
    if block_structure == "parameter":
        return [piece for block in blocks for piece in block.split()]
    return blocks


def squared_gradient_norm_sums(curvature, bar=None):
    """``sum_i ||g_ip||^2`` over the samples of ``curvature`` for each parameter tensor ``p`` in layout order,
    in float64.

    Divided by the number of samples and summed over the tensors of a
    block, it is the trace of the block's empirical Fisher. One pass over
    the data; nothing per sample is kept.
    """
    fmodel = curvature.fmodel
    sizes = fmodel.layout.sizes
    totals = torch.zeros(len(sizes), dtype=torch.float64, device=fmodel.device)
    for _, gradients in iter_gradients(fmodel, curvature.data, curvature.batch_size,
                                       progress=curvature.progress, desc="gradient norms"):
        for index, piece in enumerate(torch.split(gradients, sizes, dim=1)):
            totals[index] += (piece * piece).sum(dtype=torch.float64)
    return totals


def sherman_morrison_sums(curvature, spans, regularizations, vectors, bar=None):
    """Rows ``sum_i g_il (g_il.v_l) / (lambda_l + ||g_il||^2)`` over the samples of ``curvature``, block by block.

    All rows together: each batch of training gradients is used once for
    every right-hand side, and the memory is one batch of gradients plus
    the rows.
    """
    # In the rows' dtype: the per-batch products are rounded there anyway, and a float64
    # accumulator would triple the memory of the rows for a float32 model.
    totals = torch.zeros_like(vectors)
    for _, gradients in iter_gradients(curvature.fmodel, curvature.data, curvature.batch_size):
        for span, regularization in zip(spans, regularizations):
            block = gradients[:, span]
            weights = vectors[:, span] @ block.T
            weights /= regularization + (block * block).sum(dim=1)
            totals[:, span] += weights @ block
    return totals


def harmonic_mean_solve(curvature, spans, regularizations, vectors):
    """Rows ``(1/n) sum_i (g_il g_il^T + lambda_l I)^-1 v_l``, block by block, in one pass over the data.

    Sherman-Morrison per term: ``(g g^T + lambda I)^-1 v = (v - g (g.v) / (lambda + ||g||^2)) / lambda``,
    so the mean over samples is ``(v - (1/n) sum_i g_i (g_i.v) / (lambda + ||g_i||^2)) / lambda``: the sum
    is taken over the shards of ``curvature``'s data (see :func:`sherman_morrison_sums`).
    """
    solution = curvature.sum_over_shards(sherman_morrison_sums, spans, regularizations, vectors)
    solution.div_(-curvature.n_samples).add_(vectors)
    for span, regularization in zip(spans, regularizations):
        solution[:, span] /= regularization
    return solution


@shared_docs(
    progress="the pass over the data for the gradient norms of ``relative_regularization``",
    memory="the mean squared gradient norms that ``relative_regularization=True`` computes in ``fit`` (one "
           "value per parameter tensor)",
    unpenalized_parameters="regularized",
)
class DataInfInfluence(BaseInfluence):
    r"""Influence with DataInf: the inverse harmonic mean of rank-one terms, per block of parameters.

    DataInf (Kwon, Wu, Wu and Zou, "DataInf: Efficiently estimating data
    influence in LoRA-tuned LLMs and diffusion models", ICLR 2024) replaces
    the curvature by a block-diagonal empirical Fisher: for each block
    ``l`` of parameters (by default the weight and bias of one module),
    ``G_l = (1/n) sum_i g_il g_il^T`` with ``g_il`` the block-``l`` part of
    the loss gradient of training point ``i``. Instead of inverting the mean
    ``G_l + lambda I``, it averages the inverses of the regularized rank-one
    terms, which Sherman-Morrison gives in closed form:

    .. math::

        (G_l + \lambda I)^{-1} \approx \frac{1}{n} \sum_i (g_{il} g_{il}^\top + \lambda I)^{-1}
        = \frac{1}{\lambda} \Big(I - \frac{1}{n} \sum_i
        \frac{g_{il} g_{il}^\top}{\lambda + \lVert g_{il} \rVert^2}\Big).

    Applying it is one pass over the training gradients for all the
    vectors of a call (``batch_size`` of them at a time), with no iteration,
    no matrix and nothing per training point kept: memory is one batch of
    gradients and two copies of the vectors solved.

    **When it is accurate.** Written as ``(I - C_l) / lambda``, the
    approximation corrects ``I / lambda`` by ``C_l = (1/n) sum_i g_il
    g_il^T / (lambda + ||g_il||^2)``, whose trace is below 1. The exact
    ``(G_l + lambda I)^-1`` needs a correction of trace ``sum_k mu_k / (mu_k
    + lambda)`` over the eigenvalues ``mu_k`` of ``G_l``: about the number of
    directions in which the block's curvature exceeds ``lambda``. So it is
    accurate where that number is well below one, which holds when
    ``lambda`` is large against ``mean_i ||g_il||^2`` (the trace of
    ``G_l``; the error then shrinks as ``(||g_il||^2 / lambda)^2``), and
    exact with one training point, where each term is inverted exactly.
    Kwon et al. bound the error by ``O(d_l^2)`` for a block of ``d_l``
    parameters. Where many directions of a block have curvature above
    ``lambda`` (wide layers, a small ``lambda``), it cannot shrink them all
    and stays close to the plain gradient inner product divided by
    ``lambda``. It suits small blocks and a large ``lambda`` (the paper's
    setting is low-rank LoRA adapters), and is poor for wide layers with a
    small ``lambda``. Beyond the swap, it ignores the curvature between blocks,
    and the empirical Fisher (the uncentred covariance of the loss
    gradients at the training labels) is not the Gauss-Newton matrix: for a
    well-fitted classifier most training gradients are tiny and a few
    misfitted points dominate it. Use it to rank training points cheaply;
    where the model is small enough, check it against
    :class:`DirectInfluence` or :class:`CgInfluence` with
    ``second_order="gauss_newton"``.

    Parameters
    ----------
    {model}
    {loss}
    {parameters}
    {regularization}
        ``lambda > 0`` added to each rank-one term ``g g^T`` (the formula
        divides by it, so 0 is an error). Influences scale as ``1 /
        lambda``. The approximation is accurate when ``lambda`` is large
        against the trace of a block's empirical Fisher, ``mean_i
        ||g_il||^2`` (``block_fisher_traces_`` with
        ``relative_regularization=True``); far below it, results tend to the
        gradient inner product divided by ``lambda``, so lowering ``lambda``
        further changes their scale more than their ranking. The default is
        larger than the other estimators' for that reason. To choose it,
        search it with :meth:`score` or a scorer of ``skinfl.metrics``.
    {second_order}
        The curvature approximated: the Gauss-Newton matrix, through the
        empirical Fisher of the training gradients. The Hessian is never
        used, so ``"hessian"`` is an error; for it use
        :class:`DirectInfluence` or :class:`CgInfluence`.
    block_structure : {"layer", "parameter", "full"}, default="layer"
        How parameters are grouped into the blocks of the block-diagonal
        approximation. ``"layer"``: one block per module that owns trainable
        parameters (its weight and bias together). ``"parameter"``: one
        block per parameter tensor, as the DataInf reference code does for
        LoRA matrices; smaller blocks make the swap more accurate and drop
        more curvature. ``"full"``: one block of all parameters, which keeps
        the cross-layer terms but makes the swap error that of the largest
        possible block.
    relative_regularization : bool, default=False
        If True, block ``l`` uses ``lambda_l = regularization * mean_i
        ||g_il||^2 / d_l``, ``regularization`` times the mean diagonal of
        the block's empirical Fisher, so that one value damps blocks with
        very different gradient scales alike; ``regularization=0.1`` is
        DataInf's choice. That puts ``lambda_l`` far below the trace of a
        wide block, where the approximation is close to the gradient inner
        product (see above). It costs one more pass over the training data
        in ``fit``. A block whose training gradients are all zero takes the
        mean diagonal over all parameters. If False, every block uses
        ``regularization`` itself, the meaning it has in the other
        estimators.
    {batch_size}
    {device}
    {progress}
    {memory}
        Without ``relative_regularization`` nothing costly is computed in
        ``fit`` and the cache holds nothing.
    {random_state}

    Attributes
    ----------
    {fitted_attributes}
    blocks_ : list of tuple
        One ``(module_name, parameter_names, size)`` per block, in the order
        of the flat parameter vector: the module's name in the model
        (``""`` for the root module, and for the single block of
        ``block_structure="full"``), the full names of its trainable
        parameters, and their number of values.
    block_regularization_ : torch.Tensor of shape (n_blocks,)
        The ``lambda_l`` of each block, in float64: all equal to
        ``regularization`` unless ``relative_regularization``.
    block_fisher_traces_ : torch.Tensor of shape (n_blocks,) or None
        Trace of each block's empirical Fisher, ``mean_i ||g_il||^2``, in
        float64, when ``relative_regularization`` (it is computed in
        ``fit`` then); None otherwise.

    See Also
    --------
    DirectInfluence : The exact inverse of the Gauss-Newton matrix, for small models.
    CgInfluence : Matrix-free conjugate gradient on the full curvature.

    Examples
    --------
    >>> import torch
    >>> from skinfl import DataInfInfluence
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    >>> est = DataInfInfluence(model, regularization=0.1).fit(X, y)
    >>> [(name, size) for name, _, size in est.blocks_]
    [('0', 16), ('2', 10)]
    >>> est.influences(X[:2], y[:2]).shape
    torch.Size([2, 20])
    """

    _parameter_constraints = {
        **BaseInfluence._parameter_constraints,
        "regularization": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "second_order": [StrOptions({"gauss_newton"})],
        "block_structure": [StrOptions(set(_BLOCK_STRUCTURES))],
        "relative_regularization": ["boolean"],
    }
    _factor_parameters = ("relative_regularization",)
    _inverse_reads_data = True  # solves run against the training data

    def __init__(
        self,
        model,
        *,
        loss="auto",
        parameters=None,
        regularization=0.1,
        second_order="gauss_newton",
        block_structure="layer",
        relative_regularization=False,
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
        self.block_structure = block_structure
        self.relative_regularization = relative_regularization
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.memory = memory
        self.random_state = random_state

    def fit(self, X, y=None):
        # The two settings the general constraints would reject without saying why.
        if isinstance(self.second_order, str) and self.second_order == "hessian":
            raise ValueError(
                "DataInfInfluence does not support second_order='hessian': DataInf approximates "
                "the Gauss-Newton matrix through the empirical Fisher (the mean of g g^T over training "
                "gradients) and never uses the Hessian. Use second_order='gauss_newton' (the default), or "
                "an estimator that inverts the Hessian: DirectInfluence (small models) or CgInfluence."
            )
        return super().fit(X, y)

    fit.__doc__ = BaseInfluence.fit.__doc__

    def _check_regularization(self, regularization):
        if regularization == 0:
            raise ValueError(
                "DataInfInfluence needs regularization > 0: each rank-one term g g^T is singular "
                "and the closed-form inverse divides by the regularization. Use for example "
                "regularization=0.1 (the default), or regularization=0.1 with relative_regularization=True "
                "(DataInf's choice)."
            )

    def _compute_factors(self, curvature):
        if not self.relative_regularization:
            return {}, {}
        norms = curvature.sum_over_shards(squared_gradient_norm_sums) / curvature.n_samples
        return {"mean_squared_gradient_norms": norms}, {}

    def _build_inverse(self):
        fmodel = self._functional_model()
        blocks = parameter_blocks(fmodel, self.block_structure)
        self.blocks_ = [(block.module_name, block.parameter_names, block.size) for block in blocks]
        self._spans = [block.span for block in blocks]
        self.block_fisher_traces_ = None
        if self.relative_regularization:
            traces = self._block_fisher_traces(fmodel, blocks)
            self.block_fisher_traces_ = traces.to(self.device_)
            regularization = self._relative_block_regularization(traces, blocks, fmodel.n_params)
        else:
            regularization = torch.full((len(blocks),), float(self.regularization_), dtype=torch.float64)
        self.block_regularization_ = regularization.to(self.device_)
        self._block_regularization = [float(value) for value in regularization]

    def _block_fisher_traces(self, fmodel, blocks):
        norms = self._factors["mean_squared_gradient_norms"].cpu()
        position = {name: index for index, name in enumerate(fmodel.layout.names)}
        return torch.stack([sum(norms[position[name]] for name in block.parameter_names) for block in blocks])

    def _relative_block_regularization(self, traces, blocks, n_params):
        sizes = torch.tensor([block.size for block in blocks], dtype=torch.float64)
        mean_diagonals = traces / sizes
        if not bool((traces > 0).all()):
            # A block no training gradient reaches: the model-wide scale, rather than lambda_l = 0.
            overall = float(traces.sum()) / n_params
            if overall <= 0:
                raise ValueError(
                    "Every training gradient is zero, so relative_regularization=True has no scale to take; "
                    "use relative_regularization=False with an absolute regularization."
                )
            mean_diagonals = torch.where(traces > 0, mean_diagonals, torch.full_like(mean_diagonals, overall))
        return self.regularization_ * mean_diagonals

    def _apply_inverse(self, gradients):
        # Through the curvature operator: its data is the fitted data, with the error for a
        # file saved without it.
        return harmonic_mean_solve(self._curvature(), self._spans, self._block_regularization, gradients)


class InverseHarmonicMeanInfluence(DataInfInfluence, alias_of="DataInfInfluence"):
    """Deprecated alias of :class:`DataInfInfluence`.

    .. deprecated:: 0.2
       ``InverseHarmonicMeanInfluence`` was renamed ``DataInfInfluence`` in
       skinfl 0.2 and will be removed in 0.4. It is not a registered estimator
       of its own; files saved under this name load as ``DataInfInfluence``.
    """

    @functools.wraps(DataInfInfluence.__init__)
    def __init__(self, model, **params):
        warn(
            "InverseHarmonicMeanInfluence was renamed DataInfInfluence in skinfl 0.2 and will be removed in "
            "0.4; use DataInfInfluence.",
            FutureWarning,
        )
        super().__init__(model, **params)
