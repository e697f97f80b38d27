// kvrouter dashboard: plain JavaScript, no build step. State from /ui/state (polled, and
// refreshed at once on every /events message); actions through the admin API.
"use strict";
(function () {
  const $ = (sel) => document.querySelector(sel);
  let adminToken = null;          // this tab's memory only
  let state = null;
  let pendingAction = null;

  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({
      "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  function ms(v) { return v == null ? "-" : (v * 1000).toFixed(v < 0.01 ? 1 : 0); }
  function gb(v) { return v == null ? "-" : v.toFixed(1); }
  function ago(seconds) {
    if (seconds == null) return "-";
    if (seconds < 60) return seconds.toFixed(0) + " s";
    if (seconds < 3600) return (seconds / 60).toFixed(0) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }
  function clock(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "-"; }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (adminToken) h["Authorization"] = "Bearer " + adminToken;
    return h;
  }

  function askToken(then) {
    pendingAction = then || null;
    $("#token-input").value = "";
    $("#token-dialog").showModal();
  }
  $("#token-dialog").addEventListener("close", () => {
    if ($("#token-dialog").returnValue === "ok" && $("#token-input").value) {
      adminToken = $("#token-input").value;
      const then = pendingAction;
      pendingAction = null;
      if (then) then();
    }
  });
  $("#token-btn").addEventListener("click", () => askToken(null));

  async function admin(method, path, retry) {
    const r = await fetch(path, { method: method, headers: headers() });
    if ((r.status === 401 || r.status === 403) && retry !== false) {
      askToken(() => admin(method, path, false));
      return null;
    }
    const body = await r.json().catch(() => ({}));
    if (!r.ok) alert((body.error && body.error.message) || ("HTTP " + r.status));
    refresh();
    return body;
  }

  function spark(points, key, color) {
    const vals = points.map((p) => p[key]);
    const present = vals.filter((v) => v != null);
    const max = Math.max(1e-9, ...present);
    const n = Math.max(1, vals.length - 1);
    let d = "";
    vals.forEach((v, i) => {
      if (v == null) return;
      const x = (i / n) * 100, y = 36 - (v / max) * 34;
      d += (d ? " L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
    });
    return '<svg class="spark" viewBox="0 0 100 38" preserveAspectRatio="none">' +
      '<path d="' + d + '" fill="none" stroke="' + color + '" stroke-width="1.5" ' +
      'vector-effect="non-scaling-stroke"/></svg>';
  }

  function modelCard(m) {
    const kv = m.kv_pool && m.kv_pool.limit_bytes != null
      ? gb(m.kv_pool.used_bytes / 2 ** 30) + " / " + gb(m.kv_pool.limit_bytes / 2 ** 30) + " GB (kvcached" +
        (m.kv_pool.groups > 1 ? ", " + m.kv_pool.groups + " groups" : "") +
        (m.kv_pool.set_by_hand ? ", limit set by hand" : "") + ")"
      : (m.memory.kv_cache_gb != null ? gb(m.memory.kv_cache_gb) + " GB (config)" : "-");
    const rateMax = Math.max(...m.history.map((h) => h.rate));
    return '<div class="card" data-model="' + esc(m.model) + '">' +
      "<h3>" + (m.replica_of ? esc(m.replica_of) + ' <span class="muted">replica</span> ' : "") +
        esc(m.model) + (m.aliases.length ? ' <span class="muted">(' +
        esc(m.aliases.join(", ")) + ")</span>" : "") + "</h3>" +
      '<span class="state ' + esc(m.state) + '">' + esc(m.state) + "</span> " +
      '<span class="muted since">for ' + ago(m.since_seconds) + "</span>" +
      '<div class="muted reason">' + esc(m.reason) + "</div>" +
      '<dl class="kv">' +
      "<dt>engine</dt><dd>" + esc(m.engine) + (m.sleep_level ? ", sleep level " + m.sleep_level : "") +
        (m.pinned ? ", pinned" : "") + "</dd>" +
      '<dt>routes</dt><dd class="routes"><details><summary>' + m.routes.length +
        " routes</summary>" + esc(m.routes.join(", ")) + "</details></dd>" +
      '<dt>in flight</dt><dd class="inflight">' + m.in_flight + " running, " + m.waiting + " waiting</dd>" +
      "<dt>rate</dt><dd>" + m.request_rate.toFixed(2) + " req/s (1 min), " + m.total_requests + " in all</dd>" +
      "<dt>TTFT</dt><dd>p50 " + ms(m.ttft.p50) + " / p99 " + ms(m.ttft.p99) + " ms</dd>" +
      "<dt>ITL</dt><dd>p50 " + ms(m.itl.p50) + " / p99 " + ms(m.itl.p99) + " ms</dd>" +
      "<dt>last wake</dt><dd>" + clock(m.last_wake_time) +
        (m.last_wake_seconds ? " (" + m.last_wake_seconds.toFixed(2) + " s)" : "") + "</dd>" +
      "<dt>memory</dt><dd>weights " + gb(m.memory.weights_gb) + " GB, KV " + kv +
        (m.gpu_process_bytes != null ? "; on the GPU (NVML) " + gb(m.gpu_process_bytes / 2 ** 30) +
          " GB" : "") + "</dd>" +
      "</dl>" +
      '<div class="spark-label">requests/s, last 15 min (max ' + rateMax.toFixed(2) + ")</div>" +
      spark(m.history, "rate", "#2563eb") +
      '<div class="spark-label">TTFT p50</div>' + spark(m.history, "ttft_p50", "#b45309") +
      '<div class="row">' +
      '<button type="button" class="sleep-btn" data-model="' + esc(m.model) + '"' +
        (m.state === "ready" ? "" : " disabled") + ">Sleep</button>" +
      '<button type="button" class="wake-btn" data-model="' + esc(m.model) + '"' +
        (m.state === "sleeping" || m.state === "stopped" ? "" : " disabled") + ">Wake</button>" +
      "</div></div>";
  }

  function gpuBar(g) {
    const total = g.total_gb || g.models.reduce((s, m) => s + m.weights_gb + m.kv_limit_gb, 0) || 1;
    let parts = "", title = [];
    g.models.forEach((m) => {
      if (!m.weights_gb && !m.kv_limit_gb) return;
      const used = m.kv_used_gb == null ? 0 : Math.min(m.kv_used_gb, m.kv_limit_gb);
      const seg = (cls, v, what) => v > 0 ? '<div class="' + cls + '" style="width:' +
        (100 * v / total).toFixed(2) + '%" title="' + esc(m.model + ": " + what + " " + gb(v) + " GB") + '"></div>' : "";
      parts += seg("weights", m.weights_gb, "weights") + seg("kvused", used, "KV in use") +
        seg("kvlimit", m.kv_limit_gb - used, "KV reserved");
      title.push(m.model + " (" + m.source + ")");
    });
    const free = g.free_gb == null ? null : Math.max(0, g.free_gb);
    if (free) parts += '<div class="free" style="width:' + (100 * free / total).toFixed(2) + '%"></div>';
    const src = g.total_source === "nvml" ? "NVML total" : g.total_source === "config" ?
      "budget from config" : "no budget: sum of the config's figures";
    const nvml = g.nvml ? ", NVML used " + gb(g.nvml.used_bytes / 2 ** 30) + " GB" : "";
    return '<div class="gpu" data-gpu="' + esc(g.gpu) + '"><div class="title">GPU ' + esc(g.gpu) +
      ': ' + (g.total_gb ? gb(g.total_gb) + " GB (" + src + ")" : src) +
      (free != null ? ", " + gb(free) + " GB free" : "") + nvml + ' <span class="muted">' +
      esc(title.join(", ")) + "</span></div>" + '<div class="bar">' + parts + "</div></div>";
  }

  function render() {
    if (!state) return;
    const c = state.cluster || {};
    $("#policy").textContent = "policy " + state.policy +
      (state.auto_sleep_enabled ? ", auto sleep on" : ", auto sleep off") +
      ", " + state.process_manager +
      (c.router_id ? "; router " + c.router_id + (c.this_router_leads ? " (leader)" :
        " (leader " + (c.leader || "none") + ")") + " of " + (c.routers || []).length +
        ", Redis " + c.redis + (c.degraded ? " - DEGRADED: " + c.degraded : "") : "");
    $("#token-btn").style.display = state.admin_token_required ? "" : "none";
    $("#models").innerHTML = state.models.map(modelCard).join("");
    $("#gpus").innerHTML = state.gpus.map(gpuBar).join("");
    const names = state.models.map((m) => m.model);
    for (const [sel, extra] of [["#pg-model", []], ["#log-program", ["router"]]]) {
      const el = $(sel);
      const want = extra.concat(names);
      if (Array.from(el.options).map((o) => o.value).join("\n") !== want.join("\n")) {
        const keep = el.value;
        el.innerHTML = want.map((n) => '<option value="' + esc(n) + '">' + esc(n) + "</option>").join("");
        if (want.includes(keep)) el.value = keep;
      }
    }
    timeline(state.events);
  }

  let shownEvents = [];
  function timeline(events) {
    const seen = new Set(shownEvents.map((e) => e.id));
    events.forEach((e) => { if (!seen.has(e.id)) shownEvents.push(e); });
    shownEvents.sort((a, b) => b.id - a.id);
    shownEvents = shownEvents.slice(0, 200);
    $("#timeline").innerHTML = shownEvents.map((e) =>
      '<li data-kind="' + esc(e.kind) + '" data-model="' + esc(e.model) + '">' +
      '<span class="muted">' + clock(e.time) + "</span> " + esc(e.model) + ' <span class="kind">' +
      esc(e.kind) + '</span> <span class="muted">' + esc(e.reason) + "</span></li>").join("");
  }

  let inFlight = false;
  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    try {
      const r = await fetch("/ui/state", { cache: "no-store" });
      if (r.ok) { state = await r.json(); render(); }
    } catch (err) { /* the router restarts: try again at the next tick */ }
    finally { inFlight = false; }
  }

  document.addEventListener("click", (ev) => {
    const b = ev.target.closest("button");
    if (!b || !b.dataset.model) return;
    const model = encodeURIComponent(b.dataset.model).replace(/%2F/g, "/");
    if (b.classList.contains("sleep-btn")) admin("POST", "/model/sleep/" + model);
    if (b.classList.contains("wake-btn")) admin("POST", "/model/wake/" + model);
  });

  function connect() {
    const es = new EventSource("/events");
    es.addEventListener("state", (msg) => {
      timeline([JSON.parse(msg.data)]);
      refresh();
    });
    es.onopen = () => { $("#conn").textContent = "live"; $("#conn").classList.add("live"); };
    es.onerror = () => { $("#conn").textContent = "reconnecting"; $("#conn").classList.remove("live"); };
  }

  async function loadLog(retry) {
    const name = $("#log-program").value;
    if (!name) return;
    const r = await fetch("/ui/logs/" + encodeURIComponent(name).replace(/%2F/g, "/") +
      "?bytes=8000", { headers: headers() });
    if ((r.status === 401 || r.status === 403) && retry !== false) {
      askToken(() => loadLog(false));
      return;
    }
    const body = await r.json().catch(() => ({}));
    $("#log-text").textContent = r.ok ? (body.text || "(empty)") :
      ((body.error && body.error.message) || "HTTP " + r.status);
    $("#log-text").scrollTop = $("#log-text").scrollHeight;
  }
  $("#log-refresh").addEventListener("click", () => loadLog());
  $("#log-program").addEventListener("change", () => loadLog());

  $("#pg-send").addEventListener("click", async () => {
    const out = $("#pg-output"), status = $("#pg-status");
    out.textContent = "";
    status.textContent = "sending";
    $("#pg-send").disabled = true;
    const h = { "Content-Type": "application/json" };
    if ($("#pg-key").value) h["Authorization"] = "Bearer " + $("#pg-key").value;
    const started = performance.now();
    let first = null;
    try {
      const r = await fetch("/v1/chat/completions", { method: "POST", headers: h, body: JSON.stringify({
        model: $("#pg-model").value, stream: true, max_tokens: 128,
        messages: [{ role: "user", content: $("#pg-input").value }] }) });
      if (!r.ok) {
        const body = await r.json().catch(() => ({}));
        status.textContent = "HTTP " + r.status + ": " + ((body.error && body.error.message) || "");
        return;
      }
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      status.textContent = "streaming";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let cut;
        while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
          for (const line of block.split(/\r?\n/)) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
            if (delta && delta.content) {
              if (first === null) first = performance.now();
              out.textContent += delta.content;
            }
          }
        }
      }
      status.textContent = "done, first token after " +
        (first === null ? "-" : ((first - started) / 1000).toFixed(2) + " s");
    } catch (err) {
      status.textContent = "failed: " + err;
    } finally {
      $("#pg-send").disabled = false;
    }
  });

  refresh();
  connect();
  setInterval(refresh, 1000);
})();
