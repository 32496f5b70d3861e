"""Native Qwen-VL / Qwen-VL-Chat (no trust_remote_code): config, model, tokenizer, image processor, export."""

from sc_tune.models.qwen_vl.configuration import QWenConfig
from sc_tune.models.qwen_vl.export import finalize_export
from sc_tune.models.qwen_vl.image_processing import QWenVLImageProcessor
from sc_tune.models.qwen_vl.modeling import QWenLMHeadModel, QWenModel
from sc_tune.models.qwen_vl.tokenization import QWenTokenizer

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenTokenizer", "QWenVLImageProcessor", "finalize_export"]
