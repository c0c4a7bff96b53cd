"""The published UnSAM pseudo-label recipe (``python -m unsam.pseudo --recipe unsam``):
:class:`UnsamLabeler`, settings :class:`UnsamSettings`.

Learned from frank-xwang/UnSAM ``divide_and_conquer/divide_conquer.py`` and
``iterative_merging.py``; our own code. Per image:

1. **divide** — the CutLER detector (:class:`unsam.pseudo.detector.CutlerDivider`) on the whole
   image; every instance scoring above ``divide_score`` (0.1) is a divided region and is itself a
   pseudo label (``level`` 0, ``parent_id`` -1, ``predicted_iou`` = its detector score).
   Without detector weights, ``--divide maskcut`` runs MaskCut on the whole image's features
   instead (``n_divide`` regions, score 1) — *not* the published divide;
2. **conquer**, per divided region: its bounding box is cropped from the image and resized to
   ``conquer_size``² (PIL bicubic, as published), the features backend gives the crop's raw
   patch grid (DINO ViT-B/8 last-block keys at 256 px: 32×32×768), and
   :func:`unsam.pseudo.conquer.iterative_merge` merges it at thresholds 0.6 … 0.1 (groups of
   ≥ ``min_patches`` patches). Every kept group is resized to the crop (PIL bicubic, binarised
   at half its maximum, then at 127.5, as published) and kept if more than
   ``min_inside_parent`` (90 %) of it lies inside the divided mask; then non-maximum
   suppression: the region's masks sorted by area (largest first), each one still kept drops
   any of the next ``nms_neighbours`` (4) with IoU > ``nms_iou`` (0.9). Conquered masks are
   ``level`` 1 with ``parent_id`` = their divided region's id, ``predicted_iou`` = the
   region's score and ``merge_threshold`` = the threshold at which the group was listed;
3. **refine** — the published recipe runs CascadePSP, a refiner trained with human masks, so
   not ours to use. ``refine=True`` snaps every mask to superpixels (the engine's own
   unsupervised refinement, :class:`unsam.pseudo.refine.SuperpixelGraph`: a mask becomes the union
   of the superpixels it covers more than half of; one that covers no superpixel's majority
   stays as it was); off by default.

Annotations come in the published order: divided masks by detector score, then each region's
conquered masks, largest first. All masks are written (no cap, no cross-region de-duplication),
as published.

Deliberate differences from the published script, all small:
- the crop is the mask's full bounding box; the published slice ``[ymin:ymax, xmin:xmax]``
  leaves out the box's last row and column (and skips one-pixel-thin regions);
- DINO sees the crop in RGB: the published script reads the image with OpenCV (BGR) and hands
  that array to PIL as if it were RGB, so its DINO sees red and blue swapped;
- DINO runs in float32 on every device (the published script uses float16 on the GPU);
- divided masks that come out empty are dropped (they cannot be cropped or written).
"""

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image

from ..features import DenseFeatures, build_features
from ..io.sa1b import annotation_from_mask
from .config import AT_LEAST_1, SHARE, DivideConquerSettings, SettingError, setting
from .conquer import iterative_merge
from .divide import maskcut

logger = logging.getLogger(__name__)


@dataclass
class UnsamSettings(DivideConquerSettings):
    """The settings of recipe ``unsam``: the features, MaskCut divide (without detector
    weights) and conquer of :class:`~unsam.pseudo.config.DivideConquerSettings` and these."""

    divide: str = setting(
        "detector",
        "detector (default when --divide-weights is given) or MaskCut on the whole "
        "image (not the published divide)",
        choices=("detector", "maskcut"),
    )
    divide_config: Optional[str] = setting(
        None,
        "detectron2 config of the detector (default: "
        "divide/cutler_cascade_R50_FPN.yaml of the packaged configs, unsam/configs/)",
    )
    divide_weights: Optional[str] = setting(
        None, "detector checkpoint PATH or URL (CutLER's cutler_cascade_final.pth)"
    )
    divide_score: float = setting(
        0.1,
        "detector instances scoring above this are divided regions (detectron2 keeps score "
        "> threshold)",
        valid=SHARE,
    )
    conquer_size: int = setting(
        256, "each region's crop is resized to this square before the features", valid=AT_LEAST_1
    )
    refine: bool = setting(
        False,
        "snap masks to superpixels (the engine's unsupervised "
        "refinement; the published CascadePSP was trained with human masks)",
    )


