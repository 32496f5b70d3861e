"""Reusing prompt caches within a describer rollout: the snapshot's prompts are prefilled once where they can be.

In a describer rollout the snapshot reads the same images three times: it scores the policy's sampled captions
(prompt + caption, teacher-forced), writes its own greedy captions (the paper's baseline) and locates every
caption. The scoring pass comes first and keeps its cache, so that

- the greedy captions decode from the cache cropped to the describer prompts (:func:`keep_prompt_columns`), with
  no prompt prefill (any family whose adapter ``resumes_from_scoring_cache``);
- the locator prompts, which start with the same image span as the describer prompts (Qwen-VL:
  ``<img>`` + 256 image tokens + ``</img><ref>``; Qwen2.5-VL: the system turn, ``<|vision_start|>``, one
  ``<|image_pad|>`` per merged patch, ``<|vision_end|>``), take that span's cached columns and prefill only the
  caption after it (:func:`shared_prefix_batch`, a family whose adapter ``moves_cached_prompt_columns``). The
  locator pass then neither runs the vision tower nor prefills the image again.

Where fused decoding writes the LoRA snapshot's greedy captions in the policy's sampling loop (one sample per box),
it is the other way round: the loop's greedy rows have prefilled the scoring pass's prompts with the snapshot's
adapter, so the loop keeps their cache (:func:`prompt_rows_cache`) and the scoring pass reads only the captions
(:func:`uncached_inputs`).

All are exact up to float rounding: the snapshot's weights do not change within a rollout, a prompt column's keys and
values do not depend on what follows it, and the tests compare every decoding step's logits (and the scoring pass's
log-probs) with a fresh prefill's, within 1e-5 in fp32.

The locator batch's layout. Rows are left-padded, and the shared prefixes sit at different columns in the source
batch than they would in a left-padded locator batch. Every row's prefix (``n_j`` columns: images of other sizes
make prefixes of other lengths) therefore goes to columns ``0..n_j-1`` of a block as wide as the longest; the rest of
each prompt follows, left-padded among the rows. Each row must then see exactly its own prompt at the positions an
unpadded prefill gives it; padding, including the gap after a shorter prefix, is masked everywhere. How positions
follow is the family's (``adapter.move_cached_keys``, ``adapter.resumed_positions``):

- Qwen-VL's rotary positions are column indices: the keys are re-rotated by their move, and a per-row
  ``position_offsets`` closes each row's padding gap before its tail;
- the Qwen2 families' M-RoPE positions are counted over a row's own tokens, padding skipped, so the keys move as
  they are, and the batch gets explicit ``position_ids``: the model's rope index over the laid-out batch, gap masked;
- the 1-D rotary families (``sc_tune.adapters.unpadded_positions``): ``generate`` counts a row's unpadded tokens, a
  forward counts columns, so the scoring pass is given the unpadded positions (:func:`scoring_inputs`); the keys then
  move as they are, and the batch's ``position_ids`` are its mask's cumulative sum, gap masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache

from sc_tune.adapters.base import ImageInputs, ModelAdapter, PromptBatch


def keep_prompt_columns(cache: Cache, prompt_length: int) -> Cache:
    """Crop the key/value ``cache`` of prompt + continuation to what ``generate(prompt_cache=...)`` takes: all
    but the last prompt column (generate feeds that one itself, to get the first new token's logits)."""
    cache.crop(-(cache.get_seq_length() - (prompt_length - 1)))  # transformers' crop takes how many to remove
    return cache


def prompt_rows_cache(cache: Cache, start: int, end: int, columns: int) -> DynamicCache:
    """Rows ``start:end`` and the first ``columns`` columns of a key/value ``cache`` (dynamic or static), copied into a
    cache of their own: a generate call's cache of some rows' prompts, all but the last column, for a later pass over
    the same prompts (``rollout.generate(keep_prompt_rows=...)``)."""
    kept = DynamicCache()
    for index, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is None or layer.keys.dim() != 4:
            raise ValueError("prompt_rows_cache: only key/value caches of attention layers can be cut to some columns")
        kept.update(layer.keys[start:end, :, :columns].clone(), layer.values[start:end, :, :columns].clone(), index)
    return kept


def uncached_inputs(model, adapter: ModelAdapter, inputs: dict, images: Sequence[ImageInputs], cached_columns: int
                    ) -> dict:
    """The model inputs of a forward over columns ``cached_columns..`` of ``inputs`` (teacher-forced), whose earlier
    columns a pass over the same rows in the same layout has cached: the tokens and per-token fields cut, the
    attention mask whole, no pixels (the images are in the cache), and the family's positions (``resumed_positions``:
    the model's own position state is that of whichever batch it prefilled last)."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    positions = adapter.resumed_positions(model, input_ids, attention_mask, images)
    uncached = {"input_ids": input_ids[:, cached_columns:], "attention_mask": attention_mask}
    for key in adapter.per_token_keys:
        if key in inputs:
            uncached[key] = inputs[key][:, cached_columns:]
    for key, value in positions.items():
        uncached[key] = value[..., cached_columns:].to(input_ids.device)
    return uncached


def scoring_inputs(model, adapter: ModelAdapter, inputs: dict) -> dict:
    """The inputs of a teacher-forced pass over sampled rows (prompt + caption), with the family's
    ``scoring_positions``: the positions ``generate`` gave the same rows, so that the pass's log-probs are those of
    the sampling and its key/value cache holds keys later passes can resume from."""
    return {**inputs, **adapter.scoring_positions(model, inputs["input_ids"], inputs["attention_mask"])}


@dataclass
class ScoredPrompts:
    """A left-padded prompt batch and the key/value cache a pass over it left, valid on its first ``columns``."""

    batch: PromptBatch
    cache: Cache
    columns: int


@dataclass
class SharedPrefixBatch:
    """A locator batch that resumes from moved prefix columns: pass ``cache`` and ``columns`` to ``generate``."""

    batch: PromptBatch
    cache: Cache
    columns: int


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_batch(
    model,
    adapter: ModelAdapter,
    scored: ScoredPrompts,
    source_rows: Sequence[int],
    prompts: Sequence[str],
    images: Sequence[ImageInputs],
) -> SharedPrefixBatch | None:
    """The batch of ``prompts`` (row ``j`` on ``images[j]``, the image of ``scored`` row ``source_rows[j]``), each
    row starting from the longest prefix it shares with its source row already in the cache.

    ``None`` where nothing can be shared: a family that does not move cached columns, a prefix that would cut an
    image span (the rest of the span would need the image again), or no common prefix at all."""
    # Asked first at the scored prompts' length, so that a family that never moves columns costs no tokenising;
    # then at the locator prompts' own length (Qwen-VL's NTK guard depends on it).
    if not adapter.moves_cached_prompt_columns(model, scored.columns + 1):
        return None
    rows = [adapter.encode_prompt(text, image) for text, image in zip(prompts, images)]
    if not adapter.moves_cached_prompt_columns(model, max(len(r) for r in rows)):
        return None
    ids_BW, mask_BW = scored.batch.inputs["input_ids"], scored.batch.inputs["attention_mask"]
    starts_B = (mask_BW.shape[1] - mask_BW.sum(1)).tolist()  # left padding: each scored prompt's first column
    source_prompts = [ids_BW[r, starts_B[r] :].tolist() for r in range(ids_BW.shape[0])]
    # Per row: images of other sizes make image spans (so the shared prefixes) of other lengths.
    shared_J = [
        min(_common_prefix(source_prompts[r], row), scored.columns - starts_B[r], len(row) - 1)
        for r, row in zip(source_rows, rows)
    ]
    media = set(adapter.suppressed_token_ids(describer=False))  # image/video tokens and span markers
    if min(shared_J) <= 0 or any(media.intersection(row[n:]) for row, n in zip(rows, shared_J)):
        return None

    prefix = max(shared_J)
    tails = [row[n:] for row, n in zip(rows, shared_J)]
    width = max(len(t) for t in tails)
    input_ids = torch.full((len(rows), prefix + width), adapter.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for j, (row, n, tail) in enumerate(zip(rows, shared_J, tails)):
        input_ids[j, :n] = torch.tensor(row[:n])
        input_ids[j, input_ids.shape[1] - len(tail) :] = torch.tensor(tail)
        attention_mask[j, :n] = 1
        attention_mask[j, input_ids.shape[1] - len(tail) :] = 1
    # Row j's tail starts (prefix - n_j) + (width - len(tail_j)) columns after its own prefix ends: pull it back.
    offsets_B = torch.tensor([n - prefix + len(t) - width for n, t in zip(shared_J, tails)])

    source_rows_t = torch.tensor(list(source_rows))
    first_B = torch.tensor([starts_B[r] for r in source_rows])
    # A shorter prefix's columns past its end are masked; they only need to exist in the cache.
    columns_BP = (first_B[:, None] + torch.arange(prefix)[None, :]).clamp(max=scored.columns - 1)
    moved = DynamicCache()
    for layer in range(len(scored.cache.layers)):
        keys, values = scored.cache.layers[layer].keys, scored.cache.layers[layer].values
        index = columns_BP.to(keys.device)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        keys = keys[source_rows_t.to(keys.device)].gather(2, index)
        values = values[source_rows_t.to(values.device)].gather(2, index)
        moved.update(adapter.move_cached_keys(model, keys, -first_B), values, layer)
    positions = adapter.resumed_positions(model, input_ids, attention_mask, images, tail_offsets_B=offsets_B)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **positions}
    return SharedPrefixBatch(PromptBatch(inputs, None, list(images)), moved, prefix)
