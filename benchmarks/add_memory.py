"""Peak memory of `fundus-sdk index add` at default settings: RUN_CHUNK images in ONNX Runtime at
once (fundus_sdk.model.RUN_CHUNK, split between the batches running together) against 16, and for
a larger folder.

Why: ONNX Runtime's CPU arena keeps the peak of the images in it at once, so the size of the
calls, not the batch of the pipeline, sets the memory an `index add` holds. Each run is a fresh process
(`fundus-sdk index add` into a new index, photos symlinked from ../shared) that reports its own
peak resident memory (ru_maxrss); the A/B pairs run back to back in the same minute.

    python -m benchmarks.add_memory [--images 200 1000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from fundus_sdk.model import RUN_CHUNK
from fundus_sdk.tables import format_table

from .common import EYEPACS_IMAGES, photos, print_header, ratio

DRIVER = """
import resource, sys, time
import fundus_sdk.model
fundus_sdk.model.RUN_CHUNK = int(sys.argv[1])
from fundus_sdk.cli import main
start = time.perf_counter()
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    print(f"PEAK {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} {time.perf_counter() - start:.2f}", file=sys.stderr)
"""


def add(folder: Path, index: Path, chunk: int) -> tuple[float, float]:
    """(peak MB, seconds) of one `index add` of `folder` into a new index, in a fresh process."""
    subprocess.run([sys.executable, "-m", "fundus_sdk", "index", "create", str(index)], check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-c", DRIVER, str(chunk), "index", "add", str(index), str(folder),
                           "--allow-unlabelled", "-q"], capture_output=True, text=True)  # fmt: skip
    line = next((ln for ln in done.stderr.splitlines() if ln.startswith("PEAK ")), None)
    if line is None:
        sys.exit(f"index add failed ({done.returncode}):\n{done.stderr[-2000:]}")
    _, mb, s = line.split()
    return float(mb), float(s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[200, 1000], help="folder sizes (default 200 1000)")
    args = p.parse_args()
    print_header("index add: peak memory per ONNX Runtime call size", ["onnxruntime"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.images:
            folder = Path(tmp) / f"photos-{n}"
            folder.mkdir()
            for photo in photos(n, EYEPACS_IMAGES):
                (folder / photo.name).symlink_to(photo)
            measured = {chunk: add(folder, Path(tmp) / f"ix-{n}-{chunk}", chunk) for chunk in (16, RUN_CHUNK)}
            (mb16, s16), (mb, s) = measured[16], measured[RUN_CHUNK]
            rows.append([n, f"{mb16:.0f}", f"{mb:.0f}", ratio(mb, mb16), f"{s16:.1f}", f"{s:.1f}", ratio(s, s16)])
    print(f"batch 16 (the default) in both; 16 images in ONNX Runtime at once against {RUN_CHUNK} (RUN_CHUNK); target <= 400 MB\n")
    print(format_table(["photos", "peak MB, 16", f"peak MB, {RUN_CHUNK}", "memory ratio", "s, 16", f"s, {RUN_CHUNK}", "time ratio"], rows))


if __name__ == "__main__":
    main()
