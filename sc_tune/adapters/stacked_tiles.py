"""The vision cache's view (``VisionTrunk``) of a tower that encodes fixed-size tiles stacked along dim 0.

The families here (LLaVA, LLaVA-NeXT, Granite 4 Vision, LLaVA-OneVision, Aya Vision, Gemma 3, InternVL, Ovis2) call
a CLIP/SigLIP/InternViT/AIMv2-style encoder on ``pixel_values`` of shape (tiles, channels, height, width): an image is
one tile or several (anyres/tiling: a base view and crops), concatenated along dim 0. Each tile is encoded on its own
(no attention, norm or pooling across dim 0), so the cache's unit is a *tile*, not an image: a tile's rows of every
layer depend on its own pixels only, which makes the split exact without knowing how many tiles each image has (the
tower call does not carry the images' tile counts; LLaVA-NeXT's are drawn from ``image_sizes`` outside it).

Except in Ovis2 (below), the tower is frozen whole by ``fix_vit`` (the projector lives beside it, outside
``vision_prefix``, and trains), so the cache memoises its whole output per tile and the projector runs, with
gradients, on the replayed features in every pass. The encoder layers whose outputs the projector reads
(``hidden_states[i]`` for the family's feature layers) and the last layer (``last_hidden_state``, ``pooler_output``)
are recorded; the other layers pass their input through when a call replays (a call whose tiles repeat or are partly
cached runs the encoder on the new tiles only, then every tile's output is rebuilt from the recorded layers). The
embeddings and the final layer norm run in every replay (cheap), so ``last_hidden_state`` is the tower's own,
post-layernorm where the family has one.

Ovis2 keeps its tail inside the tower (the visual head, trainable under ``fix_vit``): there the policy's tower is not
frozen, so each pass replays the recorded last layer and runs the head on it with gradients, as the Qwen families'
merger; only a tower with no trainable parameter (the snapshot's copy, or under LoRA) is memoised whole.

Memory, by arithmetic (not measured): per tile the cache holds the recorded layers' outputs and, per tower, the
memoised output (``last_hidden_state``, the read ``hidden_states``, a pooled row), each (tokens, width). LLaVA-NeXT-7B
at 336 px (577 x 1024 in bf16, 1.2 MB a tensor): two recorded layers and two memoised tensors, about 4.7 MB a tile,
24 MB an image of five tiles, 1.5 GB for 64 images; a snapshot that is a frozen copy (not LoRA) memoises again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from sc_tune.vision_cache import VisionTrunk


# Towers known to encode each tile on its own, by class name -> where their encoder layers are. Another tower a
# checkpoint names (a Pixtral tower of mixed image sizes, a NaFlex SigLIP 2 with per-image shapes) gets no cache.
TILE_ENCODER_LAYERS = {
    "CLIPVisionModel": "encoder.layers",
    "SiglipVisionModel": "encoder.layers",
    "InternVLVisionModel": "encoder.layer",
    "Ovis2VisionModel": "transformer.encoder.layers",
    "Idefics3VisionTransformer": "encoder.layers",
    "SmolVLMVisionTransformer": "encoder.layers",
}


def feature_layers(config) -> list[int]:
    """The hidden states a LLaVA-style model reads: ``config.vision_feature_layer``, one index or several."""
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


def stacked_tiles_trunk(tower: nn.Module, read_hidden_states: Iterable[int] = (), memoise_output: bool = True,
                        per_tile_kwargs: Sequence[str] = ()) -> VisionTrunk | None:
    """``tower``'s trunk: its encoder layers, of which the tail reads the ones behind ``read_hidden_states`` (indices
    into the tower's ``hidden_states``, as the family's ``vision_feature_layer``: 0 the embeddings, ``i`` the output of
    layer ``i - 1``, negative from the end) and always the last one (``last_hidden_state``). ``memoise_output``: False
    where the tower's output is not a function of its pixels (random draws), so a frozen tower's output is not
    memoised whole. ``per_tile_kwargs``: keyword tensors of the call with a row per tile that the encoding reads
    beside the pixels (SmolVLM's ``patch_attention_mask``): part of each tile's key, cut with the pixels. None for a
    tower not in ``TILE_ENCODER_LAYERS``."""
    where = TILE_ENCODER_LAYERS.get(type(tower).__name__)
    if where is None:
        return None
    layers: Sequence[nn.Module] = list(tower.get_submodule(where))
    count = len(layers)
    # hidden_states has count + 1 entries; entry 0 (the embeddings) is computed in every replay, so no layer is read.
    read = {count - 1} | {index % (count + 1) - 1 for index in read_hidden_states if index % (count + 1)}
    return VisionTrunk(
        tower,
        replayed=[layers[i] for i in sorted(read)],
        skipped=[layer for i, layer in enumerate(layers) if i not in read],
        image_pixels=lambda args, kwargs: _tiles(args, kwargs, per_tile_kwargs),
        # last_hidden_state, hidden_states and pooler_output are (tiles, ...): one row block per tile of pixels.
        output_rows_per_image=memoise_output,
        images_call=lambda args, kwargs, indices: _call_with_tiles(args, kwargs, indices, per_tile_kwargs),
    )


def _pixel_values(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tower call's tiles: ``tower(pixel_values, ...)`` (LLaVA) or ``tower(pixel_values=..., ...)`` (Gemma 3)."""
    return args[0] if args else kwargs["pixel_values"]


def _tiles(args: tuple, kwargs: dict, per_tile_kwargs: Sequence[str]) -> list[torch.Tensor]:
    """One tensor per tile, what its encoding depends on: its pixels, and its rows of ``per_tile_kwargs`` (flattened
    beside the pixels, so that the same pixels under another mask are another tile)."""
    pixels = _pixel_values(args, kwargs)
    extras = [kwargs[key] for key in per_tile_kwargs if kwargs.get(key) is not None]
    if not extras:
        return list(pixels.split(1))
    return list(torch.cat([pixels.flatten(1), *(extra.flatten(1).to(pixels.dtype) for extra in extras)], 1).split(1))


def _call_with_tiles(args: tuple, kwargs: dict, indices: list[int], per_tile_kwargs: Sequence[str] = ()
                     ) -> tuple[tuple, dict] | None:
    """The same call over only the tiles ``indices`` (their pixels and rows of ``per_tile_kwargs``); None where another
    tensor travels with the call (it might hold a row per tile, and this does not know how to cut it)."""
    cut = ("pixel_values", *per_tile_kwargs)
    others = [*args[1:], *(value for key, value in kwargs.items() if key not in cut)]
    if any(isinstance(value, torch.Tensor) for value in others):
        return None
    kwargs = {key: value[indices] if key in cut and isinstance(value, torch.Tensor) else value
              for key, value in kwargs.items()}
    if args:
        return (args[0][indices], *args[1:]), kwargs
    return args, kwargs
