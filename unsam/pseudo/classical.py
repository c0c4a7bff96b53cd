"""Recipe ``classical``, the offline default: one image → SA-1B annotations
(:class:`ClassicalLabeler`, settings :class:`ClassicalSettings`).

Per image (:meth:`ClassicalLabeler.__call__`):

1. **features**: patch features of the whole image (:mod:`unsam.features`) and superpixels
   (:class:`unsam.pseudo.refine.SuperpixelGraph`);
2. **divide**: MaskCut gives ``n_divide`` regions on the patch grid; each is refined by snapping
   to superpixels (dropped if the snapped/raw IoU < ``min_refine_iou``); the whole image is the
   root region;
3. **conquer**: the patch features are pooled onto the superpixels (pixel-weighted means), and
   adjacent groups are merged bottom-up over the threshold hierarchy
   (:func:`unsam.pseudo.conquer.merge_graph`). The root is conquered with every classical
   feature *variant* (RBF bandwidth / position weight: selective-search-style diversification);
   each divided region is cropped to its box (plus a margin), its features recomputed on the
   crop (a zoom-in: long side ``crop_resolution``) and conquered inside the region. Merging
   superpixels rather than grid patches is a deliberate change from the patch-grid description
   in the design: masks then follow image edges at pixel level (on COCO the grid-then-snap
   variant was clearly worse); :func:`unsam.pseudo.conquer.merge_hierarchy` is the patch-grid
   form of the same merging. The whole image is also conquered once per ``colour_bandwidths``
   entry on full-resolution colour distributions of the superpixels
   (:meth:`SuperpixelGraph.colour_sums`, smallest group ``colour_min_pixels``): the feature
   grid's cells are too coarse for small objects, and this colour-only hierarchy (selective
   search's colour similarity) supplies them.
   Finally one complete selective-search-style hierarchy per ``selective`` entry (similarity +
   size + fill, :func:`unsam.pseudo.conquer.merge_selective`) adds balanced, compact groupings,
   and one contour hierarchy per ``boundary`` (edge-map σ, size power) pair
   (:func:`unsam.pseudo.conquer.merge_boundary`: weakest shared border first, an ultrametric
   contour map on the superpixels) adds groupings that follow outlines rather than appearance
   (on the shared COCO subsets: AR@1000 +15–20 %);
4. **filter** (:mod:`unsam.pseudo.candidates` from here on): masks > ``max_area_frac`` (90 %) of
   the image and conquered masks less than ``min_inside_parent`` (90 %) inside their divided
   region are dropped;
5. **refine**: the ``refine_top`` best masks (by selection score) also get a colour-snapped
   variant (:meth:`SuperpixelGraph.reassign_border`: border superpixels re-assigned to the
   better-fitting of the inside / outside colour models), an extra candidate next to the
   original (on the first 20 COCO sample images: AR@1000 0.153 → 0.159). Snapping by the patch
   features or twice by colour added a little more on 40 images but nothing on all 80, at ~10 %
   more time;
6. near-duplicates (IoU > ``dedup_iou`` = 0.8) are dropped, best selection score first, and at
   most ``max_masks`` masks are kept;
7. **polish**: each kept mask is replaced by the best-scored of itself and its polished
   variants — one pass of iterated conditional modes on a GrabCut-style energy on the superpixel
   graph (colour models of the mask and its ring, pair weights that make cutting along image
   edges cheap; :meth:`SuperpixelGraph.polish`), one variant per ``polish_edge_scales`` entry, twice
   (``polish_rounds``: the second pass starts from the first's masks). Hierarchy
   masks are roughly right but stop where a greedy merge happened to stop; the polish moves
   their borders onto edges, which raises recall at the strict IoU thresholds — in ranking
   order → SA-1B JSON.

Selection score: ``boundary × (1 − coherence / 2) × fill × straddle``. *boundary* (stored as
``stability_score``) is the mean image-edge strength along the mask border relative to the
image's mean, squashed to [0, 1) (masks that end on edges); *coherence* (``feature_coherence``)
is the length of the mean of the member features (1 = uniform region), which mildly demotes
uniform stuff such as sky or walls; *fill* is the mask's share of its bounding box (compact
shapes are more object-like; on COCO this term raised AR@100 by ~60 % and AR@1000 by ~10 %);
*straddle* is ``sqrt(max(0.4, 1 − straddling))``, where *straddling* (Alexe et al.'s
superpixel straddling, :meth:`SuperpixelGraph.straddling`) measures how much the mask's border cuts
through the superpixels of a coarser over-segmentation (``straddle_superpixels``, 700): masks
that lie inside one coarse superpixel — mostly small texture fragments — give up their places
among the ``max_masks`` to medium and large masks.
Ranking score (stored as ``predicted_iou``, in [0, 1]): the selection score times
``sqrt(support / max support)``, where *support* counts the candidates (from all hierarchies,
variants and regions) that were this mask or a near-duplicate dropped in its favour — masks
many groupings agree on come first — then discounted within its size band: masks are grouped by
area in bands a factor of 4 wide and the r-th best of a band (0-based) is divided by
``(1 + r)^band_discount`` (γ = 0.25), so the first masks of the list cover all object sizes.
Hierarchy: ``parent_id`` is the id of the smallest kept mask that contains the mask (≥ 90 %)
along the merge tree / divided region it came from, -1 for none, and ``level`` its depth
(0 = top).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from ..features import ClassicalFeatures, DenseFeatures, build_features
from .candidates import Box, Candidate, add_segments, select_annotations
from .config import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    SHARE,
    DivideConquerSettings,
    Range,
    setting,
)
from .conquer import RegionGraph, merge_boundary, merge_graph, merge_selective
from .divide import maskcut
from .refine import SuperpixelGraph
from .threads import single_threaded

# a divided region's crop reaches this share of its box size plus a few pixels beyond the box,
# so the region's border is seen with some context
CROP_MARGIN = 0.05
CROP_MARGIN_PX = 4
# a soft (bilinear) mask is binarised at one half; a superpixel counts as inside a crop when
# more than this share of it lies in the crop's box
MAJORITY = 0.5
# colour-model bandwidth for the selective "colour" hierarchy and the colour snap when
# ``colour_bandwidths`` is empty (the default setting's value)
DEFAULT_COLOUR_BANDWIDTH = 0.5


@dataclass
class ClassicalSettings(DivideConquerSettings):
    """The settings of recipe ``classical`` (``python -m unsam.pseudo`` options, the settings
    record of its output folders): the features, divide and conquer of
    :class:`~unsam.pseudo.config.DivideConquerSettings` and these."""

    crop_resolution: int = setting(320, "long side of a divided region's crop", valid=AT_LEAST_1)
    # = the trainer's per-image instance cap; pass 1000 to measure AR@1000
    max_masks: int = setting(500, "masks kept per image, best first", valid=AT_LEAST_1)
    max_area_frac: float = setting(
        0.9,
        "drop masks covering more than this share of the image",
        valid=Range(0, 1, lo_open=True),
    )
    min_refine_iou: float = setting(
        0.5, "drop a divided mask whose superpixel-snapped / raw IoU is below this", valid=SHARE
    )
    dedup_iou: float = setting(
        0.8, "drop a mask whose IoU with a better-scored one exceeds this", valid=SHARE
    )
    band_discount: float = setting(
        0.25, "γ of the size-band rank discount of the score (0: none)", valid=NON_NEGATIVE
    )
    straddle_superpixels: int = setting(
        700,
        "superpixels of the coarse over-segmentation whose straddling by a mask's border "
        "demotes the mask in the selection score (0: no straddling term)",
        valid=NON_NEGATIVE,
    )
    # more feature settings give more diverse candidates (selective search's
    # "diversification") at a linear cost
    variants: Tuple[Tuple[float, float], ...] = setting(
        ((0.55, 0.25), (0.4, 0.5), (0.8, 0.1)),
        "classical features: one whole-image hierarchy per BANDWIDTH,POSITION_WEIGHT pair",
        valid=(Range(0, lo_open=True, name="BANDWIDTH"), Range(0, name="POSITION_WEIGHT")),
    )
    colour_bandwidths: Tuple[float, ...] = setting(
        (0.5,),
        "RBF bandwidths of the full-resolution colour hierarchies on the superpixels "
        "(small objects), one hierarchy each; none: pass the flag alone",
        valid=POSITIVE,
    )
    colour_min_pixels: int = setting(
        100, "smallest group of the colour and selective hierarchies, in pixels", valid=NON_NEGATIVE
    )
    pair_unions: bool = setting(
        True, "add the union of every two adjacent groups of each merge snapshot as a candidate"
    )
    all_merges: bool = setting(True, "every merge is a candidate, not only threshold snapshots")
    refine_top: int = setting(
        1500, "add a colour-snapped variant of this many best masks (0: off)", valid=NON_NEGATIVE
    )
    polish_edge_scales: Tuple[float, ...] = setting(
        (0.5, 1.0, 3.0),
        "polish the kept masks: per mask, the best-scored of itself and one pass "
        "of colour + edge ICM per edge scale (pair weight exp(-edge / scale)); none: pass the "
        "flag alone",
        valid=POSITIVE,
    )
    polish_rounds: int = setting(
        2, "polish passes (each from the previous pass's masks)", valid=NON_NEGATIVE
    )
    polish_weight: float = setting(
        0.1,
        "weight of the colour term of the polish (per pixel) "
        "against the edge term (per border pixel)",
        valid=NON_NEGATIVE,
    )
    selective: Tuple[str, ...] = setting(
        ("features",),
        "selective-search-style complete hierarchies (similarity + size + fill) "
        "to add (none: pass the flag alone)",
        choices=("features", "colour"),
    )
    boundary: Tuple[Tuple[float, float], ...] = setting(
        ((1.0, 0.5), (1.0, 1.0), (3.0, 0.5)),
        "contour (UCM-style) hierarchies on the superpixel "
        "graph, weakest shared border first: one per SIGMA,SIZE_POWER pair (Gaussian σ of the "
        "edge map, exponent of the size term; none: pass the flag alone)",
        valid=(Range(0, lo_open=True, name="SIGMA"), Range(0, name="SIZE_POWER")),
    )
    seed: int = setting(
        0, "seed of the random Fourier features of the colour embedding", valid=SEED
    )


@dataclass
class DividedRegion:
    """A MaskCut region snapped to superpixels."""

    nodes: np.ndarray  # (K,) bool superpixels
    coherence: float  # |mean patch feature| of the raw region
    crop: Box  # the region's box plus margin, clipped to the image


class ClassicalLabeler:
    """Recipe ``classical``: turns one RGB image into a list of SA-1B annotations (no human
    labels). ``features`` replaces the backend built from ``cfg`` (tests, benchmarks)."""

    def __init__(self, cfg: ClassicalSettings, features: Optional[DenseFeatures] = None):
        self.cfg = cfg
        self.features = features or build_features(
            cfg.features, cfg.resolution, cfg.device, cfg.dino_weights, cfg.dino_arch
        )

    def __call__(self, image: np.ndarray) -> List[Dict]:
        """``image``: H×W×3 uint8 RGB → list of SA-1B annotation dicts (ids 0..K-1).

        Runs on one torch / OpenCV / OpenBLAS thread (:func:`unsam.pseudo.threads.single_threaded`),
        so the output does not depend on the thread settings or the core count."""
        with single_threaded():
            return self._label(image)

    def _label(self, image: np.ndarray) -> List[Dict]:
        variants = self._feature_variants(image)
        graph = SuperpixelGraph(image, self.cfg.n_superpixels, self.cfg.straddle_superpixels)
        cands: List[Candidate] = []
        self._conquer_whole_image(variants, graph, cands)
        for region in self._divide(variants[0], graph):
            self._conquer_region(image, region, graph, cands)
        colour = (
            self._colour_model(graph)
            if self.cfg.refine_top > 0 or self.cfg.polish_edge_scales
            else None
        )
        return select_annotations(cands, graph, colour, self.cfg)

    # -- 1. features ---------------------------------------------------------------------
    def _feature_variants(
        self, image: np.ndarray, resolution: Optional[int] = None, first_only: bool = False
    ) -> List[np.ndarray]:
        """Patch features (h, w, C) under each diversity setting (one for non-classical
        backends, or with ``first_only``)."""
        if isinstance(self.features, ClassicalFeatures) and self.cfg.variants:
            variants = self.cfg.variants[:1] if first_only else self.cfg.variants
            return [
                self.features(image, resolution, bandwidth=bw, position_weight=pw)
                for bw, pw in variants
            ]
        return [self.features(image, resolution)]

    def _colour_model(self, graph: SuperpixelGraph) -> np.ndarray:
        """(K, 64) colour-distribution sums at the first colour bandwidth, for the colour
        selective hierarchy and the colour snap."""
        bw = (
            self.cfg.colour_bandwidths[0]
            if self.cfg.colour_bandwidths
            else DEFAULT_COLOUR_BANDWIDTH
        )
        return graph.colour_sums(bw, seed=self.cfg.seed)[0]

    # -- 2. divide -----------------------------------------------------------------------
    def _divide(self, feats: np.ndarray, graph: SuperpixelGraph) -> List[DividedRegion]:
        """MaskCut regions of the whole image's features, snapped to superpixels; a region
        whose snapped / raw IoU is below ``min_refine_iou`` is dropped."""
        H, W = graph.shape
        regions = []
        for grid_mask in maskcut(
            feats, self.cfg.n_divide, self.cfg.tau, min_patches=self.cfg.min_patches
        ):
            soft, sbox = _grid_to_pixels(grid_mask, (0, 0, W, H))
            raw = soft > MAJORITY
            nodes = graph.soft_to_nodes(soft, sbox)
            if not nodes.any() or not raw.any():
                continue
            local, (x0, y0, x1, y1) = graph.nodes_to_mask(nodes)
            if _box_iou(local, (x0, y0, x1, y1), raw, sbox) < self.cfg.min_refine_iou:
                continue
            mx = int(CROP_MARGIN * (x1 - x0)) + CROP_MARGIN_PX
            my = int(CROP_MARGIN * (y1 - y0)) + CROP_MARGIN_PX
            crop = (max(0, x0 - mx), max(0, y0 - my), min(W, x1 + mx), min(H, y1 + my))
            regions.append(
                DividedRegion(nodes, float(np.linalg.norm(feats[grid_mask].mean(0))), crop)
            )
        return regions

    # -- 3. conquer ----------------------------------------------------------------------
    def _conquer_whole_image(
        self, variants: List[np.ndarray], graph: SuperpixelGraph, cands: List[Candidate]
    ) -> None:
        """The root region's hierarchies: one per feature variant, one per colour bandwidth,
        one per selective-search kind, one contour hierarchy per ``boundary`` (edge-map σ, size
        power) pair."""
        cfg = self.cfg
        H, W = graph.shape
        whole = (0, 0, W, H)
        everything = np.ones(graph.k, bool)
        for feats in variants:
            self._conquer(feats, whole, everything, graph, cands)
        # colour-only hierarchies from full-resolution colour statistics: the feature grid's
        # cells (~100 px² each at the default resolution) are too coarse for small objects
        for i, bw in enumerate(cfg.colour_bandwidths):
            sums, weight = graph.colour_sums(bw, seed=cfg.seed + i)
            add_segments(
                cands,
                merge_graph(
                    RegionGraph(sums, weight, graph.pairs),
                    everything,
                    cfg.thresholds,
                    float(cfg.colour_min_pixels),
                    pair_unions=cfg.pair_unions,
                    all_merges=cfg.all_merges,
                ),
                whole,
            )
        boxes = np.stack([graph.x0, graph.y0, graph.x1, graph.y1], 1)
        for kind in cfg.selective:
            if kind == "features":
                sums = graph.node_sums(variants[0], whole)[0]
            elif kind == "colour":
                sums = self._colour_model(graph)
            else:
                raise ValueError(f"unknown selective hierarchy '{kind}' (features | colour)")
            add_segments(
                cands,
                merge_selective(
                    sums, graph.sizes, graph.pairs, boxes, float(cfg.colour_min_pixels)
                ),
                whole,
            )
        for sigma, size_power in cfg.boundary:
            add_segments(
                cands,
                merge_boundary(
                    graph.pairs,
                    graph.border_len,
                    graph.border_edges(sigma),
                    graph.sizes,
                    float(cfg.colour_min_pixels),
                    size_power,
                ),
                whole,
            )

    def _conquer_region(
        self,
        image: np.ndarray,
        region: DividedRegion,
        graph: SuperpixelGraph,
        cands: List[Candidate],
    ) -> None:
        """A divided region is a candidate itself, then is conquered on a zoomed-in crop with
        one feature setting (the variants' diversity is spent on the whole image)."""
        H, W = graph.shape
        index = len(cands)
        cands.append(Candidate(region.nodes, (0, 0, W, H), region.coherence))
        x0, y0, x1, y1 = region.crop
        feats = self._feature_variants(
            image[y0:y1, x0:x1], self.cfg.crop_resolution, first_only=True
        )[0]
        self._conquer(feats, region.crop, region.nodes, graph, cands, parent=index, region=index)

    def _conquer(
        self,
        feats: np.ndarray,
        box: Box,
        active: np.ndarray,
        graph: SuperpixelGraph,
        cands: List[Candidate],
        parent: int = -1,
        region: int = -1,
    ) -> None:
        """Conquer one region on the superpixel graph and append its candidates to ``cands``.

        ``feats``: (h, w, C) grid covering the pixel ``box``; ``active``: (K,) bool superpixels
        of the region; ``parent``: candidate index for top-level groups (-1: none); ``region``:
        candidate index of the divided region the groups come from (-1: the whole image).
        """
        sums, weight, cell_area = graph.node_sums(feats, box)
        # a superpixel belongs to the crop when most of it lies inside the box
        active = active & (weight > MAJORITY * graph.sizes)
        if not active.any():
            return
        segments = merge_graph(
            RegionGraph(sums, weight, graph.pairs),
            active,
            self.cfg.thresholds,
            self.cfg.min_patches * cell_area,
            pair_unions=self.cfg.pair_unions,
            all_merges=self.cfg.all_merges,
        )
        add_segments(cands, segments, box, parent, region)


# -- pixel helpers of the divide step ---------------------------------------------------------
def _bbox(mask: np.ndarray) -> Box:
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _grid_to_pixels(mask: np.ndarray, box: Box) -> Tuple[np.ndarray, Box]:
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


def _box_iou(m1: np.ndarray, b1: Box, m2: np.ndarray, b2: Box) -> float:
    """IoU of two bool masks given local to their pixel boxes."""
    x0, y0 = max(b1[0], b2[0]), max(b1[1], b2[1])
    x1, y1 = min(b1[2], b2[2]), min(b1[3], b2[3])
    inter = 0
    if x1 > x0 and y1 > y0:
        inter = (
            m1[y0 - b1[1] : y1 - b1[1], x0 - b1[0] : x1 - b1[0]]
            & m2[y0 - b2[1] : y1 - b2[1], x0 - b2[0] : x1 - b2[0]]
        ).sum()
    union = m1.sum() + m2.sum() - inter
    return float(inter / union) if union > 0 else 0.0
