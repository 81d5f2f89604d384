"""The training loop: select on validation, test once.

The input comes from one of two sources. With early block groups frozen (the bundled 0.2
model's recipe), their output is cached once (training.cache) and only the rest trains; with
`frozen_blocks=0` the whole network trains on photos held in memory and augmented on the fly
(training.photos), which is what lets the early layers learn fundus detail.

Model selection uses a patient-grouped validation split carved from the training split
(gallery = the rest of the training split); the test split is evaluated once, at the end, with
gallery = the whole training split and queries = the test split.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fundus_sdk import metrics
from fundus_sdk.labels import Scale

from .cache import CachedTrunk
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig, seed_everything, source_names, split_records, validation_gallery
from .data import BalancedBatches, Record
from .device import autocast, resolve_device
from .losses import metric_loss, ordinal_loss, teacher_loss
from .model import FundusNet, ModelConfig
from .photos import InMemoryPhotos


def selection_score(report: dict) -> float:
    """What the best checkpoint maximises: micro plus macro mHR@k (both matter to users); with
    several sources, its mean over their own validation parts (a small second camera counts as
    much as the first)."""
    return report["micro"]["mHR"] + report["macro"]["mHR"]


def sources_score(reports: dict[str, dict]) -> float:
    """The selection score of several sources' validation reports: the mean of each one's."""
    return float(np.mean([selection_score(r) for r in reports.values()]))


def by_source(sources: Sequence[str], idx: np.ndarray) -> dict[str, np.ndarray]:
    """The positions `idx` grouped by their photos' source names (`sources[i]`), in the sources' order."""
    groups: dict[str, list[int]] = {}
    for i in idx:
        groups.setdefault(str(sources[i]), []).append(int(i))
    return {name: np.array(members) for name, members in groups.items()}


def describe(report: dict) -> str:
    return (f"mHR@k {report['micro']['mHR']:.3f} macro {report['macro']['mHR']:.3f}  per grade "
            + " ".join(f"{g}:{v:.2f}" for g, v in report["per_grade"]["mHR"].items()))  # fmt: skip


def data_summary(name: str, records: list[Record], scale: Scale) -> dict:
    grades = [r.grade for r in records]
    return {
        "name": name,
        "images": len(records),
        "patients": len({r.patient for r in records}),
        "scale": scale.spec,
        "grades": {g: grades.count(g) for g in scale.values},
    }


def teacher_network(cfg: TrainConfig, model_cfg: ModelConfig) -> FundusNet | None:
    """The frozen network of `cfg.teacher` (None without one), checked to read the same input
    and write descriptors of the same size as the model trained."""
    if not cfg.teacher:
        return None
    ckpt = load_checkpoint(cfg.teacher)
    if model_cfg.frozen_blocks:
        raise CheckpointError(f"{cfg.teacher}: a teacher reads the photos, so the model needs --frozen-blocks 0")
    fields = ("input_size", "mean", "std", "dim")
    mine = [getattr(model_cfg, f) for f in fields] + [cfg.preprocess.recipe]
    theirs = [getattr(ckpt.config, f) for f in fields] + [ckpt.preprocess.recipe]
    if mine != theirs:
        raise CheckpointError(f"{cfg.teacher}: cannot teach this model: its input size, normalisation, descriptor size and "
                              f"recipe {theirs} differ from the model's {mine}")  # fmt: skip
    net = ckpt.network()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def train(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool = False) -> Path:
    """Train, write `best.pt` and `last.pt` into cfg.out, and return the path of `best.pt`.

    With frozen block groups the trunk's output is cached and only the rest trains; with
    `frozen_blocks=0` the whole network trains on photos held in memory, augmented on the fly.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    cfg = replace(cfg, preprocess=cfg.preprocess_for(model_cfg))  # so checkpoints record the size used
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    started = time.time()
    fit_recs, val_recs, test_recs = split_records(cfg)
    log(f"data: {len(fit_recs)} fit / {len(val_recs)} validation / {len(test_recs)} test images; device {device}")

    net = FundusNet(model_cfg, pretrained=cfg.pretrained and not cfg.init)
    if cfg.init:
        log(f"initialised from {load_checkpoint(cfg.init).load_weights_into(net)}")
    net.freeze_trunk()
    teacher = teacher_network(cfg, model_cfg)
    if teacher is not None:
        log(f"kept near the descriptors of {cfg.teacher} (weight {cfg.teacher_weight})")
    everyone = fit_recs + val_recs + test_recs
    sources = [r.source for r in everyone]
    splits = np.repeat([0, 1, 2], [len(fit_recs), len(val_recs), len(test_recs)])
    source_cls = CachedTrunk if model_cfg.frozen_blocks else InMemoryPhotos
    source = source_cls(net, cfg, everyone, np.flatnonzero(splits == 0), log)
    net = net.to(device)
    if not model_cfg.frozen_blocks:
        net = net.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=torch.channels_last)
    grades = np.array([r.grade for r in everyone])
    fit_idx = np.flatnonzero(source.ok & (splits == 0))
    val_idx = np.flatnonzero(source.ok & (splits == 1))
    fit_grades = grades[fit_idx]
    fit_classes = fit_grades - cfg.scale.low  # the grade head's targets: 0 .. len(scale) - 1
    span = cfg.scale.span
    log(f"training input ready in {time.time() - started:.0f}s ({source.root})")

    new_params = [p for n, p in net.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    tail_params = [p for n, p in net.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": new_params, "lr": cfg.lr}, {"params": tail_params, "lr": cfg.backbone_lr}],
        weight_decay=cfg.weight_decay,
    )
    steps = cfg.batches_per_epoch or max(1, len(fit_idx) // cfg.batch_size)
    total = steps * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 2)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    start_epoch, best, history = 0, -1.0, []
    if resume and (out / "last.pt").exists():
        state = load_checkpoint(out / "last.pt").state
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"] + 1, state["best_score"], state["history"]
        log(f"resumed from {out / 'last.pt'} at epoch {start_epoch}")

    summary = {
        "train": data_summary("fit", [everyone[i] for i in fit_idx], cfg.scale),
        "validation": data_summary("validation", [everyone[i] for i in val_idx], cfg.scale),
        "source": str(cfg.data) if isinstance(cfg.data, str) else [str(d) for d in cfg.data],
    }
    names = source_names(cfg.sources)
    weights = np.array([cfg.source_weight(names.index(sources[i])) for i in fit_idx])
    val_groups = by_source(sources, val_idx)

    def checkpoint(epoch: int, report: dict) -> dict:
        return {
            "model": {k: v.cpu() for k, v in net.state_dict().items()},
            "model_config": model_cfg.to_dict(),
            "train_config": asdict(cfg),
            "data": summary,
            "epoch": epoch,
            "validation": report,
            "best_score": best,
            "history": history,
        }

    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        seed = cfg.seed * 1000 + epoch
        sampler = BalancedBatches(fit_grades, cfg.batch_size, steps, seed, cfg.balance_power, weights)
        losses = []
        bar = tqdm(source.batches(fit_idx, fit_classes, sampler, seed, device), total=steps,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr)
        for x, y in bar:
            with autocast(device):
                emb, agreement = net.embed_trunk(x)
                emb, agreement = emb.float(), (agreement.float() if agreement is not None else None)
                loss = cfg.metric_weight * metric_loss(cfg.loss, emb, y, agreement)
                if net.classifier is not None and (cfg.aux_weight or cfg.ordinal_weight):
                    logits = net.classifier(emb).float() * 10.0
                    loss = loss + cfg.aux_weight * F.cross_entropy(logits, y)
                    if cfg.ordinal_weight:
                        loss = loss + cfg.ordinal_weight * ordinal_loss(logits, y)
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(x).float()
                    loss = loss + cfg.teacher_weight * teacher_loss(emb, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        if not cfg.validate or epoch + 1 < cfg.epochs // 2:  # a cosine schedule peaks late
            log(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}  ({time.time() - started:.0f}s)")
            report, score = {}, (float(epoch) if not cfg.validate else -1.0)
        else:
            gallery = validation_gallery(fit_idx)  # a fixed slice: choosing epochs only
            gallery_vectors = source.embed(net, gallery, device)
            reports = {
                name: metrics.retrieval_report(source.embed(net, idx, device), gallery_vectors, grades[idx], grades[gallery], cfg.k, span)
                for name, idx in val_groups.items()
            }
            report = reports[names[0]] if len(reports) == 1 else reports
            score = sources_score(reports)
            history[-1] |= {f"val_{name}": {"mHR": r["micro"]["mHR"], "macro_mHR": r["macro"]["mHR"]} for name, r in reports.items()}
            for name, r in reports.items():
                log(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}  val {name} {describe(r)}  ({time.time() - started:.0f}s)")
        if score > best:
            best = score
            save_checkpoint(out / "best.pt", checkpoint(epoch, report))
        save_checkpoint(out / "last.pt", checkpoint(epoch, report) | {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
        if cfg.stop_after and epoch + 1 - start_epoch >= cfg.stop_after and epoch + 1 < cfg.epochs:
            log(f"stopping after epoch {epoch + 1} as asked; continue with --resume")
            log_file.close()
            return out / "best.pt"

    best_state = load_checkpoint(out / "best.pt").state
    net.load_state_dict(best_state["model"])
    gallery_idx = np.flatnonzero(source.ok & (splits < 2))
    test_idx = np.flatnonzero(source.ok & (splits == 2))
    gallery_vectors = source.embed(net, gallery_idx, device)
    tests = {
        name: metrics.retrieval_report(source.embed(net, idx, device), gallery_vectors, grades[idx], grades[gallery_idx], cfg.k, span)
        for name, idx in by_source(sources, test_idx).items()
    }
    test_report = tests[names[0]] if len(tests) == 1 else tests
    best_state["test"] = test_report
    best_state["train_seconds"] = time.time() - started
    save_checkpoint(out / "best.pt", best_state)
    for name, report in tests.items():
        log(f"test {name} (gallery = every source's train split, queries = its test split), best epoch "
            f"{best_state['epoch'] + 1}:\n" + metrics.format_report(report))
    (out / "test_metrics.json").write_text(json.dumps(test_report, indent=2))
    log(f"done in {time.time() - started:.0f}s; best checkpoint {out / 'best.pt'}")
    log_file.close()
    return out / "best.pt"
