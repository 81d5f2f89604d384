"""`python -m export.compare REF.onnx OTHER.onnx ... --images DIR`: size, speed and agreement.

For each file: size, ms/image with onnxruntime on the CPU, and cosine / k-NN agreement of its
descriptors with the first file's (normally the fp32 export) on the same photographs.
"""

from __future__ import annotations

import argparse
import sys

from .checkpoint import ExportError
from .verify import DEFAULT_IMAGES, compare_variants, format_reports, sample_files

EXAMPLE = """example:
  python -m export.compare models/m.onnx models/m-fp16.onnx models/m-int8.onnx --limit 64"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.compare",
        description="Compare exported model files (the first is the reference).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", help="ONNX files; the first is the reference")
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of photographs (default: EyePACS)")
    p.add_argument("--limit", type=int, default=64, help="photographs used, spread over the folder (default 64)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("-k", type=int, default=10, help="neighbours for the k-NN agreement (default 10)")
    args = p.parse_args(argv)
    try:
        files = sample_files(args.images, args.limit)
        reports = compare_variants(args.models, files, k=args.k, threads=args.threads)
    except (ExportError, OSError, ValueError) as exc:
        print(f"export.compare: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(files)} photographs from {args.images}; cosine and k-NN@{args.k} agreement vs {reports[0].path.name}")
    print(format_reports(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
