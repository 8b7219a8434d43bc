"""EkfacInfluence against explicit matrices: Kronecker factors, corrected eigenvalues, diagonal blocks."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from registry import ekfac_inverse, reference_gradients

from skinfl import CgInfluence, DirectInfluence, EkfacInfluence
from skinfl.exceptions import NotPositiveDefiniteWarning

DOUBLE = torch.float64


def gauss_newton(model, X, y, loss="cross_entropy"):
    """The explicit Gauss-Newton matrix of the mean training loss (DirectInfluence's factor)."""
    est = DirectInfluence(model, loss=loss, regularization=1.0, second_order="gauss_newton").fit(X, y)
    return est._factors["curvature"]


def kronecker_basis_vectors(est, index, plan):
    """The Kronecker eigenvectors of block ``index`` as columns in the flat layout of that block, (size, size)."""
    activation_vectors = est._factors[f"{index}.activation_eigenvectors"]
    gradient_vectors = est._factors[f"{index}.gradient_eigenvectors"]
    n_out, n_in = len(gradient_vectors), len(activation_vectors)
    columns = []
    for a in range(n_out):
        for b in range(n_in):
            matrix = torch.outer(gradient_vectors[:, a], activation_vectors[:, b])
            pieces = [matrix[:, :n_in - 1].reshape(-1), matrix[:, -1]] if plan.has_bias else [matrix.reshape(-1)]
            columns.append(torch.cat(pieces))
    return torch.stack(columns, dim=1)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DOUBLE)


def classification_data(n=40, shape=(4,), n_classes=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=generator, dtype=DOUBLE), torch.randint(0, n_classes, (n,),
                                                                                     generator=generator)


@pytest.mark.parametrize("loss, n_outputs", [("mse", 1), ("cross_entropy", 3)])
def test_kfac_equals_gauss_newton_for_one_sample_of_a_linear_layer(loss, n_outputs):
    # One sample and one position: G (x) A is exactly E[g g^T (x) a a^T], the Gauss-Newton matrix.
    torch.manual_seed(0)
    layer = nn.Linear(4, n_outputs).to(DOUBLE)
    x = torch.randn(1, 4, dtype=DOUBLE)
    y = torch.randn(1, 1, dtype=DOUBLE) if loss == "mse" else torch.tensor([2])
    kfac = EkfacInfluence(layer, loss=loss, regularization=0.1, n_target_draws=None,
                          correct_eigenvalues=False).fit(x, y)
    exact = DirectInfluence(layer, loss=loss, regularization=0.1, second_order="gauss_newton").fit(x, y)
    X_test = torch.randn(6, 4, dtype=DOUBLE)
    y_test = torch.randn(6, 1, dtype=DOUBLE) if loss == "mse" else torch.randint(0, n_outputs, (6,))
    torch.testing.assert_close(kfac.transform(X_test, y_test), exact.transform(X_test, y_test), rtol=1e-10, atol=1e-12)


def test_corrected_eigenvalues_are_the_exact_diagonal_in_the_kronecker_basis():
    model = mlp()
    X, y = classification_data()
    est = EkfacInfluence(model, regularization=0.1, n_target_draws=None).fit(X, y)
    curvature = gauss_newton(model, X, y)
    for index, plan in enumerate(est._plans):
        span = plan.block.span
        basis = kronecker_basis_vectors(est, index, plan)
        block = curvature[span, span]
        expected = torch.einsum("pi,pq,qi->i", basis, block, basis)
        torch.testing.assert_close(est._factors[f"{index}.eigenvalues"].reshape(-1), expected, rtol=1e-9, atol=1e-12)
        # The basis is orthonormal, so the corrected block is the projection of the exact one.
        torch.testing.assert_close(basis.T @ basis, torch.eye(len(basis), dtype=DOUBLE), rtol=0, atol=1e-10)


