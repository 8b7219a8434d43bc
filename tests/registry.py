"""How the test suite checks each registered estimator exactly: one entry per estimator.

A new estimator is one module, one class, and one entry here: the
parameters under which it is exact, the tolerance, the curvatures it
supports, and the inverse it computes exactly. ``test_exact.py`` checks
every estimator against that inverse, built here independently of skinfl's
code paths (explicit Hessians, Jacobians and per-sample loops in float64);
the invariance, streaming, persistence, cache and scikit-learn tests run
every entry with its cheaper ``quick_params``.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

SECOND_ORDERS = ("hessian", "gauss_newton")


@dataclass(frozen=True)
class ExactnessCheck:
    """How the tests check one estimator.

    Attributes
    ----------
    params : dict
        Parameters under which the estimator computes ``inverse`` exactly up
        to rounding (a tight tolerance, a full rank).
    rtol, atol : float
        Tolerance of the comparison with the reference in float64.
    second_order : tuple of str
        The curvatures it supports.
    full_rank : str or None
        Name of a parameter the tests set to the model's number of trainable
        parameters (a ``rank``): exact at full rank only.
    inverse : callable or None
        ``inverse(model, X, y, loss_fn, second_order, regularization)``: the
        ``(n_params, n_params)`` float64 matrix the estimator applies to
        gradients, for an estimator that, by design, inverts something other
        than the curvature (EK-FAC's Kronecker blocks, DataInf's harmonic
        mean). None: ``(C + regularization I)^-1`` with ``C`` the exact
        Hessian or Gauss-Newton matrix.
    quick_params : dict
        Cheaper parameters for the tests that compare an estimator with
        itself (chunking, streaming, persistence, caching): deterministic,
        not necessarily converged. Defaults to ``params``.
    """

    params: dict = field(default_factory=dict)
    rtol: float = 1e-9
    atol: float = 1e-12
    second_order: tuple = SECOND_ORDERS
    full_rank: str | None = None
    inverse: object = None
    quick_params: dict | None = None

    @property
    def inverts_curvature(self):
        return self.inverse is None


# ---------------------------------------------------------------- references
def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflatten(model, flat):
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[start:start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def reference_hessian(model, X, y, loss_fn):
    """Explicit Hessian of the mean loss, independent of skinfl's code paths.

    By classic double backward: torch.func's ``hessian`` (and ``jacrev`` of
    ``jacrev``) returns a wrong, asymmetric Hessian through ``LayerNorm`` in
    torch 2.13 (off by 1.9 in entries of 6; finite differences agree with
    double backward; see pytorch/pytorch#196700).
    """
    def mean_loss(flat):
        return loss_fn(functional_call(model, unflatten(model, flat), (X,)), y)

    return torch.autograd.functional.hessian(mean_loss, flat_params(model))


def reference_gradients(model, X, y, loss_fn):
    """Per-sample gradients by a plain Python loop over samples with autograd."""
    rows = []
    for i in range(len(X)):
        model.zero_grad()
        loss_fn(model(X[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    model.zero_grad()
    return torch.stack(rows)


def output_hessian_root(loss_fn, output, target):
    """``L`` with ``L L^T`` the Hessian of one sample's loss in its (flat) output, by eigendecomposition."""
    values, vectors = torch.linalg.eigh(hessian(lambda o: loss_fn(o.reshape(1, -1), target[None]))(output.reshape(-1)))
    return vectors * values.clamp_min(0).sqrt()


def reference_gauss_newton_terms(model, X, y, loss_fn):
    """Per-sample ``J_i^T H_i J_i``, shape ``(n, p, p)``, with ``J_i`` from jacrev and ``H_i`` the loss's Hessian
    in the output."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    terms = []
    for x, target in zip(X, y):
        def output(p, x=x):
            return functional_call(model, p, (x[None],))[0].reshape(-1)

        jac = jacrev(output)(params)
        J = torch.cat([jac[name].reshape(jac[name].shape[0], -1) for name in params], dim=1)
        root = output_hessian_root(loss_fn, output(params), target)
        terms.append(J.T @ root @ root.T @ J)
    return torch.stack(terms)


def reference_gauss_newton(model, X, y, loss_fn):
    """``1/n sum_i J_i^T H_i J_i`` (see :func:`reference_gauss_newton_terms`)."""
    return reference_gauss_newton_terms(model, X, y, loss_fn).mean(dim=0)


def reference_curvature(model, X, y, loss_fn, second_order):
    if second_order == "hessian":
        return reference_hessian(model, X, y, loss_fn)
    return reference_gauss_newton(model, X, y, loss_fn)


def exact_inverse(model, X, y, loss_fn, second_order, regularization):
    curvature = reference_curvature(model, X, y, loss_fn, second_order)
    return torch.linalg.inv(curvature + regularization * torch.eye(len(curvature), dtype=curvature.dtype))


def parameter_spans(model):
    """``{name: slice}`` of every parameter in the flat vector (all parameters are trainable here)."""
    spans, start = {}, 0
    for name, p in model.named_parameters():
        spans[name] = slice(start, start + p.numel())
        start += p.numel()
    return spans


def module_spans(model):
    """``[(module, [slices of its own parameters])]`` for every module that owns parameters."""
    spans = parameter_spans(model)
    result = []
    for prefix, module in model.named_modules():
        own = [spans[f"{prefix}.{name}" if prefix else name] for name, _ in module.named_parameters(recurse=False)]
        if own:
            result.append((module, own))
    return result


def patches(x, conv):
    """``(T, in_channels * kh * kw)``: every receptive field of ``conv`` on one image ``(C, H, W)``, sliced
    explicitly with its stride, padding and dilation (not with ``unfold``)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    padded = nn.functional.pad(x, (pw, pw, ph, ph))
    rows = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1
    columns = (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
    return torch.stack([padded[:, r * sh:r * sh + dh * (kh - 1) + 1:dh, c * sw:c * sw + dw * (kw - 1) + 1:dw].reshape(-1)
                        for r in range(rows) for c in range(columns)])


def ekfac_inverse(model, X, y, loss_fn, second_order, regularization, corrected=True):
    """``(C_EKFAC + lambda I)^-1`` from explicit per-sample activations and output gradients.

    Each ``Linear`` and ``Conv2d`` gets the block ``(Q_G (x) Q_A) diag(Lambda) (Q_G (x) Q_A)^T`` on its
    augmented weight ``[W | b]`` (row-major): ``A = mean_i (1/T) sum_t a_t a_t^T`` over the positions ``t``
    (a convolution's patches), ``G = mean_i sum_c sum_t g_t g_t^T`` over the columns ``c`` of a root of the
    output Hessian, ``Lambda = mean_i sum_c (Q_G^T d_ic Q_A)**2`` with ``d_ic = sum_t g_t a_t^T``
    (``corrected``; else K-FAC's products of the factors' eigenvalues, the block ``G (x) A``). Every other
    parameter gets the exact Gauss-Newton diagonal.
    """
    kronecker = [(m, own) for m, own in module_spans(model) if isinstance(m, (nn.Linear, nn.Conv2d))]
    records = {}
    hooks = [m.register_forward_hook(lambda m, args, out: records.__setitem__(m, (args[0], out))) for m, _ in kronecker]
    stats = {m: {"A": 0.0, "G": 0.0, "d": []} for m, _ in kronecker}
    for x, target in zip(X, y):
        output = model(x[None])
        root = output_hessian_root(loss_fn, output.detach()[0], target)
        for module, _ in kronecker:
            inputs, outputs = records[module]
            if isinstance(module, nn.Conv2d):
                a = patches(inputs[0].detach(), module)
            else:
                a = inputs.detach().reshape(1, -1)
            if module.bias is not None:
                a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
            stats[module]["A"] = stats[module]["A"] + a.T @ a / len(a)
            for column in root.T:
                g = torch.autograd.grad(output, outputs, grad_outputs=column.reshape(output.shape), retain_graph=True)[0]
                g = g[0].reshape(g.shape[1], -1).T if isinstance(module, nn.Conv2d) else g.reshape(1, -1)
                stats[module]["G"] = stats[module]["G"] + g.T @ g
                stats[module]["d"].append(g.T @ a)
    for hook in hooks:
        hook.remove()

    n_params = sum(p.numel() for p in model.parameters())
    matrix = torch.zeros(n_params, n_params, dtype=torch.float64)
    diagonal = torch.diagonal(reference_gauss_newton(model, X, y, loss_fn))
    for module, own in module_spans(model):
        if module not in stats:
            for span in own:
                matrix[span, span] = torch.diag(diagonal[span])
            continue
        A, G = stats[module]["A"] / len(X), stats[module]["G"] / len(X)
        QA, QG = torch.linalg.eigh(A).eigenvectors, torch.linalg.eigh(G).eigenvectors
        if corrected:
            values = sum((QG.T @ d @ QA) ** 2 for d in stats[module]["d"]) / len(X)
            basis = torch.kron(QG, QA)
            block = basis @ torch.diag(values.reshape(-1)) @ basis.T
        else:
            block = torch.kron(G, A)
        # Augmented row-major index (o, j) -> the flat layout: the weight row-major, then the bias.
        n_out, n_in = G.shape[0], A.shape[0] - int(module.bias is not None)
        weight = own[0].start + torch.arange(n_out * n_in).reshape(n_out, n_in)
        index = weight if module.bias is None else torch.cat([weight, own[1].start + torch.arange(n_out)[:, None]], 1)
        index = index.reshape(-1)
        matrix[index[:, None], index[None, :]] = block
    return torch.linalg.inv(matrix + regularization * torch.eye(n_params, dtype=torch.float64))


def datainf_inverse(model, X, y, loss_fn, second_order, regularization):
    """DataInf's closed form: block-diagonal by module, ``(1/n) sum_i (g_il g_il^T + lambda I)^-1`` with every
    term inverted explicitly, ``g_il`` the loss gradient of sample ``i`` in module ``l``'s parameters."""
    gradients = reference_gradients(model, X, y, loss_fn)
    n_params = gradients.shape[1]
    matrix = torch.zeros(n_params, n_params, dtype=torch.float64)
    for _, own in module_spans(model):
        index = torch.cat([torch.arange(span.start, span.stop) for span in own])
        block = gradients[:, index]
        identity = torch.eye(len(index), dtype=torch.float64)
        terms = [torch.linalg.inv(torch.outer(g, g) + regularization * identity) for g in block]
        matrix[index[:, None], index[None, :]] = torch.stack(terms).mean(dim=0)
    return matrix


# ---------------------------------------------------------------- the registry
CHECKS = {
    "DirectInfluence": ExactnessCheck(rtol=1e-9, atol=1e-12),
    "CgInfluence": ExactnessCheck(params={"rtol": 1e-12, "max_iter": 5000}, rtol=1e-8, atol=1e-10),
    # Deterministic, converged far below the comparison's tolerance: the error is about
    # rtol * scale / a_min, 1e-10 for the registry's tightest case (a_max / lambda ~ 100).
    "LissaInfluence": ExactnessCheck(params={"minibatch_size": None, "rtol": 1e-12, "max_iter": 100_000},
                                     rtol=1e-8, atol=1e-10,
                                     quick_params={"minibatch_size": None, "rtol": 0.0, "max_iter": 10}),
    "ArnoldiInfluence": ExactnessCheck(params={"tol": 1e-10}, rtol=1e-9, atol=1e-12, full_rank="rank"),
    "NystroemInfluence": ExactnessCheck(rtol=1e-8, atol=1e-10, full_rank="rank"),
    "EkfacInfluence": ExactnessCheck(params={"n_target_draws": None}, second_order=("gauss_newton",),
                                     inverse=ekfac_inverse),
    "DataInfInfluence": ExactnessCheck(second_order=("gauss_newton",), inverse=datainf_inverse),
}


def check_of(cls):
    """The registry entry of an estimator class (a KeyError names a class without one)."""
    return CHECKS[cls.__name__]
