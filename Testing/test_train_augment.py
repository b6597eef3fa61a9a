"""Augmentation moves labels with the image exactly and never mirrors left and right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from CascadeSegLib.train.augment import AugmentConfig, augment_intensity, extract, random_spatial

STRONG = AugmentConfig(elastic_max=4.0, elastic_grid=32, rotation_deg=5.0, translation_vox=20.0, scale=0.15,
                       extra_prob=1.0, contrast=0.25, gamma=0.3, noise_std=0.03, blur_sigma=1.0, lowres=1.0)


def _blocks(shape=(40, 44, 48)) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return ((z // 8 + 2 * (y // 8) + 3 * (x // 8)) % 6).astype(np.uint8)


def test_labels_stay_aligned_with_image():
    label = _blocks()
    image = label.astype(np.float32) * 100.0          # intensities encode the labels
    cmask = np.ones(label.shape, bool)
    gen = torch.Generator().manual_seed(3)
    patch = (24, 32, 32)
    for _ in range(5):
        params = random_spatial(STRONG, patch, gen)
        centre = (20, 22, 24)
        img_n, lab, c = extract(image, label, cmask, centre, patch, params, pad_value=-1.0, image_mode="nearest")
        inside = c.numpy()
        # Nearest sampling of the image gives exactly the moved label map (inside the volume).
        assert np.array_equal(img_n[0].numpy()[inside], lab.numpy()[inside] * 100.0)
        assert np.all(img_n[0].numpy()[~inside] == -1.0) and np.all(lab.numpy()[~inside] == 0)
        # Trilinear sampling agrees except where its 2x2x2 stencil straddles a block edge
        # (about 1 voxel in 8 per axis for blocks of 8).
        img_l, lab2, _ = extract(image, label, cmask, centre, patch, params, pad_value=-1.0)
        assert torch.equal(lab, lab2)
        agree = np.abs(img_l[0].numpy() - lab.numpy() * 100.0)[inside] < 1.0
        assert agree.mean() > 1 - 3 / 8 - 0.05
        assert lab.unique().numel() > 3                 # the patch really shows several labels


def test_identity_transform_is_an_exact_crop_with_padding():
    label = _blocks()
    image = np.random.default_rng(0).normal(size=label.shape).astype(np.float32)
    cmask = label > 2
    params = random_spatial(AugmentConfig.off(), (16, 16, 16), torch.Generator())
    img, lab, c = extract(image, label, cmask, (4, 30, 40), (16, 16, 16), params, pad_value=-7.0)
    # Offsets run from -8 to +7: z 4-8 < 0 is padding, x 40+7 = 47 is the last voxel.
    assert np.allclose(img[0, 4:].numpy(), image[0:12, 22:38, 32:48], atol=1e-6)
    assert np.array_equal(lab[4:].numpy(), label[0:12, 22:38, 32:48])
    assert np.array_equal(c[4:].numpy(), cmask[0:12, 22:38, 32:48])
    assert np.allclose(img[0, :4].numpy(), -7.0, atol=1e-4) and not c[:4].any() and not lab[:4].any()


def test_no_mirroring_and_bounded_transforms():
    gen = torch.Generator().manual_seed(0)
    ramp = np.broadcast_to(np.arange(64, dtype=np.float32), (48, 56, 64)).copy()   # grows along x
    label = np.zeros(ramp.shape, np.uint8)
    for _ in range(20):
        params = random_spatial(STRONG, (16, 16, 16), gen)
        m = params.matrix.numpy()
        assert np.linalg.det(m) > 0                              # a rotation times a zoom, never a reflection
        assert 0.85 - 1e-6 <= abs(np.linalg.det(m)) ** (1 / 3) <= 1.15 + 1e-6
        assert max(abs(s) for s in params.shift) <= 20
        assert float(params.elastic.abs().max()) <= 4.0
        img, _, _ = extract(ramp, label, label == 0, (24, 28, 32), (16, 16, 16), params, pad_value=0.0)
        assert float((img[0, :, :, -1] - img[0, :, :, 0]).mean()) > 0     # left stays left


def test_intensity_augmentation_is_random_but_repeatable():
    x = torch.linspace(0, 1, 16 ** 3).reshape(1, 16, 16, 16)
    a = augment_intensity(x.clone(), STRONG, torch.Generator().manual_seed(5), (0.0, 1.0))
    b = augment_intensity(x.clone(), STRONG, torch.Generator().manual_seed(5), (0.0, 1.0))
    c = augment_intensity(x.clone(), STRONG, torch.Generator().manual_seed(6), (0.0, 1.0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert torch.equal(augment_intensity(x.clone(), AugmentConfig.off(), torch.Generator(), (0.0, 1.0)), x)


def test_unknown_augmentation_setting_is_rejected():
    with pytest.raises(ValueError, match="mirror"):
        AugmentConfig.from_json({"mirror": True})
