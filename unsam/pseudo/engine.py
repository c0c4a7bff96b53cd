"""Per-image divide → conquer → refine pipeline and the batch runner behind ``python -m unsam.pseudo``.

Two recipes share the batch runner (:func:`run`: sharding, resume, ``failed.txt``, workers):
``classical`` (:class:`PseudoLabeler`, the offline default, described below) and ``unsam``, the
published UnSAM recipe (:class:`unsam.pseudo.recipe.UnsamLabeler`: CutLER detector divide,
DINO keys on each region's 256-px crop, :func:`unsam.pseudo.conquer.iterative_merge`, NMS).

Per image (:meth:`PseudoLabeler.__call__`, recipe ``classical``):

1. patch features of the whole image (``features.py``) and superpixels (``refine.py``);
2. **divide**: MaskCut gives ``n_divide`` regions on the patch grid; each is refined by snapping
   to superpixels (dropped if the snapped/raw IoU < 0.5); the whole image is the root region;
3. **conquer**: the patch features are pooled onto the superpixels (pixel-weighted means), and
   adjacent groups are merged bottom-up over the threshold hierarchy (``conquer.merge_graph``).
   The root is conquered with every classical feature *variant* (RBF bandwidth / position
   weight: selective-search-style diversification); each divided region is cropped to its box
   (plus a margin), its features recomputed on the crop (a zoom-in: long side
   ``crop_resolution``) and conquered inside the region. Merging superpixels rather than grid
   patches is a deliberate change from the patch-grid description in the design: masks then
   follow image edges at pixel level (on COCO the grid-then-snap variant was clearly worse);
   :func:`unsam.pseudo.conquer.merge_hierarchy` is the patch-grid form of the same merging.
   The whole image is also conquered once per ``colour_bandwidths`` entry on full-resolution
   colour distributions of the superpixels (:meth:`Snapper.colour_sums`, smallest group
   ``colour_min_pixels``): the feature grid's cells are too coarse for small objects, and this
   colour-only hierarchy (selective search's colour similarity) supplies them. Finally one
   complete selective-search-style hierarchy per ``selective`` entry (similarity + size + fill,
   :func:`unsam.pseudo.conquer.merge_selective`) adds balanced, compact groupings;
4. **filter**: masks > 90 % of the image and conquered masks less than 90 % inside their divided
   region are dropped;
5. **refine**: the ``refine_top`` best masks (by selection score) also get a colour-snapped
   variant (:meth:`Snapper.reassign_border`: border superpixels re-assigned to the better-fitting
   of the inside / outside colour models), an extra candidate next to the original (on the first
   20 COCO sample images: AR@1000 0.153 → 0.159). Snapping by the patch features or twice by
   colour added a little more on 40 images but nothing on all 80, at ~10 % more time;
6. near-duplicates (IoU > ``dedup_iou`` = 0.8) are dropped, best selection score first, and at
   most ``max_masks`` masks are kept, in ranking order.

Selection score: ``boundary × (1 − coherence / 2) × fill``. *boundary* (stored as
``stability_score``) is the mean image-edge strength along the mask border relative to the
image's mean, squashed to [0, 1) (masks that end on edges); *coherence* (``feature_coherence``)
is the length of the mean of the member features (1 = uniform region), which mildly demotes
uniform stuff such as sky or walls; *fill* is the mask's share of its bounding box (compact
shapes are more object-like; on COCO this term raised AR@100 by ~60 % and AR@1000 by ~10 %).
Ranking score (stored as ``predicted_iou``, in [0, 1]): the selection score times
``sqrt(support / max support)``, where *support* counts the candidates (from all hierarchies,
variants and regions) that were this mask or a near-duplicate dropped in its favour — masks
many groupings agree on come first — then discounted within its size band: masks are grouped by
area in bands a factor of 4 wide and the r-th best of a band (0-based) is divided by
``(1 + r)^band_discount`` (γ = 0.25), so the first masks of the list cover all object sizes.
Hierarchy: ``parent_id`` is the id of the smallest kept mask that contains the mask (≥ 90 %)
along the merge tree / divided region it came from, -1 for none, and ``level`` its depth
(0 = top).

Output layout: ``<output>/<stem>.json`` (SA-1B format, written atomically), where ``<stem>`` is
the image file name without extension. The ``image.file_name`` field holds the **absolute path**
of the source image (images are not copied; the SA-1B reader accepts absolute paths).
``image_id`` is the image's index in the sorted input list, so it does not depend on sharding.
``failed.txt`` lists images that could not be processed (path, tab, reason); ``--visualize``
writes ``<output>/vis/<stem>.jpg`` overlays. Runs are deterministic (no random state is used;
``--seed`` seeds numpy per image for any future stochastic step).
"""
import glob
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ..utils.files import atomic_write, ensure_writable_dir, remove_stale_temps
from ..utils.images import read_rgb
from .conquer import DEFAULT_THRESHOLDS, merge_graph, merge_selective
from .divide import maskcut
from ..features import ClassicalFeatures, DenseFeatures, build_features
from .refine import Snapper

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class EngineConfig:
    recipe: str = "classical"  # "classical" (PseudoLabeler) | "unsam" (recipe.UnsamLabeler)
    features: str = "classical"
    resolution: int = 480  # long side (pixels) of the whole-image feature grid
    crop_resolution: int = 320  # long side of a divided region's crop
    n_divide: int = 3
    tau: float = 0.15
    thresholds: Tuple[float, ...] = DEFAULT_THRESHOLDS
    min_patches: int = 4
    max_masks: int = 500  # = the trainer's per-image instance cap; pass 1000 to measure AR@1000
    max_area_frac: float = 0.9
    min_refine_iou: float = 0.5
    min_inside_parent: float = 0.9
    dedup_iou: float = 0.8
    band_discount: float = 0.25  # γ of the size-band rank discount of the score (0: none)
    n_superpixels: int = 1800
    # classical backend only: (RBF bandwidth, position weight) per hierarchy; more settings give
    # more diverse candidates (selective search's "diversification") at a linear cost
    variants: Tuple[Tuple[float, float], ...] = ((0.55, 0.25), (0.4, 0.5), (0.8, 0.1))
    # full-resolution colour hierarchy on the superpixel graph (small objects); its smallest
    # reported group in pixels, and its RBF bandwidths (one hierarchy each); () disables it
    colour_bandwidths: Tuple[float, ...] = (0.5,)
    colour_min_pixels: int = 100
    pair_unions: bool = True
    refine_top: int = 1500  # colour-snapped variants of this many best masks (0: off)
    # selective-search-style complete hierarchies (similarity + size + fill) on the superpixel
    # graph of the whole image, one per entry: "features" (first feature variant) / "colour"
    # (full-resolution colour distributions); smallest reported group: colour_min_pixels
    selective: Tuple[str, ...] = ("features",)
    all_merges: bool = True  # every merge is a candidate, not only threshold snapshots
    seed: int = 0
    device: str = "cpu"
    dino_weights: Optional[str] = None
    dino_arch: str = "vit_base_patch8_224"
    # recipe "unsam" only: divide with the CutLER "detector" or whole-image "maskcut" (n_divide,
    # tau); conquer on conquer_size² crops; refine = snap masks to superpixels
    divide: str = "detector"
    divide_config: Optional[str] = None  # None: configs/divide/cutler_cascade_R50_FPN.yaml
    divide_weights: Optional[str] = None
    divide_score: float = 0.1
    conquer_size: int = 256
    refine: bool = False


