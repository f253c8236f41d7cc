"""`cbir review`: the review application over a real workspace (real scans, real DuckDB
catalogue, the real decisions log), through Starlette's TestClient and a real server process."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import CBIR
from PIL import Image
from review_workspace import (CLUSTERS, FINGERPRINT, HOSTILE, RUN1, RUN2, THRESHOLD, VERIFIED,
                              assert_verified_rows, build, image_ids, scores)
from starlette.testclient import TestClient

from cbir.review.app import ReviewConfig, build_app
from cbir.store import pairs as store_pairs
from cbir.store import catalog
from cbir.store.decisions import pair_key
from cbir.store.layout import layout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
BASE = "http://127.0.0.1:8765"


@pytest.fixture
def ws(tmp_path):
    return build(tmp_path / "ws")


def client(settings, host="127.0.0.1", token=None, base=BASE) -> TestClient:
    return TestClient(build_app(settings, ReviewConfig(host, 8765, "tester", token)),
                      base_url=base)


def all_rows(c: TestClient, query: str = "", limit: int = 4) -> list[dict]:
    rows, after = [], ""
    while True:
        page = c.get(f"/api/queue?limit={limit}{query}" + (f"&after={after}" if after else ""))
        assert page.status_code == 200, page.text
        data = page.json()
        rows += data["rows"]
        if not data["next"]:
            return rows
        after = data["next"]


def expected_order(ids: dict[str, str]) -> list[tuple[str, str]]:
    new = set(RUN2)
    keyed = []
    for (a, b), score in scores(ids).items():
        run = 2 if (a in new or b in new) else 1
        ka, kb = pair_key(ids[a], ids[b])
        keyed.append(((-run, abs(float(_f32(score)) - THRESHOLD), ka, kb), (ka, kb)))
    return [k for _, k in sorted(keyed)]


def _f32(x: float) -> float:
    import numpy as np
    return float(np.float32(x))


def keys(rows: list[dict]) -> list[tuple[str, str]]:
    return [pair_key(r["image_a"], r["image_b"]) for r in rows]


def decide(c: TestClient, row: dict, verdict: str, **extra) -> str:
    r = c.post("/api/decide", json={"image_a": row["image_a"], "image_b": row["image_b"],
                                     "decision": verdict, **extra})
    assert r.status_code == 200, r.text
    return r.json()["decision_id"]


def decisions(settings) -> dict[tuple[str, str], dict]:
    cols, rows = catalog.query(settings, "SELECT * FROM decisions")
    return {(r["image_a"], r["image_b"]): r for r in (dict(zip(cols, x)) for x in rows)}


def test_queue_pages_in_order_new_pairs_first_then_nearest_the_threshold(ws):
    c = client(ws)
    rows = all_rows(c)
    assert keys(rows) == expected_order(image_ids(ws))  # each pair once, none skipped
    assert [r["new_run"] for r in rows] == sorted((r["new_run"] for r in rows), reverse=True)
    assert all(r["kind"] == "near" for r in rows)
    first = rows[0]  # what the screen shows of a pair
    assert {"path_a", "path_b", "width_a", "height_b", "bytes_a", "format_b", "master_path",
            "master_reason", "master", "score", "cluster_id"} <= set(first)
    assert first["master"] in (first["image_a"], first["image_b"])
    # a page size beyond the limit is capped; a bad cursor or filter is one line, 400
    assert len(c.get("/api/queue?limit=100000").json()["rows"]) == 28
    for bad in ("after=nonsense", "min=abc", "decision=maybe", "run=-1", "min=nan"):
        r = c.get("/api/queue?" + bad)
        assert r.status_code == 400 and "\n" not in r.json()["error"], (bad, r.text)


def test_filters_score_folder_cluster_run(ws):
    c = client(ws)
    ids = image_ids(ws)
    rows = all_rows(c, "&min=0.7&max=0.8")
    assert rows and all(0.7 <= r["score"] <= 0.8 for r in rows)
    assert len(rows) == sum(0.7 <= _f32(s) <= 0.8 for s in scores(ids).values())
    rows = all_rows(c, "&folder=late/")
    assert len(rows) == 13  # the 13 pairs with an image under late/
    assert all(r["path_a"].startswith("late/") or r["path_b"].startswith("late/") for r in rows)
    members = {ids[p] for p in CLUSTERS[0]}
    rows = all_rows(c, "&cluster=0")
    assert len(rows) == 3 and all({r["image_a"], r["image_b"]} <= members for r in rows)
    assert all(r["cluster_id"] == 0 for r in rows)
    # run=N: the pairs new in ingest run N (the nightly report's link)
    rows2 = all_rows(c, "&run=2")
    assert len(rows2) == 13 and all(r["new_run"] == 2 for r in rows2)
    assert len(all_rows(c, "&run=1")) == 15
    assert c.get("/?run=2").status_code == 200  # the page the link opens
    assert c.get("/api/progress?run=2").json() == {"total": 13, "reviewed": 0, "remaining": 13}


def test_a_pair_carries_its_verification_and_the_queue_filters_partial_copies(ws, monkeypatch):
    c = client(ws)
    rows = {(r["path_a"], r["path_b"]): r for r in all_rows(c, "&limit=100")}
    assert_verified_rows(rows)
    for key, v in VERIFIED.items():
        r = rows[key]
        assert r["covered"] == (None if v["covered"] is None else pytest.approx(v["covered"]))
    # whether one picture shows the other on a blank margin: the server's word (the page only
    # words it), as store.pairs.on_margin decides it: no such pair here, then one
    assert not any(rows[key]["on_margin"] for key in VERIFIED)
    monkeypatch.setattr(store_pairs, "FULL_SHARE", 0.99)  # the rescan covering 98 %: margin
    again = {(r["path_a"], r["path_b"]): r for r in all_rows(c, "&limit=100")}
    assert [k for k in VERIFIED if again[k]["on_margin"]] == [(RUN1[1], RUN2[1])]
    # which side is the detail, which the whole picture (the likely master)
    detail = rows[(RUN1[4], RUN2[0])]  # late/p6 is the detail (b_in_a), its box on box-b/p4
    assert (detail["detail_path"], detail["whole_path"]) == (RUN2[0], RUN1[4])
    assert detail["master_path"] == RUN1[4] and detail["master_reason"] == "the whole picture"
    unchecked = [r for k, r in rows.items() if k not in VERIFIED]
    assert all(r["relation"] is None and r["box_x0"] is None for r in unchecked)

    partial = all_rows(c, "&relation=partial")
    want = {k for k, v in VERIFIED.items() if v["relation"] in ("a_in_b", "b_in_a")}
    assert {(r["path_a"], r["path_b"]) for r in partial} == want and len(want) == 3
    assert [r["relation"] for r in all_rows(c, "&relation=none")] == ["none"]
    assert len(all_rows(c, "&relation=full")) == 2
    assert len(all_rows(c, "&relation=unchecked")) == 28 - len(VERIFIED)
    assert c.get("/api/progress?relation=partial").json()["total"] == 3
    bad = c.get("/api/queue?relation=maybe")
    assert bad.status_code == 400 and "relation must be one of" in bad.json()["error"]
    page = c.get("/?relation=partial").text  # the filter, and the overlays the box is drawn in
    assert '<option value="partial">partial copies</option>' in page
    assert 'id="overlay-a"' in page and 'id="overlay-b"' in page


def test_decision_recorded_found_in_sql_left_out_of_the_queue_and_undone(ws):
    c = client(ws)
    row = c.get("/api/queue?limit=1").json()["rows"][0]
    other = row["image_b"] if row["master"] == row["image_a"] else row["image_a"]
    did = decide(c, row, "same", master=other, note="the rescan of 1952")
    # in the catalogue, as `cbir sql` shows it
    out = subprocess.run([*CBIR, "sql", "--params", str(ws.params_path), "--format", "json",
                          "SELECT * FROM decisions"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert len(got) == 1
    d = got[0]
    assert (d["decision"], d["master"], d["reviewer"], d["source"], d["model"], d["note"],
            d["decision_id"]) == ("same", other, "tester", "review", FINGERPRINT,
                                  "the rescan of 1952", did)
    assert abs(d["score"] - row["score"]) < 1e-6
    assert {d["path_a"], d["path_b"]} == {row["path_a"], row["path_b"]}
    # the queue leaves it out, unless the decision filter asks for it
    assert pair_key(row["image_a"], row["image_b"]) not in keys(all_rows(c))
    assert len(all_rows(c)) == 27
    same = all_rows(c, "&decision=same")
    assert keys(same) == [pair_key(row["image_a"], row["image_b"])]
    assert same[0]["decision"] == "same" and same[0]["decided_master"] == other
    assert all_rows(c, "&decision=different") == []
    assert len(all_rows(c, "&decision=all")) == 28
    assert c.get("/api/progress").json() == {"total": 28, "reviewed": 1, "remaining": 27}
    # undo: an undo row naming it; the pair is undecided again
    r = c.post("/api/undo", json={"decision_id": did})
    assert r.status_code == 200 and r.json()["undoes"] == did
    assert decisions(ws) == {}
    _, log = catalog.query(ws, "SELECT decision, undoes FROM decision_log ORDER BY time")
    assert log == [("same", None), ("undo", did)]
    assert len(all_rows(c)) == 28
    assert c.post("/api/undo", json={"decision_id": "f" * 32}).status_code == 404


def test_bad_decisions_are_refused_and_record_nothing(ws):
    c = client(ws)
    row = c.get("/api/queue?limit=1").json()["rows"][0]
    ids = image_ids(ws)
    cases = [
        {"image_a": row["image_a"], "image_b": row["image_b"], "decision": "maybe"},
        {"image_a": "../../etc/passwd", "image_b": row["image_b"], "decision": "same"},
        {"image_a": row["image_a"], "image_b": row["image_b"], "decision": "different",
         "master": row["image_a"]},
        {"image_a": row["image_a"], "image_b": row["image_b"], "decision": "same",
         "master": "0" * 16},
    ]
    for body in cases:
        assert c.post("/api/decide", json=body).status_code == 400, body
    # a pair that is not among the pairs: refused (an exact copy's two paths are one image)
    lone = [ids[p] for p in RUN1[:2]]
    assert c.post("/api/decide", json={"image_a": lone[0], "image_b": lone[0],
                                       "decision": "same"}).status_code == 404
    assert c.post("/api/decide", content=b"[1,2]",
                  headers={"content-type": "application/json"}).status_code == 400
    assert decisions(ws) == {}


def test_two_clients_recording_at_once_lose_nothing(ws):
    rows = client(ws).get("/api/queue?limit=28").json()["rows"]
    halves = [rows[0::2], rows[1::2]]
    errors: list[BaseException] = []

    def work(part: list[dict], verdict: str) -> None:
        try:
            c = client(ws)
            for row in part:
                decide(c, row, verdict)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(h, v))
               for h, v in zip(halves, ("different", "unsure"), strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = decisions(ws)
    assert len(got) == 28
    assert sorted(d["decision"] for d in got.values()) == ["different"] * 14 + ["unsure"] * 14
    assert all_rows(client(ws)) == []
    assert client(ws).get("/api/progress").json()["remaining"] == 0


def test_a_non_loopback_server_needs_its_token(ws):
    token = "t" * 30
    c = client(ws, host="0.0.0.0", token=token, base="http://archive-pc.local:8765")
    assert c.get("/").status_code == 401
    assert c.get("/api/queue").status_code == 401
    assert c.get("/?token=wrong").status_code == 401
    row = client(ws).get("/api/queue?limit=1").json()["rows"][0]
    body = {"image_a": row["image_a"], "image_b": row["image_b"], "decision": "same"}
    assert c.post("/api/decide", json=body).status_code == 401
    assert c.post("/api/decide", json=body, headers={"x-cbir-token": "x" * 30}).status_code == 401
    assert decisions(ws) == {}
    # the token in the URL, once: kept in a cookie, and the URL without it
    r = c.get(f"/?run=2&token={token}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/?run=2"
    assert "samesite=strict" in r.headers["set-cookie"].lower()
    assert c.get("/api/queue").status_code == 200  # the client keeps the cookie
    assert c.post("/api/decide", json=body).status_code == 200
    other = client(ws, host="0.0.0.0", token=token, base="http://archive-pc.local:8765")
    assert other.post("/api/decide", json=body, headers={"x-cbir-token": token}).status_code == 200
    assert len(decisions(ws)) == 1


def test_cross_site_writes_and_foreign_hosts_are_refused(ws):
    c = client(ws)
    row = c.get("/api/queue?limit=1").json()["rows"][0]
    body = {"image_a": row["image_a"], "image_b": row["image_b"], "decision": "different"}
    for headers in ({"origin": "http://evil.example"}, {"origin": "null"},
                    {"origin": "http://127.0.0.1:9999"}, {"sec-fetch-site": "cross-site"},
                    {"sec-fetch-site": "same-site"}):
        r = c.post("/api/decide", json=body, headers=headers)
        assert r.status_code == 403, headers
    # a form another site could post: not JSON
    r = c.post("/api/decide", data={"decision": "different"})
    assert r.status_code == 415
    assert decisions(ws) == {}
    # DNS rebinding: a page whose host name resolves to 127.0.0.1 gets nothing
    for host in ("evil.example:8765", "evil.example", "127.0.0.1:9999", ""):
        assert c.get("/api/queue", headers={"host": host}).status_code == 421, host
        assert c.post("/api/decide", json=body, headers={"host": host}).status_code == 421
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765"):
        assert c.get("/", headers={"host": host}).status_code == 200
    # our own page's request is accepted
    r = c.post("/api/decide", json=body, headers={"origin": BASE, "sec-fetch-site": "same-origin"})
    assert r.status_code == 200
    csp = c.get("/").headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp


def test_images_by_content_id_only(ws):
    c = client(ws)
    ids = image_ids(ws)
    tif = ids["box-a/p2.tif"]
    r = c.get(f"/img/{tif}/2048")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    # the one decode made the other size too
    assert (ws.path(ws.data.cache_dir) / "review" / "256" / f"{tif}.jpg").is_file()
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and im.size == (120, 90)
    assert c.get(f"/img/{tif}/256").status_code == 200
    # cached under the workspace's cache folder, by content id
    assert (ws.path(ws.data.cache_dir) / "review" / "2048" / f"{tif}.jpg").is_file()
    for bad in ("0123456789abcdef/2048", f"{tif}/100", f"{tif.upper()}/2048",
                "..%2f..%2fparams.yaml/2048", "%2e%2e/2048", "box-a%2fp0.jpg/2048",
                f"{tif}/2048/../../params.yaml"):
        r = c.get("/img/" + bad)
        assert r.status_code == 404, bad
        assert r.headers.get("content-type", "").startswith(("text/plain", "application/json"))
    # a scan changed since ingest is not shown as the content the manifest names
    p0 = ids["box-a/p0.jpg"]
    (ws.path(ws.data.scans_dir) / "box-a/p0.jpg").write_bytes(b"not the same picture")
    assert c.get(f"/img/{p0}/2048").status_code == 409


def test_cluster_view_splits_a_cluster_by_rejecting_links(ws):
    c = client(ws)
    ids = image_ids(ws)
    assert c.get("/cluster/0").status_code == 200
    data = c.get("/api/cluster/0").json()
    assert sorted(m["path"] for m in data["members"]) == sorted(CLUSTERS[0])
    assert len(data["links"]) == 3 and len(data["components"]) == 1
    for link in data["links"][:2]:  # the two strongest links touch one member twice
        decide(c, link, "different")
    data = c.get("/api/cluster/0").json()
    assert [link["decision"] for link in data["links"]] == ["different", "different", None]
    assert sorted(len(g) for g in data["components"]) == [1, 2]
    assert {ids[p] for p in CLUSTERS[0]} == {i for g in data["components"] for i in g}
    gone = c.get("/api/cluster/99")  # a file with no ids recorded: any missing id changed
    assert gone.status_code == 400 and "no cluster 99: it has changed since" in gone.json()["error"]
    assert c.get("/api/clusters").json()["clusters"][0]["size"] == 3
    # ids given up to 3 (0 and 1 still held): 2 and 3 changed since, 4 and on were never given
    path = layout(ws).clusters
    table = pq.read_table(path)
    meta = store_pairs.ClusterIds("a-lineage", 4).meta()
    pq.write_table(table.replace_schema_metadata(meta), path)
    for cid, said in ((3, "it has changed since"), (4, "no cluster has had that id (the highest "
                      "given is 3)"), (99, "no cluster has had that id")):
        r = c.get(f"/api/cluster/{cid}")
        assert r.status_code == 400 and f"no cluster {cid}: {said}" in r.json()["error"], cid
    assert c.get("/api/cluster/1").status_code == 200


def test_names_are_never_markup_in_the_page(ws):
    c = client(ws)
    page = c.get("/").text
    assert "<img src=x" not in page and "onerror" not in page
    rows = all_rows(c, "&folder=box-b/")
    assert any(f"box-b/{HOSTILE}" in (r["path_a"], r["path_b"]) for r in rows)  # as data


def _start(ws, *args: str, env: dict | None = None,
           sigint=signal.SIG_DFL) -> tuple[subprocess.Popen, str, list[str]]:
    """`cbir review` as a subprocess; `sigint`: SIGINT's action when it starts (a test runner's
    worker or a background job may start it ignored)."""
    proc = subprocess.Popen([*CBIR, "review", "--params", str(ws.params_path), "--port", "0",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # as long as it takes on a busy machine: it prints or it dies
        lines.append(line)
        if "serving" in line:
            break
    assert lines and "serving" in lines[-1], (lines, proc.stderr.read() if proc.stderr else "")
    url = lines[-1].split(" at ")[-1].strip()
    return proc, url, lines


def _get(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=600) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_server_with_a_token_and_ctrl_c(ws):
    token = "s3cret-token-of-the-archive"
    proc, url, _ = _start(ws, "--host", "0.0.0.0", env={"CBIR_REVIEW_TOKEN": token},
                          sigint=signal.SIG_IGN)  # uvicorn catches it all the same
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"?token={token}" in line
        port = url.rstrip("/").rsplit(":", 1)[1]
        local = f"http://127.0.0.1:{port}/api/queue?limit=1"
        assert _get(local) == 401
        assert _get(local, {"x-cbir-token": token}) == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "cbir review: interrupted"


def test_the_server_on_loopback_prints_its_url(ws):
    proc, url, lines = _start(ws, "--reviewer", "ana")
    try:
        assert url.startswith("http://127.0.0.1:") and "token" not in "".join(lines)
        assert _get(url + "?run=2") == 200
        assert _get(url + "api/queue", {"host": "rebind.example:80"}) == 421
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=600)
    assert proc.returncode == 130


def test_cli_errors_are_one_line(ws):
    for args, env, words in (
        (["--port", "70000"], {}, "--port must be at most"),
        (["--host", "0.0.0.0"], {"CBIR_REVIEW_TOKEN": "short"}, "CBIR_REVIEW_TOKEN must be"),
        (["--host", "no-such-host.invalid"], {}, "cannot listen on"),
    ):
        out = subprocess.run([*CBIR, "review", "--params", str(ws.params_path), *args],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, **env})
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and words in out.stderr, out.stderr
    # no pairs yet: said before it serves
    (ws.path(ws.data.pairs_dir) / "pairs.parquet").unlink()
    out = subprocess.run([*CBIR, "review", "--params", str(ws.params_path), "--port", "0"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "cbir review: error: no pairs in the catalogue: run `cbir pairs` first\n"
