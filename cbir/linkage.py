"""Grouping images by links: the disjoint sets every grouping uses (labels, clusters, the review
screen's cluster view), and single linkage under "cannot-link" constraints: the clusters of
`cbir pairs` and the confirmed groups of `cbir export --remove-list` (a reviewer's `different`
decision keeps two images apart, whatever links them)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class DisjointSets:
    """Union-find over ids (path halving). A group's root is its smallest id, so what names a
    group does not depend on the order of the joins."""

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._parent: dict[str, str] = {}
        for x in items:
            self.find(x)

    def __iter__(self) -> Iterator[str]:
        """Every id seen, in the order first seen."""
        return iter(self._parent)

    def find(self, x: str) -> str:
        """The root of `x`'s group (a new id is a group of its own)."""
        parent = self._parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def join(self, a: str, b: str) -> str:
        """Put `a` and `b` in one group; returns its root."""
        ra, rb = self.find(a), self.find(b)
        lo, hi = (ra, rb) if ra <= rb else (rb, ra)
        self._parent[hi] = lo
        return lo


def link(
    edges: Iterable[tuple[float, str, str]], apart: Iterable[tuple[str, str]] = ()
) -> list[tuple[list[str], float]]:
    """Join the edges (score, a, b) in the order given, except one that would put two images of
    an `apart` pair into one group. Returns the groups of two or more, largest first, each with
    the lowest score among the edges that joined it (its weakest link when the edges come
    strongest first)."""
    sets = DisjointSets()
    weakest: dict[str, float] = {}
    members: dict[str, set[str]] = {}
    far: dict[str, set[str]] = {}
    for a, b in apart:
        far.setdefault(a, set()).add(b)
        far.setdefault(b, set()).add(a)

    def kept_apart(ra: str, rb: str) -> bool:
        small, big = sorted((members[ra], members[rb]), key=len)
        return any(not far[x].isdisjoint(big) for x in small if x in far)

    for score, a, b in edges:
        ra, rb = sets.find(a), sets.find(b)
        members.setdefault(ra, {ra})
        members.setdefault(rb, {rb})
        if ra == rb or kept_apart(ra, rb):
            continue
        root = sets.join(ra, rb)
        other = rb if root == ra else ra
        members[root] |= members.pop(other)
        weakest[root] = min(score, weakest.get(root, 1.0), weakest.pop(other, 1.0))
    out = [(sorted(m), weakest[root]) for root, m in members.items() if len(m) > 1]
    out.sort(key=lambda c: (-len(c[0]), c[0][0]))
    return out
