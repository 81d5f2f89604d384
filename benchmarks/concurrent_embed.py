"""Several processes embedding at once on one machine: ONNX Runtime's threads spinning between
calls (its default) against sleeping (fundus_sdk.model.SPIN_WAIT = False, the runtime's default).

Why: clinic IT runs `index add` on two folders at once, or a search service beside a batch job.
ONNX Runtime starts one thread per core in every process and by default lets them busy-wait
after each operator; two such processes on the same cores burn each other's time slices. Each
run is a fresh process embedding the same preprocessed photos (the model alone, default
threads, batch 16) for a fixed number of passes; "together" starts them at the same moment.

    python -m benchmarks.concurrent_embed [--processes 1 2] [--passes 6]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fundus_sdk import load_model
from fundus_sdk.tables import format_table

from .common import EYEPACS_IMAGES, photos, print_header, ratio

CHILD = """
import sys, time, numpy as np
import fundus_sdk.model as m
m.SPIN_WAIT = sys.argv[1] == "spin"
model = m.Model.load(m.default_model_path())
batch = np.load(sys.argv[2])
passes = int(sys.argv[3])
model.run(batch[:16])  # warm up
start = time.perf_counter()
for _ in range(passes):
    for i in range(0, len(batch), 16):
        model.run(batch[i : i + 16])
print(passes * len(batch) / (time.perf_counter() - start))
"""


def together(mode: str, batch: Path, passes: int, processes: int) -> float:
    """Images/s of all `processes` together, each embedding `passes` times over the batch."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, mode, str(batch), str(passes)], stdout=subprocess.PIPE,
                              text=True) for _ in range(processes)]  # fmt: skip
    rates = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            sys.exit(f"a child failed ({p.returncode})")
        rates.append(float(out.strip().splitlines()[-1]))
    return sum(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="processes at once (default 1 2)")
    p.add_argument("--passes", type=int, default=6, help="passes over 32 photos per process (default 6)")
    args = p.parse_args()
    print_header("processes embedding at once: ONNX Runtime threads spinning vs sleeping", ["onnxruntime"])
    model = load_model()
    pixels = np.stack([model.preprocess(photo) for photo in photos(32, EYEPACS_IMAGES)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        batch = Path(tmp) / "batch.npy"
        np.save(batch, pixels)
        for n in args.processes:
            started = time.perf_counter()
            spin = together("spin", batch, args.passes, n)
            sleep = together("sleep", batch, args.passes, n)
            rows.append([n, f"{spin:.1f}", f"{sleep:.1f}", ratio(sleep, spin), f"{time.perf_counter() - started:.0f} s"])
    print(f"model alone ({model.name}), {pixels.shape[1]} px, batch 16, default threads per process\n")
    print(format_table(["processes", "images/s, spinning", "images/s, sleeping", "sleeping / spinning", "took"], rows))


if __name__ == "__main__":
    main()
