"""Tiny random models of the chat-template families: InternVL, Gemma 3 / 4, LLaVA-OneVision, LLaVA-1.5 / NeXT,
Mistral 3, Aya Vision, Granite 4 Vision, Llama 3.2 Vision, Idefics2, SmolVLM, Ovis2, MiniCPM-V.

Each is the family's own transformers architecture at a few hundred thousand parameters, a tiny BPE
tokenizer carrying the family's special tokens (``sc_tune.tiny.chat``), the family's PIL image
processor at a tiny input size, and a chat template that is a minimal stand-in for the checkpoint's: the
same turn markers, the same image marker for ``{"type": "image"}`` and the same opened answer (Gemma 4's empty
thought channel, MiniCPM-V's closed ``<think>`` block with thinking off), nothing else (no tools; a system turn only
where the released template always writes one: Ovis2's). tests/test_real_checkpoints.py checks each against the
released template where that file is at hand. Image tiling / splitting stays on where the family uses it by default,
at the smallest grid, so the tests cover its token counting.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from sc_tune.tiny.chat import TinySizes, TinySpec, build_tiny, write_folder
from sc_tune.tiny.chat_templates import QWEN3_5_THINKING_SWITCH
from sc_tune.tiny.configs import _qwen3_5_text, _text_config, reference_gated_deltanet_decay

TINY_IMAGE_SIZE = 28  # the vision towers' input: an InternVL tile, a SigLIP view, a SmolVLM crop (2x2 patches)
# The words of the prompts in sc_tune.adapters.chat_template / internvl: one token per word in the tiny BPE.
TEMPLATE_TEXT = (
    "user\nassistant\nmodel\nUser: Assistant: Describe the object at in a few words. Locate . "
    "Answer with its box as [x1, y1, x2, y2], integers from 0 to 1000. [0, 1, 2, 3] [[0, 1, 2, 3]] "
    'Output its box_2d in JSON as [ymin, xmin, ymax, xmax] normalized to 0-1000. {"box_2d": [0, 1, 2, 3]} '
    '```json\n[\n  {"box_2d": [0, 1, 2, 3], "label": "the"}\n]\n```\n'
    "Please provide the bounding box coordinate of the region this sentence describes: "
    "Please provide a short description for this region: "
)


def _chatml_template(image_text: str, system: str = "", answer_open: str = "") -> str:
    """ChatML turns (InternVL, LLaVA-OneVision, Ovis2, MiniCPM-V): ``<|im_start|>user\\n`` + image marker + text;
    ``system``: a system turn the template writes before every conversation (Ovis2's default one); ``answer_open``:
    what the generation prompt writes after the opened assistant turn (MiniCPM-V's thinking switch)."""
    opening = f"{{{{ '<|im_start|>system\\n{system}<|im_end|>\\n' }}}}" if system else ""
    return (
        opening + "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
        f"{{{{ '{image_text}' }}}}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}" + answer_open + "{% endif %}"
    )


def _gemma_template(turn_open: str, turn_close: str, image_text: str, answer_open: str = "",
                    system_as_written: bool = False) -> str:
    """Gemma's turns; ``answer_open``: what the generation prompt writes after the opened model turn (Gemma 4's empty
    thought channel, its template's default with thinking off). ``system_as_written``: a leading system message is
    written as its content stands, ``messages[0]['content'] | trim``, as Gemma 4's released template does (a list of
    parts is then written as the list's text: Gemma 4 takes a system message's text as a string)."""
    system = (
        "{% if messages[0]['role'] in ['system', 'developer'] %}"
        f"{{{{ '{turn_open}system\\n' + messages[0]['content'] | trim + '{turn_close}\\n' }}}}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
        if system_as_written else
        # Gemma 3's released template: the system text, a blank line after it, opens the first user turn.
        "{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'][0]['text'] + "
        "'\\n\\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
        "{% set loop_messages = messages %}{% endif %}"
    )
    prefix = "" if system_as_written else " + (first_user_prefix if loop.first else '')"
    return (
        "{{ '<bos>' }}" + system + "{% for message in loop_messages %}"
        f"{{{{ '{turn_open}' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'{prefix} }}}}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
        f"{{{{ '{image_text}' }}}}"
        "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}"
        f"{{{{ '{turn_close}\\n' }}}}{{% endfor %}}"
        f"{{% if add_generation_prompt %}}{{{{ '{turn_open}model\\n{answer_open}' }}}}{{% endif %}}"
    )


def _vision_encoder(sizes: TinySizes, image_size: int, patch_size: int) -> dict:
    width = sizes.vision_width
    return {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }


# ---------------------------------------------------------------- InternVL
def _internvl_image_processor(image_size: int):
    from transformers import GotOcr2ImageProcessorPil

    # Dynamic tiling on (InternVLProcessor's default), at most 2 tiles (+ a thumbnail) to stay tiny.
    return GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=True, min_patches=1, max_patches=2
    )


def _internvl_config(tokenizer, sizes: TinySizes, image_size: int = TINY_IMAGE_SIZE):
    from transformers import AutoConfig

    # The tile is ``image_size`` px (448 in the releases, 14 px patches); the pixel shuffle (0.5) merges 2 x 2
    # patches into one token. 14 px patches where the tile allows; else 16 px, so that the benchmark's 128 px images
    # are one tile of 4 x 4 tokens, one per grid cell, as in the Qwen warm starts.
    patch = next((p for p in (14, 16) if image_size % (2 * p) == 0), None)
    if patch is None:
        raise ValueError(f"an InternVL tile of {image_size} px splits into 2 x 2 groups of neither 14 nor 16 px patches")
    return AutoConfig.for_model(
        "internvl",
        text_config=_text_config(tokenizer, sizes, "<|im_end|>"),
        vision_config=_vision_encoder(sizes, image_size, patch),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(image_size // patch) ** 2 // 4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


# ---------------------------------------------------------------- Gemma 3
def _gemma3_image_processor(image_size: int):
    from transformers import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})


def _gemma_text(tokenizer, sizes: TinySizes, eos_token: str) -> dict:
    text = _text_config(tokenizer, sizes, eos_token)
    head_dim = sizes.hidden // sizes.text_heads
    text.update(
        head_dim=head_dim,
        sliding_window=64,
        layer_types=["sliding_attention"] * (sizes.layers - 1) + ["full_attention"],
        bos_token_id=tokenizer.convert_tokens_to_ids("<bos>"),
    )
    return text


def _gemma3_config(tokenizer, sizes: TinySizes):
    from transformers import AutoConfig

    text = _gemma_text(tokenizer, sizes, "<end_of_turn>")
    text["query_pre_attn_scalar"] = text["head_dim"]
    ids = {
        "boi_token_index": tokenizer.convert_tokens_to_ids("<start_of_image>"),
        "eoi_token_index": tokenizer.convert_tokens_to_ids("<end_of_image>"),
        "image_token_index": tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    }
    vision = _vision_encoder(sizes, TINY_IMAGE_SIZE, 14)
    # 2x2 patches pooled to 4 soft tokens per image.
    return AutoConfig.for_model(
        "gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4, tie_word_embeddings=False, **ids
    )


def _gemma3_random_projector(model) -> None:
    """Gemma 3 initialises its image projection to zeros, so a random tiny model would ignore its images
    (and pass no gradient to the vision side); a small random projection makes images matter in tests."""
    import torch

    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)


