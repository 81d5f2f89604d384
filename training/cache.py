"""The trunk cache: with early block groups frozen, their output is computed once and kept.

Why: on a 2-core CPU the high-resolution early blocks cost ~70% of a forward pass. Freezing the
stem and the first `frozen_blocks` block groups and caching their output (one clean view of
every image and `aug_views` augmented views of each training image) lets the rest of the
backbone, the mirror attention and the head train at ~50 images/s. With nothing frozen,
training.photos feeds the whole network instead.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import random
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fundus_sdk.atomic import write_atomically
from fundus_sdk.errors import ImageError
from fundus_sdk.inputs import decode
from fundus_sdk.preprocess import Preprocess

from .config import TrainConfig, split_records
from .data import Record, augment
from .model import FundusNet


def _prepare(job: tuple[str, int, int, dict]) -> np.ndarray | str:
    """Worker: decode, (optionally) augment and preprocess one image; an error string on failure."""
    path, view, data_seed, pp_params = job
    pp = Preprocess(**pp_params)
    try:
        pil = decode(path, draft_size=pp.draft_size).image
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
        self.preprocess = asdict(cfg.preprocess_for(mc))
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
        with write_atomically(maps_file, durable=False) as tmp, open(tmp, "wb") as f:
            np.save(f, maps)
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


class CachedTrunk:
    """Training input from the trunk cache: the frozen part runs once, before training."""

    def __init__(self, net: FundusNet, cfg: TrainConfig, everyone: list[Record], fit_idx_all: np.ndarray, log) -> None:
        self.cfg = cfg
        cache = TrunkCache(net, cfg, log)
        self.root = cache.root
        self.clean, self.ok = cache.get(everyone, 0)
        fit_recs = [everyone[i] for i in fit_idx_all]  # they come first, so rows agree with `everyone`
        self.views = [self.clean] + [cache.get(fit_recs, v)[0] for v in range(1, cfg.aug_views + 1)]

    def batches(self, fit_idx: np.ndarray, grades: np.ndarray, sampler, seed: int, device):
        rng = np.random.default_rng(seed)
        for batch in sampler:
            views = rng.integers(0, len(self.views), size=len(batch))
            x = np.stack([np.asarray(self.views[v][fit_idx[i]], dtype=np.float32) for i, v in zip(batch, views)])
            yield torch.from_numpy(x).to(device), torch.from_numpy(grades[batch]).to(device)

    def embed(self, net: FundusNet, idx: np.ndarray, device) -> np.ndarray:
        return embed_maps(net, self.clean[idx])
