"""``InfluenceEnsemble``: the weighted mean of the influences of several models.

Influences computed from one trained model carry the noise of that model's
training run (its seed, where it stopped). Averaging them over several
models of the same architecture trained on the same data (several seeds,
or several checkpoints of one run) removes much of that noise: it is the
largest single gain in the linear datamodeling score that TRAK and dattri
report. The ensemble holds one skinfl estimator per model and returns the
weighted mean of what they return.

The members are called on chunks of the test points, sized from
scikit-learn's ``working_memory`` as ``pairwise_distances_chunked`` sizes
them: a chunk's blocks from each member are added into one block, written
into the result, and dropped, so that no member's full matrix is held
beside the result. Where a member call solves every training point it
scores (Newton steps, RelatIF), the chunks are of training points instead
(see :class:`_Chunks`), so that no solve is repeated.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from numbers import Integral
from typing import ClassVar

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn import get_config
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from ._dask import import_dask, is_dask
from ._data import rows_of
from ._gradients import batch_slices
from ._lazy import store
from ._removal import group_codes
from ._reporting import _SOLVE_REPORTS
from ._results import DEFAULT_MAX_RESULT_BYTES, RunningTopK, allocate, write
from ._validation import returns_torch, validate_estimator_params
from .base import BaseInfluence

__all__ = ["InfluenceEnsemble"]


class InfluenceEnsemble(BaseEstimator):
    """Weighted mean of the influences of several models (seeds, checkpoints).

    Each member is a skinfl influence estimator with a model of its own:
    models of one architecture trained on the same data with different
    seeds, or checkpoints of one training run. :meth:`fit` clones every
    member and fits the clones on the same data; every method returns the
    weighted mean of the members' results, ``sum_m weights_[m] *
    member_m.method(...)``, with the weights normalised to sum to 1.
    Averaging over models removes much of the noise that one training run
    puts into its influences, at the cost of the members' costs added up.

    An ensemble whose members are all fitted already may be used without
    calling :meth:`fit`: its methods then call the members as given. Members
    fitted on data of different sizes are refused; that they were fitted on
    the same data, and that their models were trained on it, is up to the
    user.

    Parameters
    ----------
    estimators : list of BaseInfluence
        The members: skinfl influence estimators (``CgInfluence(model_1)``,
        ...), each with its own model. Their parameters are reachable as
        ``estimators__<i>__<parameter>`` in :meth:`get_params` and
        :meth:`set_params` (``estimators__0__regularization``), so that a
        search can tune them.
    weights : array-like of shape (n_estimators,) or None, default=None
        Non-negative weight of each member, not all zero; normalised to sum
        to 1 (``weights_``), so that every result is a weighted mean. None
        weighs the members equally.
    n_jobs : int or None, default=None
        Members fitted at once by :meth:`fit`, in threads (joblib's
        ``prefer="threads"``). None means 1; -1 uses every core.

    Attributes
    ----------
    estimators_ : list of BaseInfluence
        The fitted clones of ``estimators``.
    weights_ : ndarray of shape (n_estimators,)
        The normalised weights, summing to 1.
    n_samples_fit_ : int
        Number of training points, the same for every member.
    n_features_in_ : int
        Number of input values per sample, as the members count them.

    See Also
    --------
    CgInfluence : A member estimator for models of any size.
    DirectInfluence : A member estimator with the exact inverse.

    Notes
    -----
    The cost of every method is the sum of the members' costs. The
    influences of the ensemble are not those of an estimator on an average
    model: each member's inverse curvature and gradients are those of its
    own model, and their results are averaged.

    Examples
    --------
    >>> import torch
    >>> from skinfl import DirectInfluence, InfluenceEnsemble
    >>> X, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 2, (30,))
    >>> models = [torch.nn.Linear(3, 2).double() for _ in range(3)]
    >>> ensemble = InfluenceEnsemble([DirectInfluence(model, regularization=0.1) for model in models])
    >>> ensemble.fit(X, y).influences(X[:4], y[:4]).shape
    torch.Size([4, 30])
    >>> ensemble.set_params(estimators__0__regularization=0.2).get_params()["estimators__0__regularization"]
    0.2
    """

    _parameter_constraints: ClassVar[dict] = {
        "estimators": [list, tuple],
        "weights": [None, "array-like"],
        "n_jobs": [None, Integral],
    }

    def __init__(self, estimators, weights=None, n_jobs=None):
        self.estimators = estimators
        self.weights = weights
        self.n_jobs = n_jobs

    # -------------------------------------------------------------- parameters
    def get_params(self, deep=True):
        """Get the parameters of this ensemble and, with ``deep``, those of its members.

        Parameters
        ----------
        deep : bool, default=True
            Also return each member as ``estimators__<i>`` and its
            parameters as ``estimators__<i>__<parameter>``.

        Returns
        -------
        params : dict
            Parameter names mapped to their values.
        """
        params = super().get_params(deep=False)
        if deep and isinstance(self.estimators, (list, tuple)):
            for index, member in enumerate(self.estimators):
                params[f"estimators__{index}"] = member
                if hasattr(member, "get_params") and not isinstance(member, type):
                    for name, value in member.get_params(deep=True).items():
                        params[f"estimators__{index}__{name}"] = value
        return params

    def set_params(self, **params):
        """Set the parameters of this ensemble or of its members.

        ``estimators__<i>`` replaces member ``i``; ``estimators__<i>__<name>``
        sets parameter ``name`` of member ``i`` (as scikit-learn's composite
        estimators do, the member itself is changed).

        Parameters
        ----------
        **params : dict
            ``estimators``, ``weights``, ``n_jobs``, ``estimators__<i>`` or
            ``estimators__<i>__<parameter>``.

        Returns
        -------
        self : InfluenceEnsemble
            This ensemble.
        """
        if "estimators" in params:
            self.estimators = params.pop("estimators")
        replaced, nested, own = {}, {}, {}
        for key, value in params.items():
            if not key.startswith("estimators__"):
                own[key] = value
                continue
            index, _, name = key[len("estimators__"):].partition("__")
            position = self._member_position(index, key)
            if name:
                nested.setdefault(position, {})[name] = value
            else:
                replaced[position] = value
        if own:
            super().set_params(**own)
        if replaced:
            members = list(self.estimators)
            for position, member in replaced.items():
                members[position] = member
            self.estimators = members
        for position, member_params in nested.items():
            self.estimators[position].set_params(**member_params)
        return self

    def _member_position(self, index, key):
        n_members = len(self.estimators) if isinstance(self.estimators, (list, tuple)) else 0
        if not (index.isdigit() and int(index) < n_members):
            raise ValueError(
                f"Invalid parameter {key!r} for estimator {type(self).__name__}: members are named by their "
                f"position in estimators, from 0 to {n_members - 1} (estimators__0__regularization, say)."
            )
        return int(index)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.allow_nan = False
        return tags

    # ----------------------------------------------------------------- fitting
    def fit(self, X, y=None):
        """Fit a clone of every member on the training data ``(X, y)``.

        Each member is cloned (with a copy of its model) and fitted as
        :meth:`BaseInfluence.fit` fits it; with ``n_jobs``, several at once.

        Parameters
        ----------
        X : array-like, torch.Tensor or dict of them, of shape (n_samples, ...)
            Training inputs, as the members' models take them.
        y : array-like or torch.Tensor of shape (n_samples, ...)
            Training targets. Required.

        Returns
        -------
        self : InfluenceEnsemble
            The fitted ensemble.
        """
        validate_estimator_params(self)
        _check_members(self.estimators)
        _normalised_weights(self.weights, len(self.estimators))  # checked before any fit
        members = Parallel(n_jobs=self.n_jobs, prefer="threads")(
            delayed(_fitted_clone)(member, X, y) for member in self.estimators)
        self._set_fitted(members)
        return self

    def _set_fitted(self, members):
        """Set the fitted attributes from fitted ``members`` (also used by :func:`skinfl.load`)."""
        self.n_samples_fit_ = _common_n_samples(members)
        self.estimators_ = list(members)
        self.weights_ = _normalised_weights(self.weights, len(members))
        if all(hasattr(member, "n_features_in_") for member in members):
            self.n_features_in_ = members[0].n_features_in_
        else:
            self.__dict__.pop("n_features_in_", None)

    def __sklearn_is_fitted__(self):
        if hasattr(self, "estimators_"):
            return True
        try:
            self._prefit_members()
        except (NotFittedError, TypeError, ValueError):
            return False
        return True

    def _prefit_members(self):
        """The given members when all are fitted, checked; NotFittedError otherwise."""
        _check_members(self.estimators)
        for member in self.estimators:
            try:
                check_is_fitted(member)
            except NotFittedError as error:
                raise NotFittedError(
                    f"This {type(self).__name__} is not fitted yet, and its member {type(member).__name__} is "
                    "not fitted either: call fit(X, y), or pass members that are all fitted."
                ) from error
        _common_n_samples(self.estimators)
        return list(self.estimators)

    def _members(self):
        """The members that compute: ``estimators_`` once fitted, else the given ones when all are fitted."""
        if hasattr(self, "estimators_"):
            return self.estimators_
        return self._prefit_members()

    def _weights(self, members):
        """The normalised weights: ``weights_`` once fitted, else those of ``weights``."""
        if hasattr(self, "estimators_"):
            return self.weights_
        return _normalised_weights(self.weights, len(members))

    # ----------------------------------------------------------------- results
    def influences(self, X_test, y_test=None, X=None, y=None, *, out=None,
                   max_result_bytes=DEFAULT_MAX_RESULT_BYTES, **member_kwargs):
        """Weighted mean of the members' influences of training points on test points.

        ``sum_m weights_[m] * estimators_[m].influences(X_test, y_test, X,
        y, **member_kwargs)``, computed in chunks of test points: each
        chunk holds as many rows as one member's block of them fits in
        scikit-learn's ``working_memory``; the members' blocks are added
        into the result's rows (``out`` is written chunk by chunk), so that
        no member's whole matrix is held beside the result. With
        ``normalize="relatif"``, which solves every training point it
        scores, the chunks are of training points instead (every test point
        against a chunk of them), so that those solves are not repeated.

        Parameters
        ----------
        X_test : array-like, torch.Tensor, DataFrame or dict of them, of shape (n_test, ...)
            Test inputs.
        y_test : array-like or torch.Tensor of shape (n_test, ...), default=None
            Test targets; None uses the members' prediction measurement.
        X : array-like or torch.Tensor of shape (n_train, ...), default=None
            Training points to score. None scores the data given to ``fit``.
        y : array-like or torch.Tensor of shape (n_train, ...), default=None
            Their targets, required with ``X``.
        out : ndarray, torch.Tensor or zarr array, default=None
            Array of the result's shape to write into and return (a
            ``numpy.memmap``, say).
        max_result_bytes : int or None, default=2**31
            Without ``out``, a result larger than this many bytes is refused;
            None lifts the limit.
        **member_kwargs : dict
            Passed to every member's ``influences`` (``mode=``, say).

        Returns
        -------
        influences : ndarray, torch.Tensor or dask array
            ``out`` if given; else a lazy dask array (the weighted sum of
            the members' lazy arrays) when any of the data is one; else a
            torch tensor if ``X_test`` is one, else a numpy array.
        """
        row_shape = None
        mode = member_kwargs.get("mode", "up")
        if mode == "up":
            row_shape = (self._n_train(X),)
        elif mode == "perturbation":
            input_shape = self._members()[0].input_shape_
            if not isinstance(input_shape, dict):
                row_shape = (self._n_train(X), *input_shape)
        return self._weighted_mean("influences", X_test, y_test, X, y, out, max_result_bytes, row_shape, None,
                                   member_kwargs)

    def removal_effects(self, X_test, y_test=None, X=None, y=None, *, groups=None, order="first", out=None,
                        max_result_bytes=DEFAULT_MAX_RESULT_BYTES, **member_kwargs):
        """Weighted mean of the members' predicted changes of test losses when training points are removed.

        ``sum_m weights_[m] * estimators_[m].removal_effects(...)``, computed
        in chunks as :meth:`influences` computes its result: of test points
        for ``order="first"``; of training points (or of groups) for
        ``order="newton"``, whose steps are solved once per training point
        (or group), not once per chunk of test points.

        Parameters
        ----------
        X_test : array-like, torch.Tensor, DataFrame or dict of them, of shape (n_test, ...)
            Test inputs.
        y_test : array-like or torch.Tensor of shape (n_test, ...), default=None
            Test targets; None uses the members' prediction measurement.
        X : array-like or torch.Tensor of shape (n_train, ...), default=None
            Training points. None takes the data given to ``fit``.
        y : array-like or torch.Tensor of shape (n_train, ...), default=None
            Their targets, required with ``X``.
        groups : array-like of shape (n_train,), default=None
            A group label per training point: each group is removed at
            once. None removes each point alone.
        order : str, default="first"
            The members' approximation (``"first"``, ``"newton"``).
        out : ndarray, torch.Tensor or zarr array, default=None
            Array of the result's shape to write into and return.
        max_result_bytes : int or None, default=2**31
            Without ``out``, a larger result is refused; None lifts the limit.
        **member_kwargs : dict
            Passed to every member's ``removal_effects``.

        Returns
        -------
        effects : ndarray, torch.Tensor or dask array of shape (n_test, n_train) or (n_test, n_groups)
            As :meth:`influences` returns its result.
        """
        members = self._members()
        if not all(hasattr(member, "removal_effects") for member in members):
            raise AttributeError(
                f"The members of this {type(self).__name__} have no removal_effects: this skinfl "
                "computes removal effects as influences / n_samples_fit_ (see influences)."
            )
        n_train = self._n_train(X)
        codes = None
        if groups is not None:
            codes, labels = group_codes(groups, n_train)
        row_shape = (n_train if groups is None else len(labels),)
        return self._weighted_mean("removal_effects", X_test, y_test, X, y, out, max_result_bytes, row_shape,
                                   codes, {"groups": groups, "order": order, **member_kwargs})

    def top_influences(self, X_test, y_test=None, *, k=10, X=None, y=None, which="helpful", **member_kwargs):
        """The ``k`` most helpful or harmful training points of each test point under the mean influences.

        The ranking is that of the weighted mean influence matrix (not a
        merge of the members' own rankings), computed for a chunk of test
        points at a time: as many as one block of ``n_train`` influences per
        point fits in scikit-learn's ``working_memory``.

        Parameters
        ----------
        X_test : array-like, torch.Tensor, DataFrame or dict of them, of shape (n_test, ...)
            Test inputs.
        y_test : array-like or torch.Tensor of shape (n_test, ...), default=None
            Test targets; None uses the members' prediction measurement.
        k : int, default=10
            Training points returned per test point.
        X : array-like or torch.Tensor of shape (n_train, ...), default=None
            Training points to rank. None ranks the data given to ``fit``.
        y : array-like or torch.Tensor of shape (n_train, ...), default=None
            Their targets, required with ``X``.
        which : {"helpful", "harmful", "both"}, default="helpful"
            ``"helpful"``: the largest mean influences first. ``"harmful"``:
            the most negative first. ``"both"``: the ``k`` most helpful
            followed by the ``k`` most harmful.
        **member_kwargs : dict
            Passed to every member's ``influences``.

        Returns
        -------
        indices : ndarray, torch.Tensor or dask array of shape (n_test, k), or (n_test, 2 * k)
            Row indices into the training points (int64). Lazy dask arrays
            (both) when any of the data is one.
        values : ndarray, torch.Tensor or dask array of the same shape
            Their mean influences, ``influences(X_test, y_test, X, y)[i, indices[i]]``.
        """
        if which not in ("helpful", "harmful", "both"):
            raise ValueError(f"which must be 'helpful', 'harmful' or 'both', got {which!r}.")
        if member_kwargs.get("mode", "up") != "up":
            raise ValueError("top_influences ranks training points by their influence (mode='up'); "
                             f"got mode={member_kwargs['mode']!r}.")
        orders = {"helpful": [True], "harmful": [False], "both": [True, False]}[which]
        members = self._members()
        weights = self._weights(members)
        if self._is_lazy(members, X_test, y_test, X, y):
            mean = self.influences(X_test, y_test, X, y, **member_kwargs)
            return _lazy_top(mean, k, orders)
        n_train = self._n_train(X)
        if not isinstance(k, Integral) or not 1 <= k <= n_train:
            raise ValueError(f"k must be an integer from 1 to the {n_train} training points, got {k!r}.")
        n_test = _n_samples(X_test)
        if not n_test:  # the members' error for empty data
            return members[0].top_influences(X_test, y_test, k=k, X=X, y=y, which=which)
        like_torch, dtype = returns_torch(X_test), _result_dtype(members)
        device = _accumulation_device(members, like_torch)
        shape = (n_test, int(k) * len(orders))
        indices = allocate(shape, torch.int64, like_torch, device, max_bytes=None)
        values = allocate(shape, dtype, like_torch, device, max_bytes=None)
        chunks = _Chunks("influences", members, weights, X_test, y_test, X, y, None, member_kwargs, dtype, device)
        with _GatheredSolves(members) as calls:
            if chunks.by_training_points:  # every test point, chunks of training points: one ranking merged
                tops = [RunningTopK(int(k), largest) for largest in orders]
                for (_, columns), block in chunks.blocks(calls, n_train):
                    for top in tops:
                        top.update(block, columns.start)
                write(indices, slice(None), torch.cat([top.indices for top in tops], dim=1))
                write(values, slice(None), torch.cat([top.values for top in tops], dim=1))
                return indices, values
            for rows, block in chunks.blocks(calls, n_train):
                tops = [RunningTopK(int(k), largest) for largest in orders]
                for top in tops:
                    top.update(block, 0)
                write(indices, rows, torch.cat([top.indices for top in tops], dim=1))
                write(values, rows, torch.cat([top.values for top in tops], dim=1))
        return indices, values

    def self_influence(self, X, y=None):
        """Weighted mean of the members' self-influences.

        Parameters
        ----------
        X : array-like, torch.Tensor, DataFrame or dict of them, of shape (n_samples, ...)
            Inputs.
        y : array-like or torch.Tensor of shape (n_samples, ...), default=None
            Targets; None uses the members' prediction measurement.

        Returns
        -------
        self_influence : ndarray, torch.Tensor or dask array of shape (n_samples,)
            A lazy dask array if ``X`` or ``y`` is one, a torch tensor if
            ``X`` is one, else a numpy array.
        """
        members = self._members()
        weights = self._weights(members)
        if is_dask(X) or is_dask(y):
            return _lazy_weighted_sum([member.self_influence(X, y) for member in members], weights)
        dtype, device = _result_dtype(members), _accumulation_device(members, returns_torch(X))
        total = None
        with _GatheredSolves(members) as calls:
            for index, (member, weight) in enumerate(zip(members, weights)):
                with calls(index):
                    value = _as_tensor(member.self_influence(X, y), dtype, device)
                total = value.mul_(float(weight)) if total is None else total.add_(value, alpha=float(weight))
        return total if returns_torch(X) else total.cpu().numpy()

    def score(self, X, y):
        """Weighted mean of the members' scores (higher is better).

        Each member's :meth:`BaseInfluence.score` checks its inverse against
        the held-out curvature; the ensemble's score is their weighted mean,
        so that ``GridSearchCV``'s default scoring tunes the members' shared
        or individual settings.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, ...)
            Held-out inputs.
        y : array-like or torch.Tensor of shape (n_samples, ...)
            Held-out targets. Required.

        Returns
        -------
        score : float
            The weighted mean of the members' scores.
        """
        members = self._members()
        weights = self._weights(members)
        return float(sum(float(weight) * member.score(X, y) for member, weight in zip(members, weights)))

    # ---------------------------------------------------------------- plumbing
    def _n_train(self, X):
        """Number of training points a result has columns for."""
        return self._members()[0].n_samples_fit_ if X is None else _n_samples(X)

    @staticmethod
    def _is_lazy(members, X_test, y_test, X, y):
        return any(member._is_lazy(X_test, y_test, X, y) for member in members)

    def _weighted_mean(self, method, X_test, y_test, X, y, out, max_result_bytes, row_shape, codes, member_kwargs):
        """The weighted mean of ``member.method(...)``, streamed over chunks (see :class:`_Chunks`).

        ``row_shape``: the shape of a row of the result where it is known
        before any work (it is then refused or allocated first), else None;
        ``codes``: each training point's group, an index into the sorted
        group labels, or None.
        """
        members = self._members()
        weights = self._weights(members)
        if self._is_lazy(members, X_test, y_test, X, y):
            result = _lazy_weighted_sum([getattr(member, method)(X_test, y_test, X, y, **member_kwargs)
                                         for member in members], weights)
            return result if out is None else store(result, out)
        n_test = _n_samples(X_test)
        if not n_test:  # the members' error for empty data
            return getattr(members[0], method)(X_test, y_test, X, y, **member_kwargs)
        like_torch, dtype = returns_torch(X_test), _result_dtype(members)
        device = _accumulation_device(members, like_torch)
        result = None
        if row_shape is not None:  # refused before any work, when the shape is known
            result = allocate((n_test, *row_shape), dtype, like_torch, device, out, max_result_bytes, what=method)
        # Columns of the result, and values per column per test point (1, or the input's for mode="perturbation");
        # unknown: at most one column per training point.
        n_columns = row_shape[0] if row_shape is not None else self._n_train(X)
        depth = int(np.prod(row_shape[1:], dtype=np.int64)) if row_shape is not None else 1
        chunks = _Chunks(method, members, weights, X_test, y_test, X, y, codes,
                         {"max_result_bytes": None, **member_kwargs}, dtype, device)
        with _GatheredSolves(members) as calls:
            for index, block in chunks.blocks(calls, n_columns, depth):
                if result is None:
                    result = allocate((n_test, *block.shape[1:]), dtype, like_torch, device, out,
                                      max_result_bytes, what=method)
                write(result, index, block)
        return result


# ---------------------------------------------------------------------- helpers
def _check_members(estimators):
    if not isinstance(estimators, (list, tuple)):
        raise TypeError(f"estimators must be a list of skinfl influence estimators, got "
                        f"{type(estimators).__name__}.")
    if not estimators:
        raise ValueError("estimators is empty; pass at least one skinfl influence estimator "
                         "(one per model: InfluenceEnsemble([CgInfluence(model_1), CgInfluence(model_2)])).")
    wrong = [(index, type(member).__name__) for index, member in enumerate(estimators)
             if not isinstance(member, BaseInfluence)]
    if wrong:
        index, name = wrong[0]
        raise TypeError(f"The members of an InfluenceEnsemble are skinfl influence estimators (CgInfluence, "
                        f"DirectInfluence, ...); estimators[{index}] is a {name}.")


def _normalised_weights(weights, n_members):
    """``weights`` checked and divided by their sum (None: uniform)."""
    if weights is None:
        return np.full(n_members, 1.0 / n_members)
    try:
        values = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"weights must be numbers, one per member, got {weights!r}.") from error
    if values.shape != (n_members,):
        raise ValueError(f"weights has {values.size} entries (shape {values.shape}) for {n_members} members; "
                         "give one weight per member.")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"weights must be finite and non-negative, got {values.tolist()}.")
    total = values.sum()
    if total <= 0:
        raise ValueError("weights are all zero; at least one member needs a positive weight.")
    return values / total


def _fitted_clone(member, X, y):
    return clone(member).fit(X, y)


def _common_n_samples(members):
    """The members' ``n_samples_fit_``, which must agree."""
    sizes = [member.n_samples_fit_ for member in members]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"The members were fitted on different numbers of training points ({sizes}); an ensemble "
            "averages influences on the same training points: fit every member on the same data."
        )
    return sizes[0]


