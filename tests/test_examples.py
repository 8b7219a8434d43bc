"""The README's main job runs and finds what it claims to find."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name):
    """The example's standard output, after checking that it ran without error."""
    environment = {**os.environ, "MPLBACKEND": "Agg"}  # no display, as on a server
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=600, check=False,
        env=environment,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_digits_mislabel_demo():
    out = run_example("plot_digits_mislabels.py")
    assert "reloaded estimator gives identical influences: True" in out
    found, flipped = map(int, re.search(r"(\d+) of (\d+) flipped labels found", out).groups())
    assert found > 3 * 0.1 * flipped  # far better than inspecting 10% at random
    auc = float(re.search(r"ROC AUC of self-influence for detecting flips: ([0-9.]+)", out).group(1))
    assert auc > 0.8
    # RelatIF: the most helpful points are far less often wrong labels, far more often the test point's digit.
    ranks = {name: (int(points), float(wrong), float(same)) for name, points, wrong, same in re.findall(
        r"^\s+(raw influence|RelatIF)\s+(\d+)\s+(\d+)%\s+(\d+)%", out, flags=re.MULTILINE)}
    assert ranks["RelatIF"][1] < ranks["raw influence"][1] / 3
    assert ranks["RelatIF"][2] > ranks["raw influence"][2] + 30
    # Cleaning: removing the points most harmful to the validation digits beats removing random ones.
    baseline = float(re.search(r"retrained on every point: ([0-9.]+)", out).group(1))
    rows = re.findall(r"^\s+(\d+)% \(\s*\d+\)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+) \+- ", out, flags=re.MULTILINE)
    assert [int(row[0]) for row in rows] == [5, 10, 20]
    for _, by_influence, by_loss, at_random in rows:
        assert float(by_influence) > baseline and float(by_influence) > float(at_random)
        assert float(by_loss) > float(at_random)
    # No display here: the figures are saved, and the demo says where.
    saved = [Path(path) for path in re.findall(r"figure saved: (\S+\.png)", out)]
    assert [path.name for path in saved] == ["digits_influences.png", "digits_mislabels.png", "digits_cleaning.png"]
    assert all(path.stat().st_size > 10_000 for path in saved)


def test_select_regularization_example_finds_the_true_value():
    out = run_example("plot_select_regularization.py")
    true_value = re.search(r"regularization 1/\(C n\) = ([0-9.e-]+)", out).group(1)
    assert re.search(r"selected: ([0-9.e-]+)", out).group(1) == true_value
    pearson = float(re.search(r"leave-one-out Pearson ([0-9.]+), Spearman", out).group(1))
    assert pearson > 0.99


def test_sklearn_models_example_matches_retraining():
    out = run_example("plot_sklearn_models.py")
    # regularization="auto" takes LogisticRegression's penalty, 1 / (C n), and MLPClassifier's, alpha / n.
    resolved, expected = re.search(r"regularization_ = ([0-9.e-]+), 1/\(C n\) = ([0-9.e-]+)", out).groups()
    assert float(resolved) == float(expected)
    resolved, expected = re.search(r"MLP regularization_ = ([0-9.e-]+), alpha/n = ([0-9.e-]+)", out).groups()
    assert float(resolved) == float(expected)
    assert "classes_ = [0 1]" in out
    # Influences predict scikit-learn's own leave-one-out refits.
    pearson = float(re.search(r"leave-one-out Pearson: ([0-9.-]+)", out).group(1))
    assert pearson > 0.99
    assert len(re.findall(r"most helpful: #\d+", out)) == len(re.findall(r"most harmful: #\d+", out)) == 3
    top = [float(value) for value in re.findall(r"label \d, predicted \d, self-influence ([0-9.]+)", out)]
    assert len(top) == 5 and top == sorted(top, reverse=True)
    assert top[-1] > 10 * float(re.search(r"median self-influence: ([0-9.e+-]+)", out).group(1))


