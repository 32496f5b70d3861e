"""The start-up check of the installed stack: a torchvision that cannot load beside this torch is named, with the fix,
before transformers' imports fail with an error that names neither package."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sc_tune.environment import EnvironmentProblem, check_torchvision


def _torchvision_on_path(monkeypatch, tmp_path, body: str) -> None:
    """A package named ``torchvision`` on ``sys.path`` whose import runs ``body``, found before any installed one."""
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)


def test_a_torchvision_that_fails_to_load_is_named_with_its_first_line_and_the_fix(monkeypatch, tmp_path):
    # The error a CUDA torchvision gives beside the CPU torch, with a second line that must not reach the message.
    _torchvision_on_path(monkeypatch, tmp_path, """
        raise RuntimeError("operator torchvision::nms does not exist\\nsee the traceback above")
    """)
    import torch

    with pytest.raises(EnvironmentProblem) as caught:
        check_torchvision()
    message = str(caught.value)
    assert message.startswith(f"torchvision is installed but does not load with torch {torch.__version__} "
                              "(RuntimeError: operator torchvision::nms does not exist); ")
    assert "see the traceback" not in message
    assert "`pip uninstall torchvision`" in message
    # A SystemExit: the scripts end with this message and no traceback.
    assert isinstance(caught.value, SystemExit)


def test_a_torchvision_that_fails_without_a_message_is_still_named(monkeypatch, tmp_path):
    _torchvision_on_path(monkeypatch, tmp_path, "raise ImportError()\n")
    with pytest.raises(EnvironmentProblem, match=r"\(ImportError: \); transformers imports it"):
        check_torchvision()


def test_no_torchvision_or_one_that_loads_passes(monkeypatch, tmp_path):
    _torchvision_on_path(monkeypatch, tmp_path, "LOADED = True\n")
    check_torchvision()
    assert sys.modules["torchvision"].LOADED
    monkeypatch.delitem(sys.modules, "torchvision")
    # No torchvision anywhere: nothing to check. The import machinery is asked, not the installed packages, so the
    # check runs without importing torchvision at all.
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "torchvision" else object())
    check_torchvision()
    assert "torchvision" not in sys.modules


@pytest.mark.parametrize("script", ["finetune.py", "evaluate.py"])
def test_the_scripts_stop_on_a_broken_torchvision_before_importing_transformers(tmp_path, script):
    # Without the check, transformers' import fails with "Could not import module ..." and a traceback.
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(root)]))
    done = subprocess.run([sys.executable, str(root / script), "--help"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "torchvision is installed but does not load with torch" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