def test_true_fisher_from_many_draws_approaches_the_gauss_newton_matrix():
    model = mlp()
    X, y = classification_data(n=30)
    exact = EkfacInfluence(model, regularization=0.1, n_target_draws=None, correct_eigenvalues=False).fit(X, y)

    def relative_errors(n_target_draws):
        sampled = EkfacInfluence(model, regularization=0.1, n_target_draws=n_target_draws, random_state=0,
                                 correct_eigenvalues=False).fit(X, y)
        # The bases differ by the sampling noise: compare the block matrices they represent.
        return [float(torch.linalg.norm(block_matrix(sampled, index, plan) - block_matrix(exact, index, plan))
                      / torch.linalg.norm(block_matrix(exact, index, plan)))
                for index, plan in enumerate(exact._plans)]

    few, many = relative_errors(4), relative_errors(400)
    assert max(many) < 0.1
    assert all(m < f / 3 for m, f in zip(many, few))  # noise falls as 1 / sqrt(draws)


def block_matrix(est, index, plan):
    basis = kronecker_basis_vectors(est, index, plan)
    return basis @ torch.diag(est._factors[f"{index}.eigenvalues"].reshape(-1)) @ basis.T


def conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3)).to(DOUBLE)


def test_conv_kfac_factors_match_an_explicit_patch_computation():
    # A = mean_i (1/T) sum_t a_t a_t^T over zero-padded 3x3 patches (plus 1 for the bias), and
    # G = mean_i sum_c sum_t g_t g_t^T over output positions, written here with explicit loops.
    model = conv_model()
    X, y = classification_data(n=5, shape=(2, 4, 4))
    est = EkfacInfluence(model, regularization=0.1, n_target_draws=None, correct_eigenvalues=False).fit(X, y)
    conv = model[0]
    padded = F.pad(X, (1, 1, 1, 1))
    A = torch.zeros(2 * 9 + 1, 2 * 9 + 1, dtype=DOUBLE)
    G = torch.zeros(3, 3, dtype=DOUBLE)
    for i in range(len(X)):
        x_i = X[i:i + 1].clone()
        conv_out = conv(x_i)
        logits = model[3](model[2](model[1](conv_out)))
        probabilities = torch.softmax(logits, 1)[0].detach()
        root = torch.diag(probabilities.sqrt()) - torch.outer(probabilities, probabilities.sqrt())
        for column in range(3):  # cotangents L[:, c], L L^T = diag(p) - p p^T
            g = torch.autograd.grad(logits, conv_out, grad_outputs=root[:, column].unsqueeze(0), retain_graph=True)[0]
            for r in range(4):
                for c in range(4):
                    G += torch.outer(g[0, :, r, c], g[0, :, r, c])
        for r in range(4):
            for c in range(4):
                patch = torch.cat([padded[i, :, r:r + 3, c:c + 3].reshape(-1), torch.ones(1, dtype=DOUBLE)])
                A += torch.outer(patch, patch) / 16
    A, G = A / len(X), G / len(X)
    plan = est._plans[0]
    torch.testing.assert_close(block_matrix(est, 0, plan), kron_in_layout(G, A, plan), rtol=1e-9, atol=1e-11)


def kron_in_layout(G, A, plan):
    """``G (x) A`` (row-major augmented weight) permuted to the block's flat layout (weight, then bias)."""
    n_out, n_in = len(G), len(A)
    order = [o * n_in + j for o in range(n_out) for j in range(n_in - 1)] + [o * n_in + n_in - 1 for o in range(n_out)]
    full = torch.kron(G, A)
    return full[order][:, order]


def test_conv_corrected_eigenvalues_and_diagonal_blocks_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3),
                          nn.LayerNorm(3)).to(DOUBLE)
    X, y = classification_data(n=12, shape=(2, 4, 4))
    est = EkfacInfluence(model, regularization=0.1, n_target_draws=None).fit(X, y)
    assert est.layer_approximations_["4"] == "diagonal: 4.weight, 4.bias"
    assert est.layer_approximations_["0"].startswith("Kronecker (Conv2d, KFC)")
    curvature = gauss_newton(model, X, y)
    for index, plan in enumerate(est._plans):
        span = plan.block.span
        if plan.is_kronecker:
            basis = kronecker_basis_vectors(est, index, plan)
            expected = torch.einsum("pi,pq,qi->i", basis, curvature[span, span], basis)
            torch.testing.assert_close(est._factors[f"{index}.eigenvalues"].reshape(-1), expected, rtol=1e-9,
                                       atol=1e-12)
        else:
            torch.testing.assert_close(est._factors["diagonal"], torch.diagonal(curvature)[span], rtol=1e-9,
                                       atol=1e-12)


