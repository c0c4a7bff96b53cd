"""Conquer: bottom-up merging of adjacent groups inside one divided region.

Every node of the region (a patch, or a superpixel of the engine's graph) starts as its own
group. The most similar pair of adjacent groups (cosine similarity of their mean features) is
merged greedily, while that similarity is at least the current threshold; thresholds are
visited from fine to coarse (default ``[0.6, 0.5, 0.4, 0.3, 0.2, 0.1]``) and the grouping is
snapshotted after each one, so the snapshots are nested: every group at a coarser threshold is
a union of groups at the finer one.

:func:`merge_graph` runs this on a :class:`RegionGraph` in stages — :class:`GreedyMerger`
(merging, with a log of every merge), :func:`snapshot_groups`, optionally
:func:`add_merge_groups` and :func:`union_groups` (extra candidates), :func:`as_segments` — and
returns the distinct groups of weight ≥ ``min_weight`` as :class:`Segment` records with the
index of their parent segment (-1: none), i.e. a forest that the engine turns into ``level`` /
``parent_id``. :func:`merge_hierarchy` is the same on a patch grid, and :func:`merge_selective`
a selective-search-style alternative (similarity + size + fill, one complete hierarchy) used to
diversify the candidates.

:func:`iterative_merge` is the published UnSAM rule (``--recipe unsam``): raw patch features,
summed on merge, one array of kept groups per threshold.
"""
import heapq
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_THRESHOLDS = (0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
# the coherence reported for groups of :func:`merge_boundary`, which has no features: the middle
# of the scale, so the selection score's coherence term neither favours nor demotes them
BOUNDARY_COHERENCE = 0.5
# added to norm products before dividing: a node whose features sum to zero has similarity 0
_EPS = 1e-12


@dataclass
class Segment:
    mask: np.ndarray  # (h, w) bool on the patch grid, or (N,) bool over graph nodes
    parent: int  # index into the returned list, -1 for a top-level group
    coherence: float  # |mean of member features| in [0, 1]: 1 = all members identical


@dataclass(frozen=True)
class RegionGraph:
    """A region adjacency graph whose nodes carry features.

    ``sums``: (N, C) sum of the unit feature vectors a node covers (a patch: its feature; a
    superpixel: the pixel-weighted sum of the patch features under it); ``weight``: (N,) how
    many units that is; ``pairs``: (E, 2) adjacent node indices. A group's feature is the sum
    of its nodes' sums, so the cosine of two groups' sums is that of their mean features."""

    sums: np.ndarray
    weight: np.ndarray
    pairs: np.ndarray


def grid_pairs(h: int, w: int) -> np.ndarray:
    """4-adjacency of an (h, w) grid as (E, 2) flat indices."""
    idx = np.arange(h * w).reshape(h, w)
    return np.concatenate([np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], 1),
                           np.stack([idx[:-1, :].ravel(), idx[1:, :].ravel()], 1)], 0)


def merge_hierarchy(feats: np.ndarray, region: np.ndarray = None,
                    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                    min_patches: int = 4, pair_unions: bool = False) -> List[Segment]:
    """Patch-grid conquer. ``feats``: (h, w, C) L2-normalised; ``region``: (h, w) bool.

    Returns segments with (h, w) masks, ordered coarse to fine (see :func:`merge_graph`).
    """
    h, w, c = feats.shape
    if region is None:
        region = np.ones((h, w), bool)
    graph = RegionGraph(feats.reshape(-1, c), np.ones(h * w), grid_pairs(h, w))
    segs = merge_graph(graph, region.ravel(), thresholds, float(min_patches), pair_unions=pair_unions)
    for s in segs:
        s.mask = s.mask.reshape(h, w)
    return segs


# ------------------------------------------------------------------- threshold-hierarchy merging
@dataclass(frozen=True)
class GroupState:
    """A group as it is between two merges. ``state`` names it: every merge gives the merged
    group a new state, so a state is one exact set of nodes."""

    state: int
    weight: float
    coherence: float  # |sum of features| / weight


@dataclass(frozen=True)
class Snapshot:
    """The grouping once every pair at or above ``threshold`` is merged."""

    threshold: float
    owner: np.ndarray  # (N,) the group (a member node's index) every node belongs to
    groups: Dict[int, GroupState]  # group -> its state, groups in ascending order


