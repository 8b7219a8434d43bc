"""The paragraphs every estimator's docstring shares, written once.

An estimator's class docstring holds placeholder lines, a name in braces
alone on its line (``{model}``, ``{memory}``, ``{fitted_attributes}``...),
where the shared entry goes; :func:`shared_docs` fills them when the class is
defined, from the entries below and the class's own words: short phrases
given to the decorator (what its ``memory`` caches, what its ``random_state``
seeds...), and any lines indented under a placeholder, which are the class's
part of that entry's description (what ``regularization`` means for it, say).
Defaults are read from the signature of ``__init__`` and the parameters the
factors depend on from ``_factor_parameters``, so that the text cannot drift
from the code.
"""

from __future__ import annotations

import inspect
import re
import textwrap

# Description lines are wrapped to this width: 79 columns less the class docstring's indentation (4) and
# the entry's (4).
_WIDTH = 71
# A placeholder line, and the lines indented under it (the class's own text; blank lines inside it too).
_PLACEHOLDER = re.compile(
    r"^(?P<indent>[ ]*)\{(?P<name>\w+)\}[ ]*\n"
    r"(?P<own>(?:(?P=indent)[ ]{4}\S.*\n|[ ]*\n(?=(?P=indent)[ ]{4}\S))*)",
    re.MULTILINE,
)


def _entry(header, *paragraphs):
    """A numpydoc entry: ``header``, then the paragraphs indented and wrapped (blank lines between)."""
    wrapped = [textwrap.fill(" ".join(paragraph.split()), _WIDTH, break_long_words=False,
                             break_on_hyphens=False) for paragraph in paragraphs if paragraph]
    return header + "\n" + textwrap.indent("\n\n".join(wrapped), " " * 4) + "\n"


def _then(own):
    """A space and the class's own text, or nothing."""
    return " " + own if own else ""


