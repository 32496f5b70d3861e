"""The repository is self-contained: every file its code, scripts and docs cite is in it."""

import re
import subprocess
import sys

from pathlib import Path

from tests.conftest import ROOT as ROOT_TEXT

ROOT = Path(ROOT_TEXT)

CITED = re.compile(
    r"(?<![\w/.-])((?:docs|scripts|Qwen-VL-Chat|checkpoints|sc_tune|tests)/[\w./-]*\w\.(?:md|sh|json|py|png))"
)


def tracked_text_files() -> list[str]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in files if f.endswith((".py", ".md", ".sh", ".toml", ".txt"))]


def test_every_cited_file_exists_and_nothing_points_outside():
    missing, outside = [], []
    for name in tracked_text_files():
        text = (ROOT / name).read_text(encoding="utf-8")
        for cited in CITED.findall(text):
            if "*" in cited or "<" in cited:
                continue
            # a Markdown link is relative to its file; everything else to the repository root
            if not ((ROOT / cited).exists() or (ROOT / name).parent.joinpath(cited).exists()):
                missing.append(f"{name} cites {cited}")
        if re.search(r"\.\./shared|shared/docs", text) and name != "tests/test_repository.py":
            outside.append(name)
    assert not missing, missing
    assert not outside, f"these cite notes outside the repository: {outside}"


