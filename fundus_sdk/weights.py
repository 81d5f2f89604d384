"""The fingerprints of a model file, computed from the file itself (no onnx package).

An index trusts a model by its fingerprint, so the runtime must not take the metadata's word for
it: a model whose weights were changed but whose metadata was copied would otherwise pass. This
reads the ONNX protobuf just far enough to reach the graph's initializers (the weights) and
hashes them exactly as the exporter does (export/metadata.py `fingerprint`): each initializer,
sorted by name, contributes JSON [name, ONNX data type, dims], a newline, its byte length (8
bytes, little-endian) and its values as little-endian bytes; then the `preprocess.*` metadata
entries contribute their JSON.

The weights alone do not fix what a model computes: the same weights under other operators (every
Clip made a Relu) or another input-gate calibration give other vectors or verdicts. `fingerprints`
also returns the model's whole identity: the weights' fingerprint, then the graph's inputs, its
descriptor output and the nodes that compute it, and the opset imports, as stored, then every
metadata entry that changes results (RESULT_KEYS). Indexes record that one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

# ONNX TensorProto data types -> numpy dtypes (little-endian), for values not in raw_data
DTYPES = {1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2", 11: "<f8",
          12: "<u4", 13: "<u8", 16: "<u2"}  # fmt: skip


class WeightsError(ValueError):
    """The file is not an ONNX model this reader understands (external data, strings, damage)."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise WeightsError("truncated protobuf")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise WeightsError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _varints(chunk: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(chunk):
        value, pos = _varint(chunk, pos)
        out.append(value)
    return out


def _tensor(buf: memoryview) -> tuple[str, int, list[int], bytes]:
    """(name, data type, dims, values as little-endian bytes) of one TensorProto."""
    name, dtype, dims, raw = "", 0, [], None
    numbers: list[int] = []  # int32_data, int64_data, uint64_data (varints)
    packed: list[bytes] = []  # float_data, double_data (fixed width)
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _varints(value) if wire == 2 else [value]
        elif number == 2:
            dtype = value
        elif number == 8:
            name = bytes(value).decode()
        elif number == 9:
            raw = bytes(value)
        elif number in (5, 7, 11):
            numbers += _varints(value) if wire == 2 else [value]
        elif number in (4, 10):
            packed.append(bytes(value))
        elif number in (6, 13) or (number == 14 and value == 1):
            raise WeightsError(f"initializer {name or '?'} holds strings or external data")
    if raw is not None:
        return name, dtype, dims, raw
    if dtype not in DTYPES:
        raise WeightsError(f"initializer {name} has ONNX data type {dtype}")
    if packed:
        return name, dtype, dims, b"".join(packed)
    signed = np.array([n - (1 << 64) if n >= 1 << 63 else n for n in numbers], dtype=np.int64)
    if dtype in (10, 16):  # float16 / bfloat16 bits stored in int32_data
        return name, dtype, dims, signed.astype("<u2").tobytes()
    return name, dtype, dims, signed.astype(DTYPES[dtype]).tobytes()


# Metadata entries (by prefix) that change what a model file computes or decides.
RESULT_KEYS = ("preprocess.", "input.", "normalise.", "labels.", "gate.")
GRAPH_NODE, GRAPH_INPUT, GRAPH_OUTPUT = 1, 11, 12  # GraphProto fields (NodeProto: 1 input, 2 output names)
OPSET_FIELD = 8  # ModelProto: opset_import
EMBEDDING = "embedding"  # the descriptor output (fundus_sdk.contract.OUTPUT_NAME)


def fingerprints(path: str | Path, metadata: Mapping[str, str]) -> tuple[str, str]:
    """(weights, whole) sha256 hex digests of a model file: its initializers and preprocessing
    metadata (as the exporter's `model.fingerprint`), and that with the graph and every metadata
    entry of RESULT_KEYS (the model's identity)."""
    data = memoryview(Path(path).read_bytes())
    top = list(_fields(data))
    graph = next((v for n, w, v in top if n == 7 and w == 2), None)
    if graph is None:
        raise WeightsError("no graph in the file")
    fields = list(_fields(graph))
    tensors = sorted((_tensor(v) for n, w, v in fields if n == 5 and w == 2), key=lambda t: t[0])
    h = hashlib.sha256()
    for name, dtype, dims, values in tensors:
        h.update(json.dumps([name, dtype, dims]).encode() + b"\n")
        h.update(len(values).to_bytes(8, "little") + values)
    h.update(json.dumps(sorted((k, v) for k, v in metadata.items() if k.startswith("preprocess."))).encode())
    weights = h.hexdigest()
    whole = hashlib.sha256(weights.encode())
    parts = [*descriptor_graph(fields), *(bytes(v) for n, w, v in top if n == OPSET_FIELD and w == 2)]
    for raw in parts:
        whole.update(len(raw).to_bytes(8, "little") + raw)
    whole.update(json.dumps(sorted((k, v) for k, v in metadata.items() if k.startswith(RESULT_KEYS))).encode())
    return weights, whole.hexdigest()


def _strings(buf: memoryview, number: int) -> list[str]:
    return [bytes(v).decode() for n, w, v in _fields(buf) if n == number and w == 2]


def descriptor_graph(fields: list[tuple[int, int, int | memoryview]]) -> list[bytes]:
    """The stored bytes of what computes the descriptor: the graph's inputs, its `embedding` output
    and every node it depends on, in graph order. The attention map's nodes and output are left
    out: they change the heatmap, never a vector (`python -m export.explain` adds them)."""
    nodes = [v for n, w, v in fields if n == GRAPH_NODE and w == 2]
    outputs = [v for n, w, v in fields if n == GRAPH_OUTPUT and w == 2]
    wanted = {name for out in outputs for name in _strings(out, 1) if name == EMBEDDING}
    needed = [False] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):  # a node comes after what it reads (ONNX keeps graphs sorted)
        if wanted & set(_strings(nodes[i], 2)):
            needed[i] = True
            wanted |= set(_strings(nodes[i], 1))
    inputs = [bytes(v) for n, w, v in fields if n == GRAPH_INPUT and w == 2]
    chosen = [bytes(out) for out in outputs if EMBEDDING in _strings(out, 1)]
    return inputs + chosen + [bytes(node) for node, keep in zip(nodes, needed) if keep]