def complete_settings(given: Dict[str, Any]) -> None:
    """The features / divide not given on the command line follow the weights that are
    (warning when that is not the published recipe); :class:`SettingError` for a detector
    divide without weights. ``given``: :func:`unsam.pseudo.config.given_settings`, completed
    in place."""
    if "features" not in given:
        given["features"] = "dino" if given.get("dino_weights") else "classical"
        if given["features"] == "classical":
            logger.warning(
                "recipe unsam without --dino-weights: conquering on classical "
                "features, not the published DINO keys"
            )
    if "divide" not in given:
        given["divide"] = "detector" if given.get("divide_weights") else "maskcut"
        if given["divide"] == "maskcut":
            logger.warning(
                "recipe unsam without --divide-weights: dividing with MaskCut on "
                "the whole image, not the published CutLER detector"
            )
    elif given["divide"] == "detector" and not given.get("divide_weights"):
        raise SettingError("--divide detector needs --divide-weights PATH|URL")


def resize_group(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """A (h, w) bool patch-grid group → (H, W) bool at ``size`` = (W, H), as published: PIL
    bicubic resize of the 0/255 image, binarised at half its maximum (to its max / min), then
    kept where > 127.5."""
    up = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BICUBIC))
    hi, lo = int(up.max()), int(up.min())
    return np.where(up > hi / 2.0, hi, lo) > 127.5


def nms_by_area(masks: List[np.ndarray], iou_thresh: float = 0.9, neighbours: int = 4) -> List[int]:
    """Published conquer NMS. ``masks``: same-shape bool arrays. Returns the indices kept, in
    order of decreasing area (stable): each kept mask drops any of the next ``neighbours``
    masks in that order whose IoU with it exceeds ``iou_thresh``."""
    areas = [int(m.sum()) for m in masks]
    order = sorted(range(len(masks)), key=lambda i: -areas[i])
    removed = set()
    for a in range(len(order)):
        if a in removed:
            continue
        for b in range(a + 1, min(len(order), a + 1 + neighbours)):
            i, j = order[a], order[b]
            inter = int(np.count_nonzero(masks[i] & masks[j]))
            union = areas[i] + areas[j] - inter
            if union and inter / union > iou_thresh:
                removed.add(b)
    return [order[a] for a in range(len(order)) if a not in removed]


