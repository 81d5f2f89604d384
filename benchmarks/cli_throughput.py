"""`fundus-sdk embed FOLDER` end to end vs the model alone; start-up times; installed sizes.

Why: what a clinic sees is the command, not the model. This measures
- images/s of `fundus-sdk embed` on a folder of real photos (a subprocess, timed from launch to
  exit: start-up, model load, two threads each decoding, preprocessing and embedding a batch, writing the
  .npz), the rate the command reports itself (its embedding loop only), and images/s of the
  model alone (Model.run on batches preprocessed beforehand) and of decode + preprocess alone
  (one thread), the three in turn in each round; ratios of the command's rates to the model-only
  rate;
- wall time of `fundus-sdk --help` and `python -c "import fundus_sdk"` against `python -c pass`;
- the installed size of the runtime (fundus_sdk/ with its bundled model, plus every installed
  distribution its requirements pull in) against what the `train` extra adds (torch,
  torchvision, timm, nvidia-*, ...), read from the installed distributions' file lists.

The photos are symlinked into a temporary folder from ../shared (never copied).

    python -m benchmarks.cli_throughput
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import fundus_sdk
from fundus_sdk import load_model
from fundus_sdk.tables import format_table

from .common import EYEPACS_IMAGES, measure, measure_in_turn, photos, print_header, ratio, seconds

CLI = Path(sys.executable).with_name("fundus-sdk")
RATE = re.compile(r"([\d.]+) images/s")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="photos to embed (default 256)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size for the command and the model (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each throughput measurement (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--startup-repeats", type=int, default=10, help="timed runs of each start-up command (default 10)")
    p.add_argument("--model", type=Path, help="ONNX model (default: the bundled one)")
    p.add_argument("--photos", type=Path, default=EYEPACS_IMAGES, help="folder of photos (default: EyePACS in ../shared)")
    return p.parse_args()


def run(cmd: list[str], cwd: Path, ok: tuple[int, ...] = (0,)) -> str:
    """Run a command to completion; its stdout. Exits with its stderr unless its exit status is in `ok`."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode not in ok:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def reported_rate(stdout: str) -> float:
    """The images/s that `fundus-sdk embed` prints for its embedding loop."""
    found = RATE.search(stdout)
    if found is None:
        sys.exit(f"fundus-sdk embed printed no rate (images/s): {stdout!r}")
    return float(found.group(1))


def tree_size(folder: Path) -> int:
    """Bytes of the files under `folder`, bytecode caches excluded (as a wheel ships it)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "__pycache__" not in f.parts)


def distribution_size(dist: metadata.Distribution) -> int:
    """Bytes of the files an installed distribution recorded (its RECORD)."""
    paths = (Path(dist.locate_file(f)) for f in dist.files or [])
    return sum(p.stat().st_size for p in paths if p.is_file())


def requirement_closure(root: str, extras: set[str]) -> dict[str, metadata.Distribution]:
    """Installed distributions that `root` with `extras` pulls in, transitively (`root` excluded).

    Requirements apply by their markers (python version, platform, extra); one that is not
    installed here takes no space here and is left out.
    """
    found: dict[str, metadata.Distribution] = {}
    expanded: set[tuple[str, str]] = set()
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = canonicalize_name(name)
        found[key] = dist
        for extra in {""} | wanted:
            if (key, extra) in expanded:
                continue
            expanded.add((key, extra))
            for req in map(Requirement, dist.requires or []):
                if req.marker is None or req.marker.evaluate({"extra": extra}):
                    todo.append((req.name, set(req.extras)))
    found.pop(canonicalize_name(root), None)
    return found


def installed_sizes() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(name, bytes) of the runtime's parts and of what the train extra adds, largest first."""
    runtime = requirement_closure("fundus-sdk", set())
    train = requirement_closure("fundus-sdk", {"train"})
    package = Path(fundus_sdk.__file__).parent
    runtime_rows = [("fundus_sdk/ (incl. bundled model)", tree_size(package))]
    runtime_rows += [(d.metadata["Name"], distribution_size(d)) for d in runtime.values()]
    train_rows = [(d.metadata["Name"], distribution_size(d)) for n, d in train.items() if n not in runtime]
    return sorted(runtime_rows, key=lambda r: -r[1]), sorted(train_rows, key=lambda r: -r[1])


