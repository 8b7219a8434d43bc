"""The README's main job runs and finds what it claims to find."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name):
    """The example's standard output, after checking that it ran without error."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=600, check=False
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


def test_select_regularization_example_finds_the_true_value():
    out = run_example("plot_select_regularization.py")
    true_value = re.search(r"regularization 1/\(C n\) = ([0-9.e-]+)", out).group(1)
    assert re.search(r"selected: ([0-9.e-]+)", out).group(1) == true_value
    pearson = float(re.search(r"leave-one-out Pearson ([0-9.]+), Spearman", out).group(1))
    assert pearson > 0.99
