"""Command line of the training side: `python -m training train ...` (see --help)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

from fundus_sdk.errors import Exit

_missing = [m for m in ("torch", "timm") if importlib.util.find_spec(m) is None]
if _missing:  # say so in one line, before an import deep inside fails with a traceback
    sys.exit(f"python -m training: needs {' and '.join(_missing)}: from a checkout, pip install -e '.[train]' (README)")

from fundus_sdk.labels import LabelError
from fundus_sdk.preprocess import RECIPES, Preprocess

from .ablate import VARIANTS
from .checkpoint import CheckpointError
from .config import TrainConfig
from .losses import LOSSES
from .model import ATTENTION_MASKS, MIRRORING, ModelConfig
from .train import train
from .weights import WeightsUnavailable


def add_data_and_model(p: argparse.ArgumentParser) -> None:
    """Options of every command: the data, the model's shape, resources."""
    p.add_argument(
        "--config", metavar="FILE.toml",
        help="options from a TOML file (keys are the option names, e.g. frozen_blocks = 0); flags given too win. "
        "`train` records the options it ran with as OUT/run.toml",
    )  # fmt: skip
    p.add_argument(
        "--data", required=True, nargs="+",
        help="labels.csv, a folder holding labels.csv, or grade folders 0/..4/; several: trained on together, "
        "each split by its own split column and validated on its own",
    )  # fmt: skip
    p.add_argument(
        "--source-weights", type=float, nargs="+", default=None, metavar="W",
        help="with several --data: how often each source's photos are drawn (default 1 each; 3 draws a small "
        "second camera three times as often)",
    )  # fmt: skip
    p.add_argument(
        "--labels", default=TrainConfig.labels, metavar="SCALE",
        help="the grading scale: LOW-HIGH (ICDR 0-4, or e.g. 1-3) or named classes lowest first (e.g. "
        "none,mild,severe); label cells and grade folders hold its values or names. The model records it",
    )  # fmt: skip
    p.add_argument("--backbone", default=ModelConfig.backbone, help="timm model name")
    p.add_argument("--frozen-blocks", type=int, default=ModelConfig.frozen_blocks)
    p.add_argument("--input-size", type=int, default=ModelConfig.input_size, help="pixels (photos are resized to it)")
    p.add_argument(
        "--recipe", type=int, choices=sorted(RECIPES), default=Preprocess.recipe,
        help="preprocessing recipe (fundus_sdk/preprocess.py): 2 made the bundled model; 3 also keeps dark "
        "structures inside the field of view",
    )
    p.add_argument("--data-seed", type=int, default=TrainConfig.data_seed, help="validation split and augmentation pool")
    p.add_argument("--limit", type=int, default=TrainConfig.limit, help="use only N images per split (smoke runs)")
    p.add_argument("--cache-dir", default=TrainConfig.cache_dir)
    p.add_argument("--threads", type=int, default=TrainConfig.threads)


