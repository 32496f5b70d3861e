"""The frozen vision trunk runs once per image per rollout; the trainable tail still runs in every pass.

Under ``fix_vit`` the vision tower's blocks cannot change within a rollout, yet a describer rollout calls
the tower in every pass (policy sampling, snapshot greedy captions, locating 2B rows, snapshot scoring,
each PPO epoch's forward). ``VisionCache`` memoises, per image, the outputs of the frozen modules that the
trainable tail reads (Qwen2/2.5-VL: the last block, read by the merger; Qwen3-VL: also the DeepStack
blocks; Qwen-VL: the whole ViT trunk, read by the resampler ``attn_pool``), and replays them:

- while active, the tower's ``forward`` is wrapped; a call splits its pixels per image (the family's
  ``VisionTrunk.image_pixels``) and looks each image up by its *pixels* (``torch.equal``, so a hit is exact
  and no id has to travel with the batch: the 2B locator rows find the B encodings of the same images);
- the first call that meets an unseen image runs the tower unchanged under ``no_grad`` and records the
  replayed modules' outputs, split per image along dim 0;
- every call then runs the tower's own ``forward`` with the replayed modules answering from the cache and
  the other trunk blocks passing their input through, so the family's own code (window reordering,
  DeepStack, the merger/resampler, with gradients) does everything after the trunk.

The adapter says where the trunk is (``ModelAdapter.vision_trunk``); a family returning ``None`` gets
no cache, which is always correct, only slower. Nothing is cached when any trunk parameter is
trainable (``--fix_vit False``): ``VisionCache.for_model`` returns ``None``.

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


@dataclass
class VisionTrunk:
    """Where a family's frozen vision trunk is, as the adapter finds it in one model."""

    tower: nn.Module  # the module called with a batch of images (its forward is wrapped)
    replayed: Sequence[nn.Module]  # trunk modules whose outputs the trainable tail reads (answered from the cache)
    skipped: Sequence[nn.Module]  # other trunk modules (pass their first argument through when replaying)
    # (args, kwargs) of a tower call -> one pixel tensor per image, in batch order; each image's rows of
    # every replayed module's output are the same count, contiguous along dim 0, in the same order.
    image_pixels: Callable[[tuple, dict], list[torch.Tensor]]

    def parameters(self):
        for module in (*self.replayed, *self.skipped):
            yield from module.parameters()


class VisionCache:
    """Per-image memo of a frozen trunk's outputs, shared by the policy and the snapshot (same frozen weights)."""

    def __init__(self, trunks: Sequence[VisionTrunk]):
        self.trunks = list(trunks)
        self._pixels: list[torch.Tensor] = []
        self._outputs: list[list[torch.Tensor]] = []  # per image: one tensor per replayed module
        self.encode_seconds = 0.0  # time spent running the trunk, see ``pop_encode_seconds``
        self.encoded_images = 0

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
        """Forget every image: call when a new rollout's images arrive."""
        self._pixels, self._outputs = [], []
        self.encode_seconds, self.encoded_images = 0.0, 0

    def pop_encode_seconds(self) -> float:
        """Seconds spent running the trunk since the last call (for ``timing/vision_encoding``)."""
        seconds, self.encode_seconds = self.encode_seconds, 0.0
        return seconds

    def _find(self, pixels: torch.Tensor) -> int | None:
        for i, known in enumerate(self._pixels):
            if known.shape == pixels.shape and known.device == pixels.device and torch.equal(known, pixels):
                return i
        return None

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
            if any(self._find(p) is None for p in per_image):
                self._encode(trunk, tower_forward, args, kwargs, per_image)
            rows = [self._outputs[self._find(p)] for p in per_image]
            replay = [torch.cat([row[j] for row in rows]) for j in range(len(trunk.replayed))]
            with _answering(trunk, replay):
                return tower_forward(*args, **kwargs)

        return forward

    def _encode(self, trunk, tower_forward, args, kwargs, per_image) -> None:
        """Run the unchanged tower once over the whole call and keep the unseen images' trunk outputs."""
        start = time.perf_counter()
        recorded: list[torch.Tensor | None] = [None] * len(trunk.replayed)

        def recorder(j):
            def hook(module, inputs, output):
                recorded[j] = output.detach()

            return hook

        handles = [m.register_forward_hook(recorder(j)) for j, m in enumerate(trunk.replayed)]
        try:
            with torch.no_grad():
                tower_forward(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        sizes = [p.shape[0] for p in per_image]
        splits = [torch.split(out, sizes) for out in recorded]
        for i, pixels in enumerate(per_image):
            if self._find(pixels) is None:
                self._pixels.append(pixels.detach().clone())
                self._outputs.append([s[i] for s in splits])
                self.encoded_images += 1
        self.encode_seconds += time.perf_counter() - start


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
