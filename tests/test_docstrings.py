"""Public docstrings follow numpydoc (scikit-learn's validation rules)."""

import inspect

import pytest

numpydoc_validate = pytest.importorskip("numpydoc.validate")

from skinfl import exceptions, metrics, registered_estimators, retraining  # noqa: E402

# Rules scikit-learn also leaves out: see-also/examples everywhere, summaries on one line, ...
IGNORED = {"GL01", "GL02", "SA01", "EX01", "ES01", "RT02", "PR02", "SS05", "GL08", "YD01"}


def public_callables():
    for name, cls in registered_estimators().items():
        yield f"skinfl.{name}", cls
        for method in ("fit", "transform", "influences", "self_influence", "score"):
            yield f"skinfl.{name}.{method}", getattr(cls, method)
    for module in (metrics, retraining):
        for name in module.__all__:
            obj = getattr(module, name)
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for method in ("__call__", "ground_truth", "reference_influences", "regularization_for"):
                    if method in vars(obj):
                        yield f"{module.__name__}.{name}.{method}", getattr(obj, method)
    for name in exceptions.__all__:
        obj = getattr(exceptions, name)
        if obj.__module__.startswith("skinfl"):
            yield f"skinfl.exceptions.{name}", obj


@pytest.mark.parametrize("qualname, obj", list(public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_docstring(qualname, obj):
    result = numpydoc_validate.validate(qualname)
    errors = [(code, message) for code, message in result["errors"] if code not in IGNORED]
    assert not errors, f"{qualname}: {errors}"


def test_estimators_document_every_parameter():
    for cls in registered_estimators().values():
        documented = inspect.getdoc(cls)
        for parameter in inspect.signature(cls).parameters:
            assert f"{parameter} :" in documented, f"{cls.__name__} does not document {parameter}"
