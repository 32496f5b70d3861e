"""Tiny configs of the transformers-native chat families, one ``TinySpec`` per ``model_type``.

Sizes are the smallest that keep each architecture's constraints (rope sections summing to half the head
dim, vision width divisible by its heads, merge sizes matching the image processor). The tokenizers carry
stand-ins of the released chat templates (``sc_tune.tiny.chat_templates``); the committed warm start
(``sc_tune/synthetic``) was built with the Qwen3-VL one.
"""

from __future__ import annotations

import math

import torch

from sc_tune.tiny.chat import DEFAULT_CORPUS, TinySizes, TinySpec, build_tiny, save_tiny
from sc_tune.tiny.chat_templates import (
    EXAONE4_5_TEMPLATE,
    GLM_HYBRID_TEMPLATE,
    HYPERCLOVAX_VISION_V2_TEMPLATE,
    NORTH_TEMPLATE,
    QWEN2_VL_TEMPLATE,
    QWEN3_5_TEMPLATE,
    QWEN3_VL_TEMPLATE,
    VIDEO_LLAMA_3_TEMPLATE,
)

QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN_CHAT_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    *QWEN_VISION_TOKENS,
)
# The words of the Qwen prompts and answers in sc_tune.adapters (and of the chat templates around them), so that
# the tiny tokenizer spends about one token per word on them (sequences stay short on CPU).
QWEN_TEMPLATE_TEXT = (
    "system\nYou are a helpful assistant.\nuser\nassistant\nDescribe the object in in a few words. Find . "
    "Describe the object at Locate  in this image and output the bbox coordinates in JSON format. "
    'Locate . Output its bbox coordinates in JSON format. {"bbox_2d": [0, 1, 2, 3]} (0,1),(2,3) This is a the '
    '```json\n[\n\t{"bbox_2d": [0, 1, 2, 3], "label": "the"}\n]\n```\n'
    '```json\n[\n    {\n        "bbox_2d": [0, 1, 2, 3], "label": "the",\n    },\n]\n```'
)


def _qwen_image_processor(patch_size: int):
    def build(image_size: int):
        from transformers import Qwen2VLImageProcessorPil

        pixels = image_size * image_size
        return Qwen2VLImageProcessorPil(
            size={"shortest_edge": pixels, "longest_edge": pixels},
            patch_size=patch_size,
            temporal_patch_size=2,
            merge_size=2,
        )

    return build


def _token_ids(tokenizer, config_field_to_token: dict[str, str]) -> dict:
    """The config's special-token id fields, read from the tiny tokenizer."""
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in config_field_to_token.items()}


def _qwen_token_ids(tokenizer) -> dict:
    return _token_ids(tokenizer, {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    })


def _text_config(tokenizer, sizes: TinySizes, eos_token: str) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden,
        intermediate_size=2 * sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids(eos_token),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def _for_model(model_type: str, text: dict, vision: dict, ids: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


_QWEN_VISION = dict(depth=2, num_heads=2, in_channels=3, spatial_merge_size=2, temporal_patch_size=2)


def _qwen2_vl_config(tokenizer, sizes: TinySizes):
    text = _text_config(tokenizer, sizes, "<|im_end|>")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 8]}
    vision = dict(_QWEN_VISION, embed_dim=sizes.vision_width, hidden_size=sizes.hidden, mlp_ratio=2, patch_size=14)
    return _for_model("qwen2_vl", text, vision, _qwen_token_ids(tokenizer))


def _qwen2_5_vl_config(tokenizer, sizes: TinySizes):
    text = _text_config(tokenizer, sizes, "<|im_end|>")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 8]}
    vision = dict(
        _QWEN_VISION,
        hidden_size=sizes.vision_width,
        out_hidden_size=sizes.hidden,
        intermediate_size=2 * sizes.vision_width,
        patch_size=14,
        window_size=112,
        fullatt_block_indexes=[1],
    )
    return _for_model("qwen2_5_vl", text, vision, _qwen_token_ids(tokenizer))


