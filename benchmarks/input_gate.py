"""Does the input gate accept fundus photographs and refuse everything else, and what does it cost?

Accepted sets (each should pass >= 99.5%): the EyePACS photos of ../shared (both splits; the
calibration used some training-split photos), the CC0 fixture retina.jpg and versions of it,
and simulated raw camera photos made from test-split photos. Refused set (>= 95%): the
non-fundus pictures of benchmarks/non_fundus.py (scikit-image samples and rendered pictures).
Cost: the gate's own work (signals and verdict) against the whole embedding of the same photos,
measured in the same run.

    python -m benchmarks.input_gate [--model M] [--eyepacs N] [--raw N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

import fundus_sdk
from benchmarks.common import RETINA
from benchmarks.non_fundus import non_fundus_set
from fundus_sdk.gate import measure
from fundus_sdk.labels import read_labels
from fundus_sdk.preprocess import fov_mask
from fundus_sdk.tables import format_table
from training.camera import simulated_raw, versions_of

from .common import EYEPACS_IMAGES, print_header

LABELS = EYEPACS_IMAGES.parent / "labels.csv"


def fixture_versions() -> dict[str, Image.Image]:
    raw = Image.open(RETINA).convert("RGB")
    return {"retina.jpg": raw, **versions_of(raw)}


def cost(model: fundus_sdk.Model, photos: list, repeats: int = 3) -> tuple[float, float]:
    """(seconds per photo for the whole embedding, for the gate's part), best of `repeats`."""
    gate, size = model.gate, model.preprocess.size
    squares = [np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in photos]
    masks = [fov_mask(s, fill=model.preprocess.steps.fill_fov) for s in squares]
    vectors = model.embed(photos)
    whole, part = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        model.embed(photos, batch_size=16)
        whole.append((time.perf_counter() - t) / len(photos))
        t = time.perf_counter()
        for s, m, v in zip(squares, masks, vectors):
            gate.judge(v, measure(s, m, (0, 0, size, size)), size // 2)
        part.append((time.perf_counter() - t) / len(photos))
    return min(whole), min(part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="ONNX model (default: the bundled one)")
    parser.add_argument("--eyepacs", type=int, default=0, help="EyePACS photos to judge (0: all)")
    parser.add_argument("--raw", type=int, default=400, help="simulated raw photos (from test-split photos)")
    args = parser.parse_args()
    print_header("input gate: fundus photographs against everything else", ["onnxruntime"])
    model = fundus_sdk.load_model(args.model)
    if model.gate is None:
        raise SystemExit(f"{model.path} carries no gate calibration: python -m export.gate {model.path} --data ...")
    print(f"model: {model.name} ({model.fingerprint[:12]}); gate calibrated on {model.gate.photos} photos\n")
    labels = read_labels(LABELS)
    rng = np.random.default_rng(0)
    eyepacs = [r.path for r in labels]
    if args.eyepacs:
        eyepacs = [eyepacs[i] for i in sorted(rng.choice(len(eyepacs), args.eyepacs, replace=False))]
    tests = [r.path for r in labels if r.fields["split"] == "test"]
    raw = [simulated_raw(Image.open(tests[i]), rng) for i in rng.choice(len(tests), min(args.raw, len(tests)), replace=False)]
    fixtures, others = fixture_versions(), non_fundus_set()
    sets = {
        f"EyePACS photos ({len(eyepacs)})": (eyepacs, True),
        f"CC0 fixture and versions ({len(fixtures)})": (list(fixtures.values()), True),
        f"simulated raw camera photos ({len(raw)})": (raw, True),
        f"non-fundus pictures ({len(others)})": (list(others.values()), False),
    }
    rows, wrong, verdicts_of = [], {}, {}
    for name, (images, fundus) in sets.items():
        verdicts = verdicts_of[name] = model.check(images)
        accepted = np.array([v.fundus for v in verdicts])
        gradable = np.array([v.gradable for v in verdicts])
        rate = accepted.mean() if fundus else 1 - accepted.mean()
        target = ">= 99.5% accepted" if fundus else ">= 95% refused"
        ok = rate >= (0.995 if fundus else 0.95)
        count = int(accepted.sum() if fundus else (~accepted).sum())
        rows.append([name, f"{rate:.1%} {'accepted' if fundus else 'refused'} ({count})", target, "met" if ok else "MISSED",
                     f"{gradable.mean():.1%}"])
        wrong[name] = [(i, v) for i, v in enumerate(verdicts) if v.fundus != fundus]
    print(format_table(["set", "result", "target", "", "judged gradable"], rows, align="lrlll"))
    names = list(others)
    for name, misses in wrong.items():
        for i, v in misses[:10]:
            label = names[i] if name.startswith("non-fundus") else (
                str(sets[name][0][i]) if isinstance(sets[name][0][i], (str, type(RETINA))) else f"#{i}")
            print(f"  {name}: {label}: {v.summary()}")
    print("\nwhy each non-fundus picture was refused (first reason):")
    for n, v in zip(names, verdicts_of[f"non-fundus pictures ({len(others)})"]):
        print(f"  {n:<42} {v.reasons[0] if v.reasons else '(accepted)'}")
    whole, part = cost(model, tests[:64])
    print(f"\ncost: whole embedding {whole * 1e3:.1f} ms/photo, the gate's part {part * 1e3:.2f} ms/photo "
          f"= {part / whole:.1%} of it (target <= 5%)")


if __name__ == "__main__":
    main()