def read_image(path) -> np.ndarray:
    """Read an image as H×W×3 uint8 RGB, EXIF orientation applied, 16-bit scaled (not clipped)."""
    return read_rgb(path)


def _bbox(mask: np.ndarray) -> Tuple[int, int, int, int]:
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _append_segments(cands: List[Dict], segments, box: Tuple[int, int, int, int], parent: int,
                     divided: Optional[int]) -> None:
    """Append a hierarchy's segments to ``cands``: a segment's parent index (into ``segments``)
    becomes a candidate index, top-level segments get ``parent`` (-1: none)."""
    base = len(cands)
    for seg in segments:
        cands.append(dict(nodes=seg.mask, box=box, coherence=seg.coherence,
                          parent=base + seg.parent if seg.parent >= 0 else parent, divided=divided))


class PseudoLabeler:
    """Turns one RGB image into a list of SA-1B annotations (no human labels)."""

    def __init__(self, cfg: EngineConfig, features: Optional[DenseFeatures] = None):
        self.cfg = cfg
        self.features = features or build_features(cfg.features, cfg.resolution, cfg.device,
                                                    cfg.dino_weights, cfg.dino_arch)

    def _feature_variants(self, image: np.ndarray, resolution: Optional[int] = None) -> List[np.ndarray]:
        """Patch features (h, w, C) under each diversity setting (one for non-classical backends)."""
        if isinstance(self.features, ClassicalFeatures) and self.cfg.variants:
            return [self.features(image, resolution, bandwidth=bw, position_weight=pw)
                    for bw, pw in self.cfg.variants]
        return [self.features(image, resolution)]

    def _conquer(self, feats: np.ndarray, box: Tuple[int, int, int, int], active: np.ndarray,
                 parent: int, divided: Optional[int], snapper: Snapper, cands: List[Dict]) -> None:
        """Conquer one region on the superpixel graph and append its candidates to ``cands``.

        ``feats``: (h, w, C) grid covering the pixel ``box`` = (x0, y0, x1, y1); ``active``: (K,)
        bool superpixels of the region; ``parent``: candidate index for top-level groups (-1:
        none); ``divided``: candidate index of the divided region the groups come from.
        """
        cfg = self.cfg
        sums, weight, cell_area = snapper.node_sums(feats, box)
        # a superpixel belongs to the crop when most of it lies inside the box
        active = active & (weight > 0.5 * snapper.sizes)
        if not active.any():
            return
        segments = merge_graph(sums, weight, snapper.pairs, active, cfg.thresholds,
                               cfg.min_patches * cell_area, cfg.pair_unions, cfg.all_merges)
        _append_segments(cands, segments, box, parent, divided)

    def __call__(self, image: np.ndarray) -> List[Dict]:
        """``image``: H×W×3 uint8 RGB → list of SA-1B annotation dicts (ids 0..K-1)."""
        cfg = self.cfg
        H, W = image.shape[:2]
        variants = self._feature_variants(image)
        feats = variants[0]
        snapper = Snapper(image, cfg.n_superpixels)
        everything = np.ones(snapper.k, bool)

        cands: List[Dict] = []
        # root region: the whole image (each feature variant)
        for vf in variants:
            self._conquer(vf, (0, 0, W, H), everything, -1, None, snapper, cands)
        # colour-only hierarchies from full-resolution colour statistics: the feature grid's
        # cells (~100 px² each at the default resolution) are too coarse for small objects
        for ci, bw in enumerate(cfg.colour_bandwidths):
            sums, weight = snapper.colour_sums(bw, seed=cfg.seed + ci)
            segments = merge_graph(sums, weight, snapper.pairs, everything, cfg.thresholds,
                                   float(cfg.colour_min_pixels), cfg.pair_unions, cfg.all_merges)
            _append_segments(cands, segments, (0, 0, W, H), -1, None)
        boxes = np.stack([snapper.x0, snapper.y0, snapper.x1, snapper.y1], 1)
        for kind in cfg.selective:
            if kind == "features":
                sums = snapper.node_sums(feats, (0, 0, W, H))[0]
            elif kind == "colour":
                sums = self._colour_model(snapper)
            else:
                raise ValueError(f"unknown selective hierarchy '{kind}' (features | colour)")
            segments = merge_selective(sums, snapper.sizes, snapper.pairs, boxes,
                                       float(cfg.colour_min_pixels))
            _append_segments(cands, segments, (0, 0, W, H), -1, None)
        # divided regions: each is a candidate (refined: snapped to superpixels), then is
        # conquered on a zoomed-in crop
        for dmask in maskcut(feats, cfg.n_divide, cfg.tau, min_patches=cfg.min_patches):
            soft, sbox = _grid_to_pixels(dmask, (0, 0, W, H))
            raw = soft > 0.5
            nodes = snapper.soft_to_nodes(soft, sbox)
            if not nodes.any() or not raw.any():
                continue
            # refined/raw agreement check of the divided mask (refine step)
            local, lbox = snapper.nodes_to_mask(nodes)
            if _box_iou(local, lbox, raw, sbox) < cfg.min_refine_iou:
                continue
            div_index = len(cands)
            cands.append(dict(nodes=nodes, box=(0, 0, W, H),
                              coherence=float(np.linalg.norm(feats[dmask].mean(0))),
                              parent=-1, divided=None))
            dx0, dy0, dx1, dy1 = lbox
            # crop with a small margin so the region's border has context
            mx, my = int(0.05 * (dx1 - dx0)) + 4, int(0.05 * (dy1 - dy0)) + 4
            crop = (max(0, dx0 - mx), max(0, dy0 - my), min(W, dx1 + mx), min(H, dy1 + my))
            # one feature setting per crop: the divided regions add zoomed-in detail, the
            # variants' diversity is spent on the whole image
            cfeats = self._feature_variants(image[crop[1]:crop[3], crop[0]:crop[2]], cfg.crop_resolution)[0]
            self._conquer(cfeats, crop, nodes, div_index, div_index, snapper, cands)
        return self._finish(cands, snapper, (H, W))

    def _colour_model(self, snapper: Snapper) -> np.ndarray:
        """(K, 64) colour-distribution sums at the first colour bandwidth (0.5 when none is
        set), for the colour selective hierarchy and the colour snap."""
        bw = self.cfg.colour_bandwidths[0] if self.cfg.colour_bandwidths else 0.5
        return snapper.colour_sums(bw, seed=self.cfg.seed)[0]

    @staticmethod
    def _score(node_matrix: np.ndarray, kept: List[Dict], snapper: Snapper):
        """(M, K) bool masks → (boundary (M,), selection score (M,)); see the module docstring."""
        boundary = snapper.boundary_strength(node_matrix)
        fill = np.array([k["area"] for k in kept]) / snapper.box_area(node_matrix)
        coherence = np.array([k["coherence"] for k in kept])
        return boundary, boundary * (1.0 - 0.5 * coherence) * fill

    def _finish(self, cands: List[Dict], snapper: Snapper, shape: Tuple[int, int]) -> List[Dict]:
        """Filter, refine, score, de-duplicate, rank and build the annotations."""
        cfg = self.cfg
        H, W = shape
        sizes = snapper.sizes
        max_area = cfg.max_area_frac * H * W
        kept: List[Dict] = []
        index_map: Dict[int, int] = {}
        seen: Dict[bytes, int] = {}
        for ci, c in enumerate(cands):
            nodes = c["nodes"]
            key = np.packbits(nodes).tobytes()
            if key in seen:
                # the same superpixel set from another variant / region: one mask, first parent
                index_map[ci] = seen[key]
                kept[seen[key]]["support"] += 1
                continue
            area = float(sizes[nodes].sum())
            if area == 0 or area > max_area:
                continue
            if c["divided"] is not None:
                parent_nodes = cands[c["divided"]]["nodes"]
                if sizes[nodes & parent_nodes].sum() < cfg.min_inside_parent * area:
                    continue
            seen[key] = index_map[ci] = len(kept)
            kept.append(dict(nodes=nodes, area=area, coherence=c["coherence"], cand=ci, support=1))
        if not kept:
            return []
        node_matrix = np.stack([k["nodes"] for k in kept])  # (M, K) bool
        boundary, score = self._score(node_matrix, kept, snapper)
        if cfg.refine_top > 0:
            # colour-snapped variants of the best masks: border superpixels re-assigned to the
            # inside / outside colour model (extra candidates; the original stays)
            top = np.argsort(-score, kind="stable")[:cfg.refine_top]
            colour = self._colour_model(snapper)
            n_base = len(kept)
            for ki, nodes in zip(top.tolist(), snapper.reassign_border(node_matrix[top], colour)):
                key = np.packbits(nodes).tobytes()
                if key in seen:
                    kept[seen[key]]["support"] += 1
                    continue
                area = float(sizes[nodes].sum())
                if area == 0 or area > max_area:
                    continue
                seen[key] = len(kept)
                kept.append(dict(nodes=nodes, area=area, coherence=kept[ki]["coherence"],
                                 cand=kept[ki]["cand"], support=1))
            if len(kept) > n_base:
                extra = np.stack([k["nodes"] for k in kept[n_base:]])
                b2, s2 = self._score(extra, kept[n_base:], snapper)
                node_matrix = np.concatenate([node_matrix, extra])
                boundary, score = np.concatenate([boundary, b2]), np.concatenate([score, s2])
        areas = np.array([k["area"] for k in kept])
        support = np.array([k["support"] for k in kept], np.float64)
        order = sorted(range(len(kept)), key=lambda i: (-score[i], -areas[i], i))
        chosen_arr = np.empty(max(1, min(cfg.max_masks, len(order))), np.int64)
        n_chosen = 0
        replaced_by: Dict[int, int] = {}
        for i in order:
            if n_chosen:
                ch = chosen_arr[:n_chosen]
                # IoU <= min(area)/max(area): only masks of similar area can be duplicates
                near = ch[np.minimum(areas[ch], areas[i]) > cfg.dedup_iou * np.maximum(areas[ch], areas[i])]
                if len(near):
                    inter = (node_matrix[near] & node_matrix[i]) @ sizes
                    iou = inter / (areas[near] + areas[i] - inter)
                    if iou.max() > cfg.dedup_iou:
                        j = replaced_by[i] = int(near[int(np.argmax(iou))])
                        support[j] += support[i]  # the duplicate's votes go to the kept mask
                        continue
            chosen_arr[n_chosen] = i
            n_chosen += 1
            if n_chosen >= cfg.max_masks:
                break
        chosen = chosen_arr[:n_chosen].tolist()
        # ranking: the selection score times the (relative) support, so masks that many
        # hierarchies / variants / regions agree on come first (on COCO this mainly raised
        # AR@10/100); then the size-band discount: the r-th best mask (0-based) of an area band
        # (factor 4 wide) has its score divided by (1 + r)^γ, so the top of the list spreads
        # over object sizes instead of filling up with one size
        ch = np.asarray(chosen)
        rank = score.copy()
        rank[ch] *= np.sqrt(support[ch] / support[ch].max())
        band = np.floor(np.log2(np.maximum(areas, 1.0)) / 2.0)
        seen_in_band: Dict[float, int] = {}
        for i in sorted(chosen, key=lambda i: (-rank[i], -areas[i], i)):
            r = seen_in_band.get(band[i], 0)
            seen_in_band[band[i]] = r + 1
            rank[i] /= (1.0 + r) ** cfg.band_discount
        chosen.sort(key=lambda i: (-rank[i], -areas[i], i))
        chosen_set = set(chosen)

        def resolve_parent(ki: int) -> int:
            """Walk up the candidate tree to the nearest ancestor that survived."""
            ci = cands[kept[ki]["cand"]]["parent"]
            steps = 0
            while ci >= 0 and steps < 10000:
                steps += 1
                kj = index_map.get(ci)
                if kj is not None:
                    kj = replaced_by.get(kj, kj)
                    # a parent must be larger than its child and contain (≥ 90 % of) it; a
                    # duplicate swap can break that, then the walk goes on upwards
                    if (kj in chosen_set and kj != ki and areas[kj] > areas[ki]
                            and sizes[node_matrix[ki] & node_matrix[kj]].sum() >= cfg.min_inside_parent * areas[ki]):
                        return kj
                ci = cands[ci]["parent"]
            return -1

        new_id = {ki: n for n, ki in enumerate(chosen)}
        parents = {ki: resolve_parent(ki) for ki in chosen}

        def depth(ki: int) -> int:
            d, cur = 0, parents[ki]
            while cur >= 0 and d < 100:
                d, cur = d + 1, parents[cur]
            return d

        anns = []
        for ki in chosen:
            k = kept[ki]
            mask, (x0, y0, x1, y1) = snapper.nodes_to_mask(k["nodes"])
            full = np.zeros((H, W), np.uint8, order="F")  # pycocotools wants Fortran order
            full[y0:y1, x0:x1] = mask
            rle = mask_utils.encode(full)
            # a point well inside the mask: maximum of the distance transform
            dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)
            py, px = np.unravel_index(int(np.argmax(dist)), dist.shape)
            bx0, by0, bx1, by1 = cands[k["cand"]]["box"]
            anns.append({
                "id": new_id[ki],
                "segmentation": {"size": [H, W], "counts": rle["counts"].decode("ascii")},
                "area": int(k["area"]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "predicted_iou": round(float(rank[ki]), 6),
                "stability_score": round(float(boundary[ki]), 6),
                "feature_coherence": round(float(k["coherence"]), 6),
                "point_coords": [[float(x0 + px - 1), float(y0 + py - 1)]],
                "crop_box": [int(bx0), int(by0), int(bx1 - bx0), int(by1 - by0)],
                "level": depth(ki),
                "parent_id": new_id[parents[ki]] if parents[ki] >= 0 else -1,
            })
        return anns


def _box_iou(m1: np.ndarray, b1, m2: np.ndarray, b2) -> float:
    """IoU of two masks given local to their boxes (x0, y0, x1, y1)."""
    inter_frac = _inside_fraction(m1, b1, m2, b2) * m1.sum()
    union = m1.sum() + m2.sum() - inter_frac
    return float(inter_frac / union) if union > 0 else 0.0


def _grid_to_pixels(mask: np.ndarray, box: Tuple[int, int, int, int]):
    """Bilinear upsampling of the part of a (h, w) grid mask that is set, where the grid covers
    the pixel ``box``. Returns (soft (Y, X) float32, its pixel box (x0, y0, x1, y1))."""
    x0, y0, x1, y1 = box
    gh, gw = mask.shape
    sx, sy = (x1 - x0) / gw, (y1 - y0) / gh
    gx0, gy0, gx1, gy1 = _bbox(mask)
    # one cell of margin so the bilinear ramp at the border is not cut off
    gx0, gy0, gx1, gy1 = max(0, gx0 - 1), max(0, gy0 - 1), min(gw, gx1 + 1), min(gh, gy1 + 1)
    px0, py0 = x0 + int(round(gx0 * sx)), y0 + int(round(gy0 * sy))
    px1, py1 = x0 + int(round(gx1 * sx)), y0 + int(round(gy1 * sy))
    sub = mask[gy0:gy1, gx0:gx1].astype(np.float32)
    soft = cv2.resize(sub, (max(1, px1 - px0), max(1, py1 - py0)), interpolation=cv2.INTER_LINEAR)
    return soft, (px0, py0, px0 + soft.shape[1], py0 + soft.shape[0])


def _inside_fraction(mask: np.ndarray, box, parent: np.ndarray, pbox) -> float:
    """Share of ``mask`` (local to ``box``) that lies inside ``parent`` (local to ``pbox``)."""
    x0, y0, x1, y1 = box
    px0, py0, px1, py1 = pbox
    ix0, iy0, ix1, iy1 = max(x0, px0), max(y0, py0), min(x1, px1), min(y1, py1)
    total = mask.sum()
    if total == 0 or ix1 <= ix0 or iy1 <= iy0:
        return 0.0
    inter = (mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] & parent[iy0 - py0:iy1 - py0, ix0 - px0:ix1 - px0]).sum()
    return float(inter) / float(total)