# ---------------------------------------------------------------- Gemma 4
GEMMA4_PATCH = 4
GEMMA4_MAX_SOFT_TOKENS = 70  # the smallest soft-token budget the image processor accepts


def _gemma4_image_processor(image_size: int):
    from transformers import Gemma4ImageProcessorPil

    # Tiny patches keep the tower cheap.
    return Gemma4ImageProcessorPil(patch_size=GEMMA4_PATCH, max_soft_tokens=GEMMA4_MAX_SOFT_TOKENS,
                                   pooling_kernel_size=2)


def _gemma4_config(tokenizer, sizes: TinySizes):
    from transformers import AutoConfig

    text = _gemma_text(tokenizer, sizes, "<turn|>")
    text.update(
        global_head_dim=text["head_dim"],
        vocab_size_per_layer_input=len(tokenizer),
        hidden_size_per_layer_input=8,
        use_bidirectional_attention="vision",
    )
    width = sizes.vision_width
    vision = {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": width // 2,
        "patch_size": GEMMA4_PATCH,
        "pooling_kernel_size": 2,
        "position_embedding_size": 64,
    }
    token = tokenizer.convert_tokens_to_ids
    ids = {
        "boi_token_id": token("<|image>"),
        "eoi_token_id": token("<image|>"),
        "image_token_id": token("<|image|>"),
        "video_token_id": token("<|video|>"),
        "boa_token_id": token("<|audio>"),
        "eoa_token_index": token("<audio|>"),
        "audio_token_id": token("<|audio|>"),
    }
    return AutoConfig.for_model(
        "gemma4", text_config=text, vision_config=vision, audio_config=None, tie_word_embeddings=False, **ids
    )


# ---------------------------------------------------------------- LLaVA-OneVision
def _anyres_pinpoints(image_size: int) -> list[list[int]]:
    """The anyres grids of LLaVA-OneVision and LLaVA-NeXT at a tiny tile: 1 x 1 up to 2 x 2 tiles."""
    return [[image_size * r, image_size * c] for r in (1, 2) for c in (1, 2)]


def _llava_onevision_image_processor(image_size: int):
    from transformers import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=_anyres_pinpoints(image_size),
    )


def _llava_onevision_config(tokenizer, sizes: TinySizes):
    from transformers import AutoConfig

    vision = dict(_vision_encoder(sizes, TINY_IMAGE_SIZE, 14), vision_use_head=False)
    return AutoConfig.for_model(
        "llava_onevision",
        text_config=_text_config(tokenizer, sizes, "<|im_end|>"),
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_anyres_pinpoints(TINY_IMAGE_SIZE),
        tie_word_embeddings=False,
    )


# ---------------------------------------------------------------- LLaVA-1.5 / LLaVA-NeXT (llava-hf)
# The llava-hf LLaVA-1.5 template ("USER: <image>\n... ASSISTANT:"), as transformers' own LLaVA-NeXT processor test
# quotes it (its prepare_processor_dict): it writes nothing after an answer, which the model ends with its EOS (</s>).
# No released file of it was at hand to compare with.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-v1.6-mistral-7b-hf's template, as its processor's chat_template.json is publicly quoted (printed from
# LlavaNextProcessor.from_pretrained of the release): [INST] turns, "</s> " written after an answer, no BOS written (the
# Mistral tokenizer prepends <s>).
LLAVA_NEXT_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA = ("<pad>", "<s>", "</s>")  # pad first (the tiny tokenizer's pad), then the Llama tokenizer's BOS and EOS


def _llava_image_processor(image_size: int):
    from transformers import CLIPImageProcessorPil

    # The releases' processor: shortest edge resized to the tower's input, then center-cropped to a square.
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def _llava_next_image_processor(image_size: int):
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size},
                                      image_grid_pinpoints=_anyres_pinpoints(image_size))