def main() -> None:
    args = parse_args()
    print_header("cli_throughput: fundus-sdk embed end to end vs the model alone", ["numpy", "pillow", "onnxruntime", "usearch", "click"])
    files = photos(args.images, args.photos)
    model = load_model(args.model)
    model_args = ["--model", str(args.model)] if args.model else []
    with tempfile.TemporaryDirectory(prefix="cli-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "photos"
        folder.mkdir()
        for f in files:
            (folder / f.name).symlink_to(f.resolve())
        embed_cmd = [str(CLI), "embed", str(folder), "-o", str(tmp / "out.npz"), "-q", "--batch-size", str(args.batch_size), *model_args]
        reported: list[float] = []
        batch = np.stack([model.preprocess(f) for f in files])
        # in turn, round by round: the host's speed drifts by more than the differences measured
        timed = measure_in_turn({
            # exit 1: the input gate refused (and named) some photos; every photo was still decoded and embedded
            "cli": lambda: reported.append(reported_rate(run(embed_cmd, tmp, ok=(0, 1)))),
            "prep": lambda: [model.preprocess(f) for f in files],
            "only": lambda: [model.run(batch[i : i + args.batch_size]) for i in range(0, len(batch), args.batch_size)],
        }, args.repeats, args.warmup)  # fmt: skip
        cli, prep, only = timed["cli"], timed["prep"], timed["only"]
        n = len(files)
        model_rate = only.rate(n)
        own_rate = float(np.median(reported[args.warmup:]))
        print(f"{n} photos ({batch.shape[1]}x{batch.shape[2]} after preprocessing) from {args.photos}; "
              f"model {model.name} ({model.path.name}); batch size {args.batch_size}")
        print(format_table(["what", "images/s", f"per {n} images, median [range]", "vs model only"], [
            ["fundus-sdk embed, launch to exit", f"{cli.rate(n):.1f}", str(cli), ratio(cli.rate(n), model_rate)],
            ["fundus-sdk embed, as it reports", f"{own_rate:.1f}", "-", ratio(own_rate, model_rate)],
            ["decode + preprocess only, 1 thread", f"{prep.rate(n):.1f}", str(prep), ratio(prep.rate(n), model_rate)],
            ["model only (Model.run)", f"{model_rate:.1f}", str(only), "1.00x"],
        ]))

        python = [sys.executable, "-c"]
        startup = {
            "python -c pass": measure(lambda: run([*python, "pass"], tmp), args.startup_repeats),
            'python -c "import fundus_sdk"': measure(lambda: run([*python, "import fundus_sdk"], tmp), args.startup_repeats),
            "fundus-sdk --help": measure(lambda: run([str(CLI), "--help"], tmp), args.startup_repeats),
        }
    base = startup["python -c pass"].median
    print(f"\nstart-up, wall time of {args.startup_repeats} runs each:")
    print(format_table(["command", "median [range]", "minus python -c pass", "vs python -c pass"],
                [[cmd, str(t), seconds(t.median - base), ratio(t.median, base)] for cmd, t in startup.items()]))

    runtime, train = installed_sizes()
    runtime_total, train_total = sum(s for _, s in runtime), sum(s for _, s in train)
    print(f"\ninstalled size (site-packages of {Path(sys.executable).parent.parent}):")
    print(format_table(["runtime: fundus-sdk and its requirements", "MB"], [[name, f"{s / 1e6:.1f}"] for name, s in runtime]))
    print()
    print(format_table(["added by the train extra", "MB"], [[name, f"{s / 1e6:.1f}"] for name, s in train]))
    print(f"\nruntime {runtime_total / 1e6:.0f} MB; train extra adds {train_total / 1e6:.0f} MB "
          f"({ratio(train_total, runtime_total)} the runtime); runtime + train {(runtime_total + train_total) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
