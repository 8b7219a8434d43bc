"""One run of the solver benchmark in a fresh process (started by bench_solvers.py).

    python benchmarks/_solver_worker.py prepare   --size SIZE --problems P1,P2
    python benchmarks/_solver_worker.py hardness  --size SIZE --problem P
    python benchmarks/_solver_worker.py reference --size SIZE --problem P
    python benchmarks/_solver_worker.py run       --size SIZE --problem P --lib {skinfl,pydvl,kronfluence} --method M

``prepare`` writes the standardised data split and trains the hard models to
a minimum (cached). ``hardness`` counts the iterations of plain conjugate
gradient (skinfl's ``CgInfluence`` without preconditioner, independent
systems when the class offers the choice) on the first test gradients.
``reference`` computes, in float64, the influence matrix every run is
compared with: ``DirectInfluence``, or a ``CgInfluence`` with ``rtol=1e-8``
for models above the size's Direct limit. ``run`` times ``fit`` and the
(n_test x n_train) influence matrix of one library and method, saves the
matrix and prints one line ``RESULT {json}`` with the timings, the peak
resident memory of this process, iteration counts and warnings.

A method whose skinfl class, or one of whose required parameters, does not
exist (yet) gives ``status: "not available"`` instead of failing, and so does
a method another library does not have (:func:`unavailable`). pyDVL's
EK-FAC on a model with layers other than ``nn.Linear`` (the CNN) gives
``status: "not supported"``. The settings every library gets come from
:func:`matched_settings`.

Runs on skinfl's interpreter (skinfl on ``sys.path``) or on pyDVL's
(benchmarks/.venv-pydvl, which also has kronfluence: ``--lib kronfluence``
runs _kronfluence.py there); nothing here imports skinfl, pyDVL or
kronfluence at module level.
"""

from __future__ import annotations

import resource
import sys


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


RSS_START_MB = _maxrss_mb()  # before numpy/torch: the bare interpreter

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _problems as P  # noqa: E402
from _common import LogCollector, summarise_messages  # noqa: E402

REGULARIZATION = P.WEIGHT_DECAY  # the Hessian of the training objective
CG_RTOL = 1e-4  # skinfl's convention: ||r|| <= rtol ||b||
CG_MAX_ITER = 1000
CG_PRECONDITIONER_RANK = 100
HARDNESS_RHS = 5  # test gradients solved by plain CG to show a problem is hard
HARDNESS_MAX_ITER = 5000
REFERENCE_CG_RTOL = 1e-8
REFERENCE_CG_MAX_ITER = 10000
REFERENCE_BATCH_SIZE = 512
ARNOLDI_TOL = 1e-6  # pyDVL's default
LISSA_MAX_ITER = 1000
LISSA_DAMPEN = 0.0
# Small enough that neither library stops early: both run max_iter steps, the same work.
LISSA_RTOL = 1e-10
# LiSSA needs scale > the largest eigenvalue of every minibatch's Hessian plus regularization;
# the full-batch top eigenvalue times this margin, rounded up to one significant digit.
LISSA_SCALE_MARGIN = 3.0
# pyDVL's CG stops at ||r|| < max(rtol**2 ||b||, atol**2): sqrt(CG_RTOL) asks for the same relative
# tolerance as skinfl; atol**2 = 1e-20 removes the absolute floor (skinfl's atol is 0).
PYDVL_CG_ATOL = 1e-10
# EK-FAC: targets drawn from the model's predictive distribution (the true Fisher), one per point, and
# the eigenvalues refitted on the data; ekfac_empirical uses the training labels instead (no draws: a
# deterministic check that skinfl and kronfluence compute the same thing); ekfac_exact is skinfl's exact
# expectation over the predictive distribution (n_target_draws=None), which neither peer has.
EKFAC_N_TARGET_DRAWS = 1

FAMILIES = ("cg", "cg_plain", "cg_ekfac", "arnoldi", "nystroem", "lissa", "datainf", "ekfac", "ekfac_exact",
            "ekfac_empirical")
# The curvature each family approximates, and so the reference its agreement is measured against:
# EK-FAC and DataInf approximate the Gauss-Newton (Fisher) matrix, the others solve with the Hessian.
GAUSS_NEWTON_FAMILIES = ("datainf", "ekfac", "ekfac_exact", "ekfac_empirical")
CURVATURES = ("hessian", "gauss_newton")

