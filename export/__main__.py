"""`python -m export CHECKPOINT -o model.onnx [--fp16-weights | --fp16 | --int8 --calib DIR]`: see --help."""

from __future__ import annotations

import argparse
import sys

from fundus_sdk.errors import Exit

from .errors import ExportError
from .exporter import export_checkpoint

EXAMPLE = """examples:
  python -m export runs/pilot-fine/best.pt -o models/fundus-lite0.onnx --name fundus-mirror-lite0 --version 0.1.0
  python -m export runs/pilot-fine/best.pt -o models/fundus-lite0-fp16.onnx --fp16 --version 0.1.0
  python -m export runs/pilot-fine/best.pt -o models/fundus-lite0-int8.onnx --int8 --calib photos/ --version 0.1.0

exit status (as every command line of fundus-sdk): 0 exported and verified, 2 bad arguments,
3 unreadable checkpoint or failed verification."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a training checkpoint to one self-contained, verified ONNX file.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint written by training (e.g. runs/NAME/best.pt)")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16-weights", dest="precision", action="store_const", const="fp16-weights",
        help="weights stored in float16, computed in float32: half the file, fp32's speed",
    )  # fmt: skip
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="float16 variant")
    precision.add_argument(
        "--int8", dest="precision", action="store_const", const="int8", help="static int8 variant (needs --calib)"
    )
    p.add_argument("--calib", metavar="DIR", help="photographs to calibrate int8 ranges on")
    p.add_argument("--calib-limit", type=int, default=128, metavar="N", help="calibration photos used (default 128)")
    p.add_argument(
        "--verify-images", metavar="DIR", help="photographs for the parity check (default: training data, else EyePACS)"
    )
    p.add_argument("--name", help="model name (default fundus-<backbone>-<mirroring>)")
    p.add_argument("--version", help="model version, e.g. 1.0.0 (required unless the checkpoint records one)")
    p.add_argument(
        "--detail-size",
        type=int,
        metavar="N",
        help="resample larger fields of view to N px first: your training photos' resolution, "
        "when they were smaller than the photos the model will meet (the default model: 256)",
    )
    p.set_defaults(precision="fp32")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.calib and args.precision != "int8":
        parser().error("--calib only applies to --int8")
    try:
        report = export_checkpoint(
            args.checkpoint,
            args.output,
            precision=args.precision,
            calib=args.calib,
            calib_limit=args.calib_limit,
            verify_images=args.verify_images,
            name=args.name,
            version=args.version,
            detail_size=args.detail_size,
        )
    except ExportError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return Exit.FATAL
    print(report.summary())
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
