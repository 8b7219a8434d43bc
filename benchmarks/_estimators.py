"""Every estimator the benchmarks build (skinfl, pyDVL 0.10.0, kronfluence 1.0.1), and the worker that times them.

Settings are given in skinfl's terms (one dict per method); the
constructors below translate them for each library. The worker entry
:func:`run_tasks` fits each task's estimator and computes its outputs
(influences of a query set, or self-influence) after a warm-up run of each
method on a small untrained model (one-time costs are not timed), saves
the matrices as ``.npy`` and reports times, the resident memory once
everything is loaded and warmed up (``rss_warm_mb``, the baseline of
"+MB"), iteration counts, fitted attributes and warnings.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
import warnings

import _harness as H

# ---------------------------------------------------------------- settings
FAMILIES = ("direct", "cg", "arnoldi", "nystroem", "lissa", "datainf", "ekfac")
SKINFL_CLASSES = {"direct": "DirectInfluence", "cg": "CgInfluence", "arnoldi": "ArnoldiInfluence",
                  "nystroem": "NystroemInfluence", "lissa": "LissaInfluence",
                  "datainf": "DataInfInfluence", "ekfac": "EkfacInfluence"}
# The settings each skinfl class takes: setting -> constructor parameter.
SKINFL_PARAMETERS = {
    "common": {k: k for k in ("regularization", "batch_size", "second_order", "random_state", "memory")},
    "direct": {},
    "cg": {"rtol": "rtol", "atol": "atol", "max_iter": "max_iter", "preconditioner": "preconditioner",
           "preconditioner_rank": "preconditioner_rank", "cg_method": "solver"},
    "arnoldi": {"rank": "rank", "krylov_dimension": "krylov_dimension", "tol": "tol"},
    "nystroem": {"rank": "rank"},
    "lissa": {k: k for k in ("scale", "dampen", "max_iter", "rtol", "minibatch_size")},
    "datainf": {},
    "ekfac": {k: k for k in ("fisher", "n_target_draws", "correct_eigenvalues")},
}
PYDVL_CG_ATOL = 1e-10  # pyDVL stops at ||r|| < max(rtol**2 ||b||, atol**2): atol**2 = 1e-20 removes the floor
GAUSS_NEWTON = ("datainf", "ekfac")  # these approximate the Gauss-Newton matrix, the others solve with the Hessian
SOLVER_METHODS = ("cg", "cg_plain", "cg_ekfac", "arnoldi{}", "nystroem{}", "lissa", "datainf", "ekfac", "ekfac_exact",
                  "ekfac_empirical")


def family_of(method):
    """``"arnoldi50"`` -> ``"arnoldi"``, ``"cg_plain"`` -> ``"cg"``, ``"ekfac_exact"`` -> ``"ekfac"``."""
    family = re.match(r"[a-z]+", method).group()
    if family not in FAMILIES:
        raise ValueError(f"unknown method {method!r}")
    return family


def solver_methods(ranks):
    return [m.format(r) for m in SOLVER_METHODS for r in (ranks if "{" in m else [None])]


def solver_settings(method, *, n_params, top_eigenvalue, regularization, batch_size, lissa_max_iter=1000,
                    arnoldi_projected=False, cg_method=None):
    """What every library gets for ``method`` in bench_solvers.py and loo_logreg.py (see the README)."""
    family = family_of(method)
    s = {"regularization": regularization, "batch_size": batch_size, "random_state": 0}
    if family == "cg":
        s.update(rtol=1e-4, atol=0.0, max_iter=1000, block=True, cg_method=cg_method,
                 preconditioner={"cg": "nystroem", "cg_plain": None, "cg_ekfac": "ekfac"}[method])
        if method == "cg":
            s["preconditioner_rank"] = min(100, n_params)
        if cg_method is None:
            del s["cg_method"]
    elif family in ("arnoldi", "nystroem"):
        s["rank"] = rank = int(method[len(family):])
        if family == "arnoldi":  # pyDVL's default Krylov dimension, given to both
            s.update(krylov_dimension=min(n_params, max(2 * rank + 1, 20)), tol=1e-6,
                     inverse="projected" if arnoldi_projected else "woodbury")
    elif family == "lissa":  # the recursion diverges when a minibatch's curvature exceeds the scale
        scale = 3.0 * (top_eigenvalue + regularization)
        magnitude = 10.0 ** math.floor(math.log10(scale))  # rounded up to one significant digit
        s.update(scale=math.ceil(scale / magnitude) * magnitude, dampen=0.0, max_iter=lissa_max_iter, rtol=1e-10,
                 minibatch_size=batch_size)  # rtol so small that neither library stops early
    elif family == "datainf":
        s.update(second_order="gauss_newton", blocks="layer")
    elif family == "ekfac":
        s.update(second_order="gauss_newton", fisher="empirical" if method == "ekfac_empirical" else "true",
                 n_target_draws=None if method == "ekfac_exact" else 1, correct_eigenvalues=True)
    return s


def curvature_of(method):
    return "gauss_newton" if family_of(method) in GAUSS_NEWTON else "hessian"


def unavailable(lib, method):
    """Why ``lib`` has no ``method``, or None."""
    family = family_of(method)
    if lib == "pydvl":
        return {"cg_ekfac": "pyDVL 0.10.0's CG has no EK-FAC preconditioner",
                "ekfac_exact": "pyDVL 0.10.0's EkfacInfluence has no exact expectation (no drawn targets)",
                "ekfac_empirical": "pyDVL 0.10.0's EkfacInfluence has no empirical-Fisher option"}.get(method)
    if lib == "kronfluence":
        if method == "ekfac_exact":
            return "kronfluence 1.0.1's true Fisher draws one target per point (no exact expectation)"
        return None if family == "ekfac" else "kronfluence is run for its EK-FAC only"
    return None


# ------------------------------------------------------------- constructors
def skinfl_estimator(method, model, settings):
    """The skinfl estimator of ``method`` with ``settings``: every skinfl constructor call of the benchmarks."""
    import skinfl

    family = family_of(method)
    cls = getattr(skinfl, SKINFL_CLASSES[family], None)
    if cls is None:
        raise H.NotAvailable(f"skinfl {skinfl.__version__} has no {SKINFL_CLASSES[family]}")
    names = {**SKINFL_PARAMETERS["common"], **SKINFL_PARAMETERS[family]}
    kwargs = {names[k]: v for k, v in settings.items() if k in names}
    kwargs.setdefault("random_state", 0)
    try:
        return cls(model, loss="cross_entropy", **kwargs)
    except TypeError as error:  # a parameter this version does not have
        raise H.NotAvailable(f"skinfl {SKINFL_CLASSES[family]}: {error}") from error


def pydvl_estimator(method, model, s):
    import torch
    import torch.nn.functional as F
    from pydvl.influence.torch import (ArnoldiInfluence, BlockMode, CgInfluence, DirectInfluence, EkfacInfluence,
                                       InverseHarmonicMeanInfluence, LissaInfluence, NystroemSketchInfluence)

    family, loss, regularization = family_of(method), F.cross_entropy, s["regularization"]
    if family == "direct":
        return DirectInfluence(model, loss, regularization)
    if family == "cg":
        preconditioner = None
        if s.get("preconditioner") == "nystroem":
            preconditioner = _returning_nystroem_preconditioner()(rank=s["preconditioner_rank"])
        return CgInfluence(model, loss, regularization, rtol=s["rtol"] ** 0.5, atol=PYDVL_CG_ATOL,
                           maxiter=s["max_iter"], preconditioner=preconditioner, solve_simultaneously=s["block"])
    if family == "arnoldi":
        return ArnoldiInfluence(model, loss, regularization, rank=s["rank"], krylov_dimension=s["krylov_dimension"],
                                tol=s["tol"], use_woodbury=s["inverse"] == "woodbury")
    if family == "nystroem":
        return NystroemSketchInfluence(model, loss, regularization, rank=s["rank"])
    if family == "lissa":
        return LissaInfluence(model, loss, regularization, maxiter=s["max_iter"], dampen=s["dampen"],
                              scale=s["scale"], rtol=s["rtol"], warn_on_max_iteration=False)
    if family == "datainf":
        # LAYER_WISE finds no block in a model that is itself the only layer; one block is the same thing there.
        blocks = BlockMode.LAYER_WISE if list(model.children()) else BlockMode.FULL
        _average_batches_equally()
        return InverseHarmonicMeanInfluence(model, loss, regularization, block_structure=blocks)
    if method != "ekfac":
        raise H.NotAvailable(unavailable("pydvl", method))
    # Its EK-FAC takes nn.Linear layers only ("not supported" on the CNN) and has its own Fisher.
    odd = any(isinstance(m, torch.nn.Linear) and m.bias is None for m in model.modules()) or any(
        p.dtype != torch.float32 for p in model.parameters())
    return (_fixed_ekfac_influence() if odd else EkfacInfluence)(model, update_diagonal=True,
                                                                 hessian_regularization=regularization)


def _returning_nystroem_preconditioner():
    """pyDVL 0.10.0's NystroemPreconditioner with the ``return self`` its ``_fit`` lacks.

    ``Preconditioner.fit`` returns what ``_fit`` returns (None here) and
    ``CgInfluence`` keeps that: it computes the sketch, then runs CG without it.
    """
    from pydvl.influence.torch.preconditioner import NystroemPreconditioner

    class ReturningNystroemPreconditioner(NystroemPreconditioner):
        def _fit(self, operator, regularization=None):
            super()._fit(operator, regularization)
            return self

    return ReturningNystroemPreconditioner


def _fixed_ekfac_influence():
    """pyDVL 0.10.0's EkfacInfluence, fixed for float64 models and ``nn.Linear`` layers without bias.

    Its ``fit`` allocates the factors in torch's default dtype (float32: a
    float64 model then fails with "expected m1 and m2 to have the same
    dtype"), and its ``_solve_hvp_by_layer`` always reads the last
    ``out_features`` entries of a layer's gradient as a bias (a bias-free
    weight is then read shifted). This subclass fits in the model's dtype and
    reads a bias-free layer as its ``(out, in)`` weight; with a bias it does
    exactly what pyDVL does. Used only where one of the two applies.
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
            solved, start = {}, 0
            for layer_id, (module, evecs_a, evecs_g, diag) in ekfac_representation:
                end = start + diag.shape[0]
                block, n_out, bias = rhs[:, start:end], evecs_g.shape[0], module.bias is not None
                block = (torch.cat([block[:, :-n_out].reshape(len(rhs), n_out, -1), block[:, -n_out:, None]], dim=2)
                         if bias else block.reshape(len(rhs), n_out, -1))
                inner = evecs_g.t() @ block @ evecs_a
                inverse = evecs_g @ (inner / (diag.reshape(inner.shape[1:]) + hessian_regularization)) @ evecs_a.t()
                solved[layer_id] = (torch.cat([inverse[:, :, :-1].reshape(len(rhs), -1), inverse[:, :, -1]], dim=1)
                                    if bias else inverse.reshape(len(rhs), -1))
                start = end
            return solved

    return FixedEkfacInfluence


