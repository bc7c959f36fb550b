"""The library's structure, checked from its source: no import cycles (imports inside functions
count), layers import only downward, nothing reaches into another object's private members, no
library file over 400 lines, and ldm never imports the UI's libraries."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LDM = ROOT / "ldm"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LDM.rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """Every ldm module `name` imports, at any depth of the file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = modules()
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from . import x` imports the submodule x; `from .m import y` imports m (and m.y if a module).
            targets = ([base] if node.module else []) + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path) for name, path in modules().items()}


def test_no_import_cycles_even_inside_functions():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(g[node]):
            # A package importing its own submodules (re-exports) is not a cycle through the package.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else trail + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(g):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_tasks_and_extensions_import_only_downward():
    g = graph()
    upward = {"ldm", "ldm.pipeline"}
    for name, deps in g.items():
        if name.startswith(("ldm.tasks", "ldm.extensions", "ldm.engine", "ldm.denoise", "ldm.family")):
            assert not (deps & upward), f"{name} imports {deps & upward}"
        if name.startswith("ldm.tasks."):
            others = {d for d in deps if d.startswith("ldm.tasks.")}
            assert not others, f"{name} imports another task: {others}"
        if name.startswith("ldm.extensions"):
            assert not {d for d in deps if d.startswith("ldm.tasks")}, f"{name} imports a task"


def test_no_private_member_of_another_object_is_used():
    offenders = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                offenders.append(f"{name}:{node.lineno} .{node.attr}")
    assert offenders == []


def test_library_never_imports_ui_libraries_or_the_tools():
    for name, path in modules().items():
        if name == "ldm.__main__":  # the command line is the one place that parses arguments
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for n in names:
                assert n.split(".")[0] not in ("gradio", "fastapi", "argparse", "ui", "ldm_tools"), f"{name} imports {n}"


@pytest.mark.parametrize("path", sorted(LDM.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_files_are_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def ui_files() -> list[Path]:
    return [*sorted((ROOT / "ui").rglob("*.py")), ROOT / "app.py"]  # ui/sdapi/ too


def test_ui_uses_no_private_members_outside_the_gradio_adapter():
    offenders = []
    for path in ui_files():
        if path.name == "gradio_compat.py":  # the one place that may reach into Gradio, version-pinned
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert offenders == []


def test_ui_and_app_do_not_probe_the_library_for_features():
    """Features that always exist are called, not looked up: no getattr/hasattr on ldm or a pipeline,
    no signature inspection of ldm functions."""
    offenders = []
    for path in ui_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = ast.unparse(node.func)
            target = ast.unparse(node.args[0])
            if func in ("getattr", "hasattr") and (target == "ldm" or "pipe" in target):
                offenders.append(f"{path.name}:{node.lineno} {func}({target}, ...)")
            if func.endswith("signature") and target.startswith("ldm"):
                offenders.append(f"{path.name}:{node.lineno} {func}({target})")
    assert offenders == []
