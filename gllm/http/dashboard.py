"""The live dashboard served at ``GET /``: one self-contained HTML page (plain HTML + JS, no build
step, nothing fetched from elsewhere) that polls ``GET /v1/gllm/live``.

Kept inline in a Python string so the page ships inside the package with no package-data setup.
All model output is put in the page with ``textContent``, never as HTML.
"""

from __future__ import annotations

POLL_MS = 300

DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gllm — live</title>
<style>
  :root { --bg:#0f1115; --panel:#171a21; --line:#262b36; --fg:#e6e8ee; --dim:#8a91a3; --accent:#6cc4ff;
          --ok:#5fd38d; --warn:#f3c454; --bad:#ff6b6b; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--fg); }
  header { display:flex; align-items:baseline; gap:16px; padding:12px 20px; border-bottom:1px solid var(--line); flex-wrap:wrap; }
  header h1 { font-size:18px; margin:0; color:var(--accent); letter-spacing:.5px; }
  header .model { font-weight:600; font-size:16px; }
  header .meta { color:var(--dim); }
  #status { margin-left:auto; }
  .dot { display:inline-block; width:9px; height:9px; border-radius:50%; background:var(--dim); margin-right:6px; }
  .dot.ok { background:var(--ok); } .dot.bad { background:var(--bad); }
  main { padding:16px 20px; display:grid; gap:14px; grid-template-columns: repeat(12, 1fr); }
  .card { background:var(--panel); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
  .card h2 { font-size:12px; text-transform:uppercase; letter-spacing:.8px; color:var(--dim); margin:0 0 8px; font-weight:600; }
  .stat { grid-column: span 2; } .stat .v { font-size:26px; font-weight:600; } .stat .s { color:var(--dim); font-size:12px; }
  .wide { grid-column: span 6; } .full { grid-column: span 12; }
  @media (max-width: 1100px) { .stat { grid-column: span 4; } .wide { grid-column: span 12; } }
  .bar { height:10px; background:#0b0d11; border-radius:5px; overflow:hidden; margin-top:6px; }
  .bar > div { height:100%; background:var(--accent); width:0; transition:width .2s; }
  canvas { width:100%; height:90px; display:block; }
  .hist { display:flex; align-items:flex-end; gap:4px; height:110px; }
  .hist .col { flex:1; display:flex; flex-direction:column; align-items:center; justify-content:flex-end; height:100%; }
  .hist .col div.b { width:100%; background:var(--accent); border-radius:3px 3px 0 0; min-height:1px; }
  .hist .col span { font-size:10px; color:var(--dim); margin-top:3px; white-space:nowrap; }
  .req { border:1px solid var(--line); border-radius:6px; padding:8px 10px; margin-bottom:8px; background:#12151b; }
  .req .h { display:flex; gap:12px; color:var(--dim); font-size:12px; flex-wrap:wrap; }
  .req .h .id { color:var(--fg); font-family:ui-monospace, monospace; }
  .req .prompt { color:var(--dim); font-size:12px; margin:4px 0; font-style:italic; }
  .req pre.text { margin:4px 0 0; white-space:pre-wrap; word-break:break-word; font:13px/1.45 ui-monospace, monospace;
                  max-height:160px; overflow:auto; color:var(--fg); }
  .state-generating { color:var(--ok); } .state-queued { color:var(--warn); }
  table { width:100%; border-collapse:collapse; font-size:12px; }
  td, th { text-align:left; padding:4px 6px; border-bottom:1px solid var(--line); vertical-align:top; }
  th { color:var(--dim); font-weight:600; }
  td.t { font-family:ui-monospace, monospace; max-width:480px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
  .empty { color:var(--dim); font-style:italic; }
  dl { display:grid; grid-template-columns:auto 1fr; gap:2px 12px; margin:0; font-size:13px; }
  dt { color:var(--dim); } dd { margin:0; font-family:ui-monospace, monospace; }
  #auth { display:none; padding:10px 20px; background:#2a1d1d; border-bottom:1px solid var(--bad); }
  #auth input { background:#0b0d11; color:var(--fg); border:1px solid var(--line); padding:4px 8px; width:320px; }
</style>
</head>
<body>
<header>
  <h1>gllm</h1>
  <span class="model" id="model">…</span>
  <span class="meta">on <span id="device">…</span></span>
  <span class="meta">max_seq_len <span id="maxlen">…</span> · batch <span id="batch">…</span></span>
  <span class="meta" id="status"><span class="dot" id="dot"></span><span id="statustext">connecting…</span></span>
</header>
<div id="auth">This server needs its API key: <input id="key" type="password" placeholder="API key">
  <button id="keybtn">Use key</button></div>
<main>
  <div class="card stat"><h2>Generated tok/s</h2><div class="v" id="tps">0</div><div class="s">computed <span id="ctps">0</span> tok/s</div></div>
  <div class="card stat"><h2>Requests</h2><div class="v"><span id="running">0</span> <span class="s">running</span></div>
    <div class="s"><span id="waiting">0</span> waiting · <span id="started">0</span> total</div></div>
  <div class="card stat"><h2>KV cache</h2><div class="v" id="kvpct">0%</div>
    <div class="s"><span id="kvused">0</span> / <span id="kvtotal">0</span> blocks</div><div class="bar"><div id="kvbar"></div></div></div>
  <div class="card stat"><h2>Prefix cache</h2><div class="v" id="hitrate">–</div><div class="s">hit rate (blocks)</div></div>
  <div class="card stat"><h2>Engine steps</h2><div class="v" id="steps">0</div><div class="s">last <span id="laststep">–</span> ms · mean <span id="meanstep">–</span> ms</div></div>
  <div class="card stat"><h2>Bridge clients</h2><div class="v" id="bridge">0</div><div class="s">ZeroMQ sessions</div></div>

  <div class="card wide"><h2>Generated tokens per second (last 60 s)</h2><canvas id="spark" width="600" height="90"></canvas></div>
  <div class="card wide"><h2>Step time histogram</h2><div class="hist" id="hist"></div></div>

  <div class="card full"><h2>Live requests <span id="nlive"></span></h2><div id="live"><div class="empty">no request in flight</div></div></div>
  <div class="card wide"><h2>Recent requests</h2><table><thead><tr><th>id</th><th>via</th><th>outcome</th><th>tokens</th><th>ttft ms</th><th>text</th></tr></thead>
    <tbody id="recent"></tbody></table></div>
  <div class="card wide"><h2>Frame governor</h2><div id="frame"><div class="empty">not active</div></div>
    <h2 style="margin-top:12px">Outcomes</h2><dl id="outcomes"></dl></div>
</main>
<script>
"use strict";
const POLL_MS = __POLL_MS__;
const $ = (id) => document.getElementById(id);
let apiKey = null;
const m = location.hash.match(/key=([^&]+)/);
if (m) { apiKey = decodeURIComponent(m[1]); try { sessionStorage.setItem("gllm-key", apiKey); } catch (e) {} }
else { try { apiKey = sessionStorage.getItem("gllm-key"); } catch (e) {} }
$("keybtn").onclick = () => { apiKey = $("key").value; try { sessionStorage.setItem("gllm-key", apiKey); } catch (e) {}
                              $("auth").style.display = "none"; };

function setText(el, value) { const s = String(value); if (el.textContent !== s) el.textContent = s; }
function fmt(x, digits) { return (x === null || x === undefined) ? "–" : Number(x).toFixed(digits); }

function drawSpark(series) {
  const c = $("spark"), ctx = c.getContext("2d");
  const w = c.width = c.clientWidth || 600, h = c.height = 90;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...series);
  ctx.strokeStyle = "#6cc4ff"; ctx.fillStyle = "rgba(108,196,255,.15)"; ctx.lineWidth = 2;
  ctx.beginPath();
  series.forEach((v, i) => { const x = i * w / (series.length - 1), y = h - 4 - (v / max) * (h - 14);
                             i ? ctx.lineTo(x, y) : ctx.moveTo(x, y); });
  ctx.stroke(); ctx.lineTo(w, h); ctx.lineTo(0, h); ctx.closePath(); ctx.fill();
  ctx.fillStyle = "#8a91a3"; ctx.font = "11px system-ui"; ctx.fillText("max " + max + " tok/s", 6, 12);
}

function drawHist(buckets) {
  const el = $("hist"); const max = Math.max(1, ...buckets.map(b => b.count));
  if (el.children.length !== buckets.length) {
    el.textContent = "";
    buckets.forEach(b => { const col = document.createElement("div"); col.className = "col";
      const bar = document.createElement("div"); bar.className = "b"; const lab = document.createElement("span");
      lab.textContent = b.le_ms === null ? ">" : "≤" + (b.le_ms < 10 ? b.le_ms.toFixed(1) : Math.round(b.le_ms));
      col.append(bar, lab); el.append(col); });
  }
  buckets.forEach((b, i) => { const bar = el.children[i].firstChild;
    bar.style.height = (100 * b.count / max) + "%"; bar.title = b.count + " steps"; });
}

function renderLive(reqs) {
  const box = $("live");
  setText($("nlive"), reqs.length ? "(" + reqs.length + ")" : "");
  const seen = new Set();
  for (const r of reqs) {
    seen.add(r.id);
    let el = box.querySelector('[data-request-id="' + CSS.escape(r.id) + '"]');
    if (!el) {
      el = document.createElement("div"); el.className = "req"; el.dataset.requestId = r.id;
      el.innerHTML = '<div class="h"><span class="id"></span><span class="via"></span><span class="st"></span>' +
                     '<span class="tok"></span><span class="rate"></span></div><div class="prompt"></div><pre class="text"></pre>';
      box.append(el);
    }
    setText(el.querySelector(".id"), r.id);
    setText(el.querySelector(".via"), r.front_end + (r.kind ? " · " + r.kind : ""));
    const st = el.querySelector(".st"); setText(st, r.state); st.className = "st state-" + r.state;
    setText(el.querySelector(".tok"), r.tokens + " tokens");
    setText(el.querySelector(".rate"), r.tokens_per_s === null ? "" : r.tokens_per_s + " tok/s");
    setText(el.querySelector(".prompt"), r.preview ? "“" + r.preview + "”" : "");
    const pre = el.querySelector("pre.text");
    const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    setText(pre, (r.text_truncated ? "…" : "") + r.text);
    if (stick) pre.scrollTop = pre.scrollHeight;
  }
  for (const el of Array.from(box.querySelectorAll(".req"))) if (!seen.has(el.dataset.requestId)) el.remove();
  let empty = box.querySelector(".empty");
  if (!reqs.length && !empty) { empty = document.createElement("div"); empty.className = "empty";
                                empty.textContent = "no request in flight"; box.append(empty); }
  if (reqs.length && empty) empty.remove();
}

function renderRecent(rows) {
  const body = $("recent"); body.textContent = "";
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const v of [r.id, r.front_end, r.outcome, r.tokens, fmt(r.ttft_ms, 1), r.text]) {
      const td = document.createElement("td"); td.textContent = v === null || v === undefined ? "" : v; tr.append(td);
    }
    tr.lastChild.className = "t"; tr.lastChild.title = r.text || ""; body.append(tr);
  }
}

function renderKV(dl, obj) {
  dl.textContent = "";
  for (const [k, v] of Object.entries(obj)) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k; dd.textContent = typeof v === "object" ? JSON.stringify(v) : v; dl.append(dt, dd);
  }
}

function render(d) {
  window.__up = d.uptime_s;
  setText($("model"), d.model); setText($("device"), d.device);
  setText($("maxlen"), d.engine.max_seq_len); setText($("batch"), d.engine.max_batch_size);
  setText($("tps"), fmt(d.throughput.generated_tokens_per_s, 1));
  setText($("ctps"), fmt(d.throughput.computed_tokens_per_s, 1));
  setText($("running"), d.engine.running); setText($("waiting"), d.engine.waiting);
  setText($("started"), d.totals.started);
  setText($("kvused"), d.kv.used); setText($("kvtotal"), d.kv.total);
  setText($("kvpct"), Math.round(100 * d.kv.usage) + "%"); $("kvbar").style.width = (100 * d.kv.usage) + "%";
  setText($("hitrate"), d.prefix_cache_hit_rate === null ? "–" : Math.round(100 * d.prefix_cache_hit_rate) + "%");
  setText($("steps"), d.engine.steps); setText($("laststep"), fmt(d.steps.last_ms, 2));
  setText($("meanstep"), fmt(d.steps.mean_ms, 2)); setText($("bridge"), d.bridge_clients);
  drawSpark(d.throughput.generated_per_s_series); drawHist(d.steps.buckets);
  renderLive(d.requests); renderRecent(d.recent);
  const frame = $("frame");
  if (d.frame && typeof d.frame === "object" && Object.keys(d.frame).length) {
    let dl = frame.querySelector("dl"); if (!dl) { frame.textContent = ""; dl = document.createElement("dl"); frame.append(dl); }
    renderKV(dl, d.frame);
  } else if (!frame.querySelector(".empty")) { frame.innerHTML = '<div class="empty">not active</div>'; }
  renderKV($("outcomes"), d.totals.by_outcome);
  document.title = "gllm — " + d.model + (d.requests.length ? " (" + d.requests.length + " live)" : "");
}

async function poll() {
  try {
    const headers = apiKey ? { "Authorization": "Bearer " + apiKey } : {};
    const res = await fetch("/v1/gllm/live", { headers, cache: "no-store" });
    if (res.status === 401) { $("auth").style.display = "block"; throw new Error("API key needed"); }
    if (!res.ok) throw new Error("HTTP " + res.status);
    render(await res.json());
    $("dot").className = "dot ok"; setText($("statustext"), "live · up " + Math.round(window.__up || 0) + " s");
  } catch (e) {
    $("dot").className = "dot bad"; setText($("statustext"), String(e.message || e));
  } finally { setTimeout(poll, POLL_MS); }
}
poll();
</script>
</body>
</html>
"""


def dashboard_html() -> str:
    return DASHBOARD_HTML.replace("__POLL_MS__", str(POLL_MS))
