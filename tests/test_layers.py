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
# Each framework's private modules: imported only in the files named (Keras
# 3's: its backend-neutral adapter and its backend's; the backend's own
# modules only in the backend's file).
PRIVATE = {
    "keras.src": ("adapters/keras3.py", "adapters/keras3_tensorflow.py"),
    "keras.src.backend.tensorflow": ("adapters/keras3_tensorflow.py",),
    "tf_keras.src": ("adapters/tf_keras.py",),
    "tensorflow.python": ("tf/internals.py",),
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
            for private, homes in PRIVATE.items():
                if (name == private or name.startswith(private + ".")) and where not in homes:
                    wrong.append(f"{where} imports {name} (only {', '.join(homes)} may)")
    assert wrong == []


def _module_name(path: pathlib.Path) -> str:
    module = ".".join(("transparent_dist", *path.relative_to(PACKAGE).with_suffix("").parts))
    return module.removesuffix(".__init__")


def _import_graph(lazy: bool) -> dict[str, set[str]]:
    """Module -> the package's modules it imports: at module level only, or
    (`lazy`) anywhere, inside functions too."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree) if lazy else tree.body
        edges = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("transparent_dist"):
                    edges.add(node.module)
                    edges |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("transparent_dist")}
        graph[_module_name(path)] = edges
    return {m: {e for e in edges if e in graph and e != m} for m, edges in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
    return [c for c in cycles if not all(m.startswith(c[0]) for m in c)]


def test_no_import_cycles_at_module_level():
    assert _cycles(_import_graph(lazy=False)) == []


def test_no_import_cycles_through_lazy_imports():
    """An import inside a function hides a cycle from Python, not from the
    design: `collectives -> stall -> sequence -> collectives` was one."""
    assert _cycles(_import_graph(lazy=True)) == []


# Only these files talk to MPI (docs/architecture.md, "who owns the communicator?").
MPI_HOMES = {"core/world.py", "core/collectives.py"}
# mpi4py's methods of a communicator, a request and the MPI module.
MPI_METHODS = {
    "Abort", "Allgather", "Allgatherv", "Allreduce", "Barrier", "Bcast", "Create_keyval",
    "Delete_attr", "Dup", "Free", "Free_keyval", "Gather", "Get_rank", "Get_size", "Iprobe",
    "Irecv", "Is_finalized", "Isend", "Probe", "Recv", "Send", "Set_attr", "Split",
    "Split_type", "Test", "Wait", "allgather", "allreduce", "bcast", "gather", "scatter",
}  # fmt: skip


def _raw_mpi(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("mpi4py")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mpi4py"):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Name) and node.id == "MPI":
            found.append("MPI")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            # Our own wrappers, and TensorFlow's or the native op's gather / allreduce.
            ours = isinstance(owner, ast.Name) and owner.id in {"collectives", "native", "op", "tf"}
            if node.func.attr in MPI_METHODS and not ours:
                found.append(f".{node.func.attr}(")
    return [f"{path.relative_to(PACKAGE)}:{what}" for what in found]


def test_mpi_is_called_only_through_world_and_collectives():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if str(path.relative_to(PACKAGE)) not in MPI_HOMES:
            wrong += _raw_mpi(path)
    assert wrong == []


def test_every_keras_backend_named_in_activation_has_its_adapter():
    from transparent_dist.runtime import activation

    for name, module in activation.KERAS_BACKENDS.items():
        path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
        assert path.exists(), f"{name}: {module} missing"
        assert "\ndef install() -> None:" in path.read_text(), f"{name}: {module} has no install()"
