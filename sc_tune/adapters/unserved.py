"""Why SC-Tune serves no family for a ``model_type`` that transformers implements: one sentence each.

The registry's refusal (``registry.family_for``) adds the sentence, so a user pointing ``finetune.py``,
``evaluate.py`` or ``python -m sc_tune.families budget`` at such a checkpoint learns why, not only that it is
refused. The survey behind each sentence, with its sources, is in docs/families.md, "Families transformers
implements that SC-Tune does not serve" (transformers 5.24: ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` and
the audio/omni additions of ``MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES``; 5.x has no vision-to-seq mapping). Keep the
two in step: tests/test_unserved.py checks that the page names every model type listed here.
"""

from __future__ import annotations

from dataclasses import dataclass

SURVEY = 'docs/families.md, "Families transformers implements that SC-Tune does not serve"'


@dataclass(frozen=True)
class Unserved:
    name: str  # the family as its vendor names it
    model_types: tuple[str, ...]
    reason: str  # one sentence, no final full stop: it is quoted inside the refusal


# Reasons several families share (one wording each).
# "Known here": for some the vendor's documentation was searched and holds none, for others it was not searched
# (docs/families.md says which); the refusal claims no more than that.
NO_GROUNDING_FORM = ("no documented grounding answer form is known here and no adapter is written; serving it takes an "
                     "adapter on the generic box text with a grounding warm start, as for LLaVA-OneVision")
NO_GROUNDING_FORM_TORCHVISION = ("no documented grounding answer form is known here and its image processor exists "
                                 "only as a torchvision backend (no SC-Tune dependency); no adapter is written")
AUDIO_ONLY = "audio in, text out: SC-Tune tunes image grounding"
OCR_ONLY = "it reads a page's text and layout; it is not asked to ground a phrase"