def _average_batches_equally():
    """Make pyDVL 0.10.0's ``PointAveraging`` (used by its DataInf) the plain mean of the batch results.

    It starts from the first batch's result unweighted and adds each later one
    times the result's leading size (vectors, not points), so with ``b``
    batches DataInf comes out ``(1/k + b - 1) / b`` times the mean. Equal
    batches (the batch size divides n_train) make the plain mean the mean over points.
    """
    from pydvl.influence.torch import batch_operation

    def mean_of_tensors(self, tensors):
        tensors = list(tensors)
        return sum(tensors[1:], tensors[0].clone()) / len(tensors)

    def mean_of_dicts(self, dicts):
        dicts = list(dicts)
        return {key: sum(d[key] for d in dicts) / len(dicts) for key in dicts[0]}

    batch_operation.PointAveraging.__call__ = mean_of_tensors
    batch_operation._TensorDictPointAveraging.__call__ = mean_of_dicts


def _kronfluence_ekfac():
    """kronfluence 1.0.1's Analyzer with ``FactorArguments(strategy="ekfac")`` behind ``fit`` / ``influences``.

    Conventions (from its source, checked against skinfl with the empirical
    Fisher): the task's train loss and measurement are cross-entropy *summed*
    over the batch (per-sample gradients come from the batch loss's backward
    hooks; a mean would scale them by 1 / batch); its eigenvalues are means
    over samples, so ``damping_factor`` is skinfl's ``regularization`` as it
    is; the true Fisher draws one target per point from the softmax with
    torch's global generator. Only Linear and Conv2d are tracked; a bare
    Linear is put in an ``nn.Sequential`` (``prepare_model`` wraps modules
    inside a parent). Covariances, per-sample gradients, eigenvalues and
    scores in the model's dtype (its defaults are float32). Factor and score
    files go to ``work_dir``; writing and reading them is timed.
    """
    import copy

    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, targets = batch
            logits = model(inputs)
            if sample:  # the true Fisher: targets drawn from the model's predictive distribution
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).squeeze(-1)
            return F.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    class KronfluenceEkfac:
        def __init__(self, model, regularization, batch_size, work_dir, fisher="true"):
            self.model, self.regularization, self.batch_size = model, regularization, batch_size
            self.work_dir, self.fisher, self.dtype = work_dir, fisher, next(model.parameters()).dtype

        def fit(self, X, y):
            model = copy.deepcopy(self.model)
            model = model if list(model.children()) else torch.nn.Sequential(model)
            task = ClassificationTask()
            self.analyzer = Analyzer(analysis_name="run", model=prepare_model(model, task), task=task, cpu=True,
                                     disable_tqdm=True, output_dir=str(self.work_dir), disable_model_save=True)
            d = self.dtype
            arguments = FactorArguments(
                strategy="ekfac", use_empirical_fisher=self.fisher == "empirical", covariance_max_examples=None,
                lambda_max_examples=None, activation_covariance_dtype=d, gradient_covariance_dtype=d,
                per_sample_gradient_dtype=d, lambda_dtype=d)
            self.train = TensorDataset(X, y)
            self.analyzer.fit_all_factors("ekfac", dataset=self.train, per_device_batch_size=self.batch_size,
                                          factor_args=arguments, overwrite_output_dir=True)
            return self

        def influences(self, X_test, y_test):
            d = self.dtype
            arguments = ScoreArguments(damping_factor=self.regularization, per_sample_gradient_dtype=d,
                                       precondition_dtype=d, score_dtype=d)
            self.analyzer.compute_pairwise_scores(
                scores_name="pairwise", factors_name="ekfac", query_dataset=TensorDataset(X_test, y_test),
                train_dataset=self.train, per_device_query_batch_size=min(self.batch_size, len(X_test)),
                per_device_train_batch_size=self.batch_size, score_args=arguments, overwrite_output_dir=True)
            return self.analyzer.load_pairwise_scores("pairwise")["all_modules"]

    return KronfluenceEkfac


