"""Hugging Face models built from tiny configs (no downloads): GPT-2, BERT with an attention mask, a peft
LoRA adapter; checked against explicit float64 references (``tests/references.py``)."""

import joblib
import pytest
import torch
import torch.nn.functional as F
from references import Reference, token_cross_entropy

import skinfl
from skinfl import DirectInfluence, EkfacInfluence

transformers = pytest.importorskip("transformers")
VOCABULARY, LENGTH = 11, 5


def tiny_gpt2(tie_word_embeddings=True, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCABULARY, n_positions=LENGTH, n_embd=4, n_layer=1, n_head=2,
                                     attn_implementation="eager", tie_word_embeddings=tie_word_embeddings,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def token_ids(n=8, length=LENGTH, seed=1):
    return torch.randint(0, VOCABULARY, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("parameters", [None, ["transformer.h.0.mlp.*", "transformer.ln_f.*"]])
def test_gpt2_causal_lm_influences_are_exact(parameters):
    """``loss="auto"`` on a ``GPT2LMHeadModel`` is the causal-LM loss (the sum of next-token losses), its
    ``ModelOutput`` gives the logits, and Direct matches the explicit inverse, on all parameters (tied
    embeddings included) or on the chosen ones."""
    model = tiny_gpt2()
    X = token_ids()
    names = None
    if parameters is not None:
        names = [name for name, _ in model.named_parameters() if name.startswith(("transformer.h.0.mlp.",
                                                                                 "transformer.ln_f."))]
    reference = Reference(model, token_cross_entropy(shift=1), names)
    expected = reference.influences(X, X, X[:3], X[:3], 0.1)
    est = DirectInfluence(model, parameters=parameters, regularization=0.1, second_order="gauss_newton").fit(X, X)
    assert est.loss_.name == "causal_lm"
    assert est.n_params_ == len(reference.flat)
    torch.testing.assert_close(est.influences(X[:3], X[:3]), expected, rtol=1e-8, atol=1e-10)


def test_gpt2_ekfac_has_kronecker_blocks_for_conv1d_and_embeddings():
    model = tiny_gpt2(tie_word_embeddings=False)
    X = token_ids()
    est = EkfacInfluence(model, regularization=0.1, random_state=0).fit(X, X)
    kinds = est.layer_approximations_
    assert kinds["transformer.h.0.attn.c_attn"].startswith("Kronecker (Conv1D")
    assert kinds["transformer.h.0.mlp.c_proj"].startswith("Kronecker (Conv1D")
    assert kinds["transformer.wte"].startswith("Kronecker (Embedding")
    assert kinds["transformer.wpe"].startswith("Kronecker (Embedding")  # broadcast over the batch
    assert kinds["lm_head"].startswith("Kronecker (Linear")
    assert kinds["transformer.h.0.ln_1"].startswith("diagonal")
    scores = est.influences(X[:2], X[:2])
    assert scores.shape == (2, len(X)) and bool(torch.isfinite(scores).all())


def test_ekfac_of_conv1d_is_that_of_the_equivalent_linear_layer():
    """transformers' ``Conv1D`` stores its weight transposed; EK-FAC gives it the block of the ``Linear``
    with the same map, so both give the same influences over sequence positions."""
    from transformers.pytorch_utils import Conv1D

    class Net(torch.nn.Module):
        def __init__(self, first):
            super().__init__()
            self.first, self.out = first, torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.first(x)))

    torch.manual_seed(0)
    conv = Conv1D(5, 4)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    linear = torch.nn.Linear(4, 5)
    linear.weight.data, linear.bias.data = conv.weight.data.T.clone(), conv.bias.data.clone()
    with_conv, with_linear = Net(conv).double(), Net(linear).double()
    with_linear.out.load_state_dict(with_conv.out.state_dict())
    X = torch.randn(20, 7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (20, 7))
    settings = dict(regularization=0.1, random_state=0, n_target_draws=None)
    conv_est = EkfacInfluence(with_conv, **settings).fit(X, y)
    linear_est = EkfacInfluence(with_linear, **settings).fit(X, y)
    assert conv_est.layer_approximations_["first"].startswith("Kronecker (Conv1D")
    torch.testing.assert_close(conv_est.influences(X[:3], y[:3]), linear_est.influences(X[:3], y[:3]),
                               rtol=1e-9, atol=1e-12)


def tiny_bert(num_labels=3, problem_type=None):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCABULARY, hidden_size=4, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=6, max_position_embeddings=8,
                                     num_labels=num_labels, problem_type=problem_type,
                                     attn_implementation="eager", hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).double().eval()


def bert_inputs(n=8, length=LENGTH, padded_to=None):
    ids = token_ids(n, length, seed=3)
    ids[:, 0] = 1  # a [CLS]-like first token
    mask = torch.ones(n, length, dtype=torch.long)
    if padded_to is not None:
        ids = torch.cat([ids, torch.zeros(n, padded_to - length, dtype=torch.long)], dim=1)
        mask = torch.cat([mask, torch.zeros(n, padded_to - length, dtype=torch.long)], dim=1)
    return {"input_ids": ids, "attention_mask": mask}


