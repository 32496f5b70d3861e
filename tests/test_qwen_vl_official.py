"""Equivalence with the official Qwen-VL-Chat remote code (runs only when QWEN_VL_REMOTE_CODE is set).

QWEN_VL_REMOTE_CODE must name a folder holding the official files (configuration_qwen.py, modeling_qwen.py,
qwen_generation_utils.py, tokenization_qwen.py, visual.py; qwen.tiktoken optional). They are copied to a
temp folder and patched there for transformers 5 (docs/qwen_vl_remote_code.md: P1-P7); nothing of them enters
the repository. The official code imports torchvision and matplotlib at import time; small stand-ins are
put on sys.path for this module only (torchvision's after transformers cached that it is absent).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap

import pytest
import torch
from PIL import Image

REMOTE = os.environ.get("QWEN_VL_REMOTE_CODE")
pytestmark = pytest.mark.skipif(not REMOTE, reason="QWEN_VL_REMOTE_CODE is not set")

CODE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py", "tokenization_qwen.py",
              "visual.py")

TORCHVISION_STANDIN = '''
import numpy as np
import torch
from PIL import Image


class InterpolationMode:
    BICUBIC = "bicubic"


class Compose:
    def __init__(self, steps):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


class Resize:
    def __init__(self, size, interpolation=None):
        self.height, self.width = size

    def __call__(self, image):
        return image.resize((self.width, self.height), Image.BICUBIC)


class ToTensor:
    def __call__(self, image):
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, x):
        return (x - self.mean) / self.std
'''
MATPLOTLIB_STANDIN = {  # only box drawing uses matplotlib; these names satisfy the imports
    "matplotlib/__init__.py": "",
    "matplotlib/colors.py": "TABLEAU_COLORS = {'tab:blue': '#1f77b4'}\n",
    "matplotlib/font_manager.py": "class FontProperties:\n    pass\n",
    "matplotlib/figure.py": "class Figure:\n    pass\n",
    "matplotlib/backends/__init__.py": "",
    "matplotlib/backends/backend_agg.py": "class FigureCanvasAgg:\n    pass\n",
}


def _patch(path: str, old: str, new: str, required: bool = True) -> None:
    text = open(path).read()
    if old not in text:
        if required:
            raise AssertionError(f"{path}: patch anchor not found: {old[:60]!r}")
        return
    open(path, "w").write(text.replace(old, new))


def patch_remote_code(folder: str) -> None:
    modeling = os.path.join(folder, "modeling_qwen.py")
    # P1: transformers' check_imports skips imports inside try blocks (the package is broken on 5.x).
    _patch(modeling, "        from transformers_stream_generator.main import NewGenerationMixin, StreamGenerationConfig\n",
           "        try:\n            from transformers_stream_generator.main import NewGenerationMixin, "
           "StreamGenerationConfig\n        except ImportError:\n            raise\n")
    # P3: PreTrainedModel no longer brings generate().
    _patch(modeling, "class QWenLMHeadModel(QWenPreTrainedModel):",
           "from transformers import GenerationMixin\n\n\nclass QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):")
    # P4: get_head_mask is gone.
    _patch(modeling, "head_mask = self.get_head_mask(head_mask, self.config.num_hidden_layers)",
           "head_mask = [None] * self.config.num_hidden_layers")
    # P5: plain tensors made in __init__ would stay on the meta device.
    _patch(modeling, "torch.arange(0, dim, 2).float() / dim))", "torch.arange(0, dim, 2, device='cpu').float() / dim))")
    _patch(modeling, "torch.tensor(logn_list)[None, :, None, None]", "torch.tensor(logn_list, device='cpu')[None, :, None, None]")
    # P6: keep the legacy tuple cache where generate would build a DynamicCache (4.57).
    _patch(modeling, "    def get_output_embeddings(self):\n        return self.lm_head",
           "    @classmethod\n    def _supports_default_dynamic_cache(cls):\n        return False\n\n"
           "    def get_output_embeddings(self):\n        return self.lm_head")
    # P7 (found here, 5.x): the official _init_weights re-draws every `c_proj.weight` through `.data`, which
    # bypasses transformers 5's "already loaded" flag, so from_pretrained would re-randomise attn.c_proj.
    _patch(modeling, 'if name == "c_proj.weight":',
           'if name == "c_proj.weight" and not getattr(p, "_is_hf_initialized", False):')
    # P2: the SC-Tune copy of visual.py expects PIL images but receives the paths from <img>...</img>.
    _patch(os.path.join(folder, "visual.py"), "        images = [self.image_transform(image) for image in images]",
           "        images = [self.image_transform(Image.open(i).convert('RGB') if isinstance(i, str) else i)"
           " for i in images]", required=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    missing = [f for f in CODE_FILES if not os.path.isfile(os.path.join(REMOTE, f))]
    if missing:
        pytest.fail(f"QWEN_VL_REMOTE_CODE={REMOTE} lacks {', '.join(missing)}")
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cache "absent" before the stand-in appears on sys.path
    root = tmp_path_factory.mktemp("qwen_vl_official")
    standins = root / "standins"
    for rel, text in {"torchvision/__init__.py": "from . import transforms\n",
                      "torchvision/transforms/__init__.py": TORCHVISION_STANDIN, **MATPLOTLIB_STANDIN}.items():
        (standins / rel).parent.mkdir(parents=True, exist_ok=True)
        (standins / rel).write_text(textwrap.dedent(text))
    code = root / "code"
    code.mkdir()
    for name in CODE_FILES:
        shutil.copy(os.path.join(REMOTE, name), code / name)
    patch_remote_code(str(code))
    work = root / "work"
    work.mkdir()
    (work / "SimSun.ttf").write_bytes(b"dummy font: only used to draw boxes")  # F0: no font download
    Image.new("RGB", (60, 45), (30, 160, 220)).save(work / "x.png")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(standins))
        mp.chdir(work)
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield {"root": root, "code": code, "work": work}
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "matplotlib")]:
        del sys.modules[name]


def _official_folder(env, name: str, **config_kwargs):
    """A folder laid out like the official download, with a tiny vocabulary and config (no weights)."""
    from sc_tune.models.qwen_vl.export import OFFICIAL_AUTO_MAP, OFFICIAL_TOKENIZER_AUTO_MAP, official_generation_config
    from sc_tune.tiny.qwen_vl import save_tiny_vocab, tiny_config

    folder = env["root"] / name
    vocab = save_tiny_vocab(str(folder))
    num_ranks = len(open(vocab).read().splitlines())
    config = tiny_config(num_ranks, **config_kwargs).to_dict()
    config.update(auto_map=OFFICIAL_AUTO_MAP, architectures=["QWenLMHeadModel"], torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps(official_generation_config(num_ranks)))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer", "auto_map": OFFICIAL_TOKENIZER_AUTO_MAP}))
    for name_ in CODE_FILES:
        shutil.copy(env["code"] / name_, folder / name_)
    return folder


@pytest.fixture(scope="module")
def pair(env):
    """The official model (random init, saved by the official code) and the native model loaded from it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sc_tune.models.qwen_vl import QWenLMHeadModel

    folder = _official_folder(env, "official_tiny", image_size=56, n_queries=16)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(0)
    official = AutoModelForCausalLM.from_config(config, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():  # random RMSNorm gains and biases, so that a swapped weight cannot hide
        for name, p in official.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "c_attn.bias")):
                p.add_(0.1 * torch.randn_like(p))
    generation = (folder / "generation_config.json").read_text()
    official.save_pretrained(folder)
    (folder / "generation_config.json").write_text(generation)  # F1: save_pretrained drops chat_format
    native, info = QWenLMHeadModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    return official.eval(), native.eval(), info, folder


