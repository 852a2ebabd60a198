// megafleet dashboard: a graph of the testbed (sigma.js on graphology), hosts,
// plots (uPlot) and the live event stream (Server-Sent Events). Everything comes
// from /api/v1; nothing is loaded from outside this server.
"use strict";

const COLORS = { ok: "#2e9e44", busy: "#e0a000", bad: "#d0312d", off: "#888888",
                 switch: "#555555", router: "#1f6fd1", host: "#0f8f8f" };
const HEALTH = { running: "ok", up: "ok", planned: "off", booting: "busy", starting: "busy", stopped: "bad",
                 failed: "bad", exited: "bad", missing: "bad", killed: "bad" };
const SIZES = { switch: 9, router: 7, host: 4, vm: 3, cluster: 10 };

// What tests and scripts may inspect: the graph model and when it was drawn.
const megafleet = window.megafleet = { graph: null, renderer: null, testbed: null, expanded: new Set(),
                                        drawnAt: null, lastEventId: 0, events: 0 };

function $(id) { return document.getElementById(id); }

async function api(path, options = {}) {
  const response = await fetch("/api/v1/" + path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(`${response.status}: ${body.error}`);
  return body;
}

function nodeColor(n) {
  const health = HEALTH[n.state] || "bad";
  if (n.state === "planned" && (n.kind === "vm" || n.kind === "cluster")) return COLORS.off;
  if (health !== "ok" && n.state !== "planned") return COLORS[health];
  if (n.kind === "switch") return COLORS.switch;
  if (n.kind === "router") return COLORS.router;
  if (n.kind === "host") return COLORS.host;
  return COLORS.ok;
}

// A link's impairments as the API gives them (the settings it runs with now):
// microseconds, percent and bits per second, shown the way `megafleet link` takes them.
function impairments(p) {
  p = p || {};
  const ms = us => `${+(us / 1000).toFixed(3)}ms`;
  const rate = b => b >= 1e9 && b % 1e6 === 0 ? `${b / 1e9}gbit` : b >= 1e6 && b % 1e3 === 0 ? `${b / 1e6}mbit`
                  : b >= 1e3 ? `${b / 1e3}kbit` : `${b}bit`;
  const parts = [];
  if (p.delay_us) parts.push(`delay ${ms(p.delay_us)}`);
  if (p.jitter_us) parts.push(`jitter ${ms(p.jitter_us)}`);
  if (p.loss_pct) parts.push(`loss ${p.loss_pct}%`);
  if (p.rate_bit) parts.push(`rate ${rate(p.rate_bit)}`);
  return parts;
}

function edgeColor(l) {
  if (l.state === "down") return COLORS.bad;
  if (impairments(l.props).length) return "#e08000";
  return "#c4c4c4";
}

function edgeLabel(l) { return impairments(l.props).join(", "); }

// ---------------------------------------------------------------- topology

async function drawGraph() {
  if (!megafleet.testbed) return;
  const collapse = new URLSearchParams(location.search).get("collapse") || "auto";
  const expand = [...megafleet.expanded].map(encodeURIComponent).join(",");
  const topo = await api(`testbeds/${encodeURIComponent(megafleet.testbed)}/graph?collapse=${collapse}&expand=${expand}`);
  const graph = new graphology.Graph({ multi: true, type: "undirected" });
  for (const n of topo.nodes) {
    const label = n.count > 1 ? `${n.name} (${n.count})` : n.name;
    graph.addNode(n.id, { x: n.x, y: n.y, label, size: SIZES[n.kind] || 4, color: nodeColor(n),
                          kind: n.kind, state: n.state, count: n.count });
  }
  for (const l of topo.links) {
    if (!graph.hasNode(l.a) || !graph.hasNode(l.b)) continue;
    // Width grows with the traffic (log scale: 1 kB/s thin, 100 MB/s thick).
    const rate = l.traffic_bps || 0;
    const label = [edgeLabel(l), rate ? `${(rate / 1000).toFixed(1)} kB/s` : ""].filter(x => x).join(", ");
    graph.addEdge(l.a, l.b, { color: edgeColor(l), label, state: l.state, traffic: rate,
                              size: 1 + Math.min(5, Math.log10(1 + rate / 1000)) });
  }
  if (megafleet.renderer) megafleet.renderer.kill();
  megafleet.graph = graph;
  megafleet.renderer = new Sigma(graph, $("graph"), { renderEdgeLabels: topo.total_nodes < 300,
                                                     labelRenderedSizeThreshold: 6 });
  megafleet.renderer.on("clickNode", ({ node }) => showNode(node));
  megafleet.collapsed = topo.collapsed;
  megafleet.renderer.once("afterRender", () => { megafleet.drawnAt = performance.now(); });
  megafleet.renderer.refresh();
  megafleet.drawnAt = performance.now();
  $("summary").textContent = `${topo.total_nodes} nodes` + (topo.collapsed ? " (guests grouped by switch)" : "");
}

function setNodeState(id, state) {
  const g = megafleet.graph;
  if (!g || !g.hasNode(id)) return false;
  const attrs = g.getNodeAttributes(id);
  g.mergeNodeAttributes(id, { state, color: nodeColor({ state, kind: attrs.kind }) });
  return true;
}

let redrawTimer = null, nodePageStale = false;
function redrawSoon(nodePage = false) {   // many events at once (a storm) cost one redraw
  nodePageStale = nodePageStale || nodePage;
  clearTimeout(redrawTimer);
  redrawTimer = setTimeout(() => {
    drawGraph().catch(console.error);
    // An open node page shows its links' settings: they may be what changed.
    if (nodePageStale && !$("node").hidden && $("exec-form").dataset.node) {
      showNode($("exec-form").dataset.node).catch(console.error);
    }
    nodePageStale = false;
  }, 300);
}

async function showNode(id) {
  const g = megafleet.graph;
  if (g && g.getNodeAttribute(id, "kind") === "cluster") {     // a click opens a cluster
    megafleet.expanded.add(id);
    return drawGraph();
  }
  if (g && g.getNodeAttribute(id, "kind") === "switch") return;
  const d = await api(`nodes/${encodeURIComponent(id)}?testbed=${encodeURIComponent(megafleet.testbed)}`);
  $("node").hidden = false;
  $("node-name").textContent = `${d.name} (${d.kind})`;
  const ifaces = d.ifaces.map(i => `<tr><td>${i.name}</td><td>${i.switch || i.peer || ""}</td>` +
    `<td>${i.addresses.join("<br>")}</td><td>${edgeLabel({ props: i.link })}</td></tr>`).join("");
  const cls = HEALTH[d.state] === "bad" ? "state-bad" : "";
  $("node-body").innerHTML =
    `<p>state <span class="${cls}">${d.state}</span> on host ${d.host || "?"}</p>` +
    `<table><tr><th>iface</th><th>to</th><th>addresses</th><th>link</th></tr>${ifaces}</table>` +
    (d.console_tail ? `<h3>console</h3><pre></pre>` : "") +
    (d.agent ? `<h3>last agent sample</h3><pre class="agent"></pre>` : "");
  const pres = $("node-body").querySelectorAll("pre");
  if (d.console_tail) pres[0].textContent = d.console_tail;
  if (d.agent) $("node-body").querySelector(".agent").textContent = JSON.stringify(d.agent, null, 1);
  if ($("exec-form").dataset.node !== d.name) $("exec-out").textContent = "";   // kept on a refresh
  $("exec-form").dataset.node = d.name;
}

// Split a command line into words: spaces separate, quotes group, \ escapes.
function words(text) {
  const out = []; let cur = null, quote = null;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quote) { if (c === quote) quote = null; else cur += c; continue; }
    if (c === "'" || c === '"') { quote = c; cur = cur ?? ""; continue; }
    if (c === "\\" && i + 1 < text.length) { cur = (cur ?? "") + text[++i]; continue; }
    if (/\s/.test(c)) { if (cur !== null) { out.push(cur); cur = null; } continue; }
    cur = (cur ?? "") + c;
  }
  if (cur !== null) out.push(cur);
  return out;
}

