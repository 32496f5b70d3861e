"""Shared helpers for trainer tests: build an SCTuneTrainer on a tiny model and the bundled sample."""

from __future__ import annotations

import os
import signal
import subprocess
import zlib

import torch
from transformers import LogitsProcessor

from sc_tune.arguments import LoraArguments, SCTuneConfig
from sc_tune.cycle import RolloutCycle, RolloutResult
from sc_tune.data import ReferringDataset
from sc_tune.modeling import apply_lora, freeze_vision_tower, load_model_and_adapter
from sc_tune.rewards import RewardBatch
from sc_tune.trainer import SCTuneTrainer
from tests.conftest import SAMPLE_DATA, SAMPLE_IMAGES

FAST = dict(
    per_device_train_batch_size=4,
    describer_max_new_tokens=6,
    describer_min_new_tokens=2,
    locator_max_new_tokens=8,
    locator_min_new_tokens=0,
    describer_lr=1e-3,
    locator_lr=2e-3,
    use_cpu=True,
    skip_preflight=True,  # tiny random models never write a box that parses; tests/test_preflight.py covers it
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    seed=0,
    dataloader_num_workers=0,
    weight_decay=0.0,  # weights that move, move through the loss's gradient (AdamW's decay would move them anyway)
)


def make_trainer(checkpoint: str, output_dir: str, model_transform=None, reward_fn=None, dataset=None, cycle=None,
                 **overrides) -> SCTuneTrainer:
    """``cycle``: a ``RolloutCycle`` subclass (built here with the trainer's adapter, arguments and ``reward_fn``)."""
    args = SCTuneConfig(output_dir=output_dir, **{**FAST, **overrides})
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(checkpoint)
    freeze_vision_tower(model, adapter)
    if model_transform is not None:
        model = model_transform(model, adapter)
    dataset = dataset if dataset is not None else ReferringDataset.from_file(SAMPLE_DATA, SAMPLE_IMAGES)
    # as finetune.py: the input's files go into every saved folder
    if cycle is not None:
        return SCTuneTrainer(model=model, args=args, adapter=adapter, train_dataset=dataset,
                             cycle=cycle(adapter, args, reward_fn), source_dir=checkpoint)
    return SCTuneTrainer(model=model, args=args, adapter=adapter, train_dataset=dataset, reward_fn=reward_fn,
                         source_dir=checkpoint)


