"""Torch module -> optimised ONNX graph, and the graph inspections the export reports on.

Exporter: torch.export-based (`dynamo=True`). Its graph has constant reshape targets and
static TF-"same" padding folded into the convolutions; the legacy TorchScript exporter
(deprecated in torch 2.9+) computes both at run time from Shape/Gather/Ceil chains.

Optimisation, offline: the exporter's own optimiser (onnxscript: constant folding, BatchNorm
folding, dead code), then ONNX Runtime's BASIC level. BASIC rewrites are semantics-preserving,
use standard ONNX ops only and run before graph partitioning, so the file stays portable to any
execution provider. EXTENDED is not portable: on a CPU session it fuses Conv+Clip (ReLU6) into
com.microsoft FusedConv, whose CUDA kernel maps only Relu. ORT applies such fusions online, at
session creation, for the provider actually used.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from fundus_sdk.contract import INPUT_NAME, OUTPUT_NAME

SHAPE_OPS = frozenset({"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "ConstantOfShape", "Expand", "Size"})


def torch_to_onnx(module: torch.nn.Module, size: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(graph as translated, graph after the exporter's optimiser); dynamic batch axis."""
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # batch 2: torch.export specialises 1
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            optimize=False,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"image": {0: batch}},
        )
    raw = program.model_proto  # serialised afresh on each access
    program.optimize()
    return raw, program.model_proto


def optimise(model: onnx.ModelProto) -> onnx.ModelProto:
    """Apply ONNX Runtime's portable (BASIC) graph optimisations offline."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimised = onnx.load(options.optimized_model_filepath)
    # ORT's saved model imports every operator domain it knows (nchwc, aten, ...): keep the used ones
    used = {n.domain for n in optimised.graph.node} | {""}
    kept = [o for o in optimised.opset_import if o.domain in used]
    del optimised.opset_import[:]
    optimised.opset_import.extend(kept)
    return optimised


def node_counts(model: onnx.ModelProto) -> Counter:
    """Nodes by op type ("domain:Op" for non-standard domains)."""
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in model.graph.node)


def attention_shape_ops(model: onnx.ModelProto) -> Counter:
    """Shape-computing ops (Shape, Gather, Concat, ...) upstream of any MatMul or Softmax.

    Empty when the attention is plain MatMul/Softmax over constant-shaped reshapes.
    """
    nodes = list(model.graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    stack = [i for i, n in enumerate(nodes) if n.op_type in ("MatMul", "Softmax")]
    seen: set[int] = set()
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack += [producer[name] for name in nodes[i].input if name in producer]
    return Counter(nodes[i].op_type for i in seen if nodes[i].op_type in SHAPE_OPS)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node records (module scopes, FX nodes, stack traces with this
    machine's source paths) and doc strings: the shipped file holds the graph and our metadata."""
    graph = model.graph
    for item in (*graph.node, *graph.input, *graph.output, *graph.value_info):
        del item.metadata_props[:]
        item.doc_string = ""
    graph.doc_string = model.doc_string = ""


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write one self-contained file (weights inline, no external .data file)."""
    onnx.save_model(model, path, save_as_external_data=False)
