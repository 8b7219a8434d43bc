"""Progress bars: every long step shows one with progress=True, none shows without."""

import pytest
import torch
from conftest import registry_estimator

import skinfl

NAMES = list(skinfl.registered_estimators())

# What the bars of fit + influences say, per estimator, beyond the gradient passes every one shows.
EXPECTED = {
    "DirectInfluence": ["curvature matrix", "Cholesky factorization"],
    "CgInfluence": ["CG, ", "worst residual"],
    "ArnoldiInfluence": ["factors (curvature products)"],
    "NystroemInfluence": ["factors (curvature products)"],
    "LissaInfluence": ["factors (curvature products)", "LiSSA, ", "largest change"],
    "DataInfInfluence": ["gradient norms"],
    "EkfacInfluence": ["EK-FAC statistics"],
}


def test_every_registered_estimator_has_expectations():
    assert set(EXPECTED) == set(NAMES)


def _run(name, classification_problem, progress, **params):
    model, X, y = classification_problem
    est = registry_estimator(name, model, progress=progress, **params).fit(X, y)
    est.influences(X[:3], y[:3])
    return est


@pytest.mark.parametrize("name", NAMES)
def test_long_steps_show_bars(name, classification_problem, capsys):
    # Loose tolerances: the bars, not the accuracy, are under test.
    params = {"rank": 10} if name in ("ArnoldiInfluence", "NystroemInfluence") else {}
    if name == "LissaInfluence":
        params.update(rtol=1e-3, max_iter=2000, minibatch_size=None)
    if name == "CgInfluence":
        params.update(rtol=1e-6, preconditioner=None)  # an exact preconditioner converges at once
    if name == "DataInfInfluence":
        params.update(relative_regularization=True)  # fit's pass over the data for gradient norms
    _run(name, classification_problem, True, **params)
    shown = capsys.readouterr().err
    assert "influences" in shown  # the gradient passes of every estimator
    for text in EXPECTED[name]:
        assert text in shown, f"{name}: no bar says {text!r}; shown:\n{shown[-2000:]}"


@pytest.mark.parametrize("name", NAMES)
def test_bars_are_quiet_without_progress(name, classification_problem, capsys):
    params = {"rank": 10} if name in ("ArnoldiInfluence", "NystroemInfluence") else {}
    if name == "LissaInfluence":
        params.update(rtol=1e-3, max_iter=2000, minibatch_size=None)
    _run(name, classification_problem, False, **params)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_eigendecomposition_bar(classification_problem, capsys):
    model, X, y = classification_problem
    skinfl.DirectInfluence(model, solver="eigh", progress=True).fit(X, y)
    assert "eigendecomposition" in capsys.readouterr().err


class CountingBar:
    enabled = True

    def __init__(self):
        self.count, self.notes = 0, []

    def update(self, n=1):
        self.count += n

    def note(self, text):
        self.notes.append(text)


def test_reporting_curvature_counts_every_product_vector(classification_problem):
    model, X, y = classification_problem
    est = skinfl.DirectInfluence(model, regularization=0.1).fit(X, y)
    bar = CountingBar()
    reporting = est._reporting_curvature(bar)
    vectors = torch.randn(7, est.n_params_, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reporting.matmat(vectors), est._curvature().matmat(vectors), rtol=0, atol=0)
    assert bar.count == 7 and reporting.n_params == est.n_params_
    gauss_newton = reporting.with_second_order("gauss_newton")
    gauss_newton.matmat(vectors[:2])
    assert bar.count == 9 and gauss_newton.second_order == "gauss_newton"


def test_solvers_step_their_bars_once_per_iteration(classification_problem):
    from skinfl._linalg.block_cg import block_conjugate_gradient
    from skinfl._linalg.cg import batched_conjugate_gradient

    model, X, y = classification_problem
    est = skinfl.DirectInfluence(model, regularization=0.01).fit(X, y)
    curvature = est._curvature()
    rhs = torch.randn(4, est.n_params_, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for solve in (batched_conjugate_gradient, block_conjugate_gradient):
        bar = CountingBar()
        _, report = solve(lambda v: curvature.matmat(v) + 0.01 * v, rhs, rtol=1e-8, atol=0.0, max_iter=500,
                          progress=bar)
        assert bar.count == report.n_iter > 1
        assert bar.notes and all(note.startswith("worst residual") for note in bar.notes)
