"""What iterative solves did, reported once per public call.

A public method (``transform``, ``influences``, ...) may solve in many
chunks; each chunk's solver hands its reports (objects with ``n_iter``) to
:meth:`SolveReporting._report_solves`. The method, wrapped by
:func:`reporting_solves`, then summarises them (``n_iter_``, ...) and warns
once about all of them at its end, instead of once per chunk.

The summary lives in the dict ``_last_solve``, which ``fit`` creates (with
the fit's own iterations, :meth:`SolveReporting._record_fit_iterations`) and
solves update in place: a diagnostic, not fitted state, so that
``transform`` leaves ``__dict__`` as ``fit`` made it (scikit-learn checks
that it does).

Calls may run in several threads at once (see :mod:`skinfl._threads`): the
reports gathered are those of the calling thread's call (a context variable
is per thread), and each call's summary replaces the previous one whole,
under a lock, so that ``n_iter_`` and the like are those of the last call to
finish, never a mix of two.
"""

from __future__ import annotations

import contextvars
import functools
import threading

from sklearn.utils.validation import check_is_fitted

from ._warnings import warn

# Reports of the solves made during one public call, gathered so that the
# call warns once about all of them (see reporting_solves).
_SOLVE_REPORTS = contextvars.ContextVar("skinfl_solve_reports", default=None)
# Held while a summary is written or read (see the module's docstring).
_SUMMARY_LOCK = threading.Lock()


def reporting_solves(method):
    """Run a public method gathering the reports of its solves, then summarise them and warn once.

    Solvers hand their reports to :meth:`SolveReporting._report_solves`; the
    summary (``n_iter_``, ...) and the warning cover the whole call.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if _SOLVE_REPORTS.get() is not None:  # a public method called by another: the outer one reports
            return method(self, *args, **kwargs)
        reports = []
        token = _SOLVE_REPORTS.set(reports)
        try:
            result = method(self, *args, **kwargs)
        finally:
            _SOLVE_REPORTS.reset(token)
        if reports:
            self._finish_solves(reports)
        return result

    return wrapper


class SolveReporting:
    """The estimator's side of solve reporting: hand reports over, summarise them, read the summary."""

    def _solve_warning(self, reports):
        """``(message, category)`` about the solves of one call, or None (iterative solvers)."""
        return None

    def _record_fit_iterations(self, n_iter):
        """Start the summary at ``fit``: ``n_iter_`` is the fit's own iterations until a call solves."""
        self._last_solve = {"n_iter": int(n_iter)}

    def _report_solves(self, reports):
        """Hand the reports of solves (objects with ``n_iter``) to the public call running them.

        That call summarises them and warns once at its end (see
        :func:`reporting_solves`); outside a public call, that happens now.
        """
        pending = _SOLVE_REPORTS.get()
        if pending is None:
            self._finish_solves(reports)
        else:
            pending.extend(reports)

    def _finish_solves(self, reports):
        self._summarize_solves(reports)
        message = self._solve_warning(reports)
        if message is not None:
            warn(*message)

    def _solve_summary(self, reports):
        """What :meth:`_summarize_solves` keeps of ``reports``, by name: ``n_iter`` (solvers add to it)."""
        return {"n_iter": max(report.n_iter for report in reports)}

    def _summarize_solves(self, reports):
        """Keep what the solves of the last call did, read by ``n_iter_`` and the like.

        In the dict ``_last_solve``, replaced in place and whole (see the module's docstring).
        """
        summary = self._solve_summary(reports)
        with _SUMMARY_LOCK:
            kept = self.__dict__.setdefault("_last_solve", {})
            kept.clear()
            kept.update(summary)

    def _last_solve_value(self, name):
        """A value kept by :meth:`_summarize_solves` (or by ``fit``); AttributeError before either."""
        check_is_fitted(self)
        with _SUMMARY_LOCK:
            summary = dict(self.__dict__.get("_last_solve", {}))
        if name not in summary:
            raise AttributeError(
                f"{type(self).__name__}.{name}_ is set by the calls that solve systems (transform, influences, "
                "self_influence, top_influences, score); none has run since fit."
            )
        return summary[name]
