"""Local-feature voting: which pictures of a collection a query's keypoints come from.

A detail cut from a print (5-10 % of its area) is far from the print in any global descriptor,
and regional descriptors find it only when one of their windows happens to frame it. Its
keypoints, though, are the print's: each of the query's strongest RootSIFT descriptors looks up
its nearest descriptors among every picture's strongest ones (an index of them, cbir.store.local),
and each picture that holds a close one gets a vote. The pictures with the most votes are
candidates for geometric verification (cbir.verify), which confirms or rejects them.

The kernel here knows no index and no pipeline: `tally` turns one query's nearest-neighbour
answers (similarities and owners) into votes.

- **One vote per picture per query keypoint**: a keypoint whose neighbours all lie in one picture
  (repeated structure, a picture's neighbouring scales) counts once.
- **A ratio test against the background**: a neighbour votes only when its squared distance is
  below RATIO^2 times that of the (K+1)-th neighbour, which stands for "a descriptor no closer than
  chance". Lowe's test against the second neighbour would reject the true match whenever the
  collection holds another copy of the print (both are as close); against the (K+1)-th it holds up
  to K copies. Measured on benchmarks/partial.py's details (48 photographs, 382 pictures,
  300 descriptors a picture): without the test the original was the top vote for 77 % of the
  5-10 % details and 79 % of the 10-20 % ones; with it (K 10, RATIO 0.8), 90 % and 100 %.
- **What is indexed**: each picture's strongest `keypoints` descriptors (cbir.store.features keeps
  them strongest first). 200 found the original first for 62 % of the 5-10 % details (with K 5 and
  no ratio test), 300 for 77 %, 500 for 85 %, 1,000 for 90 %; the index grows in proportion.
"""

from __future__ import annotations

import numpy as np

from .verify import QUERY_KEYPOINTS, Features

#: Nearest descriptors a query keypoint looks up (its K+1-th is the background distance).
K = 10
#: A neighbour votes when its distance is below RATIO times the background's.
RATIO = 0.8
#: Votes a picture needs to be a candidate: one vote is as often chance as not.
MIN_VOTES = 2


def query_descriptors(f: Features, keypoints: int = QUERY_KEYPOINTS) -> np.ndarray:
    """The query's strongest keypoints' RootSIFT descriptors (float32, unit rows) that vote."""
    return np.ascontiguousarray(f.descriptors[:keypoints], np.float32)


def tally(
    similarities: np.ndarray,
    owners: np.ndarray,
    *,
    ratio: float = RATIO,
    min_votes: int = MIN_VOTES,
) -> list[tuple[int, int]]:
    """One query's votes: (owner, votes) best first (ties: the owner of the closer descriptor).

    similarities: float [n_keypoints, K+1], each row a keypoint's neighbours nearest first (inner
    products of unit descriptors); owners: int64 of the same shape, the picture each neighbour
    belongs to, -1 for no neighbour. The last column is the background the others are tested
    against; a row without a background (fewer neighbours than K+1) tests against distance 2
    (orthogonal descriptors).
    """
    if similarities.shape != owners.shape:
        raise ValueError(f"shapes differ: {similarities.shape} and {owners.shape}")
    if similarities.ndim != 2 or similarities.shape[1] < 2 or similarities.shape[0] == 0:
        return []
    d2 = np.maximum(0.0, 2.0 - 2.0 * similarities.astype(np.float64))
    background = np.where(owners[:, -1] >= 0, d2[:, -1], 2.0)[:, None]
    near, who = d2[:, :-1], owners[:, :-1]
    ok = (who >= 0) & (near <= ratio * ratio * background)
    rows = np.broadcast_to(np.arange(len(who))[:, None], who.shape)[ok]
    owner, dist = who[ok], near[ok]
    if owner.size == 0:
        return []
    # one vote per (keypoint, owner): the first of each pair is its nearest (rows are sorted)
    _, first = np.unique(np.stack([rows, owner]), axis=1, return_index=True)
    owner, dist = owner[first], dist[first]
    ids, inverse, votes = np.unique(owner, return_inverse=True, return_counts=True)
    best = np.full(len(ids), np.inf)
    np.minimum.at(best, inverse, dist)
    order = np.lexsort((best, -votes))
    return [(int(ids[i]), int(votes[i])) for i in order if votes[i] >= min_votes]
