"""cbir.fsutil: atomic writes (a failure leaves the old file), stale temporary files, and the one
line for a full disk or a read-only folder."""

from __future__ import annotations

import errno
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cbir import fsutil
from cbir.fsutil import (
    TMP_PREFIX,
    DiskFull,
    ReadOnly,
    atomic_path,
    clean_stale_tmp,
    is_disk_full,
    is_read_only,
    write_json,
    write_parquet,
    write_text,
)


def test_writes_replace_the_target_whole_and_leave_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text("one\n", target)
    write_text("two\n", target)
    assert target.read_text() == "two\n"
    write_json({"b": 1, "a": [1, 2]}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2], "b": 1}
    write_parquet(pa.table({"n": [1, 2, 3]}), tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").column("n").to_pylist() == [1, 2, 3]
    assert not list(tmp_path.rglob(TMP_PREFIX + "*"))


def test_parquet_keeps_a_dictionary_only_for_columns_whose_values_repeat(tmp_path):
    n = 5000
    table = pa.table(
        {
            "image_id": [f"{i:016x}" for i in range(n)],  # distinct: plain
            "status": ["ok", "missing"] * (n // 2),  # repeats: a dictionary
            "run": pa.array([i % 3 for i in range(n)], pa.int32()),
            "phash": pa.array(range(n), pa.uint64()),
            "note": pa.nulls(n, pa.string()),
            "tags": [["a"]] * n,  # not flat: Parquet's default
        }
    )
    assert fsutil.dictionary_columns(table) == ["status", "run", "note", "tags"]
    write_parquet(table, tmp_path / "t.parquet")
    meta = pq.read_metadata(tmp_path / "t.parquet").row_group(0)
    dictionary = {
        meta.column(i).path_in_schema.split(".")[0]
        for i in range(meta.num_columns)
        if meta.column(i).has_dictionary_page
    }
    assert dictionary - {"tags"} == {"status", "run", "note"}
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
    assert fsutil.dictionary_columns(table.slice(0, 0)) == table.column_names


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.txt"
    write_text("before\n", target)
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "before\n"
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))


def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    target = tmp_path / "out.txt"
    write_text("before\n", target)
    with pytest.raises(DiskFull, match=r"no space left on the device while writing .*out\.txt"), \
            atomic_path(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_text() == "before\n"
    assert is_disk_full(OSError(errno.EDQUOT, "quota"))
    assert is_disk_full(RuntimeError(f"IOError: {os.strerror(errno.ENOSPC)}"))
    assert not is_disk_full(OSError(errno.EACCES, "denied"))


def test_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(fsutil.tempfile, "mkstemp", refuse)
    with pytest.raises(ReadOnly, match=r"cannot write .* \(permission denied: it is read-only"):
        write_text("x", tmp_path / "out.txt")
    assert is_read_only(OSError(errno.EROFS, "ro"))
    assert not is_read_only(OSError(errno.ENOENT, "missing"))
    assert "file system is read-only" in str(fsutil.read_only(OSError(errno.EROFS, "ro")))


def test_clean_stale_tmp_removes_only_temporary_files(tmp_path):
    (tmp_path / f"{TMP_PREFIX}a.json.123").write_text("left by a kill")
    (tmp_path / f"{TMP_PREFIX}b.json.456").write_text("another")
    (tmp_path / "a.json").write_text("kept")
    assert clean_stale_tmp(tmp_path, "a.json") == 1
    assert (tmp_path / f"{TMP_PREFIX}b.json.456").exists()
    assert clean_stale_tmp(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert clean_stale_tmp(tmp_path / "missing") == 0


def test_a_file_stamp_changes_when_the_file_is_written_again_and_is_none_when_missing(tmp_path):
    from cbir.fsutil import file_stamps

    target = tmp_path / "t.txt"
    write_text("one", target)
    first = file_stamps([target, tmp_path / "absent"])
    assert first[0] is not None and first[0][:2] == (str(target), 3) and first[1] is None
    assert file_stamps([target]) == first[:1]  # unchanged: the same stamp
    write_text("two", target)  # same size, a new file renamed over the old
    assert file_stamps([target]) != first[:1]
