"""Turn a dataset dict into model input: read the image, augment, decode masks to tensors.

Training augmentation, by ``INPUT.DATASET_MAPPER_NAME``:

* ``unsam_lsj``: large-scale jitter (LSJ): random scale in ``[INPUT.MIN_SCALE, INPUT.MAX_SCALE]``
  of an ``INPUT.IMAGE_SIZE`` square, a fixed ``IMAGE_SIZE × IMAGE_SIZE`` crop (padded when
  smaller) and a horizontal flip;
* ``unsam_crop`` (alias ``sam_instance_tsv``, the published mapper's name): the published UnSAM
  recipe — a random flip (``INPUT.RANDOM_FLIP``) then a fixed ``IMAGE_SIZE`` crop of the image at
  its own resolution (padded when smaller), no rescaling.

At most ``INPUT.MAX_INSTANCES_PER_IMAGE`` instances per training image: the largest
(``INPUT.MAX_INSTANCES_SAMPLING "largest"``) or a uniformly random subset drawn as published
(``"random"``, :meth:`UnSAMDatasetMapper._select_annotations`). Instances the crop leaves without a
pixel are dropped; an image left with none is still returned, with no instances (every query is
trained towards "no object"), as the published mapper does. Test resizes the short side to
``INPUT.MIN_SIZE_TEST`` (long side at most ``INPUT.MAX_SIZE_TEST``). Output dict::

    {"image": uint8 3×H×W (INPUT.FORMAT), "height", "width" (original size), "file_name",
     "image_id", "instances": Instances(gt_masks BitMasks N×H×W, gt_classes int64 zeros,
     gt_boxes, gt_levels int64, gt_parents int64 (index in this list or -1))}

Optional extras (training only):

* ``visa_guidance``: float16 D×h×w dense classical features (``unsam.features``) of the
  *augmented* image, when ``UNSAM.VISA.ENABLED`` and ``UNSAM.VISA.GUIDANCE.ENABLED`` — the
  self-supervised target of ViSA's semantic guidance loss. Computed here, in the loader workers,
  because it depends on the augmentation of this very sample.
* ``ats_index`` / ``ats_task_id`` / ``ats_task`` / ``ats_level`` pass through unchanged when the
  adaptive task sampler (``unsam.data.ats.TaskMapDataset``) adds them to the record.
"""

import io
import logging
from typing import Dict, List, Optional, Set, Tuple

import unsam.compat  # noqa: F401

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import get_event_storage

from ..config.loading import ConfigError
from ..io.sa1b import DatasetError, rle_box, rle_runs, rle_to_mask, validate_rle
from ..utils.images import UnsupportedImageError, open_image
from .training import note_replaced

logger = logging.getLogger(__name__)
# the mapper returns None for a bad training image: detectron2's loader must retry another
unsam.compat.fix_map_dataset_retry()

# ViSA guidance grid: long side of the guidance map in patches × patch size. A fixed, small grid
# (32×32 at 8-pixel patches) bounds the per-sample cost (~0.5 MB float16) at any IMAGE_SIZE; the
# guidance loss samples points bilinearly, so it need not match the mask-feature resolution.
VISA_GUIDANCE_RESOLUTION = 256


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """COCO polygon list or RLE → H×W bool mask. An RLE whose runs do not cover H×W exactly is
    a ``ValueError`` (pycocotools would decode it into uninitialised or foreign memory): the
    training reader leaves that check to the masks that are decoded."""
    if isinstance(segmentation, dict):
        validate_rle(segmentation, (height, width))
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
            resized = F.interpolate(
                torch.from_numpy(masks).to(torch.uint8)[None],
                size=(t.new_h, t.new_w),
                mode="nearest-exact",
            )
            masks = resized[0].numpy().astype(bool)
        elif isinstance(t, T.CropTransform):
            masks = masks[:, t.y0 : t.y0 + t.h, t.x0 : t.x0 + t.w]
        elif isinstance(t, T.PadTransform):
            masks = np.pad(
                masks, ((0, 0), (t.y0, t.y1), (t.x0, t.x1)), constant_values=bool(t.seg_pad_value)
            )
        elif isinstance(t, T.HFlipTransform):
            masks = masks[:, :, ::-1]
        elif isinstance(t, T.NoOpTransform):
            continue
        else:
            masks = np.stack([t.apply_segmentation(m.astype(np.uint8)).astype(bool) for m in masks])
    return np.ascontiguousarray(masks)


