"""cbir.linkage: the disjoint sets every grouping uses, and single linkage kept apart by
`different` decisions."""

from __future__ import annotations

from cbir.linkage import DisjointSets, link


def test_disjoint_sets_name_a_group_by_its_smallest_id_whatever_the_join_order():
    for order in ([("c", "b"), ("b", "a")], [("a", "b"), ("c", "a")], [("b", "c"), ("c", "a")]):
        sets = DisjointSets(["d"])
        for a, b in order:
            sets.join(a, b)
        assert {x: sets.find(x) for x in sets} == {"a": "a", "b": "a", "c": "a", "d": "d"}
    assert list(DisjointSets(["z", "y", "z"])) == ["z", "y"]  # first seen, once


def test_link_keeps_decided_pairs_apart_and_reports_the_weakest_link():
    edges = [(0.99, "a", "b"), (0.95, "b", "c"), (0.9, "c", "d"), (0.85, "x", "y")]
    assert link(edges) == [(["a", "b", "c", "d"], 0.9), (["x", "y"], 0.85)]
    # a and d decided different: the link that would join their groups is left out
    assert link(edges, apart=[("d", "a")]) == [(["a", "b", "c"], 0.95), (["x", "y"], 0.85)]
