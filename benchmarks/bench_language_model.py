"""A tiny byte-level GPT-2: skinfl's EK-FAC against kronfluence 1.0.1's, with a linear datamodeling score.

Data: the docstrings of Python's standard library (modules, classes and
functions of its ``.py`` files, read with ``ast`` in sorted path order,
nothing imported; tests, IDLE and ``site-packages`` left out), as UTF-8
bytes: token = byte value, a vocabulary of 256. The text is cut into
non-overlapping sequences of 64 bytes, duplicates dropped, and a seeded
permutation picks 1,000 training and 100 query sequences (disjoint).

Model: ``transformers.GPT2LMHeadModel`` (2 layers, width 64, 4 heads,
context 64, eager attention, no dropout, output layer not tied to the
embedding: 136,960 parameters), trained by AdamW (lr 2e-3, batches of 32,
20 epochs, seeded initialisation and order) on the mean token
cross-entropy. Influences and the ground truth use the per-sequence loss:
the SUM of the 63 next-token cross-entropies (logits at position t
predict byte t + 1).

Influences (query x training, positive = helpful), in a fresh worker each,
the regularization (damping) and batches the same everywhere:

- ``kronfluence``: its Analyzer, ``FactorArguments(strategy="ekfac")``, on
  the model with every transformers ``Conv1D`` (weight stored ``(in,
  out)``) replaced by the equivalent ``nn.Linear`` (checked: same logits);
  a Task whose loss is the summed token cross-entropy, with targets drawn
  from the model's predictive distribution for the factors (true Fisher).
  Its blocks are the modules it tracks: the 8 Linear layers of the
  transformer blocks and the output layer (embeddings and layer norms are
  not tracked).
- ``skinfl (all parameters)``: ``EkfacInfluence(model, loss="causal_lm")``
  on the model as transformers builds it (Conv1D), every parameter, one
  drawn target per token (its blocks: ``layer_approximations_``, in the
  notes of the results).
- ``skinfl (9 layers)``: the same with ``parameters=`` the 9 layers
  kronfluence tracks: the same blocks.
- A deterministic check: both on the 9 layers with the empirical Fisher
  (the training targets, nothing drawn): the same computation, so their
  matrices should agree to float32 rounding (skinfl on Conv1D, kronfluence
  on Linear).

Regularization 0.1 for every estimator (skinfl's ``regularization`` is
kronfluence's ``damping_factor``: see the README); the check also runs at
0.01, where skinfl's pseudo-inverse leaves some directions out.

Ground truth: the same recipe (same initialisation, same order seed)
retrained on 50 random halves of the training set; each retrained model's
summed query losses. LDS = mean over queries of the Spearman correlation,
across subsets, between the loss predicted by the influences (``-sum`` over
the subset of a query's influences: more helpful sequences kept, lower
loss) and the actual loss, with a Student-t 95% interval over queries
(``skinfl.metrics.linear_datamodeling_score``).

Memory: each worker's peak resident memory and what the fit and the
scores added to it; the fits alone with batches of 10, 50 and 100
sequences; and, from the shapes, the tensors per layer of one batch of
skinfl's statistics pass.

The data, the model and the retrainings are cached in
``benchmarks/.work/lm/`` (``lm_quick``). Results:
``results/language_model.{md,json}`` (``_quick``: 200 training / 20 query
sequences, 10 epochs, 12 subsets).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import ast  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

SEED, ORDER_SEED, DATA_SEED, MASK_SEED = 0, 1, 0, 0
SEQ_LEN, VOCAB = 64, 256
CONFIG = dict(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
              embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False, attn_implementation="eager",
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages",
             "dist-packages", "__pycache__"}
CONFIDENCE, ALPHA = 0.95, 0.5
CONVERSION_TOLERANCE = 1e-5
# (C + lambda I)^-1, C the mean over training sequences of the Gauss-Newton matrix of a sequence's summed loss.
# kronfluence's default damping heuristic, 0.1 x its mean EK-FAC eigenvalue, is 0.076 on the full model.
REGULARIZATION = 0.1


@dataclass(frozen=True)
class Setup:
    name: str
    n_train: int
    n_query: int
    epochs: int
    n_subsets: int
    learning_rate: float = 2e-3
    train_batch: int = 32
    batch_size: int = 50  # every library's batch for the statistics passes and the scores

    @property
    def work_dir(self):
        return H.WORK_DIR / ("lm" if self.name == "full" else "lm_quick")

    def recipe(self):
        """What the trained model and the retrainings depend on (their cache key)."""
        return {"config": CONFIG, "n_train": self.n_train, "n_query": self.n_query, "epochs": self.epochs,
                "learning_rate": self.learning_rate, "train_batch": self.train_batch, "seed": SEED,
                "order_seed": ORDER_SEED, "data_seed": DATA_SEED}


SETUPS = {"full": Setup("full", 1000, 100, 20, 50), "quick": Setup("quick", 200, 20, 10, 12)}


# --------------------------------------------------------------------- data
def stdlib_docstrings():
    """The docstrings of the standard library's ``.py`` files (sorted paths; ``ast``, nothing imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not set(p.relative_to(root).parts[:-1]) & SKIP_DIRS
                   and not p.relative_to(root).parts[0].startswith("config-"))
    docs = []
    for path in files:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return files, docs


