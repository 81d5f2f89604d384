"""Command line of the training side: `python -m training train ...` (see --help)."""

from __future__ import annotations

import argparse
import sys

from .losses import LOSSES
from .model import MIRRORING, ModelConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a retrieval model on a labelled folder or CSV",
        description="Train the mirror-attention model. Example: python -m training train "
        "--data ../shared/data/eyepacs256 --out runs/default",
    )
    t.add_argument("--data", required=True, help="labels.csv, a folder holding labels.csv, or grade folders 0/..4/")
    t.add_argument("--out", default="runs/default", help="run folder: log.txt, best.pt, last.pt")
    t.add_argument("--backbone", default=ModelConfig.backbone, help="timm model name")
    t.add_argument("--dim", type=int, default=ModelConfig.dim, help="descriptor dimension (<= 512)")
    t.add_argument("--mirroring", choices=MIRRORING, default=ModelConfig.mirroring)
    t.add_argument("--frozen-blocks", type=int, default=ModelConfig.frozen_blocks)
    t.add_argument("--input-size", type=int, default=ModelConfig.input_size)
    t.add_argument("--loss", choices=LOSSES, default="fine")
    t.add_argument("--aux-weight", type=float, default=0.5, help="weight of the auxiliary grade classifier (0: off)")
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--aug-views", type=int, default=3, help="augmented views cached per training image")
    t.add_argument("--per-class", type=int, default=12, help="images per grade in a batch")
    t.add_argument("--batches-per-epoch", type=int, default=0)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--backbone-lr", type=float, default=3e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=0, help="use only N images per split (smoke runs)")
    t.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    t.add_argument("--cache-dir", default="runs/cache")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--stop-after", type=int, default=0, help="stop after N epochs of this invocation (then --resume)")
    args = parser.parse_args(argv)

    from fundus_sdk.preprocess import Preprocess
    from dataclasses import asdict

    from .train import TrainConfig, train

    model_cfg = ModelConfig(
        backbone=args.backbone,
        dim=args.dim,
        mirroring=args.mirroring,
        frozen_blocks=args.frozen_blocks,
        input_size=args.input_size,
    )
    cfg = TrainConfig(
        data=args.data,
        out=args.out,
        epochs=args.epochs,
        aug_views=args.aug_views,
        per_class=args.per_class,
        batches_per_epoch=args.batches_per_epoch,
        lr=args.lr,
        backbone_lr=args.backbone_lr,
        loss=args.loss,
        aux_weight=args.aux_weight,
        seed=args.seed,
        pretrained=not args.no_pretrained,
        limit=args.limit,
        stop_after=args.stop_after,
        cache_dir=args.cache_dir,
        threads=args.threads,
        preprocess=asdict(Preprocess(size=args.input_size)),
    )
    train(cfg, model_cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
