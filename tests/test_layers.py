"""The layers contract (DESIGN.md §4): imports point down only, siblings do not import each other, no import cycle
between modules, no underscore name imported from another module — counting every import, also those made inside
functions and under `TYPE_CHECKING`. Read off the source with `ast`: nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Top to bottom. A module may import modules of its own layer (no cycle) or of any layer below it; the packages
# of one layer that are listed as siblings may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("torchinit", "torchinit.__main__", "torchinit.cli", "torchinit.demo"),
    ("torchinit.fabric", "torchinit.callbacks", "torchinit.collectives", "torchinit.data", "torchinit.loggers",
     "torchinit.plugins", "torchinit.seeding"),
    ("torchinit.launch",),
    ("torchinit.checkpoint",),
    ("torchinit.strategies",),
    ("torchinit.init", "torchinit.materialize"),  # siblings
    ("torchinit.record",),
    ("torchinit.plan", "torchinit.options", "torchinit.from_lightning", "torchinit.core", "torchinit.models"),
]
SIBLINGS = {("torchinit.init", "torchinit.materialize")}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "torchinit").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported torchinit module, imported name or None, line) for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("torchinit")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("torchinit"):
                continue
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.append((child, None, node.lineno) if child in known else (source, alias.name, node.lineno))
    return found


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the entry of LAYERS the module belongs to): the longest matching prefix."""
    best = None
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (index, entry)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def graph() -> dict[str, list[tuple[str, str | None, int]]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_point_down_only():
    wrong = []
    for module, edges in graph().items():
        mine, my_entry = layer_of(module)
        for target, _, line in edges:
            if target == "torchinit" and mine > 0:  # (the entry points use the public API as a user does)
                wrong.append(f"{module}:{line} imports the package root (import the module that owns the name)")
                continue
            theirs, their_entry = layer_of(target)
            if theirs < mine:
                wrong.append(f"{module}:{line} imports {target}, a layer above it")
            elif theirs == mine and my_entry != their_entry and (
                    (my_entry, their_entry) in SIBLINGS or (their_entry, my_entry) in SIBLINGS):
                wrong.append(f"{module}:{line} imports its sibling {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = {m: {t for t, _, _ in targets if t != m} for m, targets in graph().items()}
    # a package's __init__ is imported by its modules implicitly; only explicit imports count
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_cross_modules():
    crossing = [f"{module}:{line} imports {name} from {target}"
                for module, edges in graph().items() for target, name, line in edges
                if name is not None and name.startswith("_") and target != module]
    assert not crossing, "\n".join(crossing)


def test_private_torch_apis_only_in_compat():
    """torch's private modules (`torch._subclasses`, `torch.utils._pytree`, ...) are imported by core/compat.py
    alone; the tests check the rest of the library against the fallbacks there."""
    private = []
    for name, path in modules().items():
        if name == "torchinit.core.compat":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            private += [f"{name}:{node.lineno} imports {n}" for n in names
                        if n.startswith("torch") and any(part.startswith("_") for part in n.split("."))]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("bad", ["upward", "cycle", "private"])
def test_the_contract_catches_a_deliberate_break(bad, monkeypatch):
    """The checks above fail on the breaks they exist for (a back-import inside a function included)."""
    real = graph()
    fake = {m: list(e) for m, e in real.items()}
    if bad == "upward":
        fake["torchinit.record.replay"].append(("torchinit.materialize.materialize", None, 1))
    elif bad == "cycle":
        fake["torchinit.core.text"].append(("torchinit.core.errors", None, 1))
        fake["torchinit.core.errors"].append(("torchinit.core.text", None, 1))
    else:
        fake["torchinit.fabric"].append(("torchinit.launch", "_worker", 1))
    monkeypatch.setitem(globals(), "graph", lambda: fake)
    check = {"upward": test_imports_point_down_only, "cycle": test_no_import_cycles,
             "private": test_no_private_names_cross_modules}[bad]
    with pytest.raises(AssertionError):
        check()


def test_function_level_imports_are_counted(tmp_path):
    source = tmp_path / "torchinit" / "record" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from torchinit.materialize.materialize import materialize\n")
    found = imports("torchinit.record.x", source, {"torchinit.materialize.materialize": source})
    assert found == [("torchinit.materialize.materialize", "materialize", 2)]