@dataclass(frozen=True)
class Merge:
    """One merge: states ``a`` and ``b`` became ``merged`` while merging at ``threshold``."""

    threshold: float
    a: int
    b: int
    merged: GroupState


@dataclass(frozen=True)
class PairUnion:
    """Two adjacent groups of snapshot ``snapshot`` (group ids ``a`` < ``b``) taken together."""

    snapshot: int
    a: int
    b: int
    coherence: float


@dataclass
class _Group:
    """A distinct group to report: ``key`` is its state (or its pair union), ``parent`` the key
    of the group it belongs to next."""

    key: object
    mask: np.ndarray  # (N,) bool
    coherence: float
    parent: Optional[object] = None


class GreedyMerger:
    """Greedy merging of adjacent groups on a :class:`RegionGraph`, most similar pair first.

    Every ``active`` node starts as its own group (group id = node index; a merged group keeps
    the id of its larger part). :meth:`merge_down_to` merges while the best pair's cosine
    similarity is ≥ a threshold and logs every merge in :attr:`log`; :meth:`snapshot` and
    :meth:`pair_unions` read the current grouping.
    """

    def __init__(self, graph: RegionGraph, active: Optional[np.ndarray] = None):
        n = graph.sums.shape[0]
        self.inside = np.ones(n, bool) if active is None else np.asarray(active, bool)
        self.sums = graph.sums.astype(np.float64) * self.inside[:, None]
        self.weight = np.where(self.inside, graph.weight, 0).astype(np.float64)
        self.owner = np.arange(n)
        self.members = {int(i): [int(i)] for i in np.flatnonzero(self.inside)}
        self.neighbours = {i: set() for i in self.members}
        self.state = list(range(n))  # current state of each group; merges number on from n
        self.version = [0] * n  # a list: indexed once per heap entry, numpy scalars are slower
        self.log: List[Merge] = []
        pairs = np.asarray(graph.pairs, np.int64).reshape(-1, 2)
        pairs = pairs[self.inside[pairs[:, 0]] & self.inside[pairs[:, 1]] & (pairs[:, 0] != pairs[:, 1])]
        pairs = np.unique(np.sort(pairs, 1), axis=0) if len(pairs) else pairs
        norms = np.linalg.norm(self.sums, axis=1) + _EPS
        sims = (np.einsum("ij,ij->i", self.sums[pairs[:, 0]], self.sums[pairs[:, 1]])
                / (norms[pairs[:, 0]] * norms[pairs[:, 1]]))
        # entries (-similarity, a, b, version of a, version of b) with a < b; an entry is stale
        # once either group has changed since it was pushed
        self.heap = [(-float(s), int(a), int(b), 0, 0) for s, (a, b) in zip(sims, pairs)]
        heapq.heapify(self.heap)
        for a, b in pairs.tolist():
            self.neighbours[a].add(b)
            self.neighbours[b].add(a)
        self.gnorm = np.linalg.norm(self.sums, axis=1)  # |sum| per group, kept up to date on merges

    def merge_down_to(self, threshold: float) -> None:
        """Merge the most similar adjacent pair while its similarity is ≥ ``threshold``."""
        heap, members, version = self.heap, self.members, self.version
        while heap and -heap[0][0] >= threshold:
            _, a, b, va, vb = heapq.heappop(heap)
            if a not in members or b not in members or version[a] != va or version[b] != vb:
                continue  # stale entry
            if len(members[a]) < len(members[b]):
                a, b = b, a  # merge the smaller group into the larger one
            self._merge(a, b, threshold)

    def _merge(self, a: int, b: int, threshold: float) -> None:
        """Merge group ``b`` into group ``a`` and push ``a``'s pairs with its neighbours."""
        sums, weight, neighbours = self.sums, self.weight, self.neighbours
        self.owner[self.members[b]] = a
        self.members[a].extend(self.members.pop(b))
        sums[a] += sums[b]
        self.gnorm[a] = np.sqrt(sums[a] @ sums[a])
        weight[a] += weight[b]
        nb = neighbours.pop(b)
        for x in nb:
            neighbours[x].discard(b)
        nb.discard(a)
        neighbours[a].discard(b)
        neighbours[a] |= nb
        for x in nb:
            neighbours[x].add(a)
        self.version[a] += 1
        merged = GroupState(len(self.state) + len(self.log), float(weight[a]),
                            float(np.linalg.norm(sums[a]) / weight[a]))
        self.log.append(Merge(threshold, self.state[a], self.state[b], merged))
        self.state[a] = merged.state
        others = sorted(neighbours[a])
        if others:
            sims = sums[others] @ sums[a] / (self.gnorm[others] * self.gnorm[a] + _EPS)
            for x, s in zip(others, sims):
                heapq.heappush(self.heap, (-float(s), a, x, self.version[a], self.version[x]) if a < x
                               else (-float(s), x, a, self.version[x], self.version[a]))

    def snapshot(self, threshold: float) -> Snapshot:
        """The current grouping, labelled ``threshold``."""
        groups = {g: GroupState(self.state[g], float(self.weight[g]),
                                float(np.linalg.norm(self.sums[g]) / max(self.weight[g], _EPS)))
                  for g in self.members}
        return Snapshot(threshold, self.owner.copy(), groups)

    def pair_unions(self, snapshot: int, min_weight: float) -> List[PairUnion]:
        """Every two adjacent current groups of weight ≥ ``min_weight``, as unions."""
        sums, weight, out = self.sums, self.weight, []
        for a in sorted(self.members):
            if weight[a] < min_weight:
                continue
            for b in sorted(self.neighbours[a]):
                if b > a and weight[b] >= min_weight:
                    coh = float(np.linalg.norm(sums[a] + sums[b]) / (weight[a] + weight[b]))
                    out.append(PairUnion(snapshot, a, b, coh))
        return out


