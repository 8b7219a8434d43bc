"""Output cotangents of the Gauss-Newton matrix: drawn targets and exact roots, for every built-in loss.

EK-FAC's factors and the Jacobi preconditioner's diagonal take gradients of
output cotangents ``u`` with ``E[u u^T] = H_i``, the Hessian of a sample's
loss in its output. Each loss option that weights a sample's curvature
(class weights, label smoothing, an ignored class, ``pos_weight``, element
weights, soft labels) is checked: drawn cotangents average to ``H_i``, the
exact roots are a square root of it, and the estimators built on them agree
with the explicit Gauss-Newton matrix.
"""

import pytest
import torch
from torch import nn
from torch.func import hessian, vmap

from skinfl import CgInfluence, DirectInfluence, EkfacInfluence
from skinfl._cotangents import output_hessian_roots, resolve_target_draws, sampled_cotangents
from skinfl._model import LossSpec

DOUBLE = torch.float64
N_OUTPUTS = 4
CLASS_WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DOUBLE)


def class_targets(n, generator, n_classes=N_OUTPUTS):
    return torch.randint(0, n_classes, (n,), generator=generator)


def binary_targets(n, generator):
    return torch.randint(0, 2, (n, N_OUTPUTS), generator=generator).to(DOUBLE)


def soft_targets(n, generator):
    return torch.rand(n, N_OUTPUTS, generator=generator, dtype=DOUBLE)


def real_targets(n, generator):
    return torch.randn(n, N_OUTPUTS, generator=generator, dtype=DOUBLE)


# (loss, target maker): every option of the built-in losses that changes a sample's curvature.
LOSSES = {
    "cross_entropy": ("cross_entropy", class_targets),
    "ce_class_weights": (nn.CrossEntropyLoss(weight=CLASS_WEIGHTS), class_targets),
    "ce_label_smoothing": (nn.CrossEntropyLoss(label_smoothing=0.3), class_targets),
    "ce_weights_smoothing_ignore_index": (
        nn.CrossEntropyLoss(weight=CLASS_WEIGHTS, label_smoothing=0.2, ignore_index=1), class_targets),
    "bce_pos_weight": (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.2, 1.0, 4.0, 9.0], dtype=DOUBLE)),
                       binary_targets),
    "bce_weight_soft_labels": (nn.BCEWithLogitsLoss(weight=torch.tensor([0.3, 1.0, 2.0, 5.0], dtype=DOUBLE),
                                                    pos_weight=torch.tensor(3.0, dtype=DOUBLE)), soft_targets),
    "mse": ("mse", real_targets),
}


def loss_case(name, n, seed=0):
    loss, make_targets = LOSSES[name]
    generator = torch.Generator().manual_seed(seed)
    output = torch.randn(n, N_OUTPUTS, generator=generator, dtype=DOUBLE)
    target = make_targets(n, generator)
    return LossSpec.resolve(loss).fitted([target]), output, target


def output_hessians(spec, output, target):
    """``H_i`` of every sample, from torch.func.hessian of its own loss."""

    def sample_loss(out_i, target_i):
        return spec.per_sample(out_i.unsqueeze(0), target_i.unsqueeze(0))[0]

    return vmap(hessian(sample_loss))(output, target)


@pytest.mark.parametrize("name", LOSSES)
def test_drawn_cotangents_average_to_the_output_hessian(name):
    spec, output, target = loss_case(name, n=5)
    expected = output_hessians(spec, output, target)
    draws = 20_000  # all at once: each sample repeated, one draw per copy
    u = sampled_cotangents(spec, output.repeat(draws, 1), target.repeat(draws, *[1] * (target.ndim - 1)),
                           torch.Generator().manual_seed(1))
    mean = (u.unsqueeze(2) * u.unsqueeze(1)).reshape(draws, *expected.shape).mean(dim=0)
    # Monte Carlo error about 1 / sqrt(draws) = 0.007 of the entries' scale.
    scale = expected.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    assert float(((mean - expected) / scale).abs().max()) < 0.05


@pytest.mark.parametrize("name", LOSSES)
def test_exact_roots_are_square_roots_of_the_output_hessian(name):
    spec, output, target = loss_case(name, n=6)
    roots = output_hessian_roots(spec, output, target)
    torch.testing.assert_close(roots @ roots.transpose(1, 2), output_hessians(spec, output, target), rtol=1e-10,
                               atol=1e-13)


@pytest.mark.parametrize("takes_probabilities", [False, True], ids=["log_probabilities", "probabilities"])
def test_nll_roots_in_closed_form_and_drawing_refused(takes_probabilities):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, N_OUTPUTS, generator=generator, dtype=DOUBLE)
    output = torch.softmax(logits, 1) if takes_probabilities else torch.log_softmax(logits, 1)
    target = class_targets(6, generator)
    spec = LossSpec("nll", nn.NLLLoss(weight=CLASS_WEIGHTS, ignore_index=2),
                    takes_probabilities=takes_probabilities).fitted([target])
    roots = output_hessian_roots(spec, output, target)
    assert roots.shape == (6, N_OUTPUTS, 1)  # rank one at most: one cotangent per sample
    torch.testing.assert_close(roots @ roots.transpose(1, 2), output_hessians(spec, output, target), rtol=1e-10,
                               atol=1e-13)
    assert resolve_target_draws("auto", (1000,), spec) is None  # exact whatever the number of classes
    with pytest.raises(ValueError, match="NLLLoss.*n_target_draws=None"):
        sampled_cotangents(spec, output, target, generator)


