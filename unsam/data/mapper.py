"""Turn a dataset dict into model input: read the image, augment, decode masks to tensors.

Training uses large-scale jitter (LSJ): random scale in ``[INPUT.MIN_SCALE, INPUT.MAX_SCALE]`` of
an ``INPUT.IMAGE_SIZE`` square, a fixed ``IMAGE_SIZE × IMAGE_SIZE`` crop (padded when smaller)
and a horizontal flip. Test resizes the short side to ``INPUT.MIN_SIZE_TEST`` (long side at most
``INPUT.MAX_SIZE_TEST``). Output dict::

    {"image": uint8 3×H×W (INPUT.FORMAT), "height", "width" (original size), "file_name",
     "image_id", "instances": Instances(gt_masks BitMasks N×H×W, gt_classes int64 zeros,
     gt_boxes, gt_levels int64, gt_parents int64 (index in this list or -1))}

Optional extras (training only):

* ``visa_guidance``: float16 D×h×w dense classical features (``unsam.pseudo.features``) of the
  *augmented* image, when ``UNSAM.VISA.ENABLED`` and ``UNSAM.VISA.GUIDANCE.ENABLED`` — the
  self-supervised target of ViSA's semantic guidance loss. Computed here, in the loader workers,
  because it depends on the augmentation of this very sample.
* ``ats_index`` / ``ats_task_id`` / ``ats_task`` / ``ats_level`` pass through unchanged when the
  adaptive task sampler (``unsam.data.ats.TaskMapDataset``) adds them to the record.
"""
import logging
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

import unsam.compat  # noqa: F401
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

from ..utils.images import UnsupportedImageError, open_image
from .sa1b import DatasetError, rle_to_mask

logger = logging.getLogger(__name__)
# the mapper returns None for a bad training image: detectron2's loader must retry another
unsam.compat.fix_map_dataset_retry()

# ViSA guidance grid: long side of the guidance map in patches × patch size. A fixed, small grid
# (32×32 at 8-pixel patches) bounds the per-sample cost (~0.5 MB float16) at any IMAGE_SIZE; the
# guidance loss samples points bilinearly, so it need not match the mask-feature resolution.
VISA_GUIDANCE_RESOLUTION = 256


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """COCO polygon list or RLE → H×W bool mask."""
    if isinstance(segmentation, dict):
        return rle_to_mask(segmentation)
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def transform_masks(transforms: T.TransformList, masks: np.ndarray) -> np.ndarray:
    """Apply an image's geometric transforms to all its masks at once: N×H×W bool → N×H'×W' bool.

    Equivalent to ``transforms.apply_segmentation`` per mask, but one vectorised operation per
    transform instead of N PIL round trips (the mapper's hot path with hundreds of pseudo masks).
    Resizing is nearest-neighbour at pixel centres; transforms without a batched rule here fall
    back to the per-mask path.
    """
    for t in transforms.transforms:
        if isinstance(t, T.ResizeTransform):
            resized = F.interpolate(torch.from_numpy(masks).to(torch.uint8)[None], size=(t.new_h, t.new_w),
                                    mode="nearest-exact")
            masks = resized[0].numpy().astype(bool)
        elif isinstance(t, T.CropTransform):
            masks = masks[:, t.y0:t.y0 + t.h, t.x0:t.x0 + t.w]
        elif isinstance(t, T.PadTransform):
            masks = np.pad(masks, ((0, 0), (t.y0, t.y1), (t.x0, t.x1)), constant_values=bool(t.seg_pad_value))
        elif isinstance(t, T.HFlipTransform):
            masks = masks[:, :, ::-1]
        elif isinstance(t, T.NoOpTransform):
            continue
        else:
            masks = np.stack([t.apply_segmentation(m.astype(np.uint8)).astype(bool) for m in masks])
    return np.ascontiguousarray(masks)


def build_lsj_augmentation(image_size: int, min_scale: float, max_scale: float, flip: bool = True) -> List:
    augs = [
        T.ResizeScale(min_scale=min_scale, max_scale=max_scale, target_height=image_size, target_width=image_size),
        T.FixedSizeCrop(crop_size=(image_size, image_size)),
    ]
    if flip:
        augs.append(T.RandomFlip(horizontal=True))
    return augs


