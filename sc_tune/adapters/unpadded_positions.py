"""Prompt-cache reuse (``sc_tune.prompt_cache``) for families whose text model rotates by plain 1-D positions.

How the positions of a left-padded row are counted (transformers 5.24):

- ``generate`` gives each row the positions of its unpadded tokens: the attention mask's cumulative sum, minus one
  (``GenerationMixin._prepare_position_ids_for_generation``), then one more per decoding step;
- a teacher-forced forward without ``position_ids`` counts columns, padding included (``arange(W)`` plus the cache's
  length, in ``LlamaModel`` and the text models built like it: Qwen2, Mistral, Cohere2, Granite).

A cached key carries the rotation of the position it was read at, so a cache serves another pass only where both
count alike; a forward's cache would put a padded row's keys ``pads`` positions further than ``generate`` continues
from. The snapshot's scoring pass, whose cache the greedy captions and the locator prompts resume from, is therefore
given the unpadded positions too (``scoring_positions``), and so is the policy's update, which reads the same rows
(equal in exact arithmetic, the two counts round apart: the policy's first log-probs must be the snapshot's). Every cache a describer rollout keeps then holds each
row's keys at the positions of its own unpadded prompt, which depend on nothing else in the batch:

- the greedy captions resume as ``generate`` would continue after its own prefill (the same columns, the same
  positions);
- a prompt prefix moves into a locator batch as it is (row ``j``'s first token at column 0 and position 0 there too:
  no key is re-rotated, unlike Qwen-VL's column positions), and the batch reads its tails at the unpadded positions
  of its own layout, the gap after a shorter prefix masked out, which is again the mask's cumulative sum;
- a scoring pass that starts from the fused loop's cache (``generate``'s) reads its captions at those positions too.

Rotations compose exactly only in exact arithmetic: relative positions are the same whichever way a row is counted,
and the tests compare every step's logits with a fresh prefill's within 1e-5 in fp32.

Window layers (Mistral's sliding window, Cohere2's, EXAONE 4's) cache only their last ``window - 1`` columns: the
scoring pass's cache can be cropped back to its prompts only while it holds every column (the whole scored
sequence fits the window; transformers refuses the crop otherwise), and prompt columns never move where a window
layer exists (the locator batch's columns are not a fresh batch's, and a window counts columns).
"""

from __future__ import annotations

import torch

from sc_tune.attention import text_layer_caches


def scoring_cache_crops(model, scored_length: int) -> bool:
    """Whether a cache of ``scored_length`` columns can be cropped back to its prompts, every column kept exactly:
    full attention layers, and window layers whose window still holds the whole scored sequence (they keep their last
    ``window - 1`` columns, and transformers refuses the crop once they have dropped one). A recurrent state
    (linear attention) or a chunked layer is refused."""
    return all(kind == "full_attention" or (kind == "sliding_attention" and window is not None and scored_length < window)
               for kind, window in text_layer_caches(model.config))


def only_full_attention(model) -> bool:
    """Whether every text layer caches every column at full attention (no window, no recurrent state)."""
    return all(kind == "full_attention" for kind, _ in text_layer_caches(model.config))


def unpadded_positions(attention_mask_BW: torch.Tensor) -> torch.Tensor:
    """Each row's positions counted over its unmasked columns, as ``generate`` counts them: ``(B, W)``, masked columns
    at 0 (they are never attended to)."""
    positions_BW = attention_mask_BW.long().cumsum(-1) - 1
    return positions_BW.masked_fill(attention_mask_BW == 0, 0)


class UnpaddedPositionsPromptCache:
    """The prompt-cache methods of ``ModelAdapter`` for a text model with plain 1-D rotary positions (or none, as
    Cohere2's global layers), no recurrent state and no cross-attention: put first among a family adapter's bases.

    The family must take ``position_ids`` through to its text model unchanged, and keep no image-dependent state
    outside the key/value cache (tests/test_prompt_cache.py checks each family that opts in)."""

    def resumes_from_scoring_cache(self, model, prompt_length, scored_length):
        # A window layer must still hold every scored column for the crop back to the prompt: below its window, its
        # cache is a full one; past it, the greedy captions prefill again.
        return scoring_cache_crops(model, scored_length)

    def moves_cached_prompt_columns(self, model, prompt_length):
        # A moved prefix sits at other columns than in a fresh locator batch (the gap after a shorter prefix), and a
        # window is counted in columns: refused wherever a window layer exists, whatever the length.
        return only_full_attention(model)

    def move_cached_keys(self, model, keys_BHCD, shift_B):
        # The keys were read at their row's unpadded positions (scoring_positions, or generate's own), so a row's
        # first token is at position 0 wherever its column is: the move changes columns, not positions.
        return keys_BHCD

    def scoring_positions(self, model, input_ids_BW, attention_mask_BW):
        return {"position_ids": unpadded_positions(attention_mask_BW)}

    def resumed_positions(self, model, input_ids_BW, attention_mask_BW, images, tail_offsets_B=None):
        # Explicit, for both layouts: a forward would count columns, and a moved batch's tails follow a masked gap.
        return {"position_ids": unpadded_positions(attention_mask_BW)}

    def resumed_decoding_inputs(self, inputs):
        return without_images(self, inputs)


def without_images(adapter, inputs: dict) -> dict:
    """``inputs`` for a ``generate`` that starts from a prompt cache holding the images: the first decoding step reads
    one prompt column (or the captions after a moved prefix), never an image token, and a model given the pixels would
    encode them and find no placeholder to put them in. Kept: the tokens, their mask, positions and the family's
    per-token fields; dropped: pixels, image sizes, grids, tile counts."""
    text_keys = {"input_ids", "attention_mask", "position_ids", *adapter.per_token_keys}
    return {key: value for key, value in inputs.items() if key in text_keys}