def snapshot_groups(snapshots: Sequence[Snapshot], inside: np.ndarray, min_weight: float) -> List[_Group]:
    """The distinct groups of weight ≥ ``min_weight`` over all snapshots (fine to coarse), each
    with the group containing it at the first later snapshot where that group is another one."""
    groups: Dict[int, _Group] = {}
    first_seen: Dict[int, int] = {}
    for si, snap in enumerate(snapshots):
        for g, st in snap.groups.items():
            if st.weight >= min_weight and st.state not in groups:
                groups[st.state] = _Group(st.state, (snap.owner == g) & inside, st.coherence)
                first_seen[st.state] = si
    for key, grp in groups.items():
        node = np.flatnonzero(grp.mask)[0]
        for snap in snapshots[first_seen[key] + 1:]:
            container = snap.groups[snap.owner[node]].state
            if container != key and container in groups:
                grp.parent = container
                break
    return list(groups.values())


def add_merge_groups(groups: List[_Group], log: Sequence[Merge], inside: np.ndarray,
                     min_weight: float) -> List[_Group]:
    """``groups`` plus every group a merge formed with weight ≥ ``min_weight`` (selective
    search's "every merge is a proposal"); every group's parent becomes the reported group it
    merges into next."""
    out = list(groups)
    known = {g.key for g in groups}
    members = {int(i): [int(i)] for i in np.flatnonzero(inside)}  # by state, replayed
    merged_into = {}
    for m in log:
        members[m.merged.state] = members.pop(m.a) + members.pop(m.b)
        merged_into[m.a] = merged_into[m.b] = m.merged.state
        if m.merged.weight >= min_weight and m.merged.state not in known:
            mask = np.zeros(len(inside), bool)
            mask[members[m.merged.state]] = True
            out.append(_Group(m.merged.state, mask, m.merged.coherence))
            known.add(m.merged.state)
    for g in out:
        parent = merged_into.get(g.key)
        while parent is not None and parent not in known:  # too small to be reported
            parent = merged_into.get(parent)
        if parent is not None:
            g.parent = parent
    return out


def union_groups(unions: Sequence[PairUnion], snapshots: Sequence[Snapshot], inside: np.ndarray,
                 known: set) -> List[_Group]:
    """One group per distinct pair union; its parent is the first group of a later snapshot
    holding both halves (when that group is in ``known``, the keys reported so far)."""
    out, seen = [], set()
    for u in unions:
        snap = snapshots[u.snapshot]
        # the same union reappears unchanged in later snapshots while neither half grows
        halves = (snap.groups[u.a].state, snap.groups[u.b].state)
        if halves in seen:
            continue
        seen.add(halves)
        group = _Group(("union",) + halves, ((snap.owner == u.a) | (snap.owner == u.b)) & inside, u.coherence)
        fa, fb = np.flatnonzero(snap.owner == u.a)[0], np.flatnonzero(snap.owner == u.b)[0]
        for later in snapshots[u.snapshot + 1:]:
            if later.owner[fa] == later.owner[fb]:
                container = later.groups[later.owner[fa]].state
                if container in known:
                    group.parent = container
                break
        out.append(group)
    return out