def test_official_state_dict_loads_into_native_without_missing_or_unexpected_keys(pair):
    official, native, info, _ = pair
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs, ours = official.state_dict(), native.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_native_state_dict_loads_into_official(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from sc_tune.models.qwen_vl import finalize_export

    _, native, _, folder = pair
    native.save_pretrained(tmp_path)
    finalize_export(str(tmp_path), str(folder))
    official, info = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32,
                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs = official.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in native.state_dict().items())


def _batch(tokenizer, texts):
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.eod_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("texts", [
    ["Hello, this is a red dog", "a cat"],
    ["<img>x.png</img><ref>This</ref><box>(1,23),(456,999)</box> is", "<img>x.png</img><ref>the cat</ref><box>"],
    ["What is (5,6)?", "<img>x.png</img> Describe it."],
], ids=["text", "images", "mixed"])
def test_logits_and_greedy_generations_match_official(pair, texts):
    from sc_tune.models.qwen_vl import QWenTokenizer, QWenVLImageProcessor

    official, native, _, folder = pair
    tokenizer = QWenTokenizer.from_pretrained(folder, image_token_span=native.config.image_queries)
    ids, mask = _batch(tokenizer, texts)
    n_images = sum("<img>" in t for t in texts)
    processor = QWenVLImageProcessor.from_config(native.config)
    images = processor([Image.open("x.png")] * n_images) if n_images else None
    with torch.no_grad():
        theirs = official(input_ids=ids, attention_mask=mask).logits
        ours = native(input_ids=ids, attention_mask=mask, images=images).logits
    diff = (theirs - ours).abs()[mask.bool()].max().item()
    print(f"max |logit diff| {texts[0][:20]!r}...: {diff:.2e}")
    assert diff < 1e-4
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eod_id, pad_token_id=tokenizer.eod_id,
                  top_k=None, top_p=None, temperature=None)
    with torch.no_grad():
        theirs = official.generate(input_ids=ids, attention_mask=mask, **kwargs)
        ours = native.generate(input_ids=ids, attention_mask=mask, images=images, **kwargs)
    assert torch.equal(theirs, ours), (theirs[:, ids.shape[1]:], ours[:, ids.shape[1]:])