class RecordingCycle(RolloutCycle):
    """The trainer's rollout cycle, recording what it made and what its generation calls were asked: pass it as
    ``make_trainer(cycle=RecordingCycle)`` (the seam ``SCTuneTrainer(cycle=...)``), read ``trainer.cycle``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made: list[tuple[dict, RolloutResult]] = []  # (the step's batch, what the cycle made of it)
        self.located_rows: list[int] = []  # captions per locate call (fresh, or resumed from the image prefix)
        self.handed_cache: list[bool] = []  # per generate_captions call: was it given the scoring pass's cache
        self.from_prefix: list[bool] = []  # per locate_from_prefix call: did locating resume from the prefix
        self.decode_calls: list[int] = []  # rows of each describe / describe_with_greedy call

    def describer_rollouts(self, batches, seeds=None):
        results = super().describer_rollouts(batches, seeds)
        self.made += list(zip(batches, results))
        return results

    def locator_rollouts(self, batches, seeds=None):
        results = super().locator_rollouts(batches, seeds)
        self.made += list(zip(batches, results))
        return results

    # The rest of each call goes through as it came, so the cycle's own defaults stay in force.
    def describe(self, model, images, boxes, settings, *rest, **options):
        self.decode_calls.append(len(images))
        return super().describe(model, images, boxes, settings, *rest, **options)

    def describe_with_greedy(self, model, images, boxes, greedy_images, greedy_boxes, *rest, **options):
        self.decode_calls.append(len(images) + len(greedy_images))
        return super().describe_with_greedy(model, images, boxes, greedy_images, greedy_boxes, *rest, **options)

    def generate_captions(self, model, batch, settings, prompt_cache=None):
        self.handed_cache.append(prompt_cache is not None)
        self.decode_calls.append(len(batch.inputs["input_ids"]))
        return super().generate_captions(model, batch, settings, prompt_cache)

    def locate(self, model, images, captions):
        self.located_rows.append(len(captions))
        self.decode_calls.append(len(captions))
        return super().locate(model, images, captions)

    def locate_from_prefix(self, model, images, captions, scored, source_rows):
        found = super().locate_from_prefix(model, images, captions, scored, source_rows)
        self.from_prefix.append(found is not None)
        if found is not None:
            self.located_rows.append(len(captions))
            self.decode_calls.append(len(captions))
        return found


def sample_images(adapter, n=3, widened: int | None = None):
    """``n`` distinct prepared images of the bundled sample and one box on each: (images, boxes). ``widened``: that
    image stretched to four times its width (a patch-grid family then gives it another grid, and so another image
    span length and another M-RoPE position after it)."""
    dataset = ReferringDataset.from_file(SAMPLE_DATA, SAMPLE_IMAGES)
    samples = [dataset[2 * i] for i in range(n)]  # records come in pairs per image: one per distinct image
    pictures = [s["image"] for s in samples]
    if widened is not None:
        pictures[widened] = pictures[widened].resize((pictures[widened].width * 4, pictures[widened].height))
    return [adapter.prepare_image(p) for p in pictures], [s["bbox"] for s in samples]


def small_lora(model, adapter):
    """A ``model_transform``: rank-4 LoRA without dropout, so two runs of it are comparable step for step."""
    return apply_lora(model, adapter, LoraArguments(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0), False)


def two_adapter_model(tiny_checkpoint, model_type: str):
    """A tiny ``model_type`` model under LoRA with two different adapters, ``default`` (the policy) and ``snapshot``
    (PEFT starts lora_B at zero, which would make both the base model), in eval mode: (model, adapter)."""
    torch.manual_seed(0)
    model, adapter = load_model_and_adapter(tiny_checkpoint(model_type))
    model = small_lora(model, adapter)
    model.add_adapter("snapshot", model.peft_config["default"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3 if ".snapshot." in name else 0.1)
    return model.eval(), adapter


def two_phase_trainer(checkpoint: str, output_dir: str, **overrides) -> tuple[SCTuneTrainer, list[float]]:
    """A trainer for four steps (0-1: describer, 2 PPO epochs on one rollout; 2: locator; 3: describer) with a
    reward that has signal, and the list its ``train()`` fills with every step's loss (for A/B exactness tests)."""
    trainer = make_trainer(
        checkpoint,
        output_dir,
        **{
            "max_steps": 4,
            "describer_update_steps": 1,
            "locator_update_steps": 1,
            "ppo_epochs": 2,
            "kl_coef": 0.05,
            # equal in two runs only if the captions are (the greedy caption's reward is the baseline)
            "reward_fn": caption_hash_reward,
            **overrides,
        },
    )
    losses = []
    compute_loss = trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = spy
    return trainer, losses


def trainable_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])


def caption_hash_reward(pred_boxes, target_N4, captions):
    """A reward with signal even though a random model writes no parseable box: a fixed pseudo-random score
    of the caption text, so a sampled caption and the greedy one of the same box score differently."""
    reward_N = torch.tensor([zlib.crc32(c.encode()) % 1000 / 1000 for c in captions], dtype=torch.float32)
    return RewardBatch(reward_N, torch.tensor([b is not None for b in pred_boxes]))


class CaptionReward:
    """Reward 1 for captions ``favoured`` says yes to, else 0; records every caption it scored."""

    def __init__(self, favoured):
        self.favoured = favoured
        self.scored: list[str] = []

    def __call__(self, pred_boxes, target_N4, captions):
        self.scored.extend(captions)
        reward_N = torch.tensor([float(self.favoured(c)) for c in captions])
        return RewardBatch(reward_N, torch.tensor([b is not None for b in pred_boxes]))


