"""The loop every evaluation shares: shard the samples, score them in batches, gather in index order."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from sc_tune.adapters.base import ModelAdapter
from sc_tune.arguments import SCTuneConfig
from sc_tune.evaluation.distributed import Ranks, current_ranks, gather_by_index
from sc_tune.evaluation.progress import SampleLog
from sc_tune.rollout import GenerationSettings, fit_locator_budget  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)


def _training_default(name: str):
    return SCTuneConfig.__dataclass_fields__[name].default


# Evaluation decodes greedily with the training lengths (finetune.py's --describer_max_new_tokens and
# --locator_max_new_tokens defaults, read from their one home), but lets the describer stop at once:
# min_new_tokens=3 is a training-time guard, not part of the model's answer. evaluate.py's defaults are these.
DESCRIBE_EVAL = GenerationSettings(max_new_tokens=_training_default("describer_max_new_tokens"), min_new_tokens=0)
LOCATE_EVAL = GenerationSettings(max_new_tokens=_training_default("locator_max_new_tokens"), min_new_tokens=0)


def locator_finished(adapter: ModelAdapter, locator_text: str) -> bool:
    """Whether the locator's answer ended within the budget: its box complete (generation stops there) or its end
    token written (else the answer was cut off)."""
    return adapter.end_text in locator_text or adapter.locator_answer_end(locator_text) is not None


@contextlib.contextmanager
def eval_mode(*models):
    """Put models in eval mode and restore each one's previous mode (callers may be mid-training)."""
    unique = list({id(m): m for m in models if m is not None}.values())
    was_training = [m.training for m in unique]
    for m in unique:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(unique, was_training):
            m.train(training)


class EvaluationStopped(Exception):
    """Every rank stopped scoring on a signal after the same batch, its rows on disk (``SampleLog``); the same command
    scores the rest. ``exit_code``: 128 + the signal's number, the status the signal itself would have given."""

    def __init__(self, by: signal.Signals, rows: int, num_samples: int, folder: str):
        self.exit_code = 128 + int(by)
        super().__init__(f"stopped by {by.name} after {rows} scored rows ({rows} of {num_samples} samples, kept in "
                         f"{folder}); the same command scores the rest")


def agree_on_stop(received: signal.Signals | None, more: bool, scored: int,
                  ranks: Ranks) -> tuple[signal.Signals | None, bool, int]:
    """One all-gather of ``[signal received (0: none), batches left, rows scored]`` per rank -> the signal any rank
    received (the largest number), whether any rank has a batch left, and the rows every rank scored. Every rank
    gets the same answer, so every rank takes the same decision (stop, score on, or leave the loop)."""
    mine = [int(received or 0), int(more), scored]
    if not ranks.active:
        return received, more, scored
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(mine, dtype=torch.int64, device=device)
    parts = [torch.zeros_like(tensor) for _ in range(ranks.world_size)]
    dist.all_gather(parts, tensor)
    table = torch.stack(parts).cpu()
    agreed = int(table[:, 0].max())
    return (signal.Signals(agreed) if agreed else None), bool(table[:, 1].max()), int(table[:, 2].sum())


def run_sharded(num_samples: int, batch_size: int, score_batch: Callable[[Sequence[int]], list],
                distributed: bool | None = None, name: str = "evaluation",
                progress: SampleLog | None = None) -> tuple[list, Ranks]:
    """Call ``score_batch(indices) -> one result per index`` over this rank's shard; all results, in order.

    Every rank returns the full list (see :func:`sc_tune.evaluation.distributed.gather_by_index`). With
    ``progress`` each scored batch is written to disk before the next one starts, and samples a previous run
    already scored (with the same settings) are taken from there instead of being scored again.

    With ``progress.stop`` (a :class:`sc_tune.preemption.RecordsSignal` listening), a signal received while scoring
    stops every rank after the same batch: after each batch every rank reports, in one all-gather, the signal it got
    and whether it has a batch left. Ranks hold different numbers of batches (``N % W`` samples more on some, fewer
    left on a resumed run), so a rank whose shard is done keeps taking part, batch by batch, until no rank has one
    left: every rank makes the same number of all-gathers. Raises :class:`EvaluationStopped` on every rank when a
    signal was received and a batch was left anywhere; a signal after the last batch changes nothing.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ranks = current_ranks(distributed)
    done = {i: row for i, row in (progress.open() if progress is not None else {}).items() if i < num_samples}
    remaining = [i for i in range(num_samples) if i not in done]
    indices = remaining[ranks.rank :: ranks.world_size]
    local, started = [], time.monotonic()
    num_batches = (len(indices) + batch_size - 1) // batch_size
    stop = progress.stop if progress is not None else None
    b = 0
    while b < num_batches or stop is not None:
        if b < num_batches:  # a rank whose shard is done only takes part in the agreement
            batch_indices = indices[b * batch_size : (b + 1) * batch_size]
            results = score_batch(batch_indices)
            if len(results) != len(batch_indices):
                raise RuntimeError(f"{name}: scored {len(results)} results for a batch of {len(batch_indices)}")
            if progress is not None:
                progress.append(zip(batch_indices, results))
            local.extend(zip(batch_indices, results))
            if ranks.is_main and (b + 1) % 10 == 0:
                logger.info("%s: rank 0 batch %d/%d (%.1fs)", name, b + 1, num_batches, time.monotonic() - started)
        b += 1
        if stop is not None:
            agreed, more, scored = agree_on_stop(stop.received, b < num_batches, len(local), ranks)
            if agreed is not None and more:
                progress.close()  # this batch's rows are on disk on every rank
                raise EvaluationStopped(agreed, len(done) + scored, num_samples, progress.folder)
            if not more:
                break
    if progress is not None:
        progress.close()
    return gather_by_index(local, num_samples, ranks, known=done), ranks