def make_data(n_train, n_query, seed=DATA_SEED):
    """``X_train`` (n_train, 64) and ``X_query`` (n_query, 64) int64 byte sequences, disjoint, and a summary."""
    files, docs = stdlib_docstrings()
    text = "\n\n".join(docs).encode("utf-8")
    n = len(text) // SEQ_LEN
    chunks = np.frombuffer(text[:n * SEQ_LEN], dtype=np.uint8).reshape(n, SEQ_LEN)
    chunks = np.unique(chunks, axis=0)  # sorted, no duplicates: a query never repeats a training sequence
    order = np.random.RandomState(seed).permutation(len(chunks))
    if len(order) < n_train + n_query:
        raise ValueError(f"only {len(order)} distinct sequences of {SEQ_LEN} bytes")
    X = chunks[order[:n_train + n_query]].astype(np.int64)
    info = {"files": len(files), "docstrings": len(docs), "bytes": len(text), "sequences": int(len(chunks)),
            "text_sha1": hashlib.sha1(text).hexdigest()[:12], "python": sys.version.split()[0]}
    return X[:n_train], X[n_train:], info


def decode(ids):
    """A byte sequence as text (undecodable bytes replaced)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# -------------------------------------------------------------------- model
def build_model(seed=SEED):
    """A fresh GPT-2 of :data:`CONFIG`, initialised from ``seed`` (the global generator is left as it was)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG))
    torch.random.set_rng_state(state)
    return model.eval()


def load_model(path):
    import torch

    model = build_model()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def conv1d_to_linear(model):
    """``model`` with every transformers ``Conv1D`` replaced by the equivalent ``nn.Linear``, in place.

    ``Conv1D(nf, nx)`` computes ``x @ W + b`` with ``W`` of shape ``(nx, nf)``:
    ``Linear(nx, nf)`` with weight ``W.T`` and the same bias. Returns the
    number of modules replaced.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                linear = torch.nn.Linear(n_in, n_out, bias=child.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)
                replaced += 1
    return replaced


def linear_model(model, X):
    """A copy of ``model`` with its Conv1D layers as ``nn.Linear``, and the max |logit difference| on ``X``."""
    import copy

    import torch

    converted = copy.deepcopy(model)
    replaced = conv1d_to_linear(converted)
    with torch.no_grad():
        difference = float((model(X).logits - converted(X).logits).abs().max())
    if not difference < CONVERSION_TOLERANCE:
        raise AssertionError(f"Conv1D -> Linear changed the logits by {difference:.3g} (> {CONVERSION_TOLERANCE})")
    return converted.eval(), {"replaced": replaced, "max_abs_logit_difference": difference}


def sequence_losses(model, X, batch=100):
    """Summed next-token cross-entropy of each sequence (float64 numpy)."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for i in range(0, len(X), batch):
            ids = X[i:i + batch]
            logits = model(ids).logits[:, :-1]
            token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            out.append(token.view(len(ids), -1).sum(1).double())
    return torch.cat(out).numpy()


def train(X, setup, log=None):
    """The recipe: AdamW on the mean token cross-entropy, seeded initialisation and order."""
    import torch
    import torch.nn.functional as F

    model = build_model(SEED).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(ORDER_SEED)
    for epoch in range(setup.epochs):
        order = torch.randperm(len(X), generator=generator)
        for i in range(0, len(X), setup.train_batch):
            ids = X[order[i:i + setup.train_batch]]
            optimizer.zero_grad()
            logits = model(ids).logits[:, :-1]
            F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
            optimizer.step()
        if log:
            log(epoch)
    return model.eval()


# ----------------------------------------------------------- training worker
def subset_file(work, masks, s):
    """Where the query losses of the model retrained on subset ``s`` are cached (named by its mask)."""
    return work / "subsets" / f"{s}-{hashlib.sha1(np.packbits(masks[s]).tobytes()).hexdigest()[:10]}.npy"


def train_entry(spec):
    """Worker entry: train the full model and/or retrain on subsets; each result written to its file."""
    import torch

    setup = SETUPS[spec["setup"]]
    work = H.REPO_ROOT / spec["work"]
    data = np.load(work / "data.npz")
    X, Xq = torch.as_tensor(data["X_train"]), torch.as_tensor(data["X_query"])
    masks = np.load(work / "masks.npy") if spec["subsets"] else None
    done = []
    for job in spec["jobs"]:
        start = time.perf_counter()
        if job == "full":
            model = train(X, setup)
            torch.save(model.state_dict(), work / "model.pt")
            train_losses, query_losses = sequence_losses(model, X), sequence_losses(model, Xq)
            summary = {"n_params": sum(p.numel() for p in model.parameters()), "training_s": 0.0,
                       "train_loss_per_token": float(train_losses.mean() / (SEQ_LEN - 1)),
                       "query_loss_per_token": float(query_losses.mean() / (SEQ_LEN - 1)),
                       "untrained_query_loss_per_token": float(sequence_losses(build_model(), Xq).mean()
                                                               / (SEQ_LEN - 1))}
            summary["training_s"] = time.perf_counter() - start
            (work / "model.json").write_text(json.dumps(summary, indent=1))
        else:
            subset = torch.as_tensor(np.flatnonzero(masks[job]))
            model = train(X[subset], setup)
            np.save(subset_file(work, masks, job), sequence_losses(model, Xq))
        done.append({"job": job, "seconds": time.perf_counter() - start})
    return {"jobs": done}


