"""Retrieval quality and where the attention falls, for one or more model files, measured alike.

For each model (e.g. the bundled 0.3.0 and a candidate):
- EyePACS test split against the EyePACS training split (k = 10): per grade, micro, macro, chance;
- IDRiD test split (103 photos, another camera) against IDRiD's training split as a clinic's own
  gallery, and against EyePACS + IDRiD training splits together;
- the attention: per photo, the share of its map on grid cells wholly inside the field of view
  (median over EyePACS and IDRiD test photos), and a figure of a few heatmaps (--figure).

Exact cosine ranking (as an index below 20,000 cases searches). IDRiD's test split is only ever
used here, never for training or choosing anything.

Usage: python -m benchmarks.model_quality MODEL.onnx [MODEL.onnx ...] [--attention 150] [--figure F.jpg]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import EYEPACS, IDRID, RETINA, print_header
from fundus_sdk import Model, metrics
from fundus_sdk.explain import wholly_inside


def split(data: Path, name: str) -> tuple[list[Path], np.ndarray]:
    with open(data / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == name]
    return [data / "images" / r["image"] for r in rows], np.array([int(r["grade"]) for r in rows])


def attention_shares(model: Model, photos: list[Path]) -> np.ndarray:
    shares = []
    for i in range(0, len(photos), 16):
        for e in model.explain(photos[i : i + 16]):
            shares.append(float(e.attention[wholly_inside(e.fov, e.attention.shape[0])].sum()))
    return np.array(shares)


def heatmap_figure(models: list[Model], photos: list[Path], side: int = 240) -> Image.Image:
    """Each model's heatmaps over the same photos: a row per model."""
    rows = [[e.overlay().resize((side, side * e.photo.height // e.photo.width)) for e in m.explain(photos)] for m in models]
    height = max(t.height for r in rows for t in r)
    figure = Image.new("RGB", (side * len(photos), height * len(rows)), "black")
    for y, r in enumerate(rows):
        for x, tile in enumerate(r):
            figure.paste(tile, (side * x, height * y))
    return figure


def row(name: str, report: dict) -> str:
    grades = report["per_grade"]["mHR"]
    chance = report["chance"]["per_grade"]["mHR"] if "per_grade" in report["chance"] else {}
    per = "  ".join(f"g{g} {v:.3f} ({v / chance[g]:.2f}x)" if chance.get(g) else f"g{g} {v:.3f}" for g, v in grades.items())
    return (f"  {name:<34} micro {report['micro']['mHR']:.3f} (chance {report['chance']['micro']['mHR']:.3f})  "
            f"macro {report['macro']['mHR']:.3f} (chance {report['chance']['macro']['mHR']:.3f})  {per}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--attention", type=int, default=150, help="test photos of each set whose attention is measured")
    p.add_argument("--figure", type=Path, help="write a JPEG of a few heatmaps, a row per model")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args()
    print_header("Retrieval quality and attention, model by model", ["onnxruntime"])
    ep_train, ep_train_g = split(EYEPACS, "train")
    ep_test, ep_test_g = split(EYEPACS, "test")
    id_train, id_train_g = split(IDRID, "train")
    id_test, id_test_g = split(IDRID, "test")
    results = {}
    for path in args.models:
        model = Model.load(path)
        print(f"\n{model.name} ({path})")
        v = {name: model.embed(files) for name, files in
             (("ep_train", ep_train), ("ep_test", ep_test), ("id_train", id_train), ("id_test", id_test))}  # fmt: skip
        both = np.concatenate([v["ep_train"], v["id_train"]])
        both_g = np.concatenate([ep_train_g, id_train_g])
        reports = {
            "eyepacs_test_vs_eyepacs_train": metrics.retrieval_report(v["ep_test"], v["ep_train"], ep_test_g, ep_train_g, 10),
            "idrid_test_vs_idrid_train": metrics.retrieval_report(v["id_test"], v["id_train"], id_test_g, id_train_g, 10),
            "idrid_test_vs_both_train": metrics.retrieval_report(v["id_test"], both, id_test_g, both_g, 10),
        }
        for name, report in reports.items():
            print(row(name, report))
        picked = {"eyepacs": ep_test[:: max(1, len(ep_test) // args.attention)][: args.attention],
                  "idrid": id_test[: args.attention]}  # fmt: skip
        shares = {name: attention_shares(model, files) for name, files in picked.items()}
        for name, s in shares.items():
            print(f"  attention inside the field of view, {name} test ({len(s)} photos): median {np.median(s):.3f} "
                  f"(10th-90th percentile {np.percentile(s, 10):.3f}-{np.percentile(s, 90):.3f})")  # fmt: skip
        results[model.name] = {"reports": reports, "attention_median": {n: float(np.median(s)) for n, s in shares.items()}}
    if args.figure:
        shown = [RETINA, *id_test[:: len(id_test) // 3][:3]]  # photos that may be published (CC0, CC BY): never EyePACS
        heatmap_figure([Model.load(p) for p in args.models], shown).save(args.figure, quality=85)
        print(f"\nwrote {args.figure}: a row per model ({', '.join(results)}); scikit-image's retina (CC0), 3 IDRiD test "
              "photos (CC BY 4.0, Porwal et al. 2018)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
