"""The house's layers: data flows one way (runtime <- training <- export <- benchmarks), and the
runtime never imports a deep-learning library. Checked on the source, so a lazy import inside a
function counts as much as one at the top."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.shared import REPO

FORBIDDEN = {
    "fundus_sdk": {"training", "export", "benchmarks", "tests", "torch", "torchvision", "timm", "onnx"},
    "training": {"export", "benchmarks", "tests"},
    "export": {"benchmarks", "tests"},
    "benchmarks": {"tests"},
}
# The runtime's own layers: the store knows vectors and records (never the model or the inputs),
# the library never reaches up into its command line.
RUNTIME_FORBIDDEN = {
    "vectors": {"model", "inputs", "gate", "pipeline", "index", "cli"},
    "reader": {"model", "inputs", "gate", "pipeline", "index", "cli", "store"},
    "store": {"model", "inputs", "gate", "pipeline", "index", "cli"},
    "records": {"model", "inputs", "gate", "store", "reader", "index", "cli"},
    "pipeline": {"index", "cli", "report"},
    "index": {"cli", "report"},
    "errors": {"dicom", "inputs"},
}
MAX_MODULE_LINES, MAX_CLASS_LINES = 600, 400


def runtime_modules(path: Path) -> set[str]:
    """The fundus_sdk modules `path` (inside fundus_sdk/) imports, by their name in the package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            parts = (node.module or "").split(".")
            names |= {parts[0]} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fundus_sdk."):
            names.add(node.module.split(".")[1])
    return names


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (relative imports stay inside its package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_parser_sees_lazy_and_from_imports(tmp_path):
    probe = tmp_path / "m.py"
    probe.write_text("import os.path\nfrom training.data import x\ndef f():\n    import torch\nfrom . import y\n")
    assert imported_packages(probe) == {"os", "training", "torch"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package):
    offenders = {
        str(path.relative_to(REPO)): sorted(bad)
        for path in sorted((REPO / package).rglob("*.py"))
        if (bad := imported_packages(path) & FORBIDDEN[package])
    }
    assert not offenders, offenders


@pytest.mark.parametrize("script", sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem != "__init__"))
def test_every_benchmark_script_imports(script):
    """A benchmark is run by hand, rarely: a broken import must not wait for that day."""
    importlib.import_module(f"benchmarks.{script}")


@pytest.mark.parametrize("module", sorted(RUNTIME_FORBIDDEN))
def test_the_runtime_layers(module):
    assert not runtime_modules(REPO / "fundus_sdk" / f"{module}.py") & RUNTIME_FORBIDDEN[module]


def test_the_runtime_layer_parser_sees_relative_imports(tmp_path):
    probe = tmp_path / "m.py"
    probe.write_text("from . import vectors as vec\nfrom .model import Model\nfrom ..index import Index\nfrom fundus_sdk.gate import x\n")
    assert runtime_modules(probe) == {"vectors", "model", "index", "gate"}


def test_no_module_or_class_of_the_runtime_is_too_long_to_read():
    """The house's size limits: a module of the runtime fits in 600 lines, a class in 400."""
    too_long = []
    for path in sorted((REPO / "fundus_sdk").rglob("*.py")):
        tree = ast.parse(path.read_text())
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {lines} lines")
        too_long += [f"{path.relative_to(REPO)}: class {node.name}: {node.end_lineno - node.lineno + 1} lines"
                     for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= MAX_CLASS_LINES]  # fmt: skip
    assert not too_long, too_long
