"""The package's arrows point one way (DESIGN.md §1), checked on the source of every module, lazy
imports inside functions included:

    cli, pipeline_plan → serving → training → evaluation → model → data → data_contracts

and neither ``relevance`` nor ``data_contracts`` imports Prefect or ``pipelines`` (``relevance/cli/``
aside, which may start a flow, lazily, inside a command). No two modules import each other, directly
or around a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK = {"settings": 0, "data": 1, "model": 2, "evaluation": 3, "training": 4, "serving": 5, "pipeline_plan": 6,
        "cli": 7}


def modules() -> dict[str, Path]:
    found = {}
    for package in ("relevance", "data_contracts", "pipelines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, lazy?) for every import statement; lazy = inside a function."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.append((child.module, lazy))
                out.extend((f"{child.module}.{a.name}", lazy) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return out


def layer(module: str) -> int | None:
    parts = module.split(".")
    return RANK.get(parts[1]) if parts[0] == "relevance" and len(parts) > 1 else None


def test_arrows_point_one_way():
    mods = modules()
    bad = []
    for name, path in mods.items():
        for target, lazy in imports(path):
            top = target.split(".")[0]
            if name.startswith(("relevance", "data_contracts")) and top in ("prefect", "pipelines"):
                if not (name.startswith("relevance.cli") and lazy):
                    bad.append(f"{name} imports {target}" + ("" if lazy else " at module level"))
            if name.startswith("data_contracts") and top == "relevance":
                bad.append(f"{name} imports {target}")
            src, dst = layer(name), layer(target)
            if src is not None and dst is not None and dst > src:
                bad.append(f"{name} (layer {src}) imports {target} (layer {dst})")
    assert bad == []


def test_no_import_cycles():
    mods = modules()
    graph = {name: sorted({t for t, _ in imports(path) if t in mods and t != name}) for name, path in mods.items()}
    for name in graph:  # `import a.b` also runs a's __init__, which never imports its children here
        graph[name] = [t for t in graph[name] if not name.startswith(t + ".")]
    cycles, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            walk(name, [name])
    assert cycles == []


def test_every_relevance_subpackage_has_a_layer():
    packages = {p.name for p in (ROOT / "relevance").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules_ = {p.stem for p in (ROOT / "relevance").glob("*.py") if p.stem != "__init__"}
    assert packages | modules_ == set(RANK)
