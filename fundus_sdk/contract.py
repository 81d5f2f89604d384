"""The contract between an exported model file and the runtime: tensor names and metadata keys.

The exporter (export/) writes these; the runtime (fundus_sdk.model) reads them. A model file is
one ONNX graph: input `image`, uint8 (batch, size, size, 3) RGB as produced by
`fundus_sdk.preprocess.Preprocess`; output `embedding`, float32 (batch, dim), unit L2 norm;
optionally a second output `attention`, float32 (batch, side, side): the mirror-attention map on
the last feature map's grid, each map summing to 1 (models without mirror attention lack it, and
the runtime asks a model's session which outputs it has). An ensemble (export/ensemble.py) is
such a graph too: its members run side by side on the one input.
Every metadata value is a string (ONNX metadata_props); structured values are JSON.
"""

import numpy as np

FORMAT_VERSION = "1"

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
ATTENTION_NAME = "attention"  # optional
UNIT_NORM_TOLERANCE = 1e-3  # |norm - 1| of a descriptor given as input or read back from an index

# metadata_props keys
FORMAT = "fundus_sdk.format"  # FORMAT_VERSION
NAME = "model.name"  # e.g. "fundus-mirror-lite0"
VERSION = "model.version"  # e.g. "0.1.0"
DIM = "model.dim"  # descriptor dimension, e.g. "256"
FINGERPRINT = "model.fingerprint"  # sha256 hex of the graph's weights (initializers), see export
PRECISION = "model.precision"  # "fp32" | "fp16-weights" | "fp16" | "int8"
BACKBONE = "model.backbone"  # timm name
MIRRORING = "model.mirroring"  # "feature" | "image" | "none"
ATTENTION_MASK = "model.attention_mask"  # "fov": attention only on the field of view; "none" (or absent): anywhere
INPUT_LAYOUT = "input.layout"  # "NHWC"
INPUT_DTYPE = "input.dtype"  # "uint8"
INPUT_COLOUR = "input.colour"  # "RGB"
INPUT_SIZE = "input.size"  # e.g. "256"
NORMALISE_MEAN = "normalise.mean"  # JSON list, applied inside the graph
NORMALISE_STD = "normalise.std"  # JSON list, applied inside the graph
TRAINING_DATA = "training.data"  # JSON summary of the training data
LICENCE = "training.licence"  # licence note on the weights / training data
METRICS = "evaluation.metrics"  # JSON: retrieval metrics on the held-out test split
SCALE = "labels.scale"  # the grading scale, as fundus_sdk.labels.Scale.spec writes it; absent: ICDR "0-4"
MEMBERS = "model.members"  # ensembles only (export/ensemble.py): JSON list of {name, version, fingerprint, weight}
# plus the preprocessing keys of fundus_sdk.preprocess.Preprocess.to_metadata(): "preprocess.*"

REQUIRED = (FORMAT, NAME, VERSION, DIM, FINGERPRINT, INPUT_SIZE)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Per row: finite and of unit norm (within UNIT_NORM_TOLERANCE), as the graph's output is."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.abs(np.linalg.norm(vectors.astype(np.float64), axis=1) - 1) < UNIT_NORM_TOLERANCE  # NaN, inf: False
