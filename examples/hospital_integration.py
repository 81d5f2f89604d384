#!/usr/bin/env python3
"""Hospital integration: index graded past cases, then show the cases most like a new photo.

Uses the Python API only (no deep-learning stack): `Index.create`, `Index.add` with metadata
(the grade and any other CSV columns), and `fundus_sdk.search`.

    python examples/hospital_integration.py --labels data/labels.csv         # 50 cases, one query
    python examples/hospital_integration.py --limit 200 -k 10 --query new_patient.jpg
    python examples/hospital_integration.py --labels ours.csv --index cases/   # keep the index

--labels defaults to labels.csv of the data set named by $FUNDUS_SDK_DATA.

The label CSV has columns `image` (path relative to the CSV's folder, or to an `images/`
folder beside it) and `grade` (ICDR 0-4); every other column is kept as case metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import fundus_sdk


def read_cases(labels: Path, limit: int, split: str | None) -> list[tuple[Path, dict]]:
    """(photo path, metadata) for the first `limit` rows (of `split`, if the CSV has a split column)."""
    cases = []
    for row in fundus_sdk.read_labels(labels, require_grade=False, require_files=False):
        if split and row.fields.get("split", split) != split:
            continue
        meta = {k: v for k, v in row.fields.items() if k != "split" and v != ""}
        if row.grade is not None:
            meta["grade"] = row.grade
        cases.append((row.path, meta))
        if len(cases) == limit:
            break
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = os.environ.get("FUNDUS_SDK_DATA")
    parser.add_argument(
        "--labels", type=Path, default=Path(data) / "labels.csv" if data else None, required=not data,
        help="label CSV (default: labels.csv in $FUNDUS_SDK_DATA)",
    )
    parser.add_argument("--limit", type=int, default=50, help="how many gallery cases to index (default: %(default)s)")
    parser.add_argument("--query", type=Path, help="the new photo (default: the first test-split photo of the CSV)")
    parser.add_argument("--index", type=Path, help="index directory to create or extend (default: a temporary one)")
    parser.add_argument("-k", type=int, default=5, help="how many similar cases to show (default: %(default)s)")
    parser.add_argument("--model", type=Path, help="ONNX model file (default: the bundled model)")
    args = parser.parse_args(argv)

    # 1. The gallery: graded past cases (the training split, when the CSV has one).
    gallery = read_cases(args.labels, args.limit, split="train")
    if not gallery:
        parser.error(f"no cases in {args.labels}")

    # 2. Create the index (or reopen it: photos already in it are not added twice).
    tmp = tempfile.TemporaryDirectory() if args.index is None else None
    where = Path(tmp.name) / "cases" if tmp else args.index
    if (where / "cases.sqlite").is_file():
        index = fundus_sdk.Index.open(where, model=args.model)
    else:
        index = fundus_sdk.Index.create(where, model=args.model)

    # 3. Add the photos with their metadata; unreadable photos are reported and skipped.
    def report(err: fundus_sdk.ImageError) -> None:
        print(f"skipped {err}", file=sys.stderr)

    paths, metadata = zip(*gallery)
    index.add(list(paths), list(metadata), on_error=report)
    print(f"index {where}: {len(index)} cases")

    # 4. Query a new photo: the nearest cases, best first.
    query = args.query or read_cases(args.labels, 1, split="test")[0][0]
    hits = fundus_sdk.search(query, index, k=args.k)
    print(f"query {query}")
    print(f"{'rank':>4}  {'score':>6}  {'grade':>5}  path")
    for rank, hit in enumerate(hits, 1):
        grade = "-" if hit.grade is None else hit.grade
        print(f"{rank:>4}  {hit.score:>6.3f}  {grade:>5}  {hit.path}")

    index.close()
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
