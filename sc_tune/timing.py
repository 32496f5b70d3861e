"""Wall-clock seconds per named stage of a training step, logged as ``timing/<stage>``.

One ``StageClock`` per trainer; a stage is timed with ``with clock.stage(name):`` or, for a trainer
method, ``@timed_stage(name)`` (it reads ``self.stage_clock``). Times of a stage that runs several times
in a step add up; ``pop`` hands the step's totals over and starts the next step from zero. On CUDA the
clock synchronises at each boundary, since kernels run asynchronously and would otherwise be charged
to whichever stage happens to wait for them.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StageClock:
    def __init__(self):
        self._seconds: dict[str, float] = defaultdict(float)
        self._open: set[str] = set()

    @contextmanager
    def stage(self, name: str):
        if name in self._open:  # a stage timed inside itself (a timed method calling another) counts once
            yield
            return
        self._open.add(name)
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self._seconds[name] += time.perf_counter() - start
            self._open.discard(name)

    def add(self, name: str, seconds: float) -> None:
        """Charge time measured elsewhere (e.g. the vision cache's trunk runs) to ``name``."""
        self._seconds[name] += seconds

    def pop(self) -> dict[str, float]:
        """This step's seconds per stage, as ``timing/<stage>`` log keys; the clock restarts from zero."""
        totals = {f"timing/{name}": seconds for name, seconds in self._seconds.items()}
        self._seconds.clear()
        return totals


def timed_stage(name: str):
    """Decorator for a method of an object with a ``stage_clock``: the call is timed as stage ``name``."""

    def decorate(method):
        @functools.wraps(method)
        def timed(self, *args, **kwargs):
            with self.stage_clock.stage(name):
                return method(self, *args, **kwargs)

        return timed

    return decorate
