"""Grade probe: do a model's features tell each grade from grade 0 at all?

A grade's retrieval hit rate needs two things: features that carry the grade, and a descriptor
that puts photos of one grade next to each other. The probe measures the first, so that a weak
grade is blamed on the right part: a class-balanced linear classifier on the pooled features
(the input of the projection), fitted on the training split and judged on the test split. It
reports each grade's recall and the ROC AUC of grade g against grade 0 (0.5: no signal, 1:
perfect). When that AUC is low, no loss on the head can raise the grade's hit rate without
giving up grade 0, whose photos outnumber it in every neighbourhood.

    python -m training probe --data ../shared/data/eyepacs256 --checkpoint runs/default/best.pt
    python -m training probe --data ../shared/data/eyepacs256   # the untrained ImageNet backbone
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from fundus_sdk.tables import format_table

from .cache import clean_maps_by_split, embed_maps
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .model import FundusNet, ModelConfig


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC: the chance that a positive scores above a negative (ties count half)."""
    if not len(positive) or not len(negative):
        return float("nan")
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def linear_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, grades: int,
    steps: int = 1500, weight_decay: float = 1e-2, seed: int = 0,
) -> np.ndarray:
    """Log-probabilities on `x_test` of a softmax classifier fitted to (x_train, y_train), whose
    labels are class indices 0 .. grades - 1.

    Classes are weighted by inverse frequency (every grade counts equally) and the features are
    standardised with the training statistics; full-batch Adam, a fixed number of steps.
    """
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt = torch.tensor((x_train - mean) / std, dtype=torch.float32)
    yt = torch.tensor(y_train, dtype=torch.long)
    counts = torch.bincount(yt, minlength=grades).float().clamp(min=1)
    weight = (1 / counts) / (1 / counts).sum() * grades
    clf = torch.nn.Linear(xt.shape[1], grades)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(clf(xt), yt, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return F.log_softmax(clf(torch.tensor((x_test - mean) / std, dtype=torch.float32)), 1).numpy()


def probe(cfg: TrainConfig, model_cfg: ModelConfig, checkpoint: str | None = None) -> dict:
    """Recall per grade and AUC of each grade against grade 0, on the test split.

    With a checkpoint, its network and preprocessing are used; without, the ImageNet backbone
    with GeM pooling and no training. The classifier is fitted on the whole training split.
    """
    torch.set_num_threads(cfg.threads)
    if checkpoint:
        ckpt = load_checkpoint(checkpoint)
        net = ckpt.module().net
        run = ckpt.train_config  # the run's split and preprocessing: its trunk cache is reused
        cfg = replace(
            cfg, preprocess=ckpt.preprocess, labels=ckpt.scale.spec,
            val_fraction=run.get("val_fraction", cfg.val_fraction), data_seed=run.get("data_seed", cfg.data_seed),
        )
    else:
        net = FundusNet(replace(model_cfg, mirroring="none"), pretrained=True)
    scale = cfg.scale
    maps, grades, is_test = clean_maps_by_split(net, cfg)
    classes = grades - scale.low  # the scale's lowest grade is class 0
    pooled = embed_maps(net, maps, pooled=True)
    logp = linear_probe(pooled[~is_test], classes[~is_test], pooled[is_test], len(scale))
    truth, predicted = classes[is_test], logp.argmax(1)
    report: dict = {"model": checkpoint or f"{model_cfg.backbone} (ImageNet, untrained)", "grades": {}}
    for c, g in enumerate(scale.values):
        mine = truth == c
        entry = {"queries": int(mine.sum()), "recall": float((predicted[mine] == c).mean()) if mine.any() else None}
        if c:  # how well the classifier's own score for g ranks grade g above the lowest grade
            score = logp[:, c] - logp[:, 0]
            entry["auc_vs_grade_0"] = auc(score[mine], score[truth == 0])
        report["grades"][g] = entry
    report["balanced_accuracy"] = float(np.mean([e["recall"] for e in report["grades"].values() if e["recall"] is not None]))
    return report


def format_probe(report: dict) -> str:
    rows = [
        [g, e["queries"], "-" if e["recall"] is None else f"{e['recall']:.3f}",
         f"{e['auc_vs_grade_0']:.3f}" if "auc_vs_grade_0" in e else ""]
        for g, e in report["grades"].items()
    ]  # fmt: skip
    return "\n".join([
        f"linear probe on the pooled features of {report['model']} (test split):",
        format_table(["grade", "queries", "recall", "AUC vs grade 0"], rows, align="rrrr"),
        f"balanced accuracy {report['balanced_accuracy']:.3f} (chance {1 / len(report['grades']):.3f})",
    ])  # fmt: skip
