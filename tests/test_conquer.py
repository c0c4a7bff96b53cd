"""Tests of the shared merge tree of the classical merges (unsam.pseudo.conquer, issue 30).

The tree owns the order of the merges — cheapest pair first, ties to the lower ids, stale
entries dropped — so these pin that order on hand-made cases with ties, and pin the exact
outputs of the three engines that use it on seeded inputs against digests of the code before
the tree (d1e6383). The features there are small integers, so every dot product is exact and
the digests do not depend on the BLAS or the CPU."""

import hashlib

import numpy as np
import pytest

from unsam.pseudo.conquer import (
    GreedyMerger,
    MergeTree,
    RegionGraph,
    grid_pairs,
    merge_boundary,
    merge_graph,
    merge_selective,
)

CHAIN = [(0, 1), (1, 2), (2, 3)]


def _tree(cost, **kw):
    """A tree over 4 nodes whose merged group ``g`` pairs with ``x`` at ``cost(g, x)``;
    ``absorbed`` lists the (g, a, b) the engine was told."""
    absorbed = []
    tree = MergeTree(
        4,
        lambda g, others: [cost(g, x) for x in others],
        lambda g, a, b: absorbed.append((g, a, b)),
        **kw,
    )
    return tree, absorbed


def test_tree_ties_go_to_the_lower_ids_and_stale_entries_are_dropped():
    """A chain with every cost equal: (0, 1) first; its merged group 4 then pairs with 2, and
    (2, 3) wins the tie against (2, 4); the stale (1, 2) never merges."""
    tree, absorbed = _tree(lambda g, x: 0.0)
    tree.link(CHAIN)
    tree.start([(0.0, a, b) for a, b in CHAIN])
    tree.merge_while()
    assert tree.merges == [(0, 1, 4), (2, 3, 5), (4, 5, 6)]
    assert absorbed == [(4, 0, 1), (5, 2, 3), (6, 4, 5)]
    assert tree.parent == {0: 4, 1: 4, 2: 5, 3: 5, 4: 6, 5: 6}
    assert tree.members == {6: [0, 1, 2, 3]} and tree.neighbours == {6: set()}


def test_tree_keep_larger_drops_entries_of_a_group_that_grew():
    """With ``keep_larger`` a merged group keeps an id, so an entry of a group that has merged
    since is stale although both ids are alive: (0, 2) at cost 2 was pushed before 0 absorbed
    1 and must not merge; (2, 3) at 3 goes first, then the re-costed (0, 2) at 9 — whose older
    copy, pushed before 2 absorbed 3, is stale too."""
    tree, absorbed = _tree(lambda g, x: 9.0, keep_larger=True)
    pairs = [(0, 1), (0, 2), (2, 3)]
    tree.link(pairs)
    tree.start([(0.0, 0, 1), (2.0, 0, 2), (3.0, 2, 3)])
    tree.merge_while()
    assert absorbed == [(0, 0, 1), (2, 2, 3), (0, 0, 2)]  # equal sizes: the lower id stays
    assert tree.merges == [(0, 1, 4), (2, 3, 5), (4, 5, 6)] and tree.state[0] == 6
    assert tree.members == {0: [0, 1, 2, 3]}


def test_tree_keep_larger_keeps_the_id_of_the_larger_part():
    tree, absorbed = _tree(lambda g, x: 0.5 if x == 3 else 0.7, keep_larger=True)
    tree.link(CHAIN)
    tree.start([(1.0, 0, 1), (0.0, 1, 2), (0.0, 2, 3)])
    tree.merge_while()
    # (1, 2) → 1; (1, 3) → 1 (1 has two nodes); (0, 1) → 1: the larger part, not the lower id
    assert absorbed == [(1, 1, 2), (1, 1, 3), (1, 1, 0)]
    assert tree.merges == [(1, 2, 4), (4, 3, 5), (5, 0, 6)]


def test_tree_bound_is_the_stopping_rule():
    tree, absorbed = _tree(lambda g, x: 5.0)
    tree.link(CHAIN)
    tree.start([(1.0, 0, 1), (2.0, 1, 2), (3.0, 2, 3)])
    tree.merge_while(2.5)  # (0, 1) at 1; then (4, 2) costs 5 and (2, 3) 3: both above
    assert tree.merges == [(0, 1, 4)]
    tree.merge_while(2.5)  # nothing more below the bound
    assert len(tree.merges) == 1
    tree.merge_while(3.0)  # ≤ bound merges
    assert tree.merges == [(0, 1, 4), (2, 3, 5)]


def test_greedy_merger_tie_order_and_log():
    """Four identical nodes in a chain: every similarity is 1, so the ids decide; group 0
    absorbs 1, then 2, then 3 (the larger part keeps its id), all logged at the threshold."""
    g = RegionGraph(np.ones((4, 3)), np.ones(4), np.array(CHAIN))
    m = GreedyMerger(g)
    m.merge_down_to(0.9)
    assert [(x.threshold, x.a, x.b, x.merged.state, x.merged.weight) for x in m.log] == [
        (0.9, 0, 1, 4, 2.0),
        (0.9, 4, 2, 5, 3.0),
        (0.9, 5, 3, 6, 4.0),
    ]
    snap = m.snapshot(0.9)
    assert snap.owner.tolist() == [0, 0, 0, 0] and list(snap.groups) == [0]
    assert snap.groups[0].state == 6 and snap.groups[0].coherence == pytest.approx(np.sqrt(3))


