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
}


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