def _result_dtype(members):
    dtype = members[0]._dtype()
    for member in members[1:]:
        dtype = torch.promote_types(dtype, member._dtype())
    return dtype


def _n_samples(data):
    """Samples in ``data``: a dict's first value, an array's first axis."""
    if isinstance(data, Mapping):
        return _n_samples(next(iter(data.values())))
    shape = getattr(data, "shape", None)
    if shape is not None and len(shape):
        return int(shape[0])
    return len(data)


def _rows(data, rows):
    """Rows ``rows`` (a slice or an increasing integer array) of data: of each value of a dict, by position
    for pandas, as skinfl reads rows for any other array (zarr, h5py, tensors)."""
    if data is None:
        return None
    if isinstance(data, Mapping):
        return {key: _rows(value, rows) for key, value in data.items()}
    if hasattr(data, "iloc"):
        return data.iloc[rows]
    return rows_of(data, rows)


def _working_memory_bytes():
    """scikit-learn's ``working_memory``, in bytes: what one member's block of a chunk may take."""
    return int(get_config()["working_memory"] * 2**20)


def _chunks(n_rows, width, dtype):
    """Slices of rows whose blocks of ``width`` values per row fit in ``working_memory``."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    budget = _working_memory_bytes() // (max(1, width) * itemsize)
    return batch_slices(n_rows, max(1, budget))


def _accumulation_device(members, like_torch):
    """Where a result is added up: the first member's device for tensors, the host for numpy results."""
    return members[0].device_ if like_torch else torch.device("cpu")


