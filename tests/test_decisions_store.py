"""The decisions log (cbir/store/decisions.py): append-only parts, latest wins, undo, compaction."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from cbir.errors import CbirError
from cbir.store import decisions as D

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _d(a: str, b: str, verdict: str, minutes: int, **kw: object) -> D.Decision:
    return D.Decision(a, b, verdict, time=T0 + timedelta(minutes=minutes), **kw)  # type: ignore[arg-type]  # test kwargs


def test_record_appends_one_part_per_call_and_orders_the_pair(tmp_path):
    first = D.record(tmp_path, [_d("bb", "aa", D.SAME, 0, path_a="b.jpg", path_b="a.jpg")])
    second = D.record(tmp_path, [_d("aa", "cc", D.DIFFERENT, 1)])
    assert first is not None and second is not None and first != second
    assert D.parts(tmp_path) == sorted([first, second])
    log = D.read_log(tmp_path).to_pylist()
    assert [(r["image_a"], r["image_b"], r["path_a"], r["path_b"]) for r in log] == [
        ("aa", "bb", "a.jpg", "b.jpg"),
        ("aa", "cc", "", ""),
    ]
    assert D.record(tmp_path, []) is None and len(D.parts(tmp_path)) == 2


def test_the_latest_decision_wins_and_the_history_stays(tmp_path):
    D.record(tmp_path, [_d("a", "b", D.SAME, 0, reviewer="ann")])
    D.record(tmp_path, [_d("b", "a", D.DIFFERENT, 5, reviewer="bob")])
    now = D.current_decisions(tmp_path)
    assert list(now) == [("a", "b")]
    assert now[("a", "b")]["decision"] == D.DIFFERENT and now[("a", "b")]["reviewer"] == "bob"
    assert [r["reviewer"] for r in D.read_log(tmp_path).to_pylist()] == ["ann", "bob"]


def test_undo_withdraws_one_decision_and_the_one_before_counts_again(tmp_path):
    D.record(tmp_path, [_d("a", "b", D.SAME, 0)])
    later = _d("a", "b", D.DIFFERENT, 1)
    D.record(tmp_path, [later])
    D.record(tmp_path, [_d("a", "b", D.UNDO, 2, undoes=later.decision_id)])
    assert D.current_decisions(tmp_path)[("a", "b")]["decision"] == D.SAME
    assert len(D.read_log(tmp_path)) == 3  # nothing is rewritten


@pytest.mark.parametrize(
    "bad, says",
    [
        (D.Decision("a", "b", "maybe"), "unknown decision"),
        (D.Decision("a", "a", D.SAME), "two different images"),
        (D.Decision("a", "b", D.DIFFERENT, master="a"), "only a 'same'"),
        (D.Decision("a", "b", D.SAME, master="c"), "neither side"),
        (D.Decision("a", "b", D.UNDO), "undo names"),
        (D.Decision("a", "b", D.SAME, note="x" * (D.MAX_NOTE + 1)), "at most"),
    ],
)
def test_a_wrong_decision_is_refused_in_one_line_and_nothing_is_written(tmp_path, bad, says):
    with pytest.raises(CbirError, match=says):
        D.record(tmp_path, [bad])
    assert D.parts(tmp_path) == [] and not list(tmp_path.iterdir())


def test_writers_side_by_side_lose_nothing(tmp_path):
    def write(who: str) -> None:
        for i in range(40):
            D.record(tmp_path, [D.Decision(f"{who}{i:03d}", "zz", D.SAME, reviewer=who)])

    threads = [threading.Thread(target=write, args=(w,)) for w in ("p", "q", "r")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(D.parts(tmp_path)) == 120
    assert len(D.current_decisions(tmp_path)) == 120


def test_compact_merges_parts_without_changing_what_is_decided(tmp_path):
    for i in range(10):
        D.record(tmp_path, [_d(f"a{i}", "z", D.SAME if i % 2 else D.DIFFERENT, i)])
    before = D.current_decisions(tmp_path)
    assert D.compact(tmp_path, keep=20) == 0
    assert D.compact(tmp_path, keep=3) == 10
    assert len(D.parts(tmp_path)) == 1
    assert D.current_decisions(tmp_path) == before
    D.record(tmp_path, [_d("a0", "z", D.SAME, 99)])
    assert D.parts(tmp_path)[-1].name > D.parts(tmp_path)[0].name  # names keep writing order
    assert D.current_decisions(tmp_path)[("a0", "z")]["decision"] == D.SAME


def test_the_folder_says_what_it_is_and_the_note_is_no_part(tmp_path):
    log = tmp_path / "decisions"
    assert D.compact(log) == 0  # the DVC stage, before anyone decided: the folder and its note
    note = log / "README.txt"
    assert "nothing can rebuild it" in note.read_text() and D.parts(log) == []
    note.write_text("kept as the team edited it\n")
    D.record(log, [_d("a", "b", D.SAME, 1)])
    assert note.read_text() == "kept as the team edited it\n"  # written only where missing
    assert len(D.parts(log)) == 1 and len(D.read_log(log)) == 1


def test_a_crash_inside_compact_leaves_rows_twice_which_readers_drop(tmp_path):
    for i in range(3):
        D.record(tmp_path, [_d(f"a{i}", "z", D.SAME, i)])
    # the merged file written, the merged parts not yet removed
    merged = D.read_log(tmp_path)
    pq.write_table(merged, tmp_path / "part-99999999999999999999-merged-0.parquet")
    assert len(D.read_log(tmp_path)) == 3


def test_a_damaged_part_is_refused_in_one_line_naming_it(tmp_path):
    D.record(tmp_path, [_d("a", "b", D.SAME, 0)])
    bad = tmp_path / "part-00000000000000000001-deadbeef.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(CbirError, match=f"{bad.name} is unreadable"):
        D.read_log(tmp_path)