def as_segments(groups: Sequence[_Group], node_weight: np.ndarray) -> List[Segment]:
    """Groups → segments ordered from coarse to fine (by weight, stable), so parents come first."""
    weight = np.asarray(node_weight, np.float64)
    sizes = [float(weight[g.mask].sum()) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (-sizes[i], i))
    index = {groups[i].key: j for j, i in enumerate(order)}
    return [Segment(mask=groups[i].mask, parent=index[groups[i].parent] if groups[i].parent is not None else -1,
                    coherence=groups[i].coherence) for i in order]


def merge_graph(graph: RegionGraph, active: Optional[np.ndarray] = None,
                thresholds: Sequence[float] = DEFAULT_THRESHOLDS, min_weight: float = 4.0, *,
                pair_unions: bool = False, all_merges: bool = False) -> List[Segment]:
    """Greedy threshold-hierarchy merging on a region adjacency graph → segments.

    ``active``: (N,) bool nodes of the region (default: all). Thresholds are visited from fine
    to coarse (:class:`GreedyMerger`); the grouping after each one is a snapshot, and the
    distinct groups of weight ≥ ``min_weight`` over all snapshots are reported with their
    parent: the group containing them at the first coarser snapshot where it changed.

    Extra candidates: with ``all_merges`` every group formed by a merge is reported, not only
    those alive at a snapshot (selective search's "every merge is a proposal"), and every
    parent is the group a group merges into next. With ``pair_unions`` the union of every two
    adjacent groups of each snapshot is added (an MCG-style combinatorial candidate: objects
    whose parts are not similar enough to merge at any threshold, e.g. a face and a shirt);
    its parent is the first group of a coarser snapshot that contains both halves.

    Returns segments (``mask``: (N,) bool over nodes) ordered from coarse to fine (parents
    before children).
    """
    merger = GreedyMerger(graph, active)
    snapshots: List[Snapshot] = []
    unions: List[PairUnion] = []
    for t in sorted(thresholds, reverse=True):
        merger.merge_down_to(t)
        snapshots.append(merger.snapshot(t))
        if pair_unions:
            unions += merger.pair_unions(len(snapshots) - 1, min_weight)
    groups = snapshot_groups(snapshots, merger.inside, min_weight)
    if all_merges:
        groups = add_merge_groups(groups, merger.log, merger.inside, min_weight)
    if pair_unions:
        groups += union_groups(unions, snapshots, merger.inside, {g.key for g in groups})
    return as_segments(groups, graph.weight)


