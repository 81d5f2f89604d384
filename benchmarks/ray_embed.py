"""`fundus-sdk embed --ray` against the plain `fundus-sdk embed` on the same photos and cores.

Why: Ray Data is the scale-out path; on one machine it should cost little against the plain
command, so that photos/s per core measured here sizes a cluster. Measured, in one run:
- the plain command, a subprocess timed from launch to exit (model load, 2 decoding threads,
  ONNX Runtime on every core, writing the .npz);
- the same through Ray, cold: a subprocess that starts a local Ray instance, lists, reads,
  decodes (tasks) and embeds (actors) the photos and writes Parquet shards;
- through Ray, warm: `embed_on_ray` in this process on a cluster already up (what each job on
  a standing cluster pays): one-thread actors on all CPUs but one (the rest reads and decodes).
Ratios are photos/s against the plain command's. The photos are symlinked from ../shared.

    python -m benchmarks.ray_embed [--images 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fundus_sdk.tables import format_table

from .common import EYEPACS_IMAGES, photos, print_header, ratio

CLI = Path(sys.executable).with_name("fundus-sdk")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="photos to embed (default 256)")
    p.add_argument("--photos", type=Path, default=EYEPACS_IMAGES, help="folder of photos (default: EyePACS in ../shared)")
    return p.parse_args()


def timed(cmd: list[str]) -> float:
    """Wall seconds of a command run to completion; exits with its stderr if it fails (exit 1,
    a photo the input gate refused, is not a failure: both paths judge every photo)."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    import ray

    from fundus_sdk.cluster import embed_on_ray

    print_header("Ray Data against the plain command, same photos and cores", ["ray", "pyarrow", "onnxruntime"])
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for p in photos(args.images, args.photos):
            (folder / p.name).symlink_to(p)
        n = args.images
        plain = timed([str(CLI), "embed", str(folder), "-o", str(Path(tmp) / "x.npz"), "-q"])
        cold = timed([str(CLI), "embed", "--ray", str(folder), "-o", str(Path(tmp) / "cold"), "-q"])
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        warm = {}
        for repeat in range(2):
            out = Path(tmp) / f"warm-{repeat}"
            report = embed_on_ray(folder, out, threads=1, actors=max(1, cores - 1))
            assert report.embedded == n and report.failed == 0, report
            warm[(1, max(1, cores - 1), repeat)] = report.seconds
            shutil.rmtree(out)
        ray.shutdown()
    rows = [["fundus-sdk embed (plain, subprocess)", f"{plain:.1f}", f"{n / plain:.1f}", f"{n / plain / cores:.2f}", "1.00x"],
            ["fundus-sdk embed --ray (local Ray, cold)", f"{cold:.1f}", f"{n / cold:.1f}", f"{n / cold / cores:.2f}", ratio(plain, cold)]]  # fmt: skip
    for (threads, actors, repeat), s in warm.items():
        rows.append([f"embed_on_ray, warm (run {repeat + 1}): {actors} actor(s) x {threads} thread", f"{s:.1f}", f"{n / s:.1f}",
                     f"{n / s / cores:.2f}", ratio(plain, s)])  # fmt: skip
    print(f"{n} photos, {cores} cores; ratio = photos/s against the plain command (higher is better)\n")
    print(format_table(["path", "seconds", "photos/s", "photos/s/core", "vs plain"], rows))


if __name__ == "__main__":
    main()