def _qwen3_vl_vision(sizes: TinySizes) -> dict:
    return dict(_qwen3_5_vision(sizes), deepstack_visual_indexes=[0])  # Qwen3.5's tower has no DeepStack


def _qwen3_vl_text(tokenizer, sizes: TinySizes) -> dict:
    text = _text_config(tokenizer, sizes, "<|im_end|>")
    text["head_dim"] = 32
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [8, 4, 4],
        "mrope_interleaved": True,
    }
    return text


def _qwen3_vl_config(tokenizer, sizes: TinySizes):
    return _for_model("qwen3_vl", _qwen3_vl_text(tokenizer, sizes), _qwen3_vl_vision(sizes), _qwen_token_ids(tokenizer))


def _qwen3_vl_moe_config(tokenizer, sizes: TinySizes):
    text = _qwen3_vl_text(tokenizer, sizes)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=sizes.hidden, decoder_sparse_step=1)
    return _for_model("qwen3_vl_moe", text, _qwen3_vl_vision(sizes), _qwen_token_ids(tokenizer))


def _qwen3_5_text(tokenizer, sizes: TinySizes) -> dict:
    """The hybrid text model: one Gated DeltaNet (linear attention) layer, then one full-attention layer (repeated;
    ``sizes.text_layer_types`` sets another pattern)."""
    text = _text_config(tokenizer, sizes, "<|im_end|>")
    text.update(
        head_dim=32,
        layer_types=list(sizes.text_layer_types) or ["linear_attention", "full_attention"] * max(1, sizes.layers // 2),
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        # The released checkpoints rotate a quarter of each 256-dim head; half of a 32-dim head here, so
        # that each of the three M-RoPE sections (t, h, w) still gets frequencies.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [3, 3, 2],
            "mrope_interleaved": True,
        },
    )
    text["num_hidden_layers"] = len(text["layer_types"])
    return text


# The decay of a Gated DeltaNet layer's state per token is exp(-A * softplus(a_t + dt_bias)). transformers'
# ``_init_weights`` sets dt_bias = 1 (softplus 1.31) with A ~ U(0.01, 16): at that init most heads keep less than
# 1e-4 of their state from one token to the next, and the gradient that could lengthen that memory scales with the
# same factor, so a model trained from scratch keeps them memoryless (docs/notes/hybrid-qwen3_5.md). The Gated
# DeltaNet reference (flash-linear-attention's GatedDeltaNet, as Mamba2) draws the step dt log-uniformly in
# [1e-3, 1e-1] and sets dt_bias = softplus^-1(dt): per-token decays from exp(-1.6) to almost 1. Released checkpoints
# overwrite both parameters, so only from-scratch training (the benchmark's warm starts) sees the difference.
GATED_DELTANET_DT_RANGE = (1e-3, 1e-1)
GATED_DELTANET_DT_FLOOR = 1e-4