def merge_selective(node_sums: np.ndarray, node_weight: np.ndarray, pairs: np.ndarray,
                    boxes: np.ndarray, min_weight: float = 4.0) -> List[Segment]:
    """Selective-search-style complete hierarchy on a region adjacency graph.

    Unlike :func:`merge_graph` (pure feature similarity, snapshots at thresholds), the pair to
    merge next maximises ``cos(features) + size + fill`` (Uijlings et al.): ``size = 1 − (w_a +
    w_b) / W`` makes small groups merge first everywhere, so no single group swallows the image
    early, and ``fill = 1 − (box_ab − w_a − w_b) / W`` prefers merges that fill their joint
    bounding box (compact shapes); ``W`` is the total weight. Merging runs until no adjacent
    pair is left; every merged group with weight ≥ ``min_weight`` is a segment, its parent the
    group it merges into next.

    ``node_sums``: (N, C) summed unit features; ``node_weight``: (N,) pixels per node;
    ``pairs``: (E, 2) adjacent nodes; ``boxes``: (N, 4) pixel boxes (x0, y0, x1, y1).
    Returns segments (``mask``: (N,) bool) ordered coarse to fine.
    """
    n = node_sums.shape[0]
    total = float(np.sum(node_weight))
    sums = np.zeros((2 * n, node_sums.shape[1]))
    sums[:n] = node_sums
    norm = np.zeros(2 * n)
    norm[:n] = np.linalg.norm(node_sums, axis=1) + 1e-12
    weight = np.zeros(2 * n)
    weight[:n] = node_weight
    box = np.zeros((2 * n, 4))
    box[:n] = boxes

    def similarity(a: int, others: np.ndarray) -> np.ndarray:
        colour = sums[others] @ sums[a] / (norm[others] * norm[a])
        joint = weight[a] + weight[others]
        bw = np.maximum(box[a, 2], box[others, 2]) - np.minimum(box[a, 0], box[others, 0])
        bh = np.maximum(box[a, 3], box[others, 3]) - np.minimum(box[a, 1], box[others, 1])
        return colour + (1.0 - joint / total) + (1.0 - (bw * bh - joint) / total)

    neighbours = {i: set() for i in range(n)}
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    for a, b in pairs.tolist():
        if a != b:
            neighbours[a].add(b)
            neighbours[b].add(a)
    heap = []
    for a in range(n):
        others = np.array(sorted(x for x in neighbours[a] if x > a), np.int64)
        if len(others):
            heap += [(-s, a, b) for s, b in zip(similarity(a, others).tolist(), others.tolist())]
    heapq.heapify(heap)
    tree = _MergeTree(n)
    for a, b in tree.live_pairs(heap):
        new = tree.join(a, b)
        sums[new] = sums[a] + sums[b]
        norm[new] = np.sqrt(sums[new] @ sums[new]) + 1e-12
        weight[new] = weight[a] + weight[b]
        box[new] = (min(box[a, 0], box[b, 0]), min(box[a, 1], box[b, 1]),
                    max(box[a, 2], box[b, 2]), max(box[a, 3], box[b, 3]))
        nb = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        for x in nb:
            neighbours[x] -= {a, b}
            neighbours[x].add(new)
        neighbours[new] = nb
        if weight[new] >= min_weight:
            tree.groups.append((new, tree.members[new], float(norm[new] / weight[new])))
        if nb:
            others = np.array(sorted(nb), np.int64)
            for s, x in zip(similarity(new, others).tolist(), others.tolist()):
                heapq.heappush(heap, (-s, x, new))
    return tree.segments()


def merge_boundary(pairs: np.ndarray, border_len: np.ndarray, border_edge: np.ndarray,
                   node_weight: np.ndarray, min_weight: float = 4.0, size_power: float = 0.5) -> List[Segment]:
    """Contour-based complete hierarchy on a region adjacency graph (an ultrametric contour map,
    as in gPb-UCM / MCG, on the engine's own edge map instead of a learned one).

    The adjacent pair merged next has the weakest shared border: the lowest mean edge strength
    along it (``border_edge / border_len``, summed over the members' borders as groups grow),
    times ``((w_a + w_b) / W) ** size_power`` so small groups merge first everywhere (as
    selective search's size term; ``W`` is the total weight). Unlike the feature hierarchies this
    one ignores what the regions look like and follows the image's contours alone: objects whose
    parts differ in colour / texture but are closed by a strong outline come out whole. Merging
    runs until no adjacent pair is left; every merged group of weight ≥ ``min_weight`` is a
    segment, its parent the group it merges into next.

    ``pairs``: (E, 2) adjacent nodes; ``border_len`` / ``border_edge``: (E,) shared border length
    and summed edge strength along it; ``node_weight``: (N,) pixels per node.
    Returns segments (``mask``: (N,) bool) ordered coarse to fine. Deterministic: ties are broken
    by the group ids.
    """
    n = len(node_weight)
    weight = np.zeros(2 * n)
    weight[:n] = node_weight
    total = float(np.sum(node_weight)) or 1.0
    # per group: neighbour -> [border length, summed edge strength]
    borders: List[Optional[Dict[int, List[float]]]] = [dict() for _ in range(n)] + [None] * n
    heap = []
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    for (a, b), length, edge in zip(pairs.tolist(), np.asarray(border_len).tolist(),
                                    np.asarray(border_edge).tolist()):
        if a == b or length <= 0:
            continue
        borders[a][b] = borders[b][a] = [length, edge]
        cost = edge / length * ((weight[a] + weight[b]) / total) ** size_power
        heap.append((cost, min(a, b), max(a, b)))
    heapq.heapify(heap)
    tree = _MergeTree(n)
    for a, b in tree.live_pairs(heap):
        new = tree.join(a, b)
        weight[new] = weight[a] + weight[b]
        joined: Dict[int, List[float]] = {}
        for side in (a, b):
            for x, (length, edge) in borders[side].items():
                if x == a or x == b:
                    continue
                del borders[x][side]
                if x in joined:
                    joined[x][0] += length
                    joined[x][1] += edge
                else:
                    joined[x] = [length, edge]
            borders[side] = None
        borders[new] = joined
        for x in sorted(joined):
            length, edge = joined[x]
            borders[x][new] = joined[x]
            heapq.heappush(heap, (edge / length * ((weight[x] + weight[new]) / total) ** size_power, x, new))
        if weight[new] >= min_weight:
            # no features here: coherence is neutral (mid-scale) for the selection score
            tree.groups.append((new, tree.members[new], BOUNDARY_COHERENCE))
    return tree.segments()


