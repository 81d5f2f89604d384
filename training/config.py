"""A training run's configuration and the data splits it trains, selects and tests on."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fundus_sdk.labels import Scale
from fundus_sdk.preprocess import Preprocess

from .data import Record, read_source, split_by_patient, train_test
from .losses import LOSSES
from .model import ModelConfig

VAL_GALLERY = 2000  # validation ranks against about this many training photos (validation_gallery)


@dataclass
class TrainConfig:
    data: str | list[str]  # one source, or several trained on together (`sources`)
    labels: str = "0-4"  # the grading scale (fundus_sdk.labels.Scale.parse): ICDR by default
    out: str = "runs/default"
    epochs: int = 6
    aug_views: int = 2
    batch_size: int = 60
    balance_power: float = 0.5  # grade quotas per batch ~ count ** power (0: uniform, 1: natural)
    source_weights: list[float] = field(default_factory=list)  # per source: how often its photos are drawn (default 1 each)
    batches_per_epoch: int = 0  # 0: one pass over the training images per epoch
    lr: float = 1e-3
    backbone_lr: float = 3e-4
    weight_decay: float = 1e-4
    loss: str = "fine"
    metric_weight: float = 1.0  # weight of the metric loss (`loss`)
    aux_weight: float = 0.5
    val_fraction: float = 0.1
    k: int = 10
    seed: int = 0  # initialisation, batch sampling, choice of cached view
    data_seed: int = 0  # validation split and augmentation pool (kept fixed across seeds)
    pretrained: bool = True
    limit: int = 0  # >0: use only this many images of each split (smoke tests)
    stop_after: int = 0  # >0: stop after this many epochs of this invocation (resume later)
    validate: bool = True  # False: no validation, the last epoch is kept (ablations compare like this)
    cache_dir: str = "runs/cache"
    threads: int = 2
    ordinal_weight: float = 0.0  # weight of the ordinal term: expected grade of the grade head vs the grade
    device: str = "auto"  # auto (CUDA when visible), cpu or cuda (bf16 autocast)
    init: str = ""  # a checkpoint to start from (fine-tuning an existing model)
    teacher: str = ""  # a checkpoint whose descriptor of each training view the model is kept near
    teacher_weight: float = 5.0  # weight of that term (1 - cosine to the teacher's descriptor)
    preprocess: Preprocess = field(default_factory=Preprocess)  # its size is the model's input size

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if isinstance(self.preprocess, dict):  # as stored in a checkpoint
            self.preprocess = Preprocess(**self.preprocess)
        Scale.parse(self.labels)  # ValueError naming the form
        if self.source_weights and len(self.source_weights) != len(self.sources):
            raise ValueError(f"{len(self.source_weights)} source weights given for {len(self.sources)} data sources")
        if any(w <= 0 for w in self.source_weights):
            raise ValueError(f"source weights must be positive, got {self.source_weights}")
        if self.teacher_weight < 0:
            raise ValueError(f"the teacher's weight must be non-negative, got {self.teacher_weight}")

    @property
    def sources(self) -> list[str]:
        """The data sources, each a label file, a folder holding labels.csv, or grade folders."""
        return [self.data] if isinstance(self.data, str) else list(self.data)

    def source_weight(self, source: int) -> float:
        return self.source_weights[source] if self.source_weights else 1.0

    @property
    def scale(self) -> Scale:
        """The run's grading scale: label cells and grade folders are read on it, the grade head
        has one class per grade, and NDCG uses its span."""
        return Scale.parse(self.labels)

    def preprocess_for(self, model_cfg: ModelConfig) -> Preprocess:
        """This run's preprocessing at the model's input size: the one source of the input size."""
        return replace(self.preprocess, size=model_cfg.input_size)


def source_names(sources: list[str]) -> list[str]:
    """A short distinct name per source: its data set's folder name (eyepacs256, idrid, ...)."""
    names = []
    for i, source in enumerate(sources):
        path = Path(source)
        name = path.name if path.is_dir() else path.parent.name or path.stem
        names.append(name if name not in names else f"{name}-{i + 1}")
    return names


def split_records(cfg: TrainConfig) -> tuple[list[Record], list[Record], list[Record]]:
    """(fit, validation, test): each source's train/test split, validation carved from its train
    split by patient; records carry their source's name (patients are never shared across sources)."""
    fit, val, test = [], [], []
    for source, name in zip(cfg.sources, source_names(cfg.sources)):
        records = [replace(r, source=name, patient=f"{name}/{r.patient}") for r in read_source(source, cfg.scale)]
        train_recs, test_recs = train_test(records, cfg.data_seed)
        if cfg.limit:
            train_recs, test_recs = train_recs[: cfg.limit], test_recs[: cfg.limit]
        fit_recs, val_recs = split_by_patient(train_recs, cfg.val_fraction, cfg.data_seed)
        fit, val, test = fit + fit_recs, val + val_recs, test + test_recs
    return fit, val, test


def validation_gallery(fit_idx: np.ndarray) -> np.ndarray:
    """The fixed slice of the fit photos (about VAL_GALLERY) that validation queries rank against."""
    return fit_idx[:: max(1, len(fit_idx) // VAL_GALLERY)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