CG_FAMILIES = ("cg", "cg_plain", "cg_ekfac")
SKINFL_CLASSES = {
    "cg": "CgInfluence",
    "cg_plain": "CgInfluence",
    "cg_ekfac": "CgInfluence",
    "arnoldi": "ArnoldiInfluence",
    "nystroem": "NystroemInfluence",
    "lissa": "LissaInfluence",
    "datainf": "DataInfInfluence",
    "ekfac": "EkfacInfluence",
    "ekfac_exact": "EkfacInfluence",
    "ekfac_empirical": "EkfacInfluence",
}
PYDVL_CLASSES = {
    "cg": "CgInfluence",
    "cg_plain": "CgInfluence",
    "arnoldi": "ArnoldiInfluence",
    "nystroem": "NystroemSketchInfluence",
    "lissa": "LissaInfluence",
    "datainf": "InverseHarmonicMeanInfluence",
    "ekfac": "EkfacInfluence",
}
# skinfl < 0.2 names of SKINFL_CLASSES' classes and parameters, for runs against earlier skinfl.
SKINFL_FORMER_NAMES = {"DataInfInfluence": "InverseHarmonicMeanInfluence", "solver": "method"}
KRONFLUENCE_FAMILIES = ("ekfac", "ekfac_empirical")  # its Analyzer with FactorArguments(strategy="ekfac")


class NotAvailable(Exception):
    """The library has no class or parameter for this method (yet)."""


def parse_method(method):
    """``"arnoldi50"`` -> ``("arnoldi", 50)``; ``"cg"`` -> ``("cg", None)``."""
    match = re.fullmatch(r"(arnoldi|nystroem)(\d+)", method)
    if match:
        return match.group(1), int(match.group(2))
    if method in FAMILIES:
        return method, None
    raise ValueError(f"unknown method {method!r}: one of {FAMILIES} (arnoldi/nystroem with a rank, e.g. arnoldi50)")


def method_names(ranks):
    return ["cg", "cg_plain", "cg_ekfac", *(f"arnoldi{r}" for r in ranks), *(f"nystroem{r}" for r in ranks), "lissa",
            "datainf", "ekfac", "ekfac_exact", "ekfac_empirical"]


def curvature_of(method):
    """``"gauss_newton"`` for the methods that approximate the Gauss-Newton matrix, else ``"hessian"``."""
    return "gauss_newton" if parse_method(method)[0] in GAUSS_NEWTON_FAMILIES else "hessian"


def unavailable(lib, method):
    """Why ``lib`` has no ``method`` (a string), or None when it has it; skinfl is asked in its worker."""
    family, _ = parse_method(method)
    if lib == "pydvl" and family not in PYDVL_CLASSES:
        return {"cg_ekfac": "pyDVL 0.10.0's CG has no EK-FAC preconditioner",
                "ekfac_exact": "pyDVL 0.10.0's EkfacInfluence draws one target per point (no exact expectation)",
                "ekfac_empirical": "pyDVL 0.10.0's EkfacInfluence has no empirical-Fisher option"}[family]
    if lib == "kronfluence" and family == "ekfac_exact":
        return "kronfluence 1.0.1's true Fisher draws one target per point (no exact expectation)"
    if lib == "kronfluence" and family not in KRONFLUENCE_FAMILIES:
        return f"kronfluence is run for {', '.join(KRONFLUENCE_FAMILIES)} only"
    return None


def lissa_scale(top_eigenvalue, regularization=REGULARIZATION):
    """``LISSA_SCALE_MARGIN * (top eigenvalue + regularization)`` rounded up to one significant digit."""
    import math

    value = LISSA_SCALE_MARGIN * (top_eigenvalue + regularization)
    exponent = math.floor(math.log10(value))
    return math.ceil(value / 10**exponent) * 10**exponent


def matched_settings(method, size, summary, lissa_max_iter=LISSA_MAX_ITER, pydvl_arnoldi_woodbury=True):
    """The settings both libraries get for ``method`` on a hard problem, in skinfl's terms (see the README)."""
    return method_settings(
        method, n_params=summary["n_params"], top_eigenvalue=summary["top_hessian_eigenvalue"],
        regularization=REGULARIZATION, batch_size=size.batch_size, lissa_max_iter=lissa_max_iter,
        pydvl_arnoldi_woodbury=pydvl_arnoldi_woodbury,
    )


