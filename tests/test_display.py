"""Displays: what they draw (artists, data, labels), checked on the Agg backend."""

import sys

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from skinfl import DirectInfluence  # noqa: E402
from skinfl.display import InfluenceDisplay, MislabelDisplay  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_influence_bars_from_predictions():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 12))
    y_train = np.arange(12) % 3
    display = InfluenceDisplay.from_predictions(scores, k=3, y_train=y_train, y_test=np.array([1, 2]))
    for row in range(2):
        np.testing.assert_array_equal(display.helpful_indices[row], np.argsort(-scores[row])[:3])
        np.testing.assert_array_equal(display.harmful_indices[row], np.argsort(scores[row])[:3])
        np.testing.assert_allclose(display.helpful_values[row], np.sort(scores[row])[::-1][:3])
    assert display.axes_.shape == (2, 1)
    for row, ax in enumerate(display.axes_[:, 0]):
        bars = ax.patches
        assert len(bars) == 6
        expected = np.concatenate([display.helpful_values[row], display.harmful_values[row][::-1]])
        np.testing.assert_allclose([bar.get_width() for bar in bars], expected)
        for bar, value in zip(bars, expected):
            assert bar.get_facecolor() == to_rgba("tab:green" if value >= 0 else "tab:red")
        labels = [tick.get_text() for tick in ax.get_yticklabels()]
        first = display.helpful_indices[row, 0]
        assert f"#{first} y={y_train[first]}" in labels
        assert ax.get_title() == f"test point {row} (y={[1, 2][row]})"


def test_influence_images_from_estimator(classification_problem):
    model, X, y = classification_problem
    est = DirectInfluence(model, regularization=0.1).fit(X, y)
    display = InfluenceDisplay.from_estimator(est, X[:2], y[:2], k=2, shape=(2, 2))
    scores = est.influences(X[:2], y[:2]).numpy()
    np.testing.assert_array_equal(display.helpful_indices, np.argsort(-scores, axis=1)[:, :2])
    np.testing.assert_array_equal(display.harmful_indices, np.argsort(scores, axis=1)[:, :2])
    assert display.axes_.shape == (2, 5)  # the test point, 2 helpful, 2 harmful
    for row in range(2):
        test_image = display.axes_[row, 0].get_images()[0].get_array()
        np.testing.assert_allclose(test_image, X[row].numpy().reshape(2, 2))
        index = display.helpful_indices[row, 0]
        shown = display.axes_[row, 1]
        np.testing.assert_allclose(shown.get_images()[0].get_array(), X[index].numpy().reshape(2, 2))
        assert shown.get_title() == f"y={int(y[index])}\n{scores[row, index]:+.3g}"
        harmful = display.axes_[row, 3]
        assert harmful.get_title().endswith(f"{scores[row, display.harmful_indices[row, 0]]:+.3g}")


def test_given_axes_are_used_and_checked():
    fig, axes = plt.subplots(1, 2)
    display = InfluenceDisplay.from_predictions(np.array([[1.0, -1.0, 0.5], [0.2, 0.1, -0.3]]), k=1, ax=axes)
    assert display.figure_ is fig and len(axes[0].patches) == 2
    with pytest.raises(ValueError, match="2 Axes"):
        InfluenceDisplay.from_predictions(np.ones((2, 3)), k=1, ax=axes[0])
    with pytest.raises(ValueError, match="k must be"):
        InfluenceDisplay.from_predictions(np.ones((2, 3)), k=4)
    with pytest.raises(ValueError, match="training inputs"):
        InfluenceDisplay.from_predictions(np.ones((1, 3)), k=1, shape=(1,))


def test_mislabel_curves_from_predictions():
    flipped = np.array([False, True, False, False, True, False])
    self_influence = np.array([0.1, 0.9, 0.3, 0.8, 0.7, 0.2])
    losses = np.array([0.5, 0.1, 0.2, 0.3, 0.9, 0.4])
    display = MislabelDisplay.from_predictions(flipped, self_influence, training_loss=losses)
    np.testing.assert_allclose(display.fraction_inspected_, np.arange(7) / 6)
    # Inspection order by self-influence: 1 (flipped), 3, 4 (flipped), 2, 5, 0.
    np.testing.assert_allclose(display.fraction_found_["self-influence"], [0, 0.5, 0.5, 1, 1, 1, 1])
    np.testing.assert_allclose(display.fraction_found_["random"], display.fraction_inspected_)
    assert display.roc_auc_["self-influence"] == pytest.approx(roc_auc_score(flipped, self_influence))
    assert display.roc_auc_["training loss"] == pytest.approx(roc_auc_score(flipped, losses))
    labels = [text.get_text() for text in display.ax_.get_legend().get_texts()]
    assert labels == [f"self-influence (ROC AUC {display.roc_auc_['self-influence']:.3f})",
                      f"training loss (ROC AUC {display.roc_auc_['training loss']:.3f})",
                      "random (ROC AUC 0.500)"]
    np.testing.assert_allclose(display.lines_["self-influence"].get_ydata(), display.fraction_found_["self-influence"])
    with pytest.raises(ValueError, match="some but not all"):
        MislabelDisplay.from_predictions(np.zeros(6, dtype=bool), self_influence)
    with pytest.raises(ValueError, match="one value per training point"):
        MislabelDisplay.from_predictions(flipped, self_influence, training_loss=losses[:3])


def test_mislabel_from_estimator_finds_flipped_labels(classification_problem):
    model, X, y = classification_problem
    flipped = np.array([3, 17, 41])
    y_noisy = y.clone()
    y_noisy[flipped] = (y_noisy[flipped] + 1) % 3
    est = DirectInfluence(model, regularization=0.1).fit(X, y_noisy)
    display = MislabelDisplay.from_estimator(est, X, y_noisy, flipped)
    expected = est.self_influence(X, y_noisy).numpy()
    mask = np.zeros(len(X), dtype=bool)
    mask[flipped] = True
    assert display.roc_auc_["self-influence"] == pytest.approx(roc_auc_score(mask, expected))
    losses = torch.nn.functional.cross_entropy(model(X), y_noisy, reduction="none").detach().numpy()
    assert display.roc_auc_["training loss"] == pytest.approx(roc_auc_score(mask, losses))
    assert display.roc_auc_["self-influence"] > 0.9  # the model fits the clean labels: flips stand out
    assert set(display.lines_) == {"self-influence", "training loss", "random"}


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"skinfl\[plot\]"):
        InfluenceDisplay.from_predictions(np.ones((1, 3)), k=1)
