"""One run per output folder: a lock file that names the run holding the folder.

``OUTPUT_DIR/sc_tune_run.lock`` holds ``{"host", "pid", "pid_started", "started", "command"}`` of the run (training
or evaluation) that owns the folder. It is created whole and atomically (written to a private file, then hard-linked
into place, which fails if a lock is there), so a second run never sees a half-written lock. A run that finds a lock:

- held by a live process on this host, or by any process on another host (whose liveness cannot be checked here):
  refused with :class:`RunLockError`, which names that run and says how to proceed;
- held by a process of this host that is gone (killed, crashed; or its pid now belongs to a process started at
  another time): reported, and taken over (one run at a time removes a stale lock, after checking it is still the
  stale one, so two runs racing for it never both win);
- naming no process (no integer pid: hand-edited, or another tool's file): refused, naming the field.

The lock goes when the run ends (``release``); a run killed with SIGKILL leaves it behind, and the next run takes it
over as stale. Only the main process of a multi-process run holds it (:func:`hold`), and tells the others whether
it got it, so that no rank waits on a run that refused to start.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shlex
import socket
import sys
import time

logger = logging.getLogger(__name__)

LOCK_FILE = "sc_tune_run.lock"


class RunLockError(RuntimeError):
    """Another run holds the output folder; the message names it."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), to tell a reused pid from the lock's owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = _process_start(pid)
    return started is None or now is None or now == started


def _describe(owner: dict) -> str:
    return (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
            f"{owner.get('command')}")


class RunLock:
    def __init__(self, path: str, owner: dict):
        self.path = path
        self.owner = owner

    def release(self) -> None:
        """Remove the lock if it is still this run's (a later run may have taken a stale one over)."""
        try:
            with open(self.path) as f:
                current = json.load(f)
        except (OSError, ValueError):
            return
        if current.get("pid") == self.owner["pid"] and current.get("host") == self.owner["host"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def acquire(folder: str, command: list[str] | None = None) -> RunLock:
    """Take ``folder``'s lock (creating the folder), or raise :class:`RunLockError` naming the run that has it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _process_start(os.getpid()),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(command if command is not None else [sys.executable, *sys.argv]),
    }
    private = f"{path}.{owner['host']}.{owner['pid']}"
    with open(private, "w") as f:
        json.dump(owner, f)
    try:
        for _ in range(100):  # another run may take the lock, or take a stale one over, between two attempts
            try:
                os.link(private, path)
                return RunLock(path, owner)
            except FileExistsError:
                pass
            other = _read(path)
            if other is None:
                continue  # released meanwhile
            same_host = other.get("host") == owner["host"]
            if not same_host or _alive(other["pid"], other.get("pid_started")):
                where = "" if same_host else " (on another machine, so this one cannot tell whether it still runs)"
                raise RunLockError(
                    f"{folder} is in use by another run{where}: {_describe(other)}. Two runs in one folder overwrite "
                    f"each other's checkpoints; choose another --output_dir, wait for that run to end, or, if it is "
                    f"no longer running, delete {path}"
                )
            if _remove_stale(path, other):
                logger.warning("%s: taking over the lock of a run that is no longer running (%s)", path,
                               _describe(other))
        raise RunLockError(f"{path}: could not take the lock (other runs keep taking it)")
    finally:
        os.remove(private)


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            owner = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunLockError(f"{path} exists but cannot be read ({e}): another run may be using its folder; delete "
                           "the file if no run is") from None
    # Only a pid can be checked for life: a lock without one (hand-edited, another tool's) is neither taken over
    # nor trusted. (os.kill with pid -1 or 0 would ask about every process, or the whole group.)
    if not isinstance(owner, dict) or type(owner.get("pid")) is not int or owner["pid"] <= 0:
        raise RunLockError(f'{path} exists but names no process (no integer "pid"): another run may be using its '
                           "folder; delete the file if no run is")
    return owner


def _remove_stale(path: str, stale: dict) -> bool:
    """Remove ``path`` if it still holds ``stale``. One run at a time does this (``path.takeover`` is created
    exclusively), so a lock another run has just taken is never removed by a run that read the stale one."""
    takeover = path + ".takeover"
    try:
        fd = os.open(takeover, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(takeover) > 60:  # left by a run killed mid-takeover
                os.remove(takeover)
        time.sleep(0.05)
        return False
    try:
        if _read(path) != stale:
            return False
        os.remove(path)
        return True
    finally:
        os.close(fd)
        os.remove(takeover)


def _unshared(folder: str, dist) -> str | None:
    """Why ``folder`` is not one folder for every process (some cannot see the lock rank 0 wrote), or None.

    Every rank writes its own files into each training checkpoint (RNG state, rollout buffer, ZeRO shards) and rank 0
    commits it: on an output folder each node keeps on its own disk the first save fails, after ``save_steps`` of
    training (the other nodes' files are missing). Evaluation too: every rank appends its scored rows to its own file
    in the output folder, and rank 0 checks the settings file the others read (a node with its own folder failed on
    "No such file or directory: .../settings.json"), and a resume reads every rank's rows. Checked here, before the
    model loads."""
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), os.path.isfile(os.path.join(folder, LOCK_FILE)),
                                   os.path.abspath(folder)))
    # A node given another OUTPUT_DIR is the likelier cause than an unshared file system: name its folder, so that
    # the message does not send a user with a shared file system off to move the run.
    blind = [f"rank {rank} on {host}" + (f" (given {path})" if path != views[0][2] else "")
             for rank, (host, sees, path) in enumerate(views) if not sees]
    if not blind:
        return None
    return (f"{folder} is not one folder for every process: {', '.join(blind)} cannot see the run lock that rank 0 "
            f"wrote there ({LOCK_FILE}, in {views[0][2]}). Every node writes into the output folder (its part of each "
            "checkpoint, its scored rows): give every node the same OUTPUT_DIR, on a file system all nodes share")


@contextlib.contextmanager
def hold(folder: str, is_main: bool = True, world_size: int = 1, command: list[str] | None = None,
         every_rank_writes: bool = False):
    """Hold ``folder``'s lock for the body (main process only); every process raises if the main one was refused,
    or, where ``every_rank_writes`` into the folder (training's checkpoints, evaluation's rows), if any process cannot
    see the lock the main one wrote (a folder not shared by every node)."""
    lock, error = None, None
    if is_main:
        try:
            lock = acquire(folder, command)
        except RunLockError as e:
            error = str(e)
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
            if error is None and every_rank_writes:
                error = _unshared(folder, dist)
    if error is not None:
        if lock is not None:
            lock.release()
        raise RunLockError(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
