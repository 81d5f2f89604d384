"""Several exported models as one model file: `python -m export.ensemble A.onnx B.onnx --weights 0.6 0.4 -o OUT.onnx`.

Each member's unit descriptor is scaled by the square root of its weight (the weights sum to 1)
and the scaled descriptors are concatenated, so the ensemble's cosine similarity between two
photos is the weighted mean of its members' cosines, and its descriptor stays unit length. The
attention map is the weighted mean of the members' maps (each sums to 1, so the mean does too).
The members run side by side in one graph on one input: they must share the preprocessing, the
input size and the grading scale. The file is checked against its members run one by one on real
photos before it is written, and gets its own fingerprint: indexes built with a member refuse it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import compose, helper, numpy_helper

from fundus_sdk import contract
from fundus_sdk.errors import Exit
from fundus_sdk.preprocess import Preprocess

from .errors import ExportError
from .exporter import write_verified
from .metadata import fingerprint, write_metadata
from .verify import VERIFY_BATCH, load_images, sample_files, session

SHARED = (contract.INPUT_SIZE, contract.PRECISION, contract.SCALE, contract.FORMAT)  # plus every preprocess.* key


def _shared_metadata(metas: Sequence[dict[str, str]], paths: Sequence[Path]) -> None:
    """ExportError unless every member takes the same input the same way."""
    keys = sorted({k for m in metas for k in m if k.startswith("preprocess.")} | set(SHARED))
    for key in keys:
        values = {m.get(key) for m in metas}
        if len(values) > 1:
            listed = ", ".join(f"{p.name}: {m.get(key)!r}" for p, m in zip(paths, metas))
            raise ExportError(f"the members disagree on {key} ({listed}): they cannot share one input")


def compose_models(models: Sequence[onnx.ModelProto], weights: Sequence[float]) -> onnx.ModelProto:
    """One graph running `models` on one shared input: the descriptors weighted and concatenated as the
    module docstring says; the attention output only when every member has one."""
    explained = all(any(o.name == contract.ATTENTION_NAME for o in m.graph.output) for m in models)
    graph_nodes, initializers, outputs = [], [], []
    for i, (model, weight) in enumerate(zip(models, weights)):
        member = compose.add_prefix(model, f"m{i}/")
        for node in member.graph.node:  # the members read the ensemble's own input
            node.input[:] = [contract.INPUT_NAME if n == f"m{i}/{contract.INPUT_NAME}" else n for n in node.input]
        graph_nodes += member.graph.node
        initializers += member.graph.initializer
        initializers += [
            numpy_helper.from_array(np.array(np.sqrt(weight), np.float32), f"ensemble/scale{i}"),
            numpy_helper.from_array(np.array(weight, np.float32), f"ensemble/weight{i}"),
        ]
        graph_nodes.append(helper.make_node("Mul", [f"m{i}/{contract.OUTPUT_NAME}", f"ensemble/scale{i}"], [f"ensemble/d{i}"]))
        if explained:
            graph_nodes.append(helper.make_node("Mul", [f"m{i}/{contract.ATTENTION_NAME}", f"ensemble/weight{i}"], [f"ensemble/a{i}"]))
    graph_nodes.append(helper.make_node("Concat", [f"ensemble/d{i}" for i in range(len(models))], ["ensemble/concat"], axis=1))
    graph_nodes.append(helper.make_node("LpNormalization", ["ensemble/concat"], [contract.OUTPUT_NAME], axis=1, p=2))
    dim = sum(m.graph.output[0].type.tensor_type.shape.dim[1].dim_value for m in models)
    outputs.append(helper.make_tensor_value_info(contract.OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", dim]))
    if explained:
        side = [d.dim_value for d in next(o for o in models[0].graph.output if o.name == contract.ATTENTION_NAME).type.tensor_type.shape.dim[1:]]
        graph_nodes.append(helper.make_node("Sum", [f"ensemble/a{i}" for i in range(len(models))], [contract.ATTENTION_NAME]))
        outputs.append(helper.make_tensor_value_info(contract.ATTENTION_NAME, onnx.TensorProto.FLOAT, ["batch", *side]))
    graph = helper.make_graph(graph_nodes, "ensemble", [models[0].graph.input[0]], outputs, initializers)
    out = helper.make_model(graph, opset_imports=models[0].opset_import, ir_version=models[0].ir_version)
    onnx.checker.check_model(out)
    return out


def ensemble_files(
    members: Sequence[str | Path],
    weights: Sequence[float],
    output: str | Path,
    *,
    name: str,
    version: str,
    verify_images: str | Path,
    metrics: dict | None = None,
) -> np.ndarray:
    """Write the ensemble of the member files to `output`, verified; the per-photo cosines to the members' composition.

    `weights` are normalised to sum to 1. `metrics`: the ensemble's own test metrics to record
    (`fundus-sdk evaluate --json`), since no member's are the ensemble's.
    """
    paths = [Path(p) for p in members]
    if len(paths) < 2:
        raise ExportError("an ensemble needs at least two member models")
    if len(weights) != len(paths) or min(weights) <= 0:
        raise ExportError(f"give one positive weight per member ({len(paths)} members, weights {list(weights)})")
    w = np.asarray(weights, np.float64) / np.sum(weights)
    protos = [onnx.load(str(p)) for p in paths]
    metas = [{q.key: q.value for q in m.metadata_props} for m in protos]
    for p, m in zip(paths, metas):
        if contract.FINGERPRINT not in m:
            raise ExportError(f"{p}: not a fundus-sdk model file (no {contract.FINGERPRINT} in its metadata)")
    _shared_metadata(metas, paths)
    model = compose_models(protos, list(w))

    first = metas[0]
    meta = {k: v for k, v in first.items() if k in SHARED or k.startswith(("preprocess.", "input.", "normalise."))}
    meta |= {
        contract.NAME: name,
        contract.VERSION: version,
        contract.DIM: str(model.graph.output[0].type.tensor_type.shape.dim[1].dim_value),
        contract.BACKBONE: "+".join(m[contract.BACKBONE] for m in metas),
        contract.MIRRORING: "+".join(sorted({m[contract.MIRRORING] for m in metas})),
        contract.ATTENTION_MASK: "+".join(sorted({m.get(contract.ATTENTION_MASK, "none") for m in metas})),
        contract.TRAINING_DATA: first[contract.TRAINING_DATA],
        contract.LICENCE: " ".join(dict.fromkeys(s.rstrip(".") + "." for m in metas for s in m[contract.LICENCE].split(". "))),
        contract.METRICS: json.dumps(metrics or {}, sort_keys=True),
        contract.MEMBERS: json.dumps([
            {"name": m[contract.NAME], "version": m[contract.VERSION], "fingerprint": m[contract.FINGERPRINT], "weight": float(x)}
            for m, x in zip(metas, w)
        ]),  # fmt: skip
    }
    meta[contract.FINGERPRINT] = fingerprint(model, meta)
    write_metadata(model, meta)

    images = load_images(sample_files(verify_images, VERIFY_BATCH), Preprocess.from_metadata(first))
    names = [o.name for o in model.graph.output]  # the embedding, and the attention when every member has it
    runs = [session(p).run(names, {contract.INPUT_NAME: images}) for p in paths]
    reference = np.concatenate([np.sqrt(x) * r[0] for x, r in zip(w, runs)], axis=1)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    attention = sum(x * r[1] for x, r in zip(w, runs)) if len(names) > 1 else None
    return write_verified(model, Path(output), reference, images, first[contract.PRECISION], attention)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.ensemble",
        description="Combine exported models into one model file whose cosine is the weighted mean of theirs.",
    )
    p.add_argument("members", nargs="+", type=Path, help="the members' .onnx files (same preprocessing and input size)")
    p.add_argument("--weights", nargs="+", type=float, required=True, help="one per member, normalised to sum to 1")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--name", required=True, help="the ensemble's model name")
    p.add_argument("--version", required=True, help="the ensemble's model version, e.g. 0.3.0")
    p.add_argument("--verify-images", required=True, type=Path, help="photographs for the parity check")
    p.add_argument("--metrics", type=Path, help="the ensemble's test metrics to record (`fundus-sdk evaluate --json` output)")
    args = p.parse_args(argv)
    try:
        metrics = json.loads(args.metrics.read_text()) if args.metrics else None
        cosines = ensemble_files(
            args.members, args.weights, args.output, name=args.name, version=args.version,
            verify_images=args.verify_images, metrics=metrics,
        )  # fmt: skip
    except (ExportError, OSError, ValueError) as exc:
        print(f"export.ensemble: error: {exc}", file=sys.stderr)
        return Exit.FATAL
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB): {len(args.members)} members, "
          f"parity with the members on {len(cosines)} photos: cosine min {cosines.min():.6f}")  # fmt: skip
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