def run_training(setup, work, jobs, args, n_workers):
    """``jobs`` (``"full"`` or subset indices) in ``n_workers`` parallel workers of one torch thread each."""
    if not jobs:
        return []
    one_thread = argparse.Namespace(**{**vars(args), "threads": 1})
    chunks = [jobs[i::n_workers] for i in range(n_workers) if jobs[i::n_workers]]
    spec = {"entry": "bench_language_model:train_entry", "setup": setup.name,
            "work": str(work.relative_to(H.REPO_ROOT)), "subsets": jobs != ["full"]}
    with ThreadPoolExecutor(len(chunks)) as pool:
        records = list(pool.map(lambda c: H.launch({**spec, "jobs": c}, "skinfl", one_thread), chunks))
    for record in records:
        if record["status"] != "ok":
            sys.exit(f"training failed: {record['status']}\n{record.get('error', '')}")
    return records


# ---------------------------------------------------------- influence worker
# The 9 layers kronfluence tracks (its Linear layers once Conv1D is replaced), as skinfl's parameters= patterns.
TRACKED = ["transformer.h.*.attn.c_attn.*", "transformer.h.*.attn.c_proj.*", "transformer.h.*.mlp.c_fc.*",
           "transformer.h.*.mlp.c_proj.*", "lm_head.*"]
VARIANTS = {
    # name: (library, parameters, fisher, regularization / --regularization); kronfluence always gets the Linear
    # model and tracks its 9 layers
    "kronfluence": ("kronfluence", "tracked", "true", 1.0),
    "skinfl": ("skinfl", "all", "true", 1.0),
    "skinfl_tracked": ("skinfl", "tracked", "true", 1.0),
    "kronfluence_empirical": ("kronfluence", "tracked", "empirical", 1.0),
    "skinfl_tracked_empirical": ("skinfl", "tracked", "empirical", 1.0),
    "kronfluence_empirical_small": ("kronfluence", "tracked", "empirical", 0.1),
    "skinfl_tracked_empirical_small": ("skinfl", "tracked", "empirical", 0.1),
}
LABELS = {"kronfluence": "kronfluence (9 layers)", "skinfl": "skinfl (all parameters)",
          "skinfl_tracked": "skinfl (9 layers)", "kronfluence_empirical": "kronfluence, empirical Fisher",
          "skinfl_tracked_empirical": "skinfl (9 layers), empirical Fisher",
          "kronfluence_empirical_small": "kronfluence, empirical Fisher, regularization / 10",
          "skinfl_tracked_empirical_small": "skinfl (9 layers), empirical Fisher, regularization / 10"}
MAIN_VARIANTS = ("kronfluence", "skinfl", "skinfl_tracked")
CHECK_PAIRS = (("skinfl_tracked_empirical", "kronfluence_empirical"),
               ("skinfl_tracked_empirical_small", "kronfluence_empirical_small"))


def _kronfluence_estimator():
    """kronfluence 1.0.1's EK-FAC behind ``fit(X)`` / ``influences(X_query)`` (sequences of token ids)."""
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class NextTokenTask(Task):
        """Per-sequence loss: summed next-token cross-entropy; ``sample``: targets drawn from the model."""

        def compute_train_loss(self, batch, model, sample=False):
            ids = batch[0]
            logits = model(input_ids=ids).logits[:, :-1]
            logits = logits.reshape(-1, logits.shape[-1])
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).squeeze(-1)
            else:
                targets = ids[:, 1:].reshape(-1)
            return F.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

    class KronfluenceEkfac:
        def __init__(self, model, regularization, batch_size, work_dir, fisher):
            self.model, self.regularization, self.batch_size = model, regularization, batch_size
            self.work_dir, self.fisher = work_dir, fisher

        def fit(self, X):
            task = NextTokenTask()
            self.analyzer = Analyzer(analysis_name="lm", model=prepare_model(self.model, task), task=task, cpu=True,
                                     disable_tqdm=True, output_dir=str(self.work_dir), disable_model_save=True)
            arguments = FactorArguments(strategy="ekfac", use_empirical_fisher=self.fisher == "empirical",
                                        covariance_max_examples=None, lambda_max_examples=None)
            self.train = TensorDataset(X)
            self.analyzer.fit_all_factors("ekfac", dataset=self.train, per_device_batch_size=self.batch_size,
                                          factor_args=arguments, overwrite_output_dir=True)
            return self

        def influences(self, X_query):
            self.analyzer.compute_pairwise_scores(
                scores_name="pairwise", factors_name="ekfac", query_dataset=TensorDataset(X_query),
                train_dataset=self.train, per_device_query_batch_size=min(self.batch_size, len(X_query)),
                per_device_train_batch_size=self.batch_size,
                score_args=ScoreArguments(damping_factor=self.regularization), overwrite_output_dir=True)
            return self.analyzer.load_pairwise_scores("pairwise")["all_modules"]

        def mean_eigenvalue(self):
            """The mean of its corrected eigenvalues (stored as sums over sequences, with their count)."""
            factors = self.analyzer.load_lambda_matrices("ekfac")
            sums, counts = factors["lambda_matrix"], factors["num_lambda_processed"]
            total = sum(float(v.sum()) / float(counts[k]) for k, v in sums.items())
            return total / sum(v.numel() for v in sums.values())

    return KronfluenceEkfac