def _as_tensor(value, dtype, device):
    """A member's fresh result as a tensor, without a copy where it has the dtype and device already (it is
    then changed in place: nothing else holds it)."""
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    return tensor.to(device=device, dtype=dtype)


class _Chunks:
    """The weighted mean of the members' results, one chunk at a time, each sized so that one member's block
    of it fits in scikit-learn's ``working_memory``; one member's block is held beside the sum.

    A chunk is a block of test points against every training point (or
    group), or, where each member call solves every training point it
    scores (RelatIF's self-influences, Newton steps), a block of training
    points (or of groups) against every test point: chunks of test points
    would repeat those solves for each chunk.

    Parameters
    ----------
    method : str
        The members' method (``"influences"``, ``"removal_effects"``).
    members, weights : list, ndarray
        The members and their normalised weights.
    X_test, y_test, X, y : array-like or None
        The arguments of the call; ``X=None`` takes each member's fitted data.
    codes : ndarray or None
        Each training point's group as an index into the sorted labels
        (``groups`` is then in ``kwargs``), or None.
    kwargs : dict
        The other arguments of the members' method.
    dtype, device : torch.dtype, torch.device
        Where and in which dtype the mean is added up.
    """

    def __init__(self, method, members, weights, X_test, y_test, X, y, codes, kwargs, dtype, device):
        self.method, self.members, self.weights = method, members, weights
        self.X_test, self.y_test, self.X, self.y = X_test, y_test, X, y
        self.codes, self.kwargs, self.dtype, self.device = codes, kwargs, dtype, device
        self.by_training_points = kwargs.get("normalize") == "relatif" or (
            method == "removal_effects" and kwargs.get("order") == "newton")
        if self.by_training_points and X is None and any(member._fit_data is None for member in members):
            self.by_training_points = False  # no fitted data to cut: the members' own error, at their first call

    def blocks(self, calls, n_columns, depth=1):
        """Yield ``(index, block)``: the mean over a chunk, and where it goes in the result (rows; or all
        rows and some columns)."""
        n_test = _n_samples(self.X_test)
        if not self.by_training_points:
            for rows in _chunks(n_test, n_columns * depth, self.dtype):
                x_rows, y_rows = _rows(self.X_test, rows), _rows(self.y_test, rows)
                yield rows, self._mean(calls, functools.partial(self._call, X_test=x_rows, y_test=y_rows, X=self.X,
                                                                y=self.y))
            return
        for columns in _chunks(n_columns, n_test * depth, self.dtype):
            yield (slice(None), columns), self._mean(calls, functools.partial(self._call_on_columns, columns=columns))

    def _call(self, member, X_test, y_test, X, y, **extra):
        return getattr(member, self.method)(X_test, y_test, X, y, **{**self.kwargs, **extra})

    def _call_on_columns(self, member, columns):
        """The member's result for every test point against the training points (or groups) ``columns``."""
        extra = {}
        if self.codes is None:
            rows = columns
        else:  # the groups of these columns: their codes, whose sorted labels are the columns' positions
            rows = np.flatnonzero((self.codes >= columns.start) & (self.codes < columns.stop))
            extra["groups"] = self.codes[rows]
        if self.X is not None:
            X, y = _rows(self.X, rows), _rows(self.y, rows)
        else:
            X, y = _fitted_rows(member, rows)
        return self._call(member, self.X_test, self.y_test, X, y, **extra)

    def _mean(self, calls, call):
        total = None
        for index, (member, weight) in enumerate(zip(self.members, self.weights)):
            with calls(index):
                block = _as_tensor(call(member), self.dtype, self.device)
            total = block.mul_(float(weight)) if total is None else total.add_(block, alpha=float(weight))
            del block
        return total


