"""The tests' own launch helper: a launch that outlives its timeout leaves nothing running (tests.helpers.run_launch)."""

import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import run_launch


def _state(pid: int) -> str:
    """The process's state letter ('Z': exited, not yet reaped), or 'gone'."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_launch_that_times_out_is_killed_with_every_process_it_started(tmp_path):
    marker = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):  # a background child, as torchrun's ranks are to torchrun
        run_launch(["sh", "-c", f"sleep 60 & echo $! > {marker}; wait"], 1)
    # Killing only the launcher would leave the child holding the output pipes: the call would return after its 60 s.
    assert time.monotonic() - started < 30
    child = int(marker.read_text())
    deadline = time.monotonic() + 10
    while _state(child) not in ("Z", "gone") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _state(child) in ("Z", "gone")


def test_a_launch_returns_its_status_and_both_streams():
    result = run_launch(["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