def test_tokenizer_ids_match_official(env, pair):
    from transformers import AutoTokenizer

    from sc_tune.models.qwen_vl import QWenTokenizer

    _, _, _, folder = pair
    folders = [folder]
    if os.path.isfile(os.path.join(REMOTE, "qwen.tiktoken")):
        real = env["root"] / "real_vocab"
        real.mkdir(exist_ok=True)
        for name in ("qwen.tiktoken", "tokenization_qwen.py"):
            shutil.copy(os.path.join(folder if name.endswith(".py") else REMOTE, name), real / name)
        shutil.copy(folder / "tokenizer_config.json", real / "tokenizer_config.json")
        folders.append(real)
    texts = ["<img>x.png</img><ref>This</ref><box>(1,23),(456,999)</box> is", "Ünïcode 你好 (7,8)\n\n end",
             "<|im_start|>user\nPicture 1: <img>a/b.jpg</img>\nWhat?<|im_end|>\n", ""]
    for f in folders:
        theirs = AutoTokenizer.from_pretrained(f, trust_remote_code=True)
        ours = QWenTokenizer.from_pretrained(f)
        for text in texts:
            their_ids = theirs(text)["input_ids"]
            assert ours(text, add_special_tokens=False)["input_ids"] == their_ids, (f, text)
            assert ours.decode(their_ids) == theirs.decode(their_ids)
            assert ours.decode(their_ids, skip_special_tokens=True) == theirs.decode(their_ids, skip_special_tokens=True)
        if f != folder:
            assert ours.convert_tokens_to_ids("<img>") == 151857 and ours.eod_id == 151643


def test_exported_folder_runs_the_official_chat_demo(pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sc_tune.models.qwen_vl import finalize_export

    _, native, _, folder = pair
    native.save_pretrained(tmp_path)
    report = finalize_export(str(tmp_path), str(folder))
    assert set(report["remote_code"]) == set(CODE_FILES)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval()
    response, history = model.chat(tokenizer, "Hello, what is this?", history=None, max_new_tokens=4, do_sample=False)
    assert isinstance(response, str) and history == [("Hello, what is this?", response)]
