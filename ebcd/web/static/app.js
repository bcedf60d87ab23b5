// The wall screen: the ledger once, then the duty room's snapshots by server-sent events.
"use strict";
const COLOURS = {
  acked: "#009E73", uncertain: "#E69F00", failed: "#D55E00", pending: "#56B4E9",
  cancelled: "#999999", offline: "#000000", not_targeted: "#555555",
  online: "#0072B2", unknown: "#777777",  // liveness (no alert picked): blue, so acknowledged stands out
};
const params = new URLSearchParams(location.search);
const token = params.get("token");
let chosen = params.get("alert");
let source = null;

function url(path, extra) {
  const q = new URLSearchParams(extra || {});
  if (token) q.set("token", token);
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

async function drawLedger() {
  const ledger = await (await fetch(url("ledger.json"))).json();
  document.getElementById("district").textContent = ledger.district.name;
  const lons = ledger.terminals.map(t => t.lon), lats = ledger.terminals.map(t => t.lat);
  const [x0, x1, y0, y1] = [Math.min(...lons), Math.max(...lons), Math.min(...lats), Math.max(...lats)];
  const k = Math.cos(((y0 + y1) / 2) * Math.PI / 180);
  const scale = 880 / Math.max((x1 - x0) * k, y1 - y0);  // room above for the top town's name
  const svg = document.getElementById("map");
  const ns = "http://www.w3.org/2000/svg";
  for (const town of ledger.towns) {
    const pts = town.hull.map(([lon, lat]) => `${30 + (lon - x0) * k * scale},${970 - (lat - y0) * scale}`);
    const poly = document.createElementNS(ns, "polygon");
    poly.setAttribute("points", pts.join(" "));
    poly.setAttribute("fill", "#222"); poly.setAttribute("stroke", "#888");
    svg.appendChild(poly);
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 30 + (town.lon - x0) * k * scale);
    label.setAttribute("y", 970 - (town.lat - y0) * scale - 12);
    label.setAttribute("fill", "#ddd"); label.setAttribute("font-size", "26"); label.setAttribute("text-anchor", "middle");
    label.textContent = town.name;
    svg.appendChild(label);
  }
  for (const t of ledger.terminals) {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("id", `t-${t.code}`);
    c.setAttribute("cx", 30 + (t.lon - x0) * k * scale);
    c.setAttribute("cy", 970 - (t.lat - y0) * scale);
    c.setAttribute("r", "6");
    c.setAttribute("data-state", "unknown");
    c.setAttribute("fill", COLOURS.unknown);
    const title = document.createElementNS(ns, "title");
    title.textContent = `${t.name} ${t.code}`;
    c.appendChild(title);
    svg.appendChild(c);
  }
}

function paint(doc) {
  const states = doc.selected ? doc.selected.buckets : doc.liveness;
  for (const [code, live] of Object.entries(doc.liveness)) {
    let state = doc.selected ? (states[code] || "not_targeted") : live;
    if (doc.selected && state !== "acked" && live === "offline") state = "offline";
    const dot = document.getElementById(`t-${code}`);
    if (dot && dot.getAttribute("data-state") !== state) {
      dot.setAttribute("data-state", state);
      dot.setAttribute("fill", COLOURS[state] || "#fff");
      dot.setAttribute("r", state === "not_targeted" ? "4" : state === "acked" || state === "online" ? "6" : "9");
    }
  }
  const legend = document.getElementById("legend");
  const counts = {};
  for (const d of document.querySelectorAll("#map circle")) counts[d.dataset.state] = (counts[d.dataset.state] || 0) + 1;
  legend.replaceChildren(...Object.entries(counts).map(([s, n]) => {
    const span = el("span");
    span.append(el("span", {class: "dot", style: `background:${COLOURS[s]}`}), ` ${s.replace("_", " ")} ${n}`);
    return span;
  }));
}

function render(doc) {
  const room = doc.room;
  document.getElementById("clock").textContent = new Date(room.at * 1000).toLocaleTimeString();
  const sel = doc.selected;
  document.getElementById("selected").textContent = sel ? `alert ${sel.id} ${sel.state}` : "no alert";
  const cov = document.getElementById("coverage");
  cov.textContent = sel ? `${(sel.coverage * 100).toFixed(1)}%` : "–";
  cov.dataset.value = sel ? String(sel.coverage) : "";
  const alerts = document.getElementById("alerts");
  alerts.replaceChildren(...room.alerts.map(a => {
    const s = a.state;
    const tr = el("tr", {class: "alert" + (sel && sel.id === s.id ? " selected" : ""), "data-id": s.id});
    const why = a.progress.pending.map(p => `${p.terminals} ${p.why}`).join(", ");
    for (const v of [s.id, s.state, `${s.acked}/${s.targets}`, `${(s.coverage * 100).toFixed(0)}%`, why || s.text]) tr.append(el("td", {}, v));
    tr.onclick = () => { chosen = s.id; connect(); };
    return tr;
  }));
  const towns = document.getElementById("towns");
  towns.replaceChildren(...(sel ? Object.values(sel.towns) : []).map(t => {
    const tr = el("tr");
    const bar = el("div", {class: "bar"});
    bar.append(el("div", {style: `width:${t.targets ? 100 * t.acked / t.targets : 0}%`}));
    const cell = el("td", {style: "width:60%"}); cell.append(bar);
    tr.append(el("td", {}, t.name), cell, el("td", {}, `${t.acked}/${t.targets}`));
    return tr;
  }));
  const down = {};
  for (const l of room.links.filter(l => !l.up)) (down[l.what] = down[l.what] || []).push(l.detail || l.where);
  const lines = Object.entries(down).map(([what, names]) => el("div", {class: "down"}, `${names.length} ${what}${names.length > 1 ? "s" : ""}: ${names.join(", ")}`));
  document.getElementById("links").replaceChildren(...(lines.length ? lines : [el("div", {}, "none")]));
  document.getElementById("rejections").replaceChildren(...(room.rejections.length ? room.rejections.slice(-5).reverse().map(r => el("div", {}, `${new Date(r.at * 1000).toLocaleTimeString()} [${r.reason}] ${r.detail}`)) : [el("div", {}, "none")]));
  paint(doc);
}

function connect() {
  if (source) source.close();
  source = new EventSource(url("events", chosen ? {alert: chosen} : {}));
  const conn = document.getElementById("conn");
  source.onopen = () => { conn.textContent = "live"; conn.className = ""; };
  source.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "down"; };
  source.onmessage = (e) => render(JSON.parse(e.data));
}

drawLedger().then(connect);