class _MergeTree:
    """Book-keeping of a greedy pairwise merge: ids 0..n-1 are the nodes, n, n+1, … the groups
    in merge order; ``groups`` collects (group id, member nodes, coherence) of the kept ones."""

    def __init__(self, n: int):
        self.n = n
        self.alive = np.zeros(2 * n, bool)
        self.alive[:n] = True
        self.members: Dict[int, List[int]] = {i: [i] for i in range(n)}
        self.groups: List[Tuple[int, List[int], float]] = []
        self.parent_of: Dict[int, int] = {}
        self.next_id = n

    def live_pairs(self, heap: list):
        """Pop (cost, a, b) entries off ``heap`` (which the caller keeps pushing to) and yield
        (a, b) while both are unmerged; stale entries (one side merged already) are dropped."""
        while heap:
            _, a, b = heapq.heappop(heap)
            if self.alive[a] and self.alive[b]:
                yield a, b

    def join(self, a: int, b: int) -> int:
        """Merge live ``a`` and ``b`` into a new group; returns its id."""
        new = self.next_id
        self.next_id += 1
        self.alive[a] = self.alive[b] = False
        self.alive[new] = True
        self.parent_of[a] = self.parent_of[b] = new
        self.members[new] = self.members.pop(a) + self.members.pop(b)
        return new

    def segments(self) -> List[Segment]:
        return _segments_coarse_to_fine(self.groups, self.parent_of, self.n)


def _segments_coarse_to_fine(groups: List[Tuple[int, List[int], float]], parent_of: Dict[int, int],
                             n: int) -> List[Segment]:
    """Merged groups (id, member nodes, coherence) in creation order → segments, parents first:
    the last merges are the coarsest, so creation order is reversed."""
    index = {g: j for j, (g, _, _) in enumerate(reversed(groups))}
    out = []
    for g, mem, coh in reversed(groups):
        mask = np.zeros(n, bool)
        mask[mem] = True
        out.append(Segment(mask=mask, parent=index.get(parent_of.get(g), -1), coherence=coh))
    return out


def iterative_merge(features, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                    min_patches: int = 4) -> List[np.ndarray]:
    """UnSAM's conquer merge on a patch grid, as published (frank-xwang/UnSAM
    ``divide_and_conquer/iterative_merging.py``).

    ``features``: (h, w, C) raw patch features (numpy or torch; DINO keys, not normalised).
    Returns one (n_i, h, w) bool array per threshold, in the order of ``thresholds``.

    The rule: every patch starts as a group; the pair of 4-adjacent groups with the highest
    similarity is merged while that similarity is ≥ the current threshold, thresholds visited
    in the given order. A group's feature is the sum of its patches' raw features and the
    similarity of two groups is the cosine of their sums, computed as published in float32:
    ``dot(normalize(sum_a / n_a), normalize(sum_b / n_b))`` (``torch.nn.functional.normalize``,
    ``torch.dot``). After each threshold the groups of ≥ ``min_patches`` patches that still
    have a neighbour are listed — a group with no neighbour left (the whole grid once
    everything has merged) is not, as published.

    Ties (equal similarity): the pair that has existed longest is merged first. Pairs are born
    when their younger group is: the initial pairs in raster order (each patch's left pair,
    then its upper one); a merged group's pairs in the iteration order of its neighbour set,
    built as published (``set.union`` of the two parts' neighbour sets minus the parts, then
    ``discard`` / ``add`` as neighbours merge), so CPython's set order decides between pairs
    born together. Groups are listed in order of their first appearance in the live pairs,
    oldest pair first — the published output order.

    Deliberate difference: a threshold at which nothing is listed gives an empty (0, h, w)
    array; the published code drops that entry, shifting the later levels' positions.

    Cost: O(M log M) for M pairs with a heap (the published code scans all pairs for each of
    the h·w merges).
    """
    feats = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    merge = _GridMerge(feats.detach().to("cpu", torch.float32))
    levels = []
    for t in thresholds:
        merge.merge_down_to(t)
        levels.append(_listed_groups(merge.live, merge.counts, merge.members, min_patches, merge.grid))
    return levels


