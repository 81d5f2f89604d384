"""Labelled fundus data: reading label files and folders, patient-grouped splits, augmentation,
class-balanced sampling."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from fundus_sdk import labels
from fundus_sdk.inputs import IMAGE_SUFFIXES
from fundus_sdk.labels import ICDR, LabelError, Scale

DATA_ENV = "FUNDUS_SDK_DATA"  # a labelled data set (a folder holding labels.csv and images/)


def default_data() -> Path | None:
    """The data set named by the FUNDUS_SDK_DATA environment variable, or None when unset."""
    value = os.environ.get(DATA_ENV)
    return Path(value) if value else None


@dataclass(frozen=True)
class Record:
    path: Path
    grade: int
    patient: str
    split: str = ""
    source: str = ""  # the data source's name when several are trained on together


def read_labels(csv_path: str | Path, image_root: str | Path | None = None, scale: Scale = ICDR) -> list[Record]:
    """Records from a label CSV (see fundus_sdk.labels): image, grade on `scale`, optional
    patient, split. Without a patient column each image is its own patient.
    """
    return [
        Record(lab.path, lab.grade, (lab.fields.get("patient") or "").strip() or lab.image, (lab.fields.get("split") or "").strip())
        for lab in labels.read_labels(csv_path, image_root, scale=scale)
    ]


def read_folder(root: str | Path, scale: Scale = ICDR) -> list[Record]:
    """Records from a folder laid out as root/<grade>/<image>, sub-folders named by the grades
    (or the names) of `scale`."""
    root = Path(root)
    records = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            grade = scale.read(sub.name)
        except ValueError as exc:
            raise LabelError(f"{sub}: sub-folders must be named by the grades of the scale {scale.spec} ({exc})") from None
        records += [
            Record(p, grade, p.stem)
            for p in sorted(sub.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
    if not records:
        raise LabelError(f"{root}: no images in grade sub-folders (the scale {scale.spec})")
    return records


def read_source(source: str | Path, scale: Scale = ICDR) -> list[Record]:
    """A labels CSV, a data-set folder holding labels.csv, or a grade-folder tree, graded on `scale`."""
    source = Path(source)
    if source.is_dir() and (source / "labels.csv").is_file():
        return read_labels(source / "labels.csv", scale=scale)
    if source.is_dir():
        return read_folder(source, scale)
    return read_labels(source, scale=scale)


def split_by_patient(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(rest, held_out): about `fraction` of patients held out, grouped so no patient straddles."""
    patients = sorted({r.patient for r in records})
    random.Random(seed).shuffle(patients)
    held = set(patients[: max(1, round(fraction * len(patients)))])
    return [r for r in records if r.patient not in held], [r for r in records if r.patient in held]


def train_test(records: list[Record], seed: int, test_fraction: float = 0.2) -> tuple[list[Record], list[Record]]:
    """The file's own split column when it has one, else a patient-grouped split."""
    if all(r.split in ("train", "test") for r in records):
        return [r for r in records if r.split == "train"], [r for r in records if r.split == "test"]
    return split_by_patient(records, test_fraction, seed)