UNSERVED: tuple[Unserved, ...] = (
    # Families that write a location another way than SC-Tune's codecs read.
    Unserved("Molmo2", ("molmo2",), "it answers a grounding request with points, not boxes"),
    Unserved("PaliGemma / PaliGemma 2", ("paligemma",),
             "it is not a chat model and answers task prefixes ('detect ...') with <locNNNN> location tokens, "
             "for which SC-Tune has no codec and no prefix-prompt adapter"),
    Unserved("Florence-2", ("florence2",),
             "it is an encoder-decoder task-prompt model (no chat template) that writes boxes as <loc_N> tokens, for "
             "which SC-Tune has no codec and no encoder-decoder adapter"),
    Unserved("Kosmos-2", ("kosmos-2",),
             "it is not a chat model and grounds a phrase as a pair of <patch_index_NNNN> tokens on a 32 x 32 grid, "
             "for which SC-Tune has no codec"),
    Unserved("Fuyu", ("fuyu",),
             "it is a base model with no chat template whose processor writes y-first boxes "
             "(<box>y1, x1, y2, x2</box>) on a rescaled pixel frame; no adapter is written"),
    # An image processor SC-Tune cannot build.
    Unserved("Kimi K2.5", ("kimi_k25",),
             "its image processor exists only as a torchvision backend (no SC-Tune dependency) and no grounding answer "
             "form is documented"),
    Unserved("Command A Vision", ("cohere2_vision",),
             "its image processor exists only as a torchvision backend (no SC-Tune dependency), so Aya Vision's "
             "adapter does not cover it, and no grounding answer form is known here"),
    Unserved("Perception LM", ("perception_lm",),
             "it answers with zero-padded per-mille boxes such as [040,482,112,576] (Meta's perception_models "
             "grounding notebook), for which SC-Tune has no adapter yet, and its image processor exists only as a "
             "torchvision backend"),
    # Documented grounding, undocumented answer form.
    Unserved("Llama 4", ("llama4",),
             "Meta describes image grounding but documents no answer form, so SC-Tune has no codec to read it"),
    Unserved("ERNIE-4.5-VL", ("ernie4_5_vl_moe",),
             "Baidu describes visual grounding but documents no answer form, so SC-Tune has no codec to read it"),
    Unserved("GLM-5 next / GLM-GA", ("glm5_next", "glmga"),
             "GLM-V lines whose box convention no release documents here; serving them is a GLM-V registration "
             "once their answer form is verified"),
    # Chat VLMs with no documented grounding.
    Unserved("LLaVA-NeXT-Video / ViP-LLaVA / Video-LLaVA", ("llava_next_video", "vipllava", "video_llava"),
             NO_GROUNDING_FORM),
    Unserved("Mistral Large 4", ("mistral_large4",),
             "a Pixtral tower on a mixture-of-experts text model with latent (MLA) attention and a sparse-attention "
             "indexer, which Mistral 3's adapter does not cover; no documented grounding answer form is known here"),
    Unserved("DeepSeek-VL", ("deepseek_vl", "deepseek_vl_hybrid"), NO_GROUNDING_FORM),
    Unserved("Idefics (v1)", ("idefics",),
             "a Flamingo-style model (its images read through gated cross-attention layers), not Idefics2's "
             "architecture, with no documented grounding answer form known here and no adapter"),
    Unserved("Aria", ("aria",), NO_GROUNDING_FORM),
    Unserved("Chameleon / Emu3 / Janus", ("chameleon", "emu3", "janus"), NO_GROUNDING_FORM),
    Unserved("FastVLM", ("fast_vlm",), NO_GROUNDING_FORM),
    Unserved("LFM2-VL / LFM3-VL", ("lfm2_vl", "lfm3_vl"), NO_GROUNDING_FORM),
    Unserved("Hunyuan (Hy) 4 VL", ("hy_v4_vl",), NO_GROUNDING_FORM),
    Unserved("Step 3.7", ("step3p7",), NO_GROUNDING_FORM_TORCHVISION),
    Unserved("MiniMax-M3", ("minimax_m3_vl",), NO_GROUNDING_FORM_TORCHVISION),
    Unserved("Muse Glimmer", ("muse_glimmer",), NO_GROUNDING_FORM_TORCHVISION),
    Unserved("Inkling 2", ("inkling2", "inkling2_loop"), NO_GROUNDING_FORM_TORCHVISION),
    Unserved("Cosmos 3", ("cosmos3_edge", "cosmos3_omni"),
             "NVIDIA documents no Cosmos 3 grounding answer form here (Cosmos Reason 2's prompt asks for a json box "
             "without showing one), and no adapter is written"),
    # Omni models (audio + vision).
    Unserved("Qwen2.5-Omni / Qwen3-Omni",
             ("qwen2_5_omni", "qwen2_5_omni_thinker", "qwen3_omni_moe", "qwen3_omni_moe_thinker"),
             "omni models (audio + vision) that document no grounding answer form; an adapter would have to drive "
             "the thinker's text output and leave the audio tower and talker out"),
    Unserved("Phi-4-multimodal", ("phi4_multimodal",),
             "an omni model (audio + vision) with no documented grounding answer form, and transformers maps it "
             "only as a multimodal LM, not as AutoModelForImageTextToText"),
    Unserved("Gemma 3n / Gemma 4 unified", ("gemma3n", "gemma4_unified"),
             "omni architectures (audio + vision) apart from Gemma 3 / Gemma 4, with no documented grounding answer "
             "form of their own and no adapter"),
    Unserved("Nemotron Nano Omni / Inkling / dots3 note / Apertus 1.5 / Muse Spark",
             ("nemotron_h_omni", "inkling_mm_model", "dots3_note", "apertus1p5", "muse_spark"),
             "omni models (audio + vision) with no documented grounding answer form and no adapter"),
    # Not left-to-right chat decoders.
    Unserved("DiffusionGemma", ("diffusion_gemma",),
             "it decodes by block diffusion, while SC-Tune's sampling, log-probabilities and PPO assume left-to-right "
             "decoding"),
    Unserved("T5Gemma 2", ("t5gemma2",),
             "an encoder-decoder with no documented grounding answer form; SC-Tune's batches and caches are "
             "decoder-only"),
    Unserved("BLIP / BLIP-2 / InstructBLIP / GIT / Pix2Struct",
             ("blip", "blip-2", "instructblip", "instructblipvideo", "git", "pix2struct"),
             "captioning and question-answering models without a chat template that write no boxes"),
    # The survey's "Excluded" line: not image-to-text grounding models at all.
    Unserved("an OCR / document model",
             ("deepseek_ocr2", "glm_ocr", "got_ocr2", "pp_chart2table", "pp_formulanet", "unlimited_ocr",
              "lighton_ocr", "minicpm_ocr", "qianfan_ocr", "paddleocr_vl", "hunyuan_vl", "granite_docling",
              "kosmos-2.5", "udop"), OCR_ONLY),
    Unserved("an audio model",
             ("fun_asr_nano", "glmasr", "granite_speech", "granite_speech_plus", "kyutai_speech_to_text",
              "moss_transcribe_diarize", "nemo_speechlm", "omniasr", "qwen2_audio", "qwen3_asr", "vibevoice_asr",
              "voxtral", "voxtral_realtime"), AUDIO_ONLY),
    Unserved("Mistral Small 4", ("mistral4",),
             "transformers 5.24 maps it to Mistral4ForCausalLM, which has no vision tower: it cannot take an image"),
    Unserved("ShieldGemma 2", ("shieldgemma2",), "an image-safety classifier (it answers a policy question), not a "
             "grounding model"),
    Unserved("Evolla", ("evolla",), "a protein-to-text model: it takes no image"),
    Unserved("pi0", ("pi0",), "a vision-language-action policy: it writes robot actions, not text"),
    Unserved("VisionEncoderDecoder", ("vision-encoder-decoder",),
             "a generic composite of any vision encoder and text decoder (TrOCR, Donut, ...), not one family"),
)

_BY_MODEL_TYPE = {model_type: entry for entry in UNSERVED for model_type in entry.model_types}


def refusal(model_type: str) -> str:
    """Why no family serves ``model_type``, as the registry's refusal says it: ``" (Molmo2): it answers ...
    (see docs/families.md, ...)"``, or ``""`` where the survey does not cover it."""
    entry = _BY_MODEL_TYPE.get(model_type)
    return "" if entry is None else f" ({entry.name}): {entry.reason} (see {SURVEY})"
