import os
import random
import sys

# One intra-op (OpenMP) thread unless OMP_NUM_THREADS says otherwise, set before torch and numpy start their pools;
# the subprocesses the tests start inherit it (those that launch torchrun already pass 1). The tiny models' kernels take
# microseconds: a second thread buys nothing there, and on a shared machine each matmul or LayerNorm it splits waits
# for a busy core (2 cores under other jobs' load: a 4 x 64 by 64 x 64 matmul 25 us and a LayerNorm 0.7 ms with 2
# threads, 5 us each with 1; tests/test_families.py's Granite 4 Vision LoRA run beside two busy processes: 11.9 s
# with 2 threads, 3.6 s with 1).
_ONE_THREAD = "OMP_NUM_THREADS" not in os.environ
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if _ONE_THREAD:
    torch.set_num_threads(1)  # torch may have been imported before this file (a plugin), its pool already sized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def script_module(name: str):
    """``scripts/<name>.py`` loaded afresh from its file, as a module named ``<name>_script`` (scripts/ is not a
    package; the module the script would import under its own name is left alone)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# The tests' subprocesses find their tools on PATH as in an activated virtual environment, however pytest was started
# (`.venv/bin/python -m pytest` activates nothing). Two tools are at stake: torchrun, which the launch scripts call by
# name (in a checkout without a .venv of its own to activate: "torchrun: not found"), and ninja, with which DeepSpeed
# builds its shared-memory op into .torch_extensions at a run's first ZeRO launch. The system's ninja (1.11) and the
# venv's (1.13) hash a build's command lines differently, so each takes the other's build for stale: a suite that
# launched through both (`sys.executable -m torch.distributed.run` with the system's, the scripts, which activate
# .venv, with the venv's) compiled the op again at each switch, 30 s to 2 min a time (.ninja_log, 2026-12-05/06).
_VENV_BIN = os.path.dirname(sys.executable)
if sys.prefix != sys.base_prefix and os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tests' own sample: 16 small images of several sizes (96x72 and others) with freely placed ellipses, 32 boxes, no
# captions. Odd sizes give prompts of different lengths (left padding), which many exactness tests need; the
# repository's data/sample (the warm start's domain, for the README's dry run) is all 128x128.
SAMPLE_DATA = os.path.join(ROOT, "tests", "data", "odd_sizes", "annotations.json")
WARM_START = os.path.join(ROOT, "checkpoints", "warm_start")  # a tiny Qwen3-VL whose locator writes boxes that parse
SAMPLE_IMAGES = os.path.join(ROOT, "tests", "data", "odd_sizes")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: a tiny random checkpoint folder of a ``model_type``, built once per session (``sc_tune.tiny``)."""
    from sc_tune.tiny import save_tiny

    built = {}

    def make(model_type: str) -> str:
        if model_type not in built:
            directory = str(tmp_path_factory.mktemp(f"tiny_{model_type}"))
            # Building seeds torch's generator; a test that seeds and then asks for a checkpoint must draw the same
            # numbers whether or not an earlier test built it (its result must not depend on which tests ran first).
            python_state, numpy_state = random.getstate(), np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                built[model_type] = save_tiny(directory, model_type)
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        return built[model_type]

    return make


@pytest.fixture(scope="session")
def mislocated(tmp_path_factory):
    """Shapes objects whose greedy (terse) caption the warm start grounds on another shape, and whose full caption
    it grounds right: (data root, 24 records). For them the IoU reward pays for saying the colour, and the box the
    snapshot locates for its own caption is never the true box."""
    import json

    from PIL import Image

    from sc_tune.modeling import load_model_and_adapter
    from sc_tune.rewards import cycle_iou
    from sc_tune.rollout import GenerationSettings, describe, locate
    from sc_tune.synthetic.shapes import write_split

    root = tmp_path_factory.mktemp("shapes")
    write_split(root, "train", 40, seed=5)
    records = json.loads((root / "train.json").read_text())
    model, adapter = load_model_and_adapter(WARM_START)
    model.eval()
    images = [adapter.prepare_image(Image.open(root / r["image"]).convert("RGB")) for r in records]
    boxes_N4 = torch.tensor([r["bbox"] for r in records])
    _, greedy = describe(model, adapter, images, boxes_N4.tolist(), GenerationSettings(8, 1))
    terse_boxes, _ = locate(model, adapter, images, greedy.texts, GenerationSettings(32, 3))
    full_boxes, _ = locate(model, adapter, images, [r["caption"] for r in records], GenerationSettings(32, 3))
    terse_iou, full_iou = cycle_iou(terse_boxes, boxes_N4).reward_N, cycle_iou(full_boxes, boxes_N4).reward_N
    picked = [
        r
        for r, caption, t, f in zip(records, greedy.texts, terse_iou.tolist(), full_iou.tolist())
        if caption == r["terse"] and t < 0.5 and f >= 0.5
    ]
    assert len(picked) >= 24, f"only {len(picked)} mislocated objects: the warm start or the data changed"
    return root, picked[:24]


# DeepSpeed builds its shared-memory op at a run's first ZeRO launch (about 40 s of compiling on two cores, in the
# launch's time). When multi-process tests are collected and the op is not built yet, it is built from the start of the
# session (by one pytest-xdist worker, the first), into the folder the launches use, so that no launch's time holds the
# compile; a launch that comes first waits on torch's build lock, then loads it. The build is never killed (a killed
# build leaves that lock, and every later launch waits on it for ever): the session's end waits for it.
OP_EXTENSIONS = os.path.join(ROOT, ".torch_extensions")  # the tests' launches' TORCH_EXTENSIONS_DIR
_BUILD_OP = ("from deepspeed.accelerator import get_accelerator\n"
             "get_accelerator().create_op_builder('ShareMemCommBuilder').load()\n")
_OP_BUILD = pytest.StashKey()


def pytest_collection_finish(session):
    import glob
    import subprocess

    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return  # another worker builds it (every worker collects every test)
    if not any(item.get_closest_marker("slow") for item in session.items):
        return
    if glob.glob(os.path.join(OP_EXTENSIONS, "*", "*.so")):
        return  # built (a build torch takes for stale is built again by the launch, as without this)
    os.makedirs(OP_EXTENSIONS, exist_ok=True)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": OP_EXTENSIONS, "MAX_JOBS": "1", "OMP_NUM_THREADS": "1"}
    with open(os.path.join(OP_EXTENSIONS, "session_build.log"), "w") as log:
        session.config.stash[_OP_BUILD] = subprocess.Popen([sys.executable, "-c", _BUILD_OP], env=env, stdout=log,
                                                           stderr=subprocess.STDOUT, start_new_session=True)


def pytest_sessionfinish(session):
    build = session.config.stash.get(_OP_BUILD, None)
    if build is not None:
        build.wait()
