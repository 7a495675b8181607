"""The package's shape: each package says what it holds and may import, imports only packages before it in the
flow (data -> models -> train -> analysis -> studies -> explorer / bench / cli), and no module imports itself
back through a circle."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "workbench"
# rank in the flow; a module may import modules of its own rank or lower (leaves: rank 0)
RANK = {"_lazy": 0, "atomic": 0, "moe": 1, "data": 1, "viz": 1, "models": 2, "train": 3, "analysis": 4,
        "studies": 5, "explorer": 6, "bench": 7, "cli": 8, "__main__": 9, "__init__": 9}
# no sanctioned reach downward-to-upward: any upward import fails (a --checkpoint is loaded by
# ``train.checkpoint.model_from_args``, above the models it builds)
ALLOWED_UP: set = set()
LIMIT = 450  # lines; a longer module says why in its docstring ("long because")


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG).with_suffix("").parts
        yield ".".join(parts), path


def _imports(name: str, path: Path) -> set[str]:
    """workbench modules that ``name`` imports (at module level or inside functions)."""
    tree = ast.parse(path.read_text())
    package = name.split(".")[:-1] if not path.name == "__init__.py" else name.split(".")[:-1]
    if path.name == "__init__.py":
        package = name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = (["workbench"] + package)[: len(package) + 1 - (node.level - 1)]
                mod = ".".join(base[1:] + ([node.module] if node.module else []))
                for alias in node.names if not node.module else [None]:
                    out.add(mod if alias is None else ".".join(filter(None, [mod, alias.name])))
            elif node.module and node.module.startswith("workbench"):
                out.add(node.module.removeprefix("workbench").lstrip("."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("workbench."):
                    out.add(alias.name.removeprefix("workbench."))
    known = {n for n, _ in _modules()}
    resolved = set()
    for mod in out:
        while mod and mod not in known and f"{mod}.__init__" not in known:
            mod = mod.rpartition(".")[0]
        if mod:
            resolved.add(mod)
    return resolved - {name}


def _rank(module: str) -> int:
    return RANK[module.split(".")[0]]


GRAPH = {name: _imports(name, path) for name, path in _modules()}


def test_every_package_says_what_it_holds_and_may_import():
    for init in PKG.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Imports" in doc or init.parent == PKG / "moe" or init.parent == PKG, init
        assert len(doc) > 80, init


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_import_goes_upward(name):
    if name.endswith("__init__") and name.count(".") == 0:
        return  # the package's own __init__ names its public API (lazily)
    for target in GRAPH[name]:
        if (name.removesuffix(".__init__"), target) in ALLOWED_UP:
            continue
        assert _rank(target) <= _rank(name), f"{name} imports {target}, which comes later in the flow"


def test_no_import_circles():
    graph = {n.removesuffix(".__init__"): {t.removesuffix(".__init__") for t in ts} for n, ts in GRAPH.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                # a package __init__ that lazily names its submodules' exports is not a circle at import time
                if not any(graph_is_lazy(c) for c in cycle):
                    pytest.fail("import circle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def graph_is_lazy(module: str) -> bool:
    path = PKG / Path(*module.split(".")) / "__init__.py"
    return path.is_file() and "exports(" in path.read_text()


def test_modules_are_short_or_say_why():
    for name, path in _modules():
        lines = len(path.read_text().splitlines())
        if lines > LIMIT:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "long because" in doc.lower(), f"{name}: {lines} lines and no reason in its docstring"


def test_models_reach_nothing_above_them():
    tree = ast.parse((PKG / "models" / "args.py").read_text())
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level and "train" in (n.module or "")]
    assert not found
