--- buzz.page: the live dashboard bus:serve shows at / (one HTML file,
-- plain JavaScript, nothing from a CDN). It reads the bus through the
-- gateway: an EventSource on /api/events (every event; resumed by the
-- browser's Last-Event-ID, so a dropped connection leaves no gap, and a
-- `reset` reloads what it shows) and /api/stats every 2 s (subscriptions,
-- breakers, consumers' lag, dead letters). A click on an event shows its
-- payload and, with tracing on, its chain (/api/trace/ID). It needs the
-- token as a cookie: open /?token=... once.
-- @module buzz.page
local M = {}

M.html = [==[<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>buzz</title>
<style>
  :root { --bg: #0f1419; --panel: #161c23; --line: #2a323c; --fg: #d7dde4;
          --dim: #8593a3; --ok: #4caf7d; --bad: #e5534b; --accent: #e6b450; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace;
         background: var(--bg); color: var(--fg); }
  header { display: flex; gap: 16px; align-items: center; padding: 10px 16px;
           border-bottom: 1px solid var(--line); }
  header h1 { font-size: 16px; margin: 0; color: var(--accent); }
  #status.live { color: var(--ok); } #status.down { color: var(--bad); }
  main { display: grid; grid-template-columns: 3fr 2fr; gap: 12px;
         padding: 12px 16px; }
  section { background: var(--panel); border: 1px solid var(--line);
            border-radius: 6px; padding: 8px 10px; min-width: 0; }
  h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .08em;
       color: var(--dim); margin: 0 0 6px; }
  table { width: 100%; border-collapse: collapse; }
  th, td { text-align: left; padding: 2px 6px; white-space: nowrap;
           overflow: hidden; text-overflow: ellipsis; max-width: 18em; }
  th { color: var(--dim); font-weight: normal; }
  #events tbody tr { cursor: pointer; }
  #events tbody tr:hover, #events tbody tr.sel { background: #222b35; }
  .num { text-align: right; } .bad { color: var(--bad); }
  pre { margin: 0; white-space: pre-wrap; word-break: break-word; }
  #scroll { max-height: 60vh; overflow: auto; }
  canvas { width: 100%; height: 120px; }
</style>
</head>
<body>
<header>
  <h1>buzz</h1>
  <span id="status" class="down">connecting</span>
  <span>last id <b id="last">-</b></span>
  <span><b id="rate">0</b> events/s</span>
  <span><b id="count">0</b> seen</span>
</header>
<main>
  <section>
    <h2>Recent events</h2>
    <div id="scroll">
    <table id="events">
      <thead><tr><th>time</th><th class="num">id</th><th>type</th>
        <th>key</th><th>correlation id</th></tr></thead>
      <tbody></tbody>
    </table>
    </div>
  </section>
  <div>
    <section>
      <h2>Events per second, by type</h2>
      <canvas id="chart" width="600" height="120"></canvas>
      <div id="legend"></div>
    </section>
    <section>
      <h2>Event</h2>
      <pre id="detail">Click an event to see its payload and chain.</pre>
    </section>
    <section>
      <h2>Subscriptions</h2>
      <table id="subs"><thead><tr><th>name</th><th class="num">delivered</th>
        <th class="num">failed</th><th class="num">in flight</th>
        <th>breaker</th></tr></thead><tbody></tbody></table>
    </section>
    <section>
      <h2>Consumers' lag</h2>
      <table id="lag"><tbody></tbody></table>
    </section>
    <section>
      <h2>Dead letters <span id="ndead"></span></h2>
      <table id="dead"><tbody></tbody></table>
    </section>
  </div>
</main>
<script>
"use strict";
const MAX_ROWS = 200, SECONDS = 60;
const COLORS = ["#e6b450", "#4caf7d", "#59c2ff", "#d2a6ff", "#f07178",
                "#95e6cb"];
const rows = document.querySelector("#events tbody");
const seen = new Map();          // id -> envelope (the rows shown)
const perType = new Map();       // type -> counts of the last SECONDS
let count = 0, last = null, selected = null;
window.buzz = { ids: [], resets: 0, opens: 0 };   // for tests

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function time(ms) {
  return new Date(ms).toISOString().substring(11, 23);
}

function bucket(type) {
  let b = perType.get(type);
  if (!b) { b = new Array(SECONDS).fill(0); perType.set(type, b); }
  return b;
}

function show(env) {
  selected = env.id;
  for (const tr of rows.children)
    tr.classList.toggle("sel", tr.dataset.id === String(env.id));
  const d = document.getElementById("detail");
  d.textContent = JSON.stringify(env, null, 2);
  fetch("/api/trace/" + env.id).then(r => r.ok ? r.json() : null)
    .then(tree => {
      if (tree && selected === env.id)
        d.textContent += "\n\nchain:\n" + JSON.stringify(tree, null, 2);
    }).catch(() => {});
}

function add(env) {
  if (seen.has(env.id)) return;      // never twice, whatever the network
  seen.set(env.id, env);
  const got = window.buzz.ids;
  got.push(env.id);
  if (got.length > 10000) got.splice(0, got.length - 10000);
  count++;
  last = env.id;
  bucket(env.type)[SECONDS - 1]++;
  const tr = el("tr");
  tr.dataset.id = env.id;
  tr.append(el("td", time(env.ts)), el("td", env.id, "num"),
            el("td", env.type), el("td", env.key || ""),
            el("td", env.correlation_id || ""));
  tr.onclick = () => show(env);
  rows.prepend(tr);
  while (rows.children.length > MAX_ROWS) {
    seen.delete(Number(rows.lastChild.dataset.id));
    rows.lastChild.remove();
  }
  document.getElementById("last").textContent = last;
  document.getElementById("count").textContent = count;
}

function connect() {
  const es = new EventSource("/api/events");
  const status = document.getElementById("status");
  es.onopen = () => {
    window.buzz.opens++;
    status.textContent = "live";
    status.className = "live";
  };
  es.onerror = () => {
    status.textContent = "reconnecting";
    status.className = "down";
  };
  es.onmessage = ev => {        // this stream has no event: lines, so
    try { add(JSON.parse(ev.data)); }  // every type arrives here
    catch (e) { console.error(e); }
  };
  es.addEventListener("reset", () => {    // what we missed is gone
    window.buzz.resets++;
    rows.textContent = "";
    seen.clear();
  });
}

function tick() {
  let total = 0;
  for (const b of perType.values()) { total += b[SECONDS - 2] || 0;
                                      b.shift(); b.push(0); }
  document.getElementById("rate").textContent = total;
  draw();
}

function draw() {
  const c = document.getElementById("chart"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const types = [...perType.entries()]
    .map(([t, b]) => [t, b, b.reduce((a, x) => a + x, 0)])
    .filter(x => x[2] > 0).sort((a, b) => b[2] - a[2]).slice(0, 6);
  let max = 1;
  for (const [, b] of types) for (const x of b) max = Math.max(max, x);
  const legend = document.getElementById("legend");
  legend.textContent = "";
  types.forEach(([t, b], i) => {
    g.strokeStyle = COLORS[i];
    g.beginPath();
    b.forEach((x, k) => {
      const px = k * c.width / (SECONDS - 1);
      const py = c.height - 4 - x * (c.height - 8) / max;
      if (k) g.lineTo(px, py); else g.moveTo(px, py);
    });
    g.stroke();
    const s = el("span", "\u25a0 " + t + "  ");
    s.style.color = COLORS[i];
    legend.append(s);
  });
}

function fill(id, list) {
  const body = document.querySelector("#" + id + " tbody");
  body.textContent = "";
  for (const cells of list) {
    const tr = el("tr");
    for (const [text, cls] of cells) tr.append(el("td", text, cls));
    body.append(tr);
  }
}

function stats() {
  fetch("/api/stats").then(r => r.ok ? r.json() : null).then(s => {
    if (!s) return;
    const subs = Object.entries(s.subscriptions || {})
      .filter(([n]) => !n.startsWith("buzz.serve"));
    fill("subs", subs.map(([n, x]) => [[n], [x.delivered, "num"],
      [x.failed, x.failed ? "num bad" : "num"], [x.in_flight, "num"],
      [x.breaker || "", x.breaker === "open" ? "bad" : ""]]));
    fill("lag", Object.entries(s.consumers || {})
      .map(([n, lag]) => [[n], [lag, "num"]]));
    const dead = s.dead || [];
    document.getElementById("ndead").textContent = "(" + s.dead_letters + ")";
    fill("dead", dead.map(d => [[d.id, "num"], [d.type || ""],
      [d.subscription || ""], [d.reason || d.error || "", "bad"]]));
  }).catch(() => {});
}

connect();
setInterval(tick, 1000);
setInterval(stats, 2000);
stats();
</script>
</body>
</html>
]==]

return M
