"""Losses: metric learning on unit descriptors (the fine triplet loss, a batch-hard baseline), the
ordinal term on the grade head, and the pull toward a teacher's descriptors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def relevant_degree(agreement: torch.Tensor, max_degree: float = 2.0) -> torch.Tensor:
    """Pairwise relevant degree from each image's view agreement, without labels.

    w_ij = max(a_i, a_j) / min(a_i, a_j), clipped to [1, max_degree]: 1 when two images' mirrored
    views agree equally, larger when their fine structure differs, so those positives pull harder.
    No gradient flows through it.
    """
    a = agreement.detach().clamp(min=1e-3)
    hi = torch.maximum(a[:, None], a[None, :])
    lo = torch.minimum(a[:, None], a[None, :])
    return (hi / lo).clamp(1.0, max_degree)


def fine_triplet_loss(
    emb: torch.Tensor,
    labels: torch.Tensor,
    degree: torch.Tensor | None = None,
    margin: float = 0.25,
    gamma: float = 32.0,
) -> torch.Tensor:
    """Per anchor i: log(1 + sum_p exp(-gamma w_p a_p (s_p - (1 - m))) * sum_n exp(gamma a_n (s_n - m))),
    averaged over the anchors that have both a positive and a negative in the batch.

    a_p = relu(1 + m - s_p) and a_n = relu(s_n + m) are self-paced weights (no gradient);
    `degree` (n, n) holds w_p; None means w_p = 1, the plain circle-style loss. Computing it per
    anchor (as circle losses usually are) spreads the gradient over every image instead of the
    few hardest pairs of the whole batch.
    """
    sim = emb @ emb.t()
    pos, neg = _pair_masks(labels)
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return emb.sum() * 0.0
    ap = F.relu(1 + margin - sim).detach()
    an = F.relu(sim + margin).detach()
    w = degree if degree is not None else 1.0
    logit_p = (-gamma * w * ap * (sim - (1 - margin))).masked_fill(~pos, float("-inf"))
    logit_n = (gamma * an * (sim - margin)).masked_fill(~neg, float("-inf"))
    per_anchor = F.softplus(torch.logsumexp(logit_p, 1) + torch.logsumexp(logit_n, 1))
    return per_anchor[valid].mean()


def batch_hard_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """For each anchor: hardest positive and hardest negative by cosine distance, hinge at margin."""
    dist = 1 - emb @ emb.t()
    pos, neg = _pair_masks(labels)
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return emb.sum() * 0.0
    hardest_pos = dist.masked_fill(~pos, -1.0).max(1).values
    hardest_neg = dist.masked_fill(~neg, 4.0).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()


def ordinal_loss(logits: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    """Expected grade under the grade head's softmax against the true grade (smooth L1).

    Cross-entropy treats every wrong grade alike; this term costs more the further the
    probability mass sits from the true grade, so 0 and 4 are pushed further apart than 1 and 2.
    """
    expected = torch.softmax(logits.float(), dim=1) @ torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
    return F.smooth_l1_loss(expected, grades.float())


def teacher_loss(emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine of each unit descriptor with a frozen teacher's for the same view, averaged.

    Fine-tuning under a changed constraint (the field-of-view mask moves what the attention
    pools) drifts the descriptor away from what made the teacher retrieve well; this pulls it
    back toward the teacher's space while the other terms learn the new data.
    """
    return (1.0 - (emb * target).sum(1)).mean()


LOSSES = ("fine", "circle", "batch-hard")


def metric_loss(name: str, emb: torch.Tensor, labels: torch.Tensor, agreement: torch.Tensor | None) -> torch.Tensor:
    """The named loss: "fine" (degree from view agreement), "circle" (degree 1), "batch-hard"."""
    if name == "fine":
        return fine_triplet_loss(emb, labels, relevant_degree(agreement) if agreement is not None else None)
    if name == "circle":
        return fine_triplet_loss(emb, labels)
    if name == "batch-hard":
        return batch_hard_triplet_loss(emb, labels)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