# ---------------------------------------------------------------- the estimators
def model_and_data(name, n, n_outputs=N_OUTPUTS, seed=0):
    loss, make_targets = LOSSES[name]
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=generator, dtype=DOUBLE)
    y = make_targets(n, generator, n_outputs) if make_targets is class_targets else make_targets(n, generator)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, n_outputs)).to(DOUBLE)
    return model, loss, X, y


def kronecker_blocks(est):
    """Each Kronecker block as the matrix ``(Q_G (x) Q_A) diag(eigenvalues) (Q_G (x) Q_A)^T``."""
    blocks = []
    for index, plan in enumerate(est._plans):
        Q = torch.kron(est._factors[f"{index}.gradient_eigenvectors"], est._factors[f"{index}.activation_eigenvectors"])
        blocks.append(Q @ torch.diag(est._factors[f"{index}.eigenvalues"].reshape(-1)) @ Q.T)
    return blocks


@pytest.mark.parametrize("name", LOSSES)
def test_drawn_targets_give_the_exact_expectation_for_weighted_losses(name):
    """K-FAC from many drawn targets per point approaches K-FAC from the exact expectation, whatever weights
    the loss puts on a point's curvature (drawn targets used to take the weight of the drawn class)."""
    model, loss, X, y = model_and_data(name, n=30)
    exact = EkfacInfluence(model, loss=loss, regularization=0.1, n_target_draws=None,
                           correct_eigenvalues=False).fit(X, y)
    drawn = EkfacInfluence(model, loss=loss, regularization=0.1, n_target_draws=400, random_state=0,
                           correct_eigenvalues=False).fit(X, y)
    for expected, actual in zip(kronecker_blocks(exact), kronecker_blocks(drawn)):
        assert float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected)) < 0.1


@pytest.mark.parametrize("name", LOSSES)
def test_exact_expectation_gives_the_gauss_newton_diagonal_blocks(name):
    # The diagonal blocks (here a LayerNorm's) are the exact Gauss-Newton diagonal, for every loss option.
    model, loss, X, y = model_and_data(name, n=12)
    model.append(nn.LayerNorm(N_OUTPUTS).to(DOUBLE))
    est = EkfacInfluence(model, loss=loss, regularization=0.1, n_target_draws=None).fit(X, y)
    curvature = DirectInfluence(model, loss=loss, second_order="gauss_newton").fit(X, y)._factors["curvature"]
    span = est._plans[-1].block.span
    torch.testing.assert_close(est._factors["diagonal"], torch.diagonal(curvature)[span], rtol=1e-9, atol=1e-12)


def jacobi_and_exact_diagonals(loss, n_outputs, n):
    model, _, X, y = model_and_data("cross_entropy", n=n, n_outputs=n_outputs)
    jacobi = CgInfluence(model, loss=loss, preconditioner="jacobi", random_state=0).fit(X, y)._factors["diagonal"]
    curvature = DirectInfluence(model, loss=loss, second_order="gauss_newton").fit(X, y)._factors["curvature"]
    return jacobi, torch.diagonal(curvature)


@pytest.mark.parametrize("n_outputs", [N_OUTPUTS, 20])
def test_jacobi_diagonal_is_the_gauss_newton_diagonal(n_outputs):
    weights = torch.linspace(0.2, 3.0, n_outputs, dtype=DOUBLE)
    loss = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.2, ignore_index=1)
    jacobi, expected = jacobi_and_exact_diagonals(loss, n_outputs, n=16)
    if n_outputs <= 16:  # exact, from the roots of the output Hessians
        torch.testing.assert_close(jacobi, expected, rtol=1e-9, atol=1e-12)
    else:  # at least 1,024 drawn targets in all, whose noise is a few percent
        assert float(torch.linalg.norm(jacobi - expected) / torch.linalg.norm(expected)) < 0.15


def test_nll_root_at_a_zero_probability_is_the_finite_curvature_of_log_p_plus_eps():
    # NLLLoss on probabilities is -log(p + eps): at p = 0 (a softmax that underflowed) its curvature is
    # w / eps**2, large but finite, and so is its root; never an infinite cotangent.
    logits = torch.tensor([[0.0, 1.0, -800.0, 2.0], [1.0, 0.0, 0.0, 0.0]], dtype=DOUBLE)
    output = torch.softmax(logits, 1)
    target = torch.tensor([2, 0])
    assert output[0, 2] == 0
    spec = LossSpec("nll", nn.NLLLoss(weight=CLASS_WEIGHTS), takes_probabilities=True).fitted([target])
    roots = output_hessian_roots(spec, output, target)
    assert torch.isfinite(roots).all()
    expected = output_hessians(spec, output, target)
    eps = torch.finfo(DOUBLE).eps
    torch.testing.assert_close(expected[0, 2, 2], CLASS_WEIGHTS[2] / spec.normalizer / eps**2, rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(roots @ roots.transpose(1, 2), expected, rtol=1e-10, atol=1e-13)
