"""``scripts/mutation_sweep.py``: a change the named tests catch is reported caught, one they let through SURVIVED,
and the working tree's module is left as it was."""

import hashlib
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = f"{ROOT}/scripts/mutation_sweep.py"


def sweep(*argv: str) -> list[dict]:
    result = subprocess.run([sys.executable, SCRIPT, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_list_names_each_change_on_its_line():
    listed = sweep("sc_tune/ppo.py", "--list")
    first = listed[0]  # masked_mean's division, the first operator in the module
    assert (first["mutant"], first["change"]) == (0, "Div -> Mult")
    assert first["code"] == "return (values * mask).sum() / mask.sum().clamp(min=1.0)"
    dropped = [m for m in listed if m["change"] == "USub dropped"]
    assert "rewards_BT = -kl_coef * kl_BT * mask" in {m["code"] for m in dropped}


@pytest.mark.slow
def test_a_caught_change_and_a_surviving_one_and_the_module_untouched():
    module = f"{ROOT}/sc_tune/ppo.py"
    before = hashlib.sha256(open(module, "rb").read()).hexdigest()
    # masked_mean's "/" as "*": its own test catches it; a test of another function lets it through
    caught = sweep("sc_tune/ppo.py", "tests/test_ppo.py::test_masked_mean_ignores_masked_entries", "--only", "0")
    survived = sweep("sc_tune/ppo.py", "tests/test_ppo.py::test_last_token_index", "--only", "0")
    assert [(r["mutant"], r["status"]) for r in caught[:-1]] == [(0, "caught")]
    assert caught[-1] == {"module": "sc_tune/ppo.py", "mutants": 1, "caught": 1, "SURVIVED": 0}
    assert [(r["mutant"], r["status"]) for r in survived[:-1]] == [(0, "SURVIVED")]
    assert hashlib.sha256(open(module, "rb").read()).hexdigest() == before


def test_a_sweep_stopped_by_sigterm_leaves_no_copy_and_no_tests_running(tmp_path):
    """A sweep is long: one stopped with kill (or by a scheduler) deletes its copy of the repository and its tests."""
    import os
    import signal
    import time

    env = dict(os.environ, TMPDIR=str(tmp_path))
    sweep = subprocess.Popen([sys.executable, SCRIPT, "sc_tune/ppo.py", "tests/test_ppo.py", "--only", "0"], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _working_in(tmp_path):  # the tests of the unchanged module run in the copy
        assert time.monotonic() < deadline and sweep.poll() is None
        time.sleep(0.05)
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [] and _working_in(tmp_path) == []


def _working_in(folder) -> list[str]:
    """The processes whose working directory is inside ``folder``."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(str(folder)):
                found.append(pid)
        except OSError:
            continue
    return found


def test_what_runs_in_the_copy_is_killed_and_nothing_else(tmp_path):
    """The last sweep of the copy: a process left working in it (a test whose start a SIGTERM interrupted, so that
    ``subprocess.run`` never learned its pid) is killed; one working beside it, in a folder that only starts alike,
    is not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutation_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    copy, beside = tmp_path / "copy", tmp_path / "copy_other"
    copy.mkdir()
    beside.mkdir()
    inside = subprocess.Popen(["sleep", "60"], cwd=copy)
    outside = subprocess.Popen(["sleep", "60"], cwd=beside)
    try:
        module.kill_what_runs_in(str(copy))
        assert inside.wait(timeout=10) == -9 and outside.poll() is None
    finally:
        inside.kill()
        outside.kill()
