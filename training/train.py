"""The training loop: cache the frozen trunk, train the rest, select on validation, test once.

Why a cache: on a 2-core CPU the high-resolution early blocks cost ~70% of a forward pass and
full fine-tuning runs at ~4 images/s. Freezing the stem and the first `frozen_blocks` block
groups and caching their output (one clean view of every image and `aug_views` augmented views
of each training image) lets the rest of the backbone, the mirror attention and the head train
at ~50 images/s.

Model selection uses a patient-grouped validation split carved from the training split
(gallery = the rest of the training split); the test split is evaluated once, at the end, with
gallery = the whole training split and queries = the test split.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fundus_sdk import metrics
from fundus_sdk.errors import ImageError
from fundus_sdk.preprocess import Preprocess, decode

from .data import BalancedBatches, Record, augment, read_source, split_by_patient, train_test
from .losses import LOSSES, metric_loss
from .model import FundusNet, ModelConfig


VAL_GALLERY = 2000  # validation ranks against about this many training photos (a fixed slice)


@dataclass
class TrainConfig:
    data: str
    out: str = "runs/default"
    epochs: int = 6
    aug_views: int = 2
    batch_size: int = 60
    balance_power: float = 0.5  # grade quotas per batch ~ count ** power (0: uniform, 1: natural)
    batches_per_epoch: int = 0  # 0: one pass over the training images per epoch
    lr: float = 1e-3
    backbone_lr: float = 3e-4
    weight_decay: float = 1e-4
    loss: str = "fine"
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
    preprocess: dict = field(default_factory=lambda: asdict(Preprocess()))

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")


def split_records(cfg: TrainConfig) -> tuple[list[Record], list[Record], list[Record]]:
    """(fit, validation, test): the data's train/test split, validation carved from train by patient."""
    train_recs, test_recs = train_test(read_source(cfg.data), cfg.data_seed)
    if cfg.limit:
        train_recs, test_recs = train_recs[: cfg.limit], test_recs[: cfg.limit]
    fit_recs, val_recs = split_by_patient(train_recs, cfg.val_fraction, cfg.data_seed)
    return fit_recs, val_recs, test_recs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare(job: tuple[str, int, int, dict]) -> np.ndarray | str:
    """Worker: decode, (optionally) augment and preprocess one image; an error string on failure."""
    path, view, data_seed, pp_params = job
    pp = Preprocess(**pp_params)
    try:
        pil, _ = decode(path, draft_size=2 * pp.size)
        if view > 0:
            # keyed by file name, so a view does not depend on how the data folder was spelt
            pil = augment(pil, random.Random(f"{data_seed}:{view}:{Path(path).name}"))
        return pp.from_pil(pil)
    except ImageError as exc:
        return str(exc)


