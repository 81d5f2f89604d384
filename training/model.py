"""The mirror-attention retrieval network (see ../shared/docs/METHOD.md).

FundusNet = timm CNN backbone (last feature map) -> mirror attention over a horizontal and a
vertical mirrored view -> GeM per view -> concatenate -> linear projection -> L2-normalise.
`mirroring` selects how the mirrored views are made:
- "feature": flip the backbone's feature map (one backbone pass, the default);
- "image":   run the backbone on the flipped images (three passes, as in the paper);
- "none":    no attention, backbone + GeM + projection (the ablation baseline).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

MIRRORING = ("feature", "image", "none")
ATTENTION_MASKS = ("none", "fov")
SURROUND = 128  # the preprocessed surround's value in every channel (fundus_sdk.preprocess, step 6)
MASKED = -1e4  # attention logit bias of a masked key position: its softmax share is exp(-1e4) = 0


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"
    dim: int = 256
    mirroring: str = "feature"
    reduction: int = 2
    input_size: int = 384  # the 256 px photos upsampled: lesions get more feature-map cells
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    frozen_blocks: int = 4  # stem + this many block groups are frozen (and cacheable)
    num_classes: int = 5  # auxiliary grade head (training only; not exported)
    attention_mask: str = "none"  # "fov": the attention attends only to cells wholly inside the field of view

    def __post_init__(self) -> None:
        if self.mirroring not in MIRRORING:
            raise ValueError(f"mirroring must be one of {MIRRORING}, got {self.mirroring!r}")
        if self.attention_mask not in ATTENTION_MASKS:
            raise ValueError(f"attention mask must be one of {ATTENTION_MASKS}, got {self.attention_mask!r}")
        if self.attention_mask == "fov" and self.frozen_blocks:
            raise ValueError("the field-of-view attention mask is found in the input pixels: it needs frozen_blocks=0")
        if not 1 <= self.dim <= 512:
            raise ValueError(f"descriptor dimension must be 1..512, got {self.dim}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    def to_dict(self) -> dict:
        return asdict(self)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MirrorAttention(nn.Module):
    """Each position of a mirrored view attends over all positions of the original map.

    For view m in (h, v): q = theta_m(F_m), k = phi(A), v = g_m(A), S = softmax(q^T k / sqrt(d)),
    Y_m = A + W_m(v S^T). W_m is zero-initialised, so the block starts as the identity.
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        d = channels // reduction
        self.scale = 1.0 / math.sqrt(d)
        self.key = conv_bn_relu(channels, d)
        self.query = nn.ModuleDict({m: conv_bn_relu(channels, d) for m in "hv"})
        self.value = nn.ModuleDict({m: nn.Conv2d(channels, d, 1) for m in "hv"})
        self.out = nn.ModuleDict({m: nn.Conv2d(d, channels, 1) for m in "hv"})
        for conv in self.out.values():
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def maps(self, a: torch.Tensor, views: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """S_m per view: (B, N, N), row i = where mirrored position i looks in the original map.
        `bias` (B, 1, N) is added to the logits: MASKED where a key position may not be attended to."""
        key = self.key(a).flatten(2)  # B, d, N
        maps = {}
        for m in "hv":
            logits = self.query[m](views[m]).flatten(2).transpose(1, 2) @ key * self.scale
            maps[m] = torch.softmax(logits if bias is None else logits + bias, dim=-1)
        return maps

    def forward(self, a: torch.Tensor, views: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> list[torch.Tensor]:
        b, c, h, w = a.shape
        outputs = []
        for m, attn in self.maps(a, views, bias).items():
            value = self.value[m](a).flatten(2)  # B, d, N
            agg = (value @ attn.transpose(1, 2)).reshape(b, -1, h, w)
            outputs.append(a + self.out[m](agg))
        return outputs

    def received(self, a: torch.Tensor, views: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, w): the share of the attention each original position receives, averaged over
        the mirrored positions and the two views (each map sums to 1). The runtime shows it as
        the heatmap of where the descriptor's evidence came from; export/attention.py builds the
        same quantity inside the ONNX graph."""
        b, _, h, w = a.shape
        maps = self.maps(a, views, bias)
        return ((maps["h"].mean(dim=1) + maps["v"].mean(dim=1)) * 0.5).reshape(b, h, w)


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent p (starts at 3)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class FundusNet(nn.Module):
    """Normalised float images (B, 3, H, W) -> unit-norm descriptors (B, dim)."""

    def __init__(self, config: ModelConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.backbone = timm.create_model(config.backbone, features_only=True, out_indices=(-1,), pretrained=False)
        if config.frozen_blocks and not all(hasattr(self.backbone, n) for n in ("conv_stem", "bn1", "blocks")):
            raise ValueError(
                f"{config.backbone}: freezing block groups needs an EfficientNet/MobileNet-style "
                "backbone (conv_stem, bn1, blocks); use frozen_blocks=0 for this one"
            )
        if pretrained:
            from .weights import load_imagenet

            load_imagenet(self.backbone, config.backbone)
        channels = self.backbone.feature_info.channels()[-1]
        self.attention = MirrorAttention(channels, config.reduction) if config.mirroring != "none" else None
        self.pool = GeM()
        pooled = channels * (2 if self.attention is not None else 1)
        self.proj = nn.Linear(pooled, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_classes) if config.num_classes else None
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB, as the runtime passes it -> the float input of `forward`."""
        x = images_uint8_nhwc.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen first part of the backbone (identity when nothing is frozen)."""
        k = self.config.frozen_blocks
        if k == 0:
            return x
        bb = self.backbone
        x = bb.bn1(bb.conv_stem(x))
        for block in bb.blocks[:k]:
            x = block(x)
        return x

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """The trainable rest of the backbone: trunk output -> last feature map."""
        k = self.config.frozen_blocks
        if k == 0:
            return self.backbone(h)[-1]
        for block in self.backbone.blocks[k:]:
            h = block(h)
        return h

    def pool_trunk(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Trunk output -> (pooled features before the projection, agreement of the two views or None).

        Image mirroring flips the trunk output and runs the trainable tail on each view (with
        nothing frozen that is exactly flipping the image); feature mirroring flips the tail's
        output. The agreement (cosine of the two pooled views) feeds the fine triplet loss.
        """
        a, views = self.views(h)
        if self.attention is None:
            return self.pool(a), None
        ph, pv = (self.pool(y) for y in self.attention(a, views, self.key_bias(h, a)))
        return torch.cat([ph, pv], dim=1), F.cosine_similarity(ph, pv, dim=1)

    def views(self, h: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Trunk output -> (last feature map A, its mirrored views {"h": F_h, "v": F_v})."""
        if self.config.mirroring == "image":
            a, fh, fv = self.tail(torch.cat([h, h.flip(3), h.flip(2)], dim=0)).chunk(3, dim=0)
        else:
            a = self.tail(h)
            fh, fv = a.flip(3), a.flip(2)
        return a, {"h": fh, "v": fv}

    def key_bias(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, N) attention-logit bias for the feature map `a` of the normalised images `x`:
        0 at cells wholly inside the field of view, MASKED elsewhere (None without a mask).

        Preprocessing sets the surround to SURROUND in every channel. The pixels holding that
        value, opened by a 3x3 square (a lone mid-grey pixel inside the field is not surround),
        are the surround, and a cell holding any of it is masked. The same arithmetic is exported
        into the ONNX graph, so the runtime's maps are masked alike.
        """
        if self.config.attention_mask == "none":
            return None
        grey = (SURROUND / 255.0 - self.mean) / self.std  # the surround, normalised
        step = 0.5 / 255.0 / self.std  # half a grey level, normalised
        surround = ((x - grey).abs() / step).amax(dim=1, keepdim=True).lt(1).float()
        surround = -F.max_pool2d(-surround, 3, stride=1, padding=1)  # open (erode, then dilate): a lone
        surround = F.max_pool2d(surround, 3, stride=1, padding=1)  # mid-grey pixel goes, the rim stays
        cell = (x.shape[-2] // a.shape[-2], x.shape[-1] // a.shape[-1])
        touched = F.max_pool2d(surround, cell, stride=cell)  # (B, 1, h, w): 1 where a cell holds surround
        return (touched * MASKED).flatten(2)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> (B, h, w) mirror-attention map (MirrorAttention.received)."""
        if self.attention is None:
            raise ValueError("a model without mirror attention has no attention map")
        h = self.trunk(x)
        a, views = self.views(h)
        return self.attention.received(a, views, self.key_bias(h, a))

    def embed_trunk(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Trunk output -> (unit descriptors, per-image agreement of the two views or None)."""
        pooled, agreement = self.pool_trunk(h)
        return F.normalize(self.proj(pooled), dim=1), agreement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_trunk(self.trunk(x))[0]

    def freeze_trunk(self) -> None:
        """Freeze the trunk's parameters (its BatchNorms stay in eval mode, see `train`)."""
        for p in self.trunk_parameters():
            p.requires_grad_(False)

    def trunk_parameters(self) -> list[nn.Parameter]:
        k = self.config.frozen_blocks
        if k == 0:
            return []
        bb = self.backbone
        mods = [bb.conv_stem, bb.bn1, *bb.blocks[:k]]
        return [p for m in mods for p in m.parameters()]

    def train(self, mode: bool = True) -> "FundusNet":
        super().train(mode)
        k = self.config.frozen_blocks
        if mode and k:
            bb = self.backbone
            for m in (bb.conv_stem, bb.bn1, *bb.blocks[:k]):
                m.eval()
        return self


class ExportModule(nn.Module):
    """What the ONNX graph holds: uint8 NHWC RGB in, unit-norm descriptor out."""

    def __init__(self, net: FundusNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(self.net.normalise(image))

    def attention_map(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC RGB -> (B, h, w) mirror-attention map, the graph's optional second output."""
        return self.net.attention_map(self.net.normalise(image))