def _listing(names):
    quoted = [f"``{name}``" for name in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


# ------------------------------------------------------------------ parameters
def _model(cls, phrases, own):
    return _entry(
        "model : torch.nn.Module, skorch net or scikit-learn model",
        "The trained model. It is copied in ``fit`` and evaluated in eval mode; influence is taken with "
        "respect to its parameters that require gradients. A fitted skorch net stands for its ``module_``; "
        "a fitted ``LogisticRegression``, ``LinearRegression``, ``Ridge``, "
        '``SGDClassifier(loss="log_loss")``, ``MLPClassifier`` or ``MLPRegressor`` is converted to an '
        "equivalent torch module (see ``model_`` and :ref:`user-guide-models`).",
    )


def _loss(cls, phrases, own):
    return _entry(
        f'loss : {{"auto", "cross_entropy", "mse", "bce_with_logits", "causal_lm"}}, torch.nn loss module or '
        f"callable, default={_default(cls, 'loss')}",
        'The training loss. ``"auto"`` is the loss a skorch net or scikit-learn model was trained with, the '
        "one a transformers model's class and config say (``*ForCausalLM``: ``\"causal_lm\"``; "
        "``*ForSequenceClassification``: by ``problem_type``; ``*ForTokenClassification``: cross-entropy "
        'over tokens), and ``"cross_entropy"`` for any other torch module; resolved in ``loss_``. '
        "Cross-entropy on outputs ``(n, T, n_classes)`` with targets ``(n, T)`` is taken per token, and a "
        "sample's loss is the sum over its tokens, targets -100 left out; ``\"causal_lm\"`` is the same "
        "after the next-token shift (logits at ``t`` against ``y[:, t + 1]``). A callable takes "
        "``(output, target)`` and returns the scalar mean loss of a batch, and must be picklable to save "
        "the estimator.",
    )


def _parameters(cls, phrases, own):
    return _entry(
        "parameters : list of str or None, default=None",
        "The parameters influence is taken over: ``fnmatch`` patterns matched against the names of "
        '``model.named_parameters()`` (``["transformer.h.1.*", "lm_head.*"]``); the others are held '
        "fixed. None takes every parameter that requires gradients (a peft model's adapters, say). "
        "Resolved in ``trainable_parameters_``.",
    )


def _regularization(cls, phrases, own):
    return _entry(
        f'regularization : float or "auto", default={_default(cls, "regularization")}',
        (own or "``lambda >= 0`` added as ``lambda * I`` to the curvature.")
        + ' ``"auto"`` takes the model\'s own penalty (a scikit-learn model\'s, a skorch optimizer\'s '
        "weight decay), resolved in ``regularization_``.",
    )


def _second_order(cls, phrases, own):
    from ._curvature import SECOND_ORDER_MODES

    allowed = [mode for mode in SECOND_ORDER_MODES
               if any(getattr(constraint, "options", None) is None or mode in constraint.options
                      for constraint in cls._parameter_constraints["second_order"])]
    options = ", ".join(f'"{mode}"' for mode in allowed)
    return _entry(
        f"second_order : {{{options}}}, default={_default(cls, 'second_order')}",
        own or "Which curvature to invert.",
    )


def _max_iter(cls, phrases, own):
    what, each = phrases["max_iter"]
    default = _default(cls, "max_iter")
    return _entry(
        f"max_iter : {'int or None' if default == 'None' else 'int'}, default={default}",
        f"Most {what}; each is {each}. ``n_iter_`` says how many were run." + _then(own),
    )


def _batch_size(cls, phrases, own):
    return _entry(
        f"batch_size : int, default={_default(cls, 'batch_size')}",
        "Samples per batched pass over the data; also the number of gradients solved together. It bounds "
        "the memory of every method and does not change results." + _then(own),
    )


def _device(cls, phrases, own):
    return _entry(
        "device : str or torch.device, default=None",
        "Where the work runs; None uses the model's device.",
    )


def _progress(cls, phrases, own):
    return _entry(
        "progress : bool, default=False",
        f"Show tqdm progress bars: {phrases['progress']}, and the passes over the data for gradients.",
    )


def _memory(cls, phrases, own):
    depends = ["loss", "second_order", *cls._factor_parameters]
    return _entry(
        "memory : str, joblib.Memory or None, default=None",
        f"Directory (or ``joblib.Memory``) in which to cache the fitted factors: {phrases['memory']}. They "
        f"depend on the model, the data, {_listing(depends)}, and on no other parameter: with a cache, a "
        "``GridSearchCV`` over ``regularization`` or any other parameter computes them once per training "
        "set." + _then(own)
        + " Entries are tensors and JSON, never unpickled (see :ref:`user-guide-memory`).",
    )


def _random_state(cls, phrases, own):
    seeds = phrases.get("random_state")
    text = ("Draws the probes of :meth:`score`; the influences themselves are deterministic." if seeds is None
            else f"Seeds {seeds} and the probes of :meth:`score`.")
    return _entry(
        "random_state : int, RandomState instance or None, default=None",
        text + _then(own),
    )


# ------------------------------------------------------------------ attributes
def _fitted_attributes(cls, phrases, own):
    if phrases["unpenalized_parameters"] == "left out":
        unpenalized = ("they get no regularization, as in the model's training objective. Empty otherwise.")
    else:
        unpenalized = ("This estimator regularizes them too (its inverse needs one ``regularization`` for "
                       "all parameters); :class:`DirectInfluence` and :class:`CgInfluence` leave them out. "
                       "Empty otherwise.")
    entries = [
        ("n_params_ : int", "Number of trainable parameters."),
        ("n_samples_fit_ : int", "Number of fitted training samples."),
        ("n_features_in_ : int", "Number of input values per sample."),
        ("feature_names_in_ : ndarray of str objects of shape ``(n_features_in_,)``",
         "Names of the columns of ``X`` seen during ``fit``. Defined only when ``X`` is a pandas "
         "``DataFrame`` whose column names are all strings."),
        ("input_shape_ : tuple of int", "Per-sample input shape."),
        ("output_shape_ : tuple of int", "Per-sample output shape of the model."),
        ("device_ : torch.device", "Device the estimator computes on."),
        ("model_ : torch.nn.Module",
         "The evaluation copy of the model (of the converted module for a scikit-learn model, of "
         "``module_`` for a skorch net)."),
        ("regularization_ : float",
         "The regularization used: ``regularization``, or the model's own penalty when it is ``\"auto\"``."),
        ("unpenalized_parameters_ : list of str",
         "With ``regularization=\"auto\"``, the parameters the model's own penalty leaves out (a "
         "scikit-learn model's intercepts, a skorch parameter group without weight decay)"
         + (": " if phrases["unpenalized_parameters"] == "left out" else ". ") + unpenalized),
        ("classes_ : numpy.ndarray",
         "Labels of a scikit-learn classifier: targets are given as these labels. Only with a "
         "scikit-learn classifier as ``model``."),
        ("loss_ : object", "The resolved loss."),
        ("trainable_parameters_ : list of str",
         "Names of the parameters influence is taken with respect to."),
    ]
    return "".join(_entry(header, text) for header, text in entries)


_SHARED = {
    "model": _model,
    "loss": _loss,
    "parameters": _parameters,
    "regularization": _regularization,
    "second_order": _second_order,
    "max_iter": _max_iter,
    "batch_size": _batch_size,
    "device": _device,
    "progress": _progress,
    "memory": _memory,
    "random_state": _random_state,
    "fitted_attributes": _fitted_attributes,
}


def _default(cls, name):
    """The default of ``name`` in ``cls.__init__``, as numpydoc writes it."""
    default = inspect.signature(cls.__init__).parameters[name].default
    if isinstance(default, str):
        return f'"{default}"'
    if isinstance(default, float) and 0 < abs(default) < 1e-2:
        return f"{default:.0e}".replace("e-0", "e-")  # 1e-3, as written in the signature
    return repr(default)


def shared_docs(**phrases):
    """Fill the placeholder lines of the decorated class's docstring with the shared entries.

    ``phrases`` are the class's own words inside them:

    - ``progress`` (required): what the bars show besides the passes for gradients.
    - ``memory`` (required): what the factors are, after "cache the fitted factors: ".
    - ``random_state``: what it seeds besides the probes of ``score`` (none:
      the estimator is deterministic).
    - ``max_iter``: ``(what, each)``, what it counts ("iterations per
      solve") and what each costs ("one (block) curvature product"), in the
      same words for every estimator that iterates.
    - ``unpenalized_parameters`` (required): ``"left out"`` (the estimator
      leaves them unregularized) or ``"regularized"``.

    Lines indented under a placeholder are the class's own text: the whole
    description of ``regularization`` and ``second_order`` (instead of the
    plain one), and one more sentence for ``max_iter``, ``batch_size``,
    ``memory`` and ``random_state``.
    """

    def fill(cls):
        def entry(match):
            name = match.group("name")
            if name not in _SHARED:
                raise ValueError(f"{cls.__name__}'s docstring has an unknown placeholder {{{name}}}.")
            own = " ".join(match.group("own").split())
            return textwrap.indent(_SHARED[name](cls, phrases, own), match.group("indent"))

        cls.__doc__ = _PLACEHOLDER.sub(entry, cls.__doc__)
        return cls

    return fill
