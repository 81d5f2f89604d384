"""Training checkpoints: the one place they are written and read.

A checkpoint is a dict with "model" (state dict), "model_config" (ModelConfig fields),
"train_config" (TrainConfig fields, with "preprocess"), "data" (training data summary), "epoch",
"validation", "best_score", "history" and, after a finished run, "test" (retrieval metrics on
the held-out split) and "train_seconds". `last.pt` also holds the optimiser and scheduler.
Trained on several sources, "validation" and "test" hold a report per source, by source name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from fundus_sdk.atomic import write_atomically
from fundus_sdk.errors import one_line
from fundus_sdk.labels import ICDR, Scale
from fundus_sdk.preprocess import Preprocess

from .model import ExportModule, FundusNet, ModelConfig


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable or not a fundus-sdk training checkpoint.

    The message names the file and the reason on one line (the command lines print it as is).
    """


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state: dict
    config: ModelConfig
    preprocess: Preprocess  # the training run's parameters at the model's input size

    @property
    def train_config(self) -> dict:
        return self.state.get("train_config") or {}

    @property
    def scale(self) -> Scale:
        """The grading scale the run was trained on (runs from before scales were recorded: ICDR)."""
        return Scale.parse(self.train_config.get("labels", ICDR.spec))

    def load_weights_into(self, net: FundusNet) -> Path:
        """Copy this checkpoint's weights into `net` (same architecture); returns the path.

        A grade head sized for another scale (fine-tuning on a hospital's own grading) is left
        as `net` initialised it; every other weight must fit.
        """
        state = dict(self.state["model"])
        own = net.state_dict()
        for name in [k for k in state if k.startswith("classifier.") and k in own and own[k].shape != state[k].shape]:
            state[name] = own[name]
        try:
            net.load_state_dict(state)
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: weights do not fit {net.config.backbone} ({one_line(exc)})") from exc
        return self.path

    def network(self) -> FundusNet:
        """The trained network in eval mode."""
        net = FundusNet(self.config, pretrained=False)
        self.load_weights_into(net)
        return net.eval()

    def module(self) -> ExportModule:
        """The trained network in eval mode, wrapped to take uint8 NHWC images."""
        return ExportModule(self.network()).eval()


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` to `path` atomically (aside, then renamed), so a kill never leaves half a file."""
    with write_atomically(path, durable=False) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint (tensors only, weights_only=True) and check it describes a FundusNet."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/foreign files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({one_line(exc)})") from exc
    missing = [k for k in ("model", "model_config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a fundus-sdk training checkpoint (missing {', '.join(missing)})")
    try:
        config = ModelConfig(**state["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model_config ({one_line(exc)})") from exc
    if not timm.is_model(config.backbone):
        raise CheckpointError(f"{path}: unknown timm backbone {config.backbone!r} in model_config")
    params = dict((state.get("train_config") or {}).get("preprocess") or {})
    if params and "recipe" not in params:  # runs from before recipe v3 recorded `equalise`
        params["recipe"] = 2 if params.pop("equalise", False) else 1
    try:
        preprocess = Preprocess(**(params | {"size": config.input_size}))
    except TypeError as exc:
        raise CheckpointError(f"{path}: invalid train_config preprocess ({one_line(exc)})") from exc
    return Checkpoint(path, state, config, preprocess)
