"""How a command of a distributed launch leaves: the process group closed together, then an exit that skips the
interpreter's teardown.

Why not a plain exit: after a complete run, one rank of a two-process gloo launch aborted at exit ("terminate called
without an active exception", SIGABRT; 8 of 34 ZeRO-3 LoRA launches on a 2-core machine kept busy), so torchrun
failed the launch of a model already exported. The core dump shows why. A gloo worker thread
(``ProcessGroupGloo::runLoop``) drops the last reference to a finished collective, and with it the tensors of earlier
ones; freeing a tensor that Python let go of takes the GIL. The main thread has meanwhile started the interpreter's
teardown, so ``take_gil`` ends the worker thread with ``pthread_exit``, whose unwinding through the collective's
(``noexcept``) destructor calls ``std::terminate``. ``destroy_process_group`` does not join those threads while
DeepSpeed or accelerate still hold the group, and which of the two threads comes first is up to the scheduler.

So a launched command runs what a normal exit runs before the teardown (it joins the Python threads, runs the
``atexit`` functions, such as logging's flush and a tracker's upload, and flushes the standard streams) and then
leaves with ``os._exit``, before any worker thread can meet a finalizing interpreter. Outside a launch (one process,
no worker threads) the exit is the usual one.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Callable, NoReturn

# Set by every launcher the scripts use (torchrun, accelerate, deepspeed) in each process it starts.
LAUNCH_VARIABLES = ("LOCAL_RANK", "WORLD_SIZE")


def close_process_group() -> None:
    """Leave the process group together (a barrier, then ``destroy_process_group``), so that no rank exits while
    another still waits in a collective with it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launched() -> bool:
    """Whether this process is one rank of a distributed launch."""
    return any(name in os.environ for name in LAUNCH_VARIABLES)


def exit_status(stop: SystemExit) -> int:
    """The status a ``SystemExit`` gives the process, as the interpreter reads it (a message: printed, status 1)."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def run_command(cli: Callable[[], None]) -> NoReturn:
    """Run a command's ``cli`` and exit with its status; in a distributed launch, without the interpreter's teardown
    (module docstring). An exception other than ``SystemExit`` propagates as usual: its traceback is the report."""
    try:
        cli()
        status = 0
    except SystemExit as stop:
        if not launched():
            raise
        status = exit_status(stop)
    if not launched():
        sys.exit(status)
    for thread in threading.enumerate():  # what the interpreter's exit does first: wait for the non-daemon threads
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)
