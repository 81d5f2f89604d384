"""The mirror-attention map as a second output of an exported graph.

The map is where the descriptor's evidence came from: for each position of the last feature map,
the share of the mirrored views' attention it receives (the mean over the mirrored positions of
each view's softmax, then over the two views; each map sums to 1). training/model.py defines it
(`MirrorAttention.received`); here it is built from the graph's own two Softmax nodes, so the
same function serves a fresh export (checked against torch by export/verify.py) and a shipped
file whose checkpoint is gone (`python -m export.explain MODEL.onnx`, checked to leave the
descriptor bit-identical). Only Constant nodes are added, no initializers: the weights'
fingerprint, and so every index built with the file, stays valid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from fundus_sdk.atomic import write_atomically
from fundus_sdk.contract import ATTENTION_NAME, INPUT_NAME, MEMBERS, OUTPUT_NAME

from .errors import ExportError
from .graph import copy_model, save_model


def softmax_outputs(model: onnx.ModelProto) -> list[str]:
    """The outputs of the attention's Softmax nodes, horizontal view first (graph order)."""
    return [n.output[0] for n in model.graph.node if n.op_type == "Softmax"]


def feature_side(model: onnx.ModelProto, softmax: str) -> int:
    """Side of the (square) feature map: N = side^2 key positions, found by running the graph once."""
    probe = copy_model(model)
    probe.graph.output.append(helper.make_tensor_value_info(softmax, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    size = sess.get_inputs()[0].shape[1]
    n = sess.run([softmax], {INPUT_NAME: np.zeros((1, size, size, 3), np.uint8)})[0].shape[-1]
    side = math.isqrt(n)
    if side * side != n:
        raise ExportError(f"the attention covers {n} positions: not a square feature map")
    return side


def member_weights(model: onnx.ModelProto, networks: int) -> list[float]:
    """Each network's share of the map: 1 for a single network, an ensemble's recorded weights."""
    if networks == 1:
        return [1.0]
    recorded = next((p.value for p in model.metadata_props if p.key == MEMBERS), None)
    weights = [float(m["weight"]) for m in json.loads(recorded)] if recorded else []
    if len(weights) != networks:
        raise ExportError(f"the graph holds {networks} attention networks but its metadata records {len(weights)} member weights")
    return weights


def add_attention_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with the float32 (batch, side, side) output `attention` added.

    An ensemble (export/ensemble.py) holds two Softmax nodes per network, network by network: its
    map is the networks' maps weighted as its metadata records, as a fresh ensemble's is.
    """
    if any(o.name == ATTENTION_NAME for o in model.graph.output):
        raise ExportError(f"the graph already has an output {ATTENTION_NAME!r}")
    views = softmax_outputs(model)
    if not views or len(views) % 2:
        raise ExportError(f"expected two Softmax nodes of mirror attention per network, found {len(views)} (a model without attention has no map)")
    pairs = [views[i : i + 2] for i in range(0, len(views), 2)]
    weights = member_weights(model, len(pairs))
    sides = {feature_side(model, pair[0]) for pair in pairs}
    if len(sides) != 1:
        raise ExportError(f"the networks' feature maps differ in size ({sorted(sides)}): their maps cannot be averaged")
    side = sides.pop()
    out = copy_model(model)
    g = out.graph

    def const(name: str, values: list, dtype: int) -> str:
        g.node.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values)))
        return name

    axes = const("attention_axes", [1], TensorProto.INT64)  # the mirrored (query) positions
    shape = const("attention_shape", [0, side, side], TensorProto.INT64)  # 0: keep the batch size
    flats = []
    for j, (pair, weight) in enumerate(zip(pairs, weights)):
        tag = "" if len(pairs) == 1 else str(j)
        means = []
        for i, view in enumerate(pair):
            means.append(f"attention{tag}_view{i}")
            g.node.append(helper.make_node("ReduceMean", [view, axes], [means[-1]], keepdims=0))
        g.node.append(helper.make_node("Add", means, [f"attention{tag}_sum"]))
        half = const(f"attention{tag}_half", [0.5 * weight], TensorProto.FLOAT)  # the two views' mean, weighted
        flats.append(f"attention{tag}_flat")
        g.node.append(helper.make_node("Mul", [f"attention{tag}_sum", half], [flats[-1]]))
    if len(flats) > 1:
        g.node.append(helper.make_node("Sum", flats, ["attention_flat"]))
    g.node.append(helper.make_node("Reshape", ["attention_flat", shape], [ATTENTION_NAME]))
    g.output.append(helper.make_tensor_value_info(ATTENTION_NAME, TensorProto.FLOAT, ["batch", side, side]))
    return out


def check_attention(maps: np.ndarray, path: Path | str, tolerance: float = 1e-3) -> None:
    """ExportError unless every map is finite, non-negative and sums to 1 (within `tolerance`:
    an int8 graph quantises the softmax, and its maps sum to 0.94-1.00)."""
    sums = maps.reshape(len(maps), -1).sum(axis=1)
    if not np.isfinite(maps).all() or maps.min() < 0 or np.abs(sums - 1).max() > tolerance:
        raise ExportError(f"{path}: the attention maps are not distributions (sums {sums.min():.4f}..{sums.max():.4f})")


def add_to_file(source: Path, output: Path) -> dict[str, float]:
    """Write `source` with the attention output added to `output` (atomically; `output` may be
    `source`), after checking that the descriptor is bit-identical on noise and flat images."""
    model = onnx.load(source)
    explained = add_attention_output(model)
    size = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    rng = np.random.default_rng(0)
    images = np.concatenate([rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8),
                             np.full((1, size, size, 3), 128, np.uint8)])  # fmt: skip
    options = ort.SessionOptions()
    options.log_severity_level = 3
    before = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(explained.SerializeToString(), options, providers=["CPUExecutionProvider"])
    reference = before.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    vectors, maps = after.run([OUTPUT_NAME, ATTENTION_NAME], {INPUT_NAME: images})
    if not np.array_equal(vectors, reference):
        raise ExportError(f"{source}: adding the attention output changed the descriptor")
    check_attention(maps, source)
    with write_atomically(output, durable=False) as staging:
        save_model(explained, staging)
    return {"side": maps.shape[-1], "max_share": float(maps.max())}
