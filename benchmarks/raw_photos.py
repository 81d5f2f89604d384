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
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

import fundus_sdk
from fundus_sdk import metrics
from fundus_sdk.labels import read_labels

from .common import EYEPACS_IMAGES, RETINA, print_header

LABELS = EYEPACS_IMAGES.parent / "labels.csv"


def enhanced_like_eyepacs(raw: Image.Image) -> Image.Image:
    """What the EyePACS set's publisher did: crop, squash to 256 px, equalise each channel.

    Inferred from the photos: inside the field of view every channel's deciles sit near
    40/76/136/196/231 whatever the camera, the signature of per-channel histogram equalisation.
    Done here with PIL's own equalize (not the runtime's code).
    """
    arr = np.asarray(raw)
    rows, cols = np.flatnonzero(arr.max(axis=(1, 2)) > 20), np.flatnonzero(arr.max(axis=(0, 2)) > 20)
    crop = raw.crop((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)).resize((256, 256), Image.BICUBIC)
    fov = Image.fromarray((np.asarray(crop).max(axis=2) > 20).astype(np.uint8) * 255)
    return ImageOps.equalize(crop, mask=fov)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def simulated_raw(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """An enhanced 256 px EyePACS photo made to look like a raw camera file."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    a = 0.35 + 0.45 * a  # lower contrast, lifted blacks
    a *= np.array([1.0, rng.uniform(0.45, 0.65), rng.uniform(0.2, 0.4)])  # orange camera cast
    yy, xx = np.mgrid[-1:1:256j, -1:1:256j]
    a *= (1 - 0.35 * (xx**2 + yy**2))[..., None]  # vignetting
    fov = (xx**2 + yy**2) <= 1.0
    a = np.where(fov[..., None], a, 0.0)
    disc = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))
    canvas = Image.new("RGB", (int(256 * 4 / 3), 256))
    canvas.paste(disc, ((canvas.width - 256) // 2, 0))
    return jpeg(canvas.resize((2048, 1536), Image.BICUBIC), 90)


def part_one(model: fundus_sdk.Model, others: list[Path]) -> None:
    raw = Image.open(RETINA).convert("RGB")
    versions = {
        "enhanced like EyePACS (256 px)": enhanced_like_eyepacs(raw),
        "resized to 512 px": raw.resize((512, 512), Image.LANCZOS),
        "upscaled to 3000 px": raw.resize((3000, 3000), Image.BICUBIC),
        "another camera's cast (G x0.7, B x0.5)": Image.fromarray(
            (np.asarray(raw, dtype=np.float32) * [1.0, 0.7, 0.5]).astype(np.uint8)
        ),
        "JPEG quality 60": jpeg(raw, 60),
        "mirrored (the other eye)": raw.transpose(Image.FLIP_LEFT_RIGHT),
    }
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
            ranked = metrics.rank_exact(vectors[name], g_vecs, 10)
            report = metrics.evaluate(q_grades, g_grades[ranked], g_grades)
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