class _Run:
    """One variant's estimator: ``fit(X)``, ``influences(X_query)``, what it reports."""

    def __init__(self, variant, model, settings, scratch):
        lib, parameters, fisher, _ = VARIANTS[variant]
        self.lib = lib
        if lib == "kronfluence":
            try:
                cls = _kronfluence_estimator()
            except ImportError as error:
                raise H.NotAvailable(f"kronfluence cannot be imported ({error}): run setup_pydvl_env.sh") from error
            self.est = cls(model, settings["regularization"], settings["batch_size"], scratch, fisher)
        else:
            import skinfl

            self.est = skinfl.EkfacInfluence(
                model, loss="causal_lm", parameters=TRACKED if parameters == "tracked" else None,
                regularization=settings["regularization"], batch_size=settings["batch_size"], fisher=fisher,
                n_target_draws=1 if fisher == "true" else "auto", random_state=0)

    def fit(self, X):
        return self.est.fit(X) if self.lib == "kronfluence" else self.est.fit(X, X)

    def influences(self, Xq):
        return self.est.influences(Xq) if self.lib == "kronfluence" else self.est.influences(Xq, Xq)

    def report(self):
        if self.lib == "kronfluence":
            return {"mean_eigenvalue": self.est.mean_eigenvalue()}
        est = self.est
        return {"layers_": list(est.layers_), "layer_approximations_": dict(est.layer_approximations_),
                "n_target_draws_": est.n_target_draws_, "loss_": repr(est.loss_), "n_params_": est.n_params_}


def _prepare(variant, model, X):
    """kronfluence: the model with Linear layers for Conv1D (checked); skinfl: the model as it is. A summary."""
    import fnmatch

    lib, parameters, _, _ = VARIANTS[variant]
    info = {}
    if lib == "kronfluence":
        model, info["conversion"] = linear_model(model, X[:100])
    names = [n for n, _ in model.named_parameters()]
    if parameters == "tracked":
        names = [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in TRACKED)]
    info["n_trainable"] = sum(p.numel() for n, p in model.named_parameters() if n in names)
    return model, info


def statistics_tensors(model, batch_size, X):
    """Per module with parameters: the tensors one batch of a statistics pass needs, from their shapes.

    Input activations (batch x T x width in), output gradients (batch x T x
    width out) and per-sample gradients (batch x the module's parameters), in
    MB of float32. Computed from one forward pass with hooks, not measured.
    """
    import torch

    shapes = {}

    def hook(name):
        def record(module, inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            shapes[name] = (list(inputs[0].shape), list(output.shape),
                            sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if any(p.requires_grad for p in m.parameters(recurse=False))]
    with torch.no_grad():
        model(X[:batch_size])
    for h in handles:
        h.remove()
    mb = 4 / 2**20
    return {name: {"input": i, "output": o, "input_mb": float(np.prod(i)) * mb, "output_gradient_mb":
                   float(np.prod(o)) * mb, "per_sample_gradient_mb": batch_size * n * mb, "type":
                   type(dict(model.named_modules())[name]).__name__} for name, (i, o, n) in shapes.items()}


def influence_entry(spec):
    """Worker entry: ``spec["variant"]`` fitted on the training sequences, the query x training influences
    (``spec["fit_only"]``: the fit alone, for its memory)."""
    import tempfile

    import torch

    torch.set_num_threads(spec["threads"])
    variant, settings = spec["variant"], spec["settings"]
    work = H.REPO_ROOT / spec["work"]
    data = np.load(work / "data.npz")
    X, Xq = torch.as_tensor(data["X_train"]), torch.as_tensor(data["X_query"])
    record = {"variant": variant, "settings": settings, "rss_loaded_mb": H.maxrss_mb()}
    scratch_root = H.WORK_DIR / "scratch"
    scratch_root.mkdir(parents=True, exist_ok=True)
    # Warm-up: the same method on an untrained model of the same architecture and a few sequences.
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=scratch_root) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, _ = _prepare(variant, build_model(seed=SEED + 1), X)
        warm = _Run(variant, small, {**settings, "batch_size": 4}, scratch)
        warm.fit(X[:8])
        warm.influences(Xq[:2])
    record.update(warmup_s=time.perf_counter() - start, rss_warm_mb=H.maxrss_mb())
    model, info = _prepare(variant, load_model(work / "model.pt"), X)
    record.update(info)
    if variant == "skinfl" and not spec.get("fit_only"):
        record["statistics_tensors"] = statistics_tensors(model, settings["batch_size"], X)
    torch.manual_seed(0)  # kronfluence's drawn targets: the global generator
    with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
        run = _Run(variant, model, settings, scratch)
        t0 = time.perf_counter()
        run.fit(X)
        record.update(fit_s=time.perf_counter() - t0, rss_after_fit_mb=H.maxrss_mb())
        record["fit_mb"] = record["rss_after_fit_mb"] - record["rss_warm_mb"]
        if spec.get("fit_only"):
            return record
        t0 = time.perf_counter()
        values = run.influences(Xq)
        record["influences_s"] = time.perf_counter() - t0
        record["total_s"] = record["fit_s"] + record["influences_s"]
        matrix = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        record.update(run.report())
    np.save(H.REPO_ROOT / spec["output"], matrix)
    record.update(shape=list(matrix.shape), finite=bool(np.isfinite(matrix).all()))
    return record


