"""Models with keyword inputs (a dict ``X``), token targets ``(n, T)``, the causal-LM loss and a chosen
subset of parameters, checked exactly against explicit float64 references (``tests/references.py``)."""

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import exact_classes, exact_estimator
from references import Reference, token_cross_entropy
from test_exact import assert_exact
from torch import nn

import skinfl
from skinfl import DirectInfluence, EkfacInfluence
from skinfl._cotangents import output_cotangents
from skinfl._model import LossSpec

VOCABULARY, CLASSES, LENGTH = 7, 4, 5


class TwoInputs(nn.Module):
    """A model of two keyword inputs: ``features`` (floats) and ``extra`` (floats of another width)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Linear(3, 4)
        self.extra = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, features, extra):
        return self.head(torch.tanh(self.features(features) + self.extra(extra)))


class Tagger(nn.Module):
    """Token ids ``(n, T)`` to per-position logits ``(n, T, CLASSES)``."""

    def __init__(self, padding_idx=None):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, 3, padding_idx=padding_idx)
        self.hidden = nn.Linear(3, 3)
        self.head = nn.Linear(3, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(self.embedding(x))))


def two_input_problem(n=14):
    torch.manual_seed(0)
    model = TwoInputs().double()
    generator = torch.Generator().manual_seed(1)
    X = {"features": torch.randn(n, 3, generator=generator, dtype=torch.float64),
         "extra": torch.randn(n, 2, generator=generator, dtype=torch.float64)}
    y = torch.randint(0, 3, (n,), generator=generator)
    return model, X, y


def tagger_problem(n=12, padding_idx=None):
    torch.manual_seed(0)
    model = Tagger(padding_idx).double()
    generator = torch.Generator().manual_seed(2)
    X = torch.randint(0, VOCABULARY, (n, LENGTH), generator=generator)
    y = torch.randint(0, CLASSES, (n, LENGTH), generator=generator)
    y[::3, -2:] = -100  # ignored positions
    return model, X, y


def cross_entropy_per_sample(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


# ---------------------------------------------------------------- exact influences
@pytest.mark.parametrize("cls", exact_classes("gauss_newton"))
def test_dict_inputs_give_the_exact_influences(cls):
    """A two-input module called as ``model(**X)``: every estimator that inverts the curvature matches
    the explicit Gauss-Newton inverse."""
    model, X, y = two_input_problem()
    reference = Reference(model, cross_entropy_per_sample)
    inverse = reference.inverse(X, y, 0.1)
    G = reference.gradients(X, y)
    est = exact_estimator(cls, model, regularization=0.1, second_order="gauss_newton", batch_size=5,
                          random_state=0).fit(X, y)
    test = {key: value[:4] for key, value in X.items()}
    assert_exact(cls, est.influences(test, y[:4]), G[:4] @ inverse @ G.T)
    assert_exact(cls, est.self_influence(test, y[:4]), torch.einsum("ij,jk,ik->i", G[:4], inverse, G[:4]))


@pytest.mark.parametrize("cls", exact_classes("gauss_newton"))
def test_token_targets_sum_the_positions_and_leave_ignored_ones_out(cls):
    """An embedding tagger with ``(n, T)`` targets, some of them -100: a sample's loss is the sum of its
    positions' cross-entropies, and every estimator that inverts the curvature matches the explicit inverse."""
    model, X, y = tagger_problem()
    reference = Reference(model, token_cross_entropy())
    inverse = reference.inverse(X, y, 0.1)
    G = reference.gradients(X, y)
    est = exact_estimator(cls, model, regularization=0.1, second_order="gauss_newton", batch_size=5,
                          random_state=0).fit(X, y)
    assert est.loss_.name == "cross_entropy" and est.loss_.sequence
    assert_exact(cls, est.influences(X[:4], y[:4]), G[:4] @ inverse @ G.T)


def test_token_targets_hessian_and_removal_identity_per_sequence():
    """Hessian influences of the tagger; ``influences / n`` is the removal effect of a whole sequence."""
    model, X, y = tagger_problem()
    reference = Reference(model, token_cross_entropy())
    expected = reference.influences(X, y, X[:3], y[:3], 1.0, "hessian")
    est = DirectInfluence(model, regularization=1.0, second_order="hessian").fit(X, y)
    torch.testing.assert_close(est.influences(X[:3], y[:3]), expected, rtol=1e-9, atol=1e-12)


