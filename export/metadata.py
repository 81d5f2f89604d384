"""The metadata an exported file carries (keys: fundus_sdk/contract.py) and its weight fingerprint.

The runtime reads these with onnxruntime (`get_modelmeta().custom_metadata_map`); this module
only writes them, and reads them back for reports and tests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from fundus_sdk import contract
from training.checkpoint import Checkpoint
from training.weights import OFFLINE_WEIGHTS

EYEPACS_TERMS = (
    "Trained on EyePACS fundus photographs (Kaggle 2015 Diabetic Retinopathy Detection), "
    "used under the Kaggle competition rules: non-commercial research and education only."
)
IDRID_TERMS = (
    "Trained on IDRiD photographs (c) P. Porwal, S. Pachade and M. Kokare, CC BY 4.0 (P. Porwal et al., "
    "\"Indian Diabetic Retinopathy Image Dataset (IDRiD)\", Data 3(3):25, 2018)."
)


def fingerprint(model: onnx.ModelProto, metadata: Mapping[str, str]) -> str:
    """sha256 hex over the graph's initializers, sorted by name, then the preprocessing entries
    (`preprocess.*`) of `metadata`, sorted by key.

    Each initializer contributes JSON [name, ONNX data type, dims], a newline, the byte length
    (8 bytes, little-endian) and its values as little-endian bytes, whatever field they are
    stored in; the preprocessing entries then contribute their JSON. Any change of weights,
    precision, quantisation or preprocessing (the same weights fed differently give other
    vectors) changes the fingerprint, so case indexes refuse the mix.
    """
    h = hashlib.sha256()
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        data = np.ascontiguousarray(numpy_helper.to_array(t)).tobytes()
        h.update(json.dumps([t.name, t.data_type, list(t.dims)]).encode() + b"\n")
        h.update(len(data).to_bytes(8, "little") + data)
    h.update(json.dumps(sorted((k, v) for k, v in metadata.items() if k.startswith("preprocess."))).encode())
    return h.hexdigest()


def licence_note(ckpt: Checkpoint) -> str:
    """Where the weights come from and under which terms, from the checkpoint's records."""
    source = str((ckpt.state.get("data") or {}).get("source") or ckpt.train_config.get("data") or "")
    known = [terms for name, terms in (("eyepacs", EYEPACS_TERMS), ("idrid", IDRID_TERMS)) if name in source.lower()]
    note = " ".join(known) or f"Trained on {source or 'unrecorded data'}; the weights carry that data's licence terms."
    if ckpt.train_config.get("pretrained", True) and ckpt.config.backbone in OFFLINE_WEIGHTS:
        package = OFFLINE_WEIGHTS[ckpt.config.backbone][0]
        note += (
            f" Backbone initialised from the Apache-2.0 ImageNet weights of {ckpt.config.backbone}"
            f" (PyPI {package})."
        )
    return note


def build_metadata(ckpt: Checkpoint, *, name: str, version: str, precision: str) -> dict[str, str]:
    """All contract keys except the fingerprint, which depends on the final graph."""
    cfg = ckpt.config
    return {
        contract.FORMAT: contract.FORMAT_VERSION,
        contract.NAME: name,
        contract.VERSION: version,
        contract.DIM: str(cfg.dim),
        contract.PRECISION: precision,
        contract.BACKBONE: cfg.backbone,
        contract.MIRRORING: cfg.mirroring,
        contract.ATTENTION_MASK: cfg.attention_mask,
        contract.INPUT_LAYOUT: "NHWC",
        contract.INPUT_DTYPE: "uint8",
        contract.INPUT_COLOUR: "RGB",
        contract.INPUT_SIZE: str(cfg.input_size),
        contract.NORMALISE_MEAN: json.dumps(list(cfg.mean)),
        contract.NORMALISE_STD: json.dumps(list(cfg.std)),
        **ckpt.preprocess.to_metadata(),
        contract.TRAINING_DATA: json.dumps(ckpt.state.get("data") or {}, sort_keys=True),
        contract.LICENCE: licence_note(ckpt),
        contract.METRICS: json.dumps(ckpt.state.get("test") or {}, sort_keys=True),
        contract.SCALE: ckpt.scale.spec,
    }


def write_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Replace the model's metadata_props with `meta`."""
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file, as a dict."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}