def augment(pil: Image.Image, rng: random.Random) -> Image.Image:
    """A random, label-preserving variant of a decoded fundus photo.

    Geometry: small rotation, scale and aspect changes, a horizontal flip (a flipped left eye
    is a plausible right eye; the model's mirror views are computed from whatever it is given,
    so no view can leak a label). Photometry, aimed at raw clinic photos: colour casts,
    brightness, contrast, gamma, dim and low-contrast exposures (few grey levels left, which
    equalisation cannot restore), off-centre vignetting, blur (lower-resolution cameras) and
    sensor noise.
    """
    w, h = pil.size
    if rng.random() < 0.5:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    angle = rng.uniform(-15, 15)
    scale = rng.uniform(0.9, 1.1)
    aspect = rng.uniform(0.92, 1.08)
    pil = pil.rotate(angle, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    nw, nh = round(w * scale * aspect), round(h * scale / aspect)
    pil = pil.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    pil = pil.crop((left, top, left + w, top + h))
    a = np.asarray(pil, dtype=np.float32) / 255.0
    fov = a.max(axis=2) > 20 / 255  # photometry changes the field of view; the surround stays black
    cast = np.array([rng.uniform(0.8, 1.2), rng.uniform(0.6, 1.1), rng.uniform(0.4, 1.1)])
    a = np.clip(a * cast * rng.uniform(0.7, 1.3), 0, 1) ** rng.uniform(0.7, 1.4)
    mean = a[fov].mean(axis=0) if fov.any() else 0.5
    a = mean + (a - mean) * rng.uniform(0.6, 1.3)  # contrast around the field's mean colour
    if rng.random() < 0.5:  # a dim exposure: fewer grey levels, which equalisation cannot restore
        a *= rng.uniform(0.3, 1.0)
    if rng.random() < 0.5:  # vignetting around a point near the centre
        yy, xx = np.mgrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
        cy, cx = rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2)
        a *= np.clip(1 - rng.uniform(0.1, 0.45) * ((xx - cx) ** 2 + (yy - cy) ** 2), 0, 1)[..., None]
    pil = Image.fromarray(np.rint(np.where(fov[..., None], np.clip(a, 0, 1), 0) * 255).astype(np.uint8))
    if rng.random() < 0.3:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    if rng.random() < 0.3:
        noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(2, 6), (h, w, 3))
        noisy = np.asarray(pil, dtype=np.float32) + noise * fov[..., None]
        pil = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return pil


class BalancedBatches:
    """Batches with a fixed quota of samples per grade: quota ~ (grade count) ** `power`.

    power 0 gives every grade the same quota (rare grades 3 and 4 are seen many times per
    epoch and get memorised); power 1 follows the data (grade 0 swamps the rest); the default
    0.5 sits between. Every grade present gets at least 2 (a positive pair). Samples within a
    grade are drawn without replacement until exhausted, then reshuffled. `weights` (per sample,
    default 1) say how often a sample is drawn relative to the others: a small second source
    with weight 3 enters each grade's pool three times (a fractional part enters at random).
    """

    def __init__(self, labels: np.ndarray, batch_size: int, batches: int, seed: int, power: float = 0.5,
                 weights: np.ndarray | None = None):  # fmt: skip
        self.labels = np.asarray(labels)
        self.weights = np.ones(len(self.labels)) if weights is None else np.asarray(weights, dtype=float)
        self.classes = sorted(int(g) for g in np.unique(self.labels))
        counts = np.array([self.weights[self.labels == g].sum() for g in self.classes], dtype=float)
        share = counts**power / (counts**power).sum() * batch_size
        quota = np.maximum(2, np.floor(share)).astype(int)
        for i in np.argsort(-(share - np.floor(share)))[: max(0, batch_size - quota.sum())]:
            quota[i] += 1
        self.quota = dict(zip(self.classes, quota.tolist()))
        self.batches = batches
        self.rng = np.random.default_rng(seed)
        self.pools: dict[int, list[int]] = {g: [] for g in self.classes}

    def _take(self, g: int) -> list[int]:
        out: list[int] = []
        while len(out) < self.quota[g]:
            if not self.pools[g]:
                members = np.flatnonzero(self.labels == g)
                w = self.weights[members]
                copies = np.floor(w).astype(int)
                if (w != copies).any():  # fractional weights (whole ones leave the random sequence as it was)
                    copies += self.rng.random(len(w)) < w - copies
                if not copies.any():  # weights all below 1 drew no copy: take each once
                    copies[:] = 1
                self.pools[g] = list(self.rng.permutation(np.repeat(members, copies)))
            out.append(int(self.pools[g].pop()))
        return out

    def __iter__(self):
        for _ in range(self.batches):
            yield np.array([i for g in self.classes for i in self._take(g)])

    def __len__(self) -> int:
        return self.batches
