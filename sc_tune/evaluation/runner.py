"""The loop every evaluation shares: shard the samples, score them in batches, gather in index order."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from sc_tune.adapters.base import ModelAdapter
from sc_tune.evaluation.distributed import Ranks, current_ranks, gather_by_index
from sc_tune.evaluation.progress import SampleLog
from sc_tune.rollout import GenerationSettings, fit_locator_budget  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

# Evaluation decodes greedily with the training lengths (describer 30 new tokens, locator 20), but lets
# the describer stop at once: min_new_tokens=3 is a training-time guard, not part of the model's answer.
DESCRIBE_EVAL = GenerationSettings(max_new_tokens=30, min_new_tokens=0)
LOCATE_EVAL = GenerationSettings(max_new_tokens=20, min_new_tokens=0)


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


def run_sharded(num_samples: int, batch_size: int, score_batch: Callable[[Sequence[int]], list],
                distributed: bool | None = None, name: str = "evaluation",
                progress: SampleLog | None = None) -> tuple[list, Ranks]:
    """Call ``score_batch(indices) -> one result per index`` over this rank's shard; all results, in order.

    Every rank returns the full list (see :func:`sc_tune.evaluation.distributed.gather_by_index`). With
    ``progress`` each scored batch is written to disk before the next one starts, and samples a previous run
    already scored (with the same settings) are taken from there instead of being scored again.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ranks = current_ranks(distributed)
    done = {i: row for i, row in (progress.open() if progress is not None else {}).items() if i < num_samples}
    remaining = [i for i in range(num_samples) if i not in done]
    indices = remaining[ranks.rank :: ranks.world_size]
    local, started = [], time.monotonic()
    num_batches = (len(indices) + batch_size - 1) // batch_size
    for b, start in enumerate(range(0, len(indices), batch_size)):
        batch_indices = indices[start : start + batch_size]
        results = score_batch(batch_indices)
        if len(results) != len(batch_indices):
            raise RuntimeError(f"{name}: scored {len(results)} results for a batch of {len(batch_indices)}")
        if progress is not None:
            progress.append(zip(batch_indices, results))
        local.extend(zip(batch_indices, results))
        if ranks.is_main and (b + 1) % 10 == 0:
            logger.info("%s: rank 0 batch %d/%d (%.1fs)", name, b + 1, num_batches, time.monotonic() - started)
    if progress is not None:
        progress.close()
    return gather_by_index(local, num_samples, ranks, known=done), ranks
