"""Calibrate a model's input gate on its training photos and store it in the model file.

    python -m export.gate fundus_sdk/models/default.onnx --data ../shared/data/eyepacs256

The gate (fundus_sdk/gate.py) needs the distribution of the model's descriptors on fundus
photographs and each signal's range. They are measured here on the training split's photos and
on a simulated raw-camera version of each (training/camera.py), so that both the enhanced
EyePACS-style photos and raw clinic photos are "like the training photos". The calibration is
stored as the metadata entry `gate.calibration`; the weights, and so the model's fingerprint,
are unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from PIL import Image
from tqdm import tqdm

from fundus_sdk.atomic import write_atomically
from fundus_sdk.errors import Exit, FundusError
from fundus_sdk.gate import CALIBRATION_KEY, Gate, Signals, calibrate
from fundus_sdk.model import Model
from training.camera import simulated_raw
from training.data import read_source, train_test

from .errors import ExportError
from .metadata import write_metadata


def calibration_photos(data: str | Path, limit: int, raw: int, seed: int = 0) -> Iterator[Image.Image]:
    """Up to `limit` training-split photos; the first `raw` of them also as simulated raw-camera copies."""
    train, _ = train_test(read_source(data), seed)
    rng = np.random.default_rng(seed)
    for n, i in enumerate(sorted(rng.choice(len(train), min(limit, len(train)), replace=False))):
        photo = Image.open(train[i].path).convert("RGB")
        yield photo
        if n < raw:
            yield simulated_raw(photo, rng)


def measure_photos(model: Model, photos: Iterable[Image.Image], total: int, batch_size: int = 32) -> tuple[np.ndarray, list[Signals]]:
    """The model's descriptors and the gate's signals of each photo (read as they come)."""
    vectors, signals, pending = [], [], []

    def flush() -> None:
        prepared = [model.preprocess.prepare(model.preprocess.decode(p)) for p in pending]
        vectors.append(model.run(np.stack([p.pixels for p in prepared])))
        signals.extend(p.signals for p in prepared)
        bar.update(len(pending))
        pending.clear()

    with tqdm(total=total, desc="measuring photos", unit="photo") as bar:
        for photo in photos:
            pending.append(photo)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    return np.concatenate(vectors), signals


def calibrate_model(
    model_path: str | Path, data: str | Path, output: str | Path | None = None, limit: int = 2400, raw: int = 600
) -> Gate:
    """Calibrate the gate of the model at `model_path` and write the model (in place by default)."""
    model_path = Path(model_path)
    try:
        model = Model.load(model_path, providers="cpu")
        vectors, signals = measure_photos(model, calibration_photos(data, limit, raw), limit + min(raw, limit))
    except (FundusError, OSError) as exc:
        raise ExportError(str(exc)) from exc
    order = np.random.default_rng(0).permutation(len(signals))  # photos and raw copies on both sides of the split
    gate = calibrate(vectors[order], [signals[i] for i in order])
    proto = onnx.load(str(model_path))
    write_metadata(proto, {**{p.key: p.value for p in proto.metadata_props}, CALIBRATION_KEY: gate.to_json()})
    with write_atomically(Path(output or model_path), durable=True) as staging:
        onnx.save_model(proto, str(staging))
    return gate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.gate",
        description="Calibrate a model's input gate on its training photos (stored in the model file).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="the .onnx model file")
    p.add_argument("--data", required=True, help="the training data: labels.csv, its folder, or grade folders")
    p.add_argument("-o", "--output", help="write the calibrated model here instead of in place")
    p.add_argument("--limit", type=int, default=2400, help="training photos used")
    p.add_argument("--raw", type=int, default=600, help="of them, how many also as a simulated raw-camera copy")
    args = p.parse_args(argv)
    try:
        gate = calibrate_model(args.model, args.data, args.output, args.limit, args.raw)
    except ExportError as exc:
        print(f"export.gate: error: {exc}", file=sys.stderr)
        return Exit.FATAL
    limits = ", ".join(f"{k} {v:.3g}" for k, v in gate.limits.items())
    print(f"calibrated the input gate on {gate.photos} photos -> {args.output or args.model}\nlimits: {limits}")
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