# ------------------------------------------------------------------- worker
class _Fitted:
    """One library's estimator of ``method`` on ``(X, y)``: ``fit()``, ``apply(X_query, y_query)``
    (``None, None``: self-influence) and ``regularize(r)``."""

    def __init__(self, lib, method, model, settings, X, y, scratch):
        self.lib, self.X, self.y, self.settings = lib, X, y, dict(settings)
        if unavailable(lib, method):
            raise H.NotAvailable(unavailable(lib, method))
        if lib == "skinfl":
            self.est = skinfl_estimator(method, model, settings)
        elif lib == "kronfluence":
            try:
                cls = _kronfluence_ekfac()
            except ImportError as error:
                raise H.NotAvailable(f"kronfluence cannot be imported ({error}): run setup_pydvl_env.sh") from error
            self.est = cls(model, settings["regularization"], settings["batch_size"], scratch,
                           settings.get("fisher", "true"))
        else:
            self.batch = min(settings["batch_size"], len(X))
            if len(X) % self.batch:
                raise ValueError(f"pyDVL batch {self.batch} must divide n_train={len(X)}: it averages batch means "
                                 "unweighted")
            self.est = pydvl_estimator(method, model, settings)

    def fit(self):
        if self.lib == "pydvl":
            from torch.utils.data import DataLoader, TensorDataset

            return self.est.fit(DataLoader(TensorDataset(self.X, self.y), batch_size=self.batch, shuffle=False))
        return self.est.fit(self.X, self.y)

    def apply(self, Xq, yq):
        import torch

        if self.lib != "pydvl":
            return self.est.influences(Xq, yq) if Xq is not None else self.est.self_influence(self.X, self.y)
        from pydvl.influence import InfluenceMode

        if Xq is not None:
            return self.est.influences(Xq, yq, self.X, self.y, mode=InfluenceMode.Up)
        # pyDVL 0.10.0 has no self-influence: the diagonal of its symmetric influences, 200 points at a time.
        X, y = self.X, self.y
        return torch.cat([torch.diagonal(self.est.influences(X[i:i + 200], y[i:i + 200], mode=InfluenceMode.Up))
                          for i in range(0, len(X), 200)])

    def regularize(self, r):
        """pyDVL changes the regularization of the fitted estimator; skinfl refits (kronfluence: not needed)."""
        if r != self.settings["regularization"]:
            self.settings["regularization"] = r
            if self.lib == "pydvl":
                self.est = self.est.with_regularization(r)
            else:
                self.est.set_params(regularization=r)
                self.fit()


