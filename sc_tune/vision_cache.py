"""The frozen vision trunk runs once per image per rollout; a trainable tail runs where gradients need it.

Under ``fix_vit`` the vision tower's blocks cannot change within a rollout, yet a describer rollout calls
the tower in every pass (policy sampling, snapshot greedy captions, locating 2B rows, snapshot scoring,
each PPO epoch's forward). ``VisionCache`` memoises, per image, the outputs of the frozen modules that the
trainable tail reads (Qwen2/2.5-VL: the last block, read by the merger; Qwen3-VL: also the DeepStack
blocks; Qwen-VL: the whole ViT trunk, read by the resampler ``attn_pool``; GLM-4V: the post-layernorm, read by its
downsample and merger; the tiled towers: the layers their projector reads, ``sc_tune.adapters.stacked_tiles``;
MiniCPM-V 4.6 / 4.7: the post-layernorm, read by the merger beside the tower, ``sc_tune.adapters.minicpmv``), and
replays them:

- while active, the tower's ``forward`` is wrapped; a call splits its pixels per image (the family's
  ``VisionTrunk.image_pixels``) and looks each image up by its *pixels* (a key of sums proposes a cached image,
  the pixels compared on the device decide, one host read per call: a hit is exact and no id has to travel with
  the batch: the 2B locator rows find the B encodings of the same images);
- the first call that meets an unseen image runs the tower unchanged under ``no_grad`` and records the
  replayed modules' outputs, split per image along ``VisionTrunk.rows_dim`` in proportion to its pixel rows;
  where the family can cut a call (``VisionTrunk.images_call``), only over the images not cached yet, each once
  (the fused describer loop's first call holds every image twice); and where its attention takes packed windows
  (``VisionTrunk.packed_attention_config``), with the windows of one length in one attention call
  (:func:`packed_attention`) instead of transformers' one call per window when flash-attn is absent;
- every call then runs the tower's own ``forward`` with the replayed modules answering from the cache and
  the other trunk blocks passing their input through, so the family's own code (window reordering,
  DeepStack, the merger/resampler, with gradients) does everything after the trunk.

A tower with *no* trainable parameter (the snapshot's copy, whose merger/resampler is frozen too, or the
policy under LoRA, whose tail LoRA does not train) cannot change at all within a rollout, so its whole output
is memoised per image as well: the snapshot's greedy captions, its 2B locator rows and its scoring pass then
run the tail once per image instead of four times. This needs the family to declare that every tensor of
the tower's output holds each image's rows contiguously along ``rows_dim``, in proportion to its pixel rows
(``VisionTrunk.output_rows_per_image``); without it only the trunk is replayed. A tower that ``fix_vit`` freezes
whole (VideoLLaMA3, MiniCPM-V, the tiled families with the projector beside the tower) still replays its trunk
wherever the memo misses and the trunk cache does not: a call cut to its new images (the memo is filled from whole
calls only), and the first calls of a second tower, the snapshot's frozen copy, over images the policy encoded.

The adapter says where the trunk is (``ModelAdapter.vision_trunk``); a family returning ``None`` gets
no cache, which is always correct, only slower. Nothing is cached when any trunk parameter is
trainable (``--fix_vit False``): ``VisionCache.for_model`` returns ``None``.

An "image" here is whatever unit ``VisionTrunk.image_pixels`` cuts a call into: towers that encode fixed-size tiles
stacked along dim 0, each on its own (the LLaVA families, Gemma 3, InternVL, Ovis2: ``sc_tune.adapters.stacked_tiles``),
are cached per tile, so no tile count per image is needed; where their projector lies outside the tower, which
``fix_vit`` then freezes whole, the tower's whole output is memoised per tile. MiniCPM-V's tower takes every view
(thumbnail and slices) of a call packed into one sequence, ``(1, tokens, width)``, and encodes each view on its own:
it is cached per view, its rows along dim 1.

Distributed: ZeRO-2 keeps whole parameters on every rank, ZeRO-3 gathers a module's shards in its
pre-forward hook, which still fires for a replayed block (the gather is wasted, the result is right);
the recorded tensors are per-rank activations of that rank's own images, so nothing is shared across
ranks. LoRA targets the language model only, so the trunk is the same with the adapter on or off.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sc_tune.attention import attention_routed


@dataclass
class VisionTrunk:
    """Where a family's frozen vision trunk is, as the adapter finds it in one model."""

    tower: nn.Module  # the module called with a batch of images (its forward is wrapped)
    replayed: Sequence[nn.Module]  # trunk modules whose outputs the trainable tail reads (answered from the cache)
    skipped: Sequence[nn.Module]  # other trunk modules (pass their first argument through when replaying)
    # (args, kwargs) of a tower call -> one tensor per image, in batch order, of what its encoding depends on (its
    # pixels, and where the tower reads more per image, that too); its dim 0 counts the image's "pixel rows": every
    # replayed module's output holds each image's rows contiguously along ``rows_dim``, in batch order, in proportion
    # to them (mostly as many).
    image_pixels: Callable[[tuple, dict], list[torch.Tensor]]
    # True when every tensor in the tower's output (a tensor, or a ModelOutput/list of them) holds each image's
    # rows contiguously along ``rows_dim``, in batch order, in proportion to its pixel rows: then a tower without
    # trainable parameters has its whole output memoised per image.
    output_rows_per_image: bool = False
    # (args, kwargs, indices) -> the (args, kwargs) of a tower call holding only those images, in that order, or
    # None where this call cannot be cut: then a call whose images repeat (the fused describer loop holds each
    # image twice, --num_generations K times) or are partly cached encodes only the new ones.
    images_call: Callable[[tuple, dict, list[int]], tuple[tuple, dict] | None] | None = None
    # The tower's config, where its attention takes packed windows (``cu_seqlens``): while the trunk encodes, its
    # attention runs one call per window length instead of one per window (``packed_attention``). None: as configured.
    packed_attention_config: object | None = None
    # The dimension of the replayed modules' outputs and of the tower's output tensors along which the images' rows
    # lie: 0 for a batch of images (or a packed sequence without a batch dimension), 1 where the tower packs every
    # image into one sequence of a batch of one (MiniCPM-V's (1, tokens, width)).
    rows_dim: int = 0

    def parameters(self):
        for module in (*self.replayed, *self.skipped):
            yield from module.parameters()