def test_skorch_example_finds_wrong_labels():
    pytest.importorskip("skorch")
    out = run_example("plot_skorch_classifier.py")
    # regularization="auto" is the weight decay of the net's optimizer.
    resolved, weight_decay = re.search(r"regularization_ = ([0-9.e-]+) \(the optimizer's weight decay is "
                                       r"([0-9.e-]+)\)", out).groups()
    assert float(resolved) == float(weight_decay) == 1e-3
    found, flipped = map(int, re.search(r"(\d+) of (\d+) wrong labels are among", out).groups())
    assert found > 5 * 0.1 * flipped  # inspecting 10% at random finds 10% of them
    assert len(re.findall(r"self-influence [0-9.]+", out)) == 5


def test_pipeline_example():
    out = run_example("plot_pipeline.py")
    assert "steps: ['frozenestimator', 'cginfluence']" in out
    assert "pipe.transform(X_test[:3]): ndarray of shape (3, 266)" in out
    assert "influences of the 426 training points on 3 test points: shape (3, 426)" in out
    # GridSearchCV over the step's regularization, by the estimator's own score (at most 0).
    rows = re.findall(r"^\s+([0-9.e-]+)\s+(-?[0-9.]+)$", out, flags=re.MULTILINE)
    scores = {float(value): float(score) for value, score in rows}
    assert len(scores) == 5 and all(score <= 0 for score in scores.values())
    selected = float(re.search(r"selected regularization: ([0-9.e-]+)", out).group(1))
    assert scores[selected] == max(scores.values())
    assert float(re.search(r"refitted pipeline: ([0-9.e-]+)", out).group(1)) == selected
    if "set_output" not in out:  # the last part needs pandas
        pytest.importorskip("pandas")
    assert "set_output(transform='pandas'): DataFrame of shape (3, 266)" in out
    assert "columns == get_feature_names_out(): True" in out


def test_save_load_example_round_trips():
    out = run_example("plot_save_load.py")
    assert "identical influences: True" in out.split("skinfl.save:")[1]
    assert "influences(X_test, y_test, X_train, y_train) identical: True" in out
    assert "joblib: " in out and out.count("identical influences: True") == 2
    # A file of another architecture and a modified file are refused.
    assert "another architecture: ValueError: The weights saved in digits.skinfl do not fit" in out
    assert "a modified file: TensorFileError: tampered.skinfl has been modified or corrupted" in out
    light, with_data = map(float, re.search(r"include_data=False: ([0-9.]+) MB \(with the data: ([0-9.]+) MB",
                                            out).groups())
    assert light < with_data
    assert "saved without its training data" in out


def test_lds_example_selects_the_subset_regularization():
    out = run_example("plot_lds_regularization.py")
    half = re.search(r"1/\(C alpha n\) = ([0-9.e-]+)", out).group(1)
    assert re.search(r"selected: ([0-9.e-]+)", out).group(1) == half
    scores = [float(score) for score in re.findall(r"LDS ([0-9.]+)", out)]
    assert len(scores) == 7 and max(scores[:6]) == scores[6] > 0.95


def test_language_model_example_names_the_training_text_behind_a_completion():
    pytest.importorskip("transformers")
    out = run_example("plot_language_model.py")
    assert re.search(r"prompt 'Return the ' -> '.+'", out)
    helpful = out.split("most helpful training sequences:\n")[1].split("most harmful")[0]
    harmful = out.split("most harmful training sequences:\n")[1].split("\n\n")[0]
    helpful_values = [float(line.split()[0]) for line in helpful.strip().splitlines()]
    harmful_values = [float(line.split()[0]) for line in harmful.strip().splitlines()]
    assert len(helpful_values) == len(harmful_values) == 3
    assert helpful_values == sorted(helpful_values, reverse=True) and harmful_values == sorted(harmful_values)
    assert min(helpful_values) > 0 > max(harmful_values)


def test_dask_example_writes_the_influences_into_zarr():
    pytest.importorskip("distributed")
    pytest.importorskip("zarr")
    out = run_example("plot_dask_zarr.py")
    assert "training data: 28740 images in 8 chunks of 4096" in out
    difference = float(re.search(r"largest difference of the eigenvalues to one process: (\S+)", out).group(1))
    assert difference < 1e-5
    assert "influences written to zarr: (360, 28740), 8 chunks; equal to one process: True" in out
    assert "top_influences is lazy: Array of shape (360, 5)" in out