def test_causal_lm_pairs_each_position_with_the_next_target():
    """``loss="causal_lm"``: logits at ``t`` against ``y[:, t + 1]``, summed; the first target and the last
    logits count for nothing."""
    model, X, _ = tagger_problem()
    y = X.clone() % CLASSES
    y[1, 3] = -100
    reference = Reference(model, token_cross_entropy(shift=1))
    expected = reference.influences(X, y, X[:3], y[:3], 0.1)
    est = DirectInfluence(model, loss="causal_lm", regularization=0.1, second_order="gauss_newton").fit(X, y)
    assert est.loss_.name == "causal_lm"
    torch.testing.assert_close(est.influences(X[:3], y[:3]), expected, rtol=1e-9, atol=1e-12)
    changed = y.clone()
    changed[:, 0] = (changed[:, 0] + 1) % CLASSES  # the first target is never predicted
    torch.testing.assert_close(est.influences(X[:3], changed[:3]), expected, rtol=1e-9, atol=1e-12)


def test_causal_lm_measurement_is_each_position_against_its_own_prediction():
    model, X, _ = tagger_problem()
    est = DirectInfluence(model, loss="causal_lm", regularization=0.1).fit(X, X % CLASSES)
    with torch.no_grad():
        predicted = model(X).argmax(dim=-1)
    as_targets = torch.cat([predicted[:, :1], predicted[:, :-1]], dim=1)
    torch.testing.assert_close(est.transform(X[:3]), est.transform(X[:3], as_targets[:3]))


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2}, {"weight": torch.tensor([1.0, 2.0, 0.5, 3.0])}])
def test_position_cotangents_give_the_output_hessian(options):
    """Exact roots (one cotangent per position and class) sum to the Hessian of the summed token loss in
    the outputs, and drawn targets do in expectation, with ignored positions and the causal shift."""
    torch.manual_seed(0)
    n, positions = 2, 4
    module = nn.CrossEntropyLoss(**{k: v.double() if torch.is_tensor(v) else v for k, v in options.items()})
    loss = LossSpec.resolve(module).replace(sequence=True, shift=1)
    output = torch.randn(n, positions, CLASSES, dtype=torch.float64)
    target = torch.randint(0, CLASSES, (n, positions))
    target[0, 2] = -100

    def hessian_of(i):
        return torch.autograd.functional.hessian(
            lambda o: loss.per_sample(o.reshape(1, positions, CLASSES), target[i:i + 1]).sum(),
            output[i].reshape(-1))

    expected = torch.stack([hessian_of(i) for i in range(n)])
    exact = sum(weight * torch.einsum("ni,nj->nij", u.reshape(n, -1), u.reshape(n, -1))
                for weight, u in output_cotangents(loss, output, target, "true", None, None))
    torch.testing.assert_close(exact, expected, rtol=1e-10, atol=1e-12)
    generator = torch.Generator().manual_seed(0)
    draws = 20_000
    sampled = sum(weight * torch.einsum("ni,nj->nij", u.reshape(n, -1), u.reshape(n, -1))
                  for weight, u in output_cotangents(loss, output, target, "true", draws, generator))
    torch.testing.assert_close(sampled, expected, rtol=0, atol=0.03 * float(expected.abs().max()))


# ---------------------------------------------------------------- sequences of another length
def test_token_ids_of_another_length_are_scored():
    """Queries whose sequences are shorter than the fitted ones: their own output shape, exact influences."""
    model, X, y = tagger_problem()
    reference = Reference(model, token_cross_entropy())
    est = DirectInfluence(model, regularization=0.1, second_order="gauss_newton").fit(X, y)
    queries, targets = X[:3, :3], y[:3, :3]
    expected = reference.gradients(queries, targets) @ reference.inverse(X, y, 0.1) @ reference.gradients(X, y).T
    torch.testing.assert_close(est.influences(queries, targets), expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="sequence length"):
        est.influences(queries, y[:3])