class TrunkCache:
    """Trunk outputs (float16) for one view of a list of images, stored as .npy on disk."""

    def __init__(self, net: FundusNet, cfg: TrainConfig, log) -> None:
        self.net, self.cfg, self.log = net, cfg, log
        mc = net.config
        self.preprocess = {**cfg.preprocess, "size": mc.input_size}  # the model's input size decides
        weights_id = "imagenet" if cfg.pretrained else f"random{cfg.seed}"
        self.key = hashlib.sha256(
            json.dumps([mc.backbone, mc.frozen_blocks, weights_id, self.preprocess], sort_keys=True).encode()
        ).hexdigest()[:16]
        self.root = Path(cfg.cache_dir) / self.key

    def get(self, records: list[Record], view: int) -> tuple[np.ndarray, np.ndarray]:
        """(maps, ok) for `records` in `view` (0 = clean); failed images have ok=False.

        Files are named by the images' absolute paths: the same data reached through a relative
        or an absolute path, from any directory, finds the same cache.
        """
        names = hashlib.sha256("\n".join(str(r.path.resolve()) for r in records).encode()).hexdigest()[:16]
        stem = self.root / f"{names}-view{view}-seed{self.cfg.data_seed if view else 0}"
        maps_file, ok_file = stem.with_suffix(".npy"), stem.with_suffix(".ok.npy")
        if maps_file.exists() and ok_file.exists():
            return np.load(maps_file, mmap_mode="r"), np.load(ok_file)
        self.root.mkdir(parents=True, exist_ok=True)
        maps, ok = self._compute(records, view)
        tmp = stem.with_suffix(".tmp.npy")
        np.save(tmp, maps)
        tmp.replace(maps_file)
        np.save(ok_file, ok)
        return np.load(maps_file, mmap_mode="r"), ok

    @torch.inference_mode()
    def _compute(self, records: list[Record], view: int) -> tuple[np.ndarray, np.ndarray]:
        net = self.net.eval()
        jobs = [(str(r.path), view, self.cfg.data_seed, self.preprocess) for r in records]
        size = self.preprocess["size"]
        probe = net.trunk(net.normalise(torch.zeros(1, size, size, 3, dtype=torch.uint8)))
        maps = np.zeros((len(records), *probe.shape[1:]), dtype=np.float16)
        ok = np.zeros(len(records), dtype=bool)
        batch: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            x = torch.from_numpy(np.stack([a for _, a in batch]))
            out = net.trunk(net.normalise(x).contiguous(memory_format=torch.channels_last))
            for (i, _), m in zip(batch, out.float().numpy()):
                maps[i], ok[i] = m, True
            batch.clear()

        desc = "trunk cache, clean" if view == 0 else f"trunk cache, augmented view {view}"
        with mp.get_context("fork").Pool(max(1, self.cfg.threads - 1)) as pool:
            for i, res in enumerate(tqdm(pool.imap(_prepare, jobs, chunksize=8), total=len(jobs), desc=desc, file=sys.stderr)):
                if isinstance(res, str):
                    self.log(f"skipped unreadable image: {res}")
                    continue
                batch.append((i, res))
                if len(batch) == 32:
                    flush()
            if batch:
                flush()
        return maps, ok


@torch.no_grad()
def embed_maps(net: FundusNet, maps: np.ndarray, batch: int = 128, pooled: bool = False) -> np.ndarray:
    """Descriptors of cached trunk maps; with `pooled`, the features before the projection."""
    net.eval()
    step = net.pool_trunk if pooled else net.embed_trunk
    out = [
        step(torch.from_numpy(np.asarray(maps[i : i + batch], dtype=np.float32)))[0].numpy()
        for i in range(0, len(maps), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, net.config.dim), np.float32)


def clean_maps_by_split(net: FundusNet, cfg: TrainConfig, log=print) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trunk maps, grades, is_test) of every readable photo's clean view; the unreadable are left out."""
    fit_recs, val_recs, test_recs = split_records(cfg)
    everyone = fit_recs + val_recs + test_recs
    maps, ok = TrunkCache(net, cfg, log).get(everyone, 0)
    is_test = np.repeat([False, True], [len(fit_recs) + len(val_recs), len(test_recs)])
    keep = slice(None) if ok.all() else np.flatnonzero(ok)  # a slice keeps the memory map
    return maps[keep], np.array([r.grade for r in everyone])[keep], is_test[keep]


def retrieval_report(net, gallery_maps, gallery_grades, query_maps, query_grades, k) -> dict:
    gallery = embed_maps(net, gallery_maps)
    queries = embed_maps(net, query_maps)
    ranked = metrics.rank_exact(queries, gallery, k)
    return metrics.evaluate(query_grades, gallery_grades[ranked], gallery_grades)


def selection_score(report: dict) -> float:
    """What the best checkpoint maximises: micro plus macro mHR@k (both matter to users)."""
    return report["micro"]["mHR"] + report["macro"]["mHR"]


def data_summary(name: str, records: list[Record]) -> dict:
    grades = [r.grade for r in records]
    return {
        "name": name,
        "images": len(records),
        "patients": len({r.patient for r in records}),
        "grades": {g: grades.count(g) for g in range(5)},
    }


