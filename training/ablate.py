"""Ablations on one split and one budget: does each part of the method earn its keep?

Every trained variant gets the same schedule, data, frozen trunk (and so the same cached trunk
features), augmentation pool and seeds, and is judged at its last epoch (no checkpoint
selection); only the named part changes:

1. imagenet-gem          ImageNet backbone + GeM, no training (320-d descriptor)
2. gem-fine              backbone + GeM + projection, fine triplet loss, no mirror attention
3. mirror-batchhard      mirror attention + batch-hard triplet loss
4. mirror-circle         mirror attention + fine loss with the relevant degree fixed to 1
5. mirror-fine-image     mirror attention + fine triplet loss, image mirroring (3 tail passes)
6. mirror-fine-feature   mirror attention + fine triplet loss, feature mirroring (1 pass)

Results (test split: gallery = train split, queries = test split) go to OUT/results.json and a
Markdown table OUT/ABLATIONS.md; each run's log stays in OUT/<variant>-seed<N>/log.txt.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from fundus_sdk import metrics
from fundus_sdk.tables import format_table

from .cache import clean_maps_by_split, embed_maps
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .model import FundusNet, ModelConfig
from .train import train

VARIANTS: dict[str, dict | None] = {
    "imagenet-gem": None,
    "gem-fine": {"mirroring": "none", "loss": "fine"},
    "mirror-batchhard": {"mirroring": "feature", "loss": "batch-hard"},
    "mirror-circle": {"mirroring": "feature", "loss": "circle"},
    "mirror-fine-image": {"mirroring": "image", "loss": "fine"},
    "mirror-fine-feature": {"mirroring": "feature", "loss": "fine"},
}


def untrained_report(cfg: TrainConfig, model_cfg: ModelConfig) -> dict:
    """Variant 1: GeM over the ImageNet backbone's last feature map, no projection, no training."""
    torch.set_num_threads(cfg.threads)
    net = FundusNet(replace(model_cfg, mirroring="none"), pretrained=True).eval()
    maps, grades, is_test = clean_maps_by_split(net, cfg)
    desc = embed_maps(net, maps, pooled=True)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    return metrics.retrieval_report(desc[is_test], desc[~is_test], grades[is_test], grades[~is_test], cfg.k, cfg.scale.span)


def inference_ms(model_cfg: ModelConfig, threads: int, batch: int = 16) -> float:
    """Torch eval time per image of the full network (trunk included) at the input size."""
    torch.set_num_threads(threads)
    net = FundusNet(model_cfg, pretrained=False).eval()
    x = torch.randn(batch, 3, model_cfg.input_size, model_cfg.input_size)
    with torch.inference_mode():
        net(x)
        start = time.perf_counter()
        for _ in range(3):
            net(x)
    return (time.perf_counter() - start) / (3 * batch) * 1000


def run(base: TrainConfig, model_cfg: ModelConfig, out: Path, variants: list[str], seeds: list[int]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    done = {(r["variant"], r["seed"]) for r in results}
    for name in variants:
        spec = VARIANTS[name]
        for seed in seeds if spec is not None else [0]:
            if (name, seed) in done:
                continue
            started = time.time()
            if spec is None:
                report = untrained_report(base, model_cfg)
            else:
                mcfg = replace(model_cfg, mirroring=spec["mirroring"])
                cfg = replace(base, out=str(out / f"{name}-seed{seed}"), seed=seed, loss=spec["loss"], validate=False)
                report = load_checkpoint(train(cfg, mcfg)).state["test"]
            entry = {"variant": name, "seed": seed, "seconds": time.time() - started, "report": report}
            results.append(json.loads(json.dumps(entry)))  # as stored: grade keys become strings
            results_file.write_text(json.dumps(results, indent=2))
    # Inference cost, measured once per variant after all training, back to back (same load).
    costs = {}
    for name in dict.fromkeys(r["variant"] for r in results):
        spec = VARIANTS[name]
        mcfg = replace(model_cfg, mirroring=spec["mirroring"] if spec else "none")
        costs[name] = {"backbone_passes": 3 if mcfg.mirroring == "image" else 1, "ms_per_image": inference_ms(mcfg, base.threads)}
    (out / "costs.json").write_text(json.dumps(costs, indent=2))
    (out / "ABLATIONS.md").write_text(table(results, costs, base))
    return results


def table(results: list[dict], costs: dict[str, dict], base: TrainConfig) -> str:
    """Markdown: a summary (micro and macro of every metric, cost) and one per-grade table per
    metric; each cell is the mean over seeds ± half the spread, next to the chance level."""
    k = base.k
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    chance = results[0]["report"]["chance"]

    def cell(values: list[float | None]) -> str:
        values = [v for v in values if v is not None]  # a grade can be absent from small query sets
        if not values:
            return "-"
        return f"{np.mean(values):.3f}" + (f" ± {np.ptp(values) / 2:.3f}" if len(values) > 1 else "")

    def rows(head: list[str], body: list[list[str]]) -> list[str]:
        return format_table(head, body, markdown=True).splitlines()

    averages = [(m, avg) for m in metrics.METRICS for avg in ("micro", "macro")]
    summary = [
        [name, str(len(runs))]
        + [cell([r["report"][avg][m] for r in runs]) for m, avg in averages]
        + [f"{np.mean([r['seconds'] for r in runs]):.0f}", str(costs[name]["backbone_passes"]), f"{costs[name]['ms_per_image']:.1f}"]
        for name, runs in by_variant.items()
    ]
    summary.append(["chance", ""] + [f"{chance[avg][m]:.3f}" for m, avg in averages] + ["", "", ""])
    head = ["variant", "seeds", *(f"{m}@{k} {avg}" for m, avg in averages), "train s", "backbone passes", "ms/image"]
    lines = rows(head, summary)
    grades = list(base.scale.values)
    for m in metrics.METRICS:
        body = [
            [name] + [cell([r["report"]["per_grade"][m].get(str(g)) for r in runs]) for g in grades]
            for name, runs in by_variant.items()
        ]
        body.append(["chance"] + [cell([chance["per_grade"][m].get(str(g))]) for g in grades])
        lines += ["", f"{m}@{k} per query grade:", "", *rows(["variant", *(f"grade {g}" for g in grades)], body)]
    per_variant = ("out", "data", "cache_dir", "preprocess", "loss", "seed", "validate")  # set per run
    settings = {k2: v for k2, v in asdict(base).items() if k2 not in per_variant}
    return "\n".join(lines) + f"\n\nSchedule and settings shared by every trained variant: `{json.dumps(settings)}`\n"