class VisionCache:
    """Per-image memo of a frozen trunk's outputs, shared by the policy and the snapshot (same frozen weights)."""

    def __init__(self, trunks: Sequence[VisionTrunk]):
        self.trunks = list(trunks)
        self.clear()

    @classmethod
    def for_model(cls, adapter, models: Sequence[nn.Module]) -> VisionCache | None:
        """A cache over ``models`` (policy and a snapshot copy sharing its frozen tower), or ``None`` when the
        family has no trunk split or any trunk parameter is trainable (then caching would be wrong)."""
        trunks = {}
        for model in models:
            trunk = adapter.vision_trunk(model)
            if trunk is None or any(p.requires_grad for p in trunk.parameters()):
                return None
            trunks.setdefault(id(trunk.tower), trunk)  # a LoRA snapshot is the policy model itself
        return cls(list(trunks.values()))

    def clear(self) -> None:
        """Forget every image: call when a new rollout's images arrive and whenever a frozen tower's weights
        change (a snapshot re-sync). Counters start again from zero."""
        self._pixels: list[torch.Tensor] = []
        self._outputs: list[list[torch.Tensor]] = []  # per image: one tensor per replayed module
        self._by_key: dict[tuple, list[int]] = {}  # an image's key (_keys) -> the cached images that have it
        self._tower_outputs: dict[int, dict[int, object]] = {}  # id(frozen tower) -> image index -> its output rows
        self.encode_seconds = 0.0  # time spent running the trunk, see ``pop_encode_seconds``
        self.encoded_images = 0
        self.reused_tower_calls = 0  # tower calls answered entirely from the memo of a frozen tower

    def pop_encode_seconds(self) -> float:
        """Seconds spent running the trunk since the last call (for ``timing/vision_encoding``)."""
        seconds, self.encode_seconds = self.encode_seconds, 0.0
        return seconds

    def _lookup(self, per_image: list[torch.Tensor], keys: list[tuple]) -> list[int | None]:
        """Each image's place in the cache, or None. A key only proposes a cached image; the pixels decide
        (compared on the device, one host read for the call), so a hit is exact."""
        proposed = [(i, self._by_key[key][0]) for i, key in enumerate(keys) if key in self._by_key]
        equal = torch.stack([(self._pixels[j] == per_image[i]).all() for i, j in proposed]).tolist() if proposed else []
        found: list[int | None] = [None] * len(per_image)
        for (i, j), same in zip(proposed, equal):
            # another cached image with the same key (a collision) is checked one by one
            found[i] = j if same else next((k for k in self._by_key[keys[i]][1:]
                                            if torch.equal(self._pixels[k], per_image[i])), None)
        return found

    @contextmanager
    def active(self):
        """Within this block every tower call goes through the cache."""
        originals = []
        for trunk in self.trunks:
            if "forward" in vars(trunk.tower):
                raise RuntimeError("VisionCache.active: the vision tower's forward is already wrapped")
            trunk.tower.forward = self._wrap(trunk, trunk.tower.forward)
            originals.append(trunk)
        try:
            yield self
        finally:
            for trunk in originals:
                del trunk.tower.forward

    def _wrap(self, trunk: VisionTrunk, tower_forward):
        def forward(*args, **kwargs):
            per_image = trunk.image_pixels(args, kwargs)
            keys = _keys(per_image)
            found = self._lookup(per_image, keys)
            output = None  # the unchanged tower's output for this call, computed without gradients
            if None in found:
                output = self._encode(trunk, tower_forward, args, kwargs, per_image, keys, found)
            # Checked per call: the policy's tower is frozen under LoRA and trains its tail otherwise, while the
            # snapshot's tower (a frozen copy, or the same module with the snapshot adapter) never trains.
            frozen = not any(p.requires_grad for p in trunk.tower.parameters())
            memoised = frozen and trunk.output_rows_per_image
            memo = self._tower_outputs.setdefault(id(trunk.tower), {}) if memoised else {}
            if memoised and all(i in memo for i in found):
                self.reused_tower_calls += 1
                return _join([memo[i] for i in found], trunk.rows_dim)
            if output is None or (torch.is_grad_enabled() and not frozen):
                # The tail needs its autograd graph (or nothing was run yet): replay the trunk, run the tail.
                replay = [torch.cat([self._outputs[i][j] for i in found], trunk.rows_dim)
                          for j in range(len(trunk.replayed))]
                with _answering(trunk, replay):
                    output = tower_forward(*args, **kwargs)
            if memoised:
                pieces = _split(output, [p.shape[0] for p in per_image], trunk.rows_dim)
                for i, piece in zip(found, pieces or []):
                    memo.setdefault(i, piece)
            return output

        return forward

    def _encode(self, trunk, tower_forward, args, kwargs, per_image, keys, found):
        """Run the unchanged tower once, cache the unseen images' trunk outputs, fill in ``found`` (their places)
        and return the tower's output for this call (exact when no gradient is wanted from it), or None where only
        the new images ran: each image not cached yet, once, where the family can cut the call
        (``VisionTrunk.images_call``)."""
        new, first_of = [], {}  # the first place of each image not cached yet; a place -> its image's first place
        for i, pixels in enumerate(per_image):
            if found[i] is None:
                # a repeat within the call has the same key as its first place and the same pixels
                first_of[i] = next((j for j in new if keys[j] == keys[i] and torch.equal(per_image[j], pixels)), i)
                if first_of[i] == i:
                    new.append(i)
        cut = trunk.images_call(args, kwargs, new) if trunk.images_call and len(new) < len(per_image) else None
        ran = new if cut is not None else list(range(len(per_image)))  # the images the tower runs on, in order
        if cut is not None:
            args, kwargs = cut
        start = time.perf_counter()
        recorded: list[torch.Tensor | None] = [None] * len(trunk.replayed)

        def recorder(j):
            def hook(module, inputs, output):
                recorded[j] = output.detach()

            return hook

        handles = [m.register_forward_hook(recorder(j)) for j, m in enumerate(trunk.replayed)]
        try:
            with torch.no_grad(), packed_attention(trunk.packed_attention_config):
                output = tower_forward(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        pixel_rows = [per_image[i].shape[0] for i in ran]
        splits = []
        for module, out in zip(trunk.replayed, recorded):
            sizes = _rows_in_proportion(out.shape[trunk.rows_dim], pixel_rows)
            if sizes is None:  # the family's VisionTrunk is wrong: a silent mis-split would hand images others' rows
                raise ValueError(f"VisionCache: {type(module).__name__}'s {out.shape[trunk.rows_dim]} rows (dim "
                                 f"{trunk.rows_dim}) do not divide in proportion to the pixel rows {pixel_rows}")
            splits.append(torch.split(out, sizes, trunk.rows_dim))
        for position, i in enumerate(ran):
            if i in new:
                found[i] = len(self._pixels)
                self._by_key.setdefault(keys[i], []).append(found[i])
                self._pixels.append(per_image[i].detach().clone())
                self._outputs.append([s[position] for s in splits])
                self.encoded_images += 1
        for i, first in first_of.items():
            found[i] = found[first]
        self.encode_seconds += time.perf_counter() - start
        return None if cut is not None else output


# Registered with transformers' attention interface. "flash" is in the name because transformers' Qwen2/2.5/3-VL
# vision attention hands its packed windows (cu_seqlens) to an implementation of that kind in one call; to any other
# it makes one call per window (28,928 per forward of 64 images at 448 px on Qwen2.5-VL), each a few small kernels.
PACKED_ATTENTION = "sc_tune_flash_packed_windows"


def _packed_windows_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                              cu_seq_lens_q=None, cu_seq_lens_k=None, is_causal=False, **kwargs):
    """Attention within each packed window of ``query``/``key``/``value`` (1, heads, tokens, dim), windows given
    by ``cu_seq_lens_q``: the windows of one length gathered into one batch, one ``scaled_dot_product_attention``
    per length. Each window attends to itself only, as in transformers' per-window loop. Returns (1, tokens,
    heads, dim), as a flash implementation does."""
    if attention_mask is not None or is_causal or not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
        raise ValueError("packed window attention: only unmasked, non-causal self-attention within each window")
    starts, lengths = cu_seq_lens_q[:-1], cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    out = torch.empty_like(query)
    heads, dim = query.shape[1], query.shape[-1]
    if key.shape[1] != heads:  # grouped-query attention (EXAONE 4.5's tower): each key/value head serves a group of
        # consecutive query heads, as transformers' repeat_kv lays them out
        key, value = (states.repeat_interleave(heads // key.shape[1], dim=1) for states in (key, value))
    for length in torch.unique(lengths).tolist():
        first = starts[lengths == length]
        rows = (first[:, None] + torch.arange(length, device=first.device)).flatten()

        def windows(states):  # (1, H, S, D) -> (windows, H, length, D)
            return states[0].index_select(1, rows).view(heads, -1, length, dim).transpose(0, 1)

        attended = torch.nn.functional.scaled_dot_product_attention(
            windows(query), windows(key), windows(value), dropout_p=dropout, scale=scaling)
        out[0].index_copy_(1, rows, attended.transpose(0, 1).reshape(heads, -1, dim))
    return out.transpose(1, 2).contiguous(), None


def packed_attention(config):
    """``config``'s attention implementation set to the packed-window one for the block (nothing when None, or when
    the config already asks for a flash implementation, which packs windows itself)."""
    return attention_routed(config, PACKED_ATTENTION, _packed_windows_attention, lambda current: "flash" not in current)


def _keys(per_image: list[torch.Tensor]) -> list[tuple]:
    """A cheap key per image, for one host read per call: shape, dtype, device, the sum of its values and the sum of
    every seventh (so that most rearrangements of the same values differ). Equal images have equal keys; a shared key
    only proposes a match (``VisionCache._lookup`` compares the pixels)."""
    sums = torch.stack([torch.stack([p.sum(dtype=torch.float64), (p.flatten()[::7]).sum(dtype=torch.float64)])
                        for p in per_image]).tolist()
    return [(tuple(p.shape), p.dtype, p.device, *s) for p, s in zip(per_image, sums)]


def _rows_in_proportion(total: int, pixel_rows: list[int]) -> list[int] | None:
    """``total`` rows cut in proportion to ``pixel_rows`` (one count per image), or None where they do not divide so."""
    whole = sum(pixel_rows)
    if any(total * n % whole for n in pixel_rows):
        return None
    return [total * n // whole for n in pixel_rows]


def _split(output, pixel_rows: list[int], dim: int):
    """``output`` cut along ``dim`` into one piece per image (rows in proportion to ``pixel_rows``), or ``None`` when
    a tensor's rows do not divide that way or the output holds something other than tensors."""
    if output is None:  # an entry not captured (transformers' hidden_states holds None where no layer was asked for)
        return [None] * len(pixel_rows)
    if isinstance(output, torch.Tensor):
        sizes = _rows_in_proportion(output.shape[dim], pixel_rows) if output.dim() > dim else None
        if sizes is None:
            return None
        # Cloned: the caller owns ``output`` and may change it in place; the memo must not change with it.
        return [rows.clone() for rows in torch.split(output.detach(), sizes, dim)]
    if isinstance(output, dict):  # transformers' ModelOutput is a dict of its non-None fields
        fields = {key: _split(value, pixel_rows, dim) for key, value in output.items()}
        if any(pieces is None for pieces in fields.values()):
            return None
        return [(type(output), {key: pieces[i] for key, pieces in fields.items()}) for i in range(len(pixel_rows))]
    if isinstance(output, (list, tuple)):
        items = [_split(value, pixel_rows, dim) for value in output]
        if any(pieces is None for pieces in items):
            return None
        return [(type(output), [pieces[i] for pieces in items]) for i in range(len(pixel_rows))]
    return None


def _join(pieces: list, dim: int):
    """The inverse of ``_split``: one output for these images, in this order (fresh tensors every call)."""
    first = pieces[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(pieces, dim)
    kind, content = first
    if isinstance(content, dict):
        return kind(**{key: _join([piece[1][key] for piece in pieces], dim) for key in content})
    return kind(_join([piece[1][j] for piece in pieces], dim) for j in range(len(content)))


@contextmanager
def _answering(trunk: VisionTrunk, replay: list[torch.Tensor]):
    """Replayed modules return their recorded output; skipped ones pass their input through."""

    def constant(value):
        return lambda *args, **kwargs: value

    def passthrough(hidden, *args, **kwargs):
        return hidden

    for module, value in zip(trunk.replayed, replay):
        module.forward = constant(value)
    for module in trunk.skipped:
        module.forward = passthrough
    try:
        yield
    finally:
        for module in (*trunk.replayed, *trunk.skipped):
            del module.forward
