"""``scripts/mutation_sweep.py``: a change the named tests catch is reported caught, one they let through SURVIVED,
and the working tree's module is left as it was."""

import hashlib
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, script_module

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


@pytest.mark.slow
def test_a_mutant_whose_tests_allocate_without_end_is_stopped_by_the_memory_cap():
    """``take_reference_flags``' step back (``i - 2``) appends notes forever: 21 GB in 160 s on this machine, with
    only the timeout to stop it. Under the address-space cap it ends in MemoryError within seconds, caught."""
    # the two "Add -> Sub" of that line: argv[i - 1] (refused at once) and i - 2 (the endless one)
    line = [str(m["mutant"]) for m in sweep("sc_tune/reference_flags.py", "--list")
            if m["code"] == "value, i = argv[i + 1], i + 2" and m["change"] == "Add -> Sub"]
    assert len(line) == 2, line
    result = sweep("sc_tune/reference_flags.py",
                   "tests/test_cli.py::test_the_reference_flags_are_taken_out_in_every_spelling_and_the_rest_kept_in_order",
                   "--only", ",".join(line), "--max_memory_gb", "4", "--timeout", "240")
    assert [r["status"] for r in result[:-1]] == ["caught", "caught"], result
    assert max(r["seconds"] for r in result[:-1]) < 60, result


def test_the_memory_cap_ends_an_allocation_past_it_and_lets_one_under_it_run():
    mutation_sweep = script_module("mutation_sweep")
    cap = mutation_sweep.address_space_limit(1 << 30)
    over = subprocess.run([sys.executable, "-c", "bytearray(2 << 30)"], capture_output=True, text=True,
                          preexec_fn=cap, timeout=60)
    assert over.returncode != 0 and "MemoryError" in over.stderr
    under = subprocess.run([sys.executable, "-c", "bytearray(64 << 20)"], capture_output=True, text=True,
                           preexec_fn=cap, timeout=60)
    assert under.returncode == 0, under.stderr


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
    module = script_module("mutation_sweep")
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
