"""Retrieval of a trained checkpoint under two protocols, from one embedding of every photo.

- "patient" (the headline): gallery = the data's train split, queries = its test split, which
  keeps each patient's photos on one side;
- "image" (the paper's): a random image-level 80/20 split of the same photos, where most queries
  have the same patient's other eye in the gallery. Reported only to compare with published
  figures, which used it; it flatters every model.

    python -m training evaluate --data ../shared/data/eyepacs256 --checkpoint runs/default/best.pt
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fundus_sdk import metrics

from .checkpoint import load_checkpoint
from .config import TrainConfig, split_records
from .device import resolve_device
from .photos import InMemoryPhotos

PROTOCOLS = ("patient", "image")


def evaluate_checkpoint(cfg: TrainConfig, checkpoint: str, image_split_seed: int = 0) -> dict[str, dict]:
    """{"patient": report, "image": report} (fundus_sdk.metrics reports) at k = cfg.k."""
    torch.set_num_threads(cfg.threads)
    ckpt = load_checkpoint(checkpoint)
    net = ckpt.network()
    run = ckpt.train_config
    cfg = replace(cfg, preprocess=ckpt.preprocess, data_seed=run.get("data_seed", cfg.data_seed), labels=ckpt.scale.spec)
    fit, val, test = split_records(cfg)
    everyone = fit + val + test
    device = resolve_device(cfg.device)
    photos = InMemoryPhotos(net, cfg, everyone, np.arange(0), print)
    ok = np.flatnonzero(photos.ok)
    vectors = photos.embed(net.to(device), ok, device)
    grades = np.array([everyone[i].grade for i in ok])
    is_test = ok >= len(fit) + len(val)
    held_out = np.random.default_rng(image_split_seed).permutation(len(ok))[: round(0.2 * len(ok))]
    is_query = np.zeros(len(ok), dtype=bool)
    is_query[held_out] = True
    return {
        "patient": metrics.retrieval_report(
            vectors[is_test], vectors[~is_test], grades[is_test], grades[~is_test], cfg.k, cfg.scale.span
        ),
        "image": metrics.retrieval_report(
            vectors[is_query], vectors[~is_query], grades[is_query], grades[~is_query], cfg.k, cfg.scale.span
        ),
    }
