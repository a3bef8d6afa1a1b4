"""The layers' import rules, read from the source (every import, function-level ones included):
what may import what, no import circles, and no torch under the runtime.

The rules and their reasons are in docs/architecture.md.
"""
import ast
from pathlib import Path

import pytest

from sam_onnx.families import FAMILIES

PACKAGE = Path(__file__).resolve().parents[1] / "sam_onnx"
TORCH = {"torch", "torchvision", "segment_anything", "onnxscript", "onnx_ir"}


def _module_name(path: Path) -> str:
    parts = ["sam_onnx", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str):
    """(imported module, line) for every import in the module, resolved to absolute names;
    ``from package import module`` counts as importing the module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                full = f"{source}.{alias.name}"
                yield (full if full in MODULES else source), node.lineno


EDGES = {name: sorted(set(_imports(name))) for name in MODULES}


def _layer(module: str) -> str:
    """core, backend, families, graph, runtime, exporter, tools, cli, or the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


def _torch_side() -> set:
    """The families' PyTorch modules: those that import torch or a model package."""
    return {m for m, edges in EDGES.items() if _layer(m) == "families"
            and any(t.split(".")[0] in TORCH for t, _ in edges)}


TORCH_SIDE = _torch_side()


def test_each_family_names_its_pytorch_side():
    assert {f.torch_side for f in FAMILIES.values()} <= TORCH_SIDE


#: Modules that use onnxruntime's Python tools (the fp16 converter, the int8 quantizer) besides
#: the backend's one import of the module.
ONNXRUNTIME_TOOLS = {"sam_onnx.backend", "sam_onnx.graph.passes", "sam_onnx.exporter.run"}

#: Layer -> the sam-onnx layers it may import (its own always).
ALLOWED = {
    "core": set(),
    "backend": {"core"},
    "families": {"core"},
    "graph": {"core", "backend", "families"},
    "runtime": {"core", "backend", "families", "graph"},
    "exporter": {"core", "backend", "families", "graph", "runtime"},
    "tools": {"core", "backend", "families", "graph", "runtime", "exporter"},
    "cli": {"core", "backend", "families", "graph", "runtime", "exporter", "tools"},
    "package": {"core", "backend", "families", "graph", "runtime", "exporter", "tools"},
}


def _broken_rules(edges_by_module):
    for module, edges in edges_by_module.items():
        layer = _layer(module)
        for target, line in edges:
            where = f"{module}:{line} imports {target}"
            top = target.split(".")[0]
            if top == "sam_onnx":
                other = _layer(target)
                if other != layer and other not in ALLOWED[layer] and other != "package":
                    yield f"{where}: {layer} may not import {other}"
                if target in TORCH_SIDE and layer in ("graph", "runtime", "families") and \
                        module not in TORCH_SIDE:
                    yield f"{where}: only the exporter and tools load a family's PyTorch side"
            elif top in TORCH and module not in TORCH_SIDE and layer not in ("exporter",
                                                                               "tools"):
                yield f"{where}: torch stays in the exporter, tools and families' PyTorch side"
            elif top in ("onnx", "onnxruntime") and layer == "core":
                yield f"{where}: core imports none of onnx, onnxruntime, torch"
            elif top == "onnxruntime" and module not in ONNXRUNTIME_TOOLS:
                yield f"{where}: onnxruntime is imported once, in sam_onnx.backend"


def test_every_import_follows_the_layer_rules():
    assert list(_broken_rules(EDGES)) == []


def test_the_rules_see_a_broken_import():
    """The reader is not blind: a runtime module importing torch or a tool is caught."""
    fake = {**EDGES, "sam_onnx.runtime.predictor": [("torch", 1), ("sam_onnx.tools.check", 2)]}
    broken = list(_broken_rules(fake))
    assert any("predictor:1 imports torch" in b for b in broken)
    assert any("predictor:2 imports sam_onnx.tools.check: runtime may not import tools" in b
               for b in broken)


def test_only_the_cli_and_the_package_import_the_commands():
    users = {m for m, edges in EDGES.items() for t, _ in edges
             if t.startswith("sam_onnx.tools") and _layer(m) != "tools"}
    assert users <= {"sam_onnx", "sam_onnx.cli"}


def _cycles():
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in EDGES[v]:
            if w not in MODULES or w == "sam_onnx":
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in MODULES:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles() == []


@pytest.mark.parametrize("layer", ["graph", "runtime"])
def test_nothing_the_runtime_reaches_imports_torch(layer):
    """Transitively: every module a graph or runtime module can reach is torch-free."""
    for start in (m for m in MODULES if _layer(m) == layer):
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            for target, line in EDGES[module]:
                assert target.split(".")[0] not in TORCH, f"{start} reaches {module}:{line}"
                if target in MODULES:
                    todo.append(target)


def test_the_public_names_import_from_the_package():
    import sam_onnx

    for name in sam_onnx.__all__:
        assert getattr(sam_onnx, name) is not None, name
    from sam_onnx import ProviderFallbackWarning, SessionConfig  # noqa: F401