def _query(data, output, dtype):
    import torch

    if output["query"] == "self":
        return None, None
    rows = slice(output.get("rows"))
    return (torch.as_tensor(data[f"X_{output['query']}"][rows], dtype=dtype),
            torch.as_tensor(data[f"y_{output['query']}"][rows]))


def _scratch():
    """A temporary folder under .work/ (kronfluence's factor and score files)."""
    (H.WORK_DIR / "scratch").mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=H.WORK_DIR / "scratch")


def _warm_up(lib, task, data):
    """The task's method on a small untrained model and a few points, with small settings."""
    import torch

    import _problems as P

    dtype = getattr(torch, task["model"].get("dtype", "float32"))
    small = {"regularization": 1.0, "rank": 5, "krylov_dimension": 20, "preconditioner_rank": 5, "max_iter": 5,
             "scale": 100.0, "minibatch_size": 5}
    settings = {**task["settings"], **{k: v for k, v in small.items() if k in task["settings"]}, "batch_size": 5}
    X, y = torch.as_tensor(data["X_train"][:10], dtype=dtype), torch.as_tensor(data["y_train"][:10])
    with _scratch() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = _Fitted(lib, task["method"], P.warmup_model(task["model"]["arch"], dtype), settings, X, y, scratch)
        run.fit()
        run.apply(*((None, None) if task["outputs"][0]["query"] == "self" else (X[:2], y[:2])))