def _llava_config(model_type: str, eos_token: str):
    def build(tokenizer, sizes: TinySizes):
        from transformers import AutoConfig

        # A CLIP tower (its CLS feature is dropped by the "default" select strategy) and a Llama text model, as the
        # releases (the 34B's and llama3-llava-next's text models are Llama-architecture too).
        vision = dict(_vision_encoder(sizes, TINY_IMAGE_SIZE, 14), model_type="clip_vision_model")
        grid = {"image_grid_pinpoints": _anyres_pinpoints(TINY_IMAGE_SIZE)} if model_type == "llava_next" else {}
        return AutoConfig.for_model(
            model_type,
            text_config=_text_config(tokenizer, sizes, eos_token),
            vision_config=vision,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
            **grid,
        )

    return build


def _llava_processor_config(processor_class: str, *more: str):
    """The settings LlavaProcessor / LlavaNextProcessor read from processor_config.json, from the model config;
    ``more``: config fields the processor reads too (Granite4VisionProcessor's downsample_rate)."""

    def build(config) -> dict:
        from sc_tune.adapters.llava_onevision import extra_tower_features

        return {"patch_size": config.vision_config.patch_size,
                "vision_feature_select_strategy": config.vision_feature_select_strategy,
                "num_additional_image_tokens": extra_tower_features(config), "processor_class": processor_class,
                **{name: getattr(config, name) for name in more}}

    return build


# ---------------------------------------------------------------- Mistral 3
# The template of Mistral-Small-3.1-24B-Instruct-2503's processor as transformers' own processor test quotes it
# (its Mistral3ProcessorTest, test_processing_mistral3): it writes the BOS, a default system message with today's
# date (strftime_now), [INST] turns with [IMG] for an image, and the EOS after an answer. Shortened to the parts a
# one-image user turn and an answer take (no system turn after the first); it renders those the same.
MISTRAL3_DEFAULT_SYSTEM = (
    "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in "
    "Paris.\\nYour knowledge base was last updated on 2023-10-01. The current date is \" + today + \".\\n\\n"
    "When you're not sure about some information, you say that you don't have the information and don't make up "
    "anything.\\nIf the user's question is not clear, ambiguous, or does not provide enough context for you to "
    "accurately answer the question, you do not try to answer it right away and you rather ask the user to clarify "
    "their request (e.g. \\\"What are some good restaurants around me?\\\" => \\\"Where are you?\\\" or "
    "\\\"When is the next flight to Tokyo\\\" => \\\"Where do you travel from?\\\")"
)
MISTRAL3_TEMPLATE = (
    "{%- set today = strftime_now(\"%Y-%m-%d\") %}"
    "{%- set default_system_message = \"" + MISTRAL3_DEFAULT_SYSTEM + "\" %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'][0]['text'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{{- '[INST]' }}"
    "{%- for block in message['content'] %}{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] == 'image' or block['type'] == 'image_url' %}{{- '[IMG]' }}{%- endif %}{%- endfor %}"
    "{{- '[/INST]' }}{%- elif message['role'] == 'assistant' %}{{- message['content'][0]['text'] + eos_token }}"
    "{%- endif %}{%- endfor %}"
)
# The tekken tokenizer's control tokens the template and the processor use (pad first: the tiny tokenizer's pad).
MISTRAL3_TOKENS = ("<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]",
                   "[/SYSTEM_PROMPT]")
# The releases: 14 px patches merged 2 x 2 (28 px per [IMG]), the long side at most 1540 px. Tiny: at most 3 x 3.
MISTRAL3_LONGEST_EDGE = 84


def _mistral3_image_processor(image_size: int):
    from transformers import PixtralImageProcessorPil

    # The releases' preprocessor_config.json names the tower's patch (14); PixtralProcessor passes the merged one.
    return PixtralImageProcessorPil(size={"longest_edge": MISTRAL3_LONGEST_EDGE},
                                    patch_size={"height": 14, "width": 14})


def _mistral3_config(tokenizer, sizes: TinySizes):
    from transformers import AutoConfig

    # A Pixtral tower and a Mistral text model; head sizes set, since Mistral3Config's defaults are the 24B's.
    vision = dict(_vision_encoder(sizes, MISTRAL3_LONGEST_EDGE, 14), model_type="pixtral",
                  head_dim=sizes.vision_width // 2)
    text = dict(_text_config(tokenizer, sizes, "</s>"), model_type="mistral", head_dim=sizes.hidden // sizes.text_heads,
                sliding_window=None, rope_theta=10000.0)
    return AutoConfig.for_model("mistral3", text_config=text, vision_config=vision,
                                image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
                                tie_word_embeddings=False)


def _mistral3_processor_config(config) -> dict:
    """What PixtralProcessor reads from processor_config.json (the releases': patch_size 14, spatial_merge_size 2)."""
    return {"patch_size": config.vision_config.patch_size, "spatial_merge_size": config.spatial_merge_size,
            "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
            "processor_class": "PixtralProcessor"}


# ---------------------------------------------------------------- Aya Vision
# Cohere's turn format as vLLM's Aya Vision example writes the prompt (vllm-project/vllm
# examples/offline_inference/vision_language.py, run_aya_vision: "<|START_OF_TURN_TOKEN|><|USER_TOKEN|><image>{question}
# <|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", no BOS: the Cohere tokenizer prepends <BOS_TOKEN>,
# add_bos_token=True). An answer is closed with <|END_OF_TURN_TOKEN|> (CohereTokenizer's EOS). The released
# chat_template.json was not at hand: transformers' processor test skips a test because "Chat template has long system
# prompt", so the release may write a default system turn that this stand-in lacks.
AYA_VISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|START_OF_TURN_TOKEN|>' }}"
    "{% if message['role'] == 'user' %}{{ '<|USER_TOKEN|>' }}{% elif message['role'] == 'assistant' %}"
    "{{ '<|CHATBOT_TOKEN|>' }}{% else %}{{ '<|SYSTEM_TOKEN|>' }}{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{{ '<|END_OF_TURN_TOKEN|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)
# CohereTokenizer's pad, BOS and EOS (pad first: the tiny tokenizer's pad), the turn tokens, AyaVisionProcessor's.
AYA_VISION_TOKENS = ("<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                     "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>",
                     "<|IMG_LINE_BREAK|>")
AYA_VISION_PATCH = 7  # 4 x 4 patches per 28 px tile, pixel-shuffled 2 x 2 (the releases' downsample_factor): 4 tokens


def _aya_vision_image_processor(image_size: int):
    from transformers import GotOcr2ImageProcessorPil

    # The processor tiles (crop_to_patches=True) whatever this says; at most 3 tiles (+ the thumbnail) to stay tiny.
    return GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                    min_patches=1, max_patches=3)


