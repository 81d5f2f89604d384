"""`python -m export.explain MODEL.onnx [-o OUT.onnx]`: add the mirror-attention output to a
model file exported before it existed (export/attention.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from google.protobuf.message import DecodeError

from fundus_sdk.contract import ATTENTION_NAME
from fundus_sdk.errors import Exit

from .attention import add_to_file
from .errors import ExportError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.explain",
        description="Add the mirror-attention map output to an exported model file whose checkpoint is "
        "gone (fresh exports have it already). Weights, descriptor and fingerprint are unchanged.",
    )
    p.add_argument("model", type=Path, help="the .onnx file")
    p.add_argument("-o", "--output", type=Path, help="where to write (default: replace MODEL)")
    args = p.parse_args(argv)
    try:
        found = add_to_file(args.model, args.output or args.model)
    except (ExportError, OSError, DecodeError) as exc:
        print(f"export.explain: error: {exc}", file=sys.stderr)
        return Exit.FATAL
    print(f"wrote {args.output or args.model}: output {ATTENTION_NAME!r} ({found['side']}x{found['side']} per photo); "
          "descriptor bit-identical")  # fmt: skip
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
