"""The import rules of the layers (docs/architecture.md), checked on the
source: every import, at module level or inside a function."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "transparent_dist"

# Layer -> the package's layers it may import (itself included).
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "tf": {"core", "data", "tf"},
    "adapters": {"core", "data", "tf", "adapters"},
    "runtime": {"core", "data", "tf", "adapters", "runtime"},
}
# Framework imports a layer must never make.
FORBIDDEN = {
    "core": ("tensorflow", "keras", "tf_keras"),
    "data": ("tensorflow", "keras", "tf_keras"),
    "tf": ("keras", "tf_keras"),
}
# Each framework's private modules: imported in one file of the package.
PRIVATE = {
    "keras.src": "adapters/keras3.py",
    "tf_keras.src": "adapters/tf_keras.py",
    "tensorflow.python": "tf/internals.py",
}


def _imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "transparent_dist":
                names += [f"transparent_dist.{alias.name}" for alias in node.names]
    return names


def _layer(path: pathlib.Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 and parts[0] in ALLOWED else None


def _modules():
    return [p for p in sorted(PACKAGE.rglob("*.py")) if _layer(p) is not None]


def test_every_module_sits_in_a_layer():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    # The public face only: the API, `python -m`, and the two drop-in aliases.
    assert top == ["__init__.py", "__main__.py", "keras.py", "tensorflow.py"]


def test_layers_import_only_downwards():
    wrong = []
    for path in _modules():
        layer = _layer(path)
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "transparent_dist" and len(parts) > 1 and parts[1] in ALLOWED:
                if parts[1] not in ALLOWED[layer]:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
            if parts[0] in FORBIDDEN.get(layer, ()):
                wrong.append(f"{path.relative_to(PACKAGE)} ({layer}) imports {name}")
    assert wrong == []


def test_each_frameworks_private_modules_are_imported_in_one_place():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        where = str(path.relative_to(PACKAGE))
        for name in _imports(path):
            for private, home in PRIVATE.items():
                if (name == private or name.startswith(private + ".")) and where != home:
                    wrong.append(f"{where} imports {name} (only {home} may)")
    assert wrong == []


def test_no_import_cycles_at_module_level():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("transparent_dist", *path.relative_to(PACKAGE).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        edges = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("transparent_dist"):
                    edges.add(node.module)
                    edges |= {f"{node.module}.{a.name}" for a in node.names}
        graph[module] = edges
    graph = {m: {e for e in edges if e in graph and e != m} for m, edges in graph.items()}
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # A package's __init__ importing its own submodules is not a cycle of logic.
    cycles = [c for c in cycles if not all(m.startswith(c[0]) for m in c)]
    assert cycles == []