def _aya_vision_config(tokenizer, sizes: TinySizes):
    from transformers import AutoConfig

    # A SigLIP tower (no head) and a Cohere2 text model with one sliding-window layer and one global layer.
    vision = dict(_vision_encoder(sizes, TINY_IMAGE_SIZE, AYA_VISION_PATCH), model_type="siglip_vision_model",
                  vision_use_head=False)
    text = dict(_text_config(tokenizer, sizes, "<|END_OF_TURN_TOKEN|>"), model_type="cohere2", sliding_window=64,
                layer_types=["sliding_attention"] * (sizes.layers - 1) + ["full_attention"],
                bos_token_id=tokenizer.convert_tokens_to_ids("<BOS_TOKEN>"))
    return AutoConfig.for_model("aya_vision", text_config=text, vision_config=vision, downsample_factor=2,
                                image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"),
                                tie_word_embeddings=False)


def _aya_vision_processor_config(config) -> dict:
    """What AyaVisionProcessor reads from processor_config.json: the tile (img_size) and the pixels per token
    (patch_size, the tower's patch times the pixel shuffle; the releases': 364 and 28)."""
    return {"img_size": config.vision_config.image_size,
            "patch_size": config.vision_config.patch_size * config.downsample_factor, "downsample_factor": 1,
            "processor_class": "AyaVisionProcessor"}


# ---------------------------------------------------------------- Granite 4 Vision
# Granite 4's role tags (IBM's Granite 4.0 prompt-engineering guide: "<|start_of_role|>", "<|end_of_role|>" and
# "<|end_of_text|>", which ends every message block; no default system prompt), the image first as "<image>" in the
# user's turn (the one-image prompt third-party Granite 4 Vision clients write:
# "<|start_of_role|>user<|end_of_role|><image>{question}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>").
# The released chat_template.jinja was not at hand: it also expands the releases' task tags (<chart2csv>, ...), which
# SC-Tune's prompts do not use.
GRANITE4_VISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_of_role|>' + message['role'] + '<|end_of_role|>' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{{ '<|end_of_text|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{% endif %}"
)
# Granite's pad, its BOS / EOS (one token, which its tokenizer does not prepend), the role tags, the image token.
GRANITE4_VISION_TOKENS = ("<|pad|>", "<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<image>")
GRANITE4_VISION_PATCH = 7  # 4 x 4 patches per 28 px view, Q-Formed to 2 x 2 features in one 4 x 4 window ("2/4")


