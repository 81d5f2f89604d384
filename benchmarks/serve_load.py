"""The HTTP service against the library it serves: a bounded load on loopback.

Why: `fundus-sdk serve` adds HTTP, multipart parsing, authentication, admission control and JSON
around `fundus_sdk.query`. This measures what that costs where it matters, at a fixed
concurrency: the same photos are searched by `concurrency` clients of the service (a real
uvicorn on 127.0.0.1, one worker) and by as many threads calling `Index.query` in-process on
one shared read-only Index, in the same run. Each side sends `count` requests of one photo.

    python -m benchmarks.serve_load [--count 80] [--concurrency 4] [--gallery 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fundus_sdk import Index, load_model
from fundus_sdk.keys import create_key
from fundus_sdk.tables import format_table

from .common import free_port, photos, print_header, ratio


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run(calls: list, concurrency: int) -> tuple[float, list[float]]:
    """(searches/s, per-call latencies in ms) of the calls run by `concurrency` threads."""
    latencies: list[float] = []

    def timed(call) -> None:
        started = time.perf_counter()
        call()
        latencies.append(1000 * (time.perf_counter() - started))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(timed, calls))
    return len(calls) / (time.perf_counter() - started), latencies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=80, help="searches per side (default 80)")
    p.add_argument("--concurrency", type=int, default=4, help="clients / threads at once (default 4)")
    p.add_argument("--gallery", type=int, default=200, help="EyePACS photos indexed (default 200)")
    args = p.parse_args()
    import httpx

    print_header("fundus-sdk serve against in-process query(), same photos, same minute", ["fastapi", "uvicorn", "httpx"])
    chosen = photos(args.gallery + args.count)
    gallery, queries = chosen[: args.gallery], chosen[args.gallery :]
    data = [q.read_bytes() for q in queries]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with Index.create(root / "cases", model=load_model()) as ix:
            ix.add(gallery, check=False)
        _, key = create_key(root / "keys", "search")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "fundus_sdk", "serve", str(root / "cases"), "--keys", str(root / "keys"),
                                   "--port", str(port), "--threads", str(args.concurrency)], stderr=subprocess.DEVNULL)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        shared = Index.open(root / "cases", read_only=True)
        shared.model  # noqa: B018 (loaded before timing, as the service loads it at start)
        try:
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=120,
                              limits=httpx.Limits(max_connections=args.concurrency)) as client:  # fmt: skip
                sides = {
                    "serve (HTTP)": lambda d: lambda: client.post(f"{url}/v1/search", files={"image": ("q.jpg", d)}).raise_for_status(),
                    "query() in-process": lambda d: lambda: shared.query([d], 10),
                }
                for make in sides.values():  # warm-up
                    run([make(d) for d in data[:8]], args.concurrency)
                results = {name: [0.0, []] for name in sides}
                for half in (data[::2], data[1::2]):  # in turn, so that both sides share the same minutes
                    for name, make in sides.items():
                        started = time.perf_counter()
                        _, ms = run([make(d) for d in half], args.concurrency)
                        results[name][0] += time.perf_counter() - started
                        results[name][1] += ms
        finally:
            shared.close()
            server.terminate()
            server.wait(timeout=60)
    rates = {name: args.count / seconds for name, (seconds, _) in results.items()}
    served, library = rates.values()
    rows = [[name, f"{rate:.2f}", *(f"{percentile(ms, q):.0f}" for q in (50, 95, 99))]
            for name, rate, ms in ((name, rates[name], results[name][1]) for name in rates)]  # fmt: skip
    print(format_table(["", "searches/s", "p50 ms", "p95 ms", "p99 ms"], rows, align="lrrrr"))
    print(f"\n{args.count} searches of one photo each, {args.concurrency} at once, gallery of {args.gallery}: "
          f"the service runs at {ratio(served, library)} the in-process rate (target >= 0.8x)")  # fmt: skip


if __name__ == "__main__":
    main()
