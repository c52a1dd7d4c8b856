"""The package's shape, read from its source (ast, nothing executed): every import, deferred and
type-only ones included, goes from a room to a lower room or within a room, and no module
imports itself back through any chain.

The rooms, bottom to top (docs/design.md has what each holds):

    config                                       0
    runtime, ops, testing                        1
    models, data                                 2
    checkpoint                                   3
    pipeline                                     4
    teachers, rollout, serve                     5
    algorithms                                   6
    trainer                                      7
    commands (commands/, train.py, quickstart/)  8

Rooms of one level do not import each other (teachers and rollout are independent; serve
is the teacher server, which no trainer code needs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_opd"

LEVELS = {
    "config": 0,
    "runtime": 1, "ops": 1, "testing": 1,
    "models": 2, "data": 2,
    "checkpoint": 3,
    "pipeline": 4,
    "teachers": 5, "rollout": 5, "serve": 5,
    "algorithms": 6,
    "trainer": 7,
    "commands": 8,
}
# The package's __init__ runs before any room; it may only silence Megatron's import notices.
PACKAGE_INIT_MAY_IMPORT = {"megatron_opd.runtime.quiet"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str = "") -> set[str]:
    """Every megatron_opd module `path` (module `name`) imports anywhere (top level, functions,
    TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # `from megatron_opd.x import y` may import the module megatron_opd.x.y
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "megatron_opd" or name.startswith("megatron_opd.")}


# `python -m megatron_opd.train` and the quickstart are commands that live outside commands/
ROOM_OF = {"train": "commands", "quickstart": "commands"}


def room(module: str) -> str:
    parts = module.split(".")
    return ROOM_OF.get(parts[1], parts[1]) if len(parts) > 1 else ""


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # keep only names that are modules (not classes imported from a module)
        graph[name] = {target for target in imported_modules(path) if target in modules and target != name}
    return graph


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for source, targets in sorted(graph.items()):
        if source == "megatron_opd":
            problems += [f"{source} -> {target}" for target in sorted(targets - PACKAGE_INIT_MAY_IMPORT)]
            continue
        source_room = room(source)
        if source_room not in LEVELS:
            problems.append(f"{source}: room {source_room!r} has no level in tests/test_layering.py")
            continue
        for target in sorted(targets):
            target_room = room(target)
            if target_room in ("", source_room):
                continue
            if LEVELS.get(target_room, 99) >= LEVELS[source_room]:
                problems.append(f"{source} ({source_room}, level {LEVELS[source_room]}) -> {target} "
                                f"({target_room}, level {LEVELS.get(target_room)})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_goes_down():
    assert layering_violations(package_graph()) == []


def test_no_import_cycles():
    graph = package_graph()
    # A package importing its own submodules in __init__ is not a cycle of rooms; drop the
    # edges from a package to its children and from children to their package.
    pruned = {source: {target for target in targets
                       if not target.startswith(source + ".") and not source.startswith(target + ".")}
              for source, targets in graph.items()}
    assert cycles(pruned) == []


def test_the_checks_bite(tmp_path):
    """The two checks find an upward import and a cycle in a graph that has them."""
    graph = {"megatron_opd.teachers.local": {"megatron_opd.trainer.trainer"},
             "megatron_opd.trainer.trainer": {"megatron_opd.teachers.local"},
             "megatron_opd.ops.divergence": {"megatron_opd.config.job"}}
    assert layering_violations(graph) == [
        "megatron_opd.teachers.local (teachers, level 5) -> megatron_opd.trainer.trainer (trainer, level 7)"]
    assert cycles(graph) == [["megatron_opd.teachers.local", "megatron_opd.trainer.trainer"]]
    deferred = tmp_path / "module.py"
    deferred.write_text("def f():\n    from megatron_opd.trainer import trainer\n    import megatron_opd.pipeline\n")
    assert {"megatron_opd.trainer", "megatron_opd.trainer.trainer", "megatron_opd.pipeline"} <= imported_modules(deferred, "megatron_opd.x.module")


@pytest.mark.parametrize("room_name", sorted({room(name) for name in package_graph()} - {""}))
def test_every_room_has_a_level(room_name):
    assert room_name in LEVELS