def _nearest_exact_index(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output position of a ``nearest-exact`` resize, computed by torch
    itself in float32 — the arithmetic of :func:`transform_masks`'s uint8 resize (a float64
    index differs from it at some sizes by one pixel)."""
    src = torch.arange(in_size, dtype=torch.float32)[None, None]
    return F.interpolate(src, size=out_size, mode="nearest-exact")[0, 0].numpy().astype(np.int64)


def source_index_maps(
    transforms: T.TransformList, height: int, width: int
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """For transforms made only of nearest resizes, crops, zero pads and horizontal flips: the
    source row of every output row and the source column of every output column (-1 in padding),
    i.e. ``out[i, j] = mask[rows[i], cols[j]]``. ``None`` when another transform is present."""
    rows, cols = np.arange(height), np.arange(width)
    for t in transforms.transforms:
        if isinstance(t, T.ResizeTransform):
            rows = rows[_nearest_exact_index(len(rows), t.new_h)]
            cols = cols[_nearest_exact_index(len(cols), t.new_w)]
        elif isinstance(t, T.CropTransform):
            rows, cols = rows[t.y0 : t.y0 + t.h], cols[t.x0 : t.x0 + t.w]
        elif isinstance(t, T.PadTransform) and not t.seg_pad_value:
            rows = np.concatenate([np.full(t.y0, -1), rows, np.full(t.y1, -1)])
            cols = np.concatenate([np.full(t.x0, -1), cols, np.full(t.x1, -1)])
        elif isinstance(t, T.HFlipTransform):
            cols = cols[::-1]
        elif not isinstance(t, T.NoOpTransform):
            return None
    return rows, cols


def _covering_slice(index: np.ndarray, lo: int, hi: int) -> slice:
    """The output positions whose source index lies in [lo, hi): one contiguous run, because
    a source index map is monotonic apart from its padding (-1)."""
    hit = np.flatnonzero((index >= lo) & (index < hi))
    return slice(int(hit[0]), int(hit[-1]) + 1) if len(hit) else slice(0, 0)


def rle_columns(rle: Dict, x0: int, x1: int) -> np.ndarray:
    """Columns ``x0 … x1-1`` of an RLE mask, decoded from its runs alone: (x1-x0)×H bool (one row
    per column: RLEs are column-major). Costs (x1-x0)·H, not H·W."""
    height, width = rle["size"]
    runs = rle_runs(rle)
    ends = np.cumsum(runs)
    starts = ends - runs
    lo, hi = x0 * height, x1 * height
    first = int(np.searchsorted(ends, lo, side="right"))  # the run holding position lo
    last = int(np.searchsorted(starts, hi, side="left"))  # runs starting before hi
    lengths = np.clip(ends[first:last], lo, hi) - np.clip(starts[first:last], lo, hi)
    flat = np.repeat(np.arange(first, last) % 2 == 1, lengths)
    if flat.size != hi - lo or ends[-1] != height * width:
        raise ValueError(
            f"RLE runs cover {int(ends[-1]) if len(ends) else 0} pixels, not {height}×{width}"
        )
    return flat.reshape(x1 - x0, height)


def decode_transformed_masks(
    segmentations: List, height: int, width: int, transforms: T.TransformList
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masks of one image after its geometric transforms, those with pixels left.

    Returns ``masks`` M×H'×W' bool, ``kept`` (M,) indices into ``segmentations`` and ``boxes``
    M×4 float32 XYXY (``BitMasks.get_bounding_boxes`` convention: x1, y1 exclusive).

    Equal to decoding every mask at H×W and applying :func:`transform_masks`, but for RLEs only
    the columns of the mask's box are decoded (from its runs) and only the pixels that land in
    the output are gathered; an RLE whose box misses the output (cropped away by LSJ) is not
    decoded at all. At SA-1B scale (≈1500×2250, hundreds of masks) that avoids gigabytes of
    full-resolution masks per image (``benchmarks/data.py``). Transforms other than nearest
    resize / crop / zero pad / flip fall back to decode-then-transform.
    """
    maps = source_index_maps(transforms, height, width)
    if maps is None:
        stack = transform_masks(
            transforms, np.stack([decode_segmentation(s, height, width) for s in segmentations])
        )
        kept = np.flatnonzero(stack.any(axis=(1, 2)))
        stack = stack[kept]
        return stack, kept, BitMasks(torch.from_numpy(stack)).get_bounding_boxes().tensor.numpy()
    rows, cols = maps
    # (k, row slice, column slice, pixels) of every mask with pixels in the output
    pieces = []
    for k, seg in enumerate(segmentations):
        if isinstance(seg, dict):
            x, y, w, h = rle_box(seg)
            rs, cs = _covering_slice(rows, y, y + h), _covering_slice(cols, x, x + w)
            if rs.start == rs.stop or cs.start == cs.stop:
                continue  # nothing of this mask is in the output
            block = rle_columns(seg, x, x + w)[cols[cs] - x][
                :, rows[rs]
            ].T  # one row per source column
        else:  # polygons: decoded whole, then gathered
            rs, cs = slice(0, len(rows)), slice(0, len(cols))
            mask = np.pad(
                decode_segmentation(seg, height, width), ((0, 1), (0, 1))
            )  # index -1: padding
            block = mask[rows][:, cols]
        if block.any():
            pieces.append((k, rs, cs, block))
    out = np.zeros((len(pieces), len(rows), len(cols)), dtype=bool)
    boxes = np.zeros((len(pieces), 4), dtype=np.float32)
    for i, (_, rs, cs, block) in enumerate(pieces):
        out[i, rs, cs] = block
        ys, xs = np.flatnonzero(block.any(1)), np.flatnonzero(block.any(0))
        boxes[i] = (
            cs.start + xs[0],
            rs.start + ys[0],
            cs.start + xs[-1] + 1,
            rs.start + ys[-1] + 1,
        )
    return out, np.array([k for k, *_ in pieces], dtype=np.int64), boxes