def reference_gated_deltanet_decay(model, seed: int) -> int:
    """Re-draw every Gated DeltaNet layer's ``dt_bias`` as the reference initialisation does; returns the count of
    layers. Its own generator, so every other weight stays as transformers drew it."""
    generator = torch.Generator().manual_seed(seed)
    low, high = (math.log(v) for v in GATED_DELTANET_DT_RANGE)
    layers = [m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")]
    for layer in layers:
        dt = torch.exp(low + (high - low) * torch.rand(layer.dt_bias.shape, generator=generator))
        dt = dt.clamp(min=GATED_DELTANET_DT_FLOOR)
        with torch.no_grad():
            layer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    return len(layers)


def _qwen3_5_vision(sizes: TinySizes) -> dict:
    return dict(
        _QWEN_VISION,
        hidden_size=sizes.vision_width,
        out_hidden_size=sizes.hidden,
        intermediate_size=2 * sizes.vision_width,
        patch_size=16,
        num_position_embeddings=64,
    )


def _qwen3_5_config(tokenizer, sizes: TinySizes):
    return _for_model("qwen3_5", _qwen3_5_text(tokenizer, sizes), _qwen3_5_vision(sizes), _qwen_token_ids(tokenizer))


def _qwen3_5_moe_config(tokenizer, sizes: TinySizes):
    text = _qwen3_5_text(tokenizer, sizes)
    text.update(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=sizes.hidden,
        shared_expert_intermediate_size=sizes.hidden,
    )
    return _for_model("qwen3_5_moe", text, _qwen3_5_vision(sizes), _qwen_token_ids(tokenizer))


def _qwen4_exp_config(tokenizer, sizes: TinySizes):
    """Qwen3.5-MoE's text model (every layer routed) with what Qwen4-Exp adds, each at its smallest: the full-attention
    layers as Qwen Sparse Attention (``indexed_attention``: an 8-token budget of 4-token blocks, so prompts longer than
    that are attended sparsely), 2 gated residual streams, and the n-gram embedding before the first Gated DeltaNet
    layer (the only kind it may precede) with 4 hashed heads of small prime vocabularies."""
    text = _qwen3_5_text(tokenizer, sizes)
    text["layer_types"] = ["indexed_attention" if kind == "full_attention" else kind for kind in text["layer_types"]]
    # One-indexed; none where a pattern has no Gated DeltaNet layer.
    first_linear = [i + 1 for i, kind in enumerate(text["layer_types"]) if kind == "linear_attention"][:1]
    text.update(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=sizes.hidden,
        shared_expert_intermediate_size=sizes.hidden,
        # The indexer's RoPE dimensions (half of the 32-dim head) must fit its 16-dim head.
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=8,
        indexer_compress_ratio=4,
        hc_count=2,
        hc_lowrank=8,
        ple_layer_ids=first_linear,
        ple_embed_dim=16,
        heads_per_ngram=2,
        ngram_vocab_size_base=64,
        make_ngram_vocab_size_divisible_by=8,
        split_ngram_parts=2,
    )
    return _for_model("qwen4_exp", text, _qwen3_5_vision(sizes), _qwen_token_ids(tokenizer))


def _qwen_spec(config, patch_size: int, chat_template: str, special_tokens=QWEN_CHAT_SPECIAL_TOKENS,
               reinit=None) -> TinySpec:
    return TinySpec(
        special_tokens=special_tokens,
        eos_token="<|im_end|>",
        template_text=QWEN_TEMPLATE_TEXT,
        image_processor=_qwen_image_processor(patch_size),
        config=config,
        chat_template=chat_template,
        reinit=reinit,
    )


# Qwen3.5 checkpoints add reasoning and tool tokens to the Qwen chat set; the tiny tokenizer carries the
# ones whose names a suppression rule could miss.
QWEN3_5_SPECIAL_TOKENS = (
    *QWEN_CHAT_SPECIAL_TOKENS,
    "<|quad_start|>",
    "<|quad_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
)

# ---------------------------------------------------------------- GLM-4.1V / 4.5V / 4.6V
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<think>",
    "</think>",
)
GLM_TEMPLATE_TEXT = (
    "Describe the object in in a few words. Please pinpoint the bounding box [[x1,y1,x2,y2], …] in the image as "
    "per the given description. Locate . Answer with its bounding box. [[0, 1, 2, 3]] This is a the /nothink"
)


def _glm_image_processor(class_name: str):
    def build(image_size: int):
        import transformers

        pixels = image_size * image_size
        return getattr(transformers, class_name)(
            size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14, temporal_patch_size=2, merge_size=2
        )

    return build


def _glm_token_ids(tokenizer) -> dict:
    return _token_ids(tokenizer, {
        "image_token_id": "<|image|>",
        "video_token_id": "<|video|>",
        "image_start_token_id": "<|begin_of_image|>",
        "image_end_token_id": "<|end_of_image|>",
        "video_start_token_id": "<|begin_of_video|>",
        "video_end_token_id": "<|end_of_video|>",
    })


def _glm_text(tokenizer, sizes: TinySizes) -> dict:
    text = _text_config(tokenizer, sizes, "<|user|>")
    # GLM rotates half of each head; its three M-RoPE sections cover those frequencies (released: [8, 12, 12]).
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [2, 3, 3],
    }
    return text


