"""Checkpoint -> one verified, self-contained ONNX file with the contract's metadata."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from fundus_sdk import contract
from fundus_sdk.atomic import write_atomically
from training.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from training.data import DATA_ENV, LabelError, default_data, read_source

from .attention import add_attention_output
from .errors import ExportError
from .graph import attention_shape_ops, copy_model, node_counts, optimise, save_model, strip_debug_info, torch_to_onnx
from .metadata import build_metadata, fingerprint, write_metadata
from .variants import PRECISIONS, to_fp16, to_fp16_weights, to_int8
from .verify import MIN_COSINE, VERIFY_BATCH, load_images, sample_files, torch_attention, torch_embed, verify

ImageSource = str | Path | Sequence[str | Path]


@dataclass
class ExportReport:
    """What export_checkpoint wrote and checked."""

    path: Path
    precision: str
    nodes_exported: Counter  # by op type, as the torch exporter translated the model
    nodes_shipped: Counter  # by op type, in the file written
    cosines: np.ndarray  # per verification image, file vs torch
    metadata: dict[str, str]

    def summary(self) -> str:
        """Human-readable report: node counts, parity and metadata (long values shortened)."""
        ops = sorted(set(self.nodes_exported) | set(self.nodes_shipped))
        rows = [f"  {op:<24} {self.nodes_exported[op]:>7} {self.nodes_shipped[op]:>7}" for op in ops]
        meta = [f"  {k} = {v if len(v) <= 90 else v[:87] + '...'}" for k, v in self.metadata.items()]
        return "\n".join(
            [
                f"wrote {self.path} ({self.path.stat().st_size / 1e6:.2f} MB, {self.precision})",
                "graph nodes by op type, as exported from torch and as shipped:",
                f"  {'op':<24} {'export':>7} {'shipped':>7}",
                *rows,
                f"  {'total':<24} {sum(self.nodes_exported.values()):>7} {sum(self.nodes_shipped.values()):>7}",
                f"parity with torch on {len(self.cosines)} photos (batch {len(self.cosines)} and 1): "
                f"cosine min {self.cosines.min():.6f}, mean {self.cosines.mean():.6f} "
                f"(required >= {MIN_COSINE[self.precision]})",
                "metadata:",
                *meta,
            ]
        )


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    precision: str = "fp32",
    calib: ImageSource | None = None,
    calib_limit: int = 128,
    verify_images: ImageSource | None = None,
    name: str | None = None,
    version: str | None = None,
    detail_size: int | None = None,
) -> ExportReport:
    """Export a training checkpoint to `output` at `precision` and verify it against torch.

    precision: one of export.variants.PRECISIONS (int8 needs `calib`, see export_variants).
    """
    return export_variants(
        checkpoint,
        {precision: output},
        calib=calib,
        calib_limit=calib_limit,
        verify_images=verify_images,
        name=name,
        version=version,
        detail_size=detail_size,
    )[0]


def model_version(ckpt: Checkpoint, version: str | None) -> str:
    """The version to stamp: the one given, else the checkpoint's own; never a made-up default."""
    version = version or ckpt.state.get("version")
    if not version:
        raise ExportError(f"{ckpt.path}: the checkpoint records no model version: give one (--version 1.0.0)")
    return str(version)


def export_variants(
    checkpoint: str | Path,
    outputs: Mapping[str, str | Path],
    *,
    calib: ImageSource | None = None,
    calib_limit: int = 128,
    verify_images: ImageSource | None = None,
    name: str | None = None,
    version: str | None = None,
    detail_size: int | None = None,
) -> list[ExportReport]:
    """Export one checkpoint at several precisions from one torch export, e.g.
    {"fp32": "m.onnx", "int8": "m-int8.onnx"}; reports in the same order.

    calib: photographs (folder or files) for int8 calibration, of which `calib_limit` spread over
    the sorted list are used. verify_images: photographs for the parity check (default: the
    checkpoint's training data if present, else the EyePACS folder beside the repository).
    name defaults to "fundus-<backbone>-<mirroring>". detail_size, when given, replaces the
    training run's (see fundus_sdk.preprocess): set it to the training photos' resolution when
    they were smaller than the photos the model will meet.
    A file only appears at its path once it passed verification; ExportError (one-line message)
    for an unusable checkpoint or a failed verification.
    """
    unknown = set(outputs) - set(PRECISIONS)
    if unknown or not outputs:
        raise ValueError(f"precisions must be among {PRECISIONS}, got {sorted(outputs)}")
    if "int8" in outputs and calib is None:
        raise ExportError("int8 export needs calibration photographs (calib / --calib DIR)")
    try:
        ckpt = load_checkpoint(checkpoint)
        if detail_size is not None:
            ckpt = replace(ckpt, preprocess=replace(ckpt.preprocess, detail_size=detail_size))
        module = ckpt.module()
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    version = model_version(ckpt, version)  # before any work
    preprocess = ckpt.preprocess
    images = load_images(verification_photos(ckpt, verify_images), preprocess)
    reference = torch_embed(module, images)
    explained = ckpt.config.mirroring != "none"
    attention = torch_attention(module, images) if explained else None

    raw, fp32 = torch_to_onnx(module, ckpt.config.input_size)
    fp32 = optimise(fp32)
    leftovers = attention_shape_ops(fp32)
    if leftovers:
        raise ExportError(f"{ckpt.path}: shape computations left in the attention graph: {dict(leftovers)}")
    if explained:
        fp32 = add_attention_output(fp32)

    reports = []
    for precision, output in outputs.items():
        if precision == "fp16":
            model = to_fp16(fp32)
        elif precision == "fp16-weights":
            model = to_fp16_weights(fp32)
        elif precision == "int8":
            model = to_int8(fp32, load_images(sample_files(calib, calib_limit), preprocess))
        else:
            model = copy_model(fp32)
        strip_debug_info(model)
        meta = build_metadata(
            ckpt,
            name=name or f"fundus-{ckpt.config.backbone}-{ckpt.config.mirroring}",
            version=version,
            precision=precision,
        )
        meta[contract.FINGERPRINT] = fingerprint(model, meta)
        write_metadata(model, meta)
        output = Path(output)
        cosines = write_verified(model, output, reference, images, precision, attention)
        reports.append(ExportReport(output, precision, node_counts(raw), node_counts(model), cosines, meta))
    return reports


def verification_photos(ckpt: Checkpoint, verify_images: ImageSource | None) -> list[Path]:
    """Photos for the parity check: the caller's, else the checkpoint's training data when it is
    on this machine, else the data set named by FUNDUS_SDK_DATA."""
    if verify_images:
        return sample_files(verify_images, VERIFY_BATCH)
    for source in (ckpt.train_config.get("data"), default_data()):
        if source and Path(source).exists():
            try:
                return sample_files([r.path for r in read_source(source)], VERIFY_BATCH)
            except LabelError:
                pass  # a moved or edited data set: try the next
    raise ExportError(
        f"no photographs to verify the export on: pass verify_images (--verify-images DIR) or set {DATA_ENV}"
    )


def write_verified(
    model: onnx.ModelProto,
    output: Path,
    reference: np.ndarray,
    images: np.ndarray,
    precision: str,
    attention: np.ndarray | None = None,
) -> np.ndarray:
    """Save to a staging file beside `output`, verify it, then move it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with write_atomically(output, durable=False) as staging:
        save_model(model, staging)
        cosines = verify(staging, reference, images, precision, attention)
    return cosines
