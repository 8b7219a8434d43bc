"""LissaInfluence: the stochastic Neumann recursion (LiSSA) on all right-hand sides of a call at once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from .._docs import shared_docs
from .._linalg.cg import UnitSystems
from .._linalg.minibatch import MinibatchCurvature
from .._linalg.power_iteration import extreme_eigenvalues
from .._memory import release_freed_memory
from .._progress import NO_PROGRESS
from .._validation import Interval, StrOptions
from ..base import BaseInfluence
from ..exceptions import LissaConvergenceWarning

# Why a recursion stopped (LissaReport.status).
CONVERGED, MAX_ITER, DIVERGED = 0, 1, 2
# Without mini-batches a convergent recursion shrinks its steps at every iteration (||M|| < 1), so a
# mean step over a check window ten times its smallest value so far means divergence. With mini-batches
# steps fluctuate, by a few times in a few dimensions; geometric growth passes a thousandfold in a few
# more iterations, where no fluctuation goes.
_GROWTH_LIMIT = {"deterministic": 10.0, "stochastic": 1000.0}
# With mini-batches, scale="auto" is this many times the estimated largest eigenvalue of C + lambda I.
# The curvature of a mini-batch spreads above the full one (and, for a Hessian, below zero), and a step
# of 1 / scale along such a direction expands; a larger scale also averages the mini-batch noise over
# more steps. Measured on a 2,410-parameter MLP (digits, mini-batches of 128, 300 / 1,000 iterations),
# Pearson agreement with the exact influences: 0.89 / 0.91 at 1.5, 0.96 / 0.97 at 3, - / 0.985 at 5
# (which converges too slowly for 300 iterations).
_STOCHASTIC_SCALE_MARGIN = 3.0
# rtol="auto" without mini-batches (with them: 0, max_iter steps).
_RTOL = 1e-4
# Seed of the power iteration's start block (any generic block will do).
_POWER_ITERATION_SEED = 0


@dataclass
class LissaReport:
    """What one batched recursion did (for diagnostics and warnings).

    Attributes
    ----------
    n_iter : int
        Iterations run (the largest over the right-hand sides).
    status : torch.Tensor of int, shape (k,)
        Per right-hand side: ``CONVERGED``, ``MAX_ITER`` or ``DIVERGED``.
    relative_changes : torch.Tensor of shape (k,)
        The mean change per iteration over the last check window, relative
        to the iterate (0 for a zero right-hand side).
    growing : torch.Tensor of shape (n,) or None
        When a recursion diverged: its change over the last window, the
        direction along which it grows.
    """

    n_iter: int
    status: torch.Tensor
    relative_changes: torch.Tensor
    growing: torch.Tensor | None = None


def auto_scale(largest, smallest, dampen, stochastic):
    """The scale ``"auto"`` takes, from estimates of the extreme eigenvalues of ``C + lambda I``.

    ``largest`` is an estimate from above of ``a_max``, ``smallest`` one from
    above of ``a_min`` (the power iteration's, see
    :func:`~skinfl._linalg.power_iteration.extreme_eigenvalues`). Without
    mini-batches: the scale that minimises the spectral radius of
    ``M = (1 - d) I - (C + lambda I) / s``, ``(a_max + a_min) / (2 (1 - d))``,
    for a radius of ``(1 - d) (a_max - a_min) / (a_max + a_min)``: half the
    iterations of ``s = a_max`` on an ill-conditioned curvature, and far
    fewer on a well-conditioned one, for the same limit. Since ``smallest``
    is never below ``a_min``, this is never slower than ``s = a_max``. With
    mini-batches: ``_STOCHASTIC_SCALE_MARGIN * a_max``, above the curvature
    of most mini-batches, so that their steps contract.
    """
    if stochastic:
        return _STOCHASTIC_SCALE_MARGIN * largest
    return (largest + min(max(smallest, 0.0), largest)) / (2 * (1 - dampen))


def lissa_recursion(minibatches, rhs, *, regularization, scale, dampen, max_iter, rtol, check_every,
                    progress=NO_PROGRESS):
    """Solve ``(C + (regularization + dampen * scale) I) x_i = b_i`` for the rows of ``rhs`` by LiSSA.

    ``h_0 = b``, ``h_{t+1} = b + (1 - dampen) h_t - (C_t + regularization I) h_t / scale``, with
    ``C_t`` the curvature of the mini-batch drawn at iteration ``t`` (every sample without
    mini-batches); the solution is ``h_T / scale``. One mini-batch is drawn per iteration for all
    rows, whichever are still running: a row's iterates do not depend on the rows solved with it.

    Every ``check_every`` iterations, a row whose mean change per iteration over that window,
    ``||h_t - h_{t - check_every}|| / check_every``, is at most ``rtol ||h_t||`` stops; one whose
    mean change grew ``_GROWTH_LIMIT`` times above its smallest value so far (or is not finite)
    has diverged, and the recursion stops at once.

    Returns
    -------
    solution : torch.Tensor of shape (k, n)
    report : LissaReport
    """
    # Solved for the unit right-hand sides and scaled back, as conjugate gradient is.
    systems = UnitSystems.of(rhs, rtol=0.0, atol=0.0)
    solution = systems.unit.clone()  # the iterates h, written back from the working set when it shrinks
    status = torch.full((len(rhs),), MAX_ITER, dtype=torch.int64, device=rhs.device)
    status[~systems.solvable] = CONVERGED
    status[~systems.finite] = DIVERGED  # a non-finite gradient: nothing to solve
    relative_changes = torch.zeros(len(rhs), dtype=rhs.dtype, device=rhs.device)
    rounding = torch.finfo(rhs.dtype).eps ** 0.5
    decay, shrink = 1.0 - dampen, 1.0 / scale
    growth_limit = _GROWTH_LIMIT["stochastic" if minibatches.stochastic else "deterministic"]

    # The working set: rows still running, and converged rows riding along until fewer than half
    # of it runs (as in batched_conjugate_gradient: shapes change about log2(k) times per solve,
    # and the state is gathered and scattered only then).
    working = (status == MAX_ITER).nonzero().squeeze(1)
    running = torch.ones(len(working), dtype=torch.bool, device=rhs.device)
    rhs_rows, iterate = systems.unit[working], solution[working]
    window_start = iterate.clone()
    # Steps start at most ||b|| = 1 when 0 <= C_t + lambda I <= scale (the contracting case).
    smallest_change = torch.ones(len(working), dtype=rhs.dtype, device=rhs.device)
    n_iter, window, growing = 0, 0, None
    for _ in range(max_iter):
        if not len(working):
            break
        rows = minibatches.draw()  # drawn whichever rows run: every row sees the same sequence
        products = minibatches.operator(rows).matmat(iterate)
        updated = rhs_rows + decay * iterate - (products + regularization * iterate) * shrink
        iterate = torch.where(running[:, None], updated, iterate)
        n_iter += 1
        window += 1
        progress.update()
        if window < check_every and n_iter < max_iter:
            continue
        change = torch.linalg.vector_norm(iterate - window_start, dim=1) / window
        size = torch.linalg.vector_norm(iterate, dim=1)
        finite = torch.isfinite(change) & torch.isfinite(size)
        relative = torch.where(finite, change / torch.where(size > 0, size, torch.ones_like(size)),
                               torch.full_like(change, float("inf")))
        reference = torch.maximum(smallest_change, rounding * size)
        diverged = running & (~finite | (change > growth_limit * reference))
        converged = running & ~diverged & (change <= rtol * size)
        relative_changes[working] = torch.where(running, relative, relative_changes[working])
        smallest_change = torch.where(running & finite, torch.minimum(smallest_change, change),
                                      smallest_change)
        if progress.enabled and bool(running.any()):
            progress.note(f"largest change {float(relative[running].max()):.2e}, {int(running.sum())} running")
        status[working[converged]] = CONVERGED
        running = running & ~converged & ~diverged
        if bool(diverged.any()):
            first = int(diverged.nonzero()[0, 0])
            status[working[diverged]] = DIVERGED
            growing = iterate[first] - window_start[first]
            break
        window_start, window = iterate.clone(), 0
        if 2 * int(running.sum()) < len(running):
            solution[working] = iterate
            working, rhs_rows, iterate = working[running], rhs_rows[running], iterate[running]
            window_start, smallest_change = window_start[running], smallest_change[running]
            running = running[running]
    solution[working] = iterate

    solution *= shrink
    return systems.scaled_back(solution, status == DIVERGED), LissaReport(n_iter, status, relative_changes, growing)


@shared_docs(
    progress="the power iteration's curvature products, every LiSSA solve (iterations, with the largest "
             "remaining change per iteration and the systems still running)",
    memory='the power iteration\'s estimates of the curvature\'s extreme eigenvalues (``scale="auto"``)',
    random_state="the mini-batches",
    max_iter=("recursion steps per solve", "one mini-batch curvature product (over every fitted sample "
              "with ``minibatch_size=None``)"),
    unpenalized_parameters="regularized",
)
class LissaInfluence(BaseInfluence):
    r"""Influence with LiSSA, the stochastic Neumann series, matrix-free.

    Approximates ``(C + lambda I)^-1 g`` for every gradient ``g`` of a call
    with the recursion of Agarwal, Bullins and Hazan ("Second-order
    stochastic optimization for machine learning in linear time", 2017)::

        h_0 = g
        h_{t+1} = g + (1 - dampen) h_t - (C_t + lambda I) h_t / scale
        solution = h_T / scale

    where ``C_t`` is the curvature of a mini-batch of ``minibatch_size``
    training samples (128 by default) drawn at random, with replacement, at
    each iteration, as in the paper and in pyDVL; ``minibatch_size=None``
    uses all of them at every iteration, a deterministic recursion. All the
    gradients of a call run together and share each iteration's
    mini-batch, whose products are batched. An iteration costs one
    curvature product over ``minibatch_size`` samples, whatever the size of
    the training set; memory is that of four copies of the gradients being
    solved.

    **What the defaults do.** ``minibatch_size=128``, ``scale="auto"``
    (three times the largest eigenvalue, estimated in ``fit``) and
    ``rtol="auto"``, which is 0 with mini-batches: every solve runs
    ``max_iter=1000`` steps of 128 samples each, and gives no convergence
    warning. A training set of at most 128 samples is used whole at every
    step instead: the recursion is then deterministic, ``rtol="auto"`` is
    ``1e-4``, and it stops once converged. ``rtol_`` says which.

    **What it converges to.** Without mini-batches the iterates are the
    partial sums of a Neumann series, ``h_T / scale = 1/scale sum_{k<=T} M^k g``
    with ``M = (1 - dampen) I - (C + lambda I) / scale``, whose limit is

    .. math::

        \frac{h_\infty}{s} = (C + \lambda I + d\, s\, I)^{-1} g

    with ``s = scale`` and ``d = dampen``: **dampening is extra
    regularization**, of ``dampen * scale``. The series converges when
    every eigenvalue ``a`` of ``C + lambda I`` satisfies
    ``-dampen * scale < a < (2 - dampen) * scale``; the error then shrinks
    by the spectral radius of ``M`` per iteration, at best
    ``1 - (a_min + dampen * scale) / scale``, so that about
    ``scale / (a_min + dampen * scale) * log(1 / rtol)`` iterations are
    needed. With mini-batches, each ``C_t`` is an unbiased estimate of
    ``C`` drawn independently of the past, so the iterates are unbiased
    estimates of the same partial sums; they scatter around them (the
    recursion is stochastic gradient descent on
    ``x^T (C + lambda I) x / 2 - g^T x`` with step ``1 / scale``), less so
    with larger mini-batches.

    **Choosing the parameters.**

    - ``scale``: ``"auto"`` (the default) estimates the extreme
      eigenvalues ``a_max`` (from above) and ``a_min`` of ``C + lambda I``
      by block power iteration in ``fit`` (two or three runs of 20 products
      of 4 vectors) and takes, without mini-batches,
      ``scale_ = (a_max + a_min) / (2 (1 - dampen))``: the scale that
      contracts fastest, about half the iterations of the textbook
      ``scale = a_max`` on an ill-conditioned curvature and far fewer on a
      well-conditioned one, for the same limit (``a_min`` is estimated from
      above, which can only bring the scale closer to ``a_max``). With
      mini-batches it takes ``3 * a_max``: the curvature of a mini-batch
      spreads above that of all samples, and a step along such a direction
      expands instead of contracting; a larger scale trades noise for
      iterations (the iterations needed grow in proportion). A given
      scale below ``a_max / (2 - dampen)`` makes the recursion diverge: the
      growth of its steps is detected within a few check windows, and the
      error gives the estimated eigenvalue and the scale to use. A larger
      scale is safe but proportionally slower.
    - ``regularization``: the iterations needed grow like
      ``a_max / (a_min + lambda)``, so a tiny ``lambda`` on a curvature with
      near-zero eigenvalues needs very many iterations (a few thousand for
      ``a_max / lambda = 1000``; :class:`CgInfluence` needs about the square
      root of that). With ``second_order="hessian"`` away from a minimum,
      negative eigenvalues make the recursion diverge unless ``lambda``
      lifts them above zero: ``fit`` raises an error when its power
      iteration sees one, and the recursion when it grows along one.
    - ``dampen``: the same as adding ``dampen * scale_`` to
      ``regularization``, which is the clearer way to say it; kept for
      pyDVL's and dattri's parametrisation. Note that with ``scale="auto"``
      the extra regularization depends on ``scale_``.
    - ``minibatch_size``: 128 by default, so that a step costs the same
      whatever the size of the training set (with ``minibatch_size=None``
      each step is a pass over all of it: on a CNN fitted on 1,397 digits,
      more than 16 minutes). The result is a single noisy iterate whose
      noise falls slowly with the mini-batch size. ``minibatch_size=None``
      is a deterministic recursion that converges to the exact inverse (and
      does not depend on ``random_state``); it pays off when the training
      set is small next to the iterations needed times the mini-batch
      size. On an MLP of 2,410 parameters trained on 1,397 digits
      (``regularization=0.01``), against :class:`DirectInfluence`: 50
      deterministic iterations reached a Pearson correlation of 0.99998 and
      100 iterations 0.99999998; 300 iterations on mini-batches of 32, 128
      and 512 samples reached 0.71, 0.89 and 0.97 with a scale of
      ``1.5 * a_max``, and 0.96 (128) and 0.99 (512) with the default
      ``3 * a_max`` (0.97 with 128 samples and the default 1,000
      iterations). Compare a mini-batch setting against
      ``minibatch_size=None`` on a subset before relying on it.

    Parameters
    ----------
    {model}
    {loss}
    {parameters}
    {regularization}
    {second_order}
    scale : "auto" or float, default="auto"
        The scale ``s`` of the recursion, above ``a_max / (2 - dampen)``
        (and above ``a_max`` with mini-batches). ``"auto"`` chooses it in
        ``fit`` as described above; the value used is ``scale_``.
    dampen : float, default=0.0
        The dampening ``d``, in ``[0, 1)``: the result is the inverse of
        ``C + (lambda + d * scale) I``.
    {max_iter}
        Reaching it without converging gives a
        :class:`~skinfl.exceptions.LissaConvergenceWarning`, unless
        ``rtol_`` is 0 (the default with mini-batches).
    rtol : float or "auto", default="auto"
        A right-hand side stops when its mean change per iteration over the
        last ``check_every`` iterations is at most ``rtol`` times its
        iterate. Without mini-batches the change per iteration is the
        residual of the dampened system scaled by ``1 / scale``, so the
        relative error of the result is at most about
        ``rtol * scale / a_min``. With mini-batches the change does not fall
        below the mini-batch noise averaged over the window, so that any
        ``rtol > 0`` small enough to matter ends in a warning; ``rtol=0``
        runs ``max_iter`` iterations without the check or the warning.
        ``"auto"``: ``1e-4`` without mini-batches, 0 with them; the value
        used is ``rtol_``.
    minibatch_size : int or None, default=128
        Training samples in each iteration's curvature product, drawn
        uniformly with replacement, independently at every iteration. None,
        or a value of at least the number of fitted samples, uses all of
        them: deterministic. It is not ``batch_size``, which bounds memory
        and does not change results. With mini-batches the inverse is not a
        symmetric operator (a product of different mini-batch curvatures),
        so :meth:`influences` always solves for the test points, never for
        the training points: each entry then depends only on its own test
        and training point, not on the others in the call.
    check_every : int, default=10
        Iterations between convergence and divergence checks. The change
        checked is the mean over this window, which averages mini-batch
        noise down; a check costs a few vector norms.
    {batch_size}
        A mini-batch larger than this is processed in several passes.
    {device}
    {progress}
    {memory}
    {random_state}
        Every solve of a fitted estimator draws the same sequence of
        mini-batches, so results do not depend on how rows are chunked; fix
        it for bitwise reproducible fits. The power iteration starts from a
        fixed block, so ``scale_`` depends on the model and the data only.

    Attributes
    ----------
    {fitted_attributes}
    scale_ : float
        The scale used: ``scale``, or the one ``"auto"`` chose.
    rtol_ : float
        The tolerance used: ``rtol``, or the one ``"auto"`` chose (``1e-4``
        without mini-batches, 0 with them).
    largest_eigenvalue_ : float or None
        Estimate from above of the largest eigenvalue of the curvature
        ``C`` (without regularization), from the power iteration of
        ``scale="auto"``; None with a given ``scale``.
    n_iter_ : int
        After ``fit``: the steps of the power iteration of
        ``scale="auto"`` (block products of 4 vectors, 40 or 60), 0 with a
        given ``scale``. Then the recursion steps of the last call that
        solved (``transform``, ``influences``, ``self_influence``,
        ``top_influences``, ``score``), the most over its right-hand sides.
        It is a diagnostic, kept outside the estimator's parameters and
        fitted state, so that ``transform`` leaves the estimator unchanged.

    See Also
    --------
    CgInfluence : Conjugate gradient: deterministic and faster to a tight tolerance.
    DirectInfluence : The exact inverse, for small models.

    Examples
    --------
    >>> import torch
    >>> from skinfl import LissaInfluence
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    >>> est = LissaInfluence(model, regularization=0.1, random_state=0).fit(X, y)
    >>> est.influences(X[:2], y[:2]).shape
    torch.Size([2, 20])
    """

    _parameter_constraints = {
        **BaseInfluence._parameter_constraints,
        "scale": [StrOptions({"auto"}), Interval(Real, 0, None, closed="neither")],
        "dampen": [Interval(Real, 0, 1, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "rtol": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "minibatch_size": [Interval(Integral, 1, None, closed="left"), None],
        "check_every": [Interval(Integral, 1, None, closed="left")],
    }
    _factor_parameters = ()
    _inverse_reads_data = True  # solves run against the training data

    def __init__(
        self,
        model,
        *,
        loss="auto",
        parameters=None,
        regularization=1e-3,
        second_order="hessian",
        scale="auto",
        dampen=0.0,
        max_iter=1000,
        rtol="auto",
        minibatch_size=128,
        check_every=10,
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
        self.scale = scale
        self.dampen = dampen
        self.max_iter = max_iter
        self.rtol = rtol
        self.minibatch_size = minibatch_size
        self.check_every = check_every
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.memory = memory
        self.random_state = random_state

    # ------------------------------------------------------------ factors
    def _compute_factors(self, curvature):
        if self.scale != "auto":
            return {}, {}
        return self._spectrum_factors(curvature)

    def _spectrum_factors(self, curvature):
        """The power iteration's estimates, as factors (regularization-free), and its steps, as metadata."""
        fmodel = curvature.fmodel
        # A fixed start: scale_ is then a function of the model and the data, whatever random_state.
        generator = torch.Generator().manual_seed(_POWER_ITERATION_SEED)
        steps = []

        def step(vectors):
            steps.append(len(vectors))
            return curvature.matmat(vectors)

        estimate = extreme_eigenvalues(step, curvature.n_params, generator=generator, dtype=fmodel.dtype,
                                       device=fmodel.device)
        tensors = {"spectrum": torch.tensor([estimate.largest, estimate.largest_ritz, estimate.smallest],
                                            dtype=torch.float64)}
        return tensors, {"power_iteration_steps": len(steps)}

    def _spectrum(self):
        """``(largest from above, largest Ritz value, smallest from above)`` eigenvalues of ``C``, computed
        now if not yet."""
        if "spectrum" not in self._factors:
            with self._progress("power iteration (curvature products)", unit="vector") as bar:
                self._add_factors(*self._spectrum_factors(self._reporting_curvature(bar)))
        largest, largest_ritz, smallest = (float(value) for value in self._factors["spectrum"])
        return largest, largest_ritz, smallest

    def _stochastic(self):
        return self.minibatch_size is not None and self.minibatch_size < self.n_samples_fit_

    def _symmetric_inverse(self):
        # A fixed sequence of mini-batches is a product of different matrices, not a symmetric operator:
        # <A^-1 a, b> != <a, A^-1 b>, so influences always solve for the test points.
        return not self._stochastic()

    @property
    def n_iter_(self):
        """Steps of the solves of the last call, the largest over its right-hand sides.

        After ``fit``, the power iteration's steps (0 with a given
        ``scale``); then set by each call that solves (:meth:`transform`,
        :meth:`influences`, :meth:`self_influence`, ...).
        """
        return self._last_solve_value("n_iter")

    def _build_inverse(self):
        self._minibatch_seed = self._seed  # one sequence of mini-batches for every solve of this fit
        # With mini-batches the change per step does not fall below their noise: run max_iter steps.
        self.rtol_ = (0.0 if self._stochastic() else _RTOL) if self.rtol == "auto" else float(self.rtol)
        if self.scale != "auto":
            self.scale_ = float(self.scale)
            self.largest_eigenvalue_ = None
            self._record_fit_iterations(0)
            return
        largest, _, smallest_ritz = self._spectrum()
        # Files saved by skinfl < 0.2 did not record the steps.
        self._record_fit_iterations(self._factor_metadata.get("power_iteration_steps", 0))
        self.largest_eigenvalue_ = largest
        top = largest + self.regularization_
        if top <= 0:
            raise ValueError(
                f"The {self.second_order} plus regularization has no positive eigenvalue (largest about "
                f"{top:.3g}): LiSSA's recursion cannot converge. Raise regularization above "
                f"{-largest:.3g}, or use second_order='gauss_newton'."
            )
        self.scale_ = auto_scale(top, smallest_ritz + self.regularization_, self.dampen, self._stochastic())
        self._check_negative_curvature(smallest_ritz)

    def _check_negative_curvature(self, smallest_ritz):
        lifted = smallest_ritz + self.regularization_ + self.dampen * self.scale_
        if lifted <= 0:
            raise ValueError(
                f"The {self.second_order} has a negative eigenvalue of about {smallest_ritz:.3g} (the model "
                f"is not at a minimum of the training loss), which regularization={self.regularization_:.3g} "
                "does not lift above zero: LiSSA's recursion diverges along it. Use regularization > "
                f"{-smallest_ritz:.3g}, or second_order='gauss_newton' (positive semi-definite)."
            )

    # -------------------------------------------------------------- solves
    def _minibatches(self):
        generator = torch.Generator().manual_seed(self._minibatch_seed)
        size = self.minibatch_size if self._stochastic() else None
        return MinibatchCurvature(self._curvature(), size, generator)

    def _apply_inverse(self, gradients):
        minibatches = self._minibatches()
        with self._progress(f"LiSSA, {len(gradients)} systems", total=self.max_iter, unit="iteration") as bar:
            solution, report = lissa_recursion(
                minibatches,
                gradients,
                regularization=self.regularization_,
                scale=self.scale_,
                dampen=self.dampen,
                max_iter=self.max_iter,
                rtol=self.rtol_,
                check_every=self.check_every,
                progress=bar,
            )
        if report.growing is not None:
            self._summarize_solves([report])  # n_iter_ says how soon it was caught
            raise ValueError(self._divergence_message(report, minibatches.stochastic))
        self._report_solves([report])
        release_freed_memory()
        return solution

    def _divergence_message(self, report, stochastic):
        regularization, scale, dampen = self.regularization_, self.scale_, self.dampen
        largest, _, smallest_ritz = self._spectrum()
        top = largest + regularization
        along = float("nan")
        direction = report.growing
        if bool(torch.isfinite(direction).all()) and float(direction.norm()) > 0:
            direction = direction / direction.norm()
            along = float(self._curvature().matmat(direction[None])[0] @ direction) + regularization
        parts = [f"LiSSA diverged after {report.n_iter} iterations with scale={scale:.4g}."]
        if along + dampen * scale <= 0 or smallest_ritz + regularization + dampen * scale <= 0:
            candidates = (along, smallest_ritz + regularization)
            negative = min(value for value in candidates if not math.isnan(value))
            parts.append(
                f"The {self.second_order} plus regularization has a negative eigenvalue of about "
                f"{negative:.3g} (the model is not at a minimum of the training loss), along which the "
                f"recursion grows. Raise regularization by more than {-negative:.3g}, or use "
                "second_order='gauss_newton'."
            )
        elif top >= (2 - dampen) * scale or not stochastic:
            suggested = auto_scale(top, smallest_ritz + regularization, dampen, stochastic)
            parts.append(
                f"The largest eigenvalue of the {self.second_order} plus regularization is estimated at "
                f"{top:.4g} (power iteration); the recursion converges only for scale > "
                f"{top / (2 - dampen):.4g} (largest eigenvalue / (2 - dampen)). Use scale={suggested:.4g}, "
                "which scale='auto' would choose here, or any scale above the largest eigenvalue."
            )
        else:
            parts.append(
                f"The largest eigenvalue of the {self.second_order} plus regularization is estimated at "
                f"{top:.4g}, which this scale allows, but the curvature of mini-batches of "
                f"{self.minibatch_size} samples spreads above it. Use a larger scale (scale={2 * scale:.4g}) "
                "or a larger minibatch_size."
            )
        return " ".join(parts)

    def _solve_warning(self, reports):
        status = torch.cat([report.status.cpu() for report in reports])
        changes = torch.cat([report.relative_changes.cpu() for report in reports])
        failed = status == MAX_ITER
        n_failed = int(failed.sum())
        if n_failed == 0 or self.rtol_ == 0:
            return None
        worst = float(changes[failed].max())
        message = (
            f"LiSSA did not converge for {n_failed} of {len(status)} right-hand sides within max_iter="
            f"{self.max_iter} iterations: the mean change per iteration over the last {self.check_every} "
            f"iterations is up to {worst:.3g} of the iterate, above rtol={self.rtol_:g}. Raise max_iter, or "
            "regularization (fewer iterations needed)"
        )
        if self._stochastic():
            message += (
                f"; with mini-batches of {self.minibatch_size} samples the change cannot fall below the "
                "mini-batch noise: raise minibatch_size or check_every, or use rtol=0 to run max_iter "
                "iterations without this check."
            )
        else:
            message += "."
        return message, LissaConvergenceWarning
