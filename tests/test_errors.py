"""One error family (core/errors.py): every error torchinit raises is a `TorchinitError` subclass that keeps the
builtin base callers caught before. (a) read off the source with `ast`: every `raise X(...)` (and every builtin
exception made to be raised later) names a family class, so a new bare `raise ValueError` fails here; (b) real error
paths raise both the family class and the old builtin."""

from __future__ import annotations

import ast
import builtins
import errno
import importlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import torchinit
from torchinit.core import errors

SRC = Path(__file__).resolve().parents[1] / "src"
# Raised as the protocol asks, not as an error of torchinit: `SystemExit` ends the CLI, `__getattr__` says "no such
# attribute" with AttributeError.
PROTOCOL = {("SystemExit", None), ("AttributeError", "__getattr__")}


def _files() -> list[tuple[str, Path]]:
    found = []
    for path in sorted((SRC / "torchinit").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return found


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return base and f"{base}.{node.attr}"
    return None


def _resolve(module, name: str):
    """The object `name` (maybe dotted) means in `module`'s namespace, builtins included; None if it is a local."""
    head, *rest = name.split(".")
    if hasattr(module, head):
        value = getattr(module, head)
    elif hasattr(builtins, head):
        value = getattr(builtins, head)
    else:
        return None
    for part in rest:
        value = getattr(value, part)
    return value


def _enclosing(tree: ast.AST) -> dict[ast.AST, str | None]:
    """Each node's innermost enclosing function name."""
    owner: dict[ast.AST, str | None] = {}

    def walk(node: ast.AST, name: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            owner[child] = name
            walk(child, child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else name)

    walk(tree, None)
    return owner


def _offences(module_name: str, path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    owner = _enclosing(tree)
    module = None
    local_defs = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    found: list[str] = []
    checked: set[ast.Call] = set()  # calls already judged as raised (or returned by a local factory that is raised)

    def check(call: ast.Call, where: str, raised: bool, seen: frozenset[str] = frozenset()) -> None:
        nonlocal module
        name = _dotted(call.func)
        if name is None:
            return
        if raised and (name, None) in PROTOCOL or (name, owner.get(call)) in PROTOCOL:
            return
        if module is None:
            module = importlib.import_module(module_name)
        value = _resolve(module, name)
        if value is None and name in local_defs and name not in seen:
            # a local factory (`raise bad("...")`): what it returns must be a family error
            returns = [r.value for r in ast.walk(local_defs[name]) if isinstance(r, ast.Return)]
            checked.update(v for v in returns if isinstance(v, ast.Call))
            if not returns or not all(isinstance(v, ast.Call) for v in returns):
                found.append(f"{where}: raises {name}(...), a function that does not return a made error")
            for v in returns:
                if isinstance(v, ast.Call):
                    check(v, where, raised, seen | {name})
            return
        if isinstance(value, type) and issubclass(value, BaseException) and not issubclass(value, Warning):
            if not issubclass(value, errors.TorchinitError):
                found.append(f"{where}: {'raises' if raised else 'makes'} {name}, not a TorchinitError subclass")
        elif raised and value is not None and not isinstance(value, type) and name not in local_defs:
            found.append(f"{where}: raises {name}(...), which is not an exception class")

    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            if isinstance(node.exc, ast.Call):
                checked.add(node.exc)
                owner.setdefault(node.exc, owner.get(node))
                check(node.exc, where, raised=True)
            elif isinstance(node.exc, (ast.Name, ast.Attribute)):
                name = _dotted(node.exc)
                if module is None:
                    module = importlib.import_module(module_name)
                value = _resolve(module, name)  # a local (`raise error`) is a re-raise: fine
                if isinstance(value, type) and not issubclass(value, errors.TorchinitError) and \
                        (name, None) not in PROTOCOL:
                    found.append(f"{where}: raises {name}, not a TorchinitError subclass")
    for node in ast.walk(tree):  # errors made here and raised elsewhere (`return OSError(...)`)
        if isinstance(node, ast.Call) and node not in checked and isinstance(node.func, ast.Name) and \
                isinstance(getattr(builtins, node.func.id, None), type) and \
                issubclass(getattr(builtins, node.func.id), BaseException) and \
                not issubclass(getattr(builtins, node.func.id), Warning):
            found.append(f"{path.relative_to(SRC)}:{node.lineno}: makes {node.func.id}(...), not a TorchinitError "
                         "subclass")
    return found


def test_every_raise_is_a_torchinit_error():
    offences = [o for name, path in _files() for o in _offences(name, path)]
    assert not offences, "raise a subclass of TorchinitError (core/errors.py) that keeps the builtin base:\n" + \
        "\n".join(offences)


def test_the_check_catches_a_bare_builtin(tmp_path, monkeypatch):
    """The check itself: a module with a bare `raise ValueError(...)`, a bare `raise KeyError` and a factory that
    returns a RuntimeError is refused; the family and protocol raises are not."""
    package = tmp_path / "errors_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(
        "from torchinit.core.errors import ConfigurationError\n"
        "def a(x):\n    raise ValueError(f'bad {x}')\n"
        "def b():\n    raise KeyError\n"
        "def c():\n    def bad(w):\n        return RuntimeError(w)\n    raise bad('w')\n"
        "def d():\n    raise ConfigurationError('fine')\n"
        "def e(error):\n    raise error\n"
        "class F:\n    def __getattr__(self, name):\n        raise AttributeError(name)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    found = _offences("errors_probe.mod", package / "mod.py")
    assert [f.split(": ", 1)[1] for f in found] == [
        "raises ValueError, not a TorchinitError subclass",
        "raises KeyError, not a TorchinitError subclass",
        "raises RuntimeError, not a TorchinitError subclass",
    ], found


def test_the_family_keeps_the_builtin_bases():
    bases = {
        "ConfigurationError": ValueError, "CheckpointError": ValueError, "UsageError": RuntimeError,
        "UnsupportedError": RuntimeError, "RankError": RuntimeError, "RecordError": RuntimeError,
        "MaterializeError": RuntimeError, "VerificationError": RuntimeError, "ArgumentTypeError": TypeError,
        "InsufficientMemoryError": MemoryError, "MissingKeyError": KeyError, "SaveError": OSError,
    }
    for name, base in bases.items():
        cls = getattr(torchinit, name)
        assert issubclass(cls, torchinit.TorchinitError) and issubclass(cls, base), name
        assert name in torchinit.__all__ and cls is getattr(errors, name)
    assert issubclass(torchinit.MissingKeyError, torchinit.CheckpointError)


# ---- real error paths: the family class and the old builtin ---------------------------------------------------
def test_a_bad_precision_is_a_configuration_error():
    with pytest.raises(torchinit.ConfigurationError, match="precision='bogus' is not supported") as caught:
        torchinit.Fabric(accelerator="cpu", precision="bogus")
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ValueError, match="devices=0 is not valid"):
        torchinit.Fabric(accelerator="cpu", devices=0)


def test_setup_before_launch_is_a_usage_error():
    fabric = torchinit.Fabric(accelerator="cpu", strategy="ddp", devices=2)
    with pytest.raises(RuntimeError, match="call fabric.launch"):  # the builtin base still catches it
        fabric.setup(nn.Linear(2, 2))
    with pytest.raises(torchinit.UsageError):
        fabric.setup(nn.Linear(2, 2))


def test_launching_a_script_on_several_nodes_is_a_usage_error():
    from torchinit.launch import start_script_ranks

    plan = torchinit.Fabric(accelerator="cpu", strategy="ddp", devices=2, num_nodes=2).plan
    with pytest.raises(torchinit.UsageError, match="start every node with torchrun") as caught:
        start_script_ranks(plan)
    assert isinstance(caught.value, RuntimeError)


def _safetensors(path: Path, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


@pytest.mark.parametrize(("header", "says"), [
    (b"[1, 2]", "not one valid JSON object (it does not start with '{')"),
    (b"{not json", "not one valid JSON object"),
    (json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}).encode(),
     "tensor 'w' has data_offsets that end before they begin"),
])
def test_a_corrupt_safetensors_header_is_a_checkpoint_error(tmp_path, header, says):
    path = _safetensors(tmp_path / "bad.safetensors", header)
    with pytest.raises(torchinit.CheckpointError) as caught:
        torchinit.load_checkpoint(nn.Linear(2, 1), path)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(f"{path}: ") and says in str(caught.value), str(caught.value)


def test_a_missing_key_is_a_key_error_with_a_readable_sentence(tmp_path):
    fabric = torchinit.Fabric(accelerator="cpu")
    fabric.save(tmp_path / "state.pt", {"model": nn.Linear(2, 2)})
    model = nn.Linear(2, 2)
    with pytest.raises(torchinit.MissingKeyError) as caught:
        fabric.load(tmp_path / "state.pt", {"model": model, "optimizer": torch.optim.SGD(model.parameters(), 0.1)})
    error = caught.value
    assert isinstance(error, KeyError) and isinstance(error, torchinit.CheckpointError)
    assert isinstance(error, ValueError)
    assert str(error).startswith(f"{tmp_path / 'state.pt'}: has no ['optimizer']"), str(error)  # not quoted
    assert "strict=False" in str(error)


def test_a_wrong_wrap_is_an_argument_type_error():
    from torchinit.strategies import fsdp

    with pytest.raises(torchinit.ArgumentTypeError, match=r"takes module classes.*pass e\.g\.") as caught:
        fsdp.units(nn.Sequential(nn.Linear(2, 2)), {"Linear"})
    assert isinstance(caught.value, TypeError)


def test_a_failed_save_is_an_os_error_with_its_errno(tmp_path):
    from torchinit.checkpoint.save import save_failure

    path = tmp_path / "state.pt"
    error = save_failure(path, OSError(errno.EACCES, "Permission denied"))
    assert isinstance(error, torchinit.SaveError) and isinstance(error, OSError) and error.errno == errno.EACCES
    assert f"Saving {path} failed: {os.strerror(errno.EACCES)}" in str(error)
    assert "is as it was" in str(error)
    assert save_failure(path, ValueError("not an I/O failure")) is None
