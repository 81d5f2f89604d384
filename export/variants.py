"""Reduced-precision variants of the optimised fp32 graph; input stays uint8, output float32.

fp16-weights: the weights stored in float16, each followed by a Cast to float32 that ONNX Runtime
folds away when it loads the file: half the file's size, fp32's compute and speed (fp16 compute
ran at 0.59-0.68x fp32's speed on a CPU without float16 units). Rounding the weights moves a
descriptor by a cosine of about 1e-5.

fp16: backbone, mirror attention and projection (weights and compute) in float16; the input
scaling, GeM pooling and L2 normalisation stay float32, with a Cast at each boundary. GeM raises
activations to the power p (~3), which overflows float16's 65504 for activations above ~40, and
a float16 normalisation leaves vectors off unit length by ~4e-4.
(onnxruntime.transformers.float16 can block ops, but routes every tensor between blocked ops
through float16, which defeats the purpose; hence the small converter here.)

int8: static QDQ quantisation (onnxruntime.quantization) of all supported ops, int8 per-channel
weights, uint8 activations, ranges from MinMax with a moving average over calibration batches
of preprocessed photographs (plain MinMax let single outliers widen the ranges; Percentile was
no better and 6x slower in our measurements).
"""

from __future__ import annotations

import ast
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from fundus_sdk.contract import INPUT_NAME

from .graph import copy_model

PRECISIONS = ("fp32", "fp16-weights", "fp16", "int8")
MIN_STORED = 64  # elements: smaller float tensors (scalars, shapes) stay float32
FP16_SCOPES = ("net.backbone", "net.attention", "net.proj")  # module paths inside ExportModule
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata written by the torch exporter


def in_scopes(node: onnx.NodeProto, prefixes: tuple[str, ...]) -> bool:
    """Whether the exporter recorded `node` as part of a module under one of `prefixes`."""
    scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == NAME_SCOPES), [])
    return any(s == p or s.startswith(p + ".") for s in scopes for p in prefixes)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 weights and compute inside FP16_SCOPES, float32 elsewhere; uint8 in, float32 out."""
    model = copy_model(model)
    graph = model.graph
    region = {i for i, n in enumerate(graph.node) if in_scopes(n, FP16_SCOPES)}  # protobuf ids are not stable
    if not region:
        raise ValueError("no nodes in FP16_SCOPES (the graph lacks the exporter's name scopes)")
    floats = {
        v.name
        for v in (*onnx.shape_inference.infer_shapes(model).graph.value_info, *graph.input, *graph.output)
        if v.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    weights = {t.name: t for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    floats |= weights.keys()
    inside = {o for i in region for o in graph.node[i].output}
    nodes: list[onnx.NodeProto] = []
    converted: dict[tuple[str, int], str] = {}

    def convert(name: str, to: int) -> str:
        if (name, to) not in converted:
            new = f"{name}/{'fp16' if to == TensorProto.FLOAT16 else 'fp32'}"
            if name in weights:
                half = numpy_helper.to_array(weights[name]).astype(np.float16)
                graph.initializer.append(numpy_helper.from_array(half, new))
            else:
                nodes.append(helper.make_node("Cast", [name], [new], to=to, name=f"cast:{new}"))
            converted[name, to] = new
        return converted[name, to]

    for index, node in enumerate(graph.node):
        is_in = index in region
        for i, name in enumerate(node.input):
            if name in floats and is_in and name not in inside:
                node.input[i] = convert(name, TensorProto.FLOAT16)
            elif name in floats and not is_in and name in inside:
                node.input[i] = convert(name, TensorProto.FLOAT)
        nodes.append(node)
    if any(o.name in inside for o in graph.output):
        raise ValueError("a graph output is produced inside the float16 region")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # types inside the region changed; ORT re-infers them
    return model


def to_fp16_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float32 weight of at least MIN_STORED elements stored as float16 and cast back on load."""
    model = copy_model(model)
    graph = model.graph
    kept, casts = [], []
    for t in graph.initializer:
        if t.data_type != TensorProto.FLOAT or np.prod(t.dims) < MIN_STORED:
            kept.append(t)
            continue
        half = numpy_helper.to_array(t).astype(np.float16)
        if not np.isfinite(half).all():
            raise ValueError(f"weight {t.name} exceeds float16's range")
        kept.append(numpy_helper.from_array(half, f"{t.name}/fp16"))
        casts.append(helper.make_node("Cast", [f"{t.name}/fp16"], [t.name], to=TensorProto.FLOAT, name=f"cast:{t.name}"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [*casts, *graph.node]  # the casts first: every node reading a weight comes after its cast
    del graph.node[:]
    graph.node.extend(nodes)
    return model


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int) -> None:
        self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def to_int8(model: onnx.ModelProto, calibration: np.ndarray, batch: int = 8) -> onnx.ModelProto:
    """Static QDQ int8 model calibrated on preprocessed uint8 images (n, size, size, 3)."""
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, source)  # quantize_static alters a ModelProto passed in
        # quantize_static warns on the root logger unless the graph went through its
        # pre-processing, whose symbolic shape inference fails on this graph (ORT BASIC already
        # optimised it): keep that warning out of the export's output.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_static(
                source,
                out,
                _Batches(calibration, batch),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,  # 7-bit weights: full-range u8 x s8 products saturate on CPUs without VNNI
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibMovingAverage": True},
            )
        finally:
            root.setLevel(level)
        return onnx.load(out)
