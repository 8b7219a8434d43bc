#!/usr/bin/env bash
# Create benchmarks/.venv-pydvl with pyDVL 0.10.0 + its torch influence extra.
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
# Idempotent: does nothing if the venv already has pydvl 0.10.0 importable.
# Usage:  bash benchmarks/setup_pydvl_env.sh   [PYTHON=/path/to/python3]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-pydvl"
PYTHON="${PYTHON:-python3}"
PYDVL_VERSION="0.10.0"
TORCH_VERSION="2.13.0"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$PYDVL_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
assert version("pyDVL") == sys.argv[1]
assert version("torch").startswith("2.13.0")
import pydvl.influence.torch  # noqa: F401  (extra deps present)
PY
then
    echo "pydvl $PYDVL_VERSION already installed in $VENV; nothing to do."
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat > "$CONSTRAINTS" <<CONS
torch==$TORCH_VERSION
numpy<2
pyDeprecate==0.3.2
CONS

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
"$VENV/bin/python" -c "import pydvl, torch, numpy; from pydvl.influence.torch import DirectInfluence, CgInfluence; print('pydvl', pydvl.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"
