// The review screen and the cluster view of `cbir review`. Everything shown comes from the
// server's JSON API and is put on the page as text (textContent), never as markup: a file may
// be named like HTML. Decisions are sent one request each; nothing is read, changed and written
// back, so two tabs lose nothing.
"use strict";

(function () {
  const body = document.body;
  const $ = (id) => document.getElementById(id);
  const FILTERS = ["min", "max", "run", "cluster", "folder", "decision", "relation"];
  const CONFIRMED = ["full", "a_in_b", "b_in_a"];
  const params = new URLSearchParams(location.search);
  const state = {
    rows: [], idx: 0, next: null, ended: false, loading: null,
    history: [], mode: "side", zoom: { s: 1, x: 0, y: 0 }, flicker: null, recorded: 0,
  };

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function filterQuery() {
    const q = new URLSearchParams();
    for (const k of FILTERS) {
      const v = params.get(k);
      if (v) q.set(k, v);
    }
    return q;
  }

  async function api(path, payload) {
    const opts = { credentials: "same-origin", headers: {} };
    if (payload !== undefined) {
      opts.method = "POST";
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(payload);
    }
    const res = await fetch(path, opts);
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) throw new Error((data && data.error) || res.status + " " + res.statusText);
    return data;
  }

  function say(text, bad) {
    const s = $(body.dataset.view === "cluster" ? "cluster-status" : "status");
    s.textContent = text;
    s.className = bad ? "bad" : "";
  }

  function human(n) {
    if (n === null || n === undefined) return "?";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0; let v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : String(v)) + " " + units[i];
  }

  // ------------------------------------------------------------------ the queue
  async function loadPage() {
    if (state.ended) return;
    if (state.loading) return state.loading;
    const q = filterQuery();
    if (state.next) q.set("after", state.next);
    state.loading = api("/api/queue?" + q.toString()).then((page) => {
      state.rows.push(...page.rows);
      state.next = page.next;
      state.ended = !page.next;
    }).finally(() => { state.loading = null; });
    return state.loading;
  }

  async function progress() {
    try {
      const p = await api("/api/progress?" + filterQuery().toString());
      $("progress").textContent = `reviewed ${p.reviewed.toLocaleString()} / remaining ${p.remaining.toLocaleString()} (of ${p.total.toLocaleString()})`;
    } catch (e) { $("progress").textContent = "progress unavailable: " + e.message; }
  }

  function current() { return state.rows[state.idx] || null; }

  function fact(side, row) {
    const box = $("fact-" + side);
    box.replaceChildren();
    const id = row["image_" + side];
    const path = row["path_" + side];
    const isMaster = row.master === id;
    const p = el("div", path, "path");
    p.title = path;
    box.append(p);
    box.append(el("div", `${row["width_" + side]} × ${row["height_" + side]} px · ${human(row["bytes_" + side])} · ${row["format_" + side] || "?"} · first seen in run ${row["arrived_" + side]}`));
    if (isMaster) box.append(el("div", "likely master: " + row.master_reason, "master"));
    if (row.decision === "same" && row.decided_master === id) box.append(el("div", "decided master", "master"));
    if (row.detail_path === path) box.append(el("div", "a detail of the other picture", "role"));
    if (row.whole_path === path) box.append(el("div", "the whole picture: the outlined region matches the other", "role"));
    box.classList.toggle("is-master", isMaster);
  }

  // What geometric verification found, in words ("" when the pair was not checked).
  function checkText(row) {
    const n = `${row.inliers} matching point${row.inliers === 1 ? "" : "s"}`;
    if (row.on_margin) {
      // a picture on a blank margin (the server's store.pairs.on_margin): box_on names the
      // one with the margin
      return `same picture, the ${row.box_on === "a" ? "left" : "right"} on a blank margin (${n})`;
    }
    if (row.relation === "full") return `same picture (${n})`;
    if (row.relation === "a_in_b" || row.relation === "b_in_a") {
      const [detail, whole] = row.relation === "a_in_b" ? ["left", "right"] : ["right", "left"];
      const pct = row.covered === null ? "?" : Math.round(row.covered * 100);
      return `partial copy: the ${detail} is a detail of the ${whole}, ${pct} % of its area (${n})`;
    }
    if (row.relation === "none") return `not confirmed: the local features do not match (${n})`;
    return "";
  }

  // The matched region on the larger picture, in the pixels of its pane: the picture is fit
  // to the pane (object-fit: contain) and the box is in the scan's pixels (EXIF orientation
  // applied, as width and height are). Its overlay takes the picture's transform (applyZoom).
  function region() {
    const row = current();
    for (const s of ["a", "b"]) {
      const ov = $("overlay-" + s);
      const box = row ? [row.box_x0, row.box_y0, row.box_x1, row.box_y1] : [];
      const w = row && row["width_" + s], h = row && row["height_" + s];
      const on = row && row.box_on === s && CONFIRMED.includes(row.relation) && w > 0 && h > 0 &&
        box.every((v) => v !== null && v !== undefined);
      ov.hidden = !on;
      if (!on) continue;
      const fw = ov.clientWidth, fh = ov.clientHeight;
      const k = Math.min(fw / w, fh / h);
      const ox = (fw - w * k) / 2, oy = (fh - h * k) / 2;
      const r = ov.firstElementChild;
      r.style.left = `${ox + box[0] * k}px`;
      r.style.top = `${oy + box[1] * k}px`;
      r.style.width = `${(box[2] - box[0]) * k}px`;
      r.style.height = `${(box[3] - box[1]) * k}px`;
    }
  }

  function show() {
    const row = current();
    const stage = $("stage");
    if (!row) {
      stage.hidden = true;
      $("facts").hidden = true;
      $("score").textContent = "";
      $("cluster-link").replaceChildren();
      $("current").textContent = "";
      $("check").textContent = "";
      region();
      say(state.history.length ? "Nothing left to review with these filters (z undoes the last decision)." : "Nothing to review with these filters.");
      body.dataset.pair = "";
      return;
    }
    stage.hidden = false;
    $("facts").hidden = false;
    body.dataset.pair = row.image_a + "-" + row.image_b;
    $("img-a").src = `/img/${row.image_a}/2048`;
    $("img-b").src = `/img/${row.image_b}/2048`;
    $("img-a").alt = row.path_a;
    $("img-b").alt = row.path_b;
    $("score").textContent = `score ${Number(row.score).toFixed(4)} · new in run ${row.new_run}`;
    const cl = $("cluster-link");
    cl.replaceChildren();
    if (row.cluster_id !== null && row.cluster_id !== undefined) {
      const a = el("a", `cluster ${row.cluster_id}`);
      a.href = "/cluster/" + encodeURIComponent(row.cluster_id);
      cl.append(a);
    }
    const check = $("check");
    check.textContent = checkText(row);
    check.className = row.relation === "full" ? "full" : row.relation === "none" ? "none" : row.relation ? "partial" : "";
    $("current").textContent = row.decision ? `decided: ${row.decision}${row.decided_by ? " by " + row.decided_by : ""}` : "";
    $("note").value = row.decided_note || "";
    fact("a", row);
    fact("b", row);
    region();
    fit();
    preload();
  }

  function preload() {
    for (const r of state.rows.slice(state.idx + 1, state.idx + 3)) {
      for (const id of [r.image_a, r.image_b]) { const i = new Image(); i.src = `/img/${id}/2048`; }
    }
  }

  async function advance() {
    state.idx += 1;
    if (state.rows.length - state.idx < 10 && !state.ended) {
      const wait = loadPage();
      if (state.idx >= state.rows.length) await wait;
    }
    show();
  }

  async function decide(verdict, otherMaster) {
    const row = current();
    if (!row) return;
    const payload = { image_a: row.image_a, image_b: row.image_b, decision: verdict, note: $("note").value };
    if (verdict === "same") payload.master = otherMaster ? (row.master === row.image_a ? row.image_b : row.image_a) : row.master;
    try {
      const res = await api("/api/decide", payload);
      state.history.push({ id: res.decision_id, row: row, idx: state.idx });
      state.recorded += 1;
      body.dataset.recorded = String(state.recorded);
      say(`recorded: ${verdict}${verdict === "same" ? " (master " + (payload.master === row.image_a ? row.path_a : row.path_b) + ")" : ""}`);
      progress();
      await advance();
    } catch (e) { say("not recorded: " + e.message, true); }
  }

  async function undo() {
    const last = state.history.pop();
    if (!last) { say("nothing to undo"); return; }
    try {
      await api("/api/undo", { decision_id: last.id });
      state.rows.splice(state.idx, 0, last.row);
      state.recorded += 1;
      body.dataset.recorded = String(state.recorded);
      say("undone: the pair is back");
      progress();
      show();
    } catch (e) { state.history.push(last); say("not undone: " + e.message, true); }
  }

  // ------------------------------------------------------------------ viewing: modes, zoom, pan
  function setMode(mode) {
    state.mode = mode;
    const stage = $("stage");
    stage.className = mode;
    if (state.flicker) { clearInterval(state.flicker); state.flicker = null; }
    stage.classList.remove("show-b");
    if (mode === "flicker") state.flicker = setInterval(() => stage.classList.toggle("show-b"), 500);
    for (const b of document.querySelectorAll("[data-mode]")) b.classList.toggle("on", b.dataset.mode === mode);
  }

  function applyZoom() {
    const z = state.zoom;
    const t = `translate(${z.x}px, ${z.y}px) scale(${z.s})`;
    $("img-a").style.transform = t;
    $("img-b").style.transform = t;
    for (const s of ["a", "b"]) {
      const ov = $("overlay-" + s);
      ov.style.transform = t;
      ov.firstElementChild.style.borderWidth = `${2 / z.s}px`; // as thin when zoomed in
    }
  }

  function fit() { state.zoom = { s: 1, x: 0, y: 0 }; applyZoom(); }

  function setupViewer() {
    const stage = $("stage");
    new ResizeObserver(() => region()).observe(stage);
    stage.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const frame = ev.target.closest(".frame") || stage;
      const r = frame.getBoundingClientRect();
      const z = state.zoom;
      const k = ev.deltaY < 0 ? 1.2 : 1 / 1.2;
      const s = Math.min(40, Math.max(1, z.s * k));
      const cx = ev.clientX - r.left - r.width / 2;
      const cy = ev.clientY - r.top - r.height / 2;
      z.x = cx - (cx - z.x) * (s / z.s);
      z.y = cy - (cy - z.y) * (s / z.s);
      z.s = s;
      if (s === 1) { z.x = 0; z.y = 0; }
      applyZoom();
    }, { passive: false });
    let drag = null;
    stage.addEventListener("pointerdown", (ev) => {
      drag = { x: ev.clientX, y: ev.clientY, zx: state.zoom.x, zy: state.zoom.y };
      stage.setPointerCapture(ev.pointerId);
    });
    stage.addEventListener("pointermove", (ev) => {
      if (!drag) return;
      state.zoom.x = drag.zx + ev.clientX - drag.x;
      state.zoom.y = drag.zy + ev.clientY - drag.y;
      applyZoom();
    });
    const stop = () => { drag = null; };
    stage.addEventListener("pointerup", stop);
    stage.addEventListener("pointercancel", stop);
  }

  // ------------------------------------------------------------------ keys and buttons
  function act(name) {
    switch (name) {
      case "same": return decide("same", false);
      case "master": return decide("same", true);
      case "different": return decide("different");
      case "unsure": return decide("unsure");
      case "skip": return advance();
      case "undo": return undo();
      case "fit": return fit();
    }
  }

  const KEYS = { s: "same", m: "master", d: "different", u: "unsure", n: "skip", " ": "skip", z: "undo", "0": "fit" };
  let busy = false;

  function onKey(ev) {
    const t = ev.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) {
      if (ev.key === "Enter" || ev.key === "Escape") { if (t.id === "note") { ev.preventDefault(); t.blur(); } }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const modes = { "1": "side", "2": "flicker", "3": "diff" };
    if (modes[ev.key]) { setMode(modes[ev.key]); return; }
    if (ev.key === "c") {
      const row = current();
      if (row && row.cluster_id !== null && row.cluster_id !== undefined) location.href = "/cluster/" + row.cluster_id;
      return;
    }
    const name = KEYS[ev.key];
    if (!name) return;
    ev.preventDefault();
    if (busy) return; // one decision at a time: a held key does not decide pairs unseen
    busy = true;
    Promise.resolve(act(name)).finally(() => { busy = false; });
  }

  function setupFilters() {
    const form = $("filters");
    for (const k of FILTERS) {
      const v = params.get(k);
      if (v && form.elements[k]) form.elements[k].value = v;
    }
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const q = new URLSearchParams();
      for (const k of FILTERS) {
        const v = form.elements[k].value.trim();
        if (v && !(k === "decision" && v === "undecided")) q.set(k, v);
      }
      location.href = "/" + (q.toString() ? "?" + q.toString() : "");
    });
  }

  async function startReview() {
    setupViewer();
    setMode("side");
    for (const b of document.querySelectorAll("#controls [data-act]")) b.addEventListener("click", () => act(b.dataset.act));
    for (const b of document.querySelectorAll("[data-mode]")) b.addEventListener("click", () => setMode(b.dataset.mode));
    document.addEventListener("keydown", onKey);
    say("loading…");
    progress();
    try {
      await loadPage();
      say("");
      show();
      body.dataset.ready = "1";
    } catch (e) { say("cannot load the queue: " + e.message, true); }
  }

  // ------------------------------------------------------------------ the cluster view
  function thumb(id, path) {
    const img = el("img");
    img.src = `/img/${id}/256`;
    img.alt = path;
    img.loading = "lazy";
    return img;
  }

  async function loadCluster() {
    const cid = body.dataset.cluster;
    try {
      const c = await api("/api/cluster/" + encodeURIComponent(cid));
      const paths = new Map(c.members.map((m) => [m.image_id, m.path]));
      $("cluster-title").textContent = `Cluster ${c.cluster_id}: ${c.members.length}${c.more_members ? "+" : ""} members, ${c.components.length} group${c.components.length === 1 ? "" : "s"}`;
      const comps = $("components");
      comps.replaceChildren();
      for (const g of c.components) {
        const li = el("li");
        li.append(el("span", `${g.length} image${g.length === 1 ? "" : "s"}: `));
        const ul = el("ul");
        for (const id of g) ul.append(el("li", paths.get(id) || id));
        li.append(ul);
        comps.append(li);
      }
      const tbody = $("links").tBodies[0];
      tbody.replaceChildren();
      for (const l of c.links) {
        const tr = el("tr");
        tr.append(el("td", Number(l.score).toFixed(4)));
        for (const s of ["a", "b"]) {
          const td = el("td");
          td.append(thumb(l["image_" + s], l["path_" + s]), el("div", l["path_" + s], "path"));
          tr.append(td);
        }
        tr.append(el("td", l.decision || "undecided", l.decision === "different" ? "rejected" : ""));
        const td = el("td");
        if (l.decision_id) {
          const b = el("button", "undo");
          b.addEventListener("click", () => clusterAct(() => api("/api/undo", { decision_id: l.decision_id }), "undone"));
          td.append(b);
        }
        if (l.decision !== "different") {
          const b = el("button", "reject link (different)");
          b.addEventListener("click", () => clusterAct(() => api("/api/decide", { image_a: l.image_a, image_b: l.image_b, decision: "different" }), "rejected"));
          td.append(b);
        }
        if (l.decision !== "same") {
          const b = el("button", "same");
          b.addEventListener("click", () => clusterAct(() => api("/api/decide", { image_a: l.image_a, image_b: l.image_b, decision: "same" }), "recorded same"));
          td.append(b);
        }
        tr.append(td);
        tbody.append(tr);
      }
      if (c.more_links) say("only the strongest links are shown");
      const members = $("members");
      members.replaceChildren();
      for (const m of c.members) {
        const fig = el("figure");
        fig.append(thumb(m.image_id, m.path), el("figcaption", `${m.path} · ${m.width} × ${m.height} · ${human(m.bytes)} · ${m.format}`));
        members.append(fig);
      }
      body.dataset.ready = "1";
    } catch (e) { say("cannot load the cluster: " + e.message, true); }
  }

  async function clusterAct(fn, what) {
    try { await fn(); say(what); state.recorded += 1; body.dataset.recorded = String(state.recorded); await loadCluster(); } catch (e) { say("not recorded: " + e.message, true); }
  }

  async function loadClusterIndex() {
    try {
      const r = await api("/api/clusters");
      const ol = $("cluster-index");
      ol.replaceChildren();
      for (const c of r.clusters) {
        const li = el("li");
        const a = el("a", `cluster ${c.cluster_id}`);
        a.href = "/cluster/" + c.cluster_id;
        li.append(a, el("span", ` · ${c.size} members · weakest link ${Number(c.weakest_link).toFixed(3)} · master ${c.master_path}`));
        ol.append(li);
      }
    } catch (e) { /* the index is a convenience */ }
  }

  setupFilters();
  if (body.dataset.view === "cluster") { loadCluster(); loadClusterIndex(); } else { startReview(); }
})();
