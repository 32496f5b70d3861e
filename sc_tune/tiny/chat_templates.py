"""Stand-in chat templates of the tiny Qwen2-VL ... Qwen3.5 and GLM-V models (``sc_tune.tiny.configs``).

A tiny model's tokenizer is built in code, so it carries no released template; these reproduce the released
templates' text for the turns SC-Tune renders (one user turn: an image, then text; the opened answer), and
nothing else (no tools, no multi-turn reasoning history). ``tests/test_real_checkpoints.py`` renders the
describer and locator prompts with each stand-in and with the released template, where the released file is at
hand, and asserts the strings are identical; that is what catches a stand-in that drifted.

- Qwen2-VL, Qwen2.5-VL: ChatML with the default system turn ("You are a helpful assistant.") the released
  template inserts when the conversation has none;
- Qwen3-VL (Instruct): ChatML, no default system turn;
- Qwen3.5: as Qwen3-VL, and the answer opens with ``<think>\\n\\n</think>\\n\\n`` when ``enable_thinking`` is false
  (``<think>\\n`` otherwise): its reasoning switch;
- GLM-4.5V / 4.6V (hybrid): ``[gMASK]<sop><|user|>\\n`` ... ``<|assistant|>\\n``, a system turn as
  ``<|system|>\\n`` and its text; with ``enable_thinking`` false the user turn ends in ``/nothink`` and the answer
  opens with ``<think></think>\\n``;
- EXAONE 4.5: vLLM's example prompt (vllm-project/vllm ``examples/offline_inference/vision_language.py``,
  ``run_exaone4_5``): ``<|system|>\\nYou are a helpful assistant.<|endofturn|>\\n<|user|>\\n<vision><|image_pad|></vision>``
  + text + ``<|endofturn|>\\n<|assistant|>\\n``, the default system turn written where the conversation has none.
  The released template was not at hand: its ``enable_thinking=False`` opener (EXAONE 4.5 thinks by default) is not
  reproduced;
- HyperCLOVA X SEED Vision v2: ChatML turns (vLLM's HyperCLOVA X reasoning-parser test closes a turn with
  ``<|im_end|>\\n<|im_start|>assistant``), the image as vLLM's ``hyperclovax_vision_v2.py`` writes it
  (``<|image_start|><|IMAGE_PAD|><|image_end|>``), and the empty ``<think>\\n\\n</think>\\n\\n`` block the generation
  prompt writes by default (transformers' model doc; its trailing blank line assumed). The released template was not
  at hand: no default system turn, no tools.
- VideoLLaMA3: the turns of the release's ``DEFAULT_CHAT_TEMPLATE`` (DAMO-NLP-SG/VideoLLaMA3
  ``videollama3/model/processor.py``): ChatML, no default system turn, an image written as its token and a newline
  before the text; the original's ``<image>`` is the converted processor's ``<|image_pad|>``. The converted
  checkpoints' own template was not at hand: no video frames, timestamps or stream turns.
"""

from __future__ import annotations

_QWEN_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
)


def _chatml(default_system: bool, generation_prompt: str) -> str:
    system = (
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        if default_system
        else ""
    )
    return (
        "{% for message in messages %}" + system + "<|im_start|>{{ message['role'] }}\n" + _QWEN_CONTENT
        + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n" + generation_prompt
        + "{% endif %}"
    )


QWEN2_VL_TEMPLATE = _chatml(default_system=True, generation_prompt="")
QWEN3_VL_TEMPLATE = _chatml(default_system=False, generation_prompt="")
# Qwen3.5's reasoning switch, written after the opened answer (MiniCPM-V 4.6 / 4.7 keep it).
QWEN3_5_THINKING_SWITCH = (
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
)
QWEN3_5_TEMPLATE = _chatml(default_system=False, generation_prompt=QWEN3_5_THINKING_SWITCH)
# Qwen3-VL-*-Thinking: same model_type as Instruct; every answer opens a reasoning block, switch or not.
QWEN3_VL_THINKING_TEMPLATE = _chatml(default_system=False, generation_prompt="<think>\n")

GLM_HYBRID_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}{% if message['role'] == 'user' %}<|user|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}/nothink{% endif %}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}"
    "{% elif message['role'] == 'system' %}<|system|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>\n{% endif %}{% endif %}"
)

# EXAONE 4.5 (see the module docstring: vLLM's example prompt).
EXAONE4_5_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|system|>\nYou are a helpful assistant.<|endofturn|>\n"
    "{% endif %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<vision><|image_pad|></vision>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|endofturn|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# HyperCLOVA X SEED Vision v2 (see the module docstring): thinking off unless ``thinking`` is passed.
HYPERCLOVAX_VISION_V2_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image_start|><|IMAGE_PAD|><|image_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if thinking is defined and thinking %}<think>\n{% else %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# VideoLLaMA3 (see the module docstring): the image token on its own line before the text.
VIDEO_LLAMA_3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image_pad|>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ---------------------------------------------------------------- North (cohere_compass)
# The released template was not at hand. Stand-in: Cohere's Command turn tokens as third-party runtimes write the
# Command A prompt (e.g. an Ollama template converter's "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{ .Prompt }}
# <|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>{{ .Response }}<|END_RESPONSE|>
# <|END_OF_TURN_TOKEN|>"), the template writing <BOS_TOKEN> first, and the image block of transformers' CohereCompass
# processor tests (<|VISION_START|><|IMAGE_PAD|><|VISION_END|>), before the text. An answer is closed with
# <|END_RESPONSE|>, then <|END_OF_TURN_TOKEN|> (the Cohere tokenizers' EOS).
NORTH_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|START_OF_TURN_TOKEN|>' }}"
    "{% if message['role'] == 'user' %}{{ '<|USER_TOKEN|>' }}{% elif message['role'] == 'assistant' %}"
    "{{ '<|CHATBOT_TOKEN|><|START_RESPONSE|>' }}{% else %}{{ '<|SYSTEM_TOKEN|>' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|VISION_START|><|IMAGE_PAD|><|VISION_END|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|END_RESPONSE|>' }}{% endif %}{{ '<|END_OF_TURN_TOKEN|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>' }}"
    "{% endif %}"
)
