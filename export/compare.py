"""`python -m export.compare REF.onnx OTHER.onnx ... --images DIR`: size, speed and agreement.

For each file: size, ms/image with onnxruntime on the CPU, and cosine / k-NN agreement of its
descriptors with the first file's (normally the fp32 export) on the same photographs.
"""

from __future__ import annotations

import argparse
import sys

from fundus_sdk.errors import Exit
from fundus_sdk.labels import LabelError, read_labels
from training.data import DATA_ENV, default_data

from .errors import ExportError
from .verify import compare_variants, format_reports, sample_files

EXAMPLE = """examples:
  python -m export.compare models/m.onnx models/m-fp16.onnx models/m-int8.onnx --limit 64
  python -m export.compare m.onnx m-int8.onnx --labels data/labels.csv"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.compare",
        description="Compare exported model files (the first is the reference).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", help="ONNX files; the first is the reference")
    data = default_data()
    p.add_argument(
        "--images", default=str(data / "images") if data else None,
        help=f"folder of photographs (default: images/ of ${DATA_ENV})",
    )
    p.add_argument("--limit", type=int, default=64, help="photographs used, spread over the folder (default 64)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("-k", type=int, default=10, help="neighbours for the k-NN agreement (default 10)")
    p.add_argument(
        "--labels",
        help="label CSV with a split column: use all its photos and add retrieval metrics of the "
        "test split (queries) against the train split (gallery); --images/--limit are then ignored",
    )
    args = p.parse_args(argv)
    if not (args.images or args.labels):
        p.error(f"pass --images DIR or --labels CSV (or set {DATA_ENV})")
    try:
        grades = is_query = None
        if args.labels:
            rows = read_labels(args.labels)
            files = [r.path for r in rows]
            grades = [r.grade for r in rows]
            is_query = [r.fields.get("split") == "test" for r in rows]
            if not any(is_query) or all(is_query):
                raise ValueError(f"{args.labels}: needs a split column with both train and test rows")
        else:
            files = sample_files(args.images, args.limit)
        reports = compare_variants(args.models, files, k=args.k, threads=args.threads, grades=grades, is_query=is_query)
    except (ExportError, LabelError, OSError, ValueError) as exc:
        print(f"export.compare: error: {exc}", file=sys.stderr)
        return Exit.FATAL
    print(f"{len(files)} photographs from {args.images}; cosine and k-NN@{args.k} agreement vs {reports[0].path.name}")
    print(format_reports(reports))
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
