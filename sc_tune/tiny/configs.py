"""Tiny configs of the transformers-native chat families, one ``TinySpec`` per ``model_type``.

Sizes are the smallest that keep each architecture's constraints (rope sections summing to half the head
dim, vision width divisible by its heads, merge sizes matching the image processor). Each tokenizer carries a
stand-in chat template that writes SC-Tune's turns as the released template does.
"""

from __future__ import annotations

from sc_tune.tiny.chat import DEFAULT_CORPUS, TinySizes, TinySpec, build_tiny, save_tiny

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
# The words of the Qwen prompt templates in sc_tune.adapters, so that the tiny tokenizer spends one token
# per word on them (sequences stay short on CPU).
QWEN_TEMPLATE_TEXT = (
    "system\nYou are a helpful assistant.\nuser\nassistant\nDescribe the object in in a few words. Find . "
    "Describe the object at Locate in this image and output the bbox coordinates in JSON format. "
    '```json\n[\n\t{"bbox_2d": [0, 1, 2, 3], "label": "the"}\n]\n``` (0,1),(2,3) This is a the'
)


def _chatml_template(default_system: bool, thinking_switch: bool) -> str:
    """Stand-in for the Qwen chat templates, for SC-Tune's turns: ChatML, the image as
    ``<|vision_start|><|image_pad|><|vision_end|>``; Qwen2/2.5-VL insert a default system turn; Qwen3.5 opens a
    reasoning block unless ``enable_thinking`` is false, when it writes an empty one."""
    system = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{% endif %}" if default_system else ""
    )
    generation = "{{ '<|im_start|>assistant\\n' }}"
    if thinking_switch:
        generation += (
            "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
            "{% else %}{{ '<think>\\n' }}{% endif %}"
        )
    return (
        system + "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}" + generation + "{% endif %}"
    )


def _glm_chat_template() -> str:
    """Stand-in for the GLM-4.5V/4.6V chat template, for SC-Tune's turns: ``/nothink`` after the user's text and
    an empty think block after ``<|assistant|>`` when ``enable_thinking`` is false."""
    nothink = "enable_thinking is defined and enable_thinking is false"
    return (
        "{{ '[gMASK]<sop>' }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' }}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
        "{{ '<|begin_of_image|><|image|><|end_of_image|>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}"
        "{% endif %}{% endfor %}"
        f"{{% if message['role'] == 'user' and {nothink} %}}{{{{ '/nothink' }}}}{{% endif %}}{{% endfor %}}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}"
        f"{{% if {nothink} %}}{{{{ '\\n<think></think>' }}}}{{% endif %}}{{% endif %}}"
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
    return dict(
        _QWEN_VISION,
        hidden_size=sizes.vision_width,
        out_hidden_size=sizes.hidden,
        intermediate_size=2 * sizes.vision_width,
        patch_size=16,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )


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


def _qwen_spec(config, patch_size: int, special_tokens=QWEN_CHAT_SPECIAL_TOKENS, default_system=False,
               thinking_switch=False) -> TinySpec:
    return TinySpec(
        special_tokens=special_tokens,
        eos_token="<|im_end|>",
        template_text=QWEN_TEMPLATE_TEXT,
        image_processor=_qwen_image_processor(patch_size),
        config=config,
        chat_template=_chatml_template(default_system, thinking_switch),
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
    "Describe the object in in a few words. Locate . Answer with its box as [[x1, y1, x2, y2]] on 0 to 1000. "
    "/nothink\n<think></think>\n [[0, 1, 2, 3]] This is a the"
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
        chat_template=_glm_chat_template(),
    )


TINY_SPECS: dict[str, TinySpec] = {
    "qwen2_vl": _qwen_spec(_qwen2_vl_config, 14, default_system=True),
    "qwen2_5_vl": _qwen_spec(_qwen2_5_vl_config, 14, default_system=True),
    "qwen3_vl": _qwen_spec(_qwen3_vl_config, 16),
    "qwen3_vl_moe": _qwen_spec(_qwen3_vl_moe_config, 16),
    "qwen3_5": _qwen_spec(_qwen3_5_config, 16, QWEN3_5_SPECIAL_TOKENS, thinking_switch=True),
    "qwen3_5_moe": _qwen_spec(_qwen3_5_moe_config, 16, QWEN3_5_SPECIAL_TOKENS, thinking_switch=True),
    "glm4v": _glm_spec("glm4v"),
    "glm4v_moe": _glm_spec("glm4v_moe"),
    "glm46v": _glm_spec("glm46v"),
}


def tiny_spec(model_type: str) -> TinySpec:
    try:
        return TINY_SPECS[model_type]
    except KeyError:
        known = ", ".join(sorted(TINY_SPECS))
        raise ValueError(f"no tiny chat-model spec for {model_type!r}; known: {known}") from None


def build_tiny_model(model_type: str, corpus=DEFAULT_CORPUS, image_size: int = 56, seed: int = 0, **sizes):
    """(model, tokenizer, image_processor) of a tiny random ``model_type`` (see ``sc_tune.tiny.chat.build_tiny``)."""
    return build_tiny(tiny_spec(model_type), corpus=corpus, image_size=image_size, seed=seed, **sizes)


def save_tiny_model(model_type: str, directory: str) -> str:
    """The registry's ``build_tiny`` for these families: a tiny loadable checkpoint folder."""
    return save_tiny(tiny_spec(model_type), directory)
