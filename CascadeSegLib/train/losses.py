"""Losses of docs/method.md section 4, all restricted to the candidate region C.

`weight` is a (N, z, y, x) mask of C: voxels outside C count for nothing, as in the original
Caffe code (per-voxel weight map, ignore label 255). Every loss works on a batch of sub-volumes
with per-sample class balance (the paper computes lambda_k per training image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("wce", "dice", "wce+dice", "ce", "ce+dice")


def class_weights(target: torch.Tensor, weight: torch.Tensor, num_classes: int) -> torch.Tensor:
    """lambda_k = (1 - N_k / N_C) / (K - 1) per sample: (N, K); rows sum to 1 when N_C > 0."""
    n = target.shape[0]
    onehot_counts = torch.zeros((n, num_classes), dtype=torch.float32, device=target.device)
    w = weight.reshape(n, -1).float()
    onehot_counts.scatter_add_(1, target.reshape(n, -1).long(), w)
    n_c = w.sum(1, keepdim=True)
    frac = onehot_counts / n_c.clamp_min(1.0)
    lam = (1.0 - frac) / max(1, num_classes - 1)
    return torch.where(n_c > 0, lam, torch.zeros_like(lam))


def image_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """lambda_k from a whole image's class counts inside C, (N, K) -> (N, K), as in the paper.

    Computed per sub-volume instead (`class_weights`), a sub-volume of background alone gives
    background the weight 0: nothing is then learned against false positives far from organs.
    An image with no organ in C at all (a negative case) would weigh background 0 too and teach
    nothing; it gets the mean lambda_k of the images that have organs instead (1/(K-1) for every
    class if none has), so a voxel there costs what a background voxel costs elsewhere.
    """
    counts = counts.float()
    k = counts.shape[1]
    n_c = counts.sum(1, keepdim=True)
    lam = (1.0 - counts / n_c.clamp_min(1.0)) / max(1, k - 1)
    lam = torch.where(n_c > 0, lam, torch.zeros_like(lam))
    negative = (n_c[:, 0] > 0) & (counts[:, 1:].sum(1) == 0)
    with_organs = (n_c[:, 0] > 0) & ~negative
    if bool(negative.any()):
        fill = lam[with_organs].mean(0) if bool(with_organs.any()) else torch.full((k,), 1.0 / max(1, k - 1))
        lam[negative] = fill
    return lam


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                           lam: torch.Tensor | None = None) -> torch.Tensor:
    """Roth et al.'s class-balanced cross-entropy over C.

    L = -(1/N_C) sum_k lambda_k sum_{x in S_k} log p_k(x), averaged over the samples of the batch
    that have any voxel in C. `lam` (N, K) gives each sample its image's weights
    (`image_class_weights`); without it they are computed on the sub-volume.
    """
    n, k = logits.shape[:2]
    target = target.long()
    w = weight.float()
    if lam is None:
        lam = class_weights(target, w, k)                               # (N, K)
    lam = lam.to(logits.device, torch.float32)
    logp = F.log_softmax(logits.float(), dim=1)
    logp_true = logp.gather(1, target[:, None]).squeeze(1)              # (N, z, y, x)
    voxel_w = lam.gather(1, target.reshape(n, -1)).reshape(target.shape) * w
    n_c = w.reshape(n, -1).sum(1)
    per_sample = -(voxel_w * logp_true).reshape(n, -1).sum(1) / n_c.clamp_min(1.0)
    valid = n_c > 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return per_sample[valid].mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                   lam: torch.Tensor | None = None, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over foreground classes present in C of 2 sum(p y) / (sum p + sum y).

    Sums run over the whole batch inside C (batch Dice). Background is left out (it would
    dominate), and so are classes absent from the batch: with small sub-volumes most organs
    are absent, their Dice would be a constant near 0 with no gradient and would only dilute
    the present ones (false positives of absent classes are still penalised by the
    cross-entropy). `smooth` avoids 0/0.
    """
    k = logits.shape[1]
    p = torch.softmax(logits.float(), dim=1)
    w = weight.float()[:, None]
    y = F.one_hot(target.long(), k).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    inter = (p * y * w).sum(dims)
    ysum = (y * w).sum(dims)
    denom = (p * w).sum(dims) + ysum
    dice = (2.0 * inter + smooth) / (denom + smooth)
    present = ysum[1:] > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    return 1.0 - dice[1:][present].mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                  lam: torch.Tensor | None = None) -> torch.Tensor:
    """Unweighted cross-entropy over C (nnU-Net's choice, paired with Dice), for comparison; no `lam`."""
    w = weight.float()
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return (ce * w).sum() / w.sum().clamp_min(1.0)


def make_loss(name: str):
    """The loss function selected in the config: 'wce', 'dice' or 'wce+dice'."""
    if name == "wce":
        return weighted_cross_entropy
    if name == "dice":
        return soft_dice_loss
    if name == "wce+dice":
        return lambda lo, t, w, lam=None: weighted_cross_entropy(lo, t, w, lam) + soft_dice_loss(lo, t, w)
    if name == "ce":
        return cross_entropy
    if name == "ce+dice":
        return lambda lo, t, w, lam=None: cross_entropy(lo, t, w) + soft_dice_loss(lo, t, w)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
