"""Conquer: bottom-up merging of adjacent patch groups inside one divided region.

Every patch of the region starts as its own group. The most similar pair of 4-adjacent groups
(cosine similarity of their mean features) is merged greedily, while that similarity is at least
the current threshold; thresholds are visited from fine to coarse (default
``[0.6, 0.5, 0.4, 0.3, 0.2, 0.1]``) and the grouping is snapshotted after each one, so the
snapshots are nested: every group at a coarser threshold is a union of groups at the finer one.

:func:`merge_hierarchy` returns the distinct groups with ≥ ``min_patches`` patches as
:class:`Segment` records with the index of their parent segment (the smallest strictly larger
group containing them, or -1), i.e. a forest that the engine turns into ``level`` /
``parent_id``. :func:`merge_graph` is the same on any region adjacency graph (the engine's
superpixels), and :func:`merge_selective` a selective-search-style alternative (similarity +
size + fill, one complete hierarchy) used to diversify the candidates.

:func:`iterative_merge` is the published UnSAM rule (``--recipe unsam``): raw patch features,
summed on merge, one array of kept groups per threshold.
"""
import heapq
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_THRESHOLDS = (0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclass
class Segment:
    mask: np.ndarray  # (h, w) bool on the patch grid, or (N,) bool over graph nodes
    threshold: float  # finest threshold at which this exact group exists
    parent: int  # index into the returned list, -1 for a top-level group
    coherence: float  # |mean of member features| in [0, 1]: 1 = all members identical


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
    segs = merge_graph(feats.reshape(-1, c), np.ones(h * w), grid_pairs(h, w), region.ravel(),
                       thresholds, float(min_patches), pair_unions)
    for s in segs:
        s.mask = s.mask.reshape(h, w)
    return segs


def merge_graph(node_sums: np.ndarray, node_weight: np.ndarray, pairs: np.ndarray,
                active: np.ndarray = None, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                min_weight: float = 4.0, pair_unions: bool = False,
                all_merges: bool = False) -> List[Segment]:
    """Greedy threshold-hierarchy merging on any region adjacency graph.

    ``node_sums``: (N, C) sum of the unit feature vectors a node covers (a patch: its feature;
    a superpixel: the pixel-weighted sum of the patch features under it); ``node_weight``: (N,)
    how many units that is; ``pairs``: (E, 2) adjacent node indices; ``active``: (N,) bool
    nodes of the region. Group similarity is the cosine of the summed (= mean) features; a
    group is reported once its weight is ≥ ``min_weight``.

    With ``pair_unions`` the union of every two adjacent groups of each snapshot is added too
    (an MCG-style combinatorial candidate: objects whose parts are not similar enough to merge
    at any threshold, e.g. a face and a shirt); such a segment's parent is the first group of a
    coarser snapshot that contains both halves. With ``all_merges`` every group formed by a
    merge is reported, not only those alive at a threshold snapshot (selective search's "every
    merge is a proposal"); its parent is the group it merges into next. Returns segments (``mask``: (N,) bool over
    nodes) ordered from coarse to fine (parents before children).
    """
    n = node_sums.shape[0]
    inside = np.ones(n, bool) if active is None else np.asarray(active, bool)
    sums = node_sums.astype(np.float64) * inside[:, None]
    weight = np.where(inside, node_weight, 0).astype(np.float64)
    owner = np.arange(n)
    members = {int(i): [int(i)] for i in np.flatnonzero(inside)}
    neighbours = {i: set() for i in members}
    version = [0] * n  # a list: indexed once per heap entry, numpy scalars are slower

    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    pairs = pairs[inside[pairs[:, 0]] & inside[pairs[:, 1]] & (pairs[:, 0] != pairs[:, 1])]
    pairs = np.unique(np.sort(pairs, 1), axis=0) if len(pairs) else pairs
    norms = np.linalg.norm(sums, axis=1) + 1e-12
    sims = np.einsum("ij,ij->i", sums[pairs[:, 0]], sums[pairs[:, 1]]) / (norms[pairs[:, 0]] * norms[pairs[:, 1]])
    heap = [(-float(s), int(a), int(b), 0, 0) for s, (a, b) in zip(sims, pairs)]
    heapq.heapify(heap)
    for a, b in pairs.tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)

    gnorm = np.linalg.norm(sums, axis=1)  # |sum| per group, kept up to date on merges

    def cos(a, others):
        return sums[others] @ sums[a] / (gnorm[others] * gnorm[a] + 1e-12)

    def info_of(g):
        return float(weight[g]), float(np.linalg.norm(sums[g]) / max(weight[g], 1e-12))

    snapshots = []  # per threshold: (threshold, owner copy, {group: (weight, coherence)})
    unions = []  # (snapshot index, group a, group b, coherence)
    merge_parent = {}  # (group, weight) state -> state it was merged into
    merged_states = []  # (state key, threshold, member nodes, coherence)
    for t in sorted(thresholds, reverse=True):
        while heap and -heap[0][0] >= t:
            _, a, b, va, vb = heapq.heappop(heap)
            if a not in members or b not in members or version[a] != va or version[b] != vb:
                continue  # stale entry
            if len(members[a]) < len(members[b]):
                a, b = b, a  # merge the smaller group into the larger one
            if all_merges:
                ka, kb = (a, float(weight[a])), (b, float(weight[b]))
            owner[members[b]] = a
            members[a].extend(members.pop(b))
            sums[a] += sums[b]
            gnorm[a] = np.sqrt(sums[a] @ sums[a])
            weight[a] += weight[b]
            nb = neighbours.pop(b)
            for x in nb:
                neighbours[x].discard(b)
            nb.discard(a)
            neighbours[a].discard(b)
            neighbours[a] |= nb
            for x in nb:
                neighbours[x].add(a)
            version[a] += 1
            if all_merges:
                kn = (a, float(weight[a]))
                merge_parent[ka] = merge_parent[kb] = kn
                if weight[a] >= min_weight:
                    merged_states.append((kn, t, np.array(members[a]),
                                          float(np.linalg.norm(sums[a]) / weight[a])))
            others = sorted(neighbours[a])
            if others:
                for x, s in zip(others, cos(a, np.asarray(others))):
                    heapq.heappush(heap, (-float(s), a, x, version[a], version[x]) if a < x
                                   else (-float(s), x, a, version[x], version[a]))
        snapshots.append((t, owner.copy(), {g: info_of(g) for g in members}))
        if pair_unions:
            for a in sorted(members):
                if weight[a] < min_weight:
                    continue
                for b in sorted(neighbours[a]):
                    if b > a and weight[b] >= min_weight:
                        coh = float(np.linalg.norm(sums[a] + sums[b]) / (weight[a] + weight[b]))
                        unions.append((len(snapshots) - 1, a, b, coh))

    # distinct groups, keyed by (owner id, weight); nested across snapshots (fine -> coarse)
    key_to_index = {}
    records = []  # (key, threshold, members mask, coherence)
    parent_key = {}
    for si, (t, own, info) in enumerate(snapshots):
        for g, (wgt, coh) in info.items():
            if wgt < min_weight:
                continue
            key = (g, float(wgt))
            if key not in key_to_index:
                key_to_index[key] = len(records)
                records.append((key, t, (own == g) & inside, coh))
    # parent: the group containing this one at the first coarser snapshot where it changed
    for key, t, mask, _ in records:
        first = np.flatnonzero(mask)[0]
        for t2, own, info in snapshots:
            if t2 >= t:
                continue
            g2 = own[first]
            k2 = (g2, float(info[g2][0]))
            if k2 != key and k2 in key_to_index:
                parent_key[key] = k2
                break
    if all_merges:
        for key, t, nodes, coh in merged_states:
            if key not in key_to_index:
                mask = np.zeros(n, bool)
                mask[nodes] = True
                key_to_index[key] = len(records)
                records.append((key, t, mask, coh))
        for key, _, _, _ in records:
            k2 = merge_parent.get(key)
            # skip states too small to be reported (cannot happen for parents of reported ones)
            while k2 is not None and k2 not in key_to_index:
                k2 = merge_parent.get(k2)
            if k2 is not None:
                parent_key[key] = k2
    # pair unions: distinct from every tree group by construction (two groups of one snapshot)
    seen_unions = set()
    for si, a, b, coh in unions:
        t, own, info = snapshots[si]
        # the same union reappears unchanged in later snapshots while neither half grows
        sig = (a, float(info[a][0]), b, float(info[b][0]))
        if sig in seen_unions:
            continue
        seen_unions.add(sig)
        key = ("union", si, a, b)
        key_to_index[key] = len(records)
        records.append((key, t, ((own == a) | (own == b)) & inside, coh))
        fa, fb = np.flatnonzero(own == a)[0], np.flatnonzero(own == b)[0]
        for t2, own2, info2 in snapshots[si + 1:]:
            if own2[fa] == own2[fb]:
                k2 = (own2[fa], float(info2[own2[fa]][0]))
                if k2 in key_to_index:
                    parent_key[key] = k2
                break
    # order coarse -> fine so parents precede children
    sizes = [float(weight_of(r[2], node_weight)) for r in records]
    order = sorted(range(len(records)), key=lambda i: (-sizes[i], i))
    new_index = {records[i][0]: j for j, i in enumerate(order)}
    out = []
    for i in order:
        key, t, mask, coh = records[i]
        pk = parent_key.get(key)
        out.append(Segment(mask=mask, threshold=t,
                           parent=new_index[pk] if pk is not None else -1, coherence=coh))
    return out