def _glm_vision(sizes: TinySizes) -> dict:
    return dict(
        depth=2,
        num_heads=2,
        hidden_size=sizes.vision_width,
        out_hidden_size=sizes.hidden,
        intermediate_size=2 * sizes.hidden,
        image_size=56,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )


def _glm_config(model_type: str):
    def build(tokenizer, sizes: TinySizes):
        text = _glm_text(tokenizer, sizes)
        if model_type == "glm4v_moe":
            text.update(
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_shared_experts=1,
                moe_intermediate_size=sizes.hidden,
                first_k_dense_replace=1,
                head_dim=sizes.hidden // sizes.text_heads,
            )
        return _for_model(model_type, text, _glm_vision(sizes), _glm_token_ids(tokenizer))

    return build


def _glm_spec(model_type: str) -> TinySpec:
    return TinySpec(
        special_tokens=GLM_SPECIAL_TOKENS,
        eos_token="<|user|>",
        template_text=GLM_TEMPLATE_TEXT,
        image_processor=_glm_image_processor(
            "Glm46VImageProcessorPil" if model_type == "glm46v" else "Glm4vImageProcessorPil"
        ),
        config=_glm_config(model_type),
        chat_template=GLM_HYBRID_TEMPLATE,
    )


TINY_SPECS: dict[str, TinySpec] = {
    "qwen2_vl": _qwen_spec(_qwen2_vl_config, 14, QWEN2_VL_TEMPLATE),
    "qwen2_5_vl": _qwen_spec(_qwen2_5_vl_config, 14, QWEN2_VL_TEMPLATE),
    "qwen3_vl": _qwen_spec(_qwen3_vl_config, 16, QWEN3_VL_TEMPLATE),
    "qwen3_vl_moe": _qwen_spec(_qwen3_vl_moe_config, 16, QWEN3_VL_TEMPLATE),
    "qwen3_5": _qwen_spec(_qwen3_5_config, 16, QWEN3_5_TEMPLATE, QWEN3_5_SPECIAL_TOKENS,
                          reinit=reference_gated_deltanet_decay),
    "qwen3_5_moe": _qwen_spec(_qwen3_5_moe_config, 16, QWEN3_5_TEMPLATE, QWEN3_5_SPECIAL_TOKENS,
                          reinit=reference_gated_deltanet_decay),
    # The released template was not at hand: Qwen3.5's stand-in (its enable_thinking switch) is assumed.
    "qwen4_exp": _qwen_spec(_qwen4_exp_config, 16, QWEN3_5_TEMPLATE, QWEN3_5_SPECIAL_TOKENS,
                            reinit=reference_gated_deltanet_decay),
    "glm4v": _glm_spec("glm4v"),
    "glm4v_moe": _glm_spec("glm4v_moe"),
    "glm46v": _glm_spec("glm46v"),
}


# ---------------------------------------------------------------- EXAONE 4.5, HyperCLOVA X SEED Vision v2
# Qwen2-VL's image processor (14 px patches, 2 x 2 merge) before a 1-D-rotary text model; prompt words as the generic
# chat-template families' (sc_tune.adapters.chat_template.GenericTemplateTurns).
GENERIC_PROMPT_TEXT = (
    "Describe the object at in a few words. Locate . Answer with its box as [x1, y1, x2, y2], integers from 0 to "
    "1000. [0, 1, 2, 3] This is a the "
)
EXAONE4_5_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|endofturn|>", "<vision>",
                    "</vision>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")
# The processor reads the image token off the tokenizer (image_token): the released one names <|IMAGE_PAD|> (vLLM).
HYPERCLOVAX_VISION_V2_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|endofturn|>", "<|image_start|>",
                                "<|image_end|>", "<|IMAGE_PAD|>", "<|video_start|>", "<|video_end|>", "<|VIDEO_PAD|>",
                                "<think>", "</think>")


