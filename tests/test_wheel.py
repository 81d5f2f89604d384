"""The wheel as a user gets it: built from the checkout, installed into a fresh virtualenv.

It must carry the bundled model, no training/export/tests code, and run without torch: the
installed `fundus-sdk` command and the Python API are used from outside the checkout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fundus_sdk
from tests.shared import REPO, eyepacs_sample, given, require_eyepacs

pytestmark = pytest.mark.slow

HEAVY = ("torch", "torchvision", "timm", "onnx", "onnxscript")


def clean_env() -> dict[str, str]:
    """The environment without anything that would point Python at the checkout or our venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def check(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheel(out: Path) -> Path:
    """`python -m build --wheel` (pip wheel --no-deps where `build` is not installed)."""
    if importlib.util.find_spec("build") is not None:
        check([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)], cwd=out)
    else:
        check([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(REPO)], cwd=out)
    wheels = list(out.glob("fundus_sdk-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("dist"))


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        model = zf.read("fundus_sdk/models/default.onnx")
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    bundled = (REPO / "fundus_sdk" / "models" / "default.onnx").read_bytes()
    assert hashlib.sha256(model).digest() == hashlib.sha256(bundled).digest()
    top_level = {n.split("/", 1)[0] for n in names}
    assert not top_level & {"training", "export", "tests", "benchmarks", "examples", "runs", "checkpoints"}, sorted(top_level)
    assert {n for n in top_level if not n.endswith(".dist-info")} == {"fundus_sdk"}
    assert "fundus_sdk/cli/__init__.py" in names and "fundus_sdk/__init__.py" in names
    assert "fundus-sdk = fundus_sdk.cli:main" in entry_points
    # torch and friends only as an optional extra, never a plain requirement
    required = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    plain = {re.match(r"Requires-Dist:\s*([A-Za-z0-9_.-]+)", line)[1].lower() for line in required if "extra ==" not in line}
    assert "onnxruntime" in plain and "usearch" in plain
    assert not plain & set(HEAVY), plain


SNIPPET = """
import json, sys
import fundus_sdk
photos, index_dir = sys.argv[1:4], sys.argv[4]
index = fundus_sdk.Index.create(index_dir)
keys = index.add(photos, metadata=[{"grade": g, "site": "a"} for g in (0, 2, 4)])
hits = fundus_sdk.search(photos[1], index, k=3)
index.close()
reopened = fundus_sdk.search(photos[2], index_dir, k=1, where={"grade": 0})
print(json.dumps({
    "file": fundus_sdk.__file__,
    "keys": keys,
    "hits": [h.to_dict() for h in hits],
    "filtered": [h.to_dict() for h in reopened],
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in %r),
}))
""" % (HEAVY,)


def test_installed_wheel_runs_without_torch(wheel: Path, tmp_path: Path) -> None:
    require_eyepacs()
    venv = tmp_path / "venv"
    check([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python, script = venv / "bin" / "python", venv / "bin" / "fundus-sdk"
    check([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path)
    assert script.is_file()
    # nothing heavy came along with the dependencies
    probe = check([str(python), "-c", f"import importlib.util as u; print([m for m in {HEAVY!r} if u.find_spec(m)])"], cwd=tmp_path)
    assert probe.stdout.strip() == "[]", probe.stdout

    photos = [str(p) for p, _ in eyepacs_sample(3)]
    out = tmp_path / "out.npz"
    proc = check([str(script), "embed", *photos[:2], "-o", str(out)], cwd=tmp_path)
    assert "embedded 2 images, 0 failed" in proc.stdout
    with np.load(out) as data:
        vectors, paths = data["vectors"], data["paths"].tolist()
        fingerprint = str(data["model_fingerprint"])
    model = fundus_sdk.load_model()
    assert paths == photos[:2] and fingerprint == model.fingerprint
    # the installed package embeds exactly as the checkout does
    np.testing.assert_allclose(vectors, fundus_sdk.embed(photos[:2]), atol=1e-4)

    proc = check([str(python), "-c", SNIPPET, *photos, str(tmp_path / "cases")], cwd=tmp_path)
    result = json.loads(proc.stdout)
    assert Path(result["file"]).resolve().is_relative_to(venv.resolve()), result["file"]
    assert result["modules"] == [], result["modules"]
    assert len(set(result["keys"])) == 3 and None not in result["keys"]
    hits = result["hits"]
    assert [h["path"] for h in hits][0] == photos[1] and hits[0]["score"] > 0.99
    assert sorted(h["grade"] for h in hits) == [0, 2, 4]
    assert all(given(h["metadata"]) == {"site": "a"} for h in hits)
    assert [h["path"] for h in result["filtered"]] == [photos[0]]
