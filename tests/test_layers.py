"""The import direction of lmlab's layers: a module imports only its own layer and the layers below it.

    lmlab.core                      models, tokenizer, collation, run folders
    datamodules, lightning_modules  data -> batches; objectives (each imports only lmlab.core, never the other)
    lmlab.infer                     generation, chat sessions, rejected answers
    lmlab.eval                      evaluation tasks and metrics
    lmlab.train                     callbacks, memorization guard, sweep summaries
    root scripts (train.py, ...)    anything

docs/ARCHITECTURE.md draws the same picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

LAYERS = {  # package -> rank; a module may import packages of a rank <= its own
    "lmlab.core": 0,
    "datamodules": 1,
    "lightning_modules": 1,
    "lmlab.infer": 2,
    "lmlab.eval": 3,
    "lmlab.train": 4,
}
PACKAGES = ("lmlab", "datamodules", "lightning_modules")


def layer_of(module: str) -> str | None:
    """The layer package a dotted module name belongs to (None: not first-party)."""
    return next((p for p in sorted(LAYERS, key=len, reverse=True) if module == p or module.startswith(p + ".")), None)


def first_party_imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute first-party import in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from lmlab.eval import rouge` imports lmlab.eval.rouge: count the submodule when it is one
            found += [
                (node.lineno, f"{node.module}.{alias.name}")
                if (REPO / node.module.replace(".", "/") / f"{alias.name}.py").is_file()
                else (node.lineno, node.module)
                for alias in node.names
            ]
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


MODULES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def test_every_library_module_belongs_to_a_layer():
    unplaced = [module_name(p) for p in MODULES if module_name(p) != "lmlab" and layer_of(module_name(p)) is None]
    assert not unplaced, f"modules in no layer (LAYERS in tests/test_layers.py): {unplaced}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path):
    own = layer_of(module_name(path))
    if own is None:  # lmlab/__init__.py, empty
        return
    for line, name in first_party_imports(path):
        target = layer_of(name)
        where = f"{path.relative_to(REPO)}:{line} imports {name}"
        assert target is not None, f"{where}: not in a layer (LAYERS in tests/test_layers.py)"
        assert LAYERS[target] <= LAYERS[own], f"{where}: {target} is above {own}"
        if LAYERS[target] == LAYERS[own]:
            assert target == own, f"{where}: {own} and {target} are siblings; share code through lmlab.core"