def processor_settings(folder: str) -> dict:
    """What the family's own processor reads from ``folder``: ``AutoProcessor``'s settings where it loads here,
    else each file's (image processor, tokenizer, chat template, processor_config.json), loaded by transformers.

    ``AutoProcessor`` needs torchvision for the families with a video processor (Qwen2/2.5/3-VL, GLM, SmolVLM2,
    LLaVA-OneVision, InternVL, Gemma 4) and remote code for Qwen-VL; those are compared file by file."""
    import json
    import os

    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    def tokenizer_settings(tokenizer):
        return {"vocab": tokenizer.get_vocab(), "specials": tokenizer.all_special_tokens}

    legacy = os.path.join(folder, "chat_template.json")
    legacy_template = json.load(open(legacy))["chat_template"] if os.path.isfile(legacy) else None

    try:
        processor = AutoProcessor.from_pretrained(folder)
    # torchvision missing (InternVL says so with a ValueError), or remote code needed (Qwen-VL)
    except (ImportError, ValueError, OSError) as e:
        settings = {"AutoProcessor": f"{type(e).__name__}"}
    else:
        tokenizer = getattr(processor, "tokenizer", processor)
        # The template it renders with: its own (chat_template.jinja / .json), else its tokenizer's (Gemma 3's
        # release keeps it in tokenizer_config.json, which the processor does not read; an export adds the .jinja).
        template = getattr(processor, "chat_template", None) or tokenizer.chat_template
        return {"AutoProcessor": type(processor).__name__, "processor": processor.to_dict(),
                "chat_template": template, **tokenizer_settings(tokenizer)}  # fmt: skip
    for name in ("processor_config.json", "chat_template.json", "preprocessor_config.json",
                 "video_preprocessor_config.json"):  # fmt: skip
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            settings[name] = json.load(open(path))
    if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        settings["image_processor"] = AutoImageProcessor.from_pretrained(folder).to_dict()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError) as e:  # Qwen-VL's tokenizer is remote code: its files are compared by bytes
        settings["tokenizer"] = type(e).__name__
    else:
        # The template the processor renders with: the tokenizer's, else the processor's legacy file (an export
        # may hold both: the tokenizer re-saved with the template the adapter read from the legacy file).
        settings.update(tokenizer_settings(tokenizer), chat_template=tokenizer.chat_template or legacy_template)
    return settings


def assert_prefix_batch_decodes_as_a_prefill(model, adapter, prompts, images, shared, steps: int = 6) -> None:
    """Greedy decoding of ``shared`` (a ``sc_tune.prompt_cache.SharedPrefixBatch`` of ``prompts``) from its moved
    cache writes the tokens of the plain left-padded batch, every step's logits within 1e-5 (stronger than equal
    answers: a tiny random model's argmax survives small position errors). Run the cached call first: a position
    state transformers keeps from the last prefill must not be what makes it right."""
    kwargs = {"max_new_tokens": steps, "do_sample": False, "return_dict_in_generate": True, "output_logits": True,
              "pad_token_id": adapter.pad_token_id}
    cached = model.generate(**adapter.resumed_decoding_inputs(shared.batch.inputs), **kwargs, cache=shared.cache)
    plain_batch = adapter.build_batch(prompts, images)
    plain = model.generate(**plain_batch.inputs, **kwargs)
    assert torch.equal(plain.sequences[:, plain_batch.input_ids.shape[1] :],
                       cached.sequences[:, shared.batch.input_ids.shape[1] :])
    for step_plain, step_cached in zip(plain.logits, cached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_plain, rtol=0, atol=1e-5)


def kill_process_tree(pid: int) -> None:
    """SIGKILL to ``pid`` and every process below it, found by parent links in /proc, then to its process group.
    The group alone misses torchrun's ranks: torchrun starts each in a session of its own (``start_new_session``),
    so a rank hung in a collective ran on after its launch was killed, until ``--ddp_timeout``. The whole tree is
    read before the first kill: a killed parent's children are handed to init and no longer found under it."""
    import contextlib
    import glob

    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children.setdefault(parent, []).append(int(stat.split("/")[2]))
    tree, i = [pid], 0
    while i < len(tree):
        tree += children.get(tree[i], [])
        i += 1
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # a child that left the tree (its parent exited) but kept the launch's group


def run_launch(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)`` for a launch that starts
    processes of its own (torchrun's ranks, a launch script's launcher), all of which are killed when the timeout
    passes (``kill_process_tree``). ``subprocess.run`` kills only the launcher: ranks hung in a collective ran on for
    the rest of the suite (two of them once took a core each for 18 minutes)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(process.pid)
            process.communicate()
            raise
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's own rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NoVideoProcessor:
    """Stands in for a family's video processor, which needs torchvision: a call with images alone reads none of its
    settings. (An AttributeError, as for a setting a processor lacks: ``getattr(part, name, default)`` reads stay.)"""

    def __getattr__(self, name):
        raise AttributeError(f"the processor read its video processor's {name!r}, which the test does not build")


