"""Imports point one way: every module of the package imports only from its own layer or the layers below,
never above (not even lazily inside a function or for type checking), and no two modules import each other.

    core -> components -> model -> weights -> api -> apps

The package's imports are read statically (``ast``), so the test costs no import and names the offending
line. Imports of other packages are not looked at: a third-party library imported lazily is fine."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "almtok_jax"

LAYERS = ("core", "components", "model", "weights", "api", "apps")

# Module path (relative to almtok_jax/, "/" separated; a folder ends in "/") -> layer. The longest matching
# entry wins; a module that matches none fails the test, so a new module is placed on purpose.
LAYER_OF = {
    "compat.py": "core",
    "finite.py": "core",
    "flops.py": "core",
    "folder_swap.py": "core",
    "typed_config.py": "core",
    "layers.py": "core",
    "mapping.py": "core",
    "audio.py": "core",
    "component.py": "core",
    "experts/": "components",
    "quantizer/": "components",
    "flow/": "components",
    "sqcodec.py": "components",
    "config.py": "model",
    "model.py": "model",
    "pipeline.py": "model",
    "weights/": "weights",
    "__init__.py": "api",  # the package's own ``from almtok_jax import ALMTokenizer2``
    "tokenizer.py": "api",
    "records.py": "api",
    "metrics.py": "api",
    "cli/": "apps",
    "train/": "apps",
    "golden/": "apps",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(path: Path) -> str | None:
    relative = path.relative_to(PACKAGE).as_posix()
    matches = [p for p in LAYER_OF if relative == p or (p.endswith("/") and relative.startswith(p))]
    return LAYER_OF[max(matches, key=len)] if matches else None


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a package module anywhere in ``path`` (module level, inside
    functions, under ``TYPE_CHECKING``); ``from X import name`` counts as an import of ``X.name`` when that is a
    module, else of ``X``."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target)
                      for a in node.names]
    resolved = []
    for line, name in found:
        while name and name not in modules:  # ``import almtok_jax.a.b`` of a module: itself; else its package
            name = name.rpartition(".")[0]
        if name:
            resolved.append((line, name))
    return resolved


def test_every_module_has_a_layer():
    unplaced = [p.relative_to(PACKAGE).as_posix() for p in package_modules().values() if layer_of(p) is None]
    assert not unplaced, f"modules with no layer (add them to LAYER_OF in {Path(__file__).name}): {unplaced}"


def test_imports_point_down():
    modules = package_modules()
    upward = []
    for name, path in modules.items():
        layer = layer_of(path)
        for line, target in imported_modules(path, modules):
            target_layer = layer_of(modules[target])
            if layer and target_layer and LAYERS.index(target_layer) > LAYERS.index(layer):
                upward.append(f"almtok_jax/{path.relative_to(PACKAGE).as_posix()}:{line}: {name} ({layer}) imports "
                              f"{target} ({target_layer})")
    assert not upward, "imports pointing up the layers " + " -> ".join(LAYERS) + ":\n" + "\n".join(upward)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), by
    Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while not members or members[-1] != node:
                members.append(stack.pop())
            if len(members) > 1 or node in graph[node]:
                cycles.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle():
    modules = package_modules()
    graph = {name: {t for _, t in imported_modules(path, modules)} for name, path in modules.items()}
    cycles = import_cycles(graph)
    assert not cycles, "modules importing each other (directly or around a loop):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_loops():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
