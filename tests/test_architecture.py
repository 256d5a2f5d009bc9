"""The layering rules of the package, checked on its source with the ``ast`` module.

* No module uses a private name (``_x``) defined in another mfac module, as an attribute of anything
  but ``self``/``cls``, and no module imports one: layers talk through public methods only.
* No import cycles among mfac modules (imports inside functions count too).
* No module over 450 lines, no function over 90.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "mfac"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 90


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    modules = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, ast.parse(path.read_text(), str(path)))
    return modules


MODULES = _modules()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> set[str]:
    """mfac modules imported by ``module`` (a name imported from a package that is itself a module
    counts as that module)."""
    path, tree = MODULES[module]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


def test_private_names_stay_in_their_module():
    defined = {name: _defined_names(tree) for name, (_, tree) in MODULES.items()}
    crossings = []
    for module, (path, tree) in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                if node.attr in defined[module]:
                    continue
                owners = sorted(other for other, names in defined.items() if node.attr in names)
                if owners:
                    crossings.append(f"{path.name}:{node.lineno} uses {node.attr} of {', '.join(owners)}")
            elif isinstance(node, ast.ImportFrom):
                crossings += [f"{path.name}:{node.lineno} imports {alias.name}" for alias in node.names
                              if _is_private(alias.name)]
    assert not crossings, "private names used across modules:\n" + "\n".join(crossings)


def test_no_import_cycles():
    graph = {module: _imports(module) for module in MODULES}
    # A package's __init__ re-exports its modules: an import of the package from inside it is the
    # usual Python idiom only when the package does not import back; so every edge counts.
    state, stack, cycles = defaultdict(int), [], []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state[target] == 1:
                cycle = stack[stack.index(target):] + [target]
                if not all(name == target or name.startswith(target + ".") or target.startswith(name + ".")
                           for name in cycle[:-1]):
                    cycles.append(" -> ".join(cycle))
            elif state[target] == 0:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_sizes(module):
    path, tree = MODULES[module]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path} has {lines} lines (at most {MAX_MODULE_LINES}): split it by job"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"