def _fitted_rows(member, rows):
    """Rows ``rows`` of the data ``member`` was fitted on, as ``influences`` takes training points: a frame
    with the fitted column names where it was fitted on one (else scikit-learn's name check warns)."""
    X, y = member._fit_data.arrays()
    X, y = _rows(X, rows), _rows(y, rows)
    names = getattr(member, "feature_names_in_", None)
    if names is not None:
        import pandas as pd  # fitted on a DataFrame: pandas is there

        X = pd.DataFrame(np.asarray(X), columns=names)
    return X, y


class _GatheredSolves:
    """Gather each member's solve reports over every chunk of one call, then summarise them and warn once
    per member (instead of once per chunk).

    ``with _GatheredSolves(members) as calls:``, then ``with calls(index):``
    around each call of member ``index``. A class, not a generator: its
    warnings then point at the user's line (see :mod:`skinfl._warnings`).
    """

    def __init__(self, members):
        self._members = members
        self._reports = [[] for _ in members]

    def __enter__(self):
        return self._calls

    @contextlib.contextmanager
    def _calls(self, index):
        token = _SOLVE_REPORTS.set(self._reports[index])
        try:
            yield
        finally:
            _SOLVE_REPORTS.reset(token)

    def __exit__(self, *exc_info):
        if exc_info[0] is None:
            for member, reports in zip(self._members, self._reports):
                if reports:
                    member._finish_solves(reports)
        return False


def _lazy_weighted_sum(values, weights):
    """``sum_m weights[m] * values[m]`` of dask arrays, lazily."""
    total = None
    for value, weight in zip(values, weights):
        term = value * float(weight)
        total = term if total is None else total + term
    return total


def _lazy_top(mean, k, orders):
    """``(indices, values)`` of the top ``k`` per row and order of the lazy matrix ``mean``."""
    _, da = import_dask()
    n_train = mean.shape[1]
    if not isinstance(k, Integral) or not 1 <= k <= n_train:
        raise ValueError(f"k must be an integer from 1 to the {n_train} training points, got {k!r}.")
    k = int(k)
    indices = [da.argtopk(mean, k if largest else -k, axis=1).astype(np.int64) for largest in orders]
    values = [da.topk(mean, k if largest else -k, axis=1) for largest in orders]
    return da.concatenate(indices, axis=1), da.concatenate(values, axis=1)