def method_settings(method, *, n_params, top_eigenvalue, regularization, batch_size,
                    lissa_max_iter=LISSA_MAX_ITER, pydvl_arnoldi_woodbury=True):
    """The settings both libraries get for ``method``, in skinfl's terms."""
    family, rank = parse_method(method)
    settings = {"regularization": regularization, "batch_size": batch_size, "loss": "cross_entropy"}
    if family in CG_FAMILIES:
        preconditioner = {"cg": "nystroem", "cg_plain": None, "cg_ekfac": "ekfac"}[family]
        settings.update(
            rtol=CG_RTOL,
            atol=0.0,
            max_iter=CG_MAX_ITER,
            preconditioner=preconditioner,
            preconditioner_rank=min(CG_PRECONDITIONER_RANK, n_params) if preconditioner == "nystroem" else None,
            block=True,
        )
    elif family == "arnoldi":
        settings.update(
            rank=rank,
            krylov_dimension=min(n_params, max(2 * rank + 1, 20)),  # pyDVL's default, given to both
            tol=ARNOLDI_TOL,
            inverse="woodbury" if pydvl_arnoldi_woodbury else "projected",
        )
    elif family == "nystroem":
        settings.update(rank=rank)
    elif family == "lissa":
        settings.update(
            scale=lissa_scale(top_eigenvalue, regularization),
            dampen=LISSA_DAMPEN,
            max_iter=lissa_max_iter,
            rtol=LISSA_RTOL,
            minibatch_size=batch_size,
        )
    elif family == "datainf":
        settings.update(second_order="gauss_newton", blocks="layer")
    elif family in ("ekfac", "ekfac_exact", "ekfac_empirical"):
        settings.update(
            second_order="gauss_newton",
            fisher="empirical" if family == "ekfac_empirical" else "true",
            n_target_draws=None if family == "ekfac_exact" else EKFAC_N_TARGET_DRAWS,
            correct_eigenvalues=True,
        )
    return settings


# ------------------------------------------------------------------ skinfl
def _skinfl_estimator(skinfl, family, model, settings):
    """The skinfl estimator for ``family`` with ``settings``; raises NotAvailable."""
    name = SKINFL_CLASSES[family]
    cls = getattr(skinfl, name, None) or getattr(skinfl, SKINFL_FORMER_NAMES.get(name, name), None)
    if cls is None:
        raise NotAvailable(f"skinfl {skinfl.__version__} has no {name}")
    required = {"loss": settings["loss"], "regularization": settings["regularization"],
                "batch_size": settings["batch_size"]}
    optional = {"random_state": 0}
    if family in CG_FAMILIES:
        required.update(rtol=settings["rtol"], atol=settings["atol"], max_iter=settings["max_iter"],
                        preconditioner=settings["preconditioner"])
        if settings["preconditioner_rank"] is not None:
            required["preconditioner_rank"] = settings["preconditioner_rank"]
        if settings.get("skinfl_cg_method"):
            optional["solver"] = settings["skinfl_cg_method"]
    elif family == "arnoldi":
        required["rank"] = settings["rank"]
        optional.update(krylov_dimension=settings["krylov_dimension"], tol=settings["tol"])
    elif family == "nystroem":
        required["rank"] = settings["rank"]
    elif family == "lissa":
        required.update(scale=settings["scale"], dampen=settings["dampen"], max_iter=settings["max_iter"])
        optional.update(rtol=settings["rtol"], minibatch_size=settings["minibatch_size"])
    elif family == "datainf":
        optional["second_order"] = settings["second_order"]
    elif family in ("ekfac", "ekfac_exact", "ekfac_empirical"):
        required.update(fisher=settings["fisher"], n_target_draws=settings["n_target_draws"],
                        correct_eigenvalues=settings["correct_eigenvalues"])
        optional["second_order"] = settings["second_order"]
    estimator = cls(model)
    accepted = estimator.get_params(deep=False)
    if "solver" in optional and "solver" not in accepted:
        optional[SKINFL_FORMER_NAMES["solver"]] = optional.pop("solver")
    missing = sorted(k for k in required if k not in accepted)
    if missing:
        raise NotAvailable(f"skinfl {name} has no parameter {', '.join(missing)}")
    dropped = sorted(k for k in optional if k not in accepted)
    estimator.set_params(**required, **{k: v for k, v in optional.items() if k in accepted})
    return estimator, dropped


