"""What every benchmark shares: the machine description, timing, tables, and where the photos are.

Each script measures A against B in the same run on the same machine, so its ratios hold even
where the absolute figures (which depend on the CPU and its load, printed at the top) do not.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from training.data import DATA_ENV

# Where the photos are, for benchmarks and tests alike (tests/shared.py reads these): EyePACS in
# the folder FUNDUS_SDK_DATA names, by default ../shared/data/eyepacs256 beside the checkout, and
# IDRiD in ../shared/data/idrid, each resolved as the index stores photos' paths (a shared/ reached
# through a link compares equal).
REPO = Path(__file__).resolve().parents[1]
EYEPACS = Path(os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data" / "eyepacs256").resolve()
IDRID = (REPO.parent / "shared" / "data" / "idrid").resolve()  # the second camera (CC BY 4.0), its official split
RETINA = REPO / "tests" / "fixtures" / "retina.jpg"  # CC0 (scikit-image's retina)

EYEPACS_IMAGES = EYEPACS / "images"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server started by a script or test."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _proc_field(path: str, key: str) -> str | None:
    """The value of the first `key: value` line of a /proc file, or None."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def package_version(name: str) -> str:
    """Installed version of a distribution, without importing it."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description(packages: Sequence[str] = ()) -> list[str]:
    """Lines describing where and when the figures were measured (RESULTS.md has the same fields)."""
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"
    mem = _proc_field("/proc/meminfo", "MemTotal")  # e.g. "24564112 kB"
    ram = f"{int(mem.split()[0]) / 2**20:.1f} GiB" if mem else "unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"date:       {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"cpu:        {cpu}",
        f"cores:      {os.cpu_count()} logical, {usable} usable by this process",
        f"ram:        {ram}",
        f"os:         {platform.platform()}",
        f"python:     {platform.python_version()} ({sys.executable})",
        f"packages:   {', '.join(f'{p} {package_version(p)}' for p in packages) or '-'}",
        f"load avg:   {load} (1/5/15 min, at start)",
    ]


def print_header(title: str, packages: Sequence[str] = ()) -> None:
    """Print the benchmark's title and the machine description; warn when the machine is busy."""
    print(f"== {title} ==")
    for line in machine_description(packages):
        print(line)
    cores = os.cpu_count() or 1
    if os.getloadavg()[0] > 0.25 * cores:
        print(f"warning: the machine is busy (load {os.getloadavg()[0]:.1f} on {cores} cores): absolute figures are low")
    print(flush=True)


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the repeated runs of one measurement."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def rate(self, items: int) -> float:
        """Items per second at the median run time."""
        return items / self.median

    def __str__(self) -> str:
        """Median and range, e.g. '98.1 ms [95.5 ms-101.2 ms]'."""
        return f"{seconds(self.median)} [{seconds(min(self.runs))}-{seconds(max(self.runs))}]"


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times timed with time.perf_counter."""
    return measure_in_turn({"": fn}, repeats, warmup)[""]


def measure_in_turn(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Like `measure` for several functions, run one after another in each round, so that every
    ratio between them compares the same minutes even when the machine's speed drifts."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(r)) for name, r in runs.items()}


def seconds(s: float) -> str:
    """A duration with a readable unit."""
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def ratio(a: float, b: float) -> str:
    """a / b as 'N.NNx' ('n/a' when b is 0)."""
    return f"{a / b:.2f}x" if b else "n/a"


def photos(n: int, folder: Path = EYEPACS_IMAGES) -> list[Path]:
    """`n` photographs spread evenly over the sorted files of `folder` (never copied anywhere).

    Exits with a message naming the folder when it is missing or holds fewer than `n` photos.
    """
    if not folder.is_dir():
        sys.exit(f"{folder}: no such folder (the EyePACS photos live in ../shared beside the checkout; see --photos)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if len(files) < n:
        sys.exit(f"{folder}: {len(files)} photos, {n} wanted")
    step = len(files) // n
    return files[::step][:n]