def weight_of(mask: np.ndarray, node_weight: np.ndarray) -> float:
    return float(np.asarray(node_weight, np.float64)[mask].sum())


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
    alive = np.zeros(2 * n, bool)
    alive[:n] = True
    members = {i: [i] for i in range(n)}
    groups = []  # (new group id, members, coherence)
    parent_of = {}
    new = n
    while heap:
        _, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]):
            continue  # stale entry: one side was merged already
        sums[new] = sums[a] + sums[b]
        norm[new] = np.sqrt(sums[new] @ sums[new]) + 1e-12
        weight[new] = weight[a] + weight[b]
        box[new] = (min(box[a, 0], box[b, 0]), min(box[a, 1], box[b, 1]),
                    max(box[a, 2], box[b, 2]), max(box[a, 3], box[b, 3]))
        alive[a] = alive[b] = False
        alive[new] = True
        parent_of[a] = parent_of[b] = new
        members[new] = members.pop(a) + members.pop(b)
        nb = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        for x in nb:
            neighbours[x] -= {a, b}
            neighbours[x].add(new)
        neighbours[new] = nb
        if weight[new] >= min_weight:
            groups.append((new, members[new], float(norm[new] / weight[new])))
        if nb:
            others = np.array(sorted(nb), np.int64)
            for s, x in zip(similarity(new, others).tolist(), others.tolist()):
                heapq.heappush(heap, (-s, x, new))
        new += 1
    # the last merges are the coarsest: reverse creation order so parents come first
    index = {g: j for j, (g, _, _) in enumerate(reversed(groups))}
    out = []
    for g, mem, coh in reversed(groups):
        mask = np.zeros(n, bool)
        mask[mem] = True
        out.append(Segment(mask=mask, threshold=0.0, parent=index.get(parent_of.get(g), -1), coherence=coh))
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
    feats = feats.detach().to("cpu", torch.float32)
    h, w, c = feats.shape
    flat = feats.reshape(h * w, c)
    sums = list(flat)  # group id -> summed raw feature (C,); ids grow with every merge
    counts = [1] * (h * w)
    units = [F.normalize(v, dim=0) for v in sums]
    members: List[List[int]] = [[i] for i in range(h * w)]
    neighbours: List[set] = [set() for _ in range(h * w)]
    alive = [True] * (h * w)
    live: Dict[Tuple[int, int], None] = {}  # live pairs (a < b), in birth order
    heap: List[Tuple[float, int, int, int]] = []  # (-similarity, birth number, a, b)
    born = 0

    def add_pair(a: int, b: int) -> None:
        nonlocal born
        heapq.heappush(heap, (-torch.dot(units[a], units[b]).item(), born, a, b))
        live[(a, b)] = None
        born += 1

    for idx in range(h * w):
        # the same sequence of set insertions as published: it fixes the sets' iteration order
        if idx % w:
            neighbours[idx].add(idx - 1)
            neighbours[idx - 1].add(idx)
            add_pair(idx - 1, idx)
        if idx >= w:
            neighbours[idx].add(idx - w)
            neighbours[idx - w].add(idx)
            add_pair(idx - w, idx)

    levels = []
    for t in thresholds:
        while heap:
            neg, _, a, b = heap[0]
            if not (alive[a] and alive[b]):
                heapq.heappop(heap)  # a pair of a group that has merged since
                continue
            if -neg < t:
                break
            heapq.heappop(heap)
            new = len(sums)
            sums.append(sums[a] + sums[b])
            counts.append(counts[a] + counts[b])
            units.append(F.normalize(sums[new] / counts[new], dim=0))
            members.append(members[a] + members[b])
            nb = neighbours[a].union(neighbours[b]).difference({a, b})
            neighbours.append(nb)
            alive[a] = alive[b] = False
            alive.append(True)
            del live[(a, b)]
            for x in nb:
                for old in (a, b):
                    if old in neighbours[x]:
                        del live[(x, old) if x < old else (old, x)]
                        neighbours[x].discard(old)
                add_pair(x, new)
                neighbours[x].add(new)
        listed, masks = set(), []
        for pair in live:
            for g in pair:
                if g not in listed:
                    listed.add(g)
                    if counts[g] >= min_patches:
                        m = np.zeros(h * w, bool)
                        m[members[g]] = True
                        masks.append(m.reshape(h, w))
        levels.append(np.stack(masks) if masks else np.zeros((0, h, w), bool))
    return levels