# --------------------------------------------------------------------- host
def prepare(setup, args):
    """Data, masks, the trained model and the retrainings' query losses, each computed once."""
    import skinfl.metrics as metrics

    key = hashlib.sha1(json.dumps(setup.recipe(), sort_keys=True).encode()).hexdigest()[:10]
    work = setup.work_dir / key
    (work / "subsets").mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(setup.recipe(), indent=1))
    if not (work / "data.npz").exists():
        X, Xq, info = make_data(setup.n_train, setup.n_query)
        np.savez(work / "data.npz", X_train=X, X_query=Xq)
        (work / "data.json").write_text(json.dumps(info, indent=1))
    masks = metrics.random_subsets(setup.n_train, ALPHA, args.n_subsets, random_state=MASK_SEED)
    np.save(work / "masks.npy", masks)
    costs = {}
    if not ((work / "model.pt").exists() and (work / "model.json").exists()):
        print(f"training the model ({setup.epochs} epochs on {setup.n_train} sequences)", flush=True)
        run_training(setup, work, ["full"], args, 1)
    todo = [s for s in range(args.n_subsets) if not subset_file(work, masks, s).exists()]
    if todo:
        print(f"retraining on {len(todo)} of {args.n_subsets} random halves ({args.n_jobs} workers)", flush=True)
        start = time.perf_counter()
        records = run_training(setup, work, todo, args, args.n_jobs)
        costs = {"retraining_wall_s": time.perf_counter() - start, "n_retrained": len(todo), "n_jobs": args.n_jobs,
                 "retraining_s": [j["seconds"] for r in records for j in r["jobs"]], "cached": False}
        (work / "retraining.json").write_text(json.dumps(costs, indent=1))
    elif (work / "retraining.json").exists():  # what the retrainings cost when they ran
        costs = {**json.loads((work / "retraining.json").read_text()), "cached": True}
    losses = np.stack([np.load(subset_file(work, masks, s)) for s in range(args.n_subsets)], axis=1)
    truth = metrics.DatamodelTruth(masks=masks, losses=losses)
    return work, truth, costs


def dropped_directions(record):
    """skinfl's NotPositiveDefiniteWarning: how many eigen-directions its pseudo-inverse left out, or None."""
    import re

    for message in record.get("warnings", []):
        if m := re.search(r"NotPositiveDefiniteWarning: ([\d,]+) of the ([\d,]+) eigenvalues", message):
            return f"{m.group(1)} of {m.group(2)}"
    return None