def test_kfac_is_the_kronecker_product_of_explicit_factors_on_strided_dilated_convolutions():
    # Without the eigenvalue correction each block is G (x) A; the registry's reference builds A from patches
    # sliced explicitly (stride 2, padding, dilation 2), not with unfold.
    from registry import ekfac_inverse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 2 * 2, 3)).to(DOUBLE)
    X, y = classification_data(n=10, shape=(2, 6, 6))
    est = EkfacInfluence(model, regularization=0.1, n_target_draws=None, correct_eigenvalues=False).fit(X, y)
    inverse = ekfac_inverse(model, X, y, F.cross_entropy, "gauss_newton", 0.1, corrected=False)
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), list(model.parameters()))]) for i in range(4)])
    torch.testing.assert_close(est.transform(X[:4], y[:4]), G @ inverse, rtol=1e-9, atol=1e-12)


def test_results_do_not_depend_on_batch_size():
    model = conv_model()
    X, y = classification_data(n=25, shape=(2, 4, 4))
    reference = EkfacInfluence(model, regularization=0.05, n_target_draws=None, batch_size=512).fit(X, y)
    small = EkfacInfluence(model, regularization=0.05, n_target_draws=None, batch_size=4).fit(X, y)
    torch.testing.assert_close(small.influences(X[:5], y[:5]), reference.influences(X[:5], y[:5]), rtol=1e-9,
                               atol=1e-11)
    # Sampled targets are reproducible with a seed.
    a = EkfacInfluence(model, n_target_draws=2, random_state=3).fit(X, y).influences(X[:3], y[:3])
    b = EkfacInfluence(model, n_target_draws=2, random_state=3).fit(X, y).influences(X[:3], y[:3])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_influences_by_layer_sum_to_the_influences():
    model = conv_model()
    X, y = classification_data(n=20, shape=(2, 4, 4))
    est = EkfacInfluence(model, regularization=0.1, random_state=0).fit(X, y)
    by_layer = est.influences(X[:4], y[:4], by_layer=True)
    assert est.layers_ == ["0", "3"] and by_layer.shape == (4, 20, 2)
    torch.testing.assert_close(by_layer.sum(dim=2), est.influences(X[:4], y[:4]), rtol=1e-10, atol=1e-12)
    numpy_result = est.influences(X[:4].numpy(), y[:4].numpy(), by_layer=True)
    assert isinstance(numpy_result, np.ndarray) and numpy_result.shape == (4, 20, 2)


def test_empirical_fisher_of_one_sample_is_its_gradient_outer_product():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).to(DOUBLE)
    x, y = torch.randn(1, 3, dtype=DOUBLE), torch.tensor([1])
    est = EkfacInfluence(layer, regularization=0.5, fisher="empirical").fit(x, y)
    gradient = torch.autograd.functional.jacobian(
        lambda w, b: F.cross_entropy(F.linear(x, w, b), y), (layer.weight.detach(), layer.bias.detach()))
    d = torch.cat([gradient[0].reshape(-1), gradient[1]])
    expected = torch.linalg.solve(torch.outer(d, d) + 0.5 * torch.eye(len(d), dtype=DOUBLE), d)
    torch.testing.assert_close(est.transform(x, y)[0], expected, rtol=1e-10, atol=1e-12)
    assert est.n_params_ == len(d)


def test_special_layers_get_diagonal_blocks():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 4), shared, nn.Tanh(), shared)
    X, y = torch.randn(10, 2, 4, 4), torch.randint(0, 4, (10,))
    est = EkfacInfluence(model, random_state=0).fit(X, y)
    assert est.layer_approximations_["0"] == "diagonal: 0.weight, 0.bias (grouped convolution)"
    assert est.layer_approximations_["2"].startswith("Kronecker (Linear)")
    assert "shared with" in est.layer_approximations_["3"]
    assert np.isfinite(est.self_influence(X, y).numpy()).all()


class _WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