# ---------------------------------------------------------------- parameter selection
def test_parameters_selects_what_influence_is_taken_over():
    """``parameters=`` patterns: influence over those parameters, the others held fixed."""
    model, X, y = tagger_problem()
    names = ["hidden.weight", "head.weight", "head.bias"]
    reference = Reference(model, token_cross_entropy(), names)
    expected = reference.influences(X, y, X[:3], y[:3], 0.1)
    est = DirectInfluence(model, parameters=["hidden.weight", "head.*"], regularization=0.1,
                          second_order="gauss_newton").fit(X, y)
    assert est.trainable_parameters_ == names
    assert est.n_params_ == 9 + 12 + 4
    assert len(est.get_feature_names_out()) == est.n_params_
    assert est.get_feature_names_out()[0] == "hidden.weight[0,0]"
    torch.testing.assert_close(est.influences(X[:3], y[:3]), expected, rtol=1e-9, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # the user's model is not changed


def test_ekfac_layers_and_by_layer_follow_the_selection():
    model, X, y = tagger_problem()
    est = EkfacInfluence(model, parameters=["head.*", "embedding.*"], regularization=0.1).fit(X, y)
    assert est.layers_ == ["embedding", "head"]
    assert est.influences(X[:2], y[:2], by_layer=True).shape == (2, len(X), 2)


def test_a_pattern_that_matches_nothing_names_real_parameters():
    model, X, y = tagger_problem()
    with pytest.raises(ValueError, match=r"\['decoder\.\*'\] match no parameter.*'embedding.weight'"):
        DirectInfluence(model, parameters=["head.*", "decoder.*"]).fit(X, y)


# ---------------------------------------------------------------- EK-FAC's embedding block
@pytest.mark.parametrize("correct_eigenvalues", [True, False])
def test_ekfac_embedding_block_is_that_of_a_linear_layer_on_one_hot_inputs(correct_eigenvalues):
    """An ``Embedding`` is a bias-free ``Linear`` on one-hot inputs with the transposed weight: EK-FAC gives
    both the same influences (token counts all different, so the one-hot layer's activation eigenbasis is
    the identity up to order and signs, as the embedding block's is exactly)."""
    torch.manual_seed(0)
    n = 20
    counts = torch.tensor([4, 8, 11, 14, 17, 21, 25])  # n * LENGTH tokens, every count different
    tokens = torch.repeat_interleave(torch.arange(VOCABULARY), counts)
    X = tokens[torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))].reshape(n, LENGTH)
    y = torch.randint(0, CLASSES, (n, LENGTH), generator=torch.Generator().manual_seed(1))
    assert len(set(torch.bincount(X.reshape(-1), minlength=VOCABULARY).tolist())) == VOCABULARY

    class OneHotTagger(nn.Module):
        def __init__(self, tagger):
            super().__init__()
            self.embedding = nn.Linear(VOCABULARY, 3, bias=False)
            self.embedding.weight.data = tagger.embedding.weight.data.T.clone()
            self.hidden, self.head = tagger.hidden, tagger.head

        def forward(self, x):
            return self.head(torch.tanh(self.hidden(self.embedding(x))))

    tagger = Tagger().double()
    one_hot = OneHotTagger(tagger).double()
    X_one_hot = F.one_hot(X, VOCABULARY).double()
    settings = dict(regularization=0.1, n_target_draws=None, batch_size=6, correct_eigenvalues=correct_eigenvalues)
    embedding_est = EkfacInfluence(tagger, **settings).fit(X, y)
    linear_est = EkfacInfluence(one_hot, **settings).fit(X_one_hot, y)
    assert embedding_est.layer_approximations_["embedding"].startswith("Kronecker (Embedding")
    permutation = torch.cat([  # the one-hot layer's weight (3, V) against the embedding's (V, 3)
        torch.arange(3 * VOCABULARY).reshape(3, VOCABULARY).T.reshape(-1),
        torch.arange(3 * VOCABULARY, one_hot_params(one_hot))])
    torch.testing.assert_close(embedding_est.influences(X[:3], y[:3]),
                               linear_est.influences(X_one_hot[:3], y[:3]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(embedding_est.transform(X[:3], y[:3]),
                               linear_est.transform(X_one_hot[:3], y[:3])[:, permutation], rtol=1e-9, atol=1e-12)


def one_hot_params(model):
    return sum(p.numel() for p in model.parameters())


def test_ekfac_embedding_leaves_its_padding_index_out():
    """The padding row gets no gradient, so it gets no curvature: its inverse-curvature gradient is 0."""
    model, X, y = tagger_problem(padding_idx=0)
    est = EkfacInfluence(model, regularization=0.1, n_target_draws=None).fit(X, y)
    solved = est.transform(X[:4], y[:4])
    assert torch.count_nonzero(solved[:, :3]) == 0  # row 0 of the embedding weight
    assert torch.count_nonzero(solved[:, 3:3 * VOCABULARY]) > 0
    eigenvalues = est._factors[f"{est.layers_.index('embedding')}.eigenvalues"]  # (dim, n_embeddings)
    assert torch.count_nonzero(eigenvalues[:, 0]) == 0 and bool((eigenvalues[:, 1:] > 0).all())


# ---------------------------------------------------------------- errors
def test_dict_inputs_must_share_their_first_axis():
    model, X, y = two_input_problem()
    X["extra"] = X["extra"][:-1]
    with pytest.raises(ValueError, match=r"share their first axis.*'features': \(14, 3\).*'extra': \(13, 2\)"):
        DirectInfluence(model).fit(X, y)


def test_a_missing_keyword_input_is_named():
    model, X, y = two_input_problem()
    del X["extra"]
    with pytest.raises(ValueError, match="model\\(\\*\\*X\\[:1\\]\\).*extra"):
        DirectInfluence(model).fit(X, y)


def test_later_calls_need_the_fitted_keys():
    model, X, y = two_input_problem()
    est = DirectInfluence(model, regularization=0.1).fit(X, y)
    with pytest.raises(ValueError, match="same keys"):
        est.influences({"features": X["features"][:2], "other": X["extra"][:2]}, y[:2])
    with pytest.raises(ValueError, match="same keys"):
        est.influences(X["features"][:2], y[:2])


def test_targets_of_the_wrong_sequence_length_are_refused():
    model, X, y = tagger_problem()
    with pytest.raises(ValueError, match=r"y has shape \(12, 4\).*shape \(n, 5\)"):
        DirectInfluence(model).fit(X, y[:, :4])
    with pytest.raises(ValueError, match="must lie in 0..3 \\(or be -100"):
        DirectInfluence(model).fit(X, y + 10)


def test_causal_lm_needs_outputs_per_position():
    model, X, y = two_input_problem()
    with pytest.raises(ValueError, match="causal_lm.*sequence_length, n_classes"):
        DirectInfluence(model, loss="causal_lm").fit(X, y)


def test_perturbation_needs_one_floating_input():
    model, X, y = two_input_problem()
    est = DirectInfluence(model, regularization=0.1).fit(X, y)
    with pytest.raises(ValueError, match="perturbation.*one floating-point array"):
        est.influences({key: value[:2] for key, value in X.items()}, y[:2], mode="perturbation")


def test_a_dataframe_stays_one_array():
    pd = pytest.importorskip("pandas")
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X = pd.DataFrame(np.random.default_rng(0).normal(size=(10, 3)), columns=["a", "b", "c"])
    est = DirectInfluence(model, regularization=0.1).fit(X, np.arange(10) % 2)
    assert est.input_shape_ == (3,)


# ---------------------------------------------------------------- persistence and streaming
@pytest.mark.parametrize("problem", ["dict", "tokens", "causal"])
def test_save_load_and_joblib_keep_dict_inputs_and_token_losses(problem, tmp_path):
    if problem == "dict":
        model, X, y = two_input_problem()
        est = EkfacInfluence(model, regularization=0.1, random_state=0).fit(X, y)
        test = {key: value[:3] for key, value in X.items()}
    else:
        model, X, y = tagger_problem()
        loss = "causal_lm" if problem == "causal" else "auto"
        est = EkfacInfluence(model, loss=loss, regularization=0.1, random_state=0).fit(X, y)
        test = X[:3]
    expected = est.influences(test, y[:3])
    skinfl.save(est, tmp_path / "est.skinfl")
    loaded = skinfl.load(tmp_path / "est.skinfl", model)
    assert loaded.loss_ == est.loss_.replace(function=loaded.loss_.function)
    torch.testing.assert_close(loaded.influences(test, y[:3]), expected, rtol=1e-12, atol=1e-12)
    joblib.dump(est, tmp_path / "est.joblib")
    torch.testing.assert_close(joblib.load(tmp_path / "est.joblib").influences(test, y[:3]), expected,
                               rtol=1e-12, atol=1e-12)


def test_dict_inputs_stream_from_memmaps_and_write_into_out(tmp_path):
    model, X, y = two_input_problem()
    mapped = {}
    for key, value in X.items():
        array = np.lib.format.open_memmap(tmp_path / f"{key}.npy", mode="w+", dtype=np.float64,
                                          shape=tuple(value.shape))
        array[:] = value.numpy()
        mapped[key] = np.load(tmp_path / f"{key}.npy", mmap_mode="r")
    est = DirectInfluence(model, regularization=0.1, batch_size=4).fit(mapped, y.numpy())
    expected = DirectInfluence(model, regularization=0.1).fit(X, y).influences(X, y).numpy()
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float64, shape=(14, 14))
    result = est.influences(mapped, y.numpy(), out=out)
    assert result is out and isinstance(est.influences(mapped, y.numpy()), np.ndarray)
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12)
    indices, values = est.top_influences(mapped, y.numpy(), k=3)
    np.testing.assert_allclose(values, np.take_along_axis(expected, indices, axis=1), rtol=1e-9)
    assert est.score(mapped, y.numpy()) <= 0
