import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE_DATA = os.path.join(ROOT, "data", "sample", "annotations.json")
SAMPLE_IMAGES = os.path.join(ROOT, "data", "sample")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: a tiny random checkpoint folder of a family, built once per session."""
    from sc_tune.models.qwen_vl.tiny import save_tiny_qwen_vl
    from sc_tune.tiny import save_tiny

    built = {}

    def make(family: str = "qwen2_vl") -> str:
        if family not in built:
            directory = tmp_path_factory.mktemp(f"tiny_{family}")
            built[family] = save_tiny_qwen_vl(str(directory)) if family == "qwen" else save_tiny(directory, family)
        return built[family]

    return make
