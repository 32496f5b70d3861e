"""The input folder's non-weight files in every saved folder (``sc_tune.export.carry_source_files``): the rule,
checkpoints, and the released checkpoints' own files (beside the checkout: tests/real_checkpoints.py).

Each family's finetune run (full and LoRA) is checked in tests/test_families.py
(``test_export_carries_every_non_weight_file_of_the_input``,
``test_export_loads_with_the_input_processor_settings``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import stat

import pytest
import torch

from sc_tune import checkpoints
from sc_tune.adapters import family_for, supported_model_types
from sc_tune.adapters.base import ModelFolderError
from sc_tune.export import NOT_CARRIED, carry_source_config, carry_source_files, export_trained, model_config_as_loaded
from tests import real_checkpoints as real
from tests.helpers import make_trainer, processor_settings

REAL_FOLDERS = sorted(f.name for f in os.scandir(real.REAL_CHECKPOINTS) if f.is_dir()) if real.available() else []


def is_carried(name: str) -> bool:
    return not any(fnmatch.fnmatch(name, p) for p in NOT_CARRIED)


def _write(folder, name, text="x"):
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


def test_the_rule_carries_processor_files_and_nothing_of_weights_model_or_run(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    carried = ["processor_config.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
               "video_preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "qwen.tiktoken", "README.md",
               "LICENSE", "modeling_qwen.py"]  # fmt: skip
    kept_out = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.pth", "optimizer.pt", "model.gguf",
                "training_args.bin", "config.json", "generation_config.json", "adapter_config.json",
                "trainer_state.json", "sc_tune_state.json", "sc_tune_complete.json", "all_results.json", "latest",
                "zero_to_fp32.py", ".gitattributes"]  # fmt: skip
    for name in carried + kept_out:
        _write(source, name, f"source {name}")
    (source / "checkpoint-2").mkdir()
    _write(source / "checkpoint-2", "tokenizer.json")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):  # what the export wrote itself
        _write(out, name, f"export {name}")

    assert carry_source_files(str(out), str(source)) == sorted(carried)
    for name in carried:  # verbatim, also over the export's own re-serialised tokenizer file
        assert (out / name).read_text() == f"source {name}"
    assert (out / "model.safetensors").read_text() == "export model.safetensors"  # a weight is never replaced
    assert (out / "config.json").read_text() == "export config.json"  # the model's own config wins
    assert not [n for n in kept_out if n not in ("model.safetensors", "config.json") and (out / n).exists()]
    assert not (out / "checkpoint-2").exists()
    assert carry_source_files(str(out), None) == [] and carry_source_files(str(source), str(source)) == []
    os.chmod(source / "README.md", 0o444)  # a read-only source (a shared model store): the copy stays writable
    carry_source_files(str(out), str(source))
    assert os.stat(out / "README.md").st_mode & stat.S_IWUSR  # a later save may overwrite it


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpoints_carry_the_input_files_and_stay_verified(tiny_checkpoint, tmp_path, lora):
    """checkpoint-N holds the carried files, byte for byte, inside its verified manifest (a resume checks them);
    a LoRA checkpoint gets no base config.json (it would look like a full model folder). The final export holds them
    too, full or merged from the adapter, and no snapshot adapter."""
    from tests.helpers import small_lora

    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), source)
    _write(source, "processor_config.json", json.dumps({"processor_class": "Qwen2VLProcessor"}))
    _write(source, "README.md", "# model card")
    trainer = make_trainer(str(source), str(tmp_path / "run"), model_transform=small_lora if lora else None,
                           max_steps=1, save_strategy="steps", save_steps=1, describer_update_steps=1,
                           locator_update_steps=1, ppo_epochs=1)  # fmt: skip
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert checkpoints.problems(str(checkpoint)) == []
    manifest = json.loads((checkpoint / checkpoints.MARKER_FILE).read_text())["files"]
    for name in ("processor_config.json", "README.md", "preprocessor_config.json", "tokenizer_config.json"):
        assert (checkpoint / name).read_bytes() == (source / name).read_bytes(), name
        assert name in manifest
    assert (checkpoint / "config.json").exists() != lora
    # the final export too, full or merged from the adapter (the merge carries them itself)
    export_trained(trainer, str(tmp_path / "export"), str(source), use_lora=lora)
    for name in ("processor_config.json", "README.md", "preprocessor_config.json", "tokenizer_config.json"):
        assert (tmp_path / "export" / name).read_bytes() == (source / name).read_bytes(), name
    assert (tmp_path / "export" / "lora_adapter").is_dir() == lora
    if lora:  # the policy's adapter alone: PEFT would save the snapshot's beside it, in a folder of its own
        assert not (tmp_path / "export" / "lora_adapter" / "snapshot").exists()


@pytest.mark.parametrize("folder", REAL_FOLDERS)
def test_a_released_checkpoints_files_survive_the_export(folder, tmp_path):
    """The export's non-weight steps on a released checkpoint's own files: what the trainer's save path and the
    LoRA merge do after the weights are written (the adapter's save_pretrained, then the family's hook). Where
    the folder names a registered family (config.json), the family's processor then reads the input's settings
    from the output (``AutoProcessor`` where it loads here); elsewhere the carry alone runs."""
    from sc_tune.export import finalize_export

    source = real.path(folder)
    out = tmp_path / "out"
    out.mkdir()
    config = os.path.join(source, "config.json")
    model_type = json.load(open(config)).get("model_type") if os.path.isfile(config) else None
    loads = model_type in supported_model_types() and os.path.isfile(os.path.join(source, "tokenizer.json"))
    if model_type in supported_model_types() and not loads:
        # A folder kept without its vocabulary (gemma-3's tokenizer.json is left out there): its tokenizer would be
        # the added special tokens alone, and loading it is refused, naming the file.
        with pytest.raises(ModelFolderError, match=r"has no tokenizer\.json"):
            family_for(model_type).adapter.from_pretrained(source)
    if loads:
        from transformers import AutoConfig

        adapter = family_for(model_type).adapter.from_pretrained(source)
        # What model.save_pretrained writes: the config re-serialised in transformers 5's layout, here with weights
        # written in float32 (a plain --bf16 run's export).
        resaved = AutoConfig.from_pretrained(source)
        resaved.dtype = torch.float32
        resaved.save_pretrained(str(out))
        assert json.load(open(out / "config.json")) != json.load(open(config))  # another layout than the release's
        adapter.save_pretrained(str(out))  # the trainer's _save and merge_lora, after the weights
        finalize_export(str(out), source)
        # The released config.json (its layout: transformers 4.57 misreads 5's), only its dtype set to the written one.
        released = json.load(open(config))
        dtype_keys = [k for k in ("torch_dtype", "dtype") if k in released] or ["dtype"]
        assert json.load(open(out / "config.json")) == {**released, **dict.fromkeys(dtype_keys, "float32")}
    else:
        carry_source_files(str(out), source)
    names = [n for n in os.listdir(source) if os.path.isfile(os.path.join(source, n)) and is_carried(n)]
    assert names  # every folder there holds a processor, tokenizer or template file
    for name in names:  # (config.json and generation_config.json are the model's, written with its weights)
        assert (out / name).read_bytes() == open(os.path.join(source, name), "rb").read(), name
    if loads:
        settings = processor_settings(str(out))
        assert settings == processor_settings(source)
        released = os.path.join(source, "processor_config.json")
        if "processor" in settings and os.path.isfile(released):  # AutoProcessor loads (Gemma 3): its own values
            values = {k: v for k, v in json.load(open(released)).items() if k != "processor_class"}
            assert values and {k: settings["processor"][k] for k in values} == values  # e.g. image_seq_length 256
            assert settings["chat_template"]


@pytest.mark.parametrize("inside", ["base", "base/merged", "adapter"])
def test_the_merge_cli_refuses_to_write_over_its_inputs(tmp_path, capsys, inside):
    """``python -m sc_tune.export --output`` equal to (or inside) ``--base`` used to overwrite the user's base weights
    and tokenizer files; it is refused before anything is loaded or written, as finetune.py refuses such an
    --output_dir."""
    from sc_tune.export import main

    for name in ("base", "adapter"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"the user's weights")
    (tmp_path / "link").symlink_to(tmp_path / "base")
    for output in (tmp_path / inside, tmp_path / "link" if inside == "base" else tmp_path / inside):
        with pytest.raises(SystemExit) as refused:
            main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--output", str(output)])
        assert refused.value.code == 2
        assert "the merge would overwrite it" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["model.safetensors"]
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == b"the user's weights"


def test_the_merge_cli_names_a_missing_folder_flag(tmp_path, capsys):
    from sc_tune.export import main

    given = {"--base": str(tmp_path / "base"), "--adapter": str(tmp_path / "adapter"), "--output": str(tmp_path / "o")}
    for missing in given:
        with pytest.raises(SystemExit) as refused:
            main([part for flag, folder in given.items() if flag != missing for part in (flag, folder)])
        assert refused.value.code == 2
        assert f"the following arguments are required: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_export_writes_the_inputs_config_with_the_written_dtype(tiny_checkpoint, tmp_path):
    """transformers 5 writes config.json in its own layout, which transformers 4.57 misreads (a Qwen2.5-VL export lost
    tie_word_embeddings, so its lm_head loaded random, and mrope_section). The export writes the input's config.json,
    byte for byte, only its dtype key set where the weights were written in another dtype (here transformers 4's
    ``torch_dtype``: no ``dtype`` key is added)."""
    from peft import LoraConfig, get_peft_model

    from sc_tune.export import main as export_main
    from sc_tune.modeling import load_model_and_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint("qwen2_5_vl"), base)
    config = json.loads((base / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")  # transformers 4's name for it
    (base / "config.json").write_text(json.dumps(config, indent=1))
    model, adapter = load_model_and_adapter(str(base))
    get_peft_model(model, LoraConfig(r=2, target_modules=adapter.lora_target_modules)).save_pretrained(tmp_path / "a")
    for flag, dtype in (([], "float32"), (["--dtype", "bfloat16"], "bfloat16")):
        out = tmp_path / f"merged_{dtype}"
        export_main(["--base", str(base), "--adapter", str(tmp_path / "a"), "--output", str(out), *flag])
        assert json.loads((out / "config.json").read_text()) == {**config, "torch_dtype": dtype}
        if dtype == config["torch_dtype"]:
            assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
        merged, _ = load_model_and_adapter(str(out), dtype="auto")
        assert {p.dtype for p in merged.parameters()} == {getattr(torch, dtype)}


def test_the_inputs_config_is_left_alone_where_there_is_none_or_it_is_the_saved_one(tmp_path):
    """No config.json in the input (an adapter folder), none written, or the output the input itself: nothing
    changes and nothing fails."""
    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir(), out.mkdir()
    _write(out, "config.json", '{"dtype": "bfloat16"}')
    carry_source_config(str(out), str(source))  # the input has none: the saved one stays
    assert (out / "config.json").read_text() == '{"dtype": "bfloat16"}'
    _write(source, "config.json", '{"dtype": "float32", "model_type": "qwen2_vl"}')
    carry_source_config(str(source), str(source))  # one folder: left byte for byte
    carry_source_config(str(tmp_path / "empty"), str(source))  # nothing saved there: nothing written
    assert (source / "config.json").read_text() == '{"dtype": "float32", "model_type": "qwen2_vl"}'
    assert not (tmp_path / "empty").exists()
    carry_source_config(str(out), str(source))
    assert json.loads((out / "config.json").read_text()) == {"dtype": "bfloat16", "model_type": "qwen2_vl"}


@pytest.mark.parametrize("had", [True, False], ids=["with_use_cache", "without"])
def test_the_saved_config_keeps_the_inputs_use_cache(had):
    """The Trainer sets config.use_cache = False for training; every saved config.json would carry it into the chat
    demo. After the block the config holds the input's value, or no such attribute, as before."""
    class Config:  # a model config as transformers keeps it: plain attributes
        pass

    config = Config()
    if had:
        config.use_cache = True
    model = type("Model", (), {"config": config})()
    with model_config_as_loaded(model):
        config.use_cache = False  # as Trainer.__init__ does
    assert vars(config) == ({"use_cache": True} if had else {})
    with model_config_as_loaded(object()):  # a model without a config: nothing to keep
        pass


