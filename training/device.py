"""Where training runs: the CPU, or a CUDA GPU with bf16 autocast."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when a GPU is visible, else the CPU; "cuda" insists."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU (bf16 there is slower and changes the numbers)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
