"""Hand-computed checks of cbir.metrics (arithmetic in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cbir.metrics import (
    RankedResults,
    build_ranked_results,
    evaluate,
    f1_at_k,
    map_at_k,
    markdown_table,
    micro_ap,
    pr_curve,
    precision_at_k,
    precision_key,
    recall_at_k,
    recall_at_precision,
)

NAN = np.nan


def rr(relevance, scores=None, n_relevant=None) -> RankedResults:
    """RankedResults from lists; default scores: 1, 0.9, 0.8... with nan where relevance is None."""
    rel = [[bool(x) if x is not None else False for x in row] for row in relevance]
    if scores is None:
        scores = [[NAN if x is None else 1.0 - 0.1 * j for j, x in enumerate(row)] for row in relevance]
    return RankedResults(np.array(rel), np.array(scores, dtype=float), np.array(n_relevant))


# ---------------------------------------------------------------- rank metrics


def test_three_relevant_hits_at_ranks_1_and_3():
    r = rr([[1, 0, 1, 0, 0]], n_relevant=[3])
    assert precision_at_k(r, 5) == pytest.approx(2 / 5)  # 2 hits / 5
    assert recall_at_k(r, 5) == pytest.approx(2 / 3)  # 2 hits / 3 relevant
    # F1 = 2 * 0.4 * 2/3 / (0.4 + 2/3) = (8/15) / (16/15) = 0.5
    assert f1_at_k(r, 5) == pytest.approx(0.5)
    # AP@5 = (P@1 * 1 + P@3 * 1) / min(5, 3) = (1/1 + 2/3) / 3 = 5/9
    assert map_at_k(r, 5) == pytest.approx(5 / 9)
    assert precision_at_k(r, 1) == 1.0
    assert recall_at_k(r, 1) == pytest.approx(1 / 3)
    # AP@1 = P@1 / min(1, 3) = 1
    assert map_at_k(r, 1) == 1.0


def test_pair_group_hit_at_rank_2():
    r = rr([[0, 1, 0, 0, 0]], n_relevant=[1])  # group of size 2
    assert map_at_k(r, 5) == pytest.approx(0.5)  # (1/2) / min(5, 1)
    assert precision_at_k(r, 5) == pytest.approx(0.2)
    assert recall_at_k(r, 5) == 1.0
    assert f1_at_k(r, 5) == pytest.approx(1 / 3)  # 2 * 0.2 * 1 / 1.2
    # Top 1 is a miss: P = R = 0 -> F1 defined as 0, AP@1 = 0.
    assert (precision_at_k(r, 1), recall_at_k(r, 1), f1_at_k(r, 1), map_at_k(r, 1)) == (0, 0, 0, 0)


def test_means_over_queries_and_f1_is_mean_of_per_query_f1():
    r = rr([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]], n_relevant=[3, 1])
    assert precision_at_k(r, 5) == pytest.approx((0.4 + 0.2) / 2)  # 0.3
    assert recall_at_k(r, 5) == pytest.approx((2 / 3 + 1) / 2)  # 5/6
    # mean(0.5, 1/3) = 5/12 = 0.41667; the F1 of the means would be 2*0.3*(5/6)/(0.3+5/6) = 0.44118
    assert f1_at_k(r, 5) == pytest.approx(5 / 12)
    assert f1_at_k(r, 5) != pytest.approx(2 * 0.3 * (5 / 6) / (0.3 + 5 / 6))
    assert map_at_k(r, 5) == pytest.approx((5 / 9 + 1 / 2) / 2)  # 19/36


def test_ap_denominator_is_min_k_n_relevant_when_n_relevant_exceeds_k():
    # 10 relevant items, hits at ranks 1, 2, 4, 5:
    # AP@5 = (1/1 + 2/2 + 3/4 + 4/5) / min(5, 10) = 3.55 / 5 = 0.71
    r = rr([[1, 1, 0, 1, 1]], n_relevant=[10])
    assert map_at_k(r, 5) == pytest.approx(0.71)
    assert recall_at_k(r, 5) == pytest.approx(4 / 10)
    # A perfect top 5 gets AP@5 = 5/5 = 1 and P@5 = 1 although recall is only 0.5.
    perfect = rr([[1, 1, 1, 1, 1]], n_relevant=[10])
    assert map_at_k(perfect, 5) == 1.0
    assert precision_at_k(perfect, 5) == 1.0
    assert recall_at_k(perfect, 5) == 0.5


def test_fewer_results_than_k_still_divides_by_k():
    # Only 2 results came back (padding after), both relevant, 2 relevant in all.
    r = rr([[1, 1, None, None, None]], n_relevant=[2])
    assert precision_at_k(r, 5) == pytest.approx(2 / 5)  # not 2/2
    assert recall_at_k(r, 5) == 1.0
    assert map_at_k(r, 5) == 1.0  # (1/1 + 2/2) / min(5, 2)
    # K beyond the stored width: ranks 6..10 count as misses.
    assert precision_at_k(r, 10) == pytest.approx(2 / 10)
    assert map_at_k(r, 10) == 1.0


def test_invalid_k_and_inputs():
    r = rr([[1, 0]], n_relevant=[1])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            precision_at_k(r, bad)
    with pytest.raises(ValueError, match="n_relevant"):
        rr([[1, 0]], n_relevant=[0])
    with pytest.raises(ValueError, match="padding"):
        RankedResults(np.array([[True]]), np.array([[NAN]]), np.array([1]))
    with pytest.raises(ValueError, match="more relevant"):
        rr([[1, 1]], n_relevant=[1])


def test_no_queries_gives_nan():
    r = RankedResults(np.zeros((0, 5), bool), np.zeros((0, 5)), np.zeros(0, int))
    m = evaluate(r)
    assert m["n_queries"] == 0
    assert all(math.isnan(v) for k, v in m.items() if k != "n_queries")


# ---------------------------------------------------------------- build_ranked_results


def test_build_drops_self_duplicates_and_non_queries():
    group_of = {0: "A", 1: "A", 2: "A", 3: "B", 4: "B", 5: "C"}  # 6 has no ground truth
    qids = [0, 3, 5, 6]
    nids = np.array(
        [
            [0, 4, 1, 2, -1],  # self first, then 4 (B), 1 (A), 2 (A), no 5th result
            [5, 3, 4, 4, 1],  # self at rank 2, 4 repeated
            [0, 1, 2, 3, 4],  # 5: group C has size 1 -> not a query
            [0, 1, 2, 3, 4],  # 6: no ground truth -> not a query
        ]
    )
    scores = np.array(
        [
            [1.0, 0.9, 0.8, 0.7, NAN],
            [0.95, 0.9, 0.85, 0.8, 0.75],
            [0.5] * 5,
            [0.5] * 5,
        ]
    )
    r = build_ranked_results(qids, nids, scores, group_of)
    assert r.query_ids.tolist() == [0, 3]
    assert r.n_relevant.tolist() == [2, 1]  # |A| - 1, |B| - 1
    assert r.relevance.shape == (2, 5)  # width kept, padded at the end
    # Query 0 -> [4, 1, 2]: relevance F T T
    assert r.relevance[0].tolist() == [False, True, True, False, False]
    np.testing.assert_array_equal(r.scores[0], [0.9, 0.8, 0.7, NAN, NAN])
    # Query 3 -> [5, 4, 1] (self and the second 4 dropped): relevance F T F
    assert r.relevance[1].tolist() == [False, True, False, False, False]
    np.testing.assert_array_equal(r.scores[1], [0.95, 0.85, 0.75, NAN, NAN])
    # Query 0: AP@5 = (1/2 + 2/3) / min(5, 2) = 7/12; query 3: AP@5 = (1/2) / 1
    assert map_at_k(r, 5) == pytest.approx((7 / 12 + 1 / 2) / 2)
    # P@1 = 0 for both (self no longer counts as a hit).
    assert precision_at_k(r, 1) == 0.0


def test_build_with_string_ids_and_errors():
    group_of = {"a": 1, "b": 1, "c": 2}
    r = build_ranked_results(
        np.array(["a", "b"]), np.array([["a", "b"], ["c", "a"]]), np.array([[1.0, 0.5], [0.7, 0.6]]), group_of
    )
    assert r.relevance.tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="unique"):
        build_ranked_results([0, 0], np.zeros((2, 1), int), np.zeros((2, 1)), {0: 1, 1: 1})
    with pytest.raises(ValueError, match="nan score"):
        build_ranked_results([0], np.array([[1]]), np.array([[NAN]]), {0: 1, 1: 1})


# ---------------------------------------------------------------- pooled pair metrics


def _pooled_example() -> RankedResults:
    # q1: n_rel 2, results (0.9, rel), (0.6, not)
    # q2: n_rel 1, results (0.8, not), (0.5, rel)
    # q3: n_rel 2, results (0.7, rel), padding  -> one of q3's positives is never retrieved
    return rr(
        [[1, 0], [0, 1], [1, None]],
        scores=[[0.9, 0.6], [0.8, 0.5], [0.7, NAN]],
        n_relevant=[2, 1, 2],
    )


def test_micro_ap_by_hand():
    # Pooled: 0.9 T, 0.8 F, 0.7 T, 0.6 F, 0.5 T; positives = 2 + 1 + 2 = 5
    # precision at the hits: 1/1, 2/3, 3/5 -> µAP = (1 + 2/3 + 3/5) / 5 = 34/75
    assert micro_ap(_pooled_example()) == pytest.approx(34 / 75)


def test_pr_curve_by_hand():
    p, r, t = pr_curve(_pooled_example())
    np.testing.assert_allclose(p, [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    np.testing.assert_allclose(r, [0.2, 0.2, 0.4, 0.4, 0.6])
    np.testing.assert_allclose(t, [0.9, 0.8, 0.7, 0.6, 0.5])


def test_recall_at_precision_by_hand():
    r = _pooled_example()
    assert recall_at_precision(r, 0.9) == pytest.approx((0.2, 0.9))  # only the first pair
    assert recall_at_precision(r, 0.65) == pytest.approx((0.4, 0.7))  # 2/3 >= 0.65
    assert recall_at_precision(r, 0.6) == pytest.approx((0.6, 0.5))  # 3/5 >= 0.6 (exact)
    m = evaluate(r)
    assert (m["recall@p90"], m["threshold@p90"]) == pytest.approx((0.2, 0.9))


def test_recall_at_precision_never_reached():
    # Best pair is a false match: precision 0 then 1/2, never >= 0.9.
    r = rr([[0, 1]], scores=[[0.8, 0.5]], n_relevant=[1])
    assert recall_at_precision(r, 0.9) == (0.0, math.inf)
    assert recall_at_precision(r, 0.5) == (1.0, 0.5)
    # No pair returned at all.
    empty = rr([[None, None]], n_relevant=[1])
    assert recall_at_precision(empty, 0.9) == (0.0, math.inf)
    assert micro_ap(empty) == 0.0
    with pytest.raises(ValueError):
        recall_at_precision(r, 0.0)


def test_recall_at_precision_prefers_highest_threshold_for_same_recall():
    # 0.9 T, 0.8 F with 1 positive: both thresholds reach recall 1 at precision >= 0.5.
    r = rr([[1, 0]], scores=[[0.9, 0.8]], n_relevant=[1])
    assert recall_at_precision(r, 0.5) == (1.0, 0.9)


def test_ties_are_pessimistic_and_order_independent():
    # Equal scores: the negative is ranked first whatever the input order.
    # Pooled: 0.5 F, 0.5 T -> µAP = (1/2) / 1 (a stable sort of [T, F] would give 1.0).
    a = rr([[1, 0]], scores=[[0.5, 0.5]], n_relevant=[1])
    b = rr([[0, 1]], scores=[[0.5, 0.5]], n_relevant=[1])
    assert micro_ap(a) == micro_ap(b) == pytest.approx(0.5)
    # Tied pairs are accepted together: one PR point at threshold 0.5.
    for p, rec, t in (pr_curve(a), pr_curve(b)):
        assert (p.tolist(), rec.tolist(), t.tolist()) == ([0.5], [1.0], [0.5])
    assert recall_at_precision(a, 0.9) == (0.0, math.inf)
    # Ties across queries: 0.9 (q1 T), 0.9 (q2 F), 0.8 (q2 T); 2 positives.
    # Order 0.9 F, 0.9 T, 0.8 T -> µAP = (1/2 + 2/3) / 2 = 7/12; curve points at 0.9 and 0.8 only.
    c = rr([[1, None], [0, 1]], scores=[[0.9, NAN], [0.9, 0.8]], n_relevant=[1, 1])
    assert micro_ap(c) == pytest.approx(7 / 12)
    p, rec, t = pr_curve(c)
    np.testing.assert_allclose(p, [1 / 2, 2 / 3])
    np.testing.assert_allclose(rec, [1 / 2, 1])
    np.testing.assert_allclose(t, [0.9, 0.8])


def _reference_pair_metrics(r: RankedResults, target: float) -> tuple[float, float]:
    """Brute force: DISC21-style µAP and recall at precision by trying every threshold."""
    valid = ~np.isnan(r.scores)
    s, y = r.scores[valid], r.relevance[valid]
    n_pos = r.n_relevant.sum()
    order = sorted(range(len(s)), key=lambda i: (s[i], not y[i]), reverse=True)
    tp, ap = 0, 0.0
    for rank, i in enumerate(order, 1):
        if y[i]:
            tp += 1
            ap += tp / rank / n_pos
    best = 0.0
    for t in np.unique(s):
        acc = s >= t
        if y[acc].sum() / acc.sum() >= target:
            best = max(best, y[acc].sum() / n_pos)
    return ap, best


def test_pair_metrics_match_brute_force_on_random_lists():
    rng = np.random.default_rng(0)
    for _ in range(20):
        nq, width = 7, 6
        # Coarse scores to force many ties.
        scores = np.round(rng.random((nq, width)), 1)
        rel = rng.random((nq, width)) < 0.4
        scores[:, -1][rng.random(nq) < 0.5] = NAN  # some padding
        rel &= ~np.isnan(scores)
        n_rel = rel.sum(1) + rng.integers(1, 3, nq)  # some positives never retrieved
        r = RankedResults(rel, scores, n_rel)
        ap, rec = _reference_pair_metrics(r, 0.6)
        assert micro_ap(r) == pytest.approx(ap)
        assert recall_at_precision(r, 0.6)[0] == pytest.approx(rec)


# ---------------------------------------------------------------- perfect vs random rankings


def _synthetic(perfect: bool, seed: int = 0) -> RankedResults:
    """8 groups of 6 items; every item queries and gets 10 results."""
    rng = np.random.default_rng(seed)
    group_of = {i: i // 6 for i in range(48)}
    nids, scores = [], []
    for q in range(48):
        mates = [i for i in range(48) if group_of[i] == group_of[q] and i != q]
        others = [i for i in range(48) if group_of[i] != group_of[q]]
        if perfect:  # all 5 mates first, scoring above every non-match of every query
            row = mates + list(rng.choice(others, 5, replace=False))
        else:
            row = list(rng.choice([i for i in range(48) if i != q], 10, replace=False))
        nids.append(row)
        scores.append(sorted(rng.random(10) * 0.5 + np.array([0.5] * 5 + [0] * 5) * perfect, reverse=True))
    return build_ranked_results(list(range(48)), np.array(nids), np.array(scores), group_of)


def test_perfect_ranking_scores_one_and_random_is_lower():
    perfect, random = evaluate(_synthetic(True)), evaluate(_synthetic(False))
    assert perfect["n_queries"] == random["n_queries"] == 48
    # n_relevant = 5: precision is 1 for K <= 5, recall for K >= 5, mAP for every K.
    for key in ("precision@1", "precision@5", "recall@5", "f1@5", "recall@10",
                "map@1", "map@5", "map@10", "micro_ap", "recall@p90"):
        assert perfect[key] == pytest.approx(1.0), key
        assert 0.0 <= random[key] < perfect[key], key
    assert perfect["precision@10"] == pytest.approx(0.5)  # 5 hits / 10
    assert perfect["recall@1"] == pytest.approx(0.2)  # 1 / 5


# ---------------------------------------------------------------- summary / table


def test_evaluate_keys_and_precision_key():
    m = evaluate(_pooled_example(), ks=(1, 5), precision=0.95)
    assert set(m) == {
        "precision@1", "recall@1", "f1@1", "map@1",
        "precision@5", "recall@5", "f1@5", "map@5",
        "micro_ap", "recall@p95", "threshold@p95", "n_queries",
    }
    assert precision_key(0.9) == "p90"
    assert precision_key(0.999) == "p99.9"


def test_markdown_table_layout():
    m = {f"{n}@{k}": 0.5 for n in ("precision", "recall", "f1", "map") for k in (1, 5, 10)}
    m["precision@1"] = 2 / 3
    m["micro_ap"] = 0.123456
    m["recall@p90"] = float("nan")
    table = markdown_table([("sscd|v2", m)], extra=False)
    lines = table.splitlines()
    assert lines[0] == (
        "| Model | Precision@1 | Recall@1 | Precision@5 | Recall@5 | F1@5 | Precision@10 | Recall@10 "
        "| F1@10 | mAP@5 | mAP@10 |"
    )
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|---|---|"
    assert lines[2] == "| sscd\\|v2 | 0.6667 | " + " | ".join(["0.5000"] * 9) + " |"
    assert table.endswith("\n")
    extra = markdown_table([("m", m)]).splitlines()
    assert extra[0].endswith("| mAP@10 | µAP | R@P0.9 |")
    assert extra[2].endswith("| 0.1235 | n/a |")
    assert extra[1].count("|---") == 13  # Model + 10 + 2 extra columns
