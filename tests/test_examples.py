"""The README's main job runs and finds what it claims to find."""

import os
import re
import subprocess
import sys
from pathlib import Path

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
    # No display here: both figures are saved, and the demo says where.
    saved = [Path(path) for path in re.findall(r"figure saved: (\S+\.png)", out)]
    assert [path.name for path in saved] == ["digits_influences.png", "digits_mislabels.png"]
    assert all(path.stat().st_size > 10_000 for path in saved)


def test_select_regularization_example_finds_the_true_value():
    out = run_example("plot_select_regularization.py")
    true_value = re.search(r"regularization 1/\(C n\) = ([0-9.e-]+)", out).group(1)
    assert re.search(r"selected: ([0-9.e-]+)", out).group(1) == true_value
    pearson = float(re.search(r"leave-one-out Pearson ([0-9.]+), Spearman", out).group(1))
    assert pearson > 0.99
