"""Where a checkpoint's mirror attention falls: the share of each photo's map on the grid cells
wholly inside the field of view, over a data set's test photos (the runtime's figure for exported
files is benchmarks/model_quality.py; this one needs no export, for ablations).

Usage: python -m training.attention CHECKPOINT [CHECKPOINT ...] --data labels.csv [--data ...] [--limit 150]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fundus_sdk.explain import wholly_inside

from .checkpoint import load_checkpoint
from .data import read_source, train_test
from .model import FundusNet


def inside_shares(net: FundusNet, preprocess, paths: list[Path], batch: int = 16) -> np.ndarray:
    """Per photo: the attention map's mass on cells every pixel of which is in the field of view."""
    shares = []
    net.eval()
    for i in range(0, len(paths), batch):
        prepared = [preprocess.prepare(preprocess.decode(p)) for p in paths[i : i + batch]]
        images = torch.from_numpy(np.stack([p.pixels for p in prepared]))
        with torch.no_grad():
            maps = net.attention_map(net.normalise(images)).numpy()
        shares += [float(m[wholly_inside(p.fov, m.shape[-1])].sum()) for m, p in zip(maps, prepared)]
    return np.array(shares)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.attention", description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--data", action="append", required=True, help="a data set's labels.csv or folder (repeatable)")
    p.add_argument("--limit", type=int, default=150, help="test photos of each data set (evenly spaced)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    for ckpt_path in args.checkpoints:
        ckpt = load_checkpoint(ckpt_path)
        net = FundusNet(ckpt.config, pretrained=False)
        ckpt.load_weights_into(net)
        for data in args.data:
            _, test = train_test(read_source(data), seed=0)
            paths = [r.path for r in test[:: max(1, len(test) // args.limit)][: args.limit]]
            s = inside_shares(net, ckpt.preprocess, paths)
            print(f"{ckpt_path}  {Path(data).name}: {len(s)} test photos, attention inside the field of view "
                  f"median {np.median(s):.3f} (10th-90th percentile {np.percentile(s, 10):.3f}-{np.percentile(s, 90):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
