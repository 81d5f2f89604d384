"""Calibrate a model's input gate on its training and validation photos and store it in the model file.

    python -m export.gate fundus_sdk/models/default.onnx --data ../shared/data/eyepacs256

The gate (fundus_sdk/gate.py) needs the distribution of the model's descriptors on fundus
photographs and each signal's range. The distribution is fitted on training photos and on
simulated raw-camera copies of some (training/camera.py), so that both the enhanced EyePACS-style
photos and raw clinic photos are "like the training photos". The limits are set on the
validation photos, which training held out: a network knows its own training photos, whose
descriptors sit closer to the distribution than any new photo's (measured for the 0.3.0 model:
median distance 21.7 against 23.1, 99th percentile 26.8 against 29.2), so limits set on them
refused new photos. Each validation photo counts as published and as `copies` raw copies, each
kind held to the same refusal rate. The calibration is stored as the metadata entry
`gate.calibration`; the weights, and so the model's fingerprint, are unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from PIL import Image
from tqdm import tqdm

from fundus_sdk import contract
from fundus_sdk.atomic import write_atomically
from fundus_sdk.errors import Exit, FundusError
from fundus_sdk.gate import CALIBRATION_KEY, Gate, Signals, calibrate
from fundus_sdk.model import Model
from training.camera import simulated_raw
from training.config import TrainConfig, split_records
from training.data import Record

from .errors import ExportError
from .metadata import write_metadata


def with_raw_copies(records: list[Record], copied: int, copies: int, rng: np.random.Generator) -> Iterator[Image.Image]:
    """Each record's photo, then `copies` rounds of simulated raw-camera copies of the first `copied`."""
    for r in records:
        yield Image.open(r.path).convert("RGB")
    for _ in range(copies):
        for r in records[:copied]:
            yield simulated_raw(Image.open(r.path).convert("RGB"), rng)


def measure_photos(
    model: Model, photos: Iterable[Image.Image], total: int, desc: str = "measuring photos", batch_size: int = 32
) -> tuple[np.ndarray, list[Signals]]:
    """The model's descriptors and the gate's signals of each photo (read as they come)."""
    vectors, signals, pending = [], [], []

    def flush() -> None:
        prepared = [model.preprocess.prepare(model.preprocess.decode(p)) for p in pending]
        vectors.append(model.run(np.stack([p.pixels for p in prepared])))
        signals.extend(p.signals for p in prepared)
        bar.update(len(pending))
        pending.clear()

    with tqdm(total=total, desc=desc, unit="photo") as bar:
        for photo in photos:
            pending.append(photo)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    return np.concatenate(vectors), signals


def calibrate_model(
    model_path: str | Path,
    data: str | Path | list[str | Path],
    output: str | Path | None = None,
    limit: int = 2400,
    raw: int = 600,
    copies: int = 2,
    data_seed: int = TrainConfig.data_seed,
    val_fraction: float = TrainConfig.val_fraction,
) -> Gate:
    """Calibrate the gate of the model at `model_path` and write the model (in place by default).

    The distribution: `limit` training photos and a raw copy of `raw` of them. The limits: every
    validation photo (the split training made with `data_seed` and `val_fraction`) and `copies`
    raw copies of each.
    """
    model_path = Path(model_path)
    rng = np.random.default_rng(0)
    try:
        model = Model.load(model_path, providers="cpu")
        sources = [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data)
        config = TrainConfig(data=sources, labels=model.scale.spec, data_seed=data_seed, val_fraction=val_fraction)
        fit, held, _ = split_records(config)
        if not held:
            raise ExportError(f"{data}: no validation photos; the limits need photos the model did not learn from")
        recorded = json.loads(model.metadata.get(contract.TRAINING_DATA) or "{}").get("validation", {}).get("images")
        if recorded is not None and recorded != len(held):
            raise ExportError(
                f"{data}: the validation split has {len(held)} photos, the model's training recorded {recorded}: "
                "give the --data-seed and --val-fraction it was trained with"
            )
        fit = [fit[i] for i in sorted(rng.choice(len(fit), min(limit, len(fit)), replace=False))]
        raw = min(raw, len(fit))
        fit_vectors, _ = measure_photos(model, with_raw_copies(fit, raw, 1, rng), len(fit) + raw, "training photos")
        held_vectors, signals = measure_photos(
            model, with_raw_copies(held, len(held), copies, rng), len(held) * (1 + copies), "validation photos"
        )
    except (FundusError, OSError, ValueError) as exc:
        raise ExportError(str(exc)) from exc
    gate = calibrate(fit_vectors, held_vectors, signals, np.repeat([0, 1], [len(held), copies * len(held)]))
    proto = onnx.load(str(model_path))
    write_metadata(proto, {**{p.key: p.value for p in proto.metadata_props}, CALIBRATION_KEY: gate.to_json()})
    with write_atomically(Path(output or model_path), durable=True) as staging:
        onnx.save_model(proto, str(staging))
    return gate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.gate",
        description="Calibrate a model's input gate on its training and validation photos (stored in the model file).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="the .onnx model file")
    p.add_argument("--data", required=True, nargs="+",
                   help="the training data: labels.csv, its folder, or grade folders; several, as the model was trained")
    p.add_argument("-o", "--output", help="write the calibrated model here instead of in place")
    p.add_argument("--limit", type=int, default=2400, help="training photos the distribution is fitted on")
    p.add_argument("--raw", type=int, default=600, help="of them, how many also as a simulated raw-camera copy")
    p.add_argument("--copies", type=int, default=2, help="simulated raw-camera copies of each validation photo")
    p.add_argument("--data-seed", type=int, default=TrainConfig.data_seed, help="the validation split, as trained")
    p.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction,
                   help="the validation split, as trained (its size is checked against the model's record)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        gate = calibrate_model(
            args.model, args.data, args.output, args.limit, args.raw, args.copies, args.data_seed, args.val_fraction
        )
    except ExportError as exc:
        print(f"export.gate: error: {exc}", file=sys.stderr)
        return Exit.FATAL
    limits = ", ".join(f"{k} {v:.3g}" for k, v in gate.limits.items())
    print(f"calibrated the input gate on {gate.photos} photos -> {args.output or args.model}\nlimits: {limits}")
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
