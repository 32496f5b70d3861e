"""One run per output folder (issue 19, item 7): the lock names the other run; a stale one is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from sc_tune import run_lock
from sc_tune.run_lock import LOCK_FILE, RunLockError, acquire
from tests.conftest import ROOT

# The holder's memory grows after it takes the lock, as a training run's does: what identifies the owner (the pid and
# its kernel start time) must not change with it.
HOLDER = (
    "import sys, time; sys.path.insert(0, sys.argv[2]); from sc_tune.run_lock import acquire; "
    "acquire(sys.argv[1], ['python', 'finetune.py', '--output_dir', sys.argv[1]]); grown = bytearray(1 << 26); "
    "print('held', flush=True); time.sleep(600)"
)


@pytest.fixture
def holder(tmp_path):
    """A live process of this host holding tmp_path/run's lock."""
    folder = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), ROOT], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield folder, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_live_run_holds_the_folder_and_is_named(holder):
    folder, process = holder
    with pytest.raises(RunLockError) as info:
        acquire(str(folder))
    message = str(info.value)
    assert f"pid {process.pid} on {socket.gethostname()}" in message
    assert f"finetune.py --output_dir {folder}" in message and str(folder / LOCK_FILE) in message
    with pytest.raises(subprocess.TimeoutExpired):  # asking whether the owner runs sends it no signal
        process.wait(timeout=1)


def test_the_lock_of_a_killed_run_is_reported_and_taken_over(holder, caplog):
    folder, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (folder / LOCK_FILE).exists()  # SIGKILL leaves it behind
    with caplog.at_level(logging.WARNING):
        lock = acquire(str(folder), ["python", "evaluate.py"])
    assert f"no longer running (pid {process.pid}" in caplog.text
    owner = json.loads((folder / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["command"] == "python evaluate.py"
    lock.release()
    assert not (folder / LOCK_FILE).exists()


def test_a_reused_pid_is_not_mistaken_for_the_owner(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                "pid_started": "1", "started": "earlier", "command": "old run"}))
    with caplog.at_level(logging.WARNING):
        acquire(str(folder)).release()  # this pid, started at another time: the old owner is gone
    assert "no longer running" in caplog.text and "old run" in caplog.text


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_a_lock_from_another_machine_is_never_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    pid = _dead_pid()  # gone on this machine, which says nothing about node-7
    (folder / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": pid, "started": "2026-12-04T10:00:00+00:00",
                                                "command": "torchrun finetune.py"}))
    with pytest.raises(RunLockError, match=rf"on another machine.*pid {pid} on node-7.*torchrun finetune\.py.*delete"):
        acquire(str(folder))


def test_a_stale_lock_is_removed_only_if_it_is_still_the_stale_one(tmp_path):
    """The takeover re-reads the lock under its own mutex: a run that read the stale lock never removes the one a
    faster run has just put there."""
    folder = tmp_path / "run"
    folder.mkdir()
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "command": "old"}
    fresh = {"host": socket.gethostname(), "pid": os.getpid(), "command": "the winner"}
    (folder / LOCK_FILE).write_text(json.dumps(fresh))
    assert not run_lock._remove_stale(str(folder / LOCK_FILE), stale)
    assert json.loads((folder / LOCK_FILE).read_text()) == fresh
    (folder / LOCK_FILE).write_text(json.dumps(stale))
    assert run_lock._remove_stale(str(folder / LOCK_FILE), stale) and not (folder / LOCK_FILE).exists()


def test_a_takeover_in_progress_is_waited_for_and_one_left_by_a_killed_run_is_cleared(tmp_path):
    """``lock.takeover`` is the mutex of removing a stale lock: while another run holds it, this one removes nothing
    (it retries); one older than a minute was left by a run killed mid-takeover and is cleared for the next try."""
    folder = tmp_path / "run"
    folder.mkdir()
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "command": "old"}
    (folder / LOCK_FILE).write_text(json.dumps(stale))
    takeover = folder / (LOCK_FILE + ".takeover")
    takeover.write_text("")
    assert not run_lock._remove_stale(str(folder / LOCK_FILE), stale)
    assert takeover.exists() and (folder / LOCK_FILE).exists()
    os.utime(takeover, (os.path.getmtime(takeover) - 120,) * 2)
    assert not run_lock._remove_stale(str(folder / LOCK_FILE), stale)  # cleared; the lock is removed on the next try
    assert not takeover.exists() and (folder / LOCK_FILE).exists()
    assert run_lock._remove_stale(str(folder / LOCK_FILE), stale) and not (folder / LOCK_FILE).exists()


@pytest.mark.parametrize("owner", [{"host": "this"}, {"host": "this", "pid": "12a"}, {"host": "this", "pid": 0},
                                   {"host": "this", "pid": -1}, ["not", "a", "lock"]])
def test_a_lock_without_a_pid_is_refused_naming_the_field(tmp_path, owner):
    """A hand-edited or foreign lock names no process to check: refused, saying what is wrong, and kept."""
    folder = tmp_path / "run"
    folder.mkdir()
    if isinstance(owner, dict):
        owner["host"] = socket.gethostname()
    (folder / LOCK_FILE).write_text(json.dumps(owner))
    with pytest.raises(RunLockError, match=rf"{folder / LOCK_FILE} exists but names no process \(no integer "
                                           r"\"pid\"\).*delete the file if no run is"):
        acquire(str(folder))
    assert json.loads((folder / LOCK_FILE).read_text()) == owner