class _GridMerge:
    """State of :func:`iterative_merge`: groups by id (patches 0..h·w-1, then one id per merge),
    their summed features, sizes, unit mean features, members and neighbour sets, the live pairs
    in birth order and a heap of (-similarity, birth number, a, b)."""

    def __init__(self, feats: torch.Tensor):
        h, w, c = feats.shape
        self.grid = (h, w)
        self.sums = list(feats.reshape(h * w, c))  # group id -> summed raw feature (C,)
        self.counts = [1] * (h * w)
        self.units = [F.normalize(v, dim=0) for v in self.sums]
        self.members: List[List[int]] = [[i] for i in range(h * w)]
        self.neighbours: List[set] = [set() for _ in range(h * w)]
        self.alive = [True] * (h * w)
        self.live: Dict[Tuple[int, int], None] = {}  # live pairs (a < b), in birth order
        self.heap: List[Tuple[float, int, int, int]] = []
        self.born = 0
        for idx in range(h * w):
            # the same sequence of set insertions as published: it fixes the sets' iteration order
            if idx % w:
                self._link(idx - 1, idx)
            if idx >= w:
                self._link(idx - w, idx)

    def _link(self, a: int, b: int) -> None:
        self.neighbours[b].add(a)
        self.neighbours[a].add(b)
        self._add_pair(a, b)

    def _add_pair(self, a: int, b: int) -> None:
        heapq.heappush(self.heap, (-torch.dot(self.units[a], self.units[b]).item(), self.born, a, b))
        self.live[(a, b)] = None
        self.born += 1

    def merge_down_to(self, threshold: float) -> None:
        """Merge the most similar live pair while its similarity is ≥ ``threshold``."""
        heap, alive = self.heap, self.alive
        while heap:
            neg, _, a, b = heap[0]
            if not (alive[a] and alive[b]):
                heapq.heappop(heap)  # a pair of a group that has merged since
                continue
            if -neg < threshold:
                break
            heapq.heappop(heap)
            self._join(a, b)

    def _join(self, a: int, b: int) -> None:
        new = len(self.sums)
        self.sums.append(self.sums[a] + self.sums[b])
        self.counts.append(self.counts[a] + self.counts[b])
        self.units.append(F.normalize(self.sums[new] / self.counts[new], dim=0))
        self.members.append(self.members[a] + self.members[b])
        nb = self.neighbours[a].union(self.neighbours[b]).difference({a, b})
        self.neighbours.append(nb)
        self.alive[a] = self.alive[b] = False
        self.alive.append(True)
        del self.live[(a, b)]
        for x in nb:
            for old in (a, b):
                if old in self.neighbours[x]:
                    del self.live[(x, old) if x < old else (old, x)]
                    self.neighbours[x].discard(old)
            self._add_pair(x, new)
            self.neighbours[x].add(new)


def _listed_groups(live: Dict[Tuple[int, int], None], counts: List[int], members: List[List[int]],
                   min_patches: int, hw: Tuple[int, int]) -> np.ndarray:
    """The groups :func:`iterative_merge` lists after a threshold: those in a live pair, in order
    of first appearance (oldest pair first), with ≥ ``min_patches`` patches → (n, h, w) bool."""
    listed, masks = set(), []
    for pair in live:
        for g in pair:
            if g not in listed:
                listed.add(g)
                if counts[g] >= min_patches:
                    m = np.zeros(hw[0] * hw[1], bool)
                    m[members[g]] = True
                    masks.append(m.reshape(hw))
    return np.stack(masks) if masks else np.zeros((0, *hw), bool)