def _exaone4_5_config(tokenizer, sizes: TinySizes):
    # EXAONE 4.0's text model: a sliding-window (rotary) layer, then a global one; a GQA vision tower (2-D rotary).
    text = dict(_text_config(tokenizer, sizes, "<|endofturn|>"), model_type="exaone4", sliding_window=64,
                layer_types=["sliding_attention"] * (sizes.layers - 1) + ["full_attention"])
    vision = dict(_QWEN_VISION, hidden_size=sizes.vision_width, out_hidden_size=sizes.hidden, num_key_value_heads=1,
                  intermediate_size=2 * sizes.vision_width, patch_size=14, window_size=112, fullatt_block_indexes=[1])
    ids = _token_ids(tokenizer, {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"})
    return _for_model("exaone4_5", text, vision, ids)


def _hyperclovax_vision_v2_config(tokenizer, sizes: TinySizes):
    # HyperCLOVA X's text model (Llama-like with multipliers: a logits scale of 0.5 so that it is exercised) and the
    # Qwen2.5-VL tower, whose merger projects to its own width before the linear projector.
    text = dict(_text_config(tokenizer, sizes, "<|im_end|>"), model_type="hyperclovax", logits_scaling=0.5)
    vision = dict(_QWEN_VISION, model_type="qwen2_5_vl_vision", hidden_size=sizes.vision_width,
                  out_hidden_size=sizes.vision_width, intermediate_size=2 * sizes.vision_width, patch_size=14,
                  window_size=112, fullatt_block_indexes=[1])
    ids = _token_ids(tokenizer, {"image_token_id": "<|IMAGE_PAD|>", "video_token_id": "<|VIDEO_PAD|>"})
    return _for_model("hyperclovax_vision_v2", text, vision, ids)


def _gpt2_tokenizer_class():
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer


def _patch_grid_generic_spec(config, special_tokens, eos_token, chat_template, named_tokens=(),
                             tokenizer_class=None) -> TinySpec:
    more = {"tokenizer_class": tokenizer_class} if tokenizer_class is not None else {}
    return TinySpec(
        special_tokens=special_tokens,
        eos_token=eos_token,
        template_text=GENERIC_PROMPT_TEXT + "system\nYou are a helpful assistant.\nuser\nassistant\n",
        image_processor=_qwen_image_processor(14),
        config=config,
        chat_template=chat_template,
        named_tokens=named_tokens,
        **more,
    )


TINY_SPECS.update({
    "exaone4_5": _patch_grid_generic_spec(_exaone4_5_config, EXAONE4_5_TOKENS, "<|endofturn|>", EXAONE4_5_TEMPLATE),
    "hyperclovax_vision_v2": _patch_grid_generic_spec(
        _hyperclovax_vision_v2_config, HYPERCLOVAX_VISION_V2_TOKENS, "<|im_end|>", HYPERCLOVAX_VISION_V2_TEMPLATE,
        named_tokens=(("image_token", "<|IMAGE_PAD|>"), ("video_token", "<|VIDEO_PAD|>")),
        # transformers loads every hyperclovax_vision_v2 folder with GPT2Tokenizer, whatever its tokenizer_config says
        tokenizer_class=_gpt2_tokenizer_class),
})


# ---------------------------------------------------------------- VideoLLaMA3
# A 2-layer SigLIP-style tower (2-D axial rotary, 14 px patches) and a Qwen2 text model. The tiny image processor
# merges 2 x 2 (the video checkpoints' merge; the image checkpoints' default is 1) so that the merge size reaches the
# placeholder count, image_merge_sizes and the tower's bilinear merge.
VIDEO_LLAMA_3_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>")
VIDEO_LLAMA_3_PROMPT_TEXT = "Where is ? Answer in [[x0,y0,x1,y1]] format. <ref></ref>[[0, 1, 2, 3]] "


def _video_llama_3_image_processor(image_size: int):
    from transformers import VideoLlama3ImageProcessorPil

    pixels = image_size * image_size
    return VideoLlama3ImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14,
                                        merge_size=2)


def _video_llama_3_config(tokenizer, sizes: TinySizes):
    text = dict(_text_config(tokenizer, sizes, "<|im_end|>"), model_type="qwen2")
    vision = dict(hidden_size=sizes.vision_width, intermediate_size=2 * sizes.vision_width, num_hidden_layers=2,
                  num_attention_heads=2, patch_size=14)
    ids = _token_ids(tokenizer, {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"})
    return _for_model("video_llama_3", text, vision, ids)


TINY_SPECS["video_llama_3"] = TinySpec(
    special_tokens=VIDEO_LLAMA_3_TOKENS,
    eos_token="<|im_end|>",
    template_text=GENERIC_PROMPT_TEXT + VIDEO_LLAMA_3_PROMPT_TEXT + "user\nassistant\n",
    image_processor=_video_llama_3_image_processor,
    config=_video_llama_3_config,
    chat_template=VIDEO_LLAMA_3_TEMPLATE,
)


# ---------------------------------------------------------------- North (cohere_compass)
# Qwen3-VL's tower (16 px patches, 2 x 2 merge, one DeepStack layer) before a Cohere2-style text model as the releases
# lay it out (third-party ports of North-Micro-Vision read its config so): sliding-window layers rotated with the
# interleaved M-RoPE, then a full-attention layer with no positional encoding (its rope_parameters entry null); a
# logit_scale of 0.5 so that it is exercised. The BOS is the template's to write (CohereTokenizer's <BOS_TOKEN>).
NORTH_TOKENS = ("<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|VISION_START|>",
                "<|VISION_END|>", "<|IMAGE_PAD|>", "<|VIDEO_PAD|>")


def _north_image_processor(image_size: int):
    from transformers import CohereCompassImageProcessorPil

    pixels = image_size * image_size
    return CohereCompassImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=16,
                                          temporal_patch_size=2, merge_size=2)


def _north_config(tokenizer, sizes: TinySizes):
    layer_types = ["sliding_attention"] * (sizes.layers - 1) + ["full_attention"]
    rotary = {"rope_type": "default", "rope_theta": 50000.0, "mrope_section": [8, 4, 4], "mrope_interleaved": True}
    text = dict(_text_config(tokenizer, sizes, "<|END_OF_TURN_TOKEN|>"), model_type="cohere_compass_text",
                layer_types=layer_types, sliding_window=64, logit_scale=0.5,
                rope_parameters={"sliding_attention": rotary, "full_attention": None},
                bos_token_id=tokenizer.convert_tokens_to_ids("<BOS_TOKEN>"))
    ids = _token_ids(tokenizer, {"image_token_id": "<|IMAGE_PAD|>", "video_token_id": "<|VIDEO_PAD|>",
                                 "vision_start_token_id": "<|VISION_START|>", "vision_end_token_id": "<|VISION_END|>"})
    return _for_model("cohere_compass", text, _qwen3_vl_vision(sizes), ids)


TINY_SPECS["cohere_compass"] = TinySpec(
    special_tokens=NORTH_TOKENS,
    eos_token="<|END_OF_TURN_TOKEN|>",
    template_text=GENERIC_PROMPT_TEXT,
    image_processor=_north_image_processor,
    config=_north_config,
    chat_template=NORTH_TEMPLATE,
    bos_token="<BOS_TOKEN>",
)


def tiny_spec(model_type: str) -> TinySpec:
    try:
        return TINY_SPECS[model_type]
    except KeyError:
        known = ", ".join(sorted(TINY_SPECS))
        raise ValueError(f"no tiny chat-model spec for {model_type!r}; known: {known}") from None


def build_tiny_model(model_type: str, corpus=DEFAULT_CORPUS, image_size: int = 56, seed: int = 0, **sizes):
    """(model, tokenizer, image_processor) of a tiny random ``model_type`` (see ``tiny_chat.build_tiny``)."""
    return build_tiny(tiny_spec(model_type), corpus=corpus, image_size=image_size, seed=seed, **sizes)


def save_tiny_model(model_type: str, directory: str) -> str:
    """The registry's ``build_tiny`` for these families: a tiny loadable checkpoint folder."""
    return save_tiny(tiny_spec(model_type), directory)