@pytest.mark.parametrize("other", ["another host and pid", "this host, another pid", "another host, this pid"])
def test_release_leaves_a_lock_that_is_not_its_own(tmp_path, other):
    """A run whose stale lock was taken over meanwhile (by a run of this host, or of a node whose pid happens to be
    this one's) removes nothing at its end: the lock is the other run's."""
    folder = tmp_path / "run"
    lock = acquire(str(folder))
    host = socket.gethostname() if other.startswith("this host") else "node-7"
    pid = os.getpid() if other.endswith("this pid") else _dead_pid()
    (folder / LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid}))  # taken over meanwhile
    lock.release()
    assert (folder / LOCK_FILE).exists()


def test_a_second_training_run_in_the_folder_is_refused_before_it_touches_anything(holder, tiny_checkpoint):
    """Issue 19, 7: with --overwrite_output_dir the second run would have deleted the first's checkpoints."""
    import finetune
    from tests.test_checkpoints import cli_args

    folder, process = holder
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "model.safetensors").write_bytes(b"the first run's")
    argv = cli_args(tiny_checkpoint("qwen2_vl"), folder, "--max_steps", "2", "--overwrite_output_dir", "True")
    with pytest.raises(RunLockError, match=rf"in use by another run: pid {process.pid}"):
        finetune.main(argv)
    assert (folder / "checkpoint-2" / "model.safetensors").read_bytes() == b"the first run's"


def test_the_lock_is_held_for_the_run_and_released_after(tmp_path, monkeypatch):
    seen = []
    with run_lock.hold(str(tmp_path / "run")) as lock:
        seen.append(json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"])
        with pytest.raises(RunLockError):
            acquire(str(tmp_path / "run"))  # the same process does not get it twice either
    assert seen == [os.getpid()] and lock.owner["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_two_processes_racing_for_a_stale_lock_get_one_winner(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "command": "x"}))
    racer = ("import sys, time; sys.path.insert(0, sys.argv[2]); from sc_tune.run_lock import acquire, RunLockError\n"
             "try:\n    acquire(sys.argv[1]); print('won', flush=True); time.sleep(5)\n"
             "except RunLockError:\n    print('refused', flush=True)\n")
    racers = [subprocess.Popen([sys.executable, "-c", racer, str(folder), ROOT], stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    outcomes = sorted(r.stdout.readline().strip() for r in racers)
    for r in racers:
        r.kill()
        r.wait()
    assert outcomes == ["refused", "refused", "refused", "won"]


def test_a_lock_left_in_a_model_folder_is_not_carried_into_exports(tmp_path):
    """A model folder that was once a run's output may hold a stale lock: exports and checkpoints never copy it."""
    from sc_tune.export import carry_source_files

    source, out = tmp_path / "model", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    (source / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": 1}))
    (source / "chat_template.json").write_text("{}")
    assert carry_source_files(str(out), str(source)) == ["chat_template.json"]


SHARED_FOLDER_CHECK = """
import os, sys
sys.path.insert(0, sys.argv[4])
import torch.distributed as dist
from sc_tune.run_lock import LOCK_FILE, RunLockError, hold
rank, folders = int(sys.argv[1]), sys.argv[2].split(",")
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[3]}", rank=rank, world_size=2)
folder = folders[rank]  # one path per rank: what a node with its own disk sees at the same --output_dir
try:
    with hold(folder, rank == 0, 2, every_rank_writes=True):
        print("held", flush=True)
except RunLockError as e:
    print("refused:", e, flush=True)
dist.barrier()  # rank 0 has released the lock
print("lock left:", os.path.exists(os.path.join(folders[0], LOCK_FILE)), flush=True)
dist.destroy_process_group()
"""


def test_every_rank_is_refused_when_the_main_one_is(holder):
    """Only rank 0 takes the lock; it tells the others it was refused, so that no rank goes on (and waits in its
    first collective for a rank 0 that has stopped)."""
    from tests.helpers import free_port

    folder, process = holder
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", SHARED_FOLDER_CHECK, str(rank), f"{folder},{folder}", str(port),
                               ROOT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [r.communicate(timeout=120)[0] for r in ranks]
    for output in outputs:
        assert output.startswith(f"refused: {folder} is in use by another run: pid {process.pid} on "), outputs
        assert output.strip().endswith("lock left: True"), outputs  # the holder's lock, untouched


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-node"])
def test_training_refuses_an_output_folder_the_nodes_do_not_share(tmp_path, shared):
    """Every rank writes its part of each checkpoint into the output folder and rank 0 commits it, so an output
    folder that is each node's own disk failed at the first save, after save_steps of training. Every rank now
    looks for the lock rank 0 wrote; one that cannot see it stops every rank before the model loads, naming it, and
    rank 0's lock is released."""
    from tests.helpers import free_port

    folders = [tmp_path / "run", tmp_path / "run" if shared else tmp_path / "node1_disk" / "run"]
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", SHARED_FOLDER_CHECK, str(rank), ",".join(map(str, folders)),
                               str(port), ROOT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [r.communicate(timeout=120)[0] for r in ranks]
    if shared:
        assert all(o.startswith("held") for o in outputs), outputs
    else:
        for rank, output in enumerate(outputs):
            refusal = f"refused: {folders[rank]} is not one folder for every process: rank 1 on "
            assert output.startswith(refusal), output
            assert "cannot see the run lock that rank 0 wrote" in output
            # here each rank was given its own path (another OUTPUT_DIR on node 1): named, with rank 0's
            assert f"rank 1 on {socket.gethostname()} (given {folders[1]}) cannot see" in output, output
            assert f"({LOCK_FILE}, in {folders[0]}). " in output and "give every node the same OUTPUT_DIR" in output
    assert all(o.strip().endswith("lock left: False") for o in outputs), outputs
