"""Checking an exported file against the torch model, and comparing precision variants.

Everything runs on real photographs preprocessed exactly as the runtime does
(fundus_sdk.preprocess.Preprocess, rebuilt from the file's own metadata where there is one).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fundus_sdk import metrics
from fundus_sdk.contract import ATTENTION_NAME, INPUT_NAME, PRECISION
from fundus_sdk.errors import ImageError, one_line
from fundus_sdk.inputs import find_images
from fundus_sdk.preprocess import Preprocess
from fundus_sdk.tables import format_table

from .attention import check_attention
from .errors import ExportError
from .metadata import read_metadata

VERIFY_BATCH = 7  # images per verification; the file must also agree on batch size 1

# Lowest per-image cosine to the torch model an export must reach. fp32: the requirement.
# fp16/int8: below the worst per-image values we measured on EyePACS test photos (Lite0 with
# ImageNet weights and a random attention output): fp16 0.99998 (48 photos); int8 0.980 on 96
# photos with 64-128 calibration photos (mean 0.996), 0.947 with only 8. A broken conversion
# fails; quantisation noise passes.
MIN_COSINE = {"fp32": 0.9999, "fp16-weights": 0.9999, "fp16": 0.9995, "int8": 0.95}
# How far an attention map's sum may be from 1 (int8 quantises the softmax: Lite0 maps sum to 0.94-1.00).
MAP_SUM_TOLERANCE = {"fp32": 1e-3, "fp16-weights": 1e-3, "fp16": 1e-3, "int8": 0.1}


def sample_files(source: str | Path | Sequence[str | Path], n: int) -> list[Path]:
    """`n` image files spread evenly over the sorted files of a folder (or a list of paths)."""
    paths = [source] if isinstance(source, (str, Path)) else list(source)
    try:
        files = find_images(paths)
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from exc
    if not files:
        raise ExportError(f"{', '.join(map(str, paths))}: no image files found")
    step = max(1, len(files) // n)
    return files[::step][:n]


def load_images(files: Sequence[Path], preprocess: Preprocess) -> np.ndarray:
    """Preprocessed uint8 (n, size, size, 3) batch of the given files."""
    try:
        return np.stack([preprocess(f) for f in files])
    except ImageError as exc:
        raise ExportError(str(exc)) from exc


def session(path: str | Path, threads: int = 2) -> ort.InferenceSession:
    """A CPU session as the runtime opens one (all online optimisations on)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(sess: ort.InferenceSession, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """Descriptors of `images`, run in batches of `batch`."""
    runs = [sess.run(None, {INPUT_NAME: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(runs)


@torch.no_grad()
def torch_embed(module: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    return module(torch.from_numpy(images)).numpy()


@torch.no_grad()
def torch_attention(module: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    return module.attention_map(torch.from_numpy(images)).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def verify(
    path: Path, reference: np.ndarray, images: np.ndarray, precision: str, attention: np.ndarray | None = None
) -> np.ndarray:
    """Check the file and return per-image cosines to `reference` (the torch model's descriptors
    of `images`); ExportError on failure.

    Checks: onnx.checker (full); output shape, dtype and unit norm; the whole batch and batch 1
    both agree with the reference at MIN_COSINE[precision]. With `attention` (the torch model's
    attention maps), the file's `attention` output must be distributions agreeing with it at the
    same cosine.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: onnx.checker failed ({one_line(exc)})") from exc
    sess = session(path)
    batched = sess.run(None, {INPUT_NAME: images})[0]
    single = sess.run(None, {INPUT_NAME: images[:1]})[0]
    if batched.dtype != np.float32 or batched.shape != reference.shape or single.shape != (1, reference.shape[1]):
        raise ExportError(
            f"{path}: output is {batched.dtype} {batched.shape} (batch 1: {single.shape}), "
            f"expected float32 {reference.shape}"
        )
    norms = np.linalg.norm(batched, axis=1)
    if np.abs(norms - 1).max() > 1e-3:
        raise ExportError(f"{path}: descriptors are not unit length (norms {norms.min():.5f}..{norms.max():.5f})")
    cos = cosine(batched, reference)
    cos_single = float(cosine(single, reference[:1])[0])
    floor = MIN_COSINE[precision]
    if cos.min() < floor or cos_single < floor:
        raise ExportError(
            f"{path}: {precision} graph disagrees with torch: lowest cosine {min(cos.min(), cos_single):.6f} "
            f"(batch {len(images)}: {cos.min():.6f}, batch 1: {cos_single:.6f}), required >= {floor}"
        )
    if attention is not None:
        maps = sess.run([ATTENTION_NAME], {INPUT_NAME: images})[0]
        if maps.shape != attention.shape:
            raise ExportError(f"{path}: attention output is {maps.shape}, torch's {attention.shape}")
        check_attention(maps, path, MAP_SUM_TOLERANCE[precision])
        agree = cosine(maps.reshape(len(maps), -1), attention.reshape(len(attention), -1))
        if agree.min() < floor:
            raise ExportError(f"{path}: {precision} attention map disagrees with torch: lowest cosine {agree.min():.6f}")
    return cos


@dataclass
class VariantReport:
    """One model file measured against the reference file on the same images."""

    path: Path
    precision: str
    size_bytes: int
    ms_per_image: float  # onnxruntime CPU, `threads` threads, batches of `batch`, preprocessing excluded
    cosine_mean: float  # to the reference's descriptor of the same image
    cosine_min: float
    knn_agreement: float  # mean overlap of each image's k nearest neighbours with the reference's
    retrieval: dict | None = None  # fundus_sdk.metrics.evaluate report, when grades were given
    embeddings: np.ndarray = field(default=None, repr=False)


def _knn(x: np.ndarray, k: int) -> np.ndarray:
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1)[:, :k]


def compare_variants(
    paths: Sequence[str | Path],
    images: Sequence[str | Path] | np.ndarray,
    *,
    k: int = 10,
    grades: Sequence[int] | None = None,
    is_query: Sequence[bool] | None = None,
    threads: int = 2,
    batch: int = 16,
) -> list[VariantReport]:
    """Measure each model file; the first of `paths` is the reference (normally fp32).

    `images` are files (preprocessed with each model's own metadata) or a preprocessed uint8
    batch. With `grades` and a boolean `is_query` mask, each report also carries the retrieval
    metrics of ranking the queries against the rest (gallery), e.g. test vs train split.
    """
    reports: list[VariantReport] = []
    arrays: dict[Preprocess, np.ndarray] = {}
    for path in map(Path, paths):
        meta = read_metadata(path)
        if isinstance(images, np.ndarray):
            x = images
        else:
            pp = Preprocess.from_metadata(meta)
            if pp not in arrays:
                arrays[pp] = load_images([Path(f) for f in images], pp)
            x = arrays[pp]
        sess = session(path, threads)
        sess.run(None, {INPUT_NAME: x[:batch]})  # warm-up
        start = time.perf_counter()
        vectors = embed(sess, x, batch)
        ms = (time.perf_counter() - start) * 1000 / len(x)
        ref = reports[0].embeddings if reports else vectors
        cos = cosine(vectors, ref)
        kk = min(k, len(x) - 1)
        overlap = [len(set(a) & set(b)) / kk for a, b in zip(_knn(vectors, kk), _knn(ref, kk))]
        retrieval = None
        if grades is not None and is_query is not None:
            g, q = np.asarray(grades), np.asarray(is_query, dtype=bool)
            retrieval = metrics.retrieval_report(vectors[q], vectors[~q], g[q], g[~q], k)
        reports.append(
            VariantReport(
                path=path,
                precision=meta.get(PRECISION, "?"),
                size_bytes=path.stat().st_size,
                ms_per_image=ms,
                cosine_mean=float(cos.mean()),
                cosine_min=float(cos.min()),
                knn_agreement=float(np.mean(overlap)),
                retrieval=retrieval,
                embeddings=vectors,
            )
        )
    return reports


def format_reports(reports: Sequence[VariantReport]) -> str:
    """A plain-text table of variant reports (cosine and k-NN agreement are to the first row)."""
    rows = [
        [r.path.name, r.precision, f"{r.size_bytes / 1e6:.2f}", f"{r.ms_per_image:.1f}",
         f"{r.cosine_mean:.5f}", f"{r.cosine_min:.5f}", f"{r.knn_agreement:.3f}"]
        for r in reports
    ]  # fmt: skip
    lines = [format_table(["file", "precision", "MB", "ms/img", "cos mean", "cos min", "kNN agree"], rows)]
    for r in reports:
        if r.retrieval is not None:
            lines += ["", f"retrieval, {r.path.name} ({r.precision}): test split against train split", metrics.format_report(r.retrieval)]
    return "\n".join(lines)
