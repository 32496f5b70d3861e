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
    """Factory: a tiny random checkpoint folder of a ``model_type``, built once per session (``sc_tune.tiny``)."""
    from sc_tune.tiny import save_tiny

    built = {}

    def make(model_type: str) -> str:
        if model_type not in built:
            directory = str(tmp_path_factory.mktemp(f"tiny_{model_type}"))
            built[model_type] = save_tiny(directory, model_type)
        return built[model_type]

    return make
