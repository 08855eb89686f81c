"""The package's layering, read from the source: every gllm import (module level or inside a function) goes
from a layer to the same layer or one below, front ends never import each other, and no files import each
other in a circle. Layers, top down (docs/architecture.md):

    cli, serve  →  bridge, http  →  frontend  →  engine  →  runner  →  scheduler
      →  kv, model, sampling, tokenizer  →  ops, formats (and the small shared modules)  →  nothing of gllm
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "gllm"
LAYERS = [
    {"cli", "serve", "__main__"},
    {"bridge", "http"},
    {"frontend"},
    {"engine"},
    {"runner"},
    {"scheduler"},
    {"kv", "model", "sampling", "tokenizer"},
    {"ops", "formats", "request_fields", "transfer", "memory", "__init__"},
]
RIVALS = [{"bridge", "http"}]      # same layer, and still never importing each other


def unit(module: str) -> str:
    """The layer unit of a dotted gllm module: its subpackage, or the top-level module's name."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "__main__"         # an entry point (`python -m gllm.bridge`): the top, like the CLI
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(name: str) -> int:
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"gllm.{name} is in no layer: add it to LAYERS in {__file__} (and the docs)")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def gllm_imports(path: Path) -> set[str]:
    """Every gllm module `path` imports ("from gllm.x import y" may name a module y; both are kept)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gllm")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("gllm"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {m: {i for i in gllm_imports(p) if i in files and i != m} for m, p in files.items()}


def test_imports_go_down_the_layers_and_front_ends_stay_apart():
    wrong = []
    for module, imports in graph().items():
        here = unit(module)
        for imported in imports:
            there = unit(imported)
            if there == here:
                continue
            if layer_of(there) < layer_of(here):
                wrong.append(f"{module} imports {imported} (a higher layer)")
            if any({here, there} <= rivals for rivals in RIVALS):
                wrong.append(f"{module} imports {imported} (front ends stay apart)")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_circles_between_files():
    g = graph()
    # Package __init__ files re-export their own modules: an edge into one's own package face is no circle.
    edges = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in g.items()}
    circles, stack, index, low, on_stack, counter = [], [], {}, {}, set(), [0]

    def visit(v: str) -> None:          # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_lowest_layer_imports_first():
    """`import gllm.ops` (or the runner, or the model) as a program's first gllm import works: no module
    of those needs one above it half-initialised."""
    for module in ("gllm.ops", "gllm.model", "gllm.runner"):
        run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, (module, run.stderr[-2000:])
