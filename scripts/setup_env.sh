#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned stack. Used by test.sh and quickstart.sh.
# torch goes first and alone: `torch==2.13.0` takes the wheel lying on disk on these machines, and no
# later package may pull a different (CUDA, several GB) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || { python -m pip install -q --upgrade pip; python -m pip install -q torch==2.13.0; }
DS_BUILD_OPS=0 python -m pip install -q -r requirements.txt
python -m pip check