class UnsamLabeler:
    """Turns one RGB image into SA-1B annotations with the published recipe.

    ``cfg``: :class:`UnsamSettings`. ``features`` / ``divider`` replace the backends built from
    ``cfg`` (tests, benchmarks).
    """

    nms_iou = 0.9
    nms_neighbours = 4
    batch = 8  # crops per forward pass of the features backend

    def __init__(self, cfg: UnsamSettings, features: Optional[DenseFeatures] = None, divider=None):
        self.cfg = cfg
        self.features = features or build_features(
            cfg.features, cfg.resolution, cfg.device, cfg.dino_weights, cfg.dino_arch
        )
        if cfg.conquer_size % self.features.patch_size:
            raise ValueError(
                f"--conquer-size {cfg.conquer_size} is not a multiple of the "
                f"features' patch size {self.features.patch_size}"
            )
        if divider is None and cfg.divide == "detector":
            from .detector import DEFAULT_DIVIDE_CONFIG, CutlerDivider

            divider = CutlerDivider(
                cfg.divide_weights,
                cfg.divide_config or DEFAULT_DIVIDE_CONFIG,
                cfg.divide_score,
                cfg.device,
            )
        self.divider = divider

    def divide(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``image`` H×W×3 uint8 RGB → (masks (N, H, W) bool, scores (N,) float32)."""
        if self.divider is not None:
            return self.divider(image)
        h, w = image.shape[:2]
        grids = maskcut(
            self.features(image), self.cfg.n_divide, self.cfg.tau, min_patches=self.cfg.min_patches
        )
        masks = [
            cv2.resize(g.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
            for g in grids
        ]
        return (np.stack(masks) if masks else np.zeros((0, h, w), bool)), np.ones(
            len(masks), np.float32
        )

    def conquer(
        self, crops: List[np.ndarray], parents: List[np.ndarray]
    ) -> List[List[Tuple[np.ndarray, float]]]:
        """Conquer divided regions. ``crops``: each region's box cut from the image (h_i, w_i, 3)
        uint8; ``parents``: the divided mask inside that box (h_i, w_i) bool. Returns per region
        the kept masks (h_i, w_i) bool with their merge threshold, after NMS, largest first."""
        s = self.cfg.conquer_size
        out = []
        for start in range(0, len(crops), self.batch):
            chunk = crops[start : start + self.batch]
            resized = np.stack(
                [np.asarray(Image.fromarray(c).resize((s, s), Image.BICUBIC)) for c in chunk]
            )
            grids = self.features.grid_features(resized)  # (B, s/p, s/p, C) raw
            for grid, crop, parent in zip(grids, chunk, parents[start : start + self.batch]):
                ch, cw = crop.shape[:2]
                kept: List[np.ndarray] = []
                thresholds: List[float] = []
                for t, level in zip(
                    self.cfg.thresholds,
                    iterative_merge(grid, self.cfg.thresholds, self.cfg.min_patches),
                ):
                    for group in level:
                        m = resize_group(group, (cw, ch))
                        n = np.count_nonzero(m)
                        if n and np.count_nonzero(m & parent) / n > self.cfg.min_inside_parent:
                            kept.append(m)
                            thresholds.append(float(t))
                out.append(
                    [
                        (kept[i], thresholds[i])
                        for i in nms_by_area(kept, self.nms_iou, self.nms_neighbours)
                    ]
                )
        return out

    def __call__(self, image: np.ndarray) -> List[Dict]:
        """``image``: H×W×3 uint8 RGB → list of SA-1B annotation dicts (ids 0..K-1)."""
        H, W = image.shape[:2]
        masks, scores = self.divide(image)
        regions = []  # (box (x0, y0, x1, y1), local divided mask, score)
        for m, sc in zip(masks, scores):
            ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            if len(ys) == 0:
                continue
            x0, y0, x1, y1 = int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1
            regions.append(((x0, y0, x1, y1), m[y0:y1, x0:x1], float(sc)))
        crops = [image[y0:y1, x0:x1] for (x0, y0, x1, y1), _, _ in regions]
        conquered = self.conquer(crops, [r[1] for r in regions])
        graph = None
        if self.cfg.refine:
            from .refine import SuperpixelGraph

            graph = SuperpixelGraph(image, self.cfg.n_superpixels)
        anns: List[Dict] = []
        for box, local, sc in regions:
            self._append(
                anns, local, box, (H, W), sc, level=0, parent=-1, crop_box=(0, 0, W, H), graph=graph
            )
        for rid, ((box, _, sc), parts) in enumerate(zip(regions, conquered)):
            for local, t in parts:
                self._append(
                    anns,
                    local,
                    box,
                    (H, W),
                    sc,
                    level=1,
                    parent=rid,
                    crop_box=box,
                    graph=graph,
                    merge_threshold=t,
                )
        return anns

    @staticmethod
    def _append(
        anns: List[Dict],
        local: np.ndarray,
        box,
        shape,
        score: float,
        level: int,
        parent: int,
        crop_box,
        graph=None,
        **extra,
    ) -> None:
        """Append one annotation for the mask ``local`` (bool, placed at pixel ``box`` =
        (x0, y0, x1, y1)) in an image of ``shape`` = (H, W); ``graph`` snaps it to
        superpixels first."""
        if graph is not None:
            nodes = graph.soft_to_nodes(local.astype(np.float32), box)
            if nodes.any():
                local, box = graph.nodes_to_mask(nodes)
        anns.append(
            annotation_from_mask(
                local,
                len(anns),
                box,
                shape,
                predicted_iou=round(float(score), 6),
                crop_box=crop_box,
                level=level,
                parent_id=parent,
                **extra,
            )
        )
