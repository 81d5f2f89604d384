"""Runtime embedding (ONNX Runtime, as fundus_sdk.Model runs it) vs torch eager on the same weights.

Why: the runtime ships an ONNX file instead of torch, which must not cost speed. This measures
images/s of the model alone (preprocessing excluded) on one batch of real photographs,
preprocessed once with the ONNX file's own recipe, at batch sizes 1 and 16: torch eager runs
the checkpoint's ExportModule (uint8 NHWC in, descriptor out; eval, inference_mode), ONNX
Runtime runs each exported file given (fp32 and, if given, fp16/int8 variants). Each variant's
descriptors are also compared with torch's (cosine), which shows the file holds the same weights.

Run it on idle cores: while another process kept both cores busy, torch with 2 threads took
1.2 s per batch-1 call (every parallel region waits for a time slice) against 23 ms with 1.

    python -m benchmarks.embed_speed --checkpoint runs/NAME/best.pt \
        --onnx model.onnx --onnx model-fp16.onnx --onnx model-int8.onnx
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fundus_sdk import Model
from fundus_sdk.contract import PRECISION
from fundus_sdk.tables import format_table
from training.checkpoint import load_checkpoint

from .common import EYEPACS_IMAGES, Timing, measure, photos, print_header, ratio


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint (e.g. runs/NAME/best.pt)")
    p.add_argument("--onnx", type=Path, action="append", required=True,
                   help="exported file of that checkpoint (repeat for variants; the first is the reference)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="default: 1 16")
    p.add_argument("--images", type=int, default=16, help="photos in the batch; each timed run embeds all of them (default 16)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed model calls at each batch size first (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2; ONNX Runtime uses one per physical core)")
    p.add_argument("--photos", type=Path, default=EYEPACS_IMAGES, help="folder of photos (default: EyePACS in ../shared)")
    return p.parse_args()


def torch_module(checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's network as exported (uint8 NHWC in, unit descriptor out), in eval mode."""
    return load_checkpoint(checkpoint).module()


def in_batches(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Descriptors of all `images`, computed `batch_size` at a time by `run`."""
    return [run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


def timed(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int, repeats: int, warmup: int) -> Timing:
    """Time passes over `images` after `warmup` untimed calls at this batch size."""
    for _ in range(warmup):
        run(images[:batch_size])
    return measure(lambda: in_batches(run, images, batch_size), repeats, warmup=0)


def main() -> None:
    args = parse_args()
    if max(args.batch_sizes) > args.images:
        raise SystemExit(f"--images ({args.images}) must be at least the largest batch size ({max(args.batch_sizes)})")
    print_header("embed_speed: ONNX Runtime (fundus_sdk.Model.run) vs torch eager, model only",
                 ["numpy", "onnxruntime", "torch", "timm"])
    torch.set_num_threads(args.threads)
    models = [Model.load(path, providers="cpu") for path in args.onnx]
    preprocess = models[0].preprocess
    if any(m.preprocess != preprocess for m in models):
        raise SystemExit("the ONNX files record different preprocessing: they are not variants of one model")
    module = torch_module(args.checkpoint)
    images = np.stack([preprocess(f) for f in photos(args.images, args.photos)])

    @torch.inference_mode()
    def torch_run(batch: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(batch)).numpy()

    reference = torch_run(images)
    print(f"checkpoint {args.checkpoint}; {len(images)} photos preprocessed to {images.shape[1:]} uint8; "
          f"torch threads {torch.get_num_threads()}; ORT providers {models[0].providers}")
    rows = []
    for batch_size in args.batch_sizes:
        base = timed(torch_run, images, batch_size, args.repeats, args.warmup)
        base_rate = base.rate(len(images))
        rows.append(["torch eager", "fp32", batch_size, f"{base_rate:.1f}", str(base), "1.00x", "", "(reference)"])
        first_rate = None
        for model in models:
            t = timed(model.run, images, batch_size, args.repeats, args.warmup)
            vectors = np.concatenate(in_batches(model.run, images, batch_size))
            cosine = (vectors * reference).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
            rate = t.rate(len(images))
            if first_rate is None:
                first_rate = rate
            rows.append([f"ORT {model.path.name}", model.metadata.get(PRECISION, "?"), batch_size, f"{rate:.1f}",
                         str(t), ratio(rate, base_rate), ratio(rate, first_rate), f"{cosine.min():.6f}"])
    print(format_table(["engine / file", "precision", "batch", "images/s", f"per {len(images)} images, median [range]",
                 "vs torch", f"vs {models[0].path.name}", "min cosine to torch"], rows))
    print("\nratios are images/s over images/s (higher: faster); 'min cosine to torch' well below 1 for fp32 "
          "means the file does not hold this checkpoint's weights")


if __name__ == "__main__":
    main()