def train(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool = False) -> Path:
    """Train, write `best.pt` and `last.pt` into cfg.out, and return the path of `best.pt`."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    if cfg.preprocess.get("size") != model_cfg.input_size:  # so checkpoints record the size used
        cfg = replace(cfg, preprocess={**cfg.preprocess, "size": model_cfg.input_size})
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    started = time.time()
    fit_recs, val_recs, test_recs = split_records(cfg)
    log(f"data: {len(fit_recs)} fit / {len(val_recs)} validation / {len(test_recs)} test images")

    net = FundusNet(model_cfg, pretrained=cfg.pretrained)
    net.freeze_trunk()
    cache = TrunkCache(net, cfg, log)
    everyone = fit_recs + val_recs + test_recs
    clean_maps, clean_ok = cache.get(everyone, 0)
    fit_views = [clean_maps] + [cache.get(fit_recs, v)[0] for v in range(1, cfg.aug_views + 1)]
    splits = np.repeat([0, 1, 2], [len(fit_recs), len(val_recs), len(test_recs)])
    grades = np.array([r.grade for r in everyone])
    fit_idx = np.flatnonzero(clean_ok & (splits == 0))
    val_idx = np.flatnonzero(clean_ok & (splits == 1))
    fit_grades, val_grades = grades[fit_idx], grades[val_idx]
    log(f"trunk cache ready in {time.time() - started:.0f}s ({cache.root})")

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
        state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"] + 1, state["best_score"], state["history"]
        log(f"resumed from {out / 'last.pt'} at epoch {start_epoch}")

    summary = {
        "train": data_summary("fit", [everyone[i] for i in fit_idx]),
        "validation": data_summary("validation", [everyone[i] for i in val_idx]),
        "source": str(cfg.data),
    }

    def checkpoint(epoch: int, report: dict) -> dict:
        return {
            "model": net.state_dict(),
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
        sampler = BalancedBatches(fit_grades, cfg.batch_size, steps, cfg.seed * 1000 + epoch, cfg.balance_power)
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)
        losses = []
        bar = tqdm(sampler, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr)
        for batch in bar:
            views = rng.integers(0, len(fit_views), size=len(batch))
            x = torch.from_numpy(
                np.stack([np.asarray(fit_views[v][fit_idx[i]], dtype=np.float32) for i, v in zip(batch, views)])
            )
            y = torch.from_numpy(fit_grades[batch])
            emb, agreement = net.embed_trunk(x)
            loss = metric_loss(cfg.loss, emb, y, agreement)
            if cfg.aux_weight and net.classifier is not None:
                loss = loss + cfg.aux_weight * F.cross_entropy(net.classifier(emb) * 10.0, y)
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
            gallery = fit_idx[:: max(1, len(fit_idx) // VAL_GALLERY)]  # a fixed slice: choosing epochs only
            report = retrieval_report(net, clean_maps[gallery], grades[gallery], clean_maps[val_idx], val_grades, cfg.k)
            score = selection_score(report)
            history[-1] |= {"val_mHR": report["micro"]["mHR"], "val_macro_mHR": report["macro"]["mHR"]}
            log(
                f"epoch {epoch + 1}: loss {np.mean(losses):.4f}  val mHR@{cfg.k} {report['micro']['mHR']:.3f} "
                f"macro {report['macro']['mHR']:.3f}  per grade "
                + " ".join(f"{g}:{v:.2f}" for g, v in report["per_grade"]["mHR"].items())
                + f"  ({time.time() - started:.0f}s)"
            )
        if score > best:
            best = score
            torch.save(checkpoint(epoch, report), out / "best.pt")
        state = checkpoint(epoch, report) | {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        torch.save(state, out / "last.tmp")
        (out / "last.tmp").replace(out / "last.pt")
        if cfg.stop_after and epoch + 1 - start_epoch >= cfg.stop_after and epoch + 1 < cfg.epochs:
            log(f"stopping after epoch {epoch + 1} as asked; continue with --resume")
            log_file.close()
            return out / "best.pt"

    best_state = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(best_state["model"])
    gallery_idx = np.flatnonzero(clean_ok & (splits < 2))
    test_idx = np.flatnonzero(clean_ok & (splits == 2))
    test_report = retrieval_report(
        net, clean_maps[gallery_idx], grades[gallery_idx], clean_maps[test_idx], grades[test_idx], cfg.k
    )
    best_state["test"] = test_report
    best_state["train_seconds"] = time.time() - started
    torch.save(best_state, out / "best.pt")
    log(f"test (gallery = train split, queries = test split), best epoch {best_state['epoch'] + 1}:\n"
        + metrics.format_report(test_report))
    (out / "test_metrics.json").write_text(json.dumps(test_report, indent=2))
    log(f"done in {time.time() - started:.0f}s; best checkpoint {out / 'best.pt'}")
    log_file.close()
    return out / "best.pt"

