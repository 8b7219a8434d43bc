#!/usr/bin/env bash
# Create benchmarks/.venv-pydvl with pyDVL 0.10.0 + its torch influence extra,
# and add kronfluence 1.0.1 to it (the EK-FAC comparison; KRONFLUENCE=0 skips it).
#
# Pins: pyDVL[influence]==0.10.0, torch==2.13.0 (CPU wheel available locally;
# an unpinned torch would pull a multi-GB CUDA build), numpy<2 (pyDVL 0.10.0
# requires numpy>=1.20,<2), scikit-learn.  torch 2.13.0 does not pin numpy, so
# it coexists with numpy 1.26.x.  On Python >= 3.11 the influence extra pulls
# zarr 3.x, dask and distributed; pyDVL itself pins numcodecs<0.16.
# pyDeprecate is pinned to 0.3.2 (pyDVL's lower bound): with the latest
# pyDeprecate (0.14) `import pydvl.influence.torch` prints two FutureWarnings
# (`template_mgs` / `target=True` deprecated); with 0.3.2 the import is silent.
# Verified working set (2 CPU, Python 3.11): pyDVL 0.10.0, torch 2.13.0+cpu,
# numpy 1.26.4, scipy 1.17.1, scikit-learn 1.9.1 -- `pip check` is clean.
#
# kronfluence 1.0.1 is installed with --no-deps: it declares torchvision>=0.16,
# which it never imports and which would pull another torch build. Its other
# declared dependencies are installed (pinned to the verified versions) with
# the same constraints, so torch stays 2.13.0+cpu and numpy 1.26.4:
#   accelerate==1.16.0 (brings huggingface_hub 2.4.0 and its own small deps),
#   einconv==0.1.0, einops==0.8.2, opt-einsum==3.4.0, safetensors==0.8.0,
#   tqdm (already there for pyDVL; 4.70.1).
# `pip check` then reports only "kronfluence 1.0.1 requires torchvision",
# which this script accepts. Verified: `import kronfluence` and its Analyzer
# with strategy="ekfac" (benchmarks/_kronfluence.py) on the benchmark MLPs,
# CNN and logistic regression, agreeing with skinfl's EkfacInfluence to
# rounding with the empirical Fisher.
#
# Idempotent: each part does nothing if already installed (pydvl 0.10.0
# importable; kronfluence 1.0.1 importable).
# Usage:  bash benchmarks/setup_pydvl_env.sh   [PYTHON=/path/to/python3] [KRONFLUENCE=0]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-pydvl"
PYTHON="${PYTHON:-python3}"
PYDVL_VERSION="0.10.0"
TORCH_VERSION="2.13.0"
KRONFLUENCE_VERSION="1.0.1"
KRONFLUENCE="${KRONFLUENCE:-1}"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat > "$CONSTRAINTS" <<CONS
torch==$TORCH_VERSION
numpy<2
pyDeprecate==0.3.2
CONS

# ---------------------------------------------------------------- pyDVL
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$PYDVL_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
assert version("pyDVL") == sys.argv[1]
assert version("torch").startswith("2.13.0")
import pydvl.influence.torch  # noqa: F401  (extra deps present)
PY
then
    echo "pydvl $PYDVL_VERSION already installed in $VENV."
else
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # A global pip config (e.g. /etc/xdg/pip/pip.conf) may also set a constraint
    # file; our pins are compatible with it (torch<=2.14.1).
    "$VENV/bin/python" -m pip install -c "$CONSTRAINTS" \
        "torch==$TORCH_VERSION" \
        "pyDVL[influence]==$PYDVL_VERSION" \
        "numpy<2" \
        "pyDeprecate==0.3.2" \
        scikit-learn
    "$VENV/bin/python" -m pip check
fi
"$VENV/bin/python" -c "import pydvl, torch, numpy; from pydvl.influence.torch import DirectInfluence, CgInfluence, EkfacInfluence; print('pydvl', pydvl.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"

# ---------------------------------------------------------- kronfluence
if [ "$KRONFLUENCE" = "0" ]; then
    echo "KRONFLUENCE=0: kronfluence not installed (bench_solvers.py / loo_logreg.py report it as not available)."
    exit 0
fi
if "$VENV/bin/python" - "$KRONFLUENCE_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
assert version("kronfluence") == sys.argv[1]
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: F401  (its dependencies present)
PY
then
    echo "kronfluence $KRONFLUENCE_VERSION already installed in $VENV."
else
    # Its declared dependencies except torch (already pinned) and torchvision, then kronfluence alone.
    "$VENV/bin/python" -m pip install -c "$CONSTRAINTS" \
        "accelerate==1.16.0" \
        "einconv==0.1.0" \
        "einops==0.8.2" \
        "opt-einsum==3.4.0" \
        "safetensors==0.8.0" \
        "tqdm>=4.66.4"
    "$VENV/bin/python" -m pip install --no-deps "kronfluence==$KRONFLUENCE_VERSION"
fi
# Everything consistent except kronfluence's unused torchvision requirement.
broken="$("$VENV/bin/python" -m pip check 2>&1 | grep -v -e '^kronfluence [0-9.]* requires torchvision' \
    -e '^No broken requirements found' || true)"
if [ -n "$broken" ]; then
    echo "$broken"
    exit 1
fi
if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    echo "torchvision is installed in $VENV: it must not be (it pins its own torch)."
    exit 1
fi
"$VENV/bin/python" -c "import kronfluence, accelerate, torch; from kronfluence.analyzer import Analyzer, prepare_model; from kronfluence.arguments import FactorArguments, ScoreArguments; print('kronfluence', kronfluence.__version__, 'accelerate', accelerate.__version__, 'torch', torch.__version__)"