def test_a_layer_the_forward_pass_skips_has_no_curvature():
    torch.manual_seed(0)
    model = _WithUnusedLayer().to(DOUBLE)
    X, y = classification_data()
    est = EkfacInfluence(model, regularization=0.5, n_target_draws=None).fit(X, y)
    assert est.layers_ == ["used", "unused"]
    solved = est.transform(X[:3], y[:3])
    span = est._plans[1].block.span
    assert torch.all(solved[:, span] == 0)  # its gradients are zero, and so is their solve


def test_zero_regularization_on_a_singular_curvature_warns_and_gives_the_pseudo_inverse():
    # Three points for a 4 -> 3 linear layer: the activation covariance has rank 3 of 5, so EK-FAC has
    # eigenvalues that are zero up to rounding, which regularization=0 cannot invert.
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(DOUBLE)
    X, y = classification_data(n=3)
    with pytest.warns(NotPositiveDefiniteWarning, match="zero to rounding.*pseudo-inverse"):
        est = EkfacInfluence(layer, regularization=0.0, n_target_draws=None).fit(X, y)
    plan = est._plans[0]
    basis = kronecker_basis_vectors(est, 0, plan)
    eigenvalues = est._factors["0.eigenvalues"].reshape(-1)
    kept = eigenvalues > 1e-10 * eigenvalues.max()
    assert 0 < int(kept.sum()) < len(kept)
    pseudo_inverse = basis[:, kept] @ torch.diag(1 / eigenvalues[kept]) @ basis[:, kept].T
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        F.cross_entropy(layer(X[i:i + 1]), y[i:i + 1]), [layer.weight, layer.bias])]) for i in range(3)])
    influences = est.influences(X, y, X, y)
    torch.testing.assert_close(influences, G @ pseudo_inverse @ G.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(influences, influences.T, rtol=1e-10, atol=1e-12)  # no rounding noise


def test_clear_errors():
    model = mlp()
    X, y = classification_data()
    with pytest.raises(ValueError, match="second_order='hessian'.*CgInfluence"):
        EkfacInfluence(model, second_order="hessian").fit(X, y)
    est = EkfacInfluence(model, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="by_layer=True.*mode='up'"):
        est.influences(X[:2], y[:2], mode="perturbation", by_layer=True)

    def custom(output, target):
        return F.cross_entropy(output, target)

    with pytest.raises(ValueError, match="known likelihood"):
        EkfacInfluence(model, loss=custom, n_target_draws=1, random_state=0).fit(X, y)
    # The exact expectation needs only the loss's output Hessian, which a custom loss has.
    exact = EkfacInfluence(model, loss=custom, n_target_draws=None).fit(X, y)
    reference = EkfacInfluence(model, n_target_draws=None).fit(X, y)
    torch.testing.assert_close(exact.influences(X[:3], y[:3]), reference.influences(X[:3], y[:3]))


def test_ekfac_preconditioned_cg_reaches_the_exact_inverse_in_fewer_iterations():
    # Softmax regression on badly scaled features: the input covariance, which EK-FAC captures, makes the
    # curvature ill-conditioned, and plain CG slow.
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(200, 8, generator=generator, dtype=DOUBLE) * torch.logspace(-1.5, 1.5, 8, dtype=DOUBLE)
    y = torch.randint(0, 3, (200,), generator=generator)
    torch.manual_seed(0)
    model = nn.Linear(8, 3).to(DOUBLE)
    exact = DirectInfluence(model, regularization=1e-3, second_order="gauss_newton").fit(X, y)
    runs = {}
    for preconditioner in (None, "ekfac"):
        est = CgInfluence(model, regularization=1e-3, second_order="gauss_newton", preconditioner=preconditioner,
                          rtol=1e-8, random_state=0, solver="independent").fit(X, y)
        torch.testing.assert_close(est.transform(X[:8], y[:8]), exact.transform(X[:8], y[:8]), rtol=1e-4, atol=1e-7)
        runs[preconditioner] = est.n_iter_
    assert runs["ekfac"] < runs[None] / 2, runs


def classifier_with_outputs(n_outputs, n_samples, seed):
    """A small tanh network with ``n_outputs`` classes, and data for it."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n_samples, 5, generator=generator, dtype=DOUBLE)
    y = torch.randint(0, n_outputs, (n_samples,), generator=generator)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, n_outputs)).to(DOUBLE), X, y


@pytest.mark.parametrize("n_outputs", [16, 17])
def test_ekfac_preconditioner_takes_the_exact_expectation_for_few_outputs(n_outputs):
    # Up to 16 output values per sample the preconditioner's Fisher is the exact expectation (no sampling
    # noise); above, one drawn target per sample, as EkfacInfluence(n_target_draws=1) with the same seed.
    model, X, y = classifier_with_outputs(n_outputs, 40, seed=0)
    cg = CgInfluence(model, regularization=1e-2, preconditioner="ekfac", random_state=3).fit(X, y)
    exact = EkfacInfluence(model, regularization=1e-2, n_target_draws=None, random_state=3).fit(X, y)
    drawn = EkfacInfluence(model, regularization=1e-2, n_target_draws=1, random_state=3).fit(X, y)
    expected, other = (exact, drawn) if n_outputs <= 16 else (drawn, exact)
    assert cg._factors.keys() == expected._factors.keys()
    for name, tensor in cg._factors.items():
        torch.testing.assert_close(tensor, expected._factors[name], rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(tensor, other._factors[name]) for name, tensor in cg._factors.items()
               if name.endswith("eigenvalues"))


@pytest.mark.parametrize("n_outputs", [16, 17])
def test_auto_target_draws_is_exact_for_few_outputs(n_outputs):
    model, X, y = classifier_with_outputs(n_outputs, 30, seed=1)
    auto = EkfacInfluence(model, random_state=3).fit(X, y)
    expected = EkfacInfluence(model, n_target_draws=None if n_outputs <= 16 else 1, random_state=3).fit(X, y)
    assert auto.n_target_draws_ == expected.n_target_draws_ == (None if n_outputs <= 16 else 1)
    torch.testing.assert_close(auto.transform(X[:3], y[:3]), expected.transform(X[:3], y[:3]), rtol=1e-10, atol=0)
    assert EkfacInfluence(model, fisher="empirical").fit(X, y).n_target_draws_ is None


@pytest.mark.parametrize("loss", [
    "cross_entropy",
    nn.CrossEntropyLoss(label_smoothing=0.2),
    nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DOUBLE), ignore_index=1),
    nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DOUBLE), label_smoothing=0.3),
], ids=["plain", "label_smoothing", "class_weights_ignore_index", "class_weights_label_smoothing"])
def test_cross_entropy_output_hessian_roots_in_closed_form(loss):
    # The closed form against the generic roots (per-sample Hessians of the loss, eigendecomposed).
    from skinfl._cotangents import output_hessian_roots as _output_hessian_roots
    from skinfl._model import LossSpec

    generator = torch.Generator().manual_seed(0)
    output = torch.randn(12, 4, generator=generator, dtype=DOUBLE)
    target = torch.randint(0, 4, (12,), generator=generator)
    spec = LossSpec.resolve(loss).fitted([target])
    roots = _output_hessian_roots(spec, output, target)
    generic = _output_hessian_roots(LossSpec("custom", spec.per_sample), output, target)
    torch.testing.assert_close(roots @ roots.transpose(1, 2), generic @ generic.transpose(1, 2), rtol=1e-10,
                               atol=1e-13)
    if not isinstance(loss, str) and loss.ignore_index == 1:
        assert torch.all(roots[target == 1] == 0)


def test_corrected_eigenvalues_and_diagonal_from_many_draws_approach_the_exact_expectation():
    # Each of n_target_draws cotangents counts 1 / n_target_draws in every statistic: the Kronecker factors,
    # the corrected eigenvalues (of a convolution, several positions, and of a Linear layer, one) and the
    # diagonal blocks (a LayerNorm's). Many draws approach the exact expectation in all three.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3),
                          nn.LayerNorm(3)).to(DOUBLE)
    X, y = classification_data(n=16, shape=(2, 4, 4))
    exact = EkfacInfluence(model, regularization=0.1, n_target_draws=None).fit(X, y)
    drawn = EkfacInfluence(model, regularization=0.1, n_target_draws=300, random_state=0).fit(X, y)
    kinds = []
    for index, plan in enumerate(exact._plans):
        if plan.is_kronecker:
            expected, actual = block_matrix(exact, index, plan), block_matrix(drawn, index, plan)
        else:
            expected, actual = exact._factors["diagonal"], drawn._factors["diagonal"]
        kinds.append(plan.kind)
        assert float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected)) < 0.1, plan.name
    assert kinds == ["conv2d", "linear", "diagonal"]


def test_a_layer_without_curvature_at_zero_regularization_solves_to_zero():
    # Regularization 0: the skipped layer's block is all zeros, at the rounding level of its own scale (0);
    # it is left out (a pseudo-inverse, with a warning), not divided by zero. The used layer's block, a
    # single Linear layer on MSE, is exactly its Gauss-Newton block, so the solve is DirectInfluence's on it.
    torch.manual_seed(0)
    model = _WithUnusedLayer().to(DOUBLE)
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(30, 4, generator=generator, dtype=DOUBLE)
    y = torch.randn(30, 3, generator=generator, dtype=DOUBLE)
    with pytest.warns(NotPositiveDefiniteWarning, match="unused layers"):
        est = EkfacInfluence(model, loss="mse", regularization=0.0, n_target_draws=None).fit(X, y)
    solved = est.transform(X[:4], y[:4])
    used, unused = est._plans[0].block.span, est._plans[1].block.span
    assert torch.equal(solved[:, unused], torch.zeros(4, 15, dtype=DOUBLE))
    direct = DirectInfluence(model.used, loss="mse", regularization=0.0, second_order="gauss_newton")
    direct.fit(X, y)
    torch.testing.assert_close(solved[:, used], direct.transform(X[:4], y[:4]), rtol=1e-9, atol=1e-12)
    # As a preconditioner the same block is clamped to its rounding level instead: positive definite, and CG
    # never multiplies it by anything but the zero residual of the skipped layer.
    cg = CgInfluence(model, loss="mse", regularization=0.0, second_order="gauss_newton",
                     preconditioner="ekfac", rtol=1e-12, solver="independent", random_state=0).fit(X, y)
    torch.testing.assert_close(cg.transform(X[:4], y[:4]), solved, rtol=1e-8, atol=1e-12)
    assert (cg.relative_residuals_ <= 1e-12).all()


def test_zero_regularization_gives_the_pseudo_inverse_also_for_gradients_outside_the_data():
    # Gradients of points other than the three fitted have components along the directions without
    # curvature, which the pseudo-inverse leaves out (the fitted points' own gradients have none).
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(DOUBLE)
    X, y = classification_data(n=20)
    with pytest.warns(NotPositiveDefiniteWarning, match="pseudo-inverse"):
        est = EkfacInfluence(layer, regularization=0.0, n_target_draws=None).fit(X[:3], y[:3])
    pseudo_inverse = torch.linalg.pinv(block_matrix(est, 0, est._plans[0]), rtol=1e-10, hermitian=True)
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        F.cross_entropy(layer(X[i:i + 1]), y[i:i + 1]), [layer.weight, layer.bias])]) for i in range(10, 15)])
    torch.testing.assert_close(est.transform(X[10:15], y[10:15]), G @ pseudo_inverse, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("level", ["moderate", "rounding"])
def test_any_positive_regularization_inverts_every_direction_of_a_singular_curvature(level):
    # 31 parameters per class row, 4 samples: most directions have no curvature. EK-FAC's eigenvalues are
    # never negative, so lambda > 0 inverts all of them, by 1 / lambda where there is no curvature, as the
    # explicit inverse does; nothing is left out and nothing warns, even with lambda below the rounding level
    # of the block (4 eps times its largest eigenvalue; the eigendecomposition rounds at 31 eps times it).
    torch.manual_seed(0)
    layer = nn.Linear(30, 3).to(DOUBLE)
    X, y = classification_data(n=10, shape=(30,))
    largest = float(EkfacInfluence(layer, n_target_draws=None).fit(X[:4], y[:4])._factors["0.eigenvalues"].max())
    regularization = 1e-3 if level == "moderate" else 4 * torch.finfo(DOUBLE).eps * largest
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotPositiveDefiniteWarning)
        est = EkfacInfluence(layer, regularization=regularization, n_target_draws=None).fit(X[:4], y[:4])
    assert est._inverse.n_singular == 0
    assert float(est._factors["0.eigenvalues"].min()) < 1e-12 * largest  # singular indeed
    G = reference_gradients(layer, X[4:], y[4:], loss_fn=F.cross_entropy)
    expected = G @ ekfac_inverse(layer, X[:4], y[:4], F.cross_entropy, "gauss_newton", regularization)
    solved = est.transform(X[4:], y[4:])
    if level == "moderate":
        torch.testing.assert_close(solved, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    else:  # eigenvalues at the rounding level are noise, in both: the same size, not the same digits
        ratio = solved.norm(dim=1) / expected.norm(dim=1)
        assert bool(((ratio > 0.1) & (ratio < 10)).all()), ratio


@pytest.mark.parametrize("conv", [
    {"padding": 1, "padding_mode": "circular"},
    {"padding": 1, "padding_mode": "reflect"},
    {"padding": "same"},
], ids=["circular", "reflect", "same"])
def test_convolutions_padded_otherwise_than_with_explicit_zeros_get_the_exact_diagonal(conv):
    # KFC's patches are those of explicit zero padding; any other padding gets the exact Gauss-Newton
    # diagonal.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, **conv), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).to(DOUBLE)
    X, y = classification_data(n=8, shape=(2, 4, 4))
    est = EkfacInfluence(model, regularization=0.1, n_target_draws=None).fit(X, y)
    assert est.layer_approximations_["0"] == ("diagonal: 0.weight, 0.bias (padding other than explicit zero "
                                              "padding)")
    span = est._plans[0].block.span
    expected = torch.diagonal(gauss_newton(model, X, y))[span]
    torch.testing.assert_close(est._factors["diagonal"], expected, rtol=1e-9, atol=1e-12)


def test_a_linear_layer_on_sequences_takes_every_position():
    # A Linear applied to (n, T, in) inputs is applied at T positions: A = mean_i (1/T) sum_t a_t a_t^T and
    # G = mean_i sum_c sum_t g_t g_t^T, written here with explicit loops; and the corrected eigenvalues are
    # the exact diagonal of the Gauss-Newton block in the Kronecker basis.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 3)).to(DOUBLE)
    X, y = classification_data(n=6, shape=(5, 3))
    kfac = EkfacInfluence(model, regularization=0.1, n_target_draws=None, correct_eigenvalues=False).fit(X, y)
    A = torch.zeros(4, 4, dtype=DOUBLE)
    G = torch.zeros(4, 4, dtype=DOUBLE)
    for i in range(len(X)):
        hidden = model[0](X[i:i + 1])
        logits = model[3](model[2](model[1](hidden)))
        probabilities = torch.softmax(logits, 1)[0].detach()
        root = torch.diag(probabilities.sqrt()) - torch.outer(probabilities, probabilities.sqrt())
        for column in range(3):
            g = torch.autograd.grad(logits, hidden, grad_outputs=root[:, column].unsqueeze(0),
                                    retain_graph=True)[0]
            G += sum(torch.outer(g[0, t], g[0, t]) for t in range(5))
        for t in range(5):
            a = torch.cat([X[i, t], torch.ones(1, dtype=DOUBLE)])
            A += torch.outer(a, a) / 5
    A, G = A / len(X), G / len(X)
    plan = kfac._plans[0]
    torch.testing.assert_close(block_matrix(kfac, 0, plan), kron_in_layout(G, A, plan), rtol=1e-9, atol=1e-11)
    ekfac = EkfacInfluence(model, regularization=0.1, n_target_draws=None).fit(X, y)
    basis = kronecker_basis_vectors(ekfac, 0, plan)
    span = plan.block.span
    expected = torch.einsum("pi,pq,qi->i", basis, gauss_newton(model, X, y)[span, span], basis)
    torch.testing.assert_close(ekfac._factors["0.eigenvalues"].reshape(-1), expected, rtol=1e-9, atol=1e-12)
