"""The paper's class-balanced cross-entropy and the soft Dice loss, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from CascadeSegLib.train.losses import (
    class_weights,
    image_class_weights,
    make_loss,
    soft_dice_loss,
    weighted_cross_entropy,
)

LOGITS = np.array([[2.0, 0.5, -1.0, 0.3, 1.0],     # class 0
                   [0.0, 1.5, 0.2, 2.0, -0.5],     # class 1
                   [-1.0, 0.1, 0.4, 0.0, 3.0]])    # class 2
TARGET = np.array([0, 0, 0, 1, 2])
WEIGHT = np.array([1, 1, 1, 1, 0])                # the last voxel is outside C


def _tensors():
    logits = torch.tensor(LOGITS, dtype=torch.float32).reshape(1, 3, 1, 1, 5)
    return logits, torch.tensor(TARGET).reshape(1, 1, 1, 5), torch.tensor(WEIGHT).reshape(1, 1, 1, 5).bool()


def _softmax():
    e = np.exp(LOGITS - LOGITS.max(0))
    return e / e.sum(0)


def test_weighted_cross_entropy_matches_hand_computation():
    logits, target, weight = _tensors()
    p = _softmax()
    # N_C = 4 voxels in C: three of class 0, one of class 1, none of class 2 (K = 3).
    lam0, lam1 = (1 - 3 / 4) / 2, (1 - 1 / 4) / 2
    expected = -(lam0 * (math.log(p[0, 0]) + math.log(p[0, 1]) + math.log(p[0, 2])) + lam1 * math.log(p[1, 3])) / 4
    got = float(weighted_cross_entropy(logits, target, weight))
    assert got == pytest.approx(expected, rel=1e-5)
    lam = class_weights(target, weight, 3)
    assert lam[0].tolist() == pytest.approx([1 / 8, 3 / 8, 1 / 2])
    assert float(lam.sum()) == pytest.approx(1.0)


def test_soft_dice_matches_hand_computation():
    logits, target, weight = _tensors()
    p = _softmax()
    w = WEIGHT.astype(float)
    dices = []
    for k in (1,):          # class 2's only voxel lies outside C: absent classes are left out
        y = (TARGET == k).astype(float)
        dices.append((2 * np.sum(p[k] * y * w) + 1.0) / (np.sum(p[k] * w) + np.sum(y * w) + 1.0))
    expected = 1.0 - np.mean(dices)
    assert float(soft_dice_loss(logits, target, weight)) == pytest.approx(expected, rel=1e-5)
    both = float(make_loss("wce+dice")(logits, target, weight))
    assert both == pytest.approx(float(weighted_cross_entropy(logits, target, weight)) + expected, rel=1e-5)


@pytest.mark.parametrize("name", ["wce", "dice", "wce+dice"])
def test_voxels_outside_candidate_region_do_not_count(name):
    loss_fn = make_loss(name)
    logits, target, weight = _tensors()
    logits.requires_grad_(True)
    loss = loss_fn(logits, target, weight)
    loss.backward()
    assert torch.all(logits.grad[..., 4] == 0)          # no gradient outside C
    changed = logits.detach().clone()
    changed[..., 4] = torch.tensor([-9.0, 9.0, 0.0])[:, None, None]
    target2 = target.clone()
    target2[..., 4] = 1
    assert float(loss_fn(changed, target2, weight)) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_perfect_prediction_has_small_loss_and_unknown_loss_is_rejected():
    target = torch.randint(0, 3, (2, 4, 4, 4))
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 4, 1, 2, 3).float() * 20
    weight = torch.ones_like(target, dtype=torch.bool)
    assert float(weighted_cross_entropy(logits, target, weight)) < 1e-6
    assert float(soft_dice_loss(logits, target, weight)) < 1e-3
    with pytest.raises(ValueError):
        make_loss("focal")


def test_image_class_balance_penalises_false_positives_in_a_background_only_sub_volume():
    """Per sub-volume, a background-only patch gets lambda_background = 0 and no loss at all;
    with the image's lambda_k (the paper) a false positive there costs lambda_0 * -log p_0."""
    target = torch.zeros((1, 1, 1, 5), dtype=torch.long)
    weight = torch.ones_like(target, dtype=torch.bool)
    logits = torch.tensor(LOGITS, dtype=torch.float32).reshape(1, 3, 1, 1, 5)
    assert float(weighted_cross_entropy(logits, target, weight)) == 0.0
    counts = torch.tensor([[90, 8, 2]])                           # the whole image inside C
    lam = image_class_weights(counts)
    assert lam[0].tolist() == pytest.approx([0.1 / 2, 0.92 / 2, 0.98 / 2])
    p0 = _softmax()[0]
    expected = lam[0, 0].item() * -np.log(p0).sum() / 5
    assert float(weighted_cross_entropy(logits, target, weight, lam)) == pytest.approx(expected, rel=1e-5)
    assert float(make_loss("wce+dice")(logits, target, weight, lam)) == pytest.approx(expected, rel=1e-5)


def test_image_class_balance_teaches_background_on_an_organ_free_image():
    """The paper's lambda_0 = 1 - |Y_0|/|Y| is 0 on an image without organs (TotalSegmentator
    s0003 in the abdomen-ct recipe): its sub-volumes would cost nothing, false positives included.
    Such an image takes the mean weights of the images with organs."""
    counts = torch.tensor([[90, 8, 2], [70, 20, 10], [50, 0, 0], [0, 0, 0]])
    lam = image_class_weights(counts)
    mean = (torch.tensor([0.1, 0.92, 0.98]) + torch.tensor([0.3, 0.8, 0.9])) / 2 / 2
    assert lam[2].tolist() == pytest.approx(mean.tolist())
    assert lam[3].tolist() == [0.0, 0.0, 0.0]                      # no voxel in C: nothing to weigh
    target = torch.zeros((1, 1, 1, 5), dtype=torch.long)
    weight = torch.ones_like(target, dtype=torch.bool)
    logits = torch.tensor(LOGITS, dtype=torch.float32).reshape(1, 3, 1, 1, 5)
    loss = float(weighted_cross_entropy(logits, target, weight, lam[2:3]))
    assert loss == pytest.approx(lam[2, 0].item() * -np.log(_softmax()[0]).sum() / 5, rel=1e-5)
    assert loss > 0
    alone = image_class_weights(torch.tensor([[50, 0, 0]]))
    assert alone[0].tolist() == pytest.approx([0.5, 0.5, 0.5])