def main(argv=None):
    p = H.parser(__doc__, "200 training / 20 query sequences, 10 epochs, 12 subsets")
    p.add_argument("--n-subsets", type=int, help="retrainings on random halves (default 50; --quick 12)")
    p.add_argument("--n-jobs", type=int, default=2, help="parallel retraining workers, one thread each (default 2)")
    p.add_argument("--regularization", type=float, default=REGULARIZATION,
                   help=f"skinfl's regularization = kronfluence's damping_factor (default {REGULARIZATION:g})")
    p.add_argument("--skip-kronfluence", action="store_true", help="skinfl only")
    p.add_argument("--skip-skinfl", action="store_true", help="kronfluence only")
    p.add_argument("--skip-check", action="store_true", help="leave out the empirical-Fisher check")
    p.add_argument("--memory-batches", help="batch sizes at which the fits' memory is measured, fits alone "
                                            "(default 10,50,100; --quick 10,50; '' for none)")
    p.add_argument("--repeat", type=int, default=1,
                   help="fresh processes per estimator of the main table: the fastest is kept (default 1)")
    args = p.parse_args(argv)
    H.check_pydvl(p, args)
    setup = SETUPS["quick" if args.quick else "full"]
    args.n_subsets = args.n_subsets or setup.n_subsets
    if args.memory_batches is None:
        args.memory_batches = "10,50" if args.quick else "10,50,100"
    args.memory_batches = sorted({setup.batch_size, *(int(b) for b in args.memory_batches.split(",") if b)}) \
        if args.memory_batches else []
    no_kronfluence = args.skip_pydvl or args.skip_kronfluence
    name = args.output or ("language_model" + "_quick" * args.quick + "_skinfl" * no_kronfluence
                           + "_kronfluence" * args.skip_skinfl + "_no-check" * args.skip_check)
    run = H.Run(args, argv)
    work, truth, costs = prepare(setup, args)
    model_info = json.loads((work / "model.json").read_text())
    data_info = json.loads((work / "data.json").read_text())

    variants = [v for v in VARIANTS if not (no_kronfluence and VARIANTS[v][0] == "kronfluence")
                and not (args.skip_skinfl and VARIANTS[v][0] == "skinfl")
                and not (args.skip_check and v not in MAIN_VARIANTS)]
    records, matrices = {}, {}
    for variant in variants:
        lib = VARIANTS[variant][0]
        output = work / f"{variant}.npy"
        settings = {"regularization": args.regularization * VARIANTS[variant][3], "batch_size": setup.batch_size}
        spec = {"entry": "bench_language_model:influence_entry", "variant": variant, "settings": settings,
                "work": str(work.relative_to(H.REPO_ROOT)), "output": str(output.relative_to(H.REPO_ROOT))}
        if output.exists():
            output.unlink()
        repeat = args.repeat if variant in MAIN_VARIANTS else 1
        record = H.best_of(repeat, lambda: H.launch(spec, lib, args)) if repeat > 1 else H.launch(spec, lib, args)
        H.say(record, LABELS[variant])
        records[variant] = record
        if record.get("status") == "ok":
            matrices[variant] = np.load(output)

    # The memory of the fit against the batch of the statistics passes: fits alone, in fresh workers.
    memory = {}
    for batch in args.memory_batches:
        for variant in (v for v in ("kronfluence", "skinfl") if v in variants):
            spec = {"entry": "bench_language_model:influence_entry", "variant": variant, "fit_only": True,
                    "settings": {"regularization": args.regularization, "batch_size": batch},
                    "work": str(work.relative_to(H.REPO_ROOT))}
            record = records[variant] if batch == setup.batch_size and variant in records else H.launch(
                spec, VARIANTS[variant][0], args)
            if batch != setup.batch_size:
                H.say(record, f"{LABELS[variant]}, fit alone, batch {batch}")
            memory.setdefault(batch, {})[variant] = {k: record.get(k) for k in ("status", "fit_s", "fit_mb",
                                                                                 "peak_mb")}

    from skinfl import metrics

    lds = {}
    for variant, matrix in matrices.items():
        score = metrics.linear_datamodeling_score(matrix, truth, confidence=CONFIDENCE)
        lds[variant] = {"lds": float(score.score), "interval": [float(x) for x in score.interval],
                        "per_query": [float(x) for x in score.per_query]}

    # ------------------------------------------------------------------ tables
    def ok(variant):
        return records.get(variant, {}).get("status") == "ok"

    def get(variant, key, spec=".2f"):
        return H.fmt(records[variant].get(key) if ok(variant) else None, spec)

    def interval(variant):
        e = lds.get(variant)
        return "-" if not e else f"{e['lds']:.3f} [{e['interval'][0]:.3f}, {e['interval'][1]:.3f}]"

    def label(variant):
        s = records.get(variant, {}).get("status", "not run")
        return LABELS[variant] + ("" if s == "ok" else f" ({s})")

    def fit_mb(variant):
        return records[variant]["rss_after_fit_mb"] - records[variant]["rss_warm_mb"] if ok(variant) else None

    shown = [v for v in MAIN_VARIANTS if v in records]
    def left_out(variant):
        if VARIANTS[variant][0] != "skinfl" or not ok(variant):
            return ""
        return dropped_directions(records[variant]) or "none"

    table_main = H.table(
        ["estimator", "parameters", "fit s", "scores s", "total s", "peak MB", "fit +MB", "total +MB",
         "directions skinfl left out", f"LDS [{CONFIDENCE:.0%} CI]"],
        [[label(v), H.fmt(records[v].get("n_trainable"), ","), get(v, "fit_s"), get(v, "influences_s"),
          get(v, "total_s"), get(v, "peak_mb", ".0f"), H.fmt(fit_mb(v), ".0f"), get(v, "work_mb", ".0f"),
          left_out(v), interval(v)] for v in shown], 1)
    ratios = {}
    for v in ("skinfl", "skinfl_tracked"):
        if ok("kronfluence") and ok(v):
            k, s = records["kronfluence"], records[v]
            ratios[v] = {key: k[key] / s[key] for key in ("fit_s", "influences_s", "total_s", "peak_mb")}
    table_ratio = H.table(["kronfluence / ...", "fit", "scores", "total", "peak MB"],
                          [[LABELS[v]] + [f"{r[k]:.2f}" for k in ("fit_s", "influences_s", "total_s", "peak_mb")]
                           for v, r in ratios.items()], 1) if ratios else "(needs both libraries)"
    pairs = [("skinfl_tracked", "kronfluence"), ("skinfl", "kronfluence"), ("skinfl", "skinfl_tracked"),
             *CHECK_PAIRS]
    agreement, rows = {}, []
    for a, b in pairs:
        if a in matrices and b in matrices:
            s, c = H.agreement(matrices[a], matrices[b]), H.cross(matrices[a], matrices[b])
            agreement[f"{a} vs {b}"] = {**s, **(c or {})}
            rows.append([LABELS[a], LABELS[b], f"{s['pearson']:.6f}", f"{s['spearman_rows']:.6f}",
                         f"{s['max_rel_diff']:.2e}", f"{c['norm_ratio']:.4f}" if c else "-"])
    table_agree = H.table(["A", "B", "Pearson", "Spearman per query", "max|A-B|/max|B|", "norm ratio A/B"], rows,
                          2) if rows else "(needs two matrices)"
    check = [v for pair in CHECK_PAIRS for v in pair[::-1] if v in records]
    table_check = H.table(
        ["estimator", "regularization", "fit s", "scores s", "directions skinfl left out",
         f"LDS [{CONFIDENCE:.0%} CI]"],
        [[label(v), f"{args.regularization * VARIANTS[v][3]:g}", get(v, "fit_s"), get(v, "influences_s"),
          left_out(v), interval(v)] for v in check], 1) if check else "(not run)"

    def fit_memory(entry):
        if not entry or entry.get("status") != "ok":
            return (entry or {}).get("status", "-")
        return f"{entry['fit_mb']:.0f} MB, {entry['fit_s']:.1f} s"

    memory_rows = [[str(batch)] + [fit_memory(m.get(v)) for v in ("kronfluence", "skinfl")]
                   for batch, m in sorted(memory.items())]
    tensors = records.get("skinfl", {}).get("statistics_tensors") if ok("skinfl") else None
    tensors_table = "(skinfl did not run)"
    if tensors:
        tensors_table = H.table(
            ["module", "type", "input (batch x T x width)", "input MB", "output gradient MB", "per-sample gradient MB"],
            [[n, t["type"], " x ".join(map(str, t["input"])), f"{t['input_mb']:.2f}", f"{t['output_gradient_mb']:.2f}",
              f"{t['per_sample_gradient_mb']:.2f}"] for n, t in tensors.items()], 2)

    conversion = next((records[v]["conversion"] for v in records if records[v].get("conversion")), None)
    approximations = records.get("skinfl", {}).get("layer_approximations_")
    mean_eigenvalue = records.get("kronfluence", {}).get("mean_eigenvalue")
    retraining = costs.get("retraining_s")
    setup_table = H.table(["", "value"], [
        ["data", f"{data_info['docstrings']:,} docstrings of {data_info['files']} stdlib files (Python "
                 f"{data_info['python']}), {data_info['bytes']:,} bytes, {data_info['sequences']:,} distinct "
                 f"sequences of {SEQ_LEN} bytes; text sha1 {data_info['text_sha1']}"],
        ["training / query sequences", f"{setup.n_train} / {setup.n_query}"],
        ["model", f"GPT-2, {CONFIG['n_layer']} layers, width {CONFIG['n_embd']}, {CONFIG['n_head']} heads, "
                  f"context {SEQ_LEN}, untied output layer: {model_info['n_params']:,} parameters"],
        ["training", f"AdamW lr {setup.learning_rate:g}, batches of {setup.train_batch}, {setup.epochs} epochs, "
                     f"mean token cross-entropy; {model_info['training_s']:.0f} s (one thread)"],
        ["loss per token (nats): untrained / training / query",
         f"{model_info['untrained_query_loss_per_token']:.3f} / {model_info['train_loss_per_token']:.3f} / "
         f"{model_info['query_loss_per_token']:.3f}"],
        ["ground truth", f"{args.n_subsets} retrainings on random halves, same initialisation and order seed"
         + (f"; {costs['retraining_wall_s']:.0f} s wall for {costs['n_retrained']} ({np.mean(retraining):.1f} s "
            f"each, {costs['n_jobs']} workers of one thread)" + " (cached: the run that computed them)"
            * costs["cached"] if retraining else " (cached)")],
        ["regularization (= kronfluence damping_factor)", f"{args.regularization:g}"
         + (f" (kronfluence's mean EK-FAC eigenvalue: {mean_eigenvalue:.3g})" if mean_eigenvalue else "")],
        ["batch (statistics passes, scores)", str(setup.batch_size)],
        ["Conv1D -> Linear (kronfluence's model)",
         f"{conversion['replaced']} modules, max |logit difference| {conversion['max_abs_logit_difference']:.2e}"
         if conversion else "-"],
    ], 1)
    sections = [
        ("Setup", None, setup_table),
        ("Time, memory and LDS",
         f"Fit = factors (covariances, eigendecompositions, eigenvalue correction); scores = the {setup.n_query} x "
         f"{setup.n_train} influence matrix. Peak MB: the worker's ru_maxrss; +MB: what the fit, and the whole "
         "timed work, added to it after a warm-up run on an untrained model"
         + (f"; the fastest of {args.repeat} fresh processes (peak MB: the largest)" if args.repeat > 1 else "")
         + ". True Fisher, one drawn target per "
         "token. 9 layers: the 8 Conv1D/Linear layers of the transformer blocks and the output layer, kronfluence's "
         "blocks. Directions left out: skinfl's pseudo-inverse, which only regularization=0 uses (none with a "
         "positive regularization: EK-FAC's eigenvalues are never negative).", table_main),
        ("Time ratio kronfluence / skinfl", "Above 1: skinfl is faster (or uses less memory).", table_ratio),
        ("Agreement between the influence matrices", None, table_agree),
        ("Deterministic check: the empirical Fisher on the same 9 layers",
         "Nothing drawn: the two libraries compute the same EK-FAC (skinfl on the Conv1D layers, kronfluence on "
         "their Linear copies), so their matrices agree to float32 rounding at every regularization: with a "
         "positive one, skinfl inverts every direction, as kronfluence does.",
         table_check),
        ("The fit's memory against the batch of the statistics passes",
         "What the fit added to the warmed-up worker's peak resident memory (fit +MB), and its time, with "
         "batches of this many training sequences; each a fit alone in a fresh worker (the main batch: the "
         "workers above).",
         H.table(["batch", "kronfluence (9 layers)", "skinfl (all parameters)"], memory_rows, 1)
         if memory_rows else "(not measured: --memory-batches '')"),
        ("skinfl's statistics pass: tensors per batch and layer",
         f"From the shapes of one batch of {setup.batch_size} sequences (one forward pass with hooks), not "
         "measured: the inputs, output gradients and per-sample gradients of each module with parameters (float32), "
         "what a statistics pass over a batch holds for it at least. The measured memory of the whole fit is "
         "\"fit +MB\" above.", tensors_table),
    ]
    notes = [
        "Per-sequence loss (influences, LDS): the sum of its 63 next-token cross-entropies; training minimises the "
        "mean token cross-entropy of a batch (the scale of the training loss does not enter the influences).",
        "Regularization: skinfl inverts (C + regularization I) per block, C the mean over training sequences of "
        "the Gauss-Newton matrix of a sequence's summed loss. kronfluence's EK-FAC eigenvalues are the mean over "
        "training sequences of the squared per-sequence gradients in the eigenbasis (its lambda matrix divided "
        "by the number of sequences), and damping_factor is added to them as it is: damping_factor = "
        "regularization. Its covariances are normalised per token (both factors), skinfl's input factor per token "
        "and its gradient factor per sequence: this scales the factors, not their eigenbasis, and the eigenvalue "
        "correction replaces their eigenvalues.",
        "Sign: kronfluence's pairwise score is <preconditioned query-loss gradient, training-loss gradient>, and "
        "skinfl's influence the same quantity: positive = helpful (keeping the training sequence lowers the query "
        "loss), for both. LDS: the Spearman correlation between -sum_{j in S} influences[i, j] (the predicted "
        "loss) and the retrained model's loss of query i, across subsets S, averaged over queries; Student-t "
        "interval over queries.",
        "The true Fisher draws one target per token in each library (from its own generator): the two matrices "
        "differ by sampling noise there; the empirical-Fisher check draws nothing.",
        "kronfluence does not know transformers' Conv1D: it runs on a copy of the model with each Conv1D replaced "
        "by nn.Linear (weight transposed, same bias), whose logits are checked against the original's.",
    ]
    if approximations:
        notes.append("skinfl's blocks with all parameters: " + "; ".join(f"{k or '(root)'}: {v}"
                                                                          for k, v in approximations.items()))
    for v, r in records.items():
        if r.get("status") != "ok" and r.get("error"):
            notes.append(f"{LABELS[v]}: {r['status']}: ..." + r["error"].strip()[-600:].replace("\n", " | "))
    run.write(name, f"Language model: EK-FAC influences on a byte-level GPT-2 ({setup.n_train} training / "
              f"{setup.n_query} query sequences)", sections, records=list(records.values()), notes=notes,
              settings={"setup": asdict(setup), "n_subsets": args.n_subsets, "alpha": ALPHA,
                        "regularization": args.regularization, "repeat": args.repeat,
                        "memory_batches": args.memory_batches, "config": CONFIG,
                        "recipe_dir": str(work.relative_to(H.REPO_ROOT))},
              extra={"lds": lds, "agreement": agreement, "ratios": ratios, "model": model_info, "data": data_info,
                     "costs": costs, "conversion": conversion, "memory": memory})
    return 0 if all(r["status"] in H.OK for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
