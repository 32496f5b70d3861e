"""StageClock: stage times add up within a step and restart from zero at each pop."""

import time

from sc_tune.timing import StageClock, timed_stage


class _Worker:
    def __init__(self):
        self.stage_clock = StageClock()

    @timed_stage("work")
    def work(self, seconds):
        time.sleep(seconds)
        return seconds


def test_stages_accumulate_and_pop_restarts():
    worker = _Worker()
    assert worker.work(0.02) == 0.02
    worker.work(0.02)
    with worker.stage_clock.stage("other"):
        time.sleep(0.01)
    worker.stage_clock.add("other", 1.0)
    first = worker.stage_clock.pop()
    assert set(first) == {"timing/work", "timing/other"}
    assert 0.04 <= first["timing/work"] < 0.5
    assert 1.01 <= first["timing/other"] < 1.5
    assert worker.stage_clock.pop() == {}


def test_a_stage_timed_inside_itself_counts_once():
    # A timed method that opens its own stage again (or calls another method timed as the same stage) once
    # reported twice the seconds it took, which made locating look like the slowest rollout stage.
    worker = _Worker()
    with worker.stage_clock.stage("work"):
        worker.work(0.1)
    seconds = worker.stage_clock.pop()["timing/work"]
    assert 0.1 <= seconds < 0.19
