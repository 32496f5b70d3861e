"""LLaVA-OneVision (``llava_onevision``, the llava-hf checkpoints): a chat-template adapter, generic box codec.

Box convention: not documented upstream (LLaVA-VL/LLaVA-NeXT's documentation gives no grounding or box format;
the same question about the later LLaVA-OneVision-2, its issue 39, was left unanswered), so this adapter uses the
generic codec ``[x1, y1, x2, y2]`` on 0..1000 (``sc_tune.box_codecs.GENERIC_CODEC``), requested in the locator
prompt.

Images follow the processor's "anyres" layout: a base view plus the tiles of the best grid pinpoint, sent
as ``pixel_values`` (tiles zero-padded across the batch; the model slices each image's tiles by
``image_sizes``), and the template's ``<image>`` is repeated once per feature (base, unpadded tiles and
row newlines). ``fix_vit`` freezes ``model.vision_tower``; the projector and ``image_newline`` stay trainable.

The tower's extra features and the select strategy (``check_select_strategy``) are checked here for LLaVA-NeXT too:
both models lay each view's features out as a square patch grid.
"""

from __future__ import annotations

from sc_tune.adapters.base import find_submodule
from sc_tune.adapters.chat_template import ChatTemplateAdapter, TemplateImageInputs
from sc_tune.adapters.registry import Family, auto_image_text_to_text, register
from sc_tune.adapters.stacked_tiles import feature_layers, stacked_tiles_trunk
from sc_tune.adapters.unpadded_positions import UnpaddedPositionsPromptCache


# Features a vision tower emits besides its patches, by ``vision_config.model_type``: CLIP prepends a CLS feature,
# SigLIP none. A tower not listed is refused: a guessed count would fail only inside the model.
EXTRA_TOWER_FEATURES = {"clip_vision_model": 1, "siglip_vision_model": 0}


def extra_tower_features(config) -> int:
    """Features per view besides the patches: the tower's CLS, dropped by the "default" select strategy."""
    tower = config.vision_config.model_type
    if tower not in EXTRA_TOWER_FEATURES:
        raise ValueError(f"config.json: vision_config.model_type {tower!r} is not a tower these adapters count "
                         f"features of (one of {sorted(EXTRA_TOWER_FEATURES)})")
    return EXTRA_TOWER_FEATURES[tower]


def check_select_strategy(config, family: str) -> int:
    """The tower's extra features (``extra_tower_features``), once the select strategy is known to drop exactly
    them; else a ``ValueError`` naming the two config.json fields.

    LLaVA-NeXT's and LLaVA-OneVision's ``pack_image_features`` lay each view's features out as a square grid of
    patches: CLIP + "full" keeps the CLS feature (one too many), SigLIP + "default" drops a patch (one too few), and
    the model's first forward raises (NeXT: a reshape error; OneVision: "The number of patches is not consistent
    with the image size"). CLIP + "default" and SigLIP + "full" are the two it can arrange."""
    extra = extra_tower_features(config)
    strategy = config.vision_feature_select_strategy
    if extra != (1 if strategy == "default" else 0):
        raise ValueError(
            f"config.json: vision_feature_select_strategy {strategy!r} with vision_config.model_type "
            f"{config.vision_config.model_type!r} leaves {'one feature more' if extra else 'one fewer'} than the "
            f"view's patch grid, which {family}'s model cannot arrange ('default' drops a CLIP tower's CLS feature; "
            "a SigLIP tower has none to drop: 'full')")
    return extra


class LlavaOnevisionAdapter(UnpaddedPositionsPromptCache, ChatTemplateAdapter):
    image_marker = "<image>"
    image_token = "<image>"
    end_token = "<|im_end|>"
    padded_keys = ("pixel_values",)
    static_decoding_verified = True
    grounding_prior = False  # no documented grounding: a grounding warm start first (docs/grounding_warm_start.md)

    def __init__(self, tokenizer, image_processor, config, box_format: str = "native"):
        super().__init__(tokenizer, image_processor, config, box_format)
        self._features = _feature_counter(image_processor, config, check_select_strategy(config, "LLaVA-OneVision"))

    def preprocess_image(self, image):
        return anyres_image_inputs(self, image, self._features)

    def vision_trunk(self, model):
        # The projector reads hidden_states[vision_feature_layer] (the releases': -1, before SigLIP's post_layernorm)
        # of the base view and anyres tiles, each encoded on its own (sc_tune.adapters.stacked_tiles).
        return stacked_tiles_trunk(find_submodule(model, self.vision_prefix), feature_layers(self.config))


def anyres_image_inputs(adapter: ChatTemplateAdapter, image, counter) -> TemplateImageInputs:
    """One image in the "anyres" layout (LLaVA-OneVision, LLaVA-NeXT): the image processor's base view and tiles,
    ``image_sizes``, and the feature count of ``counter`` (the family processor's ``_get_number_of_features``)."""
    out = adapter.image_processor(images=[image], return_tensors="pt")
    pixel_values = out["pixel_values"]  # (1, tiles, 3, H, W)
    orig_height, orig_width = (int(v) for v in out["image_sizes"][0])
    height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
    num_tokens = counter._get_number_of_features(orig_height, orig_width, height, width)
    if adapter.config.vision_feature_select_strategy == "default":  # the CLS feature is dropped
        num_tokens -= 1
    tensors = {"pixel_values": pixel_values, "image_sizes": out["image_sizes"]}
    return TemplateImageInputs(tensors, num_tokens, (width, height), adapter.image_block(num_tokens))


def _feature_counter(image_processor, config, extra_features: int):
    """transformers' own per-image feature count (``LlavaOnevisionProcessor._get_number_of_features``), before the
    select strategy's drop. Its ``num_image_tokens`` is a view's features: the patches plus the tower's extra
    (CLS) feature, which "default" then drops (a CLIP tower's 577 at 336 / 14; SigLIP's 729 at 384 / 14).

    Why not the processor itself: its constructor requires a video processor, which needs torchvision."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    vision = config.vision_config
    return borrowed_counter(LlavaOnevisionProcessor, image_processor,
                            num_image_tokens=(vision.image_size // vision.patch_size) ** 2 + extra_features,
                            vision_aspect_ratio=config.vision_aspect_ratio)


def borrowed_counter(processor_class, image_processor, **attributes):
    """An instance of ``processor_class`` (an anyres processor: LLaVA-OneVision's, LLaVA-NeXT's, Granite 4 Vision's)
    holding only ``image_processor`` and ``attributes``, enough for its ``_get_number_of_features``: the method is
    borrowed rather than re-derived. The processor itself is not built: OneVision's constructor needs a video
    processor (torchvision), and the others read their patch size, CLS count (and Granite's downsample rate) from
    processor_config.json, where the model's config decides them."""
    counter = object.__new__(processor_class)
    counter.image_processor = image_processor
    for name, value in attributes.items():
        setattr(counter, name, value)
    return counter


register(
    Family(
        "LLaVA-OneVision",
        ("llava_onevision",),
        LlavaOnevisionAdapter,
        auto_image_text_to_text,
    )
)
