"""benchmarks/scale.py: its growth exponents and verdicts, and one run end to end at a tiny N
(every step driven through the real library calls, in child processes)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, benchmark


def _scale():
    return benchmark("scale")


def test_exponent_recovers_a_power_law():
    scale = _scale()
    ns = [1e4, 1e5, 1e6]
    assert scale.exponent(ns, [3e-4 * n**1.5 for n in ns]) == pytest.approx(1.5)
    assert scale.exponent(ns, [7.0, 7.0, 7.0]) == pytest.approx(0.0)
    assert scale.project(ns, [2e-3 * n for n in ns], 1e7) == pytest.approx(2e4)
    assert scale.exponent([1e5], [3.0]) is None  # one size: no slope


def _row(step: str, n: int, seconds: float, rss: float) -> dict:
    return {"step": step, "n": n, "status": "ok", "seconds": seconds, "rss": rss, "anon": rss}


def test_targets_pass_fail_and_not_run():
    scale = _scale()
    rows = [_row("nightly", 10**5, 10.0, 1e9), _row("nightly", 10**7, 25.0, 9e9),
            _row("pairs", 10**5, 20.0, 1e9),
            {"step": "pairs", "n": 10**7, "status": "killed: RSS 13.0 GB > watchdog 12.9 GB",
             "seconds": 100.0, "rss": 13e9}]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in scale.targets(rows)}
    nightly = lines["nightly adding 1,000 to 10^7 <= 2 x the same on 10^5 (embedding excluded)"]
    assert "2.50 x" in nightly and nightly.endswith("| FAIL |")
    assert lines["nightly: peak RSS at 10^7 <= 8 GB"].endswith("| FAIL |")  # 9 GB
    assert "killed" in lines["pairs: peak RSS at 10^7 <= 8 GB"]
    assert lines["index: peak RSS at 10^7 <= 8 GB"].endswith("| not run |")
    assert lines["catalogue query: new > 0.9 <= 1 s at 10^7"].endswith("| not run |")
    rows[1]["seconds"] = 15.0
    rows[1]["rss"] = 7e9
    lines = {line.split(" | ")[0].lstrip("| "): line for line in scale.targets(rows)}
    assert lines["nightly: peak RSS at 10^7 <= 8 GB"].endswith("| PASS |")
    night = "nightly adding 1,000 to 10^7 <= 2 x the same on 10^5 (embedding excluded)"
    assert "1.50 x (one night each)" in lines[night] and lines[night].endswith("| PASS |")
    # nights measured side by side (--night-rounds) decide it where there are, by their medians
    side = scale.SIDE_BY_SIDE
    rows += [{**_row(side, 10**5, 1.0, 1e9), "rounds": [1.0, 0.9, 1.2]},
             {**_row(side, 10**7, 2.5, 1e9), "rounds": [2.5, 2.4, 2.7]}]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in scale.targets(rows)}
    # the median of the rounds' ratios (2.5, 2.67, 2.25), each round's nights minutes apart
    assert "2.50 x (median of 3 rounds side by side: 2.25, 2.50, 2.67)" in lines[night]
    assert lines[night].endswith("| FAIL |")


@pytest.mark.slow
def test_runs_end_to_end_at_a_tiny_size(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--out", str(tmp_path),
         "--ingest-sizes", "40", "--sizes", "1500", "--new", "100", "--shard-size", "500",
         "--kill-sizes", "1500", "--kill-points", "pairs.batch:1,nightly.reported:1,never.reached:1"],
        capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    kills = {r["point"]: r for r in rows if r["step"] == "nightly killed"}
    by_step = {r["step"]: r for r in rows if r["step"] != "nightly killed"}
    assert set(by_step) == set(scale_steps := _scale().INGEST_STEPS + _scale().VECTOR_STEPS)
    assert all(by_step[s]["status"] == "ok" for s in scale_steps), rows
    assert by_step["ingest first"]["out"]["new"] == 40
    assert by_step["decode floor"]["out"]["files"] == 40  # every file decoded and hashed
    assert "| the decode ingest owes each new file, alone in one process, at 40 " in out.stdout
    assert by_step["ingest rerun"]["out"]["decoded"] == 0
    assert by_step["ingest +new"]["out"]["new"] == 100
    assert "planted pairs found 150/150" in by_step["pairs"]["note"]
    assert "planted found 20/20" in by_step["nightly"]["note"]
    assert all(by_step[s]["rss"] > 0 for s in scale_steps)
    assert "| 1,500 | review queue |" in out.stdout
    assert not (tmp_path / "vectors-1500").exists()  # the data of a size is removed
    # killed at each point, the state before readable, the rerun the same as the undisturbed run
    for point in ("pairs.batch:1", "nightly.reported:1"):
        assert kills[point]["status"] == "ok", kills[point]
        assert "killed by SIGKILL" in kills[point]["note"]
        assert "the rerun equals the undisturbed run" in kills[point]["note"]
    assert kills["never.reached:1"]["status"] == "FAIL"  # a run that was not killed is no check
    assert "| 1,500 | pairs.batch:1 | ok |" in out.stdout
    assert not list(tmp_path.glob("vectors-1500-*"))  # nor the killed runs' copies


@pytest.mark.slow
def test_a_kept_size_resumes_with_the_pairs_rate_measured_on_a_sample(tmp_path):
    """--keep, then --resume-from pairs --pairs-sample: the steps before it keep their rows, the
    pairs step projects its time from the sampled queries, and the steps after it find the
    state a full search leaves (the nightly run finds every planted copy of the night)."""
    def run(*extra: str) -> list[dict]:
        out = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--out", str(tmp_path),
             "--ingest-sizes", "", "--sizes", "1500", "--new", "100", "--shard-size", "500",
             "--keep", *extra], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return json.loads((tmp_path / "results.json").read_text())["rows"]

    first = {r["step"]: r for r in run()}
    assert (tmp_path / "vectors-1500").is_dir()
    rows = {r["step"]: r for r in run("--resume-from", "pairs", "--pairs-sample", "500")}
    assert rows["index"] == first["index"] and rows["write vectors"] == first["write vectors"]
    pairs = rows["pairs"]
    assert pairs["status"] == "ok" and pairs["out"]["projected"] is True
    assert pairs["note"].startswith("PROJECTED: 500 of 1,600 searched")  # the first night: +100
    # from a cold page cache, then as that left it: the rest of the step at the second rate
    assert "from a cold page cache, then 500 more at" in pairs["note"]
    assert pairs["out"]["cold"] > 0 and pairs["out"]["warm"] > 0
    assert " + 1,100 / " in pairs["note"]
    found, planted = re.search(r"first sample's images found (\d+)/(\d+)",
                               pairs["note"]).groups()
    assert int(planted) > 0 and found == planted
    assert "150 pairs" in pairs["note"]  # the planted pairs, recorded through run_pairs
    assert rows["nightly"]["status"] == "ok"
    assert "planted found 20/20" in rows["nightly"]["note"]
    assert all(rows[s]["status"] == "ok" for s in rows)
    # a step after the night alone: the night's run numbers are kept in the workspace
    again = {r["step"]: r for r in run("--resume-from", "review queue")}
    assert again["review queue"]["status"] == "ok", again["review queue"]
    assert "run=3 page" in again["review queue"]["note"]  # the second night's (ingest run 3)
    def rerank(queries: str, *extra: str) -> str:  # benchmarks/rerank.py on the kept workspace
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rerank.py"),
                              str(tmp_path / "vectors-1500"), "--queries", queries, "--rounds",
                              "1", *extra], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    # both ways of re-ranking, the same pairs
    out = rerank("300")
    assert "1,700 images, 300 queries" in out  # two nights of 100
    assert "an exact (flat) index" in out  # under FLAT_MAX_N: see test_vectors for more
    assert "same pairs True, same scores True, 0 of" in out
    # --cold: from a cold page cache, with and without reading the file ahead, the same pairs
    out = rerank("300", "--cold")
    assert "1,700 images, 300 queries from a cold page cache" in out
    assert re.search(r"round 1 +read ahead: +[\d,]+ queries/s", out)
    assert re.search(r"round 1 not read ahead: +[\d,]+ queries/s", out)
    assert "same pairs and scores True" in out
    # --fetch: scattered rows with the page cache asked first and without, cold and warm
    out = rerank("30", "--fetch")
    assert "1,700 rows, 3,000 scattered rows a read" in out
    assert re.search(r"round 1 +cache first, cold: +[\d.]+ us a row", out)
    assert re.search(r"round 1 +in turn, warm: +[\d.]+ us a row", out)
    assert re.search(r"warm: cache first / in turn: [\d.]+-[\d.]+x faster", out)
    assert "same rows True" in out
    # --batches: the all-pairs rate by batch size, whole batches each (400: two, 800 queries);
    # sizes that searched the same queries found the same pairs
    out = rerank("600", "--batches", "200,400,600")
    assert re.search(r"round 1 batch +200: 600 queries, +[\d,]+ queries/s", out)
    assert re.search(r"round 1 batch +400: 800 queries, +[\d,]+ queries/s", out)
    assert re.search(r"batch +600: [\d,]+-[\d,]+ queries/s", out)
    same = re.search(r"where the queries were the same: same pairs (\w+), scores apart by at "
                     r"most ([\de.+-]+), (\d+) ranks differ", out)
    assert same is not None and same[1] == "True" and float(same[2]) < 1e-5
    # benchmarks/opening.py: the night's openings the kept way and the way before agree
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "opening.py"),
                          str(tmp_path / "vectors-1500"), "--appended", "100", "--rounds", "1"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1,700 present images with a vector, the night's 100 rows appended" in out.stdout
    assert re.search(r"grown +[\d.]+ s", out.stdout)
    assert "same ids and rows True" in out.stdout
    assert re.search(r"index ids \(1,700\): kept sorted [\d.]+ s, .*same True", out.stdout)


def test_the_catalogue_benchmark_times_live_and_stored_queries_that_agree(tmp_path):
    """benchmarks/catalogue.py at a tiny N: a workspace of manifest, pairs and clusters; every
    step timed in a child; each query live and stored, with the same number of rows; a night
    grows the stored results to what computing them whole gives."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "catalogue.py"), "--out",
                          str(tmp_path), "--sizes", "3e3"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    rows = {}
    for line in out.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[1]] = cells
    assert "3,000 + 1,000 items, 500 pairs" in rows["write (not timed)"][4]
    for query in ("new", "largest", "accession"):
        live, stored = rows[f"live:{query}"], rows[f"stored:{query}"]
        assert float(live[2]) > 0 and float(stored[2]) > 0
        assert live[4] == stored[4] and re.fullmatch(r"[1-9]\d* rows", live[4])
    assert re.search(r"new \d+\.\dx, largest \d+\.\dx, accession \d+\.\dx",
                     rows["live / stored"][4])
    assert "(50 rows)" in rows["review"][4]
    # the night's refresh grows both stored results, to the rows computing them whole gives
    assert rows["grow"][4] == "pair_report grown, cluster_report grown"
    assert rows["whole"][4] == "same rows as grown True"
    assert not any(tmp_path.iterdir())  # not kept