$("exec-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const token = $("exec-token").value.trim();
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const argv = words($("exec-cmd").value);
  try {
    const r = await api("exec", { method: "POST", headers, body: JSON.stringify(
      { testbed: megafleet.testbed, pattern: ev.target.dataset.node, argv }) });
    $("exec-out").textContent = r.nodes.map(n => `exit ${n.rc}\n${n.stdout}${n.stderr}`).join("\n");
  } catch (e) { $("exec-out").textContent = String(e); }
});
$("close-node").addEventListener("click", () => { $("node").hidden = true; });
$("find").addEventListener("change", (ev) => {
  const id = ev.target.value.trim();
  const g = megafleet.graph;
  if (!g || !g.hasNode(id)) return;
  const pos = megafleet.renderer.getNodeDisplayData(id);
  megafleet.renderer.getCamera().animate({ x: pos.x, y: pos.y, ratio: 0.1 });
  showNode(id);
});

// ---------------------------------------------------------------- hosts, plots

async function drawHosts() {
  const rows = await api("hosts");
  const head = "<tr><th>host</th><th>testbed</th><th>nodes by state</th><th>failed</th>" +
               "<th>memory available</th><th>KSM saved</th><th>telemetry</th></tr>";
  const body = rows.flatMap(h => (h.testbeds.length ? h.testbeds : [null]).map(b =>
    `<tr><td>${h.host}</td><td>${b ? b.testbed : h.error || "nothing up"}</td>` +
    `<td>${b ? Object.entries(b.nodes).map(([s, n]) => `${n} ${s}`).join(", ") : ""}</td>` +
    `<td>${b ? b.failed : ""}</td>` +
    `<td>${h.memory ? `${h.memory.available_mb} / ${h.memory.total_mb} MB` : ""}</td>` +
    `<td>${h.ksm && h.ksm.saved_mb !== undefined ? h.ksm.saved_mb + " MB" : ""}</td>` +
    `<td>${b ? `collector ${b.telemetry.collector}` + (b.telemetry.guests !== undefined ?
      `, ${b.telemetry.guests_seen}/${b.telemetry.guests} seen` : "") : ""}</td></tr>`)).join("");
  $("hosts-table").innerHTML = head + body;
}

