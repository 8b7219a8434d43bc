"""Renamed parameters and fitted attributes, deprecated the way scikit-learn deprecates them.

A renamed parameter keeps its old name in ``__init__``, stored unchanged,
with the default ``"deprecated"``. ``fit`` resolves each pair with
:func:`resolve_renamed_parameters`: when the old name was set it warns
(``FutureWarning``) and its value is used, and when both were set to
different values it raises. The solvers read the value in use through
``BaseInfluence._parameter(name)``, never the old attribute. A renamed
fitted attribute keeps a read-only property under its old name that warns
(:func:`renamed_attribute`).
"""

from __future__ import annotations

import inspect

from ._warnings import warn

# The default of a renamed parameter's old name: "not given".
DEPRECATED = "deprecated"
RENAMED_IN = "0.2"
REMOVED_IN = "0.4"


def _is_unset(value):
    return isinstance(value, str) and value == DEPRECATED


def resolve_renamed_parameters(estimator):
    """``{new name: value in use}`` for each of ``estimator._renamed_parameters`` (``{old: new}``).

    The old parameter's value when it was set, with a ``FutureWarning``;
    a ``ValueError`` when the new one was set to another value too.
    """
    renamed = type(estimator)._renamed_parameters
    if not renamed:
        return {}
    defaults = {name: parameter.default
                for name, parameter in inspect.signature(type(estimator).__init__).parameters.items()}
    values = {}
    for old, new in renamed.items():
        old_value, new_value = getattr(estimator, old), getattr(estimator, new)
        if _is_unset(old_value):
            values[new] = new_value
            continue
        if new_value != defaults[new] and new_value != old_value:
            raise ValueError(
                f"{type(estimator).__name__} got {old}={old_value!r} and {new}={new_value!r}: `{old}` was "
                f"renamed `{new}` in skinfl {RENAMED_IN}; pass {new} only."
            )
        warn(
            f"`{old}` was renamed `{new}` in skinfl {RENAMED_IN} and will be removed in {REMOVED_IN}; "
            f"use {new}={old_value!r}.",
            FutureWarning,
        )
        values[new] = old_value
    return values


def renamed_params(cls, params):
    """``params`` (a dict of constructor arguments, as saved) with old names moved to the new ones, silently.

    For files written before a rename, or with the old name set: what they
    say is kept, under its new name.
    """
    params = dict(params)
    for old, new in cls._renamed_parameters.items():
        value = params.pop(old, DEPRECATED)
        if not _is_unset(value):
            params[new] = value
    return params


def renamed_attribute(old, new):
    """A read-only property ``old`` that returns the fitted attribute ``new`` with a ``FutureWarning``."""

    def getter(self):
        value = getattr(self, new)
        warn(
            f"`{old}` was renamed `{new}` in skinfl {RENAMED_IN} and will be removed in {REMOVED_IN}; "
            f"use {new}.",
            FutureWarning,
        )
        return value

    getter.__doc__ = (
        f"Deprecated: the fitted attribute ``{new}``.\n\n"
        f".. deprecated:: {RENAMED_IN}\n"
        f"   ``{old}`` was renamed ``{new}`` and will be removed in {REMOVED_IN}.\n"
    )
    return property(getter)
