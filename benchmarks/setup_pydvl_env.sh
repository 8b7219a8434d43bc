#!/usr/bin/env bash
# Create benchmarks/.venv-pydvl: pyDVL 0.10.0 with its torch influence extra, the CPU torch of skinfl's
# environment (2.13.0), numpy<2 (pyDVL's pin) and scikit-learn; then kronfluence 1.0.1 (KRONFLUENCE=0 skips it).
# pyDeprecate 0.3.2 (pyDVL's lower bound) keeps `import pydvl.influence.torch` free of FutureWarnings.
# kronfluence declares torchvision, which it never imports and which would bring another torch: it is installed
# without dependencies, and its other declared dependencies by name under the same constraints.
# `pip check` then reports only "kronfluence requires torchvision", which is accepted.
# transformers (bench_language_model.py's GPT-2 on kronfluence's side) is installed with it, at the version of
# skinfl's environment (5.25.0, which takes numpy 1.26), under the same constraints (TRANSFORMERS=0 skips it).
# Each part does nothing if it is already installed.
# Usage: bash benchmarks/setup_pydvl_env.sh   (PYTHON=<interpreter> to choose the venv's Python, KRONFLUENCE=0,
#        TRANSFORMERS=0)
set -euo pipefail

VENV="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/.venv-pydvl"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==2.13.0\nnumpy<2\npyDeprecate==0.3.2\n' > "$CONSTRAINTS"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '
from importlib.metadata import version
assert version("pyDVL") == "0.10.0" and version("torch").startswith("2.13.0")
import pydvl.influence.torch' 2>/dev/null; then
    echo "pyDVL 0.10.0 already installed in $VENV."
else
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install -c "$CONSTRAINTS" "torch==2.13.0" "pyDVL[influence]==0.10.0" "numpy<2" \
        "pyDeprecate==0.3.2" scikit-learn
    "$VENV/bin/python" -m pip check
fi
"$VENV/bin/python" -c "import pydvl, torch, numpy; print('pydvl', pydvl.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"

if [ "${KRONFLUENCE:-1}" = "0" ]; then
    echo "KRONFLUENCE=0: kronfluence not installed (its runs are reported as not available)."
    exit 0
fi
if "$VENV/bin/python" -c '
from importlib.metadata import version
assert version("kronfluence") == "1.0.1"
from kronfluence.analyzer import Analyzer, prepare_model' 2>/dev/null; then
    echo "kronfluence 1.0.1 already installed in $VENV."
else
    "$VENV/bin/python" -m pip install -c "$CONSTRAINTS" "accelerate==1.16.0" "einconv==0.1.0" "einops==0.8.2" \
        "opt-einsum==3.4.0" "safetensors==0.8.0" "tqdm>=4.66.4"
    "$VENV/bin/python" -m pip install --no-deps "kronfluence==1.0.1"
fi
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.25.0}"
if [ "${TRANSFORMERS:-1}" = "0" ]; then
    echo "TRANSFORMERS=0: transformers not installed (bench_language_model.py's kronfluence runs fail)."
elif "$VENV/bin/python" -c "
from importlib.metadata import version
assert version('transformers') == '$TRANSFORMERS_VERSION'
from transformers import GPT2LMHeadModel" 2>/dev/null; then
    echo "transformers $TRANSFORMERS_VERSION already installed in $VENV."
else
    "$VENV/bin/python" -m pip install -c "$CONSTRAINTS" "transformers==$TRANSFORMERS_VERSION"
fi
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
"$VENV/bin/python" -c "import kronfluence, accelerate; print('kronfluence', kronfluence.__version__, 'accelerate', accelerate.__version__)"
if [ "${TRANSFORMERS:-1}" != "0" ]; then
    "$VENV/bin/python" -c "import transformers, numpy; print('transformers', transformers.__version__, 'numpy', numpy.__version__)"
fi
