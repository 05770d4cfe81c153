"""The package's import graph: no cycles between modules, and the layers point one way.

Every import counts, also those inside functions (a lazy import hides a cycle; it does not remove
it). Serving, inference and export never reach the training package, not even through another
module; the model's code reaches none of the workflows built on it."""

import ast
from pathlib import Path

import g3n

SRC = Path(g3n.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the g3n modules it imports (an imported name that is a module counts as that module)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "g3n"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                if base.split(".")[0] != "g3n":
                    continue
                for alias in node.names:
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _reachable(graph, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


FORBIDDEN = {  # package: packages it must not reach, directly or through others
    "g3n.serve": ("g3n.train",),
    "g3n.inference": ("g3n.train", "g3n.serve", "g3n.export"),
    "g3n.export": ("g3n.train", "g3n.serve", "g3n.inference"),
    "g3n.adapters": ("g3n.train", "g3n.serve", "g3n.inference", "g3n.export"),
    "g3n.kernels": ("g3n.model", "g3n.train", "g3n.serve", "g3n.inference", "g3n.export", "g3n.matformer"),
    "g3n.model": ("g3n.train", "g3n.serve", "g3n.inference", "g3n.export", "g3n.adapters"),
    "g3n.checkpoint": ("g3n.train", "g3n.serve", "g3n.inference", "g3n.export", "g3n.adapters"),
}


def test_layers_point_one_way():
    graph = import_graph()
    wrong = []
    for module in graph:
        for package, banned in FORBIDDEN.items():
            if _in(module, package):
                wrong += [
                    f"{module} -> {dep}"
                    for dep in sorted(_reachable(graph, module))
                    if any(_in(dep, b) for b in banned)
                ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_graph_sees_lazy_and_relative_imports():
    """The checks above would pass vacuously if the walker missed imports."""
    graph = import_graph()
    assert "g3n.inference.engine" in graph["g3n.inference.generate"]  # top-level
    assert "g3n.train.loop" in _reachable(graph, "g3n.cli")  # inside a function
    assert "g3n.model.text" in graph["g3n.model.load"]