def _fitted_attributes(estimator):
    """Public fitted scalars (n_iter_, solver_, ...) for the record."""
    out = {}
    for key, value in vars(estimator).items():
        if not key.endswith("_") or key.startswith("_") or key in ("n_features_in_",):
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif hasattr(value, "tolist") and getattr(value, "ndim", 2) == 0:
            out[key] = value.tolist()
    # Attributes computed on access (CgInfluence's n_iter_ is about the last solving call).
    for key in ("n_iter_", "relative_residuals_"):
        if key in out:
            continue
        try:
            value = getattr(estimator, key)
        except Exception:  # absent, or not set yet
            continue
        if isinstance(value, (bool, int, float)):
            out[key] = value
        elif hasattr(value, "max") and getattr(value, "numel", lambda: 0)():
            out[f"max_{key}"] = float(value.max())
    return out


# ------------------------------------------------------------------- pyDVL
def _pydvl_estimator(family, model, settings):
    import torch
    import torch.nn.functional as F
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        BlockMode,
        CgInfluence,
        EkfacInfluence,
        InverseHarmonicMeanInfluence,
        LissaInfluence,
        NystroemSketchInfluence,
    )

    loss, regularization = F.cross_entropy, settings["regularization"]
    if family in ("cg", "cg_plain"):
        preconditioner = None
        if settings["preconditioner"] == "nystroem":
            preconditioner = _returning_nystroem_preconditioner()(rank=settings["preconditioner_rank"])
        return CgInfluence(
            model, loss, regularization,
            rtol=settings["rtol"] ** 0.5, atol=PYDVL_CG_ATOL, maxiter=settings["max_iter"],
            preconditioner=preconditioner, solve_simultaneously=settings["block"],
        )
    if family == "arnoldi":
        return ArnoldiInfluence(
            model, loss, regularization, rank=settings["rank"], krylov_dimension=settings["krylov_dimension"],
            tol=settings["tol"], use_woodbury=settings["inverse"] == "woodbury",
        )
    if family == "nystroem":
        return NystroemSketchInfluence(model, loss, regularization, rank=settings["rank"])
    if family == "lissa":
        return LissaInfluence(
            model, loss, regularization, maxiter=settings["max_iter"], dampen=settings["dampen"],
            scale=settings["scale"], rtol=settings["rtol"], warn_on_max_iteration=False,
        )
    if family == "datainf":
        blocks = {"layer": BlockMode.LAYER_WISE, "parameter": BlockMode.PARAMETER_WISE, "full": BlockMode.FULL}
        block_structure = blocks[settings["blocks"]]
        if settings["blocks"] == "layer" and not list(model.children()):
            # pyDVL 0.10.0's LAYER_WISE finds no block when the model is itself the only layer (a bare
            # nn.Linear), and influences() then fails; one block over all parameters is the same thing.
            block_structure = BlockMode.FULL
        _weigh_first_batch_in_point_averaging()
        return InverseHarmonicMeanInfluence(model, loss, regularization, block_structure=block_structure)
    if family == "ekfac":
        # pyDVL's EK-FAC: cross-entropy only, nn.Linear layers only (fit raises
        # NotImplementedLayerRepresentationException on anything else), its own Fisher (see the README).
        # Two of its limitations are lifted where they would apply (the logistic regression of loo_logreg.py).
        no_bias = any(isinstance(m, torch.nn.Linear) and m.bias is None for m in model.modules())
        not_float32 = any(p.dtype != torch.float32 for p in model.parameters())
        cls = _fixed_ekfac_influence() if no_bias or not_float32 else EkfacInfluence
        return cls(model, update_diagonal=True, hessian_regularization=regularization)
    raise ValueError(family)


def _returning_nystroem_preconditioner():
    """pyDVL's NystroemPreconditioner, with ``fit`` returning the preconditioner as documented.

    In pyDVL 0.10.0 ``Preconditioner.fit`` returns what ``_fit`` returns, and
    ``NystroemPreconditioner._fit`` returns None; ``CgInfluence`` keeps
    ``preconditioner.fit(...)``, so it computes the sketch and then runs
    unpreconditioned CG. This subclass only adds the missing ``return self``.
    """
    from pydvl.influence.torch.preconditioner import NystroemPreconditioner

    class ReturningNystroemPreconditioner(NystroemPreconditioner):
        def _fit(self, operator, regularization=None):
            super()._fit(operator, regularization)
            return self

    return ReturningNystroemPreconditioner


