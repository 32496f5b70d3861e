#!/bin/sh
# Create .venv (if missing), install the pinned stack and this package (editable, so `import sc_tune` works
# from any folder). Used by test.sh and quickstart.sh; POSIX sh, so `sh scripts/setup_env.sh` works with dash.
# torch goes first and alone: `torch==2.13.0` takes the wheel lying on disk on these machines, and no
# later package may pull a different (CUDA, several GB) build.
# Optional features: EXTRAS="wandb,meteor,demo" sh scripts/setup_env.sh (see README, "Optional extras").
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || { python -m pip install -q --upgrade pip; python -m pip install -q torch==2.13.0; }
DS_BUILD_OPS=0 python -m pip install -q -r requirements.txt
# The package: no dependencies of its own (requirements.txt pins them) and no build isolation, so that it
# installs offline with the venv's setuptools. Re-installed only when `sc_tune` resolves to another folder.
HERE=$(pwd -P)
if ! (cd / && python -c 'import os, sys, sc_tune; sys.exit(os.path.realpath(sc_tune.__file__) != os.path.join(sys.argv[1], "sc_tune", "__init__.py"))' "$HERE") 2>/dev/null; then
    python -c "import setuptools" 2>/dev/null || python -m pip install -q "setuptools>=64"  # Python >= 3.12 venvs lack it
    python -m pip install -q --no-deps --no-build-isolation -e .
fi
if [ -n "$EXTRAS" ]; then
    python -m pip install -q --no-build-isolation -e ".[$EXTRAS]"
    # pip check cannot see a torchvision built for another torch build (README, "The demo extra and torch").
    python -c "from sc_tune.environment import check_torchvision; check_torchvision()"
fi
python -m pip check