def run_tasks(spec):
    """Worker entry: each of ``spec["tasks"]`` on ``spec["data"]`` (an npz), with ``spec["lib"]``."""
    import numpy as np
    import torch

    import _problems as P

    lib, tasks = spec["lib"], spec["tasks"]
    data = dict(np.load(H.REPO_ROOT / spec["data"]))
    record = {"rss_loaded_mb": H.maxrss_mb(), "warmup": {}}
    start = time.perf_counter()
    for task in tasks:
        key = f"{task['method']} {task['model']['arch']} {task['model'].get('dtype', 'float32')}"
        if key not in record["warmup"] and not unavailable(lib, task["method"]):
            try:
                _warm_up(lib, task, data)
                record["warmup"][key] = "ok"
            except Exception as error:  # the task itself reports it
                record["warmup"][key] = f"{type(error).__name__}: {error}"[:300]
    record.update(warmup_s=time.perf_counter() - start, rss_warm_mb=H.maxrss_mb(), tasks=[])
    for task in tasks:
        out = {k: task[k] for k in ("name", "method", "settings") if k in task}
        model = P.load_model(task["model"])
        dtype = next(model.parameters()).dtype
        X, y = torch.as_tensor(data["X_train"], dtype=dtype), torch.as_tensor(data[task.get("labels", "y_train")])
        first_log = len(H.LOG.records)
        torch.manual_seed(task.get("seed", 0))
        with warnings.catch_warnings(record=True) as caught, _scratch() as scratch:
            warnings.simplefilter("always")
            try:
                run = _Fitted(lib, task["method"], model, task["settings"], X, y, scratch)
                t0 = time.perf_counter()
                run.fit()
                out.update(status="ok", fit_s=time.perf_counter() - t0, outputs=[])
                for output in task["outputs"]:
                    t0 = time.perf_counter()
                    run.regularize(output.get("regularization", run.settings["regularization"]))
                    values = run.apply(*_query(data, output, dtype))
                    matrix = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
                    np.save(H.REPO_ROOT / output["file"], matrix)
                    out["outputs"].append({**output, "seconds": time.perf_counter() - t0,
                                           "finite": bool(np.isfinite(matrix).all())})
                out["influences_s"] = sum(o["seconds"] for o in out["outputs"])
                out["total_s"] = out["fit_s"] + out["influences_s"]
                out["fitted"] = fitted_attributes(run.est) if lib == "skinfl" else {}
                out["iterations"] = _iterations(lib, out["fitted"], H.LOG.records[first_log:])
            except (H.NotAvailable, H.NotSupported) as error:
                out.update(status="not available" if isinstance(error, H.NotAvailable) else "not supported",
                           reason=str(error))
            except Exception as error:
                if type(error).__name__ != "NotImplementedLayerRepresentationException":  # pyDVL's EK-FAC on a CNN
                    raise
                out.update(status="not supported", reason=f"{type(error).__name__}: {error}"[:300])
        out["warnings"] = H.summarise(H.warning_messages(caught))
        out["log_warnings"] = H.summarise(H.log_warnings(H.LOG.records[first_log:]))
        record["tasks"].append(out)
    if len(tasks) == 1:  # a single run: its figures are the record's
        record.update({k: v for k, v in record["tasks"][0].items() if k not in ("warnings", "log_warnings")})
    return record