const plots = {};
function plot(id, opts, data) {
  if (plots[id]) plots[id].destroy();
  $(id).innerHTML = "";
  plots[id] = new uPlot({ width: 520, height: 260, ...opts }, data, $(id));
  megafleet.plots = Object.keys(plots);
}

async function drawPlots() {
  const cdf = (await api("telemetry/boot-cdf?window=86400")).rows;
  const images = Object.keys(cdf);
  if (images.length) {
    // One x axis: every duration; each image's CDF stepped over it.
    const xs = [...new Set(images.flatMap(i => cdf[i]))].sort((a, b) => a - b);
    const series = images.map(i => xs.map(x => cdf[i].filter(d => d <= x).length / cdf[i].length));
    plot("plot-boot", { scales: { x: { time: false } }, axes: [{ label: "seconds" }, { label: "fraction ready" }],
                        series: [{ label: "s" }, ...images.map((i, k) => ({ label: i, stroke: ["#1f6fd1", "#2e9e44", "#d0312d", "#e0a000"][k % 4] }))] },
         [xs, ...series]);
  } else {
    $("plot-boot").textContent = "no boots in the last day";
  }
  const ksm = (await api("telemetry/ksm?window=86400")).rows;
  if (ksm.length) {
    plot("plot-ksm", { series: [{}, { label: "saved MB", stroke: "#2e9e44" }] },
         [ksm.map(r => Date.parse(r.time) / 1000), ksm.map(r => r.saving_bytes / 1e6)]);
  } else {
    $("plot-ksm").textContent = "no KSM samples in the last day";
  }
  const net = (await api("telemetry/net?window=600&limit=10")).rows;
  $("table-net").innerHTML = "<tr><th>host</th><th>iface</th><th>mean B/s</th><th>drops</th></tr>" +
    net.map(r => `<tr><td>${r.host}</td><td>${r.iface}</td><td>${r.mean_bps}</td><td>${r.drops}</td></tr>`).join("");
  const cpu = (await api("telemetry/top-cpu?window=600&limit=10")).rows;
  $("table-cpu").innerHTML = "<tr><th>guest</th><th>host</th><th>CPU %</th><th>RSS kB</th></tr>" +
    cpu.map(r => `<tr><td>${r.guest}</td><td>${r.host}</td><td>${r.cpu_pct}</td><td>${r.rss_kb ?? ""}</td></tr>`).join("");
}

