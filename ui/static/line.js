// The line page: one panel per camera, kept live by server-sent events. Updates are drawn at most once per
// animation frame whatever the verdict rate; each browser gets its own bounded queue on the server, so a slow
// page loses nothing but its own freshness (it reloads its snapshot on `resync`).
"use strict";

(() => {
  const { el, clock, ago, number, api, toast, banner, showBroker, root } = LG;
  const line = LG.body.line;
  const STRIP = 60; // verdict ticks per camera
  const ROWS = 12; // verdict rows per camera
  const GALLERY = 40;
  const SHOWN_MAX = 50000;
  const RENDER_EVERY_MS = 100;
  const SVG = "http://www.w3.org/2000/svg";

  const cameras = new Map(); // "agent/camera" -> panel
  const agents = new Map(); // agent id -> AgentCard
  const actuators = new Map(); // actuator id -> ActuatorStatus
  const alarms = new Map(); // alarm id -> Alarm
  const galleries = { gallery: new Map(), close_calls: new Map() };
  let activeTab = "gallery";
  let viewer = { user: LG.body.user || "", csrf: LG.body.csrf || "", can_login: false };
  let labelling = false;
  let renderQueued = false;
  let detailEntry = null;

  // When each verdict was drawn (ms since 1970) and its lag behind the agent's decision: read by the tests and
  // bench/ui_bench.py, and a cheap self-check for anyone with the browser console open.
  const shown = new Map();
  const lagMs = [];
  window.lineguard = { shown, lagMs };

  const cameraKey = (agentId, camera) => `${agentId}/${camera}`;

  // -- camera panels ---------------------------------------------------------------------------------------------

  function panelFor(agentId, camera, lineName) {
    const k = cameraKey(agentId, camera);
    let p = cameras.get(k);
    if (p) return p;
    const node = document.getElementById("camera-template").content.firstElementChild.cloneNode(true);
    node.dataset.camera = k;
    node.querySelector(".cam-name").textContent = camera;
    node.querySelector(".agent-name").textContent = line === "+" ? `${agentId} · ${lineName}` : agentId;
    const strip = node.querySelector(".strip");
    const ticks = Array.from({ length: STRIP }, () => strip.appendChild(el("i", { hidden: true })));
    const rows = node.querySelector("table.verdicts tbody");
    const rowNodes = Array.from({ length: ROWS }, () => {
      const tr = rows.appendChild(el("tr", { hidden: true }));
      for (let i = 0; i < 5; i += 1) tr.appendChild(el("td", { class: i === 1 || i >= 3 ? "num" : "" }));
      return tr;
    });
    p = {
      node, agentId, camera, ticks, rowNodes,
      recent: [], seen: new Set(), pending: [],
      img: node.querySelector(".frame img"),
      frame: { loading: false, next: null },
    };
    p.img.addEventListener("load", () => frameDone(p));
    p.img.addEventListener("error", () => frameDone(p));
    const holder = document.getElementById("cameras");
    document.getElementById("no-cameras")?.remove();
    const after = [...holder.children].find((other) => other.dataset.camera > k);
    holder.insertBefore(node, after || null);
    cameras.set(k, p);
    updateModelBox(p);
    return p;
  }

  function onVerdicts(items) {
    for (const verdict of items) {
      const p = panelFor(verdict.agent_id, verdict.camera, verdict.line);
      p.pending.push(verdict);
      if (p.pending.length > STRIP) p.pending.splice(0, p.pending.length - STRIP);
    }
    scheduleRender();
  }

  // At most one redraw per RENDER_EVERY_MS, on an animation frame: 4 cameras at 30 fps cost 10 redraws a
  // second, not 120, and a verdict waits at most this long to be drawn.
  let lastRender = 0;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    const wait = Math.max(0, lastRender + RENDER_EVERY_MS - performance.now());
    setTimeout(() => requestAnimationFrame(render), wait);
  }

  function render() {
    renderQueued = false;
    lastRender = performance.now();
    const now = Date.now();
    for (const p of cameras.values()) {
      if (!p.pending.length) continue;
      for (const verdict of p.pending) {
        const id = `${verdict.seq}@${verdict.decided_ts}`;
        if (p.seen.has(id)) continue; // QoS 1 may deliver a verdict twice
        p.seen.add(id);
        p.recent.push(verdict);
        const k = `${p.agentId}/${p.camera}/${verdict.seq}`;
        if (!shown.has(k)) {
          shown.set(k, now);
          lagMs.push(now - verdict.decided_ts * 1000);
        }
      }
      p.pending = [];
      while (p.recent.length > STRIP) p.seen.delete(`${p.recent[0].seq}@${p.recent.shift().decided_ts}`);
      drawVerdicts(p);
    }
    if (shown.size > SHOWN_MAX) shown.delete(shown.keys().next().value);
    if (lagMs.length > SHOWN_MAX) lagMs.splice(0, lagMs.length - SHOWN_MAX);
  }

  function drawVerdicts(p) {
    const latest = p.recent[p.recent.length - 1];
    if (!latest) return;
    const word = p.node.querySelector(".verdict-word");
    word.textContent = latest.verdict;
    word.className = `verdict-word ${latest.verdict}`;
    p.node.querySelector(".score-text").textContent = latest.verdict === "failsafe"
      ? `${latest.cause}: ${latest.reason}`
      : `score ${number(latest.score)} ${latest.score >= latest.threshold ? "≥" : "<"} ${number(latest.threshold)}`;
    const fill = p.node.querySelector(".scorebar .fill");
    const scale = Math.max(latest.threshold * 2, latest.score || 0, 1e-9);
    fill.style.width = `${Math.min(100, ((latest.score || 0) / scale) * 100)}%`;
    fill.classList.toggle("over", latest.verdict !== "accept");
    p.node.querySelector(".scorebar .threshold").style.left = `${(latest.threshold / scale) * 100}%`;
    const offset = STRIP - p.recent.length;
    p.ticks.forEach((tick, index) => {
      const verdict = p.recent[index - offset];
      tick.hidden = !verdict;
      if (verdict) {
        tick.className = verdict.verdict;
        tick.title = `seq ${verdict.seq} ${verdict.verdict} ${number(verdict.score)}`;
      }
    });
    p.rowNodes.forEach((tr, index) => {
      const verdict = p.recent[p.recent.length - 1 - index];
      tr.hidden = !verdict;
      if (!verdict) return;
      tr.dataset.seq = verdict.seq;
      const cells = tr.children;
      cells[0].textContent = clock(verdict.decided_ts, true);
      cells[1].textContent = verdict.seq;
      cells[2].textContent = verdict.verdict === "failsafe" ? `failsafe (${verdict.cause})` : verdict.verdict;
      cells[2].className = `v-${verdict.verdict}`;
      cells[3].textContent = `${number(verdict.score)} / ${number(verdict.threshold)}`;
      cells[4].textContent = number(verdict.latency_ms.total, 1);
    });
  }

  // -- the latest frame: fetched only when the previous one has loaded, so a fast camera cannot flood the page --

  function onFrame(ref) {
    if (!ref) return;
    const p = panelFor(ref.agent_id, ref.camera, line);
    p.frame.next = ref;
    if (!p.frame.loading) loadFrame(p);
  }

  function loadFrame(p) {
    const ref = p.frame.next;
    p.frame.next = null;
    p.frame.loading = true;
    p.img.src = `${root}/api/frame/${encodeURIComponent(ref.agent_id)}/${encodeURIComponent(ref.camera)}?seq=${ref.seq}`;
    const verdict = ref.verdict;
    p.node.querySelector(".frame-tag").textContent = `seq ${ref.seq}` +
      (verdict ? ` · ${verdict.verdict} ${number(verdict.score)}` : "") + ` · ${clock(ref.received_ts)}`;
  }

  function frameDone(p) {
    p.frame.loading = false;
    p.img.hidden = false;
    p.node.querySelector(".no-frame").hidden = true;
    if (p.frame.next) loadFrame(p);
  }

  // -- charts and latency --------------------------------------------------------------------------------------

  function onStats(stats) {
    const p = panelFor(stats.agent_id, stats.camera, stats.line);
    const complete = stats.series;
    const totals = complete.map(([, a, r, f]) => a + r + f);
    const last = complete.length - 1; // still filling: its rate is over the seconds it has had
    const seconds = complete.map(([start], i) => (i === last ? Math.max(1, Math.min(stats.bucket_s, Date.now() / 1000 - start)) : stats.bucket_s));
    const fps = totals.map((n, i) => n / seconds[i]);
    const share = (index) => complete.map((row, i) => (totals[i] ? (row[index] / totals[i]) * 100 : 0));
    drawChart(p, "fps", fps, 1, (v) => number(v, 1));
    drawChart(p, "reject", share(2), 5, (v) => `${number(v, 1)}%`);
    drawChart(p, "failsafe", share(3), 5, (v) => `${number(v, 1)}%`);
    const body = p.node.querySelector("table.latency tbody");
    body.replaceChildren(...stats.latency.map((stage) => el("tr", {},
      el("td", { text: stage.stage.replaceAll("_", " ") }),
      el("td", { class: "num", text: number(stage.p50_ms, 1) }),
      el("td", { class: "num", text: number(stage.p99_ms, 1) }))));
  }

  function drawChart(p, name, values, floor, format) {
    const svg = p.node.querySelector(`svg[data-series="${name}"]`);
    const max = Math.max(floor, ...values);
    const step = 120 / Math.max(1, values.length - 1);
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${(31 - (v / max) * 29).toFixed(1)}`).join(" ");
    const polyline = document.createElementNS(SVG, "polyline");
    polyline.setAttribute("points", points);
    const area = document.createElementNS(SVG, "polygon");
    area.setAttribute("points", `0,32 ${points} 120,32`);
    const title = document.createElementNS(SVG, "title");
    title.textContent = `${name}, last ${values.length} × 10 s; max ${format(max)}`;
    svg.replaceChildren(title, area, polyline);
    svg.parentElement.querySelector(".value").textContent = values.length ? format(values[values.length - 1]) : "–";
  }

  // -- agents, models, actuators -------------------------------------------------------------------------------

  function onAgents(cards) {
    for (const card of cards) agents.set(card.agent_id, card);
    drawAgents();
    for (const p of cameras.values()) updateModelBox(p);
  }

  function updateModelBox(p) {
    const card = agents.get(p.agentId);
    const pill = p.node.querySelector(".fps");
    const box = p.node.querySelector("dl.model");
    if (!card) return;
    const fps = card.fps[p.camera];
    pill.textContent = !card.online ? "agent offline" : fps === undefined ? "no frames" : `${number(fps, 1)} fps`;
    pill.className = `pill fps ${!card.online ? "bad" : fps === undefined ? "warn" : "ok"}`;
    const live = card.live_since ? `${ago(card.live_since)}${card.live_from_event ? "" : " (first seen)"}` : "–";
    const facts = [
      ["model", card.model || "–"], ["back end", card.backend || "–"], ["threshold", number(card.threshold, 4)],
      ["live since", live], ["queue", `${card.queue_depth} frames · ${card.mqtt_queued} mqtt`],
    ];
    box.replaceChildren(...facts.flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: value })]));
    box.querySelector("dd:nth-of-type(2)").title = card.backend_detail;
  }

  function drawAgents() {
    const holder = document.getElementById("agents");
    if (!agents.size) return;
    holder.replaceChildren(...[...agents.values()].map((card) => el("div", { class: "agent-card", "data-agent": card.agent_id },
      el("header", {}, el("strong", { text: card.agent_id }),
        el("span", { class: card.online ? "pill ok" : "pill bad", text: card.online ? "online" : `offline: ${card.reason || "?"}` })),
      el("div", { class: "muted", text: `${card.model || "no model"} · ${card.backend || "?"} · status ${ago(card.status_ts)}` }),
      el("div", { class: "muted", text: Object.entries(card.fps).map(([c, f]) => `${c} ${number(f, 1)} fps`).join(" · ") || "no camera delivering" }))));
  }

  function onActuator(status) {
    actuators.set(status.actuator_id, status);
    const holder = document.getElementById("actuators");
    holder.replaceChildren(...[...actuators.values()].map((a) => {
      const ok = a.online && a.state === "ok";
      const rejects = Object.entries(a.rejects).map(([why, n]) => `${why} ${n}`).join(", ") || "none";
      return el("div", { class: "actuator-card" },
        el("header", {}, el("strong", { text: a.actuator_id }),
          el("span", { class: ok ? "pill ok" : "pill bad", text: a.online ? a.state : "offline" })),
        el("div", { class: "muted", text: `${a.output || "output ?"} · ${a.parts} parts · ${a.pulses} pulses · late ${a.late_pulses}` }),
        el("div", { class: "muted", text: `rejects: ${rejects} · handshake failures ${a.handshake_failures}` }),
        a.reason ? el("div", { class: "error", text: a.reason }) : null);
    }));
  }

  // -- alarms ----------------------------------------------------------------------------------------------------

  function onAlarm(alarm) {
    if (alarm.acked_ts !== null && !alarm.active) alarms.delete(alarm.alarm_id);
    else alarms.set(alarm.alarm_id, alarm);
    drawAlarms();
  }

  function drawAlarms() {
    const rank = (a) => (a.acked_ts === null ? 0 : 1);
    const list = [...alarms.values()].sort((a, b) => rank(a) - rank(b) || b.raised_ts - a.raised_ts);
    document.getElementById("alarms").replaceChildren(...list.map((alarm) => {
      const acked = alarm.acked_ts !== null;
      const state = acked
        ? `acknowledged by ${alarm.acked_by} ${clock(alarm.acked_ts)}; still active`
        : alarm.active ? "active" : `condition ended ${clock(alarm.cleared_ts)}`;
      let action = null;
      if (!acked && viewer.user) {
        action = el("button", { type: "button", class: "ack", "data-alarm": alarm.alarm_id, text: "Acknowledge" });
        action.addEventListener("click", () => acknowledge(alarm.alarm_id, action));
      } else if (!acked && viewer.can_login) {
        action = el("a", { class: "button", href: `${root}/login`, text: "Log in to acknowledge" });
      }
      return el("div", {
        class: `alarm ${alarm.severity} ${acked ? "acked" : "unacked"}`, "data-alarm": alarm.alarm_id, "data-kind": alarm.kind,
      },
      el("span", { class: "kind", text: alarm.kind.replaceAll("-", " ") }),
      el("span", { class: "message", text: alarm.message + (alarm.count > 1 ? ` (×${alarm.count})` : "") }),
      el("span", { class: "when", text: `raised ${clock(alarm.raised_ts)} · ${state}` }),
      action);
    }));
  }

  async function acknowledge(alarmId, button) {
    button.disabled = true;
    try {
      onAlarm(await api(`/api/alarms/${alarmId}/ack`, { method: "POST" }));
    } catch (error) {
      button.disabled = false;
      toast(`Not acknowledged: ${error.message}`, true);
    }
  }

  // -- gallery and detail ----------------------------------------------------------------------------------------

  const entryKey = (e) => `${e.agent_id}/${e.camera}/${e.seq}`;
  const imageUrl = (e) => `${root}/api/gallery/${encodeURIComponent(e.agent_id)}/${encodeURIComponent(e.camera)}/${e.seq}/image` +
    `?v=${e.image_format || "none"}${e.sample_id ? "s" : ""}`;

  function onGallery(entry) {
    const target = entry.kind === "close-call" ? galleries.close_calls : entry.kind === "random" ? null : galleries.gallery;
    if (!target) return;
    const previous = target.get(entryKey(entry));
    target.set(entryKey(entry), previous ? { ...previous, ...entry, label: entry.label || previous.label } : entry);
    while (target.size > GALLERY * 2) target.delete(target.keys().next().value);
    drawGallery();
    if (detailEntry && entryKey(detailEntry) === entryKey(entry)) openDetail(entry);
  }

  function drawGallery() {
    const entries = [...galleries[activeTab].values()].sort((a, b) => b.received_ts - a.received_ts).slice(0, GALLERY);
    const holder = document.getElementById("gallery");
    if (!entries.length) {
      holder.replaceChildren(el("p", { class: "empty", text: activeTab === "gallery" ? "No rejects yet." : "No close calls from the sample store yet." }));
      return;
    }
    holder.replaceChildren(...entries.map((entry) => {
      const button = el("button", {
        type: "button", class: `thumb ${entry.kind}${entry.label === "ok" ? " labelled-ok" : ""}`, "data-key": entryKey(entry),
        title: `${entry.agent_id}/${entry.camera} seq ${entry.seq}: ${entry.reason}`,
      },
      entry.image_format || entry.sample_id
        ? el("img", { src: imageUrl(entry), alt: "image not available", loading: "lazy" })
        : el("span", { class: "no-image", text: "no heatmap published for this frame" }),
      el("span", { class: "cap", text: `${entry.camera} · ${number(entry.score)} · ${clock(entry.capture_ts)}` }),
      entry.label ? el("span", { class: `badge pill ${entry.label === "ok" ? "ok" : "bad"}`, text: entry.label }) : null);
      button.addEventListener("click", () => openDetail(entry));
      return button;
    }));
  }

  async function openDetail(entry) {
    detailEntry = entry;
    const dialog = document.getElementById("detail");
    dialog.querySelector("img.big").src = imageUrl(entry);
    dialog.querySelector(".title").textContent = `${entry.verdict} · ${entry.agent_id}/${entry.camera} · seq ${entry.seq}`;
    let labels = [];
    try {
      const found = await api(`/api/gallery/${encodeURIComponent(entry.agent_id)}/${encodeURIComponent(entry.camera)}/${entry.seq}`);
      entry = found.entry;
      labels = found.labels;
    } catch (error) {
      toast(error.message, true);
    }
    const facts = [
      ["captured", LG.datetime(entry.capture_ts)], ["score", `${number(entry.score, 4)} (threshold ${number(entry.threshold, 4)})`],
      ["model", entry.model], ["reason", entry.reason || "–"], ["kept as", entry.sample_id ? `sample ${entry.sample_id} (${entry.kind})` : "not in the sample store"],
      ["label", entry.label || "none"],
    ];
    dialog.querySelector(".detail-facts").replaceChildren(...facts.flatMap(([n, v]) => [el("dt", { text: n }), el("dd", { text: v })]));
    const can = labelling && viewer.user && entry.sample_id;
    dialog.querySelectorAll(".label-buttons button, .label-buttons input").forEach((node) => { node.disabled = !can; });
    dialog.querySelector(".label-note").textContent = can ? `Labelled as ${viewer.user}; signed and sent to ${entry.agent_id}.`
      : !labelling ? "Labelling is off: the dashboard has no labeller key (label_key)."
        : !viewer.user ? "Log in to label." : "The agent did not keep this frame in its sample store, so it cannot be labelled.";
    drawLabelHistory(labels);
    if (!dialog.open) dialog.showModal();
  }

  function drawLabelHistory(labels) {
    const list = document.querySelector("#detail .label-history");
    list.replaceChildren(...labels.map((row) => el("li", { "data-request": row.request_id },
      `${row.label}${row.defect_type ? ` (${row.defect_type})` : ""} by ${row.by}, ${LG.datetime(row.issued_ts)}: `,
      el("span", { class: `outcome-${row.outcome}`, text: row.outcome === "sent" ? "sent, waiting for the agent" : `${row.outcome}${row.reason ? ` (${row.reason})` : ""}` }))));
  }

  async function sendLabel(label) {
    const dialog = document.getElementById("detail");
    const defect = dialog.querySelector(".defect").value.trim();
    try {
      const row = await api("/api/labels", {
        method: "POST",
        body: { agent_id: detailEntry.agent_id, camera: detailEntry.camera, seq: detailEntry.seq, label, defect_type: label === "nok" ? defect : "" },
      });
      toast(`Label ${row.label} sent to ${row.agent_id}`);
      onGallery({ ...detailEntry, label: row.label });
    } catch (error) {
      toast(`Not labelled: ${error.message}`, true);
    }
  }

  function onLabel(row) {
    for (const gallery of Object.values(galleries)) {
      for (const entry of gallery.values()) {
        if (entry.sample_id === row.sample_id && entry.agent_id === row.agent_id) entry.label = row.label;
      }
    }
    drawGallery();
    if (detailEntry && detailEntry.sample_id === row.sample_id) openDetail(detailEntry);
    if (row.outcome === "refused") toast(`${row.agent_id} refused label ${row.label}: ${row.reason}`, true);
  }

  // -- snapshot and live feed ------------------------------------------------------------------------------------

  async function loadSnapshot() {
    const data = await api(`/api/line/${encodeURIComponent(line)}/snapshot`);
    viewer = data.viewer;
    labelling = data.labelling;
    showBroker(data.broker);
    onAgents(data.agents);
    for (const card of data.cameras) {
      const p = panelFor(card.agent_id, card.camera, card.line);
      p.recent = [];
      p.seen = new Set();
      onVerdicts(card.recent);
      onStats(card.stats);
      onFrame(card.frame);
    }
    data.actuators.forEach(onActuator);
    alarms.clear();
    data.alarms.forEach((alarm) => alarms.set(alarm.alarm_id, alarm));
    drawAlarms();
    galleries.gallery.clear();
    galleries.close_calls.clear();
    [...data.gallery, ...data.close_calls].reverse().forEach(onGallery);
    drawGallery();
  }

  function connect() {
    const source = new EventSource(`${root}/api/line/${encodeURIComponent(line)}/events`);
    const on = (name, handler) => source.addEventListener(name, (event) => handler(JSON.parse(event.data)));
    on("hello", () => {
      banner("link", "");
      loadSnapshot().catch((error) => toast(`Could not load the line: ${error.message}`, true));
    });
    on("verdicts", onVerdicts);
    on("frame", onFrame);
    on("stats", onStats);
    on("agents", onAgents);
    on("alarm", onAlarm);
    on("gallery", onGallery);
    on("label", onLabel);
    on("actuator", onActuator);
    on("broker", showBroker);
    on("push", (event) => toast(`${event.agent_id}: ${event.action} of ${event.model || "previous model"} ${event.outcome}` +
      (event.outcome === "refused" ? `: ${event.reason}` : ""), event.outcome === "refused"));
    on("resync", () => loadSnapshot().catch(() => {}));
    source.onerror = () => {
      banner("link", "Lost the live feed from the dashboard server; reconnecting…");
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 5000);
    };
  }

  document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((other) => other.classList.toggle("on", other === tab));
    activeTab = tab.dataset.tab;
    drawGallery();
  }));
  document.querySelectorAll("#detail .label-buttons button").forEach((button) => {
    button.addEventListener("click", () => sendLabel(button.dataset.label));
  });
  document.getElementById("detail").addEventListener("close", () => { detailEntry = null; });
  setInterval(() => { drawAgents(); for (const p of cameras.values()) updateModelBox(p); }, 5000);
  connect();
})();