def _fixed_ekfac_influence():
    """pyDVL's EkfacInfluence, for float64 models and ``nn.Linear`` layers without bias.

    - pyDVL 0.10.0's ``EkfacInfluence.fit`` allocates its factors in torch's
      default dtype (float32), so a float64 model fails later with "expected
      m1 and m2 to have the same dtype". This subclass fits with the default
      dtype set to the model's.
    - Its ``_solve_hvp_by_layer`` always takes the last ``out_features``
      entries of a layer's gradient as the bias and reshapes the others to
      ``(out_features, -1)``: for a layer without bias (the logistic
      regression of loo_logreg.py) the weight's ``(out, in)`` layout is then
      read shifted, and the factors are applied to the wrong entries (the
      result differs from them applied to the right layout by about 100%).
      This subclass does what pyDVL does for a layer with bias, and reads a
      layer without bias as its ``(out, in)`` weight.

    The factors and their eigenvalue correction are pyDVL's own.
    """
    import torch
    from pydvl.influence.torch import EkfacInfluence

    class FixedEkfacInfluence(EkfacInfluence):
        def fit(self, data):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(next(self.model.parameters()).dtype)
            try:
                return super().fit(data)
            finally:
                torch.set_default_dtype(previous)

        @staticmethod
        def _solve_hvp_by_layer(rhs, ekfac_representation, hessian_regularization):
            solved = {}
            start = 0
            for layer_id, (module, evecs_a, evecs_g, diag) in ekfac_representation:
                end = start + diag.shape[0]
                block, n_out = rhs[:, start:end], evecs_g.shape[0]
                with_bias = module.bias is not None
                if with_bias:  # weight (n_out, n_in) row-major, then bias (n_out,): a column of the Kronecker form
                    block = torch.cat([block[:, :-n_out].reshape(len(rhs), n_out, -1), block[:, -n_out:, None]], dim=2)
                else:
                    block = block.reshape(len(rhs), n_out, -1)
                in_eigenbasis = evecs_g.t() @ block @ evecs_a
                in_eigenbasis = in_eigenbasis / (diag.reshape(in_eigenbasis.shape[1:]) + hessian_regularization)
                inverse = evecs_g @ in_eigenbasis @ evecs_a.t()
                if with_bias:
                    solved[layer_id] = torch.cat([inverse[:, :, :-1].reshape(len(rhs), -1), inverse[:, :, -1]], dim=1)
                else:
                    solved[layer_id] = inverse.reshape(len(rhs), -1)
                start = end
            return solved

    return FixedEkfacInfluence


def _weigh_first_batch_in_point_averaging():
    """Make pyDVL's ``PointAveraging`` weigh the first batch like the others.

    pyDVL 0.10.0's ``PointAveraging`` (tensor and dict forms) starts from the
    first batch's result unweighted, adds each later one times its leading
    size, and divides by the sum of the sizes. The leading size is that of
    the result (the number of vectors the operator was applied to, the same
    for every batch), so with ``b`` batches the result is
    ``(1 / k + b - 1) / b`` of the mean of the batch results: about half of
    it for two batches, ``1 / k`` for one. Its ``InverseHarmonicMeanInfluence``
    (DataInf) averages with it. The replacement weighs every batch result
    alike, which is the mean over points when batches have equal sizes, as
    here (the batch size divides ``n_train``).
    """
    from pydvl.influence.torch import batch_operation

    def mean_of_tensors(self, tensors):
        tensors = list(tensors)
        return sum(tensors[1:], tensors[0].clone()) / len(tensors)

    def mean_of_dicts(self, tensor_dicts):
        tensor_dicts = list(tensor_dicts)
        return {key: sum(d[key] for d in tensor_dicts) / len(tensor_dicts) for key in tensor_dicts[0]}

    batch_operation.PointAveraging.__call__ = mean_of_tensors
    batch_operation._TensorDictPointAveraging.__call__ = mean_of_dicts


def _pydvl_iterations(records):
    counts = {"cg": [], "lissa": []}
    for _, _, message in records:
        if m := re.search(r"Terminated (?:block )?cg after (\d+) iterations", message):
            counts["cg"].append(int(m.group(1)))
        elif m := re.search(r"Terminated Lissa after (\d+) iterations", message):
            counts["lissa"].append(int(m.group(1)))
        elif m := re.search(r"Reached max number of iterations (?:maxiter=)?(\d+)", message):
            counts["lissa" if "Lissa" in message or "lissa" in message else "cg"].append(int(m.group(1)))
    return {k: v for k, v in counts.items() if v} or None


