"""The tests' own launch helpers: a launch that outlives its timeout leaves nothing running (tests.helpers.run_launch,
kill_process_tree)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import kill_process_tree, run_launch


def _state(pid: int) -> str:
    """The process's state letter ('Z': exited, not yet reaped), or 'gone'."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _wait_dead(pid: int) -> str:
    """The process's state once it is dead, or after 10 s."""
    deadline = time.monotonic() + 10
    while _state(pid) not in ("Z", "gone") and time.monotonic() < deadline:
        time.sleep(0.1)
    return _state(pid)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_launch_that_times_out_is_killed_with_every_process_it_started(tmp_path):
    marker = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):  # a background child in the launch's own process group
        run_launch(["sh", "-c", f"sleep 60 & echo $! > {marker}; wait"], 1)
    # Killing only the launcher would leave the child holding the output pipes: the call would return after its 60 s.
    assert time.monotonic() - started < 30
    assert _wait_dead(int(marker.read_text())) in ("Z", "gone")


# a launcher whose child starts in a session of its own, as torchrun starts each rank: the launch's group misses it
LAUNCHER = """
import subprocess, sys
child = subprocess.Popen(["sleep", "60"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
child.wait()
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_timed_out_launch_kills_a_child_in_a_session_of_its_own(tmp_path):
    marker = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_launch([sys.executable, "-c", LAUNCHER, str(marker)], 3)
    assert time.monotonic() - started < 30  # the child held the pipes: left alive, the call waits out its 60 s
    assert _wait_dead(int(marker.read_text())) in ("Z", "gone")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_kill_process_tree_reaches_grandchildren_in_other_sessions(tmp_path):
    marker = tmp_path / "child.pid"
    launch = subprocess.Popen(["sh", "-c", f"{sys.executable} -c '{LAUNCHER}' {marker}"])
    try:
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(marker.read_text())
        kill_process_tree(launch.pid)
        assert launch.wait(timeout=10) == -9
        assert _wait_dead(child) in ("Z", "gone")
    finally:
        if launch.poll() is None:
            launch.kill()


def test_a_launch_returns_its_status_and_both_streams():
    result = run_launch(["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
