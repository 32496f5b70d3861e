"""sc_tune's internal imports run one way: down the layers below, with no cycles.

Every ``import`` and ``from ... import`` in every module counts, at module level or inside a function (a lazy
import is still a dependency). The layers, lowest first; a module may import its own layer and the ones below:

1. basics: boxes, jsonio, checks, timing, opening images, the start-up environment check, the run lock (no internal
   imports)
2. method: the box codecs, rewards, PPO, baselines, KL control, phases, the arguments (and the reference's flags)
3. models: the native model code (``sc_tune/models/``) and the vision cache the adapters plug into
4. adapters: the family registry and every family's adapter
5. generation: rollout generation, its decoding loop and the prompt cache, the snapshot, data, checkpoints (and their
   DeepSpeed universal form), model loading, export, stopping on a signal
6. cycle: the rollout stages (``cycle``) and the run state (``resume``)
7. trainer
8. tools: the ``--help`` layout, evaluation, the synthetic benchmark and the tiny-model builders (``sc_tune/tiny/``,
   above the adapters: the adapters never import them)

A module that no layer names fails the test: place it before adding it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = (
    ("basics", {"boxes", "jsonio", "checks", "timing", "images", "environment", "run_lock", "process_exit"}),
    ("method", {"box_codecs", "rewards", "ppo", "baselines", "kl_control", "phases", "arguments", "moe",
                "reference_flags"}),
    ("models", {"models", "attention", "vision_cache"}),
    ("adapters", {"adapters"}),
    ("generation", {"prompt_cache", "decoding", "rollout", "snapshot", "data", "checkpoints", "universal", "modeling",
                    "visualize", "objects365", "export", "preflight", "preemption"}),
    ("cycle", {"cycle", "resume"}),
    ("trainer", {"trainer"}),
    ("tools", {"help_layout", "evaluation", "synthetic", "tiny", "families"}),
)


def module_names(package_dir: Path) -> dict[str, Path]:
    """``sc_tune.x.y`` -> its file, for every module of the package (a package is its ``__init__``)."""
    names = {}
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Each module -> the package's modules it imports (the module an import names, or the submodule a
    ``from package import name`` names)."""
    modules = module_names(package_dir)
    root = package_dir.name
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        # the root package itself is a docstring: ``from sc_tune import checks`` depends on sc_tune.checks only
        graph[name] = {t for t in targets if t in modules and t not in (name, root)}
    return graph


def layer_of(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else ""
    return next((i for i, (_, members) in enumerate(LAYERS) if top in members), None)


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                found.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]})")
    return sorted(found)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules that import each other (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_imports_only_down_its_layers_and_has_no_cycles():
    graph = import_graph(Path(ROOT) / "sc_tune")
    unplaced = sorted(m for m in graph if m != "sc_tune" and layer_of(m) is None)
    assert not unplaced, f"place these modules in a layer of {__name__}.LAYERS: {unplaced}"
    assert len(graph) > 60 and sum(map(len, graph.values())) > 100  # the walk found the package's imports
    assert not upward_edges(graph)
    assert not cycles(graph)


def test_the_check_sees_a_back_edge_a_lazy_import_and_a_cycle(tmp_path):
    package = tmp_path / "sc_tune"
    (package / "adapters").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "adapters" / "__init__.py").write_text("from sc_tune.adapters.base import X\n")
    (package / "adapters" / "base.py").write_text("def f():\n    from sc_tune import trainer\n")  # lazy, upward
    (package / "boxes.py").write_text("import sc_tune.jsonio\n")
    (package / "jsonio.py").write_text("from sc_tune.boxes import box_iou\n")  # a cycle within one layer
    (package / "trainer.py").write_text("from sc_tune.adapters import family_for\n")
    graph = import_graph(package)
    assert graph["sc_tune.adapters.base"] == {"sc_tune.trainer"}
    assert upward_edges(graph) == ["sc_tune.adapters.base (adapters) imports sc_tune.trainer (trainer)"]
    assert sorted(cycles(graph)) == [["sc_tune.adapters", "sc_tune.adapters.base", "sc_tune.trainer"],
                                     ["sc_tune.boxes", "sc_tune.jsonio"]]