def add_schedule(p: argparse.ArgumentParser, out: str) -> None:
    """Options shared by `train` and `ablate`: outputs, descriptor, schedule."""
    p.add_argument("--out", default=out, help="output folder (logs, checkpoints)")
    p.add_argument("--dim", type=int, default=ModelConfig.dim, help="descriptor dimension (<= 512)")
    p.add_argument("--metric-weight", type=float, default=TrainConfig.metric_weight, help="weight of the metric loss (--loss)")
    p.add_argument("--aux-weight", type=float, default=TrainConfig.aux_weight, help="weight of the auxiliary grade classifier (0: off)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--aug-views", type=int, default=TrainConfig.aug_views, help="augmented views cached per training image")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--balance-power", type=float, default=TrainConfig.balance_power, help="grade quotas per batch ~ count**power (0: uniform)")
    p.add_argument("--batches-per-epoch", type=int, default=TrainConfig.batches_per_epoch)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--backbone-lr", type=float, default=TrainConfig.backbone_lr)
    p.add_argument("--ordinal-weight", type=float, default=TrainConfig.ordinal_weight,
                   help="weight of the ordinal term (expected grade vs grade; 0: off)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=TrainConfig.device,
                   help="auto: CUDA when visible (bf16 autocast), else the CPU")
    p.add_argument("--init", default=TrainConfig.init, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (fine-tune an existing model)")
    p.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    p.add_argument("--teacher", default=TrainConfig.teacher, metavar="CHECKPOINT",
                   help="keep the descriptor near this frozen checkpoint's for every training view (e.g. the "
                   "unmasked model while fine-tuning it with --attention-mask fov)")
    p.add_argument("--teacher-weight", type=float, default=TrainConfig.teacher_weight,
                   help="weight of the teacher term (1 - cosine to the teacher's descriptor)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}  # every --help shows the defaults
    t = sub.add_parser(
        "train",
        **defaults,
        help="train a retrieval model on a labelled folder or CSV",
        description="Train the mirror-attention model. Example: python -m training train "
        "--data ../shared/data/eyepacs256 --out runs/default",
    )
    add_data_and_model(t)
    add_schedule(t, out="runs/default")
    t.add_argument("--mirroring", choices=MIRRORING, default=ModelConfig.mirroring)
    t.add_argument("--attention-mask", choices=ATTENTION_MASKS, default=ModelConfig.attention_mask,
                   help="fov: the mirror attention attends only to feature-map cells wholly inside the field of view")
    t.add_argument("--loss", choices=LOSSES, default=TrainConfig.loss)
    t.add_argument("--seed", type=int, default=TrainConfig.seed, help="initialisation, batch sampling, view choice")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--no-validate", action="store_true",
                   help="no validation: the last epoch is kept (ablations compare runs like this)")
    t.add_argument("--stop-after", type=int, default=TrainConfig.stop_after, help="stop after N epochs of this invocation (then --resume)")
    a = sub.add_parser(
        "ablate",
        **defaults,
        help="train and evaluate every ablation variant on one schedule",
        description="Ablations (see training/ablate.py). Example: python -m training ablate "
        "--data ../shared/data/eyepacs256 --out runs/ablations --epochs 4 --seeds 0 1",
    )
    add_data_and_model(a)
    add_schedule(a, out="runs/ablations")
    a.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    a.add_argument("--seeds", nargs="+", type=int, default=[0])
    r = sub.add_parser(
        "probe",
        **defaults,
        help="how well a model's features tell each grade from grade 0 (linear probe)",
        description="Grade probe (see training/probe.py). Example: python -m training probe "
        "--data ../shared/data/eyepacs256 --checkpoint runs/default/best.pt",
    )
    add_data_and_model(r)
    r.add_argument(
        "--checkpoint",
        help="a training checkpoint; its model and preprocessing override --backbone, --frozen-blocks, "
        "--input-size and --recipe (default: the untrained ImageNet backbone)",
    )
    e = sub.add_parser(
        "evaluate",
        **defaults,
        help="retrieval of a checkpoint (or an ensemble), by patient split and by the paper's image-level split",
        description="Evaluate (see training/evaluate.py). Example: python -m training evaluate "
        "--data ../shared/data/eyepacs256 --checkpoint runs/default/best.pt. Several checkpoints are "
        "evaluated as one ensemble (python -m export.ensemble): choose its weights with --sweep on "
        "the validation split, then read the test split once with --weights.",
    )
    add_data_and_model(e)
    e.add_argument("--checkpoint", required=True, nargs="+",
                   help="training checkpoints (their models and preprocessing are used); several: an ensemble")  # fmt: skip
    e.add_argument("--weights", type=float, nargs="+", help="the ensemble's weight of each checkpoint (default: equal)")
    e.add_argument("--sweep", action="store_true",
                   help="two checkpoints: validation figures for the first one's weight 0-1 in steps of 0.1 (no test split)")  # fmt: skip
    parser.commands = {"train": t, "ablate": a, "probe": r, "evaluate": e}  # for --config
    return parser


def configs(args: argparse.Namespace) -> tuple[TrainConfig, ModelConfig]:
    """The run's configurations: option names are the fields' names, and a command sets only the
    options it has (the rest keep the dataclasses' defaults)."""
    opts = vars(args)
    data = opts["data"][0] if len(opts["data"]) == 1 else opts["data"]  # one source is stored as before
    opts = opts | {"data": data, "source_weights": opts.get("source_weights") or []}
    model_cfg = ModelConfig(**{f.name: opts[f.name] for f in fields(ModelConfig) if f.name in opts})
    cfg = TrainConfig(
        **{f.name: opts[f.name] for f in fields(TrainConfig) if f.name in opts},
        pretrained=not opts.get("no_pretrained", False),
        validate=not opts.get("no_validate", False),
        preprocess=Preprocess(recipe=args.recipe),
    )
    return cfg, replace(model_cfg, num_classes=len(cfg.scale))  # one grade-head class per grade


def config_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with the options of its --config file put in as flags right after the command, so
    that flags given on the command line (which come later) win and argparse checks every value."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return argv
    import tomllib

    path = argv[argv.index("--config") + 1]
    try:
        with open(path, "rb") as f:
            options = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--config {path}: {exc}")
    sub = parser.commands.get(argv[0])
    if sub is None:
        return argv  # not a command: argparse says so
    known = {a.dest: a for a in sub._actions if a.option_strings}
    flags = []
    for key, value in options.items():
        action = known.get(key.replace("-", "_"))
        if action is None or key == "config":
            parser.error(f"--config {path}: unknown option {key!r} for {argv[0]}")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch such as --resume
            flags += [flag] if value else []
        else:
            flags += [flag, *map(str, value if isinstance(value, list) else [value])]
    return [argv[0], *flags, *argv[1:]]


def record_options(args: argparse.Namespace) -> None:
    """Write the options a training run was started with to OUT/run.toml (a --config for a re-run)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{k} = {json.dumps(v)}" for k, v in sorted(vars(args).items())
             if k not in ("command", "config") and v is not None]  # fmt: skip
    (out / "run.toml").write_text("# python -m training train --config run.toml\n" + "\n".join(lines) + "\n")


def evaluate_command(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """`evaluate`: both protocols' reports, or with --sweep a validation table of weights."""
    from fundus_sdk.metrics import format_report
    from fundus_sdk.tables import format_table

    from .evaluate import best_weights, embed_members, evaluate, sweep_weights

    embedded = embed_members(cfg, args.checkpoint, validation=args.sweep)
    if args.sweep:
        sweep = sweep_weights(embedded)
        for source in sweep[0][1]:
            column = [(weights, reports[source]) for weights, reports in sweep]
            grades = list(column[0][1]["per_grade"]["mHR"])
            rows = [[f"{a:.1f} : {b:.1f}", f"{r['micro']['mHR']:.3f}", f"{r['macro']['mHR']:.3f}",
                     *(f"{r['per_grade']['mHR'][g]:.2f}" for g in grades)] for (a, b), r in column]  # fmt: skip
            print(f"validation, {source} (k = {embedded.k}; mHR@k), weights {args.checkpoint[0]} : {args.checkpoint[1]}")
            print(format_table(["weights", "micro", "macro", *(f"grade {g}" for g in grades)], rows) + "\n")
        a, b = best_weights(sweep)
        mean = " (the mean over the sources)" if len(sweep[0][1]) > 1 else ""
        print(f"highest micro + macro{mean}: --weights {a} {b}")
        return
    reports = evaluate(embedded, args.weights)
    for source, report in reports["patient"].items():
        print(f"patient split, {source}'s test photos (gallery = every source's train split, k = {cfg.k}):\n"
              f"{format_report(report)}\n")  # fmt: skip
    print(f"image split (a random fifth of the photos against the rest, k = {cfg.k}):\n{format_report(reports['image'])}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(config_flags(parser, argv) if argv else argv)
    try:
        cfg, model_cfg = configs(args)
    except ValueError as exc:  # a value the configurations refuse, e.g. --dim 999
        parser.error(str(exc))
    if args.command == "evaluate" and args.weights and len(args.weights) != len(args.checkpoint):
        parser.error(f"--weights: {len(args.weights)} given for {len(args.checkpoint)} checkpoints")
    if args.command == "evaluate" and args.sweep and (len(args.checkpoint) != 2 or args.weights):
        parser.error("--sweep takes two checkpoints and no --weights")
    try:
        if args.command == "ablate":
            from .ablate import run

            run(cfg, model_cfg, Path(args.out), args.variants, args.seeds)
            print((Path(args.out) / "ABLATIONS.md").read_text())
        elif args.command == "evaluate":
            evaluate_command(cfg, args)
        elif args.command == "probe":
            from .probe import format_probe, probe

            print(format_probe(probe(cfg, model_cfg, args.checkpoint)))
        else:
            record_options(args)
            train(cfg, model_cfg, resume=args.resume)
    except (LabelError, WeightsUnavailable, CheckpointError) as exc:  # bad input: the message names it
        print(f"error: {exc}", file=sys.stderr)
        return Exit.FATAL
    except KeyboardInterrupt:
        print("interrupted (resume with --resume)", file=sys.stderr)
        return Exit.INTERRUPTED
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