def test_only_the_saving_process_writes_the_tokenizer_and_carried_files(tiny_checkpoint, tmp_path, monkeypatch):
    """transformers calls _save on every rank (ZeRO-3 gathers need them all) and writes weights only where
    should_save; SC-Tune's tokenizer and carried files were written by every process of every node into the same
    shared folder at once. A process that does not save writes nothing."""
    trainer = make_trainer(tiny_checkpoint("qwen2_vl"), str(tmp_path / "run"))
    monkeypatch.setattr(type(trainer.args), "should_save", property(lambda self: False))
    trainer._save(str(tmp_path / "other_rank"))
    assert not (tmp_path / "other_rank").exists() or not os.listdir(tmp_path / "other_rank")
    monkeypatch.undo()
    trainer._save(str(tmp_path / "main_rank"))
    written = set(os.listdir(tmp_path / "main_rank"))
    assert {"tokenizer.json", "preprocessor_config.json", "model.safetensors"} <= written


def test_a_full_export_carries_the_input_files_once(tiny_checkpoint, tmp_path, caplog):
    """A full fine-tuning export (``export_trained``): the trainer's save carries the input's files after writing the
    tokenizer, and the export's finishing steps do not carry (and log) them a second time. Every carried file is in
    the output, byte for byte, beside the weights and the input's config."""
    from sc_tune.export import export_trained

    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), source)
    _write(source, "README.md", "the model card")  # a file the export writes nothing of its own for
    trainer = make_trainer(str(source), str(tmp_path / "run"))
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="sc_tune.export"):
        export_trained(trainer, str(out), str(source), use_lora=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("carried ")]
    staging = out / checkpoints.EXPORT_STAGING  # written there, then swapped in (sc_tune.export.commit_export)
    assert len(lines) == 1 and lines[0].endswith(f"into {staging}"), lines
    names = sorted(n for n in os.listdir(source) if os.path.isfile(source / n) and is_carried(n))
    assert "README.md" in names and "tokenizer.json" in names
    assert lines[0] == f"carried {', '.join(names)} from {source} into {staging}"
    for name in names:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert (out / "model.safetensors").exists()
    assert (out / "config.json").read_bytes() == (source / "config.json").read_bytes()


