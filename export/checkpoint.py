"""Reading a training checkpoint and rebuilding the module that goes into the ONNX graph.

A checkpoint is what training/train.py writes: a dict with "model" (state dict), "model_config"
(ModelConfig fields), "train_config" (with "preprocess"), "data" (training data summary) and,
after a finished run, "test" (retrieval metrics on the held-out split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from fundus_sdk.preprocess import Preprocess
from training.model import ExportModule, FundusNet, ModelConfig


class ExportError(Exception):
    """A checkpoint cannot be exported, or the exported file failed verification.

    The message names the file and the reason on one line (the CLI prints it as is).
    """


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state: dict
    config: ModelConfig
    preprocess: Preprocess  # the training run's parameters at the model's input size

    @property
    def train_config(self) -> dict:
        return self.state.get("train_config") or {}

    def module(self) -> ExportModule:
        """The trained network in eval mode, wrapped to take uint8 NHWC images."""
        try:
            net = FundusNet(self.config, pretrained=False)
            net.load_state_dict(self.state["model"])
        except (RuntimeError, ValueError) as exc:
            raise ExportError(f"{self.path}: weights do not fit {self.config.backbone} ({one_line(exc)})") from exc
        return ExportModule(net).eval()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint (tensors only, weights_only=True) and check it describes a FundusNet."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/foreign files
        raise ExportError(f"{path}: not a readable torch checkpoint ({one_line(exc)})") from exc
    missing = [k for k in ("model", "model_config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ExportError(f"{path}: not a fundus-sdk training checkpoint (missing {', '.join(missing)})")
    try:
        config = ModelConfig(**state["model_config"])
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{path}: invalid model_config ({one_line(exc)})") from exc
    if not timm.is_model(config.backbone):
        raise ExportError(f"{path}: unknown timm backbone {config.backbone!r} in model_config")
    params = dict((state.get("train_config") or {}).get("preprocess") or {})
    if params and "recipe" not in params:  # runs from before recipe v3 recorded `equalise`
        params["recipe"] = 2 if params.pop("equalise", False) else 1
    try:
        preprocess = Preprocess(**(params | {"size": config.input_size}))
    except TypeError as exc:
        raise ExportError(f"{path}: invalid train_config preprocess ({one_line(exc)})") from exc
    return Checkpoint(path, state, config, preprocess)
