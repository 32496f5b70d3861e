"""The evaluation loop in one process (``sc_tune.evaluation.runner.run_sharded``): which indices each batch gets, what
it refuses, what it logs. Several ranks, and a stop agreed between them, are tested in test_eval_distributed."""

import logging
import signal
import types

import pytest

from sc_tune.evaluation.runner import EvaluationStopped, run_sharded


def _recording():
    calls = []

    def score_batch(indices):
        calls.append(list(indices))
        return [f"row {i}" for i in indices]

    return calls, score_batch


def test_batches_cover_every_index_once_in_order_with_a_short_last_batch():
    calls, score_batch = _recording()
    rows, ranks = run_sharded(7, 3, score_batch, distributed=False)
    assert calls == [[0, 1, 2], [3, 4, 5], [6]]
    assert rows == [f"row {i}" for i in range(7)] and ranks.world_size == 1
    calls, score_batch = _recording()
    assert run_sharded(2, 1, score_batch, distributed=False)[0] == ["row 0", "row 1"] and calls == [[0], [1]]


def test_a_batch_size_under_one_and_a_batch_scored_short_are_errors():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        run_sharded(3, 0, lambda indices: [], distributed=False)
    with pytest.raises(RuntimeError, match=r"rec: scored 1 results for a batch of 2"):
        run_sharded(3, 2, lambda indices: ["one"], distributed=False, name="rec")


def test_rank_0_logs_every_tenth_batch(caplog):
    _, score_batch = _recording()
    with caplog.at_level(logging.INFO, logger="sc_tune.evaluation.runner"):
        run_sharded(25, 1, score_batch, distributed=False, name="rec")
    logged = [record.getMessage() for record in caplog.records]
    assert [line.split(" (")[0] for line in logged] == ["rec: rank 0 batch 10/25", "rec: rank 0 batch 20/25"]
    assert all(0 <= float(line.split(" (")[1].rstrip("s)")) < 60 for line in logged)  # seconds since the loop started


def test_a_stop_exits_with_the_status_its_signal_would_have_given():
    stopped = EvaluationStopped(signal.SIGTERM, 4, 10, "out/rec_progress")
    assert stopped.exit_code == 128 + 15
    assert str(stopped) == ("stopped by SIGTERM after 4 scored rows (4 of 10 samples, kept in out/rec_progress); the "
                            "same command scores the rest")


def test_evaluation_decodes_with_the_training_lengths_and_evaluate_py_defaults_to_them():
    import evaluate
    from sc_tune.arguments import SCTuneConfig
    from sc_tune.evaluation.runner import DESCRIBE_EVAL, LOCATE_EVAL

    training = {name: field.default for name, field in SCTuneConfig.__dataclass_fields__.items()}
    assert DESCRIBE_EVAL.max_new_tokens == training["describer_max_new_tokens"]
    assert LOCATE_EVAL.max_new_tokens == training["locator_max_new_tokens"]
    assert DESCRIBE_EVAL.min_new_tokens == LOCATE_EVAL.min_new_tokens == 0  # the describer may stop at once
    defaults = {name: field.default for name, field in evaluate.EvaluationArguments.__dataclass_fields__.items()}
    assert (defaults["describer_max_new_tokens"], defaults["describer_min_new_tokens"],
            defaults["locator_max_new_tokens"]) == (DESCRIBE_EVAL.max_new_tokens, 0, LOCATE_EVAL.max_new_tokens)


def _log(folder, stop):
    from sc_tune.evaluation.distributed import current_ranks
    from sc_tune.evaluation.progress import SampleLog

    return SampleLog(str(folder), "rec", {"n": 4}, current_ranks(False), stop=stop)


def test_a_signal_stops_after_its_batch_and_the_same_call_scores_only_the_rest(tmp_path):
    stop = types.SimpleNamespace(received=None)  # what run_sharded reads of a listening RecordsSignal
    calls = []

    def score_batch(indices):
        calls.append(list(indices))
        if len(calls) == 1:
            stop.received = signal.SIGTERM  # arrives while the first batch is scored
        return [{"i": i} for i in indices]

    with pytest.raises(EvaluationStopped, match=r"stopped by SIGTERM after 2 scored rows \(2 of 4 samples") as stopped:
        run_sharded(4, 2, score_batch, distributed=False, progress=_log(tmp_path, stop))
    assert stopped.value.exit_code == 143 and calls == [[0, 1]]
    stop.received = None
    rows, _ = run_sharded(4, 2, score_batch, distributed=False, progress=_log(tmp_path, stop))
    assert rows == [{"i": i} for i in range(4)] and calls == [[0, 1], [2, 3]]  # rows 0 and 1 from the disk
    # Rows on disk past the samples asked for are not returned.
    assert run_sharded(3, 2, score_batch, distributed=False, progress=_log(tmp_path, stop))[0] == rows[:3]
    assert len(calls) == 2


def test_a_signal_during_the_last_batch_changes_nothing(tmp_path):
    stop = types.SimpleNamespace(received=None)

    def score_batch(indices):
        if 3 in indices:
            stop.received = signal.SIGTERM
        return [{"i": i} for i in indices]

    rows, _ = run_sharded(4, 2, score_batch, distributed=False, progress=_log(tmp_path, stop))
    assert rows == [{"i": i} for i in range(4)]