def test_bert_with_attention_mask_is_exact_and_right_padding_changes_nothing():
    """A dict ``X`` with ``attention_mask``: Direct matches the explicit inverse, and padding every
    sequence on the right (masked) leaves the influences unchanged."""
    model = tiny_bert()
    X = bert_inputs()
    y = torch.arange(8) % 3
    reference = Reference(model, lambda logits, target: F.cross_entropy(logits, target, reduction="none"))
    expected = reference.influences(X, y, {k: v[:3] for k, v in X.items()}, y[:3], 0.1)
    est = DirectInfluence(model, regularization=0.1, second_order="gauss_newton").fit(X, y)
    assert est.loss_.name == "cross_entropy"
    torch.testing.assert_close(est.influences({k: v[:3] for k, v in X.items()}, y[:3]), expected,
                               rtol=1e-8, atol=1e-10)
    padded = bert_inputs(padded_to=LENGTH + 3)
    padded_est = DirectInfluence(model, regularization=0.1, second_order="gauss_newton").fit(padded, y)
    torch.testing.assert_close(padded_est.influences({k: v[:3] for k, v in padded.items()}, y[:3]), expected,
                               rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("num_labels, problem_type, expected", [
    (3, None, "cross_entropy"), (1, None, "mse"), (3, "multi_label_classification", "bce_with_logits"),
])
def test_sequence_classification_loss_follows_problem_type(num_labels, problem_type, expected):
    model = tiny_bert(num_labels, problem_type)
    X = bert_inputs()
    y = {"cross_entropy": torch.arange(8) % 3, "mse": torch.randn(8, 1, dtype=torch.float64),
         "bce_with_logits": (torch.arange(24).reshape(8, 3) % 2).double()}[expected]
    est = DirectInfluence(model, regularization=0.1, parameters=["classifier.*"]).fit(X, y)
    assert est.loss_.name == expected


def test_token_classification_is_cross_entropy_over_tokens():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCABULARY, hidden_size=4, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=6, max_position_embeddings=8,
                                     num_labels=3, attn_implementation="eager")
    model = transformers.BertForTokenClassification(config).double().eval()
    X = bert_inputs()
    y = torch.randint(0, 3, (8, LENGTH), generator=torch.Generator().manual_seed(0))
    y[:, 0] = -100
    reference = Reference(model, token_cross_entropy(), ["classifier.weight", "classifier.bias"])
    expected = reference.influences(X, y, {k: v[:2] for k, v in X.items()}, y[:2], 0.1)
    est = DirectInfluence(model, parameters=["classifier.*"], regularization=0.1,
                          second_order="gauss_newton").fit(X, y)
    assert est.loss_.sequence and est.loss_.name == "cross_entropy"
    torch.testing.assert_close(est.influences({k: v[:2] for k, v in X.items()}, y[:2]), expected,
                               rtol=1e-8, atol=1e-10)


def test_lora_adapters_are_the_default_parameters():
    """A peft LoRA model: influence over its adapters (the parameters that require gradients), exactly."""
    peft = pytest.importorskip("peft")
    base = tiny_gpt2()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                      lora_dropout=0.0, fan_in_fan_out=True))
    for name, parameter in model.named_parameters():  # LoRA's B starts at 0: give it values
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    model = model.double().eval()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    X = token_ids()
    est = DirectInfluence(model, regularization=0.1, second_order="gauss_newton").fit(X, X)
    assert est.n_params_ == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.trainable_parameters_ == trainable and all("lora_" in name for name in trainable)
    assert est.loss_.name == "causal_lm"
    reference = Reference(model, token_cross_entropy(shift=1), trainable)
    torch.testing.assert_close(est.influences(X[:2], X[:2]), reference.influences(X, X, X[:2], X[:2], 0.1),
                               rtol=1e-8, atol=1e-10)
    ekfac = EkfacInfluence(model, regularization=0.1, random_state=0).fit(X, X)
    assert all(name.endswith(("lora_A.default", "lora_B.default")) for name in ekfac.layers_)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "lora"])
def test_save_load_and_joblib_of_transformers_models(kind, tmp_path):
    if kind == "bert":
        model, X, y = tiny_bert(), bert_inputs(), torch.arange(8) % 3
        test = {k: v[:3] for k, v in X.items()}
    else:
        model = tiny_gpt2()
        if kind == "lora":
            peft = pytest.importorskip("peft")
            model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0,
                                                               fan_in_fan_out=True)).double().eval()
        X = y = token_ids()
        test = X[:3]
    est = EkfacInfluence(model, regularization=0.1, random_state=0).fit(X, y)
    expected = est.influences(test, y[:3])
    skinfl.save(est, tmp_path / "est.skinfl")
    loaded = skinfl.load(tmp_path / "est.skinfl", model)
    assert loaded.trainable_parameters_ == est.trainable_parameters_
    torch.testing.assert_close(loaded.influences(test, y[:3]), expected, rtol=1e-12, atol=1e-12)
    joblib.dump(est, tmp_path / "est.joblib")
    torch.testing.assert_close(joblib.load(tmp_path / "est.joblib").influences(test, y[:3]), expected,
                               rtol=1e-12, atol=1e-12)
