"""The estimator every influence approximation shares.

A solver implements three hooks:

- ``_compute_factors(curvature)``: the costly work that does not depend on
  ``regularization`` (a curvature matrix, eigenpairs, a sketch), from a
  :class:`~skinfl._curvature.CurvatureOperator` over the fitted data. It
  returns ``(tensors, metadata)``: a dict of tensors and a JSON-able dict.
  The base class caches them on disk with ``memory=``, so that a search over
  ``regularization`` computes them once per training set.
- ``_build_inverse()``: the cheap step from ``self._factors`` and
  ``regularization`` to the inverse (a factorisation, a preconditioner).
- ``_apply_inverse(gradients)``: rows ``(C + regularization I)^-1 g``.

Iterative solvers also report their solves (``_report_solves``) and may
override ``_solve_warning``. The machinery behind the hooks lives beside
this module: the factor cache in :mod:`skinfl._cache` (:class:`FactorCache`)
and the once-per-call reporting of solves in :mod:`skinfl._reporting`.

Everything users call (``fit``, ``transform``, ``influences``,
``top_influences``, ``self_influence``, ``score``, pickling) lives here,
once, and works through the data in chunks: its extra memory is that of a
few batches of gradients plus the solver's fitted state, whatever the
number of samples.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn import get_config
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils import check_random_state
from sklearn.utils.validation import (
    _check_feature_names,
    _check_feature_names_in,
    _get_feature_names,
    check_is_fitted,
)
from torch import nn

from ._batches import describe, is_mapping
from ._cache import FactorCache
from ._curvature import SECOND_ORDER_MODES, CurvatureOperator, ReportingCurvature
from ._dask import is_dask
from ._data import DataSource, TargetSpec
from ._deprecation import renamed_attribute, resolve_renamed_parameters
from ._devices import available_device, first_device, moved
from ._gradients import batch_slices, gradients_of, index_batches, iter_gradients, perturbation_batch
from ._lazy import (
    lazy_influences,
    lazy_removal_effects,
    lazy_self_influence,
    lazy_top_influences,
    lazy_transform,
    store,
)
from ._model import (
    BUILTIN_LOSSES,
    FunctionalModel,
    evaluation_copy,
    mode_dependent_modules_in_training,
    select_parameters,
)
from ._model_source import loss_on_device, model_source
from ._progress import progress
from ._removal import ORDERS, SOLVERS, TEST_LOSSES, RemovalSteps, group_codes, loss_changes, rows_by_group
from ._reporting import SolveReporting, reporting_solves
from ._results import DEFAULT_MAX_RESULT_BYTES, RunningTopK, allocate, write
from ._shards import ShardedCurvature
from ._threads import thread_module
from ._validation import HasMethods, Interval, StrOptions, returns_torch, to_output, validate_estimator_params
from ._warnings import warn
from .exceptions import TrainingModeWarning

_REGISTRY = {}
# Former names of registered estimators, {old name: registered name}: deprecated alias classes, which
# load() still reads from files.
_ALIASES = {}

# (test inverse-curvature gradients) x (training samples) pairs per perturbation batch: each pair
# holds a gradient of the input, so this bounds that memory.
_MAX_PERTURBATION_PAIRS = 2**14
# Held-out points whose residual the score checks (see BaseInfluence.score).
SCORE_PROBES = 100
# Held while warnings are caught (see BaseInfluence._check_input_feature_names).
_CATCHING_WARNINGS = threading.Lock()


def registered_estimators():
    """The influence estimator classes, by name, in definition order."""
    return dict(_REGISTRY)


def estimator_class(name):
    """The registered estimator class saved as ``name``, a former name included; None if there is none."""
    return _REGISTRY.get(_ALIASES.get(name, name))


def registered_name(cls):
    """The registered name of ``cls``: its own, or that of the estimator a deprecated alias stands for."""
    return _ALIASES.get(cls.__name__, cls.__name__)


class BaseInfluence(FactorCache, SolveReporting, TransformerMixin, BaseEstimator):
    """Base class of the influence estimators; not used directly.

    Subclasses document the shared parameters; see :class:`CgInfluence`.
    """

    _parameter_constraints = {
        "model": [nn.Module, HasMethods(["fit", "get_params"])],
        "loss": [StrOptions({"auto", *BUILTIN_LOSSES}), callable],
        "parameters": [None, str, list, tuple],
        "regularization": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "second_order": [StrOptions(set(SECOND_ORDER_MODES))],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device, None],
        "progress": ["boolean"],
        "memory": [None, str, os.PathLike, HasMethods(["cache"])],
        "random_state": ["random_state"],
    }
    # Parameters the fitted factors depend on, besides the model, the data,
    # the loss and second_order: part of the factor cache key.
    _factor_parameters = ()
    # Deprecated names, {old: new}: parameters (the old one stays in __init__, default "deprecated",
    # resolved in fit) and fitted attributes (a property under the old name that warns).
    _renamed_parameters = {}
    _renamed_attributes = {}
    # Whether _apply_inverse reads the training data (iterative solves against it): then it travels with
    # the estimator to Dask workers.
    _inverse_reads_data = False

    def __init_subclass__(cls, alias_of=None, **kwargs):
        super().__init_subclass__(**kwargs)
        for old, new in cls.__dict__.get("_renamed_attributes", {}).items():
            setattr(cls, old, renamed_attribute(old, new))
        if alias_of is not None:  # a deprecated former name of the estimator alias_of: not registered
            _ALIASES[cls.__name__] = alias_of
        elif not cls.__name__.startswith("_"):
            _REGISTRY[cls.__name__] = cls

    # ------------------------------------------------------------------ hooks
    def _compute_factors(self, curvature):  # pragma: no cover - abstract
        raise NotImplementedError

    def _build_inverse(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply_inverse(self, gradients):  # pragma: no cover - abstract
        raise NotImplementedError

    def _regularization_terms(self):
        """What is added to the curvature's diagonal: ``regularization_``, or, where the model's own penalty
        leaves parameters out (``unpenalized_parameters_``), a vector with 0 on them.

        Solvers that can add a diagonal (Direct, CG) use it; the others add ``regularization_`` to all.
        """
        if not self.unpenalized_parameters_:
            return self.regularization_
        layout = self._functional_model().layout
        terms = torch.full((layout.n_params,), self.regularization_, dtype=self._dtype(), device=self.device_)
        start = 0
        for name, size in zip(layout.names, layout.sizes):
            if name in self.unpenalized_parameters_:
                terms[start:start + size] = 0
            start += size
        return terms

    def _symmetric_inverse(self):
        """Whether ``_apply_inverse`` is a symmetric operator, so that :meth:`influences` may apply it to
        either side (the smaller one); the test side otherwise."""
        return True

    def _check_regularization(self, regularization):
        """Reject a resolved ``regularization`` the solver cannot use (raise ``ValueError``)."""

    def _parameter(self, name):
        """The value of parameter ``name`` in use: the deprecated name's it replaces, when that was set."""
        return self.__dict__.get("_renamed_values", {}).get(name, getattr(self, name))

    # -------------------------------------------------------------- fitting
    def fit(self, X, y=None):
        """Build the inverse-curvature approximation on training data.

        The model is not trained: it is taken as trained on data like
        ``(X, y)``. ``X`` and ``y`` are kept by reference, not copied, so
        that :meth:`influences` can score every fitted point; they are read
        in batches of ``batch_size`` and streamed to the device.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Training inputs, as the model takes them. A ``numpy.memmap`` (or
            any object indexable along axis 0: an h5py or zarr array) stays
            where it is; a pickled estimator holds the file of a memmap or an
            h5py dataset, not its data. With dask arrays, every pass over the
            data runs as one task per row block on the workers, and the sums
            are added there (see the user guide, "Scaling out").
        y : array-like or torch.Tensor of shape (n_samples, ...)
            Training targets for ``loss``. Required.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        validate_estimator_params(self)
        self._renamed_values = resolve_renamed_parameters(self)
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None: "
                "the curvature is that of the training loss, which needs targets."
            )
        source = model_source(self.model, self.loss)
        device = self._resolve_device(source.module)
        trainable = select_parameters(source.module, self.parameters)
        in_training = mode_dependent_modules_in_training(source.module)
        if in_training and not source.predicts_in_eval_mode:
            warn(
                f"The model is in training mode and its modules {in_training[:3]} behave differently "
                "in eval mode; influences are computed on a copy in eval mode (dropout off, batch norm "
                "with running statistics), and your model is left unchanged. Call model.eval() "
                "before fitting to silence this warning.",
                TrainingModeWarning,
            )
        loss = loss_on_device(source.loss, device)
        inputs = DataSource(X, y, input_dtype=model_dtype(source.module), device=device)
        first = inputs.inputs(slice(0, 1))
        module = _evaluation_copy_for(source.module, device, first)
        fmodel = FunctionalModel(module, loss, trainable)
        output_shape = _probe_output_shape(fmodel, first)
        loss = fmodel.loss = loss.for_outputs(tuple(output_shape))  # token targets where outputs have positions
        targets_as = TargetSpec(loss, tuple(output_shape), fmodel.dtype, source.classes)
        data = inputs.with_targets(targets_as).validate()

        self.model_ = module
        self.loss_ = loss.fitted(data.iter_targets())
        self.regularization_ = source.regularization(self.regularization, len(data))
        self._check_regularization(self.regularization_)
        by_model = isinstance(self.regularization, str)  # "auto": the model's own penalty, where it applies
        unpenalized = set(source.unpenalized()) if by_model else set()
        self.unpenalized_parameters_ = [name for name in trainable if name in unpenalized]
        if source.classes is not None:
            self.classes_ = source.classes
        else:
            self.__dict__.pop("classes_", None)
        self.trainable_parameters_ = trainable
        self.device_ = device
        self.n_params_ = fmodel.n_params
        self.n_samples_fit_ = len(data)
        self.input_shape_ = _shape_attribute(data.input_shape)
        self.n_features_in_ = _n_features(self.input_shape_)
        self.output_shape_ = tuple(output_shape)
        # feature_names_in_ when X is a DataFrame with string column names (removed otherwise), so that
        # later calls with reordered or other columns are caught as in scikit-learn.
        self._check_input_feature_names(X, reset=True)
        # Integer for token ids: what a lazy module is materialised on (for keyword inputs, the first one's).
        self._input_dtype = (next(iter(first.values())) if is_mapping(first) else first).dtype
        self._fit_data = data
        self._last_solve = {}  # filled by the solves of later calls (see _summarize_solves)
        # One seed for all of this fit's randomness, drawn now when random_state is None: saved with the
        # estimator, so that a loaded one draws what the fitted one drew (LiSSA's mini-batches, say).
        self._seed = _seed_of(self.random_state)
        if self._seed is None:
            self._seed = int(np.random.randint(2**31 - 1))
        with self._fitted_factors():
            self._build_inverse()
        return self

    def _computed_factors(self):
        """``_compute_factors`` on the fitted data, its curvature products counted on a progress bar."""
        with self._progress(f"{type(self).__name__} factors (curvature products)", unit="vector") as bar:
            return self._compute_factors(self._reporting_curvature(bar))

    def _reporting_curvature(self, bar, data=None):
        """The curvature of ``data`` (default: the fitted data), stepping ``bar`` with each product."""
        return ReportingCurvature(self._curvature(data), bar)

    def _progress(self, desc, total=None, unit="it"):
        """A progress bar for a long step of this estimator: a tqdm bar with ``progress=True``, else silent.

        Solvers open one around each loop they run (``with self._progress(...) as bar``) and step it;
        the bar's ``note`` shows what tells how far the loop is (a residual, a change).
        """
        return progress(self.progress, desc, total=total, unit=unit)

    def _generator(self):
        """A torch generator on ``device_`` for the fit's randomness, seeded from ``random_state``."""
        return torch.Generator(device=self.device_).manual_seed(self._seed)

    def get_feature_names_out(self, input_features=None):
        """Get the names of the columns of :meth:`transform`, one per trainable parameter entry.

        Each name is the parameter's name followed by the entry's index,
        ``"0.weight[2,1]"`` or ``"0.bias[2]"``, in the order of the flat
        parameter vector. With them, ``set_output(transform="pandas")``
        gives data frames whose columns say which parameter entry each
        column belongs to.

        Parameters
        ----------
        input_features : array-like of str or None, default=None
            Ignored: the columns are parameters, not input features. If
            given, it is checked against ``feature_names_in_`` as in
            scikit-learn.

        Returns
        -------
        feature_names_out : ndarray of str objects of shape ``(n_params_,)``
            The column names.
        """
        check_is_fitted(self)
        if input_features is not None:
            _check_feature_names_in(self, input_features)
        parameters = dict(thread_module(self.model_).named_parameters())
        names = []
        for name in self.trainable_parameters_:
            shape = tuple(parameters[name].shape)
            if not shape:
                names.append(name)
                continue
            names.extend(f"{name}[{','.join(map(str, index))}]" for index in np.ndindex(*shape))
        return np.asarray(names, dtype=object)

    # ------------------------------------------------------------ inference
    def fit_transform(self, X, y=None, **fit_params):
        """Fit on ``(X, y)``, then return the inverse-curvature gradients of the same points.

        The same as ``fit(X, y).transform(X, y)``: the gradients are those of
        the training loss at ``y`` (scikit-learn's default would drop ``y``
        and take the prediction measurement instead).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Training inputs.
        y : array-like or torch.Tensor of shape (n_samples, ...)
            Training targets. Required.
        **fit_params : dict
            Not used; accepted for scikit-learn's API.

        Returns
        -------
        result : ndarray or torch.Tensor of shape (n_samples, n_params)
            ``(C + regularization I)^-1 grad l(x, y)``, as :meth:`transform` returns it.
        """
        return self.fit(X, y, **fit_params).transform(X, y)

    @reporting_solves
    def transform(self, X, y=None):
        """Inverse-curvature gradients ``(C + regularization I)^-1 grad l(x, y)``.

        Computed ``batch_size`` rows at a time; the result itself has
        ``n_samples x n_params_`` values.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Inputs.
        y : array-like or torch.Tensor of shape (n_samples, ...), default=None
            Targets. If None, the gradient is that of the model's prediction
            measurement: the negative log-probability of the predicted class
            for classification losses, the sum of the outputs for ``"mse"``.

        Returns
        -------
        inverse_gradients : ndarray, torch.Tensor or dask array of shape (n_samples, n_params)
            A torch tensor on ``device_`` if ``X`` is one, a lazy dask array
            (one block per row block of ``X``) if ``X`` or ``y`` is one, else
            a numpy array.
        """
        if is_dask(X) or is_dask(y):
            self._check_lazy_data(X, y)
            return lazy_transform(self, X, y)
        data = self._check_data(X, y)
        result = allocate((len(data), self.n_params_), self._dtype(), returns_torch(X), self.device_,
                          max_bytes=None)
        for position, _, solved in self._solved_batches(data, desc="transform"):
            write(result, position, solved)
        return result

    @reporting_solves
    def influences(self, X_test, y_test=None, X=None, y=None, *, mode="up", normalize=None, out=None,
                   max_result_bytes=DEFAULT_MAX_RESULT_BYTES):
        """Influence of training points on the loss at test points.

        ``influences[i, j] = <(C + regularization I)^-1 g(test_i), g(train_j)>``
        with ``g`` the loss gradients. Positive means helpful: up-weighting
        training point ``j`` lowers the loss at test point ``i``; removing it
        changes that loss by about ``influences[i, j] / n_samples_fit_``.

        The matrix is computed in blocks and written into the result as it
        goes; with ``out`` (a ``numpy.memmap``, say) it never has to fit in
        memory. The smaller side (test or training points) is inverted, at
        most as many of its points at a time as fit in scikit-learn's
        ``working_memory``; the other side streams past in batches.

        Parameters
        ----------
        X_test : array-like or torch.Tensor of shape (n_test, ...)
            Test inputs.
        y_test : array-like or torch.Tensor of shape (n_test, ...), default=None
            Test targets; None uses the prediction measurement (see
            :meth:`transform`).
        X : array-like or torch.Tensor of shape (n_train, ...), default=None
            Training points to score. None scores the data given to ``fit``.
        y : array-like or torch.Tensor of shape (n_train, ...), default=None
            Their targets, required with ``X``: training points are scored by
            the gradient of their training loss.
        mode : {"up", "perturbation"}, default="up"
            ``"up"``: up-weighting influence, shape ``(n_test, n_train)``.
            ``"perturbation"``: ``<(C + regularization I)^-1 g(test_i),
            grad_x grad_theta l(x_j, y_j)>``, the sensitivity to perturbing the
            input of training point ``j``, shape ``(n_test, n_train, *x_shape)``.
        normalize : {None, "relatif", "cosine"}, default=None
            None: the influences as defined above, which grow with the size
            of the training gradient: points the model fits badly
            (mislabelled, atypical) dominate every ranking. ``"relatif"``
            (Barshan et al., 2020) divides entry ``(i, j)`` by
            ``sqrt(<(C + regularization I)^-1 g(train_j), g(train_j)>)``, the
            square root of training point ``j``'s self-influence: the
            influence per unit of how much the point moves the parameters,
            which ranks points that matter to this test point in particular
            (one more solve per training point). ``"cosine"`` uses unit
            gradients on both sides, ``g / ||g||``. Only with ``mode="up"``.
        out : ndarray, torch.Tensor or zarr array, default=None
            Array of the result's shape to write into and return, for
            example ``numpy.lib.format.open_memmap(path, mode="w+",
            dtype="float32", shape=(n_test, n_train))``, or a zarr array
            (which the Dask workers write themselves when the data are dask
            arrays).
        max_result_bytes : int or None, default=2**31
            Without ``out``, a result larger than this many bytes (2 GiB) is
            refused with an error that says how large it would be; None
            lifts the limit.

        Returns
        -------
        influences : ndarray, torch.Tensor or dask array
            ``out`` if given (computed); else a lazy dask array if any of
            the data is one (the fitted data included, for ``X=None``): one
            solve per block of test points, then one task per block of
            training points against them (see the user guide, "Scaling
            out"); else a torch tensor on ``device_`` if ``X_test`` is one,
            else a numpy array.
        """
        if mode not in ("up", "perturbation"):
            raise ValueError(f"mode must be 'up' or 'perturbation', got {mode!r}.")
        _check_normalize(normalize)
        if normalize is not None and mode != "up":
            raise ValueError(f"normalize={normalize!r} applies to mode='up' only.")
        if mode == "perturbation" and isinstance(self.input_shape_, dict):
            raise ValueError("mode='perturbation' differentiates with respect to the inputs, which must be one "
                             f"floating-point array; this estimator was fitted on keyword inputs {list(self.input_shape_)}.")
        if self._is_lazy(X_test, y_test, X, y):
            if mode != "up":
                raise ValueError("mode='perturbation' is not computed on dask arrays; pass numpy arrays or "
                                 "tensors (in pieces of the test points, with out= a memmap, for a large result).")
            self._check_lazy_data(X_test, y_test, X, y)
            result = lazy_influences(self, X_test, y_test, X, y, normalize)
            return result if out is None else store(result, out)
        test = self._check_data(X_test, y_test, names=("X_test", "y_test"))
        train = self._training_data(X, y)
        shape = (len(test), len(train)) if mode == "up" else (len(test), len(train), *self.input_shape_)
        result = allocate(shape, self._dtype(), returns_torch(X_test), self.device_, out, max_result_bytes)
        if mode == "up":
            self._write_up_influences(test, train, result, normalize=normalize)
        else:
            self._write_perturbation_influences(test, train, result)
        return result

    @reporting_solves
    def removal_effects(self, X_test, y_test=None, X=None, y=None, *, groups=None, order="first", solver="auto",
                        test_loss="linear", out=None, max_result_bytes=DEFAULT_MAX_RESULT_BYTES):
        """Predicted change of each test loss when a training point, or a group of them, is removed.

        The training objective is taken in sum form, ``sum_i l_i(theta) +
        n / 2 * regularization * ||theta||^2`` (without the penalty on
        ``unpenalized_parameters_``), whose curvature is ``n (C +
        regularization I)``. Removing a set ``G`` of training points removes
        their loss terms and keeps the rest, the penalty included. Entry
        ``(i, G)`` predicts ``l(test_i; theta_without_G) - l(test_i; theta)``:
        positive where the points helped test point ``i``.

        - ``order="first"``: ``sum_{j in G} influences[i, j] / n``, the
          first-order change. It underestimates the effect of large groups
          and of points with high leverage.
        - ``order="newton"``: one Newton step of the objective without
          ``G`` from the fitted parameters, ``g_i^T (n (C + regularization I)
          - C_G)^-1 g_G`` with ``g_G`` the summed gradients of ``G`` and
          ``C_G`` the sum of its points' Gauss-Newton terms. For a
          generalised linear model (least squares, logistic regression) it
          is the exact Newton step, and for least squares the exact change
          after refitting.

        The Newton step is computed from the fitted inverse by the Woodbury
        identity: per point or group, the inverse is applied to one row per
        output value of each of its points (one for a regressor, one per
        class for a classifier), and one system of that many rows is solved;
        exact for :class:`DirectInfluence`, as accurate as the inverse for
        the others. A group with more than 4,096 such rows (or rows that do
        not fit in ``working_memory``) is solved instead by conjugate
        gradient on its modified system with the exact curvature,
        preconditioned by the fitted inverse (each iteration one pass over
        the fitted data). First order costs a pass over the training data,
        as :meth:`influences` does; Newton costs about ``n_outputs + 1``
        solves per training point.

        Parameters
        ----------
        X_test : array-like or torch.Tensor of shape (n_test, ...)
            Test inputs.
        y_test : array-like or torch.Tensor of shape (n_test, ...), default=None
            Test targets; None uses the prediction measurement (see
            :meth:`transform`).
        X : array-like or torch.Tensor of shape (n_train, ...), default=None
            Training points to remove. None removes points of the data given
            to ``fit``. ``n`` is always the number of fitted samples.
        y : array-like or torch.Tensor of shape (n_train, ...), default=None
            Their targets, required with ``X``.
        groups : array-like of shape (n_train,), default=None
            A group label per training point, as scikit-learn's group
            splitters take them: each group is removed as a whole, and the
            columns are the groups in the order of ``numpy.unique(groups)``.
            None removes each point alone.
        order : {"first", "newton"}, default="first"
            First-order estimate, or one Newton step (see above).
        solver : {"auto", "woodbury", "cg"}, default="auto"
            How Newton steps are solved: ``"auto"`` takes Woodbury and
            conjugate gradient for groups too large for it; the others force
            one (``"cg"`` needs the fitted data).
        test_loss : {"linear", "exact"}, default="linear"
            With ``order="newton"``: ``"linear"`` is the change of the test
            loss to first order along the step, ``<g_test, delta_G>``;
            ``"exact"`` evaluates each test loss at the stepped parameters,
            ``l(test; theta + delta_G) - l(test; theta)`` (one forward pass
            of the test points per point or group). A large group moves the
            parameters far enough for the test loss to curve: there the
            exact loss is much closer to refitting. Needs ``y_test``.
        out : ndarray, torch.Tensor or zarr array, default=None
            Array of the result's shape to write into and return (see
            :meth:`influences`).
        max_result_bytes : int or None, default=2**31
            Without ``out``, a larger result is refused (see :meth:`influences`).

        Returns
        -------
        removal_effects : ndarray, torch.Tensor or dask array of shape (n_test, n_train) or (n_test, n_groups)
            As :meth:`influences` returns it: ``out`` if given; a lazy dask
            array if any of the data is one; a torch tensor on ``device_``
            if ``X_test`` is one; else a numpy array.
        """
        if order not in ORDERS:
            raise ValueError(f"order must be 'first' or 'newton', got {order!r}.")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be 'auto', 'woodbury' or 'cg', got {solver!r}.")
        if test_loss not in TEST_LOSSES:
            raise ValueError(f"test_loss must be 'linear' or 'exact', got {test_loss!r}.")
        exact = test_loss == "exact"
        if exact and order != "newton":
            raise ValueError("test_loss='exact' evaluates the test losses after the Newton step: use order='newton'.")
        if exact and y_test is None:
            raise ValueError("test_loss='exact' evaluates the test losses, which needs their targets y_test.")
        if self._is_lazy(X_test, y_test, X, y):
            self._check_lazy_data(X_test, y_test, X, y)
            result = lazy_removal_effects(self, X_test, y_test, X, y, groups, order, solver, exact)
            return result if out is None else store(result, out)
        test = self._check_data(X_test, y_test, names=("X_test", "y_test"))
        train = self._training_data(X, y)
        n_columns = len(train)
        if groups is not None:
            codes, labels = group_codes(groups, len(train))
            n_columns = len(labels)
        result = allocate((len(test), n_columns), self._dtype(), returns_torch(X_test), self.device_, out,
                          max_result_bytes, what="removal_effects")
        n = self.n_samples_fit_
        if order == "first" and groups is None:
            self._write_up_influences(test, train, result, pair_products=lambda solved, gradients: solved @ gradients.T / n)
        elif order == "first":
            self._write_group_influences(test, train, result, codes, n_columns)
        else:
            steps = RemovalSteps(self, train, solver)
            if groups is None:
                chunks = [(rows, functools.partial(steps.of_points, rows)) for rows in self._held_chunks(len(train))]
            else:
                members = rows_by_group(codes, n_columns)
                chunks = [(rows, functools.partial(steps.of_groups, members[rows]))
                          for rows in self._held_chunks(n_columns)]
            self._write_removal_steps(test, result, chunks, exact)
            steps.warn_indefinite("groups" if groups is not None else "training points")
        return result

    @reporting_solves
    def top_influences(self, X_test, y_test=None, *, k=10, X=None, y=None, which="helpful", normalize=None):
        """The ``k`` most helpful or harmful training points of each test point.

        Streams over the training data without building the influence matrix:
        memory is that of the test points' inverse-curvature gradients and one
        batch of training
        gradients, whatever the number of training points.

        Parameters
        ----------
        X_test : array-like or torch.Tensor of shape (n_test, ...)
            Test inputs.
        y_test : array-like or torch.Tensor of shape (n_test, ...), default=None
            Test targets; None uses the prediction measurement (see
            :meth:`transform`).
        k : int, default=10
            Training points returned per test point.
        X : array-like or torch.Tensor of shape (n_train, ...), default=None
            Training points to rank. None ranks the data given to ``fit``.
        y : array-like or torch.Tensor of shape (n_train, ...), default=None
            Their targets, required with ``X``.
        which : {"helpful", "harmful", "both"}, default="helpful"
            ``"helpful"``: the largest influences first. ``"harmful"``: the
            most negative first. ``"both"``: the ``k`` most helpful followed
            by the ``k`` most harmful, in one pass.
        normalize : {None, "relatif", "cosine"}, default=None
            Rank by normalized influences (see :meth:`influences`):
            ``"relatif"`` keeps points with large gradients (often
            mislabelled ones) from topping every test point's list.

        Returns
        -------
        indices : ndarray, torch.Tensor or dask array of shape (n_test, k), or (n_test, 2 * k)
            Row indices into the training points. Lazy dask arrays (both)
            when any of the data is one: each block of training points keeps
            its best ``k``, merged in a tree of tasks.
        values : ndarray or torch.Tensor of the same shape
            Their influences, ``influences(X_test, y_test, X, y)[i, indices[i]]``.
        """
        if which not in ("helpful", "harmful", "both"):
            raise ValueError(f"which must be 'helpful', 'harmful' or 'both', got {which!r}.")
        orders = {"helpful": [True], "harmful": [False], "both": [True, False]}[which]
        _check_normalize(normalize)
        if self._is_lazy(X_test, y_test, X, y):
            if not isinstance(k, Integral):
                raise ValueError(f"k must be an integer, got {k!r}.")
            self._check_lazy_data(X_test, y_test, X, y)
            return lazy_top_influences(self, X_test, y_test, X, y, int(k), orders, normalize)
        test = self._check_data(X_test, y_test, names=("X_test", "y_test"))
        train = self._training_data(X, y)
        if not isinstance(k, Integral) or not 1 <= k <= len(train):
            raise ValueError(f"k must be an integer from 1 to the {len(train)} training points, got {k!r}.")
        like_torch = returns_torch(X_test)
        shape = (len(test), k * len(orders))
        indices = allocate(shape, torch.int64, like_torch, self.device_, max_bytes=None)
        values = allocate(shape, self._dtype(), like_torch, self.device_, max_bytes=None)
        fmodel = self._functional_model()
        for held in self._held_chunks(len(test)):
            inverse_gradients = self._inverse_gradients_of(test, held, normalize, "test")
            tops = [RunningTopK(k, largest) for largest in orders]
            for position, gradients in iter_gradients(fmodel, train, self.batch_size, progress=self.progress,
                                                      desc="top influences"):
                block = inverse_gradients @ self._streamed_vectors(gradients, normalize, "train").T
                for top in tops:
                    top.update(block, position.start)
            write(indices, held, torch.cat([top.indices for top in tops], dim=1))
            write(values, held, torch.cat([top.values for top in tops], dim=1))
        return indices, values

    @reporting_solves
    def self_influence(self, X, y=None):
        """Self-influence ``<(C + regularization I)^-1 g_i, g_i>`` of each sample.

        Large values mark points the model depends on most, often
        mislabelled or atypical ones. Computed ``batch_size`` samples at a
        time.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Inputs.
        y : array-like or torch.Tensor of shape (n_samples, ...), default=None
            Targets; None uses the prediction measurement (see :meth:`transform`).

        Returns
        -------
        self_influence : ndarray, torch.Tensor or dask array of shape (n_samples,)
            A torch tensor on ``device_`` if ``X`` is one, a lazy dask array
            if ``X`` or ``y`` is one, else a numpy array.
        """
        if is_dask(X) or is_dask(y):
            self._check_lazy_data(X, y)
            return lazy_self_influence(self, X, y)
        data = self._check_data(X, y)
        values = torch.empty(len(data), dtype=self._dtype(), device=self.device_)
        for position, gradients, solved in self._solved_batches(data, desc="self-influence"):
            values[position] = (solved * gradients).sum(dim=1)
        return to_output(values, returns_torch(X))

    @reporting_solves
    def score(self, X, y):
        r"""Held-out curvature residual of the inverse (higher is better, at most 0).

        The estimator approximates ``(C_fit + lambda I)^-1`` with ``C_fit`` the
        curvature of the fitted data. Influence needs the inverse of the
        curvature of the *population*, so the inverse is checked against the
        curvature ``C_val`` of held-out data ``(X, y)`` (all ``m`` points, no
        regularization), at up to 100 held-out gradients ``g_v``, the probes:

        .. math::

            \mathrm{score} = -\frac{1}{|P|}\sum_{v \in P}
            \frac{\lVert C_{\mathrm{val}}\, u_v - g_v \rVert^2}{\lVert g_v \rVert^2},
            \qquad u_v = (C_{\mathrm{fit}} + \lambda I)^{-1} g_v .

        The probes ``P`` are the first 100 points with a nonzero gradient in
        the order ``check_random_state(random_state).permutation(m)`` (all of
        them when there are fewer). The score is an unbiased estimate of the
        same average over every held-out point, at a cost linear in ``m``:
        100 solves and 100 curvature products over the held-out data. Fix
        ``random_state`` so that the candidates of a search are scored on the
        same probes.

        A perfect inverse gives 0. It is not degenerate in ``lambda``: as
        ``lambda -> infinity``, ``u_v -> 0`` and the score tends to -1 (nothing
        explained); as ``lambda -> 0``, directions that the fitted data barely
        constrain are amplified by ``1 / eigenvalue`` and, where held-out
        curvature disagrees, the score falls far below -1. No retraining is
        involved. For scores against retraining ground truth, see
        ``skinfl.metrics``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Held-out inputs.
        y : array-like or torch.Tensor of shape (n_samples, ...)
            Held-out targets. Required.

        Returns
        -------
        score : float
            Minus the mean relative residual; 0 is a perfect inverse.
        """
        if y is None:
            raise ValueError("score needs targets y: it compares against the curvature of the held-out loss.")
        data = self._check_data(X, y)
        fmodel = self._functional_model()
        order = check_random_state(self.random_state).permutation(len(data))
        probes = []
        for start in range(0, len(order), SCORE_PROBES):
            candidates = gradients_of(fmodel, data, self.batch_size, order[start:start + SCORE_PROBES])
            norms = (candidates * candidates).sum(dim=1)
            probes.append(candidates[norms > torch.finfo(candidates.dtype).tiny])
            if sum(len(p) for p in probes) >= SCORE_PROBES:
                break
        gradients = torch.cat(probes)[:SCORE_PROBES]
        if not len(gradients):
            warn("Every held-out sample has a zero gradient; the score is undefined (nan).")
            return float("nan")
        solved = self._apply_inverse(gradients)
        residuals = self._curvature(data).matmat(solved) - gradients
        return float(-((residuals * residuals).sum(dim=1) / (gradients * gradients).sum(dim=1)).mean())

    # ------------------------------------------------------------ dask arrays
    def _is_lazy(self, X_test, y_test, X, y):
        """Whether a result over these test and training data is a lazy dask array: when any of them
        (the fitted data, for ``X=None``) is one."""
        if any(is_dask(value) for value in (X_test, y_test, X, y)):
            return True
        fitted = getattr(self, "_fit_data", None)  # unfitted: the error comes from the eager path
        return X is None and fitted is not None and fitted.is_sharded

    def _check_lazy_data(self, X_test, y_test, X=None, y=None):
        """The checks that need no pass over the data, here; the values are checked in each block's task."""
        check_is_fitted(self)
        self._check_input_feature_names(X_test, reset=False)
        test = DataSource(X_test, y_test, input_dtype=self._dtype(), device=self.device_,
                          names=("X_test", "y_test"))
        test.check_target_count()
        self._check_input_shape(test, "X_test")
        if X is None and y is not None:
            raise ValueError("y was given without X; pass both, or neither to score the fitted data.")
        if X is None:
            self._training_data(None, None)
        elif y is None:
            self._training_data(X, None)  # the error for missing targets
        else:
            train = DataSource(X, y, input_dtype=self._dtype(), device=self.device_)
            train.check_target_count()
            self._check_input_shape(train, "X")

    def _worker_copy(self):
        """This estimator as shipped to Dask workers: without its training data unless ``_apply_inverse``
        reads them."""
        worker = copy.copy(self)
        if not self._inverse_reads_data:
            worker._fit_data = None
        return worker

    # --------------------------------------------------------------- streaming
    def _held_chunks(self, n_rows):
        """Slices of rows whose inverse-curvature gradients are held at once: as many as fit in
        ``working_memory``."""
        itemsize = torch.tensor([], dtype=self._dtype()).element_size()
        budget = get_config()["working_memory"] * 2**20 // (self.n_params_ * itemsize)
        return batch_slices(n_rows, max(self.batch_size, int(budget)))

    def _solved_batches(self, data, rows=None, desc=None):
        """Yield ``(position, gradients, solved)`` over ``rows`` of ``data``, ``batch_size`` at a time.

        ``solved`` are the inverse-curvature gradients ``(C + lambda I)^-1 g``
        of the batch's gradients; one batch of each is alive at a time.
        """
        for position, gradients in iter_gradients(self._functional_model(), data, self.batch_size, rows,
                                                  progress=self.progress and desc is not None, desc=desc):
            yield position, gradients, self._apply_inverse(gradients)

    def _inverse_gradients_of(self, data, rows, normalize=None, side="test"):
        """Inverse-curvature gradients of ``rows`` of ``data``, held together (see :meth:`_held_chunks`), scaled
        for ``normalize`` as the rows of ``side`` ("test" or "train") of an influence: for ``"cosine"``
        divided by the gradients' norms, for ``"relatif"`` on the training side by the square roots of the
        self-influences."""
        inverse_gradients = torch.empty(rows.stop - rows.start, self.n_params_, dtype=self._dtype(),
                                        device=self.device_)
        for position, gradients, solved in self._solved_batches(data, rows):
            if normalize == "cosine":
                solved = solved * _reciprocal(gradients.norm(dim=1))[:, None]
            elif normalize == "relatif" and side == "train":
                solved = solved * _reciprocal(self._self_influence_roots(gradients, solved))[:, None]
            inverse_gradients[position] = solved
        return inverse_gradients

    def _streamed_vectors(self, gradients, normalize, side):
        """Gradients of the streamed side of an influence (``side``: "test" or "train"), scaled for ``normalize``
        (see :meth:`_inverse_gradients_of`)."""
        if normalize == "cosine":
            return gradients * _reciprocal(gradients.norm(dim=1))[:, None]
        if normalize == "relatif" and side == "train":
            roots = self._self_influence_roots(gradients, self._apply_inverse(gradients))
            return gradients * _reciprocal(roots)[:, None]
        return gradients

    def _self_influence_roots(self, gradients, solved):
        """``sqrt(<A^-1 g, g>)``, RelatIF's denominator; a warning where the self-influence of a nonzero
        gradient is not positive (an inverse that is not positive definite there): those entries are 0."""
        values = (solved * gradients).sum(dim=1)
        nonzero = gradients.abs().amax(dim=1) > 0
        if bool((nonzero & (values <= 0)).any()):
            warn("Some training points have a self-influence <= 0, so RelatIF cannot normalize by its square "
                 "root: their normalized influences are set to 0. The inverse is not positive definite on "
                 "them; increase regularization or use second_order='gauss_newton'.")
        return values.clamp_min(0).sqrt()

    def _write_up_influences(self, test, train, result, pair_products=None, normalize=None):
        """Fill ``result`` with ``pair_products(inverse_gradients, gradients)`` (default their ``@ .T``):
        inverse-curvature gradients of one side held, gradients of the other streamed, both scaled for
        ``normalize``; extra trailing axes allowed."""
        pair_products = pair_products or (lambda solved, gradients: solved @ gradients.T)
        fmodel = self._functional_model()
        # <A^-1 a, b> = <a, A^-1 b> for symmetric A: invert on the smaller side. An inverse that is not a
        # symmetric operator (stochastic LiSSA) is always applied to the test side, so that an entry does not
        # depend on how many points share the call. RelatIF solves every training point anyway (its
        # self-influence): holding that side costs no other solve.
        test_side = len(test) <= len(train) or not self._symmetric_inverse()
        if normalize == "relatif" and self._symmetric_inverse():
            test_side = False
        held_data, streamed_data, transposed = (test, train, False) if test_side else (train, test, True)
        held_side, streamed_side = ("test", "train") if test_side else ("train", "test")
        for held in self._held_chunks(len(held_data)):
            inverse_gradients = self._inverse_gradients_of(held_data, held, normalize, held_side)
            for position, gradients in iter_gradients(fmodel, streamed_data, self.batch_size,
                                                      progress=self.progress, desc="influences"):
                block = pair_products(inverse_gradients, self._streamed_vectors(gradients, normalize, streamed_side))
                if transposed:
                    write(result, (position, held), block.transpose(0, 1))
                else:
                    write(result, (held, position), block)

    def _write_group_influences(self, test, train, result, codes, n_groups):
        """Fill ``result`` with first-order removal effects of groups: influences / n summed over each group's
        columns as the training data stream past, so that no (test x training) matrix is held."""
        fmodel = self._functional_model()
        codes = torch.as_tensor(codes, device=self.device_)
        for held in self._held_chunks(len(test)):
            inverse_gradients = self._inverse_gradients_of(test, held)
            sums = torch.zeros(len(inverse_gradients), n_groups, dtype=self._dtype(), device=self.device_)
            for position, gradients in iter_gradients(fmodel, train, self.batch_size, progress=self.progress,
                                                      desc="removal effects"):
                sums.index_add_(1, codes[position], inverse_gradients @ gradients.T)
            write(result, held, sums / self.n_samples_fit_)

    def _write_removal_steps(self, test, result, chunks, exact=False):
        """Fill the columns of ``result`` with ``<g_test, delta>`` (or, ``exact``, the test losses' change at
        ``theta + delta``), for ``chunks`` of ``(columns, steps())``: the parameter changes of a chunk's
        removals, computed once and held while the test points pass."""
        fmodel = self._functional_model()
        test_chunks = self._held_chunks(len(test))
        held_gradients = None
        for columns, steps in chunks:
            deltas = steps()
            if exact:
                for position, index in index_batches(slice(0, len(test)), self.batch_size):
                    write(result, (position, columns), loss_changes(fmodel, deltas, *test.batch(index)))
                continue
            if len(test_chunks) == 1:  # the test gradients fit in working_memory: computed once
                if held_gradients is None:
                    held_gradients = gradients_of(fmodel, test, self.batch_size, test_chunks[0])
                write(result, (slice(None), columns), held_gradients @ deltas.T)
                continue
            for position, gradients in iter_gradients(fmodel, test, self.batch_size):
                write(result, (position, columns), gradients @ deltas.T)

    def _write_perturbation_influences(self, test, train, result):
        fmodel = self._functional_model()
        for held in self._held_chunks(len(test)):
            inverse_gradients = self._inverse_gradients_of(test, held)
            batch_size = max(1, min(self.batch_size, _MAX_PERTURBATION_PAIRS // len(inverse_gradients)))
            for batch in batch_slices(len(train), batch_size):
                x, y = train.batch(batch)
                if not x.is_floating_point():  # keyword inputs are refused before any work
                    raise ValueError(
                        "mode='perturbation' differentiates with respect to the inputs, which must be one "
                        f"floating-point array; got {describe(x)}."
                    )
                with torch.no_grad():
                    write(result, (held, batch), perturbation_batch(fmodel, inverse_gradients, x, y))

    # ------------------------------------------------------------- plumbing
    def __sklearn_clone__(self):
        # The model is trained state, not a hyper-parameter: scikit-learn would clone a fitted
        # scikit-learn model or skorch net into an unfitted one. A clone gets a copy of it, as
        # scikit-learn gives any other object, a torch module included.
        params = self.get_params(deep=False)
        model = copy.deepcopy(params.pop("model"))
        return type(self)(model=model, **{name: clone(value, safe=False) for name, value in params.items()})

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.allow_nan = False
        tags.non_deterministic = False
        return tags

    def _dtype(self):
        """Floating dtype of the fitted model copy: the dtype influences are computed in."""
        return model_dtype(thread_module(self.model_))

    def _resolve_device(self, module):
        if self.device is not None:
            device = torch.device(self.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(
                    f"device={self.device!r} but CUDA is not available on this machine; "
                    "use device='cpu' or device=None (the model's device)."
                )
            return device
        parameters = list(module.parameters())
        if not parameters:
            raise ValueError("The model has no parameters, so influence functions are undefined for it.")
        for tensor in parameters:
            if not isinstance(tensor, nn.parameter.UninitializedParameter):
                return tensor.device
        return torch.device("cpu")  # only lazy parameters: they materialise on the default device

    def _functional_model(self):
        """The fitted model and loss as functions of the trainable parameters, on the calling thread's
        module (``model_`` itself in the thread that fitted or loaded the estimator, a copy in others; see
        :mod:`skinfl._threads`)."""
        return FunctionalModel(thread_module(self.model_), self.loss_, self.trainable_parameters_)

    def _curvature(self, data=None):
        """Curvature operator over ``data`` (default: the fitted data)."""
        if data is None:
            data = self._fit_data
            if data is None:
                raise ValueError(
                    f"This {type(self).__name__} was saved without its training data (include_data=False), "
                    "and it needs curvature products over that data. Save it with include_data=True, or "
                    "fit it again."
                )
        operator = ShardedCurvature if data.is_sharded else CurvatureOperator
        return operator(self._functional_model(), data, self.second_order, self.batch_size, self.progress)

    def _training_data(self, X, y):
        """The training side of ``influences``: the fitted data, or checked ``(X, y)``."""
        if X is None:
            if y is not None:
                raise ValueError("y was given without X; pass both, or neither to score the fitted data.")
            if self._fit_data is None:
                raise ValueError(
                    f"This {type(self).__name__} was saved without its training data (include_data=False); "
                    "pass the training points to score as X, y."
                )
            return self._fit_data
        if y is None:
            raise ValueError(
                "y is required with X: training points are scored by the gradient of their training loss, "
                "which needs their targets."
            )
        return self._check_data(X, y, names=("X", "y"))

    def _check_input_feature_names(self, X, *, reset):
        """scikit-learn's feature-name check, its warnings raised at the user's call."""
        if reset or (getattr(self, "feature_names_in_", None) is None) == (_get_feature_names(X) is None):
            _check_feature_names(self, X, reset=reset)  # no warning: names on both sides (checked) or neither
            return
        # catch_warnings changes process-wide state, which it restores on leaving: only one thread at a time.
        with _CATCHING_WARNINGS, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _check_feature_names(self, X, reset=reset)
        for warning in caught:
            warn(warning.message, warning.category)

    def _check_data(self, X, y, names=("X", "y")):
        check_is_fitted(self)
        self._check_input_feature_names(X, reset=False)
        data = DataSource(X, y, input_dtype=self._dtype(), device=self.device_, names=names)
        output_shape = self._check_input_shape(data, names[0])
        targets = TargetSpec(self.loss_, output_shape, self._dtype(), getattr(self, "classes_", None))
        return data.with_targets(targets).validate()

    def _check_input_shape(self, data, name):
        """Check ``data``'s inputs against the fitted ones; the model's per-sample output shape on them.

        Integer inputs (token ids, attention masks) may be sequences of another length than the fitted
        ones: the output shape is then that of the model on their first sample.
        """
        shape = _shape_attribute(data.input_shape)
        if shape == self.input_shape_:
            return self.output_shape_
        fitted = self.input_shape_ if isinstance(self.input_shape_, dict) else {None: self.input_shape_}
        given = shape if isinstance(shape, dict) else {None: shape}
        if isinstance(shape, dict) != isinstance(self.input_shape_, dict) or set(given) != set(fitted):
            raise ValueError(
                f"{name} has inputs {_describe_shape(shape)}, but {type(self).__name__} was fitted on "
                f"{_describe_shape(self.input_shape_)}: pass the same inputs (the same keys, for a dict)."
            )
        arrays = data.X if isinstance(data.X, dict) else {None: data.X}
        for key, fitted_shape in fitted.items():
            if given[key] == fitted_shape:
                continue
            if not (_holds_integers(arrays[key]) and len(given[key]) == len(fitted_shape) >= 1
                    and given[key][1:] == fitted_shape[1:]):
                self._refuse_input_shape(name, shape)
        first = data.inputs(slice(0, 1))
        return tuple(_probe_output_shape(self._functional_model(), first))

    def _refuse_input_shape(self, name, shape):
        if not isinstance(shape, dict) and len(shape) == 1 and len(self.input_shape_) == 1:
            raise ValueError(
                f"{name} has {shape[0]} features, but {type(self).__name__} is expecting "
                f"{self.input_shape_[0]} features as input."
            )
        raise ValueError(
            f"{name} has per-sample shape {_describe_shape(shape)}, but {type(self).__name__} "
            f"was fitted on inputs of per-sample shape {_describe_shape(self.input_shape_)}."
        )

    # -------------------------------------------------------------- pickling
    def __getstate__(self):
        # Tensors and modules go to the host, each with the device it was on,
        # so that an estimator fitted on a GPU unpickles anywhere.
        state = super().__getstate__()
        devices = {key: first_device(value) for key, value in state.items()}
        packed = {key: _portable(key, value, torch.device("cpu"), copy_modules=True) for key, value in state.items()}
        return {"skinfl_state": packed, "devices": {k: None if d is None else str(d) for k, d in devices.items()}}

    def __setstate__(self, packed):
        if "skinfl_state" not in packed:
            raise ValueError(
                "This estimator was pickled by an older skinfl, whose format is no longer read; fit it again."
            )
        state, devices = packed["skinfl_state"], packed["devices"]
        saved = state.get("device_")
        target = available_device(saved)
        if saved is not None and torch.device(saved) != target:
            warn(
                f"This estimator was fitted on {saved}, which is not available here; it was loaded on {target}.",
                UserWarning,
            )
        restored = {}
        for key, value in state.items():
            device = target if key.endswith("_") or key.startswith("_") else available_device(devices.get(key))
            restored[key] = value if device is None else _portable(key, value, device, copy_modules=False)
        super().__setstate__(restored)


def _portable(key, value, device, copy_modules):
    """``value`` moved to ``device``; the ``device`` parameter itself is kept as given."""
    if key == "device":
        return value
    return moved(value, device, copy_modules)


def _check_normalize(normalize):
    if normalize not in (None, "relatif", "cosine"):
        raise ValueError(f"normalize must be None, 'relatif' or 'cosine', got {normalize!r}.")


def _reciprocal(values):
    """``1 / values``, and 0 where ``values`` is 0: a zero gradient has zero normalized influence."""
    return torch.where(values > 0, 1 / torch.where(values > 0, values, 1), 0)


def _seed_of(random_state):
    """An integer seed from ``random_state`` (None stays None: each computation draws its own)."""
    if random_state is None:
        return None
    if isinstance(random_state, Integral):
        return int(random_state)
    return int(check_random_state(random_state).randint(2**31 - 1))


def _shape_attribute(input_shape):
    """``input_shape_``: a tuple, or for keyword inputs a dict of tuples by key."""
    if isinstance(input_shape, dict):
        return {key: tuple(shape) for key, shape in input_shape.items()}
    return tuple(input_shape)


def _n_features(input_shape):
    """Input values per sample (summed over keyword inputs)."""
    shapes = input_shape.values() if isinstance(input_shape, dict) else [input_shape]
    return int(sum(np.prod(shape, dtype=int) for shape in shapes))


def _describe_shape(shape):
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{key!r}: {tuple(value)}" for key, value in shape.items()) + "}"
    return str(tuple(shape))


def _holds_integers(array):
    """Whether an input array holds integers (token ids, masks), whose sequence length may vary."""
    dtype = getattr(array, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return not dtype.is_floating_point and not dtype.is_complex
    return dtype is not None and np.dtype(dtype).kind in "iub"


def model_dtype(model):
    """Floating dtype of ``model``'s parameters (lazy ones too)."""
    for parameter in model.parameters():
        return parameter.dtype
    return torch.get_default_dtype()


def _inputs_do_not_fit(x, error):
    """The error for a model that cannot be evaluated on the first sample."""
    if is_mapping(x):
        return ValueError(
            f"The model could not be evaluated as model(**X[:1]) on X[:1] = {describe(x)} "
            f"({type(error).__name__}: {error}). A dict X is passed as keyword arguments: its keys must be "
            "the names of the model's forward arguments, all that it needs, with samples on the first axis."
        )
    hint = (
        " X holds integers, which are passed to the model as they are (as token ids for an "
        "embedding layer would be); cast X to float for a model that takes real values."
        if not x.is_floating_point()
        else ""
    )
    return ValueError(
        f"The model could not be evaluated on X[:1] of shape {tuple(x.shape)} "
        f"({type(error).__name__}: {error}). Check that X has the input shape the "
        f"model was trained on (for example the number of features).{hint}"
    )


def _evaluation_copy_for(model, device, first):
    try:
        return evaluation_copy(model, device, example=first)
    except Exception as error:  # materialising lazy modules runs the model
        raise _inputs_do_not_fit(first, error) from error


def _probe_output_shape(fmodel, first):
    """Per-sample output shape of the model, with a clear error if the inputs do not fit it."""
    try:
        with torch.no_grad():
            output = fmodel.output(fmodel.params, first)
    except Exception as error:  # any failure here means the inputs do not fit the model
        raise _inputs_do_not_fit(first, error) from error
    if not isinstance(output, torch.Tensor) or output.ndim == 0 or output.shape[0] != 1:
        raise ValueError(
            "The model must return one output tensor with samples on the first axis, or a mapping (a "
            "transformers ModelOutput) with its 'logits'; "
            f"on a batch of one sample it returned {type(output).__name__} "
            f"of shape {tuple(getattr(output, 'shape', ()))}. Wrap the model in a module whose forward "
            "returns the tensor the loss takes (see the user guide, 'Models')."
        )
    return output.shape[1:]