# ------------------------------------------------------------------ commands
def _size(name):
    return P.HARD_SIZES[name]


def _summary(problem, size):
    return json.loads(P.hard_model_path(problem, size).with_suffix(".json").read_text())


def _tensors(size, dtype):
    import torch

    data = P.load_data(size)
    return (
        torch.from_numpy(data["X_train"]).to(dtype),
        torch.from_numpy(data["y_train"]),
        torch.from_numpy(data["X_test"]).to(dtype),
        torch.from_numpy(data["y_test"]),
    )


def prepare(args):
    import torch

    size = _size(args.size)
    P.prepare_hard_data(size)
    # Training is many small operations: one thread is fastest on a shared machine.
    torch.set_num_threads(1)
    summaries = {}
    for problem in args.problems.split(","):
        summaries[problem] = P.prepare_hard_model(problem, size)
    print("RESULT " + json.dumps(summaries), flush=True)


def hardness_path(problem, size):
    return size.work_dir / f"{problem}_plain_cg.json"


def hardness(args):
    """Plain CG (no preconditioner, independent systems) at rtol=1e-4 on the first test gradients."""
    import torch

    import skinfl

    size = _size(args.size)
    torch.set_num_threads(args.threads)
    summary = _summary(args.problem, size)
    X, y, X_test, y_test = _tensors(size, torch.float32)
    model = P.load_hard_model(args.problem, size)
    estimator = skinfl.CgInfluence(
        model, loss="cross_entropy", regularization=REGULARIZATION, rtol=CG_RTOL, max_iter=HARDNESS_MAX_ITER,
        preconditioner=None, batch_size=size.batch_size,
    )
    for name in ("solver", "method"):  # "method" before skinfl 0.2
        if name in estimator.get_params(deep=False):
            estimator.set_params(**{name: "independent"})
            break
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimator.fit(X, y)
        estimator.transform(X_test[:HARDNESS_RHS], y_test[:HARDNESS_RHS])
    seconds = time.perf_counter() - start
    record = {
        "problem": args.problem,
        "n_params": summary["n_params"],
        "state_dict_sha1": summary["state_dict_sha1"],
        "systems": HARDNESS_RHS,
        "rtol": CG_RTOL,
        "regularization": REGULARIZATION,
        "seconds": seconds,
        "fitted": _fitted_attributes(estimator),
        "warnings": summarise_messages([f"{w.category.__name__}: {w.message}" for w in caught]),
    }
    record["iterations"] = record["fitted"].get("n_iter_")
    residuals = [float(v) for v in getattr(estimator, "relative_residuals_", [])]
    record["relative_residuals"] = residuals
    record["converged"] = sum(r <= CG_RTOL for r in residuals)
    hardness_path(args.problem, size).write_text(json.dumps(record, indent=2))
    print("RESULT " + json.dumps(record), flush=True)


def reference_path(problem, size, curvature="hessian"):
    suffix = "" if curvature == "hessian" else f"_{curvature}"
    return size.work_dir / f"{problem}_reference{suffix}.npy"


def reference(args):
    """The float64 reference influence matrix of ``--curvature`` (Direct, or CG with rtol=1e-8 above the size's limit)."""
    import numpy as np
    import torch

    import skinfl

    size = _size(args.size)
    torch.set_num_threads(args.threads)
    summary = _summary(args.problem, size)
    X, y, X_test, y_test = _tensors(size, torch.float64)
    model = P.load_hard_model(args.problem, size, dtype=torch.float64)
    common = {"loss": "cross_entropy", "regularization": REGULARIZATION, "batch_size": REFERENCE_BATCH_SIZE,
              "second_order": args.curvature}
    if summary["n_params"] <= size.direct_reference_max_params:
        estimator = skinfl.DirectInfluence(model, **common)
    else:
        estimator = skinfl.CgInfluence(
            model, **common, rtol=REFERENCE_CG_RTOL, max_iter=REFERENCE_CG_MAX_ITER, random_state=0
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        estimator.fit(X, y)
        matrix = estimator.influences(X_test, y_test).numpy()
        seconds = time.perf_counter() - start
    path = reference_path(args.problem, size, args.curvature)
    np.save(path, matrix)
    record = {
        "problem": args.problem,
        "curvature": args.curvature,
        "estimator": type(estimator).__name__,
        "settings": {k: v for k, v in estimator.get_params(deep=False).items() if k != "model"},
        "dtype": "float64",
        "state_dict_sha1": summary["state_dict_sha1"],
        "seconds": seconds,
        "fitted": _fitted_attributes(estimator),
        "warnings": summarise_messages([f"{w.category.__name__}: {w.message}" for w in caught]),
        "path": str(path.relative_to(P.REPO_ROOT)),
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str))
    print("RESULT " + json.dumps(record, default=str), flush=True)


