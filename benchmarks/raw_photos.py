"""Does the model hold on raw clinic photographs, not only on the enhanced 256 px EyePACS set?

1. One raw photograph (tests/fixtures/retina.jpg: 1411 px, natural colour, black surround) and
   versions of it: enhanced the way the EyePACS set was (cropped to the field of view, squashed
   to 256 px, each channel histogram-equalised), resized, colour-cast, recompressed. Prints the
   cosine of each to the raw photo, next to the cosines between unrelated photos (the scale).
2. EyePACS test photos turned into simulated raw camera photos (orange cast, lower contrast,
   vignetting, black surround at 4:3, upscaled to 2048 px, JPEG): retrieval of the simulated raw
   queries against the train-split gallery, next to the original queries. The simulation
   exercises colour, contrast, size, surround and compression; it cannot reproduce another
   camera's optics or another population.

    python -m benchmarks.raw_photos [--model M] [--queries 400] [--gallery-stride 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import fundus_sdk
from fundus_sdk import metrics
from fundus_sdk.labels import read_labels
from training.camera import simulated_raw, versions_of

from .common import EYEPACS_IMAGES, RETINA, print_header

LABELS = EYEPACS_IMAGES.parent / "labels.csv"


def part_one(model: fundus_sdk.Model, others: list[Path]) -> None:
    raw = Image.open(RETINA).convert("RGB")
    versions = versions_of(raw)
    vecs = model.embed([raw, *versions.values()])
    unrelated = model.embed(others)
    between = (unrelated @ unrelated.T)[np.triu_indices(len(others), 1)]
    print(f"1. {RETINA.name} (raw, {raw.size[0]} px) against versions of itself, cosine:")
    for (name, _), v in zip(versions.items(), vecs[1:]):
        print(f"   {name:<40} {float(vecs[0] @ v):.3f}")
    print(
        f"   scale: unrelated EyePACS photos, cosine mean {between.mean():.3f}, "
        f"5th-95th percentile {np.percentile(between, 5):.3f}-{np.percentile(between, 95):.3f}; "
        f"raw photo to them: mean {float((unrelated @ vecs[0]).mean()):.3f}"
    )


def part_two(model: fundus_sdk.Model, n_queries: int, gallery_stride: int, seed: int = 0) -> None:
    rows = read_labels(LABELS)
    gallery = [r for r in rows if r.fields["split"] == "train"][::gallery_stride]
    tests = [r for r in rows if r.fields["split"] == "test"]
    rng = np.random.default_rng(seed)
    queries = [tests[i] for i in sorted(rng.choice(len(tests), size=min(n_queries, len(tests)), replace=False))]
    g_vecs = model.embed([r.path for r in gallery], batch_size=32)
    g_grades = np.array([r.grade for r in gallery])
    q_grades = np.array([r.grade for r in queries])
    with tempfile.TemporaryDirectory() as tmp:
        raw_files = []
        for r in queries:
            path = Path(tmp) / (r.path.stem + ".jpg")
            simulated_raw(Image.open(r.path), rng).save(path, quality=95)
            raw_files.append(path)
        runs = {"original (enhanced 256 px)": [r.path for r in queries], "simulated raw (2048 px)": raw_files}
        print(f"\n2. {len(queries)} test-split queries against the {len(gallery)}-photo train-split gallery, k=10:")
        vectors = {}
        for name, files in runs.items():
            vectors[name] = model.embed(files, batch_size=16)
            report = metrics.retrieval_report(vectors[name], g_vecs, q_grades, g_grades, 10)
            print(f"   {name}: mHR@10 {report['micro']['mHR']:.3f}, macro {report['macro']['mHR']:.3f}, "
                  f"NDCG@10 {report['micro']['NDCG']:.3f}; per grade "
                  + " ".join(f"{g}:{v:.2f}" for g, v in report["per_grade"]["mHR"].items()))
        a, b = vectors.values()
        print(f"   cosine of each raw version to its original: mean {float((a * b).sum(1).mean()):.3f}, "
              f"min {float((a * b).sum(1).min()):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="ONNX model (default: the bundled one)")
    parser.add_argument("--queries", type=int, default=400, help="test-split queries for part 2")
    parser.add_argument("--gallery-stride", type=int, default=1, help="use every Nth train-split photo as the gallery")
    args = parser.parse_args()
    print_header("raw clinic photographs against the enhanced EyePACS set", ["onnxruntime"])
    model = fundus_sdk.load_model(args.model)
    print(f"model: {model.name} ({model.fingerprint[:12]})\n")
    tests = [r.path for r in read_labels(LABELS) if r.fields["split"] == "test"]
    part_one(model, tests[:: len(tests) // 100][:100])
    part_two(model, args.queries, args.gallery_stride)


if __name__ == "__main__":
    main()
