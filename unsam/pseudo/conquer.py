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
diversify the candidates, :func:`merge_boundary` a contour-based one (weakest border first).
These three share one :class:`MergeTree` (heap, stale entries, unions, merge record) and differ
in their pair costs and stopping rules.

:func:`iterative_merge` is the published UnSAM rule (``--recipe unsam``): raw patch features,
summed on merge, one array of kept groups per threshold; its :class:`_GridMerge` keeps the
published tie order and so stays apart from the tree.
"""

import heapq
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

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
    return np.concatenate(
        [
            np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], 1),
            np.stack([idx[:-1, :].ravel(), idx[1:, :].ravel()], 1),
        ],
        0,
    )


def merge_hierarchy(
    feats: np.ndarray,
    region: np.ndarray = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    min_patches: int = 4,
    pair_unions: bool = False,
) -> List[Segment]:
    """Patch-grid conquer. ``feats``: (h, w, C) L2-normalised; ``region``: (h, w) bool.

    Returns segments with (h, w) masks, ordered coarse to fine (see :func:`merge_graph`).
    """
    h, w, c = feats.shape
    if region is None:
        region = np.ones((h, w), bool)
    graph = RegionGraph(feats.reshape(-1, c), np.ones(h * w), grid_pairs(h, w))
    segs = merge_graph(
        graph, region.ravel(), thresholds, float(min_patches), pair_unions=pair_unions
    )
    for s in segs:
        s.mask = s.mask.reshape(h, w)
    return segs


# ------------------------------------------------------------------------------- the merge tree
class MergeTree:
    """The book-keeping of a greedy pairwise merge, shared by :class:`GreedyMerger`,
    :func:`merge_selective` and :func:`merge_boundary`: a heap of candidate pairs, the check
    that drops stale entries, the union of two groups' members and adjacency, and the record of
    the merges.

    The engine supplies what differs: the costs of the initial pairs (:meth:`start`); the cost
    of a merged group's pairs, ``pair_costs(g, others)`` → one cost per neighbour in ``others``
    (ascending ids); the update of its own per-group data, ``absorb(g, a, b)`` (groups ``a``
    and ``b`` have just become ``g``; called before ``g``'s pairs are costed); and the stopping
    rule, the ``bound`` of :meth:`merge_while`.

    The cheapest pair is merged first, ties going to the lower ids: heap entries are (cost, a,
    b, version of a, version of b) with a < b, and an entry is stale once either group has
    merged since it was pushed. Group ids: the nodes are 0..n-1, and a merged group gets a new
    id n, n+1, … in merge order, or with ``keep_larger`` keeps the id of its part with more
    nodes (the lower id on a tie), so that a group's id is one of its nodes. Either way
    :attr:`state` numbers the groups as the first scheme does: every merge makes a new state,
    so a state names one exact set of nodes; :attr:`merges` records (state a, state b, merged
    state) in merge order and :attr:`parent` maps a merged-away state to the one it went into.
    Only ``active`` nodes (default: all) take part.
    """

    def __init__(
        self,
        n: int,
        pair_costs: Callable[[int, List[int]], Iterable[float]],
        absorb: Callable[[int, int, int], None],
        *,
        active: Optional[np.ndarray] = None,
        keep_larger: bool = False,
    ):
        self.n, self.pair_costs, self.absorb, self.keep_larger = n, pair_costs, absorb, keep_larger
        nodes = range(n) if active is None else np.flatnonzero(active).tolist()
        self.members: Dict[int, List[int]] = {i: [i] for i in nodes}  # ascending, kept in place
        self.neighbours: Dict[int, set] = {i: set() for i in nodes}
        # lists, not arrays: indexed once per heap entry, and numpy scalars are slower
        self.alive = [False] * n
        for i in self.members:
            self.alive[i] = True
        self.version = [0] * n
        self.state = list(range(n))  # id -> its current state
        self.merges: List[Tuple[int, int, int]] = []
        self.parent: Dict[int, int] = {}
        self.heap: List[Tuple[float, int, int, int, int]] = []

    def link(self, pairs: Iterable[Tuple[int, int]]) -> None:
        """Make the node pairs adjacent (distinct active nodes)."""
        for a, b in pairs:
            self.neighbours[a].add(b)
            self.neighbours[b].add(a)

    def start(self, entries: Iterable[Tuple[float, int, int]]) -> None:
        """The initial candidates, (cost, a, b) each, in one heapify."""
        self.heap = [self._entry(cost, a, b) for cost, a, b in entries]
        heapq.heapify(self.heap)

    def _entry(self, cost: float, a: int, b: int) -> Tuple[float, int, int, int, int]:
        v = self.version
        return (cost, a, b, v[a], v[b]) if a < b else (cost, b, a, v[b], v[a])

    def merge_while(self, bound: Optional[float] = None) -> None:
        """Merge the cheapest live pair while the cheapest entry costs ≤ ``bound`` (None: until
        no pair is left). The bound is tested on the heap's top before its staleness, as a NaN
        cost would stop the merging either way."""
        heap, alive, version = self.heap, self.alive, self.version
        while heap and (bound is None or heap[0][0] <= bound):
            _, a, b, va, vb = heapq.heappop(heap)
            if alive[a] and alive[b] and version[a] == va and version[b] == vb:
                self.join(a, b)

    def join(self, a: int, b: int) -> int:
        """Merge live groups ``a`` and ``b``, record it, let the engine absorb it and push the
        merged group's pairs. Returns the merged group's id."""
        members, neighbours = self.members, self.neighbours
        if self.keep_larger:
            if len(members[a]) < len(members[b]):
                a, b = b, a
            g = a
            members[a].extend(members.pop(b))  # in place: the snapshots list groups in id order
        else:
            g = len(self.alive)
            self.alive.append(True)
            self.version.append(0)
            self.state.append(g)
            members[g] = members.pop(a) + members.pop(b)
        self.alive[a] = self.alive[b] = False
        self.alive[g] = True
        self.version[g] += 1
        joined = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        for x in joined:
            nx = neighbours[x]
            nx.discard(a)
            nx.discard(b)
            nx.add(g)
        neighbours[g] = joined
        merged = self.n + len(self.merges)
        self.merges.append((self.state[a], self.state[b], merged))
        self.parent[self.state[a]] = self.parent[self.state[b]] = merged
        self.state[g] = merged
        self.absorb(g, a, b)
        others = sorted(joined)
        if others:
            for x, cost in zip(others, self.pair_costs(g, others)):
                heapq.heappush(self.heap, self._entry(cost, g, x))
        return g


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

    Every ``active`` node starts as its own group; a :class:`MergeTree` with ``keep_larger``
    does the book-keeping (group id = a node index: a merged group keeps the id of its larger
    part). The pair cost is the negated cosine similarity of the groups' summed features.
    :meth:`merge_down_to` merges while the best pair's similarity is ≥ a threshold and logs
    every merge in :attr:`log`; :meth:`snapshot` and :meth:`pair_unions` read the current
    grouping.
    """

    def __init__(self, graph: RegionGraph, active: Optional[np.ndarray] = None):
        n = graph.sums.shape[0]
        self.inside = np.ones(n, bool) if active is None else np.asarray(active, bool)
        self.sums = graph.sums.astype(np.float64) * self.inside[:, None]
        self.weight = np.where(self.inside, graph.weight, 0).astype(np.float64)
        self.log: List[Merge] = []
        self._threshold = 0.0  # of the merges under way, for the log
        pairs = np.asarray(graph.pairs, np.int64).reshape(-1, 2)
        pairs = pairs[
            self.inside[pairs[:, 0]] & self.inside[pairs[:, 1]] & (pairs[:, 0] != pairs[:, 1])
        ]
        pairs = np.unique(np.sort(pairs, 1), axis=0) if len(pairs) else pairs
        # the initial similarities add _EPS to each norm, the later ones to their product: the
        # two formulas give different last bits, and the labels depend on them
        norms = np.linalg.norm(self.sums, axis=1) + _EPS
        sims = np.einsum("ij,ij->i", self.sums[pairs[:, 0]], self.sums[pairs[:, 1]]) / (
            norms[pairs[:, 0]] * norms[pairs[:, 1]]
        )
        self.tree = MergeTree(
            n, self._pair_costs, self._absorb, active=self.inside, keep_larger=True
        )
        self.tree.link(pairs.tolist())
        self.tree.start([(-float(s), int(a), int(b)) for s, (a, b) in zip(sims, pairs)])
        self.gnorm = np.linalg.norm(self.sums, axis=1)  # |sum| per group, kept up to date

    def merge_down_to(self, threshold: float) -> None:
        """Merge the most similar adjacent pair while its similarity is ≥ ``threshold``."""
        self._threshold = threshold
        self.tree.merge_while(-threshold)

    def _absorb(self, g: int, a: int, b: int) -> None:
        """Group ``b`` has merged into group ``a`` (= ``g``): sum their data, log the merge."""
        sums, weight = self.sums, self.weight
        sums[g] += sums[b]
        self.gnorm[g] = np.sqrt(sums[g] @ sums[g])
        weight[g] += weight[b]
        state_a, state_b, merged = self.tree.merges[-1]
        self.log.append(
            Merge(
                self._threshold,
                state_a,
                state_b,
                GroupState(merged, float(weight[g]), float(np.linalg.norm(sums[g]) / weight[g])),
            )
        )

    def _pair_costs(self, g: int, others: List[int]) -> List[float]:
        sims = self.sums[others] @ self.sums[g] / (self.gnorm[others] * self.gnorm[g] + _EPS)
        return [-float(s) for s in sims]

    def snapshot(self, threshold: float) -> Snapshot:
        """The current grouping, labelled ``threshold``."""
        tree, sums, weight = self.tree, self.sums, self.weight
        owner = np.arange(len(self.inside))
        for g, nodes in tree.members.items():
            owner[nodes] = g
        groups = {
            g: GroupState(
                tree.state[g],
                float(weight[g]),
                float(np.linalg.norm(sums[g]) / max(weight[g], _EPS)),
            )
            for g in tree.members
        }
        return Snapshot(threshold, owner, groups)

    def pair_unions(self, snapshot: int, min_weight: float) -> List[PairUnion]:
        """Every two adjacent current groups of weight ≥ ``min_weight``, as unions."""
        sums, weight, out = self.sums, self.weight, []
        for a in sorted(self.tree.members):
            if weight[a] < min_weight:
                continue
            for b in sorted(self.tree.neighbours[a]):
                if b > a and weight[b] >= min_weight:
                    coh = float(np.linalg.norm(sums[a] + sums[b]) / (weight[a] + weight[b]))
                    out.append(PairUnion(snapshot, a, b, coh))
        return out


def snapshot_groups(
    snapshots: Sequence[Snapshot], inside: np.ndarray, min_weight: float
) -> List[_Group]:
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
        for snap in snapshots[first_seen[key] + 1 :]:
            container = snap.groups[snap.owner[node]].state
            if container != key and container in groups:
                grp.parent = container
                break
    return list(groups.values())


def add_merge_groups(
    groups: List[_Group], log: Sequence[Merge], inside: np.ndarray, min_weight: float
) -> List[_Group]:
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


def union_groups(
    unions: Sequence[PairUnion], snapshots: Sequence[Snapshot], inside: np.ndarray, known: set
) -> List[_Group]:
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
        mask = ((snap.owner == u.a) | (snap.owner == u.b)) & inside
        group = _Group(("union",) + halves, mask, u.coherence)
        fa, fb = np.flatnonzero(snap.owner == u.a)[0], np.flatnonzero(snap.owner == u.b)[0]
        for later in snapshots[u.snapshot + 1 :]:
            if later.owner[fa] == later.owner[fb]:
                container = later.groups[later.owner[fa]].state
                if container in known:
                    group.parent = container
                break
        out.append(group)
    return out


def as_segments(groups: Sequence[_Group], node_weight: np.ndarray) -> List[Segment]:
    """Groups → segments ordered from coarse to fine (by weight, stable): parents come first."""
    weight = np.asarray(node_weight, np.float64)
    sizes = [float(weight[g.mask].sum()) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (-sizes[i], i))
    index = {groups[i].key: j for j, i in enumerate(order)}
    return [
        Segment(
            mask=groups[i].mask,
            parent=index[groups[i].parent] if groups[i].parent is not None else -1,
            coherence=groups[i].coherence,
        )
        for i in order
    ]


def merge_graph(
    graph: RegionGraph,
    active: Optional[np.ndarray] = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    min_weight: float = 4.0,
    *,
    pair_unions: bool = False,
    all_merges: bool = False,
) -> List[Segment]:
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


def merge_selective(
    node_sums: np.ndarray,
    node_weight: np.ndarray,
    pairs: np.ndarray,
    boxes: np.ndarray,
    min_weight: float = 4.0,
) -> List[Segment]:
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
    # per group id of the :class:`MergeTree` (nodes, then one per merge)
    sums = np.zeros((2 * n, node_sums.shape[1]))
    sums[:n] = node_sums
    norm = np.zeros(2 * n)
    norm[:n] = np.linalg.norm(node_sums, axis=1) + 1e-12
    weight = np.zeros(2 * n)
    weight[:n] = node_weight
    box = np.zeros((2 * n, 4))
    box[:n] = boxes
    kept: List[Tuple[int, List[int], float]] = []

    def similarity(a: int, others: List[int]) -> List[float]:
        others = np.asarray(others, np.int64)
        colour = sums[others] @ sums[a] / (norm[others] * norm[a])
        joint = weight[a] + weight[others]
        bw = np.maximum(box[a, 2], box[others, 2]) - np.minimum(box[a, 0], box[others, 0])
        bh = np.maximum(box[a, 3], box[others, 3]) - np.minimum(box[a, 1], box[others, 1])
        return (colour + (1.0 - joint / total) + (1.0 - (bw * bh - joint) / total)).tolist()

    def absorb(new: int, a: int, b: int) -> None:
        sums[new] = sums[a] + sums[b]
        norm[new] = np.sqrt(sums[new] @ sums[new]) + 1e-12
        weight[new] = weight[a] + weight[b]
        box[new] = (
            min(box[a, 0], box[b, 0]),
            min(box[a, 1], box[b, 1]),
            max(box[a, 2], box[b, 2]),
            max(box[a, 3], box[b, 3]),
        )
        if weight[new] >= min_weight:
            kept.append((new, tree.members[new], float(norm[new] / weight[new])))

    tree = MergeTree(n, lambda g, others: [-s for s in similarity(g, others)], absorb)
    tree.link((a, b) for a, b in np.asarray(pairs, np.int64).reshape(-1, 2).tolist() if a != b)
    entries = []
    for a in range(n):
        others = sorted(x for x in tree.neighbours[a] if x > a)
        if others:
            entries += [(-s, a, b) for s, b in zip(similarity(a, others), others)]
    tree.start(entries)
    tree.merge_while()
    return _segments_coarse_to_fine(kept, tree.parent, n)


def merge_boundary(
    pairs: np.ndarray,
    border_len: np.ndarray,
    border_edge: np.ndarray,
    node_weight: np.ndarray,
    min_weight: float = 4.0,
    size_power: float = 0.5,
) -> List[Segment]:
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
    weight = np.zeros(2 * n)  # per group id of the :class:`MergeTree`
    weight[:n] = node_weight
    total = float(np.sum(node_weight)) or 1.0
    # per group: neighbour -> [border length, summed edge strength]
    borders: List[Optional[Dict[int, List[float]]]] = [dict() for _ in range(n)] + [None] * n
    kept: List[Tuple[int, List[int], float]] = []

    def cost(a: int, b: int, length: float, edge: float) -> float:
        return edge / length * ((weight[a] + weight[b]) / total) ** size_power

    def absorb(new: int, a: int, b: int) -> None:
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
            borders[x][new] = joined[x]
        if weight[new] >= min_weight:
            # no features here: coherence is neutral (mid-scale) for the selection score
            kept.append((new, tree.members[new], BOUNDARY_COHERENCE))

    tree = MergeTree(n, lambda g, others: [cost(x, g, *borders[g][x]) for x in others], absorb)
    entries = []
    for (a, b), length, edge in zip(
        np.asarray(pairs, np.int64).reshape(-1, 2).tolist(),
        np.asarray(border_len).tolist(),
        np.asarray(border_edge).tolist(),
    ):
        if a == b or length <= 0:
            continue
        borders[a][b] = borders[b][a] = [length, edge]
        entries.append((cost(a, b, length, edge), a, b))
    tree.link((a, b) for _, a, b in entries)
    tree.start(entries)
    tree.merge_while()
    return _segments_coarse_to_fine(kept, tree.parent, n)


def _segments_coarse_to_fine(
    groups: List[Tuple[int, List[int], float]], parent_of: Dict[int, int], n: int
) -> List[Segment]:
    """Merged groups (id, member nodes, coherence) in creation order → segments, parents first:
    the last merges are the coarsest, so creation order is reversed."""
    index = {g: j for j, (g, _, _) in enumerate(reversed(groups))}
    out = []
    for g, mem, coh in reversed(groups):
        mask = np.zeros(n, bool)
        mask[mem] = True
        out.append(Segment(mask=mask, parent=index.get(parent_of.get(g), -1), coherence=coh))
    return out


def iterative_merge(
    features, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, min_patches: int = 4
) -> List[np.ndarray]:
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
        levels.append(
            _listed_groups(merge.live, merge.counts, merge.members, min_patches, merge.grid)
        )
    return levels


class _GridMerge:
    """State of :func:`iterative_merge`: groups by id (patches 0..h·w-1, then one id per merge),
    their summed features, sizes, unit mean features, members and neighbour sets, the live pairs
    in birth order and a heap of (-similarity, birth number, a, b).

    Deliberately not a :class:`MergeTree`: parity with the published code fixes its tie order,
    and that order is not the tree's. The published loop takes the first maximum of a pair dict
    in insertion order, so among equal similarities the oldest pair wins (the heap key carries a
    birth number, where the tree's carries the group ids: a pair (x, new group) born late can
    have a lower x than an older pair). Pairs born together are born in the iteration order of
    the published neighbour sets, so those sets must be built by its exact sequence of
    ``union`` / ``difference`` / ``discard`` / ``add`` calls (the tree pops, unions and pushes in
    sorted order instead). It also keeps the live pairs in birth order (their order is the
    published listing order) and computes similarities in float32 torch. Carrying all this in
    the tree would slow the other three engines and gain them nothing."""

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
        sim = torch.dot(self.units[a], self.units[b]).item()
        heapq.heappush(self.heap, (-sim, self.born, a, b))
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


def _listed_groups(
    live: Dict[Tuple[int, int], None],
    counts: List[int],
    members: List[List[int]],
    min_patches: int,
    hw: Tuple[int, int],
) -> np.ndarray:
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