def matrix_path(problem, lib, method, size):
    return size.work_dir / f"{problem}_{lib}_{method}.npy"


def run(args):
    import numpy as np
    import torch

    size = _size(args.size)
    family, _ = parse_method(args.method)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # pyDVL's random sketches and LiSSA's minibatches draw from the global generator
    summary = _summary(args.problem, size)
    settings = matched_settings(
        args.method, size, summary, lissa_max_iter=args.lissa_max_iter,
        pydvl_arnoldi_woodbury=not args.pydvl_arnoldi_projected,
    )
    if args.skinfl_cg_method and family in CG_FAMILIES:
        settings["skinfl_cg_method"] = args.skinfl_cg_method
    X, y, X_test, y_test = _tensors(size, torch.float32)
    model = P.load_hard_model(args.problem, size)
    base = {
        "problem": args.problem, "lib": args.lib, "method": args.method, "n_params": summary["n_params"],
        "n_train": len(X), "n_test": len(X_test), "settings": settings, "threads": args.threads,
    }
    if unavailable(args.lib, args.method):
        print("RESULT " + json.dumps({**base, "status": "not available", "reason": unavailable(args.lib, args.method)}),
              flush=True)
        return

    # Warm-up settings: small, valid on the warm-up model (a few hundred parameters), quick.
    warm_settings = dict(settings, regularization=1.0)
    if "scale" in warm_settings:
        warm_settings["scale"] = 100.0  # above the warm-up model's curvature plus regularization
    for key, value in (("rank", 5), ("krylov_dimension", 20), ("preconditioner_rank", 5), ("max_iter", 5)):
        if warm_settings.get(key) is not None:
            warm_settings[key] = value
    warm_model = P.warmup_model(args.problem)
    warm_data = (X[:10], y[:10], X_test[:2], y_test[:2])

    if args.lib == "skinfl":
        import skinfl

        version = skinfl.__version__
        not_supported = ()
        try:
            estimator, dropped = _skinfl_estimator(skinfl, family, model, settings)
        except NotAvailable as error:
            print("RESULT " + json.dumps({**base, "status": "not available", "reason": str(error),
                                          "library_version": version}), flush=True)
            return

        def make(model, settings, data):
            est, _ = _skinfl_estimator(skinfl, family, model, settings)
            Xf, yf, Xt, yt = data
            return (lambda: est.fit(Xf, yf)), (lambda: est.influences(Xt, yt)), est

    elif args.lib == "pydvl":
        import pydvl
        from pydvl.influence import InfluenceMode
        from pydvl.influence.base_influence_function_model import NotImplementedLayerRepresentationException
        from torch.utils.data import DataLoader, TensorDataset

        version = pydvl.__version__
        dropped = []
        not_supported = (NotImplementedLayerRepresentationException,)  # its EK-FAC on layers other than Linear

        def make(model, settings, data):
            Xf, yf, Xt, yt = data
            batch = min(settings["batch_size"], len(Xf))
            if len(Xf) % batch:
                raise SystemExit(
                    f"pyDVL DataLoader batch {batch} must divide n_train={len(Xf)}: pyDVL averages per-batch "
                    "mean Hessians without weights."
                )
            loader = DataLoader(TensorDataset(Xf, yf), batch_size=batch, shuffle=False)
            est = _pydvl_estimator(family, model, settings)
            return (
                (lambda: est.fit(loader)),
                (lambda: est.influences(Xt, yt, Xf, yf, mode=InfluenceMode.Up)),
                est,
            )

    else:  # kronfluence, in pyDVL's venv
        try:
            import kronfluence

            import _kronfluence as K
        except ImportError as error:
            print("RESULT " + json.dumps({**base, "status": "not available", "reason": (
                f"kronfluence cannot be imported in {sys.executable}'s environment ({error}); "
                "bash benchmarks/setup_pydvl_env.sh installs it")}), flush=True)
            return
        import itertools
        import tempfile

        version = kronfluence.__version__
        dropped = []
        (size.work_dir / "kronfluence").mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{args.problem}_{args.method}_", dir=size.work_dir / "kronfluence"))
        analyses = itertools.count()

        def make(model, settings, data):
            Xf, yf, Xt, yt = data
            est = K.KronfluenceEkfac(model, regularization=settings["regularization"],
                                     batch_size=settings["batch_size"], work_dir=scratch, fisher=settings["fisher"],
                                     name=f"analysis{next(analyses)}")
            return (lambda: est.fit(Xf, yf)), (lambda: est.influences(Xt, yt)), est

    def report_not_supported(error):
        print("RESULT " + json.dumps({**base, "status": "not supported", "reason": f"{type(error).__name__}: {error}",
                                      "library_version": version}), flush=True)

    fit, influences, estimator = make(model, settings, (X, y, X_test, y_test))
    rss_loaded_mb = _maxrss_mb()
    with warnings.catch_warnings(record=True) as warm_caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        warm_fit, warm_influences, _ = make(warm_model, warm_settings, warm_data)
        try:
            warm_fit()
        except not_supported as error:
            return report_not_supported(error)
        warm_influences()
        warmup_s = time.perf_counter() - start
    rss_import_mb = _maxrss_mb()

    collector = LogCollector()
    logging.getLogger().addHandler(collector)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pydvl").setLevel(logging.DEBUG)  # iteration counts are logged at DEBUG
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            fit()
        except not_supported as error:
            return report_not_supported(error)
        fitted = time.perf_counter()
        result = influences()
        done = time.perf_counter()
    peak_mb = _maxrss_mb()
    if args.lib == "kronfluence":
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)  # its factor and score files

    matrix = result.detach().cpu().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)
    out = matrix_path(args.problem, args.lib, args.method, size)
    np.save(out, matrix)

    iterations = None
    fitted_attributes = {}
    if args.lib == "skinfl":
        fitted_attributes = _fitted_attributes(estimator)
        if "n_iter_" in fitted_attributes:
            iterations = {"n_iter_": fitted_attributes["n_iter_"]}
    elif args.lib == "pydvl":
        iterations = _pydvl_iterations(collector.records)

    log_messages = [f"{logging.getLevelName(level)} {name}: {msg}"
                    for level, name, msg in collector.records if level >= logging.WARNING]
    record = {
        **base,
        "status": "ok",
        "library_version": version,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python": sys.version.split()[0],
        "dtype": "float32",
        "dropped_settings": dropped,
        "library_settings": estimator.settings() if args.lib == "kronfluence" else None,
        "fitted": fitted_attributes,
        "warmup_s": warmup_s,
        "warmup_warnings": summarise_messages([f"{w.category.__name__}: {w.message}" for w in warm_caught]),
        "fit_s": fitted - start,
        "influences_s": done - fitted,
        "total_s": done - start,
        "rss_start_mb": RSS_START_MB,
        "rss_loaded_mb": rss_loaded_mb,
        "rss_import_mb": rss_import_mb,
        "peak_mb": peak_mb,
        "matrix": str(out.relative_to(P.REPO_ROOT)),
        "matrix_shape": list(matrix.shape),
        "finite": bool(np.isfinite(matrix).all()),
        "iterations": iterations,
        "warnings": summarise_messages([f"{w.category.__name__}: {w.message}" for w in caught]),
        "log_warnings": summarise_messages(log_messages),
    }
    print("RESULT " + json.dumps(record, default=str), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "hardness", "reference", "run"):
        command = sub.add_parser(name)
        command.add_argument("--size", choices=sorted(P.HARD_SIZES), required=True)
        command.add_argument("--threads", type=int, default=2)
        if name == "prepare":
            command.add_argument("--problems", required=True)
        else:
            command.add_argument("--problem", required=True)
        if name == "reference":
            command.add_argument("--curvature", choices=CURVATURES, default="hessian")
        if name == "run":
            command.add_argument("--lib", choices=("skinfl", "pydvl", "kronfluence"), required=True)
            command.add_argument("--method", required=True)
            command.add_argument("--lissa-max-iter", type=int, default=LISSA_MAX_ITER)
            command.add_argument("--pydvl-arnoldi-projected", action="store_true")
            command.add_argument("--skinfl-cg-method", default=None)
    args = parser.parse_args(argv)
    {"prepare": prepare, "hardness": hardness, "reference": reference, "run": run}[args.command](args)


if __name__ == "__main__":
    main()
