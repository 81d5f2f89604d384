"""Photos in memory for whole-network training: decoded once, augmented on the fly.

With nothing frozen there is no trunk to cache, so every step needs pixels. Decoding the JPEGs
again each epoch costs little, but reading 6,720 files per epoch from a network share does not,
so every photo is decoded once into memory (6,720 x 256 x 256 x 3 uint8 is 1.3 GB). Training
views are made in a worker process while the network trains on the previous batch: the
geometric and raw-camera augmentation of `training.data.augment`, then the model's
preprocessing. Clean views (validation, test, gallery) are preprocessed once and kept.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fundus_sdk.errors import ImageError
from fundus_sdk.inputs import decode
from fundus_sdk.preprocess import Preprocess

from .config import TrainConfig
from .data import Record, augment
from .device import autocast
from .model import FundusNet


def _decode(job: tuple[str, int]) -> np.ndarray | str:
    """Worker: one photo decoded to RGB (JPEG draft at about `draft` px), or the error text."""
    path, draft = job
    try:
        return np.asarray(decode(path, draft_size=draft).image)
    except ImageError as exc:
        return str(exc)


_FORKED: "PhotoBank | None" = None


def _clean_view(i: int) -> np.ndarray | None:
    """Worker: the clean preprocessed view of the forked bank's photo `i` (None if unreadable)."""
    photo = _FORKED.photos[i]
    return None if photo is None else _FORKED.preprocess.from_pil(Image.fromarray(photo))


class PhotoBank:
    """The decoded photos of `records` (None where unreadable) and their clean preprocessed views."""

    def __init__(self, records: Sequence[Record], preprocess: Preprocess, workers: int = 2, log=print) -> None:
        self.records, self.preprocess = list(records), preprocess
        jobs = [(str(r.path), preprocess.draft_size) for r in self.records]
        self.photos: list[np.ndarray | None] = []
        with mp.get_context("fork").Pool(max(1, workers)) as pool:
            for res in tqdm(pool.imap(_decode, jobs, chunksize=16), total=len(jobs), desc="decoding photos", file=sys.stderr):
                if isinstance(res, str):
                    log(f"skipped unreadable image: {res}")
                    res = None
                self.photos.append(res)
        self.ok = np.array([p is not None for p in self.photos], dtype=bool)
        size = preprocess.size
        self.clean = np.zeros((len(self.records), size, size, 3), dtype=np.uint8)
        global _FORKED  # the workers inherit the photos through fork instead of a pickle per task
        _FORKED = self
        try:
            with mp.get_context("fork").Pool(max(1, workers)) as pool:
                done = pool.imap(_clean_view, range(len(self.records)), chunksize=16)
                for i, arr in enumerate(tqdm(done, total=len(self.records), desc="clean views", file=sys.stderr)):
                    if arr is not None:
                        self.clean[i] = arr
        finally:
            _FORKED = None

    def view(self, i: int, seed: int) -> np.ndarray:
        """An augmented, preprocessed view of photo `i`, determined by `seed`."""
        pil = augment(Image.fromarray(self.photos[i]), random.Random(seed))
        return self.preprocess.from_pil(pil)


class _AugmentedBatches(torch.utils.data.Dataset):
    """Batch number b of an epoch -> (uint8 NHWC views, grades); the sampler's batches in order."""

    def __init__(self, bank: PhotoBank, index: np.ndarray, grades: np.ndarray, batches: list[np.ndarray], seed: int):
        self.bank, self.index, self.grades, self.batches, self.seed = bank, index, grades, batches, seed

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batches[b]
        views = [self.bank.view(int(self.index[i]), self.seed * 1_000_003 + b * 4096 + j) for j, i in enumerate(batch)]
        return torch.from_numpy(np.stack(views)), torch.from_numpy(self.grades[batch])


def augmented_batches(
    bank: PhotoBank, index: np.ndarray, grades: np.ndarray, batches: list[np.ndarray], seed: int, workers: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch of positions into `index` as augmented uint8 views, made `workers` processes ahead."""
    data = _AugmentedBatches(bank, index, grades, batches, seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=2 if workers else None,
        multiprocessing_context="fork" if workers else None,
    )
    return iter(loader)


class InMemoryPhotos:
    """Training input for the whole network: photos in memory, augmented on the fly."""

    def __init__(self, net: FundusNet, cfg: TrainConfig, everyone: list[Record], fit_idx_all: np.ndarray, log) -> None:
        self.cfg, self.net = cfg, net
        self.bank = PhotoBank(everyone, cfg.preprocess_for(net.config), workers=cfg.threads, log=log)
        self.ok, self.root = self.bank.ok, "in memory"

    @staticmethod
    def _input(net: FundusNet, u8: torch.Tensor, device) -> torch.Tensor:
        return net.normalise(u8.to(device)).contiguous(memory_format=torch.channels_last)

    def batches(self, fit_idx: np.ndarray, grades: np.ndarray, sampler, seed: int, device):
        for u8, y in augmented_batches(self.bank, fit_idx, grades, list(sampler), seed):
            yield self._input(self.net, u8, device), y.to(device)

    @torch.inference_mode()
    def embed(self, net: FundusNet, idx: np.ndarray, device, batch: int = 64) -> np.ndarray:
        net.eval()
        out = []
        for i in range(0, len(idx), batch):
            x = self._input(net, torch.from_numpy(self.bank.clean[idx[i : i + batch]]), device)  # its own normalisation
            with autocast(device):
                out.append(net(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, net.config.dim), np.float32)