class ClampedResizeTransform(T.ResizeTransform):
    """A resize whose output side was raised from 0 to 1 px by :class:`AtLeastOnePixel`; the
    mapper recognises the sample by this type (to name and count it), every other consumer sees
    an ordinary ``ResizeTransform``."""


class AtLeastOnePixel(T.Augmentation):
    """A resize augmentation whose output sides are never below 1 px.

    detectron2 rounds each scaled side to the nearest pixel: a 20000×20 strip fitted into a
    1024 square has a 0.5-px short side, rounded to 0, and PIL's resize then raises — stopping
    the whole run at the iteration that draws the image. Raising that side to 1 px keeps the
    sample usable (LSJ pads it to the crop size, its masks survive as 1-px lines) instead of
    replacing it.
    """

    def __init__(self, resize: T.Augmentation):
        super().__init__()
        self.resize = resize

    def get_transform(self, image):
        t = self.resize.get_transform(image)
        if isinstance(t, T.ResizeTransform) and min(t.new_h, t.new_w) < 1:
            return ClampedResizeTransform(t.h, t.w, max(t.new_h, 1), max(t.new_w, 1), t.interp)
        return t

    def __repr__(self):
        return f"AtLeastOnePixel({self.resize!r})"


# INPUT.DATASET_MAPPER_NAME values -> training augmentation
LSJ_MAPPER = "unsam_lsj"
CROP_MAPPERS = ("unsam_crop", "sam_instance_tsv")
INSTANCE_SAMPLING = ("largest", "random")


