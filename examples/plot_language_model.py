"""
Which training text is behind a language model's completion?
============================================================

A language model is a classifier of the next token, so its training
sequences have influences on a generated text as a classifier's training
points have on a prediction. skinfl's estimators take a transformers model
as it is: the input ids as ``X``, the same ids as ``y``, and
``loss="causal_lm"`` (the default for a ``*LMHeadModel`` or
``*ForCausalLM``) shifts them by one position, so that the logits at
position ``t`` are scored against the token at ``t + 1``. A sequence's loss
is the sum of its token losses.

Here a tiny GPT-2 reads the docstrings of a few standard library modules
one byte at a time (a vocabulary of 256: no tokenizer, nothing downloaded),
completes a prompt, and :meth:`~skinfl.EkfacInfluence.top_influences` names
the training sequences that most helped, and most hurt, that completion.
The example needs transformers (``pip install "skinfl[transformers]"``).
"""

# %%
# Byte sequences from the standard library's docstrings
# ------------------------------------------------------
# The first 48 bytes of the docstrings of the public functions, classes and
# methods of a few modules, in sorted order, as UTF-8 bytes: token = byte
# value. Docstrings open in a few typical ways ("Return the ...", "Set
# the ..."), which the model learns.

import importlib
import inspect
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import skinfl

start = time.perf_counter()
torch.manual_seed(0)
SEQ_LEN = 48
MODULES = ("argparse", "bisect", "calendar", "collections", "copy", "csv", "datetime", "decimal", "difflib",
           "fnmatch", "fractions", "functools", "glob", "heapq", "itertools", "json", "logging", "os", "os.path",
           "pathlib", "pprint", "random", "re", "shutil", "statistics", "string", "tarfile", "tempfile",
           "textwrap", "zipfile")


def members(module):
    """The public functions and classes of ``module``, and the public methods of its classes."""
    for name in sorted(dir(module)):
        member = getattr(module, name)
        if name.startswith("_") or not callable(member):
            continue
        yield member
        if inspect.isclass(member):
            yield from (getattr(member, a) for a in sorted(vars(member)) if not a.startswith("_")
                        and callable(getattr(member, a, None)))


openings = {}  # ordered and without duplicates
for module_name in MODULES:
    for member in members(importlib.import_module(module_name)):
        doc = (inspect.getdoc(member) or "").encode("utf-8")
        if len(doc) >= SEQ_LEN:
            openings.setdefault(doc[:SEQ_LEN], None)
X = torch.tensor([list(opening) for opening in openings])


def as_text(ids):
    return bytes(ids.tolist()).decode("utf-8", errors="replace")


print(f"{len(X)} training sequences of {SEQ_LEN} bytes, for example:")
for i in (0, 1, 2):
    print(f"  {as_text(X[i])!r}")

# %%
# A tiny GPT-2, trained on them
# -----------------------------
# One transformer block of width 32, built from a config (no pretrained
# weights), trained by AdamW on the mean token cross-entropy. The output
# layer is not tied to the input embedding, so that each gets a block of
# its own; eager attention is the plain implementation, which per-sample
# gradients go through without warnings.

config = GPT2Config(vocab_size=256, n_positions=SEQ_LEN, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", tie_word_embeddings=False,
                    bos_token_id=None, eos_token_id=None, pad_token_id=None)
model = GPT2LMHeadModel(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
for epoch in range(60):
    for batch in torch.randperm(len(X)).split(32):
        ids = X[batch]
        logits = model(ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
model.eval()
print(f"{sum(p.numel() for p in model.parameters()):,} parameters, final batch loss {loss.item():.2f} nats per byte")

# %%
# A completion
# ------------
# The model continues a prompt greedily, one byte at a time, up to the
# context length. The whole sequence, prompt and completion, is the query.

prompt = "Return the "
query = torch.tensor(list(prompt.encode()))
with torch.no_grad():
    while len(query) < SEQ_LEN:
        next_byte = model(query[None]).logits[0, -1].argmax()
        query = torch.cat([query, next_byte[None]])
print(f"prompt {prompt!r} -> {as_text(query)!r}")
X_query = query[None]

# %%
# The training sequences behind it
# --------------------------------
# EK-FAC approximates the Gauss-Newton matrix of the training loss block by
# block: transformers' GPT-2 stores its attention and MLP weights in
# ``Conv1D`` layers (a transposed ``nn.Linear``), which get Kronecker blocks
# as ``nn.Linear`` layers do, and so do the embeddings.
# ``loss="auto"`` resolves to ``"causal_lm"`` for a GPT-2 LM head, and
# ``y`` is the same ids as ``X``.

estimator = skinfl.EkfacInfluence(model, regularization=1.0, batch_size=100, random_state=0).fit(X, X)
for name in ("transformer.h.0.attn.c_attn", "transformer.wte", "lm_head"):
    print(f"{name}: {estimator.layer_approximations_[name]}")

# %%
# ``top_influences`` streams over the training sequences: the ``k`` most
# helpful ones (keeping them in the training set lowers the loss of the
# completion), then the ``k`` most harmful ones.

indices, values = estimator.top_influences(X_query, X_query, k=3, which="both")
print("\nmost helpful training sequences:")
for j, value in zip(indices[0, :3].tolist(), values[0, :3].tolist()):
    print(f"  {value:9.1f}  {as_text(X[j])!r}")
print("most harmful training sequences:")
for j, value in zip(indices[0, 3:].tolist(), values[0, 3:].tolist()):
    print(f"  {value:9.1f}  {as_text(X[j])!r}")
print(f"\nfinished in {time.perf_counter() - start:.1f} s")