class UnSAMDatasetMapper:
    """Callable mapping one dataset dict to one model input dict (see module docstring)."""

    @configurable
    def __init__(self, is_train: bool, *, augmentations: List, image_format: str, max_instances: int,
                 visa_guidance: str = ""):
        """``visa_guidance``: "" (none) or the guidance feature backend ("classical")."""
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.max_instances = max_instances
        self.visa_guidance = visa_guidance
        self._guidance_features = None
        self.num_skipped = 0  # training images skipped by this mapper (in this loader worker)
        if visa_guidance and visa_guidance != "classical":
            raise ValueError(
                f"UNSAM.VISA.GUIDANCE.FEATURES={visa_guidance!r}: only 'classical' is supported in "
                "the training mapper (DINO features per augmented sample need the ViT in every "
                "loader worker; precompute them instead)"
            )
        logger.info("%s mapper augmentations: %s", "train" if is_train else "test", augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if is_train:
            augs = build_lsj_augmentation(cfg.INPUT.IMAGE_SIZE, cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE,
                                          flip=cfg.INPUT.RANDOM_FLIP != "none")
        else:
            augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
        visa = cfg.UNSAM.VISA
        guidance = visa.GUIDANCE.FEATURES if (is_train and visa.ENABLED and visa.GUIDANCE.ENABLED
                                               and visa.GUIDANCE.WEIGHT > 0) else ""
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "max_instances": cfg.INPUT.MAX_INSTANCES_PER_IMAGE,
            "visa_guidance": guidance,
        }

    def guidance_features(self, image: np.ndarray) -> torch.Tensor:
        """ViSA guidance of an augmented image (H×W×3 uint8, ``INPUT.FORMAT``) → float16 D×h×w."""
        if self._guidance_features is None:
            from ..pseudo.features import build_features

            self._guidance_features = build_features(self.visa_guidance, VISA_GUIDANCE_RESOLUTION)
        rgb = image
        if self.image_format == "BGR":
            rgb = image[..., ::-1]
        elif self.image_format != "RGB":
            rgb = utils.convert_image_to_rgb(image, self.image_format)
        # never upsample a small image: the grid is one patch per 8 px up to the cap
        res = min(max(rgb.shape[:2]), VISA_GUIDANCE_RESOLUTION)
        feats = self._guidance_features(np.ascontiguousarray(rgb, dtype=np.uint8), res)  # h×w×D
        return torch.from_numpy(np.ascontiguousarray(feats.transpose(2, 0, 1))).to(torch.float16)

    def _select_annotations(self, annotations: List[Dict]) -> List[Dict]:
        """Non-crowd annotations, the largest ``max_instances`` first (keeps list order otherwise)."""
        anns = [a for a in annotations if not a.get("iscrowd", 0)]
        if len(anns) > self.max_instances:
            order = sorted(range(len(anns)), key=lambda i: -float(anns[i].get("area", 0)))
            keep = sorted(order[: self.max_instances])
            anns = [anns[i] for i in keep]
        return anns

    def read_image(self, dataset_dict: Dict) -> Optional[np.ndarray]:
        """The record's image in ``INPUT.FORMAT``; ``None`` (a warning) for a bad training image.

        A training image that cannot be read, or whose size differs from its annotation file, is
        skipped (detectron2's loaders then draw another one) instead of stopping the run; at test
        time it is a :class:`~unsam.data.sa1b.DatasetError`, as leaving it out would change the
        metrics.
        """
        try:
            image = utils.convert_PIL_to_numpy(open_image(dataset_dict["file_name"]), self.image_format)
            utils.check_image_size(dataset_dict, image)
        except (OSError, UnsupportedImageError, utils.SizeMismatchError) as e:
            if not self.is_train:
                raise DatasetError(f"test image {dataset_dict['file_name']}: {e}") from None
            self.num_skipped += 1
            logger.warning("skipping training image %s (%d skipped by this loader so far): %s",
                           dataset_dict["file_name"], self.num_skipped, e)
            return None
        return image

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        # shallow: annotations are only read, and a deep copy of hundreds of RLE dicts per image
        # cost more than decoding them
        dataset_dict = dict(dataset_dict)
        image = self.read_image(dataset_dict)
        if image is None:
            return None
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if self.is_train and self.visa_guidance:
            dataset_dict["visa_guidance"] = self.guidance_features(image)

        annotations = dataset_dict.pop("annotations", None)
        if not self.is_train or annotations is None:
            return dataset_dict

        anns = self._select_annotations(annotations)
        orig_h, orig_w = dataset_dict["height"], dataset_dict["width"]
        if anns:
            stack = np.stack([decode_segmentation(a["segmentation"], orig_h, orig_w) for a in anns])
            stack = transform_masks(transforms, stack)
            present = stack.any(axis=(1, 2))  # instances cropped away by LSJ are dropped
            mask_tensor = torch.from_numpy(stack[present])
            kept = [a for a, p in zip(anns, present) if p]
        else:
            mask_tensor, kept = torch.zeros((0, h, w), dtype=torch.bool), []

        instances = Instances((h, w))
        instances.gt_classes = torch.zeros(len(kept), dtype=torch.int64)
        instances.gt_masks = BitMasks(mask_tensor)
        instances.gt_boxes = instances.gt_masks.get_bounding_boxes() if kept else Boxes(torch.zeros((0, 4)))
        instances.gt_levels = torch.tensor([int(a.get("level", 0)) for a in kept], dtype=torch.int64)
        # parent ids refer to annotation ids; re-express them as indices into the kept list
        index_of = {a.get("id"): i for i, a in enumerate(kept) if a.get("id") is not None}
        instances.gt_parents = torch.tensor(
            [index_of.get(a.get("parent_id", -1), -1) for a in kept], dtype=torch.int64
        )
        dataset_dict["instances"] = instances
        return dataset_dict
