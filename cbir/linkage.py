"""Single-linkage grouping under "cannot-link" constraints: the clusters of `cbir pairs` and the
confirmed groups of `cbir export --remove-list` (a reviewer's `different` decision keeps two
images apart, whatever links them)."""

from __future__ import annotations

from collections.abc import Iterable


def link(
    edges: Iterable[tuple[float, str, str]], apart: Iterable[tuple[str, str]] = ()
) -> list[tuple[list[str], float]]:
    """Join the edges (score, a, b) in the order given, except one that would put two images of
    an `apart` pair into one group. Returns the groups of two or more, largest first, each with
    the lowest score among the edges that joined it (its weakest link when the edges come
    strongest first)."""
    parent: dict[str, str] = {}
    weakest: dict[str, float] = {}
    members: dict[str, set[str]] = {}
    far: dict[str, set[str]] = {}
    for a, b in apart:
        far.setdefault(a, set()).add(b)
        far.setdefault(b, set()).add(a)

    def find(x: str) -> str:
        if x not in parent:
            parent[x] = x
            members[x] = {x}
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def kept_apart(ra: str, rb: str) -> bool:
        small, big = sorted((members[ra], members[rb]), key=len)
        return any(not far[x].isdisjoint(big) for x in small if x in far)

    for score, a, b in edges:
        ra, rb = find(a), find(b)
        if ra == rb or kept_apart(ra, rb):
            continue
        parent[rb] = ra
        members[ra] |= members.pop(rb)
        weakest[ra] = min(score, weakest.get(ra, 1.0), weakest.pop(rb, 1.0))
    out = [(sorted(m), weakest[root]) for root, m in members.items() if len(m) > 1]
    out.sort(key=lambda c: (-len(c[0]), c[0][0]))
    return out