def build_crop_augmentation(image_size: int, flip: str = "horizontal") -> List:
    """The published UnSAM training augmentation: a random flip (``flip``: "horizontal",
    "vertical" or "none", as ``INPUT.RANDOM_FLIP``), then an ``image_size`` square crop of the
    image at its own resolution, at a random offset, padded (image 128, masks 0) where the image is
    smaller. No rescaling: SA-1B photos (~1500×2250) are seen at their native scale. Same order and
    the same detectron2 augmentations as the published mapper, so a seeded NumPy draws the same
    flip and crop."""
    augs = []
    if flip != "none":
        augs.append(T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical"))
    augs.append(T.FixedSizeCrop(crop_size=(image_size, image_size)))
    return augs


def build_lsj_augmentation(
    image_size: int, min_scale: float, max_scale: float, flip: bool = True
) -> List:
    augs = [
        AtLeastOnePixel(
            T.ResizeScale(
                min_scale=min_scale,
                max_scale=max_scale,
                target_height=image_size,
                target_width=image_size,
            )
        ),
        T.FixedSizeCrop(crop_size=(image_size, image_size)),
    ]
    if flip:
        augs.append(T.RandomFlip(horizontal=True))
    return augs


class UnSAMDatasetMapper:
    """Callable mapping one dataset dict to one model input dict (see module docstring)."""

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List,
        image_format: str,
        max_instances: int,
        visa_guidance: str = "",
        max_instances_sampling: str = "largest",
    ):
        """``visa_guidance``: "" (none) or the guidance feature backend ("classical").
        ``max_instances_sampling``: which instances the ``max_instances`` cap keeps, "largest" or
        "random" (:meth:`_select_annotations`)."""
        if max_instances_sampling not in INSTANCE_SAMPLING:
            raise ConfigError(
                f"INPUT.MAX_INSTANCES_SAMPLING {max_instances_sampling!r}: must be one of "
                f"{', '.join(INSTANCE_SAMPLING)}"
            )
        self.max_instances_sampling = max_instances_sampling
        self.is_train = is_train
        # a resize may round a thin image's short side to 0 px: every resize keeps >= 1 px
        augmentations = [
            AtLeastOnePixel(a)
            if isinstance(a, (T.ResizeScale, T.ResizeShortestEdge, T.Resize))
            else a
            for a in augmentations
        ]
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.max_instances = max_instances
        self.visa_guidance = visa_guidance
        self._guidance_features = None
        self.num_skipped = 0  # training samples replaced by this mapper (in this loader worker)
        # samples whose resize had a side raised from 0 to 1 px, and the images they came from
        self.num_degenerate = 0
        self.degenerate_images: Set[str] = set()
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
            name = cfg.INPUT.DATASET_MAPPER_NAME
            if name == LSJ_MAPPER:
                augs = build_lsj_augmentation(
                    cfg.INPUT.IMAGE_SIZE,
                    cfg.INPUT.MIN_SCALE,
                    cfg.INPUT.MAX_SCALE,
                    flip=cfg.INPUT.RANDOM_FLIP != "none",
                )
            elif name in CROP_MAPPERS:
                augs = build_crop_augmentation(cfg.INPUT.IMAGE_SIZE, cfg.INPUT.RANDOM_FLIP)
            else:
                raise ConfigError(
                    f"INPUT.DATASET_MAPPER_NAME {name!r}: must be one of "
                    f"{', '.join((LSJ_MAPPER,) + CROP_MAPPERS)}"
                )
        else:
            augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
        visa = cfg.UNSAM.VISA
        guidance = (
            visa.GUIDANCE.FEATURES
            if (is_train and visa.ENABLED and visa.GUIDANCE.ENABLED and visa.GUIDANCE.WEIGHT > 0)
            else ""
        )
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "max_instances": cfg.INPUT.MAX_INSTANCES_PER_IMAGE,
            "max_instances_sampling": cfg.INPUT.MAX_INSTANCES_SAMPLING,
            "visa_guidance": guidance,
        }

    def guidance_features(self, image: np.ndarray) -> torch.Tensor:
        """ViSA guidance of an augmented image (H×W×3 uint8, ``INPUT.FORMAT``) → float16 D×h×w."""
        if self._guidance_features is None:
            from ..features import build_features

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
        """The non-crowd annotations the model trains on, at most ``max_instances``.

        "largest": the non-crowd annotations, the ``max_instances`` largest by area when there are
        more, in list order. "random", the published rule: when the record holds more than
        ``max_instances`` annotations, a uniformly random subset of that size drawn with NumPy's
        global generator (``np.random.choice(n, k, replace=False)``, the same draw as the published
        mapper's choice over the list), in drawn order; crowd annotations are dropped afterwards.
        Called before the augmentation so that a seeded run draws what the published one draws.
        """
        if self.max_instances_sampling == "random":
            if len(annotations) > self.max_instances:
                chosen = np.random.choice(len(annotations), self.max_instances, replace=False)
                annotations = [annotations[i] for i in chosen]
            return [a for a in annotations if not a.get("iscrowd", 0)]
        anns = [a for a in annotations if not a.get("iscrowd", 0)]
        if len(anns) > self.max_instances:
            order = sorted(range(len(anns)), key=lambda i: -float(anns[i].get("area", 0)))
            keep = sorted(order[: self.max_instances])
            anns = [anns[i] for i in keep]
        return anns

    def read_image(self, dataset_dict: Dict) -> Optional[np.ndarray]:
        """The record's image in ``INPUT.FORMAT``; ``None`` (a warning) for a bad training image.

        The image is the file ``file_name``, or — a record read from an SA-1B tar or a TSV shard
        through the dataset index — the encoded bytes ``image_bytes`` (taken out of the dict: the
        model input does not carry them). A training image that cannot be read, or whose size
        differs from its annotation file, is skipped (detectron2's loaders then draw another one)
        instead of stopping the run; at test time it is a :class:`~unsam.data.sa1b.DatasetError`,
        as leaving it out would change the metrics.
        """
        data = dataset_dict.pop("image_bytes", None)
        try:
            source = io.BytesIO(data) if data is not None else dataset_dict["file_name"]
            image = utils.convert_PIL_to_numpy(open_image(source), self.image_format)
            utils.check_image_size(dataset_dict, image)
        except (OSError, UnsupportedImageError, utils.SizeMismatchError) as e:
            if not self.is_train:
                raise DatasetError(f"test image {self._name(dataset_dict)}: {e}") from None
            return self._skip(dataset_dict, e)
        return image

    @staticmethod
    def _name(dataset_dict: Dict) -> str:
        """The image or record a message names: its file, else where its record is."""
        return str(dataset_dict.get("file_name") or dataset_dict.get("record_name"))

    def _skip(self, dataset_dict: Dict, reason) -> None:
        """Name and count a training sample that cannot be used; ``None`` for the loader, which
        then maps another image (detectron2's ``MapDataset`` and the ATS ``TaskMapDataset``
        retry with their own seeded generators, so a run replaces it the same way every time).
        The count is ``data/replaced_samples`` in the metrics
        (:func:`unsam.data.training.note_replaced`)."""
        self.num_skipped += 1
        logger.warning(
            "skipping training image %s (%d skipped by this loader so far; another image is drawn "
            "instead): %s",
            self._name(dataset_dict),
            self.num_skipped,
            reason,
        )
        note_replaced(self.num_skipped)
        return None

    def _report(self, mapped: Dict) -> Dict:
        """``mapped``, carrying this loader worker's count of replaced samples when it has one."""
        if self.num_skipped:
            note_replaced(self.num_skipped, mapped)
        return mapped

    def _note_degenerate(self, dataset_dict: Dict, shape: Tuple[int, int]) -> None:
        """Count a sample whose resize kept a side at 1 px; name its image once (per loader
        worker) and publish the count as ``data/degenerate_resizes`` where an EventStorage is
        active in this process (``DATALOADER.NUM_WORKERS 0``; workers have only the log)."""
        self.num_degenerate += 1
        name = str(dataset_dict.get("file_name"))
        if name not in self.degenerate_images:
            self.degenerate_images.add(name)
            logger.warning(
                "image %s (%dx%d, width x height) is too thin for the resize: a side that rounds "
                "to 0 px is kept at 1 px (%d such image(s) in this loader so far)",
                name,
                shape[1],
                shape[0],
                len(self.degenerate_images),
            )
        if self.is_train:
            try:
                storage = get_event_storage()
            except AssertionError:  # no storage in this process (a loader worker)
                return
            storage.put_scalar("data/degenerate_resizes", self.num_degenerate, smoothing_hint=False)

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        # shallow: annotations are only read, and a deep copy of hundreds of RLE dicts per image
        # cost more than decoding them
        dataset_dict = dict(dataset_dict)
        if "record_error" in dataset_dict:  # a record the training reader could not read
            if not self.is_train:
                raise DatasetError(dataset_dict["record_error"])
            return self._skip(dataset_dict, dataset_dict["record_error"])
        image = self.read_image(dataset_dict)
        if image is None:
            return None
        annotations = dataset_dict.pop("annotations", None)
        # the instance cap is drawn before the augmentation, in the published order of random draws
        anns = (
            self._select_annotations(annotations)
            if self.is_train and annotations is not None
            else None
        )
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        if any(isinstance(t, ClampedResizeTransform) for t in transforms.transforms):
            self._note_degenerate(dataset_dict, image.shape[:2])
        image = aug_input.image
        h, w = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if self.is_train and self.visa_guidance:
            dataset_dict["visa_guidance"] = self.guidance_features(image)

        if anns is None:  # test time, or a record without annotations
            return self._report(dataset_dict)

        orig_h, orig_w = dataset_dict["height"], dataset_dict["width"]
        if anns:  # instances cropped away by LSJ are dropped
            try:  # RLE runs are checked here, where they are decoded (not when the record is read)
                stack, present, boxes = decode_transformed_masks(
                    [a["segmentation"] for a in anns], orig_h, orig_w, transforms
                )
            except ValueError as e:
                return self._skip(dataset_dict, f"corrupt annotation mask ({e})")
            mask_tensor, kept = torch.from_numpy(stack), [anns[i] for i in present]
        else:
            mask_tensor, kept, boxes = (
                torch.zeros((0, h, w), dtype=torch.bool),
                [],
                np.zeros((0, 4), np.float32),
            )

        instances = Instances((h, w))
        instances.gt_classes = torch.zeros(len(kept), dtype=torch.int64)
        instances.gt_masks = BitMasks(mask_tensor)
        instances.gt_boxes = Boxes(torch.from_numpy(boxes))
        instances.gt_levels = torch.tensor(
            [int(a.get("level", 0)) for a in kept], dtype=torch.int64
        )
        # parent ids refer to annotation ids; re-express them as indices into the kept list
        index_of = {a.get("id"): i for i, a in enumerate(kept) if a.get("id") is not None}
        instances.gt_parents = torch.tensor(
            [index_of.get(a.get("parent_id", -1), -1) for a in kept], dtype=torch.int64
        )
        dataset_dict["instances"] = instances
        return self._report(dataset_dict)