def processor_around_the_folders_parts(folder: str, video_processor=None):
    """The family's own processor class, as ``AutoProcessor`` picks it for ``folder`` (the folder's
    ``processor_class``, else the class transformers maps its ``model_type`` to), around the folder's own parts as
    ``AutoProcessor`` loads them (tokenizer, image processor, any audio feature extractor) and its
    processor_config.json settings, with a stand-in for the video processor (``video_processor``: one holding the
    settings a class reads at construction, MiniCPM-V's). For the families whose AutoProcessor needs torchvision only
    to build a video processor (the Qwen2-VL-style patch-grid families, GLM-4.xV, InternVL, Gemma 4, LLaVA-OneVision,
    MiniCPM-V): the class's own ``__call__`` then runs on images. A subclass turns off the class's type check of its
    parts, which the stand-in would fail."""
    import os

    import transformers
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from sc_tune.jsonio import read_json

    def read(name: str) -> dict:
        path = os.path.join(folder, name)
        return read_json(path) if os.path.isfile(path) else {}

    settings = read("processor_config.json")
    named = [read(name).get("processor_class") for name in ("preprocessor_config.json", "tokenizer_config.json")]
    class_name = settings.pop("processor_class", None) or next(filter(None, named), None)
    class_name = class_name or PROCESSOR_MAPPING_NAMES[read("config.json")["model_type"]]
    family_class = getattr(transformers, class_name)  # Pixtral's needs torchvision itself: ImportError
    unchecked = type(class_name, (family_class,), {"check_argument_for_proper_class": lambda self, name, value: None})
    loaders = {"tokenizer": AutoTokenizer.from_pretrained, "image_processor": AutoImageProcessor.from_pretrained,
               "feature_extractor": AutoFeatureExtractor.from_pretrained,
               "video_processor": lambda _: video_processor or _NoVideoProcessor()}
    parts = {name: loaders[name](folder) for name in family_class.get_attributes()}
    return unchecked(**parts, **settings)


def assert_the_familys_processor_builds_the_adapters_inputs(folder: str, adapter, processor=None) -> None:
    """The family's own processor of ``folder`` (``AutoProcessor``, what its chat demo runs), given the adapter's
    rendered describer and locator prompts and an image, builds the very inputs the adapter builds: the image marker
    expanded into the same image tokens, the same pixels, the same per-token types. (The rendered prompt is
    tokenised as the processor's apply_chat_template does: with the tokenizer's own special tokens unless it starts
    with the BOS. The llava-hf templates write no BOS; their tokenizers prepend <s>.) Where AutoProcessor needs
    torchvision (the demo extra) for a video processor, the family's class around the folder's parts runs instead
    (``processor_around_the_folders_parts``); skips where that cannot load either (Pixtral's class needs torchvision,
    SmolVLM2's num2words). ``processor``: the family's processor built otherwise."""
    import pytest
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    try:
        processor = processor or AutoProcessor.from_pretrained(folder)
    except (ImportError, ValueError) as e:  # InternVL's says so with a ValueError
        if "torchvision" not in str(e).lower():
            raise
        try:
            processor = processor_around_the_folders_parts(folder)
        except ImportError as missing:
            pytest.skip(f"the processor of {folder} needs what is not installed here: {str(missing).strip()[:120]}")
    for size, colour in (((97, 61), (200, 30, 30)), ((40, 300), (30, 30, 200))):
        photo = Image.new("RGB", size, colour)
        image = adapter.prepare_image(photo)
        for prompt in (adapter.describer_prompt([0.1, 0.2, 0.5, 0.6], image), adapter.locator_prompt("the dog", image)):
            ours = adapter.build_batch([prompt], [image]).inputs
            bos = processor.tokenizer.bos_token
            adds = {"add_special_tokens": False} if bos is not None and prompt.startswith(bos) else {}
            theirs = processor(text=[prompt], images=[[photo]], return_tensors="pt", **adds)
            # LLaVA-OneVision's processor counts each row's images; the model's default (none passed) patches every
            # image as a count of one does, and the adapter's rows hold one image each.
            if "batch_num_images" in theirs and "batch_num_images" not in ours:
                assert theirs.pop("batch_num_images").tolist() == [1]
            assert sorted(ours) == sorted(theirs), (sorted(ours), sorted(theirs))
            for key in ours:
                assert torch.equal(ours[key], theirs[key]), (folder, key, size)


