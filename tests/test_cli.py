import dataclasses
import subprocess
import sys

from transformers import TrainingArguments

from sc_tune.arguments import DataArguments, LoraArguments, ModelArguments, SCTuneConfig
from tests.conftest import ROOT


def test_help_documents_every_sc_tune_knob():
    out = subprocess.run([sys.executable, "finetune.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120).stdout
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    ours = [f for cls in (ModelArguments, DataArguments, LoraArguments) for f in dataclasses.fields(cls)]
    overridden = {"max_steps", "adam_beta2", "weight_decay", "save_steps"}  # reference defaults
    ours += [f for f in dataclasses.fields(SCTuneConfig) if f.name not in base or f.name in overridden]
    assert len(ours) >= 32
    for f in ours:
        assert f.metadata.get("help"), f"{f.name} has no help text"
        assert f"--{f.name}" in out, f"--{f.name} missing from finetune.py --help"
