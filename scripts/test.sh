#!/bin/sh
# The test command: set up .venv from nothing (scripts/setup_env.sh), then run the CPU test suite.
#   sh scripts/test.sh              all tests
#   sh scripts/test.sh -k ppo       extra arguments go to pytest
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup_env.sh
. .venv/bin/activate
. scripts/env.sh
exec python -m pytest tests "$@"