def _granite4_vision_config(tokenizer, sizes: TinySizes):
    from transformers import AutoConfig

    # A SigLIP tower (the releases': SigLIP2 so400m, patch 16, 384 px) 64 wide (the Q-Former's heads are width / 64),
    # one layer "deepstack" projector on its next-to-last layer into text layer 0 and the four spatial-offset ones on
    # its last layer into layers 1..4 (each into a layer of its own, as the releases': a layer named twice keeps one),
    # and Granite's multipliers at the releases' kind of values (embedding 12, residual 0.22, attention 1 / head_dim,
    # logits / 10), so that static decoding is checked with them. No dropout in the projectors (projector_dropout, and
    # the Q-Formers' own, BLIP-2's 0.1 by default): a training forward then takes the same attention kernels as the
    # rollouts' and draws no masks (the five Q-Formers, twelve image encodings a test run, are about a third of the
    # tiny model's kernel calls; the five text layers the injections need are most of the rest).
    vision = dict(_vision_encoder(sizes, TINY_IMAGE_SIZE, GRANITE4_VISION_PATCH), model_type="siglip_vision_model",
                  hidden_size=64, intermediate_size=128, vision_use_head=False)
    text = dict(_text_config(tokenizer, sizes, "<|end_of_text|>"), num_hidden_layers=5, embedding_multiplier=12.0,
                residual_multiplier=0.22, attention_multiplier=1 / (sizes.hidden // sizes.text_heads),
                logits_scaling=10.0)
    qformer = {"num_hidden_layers": 1, "intermediate_size": 64, "cross_attention_frequency": 1,
               "max_position_embeddings": 64, "use_qformer_text_input": False, "hidden_dropout_prob": 0.0,
               "attention_probs_dropout_prob": 0.0}
    return AutoConfig.for_model(
        "granite4_vision", text_config=text, vision_config=vision, qformer_config=qformer,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full",
        image_grid_pinpoints=_anyres_pinpoints(TINY_IMAGE_SIZE), downsample_rate="2/4",
        deepstack_layer_map=[[-2, 0]], spatial_vision_layer=-1, spatial_target_layers=[1, 2, 3, 4],
        projector_dropout=0.0, tie_word_embeddings=False,
    )


# ---------------------------------------------------------------- Llama 3.2 Vision (mllama)
# Meta's Llama 3.2 Vision prompt format (meta-llama/llama-models, models/llama3_2/vision_prompt_format.md, its image
# example: "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe this image in two
# sentences<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"): the BOS, Llama 3's header tags, the image
# first in the user's turn ("Image will only attend to the subsequent text tokens"), every turn closed with <|eot_id|>.
# The released chat_template.json was not at hand: it may write more (a system turn, tool turns) than this stand-in.
MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# The released tokenizer's pad (<|finetune_right_pad_id|>, the text config's pad_token_id), BOS, its EOS <|eot_id|>, the
# header tags, <|end_of_text|>, <|python_tag|> (MllamaProcessor reads its id) and the image token.
MLLAMA_TOKENS = ("<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|end_of_text|>", "<|python_tag|>", "<|image|>")
# 4 x 4 patches and the class embedding per 28 px tile: 68 vision columns for 4 tiles, more than a rollout's text (as
# the releases' 6,404 against a few hundred), so that a static cache's cross-attention layers are its longest.
MLLAMA_PATCH = 7


def _mllama_image_processor(image_size: int):
    from transformers import MllamaImageProcessorPil

    # The releases' 4 tiles at most (their supported aspect ratios), each the tower's input.
    return MllamaImageProcessorPil(size={"height": image_size, "width": image_size}, max_image_tiles=4)


def _mllama_config(tokenizer, sizes: TinySizes):
    from transformers import AutoConfig

    # The releases' tower kind at tiny sizes: a local encoder whose layer 0 output is also taken (the releases take 5
    # intermediate layers), one gated global layer, 4 tiles; the projector's input is the final and the intermediate
    # features side by side (vision_output_dim). Text: Llama 3 with llama3 rope scaling, 3 layers with the middle one a
    # cross-attention layer (the releases': every fifth of 40), so a self-attention layer follows it in the cache.
    vision = dict(_vision_encoder(sizes, TINY_IMAGE_SIZE, MLLAMA_PATCH), num_global_layers=1, max_num_tiles=4,
                  intermediate_layers_indices=[0], vision_output_dim=2 * sizes.vision_width)
    vision["attention_heads"] = vision.pop("num_attention_heads")
    text = dict(_text_config(tokenizer, sizes, "<|eot_id|>"), num_hidden_layers=3, cross_attention_layers=[1],
                bos_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    return AutoConfig.for_model("mllama", text_config=text, vision_config=vision,
                                image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))


# ---------------------------------------------------------------- Idefics2
# Idefics2's turn format (transformers' idefics2 doc and the model card: "User:<image>What do we see in this
# image?<end_of_utterance>\nAssistant:"): the role capitalised, ":" straight after it where the turn opens with an
# image and ": " otherwise, every turn closed with "<end_of_utterance>\n", the answer opened with "Assistant:". It
# agrees with the chat_template of idefics2-8b-chatty's processor_config.json as a stored copy shows it (the file
# itself was not at hand); the releases keep the template there, so the tiny folder does too.
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{{ '<end_of_utterance>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS2_TOKENS = (*LLAMA, "<fake_token_around_image>", "<image>", "<end_of_utterance>")  # the releases' added tokens
IDEFICS2_PATCH = 7  # 4 x 4 patches on a 28 px side: odd-sized crops leave partial patches that the pixel mask drops
IDEFICS2_LATENTS = 3  # the perceiver's latents per crop (the releases' 64)


def _idefics2_image_processor(image_size: int):
    from transformers import Idefics2ImageProcessorPil

    # Splitting on (idefics2-8b's preprocessor_config.json): 4 quarters + the whole photo, each resized to sides between
    # half the tower's input and the input (the releases' 378 and 980 px, for a 980 px tower).
    return Idefics2ImageProcessorPil(size={"shortest_edge": image_size // 2, "longest_edge": image_size},
                                     do_image_splitting=True)


def _idefics2_config(tokenizer, sizes: TinySizes):
    from transformers import AutoConfig

    # The releases' parts at tiny sizes: a SigLIP-like tower, a 1-layer perceiver (theirs: 3) with grouped key/value
    # heads, a Mistral text model.
    perceiver = dict(hidden_size=sizes.hidden, resampler_n_latents=IDEFICS2_LATENTS, resampler_depth=1,
                     resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1)
    return AutoConfig.for_model(
        "idefics2",
        text_config=dict(_text_config(tokenizer, sizes, "</s>"), model_type="mistral"),
        vision_config=_vision_encoder(sizes, TINY_IMAGE_SIZE, IDEFICS2_PATCH),
        perceiver_config=perceiver,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )


def _idefics2_processor_config(config) -> dict:
    # Idefics2Processor's image_seq_len is the perceiver's latents (the releases' 64).
    return {"image_seq_len": int(config.perceiver_config.resampler_n_latents), "processor_class": "Idefics2Processor"}


# ---------------------------------------------------------------- Ovis2
OVIS2_PATCH = 7  # 4 x 4 patches per 28 px tile, merged 2 x 2 (the releases' hidden_stride): 4 <IMG_ATOM> per tile
OVIS2_SYSTEM = "You are a helpful assistant."  # the released template's system turn (convert_ovis2_weights_to_hf.py)
OVIS2_INDICATORS = ("<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")  # the releases' id order


def _ovis2_image_processor(image_size: int):
    from transformers import Ovis2ImageProcessorPil

    # Tiling on (the releases' crop_to_patches), at most 3 tiles (+ the thumbnail) to stay tiny.
    return Ovis2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                  max_patches=3)


def _ovis2_config(tokenizer, sizes: TinySizes):
    from transformers import AutoConfig

    vision = dict(_vision_encoder(sizes, TINY_IMAGE_SIZE, OVIS2_PATCH), hidden_stride=2, vocab_size=64)
    return AutoConfig.for_model(
        "ovis2",
        text_config=_text_config(tokenizer, sizes, "<|im_end|>"),
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_ATOM>"),
        visual_indicator_token_ids=[tokenizer.convert_tokens_to_ids(t) for t in OVIS2_INDICATORS],
        vocab_size=len(tokenizer),  # the LM head's and the visual embedding table's widths (top-level in Ovis2)
        hidden_size=sizes.hidden,
        tie_word_embeddings=False,
    )


def _ovis2_processor_config(config) -> dict:
    from sc_tune.adapters.ovis2 import tile_tokens

    return {"image_seq_length": tile_tokens(config.vision_config), "processor_class": "Ovis2Processor"}


# ---------------------------------------------------------------- SmolVLM
SMOLVLM_TILE_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2))


def _smolvlm_image_processor(class_name: str):
    def build(image_size: int):
        import transformers

        # Splitting on (the checkpoints' default): at most a 2x2 grid of crops plus the global view.
        return getattr(transformers, class_name)(
            size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size}, do_image_splitting=True
        )

    return build


