"""Retrieval of trained checkpoints under two protocols, from one embedding of every photo.

- "patient" (the headline): gallery = the data's train split, queries = its test split, which
  keeps each patient's photos on one side;
- "image" (the paper's): a random image-level 80/20 split of the same photos, where most queries
  have the same patient's other eye in the gallery. Reported only to compare with published
  figures, which used it; it flatters every model.

Several checkpoints are evaluated as one ensemble, the way `python -m export.ensemble` combines
their exported files (`ensemble_vectors`). Choose its weights on the validation split first
(`sweep_weights`, `--sweep`: each source's validation part apart, the weights chosen on their mean
as training chooses an epoch), then read the test split once for the weights chosen:

    python -m training evaluate --data ../shared/data/eyepacs256 --checkpoint runs/default/best.pt
    python -m training evaluate --data ../shared/data/eyepacs256 --checkpoint a/best.pt b/best.pt --sweep
    python -m training evaluate --data ../shared/data/eyepacs256 --checkpoint a/best.pt b/best.pt --weights 0.6 0.4
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fundus_sdk import metrics

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .config import TrainConfig, split_records, validation_gallery
from .device import resolve_device
from .photos import InMemoryPhotos
from .train import by_source, sources_score

SWEEP = tuple(round(0.1 * i, 1) for i in range(11))  # the first member's weights tried by sweep_weights


def ensemble_vectors(members: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Several models' unit descriptors of the same photos as one: each scaled by the square root of
    its (normalised) weight and concatenated, so the cosine is the weighted mean of the members'."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) != len(members) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need one non-negative weight per member ({len(members)}), not {list(weights)}")
    out = np.concatenate([np.sqrt(wi / w.sum()) * v for wi, v in zip(w, members)], axis=1)
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass
class Embedded:
    """Every readable photo of the data, embedded by each member: what both protocols rank."""

    vectors: list[np.ndarray]  # one (n, dim_i) array per member
    grades: np.ndarray
    split: np.ndarray  # 0 fit, 1 validation, 2 test
    sources: np.ndarray  # each photo's source name (config.source_names)
    k: int
    span: int
    validation: bool = False  # only the validation gallery (split 0) and queries (split 1) were embedded


def embed_members(cfg: TrainConfig, checkpoints: Sequence[str], validation: bool = False) -> Embedded:
    """Embed the data with each checkpoint; CheckpointError unless they share the split and preprocessing.
    With `validation`, only what a sweep ranks (the validation gallery and queries, as training
    validates an epoch): the test split is never embedded, and a sweep takes less than half the time."""
    torch.set_num_threads(cfg.threads)
    ckpts = [load_checkpoint(c) for c in checkpoints]
    first = ckpts[0]
    for path, ckpt in zip(checkpoints[1:], ckpts[1:]):
        for what, a, b in (
            ("preprocessing", ckpt.preprocess, first.preprocess),
            ("data split (data_seed, val_fraction)", _split_of(ckpt), _split_of(first)),
            ("grading scale", ckpt.scale.spec, first.scale.spec),
        ):
            if a != b:
                raise CheckpointError(f"{path}: its {what} differs from {checkpoints[0]}'s ({a} against {b}): "
                                      "the members of an ensemble share one input and one split")  # fmt: skip
    data_seed, val_fraction = _split_of(first)
    cfg = replace(cfg, preprocess=first.preprocess, data_seed=data_seed, val_fraction=val_fraction, labels=first.scale.spec)
    fit, val, test = split_records(cfg)
    everyone = fit + val + test
    device = resolve_device(cfg.device)
    nets = [c.network() for c in ckpts]
    photos = InMemoryPhotos(nets[0], cfg, everyone, np.arange(0), print)  # decoded once: the members share it
    split_of = np.repeat([0, 1, 2], [len(fit), len(val), len(test)])
    rows = np.flatnonzero(photos.ok)
    if validation:
        rows = np.concatenate([validation_gallery(rows[split_of[rows] == 0]), rows[split_of[rows] == 1]])
    vectors = [photos.embed(net.to(device), rows, device) for net in nets]
    grades, sources = (np.array([getattr(everyone[i], f) for i in rows]) for f in ("grade", "source"))
    return Embedded(vectors, grades, split_of[rows], sources, cfg.k, cfg.scale.span, validation)


def _split_of(ckpt: Checkpoint) -> tuple[int, float]:
    """(data_seed, val_fraction) the checkpoint's run split its data with."""
    run = ckpt.train_config
    return run.get("data_seed", TrainConfig.data_seed), run.get("val_fraction", TrainConfig.val_fraction)


def evaluate(embedded: Embedded, weights: Sequence[float] | None = None, image_split_seed: int = 0) -> dict:
    """The members as one model under both protocols (fundus_sdk.metrics reports):
    {"patient": {source: report}, "image": report}. The patient protocol reports each source's test
    photos apart, against every source's train split, as training reports its test split."""
    e = embedded
    if e.validation:
        raise ValueError("this embedding holds the validation photos only: embed_members(..., validation=False)")
    vectors = ensemble_vectors(e.vectors, weights or [1.0] * len(e.vectors))

    def report(queries: np.ndarray, gallery: np.ndarray) -> dict:
        return metrics.retrieval_report(vectors[queries], vectors[gallery], e.grades[queries], e.grades[gallery], e.k, e.span)

    trained = np.flatnonzero(e.split < 2)
    held_out = np.random.default_rng(image_split_seed).permutation(len(vectors))[: round(0.2 * len(vectors))]
    is_query = np.zeros(len(vectors), dtype=bool)
    is_query[held_out] = True
    return {
        "patient": {name: report(q, trained) for name, q in by_source(e.sources, np.flatnonzero(e.split == 2)).items()},
        "image": report(np.flatnonzero(is_query), np.flatnonzero(~is_query)),
    }


Sweep = list[tuple[tuple[float, float], dict[str, dict]]]  # per weighting: a validation report per source


def sweep_weights(embedded: Embedded, first: Sequence[float] = SWEEP) -> Sweep:
    """Validation reports of a two-member ensemble for each weight of the first member, one per
    source, as training validates an epoch (each source's validation queries against the fixed
    gallery slice): `embedded` holds those photos only (embed_members(..., validation=True))."""
    e = embedded
    if len(e.vectors) != 2:
        raise ValueError(f"a weight sweep takes two checkpoints, not {len(e.vectors)}")
    if not e.validation:
        raise ValueError("a weight sweep ranks the validation photos: embed_members(..., validation=True)")
    gallery = np.flatnonzero(e.split == 0)
    groups = by_source(e.sources, np.flatnonzero(e.split == 1))
    out = []
    for a in first:
        v = ensemble_vectors(e.vectors, [a, 1 - a])
        reports = {name: metrics.retrieval_report(v[q], v[gallery], e.grades[q], e.grades[gallery], e.k, e.span)
                   for name, q in groups.items()}  # fmt: skip
        out.append(((a, round(1 - a, 6)), reports))
    return out


def best_weights(sweep: Sweep) -> tuple[float, float]:
    """The swept weights with the highest selection score (micro + macro, with several sources its
    mean over them, as training chooses an epoch), the members alone included."""
    return max(sweep, key=lambda row: sources_score(row[1]))[0]