def fitted_attributes(estimator):
    """Public fitted scalars (n_iter_, solver_, ...) and the largest relative CG residual."""
    out = {k: v for k, v in vars(estimator).items() if k.endswith("_") and not k.startswith("_")
           and k not in ("n_features_in_", "n_params_", "n_samples_fit_") and isinstance(v, (bool, int, float, str))}
    for key in ("n_iter_", "relative_residuals_"):  # computed on access (of the last solving call)
        try:
            value = getattr(estimator, key)
        except Exception:  # absent, or not set yet
            continue
        if isinstance(value, (bool, int, float)):
            out[key] = value
        elif hasattr(value, "tolist"):
            out[key] = [float(v) for v in value.reshape(-1)][:20]
    return out


def _iterations(lib, fitted, records):
    """skinfl's n_iter_; pyDVL's block CG and LiSSA iterations from its DEBUG log."""
    if lib == "skinfl":
        return {"n_iter_": fitted["n_iter_"]} if "n_iter_" in fitted else None
    counts = {"cg": [], "lissa": []}
    for _, _, message in records:
        if m := re.search(r"Terminated (?:block )?cg after (\d+) iterations", message):
            counts["cg"].append(int(m.group(1)))
        elif m := re.search(r"Terminated Lissa after (\d+) iterations", message):
            counts["lissa"].append(int(m.group(1)))
        elif m := re.search(r"Reached max number of iterations (?:maxiter=)?(\d+)", message):
            counts["lissa" if "issa" in message else "cg"].append(int(m.group(1)))
    return {k: v for k, v in counts.items() if v} or None


# --------------------------------------------------------------------- host
def task(name, model, method, settings, outputs, **extra):
    """A task of :func:`run_tasks`: ``model`` a ``_problems.model_spec``; ``outputs`` from :func:`output`."""
    return {"name": name, "method": method, "model": model, "settings": settings, "outputs": outputs, **extra}


def output(query, path, **extra):
    """An output of a task: influences of the query set ``val`` / ``test`` (``rows``: the first ones only), or
    ``self``-influence, at the task's or at ``regularization``, saved as ``path``."""
    return {"query": query, "file": str(path.relative_to(H.REPO_ROOT)), **extra}


def run(lib, data, tasks, args, timeout=None):
    """One worker of ``lib`` running ``tasks`` on the npz file ``data``."""
    spec = {"entry": "_estimators:run_tasks", "data": str(data.relative_to(H.REPO_ROOT)), "tasks": tasks}
    return H.launch(spec, lib, args, timeout)