def test_a_quantised_inputs_config_is_carried_without_its_quantisation(tmp_path):
    """The merge loads the base unquantised and writes full-precision weights: the input's quantization_config
    no longer applies and is left out of the carried config (everything else kept)."""
    from sc_tune.export import carry_source_config

    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    released = {"model_type": "qwen2_5_vl", "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "awq"}}
    (source / "config.json").write_text(json.dumps(released))
    (out / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "dtype": "bfloat16"}))
    carry_source_config(str(out), str(source))
    assert json.loads((out / "config.json").read_text()) == {"model_type": "qwen2_5_vl", "torch_dtype": "bfloat16"}


# ---------------------------------------------------------------------------------------------- staged exports
def _export_files(folder, shards: int, value: float, extra=("config.json",)):
    """A model folder's files as an export writes them: ``shards`` safetensors files (an index past one), filled
    with ``value``."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    names = ["model.safetensors"] if shards == 1 else [f"model-{i:05d}-of-{shards:05d}.safetensors"
                                                         for i in range(1, shards + 1)]
    for i, name in enumerate(names):
        save_file({f"w{i}": torch.full((2,), value)}, os.path.join(folder, name))
    if shards > 1:
        _write(folder, "model.safetensors.index.json", json.dumps({"weight_map": {f"w{i}": n for i, n in enumerate(names)}}))
    for name in extra:
        _write(folder, name, f"{name} of the export of {value}")
    return names


def _run_files(out):
    """What a training run keeps in its output folder beside the export: never touched by an export."""
    os.makedirs(out / "checkpoint-2")
    _write(out / "checkpoint-2", "trainer_state.json", "{}")
    _write(out, "trainer_state.json", "{}")


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "unrecorded"])
def test_an_export_replaces_exactly_the_earlier_export(tmp_path, recorded):
    """The new export's files replace the earlier export's, and the earlier one's other shards go (a 3-shard model
    re-exported as one file must not leave two stale shards): by the earlier record, or, for an export written
    before records, by transformers' weight-file names. The run's own files stay."""
    from sc_tune.export import commit_export, export_staging

    out = tmp_path / "run"
    _run_files(out)
    _export_files(out, 3, 1.0, extra=("config.json", "special_tokens_map.json"))
    if recorded:
        old = sorted(n for n in os.listdir(out) if n.startswith(("model", "config", "special")))
        _write(out, checkpoints.EXPORT_RECORD, json.dumps({"complete": True, "files": old, "step": 2}))
    new = _export_files(export_staging(str(out)), 1, 2.0)
    assert commit_export(str(out), step=4) == sorted([*new, "config.json"])
    kept = {"checkpoint-2", "trainer_state.json", checkpoints.EXPORT_RECORD, "model.safetensors", "config.json"}
    # Unrecorded, the earlier export's tokenizer-like file is not known to be the export's: it stays.
    assert set(os.listdir(out)) == kept | (set() if recorded else {"special_tokens_map.json"})
    assert json.loads((out / checkpoints.EXPORT_RECORD).read_text()) == {
        "complete": True, "files": ["config.json", "model.safetensors"], "step": 4}
    assert (out / "config.json").read_text() == "config.json of the export of 2.0"
    assert checkpoints.model_folder_problems(str(out)) == []


def test_a_kill_during_an_export_leaves_the_earlier_one_and_says_so(tmp_path, monkeypatch):
    """Killed while writing (the staging folder is left): the earlier export is whole and the model-folder check
    says whose it is. Killed while swapping (the record says incomplete): refused as a mix. The next export
    replaces either and is loadable."""
    from sc_tune import export
    from sc_tune.export import commit_export, export_staging

    out = tmp_path / "run"
    _run_files(out)
    _export_files(export_staging(str(out)), 2, 1.0)
    commit_export(str(out), step=2)
    earlier = sorted(os.listdir(out))

    _export_files(export_staging(str(out)), 2, 2.0)  # written, never swapped in
    assert sorted(os.listdir(out)) == sorted([*earlier, checkpoints.EXPORT_STAGING])
    with pytest.raises(checkpoints.CheckpointError, match=r"an export into this folder did not finish .*the model "
                       r"files here are the earlier export's \(step 2\).*rerun its training command with "
                       r"--resume_from_checkpoint True to write the export again from checkpoint-2$"):
        checkpoints.check_model_folder(str(out))

    moved = []
    real_replace = os.replace

    def killed_after_three(src, dst):
        if len(moved) == 3:
            raise KeyboardInterrupt("killed")  # no cleanup runs after a kill
        moved.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        commit_export(str(out), step=4)
    monkeypatch.undo()
    with pytest.raises(checkpoints.CheckpointError, match="cut short while it replaced the earlier one"):
        checkpoints.check_model_folder(str(out))

    _export_files(export_staging(str(out)), 2, 3.0)
    commit_export(str(out), step=4)
    checkpoints.check_model_folder(str(out))
    assert sorted(os.listdir(out)) == earlier
    from safetensors.torch import load_file

    assert all(torch.equal(t, torch.full((2,), 3.0)) for name in os.listdir(out) if name.endswith(".safetensors")
               for t in load_file(str(out / name)).values())
