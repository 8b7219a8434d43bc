"""EkfacInfluence: eigenvalue-corrected Kronecker factors, one block per layer."""

from __future__ import annotations

from numbers import Integral

import torch

from .._cotangents import resolve_target_draws
from .._docs import shared_docs
from .._kronecker import FISHER_TYPES, EkfacInverse, compute_ekfac_factors, plan_layers
from .._results import DEFAULT_MAX_RESULT_BYTES, allocate
from .._validation import Interval, StrOptions, returns_torch
from .._warnings import warn
from ..base import BaseInfluence, _check_normalize, reporting_solves
from ..exceptions import NotPositiveDefiniteWarning


@shared_docs(
    progress="the passes over the data for the factors and the eigenvalue correction",
    memory="the eigenbases and eigenvalues",
    random_state='the target draws of ``fisher="true"``',
    unpenalized_parameters="regularized",
)
class EkfacInfluence(BaseInfluence):
    r"""Influence with an EK-FAC (or K-FAC) approximation of the Gauss-Newton matrix.

    The curvature is approximated block-diagonally, one block per module
    that owns trainable parameters, at a cost close to two passes of
    gradients over the training data, with memory that of a batch and of
    the factors (two square matrices per layer):

    - ``torch.nn.Linear`` and ``torch.nn.Conv2d`` layers get Kronecker
      blocks ``G (x) A``: ``A`` the covariance of the layer's inputs (with a
      column of ones for the bias), ``G`` that of the gradients of its
      outputs. A convolution's inputs are its patches (KFC, Grosse and
      Martens 2016): with ``T`` output positions, ``A`` averages over them
      and ``G`` sums over them, which is exact for one position and, under
      KFC's assumptions (spatially homogeneous and uncorrelated
      derivatives), for any number. A ``Linear`` applied to inputs with
      extra axes (a sequence), or a module called several times, is treated
      the same way, with each row or call a position.
    - With ``correct_eigenvalues=True`` (EK-FAC, George et al. 2018) the
      Kronecker eigenbasis ``Q_G (x) Q_A`` is kept and the eigenvalues are
      refitted on the data: the exact diagonal of the block in that basis,
      ``mean_i sum (Q_G^T d_i Q_A)**2`` over per-sample gradients ``d_i``.
      Without, the eigenvalues are the products of the factors' (K-FAC).
    - Every other trainable parameter (norm layers, embeddings, custom
      parameters, grouped convolutions, tied weights) gets the exact
      diagonal of its block from the same pass, so every model works.
      ``layers_`` says which block each module got.

    The inverse ``(C_block + regularization I)^-1`` of each block is then
    applied in closed form in the eigenbasis.

    Parameters
    ----------
    {model}
    {loss}
    {parameters}
    {regularization}
        ``lambda >= 0`` added as ``lambda * I`` to every block.
    {second_order}
        The curvature approximated: the Gauss-Newton matrix (for the
        built-in losses, the Fisher). Kronecker factors need a curvature
        that is a covariance of gradients, so ``"hessian"`` is an error; for
        the Hessian use :class:`CgInfluence` or :class:`DirectInfluence`.
    fisher : {"true", "empirical"}, default="true"
        Which gradients the factors are covariances of. ``"true"``: the
        gradients at targets drawn from the model's predictive distribution
        (the true Fisher, whose expectation is the Gauss-Newton matrix).
        ``"empirical"``: the gradients at the training targets (the
        empirical Fisher; no sampling, but not the Gauss-Newton matrix away
        from a perfect fit).
    n_target_draws : int, None or "auto", default="auto"
        Targets drawn per training point with ``fisher="true"``. None
        computes the expectation over the predictive distribution exactly,
        from a square root of each point's output Hessian: one backward pass
        per output value (fine for a few classes, not for a vocabulary), and
        no sampling noise. ``"auto"``: None when a sample's output has at
        most 16 values (and always for ``NLLLoss``, whose exact expectation
        is one cotangent), else 1. A drawn target's gradient is rescaled by
        the curvature weight of the point's own target (class weights,
        ``pos_weight``, label smoothing, an ignored target), so that draws
        average to the exact expectation for every built-in loss; drawing
        is refused for ``NLLLoss`` and custom losses, whose curvature is
        not such an average. One draw is what other EK-FAC
        implementations do; on the digits models of the benchmarks the exact
        expectation agrees better with the exact Gauss-Newton influences, at
        a few times the (small) cost of the statistics passes.
    correct_eigenvalues : bool, default=True
        Refit the eigenvalues on the data (EK-FAC, one more pass over the
        training data); False gives K-FAC.
    {batch_size}
        It also bounds the activations and per-sample gradients that the
        statistics passes of ``fit`` hold.
    {device}
    {progress}
    {memory}
    {random_state}

    Attributes
    ----------
    {fitted_attributes}
    layers_ : list of str
        The blocks, in the order of the flat parameter vector: the name of
        the module owning each (``""`` for parameters of the root module).
        ``influences(..., by_layer=True)`` has one entry per block in this
        order.
    layer_approximations_ : dict
        For each name of ``layers_``, how its block is approximated and
        which parameters it holds, for example ``"Kronecker (Linear): 0.weight,
        0.bias"`` or ``"diagonal: 1.weight, 1.bias"``.
    n_target_draws_ : int or None
        Targets drawn per training point for the factors: ``n_target_draws``
        with ``"auto"`` resolved, None for the exact expectation (and with
        ``fisher="empirical"``, which draws none).

    See Also
    --------
    CgInfluence : With ``preconditioner="ekfac"``, refines EK-FAC to the exact inverse in a few iterations.
    DataInfInfluence : DataInf, another per-layer closed form.

    Examples
    --------
    >>> import torch
    >>> from skinfl import EkfacInfluence
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    >>> est = EkfacInfluence(model, regularization=0.1, random_state=0).fit(X, y)
    >>> est.layers_
    ['0', '2']
    >>> est.influences(X[:2], y[:2], by_layer=True).shape
    torch.Size([2, 20, 2])
    """

    _parameter_constraints = {
        **BaseInfluence._parameter_constraints,
        "second_order": [StrOptions({"gauss_newton"})],
        "fisher": [StrOptions(set(FISHER_TYPES))],
        "n_target_draws": [Interval(Integral, 1, None, closed="left"), None, StrOptions({"auto"})],
        "correct_eigenvalues": ["boolean"],
    }
    _factor_parameters = ("fisher", "n_target_draws", "correct_eigenvalues", "random_state")

    def __init__(
        self,
        model,
        *,
        loss="auto",
        parameters=None,
        regularization=1e-3,
        second_order="gauss_newton",
        fisher="true",
        n_target_draws="auto",
        correct_eigenvalues=True,
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
        self.fisher = fisher
        self.n_target_draws = n_target_draws
        self.correct_eigenvalues = correct_eigenvalues
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.memory = memory
        self.random_state = random_state

    def fit(self, X, y=None):
        if isinstance(self.second_order, str) and self.second_order == "hessian":
            raise ValueError(
                "EkfacInfluence does not support second_order='hessian': Kronecker factors approximate a "
                "covariance of gradients (the Gauss-Newton matrix, or Fisher), and the Hessian is not one. Use "
                "second_order='gauss_newton' (the default), or an estimator that inverts the Hessian: "
                "CgInfluence (any size; preconditioner='ekfac' uses these factors) or DirectInfluence."
            )
        return super().fit(X, y)

    fit.__doc__ = BaseInfluence.fit.__doc__

    def _compute_factors(self, curvature):
        fmodel = curvature.fmodel
        passes = 2 if self.correct_eigenvalues else 1
        with self._progress("EK-FAC statistics (samples)", total=passes * curvature.n_samples, unit="sample") as bar:
            # The empirical Fisher draws nothing.
            n_target_draws = None if self.fisher == "empirical" else resolve_target_draws(
                self.n_target_draws, self.output_shape_, fmodel.loss)
            tensors = compute_ekfac_factors(curvature, self.fisher, n_target_draws, self.correct_eigenvalues,
                                            self._generator(), bar)
        return tensors, {"n_target_draws": n_target_draws}

    def _computed_factors(self):
        # The statistics pass has its own bar (samples, not curvature products).
        return self._compute_factors(self._curvature())

    def _build_inverse(self):
        # Factors cached or saved before "auto" existed carry no resolved value; their parameter is it.
        self.n_target_draws_ = self._factor_metadata.get(
            "n_target_draws", None if self.fisher == "empirical" else self.n_target_draws)
        plans = plan_layers(self._functional_model())
        self.layers_ = [plan.name for plan in plans]
        self.layer_approximations_ = {plan.name: plan.describe() for plan in plans}
        self._plans = plans
        self._inverse = EkfacInverse(plans, self._factors, self.regularization_)
        if self._inverse.n_singular:
            warn(
                f"{self._inverse.n_singular} of the {self._inverse.n_values} eigenvalues of the EK-FAC "
                f"curvature are zero to rounding with regularization=0 (directions "
                "without curvature: dead units, unused layers, or more parameters than the data constrain); "
                "their directions are left out (a pseudo-inverse), and influences along them are zero. "
                "Use regularization > 0 to invert every direction.",
                NotPositiveDefiniteWarning,
            )

    def _apply_inverse(self, gradients):
        return self._inverse.apply(gradients)

    @reporting_solves
    def influences(self, X_test, y_test=None, X=None, y=None, *, mode="up", normalize=None, by_layer=False, out=None,
                   max_result_bytes=DEFAULT_MAX_RESULT_BYTES):
        """Influence of training points on the loss at test points, optionally one value per layer.

        As :meth:`BaseInfluence.influences`, plus ``by_layer``.

        Parameters
        ----------
        X_test : array-like or torch.Tensor of shape (n_test, ...)
            Test inputs.
        y_test : array-like or torch.Tensor of shape (n_test, ...), default=None
            Test targets; None uses the prediction measurement.
        X : array-like or torch.Tensor of shape (n_train, ...), default=None
            Training points to score. None scores the data given to ``fit``.
        y : array-like or torch.Tensor of shape (n_train, ...), default=None
            Their targets, required with ``X``.
        mode : {"up", "perturbation"}, default="up"
            See :meth:`BaseInfluence.influences`.
        normalize : {None, "relatif", "cosine"}, default=None
            See :meth:`BaseInfluence.influences`; with ``by_layer``, every
            layer's contribution is divided by the same whole-model norm, so
            that they still sum to the normalized influence.
        by_layer : bool, default=False
            Add a trailing axis with the contribution of each block, in the
            order of ``layers_``: the influence restricted to one layer's
            parameters, ``<(C_l + lambda I)^-1 g_l(test), g_l(train)>``. The
            blocks are independent in EK-FAC, so they sum to the influence.
            Only with ``mode="up"``.
        out : ndarray or torch.Tensor, default=None
            Array of the result's shape to write into and return.
        max_result_bytes : int or None, default=2**31
            Without ``out``, a larger result is refused; None lifts the limit.

        Returns
        -------
        influences : ndarray or torch.Tensor
            Shape ``(n_test, n_train)``, ``(n_test, n_train, n_layers)`` with
            ``by_layer``, or ``(n_test, n_train, *x_shape)`` for
            ``"perturbation"``.
        """
        _check_normalize(normalize)
        if not by_layer:
            return super().influences(X_test, y_test, X, y, mode=mode, normalize=normalize, out=out,
                                      max_result_bytes=max_result_bytes)
        if mode != "up":
            raise ValueError("by_layer=True splits up-weighting influences (mode='up') by layer; "
                             f"mode={mode!r} is not split.")
        if self._is_lazy(X_test, y_test, X, y):
            raise ValueError("by_layer=True is not computed on dask arrays; pass numpy arrays or tensors (in "
                             "pieces of the test points, with out= a memmap, for a large result).")
        test = self._check_data(X_test, y_test, names=("X_test", "y_test"))
        train = self._training_data(X, y)
        spans = [plan.block.span for plan in self._plans]
        shape = (len(test), len(train), len(spans))
        result = allocate(shape, self._dtype(), returns_torch(X_test), self.device_, out, max_result_bytes)

        def by_block(inverse_gradients, gradients):
            return torch.stack([inverse_gradients[:, span] @ gradients[:, span].T for span in spans], dim=2)

        self._write_up_influences(test, train, result, by_block, normalize=normalize)
        return result

