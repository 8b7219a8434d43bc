"""Names deprecated in skinfl 0.2: each still works, warns with a FutureWarning, and is read from old files.

The only place in the test suite that uses the old names.
"""

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone

import skinfl
from skinfl import ArnoldiInfluence, CgInfluence, DataInfInfluence, load, registered_estimators, save
from skinfl._tensorfile import TensorFile, write

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (estimator, old parameter, new parameter, a value, old fitted attribute, new fitted attribute)
RENAMED = [
    pytest.param(CgInfluence, "method", "solver", "independent", "method_", "solver_",
                 id="CgInfluence-method"),
    pytest.param(ArnoldiInfluence, "eigen_solver", "solver", "arpack", "eigen_solver_", "solver_",
                 id="ArnoldiInfluence-eigen_solver"),
]
SETTINGS = {CgInfluence: dict(regularization=0.1, random_state=0),
            ArnoldiInfluence: dict(regularization=0.1, rank=8, tol=1e-10, random_state=0)}


def test_version():
    assert skinfl.__version__ == "0.2.0.dev0"


@pytest.mark.parametrize("cls, old, new, value, old_attribute, new_attribute", RENAMED)
def test_renamed_parameter_warns_and_is_used(classification_problem, cls, old, new, value, old_attribute,
                                             new_attribute):
    model, X, y = classification_problem
    est = cls(model, **{old: value}, **SETTINGS[cls])
    assert est.get_params()[old] == value and est.get_params()[new] == "auto"  # stored unchanged
    assert clone(est).get_params()[old] == value
    message = f"`{old}` was renamed `{new}` in skinfl 0.2 and will be removed in 0.4; use {new}='{value}'"
    with pytest.warns(FutureWarning, match=message):
        est.fit(X, y)
    assert getattr(est, new_attribute) == value and getattr(est, new) == "auto"
    with pytest.warns(FutureWarning, match=f"`{old_attribute}` was renamed `{new_attribute}`"):
        assert getattr(est, old_attribute) == value
    reference = cls(model, **{new: value}, **SETTINGS[cls])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new name does not warn
        reference.fit(X, y)
    torch.testing.assert_close(est.transform(X[:4], y[:4]), reference.transform(X[:4], y[:4]), rtol=0, atol=0)


@pytest.mark.parametrize("cls, old, new, value, old_attribute, new_attribute", RENAMED)
def test_renamed_parameter_conflicting_with_the_new_one_is_an_error(classification_problem, cls, old, new,
                                                                    value, old_attribute, new_attribute):
    model, X, y = classification_problem
    other = {"independent": "block", "arpack": "lanczos"}[value]
    with pytest.raises(ValueError, match=f"got {old}='{value}' and {new}='{other}'.*pass {new} only"):
        cls(model, **{old: value, new: other}, **SETTINGS[cls]).fit(X, y)
    with pytest.warns(FutureWarning):  # the same value twice: no conflict
        cls(model, **{old: value, new: value}, **SETTINGS[cls]).fit(X, y)


@pytest.mark.parametrize("cls, old, new, value, old_attribute, new_attribute", RENAMED)
def test_files_with_the_old_parameter_name_load(classification_problem, tmp_path, cls, old, new, value,
                                                old_attribute, new_attribute):
    """A file written before the rename (the old name in its parameters, no new one) loads silently."""
    model, X, y = classification_problem
    est = cls(model, **{new: value}, **SETTINGS[cls]).fit(X, y)
    path = save(est, tmp_path / "new.skinfl")
    params = {key: item for key, item in TensorFile(path).metadata["params"].items() if key not in (old, new)}
    older = rewritten(path, tmp_path / "old.skinfl", params={**params, old: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        loaded = load(older, model)
    assert loaded.get_params()[new] == value and loaded.get_params()[old] == "deprecated"
    assert getattr(loaded, new_attribute) == value
    torch.testing.assert_close(loaded.transform(X[:3], y[:3]), est.transform(X[:3], y[:3]))


def rewritten(path, target, **changes):
    """The skinfl file ``path`` written again to ``target`` with some of its metadata changed."""
    file = TensorFile(path)
    write(target, {name: file.tensor(name) for name in file.names()}, {**file.metadata, **changes})
    return target


# ------------------------------------------------------------------ DataInf
def test_inverse_harmonic_mean_influence_is_a_deprecated_alias_of_datainf(classification_problem):
    model, X, y = classification_problem
    message = "InverseHarmonicMeanInfluence was renamed DataInfInfluence in skinfl 0.2 and will be removed in"
    with pytest.warns(FutureWarning, match=message):
        old = skinfl.InverseHarmonicMeanInfluence(model, regularization=0.3)
    assert isinstance(old, DataInfInfluence)
    assert old.get_params() == DataInfInfluence(model, regularization=0.3).get_params()
    assert list(registered_estimators()).count("DataInfInfluence") == 1
    assert "InverseHarmonicMeanInfluence" not in registered_estimators()
    assert "InverseHarmonicMeanInfluence" not in skinfl.__all__
    new = DataInfInfluence(model, regularization=0.3).fit(X, y)
    np.testing.assert_array_equal(old.fit(X, y).influences(X[:3], y[:3]), new.influences(X[:3], y[:3]))


def test_files_saved_under_the_old_class_name_load(classification_problem, tmp_path):
    model, X, y = classification_problem
    with pytest.warns(FutureWarning):
        old = skinfl.InverseHarmonicMeanInfluence(model, regularization=0.3)
    path = save(old.fit(X, y), tmp_path / "alias.skinfl")
    assert TensorFile(path).metadata["estimator"] == "DataInfInfluence"  # saved under its registered name
    older = rewritten(path, tmp_path / "old.skinfl", estimator="InverseHarmonicMeanInfluence")
    for file in (path, older):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            loaded = load(file, model)
        assert type(loaded) is DataInfInfluence
        torch.testing.assert_close(loaded.influences(X[:3], y[:3]), old.influences(X[:3], y[:3]))
