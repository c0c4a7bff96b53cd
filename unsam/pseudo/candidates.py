"""From conquered candidates to ranked SA-1B annotations (recipe ``classical``, steps 4–6).

:class:`Candidate` is one group of superpixels that a hierarchy or the divide step produced;
:class:`MaskTable` holds the distinct masks among them (segment-anything's ``MaskData`` for
this engine: one row per mask). :func:`select_annotations` runs the stages in order:

``distinct_masks`` (filter) → ``score_masks`` → ``add_colour_snaps`` (refine) →
``deduplicate`` → ``polish`` → ``rank`` → ``resolve_parents`` → ``annotations``

— see :mod:`unsam.pseudo.classical` for what each one does and why.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..io.sa1b import annotation_from_mask
from .refine import SuperpixelGraph

Box = Tuple[int, int, int, int]  # pixels (x0, y0, x1, y1), x1 / y1 exclusive

# weight of the coherence term of the selection score, boundary × (1 − w·coherence) × fill:
# uniform stuff (sky, walls; coherence near 1) is demoted mildly, not dropped
COHERENCE_WEIGHT = 0.5
# the straddling term of the selection score, sqrt(max(floor, 1 − straddling)), never divides a
# score by more than 1/sqrt(floor): masks inside one coarse superpixel (small ones mostly) are
# demoted, not dropped. On the first 20 photos of each shared set (1000 masks, before the
# polish), floor 0.4 gave AR@1000 +0.008 (val) / +0.016 (train); no floor: +0.003 / +0.012
# (small objects lost); 0.5–0.6 or the power 1 in between
STRADDLE_FLOOR = 0.4


@dataclass
class Candidate:
    """One candidate mask, before filtering."""

    nodes: np.ndarray  # (K,) bool superpixels
    box: Box  # the region it was conquered in (its annotation's crop_box)
    coherence: float  # |mean member feature| in [0, 1]
    parent: int = -1  # the candidate it belongs to next (merge tree / divided region); -1: none
    region: int = -1  # the divided region's candidate it must lie inside; -1: the whole image


def add_segments(
    cands: List[Candidate], segments, box: Box, parent: int = -1, region: int = -1
) -> None:
    """Append a hierarchy's :class:`~unsam.pseudo.conquer.Segment` list (parents first) to
    ``cands``: a segment's parent (an index into ``segments``) becomes a candidate index,
    top-level segments get ``parent``. Parents therefore always precede their children."""
    base = len(cands)
    for seg in segments:
        cands.append(
            Candidate(
                seg.mask,
                box,
                seg.coherence,
                base + seg.parent if seg.parent >= 0 else parent,
                region,
            )
        )


@dataclass
class MaskTable:
    """Distinct masks, one row each; a mask is identified by its exact superpixel set."""

    nodes: List[np.ndarray] = field(default_factory=list)  # (K,) bool
    area: List[float] = field(default_factory=list)  # pixels
    coherence: List[float] = field(default_factory=list)
    source: List[int] = field(default_factory=list)  # the candidate the row stands for
    support: List[int] = field(default_factory=list)  # candidates that gave this exact mask
    boundary: Optional[np.ndarray] = None  # (M,) :meth:`SuperpixelGraph.boundary_strength`
    score: Optional[np.ndarray] = None  # (M,) selection score
    rows: Dict[bytes, int] = field(default_factory=dict)  # superpixel set -> row
    _matrix: Optional[np.ndarray] = None  # the rows stacked so far

    def __len__(self) -> int:
        return len(self.nodes)

    @staticmethod
    def key(nodes: np.ndarray) -> bytes:
        return np.packbits(nodes).tobytes()

    def add(self, key: bytes, nodes: np.ndarray, area: float, coherence: float, source: int) -> int:
        self.rows[key] = len(self.nodes)
        self.nodes.append(nodes)
        self.area.append(area)
        self.coherence.append(coherence)
        self.source.append(source)
        self.support.append(1)
        return self.rows[key]

    def matrix(self, start: int = 0) -> np.ndarray:
        """(M - start, K) bool masks of rows ``start`` …"""
        done = 0 if self._matrix is None else len(self._matrix)
        if done < len(self.nodes):
            new = np.stack(self.nodes[done:])
            self._matrix = new if self._matrix is None else np.concatenate([self._matrix, new])
        return self._matrix[start:]


@dataclass
class Selection:
    """The de-duplicated masks: ``chosen`` rows (best first once ranked), the row each dropped
    near-duplicate was dropped for, the votes after de-duplication and the ranking score."""

    chosen: List[int]
    replaced_by: Dict[int, int]
    support: np.ndarray  # (M,) float64
    rank: Optional[np.ndarray] = None  # (M,) float64


def distinct_masks(
    cands: Sequence[Candidate], sizes: np.ndarray, max_area: float, min_inside: float
) -> Tuple[MaskTable, Dict[int, int]]:
    """Filter: one row per distinct superpixel set (repeats vote for it: ``support``); empty
    masks, masks over ``max_area`` pixels and conquered masks less than ``min_inside`` inside
    their divided region are dropped. Returns the table and the row of every kept candidate."""
    masks = MaskTable()
    row_of: Dict[int, int] = {}
    for ci, c in enumerate(cands):
        key = masks.key(c.nodes)
        if key in masks.rows:
            # the same superpixel set from another variant / region: one mask, first parent
            row_of[ci] = masks.rows[key]
            masks.support[row_of[ci]] += 1
            continue
        area = float(sizes[c.nodes].sum())
        if area == 0 or area > max_area:
            continue
        if c.region >= 0 and sizes[c.nodes & cands[c.region].nodes].sum() < min_inside * area:
            continue
        row_of[ci] = masks.add(key, c.nodes, area, c.coherence, ci)
    return masks, row_of


def selection_score(
    nodes: np.ndarray, coherence: np.ndarray, graph: SuperpixelGraph
) -> Tuple[np.ndarray, np.ndarray]:
    """(boundary, selection score = boundary × (1 − coherence / 2) × fill × straddle) of (M, K)
    bool non-empty superpixel sets with their (M,) coherences; straddle =
    sqrt(max(STRADDLE_FLOOR, 1 − straddling)) when the graph has a coarse over-segmentation,
    else 1."""
    xt = graph.columns(nodes)
    boundary = graph.boundary_strength(nodes, xt)
    fill = (graph.sizes.astype(np.float32) @ xt) / graph.box_area(nodes)
    score = boundary * (1.0 - COHERENCE_WEIGHT * coherence) * fill
    if graph.has_coarse:
        score *= np.sqrt(np.maximum(STRADDLE_FLOOR, 1.0 - graph.straddling(nodes)))
    return boundary, score


def score_masks(masks: MaskTable, graph: SuperpixelGraph, start: int = 0) -> None:
    """Boundary and selection score (:func:`selection_score`) of rows ``start`` …, appended to
    ``masks.boundary`` / ``masks.score``."""
    boundary, score = selection_score(masks.matrix(start), np.array(masks.coherence[start:]), graph)
    if start:
        boundary, score = (
            np.concatenate([masks.boundary, boundary]),
            np.concatenate([masks.score, score]),
        )
    masks.boundary, masks.score = boundary, score


def add_colour_snaps(
    masks: MaskTable, graph: SuperpixelGraph, colour: np.ndarray, top: int, max_area: float
) -> None:
    """Refine: the ``top`` best-scored masks get a colour-snapped variant (border superpixels
    re-assigned to the better-fitting of the inside / outside colour models, ``colour``: (K, D)
    sums) as an extra row next to the original; a variant equal to a row votes for it."""
    best = np.argsort(-masks.score, kind="stable")[:top]
    n_base = len(masks)
    for row, nodes in zip(best.tolist(), graph.reassign_border(masks.matrix()[best], colour)):
        key = masks.key(nodes)
        if key in masks.rows:
            masks.support[masks.rows[key]] += 1
            continue
        area = float(graph.sizes[nodes].sum())
        if area == 0 or area > max_area:
            continue
        masks.add(key, nodes, area, masks.coherence[row], masks.source[row])
    if len(masks) > n_base:
        score_masks(masks, graph, n_base)


def deduplicate(masks: MaskTable, sizes: np.ndarray, max_iou: float, max_masks: int) -> Selection:
    """Greedy near-duplicate removal, best selection score first (then larger, then older): a
    mask whose IoU with a kept one exceeds ``max_iou`` is dropped and its votes go to that
    one; stops at ``max_masks`` kept masks."""
    areas = np.array(masks.area)
    support = np.array(masks.support, np.float64)
    score = masks.score
    nodes = masks.matrix()
    order = sorted(range(len(masks)), key=lambda i: (-score[i], -areas[i], i))
    chosen = np.empty(max(1, min(max_masks, len(order))), np.int64)
    n_chosen = 0
    replaced_by: Dict[int, int] = {}
    for i in order:
        if n_chosen:
            ch = chosen[:n_chosen]
            # IoU <= min(area)/max(area): only masks of similar area can be duplicates
            near = ch[np.minimum(areas[ch], areas[i]) > max_iou * np.maximum(areas[ch], areas[i])]
            if len(near):
                inter = (nodes[near] & nodes[i]) @ sizes
                iou = inter / (areas[near] + areas[i] - inter)
                if iou.max() > max_iou:
                    j = replaced_by[i] = int(near[int(np.argmax(iou))])
                    support[j] += support[i]
                    continue
        chosen[n_chosen] = i
        n_chosen += 1
        if n_chosen >= max_masks:
            break
    return Selection(chosen[:n_chosen].tolist(), replaced_by, support)


def polish(
    masks: MaskTable,
    sel: Selection,
    graph: SuperpixelGraph,
    colour: np.ndarray,
    unary_weight: float,
    edge_scales: Sequence[float],
    max_area: float,
) -> None:
    """Polish: each chosen mask is replaced by the best-scored of itself and its
    :meth:`SuperpixelGraph.polish` variants (one per edge scale in ``edge_scales``; ``colour``:
    (K, D) colour sums), so kept masks end on image edges rather than where a hierarchy happened to
    stop. A variant that equals a mask already in the table, or is too large, is not used. New
    rows keep their original's source, coherence and votes; ``sel.replaced_by`` maps the
    original to its variant (the parent walk follows it)."""
    chosen = np.asarray(sel.chosen)
    if not len(chosen) or not len(edge_scales):
        return
    base = masks.matrix()[chosen]
    coherence = np.array(masks.coherence)[chosen]
    best, best_score = base, masks.score[chosen]
    for variant in graph.polish(base, colour, unary_weight, edge_scales):
        score = selection_score(variant, coherence, graph)[1]
        better = score > best_score
        best = np.where(better[:, None], variant, best)
        best_score = np.where(better, score, best_score)
    n_base = len(masks)
    olds = []
    for pos in np.flatnonzero((best != base).any(1)).tolist():
        nodes = best[pos]
        key = masks.key(nodes)
        area = float(graph.sizes[nodes].sum())
        if key in masks.rows or area > max_area:
            continue
        old = sel.chosen[pos]
        sel.chosen[pos] = sel.replaced_by[old] = masks.add(
            key, nodes, area, masks.coherence[old], masks.source[old]
        )
        olds.append(old)
    if olds:  # the new rows are n_base … in the order of olds
        score_masks(masks, graph, n_base)
        sel.support = np.concatenate([sel.support, sel.support[olds]])


def rank(masks: MaskTable, sel: Selection, band_discount: float) -> None:
    """Ranking score of the chosen masks (``sel.rank``) and ``sel.chosen`` sorted by it.

    The selection score times the relative support, so masks that many hierarchies / variants
    / regions agree on come first (on COCO this mainly raised AR@10/100); then the size-band
    discount: the r-th best mask (0-based) of an area band (a factor 4 wide) has its score
    divided by (1 + r)^``band_discount``, so the top of the list spreads over object sizes
    instead of filling up with one size."""
    areas = np.array(masks.area)
    ch = np.asarray(sel.chosen)
    score = masks.score.copy()
    score[ch] *= np.sqrt(sel.support[ch] / sel.support[ch].max())
    band = np.floor(np.log2(np.maximum(areas, 1.0)) / 2.0).astype(np.int64)  # log base 4
    seen_in_band: Dict[int, int] = {}
    for i in sorted(sel.chosen, key=lambda i: (-score[i], -areas[i], i)):
        r = seen_in_band.get(band[i], 0)
        seen_in_band[band[i]] = r + 1
        score[i] /= (1.0 + r) ** band_discount
    sel.chosen.sort(key=lambda i: (-score[i], -areas[i], i))
    sel.rank = score


def resolve_parents(
    masks: MaskTable,
    sel: Selection,
    cands: Sequence[Candidate],
    row_of: Dict[int, int],
    sizes: np.ndarray,
    min_inside: float,
) -> Dict[int, int]:
    """Parent row of every chosen row (-1: none): the nearest ancestor along its candidate's
    parent chain that survived (or the mask it was dropped for) and is a parent: chosen, larger
    and holding ≥ ``min_inside`` of the mask — a duplicate swap can break that, then the walk
    goes on upwards. Candidate parents precede their children, so the walk ends."""
    areas = np.array(masks.area)
    chosen = set(sel.chosen)
    nodes = masks.matrix()

    def parent_of(row: int) -> int:
        ci = cands[masks.source[row]].parent
        while ci >= 0:
            other = row_of.get(ci)
            while other in sel.replaced_by:  # dropped as a duplicate, then maybe polished
                other = sel.replaced_by[other]
            if other is not None:
                if (
                    other in chosen
                    and other != row
                    and areas[other] > areas[row]
                    and sizes[nodes[row] & nodes[other]].sum() >= min_inside * areas[row]
                ):
                    return other
            ci = cands[ci].parent
        return -1

    return {row: parent_of(row) for row in sel.chosen}


def depths(parents: Dict[int, int]) -> Dict[int, int]:
    """Depth of every row in the parent forest (0 = top); a parent is strictly larger than its
    child, so there are no cycles."""
    out = {}
    for row in parents:
        d, cur = 0, parents[row]
        while cur >= 0:
            d, cur = d + 1, parents[cur]
        out[row] = d
    return out


def annotations(
    masks: MaskTable,
    sel: Selection,
    cands: Sequence[Candidate],
    parents: Dict[int, int],
    graph: SuperpixelGraph,
) -> List[Dict]:
    """SA-1B annotation dicts of the chosen rows, ids in ranking order."""
    new_id = {row: n for n, row in enumerate(sel.chosen)}
    level = depths(parents)
    out = []
    for row in sel.chosen:
        local, box = graph.nodes_to_mask(masks.nodes[row])
        out.append(
            annotation_from_mask(
                local,
                new_id[row],
                box,
                graph.shape,
                predicted_iou=round(float(sel.rank[row]), 6),
                stability_score=round(float(masks.boundary[row]), 6),
                feature_coherence=round(float(masks.coherence[row]), 6),
                crop_box=cands[masks.source[row]].box,
                level=level[row],
                parent_id=new_id[parents[row]] if parents[row] >= 0 else -1,
            )
        )
    return out


def select_annotations(
    cands: Sequence[Candidate], graph: SuperpixelGraph, colour: Optional[np.ndarray], cfg
) -> List[Dict]:
    """Candidates → SA-1B annotations: filter, score, refine (``colour``: (K, D) colour sums for
    the snapped variants; ``cfg.refine_top`` = 0: none), de-duplicate, polish (none without
    ``cfg.polish_edge_scales``), rank, hierarchy."""
    H, W = graph.shape
    max_area = cfg.max_area_frac * H * W
    masks, row_of = distinct_masks(cands, graph.sizes, max_area, cfg.min_inside_parent)
    if not len(masks):
        return []
    score_masks(masks, graph)
    if cfg.refine_top > 0:
        add_colour_snaps(masks, graph, colour, cfg.refine_top, max_area)
    sel = deduplicate(masks, graph.sizes, cfg.dedup_iou, cfg.max_masks)
    for _ in range(cfg.polish_rounds if cfg.polish_edge_scales else 0):
        polish(masks, sel, graph, colour, cfg.polish_weight, cfg.polish_edge_scales, max_area)
    rank(masks, sel, cfg.band_discount)
    parents = resolve_parents(masks, sel, cands, row_of, graph.sizes, cfg.min_inside_parent)
    return annotations(masks, sel, cands, parents, graph)
