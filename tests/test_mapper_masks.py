"""The training mapper's mask path (issue 15): decoding only what lands in the LSJ crop gives
exactly the masks, boxes and kept instances of decode-everything-then-transform."""

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BitMasks

from unsam.data.mapper import (
    build_lsj_augmentation,
    decode_segmentation,
    decode_transformed_masks,
    rle_columns,
    transform_masks,
)
from unsam.io.sa1b import mask_to_rle


def _masks(rng, h, w):
    masks = np.zeros((7, h, w), bool)
    for k in range(2, 7):  # rectangles anywhere, some at the borders
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        masks[k, y0 : y0 + rng.integers(1, h), x0 : x0 + rng.integers(1, w)] = True
    masks[0] = rng.random((h, w)) < 0.3  # noise: every pixel decides
    masks[-1, :, -1] = True  # the last column only
    return masks  # masks[1] stays empty


@pytest.mark.parametrize("seed", range(4))
def test_crop_aware_decoding_equals_decode_then_transform(seed):
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # detectron2's augmentations draw from numpy's global generator
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(24, 300, 2))
        masks = _masks(rng, h, w)
        segs = [mask_to_rle(m) for m in masks]
        segs[2] = {
            "size": [h, w],
            "counts": [int(v) for v in _uncompressed(masks[2])],
        }  # COCO crowd style
        segs.append([[1, 1, 6, 1, 6, 6, 1, 6]])  # a polygon
        size = int(rng.integers(24, 160))
        augment = T.AugmentationList(build_lsj_augmentation(size, 0.2, 2.0))
        transforms = augment(T.AugInput(np.zeros((h, w, 3), np.uint8)))
        reference = transform_masks(
            transforms, np.stack([decode_segmentation(s, h, w) for s in segs])
        )
        present = np.flatnonzero(reference.any(axis=(1, 2)))
        masks_out, kept, boxes = decode_transformed_masks(segs, h, w, transforms)
        assert np.array_equal(kept, present), transforms
        assert np.array_equal(masks_out, reference[present]), transforms
        assert np.array_equal(
            boxes, BitMasks(torch.from_numpy(masks_out)).get_bounding_boxes().tensor.numpy()
        )


def _uncompressed(mask):
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], change]))


def test_rle_columns_decodes_a_column_range_and_rejects_bad_runs():
    rng = np.random.default_rng(0)
    mask = rng.random((13, 17)) < 0.5
    rle = mask_to_rle(mask)
    for x0, x1 in ((0, 17), (3, 4), (5, 12), (16, 17)):
        np.testing.assert_array_equal(rle_columns(rle, x0, x1), mask[:, x0:x1].T)
    with pytest.raises(ValueError, match="cover"):
        rle_columns({"size": [13, 17], "counts": [5, 3]}, 0, 1)


def test_other_transforms_fall_back_to_decode_then_transform():
    mask = np.zeros((20, 30), bool)
    mask[5:15, 8:20] = True
    transforms = T.TransformList([T.RotationTransform(20, 30, angle=90, expand=False)])
    out, kept, _ = decode_transformed_masks([mask_to_rle(mask)], 20, 30, transforms)
    assert list(kept) == [0]
    np.testing.assert_array_equal(out[0], transform_masks(transforms, mask[None])[0])