# ------------------------------------------------------------------------------- batch runner
def list_images(spec: str) -> List[Path]:
    """``spec``: a folder (non-recursive, image extensions) or a glob pattern → sorted paths."""
    p = Path(spec)
    if p.is_dir():
        files = [f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
    else:
        files = [Path(f) for f in glob.glob(spec, recursive=True)
                 if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if not files and not any(ch in spec for ch in "*?["):
            raise FileNotFoundError(f"input not found: {spec}")
    if not files:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) in/matching '{spec}'")
    files = sorted({f.resolve() for f in files})
    stems: Dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise ValueError(f"two input images share the output name '{f.stem}.json': "
                             f"{stems[f.stem]} and {f}")
        stems[f.stem] = f
    return files


def select(files: Sequence[Path], start_id: int = 0, end_id: Optional[int] = None,
           shard: Tuple[int, int] = (0, 1)) -> List[Tuple[int, Path]]:
    """(image_id, path) pairs for ``files[start_id:end_id]`` that fall in shard ``i`` of ``n``."""
    i, n = shard
    if not (0 <= i < n):
        raise ValueError(f"bad shard {i}/{n}: need 0 <= i < n")
    end = len(files) if end_id is None else min(end_id, len(files))
    return [(k, files[k]) for k in range(max(0, start_id), end) if k % n == i]


def draw_overlay(image: np.ndarray, anns: List[Dict], max_masks: int = 50) -> np.ndarray:
    """The top ``max_masks`` masks blended with the photo and outlined (:func:`unsam.visualize.draw_masks`)."""
    from ..data.sa1b import rle_to_mask
    from ..visualize import draw_masks

    masks = [rle_to_mask(a["segmentation"]) for a in anns[:max_masks]]
    return draw_masks(image, np.array(masks, dtype=bool).reshape(-1, *image.shape[:2]))


_WORKER: Dict = {}


def build_labeler(cfg: EngineConfig):
    """The per-image labeler of ``cfg.recipe``: ``__call__(image H×W×3 uint8 RGB) -> annotations``."""
    if cfg.recipe == "classical":
        return PseudoLabeler(cfg)
    if cfg.recipe == "unsam":
        from .recipe import UnsamLabeler

        return UnsamLabeler(cfg)
    raise ValueError(f"unknown recipe '{cfg.recipe}' (classical | unsam)")


def _init_worker(cfg: EngineConfig, labeler=None) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER["labeler"] = labeler if labeler is not None else build_labeler(cfg)


def _process(task) -> Tuple[int, str, Optional[str], int]:
    """Worker body: returns (image_id, path, error or None, n_masks)."""
    from ..data.sa1b import write_sa1b_json

    image_id, path, out_dir, visualize, seed = task
    labeler = _WORKER["labeler"]
    try:
        image = read_image(path)
    except Exception as e:  # unreadable / truncated / not an image
        return image_id, str(path), f"unreadable image: {e}", 0
    try:
        np.random.seed((seed + image_id) % (2 ** 32))
        anns = labeler(image)
        h, w = image.shape[:2]
        info = {"image_id": int(image_id), "width": int(w), "height": int(h),
                "file_name": str(Path(path).resolve())}
        if visualize:
            vis_dir = Path(out_dir) / "vis"
            vis_dir.mkdir(parents=True, exist_ok=True)
            ov = draw_overlay(image, anns)
            cv2.imwrite(str(vis_dir / f"{Path(path).stem}.jpg"), cv2.cvtColor(ov, cv2.COLOR_RGB2BGR))
        write_sa1b_json(Path(out_dir) / f"{Path(path).stem}.json", info, anns)
        return image_id, str(path), None, len(anns)
    except Exception as e:
        logger.debug("failure on %s:\n%s", path, traceback.format_exc())
        return image_id, str(path), f"{type(e).__name__}: {e}", 0


@dataclass
class RunSummary:
    total: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    masks: int = 0
    seconds: float = 0.0
    failures: List[Tuple[str, str]] = field(default_factory=list)


def run(input_spec: str, output_dir: str, cfg: EngineConfig, shard=(0, 1), start_id: int = 0,
        end_id: Optional[int] = None, workers: int = 1, visualize: bool = False,
        progress: bool = True, labeler=None) -> RunSummary:
    """Label every selected image that has no output yet. Returns a :class:`RunSummary`.

    ``labeler``: an already built labeler for ``cfg`` (used when ``workers`` ≤ 1, so a caller
    that built one to check its weights does not build it twice)."""
    from tqdm import tqdm

    files = list_images(input_spec)
    out = ensure_writable_dir(output_dir)  # before any image is labelled
    tasks = select(files, start_id, end_id, shard)
    summary = RunSummary(total=len(tasks))
    todo = []
    for image_id, path in tasks:
        if (out / f"{path.stem}.json").exists():
            summary.skipped += 1  # finished earlier (files are written atomically)
        else:
            todo.append((image_id, str(path), str(out), visualize, cfg.seed))
    logger.info("%d images selected, %d already done, %d to label", len(tasks), summary.skipped, len(todo))
    # half-written files of a killed run; only this run's names, other shards may be writing
    todo_names = {f"{Path(t[1]).stem}.json" for t in todo}
    stale = remove_stale_temps(out, todo_names.__contains__)
    if stale:
        logger.info("removed %d temporary files of interrupted writes", stale)
    t0 = time.time()
    bar = tqdm(total=len(todo), unit="img", disable=not progress, desc="pseudo-labels")
    if workers <= 1:
        _init_worker(cfg, labeler)
        results = (_process(t) for t in todo)
        pool = None
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(cfg,))
        results = pool.imap(_process, todo, chunksize=1)
    try:
        for image_id, path, err, n in results:
            if err is None:
                summary.done += 1
                summary.masks += n
            else:
                summary.failed += 1
                summary.failures.append((path, err))
                logger.warning("skipping %s: %s", path, err)
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    summary.seconds = time.time() - t0
    failed_path = out / "failed.txt"
    if summary.failures:
        with atomic_write(failed_path) as f:
            f.write("".join(f"{p}\t{e}\n" for p, e in summary.failures))
    elif failed_path.exists() and summary.done:
        failed_path.unlink()  # earlier failures were retried successfully
    return summary