def two_colour_photo(size: tuple[int, int]):
    """A photo of ``size`` (width, height) that is not one colour, so that its tiles or patches differ."""
    from PIL import Image

    photo = Image.new("RGB", size, (200, 30, 30))
    photo.paste((20, 40, 220), (0, 0, size[0] // 3, size[1] // 2))
    return photo


def assert_processor_builds_the_same_inputs(adapter, processor, prompt, image, photo, keys, **processor_kwargs):
    """The family's own processor on ``prompt`` (the adapter's rendering) and the original ``photo``: exactly the
    tensors ``keys`` (sorted), each equal to what the adapter's batch of ``image`` holds."""
    ours = adapter.build_batch([prompt], [image]).inputs
    theirs = processor(text=[prompt], images=[photo], return_tensors="pt", **processor_kwargs)
    assert sorted(ours) == sorted(theirs) == sorted(keys)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), (photo.size, key)


BOX_FOR_PROMPTS = [0.1, 0.2, 0.5, 0.6]


def assert_patch_grid_processor_matches(adapter, processor, keys, frames_per_image: int = 1) -> dict:
    """A patch-grid family's own processor builds the adapter's ``keys`` exactly on square, wide and tall photos, with
    the checkpoint's pixel budget and one lowered to two merged patches (set on the adapter, passed to the processor;
    ``frames_per_image``: the processor's bounds count frames x height x width, GLM-4V's, where an image is that many
    frames). Returns each photo's grid by (lowered budget or None, photo size); a wide photo's grid is a tall one's
    transposed."""
    side = adapter.patch_size * adapter.merge_size  # one image token's pixels per side
    grids = {}
    for max_pixels in (None, side * side * 2):
        if max_pixels is not None:
            adapter.limit_image_pixels(side * side, max_pixels)
        bounds = {} if max_pixels is None else {"size": {"shortest_edge": side * side * frames_per_image,
                                                         "longest_edge": max_pixels * frames_per_image}}
        for size in ((60, 60), (300, 40), (40, 300)):
            photo = two_colour_photo(size)
            image = adapter.prepare_image(photo)
            for prompt in (adapter.describer_prompt(BOX_FOR_PROMPTS, image), adapter.locator_prompt("the dog", image)):
                assert_processor_builds_the_same_inputs(adapter, processor, prompt, image, photo, keys,
                                                        images_kwargs=bounds)
            grid = image.tensors["image_grid_thw"][0].tolist()
            assert image.num_tokens == grid[1] * grid[2] // adapter.merge_size**2
            grids[max_pixels, size] = grid
    wide, tall = grids[None, (300, 40)], grids[None, (40, 300)]
    assert wide[1] < wide[2] and wide == [1, tall[2], tall[1]]
    assert grids[side * side * 2, (60, 60)] == [1, 2, 2]  # one merged patch: the bound took effect on both sides
    return grids



class ForceScript(LogitsProcessor):
    """A logits processor that makes transformers' ``generate`` write ``script_BT[row]`` token by token (then repeat
    its last token), whatever the model. Runs after the family's rules, so it overrides them (a suppressed token is
    written anyway); SC-Tune's own decoding loop refuses it (``sc_tune.decoding``): see ``ScriptedLogits``."""

    def __init__(self, script_BT, prompt_width):
        self.script_BT, self.prompt_width = script_BT, prompt_width

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_width
        forced = torch.full_like(scores, float("-inf"))
        for row, script in enumerate(self.script_BT):
            forced[row, script[min(step, len(script) - 1)]] = 0.0
        return forced


def generating_module(model):
    """The module whose forward ``model.generate`` calls: under PEFT, the wrapped transformers model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ScriptedLogits:
    """Makes ``model`` itself write given token ids: while ``scripts`` is set (``write``), each forward's last logits
    are replaced by ones whose argmax is row ``r``'s next token of ``scripts[r]`` (then its last token again).

    Why the model's output and not a logits processor: it forces every decoding loop alike (transformers'
    ``generate`` and SC-Tune's static one, which refuses processors it cannot capture), and the family's generation
    rules (suppressed tokens, end-token rules) still run on these logits, as on a real model's: a rule that forbade a
    token of the family's own answer would change what is written. The k-th forward after ``write`` is the k-th new
    token (one forward per token: the prefill writes the first), so each ``generate`` call needs its own ``write``.
    ``forwards`` counts the forwards since the last ``write`` (the decoding steps a call took). A hook does not run
    in a replayed CUDA graph: on CUDA, force the static loop with ``Decoding(cuda_graphs=False)``; on CPU (the tests)
    it runs eagerly."""

    def __init__(self, model):
        self.scripts: list[list[int]] | None = None
        self.forwards = 0
        self._hook = generating_module(model).register_forward_hook(self._force)

    def write(self, scripts) -> None:
        self.scripts, self.forwards = [list(s) for s in scripts], 0

    def _force(self, module, args, output):
        if self.scripts is None:
            return output
        logits = output.logits
        assert logits.shape[0] == len(self.scripts), (logits.shape, len(self.scripts))
        tokens = [script[min(self.forwards, len(script) - 1)] for script in self.scripts]
        forced = torch.full_like(logits, -1e4)  # finite: a rule that sets -inf on the scripted token shows
        forced[torch.arange(len(tokens)), -1, torch.tensor(tokens)] = 1e4
        self.forwards += 1
        output.logits = forced
        return output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()


# Two locator rows: captions of different lengths (left padding, and a label after the box that is long in one row),
# photos of odd sizes (pixel codecs round on the frames they are resized to), boxes whose x and y differ (a swapped
# axis shows) and whose written numbers differ in length (the rows complete their boxes at different steps, so a row
# that stopped must stay stopped while the other decodes).
FORCED_CAPTIONS = ["the man in the white shirt on the left next to the small dog", "a cat"]
FORCED_BOXES = [[0.2, 0.4, 0.5, 0.6], [0.03, 0.055, 0.85, 0.95]]
FORCED_PHOTO_SIZES = [(97, 61), (45, 130)]


def trainer_locate_settings():
    """The locator's settings as the trainer's cycle makes them (``RolloutCycle.greedy_boxes``), at the defaults."""
    from sc_tune.rollout import GenerationSettings

    fields = SCTuneConfig.__dataclass_fields__
    return GenerationSettings(fields["locator_max_new_tokens"].default, fields["locator_min_new_tokens"].default)


def trainer_decodings(model, adapter) -> dict:
    """The loops the trainer may decode with, by name: transformers' generate (None), and SC-Tune's static loop where
    the family has one (``--static_decoding``)."""
    from sc_tune.decoding import Decoding

    loops = {"generate": None}
    if adapter.static_decoding_problem(model) is None:
        loops["static"] = Decoding()
    return loops


def tokens_to_box(adapter, script) -> int:
    """How many tokens of the locator answer ``script`` the answer needs: up to the one that completes its box."""
    complete = (k for k in range(1, len(script) + 1) if adapter.locator_answer_end(adapter.decode(script[:k])) is not None)
    return next(complete)


def assert_forced_locator_answers_are_located_back(model, adapter) -> list[str]:
    """``model`` made to write, per row, the ids of its family's own locator answer (``locator_target``) for
    ``FORCED_BOXES``: ``locate``, called as the trainer calls it, through every loop the trainer may decode with,
    returns the boxes the answers' text reads (within the codec's rounding of the true ones), each row's text ends
    with the token that completes its box, and the loop stopped there (transformers') or one step later (SC-Tune's).
    The same for ``locate_from_prefix`` (the trainer's locating from the image prefix its describer pass cached) where
    the family shares that prefix. Returns what ran: ``"<locate or prefix>/<loop>"``."""
    import pytest

    from sc_tune.prompt_cache import ScoredPrompts
    from sc_tune.rollout import GenerationSettings, describe, fit_locator_budget, locate, locate_from_prefix

    images = [adapter.prepare_image(two_colour_photo(size)) for size in FORCED_PHOTO_SIZES]
    targets = [adapter.locator_target(b, im, c) for b, im, c in zip(FORCED_BOXES, images, FORCED_CAPTIONS)]
    scripts = [adapter.encode_target(t) for t in targets]
    assert [adapter.decode(s) for s in scripts] == targets, "the answer's ids decode to the answer"
    up_to_box = [tokens_to_box(adapter, s) for s in scripts]
    assert up_to_box[0] != up_to_box[1], "the rows complete their boxes at different steps"
    # The model runs on past its answer (the answer again, then its end token), as a model that does not stop at
    # its box: most families' answers end one token after the box, where a loop that never stopped at the box would
    # end too; with the tail a stop at the box shows in the forwards counted below.
    written = [(s[:-1] if s[-1] in adapter.end_token_ids else s) + s for s in scripts]
    # The box the text round trip reads (tests/test_families.py pins it to the box within the codec's rounding).
    expected = [adapter.parse_locator_output(t, im) for t, im in zip(targets, images)]
    for box, image, got in zip(FORCED_BOXES, images, expected):
        step = 1.0 / min(adapter.codec.axis_scales(image.frame))
        assert got == pytest.approx(box, abs=step / 2 + 1e-9)
    settings = trainer_locate_settings()
    budget = fit_locator_budget(adapter, images, settings, FORCED_CAPTIONS).max_new_tokens
    assert max(up_to_box) <= budget

    def from_prefix(decoding):
        # As the locator phase: the describer call over the boxes keeps its prompts' cache, locating starts from it.
        batch, captions = describe(model, adapter, images, FORCED_BOXES, GenerationSettings(2), keep_prompts=True)
        if captions.prompt_cache is None:
            return None
        scored = ScoredPrompts(batch, captions.prompt_cache, batch.inputs["input_ids"].shape[1] - 1)
        with ScriptedLogits(model) as forcing:
            forcing.write(written)
            found = locate_from_prefix(model, adapter, images, FORCED_CAPTIONS, settings, scored, [0, 1], decoding)
        return found, forcing.forwards

    def fresh(decoding):
        with ScriptedLogits(model) as forcing:
            forcing.write(written)
            found = locate(model, adapter, images, FORCED_CAPTIONS, settings, decoding=decoding)  # as the cycle
        return found, forcing.forwards

    ran = []
    for loop, decoding in trainer_decodings(model, adapter).items():
        for way, run in (("locate", fresh), ("prefix", from_prefix)):
            got = run(decoding)
            if got is None:
                continue  # the family prefills the locator prompts in full
            (found, texts), forwards = got
            name = f"{way}/{loop}"
            ran.append(name)
            assert found == expected, name
            # each row's text ends with the token that completes its box, nothing after it
            assert texts == [adapter.decode(s[:k]) for s, k in zip(scripts, up_to_box)], name
            for text in texts:  # where the answer says its box ends: within the text, and the box is whole there
                end = adapter.locator_answer_end(text)
                assert end <= len(text) and adapter.locator_answer_end(text[:end]) == end, (name, text, end)
            if decoding is None:
                assert forwards == max(up_to_box), name  # transformers' loop stopped at the last row's box
            else:
                # SC-Tune's loop checks each row's text one step late (decoding._RowCheck): the last row's box
                # completes at forward max(up_to_box), is found while the next forward runs, and the loop ends there.
                late = min(max(up_to_box) + 1, budget)
                assert min(max(map(len, written)), budget) > late, "a loop that never stopped would show"
                assert forwards == late, name
    return ran


def assert_forced_captions_are_described_back(model, adapter, captions) -> None:
    """``model`` made to write, per row, the ids of the family's describer answer (``describer_target``) for
    ``captions``: ``describe``, with the trainer's greedy caption settings sized for them, returns the captions' text
    through every loop the trainer may decode with (what the locator prompt is then built from)."""
    from sc_tune.rollout import GenerationSettings, describe, fit_describer_budget

    images = [adapter.prepare_image(two_colour_photo(size)) for size in FORCED_PHOTO_SIZES[: len(captions)]]
    scripts = [adapter.encode_target(adapter.describer_target(c)) for c in captions]
    longest = max(len(adapter.encode_target(c)) for c in captions)
    settings = fit_describer_budget(adapter, GenerationSettings(longest, 2))  # as RolloutCycle.greedy_captions
    for name, decoding in trainer_decodings(model, adapter).items():
        with ScriptedLogits(model) as forcing:
            forcing.write(scripts)
            _, completions = describe(model, adapter, images, FORCED_BOXES[: len(captions)], settings,
                                      decoding=decoding)
        assert completions.texts == list(captions), name
        assert completions.mask_BT.sum(1).tolist() == [len(s) for s in scripts], name  # up to the end token