def test_no_undefined_name_or_unused_import_or_variable():
    """Pyflakes' checks (ruff's F rules) and syntax errors over every Python file: an undefined name in a path the
    tests do not run (an error message, a script's rare branch) would fail only where a user meets it."""
    ruff = Path(sys.executable).with_name("ruff")
    assert ruff.exists(), f"{ruff} is missing: ruff is pinned in requirements.txt (sh scripts/setup_env.sh installs it)"
    result = subprocess.run([str(ruff), "check", "--no-cache", "--select", "F,E9", "--output-format", "concise",
                             "sc_tune", "scripts", "tests", "finetune.py", "evaluate.py"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_map_lists_every_module_and_script():
    """docs/code_map.md says it lists every module and script: a module added, moved or removed without its row
    fails here (a row whose file is gone also fails the test above). A folder row (``sc_tune/models/qwen_vl/``)
    covers the files under it."""
    rows = [line.split("|")[1] for line in (ROOT / "docs" / "code_map.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `")]  # a table row's first cell: its paths (a heading's folder lists nothing)
    listed = {path for cell in rows for path in re.findall(r"`((?:sc_tune|scripts)/[^`\s]*)`", cell)}
    folders = tuple(path for path in listed if path.endswith("/"))
    files = subprocess.run(["git", "ls-files", "sc_tune", "scripts"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    unlisted = [f for f in files if f not in listed and not f.startswith(folders)]
    assert not unlisted, f"docs/code_map.md has no row for {unlisted}"


DOC_TEST_NAME = re.compile(r"(?<!\w)(?:(test_\w+\.py)::)?(test_\w+(?:\*\w*)*(?:\.\.\.)?)")


def test_every_test_the_docs_name_exists():
    """The breakage tables of docs/CONTRIBUTING.md (and the other docs) name the test that catches each breakage,
    as ``test_file.py::test_name``, a bare ``test_name``, or a prefix (``test_name_...``, ``*``): each must be a test
    function of tests/ (of that file, where one is named), so a renamed or removed test cannot leave a row that no
    test backs."""
    import ast
    from fnmatch import fnmatchcase

    defined: dict[str, set[str]] = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                defined.setdefault(node.name, set()).add(path.name)
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    unknown = []
    for doc in docs:
        for code in re.findall(r"`([^`]+)`", doc.read_text(encoding="utf-8")):
            for file_name, name in DOC_TEST_NAME.findall(code):
                if name.endswith(".py"):
                    continue
                if not name.endswith("...") and f"{name}.py" in {p.name for p in (ROOT / "tests").glob("*.py")}:
                    continue  # a test file named without its .py
                pattern = name.replace("...", "*")
                if not any(fnmatchcase(test, pattern) and (not file_name or file_name in files)
                           for test, files in defined.items()):
                    unknown.append(f"{doc.relative_to(ROOT)}: {file_name + '::' if file_name else ''}{name}")
    assert not unknown, f"the docs name tests that do not exist: {unknown}"


def _finetune_defaults() -> dict:
    """finetune.py's flags (names and aliases, without dashes) -> their dataclass defaults."""
    import dataclasses

    from sc_tune.arguments import DataArguments, LoraArguments, ModelArguments, SCTuneConfig

    defaults = {}
    for cls in (ModelArguments, DataArguments, LoraArguments, SCTuneConfig):
        for f in dataclasses.fields(cls):
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default
            for name in (f.name, *(alias.lstrip("-") for alias in f.metadata.get("aliases", []))):
                defaults[name] = value
    return defaults


def _documented_value_matches(text: str, default) -> bool:
    """One documented default (``200``, ``5e-7``, ``off``, ``True``, ``snapshot_greedy``, ``the checkpoint's``)."""
    text = text.strip().strip("`").removesuffix(" (off)")
    if text in ("off", "False"):
        return default in (False, None, 0)
    if text in ("on", "True"):
        return default is True
    if text == "none" or text.startswith(("the ", "per ")):  # "the checkpoint's", "per family": decided at run time
        return default is None
    if isinstance(default, str):
        return text == default
    return isinstance(default, (int, float)) and not isinstance(default, bool) and float(text) == default


def _documented_table(doc: str, heading: str, columns: int = 1) -> list[tuple[str, list[str]]]:
    """``(flag, [its value in each of the table's first columns])`` for each flag of the table under ``heading`` in
    ``docs/<doc>`` (up to the next heading). A cell of one value gives it to every flag of its row
    (`` `--a`, `--b` | 2, 0.2 `` or `` | True ``)."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    table = text.split(heading, 1)[1].split("\n#", 1)[0]
    documented = []
    for line in table.splitlines():
        if not line.startswith("| `--"):
            continue
        flags_cell, *value_cells = line.split("|")[1:2 + columns]
        flags = re.findall(r"`--(\w+)`", flags_cell)
        per_column = []
        for cell in value_cells:
            values = re.split(r" / |, ", cell.strip())
            values = values * len(flags) if len(values) == 1 else values
            assert len(values) == len(flags), f"docs/{doc}: {flags_cell}| {cell}: not one value per flag"
            per_column.append(values)
        documented += [(flag, [values[i] for values in per_column]) for i, flag in enumerate(flags)]
    return documented


def test_the_documented_defaults_are_the_codes():
    """docs/method.md states each knob's default inline (`` `--kl_coef` = 0.01 ``) and docs/usage.md in its knob table
    (`` `--ppo_epochs`, `--clip_range` | 2, 0.2 ``): each must be finetune.py's default, so a default changed in
    sc_tune/arguments.py, or a doc edited alone, fails here."""
    defaults = _finetune_defaults()
    wrong = []
    method = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    stated = re.findall(r"`--(\w+)`\s*(?:=\s*)?(\d[\d.e+-]*)", method)
    assert len(stated) >= 15, stated  # the pattern still finds the inline defaults
    for flag, value in stated:
        if not _documented_value_matches(value.rstrip("."), defaults[flag]):
            wrong.append(f"docs/method.md: --{flag} {value.rstrip('.')}, code {defaults[flag]!r}")
    knobs = _documented_table("usage.md", "### The knobs")
    assert len(knobs) >= 40, knobs
    for flag, (value,) in knobs:
        if not _documented_value_matches(value, defaults[flag]):
            wrong.append(f"docs/usage.md: --{flag} {value.strip()}, code {defaults[flag]!r}")
    assert not wrong, wrong


def test_the_documented_evaluation_defaults_are_the_codes():
    """docs/usage.md's table of evaluate.py's knobs: each default must be EvaluationArguments' (the generation budgets
    are training's, read through sc_tune.evaluation.runner), and every knob of evaluate.py but its inputs (the four
    required flags and ``--image_folder``) has a row."""
    import dataclasses

    import evaluate

    defaults = {}
    for f in dataclasses.fields(evaluate.EvaluationArguments):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
    documented, wrong = set(), []
    for flag, (value,) in _documented_table("usage.md", "### Evaluation knobs"):
        documented.add(flag)
        if flag not in defaults or not _documented_value_matches(value, defaults[flag]):
            wrong.append(f"docs/usage.md: --{flag} {value.strip()}, code {defaults.get(flag, 'no such knob')!r}")
    assert not wrong, wrong
    assert documented == set(defaults) - {"image_folder"}, set(defaults) ^ documented


def test_the_benchmarks_documented_settings_are_the_codes():
    """docs/benchmark.md's table of the benchmark's SC-Tune settings: the benchmark column must be
    ``SC_TUNE_ARGS``' values and the reference column finetune.py's defaults (where it names one: the reference's
    batch is its launch's, 16 x 8 GPUs); every flag of ``SC_TUNE_ARGS`` that changes what is learnt and differs from
    its default has a row."""
    from sc_tune.synthetic.pipeline import SC_TUNE_ARGS

    defaults = _finetune_defaults()
    settings = _documented_table("benchmark.md", "## SC-Tune settings of the benchmark", columns=2)
    assert len(settings) >= 12, settings
    documented, wrong = set(), []
    for flag, (benchmark, reference) in settings:
        documented.add(flag)
        if not _documented_value_matches(benchmark, SC_TUNE_ARGS[flag]):
            wrong.append(f"benchmark --{flag} {benchmark.strip()}, SC_TUNE_ARGS {SC_TUNE_ARGS[flag]!r}")
        if "GPUs" not in reference and not _documented_value_matches(reference, defaults[flag]):
            wrong.append(f"reference --{flag} {reference.strip()}, finetune.py {defaults[flag]!r}")
    assert not wrong, wrong
    differing = {flag for flag, value in SC_TUNE_ARGS.items() if flag in defaults and defaults[flag] != value}
    bookkeeping = {"logging_steps", "save_steps"}  # how often it logs and saves, not what it learns
    assert differing - documented - bookkeeping == set(), differing - documented


def test_committed_warm_starts_answer_in_todays_answer_form(tmp_path):
    """A warm start built before its family's answer form changed writes boxes no codec reads: the benchmark then
    measures parse failures. Each committed warm start's locator must write boxes that parse, for held-out captions."""
    from sc_tune.images import load_rgb
    from sc_tune.jsonio import read_json
    from sc_tune.modeling import load_model_and_adapter
    from sc_tune.rollout import locate
    from sc_tune.synthetic.evaluate import LOCATE
    from sc_tune.synthetic.shapes import write_split

    write_split(tmp_path, "heldout", 3, seed=5)
    records = read_json(tmp_path / "heldout.json")[:6]
    for folder in ("warm_start", "warm_start_qwen3_5", "warm_start_internvl"):
        model, adapter = load_model_and_adapter(str(ROOT / "checkpoints" / folder))
        images = [adapter.prepare_image(load_rgb(str(tmp_path / r["image"]))) for r in records]
        boxes, texts = locate(model.eval(), adapter, images, [r["caption"] for r in records], LOCATE)
        parsed = sum(box is not None for box in boxes)
        assert parsed >= len(records) - 1, f"checkpoints/{folder}: {len(records) - parsed} unparsed, e.g. {texts[0]!r}"


def test_committed_warm_starts_load_as_their_architecture():
    # scripts/benchmark.py --warm_start takes either folder; each must load through the registry as the
    # family its warm_start.json records.
    from sc_tune.jsonio import read_json
    from sc_tune.modeling import load_model_and_adapter

    for folder in ("warm_start", "warm_start_qwen3_5", "warm_start_internvl"):
        path = ROOT / "checkpoints" / folder
        recorded = read_json(path / "warm_start.json")["config"]
        model, _ = load_model_and_adapter(str(path))
        assert model.config.model_type == recorded.get("model_type", "qwen3_vl")
        if recorded.get("text_layer_types"):  # a hybrid family built with another layer pattern
            assert model.config.text_config.layer_types == recorded["text_layer_types"].split(",")
        # the evaluations documented in docs/benchmark.md end at the step that was committed
        assert read_json(path / "history.json")[-1]["step"] == read_json(path / "warm_start.json")["metrics"]["step"]