def test_greedy_merger_threshold_and_inactive_nodes():
    """Node 3 is outside the region; 0 and 1 are similar, 2 is not: at 0.9 only (0, 1)
    merges, at -1 everything active does; the inactive node stays its own owner."""
    sums = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.0]])
    m = GreedyMerger(
        RegionGraph(sums, np.ones(4), np.array(CHAIN)), np.array([True, True, True, False])
    )
    m.merge_down_to(0.9)
    assert [(x.a, x.b) for x in m.log] == [(0, 1)]
    assert m.snapshot(0.9).owner.tolist() == [0, 0, 2, 3]
    m.merge_down_to(-1.0)
    assert m.snapshot(-1.0).owner.tolist() == [0, 0, 0, 3]
    assert len(m.log) == 2 and m.pair_unions(1, 1.0) == []


def test_merge_boundary_breaks_ties_by_ids():
    """Equal costs along a chain: (0, 1) merges first, then (2, 3) before (2, {0, 1}), so the
    segments (coarse to fine, newest merge first) are all, {2, 3}, {0, 1}."""
    segs = merge_boundary(np.array(CHAIN), np.ones(3), np.ones(3), np.ones(4), 1.0, size_power=0.0)
    assert [s.mask.astype(int).tolist() for s in segs] == [[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]]
    assert [s.parent for s in segs] == [-1, 0, 0]


def test_merge_selective_breaks_ties_by_ids():
    """Four identical nodes in a chain: the three initial pairs score exactly alike, so (0, 1)
    merges first (the last, finest segment); later scores differ in their last bits."""
    boxes = np.tile([0.0, 0.0, 1.0, 1.0], (4, 1))
    segs = merge_selective(np.ones((4, 2)), np.ones(4), np.array(CHAIN), boxes, 1.0)
    assert len(segs) == 3 and segs[-1].mask.tolist() == [True, True, False, False]


# --------------------------------------------------------------- exact outputs on seeded inputs
def _digest(segments) -> str:
    h = hashlib.sha256()
    for s in segments:
        h.update(
            np.packbits(s.mask).tobytes()
            + str(s.parent).encode()
            + float(s.coherence).hex().encode()
        )
    return h.hexdigest()[:16]


def _inputs(seed: int):
    """A random graph (a grid, or random pairs with duplicates, reversals and self-loops) with
    small-integer features from three prototypes (many exact ties) and weights."""
    rng = np.random.default_rng(seed)
    if seed % 2:
        n = 30
        pairs = grid_pairs(5, 6)
    else:
        n = 24
        pairs = rng.integers(0, n, size=(60, 2))
    sums = rng.integers(-1, 3, size=(3, 4)).astype(float)[rng.integers(0, 3, n)]
    weight = rng.integers(1, 4, n).astype(float)
    active = rng.random(n) < 0.85
    boxes = np.sort(rng.integers(0, 6, size=(n, 4)), axis=1).astype(float)
    length = rng.integers(0, 3, len(pairs)).astype(float)
    edge = rng.integers(0, 4, len(pairs)).astype(float)
    return sums, weight, pairs, active, boxes, length, edge


# digests of the code before the merge tree (d1e6383): merge_graph (plain; pair unions + all
# merges), merge_selective, merge_boundary (size_power 0 and 1)
GOLDEN = {
    0: (
        "6954a2d21f8c44bf",
        "c3e6371a0e00d5ca",
        "f037803cae101a09",
        "ffbfefcf94a0f944",
        "64e1246f20b820c8",
    ),
    1: (
        "d8342a6c4b150550",
        "f1a73301a2c66bdf",
        "33d27eaf20fc6033",
        "a2eb230c08201515",
        "a6c7856c948d369c",
    ),
    2: (
        "cd72ccd2753fd992",
        "bbd652e559f719bd",
        "eae52e1c68a8388a",
        "c2ab3f626b15df89",
        "654e23069e1952e8",
    ),
    3: (
        "376613f09e7b203e",
        "3e8929a63a5d5d00",
        "451124fc72e25bbb",
        "6f6591adbaa1bbf3",
        "328062e73e386941",
    ),
    4: (
        "c4a7e18457b3d716",
        "9273cf0e663addce",
        "a5d186d28ffb9cd4",
        "8e7c7744109bfb25",
        "54c707915cabebe1",
    ),
    5: (
        "2515d3ca904f7e82",
        "ae5d998360e5a57e",
        "8038db9a40b20f55",
        "d7015ab2eb4dc082",
        "6b5742289370881f",
    ),
}


@pytest.mark.parametrize("seed", sorted(GOLDEN))
def test_engines_unchanged_on_seeded_inputs(seed):
    sums, weight, pairs, active, boxes, length, edge = _inputs(seed)
    graph = RegionGraph(sums, weight, pairs)
    got = (
        _digest(merge_graph(graph, active, min_weight=2.0)),
        _digest(
            merge_graph(
                graph, active, (0.9, 0.5, 0.0, -0.5), 2.0, pair_unions=True, all_merges=True
            )
        ),
        _digest(merge_selective(sums, weight, pairs, boxes, 2.0)),
        _digest(merge_boundary(pairs, length, edge, weight, 2.0, size_power=0.0)),
        _digest(merge_boundary(pairs, length, edge, weight, 2.0, size_power=1.0)),
    )
    assert got == GOLDEN[seed]