@pytest.mark.slow
def test_nights_side_by_side_at_the_smallest_and_largest_kept_sizes(tmp_path):
    """--night-rounds: more nights at both kept sizes, alternately; a row each with their
    median, which the nightly target then compares rather than the two sizes' single nights."""
    def run(*extra: str) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--out", str(tmp_path),
             "--ingest-sizes", "", "--new", "50", "--shard-size", "500", *extra],
            capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out

    alone = run("--sizes", "1000", "--night-rounds", "1")  # not kept: nothing to compare
    assert "--night-rounds: needs two sizes kept after their night" in alone.stdout
    out = run("--sizes", "1000,1500", "--keep", "--night-rounds", "2")
    scale = _scale()
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    side = {r["n"]: r for r in rows if r["step"] == scale.SIDE_BY_SIDE}
    assert set(side) == {1000, 1500}
    for n, r in side.items():
        assert r["status"] == "ok" and len(r["rounds"]) == 2
        assert r["seconds"] == pytest.approx(sum(r["rounds"]) / 2) and r["rss"] > 0
        assert "median of 2 nights" in r["note"] and "alternating with" in r["note"]
        assert len(r["loads"]) == 2 and "; load " in r["note"]
        # the size's own night (run 2), then two more in place
        assert json.loads((tmp_path / f"vectors-{n}" / scale.NIGHT_FILE).read_text())["run"] == 4
    assert "| 1,500 | nightly, side by side |" in out.stdout
    ratios = sorted(h / lo for lo, h in zip(side[1000]["rounds"], side[1500]["rounds"]))
    assert (f"x (median of 2 rounds side by side: {ratios[0]:.2f}, {ratios[1]:.2f}) | not run |"
            in out.stdout)
    # a size run again drops its side-by-side row (its nights are another workspace's)
    run("--sizes", "1000", "--keep")
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["n"] for r in rows if r["step"] == scale.SIDE_BY_SIDE} == {1500}