// ---------------------------------------------------------------- events

function addEventRow(e) {
  const tbody = $("events-table").querySelector("tbody");
  const tr = document.createElement("tr");
  const what = Object.entries(e.data).filter(([k]) => k !== "meta").map(([k, v]) =>
    `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
  for (const text of [e.id, new Date(e.time * 1000).toLocaleTimeString(), e.kind, e.testbed || "", what]) {
    const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
  }
  tbody.prepend(tr);
  while (tbody.children.length > 300) tbody.lastChild.remove();
}

function listen() {
  const source = new EventSource("/api/v1/events/stream");
  source.onopen = () => { $("live").textContent = "● live"; $("live").className = "on"; };
  source.onerror = (ev) => {
    // The server's own "error" events (a failed poll) come here too: the stream is still up.
    if (ev instanceof MessageEvent) return;
    $("live").textContent = "● reconnecting"; $("live").className = "";
  };
  const handle = (msg) => {
    const e = JSON.parse(msg.data);
    megafleet.lastEventId = e.id; megafleet.events += 1;
    addEventRow(e);
    if (e.testbed !== megafleet.testbed && e.kind !== "testbed") return;
    if (e.kind === "node") {
      const state = e.data.state === "healthy" ? null : e.data.state;
      if (megafleet.collapsed || !state || !setNodeState(e.data.node, state)) redrawSoon();
    } else if (e.kind === "link" || e.kind === "fault" || e.kind === "testbed") {
      redrawSoon(true);
    }
  };
  for (const kind of ["node", "boot", "failure", "fault", "link", "testbed", "exec", "telemetry", "error"]) {
    source.addEventListener(kind, handle);
  }
}

// ---------------------------------------------------------------- start

for (const a of document.querySelectorAll("nav a")) {
  a.addEventListener("click", (ev) => {
    ev.preventDefault();
    for (const b of document.querySelectorAll("nav a")) b.classList.toggle("active", b === a);
    for (const s of document.querySelectorAll(".tab")) s.classList.toggle("active", s.id === a.dataset.tab);
    if (a.dataset.tab === "plots") drawPlots().catch(console.error);
    if (a.dataset.tab === "hosts") drawHosts().catch(console.error);
    if (a.dataset.tab === "topology" && megafleet.renderer) megafleet.renderer.refresh();
  });
}

async function start() {
  const beds = await api("testbeds");
  const select = $("testbed");
  select.innerHTML = beds.map(b => `<option>${b.name}</option>`).join("");
  const wanted = new URLSearchParams(location.search).get("testbed");
  megafleet.testbed = wanted || (beds[0] && beds[0].name) || null;
  select.value = megafleet.testbed || "";
  select.addEventListener("change", () => {
    megafleet.testbed = select.value; megafleet.expanded.clear(); drawGraph();
  });
  if (!megafleet.testbed) $("summary").textContent = "no testbed is up";
  listen();
  await drawGraph();
  drawPlots().catch(console.error);
  setInterval(() => { drawHosts().catch(console.error); }, 10000);
}
start().catch(e => { $("summary").textContent = String(e); });