def _smolvlm_config(model_type: str):
    return lambda tokenizer, sizes: _smolvlm_like_config(model_type, tokenizer, sizes)


def _smolvlm_like_config(model_type: str, tokenizer, sizes: TinySizes):
    """SmolVLM and SmolVLM v1 (the Idefics3 architecture): the same layout, a pixel-shuffle connector."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type,
        text_config=_text_config(tokenizer, sizes, "<end_of_utterance>"),
        vision_config=_vision_encoder(sizes, TINY_IMAGE_SIZE, 14),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        tie_word_embeddings=False,
    )


def _smolvlm_template() -> str:
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    return DEFAULT_CHAT_TEMPLATE  # transformers' own SmolVLM template


# ---------------------------------------------------------------- MiniCPM-V 4.6 / 4.7
# A view's side before rounding to 56 px (4 x 4 patches of 14 px: one feature after the two 2 x 2 merges); at 42 the
# tests' odd-sized images get different slice grids and feature counts.
MINICPMV_SCALE_RESOLUTION = 42
# The named special tokens the family's processor reads off the tokenizer (the released tokenizer_config.json's).
MINICPMV_NAMED_TOKENS = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
    "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>",
}


def _minicpmv_image_processor(image_size: int):
    from transformers import MiniCPMV4_6ImageProcessorPil

    # Slicing on, at most 9 slices (the processor's defaults): odd-sized images get different grids and token counts.
    return MiniCPMV4_6ImageProcessorPil(scale_resolution=MINICPMV_SCALE_RESOLUTION, patch_size=14)


def _minicpmv_config(model_type: str):
    def build(tokenizer, sizes: TinySizes):
        from transformers import AutoConfig

        ids = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}
        if model_type == "minicpmv4_7":  # the canvas M-RoPE's markers, from the tokenizer as the release's converter
            ids.update(image_start_id="<image>", image_end_id="</image>", slice_start_id="<slice>",
                       slice_end_id="</slice>")
        ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in ids.items()}
        if model_type == "minicpmv4_7":
            (ids["newline_id"],) = tokenizer("\n", add_special_tokens=False)["input_ids"]
        # The window merger follows the first encoder layer (insert_layer_id 0 of 2); a 112 px position grid.
        vision = dict(_vision_encoder(sizes, 112, 14), hidden_act="gelu_pytorch_tanh")
        return AutoConfig.for_model(model_type, text_config=_qwen3_5_text(tokenizer, sizes), vision_config=vision,
                                    insert_layer_id=0, tie_word_embeddings=False, **ids)

    return build


@dataclass(frozen=True)
class TemplateTinySpec:
    spec: TinySpec
    chat_template: Callable[[], str]  # lazy: SmolVLM's comes from transformers
    finish: Callable[[object], None] | None = None  # adjusts the random model after building
    # Written as the released checkpoints keep them: the template only in the processor's legacy
    # chat_template.json, and the processor's own settings in processor_config.json (from the model config).
    legacy_template: bool = False
    processor_config: Callable[[object], dict] | None = None
    # The template only in processor_config.json's chat_template (idefics2-8b-chatty's release), in no file of its own.
    template_in_processor_config: bool = False
    # Whether ``spec.config`` takes ``image_size`` (the vision tower's input): only those families build at another
    # size than TINY_IMAGE_SIZE (the benchmark's warm starts); the others refuse one.
    sized_vision: bool = False


def _smolvlm_processor_config(model_type: str) -> Callable[[object], dict]:
    """SmolVLM's released processor_config.json: ``image_seq_len`` (features per crop after the pixel shuffle;
    81 for SmolVLM-Instruct), which AutoProcessor otherwise defaults to 169."""

    def build(config) -> dict:
        vision = config.vision_config
        seq_len = int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor**2)
        processor = "Idefics3Processor" if model_type == "idefics3" else "SmolVLMProcessor"
        return {"image_seq_len": seq_len, "processor_class": processor}

    return build


def _spec(special_tokens, eos_token, image_processor, config, bos_token=None, named_tokens=None) -> TinySpec:
    return TinySpec(
        special_tokens=tuple(special_tokens),
        eos_token=eos_token,
        template_text=TEMPLATE_TEXT,
        image_processor=image_processor,
        config=config,
        bos_token=bos_token,
        named_tokens=tuple((named_tokens or {}).items()),
    )


# The released processor_config.json of the families whose processor reads its image-token count there (from the
# model config, as the releases' values are: Gemma 3's 256 = mm_tokens_per_image; InternVL's 256 = its tile's
# features; LLaVA-OneVision's 729 = 27 x 27 patches of the base view).
def _gemma3_processor_config(config) -> dict:
    return {"image_seq_length": int(config.mm_tokens_per_image), "processor_class": "Gemma3Processor"}


def _gemma4_processor_config(config) -> dict:
    # The most soft tokens an image may take (the processor counts each image's own from the image processor).
    return {"image_seq_length": GEMMA4_MAX_SOFT_TOKENS, "processor_class": "Gemma4Processor"}


def _internvl_processor_config(config) -> dict:
    return {"image_seq_length": int(config.image_seq_length), "processor_class": "InternVLProcessor"}


def _llava_onevision_processor_config(config) -> dict:
    from sc_tune.adapters.llava_onevision import extra_tower_features

    vision = config.vision_config  # a view's features: the patches and the tower's CLS, if any (as the released files)
    return {"num_image_tokens": (vision.image_size // vision.patch_size) ** 2 + extra_tower_features(config),
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "vision_aspect_ratio": config.vision_aspect_ratio, "processor_class": "LlavaOnevisionProcessor"}


CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GEMMA = ("<pad>", "<eos>", "<bos>")
TINY_TEMPLATE_SPECS: dict[str, TemplateTinySpec] = {
    "internvl": TemplateTinySpec(
        _spec(
            (*CHATML, "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<ref>", "</ref>", "<box>", "</box>"),
            "<|im_end|>",
            _internvl_image_processor,
            _internvl_config,
            named_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
        ),
        lambda: _chatml_template("<IMG_CONTEXT>\\n"),
        sized_vision=True,
        processor_config=_internvl_processor_config,
    ),
    "gemma3": TemplateTinySpec(
        _spec(
            (*GEMMA, "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"),
            "<end_of_turn>",
            _gemma3_image_processor,
            _gemma3_config,
            bos_token="<bos>",
            named_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                          "image_token": "<image_soft_token>"},
        ),
        lambda: _gemma_template("<start_of_turn>", "<end_of_turn>", "<start_of_image>"),
        _gemma3_random_projector,
        processor_config=_gemma3_processor_config,
    ),
    "gemma4": TemplateTinySpec(
        _spec(
            (*GEMMA, "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|video|>")
            + ("<|audio>", "<audio|>", "<|audio|>", "<|channel>", "<channel|>"),
            "<turn|>",
            _gemma4_image_processor,
            _gemma4_config,
            bos_token="<bos>",
            named_tokens={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                          "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"},
        ),
        lambda: _gemma_template("<|turn>", "<turn|>", "<|image|>", "<|channel>thought\\n<channel|>",
                                system_as_written=True),
        processor_config=_gemma4_processor_config,
    ),
    "llava_onevision": TemplateTinySpec(
        _spec((*CHATML, "<image>", "<video>"), "<|im_end|>", _llava_onevision_image_processor, _llava_onevision_config,
              named_tokens={"image_token": "<image>", "video_token": "<video>"}),
        lambda: _chatml_template("<image>\\n"),
        processor_config=_llava_onevision_processor_config,
    ),
    # The Llama tokenizer prepends <s> (its template writes none), as the releases' do.
    "llava": TemplateTinySpec(
        replace(_spec((*LLAMA, "<image>"), "</s>", _llava_image_processor, _llava_config("llava", "</s>"),
                      bos_token="<s>", named_tokens={"image_token": "<image>"}),
                template_text=TEMPLATE_TEXT + "USER: ASSISTANT:", prepends_bos=True),
        lambda: LLAVA_TEMPLATE,
        legacy_template=True,  # the llava-hf releases keep it in the processor's chat_template.json
        processor_config=_llava_processor_config("LlavaProcessor"),
    ),
    # llava-v1.6-mistral-7b-hf's template (it writes its own turn end, "</s>", unlike LLaVA-1.5's) and tokenizer (it
    # prepends <s>).
    "llava_next": TemplateTinySpec(
        replace(_spec((*LLAMA, "<image>"), "</s>", _llava_next_image_processor, _llava_config("llava_next", "</s>"),
                      bos_token="<s>", named_tokens={"image_token": "<image>"}),
                template_text=TEMPLATE_TEXT + "[INST] [/INST]", prepends_bos=True),
        lambda: LLAVA_NEXT_MISTRAL_TEMPLATE,
        legacy_template=True,
        processor_config=_llava_processor_config("LlavaNextProcessor"),
    ),
    # Its tokenizer prepends <s> too, but the template writes it: the processor then adds no second one.
    "mistral3": TemplateTinySpec(
        replace(_spec(MISTRAL3_TOKENS, "</s>", _mistral3_image_processor, _mistral3_config, bos_token="<s>"),
                template_text=TEMPLATE_TEXT + "[SYSTEM_PROMPT][/SYSTEM_PROMPT][INST][/INST] "
                + MISTRAL3_DEFAULT_SYSTEM.replace('\\n', '\n').replace('\\"', '"'), prepends_bos=True),
        lambda: MISTRAL3_TEMPLATE,
        processor_config=_mistral3_processor_config,
    ),
    # Its tokenizer prepends <BOS_TOKEN>; the template writes none. "<image>" is plain text its processor expands.
    "aya_vision": TemplateTinySpec(
        replace(_spec(AYA_VISION_TOKENS, "<|END_OF_TURN_TOKEN|>", _aya_vision_image_processor, _aya_vision_config,
                      bos_token="<BOS_TOKEN>"),
                template_text=TEMPLATE_TEXT + "TILE_GLOBAL TILE_1 TILE_2 TILE_3", prepends_bos=True),
        lambda: AYA_VISION_TEMPLATE,
        processor_config=_aya_vision_processor_config,
    ),
    # LLaVA-NeXT's image processor and anyres grids; Granite's tokenizer prepends no BOS.
    "granite4_vision": TemplateTinySpec(
        replace(_spec(GRANITE4_VISION_TOKENS, "<|end_of_text|>", _llava_next_image_processor, _granite4_vision_config,
                      named_tokens={"image_token": "<image>"}),
                template_text=TEMPLATE_TEXT + "user assistant"),
        lambda: GRANITE4_VISION_TEMPLATE,
        processor_config=_llava_processor_config("Granite4VisionProcessor", "downsample_rate"),
    ),
    # Its tokenizer prepends <|begin_of_text|>, and the template writes it: the processor then adds no second one.
    "mllama": TemplateTinySpec(
        replace(_spec(MLLAMA_TOKENS, "<|eot_id|>", _mllama_image_processor, _mllama_config,
                      bos_token="<|begin_of_text|>"),
                template_text=TEMPLATE_TEXT + "user assistant", prepends_bos=True),
        lambda: MLLAMA_TEMPLATE,
    ),
    # Its tokenizer prepends <s> (the template writes none); its EOS </s> also ends a turn (the releases'
    # generation_config.json: eos_token_id [</s>, <end_of_utterance>]).
    "idefics2": TemplateTinySpec(
        replace(_spec(IDEFICS2_TOKENS, "</s>", _idefics2_image_processor, _idefics2_config, bos_token="<s>"),
                template_text=TEMPLATE_TEXT + "User: Assistant:", prepends_bos=True),
        lambda: IDEFICS2_TEMPLATE,
        processor_config=_idefics2_processor_config,
        template_in_processor_config=True,
    ),
    "ovis2": TemplateTinySpec(
        replace(_spec((*CHATML, "<IMG_ATOM>", *OVIS2_INDICATORS), "<|im_end|>", _ovis2_image_processor, _ovis2_config),
                template_text=TEMPLATE_TEXT + f"system\n{OVIS2_SYSTEM}"),
        lambda: _chatml_template("<image>\\n", system=OVIS2_SYSTEM),
        legacy_template=True,  # the releases keep it in the processor's chat_template.json
        processor_config=_ovis2_processor_config,
    ),
    **{
        model_type: TemplateTinySpec(
            _spec(
                (
                    *CHATML,
                    "<end_of_utterance>",
                    "<image>",
                    "<fake_token_around_image>",
                    "<global-img>",
                    *SMOLVLM_TILE_TOKENS,
                ),
                "<end_of_utterance>",
                _smolvlm_image_processor(processor),
                _smolvlm_config(model_type),
            ),
            _smolvlm_template,
            legacy_template=model_type == "idefics3",  # SmolVLM v1 releases keep it in chat_template.json only
            processor_config=_smolvlm_processor_config(model_type),
        )
        for model_type, processor in (("smolvlm", "SmolVLMImageProcessorPil"), ("idefics3", "Idefics3ImageProcessorPil"))
    },
    # The released folders have no processor_config.json: AutoProcessor finds the processor by model_type.
    **{
        model_type: TemplateTinySpec(
            TinySpec(
                special_tokens=(*CHATML, *MINICPMV_NAMED_TOKENS.values(), "<think>", "</think>"),
                eos_token="<|im_end|>",
                template_text=TEMPLATE_TEXT,
                image_processor=_minicpmv_image_processor,
                config=_minicpmv_config(model_type),
                named_tokens=tuple(MINICPMV_NAMED_TOKENS.items()),
                reinit=reference_gated_deltanet_decay,  # its text model is Qwen3.5's
            ),
            lambda: _chatml_template("<|image_pad|>\\n", answer_open=QWEN3_5_THINKING_SWITCH),
        )
        for model_type in ("minicpmv4_6", "minicpmv4_7")
    },
}


def build_tiny_template_family(model_type: str, image_size: int = TINY_IMAGE_SIZE, **kwargs):
    """(model, tokenizer, image_processor) of a tiny ``model_type`` model, its chat template on the tokenizer.

    ``image_size``: the vision tower's input (an InternVL tile), for the families whose builder takes one."""
    entry = TINY_TEMPLATE_SPECS[model_type]
    spec = entry.spec
    if entry.sized_vision:
        spec = replace(spec, config=partial(spec.config, image_size=image_size))
    elif image_size != TINY_IMAGE_SIZE:
        raise ValueError(f"a tiny {model_type} is built at image_size {TINY_IMAGE_SIZE} only, not {image_size}")
    model, tokenizer, image_processor = build_tiny(spec, image_size=image_size, **kwargs)
    tokenizer.chat_template = entry.chat_template()
    if entry.finish is not None:
        entry.finish(model)
    return model, tokenizer, image_processor


def save_tiny_template_family(model_type: str, directory: str, **kwargs) -> str:
    """Write a tiny ``model_type`` checkpoint folder that ``finetune.py`` and ``evaluate.py`` load."""
    from sc_tune.jsonio import write_json

    entry = TINY_TEMPLATE_SPECS[model_type]
    model, tokenizer, image_processor = build_tiny_template_family(model_type, **kwargs)
    template = tokenizer.chat_template
    if entry.legacy_template or entry.template_in_processor_config:
        tokenizer.chat_template = None
    write_folder(directory, model, tokenizer, image_processor)
    if entry.legacy_template:
        write_json(os.path.join(directory, "chat_template.json"), {"chat_template": template})
    if entry.processor_config is not None:
        processor = entry.processor_config(model.config)
        if entry.template_in_processor_config:
            processor["chat_template"] = template
        write_json(os.path.join(directory, "processor_config.json"), processor)
    return str(directory)
